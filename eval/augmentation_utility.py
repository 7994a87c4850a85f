"""Augmentation utility of report-to-CT: is a decoder trained on N real + M synthetic cases better than on N real?

``medvlm eval augmentation --run RUN --data DATA [--config demo] [--real 10 20] [--seeds 0 1 2] [--steps N]
[--synthesis rendered [lesions primary text]] [--synthetic-share S] [--score-on decision test] [--decision-cases 32]
[--out DIR]``

1. The first ``real`` training cases of DATA form the real set.
2. ``synthetic`` CTs with paired contours come from the run's ReportToCTPipeline, prompted with the real
   set's reports in turn (no report outside the real set is used), written as NIfTI under ``OUT/synthetic_<kind>``.
   ``--synthesis lesions`` regenerates only the tumour and nodes (GTVp, GTVn) of a real case for its
   report, from noise, keeping its CT latent, its other structures and its CT outside the new lesions
   (``keep_structures``): new lesions in real anatomy; ``primary`` regenerates the GTVp alone. ``text``
   generates each case from its report alone. ``rendered`` (default) draws ``lesions``' new masks into the real
   CT as soft-tissue masses of the case's own lesions' appearance, the old lesions removed
   (:func:`pipelines.augment.render_lesions`); ``rendered-primary`` the GTVp alone. For the editing syntheses
   the synthetic lesions' contrast is measured against the real ones' (:func:`lesion_coherence`).
   Several kinds may be named; they share the real-only decoder.
3. The segmentation stage is trained with the same configuration, steps and seed on a datalist of the real set
   and on one of the real set plus each kind of synthetic case (the run's frozen stages shared); each decoder,
   swapped into the run's ContourPipeline, contours the same cases of each scoring split:
   ``decision``: training cases no decoder trained on (``--decision-cases`` of them, after the largest real
   set; none of them is a real case or a prompt), for choosing a synthesis or a setting; ``test``: the held-out
   test split, for reporting. The segmentation stage selects its checkpoints on the validation split, so
   neither validation nor test can decide between syntheses.

The synthetic cases' contours are the pipeline's paired masks (decoded from the same latent as the CT; with a
CT-only autoencoder, the segmentation decoder's contours of the generated CT), so this measures what the
generator adds as it is, contour quality included. Minutes of generation plus two trainings per seed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from medvlm.cli import claim_output
from pipelines.augment import LESIONS, REGENERATED, SYNTHESES as SYNTHESIS

__all__ = ["LESIONS", "SYNTHESIS", "SCORE_ON", "synthesise", "lesion_coherence", "decision_cases", "evaluate", "summary",
           "table", "coherence_table", "main"]

SCORE_ON = ("decision", "test")


def synthesise(run: Path, items: list[dict], count: int, out: Path, *, steps: int = 25, guidance_scale: float = 3.0,
               seed: int = 0, synthesis: str = SYNTHESIS[0]) -> list[dict]:
    """``count`` generated cases prompted by ``items``' reports in turn (``medvlm augment``'s path:
    :func:`pipelines.augment.synthesise` with the run's ReportToCTPipeline); datalist items (absolute paths)."""
    from pipelines import ReportToCTPipeline
    from pipelines.augment import synthesise as synthesise_cases

    pipe = ReportToCTPipeline.from_pretrained(run / "report_to_ct")  # synthesise_cases checks ``synthesis``
    pipe.set_progress_bar_config(disable=True)
    return synthesise_cases(pipe, items, count, out, synthesis=synthesis, steps=steps, guidance_scale=guidance_scale,
                            seed=seed)


def lesion_coherence(synthetic: Sequence[dict], sources: Sequence[dict]) -> dict:
    """Whether a synthesis' images show its lesions where its contours put them: per lesion structure (GTVp, GTVn),
    medians over the synthetic cases of the lesion's contrast against its soft-tissue surroundings
    (:func:`eval.generation_eval.lesion_contrast_hu`) in the source CTs (``"real"``) and in the synthetic ones
    (``"synthetic"``), and of the source lesion's voxels left without a contour in the synthetic CT
    (``"uncontoured"``: a replaced tumour still visible is near the real contrast, a removed one near 0); the
    share of synthetic lesions whose contrast is 0.5 to 2 times their source lesion's (``"like_real"``); for the
    nodes the mean share of their voxels inside the source's elective nodal target (``"in_elective_neck"``: the
    real CTVn, which holds every real node; None for GTVp or without a CTVn); ``"n"``: the synthetic cases with
    the lesion; the medians of the synthetic lesion's volume over the source's (``"volume_ratio"``), of the
    distance between their centres in millimetres (``"offset_mm"``) and of their connected components
    (``"pieces"``, ``"real_pieces"``). Synthetic items name their source (``synthetic.source``, an id of
    ``sources``); the lesions a rendered case keeps from its source (``synthetic.real_lesions``) are left out."""
    from scipy.ndimage import binary_dilation, label

    from eval.generation_eval import lesion_contrast_hu
    from medvlm.data.io import load_labels, load_nifti, spacing_from_affine
    from pipelines.augment import nodes_inside

    by_id = {item.get("id", Path(item["image"]).name): item for item in sources}
    values: dict = {name: {"real": [], "synthetic": [], "uncontoured": [], "like_real": [], "in_elective_neck": [],
                           "volume_ratio": [], "offset_mm": [], "pieces": [], "real_pieces": []} for name in LESIONS}
    for item in synthetic:
        source = by_id[item["synthetic"]["source"]]
        (ct, affine), real_ct = load_nifti(item["image"]), load_nifti(source["image"])[0]
        masks, _, names = load_labels(item["label"])
        real, _, real_names = load_labels(source["label"])
        if ct.shape != real_ct.shape:  # a source off the model grid: its lesions are not on this one
            continue
        for name in LESIONS:
            if name in item["synthetic"].get("real_lesions", ()):  # the real case's own lesion, kept: nothing drawn
                continue
            new, old = masks[names.index(name)] > 0.5, real[real_names.index(name)] > 0.5
            left = old & ~binary_dilation(new, iterations=1)
            measured = {}
            for key, volume, lesion in (("real", real_ct, old), ("synthetic", ct, new), ("uncontoured", ct, left)):
                measured[key] = lesion_contrast_hu(volume, lesion) if lesion.sum() >= 5 else None
                if measured[key] is not None:
                    values[name][key].append(measured[key])
            if new.any() and old.any():
                spacing = np.asarray(spacing_from_affine(affine))
                values[name]["volume_ratio"].append(float(new.sum() / old.sum()))
                values[name]["offset_mm"].append(float(np.linalg.norm(
                    (np.argwhere(new).mean(0) - np.argwhere(old).mean(0)) * spacing)))
                values[name]["pieces"].append(label(new)[1])
                values[name]["real_pieces"].append(label(old)[1])
            if measured["real"] is not None and measured["synthetic"] is not None and measured["real"] > 0:
                values[name]["like_real"].append(0.5 <= measured["synthetic"] / measured["real"] <= 2.0)
            if name == "GTVn" and "CTVn" in real_names and new.any():
                values[name]["in_elective_neck"].append(
                    nodes_inside(np.stack([new, real[real_names.index("CTVn")] > 0.5]), ["GTVn", "CTVn"]))
    shares = ("like_real", "in_elective_neck")
    return {name: {**{key: float(np.median(v)) if v else None for key, v in found.items() if key not in shares},
                   **{key: float(np.mean(found[key])) if found[key] else None for key in shares},
                   "n": len(found["synthetic"])} for name, found in values.items()}


def _write_datalist(folder: Path, training: list[dict], datalist: dict, test: list[dict] | None = None) -> Path:
    """A datalist of ``training`` with DATA's validation split and ``test`` (default: DATA's test split)."""
    from medvlm.data.io import atomic_write_text

    def plain(item: dict) -> dict:  # absolute paths, text and provenance only: the records stay with the source dataset
        out = {k: item[k] for k in ("report", "id", "synthetic") if k in item}
        return out | {k: str(Path(item[k]).resolve()) for k in ("image", "label") if k in item}

    content = {"training": [plain(i) for i in training], "validation": [plain(i) for i in datalist.get("validation", [])],
               "test": [plain(i) for i in (datalist["test"] if test is None else test)]}
    atomic_write_text(folder / "datalist.json", json.dumps(content, indent=1) + "\n")
    return folder


def decision_cases(datalist: dict, after: int, count: int = 32) -> list[dict]:
    """The decision split: up to ``count`` labelled training cases from index ``after`` on (after the largest real
    set, so no decoder trains on them and no prompt comes from them)."""
    items = [item for item in datalist["training"][after:] if "label" in item][:count]
    if not items:
        raise ValueError(f"no labelled training case after the first {after} is left for the decision split: "
                         "use fewer real cases or --score-on test")
    return items


def evaluate(run: str | Path, data: str | Path, out: str | Path, *, config: str | Path = "demo", real: int = 20,
             synthetic: int = 40, steps: int | None = None, progress: bool = False, seed: int = 0,
             synthesis: str | Sequence[str] = SYNTHESIS[0], score_on: Sequence[str] = ("test",),
             decision: list[dict] | None = None, synthetic_share: float | None = None) -> dict:
    """``{"steps": n, "real": {...}, "real + <synthesis>": {...}}``: per decoder its training cases
    (``"cases"``) and per scoring split (``score_on``: ``"test"``, ``"decision"``) the Dice per group
    (``"dice"``) and per structure (``"structures"``). ``decision`` (the decision split's items) defaults to
    :func:`decision_cases` after the real set. ``seed`` sets the decoders' training seed and the generator's;
    ``synthetic_share`` the share of the augmented decoder's draws that are synthetic cases
    (``training.segmentation.synthetic_share``; default: the config's)."""
    from eval.data_efficiency import check_run, load_settings, score_decoder, train_decoder
    from medvlm.data.datalist import load_datalist
    from pipelines import ContourPipeline

    run, out = Path(run), Path(out)
    check_run(run)
    syntheses = [synthesis] if isinstance(synthesis, str) else list(synthesis)
    if not syntheses or any(s not in SYNTHESIS for s in syntheses):
        raise ValueError(f"synthesis must be one or more of {SYNTHESIS}, got {synthesis!r}")
    if not score_on or any(s not in SCORE_ON for s in score_on):
        raise ValueError(f"score_on must be one or more of {SCORE_ON}, got {score_on!r}")
    if real < 1 or synthetic < 1:
        raise ValueError(f"need at least one real and one synthetic case, got real={real}, synthetic={synthetic}")
    datalist = load_datalist(data)
    real_items = datalist["training"][:real]
    if any("label" not in item for item in real_items):
        raise ValueError("the real training cases need labels")
    scoring = {}
    if "decision" in score_on:
        decision = decision_cases(datalist, real) if decision is None else decision
        taken = {str(Path(i["image"]).resolve()) for i in real_items}
        if any(str(Path(i["image"]).resolve()) in taken for i in decision):
            raise ValueError("the decision split holds a real training case: it must be cases no decoder trains on")
        scoring["decision"] = _write_datalist(out / "decision_split", [], datalist, test=decision)
    if "test" in score_on:
        scoring["test"] = Path(data)
    settings = load_settings(config, steps)
    settings.training.seed = int(seed)
    if synthetic_share is not None:
        if not 0.0 <= synthetic_share < 1.0:
            raise ValueError(f"synthetic_share must be in [0, 1), got {synthetic_share}")
        settings.training.segmentation.synthetic_share = float(synthetic_share)
    base = ContourPipeline.from_pretrained(run / "contour")
    results: dict = {"steps": settings.training.segmentation.steps,
                     "synthetic_share": settings.training.segmentation.synthetic_share}
    sets, coherence = [("real", real_items)], {}
    for kind in syntheses:
        if progress:
            print(f"[augmentation] {kind}: generating {synthetic} synthetic cases from {len(real_items)} real reports",
                  flush=True)
        made = synthesise(run, real_items, synthetic, out / f"synthetic_{kind}", seed=100_003 * int(seed), synthesis=kind)
        sets.append((f"real + {kind}", real_items + made))
        if kind in REGENERATED:  # an edited real case: do its images show its new lesions and no longer its old ones?
            coherence[f"real + {kind}"] = lesion_coherence(made, real_items)
    for name, training in sets:
        folder = out / name.replace(" + ", "_plus_")
        data_dir = _write_datalist(folder / "data", training, datalist)
        decoder_dir = train_decoder(run, data_dir, folder, settings, progress_line=(
            f"[augmentation] training the decoder on {name} ({len(training)} cases)" if progress else None))
        results[name] = {"cases": len(training), **({"lesions": coherence[name]} if name in coherence else {})}
        for split, split_data in scoring.items():
            groups, structures = score_decoder(base, decoder_dir, split_data, folder / f"evaluation_{split}",
                                               per_structure=True)
            results[name][split] = {"dice": groups, "structures": structures}
    return results


def summary(runs: dict[int, list[dict]], split: str = "test") -> tuple[str, list[dict]]:
    """Per number of real cases and kind of synthesis, over seeds, on one scoring split: the gain in mean Dice
    over the nine structures (mean and spread) and the largest organ-at-risk loss, with the targets (+0.03 at 10
    cases, +0.01 at 20 or more; no organ at risk lower by more than 0.01)."""
    from medvlm.vocabulary import OAR_NAMES

    lines = [f"Scored on the {split} split.", "",
             "| real cases | synthesis | seeds | mean Dice, real | mean Dice, real + synthetic | gain (mean +- sd) | "
             "worst OAR change |", "|---|---|---|---|---|---|---|"]
    rows = []
    for real, results in sorted(runs.items()):
        def mean_dice(r: dict, name: str) -> float:
            return float(np.mean(list(r[name][split]["structures"].values())))

        base = np.array([mean_dice(r, "real") for r in results])
        for name in [k for k in results[0] if k.startswith("real + ")]:
            kind = name[len("real + "):]
            augmented = np.array([mean_dice(r, name) for r in results])
            gain = augmented - base
            worst = min(float(np.mean([r[name][split]["structures"][n] - r["real"][split]["structures"][n]
                                       for r in results])) for n in OAR_NAMES)
            lines.append(f"| {real} | {kind} | {len(results)} | {base.mean():.3f} | {augmented.mean():.3f} | "
                         f"{gain.mean():+.3f} +- {gain.std():.3f} | {worst:+.3f} |")
            target = 0.03 if real <= 10 else 0.01
            where = f"{split} split, {kind} synthesis"
            rows.append({"measure": f"augmentation: mean Dice gain with {real} real cases ({where}, {len(results)} seeds)",
                         "value": float(gain.mean()), "spread": float(gain.std()), "target": f">= +{target:.2f}",
                         "met": bool(gain.mean() >= target)})
            rows.append({"measure": f"augmentation: worst organ-at-risk change with {real} real cases ({where})",
                         "value": worst, "target": ">= -0.01", "met": bool(worst >= -0.01)})
    return "\n".join(lines), rows


def table(results: dict, split: str = "test") -> str:
    groups = list(results["real"][split]["dice"])
    names = [k for k in results if k.startswith("real")]
    lines = [f"Segmentation decoder ({results['steps']} steps each) on real cases alone and with report-to-CT cases "
             f"added; {split} split, correct report.", "",
             "| training set | cases | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
    for name in names:
        row = results[name]
        lines.append(f"| {name} | {row['cases']} | " + " | ".join(f"{row[split]['dice'][g]:.3f}" for g in groups) + " |")
    for name in names[1:]:
        lines.append(f"| difference ({name[len('real + '):]}) | | " + " | ".join(
            f"{results[name][split]['dice'][g] - results['real'][split]['dice'][g]:+.3f}" for g in groups) + " |")
    return "\n".join(lines)


def coherence_table(results: dict) -> str:
    """The synthetic lesions' contrast (HU against their soft-tissue surroundings, medians) per edit synthesis;
    empty when none was measured (:func:`lesion_coherence`)."""
    measured = [(name[len("real + "):], row["lesions"]) for name, row in results.items()
                if isinstance(row, dict) and "lesions" in row]
    if not measured:
        return ""

    def hu(value):
        return "-" if value is None else f"{value:+.1f}"

    lines = ["Lesion contrast against the soft tissue around (HU, medians over the synthetic cases): the real "
             "case's lesion, the synthetic lesion in the synthetic CT, and the real lesion's place left without "
             "a contour (near 0: removed; near the real contrast: still visible); the share of synthetic lesions "
             "with 0.5 to 2 times their real lesion's contrast; for nodes, the mean share of their voxels inside the "
             "real case's elective nodal target (CTVn), where every real node lies; medians of the synthetic "
             "lesion's volume over the real one's, of the distance between their centres and of their connected "
             "components (real / synthetic), over the cases with both.", "",
             "| synthesis | structure | cases | real | synthetic | left without a contour | like the real | "
             "in the real elective neck | volume / real | centre offset (mm) | pieces (real / synthetic) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def share(value):
        return "-" if value is None else f"{value:.2f}"

    def number(value):
        return "-" if value is None else f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"

    for kind, lesions in measured:
        for structure, row in lesions.items():
            lines.append(f"| {kind} | {structure} | {row['n']} | {hu(row['real'])} | {hu(row['synthetic'])} | "
                         f"{hu(row['uncontoured'])} | {share(row['like_real'])} | {share(row.get('in_elective_neck'))} | "
                         f"{share(row.get('volume_ratio'))} | {number(row.get('offset_mm'))} | "
                         f"{number(row.get('real_pieces'))} / {number(row.get('pieces'))} |")
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
    parser.add_argument("--synthesis", choices=SYNTHESIS, nargs="+", default=[SYNTHESIS[0]],
                        help="rendered: new GTVp/GTVn masks drawn into the real CTs; lesions: the same masks, the "
                             "image decoded; primary, rendered-primary: a new GTVp only; text: whole cases "
                             "(several: each against the same real-only decoder)")
    parser.add_argument("--score-on", choices=SCORE_ON, nargs="+", default=list(SCORE_ON),
                        help="decision: training cases no decoder sees (choose on these); test: the test split (report)")
    parser.add_argument("--synthetic-share", type=float, default=None,
                        help="share of the augmented decoder's training draws that are synthetic, in [0, 1) (default: "
                             "the config's training.segmentation.synthetic_share; unset: every case drawn equally)")
    parser.add_argument("--decision-cases", type=int, default=32, help="size of the decision split")
    parser.add_argument("--out", default="results/augmentation", help="folder for synthetic cases, decoders and the table")
    parser.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files")
    args = parser.parse_args(argv)
    if min(args.real) < 1 or args.synthetic_per_real <= 0 or not args.seeds or args.decision_cases < 1:
        parser.error("--real must be >= 1, --synthetic-per-real > 0, --decision-cases >= 1, and at least one seed given")
    if args.synthetic_share is not None and not 0.0 <= args.synthetic_share < 1.0:
        parser.error(f"--synthetic-share must be in [0, 1), got {args.synthetic_share}")
    claim_output(args, "eval augmentation")
    from medvlm.data.datalist import load_datalist
    from medvlm.data.io import atomic_write_text

    decision = (decision_cases(load_datalist(args.data), max(args.real), args.decision_cases)
                if "decision" in args.score_on else None)  # one decision split for every real count

    runs: dict[int, list[dict]] = {}
    texts: list[str] = []
    for seed in args.seeds:  # every real count for a seed before the next seed
        for real in args.real:
            folder = Path(args.out) / f"real_{real}" / f"seed_{seed}"
            results = evaluate(args.run, args.data, folder, config=args.config, real=real,
                               synthetic=max(1, round(real * args.synthetic_per_real)), steps=args.steps, progress=True,
                               seed=seed, synthesis=args.synthesis, score_on=args.score_on, decision=decision,
                               synthetic_share=args.synthetic_share)
            runs.setdefault(real, []).append(results)
            texts += [f"### {real} real cases, seed {seed}", ""]
            texts += [line for split in args.score_on for line in (table(results, split), "")]
            lesions = coherence_table(results)
            texts += [lesions, ""] if lesions else []
            overviews, rows = [], []
            for split in args.score_on:
                overview, split_rows = summary(runs, split)
                overviews += [overview, ""]
                rows += split_rows
            text = "\n".join([*overviews, *texts])
            # written after every seed: a long sweep that stops keeps what it measured
            atomic_write_text(Path(args.out) / "augmentation.md", text + "\n")
            atomic_write_text(Path(args.out) / "augmentation.json",
                              json.dumps({"runs": runs, "targets": rows}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
