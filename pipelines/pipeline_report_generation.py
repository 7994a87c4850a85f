"""ReportGenerationPipeline: CT -> draft report with PaliGemma2 (greedy or sampled)."""
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from diffusers.utils import BaseOutput

from medvlm.config import preprocess_from_dict, preprocess_to_dict
from medvlm.data.inputs import as_list, prepare_ct
from medvlm.models.report_generator import check_max_new_tokens, drafting_batch, render_ct
from pipelines.base import MedVLMPipeline


@dataclass
class ReportGenerationOutput(BaseOutput):
    """Drafted reports (one per CT). Drafts are machine-generated and must be reviewed."""

    reports: list[str]


class ReportGenerationPipeline(MedVLMPipeline):
    r"""Draft a report from CT with PaliGemma2.

    Components: report_generator ([`~transformers.PaliGemmaForConditionalGeneration`]) and report_processor
    ([`~transformers.PaliGemmaProcessor`]). Config: ``preprocess`` (CT chain), ``max_new_tokens``.
    The CT is rendered as a soft-tissue montage of axial slices (:func:`medvlm.models.report_generator.render_ct`).
    """

    model_cpu_offload_seq = "report_generator"
    _config_names = ("preprocess", "max_new_tokens")

    def __init__(self, report_generator, report_processor, preprocess: dict | None = None, max_new_tokens: int = 160):
        super().__init__()
        self.register_modules(report_generator=report_generator, report_processor=report_processor)
        preprocess = dict(preprocess or preprocess_to_dict())
        self.register_to_config(preprocess=preprocess, max_new_tokens=max_new_tokens)

    def check_inputs(self, max_new_tokens: int, temperature: float, do_sample: bool) -> None:
        check_max_new_tokens(max_new_tokens)  # the ceiling; the model's positions are checked with the prompt
        if do_sample and not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"`temperature` must be > 0 when sampling, got {temperature}")

    @torch.no_grad()
    def __call__(self, ct: Any, *, spacing_mm=None, affine=None, max_new_tokens: int | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 50, generator: torch.Generator | None = None,
                 region: str | Sequence[float] | None = "head_neck", return_dict: bool = True):
        """Draft one report per CT. With ``do_sample``, ``generator`` makes the draw reproducible. ``region``: which
        part of a CT of any extent is rendered (see ``ContourPipeline``; default the head and neck)."""
        max_new_tokens = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        self.check_inputs(max_new_tokens, temperature, do_sample)
        config = preprocess_from_dict(self.config.preprocess)
        size = self.report_processor.image_processor.size["height"]
        images = []
        for i, item in enumerate(self.progress_bar(as_list(ct))):
            image = prepare_ct(item, config, spacing_mm=spacing_mm, affine=affine, what=f"ct[{i}]", region=region).image[0]
            images.append(render_ct(image, image_size=size, input_is_hu=False, value_range=config.hu_window,
                                     model_range=config.output_range))
        batch = drafting_batch(self.report_processor, images).to(self._execution_device)
        max_new_tokens = check_max_new_tokens(max_new_tokens, self.report_generator, batch["input_ids"].shape[1])
        options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
        if do_sample:
            options.update(temperature=temperature, top_k=top_k)
        # transformers' generate draws from the global RNG: seed a forked copy from `generator` instead
        seed = int(generator.initial_seed()) if generator is not None else None
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            generated = self.report_generator.generate(**batch, **options)
        texts = self.report_processor.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        self.maybe_free_model_hooks()
        output = ReportGenerationOutput([t.strip() for t in texts])
        return output if return_dict else output.to_tuple()
