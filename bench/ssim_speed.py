"""Benchmark: time and peak memory of skimage's SSIM against fusecare.scoring.metrics.

Every measurement runs in a fresh subprocess: it builds its input pair, resets the kernel's
peak-RSS mark (/proc/self/clear_refs), runs one SSIM and reports seconds and the peak RSS above
what the process held before the call (the inputs, numpy, torch). Run from the repository root:

    python bench/ssim_speed.py                  # 64x512x512 float32 + 100x1024x1024 uint16
    python bench/ssim_speed.py --shape 32 256 256 --big-shape 50 1024 1024 --big-skimage
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("skimage", "ssim", "fmc_ssim")


def _rss_kib(field: str) -> int | None:
    """A VmRSS / VmHWM line of /proc/self/status in KiB, None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _make_pair(shape: tuple[int, ...], dtype: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A target-like volume and a noisy version of it, built plane by plane (lean on memory)."""
    rng = np.random.default_rng(seed)
    a = np.empty(shape, dtype=dtype)
    b = np.empty(shape, dtype=dtype)
    for z in range(shape[0]):
        base = rng.random(shape[1:], dtype=np.float32)
        noisy = 0.8 * base + 0.2 * rng.random(shape[1:], dtype=np.float32)
        if np.dtype(dtype).kind == "u":
            base, noisy = base * 4000 + 100, noisy * 4000 + 100
        a[z], b[z] = base, noisy
    return a, b


def _worker(method: str, shape: tuple[int, ...], dtype: str) -> dict:
    """Run one method once in this process; return its timing and memory."""
    a, b = _make_pair(shape, dtype)
    data_range = 1.0 if np.dtype(dtype).kind == "f" else 4000.0
    if method == "skimage":
        from skimage.metrics import structural_similarity

        def run() -> float:
            return structural_similarity(a, b, data_range=data_range)
    else:
        from fusecare.scoring import metrics

        def run() -> float:
            if method == "fmc_ssim":
                return metrics.fmc_ssim(a, b)
            return metrics.ssim(a, b, data_range=data_range)
    before = _rss_kib("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    value = run()
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM") if reset else None
    if peak is None:  # no /proc: the process-lifetime peak, inputs included
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        before = 0
    return {
        "seconds": seconds,
        "peak_extra_mib": (peak - before) / 1024,
        "rss_before_mib": before / 1024,
        "value": float(value),
    }


def _measure(method: str, shape: tuple[int, ...], dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--dtype", dtype]
    cmd += ["--shape", *map(str, shape)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"method": method, "shape": "x".join(map(str, shape)), "dtype": dtype, **result}


def _table(rows: list[dict]) -> str:
    head = (
        f"{'method':<10} {'shape':<14} {'dtype':<8} {'seconds':>8} {'Mvox/s':>8} "
        f"{'peak+MiB':>9} {'value':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        voxels = np.prod([int(s) for s in r["shape"].split("x")])
        lines.append(
            f"{r['method']:<10} {r['shape']:<14} {r['dtype']:<8} {r['seconds']:>8.2f} "
            f"{voxels / r['seconds'] / 1e6:>8.1f} {r['peak_extra_mib']:>9.0f} {r['value']:>10.6f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", type=int, nargs=3, default=(64, 512, 512), help="pair for skimage")
    p.add_argument("--dtype", default="float32", help="dtype of the --shape pair")
    p.add_argument(
        "--big-shape", type=int, nargs=3, default=(100, 1024, 1024),
        help="uint16 pair measured for the extrapolation",
    )
    p.add_argument("--big-skimage", action="store_true", help="skimage on the big pair (~10 GB)")
    p.add_argument("--target-voxels", type=float, default=1.1e9, help="extrapolate to this size")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, tuple(args.shape), args.dtype)))
        return

    shape, big = tuple(args.shape), tuple(args.big_shape)
    rows = [_measure(m, shape, args.dtype) for m in ("skimage", "ssim")]
    big_methods = ("skimage", "ssim", "fmc_ssim") if args.big_skimage else ("ssim", "fmc_ssim")
    rows += [_measure(m, big, "uint16") for m in big_methods]
    print(_table(rows))

    sk, ours = rows[0], rows[1]
    speedup = sk["seconds"] / ours["seconds"]
    mem_ratio = ours["peak_extra_mib"] / max(sk["peak_extra_mib"], 1e-9)
    print(
        f"\n{sk['shape']} {args.dtype}: fusecare.scoring.metrics.ssim is {speedup:.1f}x faster than "
        f"skimage, peak extra memory {ours['peak_extra_mib']:.0f} MiB vs "
        f"{sk['peak_extra_mib']:.0f} MiB ({mem_ratio:.3f}x); "
        f"|difference| = {abs(sk['value'] - ours['value']):.2e}"
    )
    for r in rows[2:]:
        if r["method"] == "skimage":
            continue
        rate = np.prod(big) / r["seconds"]
        print(
            f"{r['method']} on {r['shape']} uint16: {rate / 1e6:.1f} Mvox/s -> "
            f"{args.target_voxels:.2g} voxels in ~{args.target_voxels / rate:.0f} s (target < 120)"
        )


if __name__ == "__main__":
    main()
