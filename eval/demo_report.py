"""The evaluation and pipeline examples of ``medvlm demo``, and the ``results/README.md`` they make.

Everything here runs on the held-out test split of the demo dataset, after training: segmentation with
report ablations and the image-only baseline in one invocation, zero-shot laterality on test reports and
CT, one example of each pipeline (contour -> NIfTI + PNG overlay, two CTs from contrasting reports,
classification, a drafted report). Nothing is tuned on the test split.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from medvlm.data.io import atomic_write_text

TARGETS = {"OAR mean": 0.85, "GTVp": 0.70, "GTVn": 0.70, "CTVn": 0.85}


def pipeline_examples(run: Path, data: Path, out: Path) -> list[str]:
    """One example per pipeline, written under ``out``; returns Markdown lines describing them."""
    from medvlm.data.datalist import load_datalist
    from medvlm.data.io import load_labels, load_nifti, save_labels, save_nifti
    from medvlm.data.preview import focus_point, save_preview
    from pipelines import ContourPipeline, ReportGenerationPipeline, ReportToCTPipeline, ZeroShotClassificationPipeline

    lines = []
    item = load_datalist(data)["test"][0]
    contour = ContourPipeline.from_pretrained(run / "contour")
    contour.set_progress_bar_config(disable=True)
    result = contour(item["image"], report=item["report"])
    result.save(out / "contour")
    image, affine = load_nifti(item["image"])
    names = list(result.structure_names)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    predicted = np.stack([result.masks[0][n] for n in names]).astype(np.uint8)
    truth, _, truth_names = load_labels(item["label"])
    truth = np.stack([truth[truth_names.index(n)] for n in names]).astype(np.uint8)
    point = focus_point(truth, names, image.shape)  # the same slices in both pictures
    case_id = item.get("id", "test case")
    save_preview(out / "contour_overlay.png", image, predicted, names, spacing, title=f"{case_id}: medvlm contours", point=point)
    save_preview(out / "contour_truth.png", image, truth, names, spacing, title=f"{case_id}: ground truth", point=point)
    lines.append(f"* Contour: `{item['image']}` with its report -> `examples/contour/*.nii.gz`; predicted "
                 "![contours](examples/contour_overlay.png) and the ground truth on the same slices "
                 "![truth](examples/contour_truth.png)")

    generator_pipe = ReportToCTPipeline.from_pretrained(run / "report_to_ct")
    generator_pipe.set_progress_bar_config(disable=True)
    prompts = ["Left tonsil squamous cell carcinoma, T2 N1 M0. Elective neck: ipsilateral (left).",
               "Right tonsil squamous cell carcinoma, T2 N1 M0. Elective neck: ipsilateral (right)."]
    generated = generator_pipe(prompts, num_inference_steps=25, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    for i, prompt in enumerate(prompts):
        side = "left" if i == 0 else "right"
        save_nifti(out / f"generated_{side}_ct.nii.gz", generated.ct[i], generated.affine)
        masks = generated.masks[i].astype(np.uint8) if generated.masks is not None else None
        if masks is not None:
            save_labels(out / f"generated_{side}_labels.nii.gz", masks, generated.affine, generated.structure_names)
        save_preview(out / f"generated_{side}.png", generated.ct[i], masks, list(generated.structure_names),
                     tuple(float(v) for v in np.linalg.norm(generated.affine[:3, :3], axis=0)), title=prompt)
        lines.append(f"* Generate ({side}): \"{prompt}\" -> ![{side}](examples/generated_{side}.png)")

    classify = ZeroShotClassificationPipeline.from_pretrained(run / "zero_shot")
    labels = {"laterality": ["left", "right"], "elective neck": ["ipsilateral", "bilateral"]}
    scores = classify(reports=[item["report"]], ct=[item["image"]], labels=labels)
    for name, classes in labels.items():
        report_p = scores.report_probabilities[name][0]
        ct_p = scores.ct_probabilities[name][0]
        lines.append(f"* Classify {name}: report -> {classes[int(np.argmax(report_p))]} ({np.max(report_p):.2f}), "
                     f"CT -> {classes[int(np.argmax(ct_p))]} ({np.max(ct_p):.2f})")

    drafting = ReportGenerationPipeline.from_pretrained(run / "report_generation")
    drafted = drafting(item["image"]).reports[0]
    atomic_write_text(out / "drafted_report.txt", drafted + "\n")
    lines.append(f"* Draft: `examples/drafted_report.txt`: \"{drafted[:160]}\"")
    return lines


def make_plots(run: Path, results: Path, dice: dict[str, dict[str, float]]) -> list[str]:
    """Loss curves (TensorBoard logs), Dice box plots per structure and ablation bars; Markdown lines."""
    import csv
    import logging

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medvlm.data.preview import save_figure

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one INFO line per event file otherwise
    folder = results / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    stages = [p.name for p in sorted(run.iterdir()) if (p / "logs" / p.name).is_dir()]
    figure, axes = plt.subplots(1, max(len(stages), 1), figsize=(3.2 * max(len(stages), 1), 2.8), squeeze=False)
    for axis, stage in zip(axes[0], stages):
        events = EventAccumulator(str(run / stage / "logs" / stage))
        events.Reload()
        if "loss/total" in events.Tags()["scalars"]:
            points = events.Scalars("loss/total")
            axis.plot([p.step for p in points], [p.value for p in points])
        axis.set_title(stage, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
    axes[0][0].set_ylabel("training loss", fontsize=8)
    figure.tight_layout()
    save_figure(figure, folder / "loss_curves.png", dpi=90)

    variants = list(dice)
    names = list(next(iter(dice.values())))
    figure, axis = plt.subplots(figsize=(10, 3.2))
    width = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        axis.bar([i + k * width for i in range(len(names))], [dice[variant][n] for n in names], width, label=variant)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, fontsize=8, rotation=20)
    axis.set_ylabel("mean Dice (test)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7, ncol=len(variants))
    figure.tight_layout()
    save_figure(figure, folder / "ablation_bars.png", dpi=90)

    per_variant = {}
    for variant, slug in (("report: correct", "report_correct"), ("image-only baseline", "image_only_baseline")):
        path = results / f"per_case_test_{slug}.csv"
        if path.is_file():
            with open(path, newline="") as handle:
                per_variant[variant] = list(csv.DictReader(handle))
    figure, axis = plt.subplots(figsize=(10, 3.2))
    for k, (variant, rows) in enumerate(per_variant.items()):
        values = [[float(r["dice"]) for r in rows if r["structure"] == n] for n in names]
        positions = [i * (len(per_variant) + 1) + k for i in range(len(names))]
        parts = axis.boxplot(values, positions=positions, widths=0.8, patch_artist=True)
        for box in parts["boxes"]:
            box.set_facecolor(f"C{k}")
        axis.plot([], [], color=f"C{k}", label=variant, linewidth=6)
    axis.set_xticks([i * (len(per_variant) + 1) + (len(per_variant) - 1) / 2 for i in range(len(names))], names,
                    fontsize=8, rotation=20)
    axis.set_ylabel("Dice per test case")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, folder / "dice_boxplots.png", dpi=90)
    return ["![training loss per stage](plots/loss_curves.png)", "",
            "![mean Dice per structure: report ablations and baseline](plots/ablation_bars.png)", "",
            "![Dice per test case: with the report vs image-only baseline](plots/dice_boxplots.png)"]


def write_results(run: Path, data: Path, results: Path, config_name: str, progress: bool = True,
                  command: str | None = None) -> dict:
    """Evaluation + examples + ``results/README.md``; returns the headline numbers. ``command``: what the
    page says produced it (default: the demo)."""
    import platform

    from eval.segmentation import evaluate

    started = time.perf_counter()
    baseline = run / "baseline" / "final" / "baseline"
    segmentation = evaluate(run / "contour", data, results, modes=("correct", "none", "drafted", "counterfactual"),
                            baseline=baseline if baseline.is_dir() else None, progress=progress)
    from eval import zero_shot_eval

    zero_shot_results = zero_shot_eval.evaluate(run / "zero_shot", data)
    test_key = ("reports", "test (held-out templates)", "zero-shot")
    zero_shot = {"reports": zero_shot_results[test_key]["laterality"]["accuracy"],
                 "ct": zero_shot_results[("ct", "test (held-out templates)", "zero-shot")]["laterality"]["accuracy"],
                 "n": zero_shot_results[test_key]["laterality"]["n"]}
    from eval import generation_eval

    # report-to-CT targets 1-4: 16 samples per side, 8 per T/N stage prompt; realism of the laterality samples
    generation = generation_eval.evaluate(run, data, n_per_side=16, stage_n=8, steps=25)
    fidelity = generation["fidelity"]
    realism = generation_eval.realism_table(generation["realism"])
    generation_prompts = generation["prompts"]
    from eval import drafting_eval

    drafting = drafting_eval.table(drafting_eval.agreement(run / "report_generation", data))
    from eval import deid_eval

    # the rule set every pipeline applies on the way in, scored per identifier type (text only, seconds)
    deid_tables = [deid_eval.evaluate_phantom(100).table("Phantom reports (200, train + held-out template families)"), "",
                   deid_eval.evaluate_notes().table(f"Hand-written notes ({len(list(deid_eval.NOTES_DIR.glob('*.txt')))} "
                                                    "files, layouts unlike the phantom's)")]
    examples = pipeline_examples(run, data, results / "examples")
    plots = make_plots(run, results, segmentation["dice"])
    dice = segmentation["dice"]["report: correct"]
    from medvlm.vocabulary import OAR_NAMES

    measured = {"OAR mean": float(np.mean([dice[n] for n in OAR_NAMES])), "GTVp": dice["GTVp"], "GTVn": dice["GTVn"],
                "CTVn": dice["CTVn"]}
    baseline_ctvn = segmentation["dice"].get("image-only baseline", {}).get("CTVn")
    target = generation_eval._target
    rows = [target(f"Dice {k} (report)", v, f">= {TARGETS[k]:.2f}", v >= TARGETS[k]) for k, v in measured.items()]
    if baseline_ctvn is not None:
        gap = measured["CTVn"] - baseline_ctvn
        rows.append(target("CTVn Dice minus image-only baseline", gap, ">= +0.10", gap >= 0.10))
    if segmentation["counterfactual_follows"] is not None:
        f = segmentation["counterfactual_follows"]
        a = segmentation.get("counterfactual_already")
        reference = f" (already {a:.2f} with the correct report)" if a is not None else ""
        rows.append(target(f"CTVn side follows counterfactual report{reference}", f, ">= 0.90",
                           f >= 0.9 and (a is None or f > a)))
    rows.append(target("zero-shot laterality, test reports", zero_shot["reports"], ">= 0.90", zero_shot["reports"] >= 0.9))
    rows.append(target("zero-shot laterality, test CT", zero_shot["ct"], ">= 0.80", zero_shot["ct"] >= 0.8))
    rows += generation["targets"]
    summary_path = run / "training_summary.json"
    stages = json.loads(summary_path.read_text())["stages"] if summary_path.is_file() else {}
    stage_lines = ["| stage | steps | seconds | samples/s | final loss |", "|---|---|---|---|---|"]
    for name, stage in stages.items():
        stage_lines.append(f"| {name} | {stage['steps']} | {stage['wall_seconds']:.0f} | {stage['samples_per_second']:.2f} | "
                           f"{stage['final_losses'].get('total', float('nan')):.4f} |")
    text = "\n".join([
        "# medvlm demo results", "",
        f"Produced by {command or f'`make demo` (`medvlm demo --config {config_name}`)'} on {platform.machine()} with "
        f"{torch.get_num_threads()} CPU threads; test split of `{data}`; evaluation took "
        f"{time.perf_counter() - started:.0f} s. Research software, not for clinical use.", "",
        "## Targets against measured values", "", generation_eval.targets_table(rows), "",
        segmentation["summary"], "", segmentation["follows_line"], "", *plots, "",
        f"Full tables (every metric, the reference study's per-case layout for 2/5/10/all cases): `{Path(segmentation['tables']).name}`.", "",
        "## Zero-shot classification and linear probe", "",
        f"Laterality on the {zero_shot['n']} test cases (held-out report templates): reports {zero_shot['reports']:.2f}, "
        f"CT {zero_shot['ct']:.2f}. Every label set (`medvlm eval zero-shot --pipeline RUN/zero_shot --data DATA`):", "",
        zero_shot_eval.table(zero_shot_results), "",
        "## Report-to-CT: realism and diversity (`medvlm eval generation --run RUN --data DATA`)", "",
        f"The {fidelity['n']} laterality samples above ({fidelity['scheduler']}, {fidelity['steps']} steps; prompts: "
        + "; ".join(f"`{p}`" for p in generation_prompts) + "), on the CT tower's preprocessed grid. `medvlm eval "
        "generation --data` instead generates one CT per held-out test report.", "",
        realism, "",
        "## Report drafting (test split): fields parsed from the drafts against the records", "", drafting, "",
        "## De-identification: identifiers removed, per type (`medvlm eval deid`)", "",
        "Recall (removed): the identifier overlaps a detected span of any type; (typed): of its own type. The rules "
        "were written with these notes in view; `medvlm eval deid` also scores two later sets of notes, whose first "
        "measurement, before any rule saw them, was recall 0.930 and 0.824.", "",
        *deid_tables, "",
        "## Training", "", *stage_lines, "",
        "## Pipeline examples", "", *examples, ""])
    atomic_write_text(results / "README.md", text)
    metrics = {"targets": rows, "dice": segmentation["dice"], "zero_shot": zero_shot,
               "generation": {k: generation[k] for k in ("fidelity", "stages", "ceiling", "realism")}}
    atomic_write_text(results / "metrics.json", json.dumps(metrics, indent=1, default=float) + "\n")
    return {"targets": rows, "zero_shot": zero_shot, "dice": segmentation["dice"], "generation": fidelity,
            "counterfactual_follows": segmentation["counterfactual_follows"]}
