"""Robustness: Dice as a function of perturbations beyond the training range, ours and the baseline.

``medvlm eval robustness --pipeline RUN/contour --data DATA [--baseline RUN/baseline] [--cases N] [--out DIR]``

Each held-out test CT (with its correct report) is perturbed in its own voxel grid, one family at a time,
and contoured; Dice per structure group (organs-at-risk mean, GTVp, GTVn, CTVn) is averaged per level.
The training range, for comparison: augmentation scales by up to 5 % and rotates axially by up to 4.6
degrees; the phantom's noise is 10-25 HU and a third of its cases carry 150-400 HU dental streaks.

* **scale**: anatomy size factor (MONAI ``Affine`` about the volume centre; labels nearest-neighbour)
* **rotation**: axial rotation in degrees (in the x-y voxel plane, which assumes equal in-plane spacing)
* **noise**: extra Gaussian noise, sigma in HU
* **dental streaks**: streak amplitude in HU, rays from the teeth (voxels >= ``teeth_hu``; the phantom's teeth
  are 1500 HU, its cortical bone 1100 HU) in the axial slices they occupy
* **blur**: Gaussian smoothing, sigma in mm (MONAI ``GaussianSmooth``, per axis in the CT's own voxel spacing; the CT
  padded by replication): a smoother reconstruction kernel or thick slices resampled; the phantom is sharp at its
  3 mm voxels

The unperturbed level (scale 1, 0 degrees, 0 HU) is the same contour for every family and is computed once.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from eval.segmentation import GROUPS
from medvlm.cli import claim_output

FAMILIES: dict[str, tuple[float, ...]] = {
    "scale": (0.85, 0.92, 1.0, 1.08, 1.15),
    "rotation": (0.0, 10.0, 20.0, 30.0),
    "noise": (0.0, 25.0, 50.0, 100.0),
    "dental streaks": (0.0, 400.0, 800.0, 1600.0),
    "blur": (0.0, 1.5, 3.0, 4.5),
}
IDENTITY = {"scale": 1.0, "rotation": 0.0, "noise": 0.0, "dental streaks": 0.0, "blur": 0.0}
UNITS = {"scale": "x", "rotation": "deg", "noise": "HU", "dental streaks": "HU", "blur": "mm"}
AIR_HU = -1024.0


def perturb(image_hu: np.ndarray, labels: np.ndarray, family: str, level: float, *, seed: int = 0,
            teeth_hu: float = 1400.0, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """``image_hu`` (X, Y, Z) and ``labels`` (C, X, Y, Z) perturbed by one family at one level (new arrays).
    ``spacing_mm``: the voxel size, for a blur given in mm."""
    if family not in FAMILIES:
        raise ValueError(f"unknown perturbation {family!r}; choose from {sorted(FAMILIES)}")
    image = np.asarray(image_hu, np.float32).copy()
    labels = np.asarray(labels)
    if level == IDENTITY[family]:
        return image, labels.copy()
    rng = np.random.default_rng(seed)
    if family in ("scale", "rotation"):
        from monai.transforms import Affine

        if family == "scale" and level <= 0:
            raise ValueError(f"scale factor must be positive, got {level}")
        # MONAI scales the sampling grid: a grid factor 1/level makes the anatomy `level` times larger
        params = {"scale_params": (1.0 / level,) * 3} if family == "scale" else {"rotate_params": (0.0, 0.0, math.radians(level))}
        transform = Affine(**params, padding_mode="zeros", image_only=True)
        # shift so that zero padding is air, then back
        moved = transform(torch.from_numpy(image - AIR_HU)[None], mode="bilinear")[0]
        image = np.asarray(moved, np.float32) + AIR_HU
        labels = np.asarray(transform(torch.from_numpy(labels.astype(np.float32)), mode="nearest")).astype(labels.dtype)
    elif family == "noise":
        image += rng.normal(0.0, level, image.shape).astype(np.float32)
    elif family == "blur":
        from monai.transforms import GaussianSmooth

        if level < 0:
            raise ValueError(f"blur sigma must be >= 0 mm, got {level}")
        sigma = tuple(float(level) / float(s) for s in spacing_mm)
        # MONAI's filter pads with zeros (0 HU: soft tissue beside the air and bone at the grid's faces); padded by
        # replication first and cropped back, so only the blur changes the CT
        margin = int(np.ceil(3.0 * max(sigma)))
        padded = torch.from_numpy(np.pad(image, margin, mode="edge"))[None]
        inside = tuple(slice(margin, margin + n) for n in image.shape)
        image = np.asarray(GaussianSmooth(sigma=sigma)(padded)[0], np.float32)[inside]
    else:
        from medvlm.data.phantom import add_dental_streaks

        add_dental_streaks(image, image >= teeth_hu, rng, amplitude=level)
    return image, labels


def _group_dice(prediction: np.ndarray, truth: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    from monai.metrics import DiceMetric

    from eval.segmentation import group_means

    # both empty counts as 1.0, as in eval.segmentation
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(
        torch.from_numpy(prediction[None].astype(np.float32)), torch.from_numpy(truth[None].astype(np.float32)))[0].numpy()
    for c in range(len(names)):
        if not prediction[c].any() and not truth[c].any():
            dice[c] = 1.0
    return group_means(dict(zip(names, dice.tolist())))


def evaluate(pipeline: str | Path, data: str | Path, *, baseline: str | Path | None = None, cases: int | None = None,
             families: Sequence[str] = tuple(FAMILIES), split: str = "test", teeth_hu: float = 1400.0,
             progress: bool = False) -> dict:
    """``{model: {family: {level: {group: mean Dice}}}}`` for ``ours`` and, when given, ``baseline``."""
    from eval.segmentation import baseline_masks
    from medvlm.data.datalist import load_datalist
    from medvlm.data.inputs import prepare_ct
    from medvlm.data.io import load_labels, load_nifti
    from medvlm.models.baseline import ImageOnlySegmenter
    from pipelines import ContourPipeline

    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown perturbation(s) {unknown}; choose from {sorted(FAMILIES)}")
    pipe = ContourPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    base = ImageOnlySegmenter.from_pretrained(baseline).eval() if baseline is not None else None
    items = load_datalist(data)[split][: cases or None]
    if not items:
        raise ValueError(f"the {split!r} split of {data} is empty")
    names = list(pipe.config.structure_names)
    models = ["ours"] + (["baseline"] if base is not None else [])
    scores: dict = {m: {f: {lv: [] for lv in FAMILIES[f]} for f in families} for m in models}
    for number, item in enumerate(items):
        if progress:
            print(f"  robustness: case {number + 1}/{len(items)}", flush=True)
        image, affine = load_nifti(item["image"])
        spacing = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)
        truth, _, label_names = load_labels(item["label"])
        truth = np.stack([truth[label_names.index(n)] for n in names])
        reference: dict[str, dict] = {}
        for family in families:
            for level in FAMILIES[family]:
                identity = level == IDENTITY[family]
                if identity and reference:
                    for model in models:
                        scores[model][family][level].append(reference[model])
                    continue
                moved, moved_truth = perturb(image, truth, family, level, seed=number, teeth_hu=teeth_hu,
                                             spacing_mm=spacing)
                result = pipe(moved, report=item.get("report"), affine=affine, draft_missing_reports=False)
                prediction = np.stack([result.masks[0][n] for n in names])
                found = {"ours": _group_dice(prediction, moved_truth, names)}
                if base is not None:
                    case = prepare_ct(moved, pipe.preprocess_config, affine=affine)
                    masks = baseline_masks(base, case, list(pipe.config.thresholds), names, pipe.preprocess_config.roi_size)
                    found["baseline"] = _group_dice(np.stack([masks[n] for n in names]), moved_truth, names)
                for model in models:
                    scores[model][family][level].append(found[model])
                if identity:
                    reference = found
    return {model: {family: {level: {g: float(np.mean([s[g] for s in rows])) for g in GROUPS}
                             for level, rows in levels.items()} for family, levels in fams.items()}
            for model, fams in scores.items()} | {"cases": len(items), "split": split}


def table(result: dict) -> str:
    """Markdown: one row per family and level, Dice per group for ours (and the baseline)."""
    models = [m for m in ("ours", "baseline") if m in result]
    header = "| perturbation | level | " + " | ".join(f"{g} ({m})" for m in models for g in GROUPS) + " |"
    lines = [f"Dice on {result['cases']} {result.get('split', 'test')} cases per perturbation level (correct report).",
             "", header,
             "|---|---|" + "---|" * (len(models) * len(GROUPS))]
    for family, levels in result["ours"].items():
        for level in levels:
            cells = [f"{result[m][family][level][g]:.3f}" for m in models for g in GROUPS]
            lines.append(f"| {family} | {level:g} {UNITS[family]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    """Dice against level, one panel per family; ours solid, the baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medvlm.data.preview import save_figure

    families = list(result["ours"])
    figure, axes = plt.subplots(1, len(families), figsize=(4 * len(families), 3.2), squeeze=False)
    for axis, family in zip(axes[0], families):
        for g, colour in zip(GROUPS, ("tab:green", "tab:red", "tab:orange", "tab:blue")):
            for model, style in (("ours", "-"), ("baseline", "--")):
                if model in result:
                    levels = list(result[model][family])
                    axis.plot(levels, [result[model][family][lv][g] for lv in levels], style, color=colour, marker="o",
                              label=f"{g} ({model})")
        axis.set_title(family)
        axis.set_xlabel(UNITS[family])
        axis.set_ylim(0, 1)
    axes[0][0].set_ylabel("Dice")
    axes[0][-1].legend(fontsize=6)
    figure.tight_layout()
    return save_figure(figure, path, dpi=90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="a ContourPipeline folder (RUN/contour)")
    parser.add_argument("--data", required=True, help="dataset folder with datalist.json")
    parser.add_argument("--baseline", default=None, help="image-only baseline folder (RUN/baseline/final/baseline)")
    parser.add_argument("--cases", type=int, default=None, help="first N cases of the split (default all)")
    parser.add_argument("--split", default="test", choices=["validation", "test"],
                        help="held-out split to perturb (validation to decide on a training setting)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--teeth-hu", type=float, default=1400.0, help="voxels at or above this are teeth (streak sources)")
    parser.add_argument("--out", default="results/robustness", help="folder for robustness.md and robustness.png")
    parser.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files")
    args = parser.parse_args(argv)
    claim_output(args, "eval robustness")
    result = evaluate(args.pipeline, args.data, baseline=args.baseline, cases=args.cases, families=args.families,
                      split=args.split, teeth_hu=args.teeth_hu, progress=True)
    from medvlm.data.io import atomic_write_text

    out = Path(args.out)
    text = table(result)
    atomic_write_text(out / "robustness.md", text + "\n")
    plot(result, out / "robustness.png")
    print(text)
    print(f"written: {out / 'robustness.md'}, {out / 'robustness.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
