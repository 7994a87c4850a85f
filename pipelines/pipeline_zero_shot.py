"""ZeroShotClassificationPipeline: reports and/or CT volumes scored against class prompts in the contrastive space."""
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from diffusers.utils import BaseOutput

from medvlm.config import preprocess_from_dict, preprocess_to_dict
from medvlm.data.inputs import as_list, prepare_ct
from medvlm.models import MedCLIPModel, ZeroShotClassifier
from pipelines.base import MedVLMPipeline


@dataclass
class ZeroShotClassificationOutput(BaseOutput):
    """Per label set: class names, probabilities (N, C) and the predicted class of each input, for
    reports and for CT volumes separately (``None`` where that modality was not given)."""

    labels: dict[str, list[str]]
    report_probabilities: dict[str, np.ndarray] | None
    ct_probabilities: dict[str, np.ndarray] | None

    def predictions(self, modality: str = "report") -> dict[str, list[str]]:
        probabilities = self.report_probabilities if modality == "report" else self.ct_probabilities
        if probabilities is None:
            raise ValueError(f"no {modality} probabilities in this output")
        return {name: [self.labels[name][i] for i in p.argmax(1)] for name, p in probabilities.items()}


class ZeroShotClassificationPipeline(MedVLMPipeline):
    r"""Zero-shot classification with the MedCLIP-style encoder.

    Components: contrastive ([`MedCLIPModel`]) and tokenizer. Config: ``preprocess`` for CT inputs,
    ``max_report_tokens``, ``report_format`` (``"structured"``: reports are parsed into the standard
    prompt the encoder was trained on; ``"raw"``: the de-identified text as written). Label sets are ``{"laterality": ["left", "right", "midline"]}`` (names, expanded
    with prompt templates) or ``{"set": {"class": ["prompt", ...]}}`` (explicit prompt ensembles); any text
    works, including classes never seen in training.
    """

    model_cpu_offload_seq = "contrastive"
    _config_names = ("preprocess", "max_report_tokens", "report_format")

    def __init__(self, contrastive: MedCLIPModel, tokenizer, preprocess: dict | None = None, max_report_tokens: int = 128,
                 report_format: str = "structured"):
        super().__init__()
        self.register_modules(contrastive=contrastive, tokenizer=tokenizer)
        preprocess = dict(preprocess or preprocess_to_dict())
        self.register_to_config(preprocess=preprocess, max_report_tokens=max_report_tokens, report_format=report_format)

    def check_inputs(self, reports, ct, labels) -> None:
        if reports is None and ct is None:
            raise ValueError("pass `reports` and/or `ct` to classify")
        if not isinstance(labels, Mapping) or not labels:
            raise ValueError(f"`labels` must map label-set names to classes, e.g. {{'laterality': ['left', 'right']}}; got {labels!r}")
        for name, classes in labels.items():
            if len(classes) < 2:
                raise ValueError(f"`labels[{name!r}]` needs at least two classes, got {classes!r}")

    @torch.no_grad()
    def __call__(self, reports: str | Sequence[str] | None = None, ct: Any = None, *,
                 labels: Mapping[str, Sequence[str] | Mapping[str, Sequence[str]]], spacing_mm=None, affine=None,
                 region: str | Sequence[float] | None = "head_neck", return_dict: bool = True):
        """Probabilities per label set for ``reports`` (text) and/or ``ct`` (paths, arrays, MetaTensors).
        ``region``: which part of a CT of any extent is read (see ``ContourPipeline``; default the head and neck)."""
        self.check_inputs(reports, ct, labels)
        classifier = ZeroShotClassifier(self.contrastive, self.tokenizer, max_length=self.config.max_report_tokens,
                                        report_format=getattr(self.config, "report_format", "structured"))
        names = {name: list(classes.keys()) if isinstance(classes, Mapping) else list(classes) for name, classes in labels.items()}
        report_probs = ct_probs = None
        if reports is not None:
            texts = [reports] if isinstance(reports, str) else list(reports)
            report_probs = {name: classifier.classify_reports(texts, classes, name)[1].float().cpu().numpy()
                            for name, classes in self.progress_bar(list(labels.items()))}
        if ct is not None:
            batch = self.prepare_volumes(ct, spacing_mm=spacing_mm, affine=affine, region=region).to(self._execution_device)
            ct_probs = {name: classifier.classify_images(batch, classes, name)[1].float().cpu().numpy()
                        for name, classes in labels.items()}
        self.maybe_free_model_hooks()
        output = ZeroShotClassificationOutput(names, report_probs, ct_probs)
        return output if return_dict else output.to_tuple()

    def prepare_volumes(self, ct: Any, *, spacing_mm=None, affine=None, region=None) -> torch.Tensor:
        """CT inputs (paths, HU arrays, MetaTensors) -> the image tower's input batch (N, 1, *roi_size):
        the pipeline's preprocessing, then a centre crop (the chain already padded) to the trained ROI."""
        from monai.transforms import CenterSpatialCrop

        config = preprocess_from_dict(self.config.preprocess)
        crop = CenterSpatialCrop(tuple(config.roi_size))
        return torch.stack([crop(prepare_ct(item, config, spacing_mm=spacing_mm, affine=affine, what=f"ct[{i}]",
                                            region=region).image.as_tensor())
                            for i, item in enumerate(as_list(ct))])

    def embed_ct(self, ct: Any, *, spacing_mm=None, affine=None, batch_size: int = 8) -> np.ndarray:
        """L2-normalised contrastive image embeddings (N, embed_dim) of CT inputs, e.g. for Frechet distances
        or a linear probe."""
        return self.embed_volumes(self.prepare_volumes(ct, spacing_mm=spacing_mm, affine=affine), batch_size=batch_size)

    @torch.no_grad()
    def embed_volumes(self, volumes: torch.Tensor, *, batch_size: int = 8) -> np.ndarray:
        """:meth:`embed_ct` of volumes already prepared by :meth:`prepare_volumes`."""
        model = self.contrastive.eval()
        embeds = [model.encode_image(volumes[k:k + batch_size].to(self._execution_device)).float().cpu()
                  for k in range(0, len(volumes), batch_size)]
        self.maybe_free_model_hooks()
        return torch.cat(embeds).numpy()
