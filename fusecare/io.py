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
import dataclasses
import json
import logging
import math
import os
import re
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import tifffile

from fusecare.constants import CHANNELS, MEMBRANE, NUCLEUS, TIFF_SUFFIXES
from fusecare.errors import InputError, one_line

log = logging.getLogger(__name__)


DEFAULT_VOXEL_SIZE_UM = 1.0
"""Voxel size assumed for an axis whose size is missing, not a number, or out of range."""

VOXEL_SIZE_RANGE_UM = (1e-9, 1e9)
"""Voxel sizes accepted from metadata. Outside it the TIFF resolution rational (pixels per unit,
two uint32) cannot hold ``1 / size``: tifffile fails on sizes below about 2.3e-10 and writes
0 pixels per unit above about 4.3e9. No microscope is near either end."""

PARTIAL_SUFFIX = ".partial"
"""Outputs are written as ``.<name>.<random>.partial`` and renamed; see ``stale_partials``."""
_PARTIAL_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.partial$")
_TEMP_NAME_CHARS = 64
"""At most this many characters of the output's name go into its temporary name, so that the
temporary name stays under the usual 255-byte limit however long the output's name is."""

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
    stored_shape: tuple[int, ...] | None = None
    """The shape as stored (e.g. (1, Z, Y, X)) when it has singleton axes beside ZYX: outputs are
    written back in it, so they have the input's shape."""
    stored_axes: str | None = None
    """tifffile's axes of ``stored_shape``, written back with it."""


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
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _voxel_size(value: Any) -> float | None:
    """A voxel size in ``VOXEL_SIZE_RANGE_UM``, else None (the caller assumes the default)."""
    size = _positive_float(value)
    low, high = VOXEL_SIZE_RANGE_UM
    return size if size is not None and low <= size <= high else None


def _study(value: Any) -> int | None:
    """An integral, finite study number; None for anything else (NaN, Infinity, 2.5, "x")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(number) or number != int(number) or abs(number) > 2**31:
        return None
    return int(number)


def _resolution_size(page: tifffile.TiffPage, tag: str) -> float | None:
    """Pixel size from an X/YResolution tag (pixels per unit), if one is set."""
    entry = page.tags.get(tag)
    if entry is None:
        return None
    try:
        numerator, denominator = entry.value
        pixels_per_unit = numerator / denominator
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    if not pixels_per_unit > 0 or (numerator, denominator) == (1, 1):
        return None  # (1, 1) is tifffile's default: no information
    return _voxel_size(1.0 / pixels_per_unit)


def parse_meta(raw: Mapping[str, Any], *, path: Path | None = None,
               page: tifffile.TiffPage | None = None) -> CaseMeta:
    """Interpret a metadata dict (shaped JSON or ImageJ) into a ``CaseMeta``; never raises.

    Every value is validated: voxel sizes outside ``VOXEL_SIZE_RANGE_UM`` (which the output's
    resolution tag could not hold) and a ``study`` that is not a finite integer are treated as
    missing, each with a note.
    """
    keys = {_key(str(k)): v for k, v in raw.items()}
    notes: list[str] = []

    sizes: dict[str, float] = {}
    unknown: list[str] = []
    for axis in "zyx":
        value = keys.get(f"physicalsize{axis}")
        if value is None and axis == "z":
            value = keys.get("spacing")
        size = _voxel_size(value)
        if size is None and axis in "yx" and page is not None:
            size = _resolution_size(page, f"{axis.upper()}Resolution")
        if size is None:
            if value is not None:
                low, high = VOXEL_SIZE_RANGE_UM
                notes.append(f"PhysicalSize{axis.upper()}={value!r} is not a positive number "
                             f"in [{low:g}, {high:g}] um")
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

    study_value = keys.get("study")
    study = _study(study_value) if study_value is not None else None
    if study_value is not None and study is None:
        notes.append(f"study {study_value!r} is not a finite integer, treating it as missing")

    unit = str(keys.get("unit", "micron"))
    return CaseMeta(
        voxel_size=VoxelSize(**sizes), channel=channel, study=study, unit=unit,
        raw=dict(raw), notes=tuple(notes), channel_in_metadata=channel_value is not None,
    )


_OME_UNITS_UM = {"pm": 1e-6, "nm": 1e-3, "um": 1.0, "\u00b5m": 1.0, "micron": 1.0, "mm": 1e3, "cm": 1e4,
                 "m": 1e6}
"""OME ``PhysicalSize*Unit`` symbols -> micrometres (OME's default unit is um)."""


def ome_metadata(xml: str) -> dict[str, Any]:
    """``PhysicalSizeX/Y/Z`` in um from an OME-XML document's first ``Pixels`` element.

    Sizes in another unit (``PhysicalSizeXUnit="nm"``) are converted; an unknown unit leaves the
    size out (the default is then assumed, with a note). Empty when there is no such element.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return {}
    out: dict[str, Any] = {}
    for axis in "XYZ":
        value = pixels.get(f"PhysicalSize{axis}")
        unit = pixels.get(f"PhysicalSize{axis}Unit", "um")
        factor = _OME_UNITS_UM.get(unit.strip().lower())
        size = _positive_float(value)
        if size is not None and factor is not None:
            out[f"PhysicalSize{axis}"] = size * factor
    return out


def _raw_metadata(tif: tifffile.TiffFile) -> dict[str, Any]:
    """The shaped JSON dict if there is one, else ImageJ metadata, else the voxel sizes of
    OME-XML, else an empty dict."""
    shaped = tif.shaped_metadata
    if shaped and isinstance(shaped[0], Mapping):
        return dict(shaped[0])
    if tif.imagej_metadata:
        return dict(tif.imagej_metadata)
    if tif.is_ome and tif.ome_metadata:
        return ome_metadata(tif.ome_metadata)
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


@contextlib.contextmanager
def reading(path: Path, what: str = "not a readable TIFF") -> Iterator[None]:
    """Turn ANY exception raised while opening, parsing or decoding ``path`` into one
    ``InputError`` naming the file.

    A damaged header or IFD makes tifffile (and numpy under it) raise nearly anything:
    struct.error, TiffFileError, ValueError, ZeroDivisionError, TypeError, KeyError,
    AssertionError, RuntimeError, MemoryError (a header claiming a huge image) were all seen. The
    one rule for every reader (inference, scoring, training) is: that file fails, with one line,
    and the run goes on. ``InputError`` passes through unchanged; KeyboardInterrupt and SystemExit
    are not ``Exception``s and still stop the run.
    """
    try:
        with _tifffile_quiet(path):
            yield
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring: a damaged file raises anything
        log.debug("%s: %s", path.name, what, exc_info=True)
        raise InputError(f"{path.name}: {what} ({one_line(exc)})") from None


def _open(path: Path) -> tifffile.TiffFile:
    if path.is_symlink() and not path.exists():
        raise InputError(f"{path.name}: broken symbolic link (to {os.readlink(path)})")
    with reading(path):
        if path.stat().st_size == 0:
            raise InputError(f"{path.name}: empty file (0 bytes)")
        return tifffile.TiffFile(path)


def inspect_case(path: str | Path) -> CaseInfo:
    """Read a case's header and metadata without reading its pixels; ``InputError`` (one line
    naming the file) for anything that goes wrong, whatever tifffile raised."""
    path = Path(path)
    with _open(path) as tif, reading(path):
        if not tif.series:
            raise InputError(f"{path.name}: TIFF holds no image")
        series = tif.series[0]
        series_shape = tuple(int(n) for n in series.shape)
        shape = _squeezed_3d_shape(series_shape, series.axes, path)
        meta = parse_meta(_raw_metadata(tif), path=path, page=tif.pages[0])
        if series_shape != shape:
            meta = dataclasses.replace(meta, stored_shape=series_shape, stored_axes=str(series.axes))
        _check_pixel_data_in_file(series, path)
        return CaseInfo(path=path, shape=shape, dtype=np.dtype(series.dtype), meta=meta)


def _check_pixel_data_in_file(series: tifffile.TiffPageSeries, path: Path) -> None:
    """``InputError`` when the header points at pixel data past the end of the file (a copy or
    download cut short): found here, from the header, instead of when the pixels are read."""
    if series.dataoffset is not None:  # contiguous: one block
        end = series.dataoffset + series.nbytes
    else:
        end = max((offset + count for page in series.pages if page is not None
                   for offset, count in zip(page.dataoffsets, page.databytecounts)), default=0)
    size = path.stat().st_size
    if end > size:
        raise InputError(f"{path.name}: truncated TIFF: its pixel data ends at byte {end}, the file has {size}")


def read_case(path: str | Path, *, info: CaseInfo | None = None) -> Case:
    """Read a 3-D volume and its metadata; ``InputError`` for anything that is not one."""
    path = Path(path)
    info = info or inspect_case(path)
    with _open(path) as tif, reading(path, "truncated or corrupt TIFF"):
        volume = tif.series[0].asarray()
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
        with self._lock, reading(self.path, "truncated or corrupt TIFF"):
            for start in range(0, len(unique), 64):  # bounded key lists, one decode call each
                chunk = unique[start:start + 64]
                out[start:start + len(chunk)] = self._tif.asarray(
                    key=[int(i) for i in chunk], series=0).reshape((len(chunk),) + self.shape[1:])
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
            with _tifffile_quiet(path):
                return tifffile.memmap(path, mode="r").reshape(info.shape)
        except Exception:  # noqa: BLE001 - not mappable (compressed, tiled, damaged): read otherwise
            return None

    if memmap and (volume := mapped()) is not None:
        return volume
    tif = _open(path)
    try:
        with reading(path):
            series = tif.series[0]
            paged = len(series.pages) == info.shape[0] and tuple(series.keyframe.shape) == info.shape[1:]
    except BaseException:
        tif.close()
        raise
    if paged:
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
    ``InputError`` "<kind> not found" when there is no such folder.

    A broken symbolic link named ``.tif`` is listed (opening it fails with its own line), so it
    is never skipped silently; folders and other non-files named ``.tif`` are not cases.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{kind} not found: {folder}")
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in TIFF_SUFFIXES and not p.name.startswith(".")
                  and (p.is_file() or (p.is_symlink() and not p.exists())))


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
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf"/"nan": the written metadata stays strict JSON
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return str(value)
    return value


def output_metadata(meta: CaseMeta) -> dict[str, Any]:
    """The input's metadata dict to write back, with explicit axes and the voxel size used.

    ``shape`` is dropped because tifffile writes its own (a stale one corrupts the header).
    """
    md = {str(k): _jsonable(v) for k, v in meta.raw.items() if k != "shape"}
    md["axes"] = meta.stored_axes if meta.stored_shape is not None and meta.stored_axes else "ZYX"
    keys = {_key(k) for k in md}
    for axis, size in zip("ZYX", meta.voxel_size.zyx):
        if f"physicalsize{axis.lower()}" not in keys:
            md[f"PhysicalSize{axis}"] = size
    return md


def write_case(path: str | Path, volume: np.ndarray, meta: CaseMeta, *, imagej: bool = False) -> Path:
    """Write a uint16 ZYX volume like the organisers' template, atomically.

    ``imagej``: an ImageJ hyperstack instead (for Fiji and napari, not for the challenge): the
    template's resolution tag has no unit, so Fiji shows no micron calibration and no z spacing;
    here X/Y resolution in pixels per micron, ``spacing`` (z, microns) and ``unit`` make it open
    to scale. ImageJ files are not tiled and hold Z, Y, X only (singleton axes are dropped).

    The file is written under a hidden temporary name in the destination folder (at most
    ``_TEMP_NAME_CHARS`` characters of the name, so long names still fit) and renamed into
    place, so readers never see a partial output. A case stored with singleton axes
    (``meta.stored_shape``, e.g. (1, Z, Y, X)) is written back in that shape. Voxel sizes outside
    ``VOXEL_SIZE_RANGE_UM`` (only possible in a hand-made ``CaseMeta``) get the default in the
    resolution tag rather than failing the write.
    """
    path = Path(path)
    if volume.ndim != 3 or volume.dtype != np.uint16:
        raise ValueError(f"write_case expects a 3-D uint16 volume, got {volume.ndim}-D {volume.dtype}")
    if meta.stored_shape is not None and math.prod(meta.stored_shape) == volume.size:
        volume = volume.reshape(meta.stored_shape)
    vs = meta.voxel_size
    resolution = tuple(1.0 / (_voxel_size(size) or DEFAULT_VOXEL_SIZE_UM) for size in (vs.x, vs.y))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name[:_TEMP_NAME_CHARS]}.", suffix=PARTIAL_SUFFIX,
                                    dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if imagej:
            z = _voxel_size(vs.z) or DEFAULT_VOXEL_SIZE_UM
            tifffile.imwrite(tmp, volume.reshape(volume.shape[-3:]) if volume.ndim > 3 else volume, imagej=True,
                             resolution=resolution, metadata={"spacing": z, "unit": "um", "axes": "ZYX"})
        else:
            tifffile.imwrite(
                tmp, volume, bigtiff=True, tile=OUTPUT_TILE, photometric="minisblack",
                resolution=resolution, metadata=output_metadata(meta),
            )
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the grader may read as another user
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def stale_partials(folder: str | Path) -> list[Path]:
    """Temporary outputs (``.<name>.<8 random>.partial``) a killed run left in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _PARTIAL_NAME.match(p.name) and p.is_file())
