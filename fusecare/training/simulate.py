"""A physical single-view lightsheet model: clean (fused-quality) volume -> plausible single view.

No real single-view/fused pair is reachable for development (see the FMC contract, "No real
pairs here"), so training and test pairs are derived from clean volumes by modelling what a
single view loses compared with the fusion of opposite views:

* the light sheet enters from one side (Y or X, either end) and is absorbed on its way through
  the specimen (Beer-Lambert, ``exp(-mu * path length in specimen)``), so the far side is dim;
* absorbers near the entry side cast shadow stripes that persist along the light path;
* emitted light is absorbed and scattered on its way out along the detection axis Z, so deep
  planes are dimmer and blurrier (the blur widens with the depth in the specimen);
* the detection PSF is elongated along Z (extra axial Gaussian blur);
* the camera adds Poisson shot noise, Gaussian read noise and an offset, and quantises to uint16.

The pair's target (``SimulatorConfig.target``) is either the clean volume itself or, closer to a
real fused volume, the gain-weighted fusion of this view with the view lit and watched from the
opposite sides (``simulate_pair``, ``fuse_views``): it keeps the detection blur and, where the
input view is the better one, the input's own noise.

All lengths are in micrometres and converted with the voxel size, so one config suits volumes
of any sampling. ``SimulatorConfig`` holds ranges; ``SimulatorConfig.sample`` draws one concrete
``SimulationParams`` (JSON-serialisable, so a pair can be reproduced); ``apply`` renders it.
The default ranges were calibrated so that the challenge's SSIM between the normalised input and
target (3-D, 7-voxel window, data_range 1) lies between about 0.5 and 0.9. Over simulator seeds
0..15: phantoms (32x128x128 at 1.0/0.4/0.4 um, phantom seeds 0..3) 0.56-0.88; real volumes of
../shared/data median 0.60-0.78 per volume, single draws 0.41-0.86. The lowest draws are on the
noisy plant-nuclei crop (0.127 um voxels): any blur there removes its own pixel noise, which
SSIM counts as a loss. On small crops Beer-Lambert needs the fairly strong default mu to show;
``illumination_floor`` keeps a large specimen's far side dim but not black.

Everything is computed in memory on the whole volume (a few float32 copies): meant for training
crops and test volumes, not for gigavoxel cases.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
from scipy import ndimage

from fusecare.config import Config, param
from fusecare.errors import ConfigError
from fusecare.normalize import percentiles
from fusecare.optics import VoxelSizeZYX, path_length_um, sigma_voxels, smooth_um

log = logging.getLogger(__name__)

_AXES = {"y": 1, "x": 2}
TARGETS = ("clean", "fused")
"""What a simulated pair's target can be (``SimulatorConfig.target``)."""
_UINT16_MAX = 65535


class SimulatorConfig(Config):
    """Ranges the single-view degradation is sampled from (lengths in um, rates in 1/um)."""

    illumination_axes: tuple[str, ...] = param(
        ("y", "x"), doc="Lateral axes the light sheet may enter along (one is drawn).",
        choices=("y", "x"),
    )
    mu_illumination: tuple[float, float] = param(
        (0.035, 0.065), doc="Attenuation coefficient of the sheet per um of dense specimen.",
        ge=0.0, le=1.0,
    )
    illumination_floor: float = param(
        0.05, doc="Share of the sheet's light still reaching every voxel as diffuse excitation.",
        ge=0.0, le=1.0,
    )
    mu_detection: tuple[float, float] = param(
        (0.005, 0.02), doc="Attenuation of emitted light per um of specimen along Z.",
        ge=0.0, le=1.0,
    )
    scatter_rate: tuple[float, float] = param(
        (0.002, 0.01), doc="Scattering blur sigma (um) gained per um of specimen depth along Z.",
        ge=0.0, le=0.5,
    )
    scatter_max_sigma_um: float = param(
        2.0, doc="Cap on the depth-dependent scattering sigma (um).", gt=0.0, le=50.0
    )
    scatter_levels: int = param(
        4, doc="Pre-blurred copies blended by depth to approximate the widening blur.", ge=2, le=16
    )
    axial_sigma_um: tuple[float, float] = param(
        (0.05, 0.35), doc="Extra Gaussian blur along Z from the elongated detection PSF (um).",
        ge=0.0, le=20.0,
    )
    stripe_count: tuple[int, int] = param(
        (1, 6), doc="Number of absorbers casting shadow stripes along the light path.", ge=0, le=100
    )
    stripe_strength: tuple[float, float] = param(
        (0.1, 0.4), doc="Largest fractional light loss at a stripe's centre.", ge=0.0, le=1.0
    )
    stripe_width_um: tuple[float, float] = param(
        (0.5, 3.0), doc="Gaussian sigma of an absorber across the light path (um; drawn per stripe).",
        gt=0.0, le=100.0,
    )
    foreground_photons: tuple[float, float] = param(
        (75.0, 200.0),
        doc="Mean photons per voxel in the specimen's bright part, before attenuation (log-uniform).",
        gt=0.0, le=30000.0,
    )
    read_noise: tuple[float, float] = param(
        (1.0, 3.0), doc="Gaussian camera read noise, standard deviation in counts.", ge=0.0, le=1000.0
    )
    camera_offset: float = param(
        100.0, doc="Constant camera offset added to every pixel (counts).", ge=0.0, le=10000.0
    )
    density_sigma_um: float = param(
        2.0, doc="Smoothing that turns the clean volume into a specimen density map (um).",
        gt=0.0, le=100.0,
    )
    signal_percentiles: tuple[float, float] = param(
        (0.5, 99.9), doc="Clean-volume percentiles mapped to zero and to the bright level.",
        ge=0.0, le=100.0,
    )

    axial_sigma_voxels: tuple[float, float] = param(
        (0.0, 0.0), doc="Extra axial blur in voxels, on top of axial_sigma_um (sampling-independent "
        "domain randomisation: real axial PSFs span several voxels whatever the voxel size).",
        ge=0.0, le=20.0,
    )
    lateral_sigma_voxels: tuple[float, float] = param(
        (0.0, 0.0), doc="Lateral (YX) blur of the view in voxels (defocus, a wide sheet).", ge=0.0, le=10.0
    )
    quantize_probability: float = param(
        0.0, doc="Chance that the view is stored in few grey levels (8-bit-like data in uint16).",
        ge=0.0, le=1.0,
    )
    quantize_levels: tuple[int, int] = param(
        (255, 255), doc="Grey levels the view's maximum maps to when it is quantised.", ge=8, le=65535
    )
    content_gamma: tuple[float, float] = param(
        (1.0, 1.0), doc="Gamma applied to the clean volume's 0..1 signal (log-uniform; the target "
        "changes too): skews intensity distributions away from what percentiles expect.",
        gt=0.0, le=10.0,
    )
    bright_objects: tuple[int, int] = param(
        (0, 0), doc="Saturated bright blobs added to the clean volume (target and view alike), so "
        "that p99.8 can sit on an outlier as in real data.", ge=0, le=100,
    )
    bright_object_level: tuple[float, float] = param(
        (2.0, 8.0), doc="Brightness of those blobs relative to the clean volume's p99.8.", gt=0.0, le=100.0
    )
    bright_object_radius_voxels: tuple[float, float] = param(
        (3.0, 12.0), doc="Radius of each bright blob in voxels (YX; Z scaled by the voxel aspect).",
        gt=0.0, le=200.0,
    )
    saturate_probability: float = param(
        0.0, doc="Chance that the clean volume is clipped at a drawn high percentile (saturated "
        "detector, flat-topped structures).", ge=0.0, le=1.0,
    )
    sparse_probability: float = param(
        0.0, doc="Chance that a smooth random mask blanks part of the specimen (sparse foreground).",
        ge=0.0, le=1.0,
    )
    content_zoom: tuple[float, float] = param(
        (1.0, 1.0), doc="Resampling factor of a training volume before each simulation, drawn "
        "log-uniformly and independently for Z and for YX (``zoom_content``; the voxel size is "
        "kept): structures bigger or smaller in voxels and more or less anisotropic, so that a "
        "network meets structure sizes its few training volumes lack. Training views only.",
        ge=0.25, le=4.0,
    )
    target_noise: tuple[float, float] = param(
        (0.0, 0.0), doc="Noise left in the clean volume itself (standard deviation at signal 1, "
        "shot-noise-like: scaled by sqrt(signal)): real fused targets are not noise-free, and a "
        "restoration that smooths their texture away loses SSIM.", ge=0.0, le=2.0,
    )

    target: str = param(
        "clean", choices=TARGETS,
        doc="What a simulated pair's target is. 'clean': the clean volume itself (noise-free, "
        "unattenuated, sharp). 'fused': the fusion of the input view with the view lit and "
        "watched from the opposite sides (``fuse_views``), as a dual-view microscope's fused "
        "volume is: it keeps the detection PSF and part of the input's own noise, so a restoration "
        "trained on it learns to keep the input where the input is already good and to fill in "
        "where the other view would have seen better, instead of smoothing every texture away.",
    )

    def validate(self) -> None:
        if not self.illumination_axes:
            raise ConfigError("config field 'illumination_axes' must name at least one of 'y', 'x'")
        if self.signal_percentiles[0] >= self.signal_percentiles[1]:
            raise ConfigError("config field 'signal_percentiles' needs low < high")

    def sample(self, rng: np.random.Generator) -> SimulationParams:
        """Draw one concrete degradation from the ranges."""

        def uniform(bounds: tuple[float, float]) -> float:
            return float(rng.uniform(bounds[0], bounds[1]))

        lo, hi = self.foreground_photons
        return SimulationParams(
            illumination_axis=str(rng.choice(self.illumination_axes)),
            illumination_from_start=bool(rng.integers(2)),
            detection_from_start=bool(rng.integers(2)),
            mu_illumination=uniform(self.mu_illumination),
            illumination_floor=self.illumination_floor,
            mu_detection=uniform(self.mu_detection),
            scatter_rate=uniform(self.scatter_rate),
            scatter_max_sigma_um=self.scatter_max_sigma_um,
            scatter_levels=self.scatter_levels,
            axial_sigma_um=uniform(self.axial_sigma_um),
            stripe_count=int(rng.integers(self.stripe_count[0], self.stripe_count[1] + 1)),
            stripe_strength=uniform(self.stripe_strength),
            stripe_width_um=self.stripe_width_um,
            stripe_seed=int(rng.integers(2**31)),
            foreground_photons=float(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
            read_noise=uniform(self.read_noise),
            camera_offset=self.camera_offset,
            density_sigma_um=self.density_sigma_um,
            signal_percentiles=self.signal_percentiles,
            # Drawn only where the config asks, so default configs keep their random streams.
            axial_sigma_voxels=uniform(self.axial_sigma_voxels) if self.axial_sigma_voxels[1] > 0 else 0.0,
            lateral_sigma_voxels=(uniform(self.lateral_sigma_voxels)
                                  if self.lateral_sigma_voxels[1] > 0 else 0.0),
            quantize_levels=(int(rng.integers(self.quantize_levels[0], self.quantize_levels[1] + 1))
                             if self.quantize_probability > 0 and rng.random() < self.quantize_probability
                             else 0),
        )

    @property
    def randomises_content(self) -> bool:
        """Whether ``randomise_content`` changes a clean volume under this config."""
        return (self.content_gamma != (1.0, 1.0) or self.bright_objects[1] > 0
                or self.saturate_probability > 0 or self.sparse_probability > 0 or self.target_noise[1] > 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimulationParams:
    """One concrete draw of the degradation; with the noise generator it reproduces a view exactly
    (a fused target also needs ``SimulatorConfig.target`` and the same generator, which draws the
    second view after the first).

    ``*_from_start`` says whether light enters (illumination) or leaves towards the objective
    (detection) at index 0 of its axis. Stripe geometry is drawn from ``stripe_seed``.
    """

    illumination_axis: str
    illumination_from_start: bool
    detection_from_start: bool
    mu_illumination: float
    illumination_floor: float
    mu_detection: float
    scatter_rate: float
    scatter_max_sigma_um: float
    scatter_levels: int
    axial_sigma_um: float
    stripe_count: int
    stripe_strength: float
    stripe_width_um: tuple[float, float]
    stripe_seed: int
    foreground_photons: float
    read_noise: float
    camera_offset: float
    density_sigma_um: float
    signal_percentiles: tuple[float, float]
    axial_sigma_voxels: float = 0.0
    lateral_sigma_voxels: float = 0.0
    quantize_levels: int = 0
    """0: stored as photon counts; else the view's maximum maps to this many grey levels."""

    def __post_init__(self) -> None:
        if self.illumination_axis not in _AXES:
            raise ConfigError(f"illumination_axis must be 'y' or 'x', got {self.illumination_axis!r}")
        object.__setattr__(self, "stripe_width_um", tuple(float(v) for v in self.stripe_width_um))
        object.__setattr__(self, "signal_percentiles", tuple(float(v) for v in self.signal_percentiles))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimulationParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown SimulationParams key(s) {unknown}")
        return cls(**data)

    def replace(self, **changes: Any) -> SimulationParams:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- helpers


def _check_volume(clean: np.ndarray, voxel_size_zyx: VoxelSizeZYX) -> tuple[float, float, float]:
    if clean.ndim != 3:
        raise ValueError(f"expected a 3-D ZYX volume, got shape {clean.shape}")
    if len(voxel_size_zyx) != 3 or not all(float(v) > 0 for v in voxel_size_zyx):
        raise ValueError(f"voxel_size_zyx must be three positive lengths in um, got {voxel_size_zyx}")
    return tuple(float(v) for v in voxel_size_zyx)  # type: ignore[return-value]


def clean_signal(clean: np.ndarray, percentiles_lo_hi: tuple[float, float]) -> np.ndarray:
    """Clean volume -> fluorophore concentration, 0 at the low and 1 at the high percentile.

    A constant volume (no percentile spread) is taken as uniformly stained: signal 1.
    """
    lo, hi = percentiles(clean, percentiles_lo_hi)
    if not hi > lo:  # a uniform specimen: all of it is stain
        lo, hi = 0.0, (hi if hi > 0 else 1.0)
    scale = hi - lo
    signal = (clean.astype(np.float32) - np.float32(lo)) / np.float32(scale)
    np.maximum(signal, 0.0, out=signal)
    return signal


def foreground_level(signal: np.ndarray) -> float:
    """Mean signal of the voxels brighter than the volume's mean: the level of stained structure.

    Photon counts are set at this level rather than at the brightest voxels, so that sparse
    volumes with a few very bright spots get the same shot-noise quality in their bulk as
    dense ones do.
    """
    sub = signal[:: max(1, signal.shape[0] // 32)]
    bright = sub[sub >= sub.mean()]
    return float(bright.mean()) if bright.size else 1.0


def specimen_density(signal: np.ndarray, voxel_size_zyx: VoxelSizeZYX, sigma_um: float) -> np.ndarray:
    """A soft specimen map in [0, 1]: smoothed signal relative to its dense (95th pct) level.

    Tissue absorbs and scatters where it is, bright or not, so a smoothed signal stands in for
    the specimen's optical density; the plain background outside the specimen stays near 0.
    """
    smooth = smooth_um(signal, sigma_um, voxel_size_zyx)
    ref = float(np.percentile(smooth[:: max(1, smooth.shape[0] // 16)], 95))
    if ref <= 0:
        return np.zeros_like(smooth)
    density = smooth / np.float32(ref)
    np.clip(density, 0.0, 1.0, out=density)
    return density


# --------------------------------------------------------------------------- physical effects


def illumination_transmission(
    density: np.ndarray,
    voxel_size_zyx: VoxelSizeZYX,
    axis: int,
    from_start: bool,
    mu: float,
    floor: float = 0.0,
) -> np.ndarray:
    """Beer-Lambert: fraction of the light sheet left at each voxel, exp(-mu * path in specimen).

    Light scattered out of the sheet is not lost to the specimen: a ``floor`` share excites
    everywhere as diffuse light, so deep regions of a large specimen are dim but not black.
    """
    path = path_length_um(density, axis, from_start, voxel_size_zyx[axis])
    out = np.exp(-np.float32(mu) * path)
    if floor > 0:
        out *= np.float32(1.0 - floor)
        out += np.float32(floor)
    return out


def detection_transmission(depth_um: np.ndarray, mu: float) -> np.ndarray:
    """Beer-Lambert for the emitted light on its way out to the objective along Z, given the
    specimen path to the objective (``path_length_um`` along axis 0)."""
    return np.exp(-np.float32(mu) * depth_um)


def shadow_stripes(
    shape: tuple[int, int, int],
    voxel_size_zyx: VoxelSizeZYX,
    axis: int,
    from_start: bool,
    *,
    count: int,
    strength: float,
    width_um: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """Multiplicative shadow map of absorbers near the entry side.

    Each absorber is a Gaussian blob in the plane across the light path (Z and the other
    lateral axis); from where it sits (in the first quarter of the path) to the far side it
    removes a fraction of the sheet, so its shadow is a stripe along the illumination axis.
    """
    out = np.ones(shape, dtype=np.float32)
    if count <= 0 or strength <= 0:
        return out
    other = 3 - axis  # the lateral axis across the light path
    z_um = (np.arange(shape[0], dtype=np.float32) + 0.5) * voxel_size_zyx[0]
    o_um = (np.arange(shape[other], dtype=np.float32) + 0.5) * voxel_size_zyx[other]
    t_um = (np.arange(shape[axis], dtype=np.float32) + 0.5) * voxel_size_zyx[axis]
    if not from_start:
        t_um = t_um[::-1].copy()
    length = shape[axis] * voxel_size_zyx[axis]
    for _ in range(count):
        width = float(rng.uniform(*width_um))
        z0 = rng.uniform(0, z_um[-1] + 0.5 * voxel_size_zyx[0])
        o0 = rng.uniform(0, o_um[-1] + 0.5 * voxel_size_zyx[other])
        t0 = rng.uniform(0, 0.25 * length)
        loss = strength * float(rng.uniform(0.4, 1.0))
        dz2 = ((z_um - z0) / width)[:, None] ** 2
        do2 = ((o_um - o0) / width)[None, :] ** 2
        cross = np.exp(-0.5 * (dz2 + do2))
        onset = 1.0 / (1.0 + np.exp(-(t_um - t0) / max(width, 1e-3)))
        # Broadcast the (Z, other) cross-section and the 1-D onset to ZYX.
        if axis == 2:
            factor = cross[:, :, None] * onset[None, None, :]
        else:
            factor = cross[:, None, :] * onset[None, :, None]
        out *= 1.0 - np.float32(loss) * factor.astype(np.float32)
    return out


def axial_blur(volume: np.ndarray, voxel_size_zyx: VoxelSizeZYX, sigma_um: float) -> np.ndarray:
    """Extra Gaussian blur along Z: the detection PSF is several times longer than it is wide."""
    if sigma_um <= 0:
        return volume
    return ndimage.gaussian_filter1d(volume, sigma_um / voxel_size_zyx[0], axis=0, mode="nearest")


def depth_scatter_blur(
    volume: np.ndarray,
    depth_um: np.ndarray,
    voxel_size_zyx: VoxelSizeZYX,
    *,
    rate: float,
    max_sigma_um: float,
    levels: int = 4,
) -> np.ndarray:
    """Blur whose sigma grows with the depth into the specimen: sigma = rate * depth (um).

    Scattering along the way out widens the image of deep emitters. A spatially varying
    Gaussian is approximated by blending ``levels`` copies blurred at evenly spaced sigmas,
    each voxel interpolating linearly between the two copies that bracket its own sigma.
    """
    sigma = np.minimum(np.float32(rate) * depth_um, np.float32(max_sigma_um))
    top = float(sigma.max()) if sigma.size else 0.0
    if top <= 1e-6:
        return volume
    level_sigmas = np.linspace(0.0, top, levels)
    pos = sigma * np.float32((levels - 1) / top)
    low = np.minimum(pos.astype(np.int32), levels - 2)
    frac = pos - low
    out = np.zeros_like(volume, dtype=np.float32)
    for i, s in enumerate(level_sigmas):
        weight = np.where(low == i, 1.0 - frac, 0.0) + np.where(low == i - 1, frac, 0.0)
        if not weight.any():
            continue
        if s == 0:
            copy = volume
        else:
            copy = ndimage.gaussian_filter(volume, sigma_voxels(s, voxel_size_zyx), mode="nearest")
        out += weight.astype(np.float32) * copy
    return out


def camera_noise(
    photons: np.ndarray, rng: np.random.Generator, *, read_noise: float, offset: float
) -> np.ndarray:
    """Poisson shot noise on the expected photons, Gaussian read noise, offset, uint16 counts."""
    counts = rng.poisson(np.maximum(photons, 0.0)).astype(np.float32)
    if read_noise > 0:
        counts += rng.normal(0.0, read_noise, size=counts.shape).astype(np.float32)
    counts += np.float32(offset)
    np.rint(counts, out=counts)
    np.clip(counts, 0, _UINT16_MAX, out=counts)
    return counts.astype(np.uint16)


# --------------------------------------------------------------------------- pipeline


def expected_photons(
    clean: np.ndarray, voxel_size_zyx: VoxelSizeZYX, params: SimulationParams
) -> np.ndarray:
    """The noise-free single view in photons: every optical effect, no camera."""
    return _render(clean, voxel_size_zyx, params)[0]


Specimen = tuple[np.ndarray, np.ndarray]
"""(signal, density) of a clean volume: what every view of it shares (``_specimen``)."""


def _specimen(clean: np.ndarray, voxel_size_zyx: VoxelSizeZYX, params: SimulationParams) -> Specimen:
    """The clean signal and the specimen density the light is absorbed by; the same for every view
    of one volume under one draw (they depend on ``signal_percentiles`` and ``density_sigma_um`` only)."""
    signal = clean_signal(clean, params.signal_percentiles)
    return signal, specimen_density(signal, _check_volume(clean, voxel_size_zyx), params.density_sigma_um)


def _render(
    clean: np.ndarray, voxel_size_zyx: VoxelSizeZYX, params: SimulationParams, specimen: Specimen | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Expected photons of the view and its gain: photons per unit of clean signal at each voxel
    (illumination and detection transmission times the photon scale, before any blur).
    ``specimen`` skips recomputing ``_specimen`` for a second view of the same volume."""
    vs = _check_volume(clean, voxel_size_zyx)
    signal, density = specimen or _specimen(clean, vs, params)
    axis = _AXES[params.illumination_axis]
    excitation = illumination_transmission(
        density,
        vs,
        axis,
        params.illumination_from_start,
        params.mu_illumination,
        params.illumination_floor,
    )
    excitation *= shadow_stripes(
        signal.shape,
        vs,
        axis,
        params.illumination_from_start,
        count=params.stripe_count,
        strength=params.stripe_strength,
        width_um=params.stripe_width_um,
        rng=np.random.default_rng(params.stripe_seed),
    )
    depth = path_length_um(density, 0, params.detection_from_start, vs[0])  # also the scattering depth
    transmission = detection_transmission(depth, params.mu_detection)
    emitted = signal * excitation
    emitted *= transmission  # this order keeps the views of earlier versions bit-identical
    gain = excitation  # excitation is not read again
    gain *= transmission
    axial_um = math.hypot(params.axial_sigma_um, params.axial_sigma_voxels * vs[0])
    emitted = axial_blur(emitted, vs, axial_um)
    if params.lateral_sigma_voxels > 0:
        emitted = ndimage.gaussian_filter(emitted, (0.0, params.lateral_sigma_voxels,
                                                    params.lateral_sigma_voxels), mode="nearest")
    emitted = depth_scatter_blur(
        emitted,
        depth,
        vs,
        rate=params.scatter_rate,
        max_sigma_um=params.scatter_max_sigma_um,
        levels=params.scatter_levels,
    )
    scale = np.float32(params.foreground_photons / max(foreground_level(signal), 1e-6))
    emitted *= scale
    gain *= scale
    return emitted, gain


def apply(
    clean: np.ndarray, voxel_size_zyx: VoxelSizeZYX, params: SimulationParams, rng: np.random.Generator
) -> np.ndarray:
    """Render the single view for given params; ``rng`` draws the camera noise only."""
    return _apply_with_gain(clean, voxel_size_zyx, params, rng)[0]


def _apply_with_gain(
    clean: np.ndarray, voxel_size_zyx: VoxelSizeZYX, params: SimulationParams, rng: np.random.Generator,
    specimen: Specimen | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored view, its camera counts before any quantisation, and its gain."""
    photons, gain = _render(clean, voxel_size_zyx, params, specimen)
    counts = camera_noise(photons, rng, read_noise=params.read_noise, offset=params.camera_offset)
    view = quantize(counts, params.quantize_levels) if params.quantize_levels else counts
    return view, counts, gain


def opposite_sides(params: SimulationParams, rng: np.random.Generator) -> SimulationParams:
    """The second view of a dual-view microscope: the same optics and camera, the sheet entering
    from the other end of its axis and the light collected by the opposing objective; its own
    shadow stripes."""
    return params.replace(illumination_from_start=not params.illumination_from_start,
                          detection_from_start=not params.detection_from_start,
                          stripe_seed=int(rng.integers(2**31)), quantize_levels=0)


def fuse_views(counts: list[np.ndarray], gains: list[np.ndarray], offset: float) -> np.ndarray:
    """Gain-weighted fusion of views of one signal: ``sum(counts_i - offset) / sum(g_i)``.

    Were view ``i`` to count ``Poisson(g_i s) + offset`` with no blur, this would be the
    maximum-likelihood estimate of ``s``: each view weighted by its gain, which is what multi-view
    fusion's quality weights approximate. Where one view is much brighter the fusion is that view
    (with its own noise); where both see alike, the noise drops by sqrt(2). The views are blurred
    after their gain, so at stripe edges and attenuation fronts it is a gain-weighted average of
    blurred images rather than the exact estimate; read noise, rounding and clipping make it
    approximate too. Returned in units of ``clean_signal`` (float32); read noise can make dark
    voxels slightly negative.
    """
    total = np.zeros(counts[0].shape, dtype=np.float32)
    for view in counts:
        total += view.astype(np.float32) - np.float32(offset)
    weight = np.zeros_like(total)
    for gain in gains:
        weight += gain
    np.maximum(weight, np.float32(1e-6), out=weight)
    total /= weight
    return total


def simulate_pair(
    clean: np.ndarray,
    voxel_size_zyx: VoxelSizeZYX,
    *,
    config: SimulatorConfig = SimulatorConfig(),
    seed: int | np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, SimulationParams]:
    """A (single view, target) pair from a clean volume, the target as ``config.target`` says.

    The view is exactly ``simulate_single_view``'s for the same seed: the second view of a fused
    target is drawn after it from the same generator.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    params = config.sample(rng)
    view, target = render_pair(clean, voxel_size_zyx, params, rng, target=config.target)
    return view, target, params


def render_pair(
    clean: np.ndarray, voxel_size_zyx: VoxelSizeZYX, params: SimulationParams, rng: np.random.Generator,
    *, target: str = "clean",
) -> tuple[np.ndarray, np.ndarray]:
    """``apply`` for the view, then the target (``SimulatorConfig.target``): ``clean`` itself, or
    the fusion with the opposite view, whose stripes and noise ``rng`` draws after the view's."""
    if target not in TARGETS:
        raise ConfigError(f"target must be one of {TARGETS}, got {target!r}")
    specimen = _specimen(clean, voxel_size_zyx, params)
    view, counts, gain = _apply_with_gain(clean, voxel_size_zyx, params, rng, specimen)
    if target == "clean":
        return view, clean
    _, counts_b, gain_b = _apply_with_gain(clean, voxel_size_zyx, opposite_sides(params, rng), rng, specimen)
    return view, fuse_views([counts, counts_b], [gain, gain_b], params.camera_offset)


def quantize(counts: np.ndarray, levels: int) -> np.ndarray:
    """Rescale a view so its maximum is ``levels`` and round: 8-bit-like data kept in uint16."""
    top = float(counts.max())
    if top <= 0:
        return counts
    scaled = np.rint(counts.astype(np.float32) * np.float32(levels / top))
    return scaled.astype(np.uint16)


def _blob_field(shape: tuple[int, int, int], voxel_size_zyx: VoxelSizeZYX, count: int,
                radius_voxels: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Union of ``count`` solid ellipsoids (1 inside, 0 outside), soft-edged by one voxel."""
    field = np.zeros(shape, dtype=np.float32)
    aspect = voxel_size_zyx[1] / voxel_size_zyx[0]
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    for _ in range(count):
        r = float(rng.uniform(*radius_voxels))
        centre = [rng.uniform(0, n) for n in shape]
        radii = (max(r * aspect, 1.0), r, r)
        d2 = sum(((g - c) / rr) ** 2 for g, c, rr in zip(grids, centre, radii))
        edge = np.clip((1.0 - np.sqrt(d2)) * r, 0.0, 1.0).astype(np.float32)
        np.maximum(field, edge, out=field)
    return field


def randomise_content(clean: np.ndarray, voxel_size_zyx: VoxelSizeZYX, config: SimulatorConfig,
                      rng: np.random.Generator) -> np.ndarray:
    """A new clean volume (float32, 0..~1 signal) with intensity statistics drawn from ``config``.

    Real volumes break what percentile normalisation assumes: a saturated bright object beside
    dim structure puts p99.8 on the outlier, gamma-like responses skew the histogram, and the
    specimen may fill the volume or a corner of it. A network that never saw these learns to
    re-create its training volumes' statistics, and on such a case brightens the dim structure
    and flattens the bright object (a systematic error no ensemble disagreement reveals). The
    returned volume is the training target and the simulator's clean input alike.
    """
    vs = _check_volume(clean, voxel_size_zyx)
    signal = clean_signal(clean, (0.5, 99.8))
    np.minimum(signal, 4.0, out=signal)  # existing outliers stay outliers, within bounds
    lo_g, hi_g = config.content_gamma
    if (lo_g, hi_g) != (1.0, 1.0):
        gamma = math.exp(rng.uniform(math.log(lo_g), math.log(hi_g)))
        np.power(signal, np.float32(gamma), out=signal)
    if config.sparse_probability > 0 and rng.random() < config.sparse_probability:
        noise = ndimage.gaussian_filter(rng.standard_normal(signal.shape).astype(np.float32),
                                        [max(1.0, n / 4) for n in signal.shape], mode="wrap")
        keep = float(rng.uniform(0.2, 0.7))
        cut = float(np.quantile(noise, 1.0 - keep))
        signal *= np.clip((noise - cut) / (np.std(noise) * 0.2 + 1e-12), 0.0, 1.0)
    if config.saturate_probability > 0 and rng.random() < config.saturate_probability:
        level = float(np.percentile(signal[:: max(1, signal.shape[0] // 16)], rng.uniform(97.0, 99.9)))
        if level > 0:
            np.minimum(signal, np.float32(level), out=signal)
    count = int(rng.integers(config.bright_objects[0], config.bright_objects[1] + 1))
    if count > 0:
        level = float(rng.uniform(*config.bright_object_level))
        blobs = _blob_field(signal.shape, vs, count, config.bright_object_radius_voxels, rng)
        np.maximum(signal, np.float32(level) * blobs, out=signal)
    if config.target_noise[1] > 0:
        sigma = float(rng.uniform(*config.target_noise))
        signal += np.float32(sigma) * np.sqrt(signal) * rng.standard_normal(signal.shape, dtype=np.float32)
        np.maximum(signal, 0.0, out=signal)
    return signal


def zoom_content(clean: np.ndarray, config: SimulatorConfig, rng: np.random.Generator, *,
                 minimum_shape: tuple[int, int, int] = (1, 1, 1)) -> np.ndarray:
    """``clean`` resampled (linear interpolation) by factors drawn from ``config.content_zoom``:
    one for Z, one shared by Y and X (lateral sampling is isotropic); each factor is raised where
    needed so that the result keeps at least ``minimum_shape`` (a training patch) on every axis
    the volume already covers. The default range (1, 1) returns ``clean`` itself and draws
    nothing, so configs without zoom keep their random streams; otherwise the result is float32."""
    lo, hi = config.content_zoom
    if (lo, hi) == (1.0, 1.0):
        return clean
    z_factor, yx_factor = (math.exp(rng.uniform(math.log(lo), math.log(hi))) for _ in range(2))
    factors = []
    for n, factor, least in zip(clean.shape, (z_factor, yx_factor, yx_factor), minimum_shape):
        floor = least / n if n >= least else 1.0
        factors.append(max(factor, floor))
    shape = tuple(max(1, round(n * f)) for n, f in zip(clean.shape, factors))
    if shape == clean.shape:
        return clean.astype(np.float32, copy=False)
    return ndimage.zoom(clean.astype(np.float32, copy=False), [m / n for m, n in zip(shape, clean.shape)],
                        order=1, mode="nearest", grid_mode=True)


def simulate_single_view(
    clean: np.ndarray,
    voxel_size_zyx: tuple[float, float, float],
    *,
    config: SimulatorConfig = SimulatorConfig(),
    seed: int | np.random.Generator,
) -> tuple[np.ndarray, SimulationParams]:
    """Derive a uint16 single view of the same shape from a clean ZYX volume, deterministic per seed."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    params = config.sample(rng)
    log.debug("simulating single view with %s", params)
    return apply(clean, voxel_size_zyx, params, rng), params
