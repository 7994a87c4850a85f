"""Segmentation metrics agree with an independent implementation on anisotropic masks, empties included."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from eval.segmentation import case_scores, counterfactual_prompt, predicted_sides, seed_table, structure_scores, summary_table

SPACING = (0.8, 1.1, 3.0)


def _ball(shape, centre, radii_mm):
    grid = np.indices(shape).astype(float)
    return sum(((g - c) * s / r) ** 2 for g, c, s, r in zip(grid, centre, SPACING, radii_mm)) <= 1.0


def _reference(pred, truth, spacing):
    """Scipy-only Dice, IoU, HD95 and average symmetric surface distance."""
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    iou = (pred & truth).sum() / (pred | truth).sum()
    edges = lambda m: m & ~ndimage.binary_erosion(m)  # noqa: E731
    ep, et = edges(pred), edges(truth)
    to_truth = ndimage.distance_transform_edt(~et, sampling=spacing)[ep]
    to_pred = ndimage.distance_transform_edt(~ep, sampling=spacing)[et]
    hd95 = max(np.percentile(to_truth, 95), np.percentile(to_pred, 95))
    asd = (to_truth.sum() + to_pred.sum()) / (len(to_truth) + len(to_pred))
    return dice, iou, hd95, asd


def test_metrics_match_an_independent_implementation_with_anisotropic_spacing():
    shape = (48, 40, 16)
    truth = _ball(shape, (24, 20, 8), (12, 14, 18))
    pred = _ball(shape, (26, 19, 8), (11, 15, 15))
    scores = structure_scores(pred, truth, SPACING)
    dice, iou, hd95, asd = _reference(pred, truth, SPACING)
    assert scores["dice"] == pytest.approx(dice, abs=1e-6)
    assert scores["iou"] == pytest.approx(iou, abs=1e-6)
    assert scores["hd95_mm"] == pytest.approx(hd95, rel=1e-4)
    assert scores["asd_mm"] == pytest.approx(asd, rel=1e-4)
    assert 0.0 < scores["surface_dice_2mm"] < 1.0


@pytest.mark.parametrize("shift", [(2, -1, 0), (0, 0, 1), (6, 3, 2)])
def test_surface_metrics_from_one_distance_pass_equal_monais_metric_classes(shift):
    import torch
    from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric, SurfaceDistanceMetric

    shape = (40, 36, 14)
    truth = _ball(shape, (20, 18, 7), (11, 13, 15))
    pred = _ball(shape, tuple(c + d for c, d in zip((20, 18, 7), shift)), (10, 14, 12))
    scores = structure_scores(pred, truth, SPACING)
    y_pred, y = (torch.from_numpy(m)[None, None].float() for m in (pred, truth))
    spacing = list(SPACING)
    expected = {
        "hd95_mm": HausdorffDistanceMetric(include_background=True, percentile=95)(y_pred, y, spacing=spacing),
        "asd_mm": SurfaceDistanceMetric(include_background=True, symmetric=True)(y_pred, y, spacing=spacing),
        "surface_dice_2mm": SurfaceDiceMetric([2.0], include_background=True)(y_pred, y, spacing=spacing),
    }
    for name, value in expected.items():
        assert scores[name] == pytest.approx(float(value), rel=1e-6, abs=1e-9), name
    assert 0.0 < scores["surface_dice_2mm"] < 1.0 and scores["hd95_mm"] > 0.0


def test_spacing_changes_distances_but_not_overlap():
    shape = (40, 40, 12)
    truth = _ball(shape, (20, 20, 6), (10, 10, 12))
    pred = _ball(shape, (23, 20, 6), (10, 10, 12))
    a = structure_scores(pred, truth, SPACING)
    b = structure_scores(pred, truth, (2 * SPACING[0], SPACING[1], SPACING[2]))
    assert a["dice"] == b["dice"] and b["hd95_mm"] > a["hd95_mm"]


def test_empty_mask_conventions_are_never_optimistic():
    empty, full = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    full[2:5, 2:5, 2:5] = True
    both = structure_scores(empty, empty, SPACING)
    assert both == {"dice": 1.0, "iou": 1.0, "hd95_mm": 0.0, "asd_mm": 0.0, "surface_dice_2mm": 1.0}
    for pred, truth in ((empty, full), (full, empty)):
        one = structure_scores(pred, truth, SPACING)
        assert one["dice"] == 0.0 and one["surface_dice_2mm"] == 0.0
        assert math.isnan(one["hd95_mm"]) and math.isnan(one["asd_mm"])  # undefined, not 0 mm


def test_tables_in_the_seed_layout_report_undefined_distances():
    shape = (16, 16, 8)
    truth = np.stack([_ball(shape, (8, 8, 4), (5, 5, 9)), np.zeros(shape, bool)])
    rows = []
    for i, shift in enumerate((0, 1, 2)):
        pred = np.stack([np.roll(truth[0], shift, axis=0), np.ones(shape, bool) if i == 2 else np.zeros(shape, bool)])
        rows += case_scores(f"c{i}", pred, truth, SPACING, ["GTVp", "GTVn"])
    table = seed_table(rows, "GTVp")
    assert table.splitlines()[2] == "| no | ID | Dice | IoU | HD |"
    assert "| Avr |" in table and "| Std |" in table and "| 1 | c0 | 1.000 | 1.000 | 0.00 |" in table
    gtvn = seed_table(rows, "GTVn")
    assert "undefined" in gtvn and "1 undefined" in gtvn
    assert "| GTVn |" in summary_table(rows, ["GTVp", "GTVn"], "t") and "1/3" in summary_table(rows, ["GTVp", "GTVn"], "t")


def test_counterfactual_prompt_and_side_detection():
    from medvlm.data.phantom import HNCPhantom

    phantom = HNCPhantom(seed=0)
    record = next(r for r in (phantom.record_and_report(i)[0] for i in range(50))
                  if r.laterality == "left" and r.elective_neck == "ipsilateral")
    prompt, expected = counterfactual_prompt(record)
    assert "primary: right" in prompt and "elective neck: bilateral" in prompt and expected == "both"
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[0, 3] = -30.0
    mask = np.zeros((20, 10, 10), bool)
    mask[15:19] = True  # x = 15..18 voxels -> +15..+24 mm: the patient's right
    assert predicted_sides(mask, affine, midline_x_mm=0.0, min_ml=1.0) == "right"
    mask[1:4] = True
    assert predicted_sides(mask, affine, midline_x_mm=0.0, min_ml=1.0) == "both"


def test_benchmark_command_measures_each_schedule(capsys, tmp_path):
    import json

    from eval import benchmark

    run = tmp_path / "run"
    run.mkdir()
    (run / "training_summary.json").write_text(json.dumps({"stages": {"vae": {"steps": 3, "samples_per_second": 1.5, "seconds": 2.0}}}))
    assert benchmark.main(["--config", "tiny", "--skip-ddpm", "--skip-contour", "--run", str(run)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| DDIM |")]
    assert [row.split("|")[2].strip() for row in rows] == ["50", "25", "10"]
    assert "| DDIM | 50 |" in printed and "1.00 x" in printed and "| vae | 3 | 1.50 |" in printed
    assert "no report_to_ct pipeline: laterality fidelity per schedule not measured" in printed
    # a preset that samples through a latent prior (as the demo's) is timed on that path, not refused
    import yaml

    tiny = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml").read_text())
    tiny["models"]["unet"] |= {"latent_template": True, "prior_rank": 2, "prior_strength": 0.5, "prior_spread": 0.5}
    (tmp_path / "prior.yaml").write_text(yaml.safe_dump(tiny))
    assert benchmark.main(["--config", str(tmp_path / "prior.yaml"), "--skip-ddpm", "--skip-contour"]) == 0
    assert "| DDIM | 25 |" in capsys.readouterr().out


def test_gpu_model_benchmark_runs_every_step_on_the_tiny_preset_on_cpu(capsys):
    """The GPU benchmark's three training steps run (its decoder step once lacked the CT the decoder needs)."""
    from eval import bench_gpu_models

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    assert bench_gpu_models.main(["--config", tiny, "--device", "cpu", "--vae-patch", "16", "16", "16"]) == 0
    printed = capsys.readouterr().out
    assert "VAE train step, patch 16x16x16" in printed and "UNet train step, latents (8, 8, 8)" in printed
    assert "segmentation train step, full ROI (32, 32, 32)" in printed and "out of memory" not in printed


def test_zero_shot_scores_against_hand_computed_values():
    import numpy as np

    from eval.zero_shot_eval import scores

    truth = np.array([0, 0, 1, 1, 2, -1])  # -1: no truth for that case, left out
    probabilities = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.5, 0.2, 0.3],
                              [0.9, 0.05, 0.05]])
    result = scores(truth, probabilities)
    assert result["n"] == 5
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    # one-vs-rest AUROC per class, then the mean: class 0 {0.8, 0.2} vs {0.1, 0.3, 0.5} -> 4/6;
    # class 1 {0.8, 0.6} vs {0.1, 0.7, 0.2} -> 5/6; class 2 {0.3} vs {0.1, 0.1, 0.1, 0.1} -> 1
    assert result["macro_auroc"] == pytest.approx((4 / 6 + 5 / 6 + 1.0) / 3)


def test_contralateral_probability_reads_the_mirror_of_the_ipsilateral_ctvn():
    from eval.segmentation import contralateral_probability

    affine = np.diag([-2.0, 2.0, 3.0, 1.0])  # x decreases with the index (LAS-like storage)
    affine[0, 3] = 40.0  # world x runs 40 .. -22 mm over 32 voxels
    ctvn = np.zeros((32, 8, 8), bool)
    ctvn[2:6, 2:5, 2:5] = True  # world x 36..30 mm: the patient's right (+x) of a midline at 10 mm
    probability = np.full(ctvn.shape, 0.1, np.float32)
    # the mirror of x in 30..36 across 10 mm is -16..-10 mm: indices 25..28
    probability[25:29, 2:5, 2:5] = 0.8
    assert contralateral_probability(probability, ctvn, affine, 10.0, "right") == pytest.approx(0.8)
    assert contralateral_probability(probability, ctvn, affine, 10.0, "left") is None  # no CTVn on the left
    oblique = affine.copy()
    oblique[0, 1] = 0.5
    assert contralateral_probability(probability, ctvn, oblique, 10.0, "right") is None
