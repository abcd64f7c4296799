"""Reading and writing Fuse My Cells cases: 3-D ZYX TIFF volumes and their metadata.

Inputs carry metadata either as tifffile "shaped" JSON or as ImageJ metadata, with voxel sizes
spelled ``PhysicalSizeX``, ``physicalsizex`` or ``physical_size_x``. Missing or malformed
keys never crash a case: they get the documented defaults below and a note is kept, so the
caller can log what was assumed. Outputs are written the way the organisers' template writes
them (uint16, BigTIFF, 128x128 tiles, resolution tags, the input's metadata as shaped JSON),
to a temporary name that is renamed at the end, so a crash never leaves a partial file.

This module knows nothing of torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import tifffile

from fusecare.errors import InputError

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
NUCLEUS, MEMBRANE = "nucleus", "membrane"
CHANNELS = (NUCLEUS, MEMBRANE)

DEFAULT_VOXEL_SIZE_UM = 1.0
"""Voxel size assumed for an axis whose size is missing or not a positive number."""

OUTPUT_TILE = (128, 128)


@dataclass(frozen=True)
class VoxelSize:
    """Physical voxel size in micrometres."""

    z: float = DEFAULT_VOXEL_SIZE_UM
    y: float = DEFAULT_VOXEL_SIZE_UM
    x: float = DEFAULT_VOXEL_SIZE_UM

    @property
    def zyx(self) -> tuple[float, float, float]:
        return (self.z, self.y, self.x)


@dataclass(frozen=True)
class CaseMeta:
    """What a case says about itself, plus the notes on every default that had to be assumed.

    ``channel`` is ``"nucleus"`` when the metadata says so, else ``"membrane"`` (the challenge's
    rule); without a ``channel`` key the file name decides, and failing that, membrane.
    ``raw`` is the input's metadata dict, written back with the prediction.
    """

    voxel_size: VoxelSize = VoxelSize()
    channel: str = MEMBRANE
    study: int | None = None
    unit: str = "micron"
    raw: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    channel_in_metadata: bool = False
    """Whether ``channel`` came from a channel key of the metadata (not the file name)."""


@dataclass(frozen=True)
class CaseInfo:
    """A case's header: enough to plan memory before any pixel is read."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    meta: CaseMeta

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Case:
    """A volume (ZYX) with its metadata."""

    path: Path
    volume: np.ndarray
    meta: CaseMeta


# --------------------------------------------------------------------------- metadata


def _key(name: str) -> str:
    """Canonical key: 'PhysicalSizeX', 'physicalsizex', 'physical_size_x' -> 'physicalsizex'."""
    return name.lower().replace("_", "").replace(" ", "")


def _positive_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _resolution_size(page: tifffile.TiffPage, tag: str) -> float | None:
    """Pixel size from an X/YResolution tag (pixels per unit), if one is set."""
    entry = page.tags.get(tag)
    if entry is None:
        return None
    try:
        numerator, denominator = entry.value
        pixels_per_unit = numerator / denominator
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not pixels_per_unit > 0 or (numerator, denominator) == (1, 1):
        return None  # (1, 1) is tifffile's default: no information
    return _positive_float(1.0 / pixels_per_unit)


def parse_meta(raw: Mapping[str, Any], *, path: Path | None = None,
               page: tifffile.TiffPage | None = None) -> CaseMeta:
    """Interpret a metadata dict (shaped JSON or ImageJ) into a ``CaseMeta``; never raises."""
    keys = {_key(k): v for k, v in raw.items()}
    notes: list[str] = []

    sizes: dict[str, float] = {}
    unknown: list[str] = []
    for axis in "zyx":
        value = keys.get(f"physicalsize{axis}")
        if value is None and axis == "z":
            value = keys.get("spacing")
        size = _positive_float(value)
        if size is None and axis in "yx" and page is not None:
            size = _resolution_size(page, f"{axis.upper()}Resolution")
        if size is None:
            if value is not None:
                notes.append(f"PhysicalSize{axis.upper()}={value!r} is not a positive number")
            unknown.append(axis.upper())
            size = DEFAULT_VOXEL_SIZE_UM
        sizes[axis] = size
    if unknown:
        notes.append(f"voxel size unknown along {', '.join(unknown)}: assuming {DEFAULT_VOXEL_SIZE_UM} um")

    channel_value = keys.get("channel")
    if channel_value is None:
        name = path.name.lower() if path is not None else ""
        channel = NUCLEUS if NUCLEUS in name else MEMBRANE
        notes.append(f"no channel in metadata, using {channel!r} (from the file name or default)")
    else:
        channel = NUCLEUS if str(channel_value).strip().lower() == NUCLEUS else MEMBRANE
        if str(channel_value).strip().lower() not in CHANNELS:
            notes.append(f"channel {channel_value!r} is not nucleus/membrane, treating as membrane")

    study: int | None = None
    study_value = keys.get("study")
    if study_value is not None:
        try:
            study = int(study_value)
        except (TypeError, ValueError):
            notes.append(f"study {study_value!r} is not an integer, ignoring it")

    unit = str(keys.get("unit", "micron"))
    return CaseMeta(
        voxel_size=VoxelSize(**sizes), channel=channel, study=study, unit=unit,
        raw=dict(raw), notes=tuple(notes), channel_in_metadata=channel_value is not None,
    )


def _raw_metadata(tif: tifffile.TiffFile) -> dict[str, Any]:
    """The shaped JSON dict if there is one, else ImageJ metadata, else an empty dict."""
    shaped = tif.shaped_metadata
    if shaped and isinstance(shaped[0], Mapping):
        return dict(shaped[0])
    if tif.imagej_metadata:
        return dict(tif.imagej_metadata)
    return {}


# --------------------------------------------------------------------------- reading


def _squeezed_3d_shape(series_shape: tuple[int, ...], axes: str, path: Path) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in series_shape if s != 1)
    if "S" in axes and series_shape[axes.index("S")] > 1:
        raise InputError(f"{path.name}: RGB/multi-sample image (axes {axes}, shape {series_shape}); "
                         "expected one 3-D ZYX channel")
    if len(shape) != 3:
        raise InputError(f"{path.name}: {len(shape)}-D image of shape {tuple(series_shape)} "
                         f"(axes {axes}); expected a 3-D ZYX volume")
    return shape  # type: ignore[return-value]


@contextlib.contextmanager
def _tifffile_quiet(path: Path) -> Iterator[None]:
    """Demote tifffile's own ERROR lines about a damaged file (they do not name it) to DEBUG;
    the one-line ``InputError`` raised by the caller says it, naming the file."""
    logger = logging.getLogger("tifffile")

    def to_debug(record: logging.LogRecord) -> bool:
        log.debug("%s: tifffile: %s", path.name, record.getMessage())
        return False

    logger.addFilter(to_debug)
    try:
        yield
    finally:
        logger.removeFilter(to_debug)


def _open(path: Path) -> tifffile.TiffFile:
    try:
        if path.stat().st_size == 0:
            raise InputError(f"{path.name}: empty file (0 bytes)")
        return tifffile.TiffFile(path)
    except InputError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path.name}: not a readable TIFF ({exc})") from None


def inspect_case(path: str | Path) -> CaseInfo:
    """Read a case's header and metadata without reading its pixels."""
    path = Path(path)
    with _tifffile_quiet(path), _open(path) as tif:
        if not tif.series:
            raise InputError(f"{path.name}: TIFF holds no image")
        series = tif.series[0]
        shape = _squeezed_3d_shape(series.shape, series.axes, path)
        meta = parse_meta(_raw_metadata(tif), path=path, page=tif.pages[0])
        return CaseInfo(path=path, shape=shape, dtype=np.dtype(series.dtype), meta=meta)


_PIXEL_ERRORS = (tifffile.TiffFileError, ValueError, OSError, EOFError, IndexError, RuntimeError)
"""What decoding damaged pixels raises; imagecodecs' codec errors (e.g. DeflateError) are RuntimeErrors."""


def read_case(path: str | Path, *, info: CaseInfo | None = None) -> Case:
    """Read a 3-D volume and its metadata; ``InputError`` for anything that is not one."""
    path = Path(path)
    info = info or inspect_case(path)
    try:
        with _tifffile_quiet(path), _open(path) as tif:
            volume = tif.series[0].asarray()
    except InputError:
        raise
    except _PIXEL_ERRORS as exc:
        raise InputError(f"{path.name}: truncated or corrupt TIFF ({exc})") from None
    volume = volume.reshape(info.shape)
    return Case(path=path, volume=volume, meta=info.meta)


class PagedVolume:
    """A 3-D ZYX volume in a TIFF whose z-planes are read only when indexed.

    Scoring a 300x1920x1920 case holds three volumes: 6.6 GB as uint16 if read whole. Indexing
    this object reads just the z-planes the index names (one TIFF page each, tiled or not,
    compressed or not) and applies the rest of the index to them, so slab-wise code (histograms,
    the tiled SSIM, projections) runs in memory proportional to its slab. ``np.asarray`` reads
    everything. Reads are serialised by a lock, so tiles on threads may share one.
    """

    def __init__(self, path: Path, tif: tifffile.TiffFile, shape: tuple[int, int, int], dtype: np.dtype):
        self.path = path
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self._tif = tif
        self._lock = threading.Lock()

    ndim = 3

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"PagedVolume({self.path.name!r}, shape={self.shape}, dtype={self.dtype})"

    def _planes(self, indices: np.ndarray) -> np.ndarray:
        """The planes ``indices`` (any order, repeats allowed), each page decoded once."""
        unique, inverse = np.unique(indices, return_inverse=True)
        out = np.empty((len(unique),) + self.shape[1:], dtype=self.dtype)
        try:
            with self._lock, _tifffile_quiet(self.path):
                for start in range(0, len(unique), 64):  # bounded key lists, one decode call each
                    chunk = unique[start:start + 64]
                    out[start:start + len(chunk)] = self._tif.asarray(
                        key=[int(i) for i in chunk], series=0).reshape((len(chunk),) + self.shape[1:])
        except _PIXEL_ERRORS as exc:
            raise InputError(f"{self.path.name}: truncated or corrupt TIFF ({exc})") from None
        return out if len(unique) == len(indices) and (np.diff(indices) > 0).all() else out[inverse]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if not key or key[0] is Ellipsis:
            z, rest = slice(None), key
        else:
            z, rest = key[0], (slice(None),) + key[1:]
        n_z = self.shape[0]
        if isinstance(z, slice):
            planes = self._planes(np.arange(n_z)[z])
        elif isinstance(z, (int, np.integer)):
            if not -n_z <= z < n_z:
                raise IndexError(f"plane {z} out of range for {n_z} planes")
            planes, rest = self._planes(np.array([int(z) % n_z])), (0,) + key[1:]
        else:
            indices = np.asarray(z)
            if indices.dtype.kind not in "ui" or indices.ndim != 1:
                raise IndexError(f"PagedVolume takes an int, a slice or a 1-D integer array on z, not {z!r}")
            if any(not isinstance(k, (int, np.integer, slice)) and k is not Ellipsis for k in key[1:]):
                raise IndexError("an index array on z cannot be combined with another (numpy would broadcast them)")
            if indices.size and not (-n_z <= indices.min() and indices.max() < n_z):
                raise IndexError(f"plane index out of range for {n_z} planes")
            planes = self._planes(indices % n_z)
        return planes[rest]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        volume = self[:]
        return volume if dtype is None else volume.astype(dtype, copy=False)

    @property
    def closed(self) -> bool:
        return bool(self._tif.filehandle.closed)

    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Volume = np.ndarray | PagedVolume
"""A volume as the slab-wise readers take it: a numpy array, or a ``PagedVolume`` read on demand."""


def open_volume(path: str | Path, *, info: CaseInfo | None = None,
                memmap: bool = False) -> Volume:
    """A case's volume without reading its pixels yet, where the file allows it.

    A ``PagedVolume`` when every z-plane is one TIFF page (the organisers' files and ours). With
    ``memmap`` a ``np.memmap`` is preferred when the pixels are stored uncompressed and
    contiguous: fast random patches for training, but its pages count as resident memory once
    touched. A file that is neither paged by plane nor mappable is read whole. Close a
    ``PagedVolume`` when done.
    """
    path = Path(path)
    info = info or inspect_case(path)

    def mapped() -> np.ndarray | None:
        try:
            return tifffile.memmap(path, mode="r").reshape(info.shape)
        except (ValueError, tifffile.TiffFileError, OSError):
            return None

    if memmap and (volume := mapped()) is not None:
        return volume
    with _tifffile_quiet(path):
        tif = _open(path)
    series = tif.series[0]
    if len(series.pages) == info.shape[0] and tuple(series.keyframe.shape) == info.shape[1:]:
        return PagedVolume(path, tif, info.shape, info.dtype)
    tif.close()
    if not memmap and (volume := mapped()) is not None:
        return volume
    log.debug("%s: pages are not z-planes and the pixels cannot be mapped: read whole", path.name)
    return read_case(path, info=info).volume


@contextlib.contextmanager
def opened_volume(path: str | Path, *, info: CaseInfo | None = None, memmap: bool = False) -> Iterator[Volume]:
    """``open_volume`` for a ``with`` block: a ``PagedVolume`` is closed at its end."""
    volume = open_volume(path, info=info, memmap=memmap)
    try:
        yield volume
    finally:
        if isinstance(volume, PagedVolume):
            volume.close()


def tiff_files(folder: str | Path, *, kind: str = "input folder") -> list[Path]:
    """The ``.tif``/``.tiff`` files of a folder, sorted, hidden files skipped (maybe none);
    ``InputError`` "<kind> not found" when there is no such folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{kind} not found: {folder}")
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in TIFF_SUFFIXES and not p.name.startswith(".") and p.is_file())


def list_cases(folder: str | Path) -> list[Path]:
    """All ``.tif``/``.tiff`` files of a folder (one case each), sorted; hidden files skipped."""
    cases = tiff_files(folder)
    if not cases:
        raise InputError(f"no .tif/.tiff file in input folder {folder}")
    return cases


# --------------------------------------------------------------------------- writing


def _jsonable(value: Any) -> Any:
    """Metadata values as JSON-serialisable Python objects (numpy scalars and arrays included)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


def output_metadata(meta: CaseMeta) -> dict[str, Any]:
    """The input's metadata dict to write back, with explicit axes and the voxel size used.

    ``shape`` is dropped because tifffile writes its own (a stale one corrupts the header).
    """
    md = {k: _jsonable(v) for k, v in meta.raw.items() if k != "shape"}
    md["axes"] = "ZYX"
    keys = {_key(k) for k in md}
    for axis, size in zip("ZYX", meta.voxel_size.zyx):
        if f"physicalsize{axis.lower()}" not in keys:
            md[f"PhysicalSize{axis}"] = size
    return md


def write_case(path: str | Path, volume: np.ndarray, meta: CaseMeta) -> Path:
    """Write a uint16 ZYX volume like the organisers' template, atomically.

    The file is written under a hidden temporary name in the destination folder and renamed
    into place, so readers never see a partial output.
    """
    path = Path(path)
    if volume.ndim != 3 or volume.dtype != np.uint16:
        raise ValueError(f"write_case expects a 3-D uint16 volume, got {volume.ndim}-D {volume.dtype}")
    vs = meta.voxel_size
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tifffile.imwrite(
            tmp, volume, bigtiff=True, tile=OUTPUT_TILE, photometric="minisblack",
            resolution=(1.0 / vs.x, 1.0 / vs.y), metadata=output_metadata(meta),
        )
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the grader may read as another user
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
