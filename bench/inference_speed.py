"""Benchmark: inference speed (voxels/s per member) and peak host memory (bytes/voxel).

Each measurement runs in a fresh subprocess so its peak RSS (``ru_maxrss``) is its own.
Modes: ``tiled`` (the production path: ``restore_volume`` with the ensemble) and ``whole``
(one forward pass of the whole volume per member, skipped when it would not fit in memory).
Target while tiling: peak RSS <= 6 bytes/voxel + 1.5 GB.

    python bench/inference_speed.py                      # 128x512x512, 1 default-size member
    python bench/inference_speed.py --shape 64,256,256 --modes tiled,whole --members 2
    python bench/inference_speed.py --end-to-end --shape 309,1920,1920 --device cuda

Weights are random (speed does not depend on their values) unless ``--weights`` names an
ensemble folder. ``--end-to-end`` is ``bench/profile_inference.py``: a written uint16 case through
``restore_case`` with the shipped membrane ensemble and its gate (or ``--weights``), phase by phase.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from profile_inference import parse_shape, peak_rss  # noqa: E402

from fusecare.restoration.planning import MODEL_OVERHEAD_BYTES, TARGET_BYTES_PER_VOXEL  # noqa: E402

WHOLE_BYTES_PER_VOXEL = 1100  # measured order of magnitude for the default net on CPU


def _ensemble(args: argparse.Namespace, tmp: Path):
    from fusecare.restoration.ensemble import load_ensemble

    folder = args.weights if args.weights is not None else _random_weights(tmp, args.members) / "nucleus"
    return load_ensemble(folder, device=args.device, fp16=args.fp16)


def _random_weights(folder: Path, members: int) -> Path:
    """A default-size ensemble of randomly initialised members in ``folder/nucleus`` (speed does
    not depend on the weights); returns ``folder``."""
    import torch

    from fusecare.restoration.ensemble import save_member, write_manifest
    from fusecare.restoration.model import CareUNet, ModelConfig

    for k in range(members):
        torch.manual_seed(k)
        save_member(folder / "nucleus" / f"member_{k}", CareUNet(ModelConfig()))
    write_manifest(folder / "nucleus", "nucleus")
    return folder


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this process; returns a JSON-able row."""
    import numpy as np
    import torch
    from profile_inference import whole_volume_seconds

    from fusecare.constants import DEFAULT_TILE
    from fusecare.restoration.pipeline import restore_volume

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        ensemble = _ensemble(args, Path(tmp))
        volume = rng.integers(100, 4000, size=args.shape, dtype=np.uint16)
        voxels = volume.size
        baseline = peak_rss()
        start = time.perf_counter()
        if args.worker == "whole":
            whole_volume_seconds(ensemble, args.shape)
            tile = "whole"
        else:
            tile = args.tile or DEFAULT_TILE[ensemble.device.type]
            restore_volume(volume, ensemble.predict_block, tile=tile, margin=ensemble.margin,
                           align=ensemble.alignment, corrected_input=ensemble.corrected_input)
        if ensemble.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        members = len(ensemble.members)
    peak = peak_rss()
    return {
        "mode": args.worker, "shape": "x".join(map(str, args.shape)), "tile": str(tile),
        "members": members, "seconds": round(seconds, 2),
        "voxels_per_s_per_member": voxels * members / seconds,
        "peak_rss_gb": peak / 1e9, "bytes_per_voxel": peak / voxels,
        "rss_before_predict_gb": baseline / 1e9,
        "target_ok": peak <= TARGET_BYTES_PER_VOXEL * voxels + MODEL_OVERHEAD_BYTES if args.worker == "tiled" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=parse_shape, default=(128, 512, 512))
    parser.add_argument("--tile", type=parse_shape)
    parser.add_argument("--members", type=int, default=1)
    parser.add_argument("--modes", default="tiled,whole")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--weights", type=Path, help="an ensemble folder (model_weights/<channel>)")
    parser.add_argument("--end-to-end", action="store_true", help="time inference.py on a written case")
    parser.add_argument("--worker", choices=("tiled", "whole"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.end_to_end:
        import profile_inference

        forwarded = ["--shape", ",".join(map(str, args.shape)), "--device", args.device, "--no-whole"]
        forwarded += ["--tile", ",".join(map(str, args.tile))] if args.tile else []
        forwarded += ["--weights", str(args.weights)] if args.weights else []
        forwarded += ["--fp16"] if args.fp16 else []
        sys.exit(profile_inference.main(forwarded))
    else:
        rows = []
        voxels = math.prod(args.shape)
        for mode in args.modes.split(","):
            if mode == "whole" and args.device == "cpu":
                from fusecare.restoration.planning import available_memory
                need = voxels * WHOLE_BYTES_PER_VOXEL
                if need > 0.8 * available_memory():
                    print(f"whole: skipped, needs about {need / 1e9:.0f} GB ({WHOLE_BYTES_PER_VOXEL} B/voxel), "
                          f"{available_memory() / 1e9:.0f} GB available", file=sys.stderr)
                    continue
            cmd = [sys.executable, __file__, "--worker", mode, "--shape", ",".join(map(str, args.shape)),
                   "--members", str(args.members), "--device", args.device]
            cmd += ["--tile", ",".join(map(str, args.tile))] if args.tile else []
            cmd += ["--weights", str(args.weights)] if args.weights else []
            cmd += ["--fp16"] if args.fp16 else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    import torch

    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    print(f"\ndevice: {device}; torch {torch.__version__}")
    header = (f"{'mode':<11}{'shape':<15}{'tile':<16}{'members':>8}{'seconds':>9}{'Mvox/s/member':>15}"
              f"{'peak GB':>9}{'B/voxel':>9}  target")
    print(header)
    print("-" * len(header))
    for r in rows:
        ok = {True: "ok", False: "MISSED", None: "-"}[r["target_ok"]]
        print(f"{r['mode']:<11}{r['shape']:<15}{r['tile']:<16}{r['members']:>8}{r['seconds']:>9.1f}"
              f"{r['voxels_per_s_per_member'] / 1e6:>15.3f}{r['peak_rss_gb']:>9.2f}{r['bytes_per_voxel']:>9.1f}  {ok}")


if __name__ == "__main__":
    main()
