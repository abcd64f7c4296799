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

The two jobs are named objects, as MONAI's ``PatchInferer`` splits them: a ``Splitter`` says
where tiles are and reads them (the geometry: tile, margin, alignment, end padding), and a
``CoreMerger`` keeps each prediction's core and nothing else (the stitching). ``predict_tiled``
is the loop between them; ``predict_normalised`` is the one whole-volume prediction that
training, calibration, export and the pipeline share, so tile defaults live there.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
from tqdm.auto import tqdm

from fusecare.constants import DEFAULT_TILE
from fusecare.normalize import PercentileNorm
from fusecare.profiling import phase

Shape3 = tuple[int, int, int]
Region = tuple[slice, slice, slice]
Predictor = Callable[[np.ndarray], np.ndarray]
"""float32 (Z, Y, X) block -> float32 (Z, Y, X) or (C, Z, Y, X) block."""
Prediction = Any
"""A predictor's output for one block: a numpy array, or a tensor kept on its device."""
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


def _to_float32(block: np.ndarray) -> np.ndarray:
    return block.astype(np.float32, copy=False)


@dataclass(frozen=True, init=False)
class Splitter:
    """Where a volume's tiles are, and their blocks read one at a time.

    Holds the geometry only, so the pipeline can count a case's tiles (its time budget) and
    ``cpu_tile`` can price a tile before anything is read. ``tile`` is clipped to the aligned
    volume per axis, so a tile larger than the volume gives one block: the whole-volume pass.
    """

    tile: Shape3
    margin: Shape3
    align: int
    pad_mode: str

    def __init__(self, tile: int | tuple[int, ...], margin: int | tuple[int, ...], align: int = 1,
                 pad_mode: str = "reflect") -> None:
        object.__setattr__(self, "tile", _as3(tile))
        object.__setattr__(self, "margin", _as3(margin))
        object.__setattr__(self, "align", align)
        object.__setattr__(self, "pad_mode", pad_mode)

    def tiles(self, shape: tuple[int, ...]) -> list[Tile]:
        """The tiles of a volume of ``shape``: cores partition it, each read with its context."""
        if len(shape) != 3:
            raise ValueError(f"tiling needs a 3-D volume, got shape {shape}")
        return tile_grid(shape, self.tile, self.margin, self.align)  # type: ignore[arg-type]

    def __call__(self, volume: np.ndarray, *,
                 transform: Callable[[np.ndarray], np.ndarray] = _to_float32,
                 progress: str | None = None) -> Iterator[tuple[Tile, np.ndarray]]:
        """Each tile with its block: ``transform`` applied to what lies in the volume, then padded
        past the volume's end with ``pad_mode`` (only one block is in memory at a time)."""
        tiles = self.tiles(volume.shape)
        for t in tqdm(tiles, desc=progress, unit="tile", disable=progress is None, leave=False):
            with phase("read and normalise tiles", math.prod(s.stop - s.start for s in t.read)):
                block = read_block(volume, t.read, transform, self.pad_mode)
            yield t, block


class CoreMerger:
    """Stitches predictions by keeping each tile's core: every output voxel is written once.

    No weights and no accumulator, unlike MONAI's ``AvgMerger``: cores partition the volume and
    each saw its full context, so a crop is exact. Without a ``sink`` the cores go into a float32
    array (with the prediction's leading channel axes) that ``finalize`` returns; with one, the
    sink gets ``(core region, core prediction)`` or, with ``sink_context`` > 0, the prediction
    over the core widened by that much within the block (never into the padding past the
    volume's end), and the core's slices within it (what a post-processing that smooths, the
    gate, needs, without the block's whole margins).
    """

    def __init__(self, shape: tuple[int, ...], sink: Sink | None = None, *, sink_context: int = 0) -> None:
        if sink_context and sink is None:
            raise ValueError("sink_context needs a sink")
        self.shape, self.sink, self.sink_context = tuple(shape), sink, sink_context
        self.output: np.ndarray | None = None

    def crop(self, tile: Tile, prediction: Prediction) -> tuple[Region, Prediction] | tuple[Region, Prediction, Region]:
        """What is kept of ``prediction`` (the whole block's) for ``tile``, as the sink receives it."""
        if not self.sink_context:
            return tile.core, prediction[(Ellipsis, *tile.core_in_block)]
        # Widened within what the block holds of the volume: past the volume's end the block is
        # padding, and a smoothing sink then reflects at the volume's own border, as it would on
        # the whole volume (the gate was calibrated so), instead of smoothing the padding in.
        inside = tuple(min(b, n - r.start) for b, n, r in zip(prediction.shape[-3:], self.shape, tile.read))
        widened = tuple(slice(max(c.start - self.sink_context, 0), min(c.stop + self.sink_context, n))
                        for c, n in zip(tile.core_in_block, inside))
        core = tuple(slice(c.start - w.start, c.stop - w.start) for c, w in zip(tile.core_in_block, widened))
        return tile.core, prediction[(Ellipsis, *widened)], core  # type: ignore[return-value]

    def aggregate(self, tile: Tile, prediction: Prediction) -> None:
        """Keep ``tile``'s core of ``prediction``, the block read for it predicted."""
        kept = self.crop(tile, prediction)
        if self.sink is not None:
            self.sink(*kept)
            return
        if self.output is None:
            self.output = np.empty(tuple(prediction.shape[:-3]) + self.shape, dtype=np.float32)
        self.output[(Ellipsis, *tile.core)] = kept[1]

    def finalize(self) -> np.ndarray | None:
        """The stitched volume, or ``None`` when a sink took the cores."""
        return self.output


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

    A ``Splitter`` reads the blocks, the predictor runs on each, a ``CoreMerger`` keeps the cores.

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
    splitter = Splitter(tile, margin, align, pad_mode)
    merger = CoreMerger(volume.shape, sink, sink_context=sink_context)
    blocks = splitter(volume, transform=transform, progress=progress)
    with ThreadPoolExecutor(1, thread_name_prefix="fusecare-write") as writer:
        pending: Future | None = None
        for t, block in prefetched(blocks) if overlap else blocks:
            prediction = predictor(block)
            if not hasattr(prediction, "shape"):  # arrays and tensors (kept on their device) as they are
                prediction = np.asarray(prediction)
            if tuple(prediction.shape[-3:]) != block.shape:
                raise ValueError(f"predictor returned shape {prediction.shape} for a block {block.shape}")
            if overlap:
                if pending is not None:
                    pending.result()
                pending = writer.submit(merger.aggregate, t, prediction)
            else:
                merger.aggregate(t, prediction)
        if pending is not None:
            pending.result()
    return merger.finalize()


WHOLE_VOLUME: Literal["whole"] = "whole"
"""``predict_normalised``'s tile for one block over the whole (aligned) volume, no tiling."""


def predict_normalised(
    volume: np.ndarray,
    predictor: Predictor,
    *,
    margin: int,
    align: int,
    tile: tuple[int, int, int] | Literal["whole"] | None = None,
    device_type: str = "cpu",
    norm: PercentileNorm | None = None,
    sink: Sink | None = None,
    sink_context: int = 0,
    overlap: bool = False,
    progress: str | None = None,
) -> np.ndarray | None:
    """A whole volume predicted on the challenge's normalised scale: the one prediction path.

    Training's validation, gate calibration, the bioimage.io export's test output and the
    restoration pipeline all come here, so they tile, pad and stitch alike. ``tile`` defaults to
    ``constants.DEFAULT_TILE[device_type]``; ``WHOLE_VOLUME`` predicts one block (what a
    model-zoo runner does, the volume padded to ``align`` at its end). ``norm`` defaults to the
    volume's own challenge percentiles. ``sink``, ``sink_context``, ``overlap`` and ``progress``
    are ``predict_tiled``'s; without a sink the stitched float32 prediction is returned.
    """
    if tile is None:
        tile = DEFAULT_TILE[device_type]
    elif tile == WHOLE_VOLUME:
        tile = tuple(math.ceil(n / align) * align for n in volume.shape)  # type: ignore[assignment]
    if norm is None:
        norm = PercentileNorm.fit(volume)
    return predict_tiled(volume, predictor, tile=tile, margin=margin, align=align,  # type: ignore[arg-type]
                         transform=norm.forward, sink=sink, sink_context=sink_context, overlap=overlap,
                         progress=progress)
