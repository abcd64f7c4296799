"""Tiled prediction over volumes too large to predict at once.

Why crop-and-stitch instead of weighted blending: a tile is read with a context margin of at
least the network's receptive field and only its core is kept, so every kept voxel saw exactly
the context it would have seen in a whole-volume pass. With tile offsets aligned to the pooling
grid (multiples of ``2**depth``) and the same end padding as the whole-volume pass, tiled equals
untiled up to float rounding, with no seams and without a float accumulator of the volume's
size. Cores partition the volume, so each output voxel is written once, straight into whatever
the caller's ``sink`` keeps (uint16 output, uncertainty map, ...): host memory stays bounded by
one tile plus the caller's outputs.

``predict_tiled`` takes any callable mapping a float32 block to a float32 block of the same
spatial shape, so it is tested with ``lambda x: x + 1`` and with the real network alike.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from tqdm.auto import tqdm

from fusecare.profiling import phase

Shape3 = tuple[int, int, int]
Region = tuple[slice, slice, slice]
Predictor = Callable[[np.ndarray], np.ndarray]
"""float32 (Z, Y, X) block -> float32 (Z, Y, X) or (C, Z, Y, X) block."""
Sink = Callable[..., None]
"""Receives each core region of the volume and the prediction for it (with ``sink_context``, the
prediction over the core widened by that much, and the core's slices within it)."""


@dataclass(frozen=True)
class AxisTile:
    """One tile along one axis: what to read (``start:stop`` of the padded axis), what to keep."""

    start: int
    stop: int
    core_start: int
    core_stop: int


@dataclass(frozen=True)
class Tile:
    """A 3-D tile: the block to read and the core of it that is written."""

    read: Region
    core: Region
    core_in_block: Region


def _as3(value: int | tuple[int, ...]) -> Shape3:
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3:
        raise ValueError(f"expected one int or three, got {value!r}")
    return values  # type: ignore[return-value]


def axis_tiles(size: int, tile: int, margin: int, align: int = 1) -> list[AxisTile]:
    """Tiles along one axis of length ``size``.

    Starts are multiples of ``align``; the axis is virtually padded at its end to a multiple
    of ``align`` (the same padding a whole-volume pass needs). Each tile is read with
    ``margin`` voxels of context that are cropped, except at the volume's own borders.
    """
    if size < 1:
        raise ValueError(f"axis of size {size}")
    if tile % align or tile < align:
        raise ValueError(f"tile {tile} must be a positive multiple of the alignment {align}")
    padded = math.ceil(size / align) * align
    tile = min(tile, padded)
    if tile == padded:
        return [AxisTile(0, padded, 0, size)]
    step = (tile - 2 * margin) // align * align
    if step < align:
        raise ValueError(
            f"tile {tile} is too small for a context margin of {margin} on both sides "
            f"(needs at least {2 * margin + align})"
        )
    count = 1 + math.ceil((padded - tile) / step)
    starts = [min(i * step, padded - tile) for i in range(count)]
    # Cores meet halfway between the context limits of neighbouring tiles.
    bounds = [0] + [(a + b + tile) // 2 for a, b in itertools.pairwise(starts)] + [size]
    return [
        AxisTile(s, s + tile, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)
    ]


def tile_grid(shape: Shape3, tile: Shape3, margin: Shape3, align: int = 1) -> list[Tile]:
    """All 3-D tiles of a volume (the Cartesian product of the per-axis tiles)."""
    per_axis = [axis_tiles(n, t, m, align) for n, t, m in zip(shape, tile, margin)]
    tiles = []
    for combo in itertools.product(*per_axis):
        tiles.append(Tile(
            read=tuple(slice(a.start, a.stop) for a in combo),  # type: ignore[arg-type]
            core=tuple(slice(a.core_start, a.core_stop) for a in combo),  # type: ignore[arg-type]
            core_in_block=tuple(  # type: ignore[arg-type]
                slice(a.core_start - a.start, a.core_stop - a.start) for a in combo
            ),
        ))
    return tiles


def read_block(volume: np.ndarray, region: Region, transform: Callable[[np.ndarray], np.ndarray],
               pad_mode: str = "reflect") -> np.ndarray:
    """The float32 block ``region`` of ``volume``, padded past the volume's end with ``pad_mode``."""
    clipped = tuple(slice(r.start, min(r.stop, n)) for r, n in zip(region, volume.shape))
    block = transform(np.asarray(volume[clipped]))
    pad = [(0, r.stop - c.stop) for r, c in zip(region, clipped)]
    if any(after for _, after in pad):
        block = np.pad(block, pad, mode=pad_mode)
    return block


def pad_to_multiple(block: np.ndarray, align: int, pad_mode: str = "reflect") -> np.ndarray:
    """Pad the end of each axis to a multiple of ``align``: the whole-volume twin of the tiling."""
    pad = [(0, -n % align) for n in block.shape]
    return np.pad(block, pad, mode=pad_mode) if any(p for _, p in pad) else block


def iter_tiles(
    volume: np.ndarray,
    tiles: list[Tile],
    *,
    transform: Callable[[np.ndarray], np.ndarray],
    pad_mode: str,
    progress: str | None,
) -> Iterator[tuple[Tile, np.ndarray]]:
    for t in tqdm(tiles, desc=progress, unit="tile", disable=progress is None, leave=False):
        with phase("read and normalise tiles", math.prod(s.stop - s.start for s in t.read)):
            block = read_block(volume, t.read, transform, pad_mode)
        yield t, block


T = TypeVar("T")
_DONE = object()


def prefetched(items: Iterator[T]) -> Iterator[T]:
    """``items``, the next one produced in a background thread while the caller works on the
    current one (reading and normalising the next tile while the device predicts this one)."""
    with ThreadPoolExecutor(1, thread_name_prefix="fusecare-read") as pool:
        future = pool.submit(next, items, _DONE)
        while (item := future.result()) is not _DONE:
            future = pool.submit(next, items, _DONE)
            yield item  # type: ignore[misc]


def _to_float32(block: np.ndarray) -> np.ndarray:
    return block.astype(np.float32, copy=False)


def predict_tiled(
    volume: np.ndarray,
    predictor: Predictor,
    *,
    tile: int | tuple[int, int, int],
    margin: int | tuple[int, int, int],
    align: int = 1,
    transform: Callable[[np.ndarray], np.ndarray] = _to_float32,
    sink: Sink | None = None,
    pad_mode: str = "reflect",
    progress: str | None = None,
    sink_context: int = 0,
    overlap: bool = False,
) -> np.ndarray | None:
    """Apply ``predictor`` to ``volume`` tile by tile and stitch the cores.

    Args:
        volume: a 3-D (Z, Y, X) array of any dtype; only one tile of it is converted at a time
            (a ``np.memmap`` works).
        predictor: float32 block -> float32 block of the same spatial shape, optionally with a
            leading channel axis.
        tile: block shape read per call (clipped to the volume, multiples of ``align``).
        margin: context cropped from each side of a block; use at least the receptive field.
        align: tile offsets and block shapes are multiples of this (``2**depth`` for a U-Net).
        transform: raw block -> float32 block (e.g. normalisation), applied per tile.
        sink: called with every core region and its prediction. Without one, the stitched
            float32 result is returned (for tests and small volumes).
        pad_mode: ``np.pad`` mode past the volume's end, as a whole-volume pass would pad.
        progress: a description to show a tqdm bar over tiles, or ``None`` for none.
        sink_context: when > 0, ``sink`` gets the prediction over the core widened by this many
            voxels per side (within the block) and, third, the core's slices within that: what
            a post-processing that smooths (the gate) needs, without the block's whole margins.
        overlap: read the next tile in a background thread and run ``sink`` in a writer thread
            (one tile at a time, in order), so that a device computing asynchronously never
            waits on the host; a sink's error is raised here at the next tile or at the end.
    """
    if (sink_context or overlap) and sink is None:
        raise ValueError("sink_context and overlap need a sink")
    if volume.ndim != 3:
        raise ValueError(f"predict_tiled needs a 3-D volume, got shape {volume.shape}")
    tiles = tile_grid(volume.shape, _as3(tile), _as3(margin), align)  # type: ignore[arg-type]
    output: np.ndarray | None = None
    blocks = iter_tiles(volume, tiles, transform=transform, pad_mode=pad_mode, progress=progress)
    with ThreadPoolExecutor(1, thread_name_prefix="fusecare-write") as writer:
        pending: Future | None = None
        for t, block in prefetched(blocks) if overlap else blocks:
            prediction = predictor(block)
            if not hasattr(prediction, "shape"):  # arrays and tensors (kept on their device) as they are
                prediction = np.asarray(prediction)
            if tuple(prediction.shape[-3:]) != block.shape:
                raise ValueError(f"predictor returned shape {prediction.shape} for a block {block.shape}")
            if sink_context:
                widened = tuple(slice(max(c.start - sink_context, 0), min(c.stop + sink_context, n))
                                for c, n in zip(t.core_in_block, block.shape))
                args = (t.core, prediction[(Ellipsis, *widened)],
                        tuple(slice(c.start - w.start, c.stop - w.start) for c, w in zip(t.core_in_block, widened)))
            else:
                args = (t.core, prediction[(Ellipsis, *t.core_in_block)])
            if sink is None:
                if output is None:
                    output = np.empty(prediction.shape[:-3] + volume.shape, dtype=np.float32)
                output[(Ellipsis, *t.core)] = args[1]
            elif overlap:
                if pending is not None:
                    pending.result()
                pending = writer.submit(sink, *args)
            else:
                sink(*args)
        if pending is not None:
            pending.result()
    return output
