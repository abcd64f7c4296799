"""How a case fits the host: the memory it needs, its tile and where its gate runs.

Before a case is read, ``required_memory`` is checked against ``available_memory``. On CPU, where
the network is nearly all of a case's time and every tile recomputes its context margins,
``cpu_plan`` chooses the tile computing the fewest voxels within the memory rule (peak RSS <=
``TARGET_BYTES_PER_VOXEL`` per voxel + ``MODEL_OVERHEAD_BYTES``) and whether the gate runs per
core or after the tiles, in z-slabs (``TilePlan``); on CUDA out-of-memory ``shrink_core`` gives
the next tile. Decisions from shapes and byte counts alone, made before a tile runs;
``restore_volume`` carries them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fusecare.constants import DEFAULT_TILE
from fusecare.io import CaseInfo
from fusecare.restoration.ensemble import Ensemble
from fusecare.restoration.gate import FIELDS, GateConfig
from fusecare.restoration.tiling import axis_tiles

MODEL_OVERHEAD_BYTES = 1_500_000_000
"""Host memory budgeted for torch, the members and one tile, on top of the per-voxel cost."""


# --------------------------------------------------------------------------- a case's memory


def available_memory() -> int:
    """Bytes this process may still allocate: MemAvailable, or the cgroup's limit if lower."""
    available = math.inf
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - current)
    except (OSError, ValueError):
        pass
    return int(available) if math.isfinite(available) else 1 << 62


FLOAT_PERCENTILE_BYTES = 17
"""Bytes per voxel ``normalize.percentiles`` holds for a float volume: a float64 copy, the
finiteness mask and the float64 copy of the finite voxels (8 + 1 + 8)."""


def required_memory(info: CaseInfo, *, with_uncertainty: bool) -> int:
    """Peak host bytes to restore a case: input + uint16 output (+ uncertainty) + overhead.

    Float inputs also hold a sanitised copy (NaN/Inf replaced), a float32 rescaled copy
    (``rescale_float``) and the percentiles' float64 working set (``FLOAT_PERCENTILE_BYTES``).
    """
    voxels = math.prod(info.shape)
    per_voxel = info.dtype.itemsize + 2 + (2 if with_uncertainty else 0)
    if info.dtype.kind == "f":
        per_voxel += info.dtype.itemsize + 4 + FLOAT_PERCENTILE_BYTES
    return voxels * per_voxel + MODEL_OVERHEAD_BYTES


# --------------------------------------------------------------------------- tiles


OOM_CORE_FLOOR = 2
"""On out-of-memory, cores shrink no further than this many margins per axis: a tile then costs
at most (1 + 2 / OOM_CORE_FLOOR)**3 = 8 times its core instead of the 46 times that halving the
widened tile gave (issue 15)."""


def shrink_core(tile: tuple[int, int, int], shape: tuple[int, ...], *, margin: int,
                align: int) -> tuple[int, int, int]:
    """The tile after halving the longest core (the tile less its two context margins) that can
    still shrink, margins kept; the tile itself when every core is at the floor
    (``OOM_CORE_FLOOR`` margins, at least ``align``).

    Halving the widened tile instead shrinks the core far faster than the tile (the margins stay),
    and the number of tiles, each paying its margins again, explodes.
    """
    floor = max(align, math.ceil(OOM_CORE_FLOOR * margin / align) * align)
    cores = []
    for n, t in zip(shape, tile):
        padded = math.ceil(n / align) * align
        cores.append(padded if t >= padded else t - 2 * margin)  # one tile: the whole axis is its core
    for axis in sorted(range(3), key=lambda k: -cores[k]):
        if cores[axis] <= floor:
            break
        core = max(floor, cores[axis] // 2 // align * align)
        side = math.ceil((core + 2 * margin) / align) * align
        if side < min(tile[axis], math.ceil(shape[axis] / align) * align):
            return tuple(side if k == axis else t for k, t in enumerate(tile))  # type: ignore[return-value]
    return tile


def gated_tiling(tile: tuple[int, int, int], margin: int, align: int,
                 gate: GateConfig | None) -> tuple[tuple[int, int, int], int]:
    """The tile the network sees and its context margin, once the gate's reach is added.

    The gate's smoothing reaches further than the network: the context widens so that tiles stay
    exact, and the tiles with it so that their cores keep their size.
    """
    if gate is None:
        return tile, margin
    extra = math.ceil(gate.radius / align) * align
    return tuple(t + 2 * extra for t in tile), margin + extra  # type: ignore[return-value]


TARGET_BYTES_PER_VOXEL = 6
"""Peak host memory per case is kept within this many bytes per voxel plus ``MODEL_OVERHEAD_BYTES``
(issue 13): the input and output hold 4 of them for uint16; the rest is the CPU tile's."""

TILE_BYTES_PER_FILTER = 15
"""Peak host bytes per voxel of a CPU network tile and per first-level filter (float32): the
full-resolution skip held for the decoder, one z-slab of the first encoder and of the last decoder
(``CareUNet._in_slabs``) and oneDNN's buffers; measured 193-228 B/voxel for 16 filters on 64x280x280
and 64x168x168 tiles (283-311 before the slabs, 464 before the skips were freed early)."""

TILE_BYTES_PIPELINE = 20
"""Peak host bytes per tile voxel beside the network while it runs: the block, the members' sums
(the gate's fields come later, on the smaller core plus its reach, after the network's are freed)."""

PROCESS_BYTES = 400_000_000
"""torch, its libraries and the members: the process before its first tile."""

CPU_TILE_CHOICES = tuple((z, yx, yx) for z in range(64, 321, 16) for yx in range(128, 385, 16))
"""Tiles ``cpu_tile`` chooses from (before the gate widens them), in steps of 16: a tile whose
widened depth just covers a case's (no z margins at all) is often the cheapest, and a coarser
grid misses it (a 200x1024x1024 case computed 5.5x its volume with z in (64, 96, 128, 160),
3.5x with this grid)."""


DEFERRED_GATE_HELD_BYTES = 8
"""Host bytes per voxel the deferred gate holds while the tiles run: the members' mean and spread
of the whole volume, float32 (``restore_volume`` with ``gate_slab``)."""

GATE_SLAB_BYTES_PER_VOXEL = (len(FIELDS) + 2) * 4
"""Peak host bytes per voxel of a z-slab of the deferred gate, read widened by its reach: the
``gate_fields`` stack (4 bytes per field), the normalised input and the consistency term's
smoothing; measured (tracemalloc, ``gate_in_z_slabs``) 24.0 on 40x512x512 in one slab, 24.4 in
slabs of 8 planes (the rest is the blend's chunk, counted in ``BLEND_CHUNK_BYTES``)."""

BLEND_CHUNK_VOXELS = 1 << 20
"""Voxels per chunk of the deferred gate's blend and uint16 map (``pipeline.gate_in_z_slabs``, which
reads it; defined here, where ``BLEND_CHUNK_BYTES`` prices it)."""

BLEND_CHUNK_BYTES = 40 * BLEND_CHUNK_VOXELS
"""Host bytes of one chunk's blend and uint16 map beside the slab's fields (their temporaries:
about 18 bytes per voxel measured, 40 counted)."""


@dataclass(frozen=True)
class TilePlan:
    """How a case is tiled on the host: the core tile and where the gate runs.

    With ``gate_slab`` the network's tiles carry only its own context margin and the gate runs
    once over the whole volume, in z-slabs of that many planes, after every tile ran: the gate's
    reach (16 voxels per side for the shipped membrane gate, beside the network's 24) is not
    recomputed by the network on every tile, at 8 bytes per voxel held for the members' mean and
    spread. Without it (``None``) each tile is widened by the gate's reach and its core is gated
    as it comes (``gated_tiling``): what fits when 8 more bytes per voxel do not (large cases),
    and the device path.
    """

    tile: tuple[int, int, int]
    gate_slab: int | None = None

    @property
    def defers_gate(self) -> bool:
        return self.gate_slab is not None


def feasible_tile(tile: tuple[int, int, int], shape: tuple[int, ...], margin: int,
                  align: int) -> tuple[int, int, int]:
    """``tile`` as the tiling can use it: sides rounded up to multiples of ``align`` and, where one
    tile does not cover the axis, to room for ``margin`` on both sides (a ``--tile`` that cannot be
    used is rounded up, not failed)."""
    minimum = 2 * margin + align
    aligned = [math.ceil(t / align) * align for t in tile]
    return tuple(t if math.ceil(n / align) * align <= t else max(minimum, t)  # type: ignore[return-value]
                 for n, t in zip(shape, aligned))  # one tile: no margin needed


def computed_voxels(shape: tuple[int, ...], tile: tuple[int, int, int], margin: int,
                     align: int) -> tuple[int, int] | None:
    """(voxels the network computes for ``shape``, voxels of one block) with this network tile and
    margin; ``None`` when the tile leaves no core."""
    try:
        per_axis = [axis_tiles(n, t, margin, align) for n, t in zip(shape, tile)]
    except ValueError:
        return None
    block = math.prod(a[0].stop - a[0].start for a in per_axis)
    return math.prod(len(a) * (a[0].stop - a[0].start) for a in per_axis), block


def _tile_budget(shape: tuple[int, ...], held_bytes_per_voxel: float) -> float:
    """Host bytes left to one network tile (or to one slab of the deferred gate, which runs after
    the tiles) by the memory rule, once the volume's held arrays and the process are counted."""
    voxels = math.prod(shape)
    return (TARGET_BYTES_PER_VOXEL - held_bytes_per_voxel) * voxels + MODEL_OVERHEAD_BYTES - PROCESS_BYTES


def _fewest_computed(shape: tuple[int, ...], *, per_voxel: float, budget: float, margin: int, align: int,
                     gate: GateConfig | None) -> tuple[tuple[int, int], tuple[int, int, int]] | None:
    """((computed, block voxels), tile) of the candidate tile computing the fewest voxels whose block
    fits ``budget`` (``gate`` widens the tiles; ``None`` for none); ``None`` when none fits."""
    best: tuple[tuple[int, int], tuple[int, int, int]] | None = None
    for tile in (DEFAULT_TILE["cpu"], *CPU_TILE_CHOICES):
        network_tile, widened = gated_tiling(tile, margin, align, gate)
        cost = computed_voxels(shape, network_tile, widened, align)
        if cost is not None and cost[1] * per_voxel <= budget and (best is None or cost < best[0]):
            best = (cost, tile)
    return best


def _tile_bytes_per_voxel(filters: int) -> float:
    return TILE_BYTES_PER_FILTER * filters + TILE_BYTES_PIPELINE


def cpu_tile(shape: tuple[int, ...], *, filters: int, margin: int, align: int, gate: GateConfig | None,
             held_bytes_per_voxel: float) -> tuple[int, int, int]:
    """The CPU tile that computes the fewest voxels for ``shape`` within the memory rule, the gate
    run per core (tiles widened by its reach).

    Every tile recomputes its context margins (24 voxels for the network and 16 for the shipped
    membrane gate, per side), so on CPU, where the network is nearly all of a case's time, the
    tile decides the speed: the former fixed (64, 128, 128) computed 3.1x a 64x384x384 volume and
    19x a 309x1920x1920 one (its z core was 16 voxels). The memory rule is peak RSS <=
    ``TARGET_BYTES_PER_VOXEL`` per voxel + ``MODEL_OVERHEAD_BYTES``: what the volume and its
    outputs hold (``held_bytes_per_voxel``) and the process itself leave the rest to one tile.
    ``DEFAULT_TILE['cpu']`` when nothing larger fits; it also wins ties (small volumes).
    ``cpu_plan`` weighs this against deferring the gate.
    """
    best = _fewest_computed(shape, per_voxel=_tile_bytes_per_voxel(filters),
                            budget=_tile_budget(shape, held_bytes_per_voxel), margin=margin, align=align, gate=gate)
    return best[1] if best is not None else DEFAULT_TILE["cpu"]


def deferred_gate_slab(shape: tuple[int, ...], gate: GateConfig, budget: float) -> int | None:
    """Planes per z-slab of the deferred gate whose working memory, the slab read widened by the
    gate's reach (``GateConfig.radius``) on both sides, fits ``budget`` bytes: the whole depth
    when it fits at once, else the most planes that fit, provided the reach read around them is
    at most their number (the gate smooths at most twice the volume); ``None`` otherwise."""
    depth, plane = shape[0], math.prod(shape[1:]) * GATE_SLAB_BYTES_PER_VOXEL
    budget -= BLEND_CHUNK_BYTES
    planes = int(budget // plane) if budget > 0 else 0
    if planes >= depth:
        return depth
    slab = planes - 2 * gate.radius
    return slab if slab >= max(1, 2 * gate.radius) else None


def cpu_plan(shape: tuple[int, ...], *, filters: int, margin: int, align: int, gate: GateConfig | None,
             held_bytes_per_voxel: float, tile: tuple[int, int, int] | None = None) -> TilePlan:
    """The CPU plan computing the fewest network voxels within the memory rule: the gate per
    core in tiles widened by its reach (``cpu_tile``), or deferred (``TilePlan.gate_slab``).

    Deferring holds ``DEFERRED_GATE_HELD_BYTES`` more per voxel, so it fits small and mid-sized
    cases only (a 64x384x384 uint16 case: 1.36x its volume computed instead of 1.56x) and never a
    309x1920x1920 one (2 bytes per voxel are left to it, 8 needed): those keep the widened tiles.
    The one-slab gate and the network tile never coexist (the gate runs after the last tile),
    so each must fit alone in the memory the held arrays leave. With ``tile`` (``--tile``) only
    where the gate runs is chosen: deferred when its memory fits that tile. Ties (a gate without
    smoothing, one tile) keep the gate per core, which holds less.
    """
    per_voxel = _tile_bytes_per_voxel(filters)
    widened_tile = tile or cpu_tile(shape, filters=filters, margin=margin, align=align, gate=gate,
                                    held_bytes_per_voxel=held_bytes_per_voxel)
    network_tile, widened_margin = gated_tiling(widened_tile, margin, align, gate)
    widened_cost = computed_voxels(shape, feasible_tile(network_tile, shape, widened_margin, align),
                                   widened_margin, align)
    plan = TilePlan(widened_tile)
    if gate is None:
        return plan
    budget = _tile_budget(shape, held_bytes_per_voxel + DEFERRED_GATE_HELD_BYTES)
    slab = deferred_gate_slab(shape, gate, budget)
    if slab is None:
        return plan
    if tile is None:
        deferred = _fewest_computed(shape, per_voxel=per_voxel, budget=budget, margin=margin, align=align, gate=None)
    else:
        cost = computed_voxels(shape, feasible_tile(tile, shape, margin, align), margin, align)
        deferred = (cost, tile) if cost is not None and cost[1] * per_voxel <= budget else None
    if deferred is not None and (widened_cost is None or deferred[0][0] < widened_cost[0]):
        return TilePlan(deferred[1], gate_slab=slab)
    return plan


def default_plan(ensemble: Ensemble, shape: tuple[int, ...], *, gate: GateConfig | None,
                 held_bytes_per_voxel: float, tile: tuple[int, int, int] | None = None) -> TilePlan:
    """The plan a case gets: ``cpu_plan`` on CPU (``tile``, from ``--tile``, kept if given); on a
    device ``tile`` or ``DEFAULT_TILE`` with the gate per core (the deferred gate is host-only)."""
    if ensemble.device.type != "cpu":
        return TilePlan(tile or DEFAULT_TILE[ensemble.device.type])
    return cpu_plan(shape, filters=max(m.config.first_filters for m in ensemble.members), margin=ensemble.margin,
                    align=ensemble.alignment, gate=gate, held_bytes_per_voxel=held_bytes_per_voxel, tile=tile)
