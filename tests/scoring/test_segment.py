"""fusecare.scoring.segment: isotropic grid, IoU against brute force, N-IoU, and cellpose offline.

No test touches the network: cellpose runs with a model trained here from scratch on synthetic
2-D blobs (``blob_model``, once per session, ~25 s on one core) or with model files placed in
a temporary ``CELLPOSE_LOCAL_MODELS_PATH``; downloads are made to fail.
"""

from __future__ import annotations

import math
import socket
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from fusecare.errors import WeightsError
from fusecare.scoring import segment
from fusecare.scoring.segment import (
    CellposeSegmenter,
    SegmenterCache,
    SegOptions,
    from_isotropic,
    iou_scores,
    isotropic_shape,
    n_iou,
    score_segmentation,
    to_isotropic,
)

_BLOB_MODEL: dict[str, Path] = {}


pytestmark = [  # raised inside torch and cellpose when cellpose loads or runs a model
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning"),
]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    """No network at all, and one torch thread (10x faster when other processes share the cores)."""
    def refuse(*_args, **_kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(shape: tuple[int, ...], count: int, radius: tuple[float, float], seed: int) -> np.ndarray:
    """Labels of up to ``count`` non-overlapping balls (discs in 2-D) of random radius."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    grid = np.indices(shape)
    placed = 0
    for _ in range(count * 20):
        r = rng.uniform(*radius)
        centre = [rng.uniform(r, n - r) for n in shape]
        ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= r * r
        if ball.any() and not labels[ball].any():
            placed += 1
            labels[ball] = placed
            if placed == count:
                break
    return labels


def render(labels: np.ndarray, *, blur: float, noise: float, seed: int) -> np.ndarray:
    """Fluorescence-like uint16 image of the labels: blurred mask, background, Gaussian noise."""
    rng = np.random.default_rng(seed)
    image = ndi.gaussian_filter((labels > 0).astype(np.float32), blur) * 1000 + 100
    image += noise * 1000 * rng.standard_normal(labels.shape).astype(np.float32)
    return np.clip(image, 0, 65535).astype(np.uint16)


def train_blob_model(folder: Path) -> Path:
    """A cellpose 3 model trained from scratch on 16 synthetic 64x64 blob images (60 epochs).

    BatchNorm momentum is raised to 0.3 so that its running statistics catch up with the
    weights within these few steps (at cellpose's 0.05 the model outputs nothing in eval mode).
    """
    from cellpose import models, train

    torch.manual_seed(0)
    images, labels = [], []
    for k in range(16):
        lab = blobs((64, 64), 16, (5.0, 8.0), seed=100 + k)
        images.append(render(lab, blur=1.0, noise=0.05, seed=k).astype(np.float32))
        labels.append(lab)
    model = models.CellposeModel(gpu=False, pretrained_model=False, diam_mean=13.0)
    for module in model.net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.3
    folder.mkdir(parents=True, exist_ok=True)
    path, _, _ = train.train_seg(
        model.net, train_data=images, train_labels=labels, channels=[0, 0], n_epochs=60,
        learning_rate=0.01, batch_size=8, bsize=32, rescale=False, min_train_masks=1,
        save_path=folder, model_name="blobs")
    return Path(path)


def blob_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's blob model (trained on first use; shared with test_evaluate.py)."""
    if "path" not in _BLOB_MODEL:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _BLOB_MODEL["path"] = train_blob_model(tmp_path_factory.mktemp("cellpose"))
        finally:
            torch.set_num_threads(threads)
    return _BLOB_MODEL["path"]


@pytest.fixture
def blob_model(tmp_path_factory) -> Path:
    return blob_model_path(tmp_path_factory)


def brute_force_iou(target: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Foreground and instance IoU straight from the definitions (dense matrix, loops)."""
    a, b = target > 0, labels > 0
    union = (a | b).sum()
    foreground = (a & b).sum() / union if union else 1.0
    t_ids = [i for i in np.unique(target) if i]
    p_ids = [j for j in np.unique(labels) if j]
    if not t_ids and not p_ids:
        return foreground, 1.0
    matrix = np.zeros((len(t_ids), len(p_ids)))
    for r, i in enumerate(t_ids):
        for c, j in enumerate(p_ids):
            ti, pj = target == i, labels == j
            matrix[r, c] = (ti & pj).sum() / (ti | pj).sum()
    rows, cols = linear_sum_assignment(matrix, maximize=True) if matrix.size else ([], [])
    values = matrix[rows, cols] if matrix.size else np.zeros(0)
    matched = int((values > 0).sum())
    return foreground, float(values.sum()) / (len(t_ids) + len(p_ids) - matched)


# --------------------------------------------------------------------------- isotropic grid


def test_isotropic_shape_keeps_centres_inside_the_extent():
    assert isotropic_shape((12, 40, 40), (1.0, 0.5, 0.5), 0.5) == (23, 40, 40)
    assert isotropic_shape((5, 10, 10), (0.7, 0.3, 0.3), 0.3) == (10, 10, 10)  # floor(4 * 0.7 / 0.3) + 1
    for shape, size, spacing in [((7, 9, 11), (1.3, 0.4, 0.25), 0.25), ((30, 8, 8), (0.5, 1.0, 1.0), 0.8)]:
        iso = isotropic_shape(shape, size, spacing)
        for n, s, m in zip(shape, size, iso):
            assert (m - 1) * spacing <= (n - 1) * s + 1e-9 < m * spacing


def test_linear_ramp_is_sampled_at_physical_centres():
    """Voxel i sits at i * s (origin at voxel 0's centre): a linear ramp is reproduced exactly."""
    size = (0.7, 0.3, 0.25)
    z, y, x = np.indices((6, 5, 4)).astype(np.float64)
    ramp = (z * size[0] + 2 * y * size[1] - x * size[2] + 10).astype(np.float32)
    iso = to_isotropic(ramp, size)
    assert iso.dtype == np.float32 and iso.shape == isotropic_shape(ramp.shape, size, 0.25)
    j, k, m = np.indices(iso.shape) * 0.25
    np.testing.assert_allclose(iso, j + 2 * k - m + 10, atol=1e-5)
    # a coarser grid (downsampling) follows the same convention
    coarse = to_isotropic(ramp, size, spacing=0.6)
    j, k, m = np.indices(coarse.shape) * 0.6
    np.testing.assert_allclose(coarse, j + 2 * k - m + 10, atol=1e-5)


def test_already_isotropic_volume_is_unchanged(rng):
    volume = rng.integers(0, 1000, (4, 6, 5)).astype(np.uint16)
    np.testing.assert_array_equal(to_isotropic(volume, (0.5, 0.5, 0.5)), volume.astype(np.float32))


def test_labels_map_back_with_the_same_convention(rng):
    labels = rng.integers(0, 9, (5, 7, 6)).astype(np.uint16)
    size = (1.0, 0.5, 0.5)
    iso = np.repeat(labels, 2, axis=0)[: isotropic_shape(labels.shape, size, 0.5)[0]]  # iso[2i] = labels[i]
    back = from_isotropic(iso, labels.shape, size)
    assert back.dtype == labels.dtype
    np.testing.assert_array_equal(back, labels)


# --------------------------------------------------------------------------- IoU


@pytest.mark.parametrize("seed", range(6))
def test_iou_matches_brute_force(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    target = blobs((10, 24, 24), 6, (2.0, 5.0), seed)
    labels = blobs((10, 24, 24), 7, (2.0, 5.0), seed + 50)
    if seed % 2:  # a shifted, relabelled copy with one cell dropped: overlaps of every kind
        shifted = np.roll(target, (0, 1, 2), axis=(0, 1, 2))
        perm = np.concatenate([[0], rng.permutation(np.arange(1, shifted.max() + 1)) + 10])
        labels = perm[shifted].astype(np.uint32)
        labels[labels == labels.max()] = 0
    if seed == 5:
        monkeypatch.setattr(segment, "_CONTINGENCY_SLAB", 97)  # many slabs
    scores = iou_scores(target, labels)
    foreground, instance = brute_force_iou(target, labels)
    assert scores.foreground == pytest.approx(foreground, abs=1e-12)
    assert scores.instance == pytest.approx(instance, abs=1e-12)
    assert scores.n_target == len(np.unique(target)) - 1
    assert scores.n_pred == len(np.unique(labels)) - (0 in labels)


def test_iou_edge_cases():
    target = blobs((8, 20, 20), 4, (2.0, 4.0), 3)
    relabelled = np.where(target > 0, 100 - target.astype(np.int32), 0).astype(np.int32)
    same = iou_scores(target, relabelled)
    assert (same.foreground, same.instance, same.n_matched) == (1.0, 1.0, 4)
    empty = np.zeros_like(target)
    assert iou_scores(empty, empty).foreground == iou_scores(empty, empty).instance == 1.0
    assert iou_scores(target, empty).foreground == iou_scores(empty, target).instance == 0.0
    merged = (target > 0).astype(np.uint8)  # all cells as one: foreground perfect, instances not
    scores = iou_scores(target, merged)
    assert scores.foreground == 1.0 and scores.instance < 0.5
    with pytest.raises(TypeError, match="labels must be integers, got float32"):
        iou_scores(target, merged.astype(np.float32))


def test_n_iou():
    assert n_iou(0.8, 0.6) == pytest.approx(0.5)
    assert n_iou(0.6, 0.6) == 0.0
    assert n_iou(0.4, 0.6) == pytest.approx(-0.5)
    assert n_iou(0.8, 0.6, best_iou=0.9) == pytest.approx(2 / 3)
    assert n_iou(0.9, 0.9, best_iou=0.9) == 0.0
    assert n_iou(0.8, 0.9, best_iou=0.9) == -math.inf
    assert n_iou(0.95, 0.9, best_iou=0.9) == math.inf


# --------------------------------------------------------------------------- models, offline


def test_missing_builtin_model_is_one_clear_line(tmp_path, monkeypatch):
    """Neither cached nor downloadable: one WeightsError line naming the folder, no urllib trace."""
    import cellpose.utils

    calls = []

    def no_network(url, dst, progress=True):
        calls.append(url)
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(cellpose.utils, "download_url_to_file", no_network)
    monkeypatch.setenv(segment.MODELS_ENV, str(tmp_path / "models"))
    with pytest.raises(WeightsError) as err:
        CellposeSegmenter("nuclei", device="cpu")
    message = str(err.value)
    assert calls and "\n" not in message
    assert "'nuclei'" in message and str(tmp_path / "models") in message
    assert "could not be downloaded" in message and "Temporary failure" in message
    assert segment.MODELS_ENV in message and "--cellpose-model" in message
    assert list((tmp_path / "models").iterdir()) == []  # no partial file left behind

    with pytest.raises(WeightsError, match="downloads disabled"):
        CellposeSegmenter("cyto3", device="cpu", allow_download=False)
    assert len(calls) == 1
    with pytest.raises(WeightsError, match="cellpose model not found: .*nothing"):
        SegmenterCache({"*": tmp_path / "nothing"}, device="cpu").get("nucleus")


def test_corrupt_model_file_is_one_clear_line(tmp_path):
    bad = tmp_path / "model"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot be loaded") as err:
        CellposeSegmenter(bad, device="cpu")
    assert "\n" not in str(err.value)


@pytest.mark.slow  # trains the session's blob model when it runs first
def test_builtin_model_found_in_local_models_path(tmp_path, monkeypatch, blob_model):
    """``nuclei`` resolves to $CELLPOSE_LOCAL_MODELS_PATH, read when the model is loaded."""
    import cellpose.utils

    monkeypatch.setattr(cellpose.utils, "download_url_to_file", pytest.fail)
    folder = tmp_path / "cp_models"
    folder.mkdir()
    (folder / "nucleitorch_0").write_bytes(blob_model.read_bytes())
    np.save(folder / "size_nucleitorch_0.npy",  # a size model that always answers diam_mean
            {"A": np.zeros(256), "smean": np.zeros(256), "ymean": 0.0, "diam_mean": 17.0}, allow_pickle=True)
    monkeypatch.setenv(segment.MODELS_ENV, str(folder))
    segmenter = SegmenterCache(device="cpu").get("nucleus")
    assert segmenter.name == "nuclei" and segmenter.size_model is not None
    assert segmenter.diam_mean == 17.0
    volume = render(blobs((16, 48, 48), 6, (5.0, 7.0), 1), blur=1.0, noise=0.02, seed=1)
    diameter = segmenter.estimate_diameter(volume.astype(np.float32), planes=2)
    assert 5 < diameter < 30


class ThresholdSegmenter:
    """Stands in for cellpose where the wiring, not the network, is tested: labels of v > 500."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...], float | None]] = []

    def estimate_diameter(self, volume: np.ndarray, planes: int = 3) -> float:
        self.calls.append(("diameter", volume.shape, None))
        return 11.0

    def segment(self, volume: np.ndarray, diameter: float) -> np.ndarray:
        self.calls.append(("segment", volume.shape, diameter))
        return ndi.label(volume > 500)[0]


def test_score_segmentation_wiring():
    """Diameter estimated once, on the target's isotropic volume, and reused; options honoured."""
    truth = blobs((23, 32, 32), 5, (4.0, 6.0), seed=3)
    target = render(truth, blur=1.0, noise=0.0, seed=0)[::2]
    input = render(truth, blur=2.5, noise=0.2, seed=1)[::2]
    fake = ThresholdSegmenter()
    stages: list[str] = []
    pred = (target // 2) * 2  # a different volume: segmented on its own
    scores = score_segmentation(target, pred, input, voxel_size=(1.0, 0.5, 0.5), segmenter=fake,
                                step=stages.append)
    assert fake.calls[0] == ("diameter", (23, 32, 32), None)
    assert [c[2] for c in fake.calls[1:]] == [11.0, 11.0, 11.0] and len(fake.calls) == 4
    assert stages == ["target: isotropic", "target: diameter", "target: cellpose", "input: isotropic",
                      "input: cellpose", "pred: isotropic", "pred: cellpose"]
    assert (scores.iso_shape, scores.spacing, scores.diameter, scores.mode) == ((23, 32, 32), 0.5, 11.0, "foreground")
    assert 0.99 < scores.iou_pred < 1.0 and scores.iou_input < 0.9
    assert scores.n_iou == pytest.approx((scores.iou_pred - scores.iou_input) / (1 - scores.iou_input))
    assert scores.iou_input == scores.input.foreground

    fake = ThresholdSegmenter()
    stages.clear()
    options = SegOptions(iou="instance", best_iou=0.9, diameter=7.0, iso_spacing=1.0)
    scores = score_segmentation(target, input.copy(), input, voxel_size=(1.0, 0.5, 0.5), segmenter=fake,
                                options=options, step=stages.append)
    assert fake.calls == [("segment", (12, 16, 16), 7.0)] * 2  # identity: the input's masks reused
    assert stages[-1] == "pred: same as input"
    assert scores.iou_input == scores.input.instance == scores.iou_pred and scores.n_iou == 0.0
    assert scores.best_iou == 0.9 and scores.spacing == 1.0
    with pytest.raises(ValueError, match="'iou' must be one of .* got 'dice'"):
        SegOptions(iou="dice")


@pytest.mark.slow
def test_segmentation_scores_offline(blob_model):
    """The whole N-IoU path with the trained model on an anisotropic synthetic case.

    Truth lives on the isotropic grid (0.5 um); the target is every second plane of it
    (z voxel 1.0 um), the input a blurred and noisy version, the prediction the target itself.
    """
    truth = blobs((23, 48, 48), 10, (5.0, 7.0), seed=7)
    clean = render(truth, blur=1.0, noise=0.02, seed=1)
    target = clean[::2]
    input = render(truth, blur=3.0, noise=0.25, seed=2)[::2]
    segmenter = SegmenterCache({"*": blob_model}, device="cpu").get("nucleus")
    assert segmenter.size_model is None and segmenter.diam_mean == 13.0
    labels: dict[str, np.ndarray] = {}
    scores = score_segmentation(target, target.copy(), input, voxel_size=(1.0, 0.5, 0.5),
                                segmenter=segmenter, keep_labels=labels)
    assert scores.iso_shape == truth.shape and scores.spacing == 0.5
    assert 8 < scores.diameter < 16, scores.diameter  # true balls: 10-14 voxels across
    truth_fit = iou_scores(truth, labels["target"])
    assert truth_fit.foreground > 0.8, truth_fit  # measured 0.96 (10 of 10 balls matched)
    assert scores.iou_pred == 1.0 and scores.pred.instance == 1.0  # same volume, same masks
    assert scores.iou_input < 1.0
    assert scores.n_iou == 1.0


@pytest.mark.slow
@pytest.mark.shared_data
def test_blob_model_on_real_nuclei(shared_data, blob_model):
    """Sanity check against a reference segmentation (PlantSeg's cellpose3d nuclei, 75^3, 11 cells).

    A model trained for 25 s on synthetic discs is no nuclei model: it splits the nuclei into
    pieces, so its own diameter estimate is small (6 voxels, which also makes cellpose upsample
    the volume 2x and take minutes). At the reference's median sphere-equivalent diameter (21
    voxels) it covers the nuclei with foreground IoU 0.40-0.47 and touches 10 or 11 of the 11
    nuclei (39-44 masks): measured with training seeds 0-3 and 1 or 2 torch threads, which move
    cellpose's float rounding as another CPU does. So the bounds leave margins, not one run's counts.
    """
    from fusecare.io import read_case

    case = read_case(shared_data / "cellpose3d_nuclei.tif")
    reference = read_case(shared_data / "cellpose3d_nuclei_labels.tif").volume
    segmenter = CellposeSegmenter(blob_model, device="cpu")
    iso = to_isotropic(case.volume, case.meta.voxel_size.zyx)
    assert iso.shape == reference.shape
    scores = iou_scores(reference, segmenter.segment(iso, 20.0))
    assert scores.n_target == 11  # the reference's own count, not the model's
    assert scores.foreground > 0.35, scores
    assert scores.n_matched >= 0.75 * scores.n_target, scores  # most nuclei found (9 of 11)


def test_cuda_requested_without_cuda_says_so_not_that_the_model_failed(tmp_path, monkeypatch):
    from fusecare.errors import FuseCareError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on machines with a GPU

    with pytest.raises(FuseCareError, match="CUDA is not available") as caught:
        CellposeSegmenter(tmp_path / "any_model", device="cuda", allow_download=False)
    assert not isinstance(caught.value, WeightsError)
