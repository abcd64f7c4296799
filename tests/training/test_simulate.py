"""The single-view simulator: determinism, each physical effect, config validation, calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from skimage.metrics import structural_similarity

from fusecare.errors import ConfigError
from fusecare.normalize import normalize
from fusecare.training.phantoms import PHANTOM_VOXEL_SIZE_ZYX, membrane_phantom, nuclei_phantom
from fusecare.training.simulate import (
    SimulationParams,
    SimulatorConfig,
    apply,
    axial_blur,
    camera_noise,
    clean_signal,
    depth_scatter_blur,
    expected_photons,
    fuse_views,
    opposite_sides,
    randomise_content,
    render_pair,
    shadow_stripes,
    simulate_pair,
    simulate_single_view,
    zoom_content,
)

SHAPE = (32, 128, 128)
VS = PHANTOM_VOXEL_SIZE_ZYX


def fmc_ssim(target: np.ndarray, single_view: np.ndarray) -> float:
    return float(structural_similarity(normalize(target), normalize(single_view), data_range=1))


def quiet_params(**changes: object) -> SimulationParams:
    """Every effect off (no attenuation, blur, stripes; photons high, no read noise)."""
    base = SimulatorConfig().sample(np.random.default_rng(0)).replace(
        illumination_axis="x",
        illumination_from_start=True,
        detection_from_start=True,
        mu_illumination=0.0,
        illumination_floor=0.0,
        mu_detection=0.0,
        scatter_rate=0.0,
        axial_sigma_um=0.0,
        stripe_count=0,
        foreground_photons=1000.0,
        read_noise=0.0,
    )
    return base.replace(**changes)


@pytest.fixture(scope="module")
def nuclei() -> np.ndarray:
    return nuclei_phantom(SHAPE, rng=np.random.default_rng(0))


def uniform_specimen(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    return np.ones(shape, dtype=np.float32)


# --------------------------------------------------------------------------- API, determinism


def test_shape_dtype_and_determinism(nuclei: np.ndarray) -> None:
    a, pa = simulate_single_view(nuclei, VS, seed=7)
    b, pb = simulate_single_view(nuclei, VS, seed=7)
    c, pc = simulate_single_view(nuclei, VS, seed=8)
    assert a.shape == nuclei.shape and a.dtype == np.uint16
    assert np.array_equal(a, b) and pa == pb
    assert pa != pc and not np.array_equal(a, c)


def test_generator_seed_is_accepted(nuclei: np.ndarray) -> None:
    a, _ = simulate_single_view(nuclei, VS, seed=np.random.default_rng(3))
    b, _ = simulate_single_view(nuclei, VS, seed=3)
    assert np.array_equal(a, b)


def test_params_roundtrip_json_reproduces_the_pair(nuclei: np.ndarray) -> None:
    rng = np.random.default_rng(11)
    params = SimulatorConfig().sample(rng)
    state = rng.bit_generator.state
    first = apply(nuclei, VS, params, rng)
    restored = SimulationParams.from_dict(json.loads(json.dumps(params.to_dict())))
    assert restored == params
    rng2 = np.random.default_rng()
    rng2.bit_generator.state = state
    assert np.array_equal(apply(nuclei, VS, restored, rng2), first)
    with pytest.raises(ConfigError, match="bogus"):
        SimulationParams.from_dict({**params.to_dict(), "bogus": 1})


@pytest.mark.parametrize("shape", [(75, 75, 75), (100, 100, 100)])
def test_cubic_volumes(shape: tuple[int, int, int]) -> None:
    clean = nuclei_phantom(shape, rng=np.random.default_rng(1))
    out, _ = simulate_single_view(clean, (0.284, 0.127, 0.127), seed=0)
    assert out.shape == shape and out.dtype == np.uint16
    assert out.max() > out.min()


def test_rejects_non_3d() -> None:
    with pytest.raises(ValueError, match="3-D"):
        simulate_single_view(np.zeros((8, 8)), VS, seed=0)
    with pytest.raises(ValueError, match="voxel_size"):
        simulate_single_view(np.zeros((4, 8, 8)), (1.0, 0.0, 1.0), seed=0)


# --------------------------------------------------------------------------- physical effects


@pytest.mark.parametrize("axis_name,axis", [("x", 2), ("y", 1)])
@pytest.mark.parametrize("from_start", [True, False])
def test_illumination_attenuation_follows_beer_lambert(
    axis_name: str, axis: int, from_start: bool
) -> None:
    mu = 0.05
    params = quiet_params(
        illumination_axis=axis_name, illumination_from_start=from_start, mu_illumination=mu
    )
    photons = expected_photons(uniform_specimen(), VS, params)
    other = tuple(a for a in range(3) if a != axis)
    profile = photons.mean(axis=other)
    if not from_start:
        profile = profile[::-1]
    assert np.all(np.diff(profile) < 0), "light must fade along its path"
    # exp(-mu * L) between the first and the last voxel centre of a uniform specimen.
    length = (photons.shape[axis] - 1) * VS[axis]
    assert profile[-1] / profile[0] == pytest.approx(np.exp(-mu * length), rel=1e-3)


def test_illumination_floor_keeps_deep_regions_lit() -> None:
    params = quiet_params(mu_illumination=0.5, illumination_floor=0.1)
    photons = expected_photons(uniform_specimen(), VS, params)
    profile = photons.mean(axis=(0, 1))
    assert profile[-1] / 1000.0 == pytest.approx(0.1, rel=0.01)  # the diffuse floor of 1000 photons
    assert profile[0] / 1000.0 == pytest.approx(0.1 + 0.9 * np.exp(-0.5 * 0.5 * VS[2]), rel=1e-3)


def test_detection_attenuation_along_z() -> None:
    for from_start in (True, False):
        params = quiet_params(mu_detection=0.05, detection_from_start=from_start)
        profile = expected_photons(uniform_specimen(), VS, params).mean(axis=(1, 2))
        if not from_start:
            profile = profile[::-1]
        assert np.all(np.diff(profile) < 0)
        expected = np.exp(-0.05 * (SHAPE[0] - 1) * VS[0])
        assert profile[-1] / profile[0] == pytest.approx(expected, rel=1e-3)


def test_no_attenuation_outside_the_specimen() -> None:
    """Light crosses empty medium unattenuated: density comes from the specimen, not the box."""
    clean = np.zeros(SHAPE, dtype=np.float32)
    clean[:, :, 64:] = 1.0  # specimen only in the far half along x
    mu = 0.05
    photons = expected_photons(clean, VS, quiet_params(mu_illumination=mu))
    col = photons[:, 40:88, :].mean(axis=(0, 1))
    # Unattenuated level is foreground_photons (1000): the sheet reaches the specimen intact
    # (a whole-box density would leave exp(-0.05 * 28 um) = 25 % at x = 70)...
    assert col[70] > 850
    # ...and fades by Beer-Lambert inside it.
    assert col[120] / col[70] == pytest.approx(np.exp(-mu * 50 * VS[2]), rel=0.02)


def _y_width(plane: np.ndarray) -> float:
    """Standard deviation of a line's profile across y (in voxels)."""
    profile = plane.mean(axis=1)
    profile = np.clip(profile - np.median(profile), 0, None)
    y = np.arange(profile.size)
    mean = (profile * y).sum() / profile.sum()
    return float(np.sqrt((profile * (y - mean) ** 2).sum() / profile.sum()))


def test_scatter_blur_widens_with_depth() -> None:
    """Lines along x at a shallow and a deep z: the deep one comes out broader."""
    clean = np.full(SHAPE, 0.2, dtype=np.float32)
    clean[:, :, :4] = 0.0  # some true background so the specimen level is not the zero point
    for z in (4, 28):
        for y in (32, 64, 96):
            clean[z, y, 8:] = 1.0
    widths = {}
    for from_start in (True, False):
        params = quiet_params(
            scatter_rate=0.05, scatter_max_sigma_um=5.0, detection_from_start=from_start
        )
        out = expected_photons(clean, VS, params)
        widths[from_start] = (_y_width(out[4, 48:80, 16:]), _y_width(out[28, 48:80, 16:]))
    shallow, deep = widths[True]
    assert deep > 1.5 * shallow
    deep_rev, shallow_rev = widths[False]  # seen from the other side z=28 is the shallow line
    assert deep_rev > 1.5 * shallow_rev
    # With no scattering both lines keep the same width.
    still = expected_photons(clean, VS, quiet_params())
    assert _y_width(still[4, 48:80, 16:]) == pytest.approx(_y_width(still[28, 48:80, 16:]), rel=0.05)


def test_depth_scatter_blur_matches_gaussian_sigma() -> None:
    vol = np.zeros((3, 65, 65), dtype=np.float32)
    vol[:, 32, 32] = 1.0
    depth = np.zeros_like(vol)
    depth[1] = 20.0  # um
    depth[2] = 40.0
    out = depth_scatter_blur(vol, depth, (1.0, 0.1, 0.1), rate=0.01, max_sigma_um=5.0, levels=5)
    y = np.arange(65) - 32
    for z, sigma_um in ((1, 0.2), (2, 0.4)):
        profile = out[z].sum(axis=1)
        var = (profile * y**2).sum() / profile.sum()
        assert np.sqrt(var) == pytest.approx(sigma_um / 0.1, rel=0.05)
    assert out[0, 32, 32] > out[2, 32, 32]


def test_axial_blur_is_along_z_only() -> None:
    vol = np.zeros((41, 9, 9), dtype=np.float32)
    vol[20] = 1.0
    out = axial_blur(vol, (0.5, 0.2, 0.2), sigma_um=1.5)
    z = np.arange(41) - 20
    profile = out[:, 4, 4]
    assert np.sqrt((profile * z**2).sum() / profile.sum()) == pytest.approx(3.0, rel=0.02)
    assert np.allclose(out, out[:, :1, :1])  # nothing moved laterally
    elongated = expected_photons(
        np.pad(vol, ((0, 0), (4, 4), (4, 4))), (0.5, 0.2, 0.2), quiet_params(axial_sigma_um=1.5)
    )
    assert (elongated[:, 8, 8] > 0.5 * elongated[20, 8, 8]).sum() > 3


@pytest.mark.parametrize("axis_name,axis", [("x", 2), ("y", 1)])
def test_stripes_run_along_the_illumination_axis(axis_name: str, axis: int) -> None:
    params = quiet_params(
        illumination_axis=axis_name, stripe_count=8, stripe_strength=0.6, stripe_width_um=(0.8, 2.0)
    )
    out = expected_photons(uniform_specimen(), VS, params)
    other = 3 - axis
    # Beyond the onset region (first quarter of the path) the shadow persists unchanged.
    far = np.take(out, np.arange(out.shape[axis] // 2, out.shape[axis]), axis=axis)
    var_along = far.var(axis=axis).mean()
    var_across = far.var(axis=other).mean()
    assert var_across > 0
    assert var_along < 0.05 * var_across
    assert out.max() <= 1000.0 * (1 + 1e-5)  # shadows only remove light (unshadowed: 1000)
    assert out.min() < 900.0


def test_stripes_off_when_count_zero() -> None:
    ones = shadow_stripes(
        SHAPE, VS, 2, True, count=0, strength=0.5, width_um=(1, 2), rng=np.random.default_rng(0)
    )
    assert np.all(ones == 1.0)


def test_camera_noise_is_poisson_gaussian_with_offset() -> None:
    rng = np.random.default_rng(5)
    levels = np.array([0.0, 10.0, 100.0, 1000.0], dtype=np.float32)
    photons = np.broadcast_to(levels[:, None, None], (4, 200, 200)).copy()
    counts = camera_noise(photons, rng, read_noise=3.0, offset=100.0).astype(np.float64)
    means = counts.mean(axis=(1, 2))
    variances = counts.var(axis=(1, 2))
    assert np.allclose(means, levels + 100.0, atol=0.5)
    # Var = photons (shot noise) + read_noise**2 (+ 1/12 from rounding to integers).
    assert np.allclose(variances, levels + 9.0 + 1 / 12, rtol=0.08)
    assert counts.dtype == np.float64 and np.all(counts[0] >= 0)


def test_camera_noise_clips_to_uint16() -> None:
    photons = np.full((2, 4, 4), 1e6, dtype=np.float32)
    counts = camera_noise(photons, np.random.default_rng(0), read_noise=0, offset=100)
    assert counts.dtype == np.uint16 and counts.max() == 65535


def test_background_shows_the_camera_offset(nuclei: np.ndarray) -> None:
    clean = nuclei.copy()
    clean[:, :, :20] = 0.0  # outside the specimen
    out, params = simulate_single_view(clean, VS, seed=2)
    bg = out[:, :, :10].astype(np.float64)
    assert bg.mean() == pytest.approx(params.camera_offset, abs=1.0)
    assert bg.std() == pytest.approx(params.read_noise, rel=0.15, abs=0.3)


def test_noise_variance_rises_with_signal_in_simulated_view() -> None:
    clean = np.zeros(SHAPE, dtype=np.float32)
    clean[:, 8:64] = 0.25
    clean[:, 64:] = 1.0
    params = quiet_params(foreground_photons=400.0, read_noise=2.0)
    out = apply(clean, VS, params, np.random.default_rng(0)).astype(np.float64)
    dim, bright = out[:, 8:64], out[:, 64:]
    assert dim.mean() == pytest.approx(100.0 + 100.0, abs=0.5)
    assert bright.mean() == pytest.approx(100.0 + 400.0, abs=0.5)
    # Poisson: the variance above the read-noise floor follows the mean photon count.
    for region in (dim, bright):
        assert region.var() - 4.0 - 1 / 12 == pytest.approx(region.mean() - 100.0, rel=0.05)
    assert bright.var() > 2 * dim.var()


# --------------------------------------------------------------------------- config


def test_config_defaults_validate_and_roundtrip(tmp_path) -> None:
    cfg = SimulatorConfig()
    cfg.save(tmp_path / "sim.json")
    assert SimulatorConfig.load(tmp_path / "sim.json") == cfg
    assert "mu_illumination" in SimulatorConfig.describe()


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"mu_illumination": (0.01, 2.0)}, "mu_illumination"),
        ({"foreground_photons": (200.0, 100.0)}, "foreground_photons"),
        ({"stripe_strength": (-0.1, 0.2)}, "stripe_strength"),
        ({"illumination_axes": ("z",)}, "illumination_axes"),
        ({"illumination_axes": ()}, "illumination_axes"),
        ({"scatter_levels": 1}, "scatter_levels"),
        ({"signal_percentiles": (50.0, 50.0)}, "signal_percentiles"),
        ({"content_zoom": (0.1, 2.0)}, "content_zoom"),
        ({"content_zoom": (2.0, 0.5)}, "content_zoom"),
    ],
)
def test_config_rejects_bad_values(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SimulatorConfig.from_dict(changes)


def test_config_rejects_unknown_key() -> None:
    with pytest.raises(ConfigError, match="mu_ilumination"):
        SimulatorConfig.from_dict({"mu_ilumination": [0.01, 0.02]})


def test_sample_stays_in_ranges() -> None:
    cfg = SimulatorConfig()
    for seed in range(20):
        p = cfg.sample(np.random.default_rng(seed))
        assert cfg.mu_illumination[0] <= p.mu_illumination <= cfg.mu_illumination[1]
        assert cfg.foreground_photons[0] <= p.foreground_photons <= cfg.foreground_photons[1]
        assert cfg.stripe_count[0] <= p.stripe_count <= cfg.stripe_count[1]
        assert p.illumination_axis in cfg.illumination_axes


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("make", [nuclei_phantom, membrane_phantom])
@pytest.mark.parametrize("phantom_seed", [0, 1])
def test_calibration_on_phantoms(make, phantom_seed: int) -> None:
    """FMC SSIM(input, target) sits in the band the contract asks for (0.5 .. 0.9)."""
    clean = make(SHAPE, rng=np.random.default_rng(phantom_seed))
    scores = [fmc_ssim(clean, simulate_single_view(clean, VS, seed=s)[0]) for s in range(4)]
    assert all(0.5 <= s <= 0.9 for s in scores), scores
    assert max(scores) - min(scores) > 0.02  # the draws really differ


def _read_real(path) -> tuple[np.ndarray, tuple[float, float, float]]:
    with tifffile.TiffFile(path) as tif:
        md = tif.shaped_metadata[0]
        return tif.asarray(), (md["PhysicalSizeZ"], md["PhysicalSizeY"], md["PhysicalSizeX"])


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "name",
    ["plantnuclei_1135.tif", "cellpose3d_nuclei.tif", "ovule_membrane.tif", "cellpose3d_cyto.tif"],
)
def test_calibration_on_real_volumes(shared_data, name: str) -> None:
    """Median over draws in 0.5 .. 0.9; single draws may stray a little (noisy real targets)."""
    clean, vs = _read_real(shared_data / name)
    scores = [fmc_ssim(clean, simulate_single_view(clean, vs, seed=s)[0]) for s in range(4)]
    assert 0.5 <= float(np.median(scores)) <= 0.9, scores
    assert all(0.35 <= s <= 0.95 for s in scores), scores


# --------------------------------------------------------------------------- domain randomisation

WIDE = {"axial_sigma_voxels": [1.0, 2.0], "lateral_sigma_voxels": [0.3, 0.6], "quantize_probability": 1.0,
        "quantize_levels": [100, 100], "content_gamma": [0.5, 2.0], "bright_objects": [2, 2],
        "bright_object_level": [5.0, 5.0], "saturate_probability": 1.0, "sparse_probability": 1.0}


def test_default_config_draws_no_randomisation() -> None:
    config = SimulatorConfig()
    params = config.sample(np.random.default_rng(0))
    assert (params.axial_sigma_voxels, params.lateral_sigma_voxels, params.quantize_levels) == (0.0, 0.0, 0)
    assert not config.randomises_content
    assert SimulatorConfig.from_dict(WIDE).randomises_content


def test_wide_draws_stay_in_their_ranges() -> None:
    config = SimulatorConfig.from_dict(WIDE)
    for seed in range(10):
        p = config.sample(np.random.default_rng(seed))
        assert 1.0 <= p.axial_sigma_voxels <= 2.0 and 0.3 <= p.lateral_sigma_voxels <= 0.6
        assert p.quantize_levels == 100


def test_quantized_views_have_few_grey_levels(nuclei: np.ndarray) -> None:
    view, params = simulate_single_view(nuclei, VS, config=SimulatorConfig.from_dict(WIDE), seed=3)
    assert params.quantize_levels == 100 and view.dtype == np.uint16
    assert view.max() == 100 and len(np.unique(view)) <= 101


def test_axial_blur_in_voxels_acts_along_z_only() -> None:
    clean = np.zeros((32, 32, 32), np.float32)
    clean[16, 16, 16] = 1.0
    base = SimulatorConfig().sample(np.random.default_rng(0)).replace(
        mu_illumination=0.0, mu_detection=0.0, scatter_rate=0.0, stripe_count=0, axial_sigma_um=0.0)
    sharp = expected_photons(clean, (1.0, 1.0, 1.0), base)
    blurred = expected_photons(clean, (1.0, 1.0, 1.0), base.replace(axial_sigma_voxels=2.0))
    z_profile = blurred[:, 16, 16] / blurred[:, 16, 16].sum()
    z = np.arange(32) - 16
    assert np.sqrt((z_profile * z**2).sum()) == pytest.approx(2.0, rel=0.05)
    np.testing.assert_allclose(blurred.sum(axis=0), sharp.sum(axis=0), rtol=1e-4, atol=1e-6)


def test_bright_objects_take_the_top_percentiles_and_keep_the_structure(nuclei: np.ndarray) -> None:
    """The failure mode of unseen real data: p99.8 on a saturated outlier, dim structure beside it."""
    config = SimulatorConfig(bright_objects=(2, 2), bright_object_level=(5.0, 5.0))
    out = randomise_content(nuclei, VS, config, np.random.default_rng(0))
    base = randomise_content(nuclei, VS, SimulatorConfig(), np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == nuclei.shape
    assert np.percentile(out, 99.8) > 2.0 * np.percentile(base, 99.8)
    structure = base > 0.5
    np.testing.assert_array_equal(out[structure & (out <= base)], base[structure & (out <= base)])
    assert (out >= base).all()


def test_gamma_keeps_the_intensity_order(nuclei: np.ndarray) -> None:
    config = SimulatorConfig(content_gamma=(2.0, 2.0))
    out = randomise_content(nuclei, VS, config, np.random.default_rng(0))
    base = randomise_content(nuclei, VS, SimulatorConfig(), np.random.default_rng(0))
    np.testing.assert_allclose(out, base**2, rtol=1e-5, atol=1e-7)


def test_sparse_mask_blanks_part_of_the_specimen(nuclei: np.ndarray) -> None:
    config = SimulatorConfig(sparse_probability=1.0)
    out = randomise_content(nuclei, VS, config, np.random.default_rng(0))
    base = randomise_content(nuclei, VS, SimulatorConfig(), np.random.default_rng(0))
    kept = out.sum() / base.sum()
    assert 0.05 < kept < 0.9 and (out <= base + 1e-6).all()


def test_target_noise_is_shot_like(nuclei: np.ndarray) -> None:
    config = SimulatorConfig(target_noise=(0.2, 0.2))
    out = randomise_content(nuclei, VS, config, np.random.default_rng(0))
    base = randomise_content(nuclei, VS, SimulatorConfig(), np.random.default_rng(0))
    residual = out - base
    bright, dark = base > 0.8, (base > 0.05) & (base < 0.2)
    assert residual[bright].std() == pytest.approx(0.2 * np.sqrt(base[bright]).mean(), rel=0.15)
    assert residual[dark].std() < 0.6 * residual[bright].std()
    assert (out >= 0).all()


# --------------------------------------------------------------------------- fused targets


def test_clean_target_pair_is_the_single_view_and_the_clean_volume(nuclei: np.ndarray) -> None:
    view, target, params = simulate_pair(nuclei, VS, seed=5)
    single, single_params = simulate_single_view(nuclei, VS, seed=5)
    np.testing.assert_array_equal(view, single)
    assert target is nuclei and params == single_params


def test_fused_pair_keeps_the_view_and_draws_the_second_view_after_it(nuclei: np.ndarray) -> None:
    fused = SimulatorConfig(target="fused")
    view, target, _ = simulate_pair(nuclei, VS, config=fused, seed=5)
    np.testing.assert_array_equal(view, simulate_single_view(nuclei, VS, config=fused, seed=5)[0])
    again = simulate_pair(nuclei, VS, config=fused, seed=5)[1]
    np.testing.assert_array_equal(target, again)
    assert target.dtype == np.float32 and target.shape == nuclei.shape


def test_opposite_sides_flips_illumination_and_detection_only() -> None:
    params = SimulatorConfig().sample(np.random.default_rng(0)).replace(quantize_levels=200)
    other = opposite_sides(params, np.random.default_rng(1))
    assert other.illumination_from_start != params.illumination_from_start
    assert other.detection_from_start != params.detection_from_start
    assert other.quantize_levels == 0  # the fusion works on camera counts
    unchanged = {k: v for k, v in params.to_dict().items()
                 if k not in {"illumination_from_start", "detection_from_start", "stripe_seed", "quantize_levels"}}
    assert unchanged == {k: other.to_dict()[k] for k in unchanged}


def test_fuse_views_is_the_poisson_maximum_likelihood_estimate() -> None:
    """Views counting Poisson(g_i s) + offset: the fusion is unbiased for s, and its variance is
    s / (g_1 + g_2), below either view's own s / g_i."""
    rng = np.random.default_rng(0)
    s, gains, offset = 20.0, (3.0, 1.0), 100.0
    shape = (200_000,)
    counts = [rng.poisson(g * s, size=shape).astype(np.float32) + offset for g in gains]
    fused = fuse_views(counts, [np.full(shape, g, np.float32) for g in gains], offset)
    assert abs(fused.mean() - s) < 0.02 * s
    assert fused.var() == pytest.approx(s / sum(gains), rel=0.03)
    # the exact formula on small numbers
    out = fuse_views([np.array([110.0]), np.array([104.0])], [np.array([2.0]), np.array([2.0])], 100.0)
    assert out[0] == pytest.approx((10 + 4) / 4)


def test_fused_target_undoes_the_attenuation_the_view_suffers() -> None:
    """A uniform specimen lit from one side: the view's far half is dimmer than its near half;
    the fused target, lit from both sides, is flat within the noise, and the far half of the
    fused target is noisier relative to the view than the near half (there it is the other view)."""
    clean = uniform_specimen((16, 64, 64))
    params = quiet_params(mu_illumination=0.05, illumination_floor=0.0, foreground_photons=400.0)
    view, target = render_pair(clean, VS, params, np.random.default_rng(0), target="fused")
    view = view.astype(np.float32) - params.camera_offset
    near, far = slice(4, 20), slice(44, 60)  # along x, lit from index 0
    assert view[:, :, far].mean() < 0.5 * view[:, :, near].mean()
    assert target[:, :, far].mean() == pytest.approx(target[:, :, near].mean(), rel=0.05)
    # near the view's entry the target follows the view, far from it the target is the other view
    # (noise only: each plane's mean removed, since the view's brightness falls along x)
    noise_v, noise_t = (a - a.mean(axis=(0, 1), keepdims=True) for a in (view, target))
    corr = [np.corrcoef(noise_v[:, :, s].ravel(), noise_t[:, :, s].ravel())[0, 1] for s in (near, far)]
    assert corr[0] > corr[1] + 0.2


def test_fused_target_is_the_clean_signal_where_nothing_blurs(nuclei: np.ndarray) -> None:
    """With attenuation along both axes and stripes but no blur, the fusion divides every effect
    out again: the target is the clean signal within the noise (a gain that missed the detection
    transmission or the photon scale would be off by that factor)."""
    params = quiet_params(mu_illumination=0.06, mu_detection=0.05, stripe_count=6, stripe_strength=0.5,
                          foreground_photons=20000.0)
    _, target = render_pair(nuclei, VS, params, np.random.default_rng(0), target="fused")
    signal = clean_signal(nuclei, params.signal_percentiles)
    bright = signal > 0.3
    ratio = target[bright] / signal[bright]
    assert abs(np.median(ratio) - 1) < 0.01 and np.percentile(np.abs(ratio - 1), 99) < 0.05


def test_unknown_target_is_refused_by_field() -> None:
    with pytest.raises(ConfigError, match="target"):
        SimulatorConfig(target="blurred")


def test_zoom_content_draws_nothing_by_default(nuclei: np.ndarray) -> None:
    """Configs without zoom keep the volume and their random stream."""
    rng = np.random.default_rng(5)
    assert zoom_content(nuclei, SimulatorConfig(), rng) is nuclei
    assert rng.random() == np.random.default_rng(5).random()


def test_zoom_content_resamples_z_and_yx_within_the_range(nuclei: np.ndarray) -> None:
    config = SimulatorConfig.from_dict({"content_zoom": [0.5, 2.0]})
    shapes = set()
    for seed in range(12):
        zoomed = zoom_content(nuclei, config, np.random.default_rng(seed))
        assert zoomed.dtype == np.float32 and zoomed.min() >= 0.0
        (z, y, x), (nz, ny, _) = zoomed.shape, nuclei.shape
        assert y == x  # one lateral factor
        assert 0.5 * nz - 1 <= z <= 2.0 * nz + 1 and 0.5 * ny - 1 <= y <= 2.0 * ny + 1
        # linear resampling keeps the intensity scale: the mean moves little, the maximum not above
        assert abs(zoomed.mean() - nuclei.mean()) < 0.1 * nuclei.mean()
        assert zoomed.max() <= nuclei.max() + 1e-5
        shapes.add((z > nz, y > ny))
    assert len(shapes) >= 3  # Z and YX draw independently, both ways


def test_zoom_content_keeps_a_training_patch(nuclei: np.ndarray) -> None:
    """A volume that holds a patch still does after zooming out; one smaller than it is not forced to."""
    config = SimulatorConfig.from_dict({"content_zoom": [0.25, 0.25]})
    zoomed = zoom_content(nuclei, config, np.random.default_rng(0), minimum_shape=(16, 64, 64))
    assert zoomed.shape == (16, 64, 64)
    thin = nuclei[:8]
    assert zoom_content(thin, config, np.random.default_rng(0), minimum_shape=(16, 64, 64)).shape == (8, 64, 64)
