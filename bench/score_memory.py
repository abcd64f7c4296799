"""Benchmark: wall time and peak memory of ``evaluation/score.py --no-seg`` on one large case.

Writes a target, an input and a prediction like the organisers' files (uint16 BigTIFF, 128x128
tiles, shaped JSON metadata), plane by plane so this script itself stays small, then runs
score.py on them in a subprocess and reports its wall time and peak resident memory (the
kernel's high-water mark of the child). Run from the repository root:

    python bench/score_memory.py                         # 300x1920x1920, PNG drawn
    python bench/score_memory.py --shape 64 512 512 --no-png --keep /tmp/case

The three files take 3 x 2 bytes per voxel of disk (6.6 GB at the default shape).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusecare.io import OUTPUT_TILE  # noqa: E402

ROLES = {"gt": 0.0, "input": 0.35, "pred": 0.15}
"""Each volume is the structure plus this much uniform noise (0 = the target)."""


def _planes(shape: tuple[int, int, int], noise: float, seed: int) -> Iterator[np.ndarray]:
    """Smooth-ish structure (a sum of sines, the same for every role) plus role-specific noise."""
    rng = np.random.default_rng(seed)
    _, n_y, n_x = shape
    y = np.sin(np.arange(n_y, dtype=np.float32) / 7.0)[:, None]
    x = np.cos(np.arange(n_x, dtype=np.float32) / 11.0)[None, :]
    for z in range(shape[0]):
        structure = 0.5 + 0.25 * (y + x) * np.float32(np.cos(z / 5.0))
        plane = (1.0 - noise) * structure + noise * rng.random((n_y, n_x), dtype=np.float32)
        yield (plane * 4000 + 100).astype(np.uint16)


def _tiles(planes: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """tifffile takes tiled data as an iterator of whole tiles, row by row, plane by plane."""
    ty, tx = OUTPUT_TILE
    for plane in planes:
        padded = np.pad(plane, ((0, -plane.shape[0] % ty), (0, -plane.shape[1] % tx)))
        for y in range(0, padded.shape[0], ty):
            for x in range(0, padded.shape[1], tx):
                yield padded[y:y + ty, x:x + tx]


def write_case(folder: Path, shape: tuple[int, int, int], name: str = "image_0_nucleus") -> None:
    meta = {"PhysicalSizeZ": 1.01, "PhysicalSizeY": 0.388, "PhysicalSizeX": 0.388, "channel": "nucleus",
            "study": 1}
    for k, (role, noise) in enumerate(ROLES.items()):
        (folder / role).mkdir(parents=True, exist_ok=True)
        suffix = "_fused" if role == "gt" else "_angle"
        tifffile.imwrite(folder / role / f"{name}{suffix}.tif", _tiles(_planes(shape, noise, k)), shape=shape,
                         dtype=np.uint16, bigtiff=True, tile=OUTPUT_TILE, photometric="minisblack",
                         metadata=meta)


def run_score(folder: Path, png: bool, threads: int | None) -> dict[str, float]:
    """score.py in a child process: seconds, peak RSS of the child (GiB) and the N-SSIM."""
    command = [sys.executable, str(REPO / "evaluation" / "score.py"), "--pred", folder / "pred",
               "--gt", folder / "gt", "--input", folder / "input", "--out", folder / "report", "--no-seg",
               "--quiet", "--device", "cpu"]
    if not png:
        command.append("--no-png")
    if threads is not None:
        command += ["--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run([str(c) for c in command], check=True, cwd=REPO)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    summary = json.loads((folder / "report" / "summary.json").read_text())
    return {"seconds": seconds, "peak_gib": peak_kib / 2**20,
            "n_ssim": summary["leaderboard"]["N_SSIM_nucleus"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 1920, 1920), metavar=("Z", "Y", "X"))
    parser.add_argument("--no-png", dest="png", action="store_false", help="score without drawing the PNG")
    parser.add_argument("--threads", type=int, help="score.py --threads")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="write (or reuse) the case here and keep it")
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory(dir=args.keep.parent if args.keep else None) as tmp:
        folder = args.keep or Path(tmp)
        if not (folder / "pred").is_dir():
            start = time.perf_counter()
            write_case(folder, shape)
            print(f"wrote 3 x {np.prod(shape) * 2 / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
        result = run_score(folder, args.png, args.threads)
    voxels = float(np.prod(shape))
    print("| case | voxels | PNG | seconds | peak RSS (GiB) | three whole uint16 volumes (GiB) | N-SSIM |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {'x'.join(map(str, shape))} | {voxels / 1e9:.2f} G | {'yes' if args.png else 'no'} "
          f"| {result['seconds']:.1f} | {result['peak_gib']:.2f} | {3 * voxels * 2 / 2**30:.2f} "
          f"| {result['n_ssim']:+.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
