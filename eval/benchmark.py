"""``medvlm eval benchmark``: speed and memory figures, each measured in this one run on this machine.

1. Contouring latency and peak RSS, medvlm vs the image-only baseline, 64^3 and 64 x 352 x 352
   (``eval.bench_contour_memory``, one process per network and size).
2. Report-to-CT seconds per volume (CT and paired masks) against the sampling schedule: for a diffusion
   model DDPM with its 1000 training steps vs DDIM with 50 / 25 / 10 steps, for rectified flow the
   flow-matching Euler sampler with 50 / 25 / 10 steps (diffusers schedulers on the same pipeline;
   ``--skip-ddpm`` leaves the slow one out). With ``--run``, the laterality fidelity of the run's trained
   pipeline at each of these schedules too (``--fidelity-n`` volumes per side, judged as in ``medvlm eval
   generation``).
3. Training throughput per stage (samples/s) from a run's ``training_summary.json`` when ``--run`` is given.

Untrained demo-sized networks are used for 1 and 2 (with a latent prior fitted to random latents where the preset
samples through one): time and memory do not depend on the weights.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _trained_like_unet(config, compression: int):
    """The preset's UNet as training exports it: with its latent template and, where the preset samples through
    one, a latent prior fitted to random latents (sampling time does not depend on the values)."""
    import torch
    from transformers import AutoConfig

    from medvlm.models.factory import build_unet
    from medvlm.text.encoders import resolve_text_encoder_path

    context_dim = int(AutoConfig.from_pretrained(resolve_text_encoder_path(config.text.encoder), local_files_only=True).hidden_size)
    grid = [int(s) // compression for s in config.data.preprocess.roi_size]
    unet = build_unet(config.models, context_dim, template_size=grid)
    if unet.config.prior_rank:
        cases = int(unet.config.prior_rank) + 1
        unet.set_prior(torch.randn(cases, *unet.prior_mean.shape, generator=torch.Generator().manual_seed(0)))
    return unet


def generation_seconds(config_name: str, steps: list[tuple[str, int]]) -> list[tuple[str, int, float]]:
    import diffusers
    import torch

    from medvlm.config import load_config
    from medvlm.models.factory import build_vae
    from pipelines.assemble import build_pipelines

    torch.set_num_threads(2)
    config = load_config(config_name)
    vae = build_vae(config.models, config.data.preprocess)
    components = {"vae": vae, "unet": _trained_like_unet(config, vae.compression)}
    pipe = build_pipelines(config, components=components, report_texts=["x"] * 3)["report_to_ct"]
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_channels_last()
    prompt = "Left tonsil squamous cell carcinoma, T2 N1 M0. Elective neck: ipsilateral (left)."
    rows = []
    for name, n in steps:
        pipe.scheduler = getattr(diffusers, f"{name}Scheduler").from_config(pipe.scheduler.config)
        start = time.perf_counter()
        pipe(prompt, num_inference_steps=n, generator=torch.Generator().manual_seed(0))
        rows.append((name, n, time.perf_counter() - start))
    return rows


def schedules(config_name: str, skip_ddpm: bool) -> list[tuple[str, int]]:
    """The sampling schedules of the preset's model family (diffusion or rectified flow)."""
    from medvlm.config import load_config

    if load_config(config_name).training.diffusion.prediction_type == "flow_matching":
        return [("FlowMatchEulerDiscrete", n) for n in (50, 25, 10)]
    return ([] if skip_ddpm else [("DDPM", 1000)]) + [("DDIM", 50), ("DDIM", 25), ("DDIM", 10)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="preset whose network sizes are measured")
    parser.add_argument("--run", default=None, help="a training run folder (training_summary.json) for throughput")
    parser.add_argument("--skip-ddpm", action="store_true", help="leave out DDPM with 1000 steps (minutes on CPU)")
    parser.add_argument("--skip-contour", action="store_true")
    parser.add_argument("--fidelity-n", type=int, default=2, help="volumes per side for the fidelity per schedule (with --run)")
    args = parser.parse_args(argv)
    import torch

    print(f"machine: {torch.get_num_threads()} torch threads available, device cpu"
          + (f", cuda {torch.cuda.get_device_name(0)} (not used)" if torch.cuda.is_available() else ""))
    if not args.skip_contour:
        subprocess.run([sys.executable, "-m", "eval.bench_contour_memory", "--config", args.config], check=True)
    rows = generation_seconds(args.config, schedules(args.config, args.skip_ddpm))
    reference = next((s for name, n, s in rows if n == 50), rows[0][2])
    print(f"\nReport-to-CT ({args.config} networks, untrained), one volume with its paired masks, classifier-free guidance")
    print("| scheduler | steps | seconds per volume | relative to 50 steps |")
    print("|---|---|---|---|")
    for name, n, seconds in rows:
        print(f"| {name} | {n} | {seconds:.1f} | {seconds / reference:.2f} x |")
    if args.run and not (Path(args.run) / "report_to_ct").is_dir():
        print(f"\n{args.run} has no report_to_ct pipeline: laterality fidelity per schedule not measured")
    elif args.run:
        from eval.generation_eval import JUDGES, laterality_fidelity

        print(f"\nLaterality fidelity of {args.run}/report_to_ct per schedule ({2 * args.fidelity_n} volumes each)")
        print(f"| scheduler | steps | {JUDGES[0]} | {JUDGES[1]} |")
        print("|---|---|---|---|")
        for name, n, _ in rows:
            result = laterality_fidelity(args.run, n_per_side=args.fidelity_n, steps=n, scheduler=f"{name}Scheduler")
            print(f"| {name} | {n} | {result[JUDGES[0]]:.2f} | {result[JUDGES[1]]:.2f} |")
    if args.run:
        summary = json.loads((Path(args.run) / "training_summary.json").read_text())
        print(f"\nTraining throughput ({args.run})")
        print("| stage | steps | samples/s | seconds |")
        print("|---|---|---|---|")
        for name, stage in summary["stages"].items():
            print(f"| {name} | {stage['steps']} | {stage['samples_per_second']:.2f} | {stage['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
