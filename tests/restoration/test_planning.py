"""How a case fits the host (``fusecare/restoration/planning.py``): the memory a case needs, the
CPU tile and plan within the memory rule, the deferred gate's slabs, the core shrunk on out-of-memory."""

from __future__ import annotations

import numpy as np
import pytest

from fusecare.io import CaseInfo, CaseMeta
from fusecare.restoration.gate import GateConfig
from fusecare.restoration.planning import required_memory, shrink_core
from fusecare.restoration.tiling import tile_grid


def test_shrink_core_bounds_the_overhead_of_the_shipped_tile():
    tile, shape, margin = (112, 272, 272), (309, 1920, 1920), 28
    seen = [tile]
    while (smaller := shrink_core(seen[-1], shape, margin=margin, align=4)) != seen[-1]:
        seen.append(smaller)
    assert seen[1] == (112, 164, 272) and seen[-1] == (112, 112, 112)
    assert all(t - 2 * margin >= 2 * margin for t in seen[-1])  # at most 8x the core computed
    # z is one tile of 16: not split
    assert shrink_core((16, 256, 256), (16, 300, 300), margin=4, align=4) == (16, 132, 256)


def test_required_memory_counts_input_output_and_uncertainty():
    info = CaseInfo(path=None, shape=(10, 100, 100), dtype=np.dtype(np.uint16), meta=CaseMeta())  # type: ignore[arg-type]
    base = required_memory(info, with_uncertainty=False)
    assert required_memory(info, with_uncertainty=True) - base == 2 * 100_000


def test_memory_budget_of_float32_inputs_covers_the_float_percentiles(tmp_path):
    """Float percentiles hold a float64 copy, a mask and the finite values: 17 B/voxel more."""
    from fusecare.restoration.planning import MODEL_OVERHEAD_BYTES

    info = CaseInfo(path=tmp_path / "f.tif", shape=(10, 100, 100), dtype=np.dtype(np.float32), meta=CaseMeta())
    per_voxel = (required_memory(info, with_uncertainty=False) - MODEL_OVERHEAD_BYTES) / 100_000
    assert per_voxel >= 4 + 2 + 4 + 17


def test_cpu_tile_computes_fewer_voxels_within_the_memory_rule():
    """A large case gets a larger CPU tile (the margins are recomputed less often) whose block fits
    the memory left by the 6 B/voxel + 1.5 GB rule; a small case keeps the default tile."""
    from fusecare.constants import DEFAULT_TILE
    from fusecare.restoration.planning import (
        MODEL_OVERHEAD_BYTES,
        PROCESS_BYTES,
        TILE_BYTES_PER_FILTER,
        TILE_BYTES_PIPELINE,
        cpu_tile,
        gated_tiling,
    )

    gate = GateConfig(spread_sigma=2.0, prediction_sigma=0.5, consistency_scale=0.02)
    kwargs = dict(filters=16, margin=24, align=4, gate=gate, held_bytes_per_voxel=4)
    assert cpu_tile((8, 32, 32), **kwargs) == DEFAULT_TILE["cpu"]
    shape = (309, 1920, 1920)
    tile = cpu_tile(shape, **kwargs)
    network_tile, margin = gated_tiling(tile, 24, 4, gate)
    default_tile, _ = gated_tiling(DEFAULT_TILE["cpu"], 24, 4, gate)

    assert np.prod(network_tile) > np.prod(default_tile)
    budget = 2 * np.prod(shape) + MODEL_OVERHEAD_BYTES - PROCESS_BYTES
    assert np.prod(network_tile) * (16 * TILE_BYTES_PER_FILTER + TILE_BYTES_PIPELINE) <= budget
    assert len(tile_grid(shape, network_tile, (margin,) * 3, 4)) < len(tile_grid(shape, default_tile, (margin,) * 3, 4))


def test_cpu_tile_finds_the_tile_whose_depth_covers_the_case():
    """No z margins at all is often cheapest: a 200x1024x1024 case gets a tile whose widened depth
    covers its 200 planes (3.5x the volume computed, where z tiles of 64-160 planes computed 5.5x)."""
    from fusecare.restoration.planning import computed_voxels, cpu_tile, gated_tiling

    gate = GateConfig(spread_sigma=2.0, consistency_scale=0.02, consistency_sigma=4.0)
    shape = (200, 1024, 1024)
    tile = cpu_tile(shape, filters=16, margin=24, align=4, gate=gate, held_bytes_per_voxel=4)
    network_tile, margin = gated_tiling(tile, 24, 4, gate)
    assert network_tile[0] >= 200
    assert computed_voxels(shape, network_tile, margin, 4)[0] / np.prod(shape) < 3.6


def test_cpu_plan_defers_the_gate_where_its_memory_fits():
    """A 64x384x384 uint16 case holds 8 more bytes per voxel and computes 1.36x its volume instead
    of 1.56x (the shipped gate reaches 16 voxels); a 309x1920x1920 case has 2 bytes per voxel
    left, not 8, and keeps the widened tiles (the tile ``cpu_tile`` gives); so does a gate that
    does not smooth (nothing to save)."""
    from fusecare.restoration.planning import (
        BLEND_CHUNK_BYTES,
        DEFERRED_GATE_HELD_BYTES,
        GATE_SLAB_BYTES_PER_VOXEL,
        MODEL_OVERHEAD_BYTES,
        PROCESS_BYTES,
        TARGET_BYTES_PER_VOXEL,
        TILE_BYTES_PER_FILTER,
        TILE_BYTES_PIPELINE,
        cpu_plan,
        cpu_tile,
        gated_tiling,
    )

    gate = GateConfig(spread_sigma=2.0, consistency_scale=0.02, consistency_sigma=4.0)  # the shipped membrane gate
    kwargs = dict(filters=16, margin=24, align=4, gate=gate, held_bytes_per_voxel=4)

    def computed(shape, tile, margin):
        return sum(np.prod([s.stop - s.start for s in t.read]) for t in tile_grid(shape, tile, (margin,) * 3, 4))

    shape = (64, 384, 384)
    plan = cpu_plan(shape, **kwargs)
    assert plan.defers_gate and plan.gate_slab == 64
    widened_tile = cpu_tile(shape, **kwargs)
    widened = computed(shape, *gated_tiling(widened_tile, 24, 4, gate))
    assert computed(shape, plan.tile, 24) / np.prod(shape) == pytest.approx((448 / 384) ** 2)  # 1.36
    assert widened / np.prod(shape) == pytest.approx(1.5625)
    budget = ((TARGET_BYTES_PER_VOXEL - 4 - DEFERRED_GATE_HELD_BYTES) * np.prod(shape) + MODEL_OVERHEAD_BYTES
              - PROCESS_BYTES)
    assert np.prod(plan.tile) * (16 * TILE_BYTES_PER_FILTER + TILE_BYTES_PIPELINE) <= budget

    deeper = (400, 384, 384)  # the whole depth does not fit one slab: the most planes that do, less the reach
    plan = cpu_plan(deeper, **kwargs)
    budget = ((TARGET_BYTES_PER_VOXEL - 4 - DEFERRED_GATE_HELD_BYTES) * np.prod(deeper) + MODEL_OVERHEAD_BYTES
              - PROCESS_BYTES)
    assert plan.gate_slab == (budget - BLEND_CHUNK_BYTES) // (384 * 384 * GATE_SLAB_BYTES_PER_VOXEL) - 2 * gate.radius
    assert np.prod(plan.tile) * (16 * TILE_BYTES_PER_FILTER + TILE_BYTES_PIPELINE) <= budget

    big = (309, 1920, 1920)
    assert cpu_plan(big, **kwargs) == type(plan)(cpu_tile(big, **kwargs))
    no_smoothing = dict(kwargs, gate=GateConfig())
    assert not cpu_plan(shape, **no_smoothing).defers_gate
    assert not cpu_plan(shape, **dict(kwargs, gate=None)).defers_gate
    # an explicit tile is kept; only where the gate runs is chosen
    assert cpu_plan(shape, **kwargs, tile=(64, 192, 192)) == type(plan)((64, 192, 192), gate_slab=64)
    assert not cpu_plan(big, **kwargs, tile=(64, 128, 128)).defers_gate


def test_deferred_gate_slab_fits_its_budget():
    """The whole depth when it fits at once; else the most planes whose slab, read with the gate's
    reach on both sides, fits; none when the reach would be more than the planes it serves."""
    from fusecare.restoration.planning import BLEND_CHUNK_BYTES, GATE_SLAB_BYTES_PER_VOXEL, deferred_gate_slab

    gate = GateConfig(spread_sigma=2.0)  # radius 8
    shape = (100, 10, 10)
    plane = 100 * GATE_SLAB_BYTES_PER_VOXEL
    assert gate.radius == 8
    assert deferred_gate_slab(shape, gate, 100 * plane + BLEND_CHUNK_BYTES) == 100
    assert deferred_gate_slab(shape, gate, 100 * plane) is None  # the blend's chunk counted too
    assert deferred_gate_slab(shape, gate, 60 * plane + BLEND_CHUNK_BYTES) == 44
    assert deferred_gate_slab(shape, gate, 32 * plane + BLEND_CHUNK_BYTES) == 16
    assert deferred_gate_slab(shape, gate, 31 * plane + BLEND_CHUNK_BYTES) is None
    assert deferred_gate_slab(shape, gate, -1.0) is None
