"""Augmentation utility of report-to-CT: is a decoder trained on N real + M synthetic cases better than on N real?

``medvlm eval augmentation --run RUN --data DATA [--config demo] [--real 10 20] [--seeds 0 1 2] [--steps N]
[--synthesis text|lesions] [--out DIR]``

1. The first ``real`` training cases of DATA form the real set.
2. ``synthetic`` CTs with paired contours come from the run's ReportToCTPipeline, prompted with the real
   set's reports in turn (no report outside the real set is used), written as NIfTI under ``OUT/synthetic``.
   ``--synthesis text`` (default) generates each case from its report alone; ``lesions`` regenerates only the
   tumour and nodes (GTVp, GTVn) of a real case for its report, from noise, keeping its CT latent, its other
   structures and its CT outside the new lesions (``keep_structures``): new lesions in real anatomy.
3. The segmentation stage is trained twice with the same configuration, steps and seed, on a datalist of the
   real set and on one of the real set plus the synthetic cases (the run's frozen stages shared); each
   decoder, swapped into the run's ContourPipeline, contours the same held-out test split.

The synthetic cases' contours are the pipeline's paired masks (decoded from the same latent as the CT; with a
CT-only autoencoder, the segmentation decoder's contours of the generated CT), so this measures what the
generator adds as it is, contour quality included. Minutes of generation plus two trainings per seed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from medvlm.cli import claim_output


SYNTHESIS = ("text", "lesions")
LESIONS = ("GTVp", "GTVn")  # what ``lesions`` synthesis regenerates; every other structure is the real case's


def synthesise(run: Path, items: list[dict], count: int, out: Path, *, steps: int = 25, guidance_scale: float = 3.0,
               seed: int = 0, synthesis: str = "text") -> list[dict]:
    """``count`` generated cases prompted by ``items``' reports in turn; datalist items (absolute paths)."""
    from medvlm.data.io import load_labels, load_nifti, save_labels, save_nifti
    from pipelines import ReportToCTPipeline

    if synthesis not in SYNTHESIS:
        raise ValueError(f"synthesis must be one of {SYNTHESIS}, got {synthesis!r}")
    pipe = ReportToCTPipeline.from_pretrained(run / "report_to_ct")
    pipe.set_progress_bar_config(disable=True)
    if not pipe.has_paired_masks and pipe.segmentation is None:
        raise ValueError(f"{run / 'report_to_ct'} gives no contours (no paired autoencoder, no segmentation decoder): "
                         "synthetic cases need paired contours")
    written = []
    for number in range(count):
        source = items[number % len(items)]
        case_dir = out / f"synthetic_{number:03d}"
        ct_path, label_path = case_dir / "ct.nii.gz", case_dir / "labels.nii.gz"
        if not (ct_path.is_file() and label_path.is_file()):  # a finished case is reused
            edit = {}
            if synthesis == "lesions":
                names = list(pipe.config.structure_names)
                ct, _ = load_nifti(source["image"])
                labels, _, stored = load_labels(source["label"], names)
                labels = labels[[stored.index(n) for n in names]]  # the pipeline's structure order
                edit = {"image": ct, "masks": labels, "keep_structures": [n for n in names if n not in LESIONS]}
            result = pipe(source["report"], num_inference_steps=steps, guidance_scale=guidance_scale,
                          generator=torch.Generator().manual_seed(seed + number), **edit)
            save_nifti(ct_path, result.ct[0], result.affine)
            save_labels(label_path, np.asarray(result.masks[0]).astype(np.uint8), result.affine, result.structure_names)
        written.append({"image": str(ct_path.resolve()), "label": str(label_path.resolve()), "report": source["report"],
                        "id": f"synthetic_{number:03d}"})
    return written


def _write_datalist(folder: Path, training: list[dict], datalist: dict) -> Path:
    from medvlm.data.io import atomic_write_text

    def plain(item: dict) -> dict:  # absolute paths and text only: the records stay with the source dataset
        out = {k: item[k] for k in ("report", "id") if k in item}
        return out | {k: str(Path(item[k]).resolve()) for k in ("image", "label") if k in item}

    content = {"training": [plain(i) for i in training], "validation": [plain(i) for i in datalist.get("validation", [])],
               "test": [plain(i) for i in datalist["test"]]}
    atomic_write_text(folder / "datalist.json", json.dumps(content, indent=1) + "\n")
    return folder


def evaluate(run: str | Path, data: str | Path, out: str | Path, *, config: str | Path = "demo", real: int = 20,
             synthetic: int = 40, steps: int | None = None, progress: bool = False, seed: int = 0,
             synthesis: str = "text") -> dict:
    """``{"real": {...}, "real + synthetic": {...}}`` test Dice per group (``"dice"``) and per structure
    (``"structures"``), with the case counts. ``seed`` sets the decoder's training seed and the generator's."""
    from eval.data_efficiency import check_run, load_settings, score_decoder, train_decoder
    from medvlm.data.datalist import load_datalist
    from pipelines import ContourPipeline

    run, out = Path(run), Path(out)
    check_run(run)
    if real < 1 or synthetic < 1:
        raise ValueError(f"need at least one real and one synthetic case, got real={real}, synthetic={synthetic}")
    datalist = load_datalist(data)
    real_items = datalist["training"][:real]
    if any("label" not in item for item in real_items):
        raise ValueError("the real training cases need labels")
    settings = load_settings(config, steps)
    settings.training.seed = int(seed)
    if progress:
        print(f"[augmentation] generating {synthetic} synthetic cases from {len(real_items)} real reports", flush=True)
    generated = synthesise(run, real_items, synthetic, out / "synthetic", seed=100_003 * int(seed), synthesis=synthesis)
    base = ContourPipeline.from_pretrained(run / "contour")
    results: dict = {"steps": settings.training.segmentation.steps}
    for name, training in (("real", real_items), ("real + synthetic", real_items + generated)):
        folder = out / name.replace(" + ", "_plus_")
        data_dir = _write_datalist(folder / "data", training, datalist)
        decoder_dir = train_decoder(run, data_dir, folder, settings, progress_line=(
            f"[augmentation] training the decoder on {name} ({len(training)} cases)" if progress else None))
        groups, structures = score_decoder(base, decoder_dir, data, folder / "evaluation", per_structure=True)
        results[name] = {"cases": len(training), "dice": groups, "structures": structures}
    return results


def summary(runs: dict[int, list[dict]]) -> tuple[str, list[dict]]:
    """Per number of real cases, over seeds: the gain in mean Dice over the nine structures (mean and spread)
    and the largest organ-at-risk loss, with the targets (+0.03 at 10 cases, +0.01 at 20 or more; no organ at
    risk lower by more than 0.01)."""
    from medvlm.vocabulary import OAR_NAMES

    lines = ["| real cases | seeds | mean Dice, real | mean Dice, real + synthetic | gain (mean +- sd) | worst OAR change |",
             "|---|---|---|---|---|---|"]
    rows = []
    for real, results in sorted(runs.items()):
        base = np.array([np.mean(list(r["real"]["structures"].values())) for r in results])
        augmented = np.array([np.mean(list(r["real + synthetic"]["structures"].values())) for r in results])
        gain = augmented - base
        worst = min(float(np.mean([r["real + synthetic"]["structures"][n] - r["real"]["structures"][n] for r in results]))
                    for n in OAR_NAMES)
        lines.append(f"| {real} | {len(results)} | {base.mean():.3f} | {augmented.mean():.3f} | "
                     f"{gain.mean():+.3f} +- {gain.std():.3f} | {worst:+.3f} |")
        target = 0.03 if real <= 10 else 0.01
        rows.append({"measure": f"augmentation: mean Dice gain with {real} real cases ({len(results)} seeds)",
                     "value": float(gain.mean()), "target": f">= +{target:.2f}", "met": bool(gain.mean() >= target)})
        rows.append({"measure": f"augmentation: worst organ-at-risk change with {real} real cases", "value": worst,
                     "target": ">= -0.01", "met": bool(worst >= -0.01)})
    return "\n".join(lines), rows


def table(results: dict) -> str:
    groups = list(results["real"]["dice"])
    lines = [f"Segmentation decoder ({results['steps']} steps each) on real cases alone and with report-to-CT cases "
             "added; test split, correct report.", "",
             "| training set | cases | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
    for name in ("real", "real + synthetic"):
        row = results[name]
        lines.append(f"| {name} | {row['cases']} | " + " | ".join(f"{row['dice'][g]:.3f}" for g in groups) + " |")
    lines.append("| difference | | " + " | ".join(
        f"{results['real + synthetic']['dice'][g] - results['real']['dice'][g]:+.3f}" for g in groups) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run folder (report_to_ct, contour and the frozen stages)")
    parser.add_argument("--data", required=True, help="dataset folder with datalist.json")
    parser.add_argument("--config", default="demo", help="the run's configuration (name or YAML path)")
    parser.add_argument("--real", type=int, nargs="+", default=[10, 20], help="real training cases (one or more counts)")
    parser.add_argument("--synthetic-per-real", type=float, default=2.0, help="synthetic cases added per real case")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training and generation seeds")
    parser.add_argument("--steps", type=int, default=None, help="segmentation steps per training (default: the config's)")
    parser.add_argument("--synthesis", choices=SYNTHESIS, default="text",
                        help="text: whole cases from reports; lesions: new GTVp/GTVn in the real cases' anatomy")
    parser.add_argument("--out", default="results/augmentation", help="folder for synthetic cases, decoders and the table")
    parser.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files")
    args = parser.parse_args(argv)
    if min(args.real) < 1 or args.synthetic_per_real <= 0 or not args.seeds:
        parser.error("--real must be >= 1, --synthetic-per-real > 0, and at least one seed given")
    claim_output(args, "eval augmentation")
    from medvlm.data.io import atomic_write_text

    runs: dict[int, list[dict]] = {}
    texts = []
    for real in args.real:
        for seed in args.seeds:
            folder = Path(args.out) / f"real_{real}" / f"seed_{seed}"
            results = evaluate(args.run, args.data, folder, config=args.config, real=real,
                               synthetic=max(1, round(real * args.synthetic_per_real)), steps=args.steps, progress=True,
                               seed=seed, synthesis=args.synthesis)
            runs.setdefault(real, []).append(results)
            texts += [f"### {real} real cases, seed {seed}", "", table(results), ""]
    overview, rows = summary(runs)
    text = "\n".join([overview, "", *texts])
    atomic_write_text(Path(args.out) / "augmentation.md", text + "\n")
    atomic_write_text(Path(args.out) / "augmentation.json", json.dumps({"runs": runs, "targets": rows}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
