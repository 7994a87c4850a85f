"""``medvlm eval TASK`` (evaluations and benchmarks) and ``medvlm demo`` (the main job), registered with the
``medvlm`` dispatcher (entry point ``medvlm.commands``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from medvlm.cli import progress_bar
from medvlm.config import resolve_config_path
from medvlm.errors import MedVLMError

# ``medvlm eval TASK ...``: the module of eval/ whose ``main(argv)`` takes the remaining options
EVAL_TASKS = {"segmentation": "segmentation", "zero-shot": "zero_shot_eval", "generation": "generation_eval",
              "drafting": "drafting_eval", "deid": "deid_eval", "extraction": "extraction_eval", "benchmark": "benchmark",
              "robustness": "robustness", "data-efficiency": "data_efficiency",
              "augmentation": "augmentation_utility", "report": "report", "phantom-speed": "bench_phantom",
              "real-ct": "real_ct"}


def cmd_eval(args: argparse.Namespace) -> int:
    import importlib

    if args.task not in EVAL_TASKS:
        raise MedVLMError(f"unknown evaluation task {args.task!r}")
    return importlib.import_module(f"eval.{EVAL_TASKS[args.task]}").main(args.rest)


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
                                  progress=progress_bar(phantom_config.n_cases, "phantom"))
    print(f"[2/3] training all stages -> {output / 'run'}", flush=True)
    from train.cli import run as train_run

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


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``eval`` and ``demo`` to the ``medvlm`` command."""
    evaluate = commands.add_parser("eval", help="evaluation and benchmarks: segmentation, deid, extraction, benchmark, "
                                   "phantom-speed")
    evaluate.add_argument("task", choices=tuple(EVAL_TASKS))
    evaluate.add_argument("rest", nargs=argparse.REMAINDER, help="options of the task (see --help of each)")
    evaluate.set_defaults(func=cmd_eval)

    demo = commands.add_parser("demo", help="the main job: phantom dataset, training of all stages, evaluation, pipeline examples")
    demo.add_argument("--config", default="demo", help="config preset name or YAML path (default demo)")
    demo.add_argument("--quick", action="store_true", help="tiny configuration, seconds to minutes, no quality claims")
    demo.add_argument("--output", default="outputs/demo", help="output folder (default outputs/demo)")
    demo.add_argument("--data", default=None, help="dataset folder (default OUTPUT/data)")
    demo.add_argument("--overwrite", action="store_true", help="start over instead of reusing what is built")
    demo.add_argument("--retrain-changed", action="store_true",
                      help="retrain the stages whose settings in the config changed (the others are reused)")
    demo.set_defaults(func=cmd_demo)
