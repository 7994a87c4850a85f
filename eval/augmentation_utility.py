"""Augmentation utility of report-to-CT: is a decoder trained on N real + M synthetic cases better than on N real?

``medvlm eval augmentation --run RUN --data DATA [--config demo] [--real 20] [--synthetic 40] [--steps N]
[--out DIR]``

1. The first ``real`` training cases of DATA form the real set.
2. ``synthetic`` CTs with paired contours come from the run's ReportToCTPipeline, prompted with the real
   set's reports in turn (no report outside the real set is used), written as NIfTI under ``OUT/synthetic``.
3. The segmentation stage is trained twice with the same configuration, steps and seed, on a datalist of the
   real set and on one of the real set plus the synthetic cases (the run's frozen stages shared); each
   decoder, swapped into the run's ContourPipeline, contours the same held-out test split.

The synthetic cases' contours are the decoder's own predictions on the generated CT, so this measures
what the generator adds as it is, contour quality included. Minutes of generation plus two trainings.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def synthesise(run: Path, items: list[dict], count: int, out: Path, *, steps: int = 25, guidance_scale: float = 3.0,
               seed: int = 0) -> list[dict]:
    """``count`` generated cases prompted by ``items``' reports in turn; datalist items (absolute paths)."""
    from medvlm.data.io import save_labels, save_nifti
    from pipelines import ReportToCTPipeline

    pipe = ReportToCTPipeline.from_pretrained(run / "report_to_ct")
    pipe.set_progress_bar_config(disable=True)
    if pipe.segmentation is None:
        raise ValueError(f"{run / 'report_to_ct'} has no segmentation decoder: synthetic cases need paired contours")
    written = []
    for number in range(count):
        source = items[number % len(items)]
        case_dir = out / f"synthetic_{number:03d}"
        ct_path, label_path = case_dir / "ct.nii.gz", case_dir / "labels.nii.gz"
        if not (ct_path.is_file() and label_path.is_file()):  # a finished case is reused
            result = pipe(source["report"], num_inference_steps=steps, guidance_scale=guidance_scale,
                          generator=torch.Generator().manual_seed(seed + number))
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
             synthetic: int = 40, steps: int | None = None, progress: bool = False) -> dict:
    """``{"real": {...}, "real + synthetic": {...}}`` test Dice per group, with the case counts."""
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
    if progress:
        print(f"[augmentation] generating {synthetic} synthetic cases from {len(real_items)} real reports", flush=True)
    generated = synthesise(run, real_items, synthetic, out / "synthetic")
    base = ContourPipeline.from_pretrained(run / "contour")
    results: dict = {"steps": settings.training.segmentation.steps}
    for name, training in (("real", real_items), ("real + synthetic", real_items + generated)):
        folder = out / name.replace(" + ", "_plus_")
        data_dir = _write_datalist(folder / "data", training, datalist)
        decoder_dir = train_decoder(run, data_dir, folder, settings, progress_line=(
            f"[augmentation] training the decoder on {name} ({len(training)} cases)" if progress else None))
        results[name] = {"cases": len(training), "dice": score_decoder(base, decoder_dir, data, folder / "evaluation")}
    return results


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
    parser.add_argument("--real", type=int, default=20, help="real training cases")
    parser.add_argument("--synthetic", type=int, default=40, help="synthetic cases added")
    parser.add_argument("--steps", type=int, default=None, help="segmentation steps per training (default: the config's)")
    parser.add_argument("--out", default="results/augmentation", help="folder for synthetic cases, decoders and the table")
    args = parser.parse_args(argv)
    results = evaluate(args.run, args.data, args.out, config=args.config, real=args.real, synthetic=args.synthetic,
                       steps=args.steps, progress=True)
    from medvlm.data.io import atomic_write_text

    text = table(results)
    atomic_write_text(Path(args.out) / "augmentation.md", text + "\n")
    atomic_write_text(Path(args.out) / "augmentation.json", json.dumps(results, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
