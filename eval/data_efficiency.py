"""Data efficiency: the segmentation decoder trained on a fraction of the training set, scored on the test split.

``medvlm eval data-efficiency --run RUN --data DATA [--config demo] [--fractions 0.1 0.25 0.5 0.9 1.0]
[--steps N] [--out DIR]``

For each fraction the segmentation stage is trained again from scratch (same configuration, steps and
seed; the frozen contrastive, VAE and diffusion stages of ``RUN`` are shared, linked, not copied) on the
first part of a seeded shuffle of the training cases (``train_fraction``), and the run's ContourPipeline
with that decoder swapped in contours the test split with the correct reports. Dice per structure group is
reported absolute and relative to the largest fraction (the reference study reports 83 % of its performance at 90 %
of the data). Each fraction trains for minutes on a CPU: a demo-size sweep of five takes about half an hour.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from medvlm.cli import claim_output


FRACTIONS = (0.1, 0.25, 0.5, 0.9, 1.0)
UPSTREAM = ("contrastive", "vae", "diffusion")


def check_run(run: Path) -> None:
    for stage in UPSTREAM:
        if not (run / stage / "final").is_dir():
            raise FileNotFoundError(f"{run / stage / 'final'} not found: this sweep needs a trained run (medvlm train all)")


def train_decoder(run: Path, data: str | Path, folder: Path, settings, *, train_fraction: float = 1.0,
                  progress_line: str | None = None) -> Path:
    """Train the segmentation stage into ``folder`` (the run's frozen stages linked in) unless it finished
    there already; return the decoder folder."""
    from train.stage_segmentation import SegmentationTrainer

    decoder_dir = folder / "segmentation" / "final" / "segmentation"
    if decoder_dir.is_dir():
        return decoder_dir
    for stage in UPSTREAM:  # the frozen stages, shared with the run
        link = folder / stage / "final"
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((run / stage / "final").resolve(), target_is_directory=True)
    if progress_line:
        print(progress_line, flush=True)
    SegmentationTrainer(settings, data, folder, train_fraction=train_fraction).run()
    return decoder_dir


def score_decoder(base, decoder_dir: Path, data: str | Path, out: Path, *, per_structure: bool = False):
    """Test-split Dice per group (correct report) of ``base`` (a ContourPipeline) with this decoder swapped in;
    ``per_structure``: (groups, Dice per structure)."""
    from eval.segmentation import evaluate, group_means
    from medvlm.models import FusedSegmentationDecoder
    from pipelines import ContourPipeline

    pipe = ContourPipeline(**{**base.components, "segmentation": FusedSegmentationDecoder.from_pretrained(decoder_dir)},
                           **{k: getattr(base.config, k) for k in ContourPipeline._config_names})
    dice = evaluate(pipe, data, out, modes=("correct",))["dice"]["report: correct"]
    return (group_means(dice), dict(dice)) if per_structure else group_means(dice)


def load_settings(config: str | Path, steps: int | None):
    from medvlm.config import load_config

    settings = load_config(str(config))
    if steps is not None:
        settings.training.segmentation.steps = int(steps)
    return settings


def sweep(run: str | Path, data: str | Path, out: str | Path, *, config: str | Path = "demo",
          fractions: Sequence[float] = FRACTIONS, steps: int | None = None, progress: bool = False) -> dict:
    """``{"fractions": {f: {"cases": n, "dice": {group: mean}}}, "relative": {f: {group: ratio}}}``; the
    decoders and tables go under ``out`` (one folder per fraction; a finished fraction is reused)."""
    from medvlm.data.datalist import load_datalist
    from pipelines import ContourPipeline
    from train.data import fraction_of

    run, out = Path(run), Path(out)
    fractions = sorted({float(f) for f in fractions})
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1], got {list(fractions)}")
    check_run(run)
    settings = load_settings(config, steps)
    base = ContourPipeline.from_pretrained(run / "contour")
    training = load_datalist(data, read_reports=False)["training"]
    results: dict = {"fractions": {}, "steps": settings.training.segmentation.steps}
    for fraction in fractions:
        folder = out / f"fraction_{fraction:g}"
        decoder_dir = train_decoder(run, data, folder, settings, train_fraction=fraction, progress_line=(
            f"[data efficiency] training the decoder on {100 * fraction:g} % of the training cases" if progress else None))
        cases = len(fraction_of(training, fraction, settings.training.seed))  # what the stage trained on
        results["fractions"][fraction] = {"cases": cases, "dice": score_decoder(base, decoder_dir, data, folder / "evaluation")}
    top = results["fractions"][max(fractions)]["dice"]
    results["relative"] = {f: {g: (v / top[g] if top[g] > 0 else float("nan")) for g, v in r["dice"].items()}
                           for f, r in results["fractions"].items()}
    return results


def table(results: dict) -> str:
    groups = list(next(iter(results["fractions"].values()))["dice"])
    top = max(results["fractions"])
    lines = [f"Segmentation decoder trained on a fraction of the training cases ({results['steps']} steps each), "
             f"test split, correct report. Relative: Dice / Dice at {100 * top:g} %.", "",
             "| training data | cases | " + " | ".join(groups) + " | " + " | ".join(f"{g} relative" for g in groups) + " |",
             "|---|---|" + "---|" * (2 * len(groups))]
    for fraction, row in sorted(results["fractions"].items()):
        lines.append(f"| {100 * fraction:g} % | {row['cases']} | " + " | ".join(f"{row['dice'][g]:.3f}" for g in groups)
                     + " | " + " | ".join(f"{100 * results['relative'][fraction][g]:.0f} %" for g in groups) + " |")
    return "\n".join(lines)


def plot(results: dict, path: str | Path) -> Path:
    """The data-efficiency curve: Dice per group against the share of training cases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medvlm.data.preview import save_figure

    fractions = sorted(results["fractions"])
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for group in next(iter(results["fractions"].values()))["dice"]:
        axis.plot([100 * f for f in fractions], [results["fractions"][f]["dice"][group] for f in fractions], marker="o",
                  label=group)
    axis.set_xlabel("training cases used (%)")
    axis.set_ylabel("test Dice")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path, dpi=90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run folder (contrastive, vae, diffusion, contour)")
    parser.add_argument("--data", required=True, help="dataset folder with datalist.json")
    parser.add_argument("--config", default="demo", help="the run's configuration (name or YAML path)")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--steps", type=int, default=None, help="segmentation steps per fraction (default: the config's)")
    parser.add_argument("--out", default="results/data_efficiency", help="folder for decoders, tables and the curve")
    parser.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files")
    args = parser.parse_args(argv)
    claim_output(args, "eval data-efficiency")
    results = sweep(args.run, args.data, args.out, config=args.config, fractions=args.fractions, steps=args.steps,
                    progress=True)
    from medvlm.data.io import atomic_write_text

    out = Path(args.out)
    text = table(results)
    atomic_write_text(out / "data_efficiency.md", text + "\n")
    atomic_write_text(out / "data_efficiency.json", json.dumps(results, indent=1) + "\n")
    plot(results, out / "data_efficiency.png")
    print(text)
    print(f"written: {out / 'data_efficiency.md'}, {out / 'data_efficiency.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
