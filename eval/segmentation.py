"""Segmentation metrics with MONAI (voxel spacing always passed) and the reference study's per-structure tables.

Conventions for empty masks (never a silently optimistic 0 mm):

* Dice, IoU, surface Dice: both empty -> 1.0 (the structure is correctly absent); exactly one empty -> 0.0.
* HD95 and average surface distance (mm): both empty -> 0.0 mm; exactly one empty -> undefined (NaN),
  counted in the ``undefined`` column and left out of means and standard deviations, which therefore
  say over how many cases they were taken.

Run on a trained pipeline: ``medvlm eval segmentation --pipeline outputs/demo/run/contour --data DATA``.
"""
from __future__ import annotations

import argparse
import csv
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, MeanIoU
from monai.metrics.utils import get_edge_surface_distance

from medvlm.data.transforms import body_midline
from medvlm.cli import claim_output

METRICS = ("dice", "iou", "hd95_mm", "asd_mm", "surface_dice_2mm")
SURFACE_TOLERANCE_MM = 2.0


@dataclass
class CaseStructureScore:
    case_id: str
    structure: str
    dice: float
    iou: float
    hd95_mm: float
    asd_mm: float
    surface_dice_2mm: float
    truth_empty: bool
    prediction_empty: bool


def structure_scores(prediction: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> dict[str, float]:
    """Metrics of one binary structure (X, Y, Z) with the conventions of this module."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    p_empty, t_empty = not prediction.any(), not truth.any()
    if p_empty and t_empty:
        return {"dice": 1.0, "iou": 1.0, "hd95_mm": 0.0, "asd_mm": 0.0, "surface_dice_2mm": 1.0}
    if p_empty or t_empty:
        return {"dice": 0.0, "iou": 0.0, "hd95_mm": math.nan, "asd_mm": math.nan, "surface_dice_2mm": 0.0}
    y_pred = torch.from_numpy(prediction)[None, None].float()
    y = torch.from_numpy(truth)[None, None].float()
    spacing = [float(s) for s in spacing_mm]
    dice = DiceMetric(include_background=True, reduction="none")(y_pred, y)
    iou = MeanIoU(include_background=True, reduction="none")(y_pred, y)
    # MONAI's HausdorffDistanceMetric (percentile 95), SurfaceDistanceMetric (symmetric) and SurfaceDiceMetric
    # each find both surfaces and their distance transforms again; all three are these two sets of surface
    # distances, found once here with MONAI's own helper and reduced as those classes reduce them
    # (tests/test_eval_segmentation.py checks that the numbers are the classes' numbers). Three times was a
    # fifth of the demo's segmentation evaluation (5 variants x 18 cases x 9 structures).
    with warnings.catch_warnings():  # MONAI's helper passes its own deprecated argument to get_mask_edges
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        _, (to_truth, to_prediction), _ = get_edge_surface_distance(y_pred[0, 0], y[0, 0], spacing=spacing, symmetric=True)
    hd95 = torch.maximum(torch.quantile(to_truth.double(), 0.95), torch.quantile(to_prediction.double(), 0.95))
    asd = torch.cat([to_truth, to_prediction]).double().mean()
    nsd = ((to_truth <= SURFACE_TOLERANCE_MM).sum() + (to_prediction <= SURFACE_TOLERANCE_MM).sum()) / (
        len(to_truth) + len(to_prediction))
    return {"dice": float(dice), "iou": float(iou), "hd95_mm": float(hd95), "asd_mm": float(asd), "surface_dice_2mm": float(nsd)}


def case_scores(case_id: str, prediction: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float],
                names: Sequence[str]) -> list[CaseStructureScore]:
    """Per-structure scores of one case; ``prediction``/``truth`` are (C, X, Y, Z)."""
    rows = []
    for c, name in enumerate(names):
        scores = structure_scores(prediction[c], truth[c], spacing_mm)
        rows.append(CaseStructureScore(case_id, name, **scores, truth_empty=not truth[c].any(),
                                       prediction_empty=not prediction[c].any()))
    return rows


def write_csv(rows: Sequence[CaseStructureScore], path: str | Path) -> Path:
    from medvlm.data.io import atomic_write_text

    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case_id", "structure", *METRICS, "truth_empty", "prediction_empty"])
    for r in rows:
        writer.writerow([r.case_id, r.structure, *(f"{getattr(r, m):.4f}" for m in METRICS), r.truth_empty, r.prediction_empty])
    atomic_write_text(Path(path), buffer.getvalue())
    return Path(path)


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan, 0
    return float(np.mean(finite)), float(np.std(finite)), len(finite)


GROUPS = ("OAR mean", "GTVp", "GTVn", "CTVn")


def group_means(dice: dict[str, float]) -> dict[str, float]:
    """Per-structure Dice -> the groups the sweeps report: organs-at-risk mean, GTVp, GTVn, CTVn."""
    from medvlm.vocabulary import OAR_NAMES

    return {"OAR mean": float(np.mean([dice[n] for n in OAR_NAMES])), "GTVp": float(dice["GTVp"]),
            "GTVn": float(dice["GTVn"]), "CTVn": float(dice["CTVn"])}


def seed_table(rows: Sequence[CaseStructureScore], structure: str, n_cases: int | None = None) -> str:
    """The reference study's layout for one structure: ``no, ID, Dice, IoU, HD`` per case, then ``Avr`` and ``Std``."""
    chosen = [r for r in rows if r.structure == structure][: n_cases or None]
    lines = [f"**{structure}** ({len(chosen)} cases; HD = HD95 in mm)", "", "| no | ID | Dice | IoU | HD |", "|---|---|---|---|---|"]
    for i, r in enumerate(chosen, start=1):
        hd = "undefined" if math.isnan(r.hd95_mm) else f"{r.hd95_mm:.2f}"
        lines.append(f"| {i} | {r.case_id} | {r.dice:.3f} | {r.iou:.3f} | {hd} |")
    stats = {m: _mean_std([getattr(r, m) for r in chosen]) for m in ("dice", "iou", "hd95_mm")}
    undefined = sum(math.isnan(r.hd95_mm) for r in chosen)
    hd_note = f" ({stats['hd95_mm'][2]} cases; {undefined} undefined)" if undefined else ""
    lines.append(f"| Avr | | {stats['dice'][0]:.3f} | {stats['iou'][0]:.3f} | {stats['hd95_mm'][0]:.2f}{hd_note} |")
    lines.append(f"| Std | | {stats['dice'][1]:.3f} | {stats['iou'][1]:.3f} | {stats['hd95_mm'][1]:.2f} |")
    return "\n".join(lines)


def summary_table(rows: Sequence[CaseStructureScore], names: Sequence[str], title: str) -> str:
    """Mean of every metric per structure (undefined distances counted, not averaged)."""
    lines = [f"### {title}", "", "| structure | Dice | IoU | HD95 (mm) | ASD (mm) | surface Dice @2 mm | distance undefined |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        chosen = [r for r in rows if r.structure == name]
        means = {m: _mean_std([getattr(r, m) for r in chosen])[0] for m in METRICS}
        undefined = sum(math.isnan(r.hd95_mm) for r in chosen)
        lines.append(f"| {name} | {means['dice']:.3f} | {means['iou']:.3f} | {means['hd95_mm']:.2f} | {means['asd_mm']:.2f} | "
                     f"{means['surface_dice_2mm']:.3f} | {undefined}/{len(chosen)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report ablation helpers
def counterfactual_prompt(record) -> tuple[str, str]:
    """The structured prompt of ``record`` with laterality flipped and elective neck switched
    (ipsilateral <-> bilateral), and the elective side(s) that prompt implies."""
    import dataclasses

    from medvlm.data.clinical import elective_levels
    from medvlm.text.prompts import structured_prompt

    flipped = dataclasses.replace(record)
    if flipped.laterality in ("left", "right"):
        flipped.laterality = "right" if flipped.laterality == "left" else "left"
        flipped.elective_neck = "bilateral" if record.elective_neck == "ipsilateral" else "ipsilateral"
    sides = elective_levels(flipped)
    return structured_prompt(flipped), "both" if len(sides) == 2 else next(iter(sides))


def predicted_sides(mask: np.ndarray, affine: np.ndarray, midline_x_mm: float, min_ml: float = 5.0) -> str:
    """"left", "right", "both" or "none": where a (CTVn) mask has at least ``min_ml`` of volume."""
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return "none"
    world_x = idx @ affine[0, :3] + affine[0, 3]
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    right = (world_x > midline_x_mm + 5).sum() * voxel_ml >= min_ml  # RAS: +x is the patient's right
    left = (world_x < midline_x_mm - 5).sum() * voxel_ml >= min_ml
    return "both" if left and right else "right" if right else "left" if left else "none"


def contralateral_probability(probability: np.ndarray, ctvn: np.ndarray, affine: np.ndarray, midline_x_mm: float,
                              side: str) -> float | None:
    """Mean CTVn probability in the *contralateral neck*: the true CTVn on the tumour's ``side`` mirrored
    across the body midline. A graded measure of whether the report's elective-neck decision reaches the
    contours (the predicted side only changes once probabilities cross the threshold). ``None`` when the
    grid's first axis is not world x (oblique or permuted affines) or there is no ipsilateral CTVn."""
    a = np.asarray(affine, float)
    if abs(a[0, 1]) > 1e-6 or abs(a[0, 2]) > 1e-6 or abs(a[1, 0]) > 1e-6 or abs(a[2, 0]) > 1e-6 or a[0, 0] == 0:
        return None
    index = np.arange(ctvn.shape[0])
    world_x = a[0, 0] * index + a[0, 3]
    ipsilateral = (world_x > midline_x_mm) if side == "right" else (world_x < midline_x_mm)  # RAS: +x is right
    source = np.asarray(ctvn, bool) & ipsilateral[:, None, None]
    mirrored = np.rint(2 * (midline_x_mm - a[0, 3]) / a[0, 0] - index).astype(int)  # voxel i -> its mirror across the midline
    inside = (mirrored >= 0) & (mirrored < ctvn.shape[0])
    region = np.zeros_like(source)
    region[mirrored[inside]] |= source[index[inside]]
    return float(np.asarray(probability)[region].mean()) if region.any() else None


def baseline_masks(model, case, thresholds, names, roi_size) -> dict[str, np.ndarray]:
    """The image-only baseline on one prepared CT (same preprocessing, ROI and sliding window as the pipeline)."""
    from monai.inferers import sliding_window_inference

    image = case.image[None].float()
    with torch.no_grad():
        probabilities = sliding_window_inference(image, roi_size=tuple(roi_size), sw_batch_size=1,
                                                 predictor=lambda x: torch.sigmoid(model(x)), overlap=0.25, mode="gaussian")
    restored = case.to_input_grid(probabilities[0])
    return {name: restored[c] >= thresholds[c] for c, name in enumerate(names)}


def evaluate(pipeline, data: str | Path, out: str | Path, *, split: str = "test",
             modes: Sequence[str] = ("correct",), baseline: str | Path | None = None, progress: bool = False) -> dict:
    """Score a ContourPipeline (a folder or the pipeline) on a split with each report mode (``correct``;
    ``none``: the learned null report; ``drafted``: a report drafted from the CT by the pipeline's report
    generator; ``counterfactual``)
    and, when given, the image-only baseline, all in this one invocation; write CSVs and Markdown tables.

    Returns ``{"dice": {variant: {structure: mean}}, "counterfactual_follows": fraction or None, "tables": path}``.
    """
    import nibabel as nib

    from medvlm.data.clinical import read_records_csv
    from medvlm.data.datalist import load_datalist
    from medvlm.data.inputs import prepare_ct
    from medvlm.data.io import atomic_write_text, load_labels, spacing_from_affine
    from medvlm.models.base import set_conv3d_layout
    from medvlm.models.baseline import ImageOnlySegmenter
    from pipelines import ContourPipeline

    pipe = pipeline if isinstance(pipeline, ContourPipeline) else ContourPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    if not isinstance(pipeline, ContourPipeline):
        pipe.enable_channels_last()  # layout only (faster 3D convolutions on CPU); a caller's pipeline is left as given
    model = ImageOnlySegmenter.from_pretrained(baseline).eval() if baseline is not None else None
    if model is not None:
        set_conv3d_layout(model, channels_last=True)
    datalist = load_datalist(data)
    records_path = Path(data) / "records.csv"
    records = {r.number: r for r in read_records_csv(records_path)} if records_path.is_file() else {}
    names = tuple(pipe.config.structure_names)
    variants = [f"report: {m}" for m in modes] + (["image-only baseline"] if model is not None else [])
    rows: dict[str, list] = {v: [] for v in variants}
    follows: list[bool] = []
    already: list[bool] = []  # the correct report's prediction already had the counterfactual's sides
    contralateral: dict[str, list[tuple[float, float]]] = {"ipsilateral": [], "bilateral": []}  # (correct, counterfactual)
    items = datalist[split]
    for number, item in enumerate(items):
        if progress:
            print(f"  evaluating {split} case {number + 1}/{len(items)}", flush=True)
        truth, affine, label_names = load_labels(item["label"])
        case_id = item.get("id", Path(item["image"]).name)
        spacing = spacing_from_affine(affine)
        record = item.get("record")
        record = record if not isinstance(record, int) else records.get(record)
        sides_correct, contra_correct = None, None
        midline = body_midline(np.asarray(nib.load(item["image"]).dataobj), affine)
        for mode in modes:
            report, expected, draft = item.get("report"), None, False
            if mode == "none":
                report = None
            elif mode == "drafted":
                report, draft = None, True
            elif mode == "counterfactual":
                if record is None or not hasattr(record, "laterality"):
                    continue
                report, expected = counterfactual_prompt(record)
            result = pipe(item["image"], report=report, draft_missing_reports=draft,
                          return_probabilities=mode in ("correct", "counterfactual"))
            prediction = np.stack([result.masks[0][n] for n in label_names])
            lateral = record is not None and getattr(record, "laterality", None) in ("left", "right") and \
                getattr(record, "elective_neck", None) in contralateral and "CTVn" in label_names
            if lateral and mode in ("correct", "counterfactual"):
                value = contralateral_probability(result.probabilities[0][names.index("CTVn")],
                                                  truth[label_names.index("CTVn")], affine, midline, record.laterality)
                if mode == "correct":
                    contra_correct = value
                elif value is not None and contra_correct is not None:
                    contralateral[record.elective_neck].append((contra_correct, value))
            rows[f"report: {mode}"] += case_scores(case_id, prediction, truth, spacing, label_names)
            sides = predicted_sides(result.masks[0]["CTVn"], affine, midline)
            if mode == "correct":
                sides_correct = sides
            if expected is not None:
                follows.append(sides == expected)
                if sides_correct is not None:
                    already.append(sides_correct == expected)
        if model is not None:
            case = prepare_ct(item["image"], pipe.preprocess_config)
            masks = baseline_masks(model, case, list(pipe.config.thresholds), names, pipe.preprocess_config.roi_size)
            prediction = np.stack([masks[n] for n in label_names])
            rows["image-only baseline"] += case_scores(case_id, prediction, truth, spacing, label_names)
    out_dir = Path(out)
    dice = {v: {n: _mean_std([r.dice for r in rows[v] if r.structure == n])[0] for n in names} for v in variants}
    header = "| structure | " + " | ".join(variants) + " |"
    lines = [f"### Dice per structure, {split} split ({len(items)} cases), one invocation", "", header,
             "|---|" + "---|" * len(variants)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{dice[v][n]:.3f}" for v in variants) + " |")
    from medvlm.vocabulary import OAR_NAMES

    lines.append("| **OAR mean** | " + " | ".join(f"{np.mean([dice[v][n] for n in OAR_NAMES]):.3f}" for v in variants) + " |")
    parts = ["\n".join(lines)]
    fraction = None
    if follows:
        fraction = sum(follows) / len(follows)
        line = f"CTVn side follows the counterfactual report in {sum(follows)}/{len(follows)} cases ({100 * fraction:.0f} %)."
        if already:  # without this reference the fraction can look good for a network that ignores the report
            line += (f" Reference: with the correct report the predicted side already matched the counterfactual's in "
                     f"{sum(already)}/{len(already)} cases, so the report changed the side in "
                     f"{sum(f and not a for f, a in zip(follows, already))} case(s).")
        graded = [f"{decision}-neck cases ({len(pairs)}): {np.mean([c for c, _ in pairs]):.2f} with the correct report, "
                  f"{np.mean([f for _, f in pairs]):.2f} with the counterfactual"
                  for decision, pairs in contralateral.items() if pairs]
        if graded:  # the counterfactual turns ipsilateral into bilateral and back, so these should move apart
            line += (" Mean CTVn probability in the contralateral neck (the true ipsilateral CTVn mirrored across the "
                     "midline), lateralised tumours: " + "; ".join(graded) + ".")
        parts.append(line)
    for v in variants:
        slug = v.replace("report: ", "report_").replace(" ", "_").replace("-", "_")
        write_csv(rows[v], out_dir / f"per_case_{split}_{slug}.csv")
        parts.append(summary_table(rows[v], names, f"{v}: every metric"))
    main_rows = rows[variants[0]]
    n_total = len({r.case_id for r in main_rows})
    parts.append(f"### Per-case tables ({variants[0]}), the reference study's layout")
    for n in (2, 5, 10, None):
        if n is None or n < n_total:
            parts += [seed_table(main_rows, name, n) for name in names]
    tables = out_dir / f"segmentation_{split}.md"
    atomic_write_text(tables, "\n\n".join(parts) + "\n")
    return {"dice": dice, "counterfactual_follows": fraction,
            "counterfactual_already": (sum(already) / len(already)) if already else None,
            "contralateral_probability": {k: [float(np.mean([c for c, _ in v])), float(np.mean([f for _, f in v])), len(v)]
                                          for k, v in contralateral.items() if v},
            "tables": str(tables), "summary": parts[0],
            "follows_line": parts[1] if follows else ""}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="segmentation metrics of a ContourPipeline on a datalist split, "
                                     "with report ablations and the image-only baseline in the same run")
    parser.add_argument("--pipeline", required=True, help="ContourPipeline folder")
    parser.add_argument("--data", required=True, help="dataset folder (datalist.json)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--reports", choices=("correct", "none", "drafted", "counterfactual", "all"), default="all",
                        help="report mode (none: the learned null report; drafted: drafted from the CT); "
                             "all: correct, none, drafted and counterfactual")
    parser.add_argument("--baseline", default=None, help="folder of the image-only baseline (RUN/baseline/final/baseline)")
    parser.add_argument("--out", default="results/segmentation", help="folder for the CSV and Markdown tables")
    parser.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files")
    args = parser.parse_args(argv)
    claim_output(args, "eval segmentation")
    modes = ("correct", "none", "drafted", "counterfactual") if args.reports == "all" else (args.reports,)
    result = evaluate(args.pipeline, args.data, args.out, split=args.split, modes=modes, baseline=args.baseline)
    print(result["summary"])
    if result["follows_line"]:
        print(result["follows_line"])
    print(f"tables: {result['tables']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
