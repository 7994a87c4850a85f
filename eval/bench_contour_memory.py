"""Benchmark: contouring latency and peak RSS per volume size, medvlm's ContourPipeline against the
image-only baseline (MONAI UNet) with the same preprocessing, ROI and sliding window.

Each (network, size) runs in its own process (peak RSS is per process). The networks are untrained:
memory and time do not depend on the weights. Run: ``python -m eval.bench_contour_memory``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = {"64x64x64 @ 3 mm": ((64, 64, 64), (3.0, 3.0, 3.0)), "64x352x352 @ 3x1x1 mm": ((352, 352, 64), (1.0, 1.0, 3.0)),
         "200x512x512 @ 2.5x0.98x0.98 mm": ((512, 512, 200), (0.98, 0.98, 2.5)),
         "300x512x512 @ 2x0.98x0.98 mm": ((512, 512, 300), (0.98, 0.98, 2.0))}


def _child(shape, spacing, config_name: str, network: str = "ours") -> dict:
    import resource
    import time

    import torch

    torch.set_num_threads(2)
    from medvlm.config import load_config
    from medvlm.data.phantom import HNCPhantom, PhantomConfig
    from pipelines.assemble import build_pipelines

    config = load_config(config_name)
    case = HNCPhantom(PhantomConfig(shape=shape, spacing_mm=spacing), seed=0).case(0)
    if network == "ours":
        pipe = build_pipelines(config, report_texts=["x"] * 3)["contour"]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        out = pipe(case.image_hu, report=case.report.text, affine=case.affine, sw_batch_size=1)
        shape_out = list(out.masks[0]["GTVp"].shape)
    else:
        from eval.segmentation import baseline_masks
        from medvlm.data.inputs import prepare_ct
        from medvlm.vocabulary import STRUCTURE_NAMES
        from medvlm.models.factory import build_baseline

        model = build_baseline(config.models, config.data.preprocess).eval()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        prepared = prepare_ct(case.image_hu, config.data.preprocess, affine=case.affine)
        masks = baseline_masks(model, prepared, [0.5] * len(STRUCTURE_NAMES), STRUCTURE_NAMES, config.data.preprocess.roi_size)
        shape_out = list(masks["GTVp"].shape)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mib": peak, "rss_before_mib": before, "mask_shape": shape_out}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--only", default=None, help="run the sizes whose label contains this text (e.g. 512)")
    parser.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        shape, spacing = tuple(int(v) for v in args.child[:3]), tuple(float(v) for v in args.child[3:6])
        print(json.dumps(_child(shape, spacing, args.child[6], args.child[7])))
        return 0
    print(f"Contouring ({args.config} networks, untrained), 2 threads, one process per network and size")
    print("| volume (D x H x W) | medvlm latency | medvlm peak RSS | baseline latency | baseline peak RSS | latency ratio |")
    print("|---|---|---|---|---|---|")
    for label, (shape, spacing) in CASES.items():
        if args.only and args.only not in label:
            continue
        stats = {}
        for network in ("ours", "baseline"):
            command = [sys.executable, "-m", "eval.bench_contour_memory", "--child", *map(str, shape), *map(str, spacing),
                       args.config, network]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            stats[network] = json.loads(result.stdout.strip().splitlines()[-1])
        ours, base = stats["ours"], stats["baseline"]
        print(f"| {label} | {ours['seconds']:.1f} s | {ours['peak_rss_mib']:.0f} MiB | {base['seconds']:.1f} s | "
              f"{base['peak_rss_mib']:.0f} MiB | {ours['seconds'] / base['seconds']:.1f} x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
