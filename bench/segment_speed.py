"""Benchmark: time and memory of the N-IoU path (isotropic resampling, cellpose 3-D, IoU).

Runs offline: without --model it segments with a randomly initialised cellpose 3 network saved
and reloaded by path (network time does not depend on the weights; mask dynamics do, a little).
The volume is synthetic (blurred balls plus noise) with an anisotropic voxel size, like a Fuse
My Cells case. Run from the repository root:

    python bench/segment_speed.py                                   # 16x128x128, voxel 1.0/0.5/0.5 um
    python bench/segment_speed.py --shape 32 256 256 --threads 1 --model PATH --device cuda

Prints one JSON line per stage: seconds, voxels per second and the process's peak RSS so far.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusecare.scoring.segment import CellposeSegmenter, iou_scores, to_isotropic  # noqa: E402


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _volume(shape: tuple[int, int, int], voxel: tuple[float, float, float], seed: int = 0) -> np.ndarray:
    """Balls of 6 um diameter around random centres (one per ~200 um^3), blurred, noisy, uint16."""
    rng = np.random.default_rng(seed)
    count = max(1, int(np.prod(shape) * np.prod(voxel) / 200))
    far = np.ones(shape, bool)
    far[tuple(rng.integers(0, n, count) for n in shape)] = False
    balls = ndi.distance_transform_edt(far, sampling=voxel) <= 3.0
    image = ndi.gaussian_filter(balls.astype(np.float32), 1.0) * 1000 + 100
    image += 50 * rng.standard_normal(shape).astype(np.float32)
    return np.clip(image, 0, 65535).astype(np.uint16)


def _random_model(folder: Path) -> Path:
    from cellpose import models

    model = models.CellposeModel(gpu=False, pretrained_model=False, diam_mean=17.0)
    path = folder / "random_cellpose"
    model.net.save_model(str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(16, 128, 128), metavar=("Z", "Y", "X"))
    parser.add_argument("--voxel", type=float, nargs=3, default=(1.0, 0.5, 0.5), metavar=("Z", "Y", "X"))
    parser.add_argument("--model", type=Path, help="cellpose 3 model file (default: random weights)")
    parser.add_argument("--diameter", type=float, default=12.0, help="in isotropic voxels (default: %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    volume = _volume(tuple(args.shape), tuple(args.voxel))

    def report(stage: str, seconds: float, voxels: int, **extra: object) -> None:
        print(json.dumps({"stage": stage, "shape": list(args.shape), "seconds": round(seconds, 2),
                          "voxels_per_s": round(voxels / seconds) if seconds else None,
                          "peak_rss_mib": round(_peak_mib()), "threads": torch.get_num_threads(),
                          "device": args.device, **extra}), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or _random_model(Path(tmp))
        segmenter = CellposeSegmenter(model, device=args.device)
        start = time.perf_counter()
        iso = to_isotropic(volume, args.voxel)
        report("isotropic", time.perf_counter() - start, iso.size, iso_shape=list(iso.shape))
        start = time.perf_counter()
        labels = segmenter.segment(iso, args.diameter)
        report("cellpose", time.perf_counter() - start, iso.size, cells=int(labels.max()),
               model="random" if args.model is None else str(args.model))
        other = np.roll(labels, 2, axis=2)
        start = time.perf_counter()
        scores = iou_scores(labels, other)
        report("iou", time.perf_counter() - start, iso.size, foreground=round(scores.foreground, 4),
               instance=round(scores.instance, 4))


if __name__ == "__main__":
    main()
