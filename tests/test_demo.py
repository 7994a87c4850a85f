"""`medvlm demo --quick`: dataset, all training stages and loadable pipelines in one command."""
from __future__ import annotations

import json

import numpy as np

from medvlm.cli import main


def test_quick_demo_runs_end_to_end_and_reuses_on_a_second_run(tmp_path, capsys):
    out = tmp_path / "quick"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "summary" in printed and "validation Dice" in printed
    for name in ("contour", "report_to_ct", "zero_shot", "report_generation"):
        assert (out / "run" / name / "model_index.json").is_file()
    summary = json.loads((out / "demo_summary.json").read_text())["summary"]
    assert list(summary["stages"]) == ["contrastive", "vae", "diffusion", "segmentation", "baseline", "report_generator"]
    results = (out / "results" / "README.md").read_text()
    for heading in ("Targets", "image-only baseline", "report: counterfactual", "report: drafted", "Zero-shot classification",
                    "laterality of generated CTs", "pairing: paired masks", "autoencoder: mean absolute error", "Frechet distance", "MS-SSIM", "Report drafting", "De-identification", "Pipeline examples"):
        assert heading in results
    assert "The same validation CTs through the VAE" in results and "share of body, VAE reconstructions" in results
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    assert all({"measure", "value", "target", "met"} <= set(row) for row in metrics["targets"])
    assert {"fidelity", "stages", "ceiling", "realism"} <= set(metrics["generation"])
    ceiling = metrics["generation"]["ceiling"]  # mean, median and per-case sign of the GTVp contrast
    assert ceiling["n_gtvp"] == 0 or (0.0 <= ceiling["gtvp_contrast_sign_kept"] <= 1.0
                                      and np.isfinite(ceiling["gtvp_contrast_reconstruction_median_hu"]))
    assert results.count("| **all** |") == 2  # de-identification per type: phantom reports and hand-written notes
    for plot in ("loss_curves.png", "ablation_bars.png", "dice_boxplots.png"):
        assert (out / "results" / "plots" / plot).stat().st_size > 0
    for example in ("contour_overlay.png", "contour_truth.png", "generated_left.png", "generated_right.png", "drafted_report.txt"):
        assert (out / "results" / "examples" / example).stat().st_size > 0
    assert (out / "results" / "examples" / "contour" / "CTVn.nii.gz").is_file()
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    assert "reused" in capsys.readouterr().out
