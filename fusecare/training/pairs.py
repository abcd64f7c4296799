"""Training data: Fuse My Cells pairs on disk, and patches drawn from (input, target) volumes.

FMC pairs are found by name (``image_{i}_{nucleus|membrane}_{angle|fused}.tif``) and checked
before any training starts: an unpaired file or an angle/fused shape mismatch is an error that
names the files (header reads only, no pixels). Volumes are opened with ``io.open_volume``
(memory-mapped, or read a z-plane page at a time), so a folder of 2 GB volumes is never all in RAM.

Patches: foreground is found once per volume on a block-max downsampled target (streamed over
z-slabs), and patch corners are drawn from foreground blocks with probability
``foreground_fraction``; this replaces CSBDeep's rejection test (keep a patch when its
max-filtered target exceeds 0.4 x the 99.9th percentile) with a direct draw that never loops on
sparse volumes. Normalisation uses jittered percentiles (pmin in [1, 3], pmax in [99.5, 99.9])
of the whole volume by default, as inference sees it; per-patch percentiles are an option.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusecare.config import Config
from fusecare.errors import InputError
from fusecare.io import CHANNELS, CaseInfo, inspect_case, tiff_files
from fusecare.normalize import percentiles
from fusecare.restoration.attenuation import AttenuationField

log = logging.getLogger(__name__)

FMC_NAME = re.compile(r"^image_(?P<id>\d+)_(?P<channel>nucleus|membrane)_(?P<kind>angle|fused)\.tiff?$",
                      re.IGNORECASE)


@dataclass(frozen=True)
class FmcPair:
    """One single-view input and its fused target."""

    case_id: int
    channel: str
    angle: CaseInfo
    fused: CaseInfo

    @property
    def study(self) -> int | None:
        return self.angle.meta.study if self.angle.meta.study is not None else self.fused.meta.study


def discover_fmc_pairs(folder: str | Path, *, channel: str | None = None) -> list[FmcPair]:
    """All FMC pairs of a folder (optionally of one channel), validated from their headers.

    Files that do not follow the FMC naming are ignored with a warning. A pair that cannot train
    (an angle or fused file without its partner, a file that cannot be read: damaged header,
    pixels past the end of the file, broken link, ...; angle and fused of different shapes) is
    one ``FAILED <file>: <reason>`` line and is left out: one bad file among hundreds must not
    stop a training run (the readers' one rule, see ``io.reading``). ``InputError`` when no pair
    is left. The metadata of angle and fused may disagree (a known quirk of nucleus ids
    213..399): only shapes are compared.
    """
    found: dict[tuple[int, str], dict[str, Path]] = {}
    for path in tiff_files(folder, kind="FMC folder"):
        match = FMC_NAME.match(path.name)
        if match is None:
            log.warning("ignoring %s: not named image_<id>_<nucleus|membrane>_<angle|fused>.tif", path.name)
            continue
        key = (int(match["id"]), match["channel"].lower())
        found.setdefault(key, {})[match["kind"].lower()] = path
    pairs = []
    for (case_id, ch), kinds in sorted(found.items()):
        if channel is not None and ch != channel:
            continue
        if set(kinds) != {"angle", "fused"}:
            (only,) = kinds.values()
            missing = "fused" if "angle" in kinds else "angle"
            log.error("FAILED %s: has no %s partner in %s; left out", only.name, missing, folder)
            continue
        infos: dict[str, CaseInfo] = {}
        for kind in ("angle", "fused"):
            try:
                infos[kind] = inspect_case(kinds[kind])
            except InputError as exc:
                reason = str(exc).removeprefix(f"{kinds[kind].name}: ")
                log.error("FAILED %s: %s; pair %d (%s) left out", kinds[kind].name, reason, case_id, ch)
        if len(infos) < 2:
            continue
        angle, fused = infos["angle"], infos["fused"]
        if angle.shape != fused.shape:
            log.error("FAILED %s: shape mismatch: %s is %s, %s is %s; pair %d (%s) left out", angle.path.name,
                      angle.path.name, angle.shape, fused.path.name, fused.shape, case_id, ch)
            continue
        pairs.append(FmcPair(case_id, ch, angle, fused))
    if not pairs:
        raise InputError(f"no FMC pair (image_<id>_<channel>_angle/fused.tif) in {folder}"
                         + (f" for channel {channel}" if channel else ""))
    return pairs


def split_by_study(pairs: Sequence[FmcPair], validation_studies: Sequence[int]
                   ) -> tuple[list[FmcPair], list[FmcPair]]:
    """Hold whole studies out for validation, so validation measures unseen acquisitions."""
    held = set(validation_studies)
    train = [p for p in pairs if p.study not in held]
    validation = [p for p in pairs if p.study in held]
    if held and not validation:
        studies = sorted({p.study for p in pairs if p.study is not None})
        if not studies:
            raise InputError(f"no pair of validation studies {sorted(held)}: no file names its study "
                             "(the 'study' key of the TIFF metadata, as the Fuse My Cells files do)")
        raise InputError(f"no pair of validation studies {sorted(held)}; studies present: {studies}")
    if not train:
        raise InputError("every pair is in a validation study: nothing left to train on")
    return train, validation


# --------------------------------------------------------------------------- patches


FOREGROUND_THRESHOLD, FOREGROUND_QUANTILE = 0.4, 99.9
"""A block is foreground when its maximum exceeds 0.4 x the target's 99.9th percentile (CSBDeep)..."""
FOREGROUND_BLOCK_QUANTILE = 90.0
"""...or 0.4 x the 90th percentile of the block maxima, whichever is lower: when a few saturated
objects hold the volume's top percentiles, the structure beside them is still foreground."""


def foreground_blocks(target: np.ndarray, block: tuple[int, int, int], *, threshold: float = FOREGROUND_THRESHOLD,
                      quantile: float = FOREGROUND_QUANTILE, quantile_value: float | None = None) -> np.ndarray:
    """Boolean map of blocks whose maximum exceeds ``threshold`` x a reference level: the target's
    ``quantile``, capped by the ``FOREGROUND_BLOCK_QUANTILE`` of the block maxima.

    ``quantile_value``: that percentile when the caller has it already (it costs a pass over the
    volume). Computed slab by slab on the block maxima, so it never holds a float copy of the volume.
    """
    if quantile_value is None:
        quantile_value = percentiles(target, (quantile,))[0]
    shape = tuple(-(-n // b) for n, b in zip(target.shape, block))
    maxima = np.empty(shape, dtype=np.float64)
    bz, by, bx = block
    for i in range(shape[0]):
        slab = np.asarray(target[i * bz:(i + 1) * bz], dtype=np.float32)
        pad = [(0, bz - slab.shape[0]), (0, -slab.shape[1] % by), (0, -slab.shape[2] % bx)]
        slab = np.pad(slab, pad, mode="edge")
        maxima[i] = slab.reshape(bz, shape[1], by, shape[2], bx).max(axis=(0, 2, 4))
    reference = min(float(quantile_value), float(np.percentile(maxima, FOREGROUND_BLOCK_QUANTILE)))
    return maxima > threshold * reference


class PatchSettings(Config):
    """The patch-sampling settings the sampler needs (``TrainConfig`` documents and bounds them,
    and makes these with ``TrainConfig.patch_settings``)."""

    patch: tuple[int, int, int] = (32, 64, 64)
    foreground_fraction: float = 0.9
    pmin: tuple[float, float] = (1.0, 3.0)
    pmax: tuple[float, float] = (99.5, 99.9)
    normalize_per_patch: bool = False


class PairPatches:
    """Random normalised, augmented patches of one (input, target) volume pair."""

    def __init__(self, source: np.ndarray, target: np.ndarray, settings: PatchSettings,
                 source_field: AttenuationField | None = None) -> None:
        """``source_field``: the view's attenuation field (``ModelConfig.corrected_input``); each
        normalised input patch is multiplied by it, as inference multiplies the normalised view."""
        if source.shape != target.shape:
            raise InputError(f"input {source.shape} and target {target.shape} differ in shape")
        if source_field is not None and source_field.shape != source.shape:
            raise ValueError(f"the field covers {source_field.shape}, the input is {source.shape}")
        self.source, self.target, self.settings = source, target, settings
        self.source_field = source_field
        self.patch = tuple(min(p, n) for p, n in zip(settings.patch, source.shape))
        self._block = tuple(max(1, p // 2) for p in self.patch)
        # Whole-volume percentiles at the jitter range's ends, interpolated per draw (not needed
        # per patch); the target's foreground level comes from the same histogram pass.
        qs = () if settings.normalize_per_patch else (*settings.pmin, *settings.pmax)
        *target_q, foreground_q = percentiles(target, (*qs, FOREGROUND_QUANTILE))
        self._foreground = np.argwhere(foreground_blocks(target, self._block, quantile_value=foreground_q))
        self._source_q = dict(zip(qs, percentiles(source, qs))) if qs else {}
        self._target_q = dict(zip(qs, target_q))

    def _corner(self, rng: np.random.Generator) -> tuple[int, ...]:
        limits = [n - p for n, p in zip(self.source.shape, self.patch)]
        if len(self._foreground) and rng.random() < self.settings.foreground_fraction:
            centre = (self._foreground[rng.integers(len(self._foreground))] + rng.random(3)) * self._block
            return tuple(int(np.clip(c - p / 2, 0, lim)) for c, p, lim in zip(centre, self.patch, limits))
        return tuple(int(rng.integers(0, lim + 1)) for lim in limits)

    def _levels(self, quantiles: dict[float, float], block: np.ndarray, lo: float, hi: float
                ) -> tuple[float, float]:
        if self.settings.normalize_per_patch:
            return percentiles(block, (lo, hi))  # type: ignore[return-value]
        (a, b), (c, d) = self.settings.pmin, self.settings.pmax

        def interp(q: float, q0: float, q1: float) -> float:
            t = 0.0 if q1 == q0 else (q - q0) / (q1 - q0)
            return quantiles[q0] + t * (quantiles[q1] - quantiles[q0])
        return interp(lo, a, b), interp(hi, c, d)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One (input, target) float32 patch pair, normalised and augmented alike."""
        corner = self._corner(rng)
        region = tuple(slice(c, c + p) for c, p in zip(corner, self.patch))
        # Copies: normalisation below works in place, and a float32 volume would be a view.
        x = np.array(self.source[region], dtype=np.float32, copy=True)
        y = np.array(self.target[region], dtype=np.float32, copy=True)
        lo, hi = rng.uniform(*self.settings.pmin), rng.uniform(*self.settings.pmax)
        for block, q in ((x, self._source_q), (y, self._target_q)):
            low, high = self._levels(q, block, lo, hi)
            block -= np.float32(low)
            block *= np.float32(1.0 / max(high - low, 1e-6))
        if self.source_field is not None:
            x *= self.source_field.region(region)
        return augment(x, y, rng)


def augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random flips (Z, Y, X) and 90-degree YX rotation applied to both patches."""
    k = int(rng.integers(4)) if x.shape[1] == x.shape[2] else 2 * int(rng.integers(2))
    flips = [axis for axis in range(3) if rng.random() < 0.5]
    out = []
    for block in (x, y):
        block = np.rot90(block, k, axes=(1, 2))
        if flips:
            block = np.flip(block, axis=flips)
        out.append(np.ascontiguousarray(block))
    return out[0], out[1]


# --------------------------------------------------------------------------- volume splits

SPLIT_ROLES = ("train", "validation", "test")


def load_split(path: str | Path, data_dir: str | Path) -> dict[str, dict[str, list[Path]]]:
    """A volume-level split (``{channel: {train, validation, test: [file names]}}``), checked.

    Generalisation is only measured if no test volume leaks into training or checkpoint choice,
    so a volume listed twice in a channel, a test volume that another channel trains or validates
    on, an unknown role or channel, or a file missing from ``data_dir`` is an ``InputError``
    naming it, before anything is trained or scored. A channel may validate on a volume that
    another channel trains on: each channel's nets are trained apart, so it is content they
    never saw, as long as no recipe warm-starts one channel's nets from the other's trained on
    it (the loader cannot see ``init_weights``; the model card lists each chain).
    """
    path, data_dir = Path(path), Path(data_dir)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"split {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise InputError(f"split {path}: expected a JSON object of channels")
    split: dict[str, dict[str, list[Path]]] = {}
    for channel, roles in raw.items():
        if channel == "about":
            continue
        if channel not in CHANNELS or not isinstance(roles, dict):
            raise InputError(f"split {path}: unknown channel {channel!r} (expected {list(CHANNELS)})")
        unknown = sorted(set(roles) - set(SPLIT_ROLES))
        if unknown:
            raise InputError(f"split {path}: {channel} has unknown role(s) {unknown} (expected {list(SPLIT_ROLES)})")
        seen: dict[str, str] = {}
        split[channel] = {}
        for role in SPLIT_ROLES:
            files = []
            for name in roles.get(role, []):
                if name in seen:
                    raise InputError(f"split {path}: {channel} volume {name} is listed under both "
                                     f"{seen[name]!r} and {role!r}")
                seen[name] = role
                file = data_dir / name
                if not file.is_file():
                    raise InputError(f"split {path}: {channel} {role} volume {name} not found in {data_dir}")
                files.append(file)
            split[channel][role] = files
    for channel, roles in split.items():  # a test volume of one channel trains or validates no other
        for other, other_roles in split.items():
            if other == channel:
                continue
            for role in ("train", "validation"):
                leaked = sorted(set(roles["test"]) & set(other_roles[role]))
                if leaked:
                    raise InputError(f"split {path}: {channel} test volume {leaked[0].name} is listed under "
                                     f"{other} {role!r}; a test volume trains and validates nothing")
    return split


def check_clean_volume(name: str, volume: np.ndarray) -> None:
    """Refuse a clean volume that cannot make training pairs: its percentiles collapse (constant,
    empty of foreground, or a few bright voxels in a flat volume: 99.8 % of it is one level)."""
    low, high = percentiles(volume, (0.5, 99.8))
    if not high > low:
        raise InputError(f"clean volume {name}: its intensity percentiles collapse (p0.5 = p99.8 = {low:g}: "
                         "constant, no foreground, or a few bright voxels in a flat volume); nothing to learn from")
