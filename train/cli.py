"""``medvlm train <stage>|all`` (also ``python -m train`` and ``accelerate launch -m train``).

Stages run in order contrastive -> vae -> diffusion -> segmentation -> baseline (image-only MONAI UNet
under the segmentation settings, for the evaluation) -> report_generator; ``all`` then
writes ready-to-load pipeline folders (contour, report_to_ct, zero_shot, report_generation) and
``training_summary.json``. An output folder remembers the data it was trained on and is never reused
for other data unless ``--overwrite`` is given. Each finished stage records a fingerprint of the settings
it depends on (``train.common.STAGE_INPUTS``); a stage whose settings changed since is retrained only with
``--retrain-changed`` (with what is built on it), the others are reused.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from medvlm.config import config_hash, load_config, resolve_config_path
from medvlm.data.io import atomic_write_text
from medvlm.cli import configure_logging, run_command
from medvlm.errors import MedVLMError

STAGES = ("contrastive", "vae", "diffusion", "segmentation", "baseline", "report_generator")
PIPELINES = ("contour", "report_to_ct", "zero_shot", "report_generation")
logger = logging.getLogger("train")


def _trainer_class(stage: str):
    from train.stage_baseline import BaselineTrainer
    from train.stage_contrastive import ContrastiveTrainer
    from train.stage_diffusion import DiffusionTrainer
    from train.stage_report_generator import ReportGeneratorTrainer
    from train.stage_segmentation import SegmentationTrainer
    from train.stage_vae import VAETrainer

    return {"contrastive": ContrastiveTrainer, "vae": VAETrainer, "diffusion": DiffusionTrainer,
            "segmentation": SegmentationTrainer, "baseline": BaselineTrainer, "report_generator": ReportGeneratorTrainer}[stage]


def _check_output(output: Path, identity: dict, *, overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, replace) an output folder that holds another run. The folder is marked
    as this run's (``run.json``) only once the plan is accepted, so a refused run changes no file."""
    marker = output / "run.json"
    if output.exists() and any(output.iterdir()):
        existing = json.loads(marker.read_text()) if marker.is_file() else None
        same = existing is not None and all(existing.get(k) == v for k, v in identity.items() if k != "config")
        if not same:
            if not overwrite:
                what = "a different run" if existing else "files that are not a medvlm training run"
                raise MedVLMError(f"{output} holds {what}; choose another --output, or pass --overwrite to replace it")
            if existing is None:
                raise MedVLMError(f"{output} holds files that are not a medvlm training run; refusing to delete them")
            shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def write_pipelines(config, output: Path) -> list[Path]:
    """Assemble the trained components into the four pipeline folders (each written atomically)."""
    from transformers import AutoModel, AutoTokenizer

    from medvlm.models import CTAutoencoderKL, FusedSegmentationDecoder, MedCLIPModel, ReportConditionedUNet3D
    from pipelines.assemble import build_pipelines
    from train.common import atomic_directory_swap
    from medvlm.models.factory import sampling_scheduler
    from train.common import load_upstream

    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    unet_path = output / "segmentation" / "final" / "unet"
    generator = PaliGemmaForConditionalGeneration.from_pretrained(load_upstream(output, "report_generator", "report_generator"),
                                                                   local_files_only=True)
    processor = PaliGemmaProcessor.from_pretrained(load_upstream(output, "report_generator", "report_processor"), local_files_only=True)
    components = {
        "vae": CTAutoencoderKL.from_pretrained(load_upstream(output, "vae", "vae")),
        "unet": ReportConditionedUNet3D.from_pretrained(unet_path if unet_path.is_dir() else load_upstream(output, "diffusion", "unet")),
        "segmentation": FusedSegmentationDecoder.from_pretrained(load_upstream(output, "segmentation", "segmentation")),
        "contrastive": MedCLIPModel.from_pretrained(load_upstream(output, "contrastive", "contrastive")),
        "report_generator": generator, "report_processor": processor,
    }
    text_encoder = AutoModel.from_pretrained(load_upstream(output, "contrastive", "text_encoder"), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(load_upstream(output, "contrastive", "tokenizer"), local_files_only=True)
    stage = config.training.diffusion
    scheduler = sampling_scheduler(stage.num_train_timesteps, stage.prediction_type)
    pipes = build_pipelines(config, components=components, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    written = []
    for name in PIPELINES:
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=output))
        pipes[name].save_pretrained(staging)
        atomic_directory_swap(staging, output / name)
        written.append(output / name)
    return written


def _changes(record: dict, config, stage: str) -> list[str]:
    """What differs between the settings a finished stage was trained with and ``config``'s."""
    from train.common import STAGE_INPUTS, stage_fingerprint, stage_settings

    before, now = record.get("settings") or {}, stage_settings(config, stage)
    changed = [key for key in now if before.get(key) != now[key]]
    recorded_upstream = record.get("upstream", {})
    changed += [f"{u} (upstream)" for u in STAGE_INPUTS[stage][1] if stage_fingerprint(config, u) != recorded_upstream.get(u)]
    return changed or ["its settings"]


def _plan(config, output_dir: Path, summary: dict, todo: tuple[str, ...], *, retrain_changed: bool) -> dict[str, str]:
    """Stage -> "train", "reuse" or "retrain" (settings changed); refuses a silent replacement."""
    from train.common import STAGE_INPUTS, stage_fingerprint

    plan, changed = {}, {}
    for name in todo:
        record = summary["stages"].get(name)
        if record is None or not (output_dir / name / "final").is_dir():
            plan[name] = "train"
        elif record.get("fingerprint") == stage_fingerprint(config, name):
            plan[name] = "reuse"
        else:
            plan[name] = "retrain"
            changed[name] = _changes(record, config, name)
    for name in todo:  # a stage built on one that is (re)trained now is stale too
        upstream = STAGE_INPUTS[name][1]
        if plan[name] == "reuse" and any(plan.get(u) == "retrain" for u in upstream):
            plan[name] = "retrain"
            changed[name] = [f"{u} (upstream)" for u in upstream if plan.get(u) == "retrain"]
    if changed and not retrain_changed:
        lines = "; ".join(f"{name}: {', '.join(what)}" for name, what in changed.items())
        raise MedVLMError(f"{output_dir}: settings changed since these stages were trained ({lines}); pass --retrain-changed "
                          "to retrain them (the other stages are reused), --overwrite to start over, or choose another --output")
    for name in todo:  # a single stage needs its upstream stages trained with the current settings
        for upstream in STAGE_INPUTS[name][1]:
            if upstream in todo:
                continue
            record = summary["stages"].get(upstream)
            if record is not None and record.get("fingerprint") != stage_fingerprint(config, upstream):
                raise MedVLMError(f"{name} is built on {upstream}, whose settings changed since it was trained; "
                                  f"train {upstream} first (train {upstream} --retrain-changed), or train all")
    return plan


def run(stage: str, config_path: str, data: str, output: str, *, resume: bool = False, overwrite: bool = False,
        train_fraction: float = 1.0, retrain_changed: bool = False) -> dict:
    config_path = resolve_config_path(config_path)  # a preset name or a path: the run records the file
    config = load_config(config_path)
    output_dir = Path(output)
    identity = {"config": str(config_path), "data": str(Path(data).resolve()), "train_fraction": train_fraction}
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        _check_output(output_dir, identity, overwrite=overwrite)
    state.wait_for_everyone()
    summary_path = output_dir / "training_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"stages": {}}
    summary["config_hash"] = config_hash(config)
    todo = STAGES if stage == "all" else (stage,)
    if overwrite:  # start over: every stage of this run is trained again
        plan = {name: "retrain" if (output_dir / name).exists() else "train" for name in todo}
    else:
        plan = _plan(config, output_dir, summary, todo, retrain_changed=retrain_changed)
    if state.is_main_process:
        atomic_write_text(output_dir / "run.json", json.dumps(identity, indent=1))
    state.wait_for_everyone()
    from train.data import shared_cases

    with shared_cases():  # the stages read the same cases: preprocessed once
        _run_stages(config, data, output_dir, todo, plan, summary, summary_path, state, resume=resume,
                    overwrite=overwrite, train_fraction=train_fraction)
    if stage == "all" and state.is_main_process:
        for folder in write_pipelines(config, output_dir):
            print(f"pipeline written: {folder}", flush=True)
    state.wait_for_everyone()
    return summary


def _run_stages(config, data: str, output_dir: Path, todo, plan: dict, summary: dict, summary_path: Path, state, *,
                resume: bool, overwrite: bool, train_fraction: float) -> None:
    from train.common import STAGE_INPUTS, stage_fingerprint

    for name in todo:
        final = output_dir / name / "final"
        if plan[name] == "reuse":
            if state.is_main_process:
                print(f"[{name}] already trained in {final}; reused", flush=True)
            continue
        if plan[name] == "retrain":
            if state.is_main_process:
                if not overwrite:
                    print(f"[{name}] settings changed since it was trained; retraining", flush=True)
                shutil.rmtree(output_dir / name)  # its checkpoints belong to the old settings
                summary["stages"].pop(name, None)
                atomic_write_text(summary_path, json.dumps(summary, indent=1))
            state.wait_for_everyone()
        started = time.perf_counter()
        trainer = _trainer_class(name)(config, data, output_dir, resume=resume, train_fraction=train_fraction)
        result = trainer.run()
        if state.is_main_process:
            record = {**result.__dict__, "wall_seconds": time.perf_counter() - started,
                      "upstream": {u: stage_fingerprint(config, u) for u in STAGE_INPUTS[name][1]}}
            summary["stages"][name] = record
            atomic_write_text(summary_path, json.dumps(summary, indent=1))
            losses = ", ".join(f"{k}={v:.4f}" for k, v in result.final_losses.items())
            print(f"[{name}] {result.steps} steps in {record['wall_seconds']:.1f} s "
                  f"({result.samples_per_second:.2f} samples/s); final {losses}", flush=True)
            for key, value in result.validation.items():
                print(f"[{name}]   {key} = {value:.3f}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvlm train", description="staged training of medvlm on accelerate")
    parser.add_argument("stage", choices=(*STAGES, "all"))
    parser.add_argument("--config", default="demo", help="a YAML config or a preset name (demo, tiny, hnc_gpu, ...)")
    parser.add_argument("--data", required=True, help="dataset folder with datalist.json")
    parser.add_argument("--output", required=True, help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of each stage")
    parser.add_argument("--overwrite", action="store_true", help="replace a different run's outputs in --output")
    parser.add_argument("--retrain-changed", action="store_true",
                        help="retrain the stages whose settings changed since they were trained (and those built on them)")
    parser.add_argument("--train-fraction", type=float, default=1.0, help="seeded fixed subset of the training split")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the traceback of an error")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return run_command("train", lambda: run(args.stage, args.config, args.data, args.output, resume=args.resume,
                                            overwrite=args.overwrite, train_fraction=args.train_fraction,
                                            retrain_changed=args.retrain_changed) and 0,
                       verbose=args.verbose, interrupted="interrupted; a checkpoint was written, continue with --resume")



def register(commands: argparse._SubParsersAction) -> None:
    """``medvlm train``: this module's parser reads the rest of the command line (``medvlm train --help``)."""
    train = commands.add_parser("train", help="staged training (medvlm train --help)", add_help=False)
    train.set_defaults(func=main, passthrough=True)
