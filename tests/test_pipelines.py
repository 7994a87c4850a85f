"""Diffusers pipelines: outputs in the input's grid, determinism, save/load round trips, bad input, safe loading."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from medvlm.config import load_config
from medvlm.data.phantom import HNCPhantom, PhantomConfig
from medvlm.errors import InputError
from pipelines import ContourPipeline, ReportGenerationPipeline, ReportToCTPipeline, ZeroShotClassificationPipeline
from pipelines.assemble import build_pipelines

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def pipes():
    torch.manual_seed(0)
    return build_pipelines(load_config(CONFIGS / "tiny.yaml"), report_texts=["left tonsil carcinoma bilateral neck"] * 4)


@pytest.fixture(scope="module")
def case():
    return HNCPhantom(PhantomConfig(shape=(32, 32, 32), spacing_mm=(6.0, 6.0, 6.0)), seed=0).case(1)


@pytest.fixture(scope="module")
def saved(pipes, tmp_path_factory):
    folders = {}
    for name, pipe in pipes.items():
        folders[name] = tmp_path_factory.mktemp(name)
        pipe.save_pretrained(folders[name])
    return folders


def _non_ras_anisotropic(case):
    """The case stored LPS-flipped at 6 x 6 x 6 mm, then cut to an anisotropic, non-cubic grid."""
    image = case.image_hu[::-1, ::-1, 4:28]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = case.image_hu.shape[0] - 1, case.image_hu.shape[1] - 1
    affine = case.affine @ flip
    affine[:3, 3] += affine[:3, 2] * 4
    affine[:3, 2] *= 1.5  # thicker slices: 6 x 6 x 9 mm
    return np.ascontiguousarray(image), affine


# ------------------------------------------------------------------------------------------ contour
def test_contour_masks_land_in_the_input_grid_of_a_non_ras_anisotropic_ct(pipes, case, tmp_path):
    image, affine = _non_ras_anisotropic(case)
    out = pipes["contour"](image, report=case.report.text, affine=affine, return_probabilities=True)
    assert out.structure_names[0] == "GTVp" and set(out.masks[0]) == set(out.structure_names)
    assert all(mask.shape == image.shape and mask.dtype == bool for mask in out.masks[0].values())
    assert np.allclose(out.affines[0], affine)
    assert out.probabilities[0].shape == (9, *image.shape)
    assert out.report_sources == ["given"] and "head and neck cancer" in out.reports[0]
    assert case.identity.last_name not in out.reports[0]
    written = out.save(tmp_path / "pred")
    assert len(written) == 9
    saved = nib.load(str(tmp_path / "pred" / "CTVn.nii.gz"))
    assert saved.shape == image.shape and np.allclose(saved.affine, affine, atol=1e-5)
    assert "head and neck cancer" in (tmp_path / "pred" / "report_used.txt").read_text()


def test_contour_sides_follow_the_whole_volumes_midline_across_sliding_windows(pipes, monkeypatch):
    """A report that rules out the right-sided CTVn empties it right of the *volume's* midline, also in
    windows that hold only part of the body (their own centroid would put a midline inside them)."""
    import copy

    pipe = pipes["contour"]
    segmentation = copy.deepcopy(pipe.segmentation)
    ctvn = 2
    with torch.no_grad():
        segmentation.presence[-1].bias[ctvn * 3:ctvn * 3 + 3] = torch.tensor([30.0, 30.0, -30.0])  # left only
    monkeypatch.setattr(pipe, "segmentation", segmentation)
    image = torch.full((1, 1, 64, 32, 32), -1.0)
    image[:, :, 8:48] = torch.rand(1, 1, 40, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.2  # body: midline 27.5
    states, mask, clean = pipe.encode_reports(["Left tonsil SCC, cT2 cN1 cM0. Elective neck: ipsilateral."], torch.device("cpu"))
    config = pipe.preprocess_config
    probabilities = pipe._infer(image, states, mask, config, 0.25, 1, 0, None, pipe.report_fields(clean, torch.device("cpu")))
    margin = segmentation.config.side_margin
    assert probabilities[0, ctvn, int(27.5 + margin + 6):].max() < 1e-3
    assert probabilities[0, ctvn, :int(27.5 - margin - 6)].mean() > 0.05


def test_contour_without_report_drafts_one_or_warns(pipes, case):
    drafted = pipes["contour"](case.image_hu, affine=case.affine)
    assert drafted.report_sources == ["drafted"] and "drafted" in drafted.warnings[0][0]
    bare = ContourPipeline(**{k: v for k, v in pipes["contour"].components.items() if k not in ("report_generator", "report_processor")},
                           preprocess=pipes["contour"].config.preprocess)
    out = bare(case.image_hu, affine=case.affine, return_probabilities=True)
    assert out.report_sources == ["none"] and "null report" in out.warnings[0][0]
    # asked not to draft, the full pipeline contours with the null report: the bare pipeline's result
    null = pipes["contour"](case.image_hu, affine=case.affine, draft_missing_reports=False, return_probabilities=True)
    assert null.report_sources == ["none"] and "none drafted" in null.warnings[0][0]
    assert np.array_equal(null.probabilities[0], out.probabilities[0])


def test_a_report_with_no_readable_field_is_contoured_with_a_warning(pipes, case):
    unreadable = ["Carcinome épidermoïde de l'amygdale gauche, adénopathie homolatérale.", "Patient: John Smith, MRN 1234567"]
    out = pipes["contour"]([case.image_hu] * 3, report=[*unreadable, "left tonsil SCC cT2 N1"], affine=case.affine)
    assert all(any("no clinical field" in w for w in warnings) for warnings in out.warnings[:2])
    assert not any("no clinical field" in w for w in out.warnings[2])


def _counting_parser(monkeypatch):
    """Count the report parses of every route (the parse behind :func:`medvlm.text.prompts.process_report`)."""
    import medvlm.text.parse as parse_module
    import medvlm.text.prompts as prompts_module

    calls = []
    original = parse_module.parse_report

    def counting(text):
        calls.append(text)
        return original(text)

    monkeypatch.setattr(parse_module, "parse_report", counting)
    monkeypatch.setattr(prompts_module, "parse_report", counting)
    return calls


def test_each_report_is_deidentified_and_parsed_once_per_call(pipes, case, monkeypatch):
    """One report path: the structured prompt, the token states, the fields and every check come from one parse of
    the de-identified text, in contouring and in generation alike."""
    calls = _counting_parser(monkeypatch)
    report = "Patient John Smith, MRN 1234567. Right tonsil SCC cT2 N1 M0, p16 positive. Plan: ipsilateral neck."
    out = pipes["contour"]([case.image_hu] * 2, report=[report, "left larynx cT3 N0"], affine=case.affine)
    assert len(calls) == 2 and "John Smith" not in calls[0] and "1234567" not in calls[0]
    assert out.reports[0].startswith("head and neck cancer. primary: right tonsil")
    calls.clear()
    generated = pipes["report_to_ct"]([report], num_inference_steps=2, negative_prompt="left tonsil",
                                      generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2  # the prompt and the negative prompt, once each
    assert generated.prompts == [out.reports[0]]


def test_contour_drafts_within_the_configured_length(pipes, case, saved, monkeypatch):
    loaded = ContourPipeline.from_pretrained(saved["contour"])
    assert loaded.config.max_new_tokens == pipes["report_generation"].config.max_new_tokens  # from the training config
    loaded.register_to_config(max_new_tokens=3)
    original, asked = loaded.report_generator.generate, []

    def generate(*args, **kwargs):
        asked.append(kwargs["max_new_tokens"])
        return original(*args, **kwargs)

    monkeypatch.setattr(loaded.report_generator, "generate", generate)
    out = loaded(case.image_hu, affine=case.affine)
    assert asked == [3] and out.report_sources in (["drafted"], ["none"])


def test_contour_save_load_round_trip_is_bit_exact(pipes, saved, case):
    loaded = ContourPipeline.from_pretrained(saved["contour"])
    a = pipes["contour"](case.image_hu, report=case.report.text, affine=case.affine, return_probabilities=True)
    b = loaded(case.image_hu, report=case.report.text, affine=case.affine, return_probabilities=True)
    assert np.array_equal(a.probabilities[0], b.probabilities[0])


def test_channels_last_changes_the_layout_not_the_contours_and_saves_contiguous(saved, case, tmp_path):
    pipe = ContourPipeline.from_pretrained(saved["contour"])
    before = pipe(case.image_hu, report=case.report.text, affine=case.affine, return_probabilities=True)
    pipe.enable_channels_last()
    conv = next(p for p in pipe.vae.parameters() if p.dim() == 5 and p.shape[1] > 1 and p.shape[2] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    after = pipe(case.image_hu, report=case.report.text, affine=case.affine, return_probabilities=True)
    np.testing.assert_allclose(after.probabilities[0], before.probabilities[0], atol=1e-4)
    pipe.save_pretrained(tmp_path / "contour")  # contiguous on disk, channels-last again in memory
    assert not conv.is_contiguous()
    reloaded = ContourPipeline.from_pretrained(tmp_path / "contour")
    again = reloaded(case.image_hu, report=case.report.text, affine=case.affine, return_probabilities=True)
    np.testing.assert_allclose(again.probabilities[0], before.probabilities[0], atol=1e-4)


def test_contour_lists_of_cts_and_return_dict_false(pipes, case):
    masks, names, *_ = pipes["contour"]([case.image_hu, case.image_hu], report=["left tonsil", "right tonsil"],
                                        affine=case.affine, return_dict=False)
    assert len(masks) == 2 and names[0] == "GTVp"


def test_contour_output_types_hold_the_same_masks_and_save_alike(pipes, case, tmp_path):
    kwargs = dict(report="left tonsil", affine=case.affine, return_probabilities=True)
    arrays = pipes["contour"](case.image_hu, **kwargs)
    tensors = pipes["contour"](case.image_hu, output_type="pt", **kwargs)
    images = pipes["contour"](case.image_hu, output_type="nifti", **kwargs)
    for name, mask in arrays.masks[0].items():
        assert isinstance(tensors.masks[0][name], torch.Tensor) and np.array_equal(tensors.masks[0][name].numpy(), mask)
        image = images.masks[0][name]
        assert isinstance(image, nib.Nifti1Image) and np.allclose(image.affine, case.affine)
        assert np.array_equal(np.asarray(image.dataobj) > 0, mask)
    assert images.probabilities[0].shape == (*case.image_hu.shape, 9)
    written = images.save(tmp_path / "nifti")
    assert np.array_equal(nib.load(written[0]).get_fdata() > 0, arrays.masks[0][arrays.structure_names[0]])
    with pytest.raises(ValueError, match="output_type"):
        pipes["contour"](case.image_hu, output_type="png", **kwargs)


@pytest.mark.parametrize("bad,message", [
    (np.zeros((32, 32)), "3D"),
    (np.zeros((2, 16, 16, 16)), "3D"),
    (np.full((16, 16, 16), np.nan), "NaN"),
    (np.full((16, 16, 16), -1000.0), "all-air"),
    (np.zeros((16, 16, 1)), "one voxel thick"),
    (np.zeros((16, 16, 16), dtype=bool), "real-valued"),
    (np.zeros((16, 16, 16), dtype=np.complex64), "real-valued"),
])
def test_contour_rejects_bad_volumes(pipes, bad, message):
    with pytest.raises(InputError, match=message):
        pipes["contour"](bad, report="left tonsil", spacing_mm=(3, 3, 3))


def test_contour_rejects_mismatched_batches_and_bad_settings(pipes, case):
    with pytest.raises(ValueError, match="`report` has 1 entries but `ct` has 2"):
        pipes["contour"]([case.image_hu, case.image_hu], report=["x"], affine=case.affine)
    with pytest.raises(ValueError, match="`overlap`"):
        pipes["contour"](case.image_hu, report="x", affine=case.affine, overlap=1.5)
    for thresholds in ([float("nan")] * 9, [1.0] * 9, [0.0] * 9):
        with pytest.raises(ValueError, match="`thresholds` must be probabilities"):
            pipes["contour"](case.image_hu, report="x", affine=case.affine, thresholds=thresholds)
    with pytest.raises(ValueError, match="noise_timestep"):
        pipes["contour"](case.image_hu, report="x", affine=case.affine, noise_timestep=5000)
    with pytest.raises(InputError, match="spacing_mm"):
        pipes["contour"](case.image_hu, report="x")
    with pytest.raises(InputError, match="not found"):
        pipes["contour"]("/nonexistent/ct.nii.gz", report="x")
    for spacing in ((0.01, 0.01, 0.01), (1000.0, 1000.0, 1000.0)):  # metres or microns, not millimetres
        with pytest.raises(InputError, match="outside 0.1-20 mm"):
            pipes["contour"](case.image_hu, report="x", spacing_mm=spacing)
    with pytest.raises(InputError, match="disagrees with the affine"):
        pipes["contour"](case.image_hu, report="x", affine=case.affine, spacing_mm=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="invertible"):
        pipes["contour"](case.image_hu, report="x", affine=np.zeros((4, 4)))


def _neck_on_a_trunk(case):
    """The phantom's neck (32 slices at 6 mm) on top of a 300 mm wide trunk (16 slices), in a 384 mm wide field."""
    neck = case.image_hu
    volume = np.full((64, 32, 48), -1000.0, np.float32)
    volume[16:48, :, 16:] = neck
    x, y = np.meshgrid((np.arange(64) - 31.5) * 6.0, (np.arange(32) - 15.5) * 6.0, indexing="ij")
    trunk = (x / 150.0) ** 2 + (y / 90.0) ** 2 <= 1.0
    volume[:, :, :16][trunk] = 40.0
    return volume, np.diag([6.0, 6.0, 6.0, 1.0])


def test_contour_finds_the_neck_in_a_longer_ct_and_leaves_the_rest_empty(pipes, case):
    from medvlm.data.inputs import head_neck_region

    volume, affine = _neck_on_a_trunk(case)
    crop, note = head_neck_region(volume, affine, extent_mm=32 * 6.0)
    assert crop[2] == slice(16, 48) and "head-and-neck region only" in note
    # narrow down to its inferior end and longer than the ROI (a head-only scan): said, not hidden
    head_only = volume[:, :, 16:]
    crop, note = head_neck_region(head_only, affine, extent_mm=16 * 6.0)
    assert crop[2] == slice(0, 16) and "no shoulders in this CT" in note and "neck is not in it" in note
    # the same with the head towards index 0 (an LPI-stored CT): the region follows the patient, not the array
    flipped = np.diag([6.0, 6.0, -6.0, 1.0])
    assert head_neck_region(volume[:, :, ::-1], flipped, extent_mm=32 * 6.0)[0][2] == slice(0, 32)
    kwargs = dict(report="left tonsil SCC cT2 N1", return_probabilities=True)
    long = pipes["contour"](volume, affine=affine, **kwargs)
    neck_affine = affine.copy()
    neck_affine[2, 3] = 16 * 6.0  # the same field without the trunk slices
    neck = pipes["contour"](volume[:, :, 16:], affine=neck_affine, **kwargs)
    assert long.probabilities[0].shape == (9, 64, 32, 48) and any("head-and-neck" in w for w in long.warnings[0])
    assert not long.probabilities[0][:, :, :, :16].any()  # nothing in the trunk
    assert np.allclose(long.probabilities[0][:, :, :, 16:], neck.probabilities[0], atol=1e-5)
    # a trunk alone is an error naming the problem; the user can still give the region, or ask for the whole CT
    with pytest.raises(InputError, match="no head-and-neck region"):
        pipes["contour"](volume[:, :, :16], affine=affine, **kwargs)
    given = pipes["contour"](volume, affine=affine, region=(16 * 6.0, 47 * 6.0), **kwargs)
    assert np.allclose(given.probabilities[0], long.probabilities[0], atol=1e-6)
    whole = pipes["contour"](volume, affine=affine, region=None, **kwargs)
    assert not any("head-and-neck" in w for w in whole.warnings[0])
    # zero-shot and drafting read the same region, and refuse a trunk alone in the same words
    labels = {"laterality": ["left", "right"]}
    found = pipes["zero_shot"](ct=volume, affine=affine, labels=labels).ct_probabilities["laterality"]
    alone = pipes["zero_shot"](ct=volume[:, :, 16:], affine=neck_affine, labels=labels).ct_probabilities["laterality"]
    assert np.allclose(found, alone, atol=1e-5)
    for call in (lambda: pipes["zero_shot"](ct=volume[:, :, :16], affine=affine, labels=labels),
                 lambda: pipes["report_generation"](volume[:, :, :16], affine=affine)):
        with pytest.raises(InputError, match="no head-and-neck region"):
            call()


def test_a_head_that_ends_at_the_vertex_and_is_too_short_for_a_neck_is_said_to_hold_none():
    from medvlm.data.inputs import head_neck_region

    x, y, z = np.meshgrid((np.arange(80) - 39.5) * 2.0, (np.arange(80) - 39.5) * 2.0, np.arange(60) * 2.5, indexing="ij")
    head = np.where((x / 75.0) ** 2 + (y / 90.0) ** 2 + ((z - 40.0) / 100.0) ** 2 <= 1.0, 40.0, -1000.0)  # vertex at 140 mm
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    crop, note = head_neck_region(head, affine, extent_mm=192.0)
    assert crop is None and "holds no neck" in note and "140 mm below it" in note
    # the phantom's neck (cut at the skull base, no vertex) and a head long enough to reach the neck: no such note
    assert head_neck_region(HNCPhantom(PhantomConfig(), seed=0).case(0).image_hu, np.diag([3.0, 3.0, 3.0, 1.0]), 192.0)[1] == ""
    long_head = np.concatenate([np.repeat(head[:, :, :1], 40, axis=2), head], axis=2)  # 250 mm below the vertex
    assert "holds no neck" not in head_neck_region(long_head, affine, extent_mm=192.0)[1]


def _real_ct(name: str) -> Path:
    from medvlm.data.examples import FetchError, fetch_example

    try:
        folder = fetch_example(name)
    except FetchError as exc:
        pytest.skip(f"example data {name!r} could not be fetched: {exc}")
    return next(folder.rglob("cranium_ct.nii.gz" if name == "invesalius" else "example_ct.nii.gz"))


@pytest.mark.realdata
def test_a_real_abdomen_ct_is_refused_by_every_ct_pipeline(pipes):
    """TotalSegmentator's example CT (abdomen and pelvis) holds no head and neck: a clear error, no masks."""
    path = _real_ct("totalsegmentator")
    with pytest.raises(InputError, match="no head-and-neck region"):
        pipes["contour"](str(path), report="left tonsil SCC cT2 N1")
    with pytest.raises(InputError, match="no head-and-neck region"):
        pipes["zero_shot"](ct=[str(path)], labels={"laterality": ["left", "right"]})
    with pytest.raises(InputError, match="no head-and-neck region"):
        pipes["report_generation"](str(path))


@pytest.mark.realdata
def test_a_real_head_only_ct_is_contoured_with_the_missing_neck_said(pipes):
    """InVesalius' Cranium (skull vertex to maxilla, 0.96 x 0.96 x 1.5 mm): contoured in the input's own grid, with
    the warning that the scan ends at the top of the head and is too short to hold a neck."""
    import nibabel as nib

    path = _real_ct("invesalius")
    image = nib.load(path)
    out = pipes["contour"](str(path), report="left tonsil SCC cT2 N1")
    assert out.masks[0]["GTVp"].shape == image.shape and np.allclose(out.affines[0], image.affine)
    assert any("it holds no neck" in w for w in out.warnings[0]), out.warnings[0]


def test_a_ct_without_contrast_is_contoured_with_a_warning(pipes, case):
    flat = pipes["contour"](np.full(case.image_hu.shape, 40.0, np.float32), report="left tonsil", affine=case.affine)
    assert any("no contrast" in w for w in flat.warnings[0])
    real = pipes["contour"](case.image_hu, report="left tonsil", affine=case.affine)
    assert not any("no contrast" in w for w in real.warnings[0])


# ------------------------------------------------------------------------------------------ loading safety
def test_loading_refuses_foreign_modules_code_and_damaged_weights(saved, tmp_path):
    bad = tmp_path / "foreign"
    shutil.copytree(saved["contour"], bad)
    index = json.loads((bad / "model_index.json").read_text())
    index["unet"] = ["os", "system"]
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="names module 'os'"):
        ContourPipeline.from_pretrained(bad)

    code = tmp_path / "code"
    shutil.copytree(saved["contour"], code)
    (code / "unet" / "medvlm.models.unet.py").write_text("raise SystemExit('pwned')")
    with pytest.raises(InputError, match="Python files"):
        ContourPipeline.from_pretrained(code)

    missing = tmp_path / "missing"
    shutil.copytree(saved["contour"], missing)
    (missing / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InputError, match="could not load ContourPipeline"):
        ContourPipeline.from_pretrained(missing)

    corrupted = tmp_path / "corrupted"
    shutil.copytree(saved["contour"], corrupted)
    weights = corrupted / "segmentation" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(InputError, match="could not load ContourPipeline"):
        ContourPipeline.from_pretrained(corrupted)

    with pytest.raises(InputError, match="holds a 'ContourPipeline' pipeline"):
        ReportToCTPipeline.from_pretrained(saved["contour"])
    with pytest.raises(InputError, match="local folders only"):
        ContourPipeline.from_pretrained("someone/hnc-contour")


# ------------------------------------------------------------------------------------------ report to CT
PROMPT = "right oral tongue SCC, cT3 N2 M0, bilateral elective neck"


def test_generation_is_deterministic_and_returns_hu_with_masks(pipes):
    pipe = pipes["report_to_ct"]
    a = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    b = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    c = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(1))
    assert a.ct.shape == (1, 32, 32, 32) and a.masks.shape == (1, 9, 32, 32, 32) and a.masks.dtype == bool
    assert -1000.0 <= a.ct.min() and a.ct.max() <= 1500.0
    assert np.array_equal(a.ct, b.ct) and not np.array_equal(a.ct, c.ct)
    assert np.allclose(np.diag(a.affine)[:3], (6.0, 6.0, 6.0))


def test_batch_with_one_generator_each_equals_single_calls(pipes):
    pipe = pipes["report_to_ct"]
    batch = pipe(["a left tonsil", "a right larynx"], num_inference_steps=3,
                 generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    single = pipe("a right larynx", num_inference_steps=3, generator=torch.Generator().manual_seed(2))
    # batched float32 kernels sum in another order: equal to within 0.05 HU of a 2500 HU range
    assert np.abs(batch.ct[1] - single.ct[0]).max() < 0.05


def test_batch_slicing_runs_the_unet_and_decoder_on_slices_with_the_same_volumes(pipes, monkeypatch):
    pipe = pipes["report_to_ct"]
    prompts = ["a left tonsil", "a right larynx", "a left tonsil T4"]
    kwargs = dict(num_inference_steps=3, generator=[torch.Generator().manual_seed(i) for i in range(3)])
    whole = pipe(prompts, **kwargs)
    seen = {"unet": [], "vae": []}
    unet_forward, decode = pipe.unet.forward, pipe.vae.decode
    monkeypatch.setattr(pipe.unet, "forward", lambda x, *a, **k: seen["unet"].append(len(x)) or unet_forward(x, *a, **k))
    monkeypatch.setattr(pipe.vae, "decode", lambda z, *a, **k: seen["vae"].append(len(z)) or decode(z, *a, **k))
    pipe.enable_batch_slicing(2)
    try:
        kwargs["generator"] = [torch.Generator().manual_seed(i) for i in range(3)]
        sliced = pipe(prompts, **kwargs)
    finally:
        pipe.disable_batch_slicing()
    # guidance doubles the batch to 6: three UNet slices a step; the decoder: 2 + 1 volumes
    assert seen["unet"] == [2, 2, 2] * 3 and seen["vae"] == [2, 1]
    assert np.abs(sliced.ct - whole.ct).max() < 0.05 and (sliced.masks != whole.masks).mean() < 1e-3
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="slice_size"):
            pipe.enable_batch_slicing(bad)


def _source(pipe, case):
    """A phantom case on the pipeline's model grid: its CT in HU and its nine structure masks."""
    labels = np.stack([case.labels[case.label_names.index(n)] for n in pipe.config.structure_names])
    return case.image_hu.astype(np.float32), labels.astype(np.uint8)


def test_image_to_image_keeps_more_of_the_source_the_lower_the_strength(pipes, case):
    """diffusers' img2img contract: the source is encoded, noised to ``strength`` and denoised for that share of
    the steps; at a low strength the sample stays near the autoencoder's reconstruction of the source."""
    pipe = pipes["report_to_ct"]
    ct, masks = _source(pipe, case)
    with torch.no_grad():
        config = pipe.preprocess_config
        from medvlm.data.transforms import from_hu

        image = torch.as_tensor(from_hu(ct, config))[None, None]
        latents = pipe.vae.generation_latents(image, torch.as_tensor(masks)[None].float())
        z, structures = pipe.vae.split_latents(latents)
        reconstruction = to_hu_array(pipe.vae.decode(z, structures).sample.clamp(-1, 1)[0, 0], config)
    runs = {}
    for strength in (0.1, 1.0):
        runs[strength] = pipe(PROMPT, image=ct, masks=masks, strength=strength, num_inference_steps=10,
                              generator=torch.Generator().manual_seed(0))
    again = pipe(PROMPT, image=ct, masks=masks, strength=0.1, num_inference_steps=10, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(runs[0.1].ct, again.ct) and runs[0.1].ct.shape == (1, *ct.shape)
    assert np.abs(runs[0.1].ct[0] - reconstruction).mean() < np.abs(runs[1.0].ct[0] - reconstruction).mean()
    # one source for two prompts; one per prompt
    two = pipe([PROMPT, PROMPT], image=ct, masks=masks, strength=0.5, num_inference_steps=4,
               generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)])
    assert two.ct.shape[0] == 2 and np.abs(two.ct[0] - two.ct[1]).max() < 0.05


def to_hu_array(image, config):
    from medvlm.data.transforms import to_hu

    return to_hu(image, config).numpy()


def test_kept_structures_are_the_sources_and_the_ct_outside_what_was_regenerated_too(pipes, case):
    pipe = pipes["report_to_ct"]
    ct, masks = _source(pipe, case)
    kept = ["CTVn", "SpinalCord", "Brainstem", "Parotid_L", "Parotid_R", "Bone_Mandible", "Larynx"]
    out = pipe(PROMPT, image=ct, masks=masks, keep_structures=kept, num_inference_steps=4,
               generator=torch.Generator().manual_seed(0))
    names = list(pipe.config.structure_names)
    for name in kept:
        assert np.array_equal(out.masks[0, names.index(name)], masks[names.index(name)] > 0), name
    again = pipe(PROMPT, image=ct, masks=masks, keep_structures=kept, num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0))
    assert np.array_equal(out.ct, again.ct) and np.array_equal(out.masks, again.masks)
    # the paste: the source outside the regenerated structures (source's and sample's, 2 voxels wider), the
    # sample inside; the kept structures' masks from the source
    gtvp, gtvn = names.index("GTVp"), names.index("GTVn")
    source_masks = np.zeros((9, 32, 32, 32), np.uint8)
    source_masks[gtvp, 4:8, 4:8, 4:8] = 1
    source_masks[names.index("Larynx"), 20:24, 20:24, 20:24] = 1
    sample_masks = torch.zeros(1, 9, 32, 32, 32, dtype=torch.bool)
    sample_masks[0, gtvn, 24:28, 4:8, 4:8] = True
    sample_masks[0, names.index("Larynx"), 0:2, 0:2, 0:2] = True  # a kept structure: replaced by the source's
    source = pipe._source_volumes(np.full((32, 32, 32), 40.0, np.float32), source_masks, 1.0, None)
    generated = torch.full((1, 32, 32, 32), 300.0)
    kept_channels = pipe._kept_channels([n for n in names if n not in ("GTVp", "GTVn")], source)
    pasted, pasted_masks = pipe._pasted(source, generated, sample_masks, kept_channels, 1, 1)
    assert torch.equal(pasted_masks[0, names.index("Larynx")], torch.as_tensor(source_masks[names.index("Larynx")] > 0))
    assert torch.equal(pasted_masks[0, gtvn], sample_masks[0, gtvn])
    assert torch.allclose(pasted[0, 4:8, 4:8, 4:8], torch.tensor(300.0)) and torch.allclose(pasted[0, 24:28, 4:8, 4:8], torch.tensor(300.0))
    assert torch.allclose(pasted[0, 12:20, 12:32, 12:32], torch.tensor(40.0), atol=1e-3)  # far from both lesions
    rim = pasted[0, 9, 4:8, 4:8]  # one voxel outside the source's GTVp: blended
    assert (rim > 40.0).all() and (rim < 300.0).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"strength": 0.5}, "source `image`"),
    ({"masks": np.zeros((9, 32, 32, 32))}, "pass the image too"),
    ({"image": np.zeros((32, 32, 32)), "strength": 0.5}, "masks"),
    ({"image": np.zeros((32, 32, 32)), "masks": np.zeros((9, 32, 32, 32)), "strength": 0.0}, "strength"),
    ({"image": np.zeros((32, 32, 32)), "masks": np.zeros((8, 32, 32, 32))}, "`masks` must have shape"),
    ({"image": np.full((32, 32, 32), np.nan), "masks": np.zeros((9, 32, 32, 32))}, "finite"),
    ({"image": np.zeros((32, 32, 32)), "masks": np.zeros((9, 32, 32, 32)), "keep_structures": ["Heart"]}, "keep_structures"),
    ({"keep_structures": ["Larynx"]}, "keep_structures"),
    ({"image": np.zeros((32, 32, 32)), "masks": np.zeros((9, 32, 32, 32)), "volume_shape": (32, 32, 32)}, "volume_shape"),
])
def test_image_to_image_inputs_are_checked(pipes, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipes["report_to_ct"](PROMPT, num_inference_steps=2, **kwargs)


@pytest.fixture(scope="module")
def ct_only_pipe():
    """A report-to-CT pipeline over a CT-only autoencoder: its contours come from the segmentation decoder."""
    config = load_config(CONFIGS / "tiny.yaml")
    config.models.vae.mask_channels = 0
    torch.manual_seed(0)
    return build_pipelines(config, report_texts=["left tonsil carcinoma bilateral neck"] * 4)["report_to_ct"]


def test_paired_masks_come_from_the_sampled_latent_not_from_a_segmentation_decoder(pipes):
    pipe = pipes["report_to_ct"]
    assert pipe.has_paired_masks and pipe.unet.config.in_channels == pipe.vae.generation_channels == 13
    out = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert out.ct.shape == (1, 13, 8, 8, 8)  # the latent holds the structures
    # the masks are the paired decoder's output for that latent's structure channels
    z, structures = pipe.vae.split_latents(out.ct)
    with torch.no_grad():
        logits = pipe.vae.decode(z, structures).mask_logits
    full = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert torch.equal(full.masks, torch.sigmoid(logits) >= 0.5)
    # without any segmentation decoder the pipeline still pairs contours with every CT
    bare = ReportToCTPipeline(vae=pipe.vae, unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                              scheduler=pipe.scheduler, preprocess=dict(pipe.config.preprocess))
    plain = bare(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    reference = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(plain.masks, reference.masks) and np.array_equal(plain.ct, reference.ct)


def test_generated_ct_is_contoured_with_the_reports_padding_mask(ct_only_pipe, monkeypatch):
    """CT-only autoencoder: the decoder's contours skip padded report tokens, as in training (and ContourPipeline)."""
    pipe = ct_only_pipe
    prompts = ["a left tonsil", "right oral tongue SCC, cT3 N2 M0, HPV negative, bilateral elective neck levels I-V"]
    states, mask, _ = pipe.encode_reports(prompts, torch.device("cpu"), pipe.config.max_report_tokens, pipe.config.report_format)
    assert mask.sum(1)[0] < mask.sum(1)[1], "the prompts must differ in length for the check to mean anything"
    seen = {}
    forward = pipe.segmentation.forward

    def spy(fused, skips, text_states=None, text_mask=None, *args, **kwargs):
        seen["states"], seen["mask"] = text_states, text_mask
        return forward(fused, skips, text_states, text_mask, *args, **kwargs)

    monkeypatch.setattr(pipe.segmentation, "forward", spy)
    pipe(prompts, num_inference_steps=2, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert seen["mask"] is not None and torch.equal(seen["mask"].cpu(), mask)
    assert seen["states"].shape[1] == mask.shape[1]


def test_canonical_side_unet_generates_the_other_side_as_the_mirror_image(pipes):
    """A UNet trained in one side: a right-sided report is the left-sided one's exact mirror image (CT flipped,
    structures flipped with Parotid_L <-> Parotid_R), so the side follows the report, not the noise; left and
    midline reports are generated as a UNet without a canonical side generates them."""
    from medvlm.data.laterality import mirrored_channels
    from medvlm.models.factory import build_unet

    base = pipes["report_to_ct"]
    config = load_config(CONFIGS / "tiny.yaml")
    config.models.unet.canonical_side = "left"
    unet = build_unet(config.models, base.unet.config.cross_attention_dim)
    unet.load_state_dict(base.unet.state_dict())
    pipe = ReportToCTPipeline(vae=base.vae, unet=unet, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                              scheduler=base.scheduler, preprocess=dict(base.config.preprocess))
    assert pipe.canonical_side == "left" and base.canonical_side is None
    left = "left oral tongue SCC, cT3 N2 M0, ipsilateral elective neck"
    right = "right oral tongue SCC, cT3 N2 M0, ipsilateral elective neck"

    def run(p, prompt, output_type="pt"):
        return p(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type=output_type)

    order = mirrored_channels(pipe.config.structure_names)
    l, r = run(pipe, left), run(pipe, right)
    assert torch.equal(r.ct, l.ct.flip(1)) and torch.equal(r.masks, l.masks.flip(2)[:, order])
    assert "right" in r.prompts[0] and "left" not in r.prompts[0]  # the report as written
    assert torch.equal(l.ct, run(base, left).ct)
    assert not torch.allclose(r.ct, run(base, right).ct)  # without a canonical side nothing is mirrored
    midline = "midline base of tongue SCC, cT2 N1 M0, bilateral elective neck"
    assert torch.equal(run(pipe, midline).ct, run(base, midline).ct)
    # the latent comes back in the report's frame too: CT channels flipped, structure channels flipped and swapped
    c = pipe.vae.config.latent_channels
    latent_l, latent_r = run(pipe, left, output_type="latent").ct, run(pipe, right, output_type="latent").ct
    assert torch.equal(latent_r, latent_l.flip(2)[:, list(range(c)) + [c + i for i in order]])
    # a mixed batch mirrors only its right-sided row; encode_prompt's tensors give the same volumes as the text
    both = pipe([left, right], num_inference_steps=2, output_type="pt",
                generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)])
    assert torch.allclose(both.ct[1], both.ct[0].flip(0), atol=0.05) and torch.allclose(both.ct[1], r.ct[0], atol=0.05)
    embeds, negative, fields, negative_fields = pipe.encode_prompt(right, torch.device("cpu"))
    again = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, report_fields=fields,
                 negative_report_fields=negative_fields, num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.ct, r.ct) and torch.equal(again.masks, r.masks)


def test_a_latent_prior_holds_the_anatomy_to_its_draw_and_lets_the_targets_follow_the_report(pipes):
    """``prior_strength``: generation from noise holds the CT latent and the organ-at-risk channels to a draw from
    the UNet's latent prior (noised to each step's level, the draw's coefficients from the generator) for the
    first ``1 - prior_strength`` of the steps; the targets are sampled from pure noise throughout."""
    from diffusers.utils.torch_utils import randn_tensor

    from medvlm.models.factory import build_unet, noised_latents
    from medvlm.vocabulary import TARGET_NAMES

    base = pipes["report_to_ct"]
    config = load_config(CONFIGS / "tiny.yaml")
    config.models.unet.prior_rank = 3
    grid = [int(s) // base.vae.compression for s in base.preprocess_config.roi_size]
    unet = build_unet(config.models, base.unet.config.cross_attention_dim, template_size=grid)
    loaded = unet.load_state_dict(base.unet.state_dict(), strict=False)
    assert set(loaded.missing_keys) == {"prior_mean", "prior_components", "prior_cases"} and not loaded.unexpected_keys
    pipe = ReportToCTPipeline(vae=base.vae, unet=unet, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                              scheduler=base.scheduler, preprocess=dict(base.config.preprocess), prior_strength=0.5)
    with pytest.raises(ValueError, match="latent prior"):
        pipe(PROMPT, num_inference_steps=2)  # never fitted
    channels = unet.config.in_channels
    unet.set_prior(torch.randn(6, channels, *grid, generator=torch.Generator().manual_seed(3)) * 2.0 + 1.0)
    seen = {}

    def callback(p, step, timestep, tensors):
        seen[step] = tensors["latents"].clone()
        return tensors

    def run(p, seed=0, **kwargs):
        return p(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs)

    out = run(pipe, callback_on_step_end=callback)
    draws = torch.Generator().manual_seed(0)  # the pipeline's order of draws: noise, prior coefficients, RePaint noise
    randn_tensor((1, channels, *grid), generator=draws)
    anatomy = unet.sample_prior(randn_tensor((1, 3), generator=draws))
    expected = noised_latents(pipe.scheduler, anatomy, randn_tensor((1, channels, *grid), generator=draws),
                              pipe.scheduler.timesteps[1:2])
    c, names = base.vae.config.latent_channels, list(pipe.config.structure_names)
    held = list(range(c)) + [c + i for i, n in enumerate(names) if n not in TARGET_NAMES]
    targets = [c + names.index(n) for n in TARGET_NAMES]
    assert torch.allclose(seen[0][:, held], expected[:, held], atol=1e-5)  # held after the first of 4 steps ...
    assert not torch.allclose(seen[0][:, targets], expected[:, targets], atol=0.1)  # ... the targets free
    assert torch.equal(run(pipe).ct, out.ct) and torch.equal(run(pipe).masks, out.masks)  # deterministic
    assert not torch.allclose(run(pipe, seed=1).ct, out.ct)
    assert torch.equal(run(pipe, prior_strength=1.0).ct, run(base).ct)  # 1: no prior, the UNet's own sampling
    assert not torch.allclose(out.ct, run(base).ct)
    both = pipe([PROMPT, PROMPT], num_inference_steps=4, output_type="pt",
                generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    assert torch.allclose(both.ct[0], out.ct[0], atol=0.05)  # one generator each: single calls
    for bad in (0.0, 1.5, True, float("nan")):
        with pytest.raises(ValueError, match="prior_strength"):
            run(pipe, prior_strength=bad)
    with pytest.raises(ValueError, match="prior_strength"):
        ReportToCTPipeline(vae=base.vae, unet=unet, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                           scheduler=base.scheduler, prior_strength=0.0)
    # a case prior (prior_spread 0): the anatomy held is one training latent, the one the draw's last number picks
    config.models.unet.prior_rank, config.models.unet.prior_spread = 8, 0.0  # 6 cases span 5 directions: all kept
    cases = build_unet(config.models, base.unet.config.cross_attention_dim, template_size=grid)
    cases.load_state_dict(base.unet.state_dict(), strict=False)
    training = torch.randn(6, channels, *grid, generator=torch.Generator().manual_seed(3)) * 2.0 + 1.0
    cases.set_prior(training)
    pipe = ReportToCTPipeline(vae=base.vae, unet=cases, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                              scheduler=base.scheduler, preprocess=dict(base.config.preprocess), prior_strength=0.5)
    run(pipe, callback_on_step_end=callback)
    draws = torch.Generator().manual_seed(0)
    randn_tensor((1, channels, *grid), generator=draws)
    draw = randn_tensor((1, 9), generator=draws)
    case = int(torch.special.ndtr(draw[0, 8].double()) * 6)
    assert torch.allclose(cases.sample_prior(draw)[0], training[case], atol=1e-4)
    expected = noised_latents(pipe.scheduler, training[case:case + 1],
                              randn_tensor((1, channels, *grid), generator=draws), pipe.scheduler.timesteps[1:2])
    assert torch.allclose(seen[0][:, held], expected[:, held], atol=1e-4)

@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_schedulers_are_swappable(pipes, scheduler_class):
    pipe = pipes["report_to_ct"]
    original = pipe.scheduler
    try:
        pipe.scheduler = scheduler_class.from_config(original.config)
        out = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), return_masks=False)
        assert out.ct.shape == (1, 32, 32, 32) and out.masks is None
    finally:
        pipe.scheduler = original


def test_output_types_callback_latents_and_tuple(pipes):
    pipe = pipes["report_to_ct"]
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append(step)
        return {"latents": tensors["latents"]}

    out = pipe(PROMPT, num_inference_steps=3, output_type="pt", callback_on_step_end=callback, num_images_per_prompt=2)
    assert isinstance(out.ct, torch.Tensor) and out.ct.shape[0] == 2 and seen == [0, 1, 2]
    images = pipe(PROMPT, num_inference_steps=2, output_type="nifti", return_masks=False).ct
    assert isinstance(images[0], nib.Nifti1Image) and images[0].shape == (32, 32, 32)
    latents = torch.zeros(1, 13, 8, 8, 8)  # CT latent + structure channels
    ct, masks = pipe(PROMPT, num_inference_steps=2, latents=latents, return_dict=False, guidance_scale=1.0)
    assert ct.shape == (1, 32, 32, 32) and masks is not None


def test_encode_prompt_embeddings_reproduce_the_text_call_and_guidance_properties(pipes):
    """The diffusers contract: encode_prompt's outputs passed back give the text call's volume; guidance_scale,
    do_classifier_free_guidance and num_timesteps are readable, and a step-end callback can change guidance."""
    pipe = pipes["report_to_ct"]
    negative = "left larynx, cN0"
    embeds = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, True, negative_prompt=negative)
    assert embeds[0].ndim == 3 and embeds[1].shape[0] == 1 and embeds[2] is not None and embeds[3] is not None
    names = ("prompt_embeds", "negative_prompt_embeds", "report_fields", "negative_report_fields")
    from_text = pipe(PROMPT, negative_prompt=negative, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    from_embeds = pipe(**dict(zip(names, embeds)), num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(from_text.ct, from_embeds.ct) and np.array_equal(from_text.masks, from_embeds.masks)
    assert pipe.num_timesteps == 3 and pipe.guidance_scale == 3.0 and pipe.do_classifier_free_guidance
    with pytest.raises(ValueError, match="exactly one"):
        pipe(PROMPT, prompt_embeds=embeds[0])
    with pytest.raises(ValueError, match="prompt_embeds"):
        pipe(prompt_embeds=embeds[0][..., :5])
    seen = []

    def no_guidance_after_first_step(p, step, timestep, tensors):
        seen.append(p.guidance_scale)
        p._guidance_scale = 1.0
        return {}

    pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
         callback_on_step_end=no_guidance_after_first_step)
    assert seen == [3.0, 1.0, 1.0] and pipe.guidance_scale == 1.0


@pytest.mark.parametrize("kwargs,message", [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"output_type": "png"}, "output_type"),
    ({"volume_shape": (30, 32, 32)}, "volume_shape"),
    ({"negative_prompt": ["a", "b"]}, "negative_prompt"),
])
def test_generation_check_inputs_name_the_argument(pipes, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipes["report_to_ct"](PROMPT, **kwargs)


def test_generation_round_trip_is_bit_exact(pipes, saved):
    loaded = ReportToCTPipeline.from_pretrained(saved["report_to_ct"])
    a = pipes["report_to_ct"](PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(3))
    b = loaded(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(a.ct, b.ct) and np.array_equal(a.masks, b.masks)


# ------------------------------------------------------------------------------------------ zero-shot, drafting
def test_zero_shot_reports_and_ct_with_labels_never_seen(pipes, case, saved):
    labels = {"laterality": ["left", "right", "midline"], "unseen": {"bulky": ["a bulky necrotic mass"], "tiny": ["a tiny lesion"]}}
    out = pipes["zero_shot"](reports=[case.report.text, "left tonsil"], ct=[case.image_hu], affine=case.affine, labels=labels)
    assert out.report_probabilities["laterality"].shape == (2, 3) and out.ct_probabilities["unseen"].shape == (1, 2)
    assert np.allclose(out.report_probabilities["laterality"].sum(1), 1.0, atol=1e-5)
    assert set(out.predictions("ct")["unseen"]) <= {"bulky", "tiny"}
    loaded = ZeroShotClassificationPipeline.from_pretrained(saved["zero_shot"])
    again = loaded(reports=[case.report.text, "left tonsil"], labels=labels)
    assert np.array_equal(again.report_probabilities["laterality"], out.report_probabilities["laterality"])
    with pytest.raises(ValueError, match="at least two classes"):
        loaded(reports=["x"], labels={"one": ["only"]})


def test_zero_shot_accuracy_on_the_labelled_real_reports(saved):
    from eval.extraction_eval import ZERO_SHOT_SETS, load_real_reports, zero_shot_accuracy

    items = load_real_reports(split="heldout")[:6]
    scores = zero_shot_accuracy(saved["zero_shot"], items)
    assert set(scores) == set(ZERO_SHOT_SETS)
    stated = sum(item["labels"]["laterality"] in ZERO_SHOT_SETS["laterality"] for item in items)
    assert scores["laterality"][1] == stated and 0.0 <= scores["laterality"][0] <= 1.0


def test_report_drafting_greedy_and_seeded_sampling(pipes, case, saved):
    pipe = pipes["report_generation"]
    greedy = pipe(case.image_hu, affine=case.affine, max_new_tokens=6)
    assert len(greedy.reports) == 1 and pipe(case.image_hu, affine=case.affine, max_new_tokens=6).reports == greedy.reports
    s1 = pipe(case.image_hu, affine=case.affine, max_new_tokens=6, do_sample=True, generator=torch.Generator().manual_seed(5))
    s2 = pipe(case.image_hu, affine=case.affine, max_new_tokens=6, do_sample=True, generator=torch.Generator().manual_seed(5))
    assert s1.reports == s2.reports
    loaded = ReportGenerationPipeline.from_pretrained(saved["report_generation"])
    assert loaded(case.image_hu, affine=case.affine, max_new_tokens=6).reports == greedy.reports
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe(case.image_hu, affine=case.affine, max_new_tokens=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model CPU offload needs an accelerator")
def test_model_cpu_offload(pipes):  # pragma: no cover - runs where a GPU is present
    pipes["report_to_ct"].enable_model_cpu_offload()
    assert pipes["report_to_ct"](PROMPT, num_inference_steps=2).ct.shape == (1, 32, 32, 32)


def test_cli_contour_generate_classify_draft(saved, case, tmp_path, capsys):
    from medvlm.cli import main
    from medvlm.data.io import load_labels, save_nifti

    ct_path = save_nifti(tmp_path / "ct.nii.gz", case.image_hu, case.affine)
    (tmp_path / "report.txt").write_text(case.report.text)
    assert main(["contour", "--pipeline", str(saved["contour"]), "--ct", str(ct_path), "--report",
                 str(tmp_path / "report.txt"), "--out", str(tmp_path / "masks")]) == 0
    assert (tmp_path / "masks" / "GTVp.nii.gz").is_file()
    assert main(["generate", "--pipeline", str(saved["report_to_ct"]), "--prompt", "left tonsil cT2 N1", "--n", "2",
                 "--steps", "2", "--out", str(tmp_path / "gen")]) == 0
    labels, _, names = load_labels(tmp_path / "gen" / "sample_001_labels.nii.gz")
    assert names[0] == "GTVp" and labels.shape[0] == 9
    assert main(["classify", "--pipeline", str(saved["zero_shot"]), "--report", "left tonsil", "--labels",
                 "laterality=left,right"]) == 0
    assert "report[0] laterality: left=" in capsys.readouterr().out
    assert main(["draft", "--pipeline", str(saved["report_generation"]), str(ct_path)]) == 0
    assert "machine draft" in capsys.readouterr().out
    assert main(["contour", "--pipeline", str(tmp_path / "nope"), "--ct", str(ct_path), "--out", str(tmp_path / "x")]) == 2
    assert "pipeline folder not found" in capsys.readouterr().err
    # no silent overwrite: a second run into the same folder is refused and changes nothing, unless --overwrite
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "gen").iterdir()}
    generate = ["generate", "--pipeline", str(saved["report_to_ct"]), "--prompt", "right tonsil", "--n", "1",
                "--steps", "2", "--out", str(tmp_path / "gen")]
    assert main(generate) == 2 and "--overwrite" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "gen").iterdir()} == before
    assert main(generate + ["--overwrite"]) == 0
    contour = ["contour", "--pipeline", str(saved["contour"]), "--ct", str(ct_path), "--report", "left tonsil",
               "--out", str(tmp_path / "masks")]
    assert main(contour) == 2 and "already holds" in capsys.readouterr().err
    for bad in (["--n", "0"], ["--steps", "0"], ["--prior-strength", "0"]):
        assert main(generate[:-2] + ["--out", str(tmp_path / "gen2")] + bad) == 2
    assert "--prior-strength must be in (0, 1]" in capsys.readouterr().err


def test_cli_errors_are_one_line_with_an_exit_code_and_verbose_shows_the_traceback(saved, small_dataset, tmp_path, capsys):
    """Routine mistakes of each kind: an argument a pipeline refuses (ValueError), a missing datalist section,
    an output path that cannot be written; one line on stderr, exit 2 (bad input) or 1 (file system)."""
    from medvlm.cli import main

    def one_line(code, *argv):
        assert main(list(argv)) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err) and err[-1].startswith("medvlm: error: ")
        return err[-1]

    classify = ["classify", "--pipeline", str(saved["zero_shot"]), "--report", "left tonsil", "--labels", "laterality=left"]
    assert "at least two classes" in one_line(2, *classify)
    assert main(["-v", *classify]) == 2 and "Traceback" in capsys.readouterr().err
    assert "no section 'bogus'" in one_line(2, "eval", "segmentation", "--pipeline", str(saved["contour"]), "--data",
                                            str(small_dataset), "--split", "bogus", "--out", str(tmp_path / "seg"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    message = one_line(1, "generate", "--pipeline", str(saved["report_to_ct"]), "--prompt", "left tonsil", "--n", "1",
                       "--steps", "2", "--out", str(blocker / "gen"))
    assert "a_file" in message and blocker.read_text() == "not a folder"


def test_resource_ceilings_refuse_before_allocating(pipes, case, tmp_path, monkeypatch):
    """Inputs beyond the documented ceilings are refused by size, naming the limit: a NIfTI by its header, a
    region larger than the contouring limit at the model's spacing, a drafted report's token budget."""
    import medvlm.data.inputs as inputs
    import medvlm.data.io as io
    from medvlm.data.io import save_nifti
    from medvlm.models.report_generator import MAX_NEW_TOKENS

    path = save_nifti(tmp_path / "ct.nii.gz", case.image_hu, case.affine)
    monkeypatch.setattr(io, "MAX_INPUT_VOXELS", 1000)
    with pytest.raises(InputError, match=r"32 x 32 x 32 = 32,768 voxels is more than the 1,000"):
        io.load_nifti(path)
    with pytest.raises(InputError, match=r"32,768 voxels is more than the 1,000"):
        pipes["contour"](case.image_hu, "left tonsil", spacing_mm=(6.0, 6.0, 6.0), region=None)
    monkeypatch.undo()
    monkeypatch.setattr(inputs, "MAX_PROCESSED_VOXELS", 4096)
    with pytest.raises(InputError, match=r"4,096 medvlm processes; pass region="):
        pipes["contour"](path, "left tonsil", region=None)
    monkeypatch.undo()
    for bad in (MAX_NEW_TOKENS + 1, 0, 2.5):
        with pytest.raises(ValueError, match="max_new_tokens"):
            pipes["report_generation"](path, max_new_tokens=bad, region=None)
