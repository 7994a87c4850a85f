"""``medvlm contour``, ``generate``, ``augment``, ``classify`` and ``draft``: the pipelines' commands, registered with the
``medvlm`` dispatcher (entry point ``medvlm.commands``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medvlm.cli import claim_output, text_or_file
from medvlm.config import valid_prior_strength
from medvlm.errors import InputError, MedVLMError
from pipelines.augment import SYNTHESES


def cmd_contour(args: argparse.Namespace) -> int:
    from pipelines import ContourPipeline

    ct = args.ct
    if Path(ct).is_dir():
        from medvlm.data.dicom import read_dicom_series

        ct = read_dicom_series(ct, args.series_uid)
    elif args.format != "nifti":
        raise MedVLMError(f"--format {args.format} references the input DICOM series; --ct {args.ct} is not a DICOM folder")
    report = text_or_file(args.report)
    pipe = ContourPipeline.from_pretrained(args.pipeline)
    claim_output(args, "contour")  # once the inputs are read: a run refused for them leaves --out as it was
    out = pipe(ct, report=report, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
               region=tuple(args.region_mm) if args.region_mm else ("head_neck" if not args.whole_volume else None))
    written = out.save(args.out, format=args.format)
    print(f"wrote {len(written)} file(s) ({args.format}) to {args.out} (report: {out.report_sources[0]})")
    for warning in out.warnings[0]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


GENERATE_CHUNK = 4  # volumes per pipeline call in `medvlm generate`


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from medvlm.data.io import save_labels, save_nifti
    from pipelines import ReportToCTPipeline

    if args.n < 1 or args.steps < 1:
        raise InputError(f"--n and --steps must be >= 1, got {args.n} and {args.steps}")
    if args.prior_strength is not None and not valid_prior_strength(args.prior_strength):
        raise InputError(f"--prior-strength must be in (0, 1] (1: no latent prior), got {args.prior_strength:g}")
    out_dir = Path(args.out)
    prompt = text_or_file(args.prompt)
    pipe = ReportToCTPipeline.from_pretrained(args.pipeline)
    _for_cpu(pipe)
    claim_output(args, "generate")  # once the inputs are read: a run refused for them leaves --out as it was
    for first in range(0, args.n, GENERATE_CHUNK):  # bounded memory for any --n; seed i makes volume i
        count = min(GENERATE_CHUNK, args.n - first)
        generators = [torch.Generator().manual_seed(args.seed + first + k) for k in range(count)]
        out = pipe(prompt, num_images_per_prompt=count, generator=generators,
                   num_inference_steps=args.steps, guidance_scale=args.guidance_scale, prior_strength=args.prior_strength)
        for k in range(count):
            i = first + k
            save_nifti(out_dir / f"sample_{i:03d}_ct.nii.gz", out.ct[k], out.affine)
            if out.masks is not None:
                save_labels(out_dir / f"sample_{i:03d}_labels.nii.gz", out.masks[k].astype(np.uint8), out.affine,
                            out.structure_names)
    print(f"wrote {args.n} synthetic CT volume(s) to {args.out} (seeds {args.seed}..{args.seed + args.n - 1})")
    return 0


def _for_cpu(pipe) -> None:
    """Channels-last 3D convolutions and a few volumes at a time: faster on CPU (where the CLI runs), the same
    volumes up to float rounding."""
    pipe.enable_channels_last()
    pipe.enable_batch_slicing()


def cmd_augment(args: argparse.Namespace) -> int:
    from pipelines import ReportToCTPipeline
    from pipelines.augment import augment_dataset

    if args.steps < 1 or not args.per_case > 0 or (args.cases is not None and args.cases < 1):
        raise InputError(f"--steps and --cases must be >= 1 and --per-case > 0, got {args.steps}, {args.cases}, "
                         f"{args.per_case}")
    pipe = ReportToCTPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    _for_cpu(pipe)
    claim_output(args, "augment")  # a rerun of the same command continues: finished cases are reused
    target = augment_dataset(pipe, args.data, args.out, per_case=args.per_case, synthesis=args.synthesis,
                             cases=args.cases, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                             progress=lambda line: print(line, flush=True))
    print(f"wrote {target}: the source cases and the synthetic ones ({args.synthesis}); train the segmentation "
          f"decoder on it: `medvlm train segmentation --data {args.out} --output RUN` (RUN holding the other stages)")
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
    reports = [text_or_file(r) for r in args.report] if args.report else None
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


def register(commands: argparse._SubParsersAction) -> None:
    """Add the pipelines' commands to the ``medvlm`` command."""
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
    generate.add_argument("--prior-strength", type=float, default=None,
                          help="share of the steps in which the anatomy is free of the latent prior "
                               "(default: the pipeline's; 1: no prior)")
    generate.add_argument("--out", required=True)
    generate.add_argument("--overwrite", action="store_true", help="replace the samples of an earlier run in --out")
    generate.set_defaults(func=cmd_generate)
    augment = commands.add_parser("augment", help="a training set with report-to-CT cases added (CT + contours)")
    augment.add_argument("--pipeline", required=True, help="a ReportToCTPipeline folder (RUN/report_to_ct)")
    augment.add_argument("--data", required=True, help="dataset folder or datalist.json (labelled training cases)")
    augment.add_argument("--out", required=True, help="folder for the synthetic cases and the new datalist.json")
    augment.add_argument("--synthesis", choices=SYNTHESES, default=SYNTHESES[0],
                         help="rendered: new GTVp/GTVn masks for each real case's report, drawn into its CT as "
                              "soft-tissue masses of its own tumour's appearance; lesions: the same masks, the "
                              "image decoded by the generator; primary, rendered-primary: a new GTVp only; "
                              "text: whole cases")
    augment.add_argument("--per-case", type=float, default=2.0, help="synthetic cases per training case")
    augment.add_argument("--cases", type=int, default=None, help="prompt with the first N training cases only")
    augment.add_argument("--seed", type=int, default=0,
                         help="synthetic case n is generated with seed + n (a rendered retry: + N cases per try)")
    augment.add_argument("--steps", type=int, default=25, help="sampling steps")
    augment.add_argument("--guidance-scale", type=float, default=3.0)
    augment.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files")
    augment.set_defaults(func=cmd_augment)
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
