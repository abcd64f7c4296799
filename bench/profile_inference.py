"""Profile: where one case's time goes on the shipped gated ensemble, against this machine's limits.

One process, in this order: a synthetic uint16 case is written as the challenge's files are;
``restore_case`` restores it exactly as ``inference.py`` does (shipped membrane ensemble and its
gate, the device's default tile, no time budget) while ``fusecare.profiling`` charges every phase
(read, percentiles, read and normalise tiles, network per member, members' mean and spread, gate
smoothing, gate blend and uint16 map, write); the peak RSS is read right after it. Then, in the
same run, the limits it is judged against: the network's FLOPs per voxel
(``torch.utils.flop_counter``), the best GFLOP/s of one 3x3x3 ``Conv3d`` in ``channels_last_3d``
(32->32 channels, and 16->16, the shipped width) and one whole-volume forward pass of the same
members (skipped when it would not fit in memory). Finally the host-side (everything but the
network) seconds and the whole case are extrapolated to ``--target`` (309x1920x1920 by default)
from the measured per-voxel rates and the tile grid the target would get.

    python bench/profile_inference.py                                   # 64x384x384 on CPU, minutes
    python bench/profile_inference.py --shape 309,1920,1920 --device cuda --no-whole
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fusecare.constants import MEMBRANE  # noqa: E402
from fusecare.io import CaseMeta, VoxelSize, write_case  # noqa: E402
from fusecare.profiling import PhaseTimer  # noqa: E402
from fusecare.restoration.ensemble import Ensemble  # noqa: E402
from fusecare.restoration.pipeline import EnsembleCache, RestoreOptions, restore_case  # noqa: E402
from fusecare.restoration.planning import (  # noqa: E402
    MODEL_OVERHEAD_BYTES,
    TARGET_BYTES_PER_VOXEL,
    TilePlan,
    available_memory,
    computed_voxels,
    default_plan,
    gated_tiling,
)
from fusecare.restoration.tiling import pad_to_multiple, tile_grid  # noqa: E402

log = logging.getLogger("profile_inference")

WHOLE_BYTES_PER_VOXEL = 700
"""Order of magnitude of a whole-volume forward pass of one shipped (16-filter) member on CPU."""

PER_VOLUME_VOXEL = ("read", "percentiles", "gate blend, uint16 map", "write")
"""Phases whose work scales with the volume's voxels; the gate's smoothing with the voxels it
smooths (``gate_voxels``); the others with the voxels the tiles compute (the volume plus every
tile's margins)."""
GATE_SMOOTHING = "gate smoothing"


def parse_shape(text: str) -> tuple[int, int, int]:
    values = tuple(int(v) for v in text.replace("x", ",").split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError("shape is Z,Y,X")
    return values  # type: ignore[return-value]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_case(folder: Path, shape: tuple[int, int, int], channel: str) -> Path:
    """A uint16 case with the challenge's metadata; slices drawn one at a time (bounded memory)."""
    rng = np.random.default_rng(0)
    volume = np.empty(shape, np.uint16)
    for z in range(shape[0]):
        volume[z] = rng.integers(100, 4000, size=shape[1:], dtype=np.uint16)
    meta = CaseMeta(voxel_size=VoxelSize(1.01, 0.388, 0.388), channel=channel, raw={"channel": channel})
    folder.mkdir(parents=True, exist_ok=True)
    return write_case(folder / "case.tif", volume, meta)


def flops_per_voxel(ensemble: Ensemble) -> list[float]:
    """Each member's forward FLOPs per voxel of its input block (counted on a small block, with
    gradients on: the nominal network, without the halos its z-slabs recompute at inference)."""
    from torch.utils.flop_counter import FlopCounterMode

    side = 4 * ensemble.alignment
    block = torch.zeros((1, 1, side, side, side), device=ensemble.device)
    result = []
    for member in ensemble.members:
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            member(block)
        result.append(counter.get_total_flops() / side**3)
    return result


def conv_peak(device: torch.device, channels: int, shape: tuple[int, int, int], repeats: int = 3) -> float:
    """Best GFLOP/s of one 3x3x3 convolution (``channels`` in and out) in ``channels_last_3d``."""
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1).to(device).to(memory_format=torch.channels_last_3d)
    x = torch.randn((1, channels, *shape), device=device).contiguous(memory_format=torch.channels_last_3d)
    flops = 2 * 27 * channels * channels * math.prod(shape)
    best = math.inf
    with torch.inference_mode():
        conv(x)
        for _ in range(repeats):
            _sync(device)
            begin = time.perf_counter()
            conv(x)
            _sync(device)
            best = min(best, time.perf_counter() - begin)
    return flops / best / 1e9


def whole_volume_seconds(ensemble: Ensemble, shape: tuple[int, int, int]) -> float:
    """One forward pass of every member over the whole (padded) volume, one after another."""
    rng = np.random.default_rng(1)
    block = pad_to_multiple(rng.random(shape, dtype=np.float32), ensemble.alignment)
    x = torch.from_numpy(block)[None, None].to(ensemble.device)
    if ensemble.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    _sync(ensemble.device)
    begin = time.perf_counter()
    with torch.inference_mode():
        for member in ensemble.members:
            member(x)
    _sync(ensemble.device)
    return time.perf_counter() - begin


def gate_voxels(shape: tuple[int, int, int], plan: TilePlan, network_tile: tuple[int, int, int], margin: int,
                align: int, reach: int) -> int:
    """Voxels the gate smooths: each core widened by its reach (within the volume) when the gate
    runs per core, each z-slab widened by its reach in z when it is deferred."""
    if plan.gate_slab is not None:
        plane = shape[1] * shape[2]
        return sum((min(z + plan.gate_slab + reach, shape[0]) - max(z - reach, 0)) * plane
                   for z in range(0, shape[0], plan.gate_slab))
    return sum(math.prod(min(c.stop + reach, n) - max(c.start - reach, 0) for c, n in zip(t.core, shape))
               for t in tile_grid(shape, network_tile, (margin,) * 3, align))


def profile(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    cache = EnsembleCache(args.weights.parent, device, fp16=args.fp16)
    begin = time.perf_counter()
    ensemble = cache.get(args.weights.name)
    load_seconds = time.perf_counter() - begin
    def tile_for(shape: tuple[int, int, int]) -> tuple[TilePlan, tuple[int, int, int], int]:
        """The plan production uses for ``shape`` (uint16, no uncertainty), the network's tile and
        margin: widened by the gate unless the plan defers it."""
        plan = default_plan(ensemble, shape, gate=ensemble.gate, held_bytes_per_voxel=4, tile=args.tile)
        if plan.defers_gate:
            return plan, plan.tile, ensemble.margin
        return (plan, *gated_tiling(plan.tile, ensemble.margin, ensemble.alignment, ensemble.gate))

    plan, network_tile, margin = tile_for(args.shape)
    tile = plan.tile
    with tempfile.TemporaryDirectory() as tmp:
        case = synthetic_case(Path(tmp) / "in", args.shape, args.weights.name)
        options = RestoreOptions(tile=args.tile, device=args.device, fp16=args.fp16, progress=False, time_budget=None)
        with PhaseTimer(sync=(lambda: _sync(device)) if args.sync else None) as timer:
            begin = time.perf_counter()
            (Path(tmp) / "out").mkdir()
            result = restore_case(case, Path(tmp) / "out", cache, options)
            case_seconds = time.perf_counter() - begin
        peak = peak_rss()
    if result.status != "restored":
        raise SystemExit(f"the case was not restored ({result.status}: {result.message})")
    voxels = math.prod(args.shape)
    computed = computed_voxels(args.shape, network_tile, margin, ensemble.alignment)[0]  # type: ignore[index]
    flops = flops_per_voxel(ensemble)
    network = {name: s for name, s in timer.seconds.items() if name.startswith("network")}
    network_flops = sum(f * timer.voxels.get(f"network member {k}", 0) for k, f in enumerate(flops))
    row: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU {platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "shape": list(args.shape), "tile": list(tile),
        "network_tile": list(network_tile), "margin": margin, "gate_slab": plan.gate_slab,
        "members": len(ensemble.members),
        "gate": ensemble.gate.to_dict() if ensemble.gate else None, "load_seconds": load_seconds,
        "case_seconds": case_seconds, "phases": dict(timer.seconds), "calls": dict(timer.calls),
        "computed_voxels": computed, "volume_voxels": voxels, "flops_per_voxel": flops,
        "network_seconds": sum(network.values()),
        "network_gflops": network_flops / max(sum(network.values()), 1e-9) / 1e9,
        "peak_rss": peak, "rss_target": TARGET_BYTES_PER_VOXEL * voxels + MODEL_OVERHEAD_BYTES,
    }
    peak_shape = (32, 96, 96) if device.type == "cpu" else (64, 192, 192)
    row["conv_peak_gflops"] = {c: conv_peak(device, c, peak_shape) for c in (32, 16)}
    whole_need = voxels * WHOLE_BYTES_PER_VOXEL
    if args.whole and (device.type != "cpu" or whole_need < 0.8 * available_memory()):
        row["whole_seconds"] = whole_volume_seconds(ensemble, args.shape)
    target_plan, target_network_tile, target_margin = tile_for(args.target)
    target_tile = target_plan.tile
    target_computed = computed_voxels(args.target, target_network_tile, target_margin,  # type: ignore[index]
                                      ensemble.alignment)[0]
    target_voxels = math.prod(args.target)
    reach = ensemble.gate.radius if ensemble.gate else 0
    host = 0.0
    for name, seconds in timer.seconds.items():
        if name.startswith("network"):
            continue
        if name == GATE_SMOOTHING:
            # deferred: slabs widened by the gate's radius; per core: by the aligned widening of the tiles
            per = gate_voxels(args.shape, plan, network_tile, margin, ensemble.alignment,
                              reach if plan.defers_gate else margin - ensemble.margin)
            scale = gate_voxels(args.target, target_plan, target_network_tile, target_margin, ensemble.alignment,
                                reach if target_plan.defers_gate else target_margin - ensemble.margin)
        else:
            per = voxels if name in PER_VOLUME_VOXEL else computed
            scale = target_voxels if name in PER_VOLUME_VOXEL else target_computed
        host += seconds / per * scale
    row["target"] = {"shape": list(args.target), "computed_voxels": target_computed, "tile": list(target_tile),
                     "gate_slab": target_plan.gate_slab,
                     "host_seconds": host,
                     "network_seconds": row["network_seconds"] / computed * target_computed}
    return row


def report(row: dict) -> None:
    """The profile as tables on stdout."""
    case = row["case_seconds"]
    print(f"\n{row['device']}; torch {row['torch']}; case {'x'.join(map(str, row['shape']))} uint16, "
          f"{row['members']} member(s), tile {row['tile']} -> network tile {row['network_tile']} "
          f"(margin {row['margin']}), {row['computed_voxels'] / row['volume_voxels']:.2f}x the volume computed, "
          + (f"gate deferred (z-slabs of {row['gate_slab']} planes)" if row["gate_slab"] else "gate per core"))
    print(f"{'phase':<28}{'seconds':>9}{'share':>8}{'calls':>7}")
    accounted = 0.0
    for name, seconds in row["phases"].items():
        accounted += seconds
        print(f"{name:<28}{seconds:>9.2f}{seconds / case:>8.1%}{row['calls'][name]:>7}")
    print(f"{'other (tiling, pacer, ...)':<28}{case - accounted:>9.2f}{(case - accounted) / case:>8.1%}")
    print(f"{'case total':<28}{case:>9.2f}{1:>8.1%}    (loading the members: {row['load_seconds']:.2f} s)")
    peak = row["conv_peak_gflops"]
    print(f"\nnetwork FLOPs per voxel per member: {', '.join(f'{f:,.0f}' for f in row['flops_per_voxel'])}")
    print(f"network achieved {row['network_gflops']:.1f} GFLOP/s; conv3d peak (channels_last_3d) "
          f"32->32 {peak[32]:.1f}, 16->16 {peak[16]:.1f} GFLOP/s: {row['network_gflops'] / peak[32]:.2f} of the "
          f"32-channel peak, {row['network_gflops'] / peak[16]:.2f} of the 16-channel one")
    if "whole_seconds" in row:
        print(f"whole-volume forward pass of the same members: {row['whole_seconds']:.2f} s; production "
              f"throughput / whole-volume throughput: case {row['whole_seconds'] / case:.2f}, "
              f"network phases only {row['whole_seconds'] / row['network_seconds']:.2f}")
    ok = "met" if row["peak_rss"] <= row["rss_target"] else "MISSED"
    print(f"peak RSS {row['peak_rss'] / 1e9:.2f} GB = {row['peak_rss'] / row['volume_voxels']:.0f} B/voxel; target "
          f"6 B/voxel + 1.5 GB = {row['rss_target'] / 1e9:.2f} GB: {ok}")
    target = row["target"]
    where = f"gate in z-slabs of {target['gate_slab']}" if target["gate_slab"] else "gate per core"
    print(f"extrapolated to {'x'.join(map(str, target['shape']))} (tile {target['tile']}, {where}, "
          f"{target['computed_voxels'] / 1e9:.2f} G voxels computed): host side (all but the network) "
          f"{target['host_seconds']:.0f} s, network {target['network_seconds']:.0f} s, "
          f"case {target['host_seconds'] + target['network_seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=parse_shape, default=(64, 384, 384))
    parser.add_argument("--target", type=parse_shape, default=(309, 1920, 1920), help="shape to extrapolate to")
    parser.add_argument("--tile", type=parse_shape, help="core tile before the gate widens it (default: the device's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--weights", type=Path, default=REPO / "model_weights" / MEMBRANE)
    parser.add_argument("--no-whole", dest="whole", action="store_false", help="skip the whole-volume pass")
    parser.add_argument("--no-sync", dest="sync", action="store_false",
                        help="CUDA: do not synchronise per phase (total time as in production, phases blurred)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    row = profile(args)
    report(row)
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
