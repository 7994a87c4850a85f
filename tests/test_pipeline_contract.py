"""The diffusers pipeline contract, checked the way diffusers' own ``PipelineTesterMixin`` checks its pipelines.

Written for medvlm's pipelines after reading diffusers' ``tests/pipelines/test_pipelines_common.py``
(Apache-2.0); no code is copied. What applies here: the call signature, ``components`` rebuilding the
pipeline, optional components through save/load, batches and ``num_images_per_prompt``, dict and tuple
outputs, ``to(device/dtype)``, step-end callbacks and their tensor inputs. What does not: attention slicing,
xFormers, IP adapters, variants and fp16 weights (3D MONAI networks, float32 safetensors only), and
sequential/model CPU offload (``test_pipelines.test_model_cpu_offload`` runs where an accelerator is present).
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from medvlm.config import load_config
from pipelines import ContourPipeline, ReportGenerationPipeline, ReportToCTPipeline, ZeroShotClassificationPipeline
from pipelines.assemble import build_pipelines

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PROMPT = "left tonsil SCC, cT2 N1 M0, ipsilateral elective neck"


@pytest.fixture(scope="module")
def pipes():
    torch.manual_seed(0)
    return build_pipelines(load_config(CONFIGS / "tiny.yaml"), report_texts=["left tonsil carcinoma"] * 4)


def _run(pipe, **kwargs):
    options = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    options.update(kwargs)
    return pipe(options.pop("prompt", PROMPT), **options)


def test_call_signature_has_the_diffusers_parameters():
    names = set(inspect.signature(ReportToCTPipeline.__call__).parameters)
    expected = {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "generator", "latents",
                "num_images_per_prompt", "output_type", "return_dict", "prompt_embeds", "negative_prompt_embeds",
                "callback_on_step_end", "callback_on_step_end_tensor_inputs"}
    assert expected <= names, expected - names
    assert {"return_dict", "generator"} <= set(inspect.signature(ContourPipeline.__call__).parameters)
    assert set(inspect.signature(ReportToCTPipeline.encode_prompt).parameters) >= {
        "prompt", "device", "num_images_per_prompt", "do_classifier_free_guidance", "negative_prompt", "prompt_embeds",
        "negative_prompt_embeds"}


@pytest.mark.parametrize("name", ["contour", "report_to_ct", "zero_shot", "report_generation"])
def test_components_rebuild_the_pipeline(pipes, name):
    """``type(pipe)(**pipe.components, **config)`` is the same pipeline (diffusers' test_components_function)."""
    pipe = pipes[name]
    expected = set(inspect.signature(type(pipe).__init__).parameters) - {"self"} - set(type(pipe)._config_names)
    assert set(pipe.components) == expected
    settings = {k: pipe.config[k] for k in type(pipe)._config_names}
    rebuilt = type(pipe)(**pipe.components, **settings)
    assert set(rebuilt.components) == set(pipe.components)
    assert all(rebuilt.components[k] is v for k, v in pipe.components.items())
    assert dict(rebuilt.config) == dict(pipe.config)


def test_optional_segmentation_survives_save_and_load_as_none(pipes, tmp_path):
    """diffusers' test_save_load_optional_components: an optional component set to None stays None."""
    base = pipes["report_to_ct"]
    pipe = ReportToCTPipeline(**{**base.components, "segmentation": None}, preprocess=dict(base.config.preprocess))
    before = _run(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = ReportToCTPipeline.from_pretrained(tmp_path)
    assert loaded.segmentation is None
    after = _run(loaded)
    assert torch.equal(before.ct, after.ct) and torch.equal(before.masks, after.masks)


def test_batches_and_images_per_prompt_have_the_expected_shapes(pipes):
    pipe = pipes["report_to_ct"]
    prompts = [PROMPT, "right larynx SCC, cT3 N0 M0"]
    out = _run(pipe, prompt=prompts, num_images_per_prompt=2, generator=None)
    assert out.ct.shape[0] == 4 and out.masks.shape[0] == 4 and len(out.prompts) == 2
    for guidance in (1.0, 3.0):  # with and without classifier-free guidance
        assert _run(pipe, guidance_scale=guidance).ct.shape == (1, 32, 32, 32)


def test_dict_and_tuple_outputs_are_equal(pipes, tmp_path):
    pipe = pipes["report_to_ct"]
    as_dict = _run(pipe)
    ct, masks = _run(pipe, return_dict=False)
    assert torch.equal(as_dict.ct, ct) and torch.equal(as_dict.masks, masks)


def test_to_device_and_dtype_move_every_model_component(pipes):
    pipe = pipes["zero_shot"]
    models = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    pipe.to("cpu")
    assert all(p.device.type == "cpu" for m in models for p in m.parameters())
    pipe.to(torch.float64)
    try:
        assert all(p.dtype == torch.float64 for m in models for p in m.parameters())
    finally:
        pipe.to(torch.float32)
    assert all(p.dtype == torch.float32 for m in models for p in m.parameters())


def test_callback_tensor_inputs_are_checked_and_a_changed_tensor_is_used(pipes):
    """diffusers' test_callback_inputs: only declared tensors may be requested; what the callback returns is used."""
    pipe = pipes["report_to_ct"]
    assert pipe._callback_tensor_inputs == ["latents"]
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        _run(pipe, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["prompt_embeds"])

    def zero_at_last_step(p, step, timestep, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if step == p.num_timesteps - 1 else {}

    zeroed = _run(pipe, callback_on_step_end=zero_at_last_step, output_type="latent")
    assert torch.count_nonzero(zeroed.ct) == 0
    plain = _run(pipe, output_type="latent")
    assert torch.count_nonzero(plain.ct) > 0


def test_report_generation_and_contour_outputs_match_as_dict_and_tuple(pipes):
    from medvlm.data.phantom import HNCPhantom, PhantomConfig

    case = HNCPhantom(PhantomConfig(shape=(32, 32, 32), spacing_mm=(6.0, 6.0, 6.0)), seed=0).case(0)
    contour = pipes["contour"]
    as_dict = contour(case.image_hu, case.report.text, spacing_mm=(6.0, 6.0, 6.0), region=None)
    as_tuple = contour(case.image_hu, case.report.text, spacing_mm=(6.0, 6.0, 6.0), region=None, return_dict=False)
    assert len(as_tuple[0]) == len(as_dict.masks) == 1 and set(as_tuple[0][0]) == set(as_dict.masks[0])
    assert all(np.array_equal(as_dict.masks[0][name], as_tuple[0][0][name]) for name in as_dict.masks[0])
    drafts = pipes["report_generation"](case.image_hu, spacing_mm=(6.0, 6.0, 6.0), region=None, max_new_tokens=4)
    assert isinstance(drafts.reports, list) and len(drafts.reports) == 1
    assert isinstance(pipes["report_generation"], ReportGenerationPipeline)
    assert isinstance(pipes["zero_shot"], ZeroShotClassificationPipeline)
