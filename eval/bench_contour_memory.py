"""Benchmark: contouring latency and peak RSS of the demo-sized ContourPipeline, per volume size.

Each size runs in its own process (peak RSS is per process). The network is untrained: memory and
time do not depend on the weights. Run: ``python -m eval.bench_contour_memory``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = {"64x64x64 @ 3 mm": ((64, 64, 64), (3.0, 3.0, 3.0)), "64x352x352 @ 3x1x1 mm": ((352, 352, 64), (1.0, 1.0, 3.0))}


def _child(shape, spacing, config_name: str) -> dict:
    import resource
    import time

    import torch

    torch.set_num_threads(2)
    from medvlm.config import load_config
    from medvlm.data.phantom import HNCPhantom, PhantomConfig
    from pipelines.assemble import build_pipelines

    config = load_config(f"configs/{config_name}.yaml")
    pipe = build_pipelines(config, report_texts=["x"] * 3)["contour"]
    case = HNCPhantom(PhantomConfig(shape=shape, spacing_mm=spacing), seed=0).case(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    out = pipe(case.image_hu, report=case.report.text, affine=case.affine, sw_batch_size=1)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mib": peak, "rss_before_mib": before,
            "mask_shape": list(out.masks[0]["GTVp"].shape)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        shape, spacing = tuple(int(v) for v in args.child[:3]), tuple(float(v) for v in args.child[3:6])
        print(json.dumps(_child(shape, spacing, args.child[6])))
        return 0
    print(f"ContourPipeline ({args.config} networks, untrained), 2 threads, one process per size")
    print("| volume (D x H x W) | latency | peak RSS | RSS before the call |")
    print("|---|---|---|---|")
    for label, (shape, spacing) in CASES.items():
        command = [sys.executable, "-m", "eval.bench_contour_memory", "--child", *map(str, shape), *map(str, spacing), args.config]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        stats = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"| {label} | {stats['seconds']:.1f} s | {stats['peak_rss_mib']:.0f} MiB | {stats['rss_before_mib']:.0f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
