"""Benchmark: time to make training data, the phantoms and the single-view simulation.

Timings belong here, not in the tests (a shared 2-core machine makes any wall-clock limit in a
test flaky). These were once asserted there: each under 2 s for a 32x128x128 volume (about
0.1-0.2 s on an idle 2-core machine). Run from the repository root:

    python bench/data_speed.py                      # 32x128x128, 5 repeats
    python bench/data_speed.py --shape 64 256 256 --repeats 3

Prints a table: stage, shape, best and median seconds over the repeats, voxels per second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusecare.training.phantoms import PHANTOM_VOXEL_SIZE_ZYX, membrane_phantom, nuclei_phantom  # noqa: E402
from fusecare.training.simulate import simulate_single_view  # noqa: E402


def timed(fn: Callable[[int], object], repeats: int) -> list[float]:
    """Seconds of ``fn(seed)`` for seeds 1..repeats, after one warm-up call (imports, caches)."""
    fn(0)
    seconds = []
    for seed in range(1, repeats + 1):
        start = time.perf_counter()
        fn(seed)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 128, 128), metavar=("Z", "Y", "X"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shape = tuple(args.shape)
    nuclei = nuclei_phantom(shape, rng=np.random.default_rng(0))
    stages: dict[str, Callable[[int], object]] = {
        "nuclei_phantom": lambda seed: nuclei_phantom(shape, rng=np.random.default_rng(seed)),
        "membrane_phantom": lambda seed: membrane_phantom(shape, rng=np.random.default_rng(seed)),
        "simulate_single_view": lambda seed: simulate_single_view(nuclei, PHANTOM_VOXEL_SIZE_ZYX, seed=seed),
    }
    voxels = int(np.prod(shape))
    print(f"{'stage':<22} {'shape':<14} {'best s':>8} {'median s':>9} {'Mvoxel/s':>9}")
    for name, fn in stages.items():
        seconds = timed(fn, args.repeats)
        best = min(seconds)
        print(f"{name:<22} {'x'.join(map(str, shape)):<14} {best:>8.3f} {statistics.median(seconds):>9.3f} "
              f"{voxels / best / 1e6:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
