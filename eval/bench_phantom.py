"""Benchmark: phantom generation speed (cases/s on one core) at a given grid, with and without writing.

Run: ``python -m eval.bench_phantom [--n 40] [--shape D H W] [--spacing-mm Z Y X]``. The phantom's
target is at least 2 cases/s at 64^3 on one core.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64], metavar=("D", "H", "W"))
    parser.add_argument("--spacing-mm", type=float, nargs=3, default=[3.0, 3.0, 3.0], metavar=("Z", "Y", "X"))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from medvlm.config import PhantomDataConfig
    from medvlm.data.phantom import HNCPhantom, PhantomConfig
    from medvlm.data.writer import write_phantom_dataset

    shape, spacing = tuple(reversed(args.shape)), tuple(reversed(args.spacing_mm))
    phantom = HNCPhantom(PhantomConfig(shape=shape, spacing_mm=spacing), seed=0)
    start = time.perf_counter()
    for i in range(args.n):
        phantom.case(i)
    generate = args.n / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as folder:
        stats = write_phantom_dataset(f"{folder}/ds", PhantomDataConfig(n_cases=args.n, shape=shape, spacing_mm=spacing, previews=0))
    d, h, w = args.shape
    print(f"phantom {d}x{h}x{w} voxels, {args.n} cases, one process, one thread")
    print(f"  generation only             {generate:6.1f} cases/s   (target >= 2)")
    print(f"  generation + NIfTI/CSV/text {stats.cases_per_second_total:6.1f} cases/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
