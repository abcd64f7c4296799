"""One run on a person's first GPU (a few minutes): what the README's GPU table needs.

Prints (as JSON) the versions; per-tile seconds and peak GPU memory of the shipped membrane
ensemble at fp32 and fp16 with ``cudnn.benchmark``; the fp16-vs-fp32 difference on that tile; a
forced out-of-memory and the tile the retry used; and an end-to-end case with timestamps.
Nothing here is measured on CPU-only machines: ``--dry-run`` runs the same steps on tiny sizes on
the CPU so the script is known to work before a GPU is rented.

    python scripts/gpu_check.py                          # on the GPU machine
    python scripts/gpu_check.py --dry-run --device cpu   # anywhere, seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fusecare.restoration.ensemble import load_ensemble  # noqa: E402
from fusecare.restoration.pacing import Deadline  # noqa: E402
from fusecare.restoration.pipeline import restore_volume  # noqa: E402

log = logging.getLogger("gpu_check")


def _shape(text: str) -> tuple[int, int, int]:
    values = tuple(int(v) for v in text.replace("x", ",").split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError("expected Z,Y,X")
    return values  # type: ignore[return-value]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def versions(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__,
                               "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                               "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1),
                    capability=f"{props.major}.{props.minor}")
    return info


def tile_timings(weights: Path, device: torch.device, tile: tuple[int, int, int], repeats: int) -> dict:
    """Seconds per tile (best of ``repeats`` after a warm-up) and peak memory, fp32 and fp16."""
    block = np.random.default_rng(0).random(tile, dtype=np.float32)
    rows: dict[str, object] = {}
    outputs = {}
    for fp16 in (False, True):
        ensemble = load_ensemble(weights, device=device, fp16=fp16)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ensemble.predict_tensor(block)  # warm-up (cudnn.benchmark picks its algorithms here)
        seconds = []
        for _ in range(repeats):
            _sync(device)
            begin = time.perf_counter()
            out = ensemble.predict_tensor(block)
            _sync(device)
            seconds.append(time.perf_counter() - begin)
        outputs[fp16] = out.float().cpu()
        name = "fp16" if fp16 else "fp32"
        rows[name] = {"seconds_per_tile": round(min(seconds), 4),
                      "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
                      if device.type == "cuda" else None}
    difference = (outputs[True] - outputs[False])[0].abs()
    rows["fp16_vs_fp32"] = {"max_abs": float(difference.max()), "mean_abs": float(difference.mean()),
                            "finite": bool(torch.isfinite(outputs[True]).all())}
    return rows


def forced_oom(weights: Path, device: torch.device, shape: tuple[int, int, int], tile: tuple[int, int, int]) -> dict:
    """The first tile raises CUDA out-of-memory: which smaller tile does the retry use?"""
    ensemble = load_ensemble(weights, device=device)
    first: list[tuple[int, ...]] = []

    def predict(block: np.ndarray) -> np.ndarray:
        if not first:
            first.append(block.shape)
            raise torch.cuda.OutOfMemoryError("forced by gpu_check")
        return ensemble.predict_block(block)
    volume = np.random.default_rng(1).integers(100, 4000, shape).astype(np.uint16)
    try:
        restored = restore_volume(volume, predict, tile=tile, margin=ensemble.margin, align=ensemble.alignment,
                                  gate=ensemble.gate, corrected_input=ensemble.corrected_input)
    except torch.cuda.OutOfMemoryError:
        return {"raised_on": list(first[0]), "retry_tile": None, "note": "no smaller core possible: case falls back"}
    return {"raised_on": list(first[0]), "retry_tile": list(restored.tile or ())}


def end_to_end(weights: Path, device: torch.device, shape: tuple[int, int, int], tile: tuple[int, int, int],
               budget: float) -> dict:
    """A synthetic case through ``restore_volume`` as inference runs it, with timestamps."""
    start = time.perf_counter()
    ensemble = load_ensemble(weights, device=device)
    loaded = time.perf_counter()
    volume = np.random.default_rng(2).integers(100, 4000, shape).astype(np.uint16)
    made = time.perf_counter()
    on_device = device.type == "cuda"
    restored = restore_volume(volume, ensemble.predict_tensor if on_device else ensemble.predict_block,
                              tile=tile, margin=ensemble.margin, align=ensemble.alignment, gate=ensemble.gate,
                              deadline=Deadline.after(budget), device=device if on_device else None,
                              name="gpu_check", corrected_input=ensemble.corrected_input)
    _sync(device)
    done = time.perf_counter()
    return {"shape": list(shape), "tile": list(restored.tile or ()), "modes": restored.modes,
            "seconds": {"load": round(loaded - start, 2), "make_volume": round(made - loaded, 2),
                        "restore": round(done - made, 2)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=REPO / "model_weights" / "membrane")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tile", type=_shape, default=(112, 272, 272), help="widened tile the network sees")
    parser.add_argument("--shape", type=_shape, default=(309, 1920, 1920), help="end-to-end case")
    parser.add_argument("--budget", type=float, default=480.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (runs on CPU in seconds)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.error("no CUDA here; use --dry-run --device cpu to check the script itself")
        return 2
    if args.dry_run:
        args.tile, args.shape, args.repeats = (16, 64, 64), (16, 128, 128), 1
    torch.backends.cudnn.benchmark = True
    report = {"versions": versions(device)}
    for name, step in (("tile", lambda: tile_timings(args.weights, device, args.tile, args.repeats)),
                       ("forced_oom", lambda: forced_oom(args.weights, device, args.shape, args.tile)),
                       ("end_to_end", lambda: end_to_end(args.weights, device, args.shape, args.tile, args.budget))):
        log.info("%s ...", name)
        report[name] = step()
        log.info("%s: %s", name, json.dumps(report[name]))
    print(json.dumps(report, indent=1))  # the report itself, for the README's table
    return 0


if __name__ == "__main__":
    sys.exit(main())
