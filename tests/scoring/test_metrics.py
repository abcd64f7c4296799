"""fusecare.scoring.metrics against scikit-image, on tiles of every size, and the N-SSIM contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from skimage.metrics import structural_similarity

from fusecare.errors import InputError
from fusecare.normalize import PercentileNorm, normalize
from fusecare.scoring import metrics
from fusecare.scoring.metrics import SsimScores, fmc_ssim, n_ssim, score_ssim, ssim

TOL = 1e-6  # the contract asks 1e-5; float32 tiles stay within ~1e-8 of skimage in float64


def sk_ssim(
    a: np.ndarray, b: np.ndarray, *, window: str = "uniform", per_slice: bool = False, **kw
) -> float:
    """skimage in float64, with the option set that each of our windows promises to match."""
    if window == "gaussian":
        kw = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, **kw}
    kw.setdefault("data_range", 1.0)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if per_slice:
        return float(np.mean([structural_similarity(p, q, **kw) for p, q in zip(a64, b64)]))
    return float(structural_similarity(a64, b64, **kw))


def smooth_pair(
    rng: np.random.Generator, shape: tuple[int, ...], noise: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """A structured volume (smoothed noise in [0, 1]) and a noisy version, float32."""
    a = ndi.gaussian_filter(rng.random(shape), 1.5)
    a = (a - a.min()) / (a.max() - a.min())
    b = a + noise * rng.standard_normal(shape)
    return a.astype(np.float32), b.astype(np.float32)


@pytest.mark.parametrize("shape", [(7, 7, 7), (9, 20, 33), (13, 31, 17), (32, 128, 128)])
@pytest.mark.parametrize("slab", [None, 1, 3, 5])
def test_random_volumes_match_skimage(rng, shape, slab):
    a = rng.random(shape, dtype=np.float32)
    b = (0.6 * a + 0.4 * rng.random(shape, dtype=np.float32)).astype(np.float32)
    assert ssim(a, b, slab=slab) == pytest.approx(sk_ssim(a, b), abs=TOL)


@pytest.mark.parametrize("slab", [None, 1, 2, 5])
def test_structured_volumes_match_skimage(rng, slab):
    a, b = smooth_pair(rng, (24, 96, 80))
    assert ssim(a, b, slab=slab) == pytest.approx(sk_ssim(a, b), abs=TOL)


@pytest.mark.parametrize("budget", [500, 3000, 20000])
def test_row_tiles_match_skimage(rng, monkeypatch, budget):
    """A tiny budget splits planes into row blocks: their y halo must be exact too."""
    monkeypatch.setattr(metrics, "_TILE_VOXELS", budget)
    a, b = smooth_pair(rng, (16, 70, 50))
    assert ssim(a, b) == pytest.approx(sk_ssim(a, b), abs=TOL)
    expected = sk_ssim(a, b, window="gaussian")
    assert ssim(a, b, slab=3, window="gaussian") == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize(("window", "kw"), [("uniform", {}), ("gaussian", {}), ("gaussian", {"win_size": 7}),
                                         ("uniform", {"per_slice": True})])
@pytest.mark.parametrize("slab", [None, 3])
def test_read_slabs_match_skimage(rng, monkeypatch, window, kw, slab):
    """Volumes read a few planes at a time: every slab boundary and both volume ends stay exact."""
    monkeypatch.setattr(metrics, "_SLAB_BYTES", 1)
    monkeypatch.setattr(metrics, "_MIN_SLAB", 2)
    a, b = smooth_pair(rng, (23, 40, 36))
    expected = sk_ssim(a, b, window=window, **kw)
    assert ssim(a, b, window=window, slab=slab, **kw) == pytest.approx(expected, abs=TOL)


def test_paged_volumes_score_exactly_like_arrays_reading_slabs_only(rng, tmp_path, monkeypatch):
    from fusecare import normalize
    from fusecare.io import CaseMeta, PagedVolume, open_volume, write_case

    monkeypatch.setattr(metrics, "_SLAB_BYTES", 40 * 48 * 6 * 8)  # about 8 planes of three volumes
    monkeypatch.setattr(metrics, "_MIN_SLAB", 2)
    monkeypatch.setattr(normalize, "_SLAB_VOXELS", 40 * 48 * 4)  # the percentiles' histogram
    base = ndi.gaussian_filter(rng.random((30, 40, 48)), 1.5) ** 3 * 30000
    arrays = {"target": rng.poisson(base + 100), "input": rng.poisson(0.5 * base + 300),
              "pred": rng.poisson(0.8 * base + 150)}
    for name, volume in arrays.items():
        arrays[name] = volume.astype(np.uint16)
        write_case(tmp_path / f"{name}.tif", arrays[name], CaseMeta())
    reads: list[int] = []
    real = PagedVolume._planes
    monkeypatch.setattr(PagedVolume, "_planes", lambda self, idx: reads.append(len(idx)) or real(self, idx))
    paged = {name: open_volume(tmp_path / f"{name}.tif") for name in arrays}
    try:
        lazy = score_ssim(paged["target"], paged["pred"], paged["input"])
    finally:
        for volume in paged.values():
            volume.close()
    assert lazy == score_ssim(arrays["target"], arrays["pred"], arrays["input"])
    assert 0 < max(reads) <= 8 + 6  # one slab plus its z halo, never the volume


def test_offset_data_keeps_precision(rng):
    """Far from zero, float32 E[x^2] - E[x]^2 cancels: the tile-mean shift must keep 1e-6."""
    a, b = smooth_pair(rng, (16, 64, 64), noise=0.01)
    a, b = a + np.float32(10), b + np.float32(10)
    assert ssim(a, b) == pytest.approx(sk_ssim(a, b), abs=TOL)


def test_uint16_inputs(rng):
    base = ndi.gaussian_filter(rng.random((20, 64, 64)), 2) * 40000
    u = rng.poisson(base + 200).astype(np.uint16)
    v = rng.poisson(0.7 * base + 500).astype(np.uint16)
    expected = sk_ssim(u, v, data_range=65535)
    assert ssim(u, v, data_range=65535) == pytest.approx(expected, abs=TOL)
    assert ssim(u, v, data_range=65535, slab=1) == pytest.approx(expected, abs=TOL)


def test_float64_inputs_match_skimage_closely(rng):
    a, b = smooth_pair(rng, (12, 40, 40))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert ssim(a64, b64, slab=2) == pytest.approx(sk_ssim(a64, b64), abs=1e-12)


@pytest.mark.parametrize(
    ("shape", "win_size", "slab"),
    [
        ((24, 64, 64), None, None),
        ((24, 64, 64), None, 1),
        ((16, 40, 40), 7, 3),
        ((12, 30, 30), 3, 2),
        ((3, 9, 5), 3, 1),  # the 5-voxel radius reflects more than once
    ],
)
def test_gaussian_matches_skimage(rng, shape, win_size, slab):
    """win_size < 11 crops less than the 11-tap filter reaches: the reflected halo is used."""
    a, b = smooth_pair(rng, shape)
    kw = {} if win_size is None else {"win_size": win_size}
    expected = sk_ssim(a, b, window="gaussian", **kw)
    assert ssim(a, b, window="gaussian", slab=slab, **kw) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("window", ["uniform", "gaussian"])
@pytest.mark.parametrize("slab", [None, 1, 4])
def test_per_slice_matches_skimage_slices(rng, window, slab):
    a, b = smooth_pair(rng, (6, 48, 40))
    expected = sk_ssim(a, b, window=window, per_slice=True)
    assert ssim(a, b, window=window, per_slice=True, slab=slab) == pytest.approx(expected, abs=TOL)


def test_per_slice_allows_thin_volumes(rng):
    a, b = smooth_pair(rng, (2, 20, 20))
    assert ssim(a, b, per_slice=True) == pytest.approx(sk_ssim(a, b, per_slice=True), abs=TOL)


def test_other_win_size_and_data_range(rng):
    a, b = smooth_pair(rng, (16, 40, 40))
    kw = {"win_size": 5, "data_range": 2.0}
    assert ssim(a, b, **kw) == pytest.approx(sk_ssim(a, b, **kw), abs=TOL)


def test_reflect_index_matches_scipy():
    """Our mirrored indices reproduce scipy's 'reflect' padding, also beyond one extent."""
    pad = 12
    for n in (1, 2, 5, 30):
        values = np.arange(n, dtype=float)
        for side, shift in ((0, -pad), (2 * pad, pad)):  # a delta kernel reads input[i + shift]
            expected = ndi.correlate1d(values, np.eye(2 * pad + 1)[side], mode="reflect")
            idx = metrics._reflect(np.arange(shift, n + shift), n)
            np.testing.assert_array_equal(values[idx], expected)


def test_inputs_are_not_modified(rng):
    a, b = smooth_pair(rng, (10, 30, 30))
    a0, b0 = a.copy(), b.copy()
    ssim(a, b)
    fmc_ssim(a, b)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)


@pytest.mark.parametrize("cuda", [True, False])
def test_auto_device_tiling_agrees_with_the_cpu(rng, monkeypatch, request, cuda):
    """``device='auto'`` takes the CUDA branch (one big tile, no thread cap) exactly when CUDA is
    reported, and that branch's tiling gives the CPU's many-tile result. CUDA is faked here
    (tensors stay on the CPU); a real GPU's arithmetic is ``test_cuda_matches_cpu``'s."""
    if cuda:
        request.getfixturevalue("fake_cuda")
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    a, b = smooth_pair(rng, (16, 50, 50))
    monkeypatch.setattr(metrics, "_TILE_VOXELS", 4096)  # many CPU tiles; CUDA's budget stays 32 M voxels
    cpu = ssim(a, b)
    assert ssim(a, b, device="cpu") == cpu
    devices: list[torch.device] = []
    real = metrics._tile_sum

    def spy(xa, ya, spec, device):
        devices.append(device)
        return real(xa, ya, spec, device)

    monkeypatch.setattr(metrics, "_tile_sum", spy)
    assert ssim(a, b, device="auto") == pytest.approx(cpu, abs=TOL)
    assert cpu == pytest.approx(sk_ssim(a, b), abs=TOL)
    if cuda:
        assert devices == [torch.device("cuda")]  # the whole volume in one tile
    else:
        assert len(devices) > 1 and set(devices) == {torch.device("cpu")}


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: compares a real GPU's SSIM with the CPU's "
                           "(the CUDA branch itself runs on CPU in test_auto_device_tiling_agrees_with_the_cpu)")
def test_cuda_matches_cpu(rng):
    a, b = smooth_pair(rng, (32, 128, 128))
    assert ssim(a, b, device="cuda") == pytest.approx(ssim(a, b), abs=TOL)
    expected = sk_ssim(a, b, window="gaussian")
    assert ssim(a, b, device="cuda", window="gaussian") == pytest.approx(expected, abs=TOL)


def test_torch_threads_are_restored(rng):
    before = torch.get_num_threads()
    a, b = smooth_pair(rng, (8, 20, 20))
    ssim(a, b)
    assert torch.get_num_threads() == before


def test_float32_work_memory_is_per_tile(rng, monkeypatch):
    """No whole-volume float copy: the largest block converted is a tile, not the volume."""
    monkeypatch.setattr(metrics, "_TILE_VOXELS", 4096)
    sizes: list[int] = []
    real_forward = PercentileNorm.forward

    def spy(self: PercentileNorm, x: np.ndarray) -> np.ndarray:
        sizes.append(x.size)
        return real_forward(self, x)

    monkeypatch.setattr(PercentileNorm, "forward", spy)
    u = rng.integers(0, 4000, (20, 64, 64), dtype=np.uint16)
    v = rng.integers(0, 4000, (20, 64, 64), dtype=np.uint16)
    fmc_ssim(u, v)
    assert len(sizes) > 8 and max(sizes) < u.size // 8


def test_fmc_ssim_is_ssim_of_normalised_volumes(rng):
    base = ndi.gaussian_filter(rng.random((20, 64, 64)), 1.5) ** 3 * 30000
    target = rng.poisson(base + 100).astype(np.uint16)
    x = rng.poisson(0.5 * base + 300).astype(np.uint16)
    expected = sk_ssim(normalize(target), normalize(x))
    assert fmc_ssim(target, x) == pytest.approx(expected, abs=TOL)
    assert fmc_ssim(target, x, slab=1) == pytest.approx(expected, abs=TOL)
    per_slice = sk_ssim(normalize(target), normalize(x), per_slice=True)
    assert fmc_ssim(target, x, per_slice=True) == pytest.approx(per_slice, abs=TOL)


def test_fmc_ssim_ignores_intensity_scale(rng):
    target, x = smooth_pair(rng, (12, 40, 40))
    assert fmc_ssim(target, 7.0 * x + 3.0) == pytest.approx(fmc_ssim(target, x), abs=1e-6)


def test_copy_of_input_scores_exactly_zero(rng):
    target, inp = smooth_pair(rng, (16, 48, 48), noise=0.2)
    scores = score_ssim(target, inp.copy(), inp)
    assert isinstance(scores, SsimScores)
    assert scores.n_ssim == 0.0
    assert scores.ssim_pred == scores.ssim_input
    assert score_ssim(target, inp, inp, slab=1, window="gaussian").n_ssim == 0.0


def test_target_itself_scores_exactly_one(rng):
    target, inp = smooth_pair(rng, (16, 48, 48), noise=0.2)
    scores = score_ssim(target, target.copy(), inp)
    assert scores.ssim_pred == 1.0
    assert scores.n_ssim == 1.0
    assert scores.ssim_input == pytest.approx(sk_ssim(normalize(target), normalize(inp)), abs=TOL)


def test_better_prediction_scores_between_zero_and_one(rng):
    target, _ = smooth_pair(rng, (16, 48, 48))
    inp = target + 0.3 * rng.standard_normal(target.shape).astype(np.float32)
    pred = ndi.gaussian_filter(inp, 1.0)
    scores = score_ssim(target, pred, inp)
    assert 0.0 < scores.n_ssim < 1.0
    assert scores.n_ssim == n_ssim(scores.ssim_pred, scores.ssim_input)


def test_n_ssim_formula_and_perfect_input():
    assert n_ssim(0.8, 0.6) == pytest.approx(0.5)
    assert n_ssim(0.4, 0.6) == pytest.approx(-0.5)
    assert n_ssim(1.0, 1.0) == 0.0
    assert n_ssim(0.9, 1.0) == -math.inf


def test_constant_volumes_do_not_divide_by_zero(rng):
    const = np.full((10, 24, 24), 500, dtype=np.uint16)
    noisy = rng.integers(0, 1000, const.shape, dtype=np.uint16)
    assert fmc_ssim(const, const) == 1.0
    value = fmc_ssim(const, noisy)
    assert math.isfinite(value)
    assert value == pytest.approx(sk_ssim(normalize(const), normalize(noisy)), abs=TOL)
    expected = sk_ssim(const, const, data_range=65535)
    assert ssim(const, const, data_range=65535) == pytest.approx(expected, abs=TOL)
    scores = score_ssim(const, noisy, const)
    assert scores.ssim_input == 1.0 and scores.n_ssim == -math.inf


@pytest.mark.parametrize(
    ("shapes", "kw", "error", "match"),
    [
        (((8, 20, 20), (8, 20, 21)), {}, InputError, "one shape"),
        (((20, 20), (20, 20)), {}, InputError, "3-D volumes"),
        (((5, 20, 20), (5, 20, 20)), {}, InputError, "smaller than the 7-voxel"),  # z < 7-voxel window
        (((8, 20, 20), (8, 20, 20)), {"win_size": 4}, ValueError, "win_size must be odd"),
        (((8, 20, 20), (8, 20, 20)), {"window": "box"}, ValueError, "window must be"),
        (((8, 20, 20), (8, 20, 20)), {"slab": 0}, ValueError, "slab must be >= 1"),
        (((8, 20, 20), (8, 20, 20)), {"data_range": 0.0}, ValueError, "data_range must be > 0"),
    ],
)
def test_bad_arguments_raise(shapes, kw, error, match):
    a, b = (np.zeros(s, np.float32) for s in shapes)
    with pytest.raises(error, match=match):
        ssim(a, b, **kw)


@pytest.mark.shared_data
def test_real_volume_against_skimage(shared_data):
    tifffile = pytest.importorskip("tifffile")
    target = tifffile.imread(shared_data / "plantnuclei_1135.tif")
    rng = np.random.default_rng(7)
    inp = np.clip(target + rng.normal(0, 12, target.shape), 0, 255).astype(np.uint8)
    pred = ndi.gaussian_filter(inp.astype(np.float32), 0.7)
    expected = sk_ssim(normalize(target), normalize(inp))
    scores = score_ssim(target, pred, inp)
    assert scores.ssim_input == pytest.approx(expected, abs=TOL)
    assert scores.ssim_pred == pytest.approx(sk_ssim(normalize(target), normalize(pred)), abs=TOL)
    assert score_ssim(target, inp.copy(), inp).n_ssim == 0.0
    assert score_ssim(target, target, inp).n_ssim == 1.0
