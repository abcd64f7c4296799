"""Training sources: how often each source is drawn (``phantom_share``), the batch it makes, and how
validation weighs phantoms against real volumes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from conftest import write_fmc_tif

from fusecare.errors import ConfigError
from fusecare.training.config import TrainConfig
from fusecare.training.phantoms import PHANTOM_VOXEL_SIZE_ZYX
from fusecare.training.sources import (
    ValidationCase,
    build_data,
    draw_batch,
    source_probabilities,
    validation_score,
)

pytestmark = pytest.mark.unit


@dataclass
class Constant:
    """A source whose patches are filled with its own index, so a batch says where it came from."""

    index: int
    synthetic: bool
    name: str = "constant"

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        rng.random()  # a real source draws from the stream too
        patch = np.full((2, 4, 4), self.index, dtype=np.float32)
        return patch, patch


def sources(real: int, phantoms: int) -> list[Constant]:
    return [Constant(i, synthetic=i >= real) for i in range(real + phantoms)]


def test_phantom_share_splits_draws_between_phantoms_and_real_content():
    p = source_probabilities(sources(2, 8), 0.25)
    assert p is not None
    np.testing.assert_allclose(p, [0.375, 0.375] + [0.25 / 8] * 8)
    assert source_probabilities(sources(2, 8), None) is None
    # one group empty: every source alike, whatever the share
    assert source_probabilities(sources(0, 3), 0.25) is None
    assert source_probabilities(sources(3, 0), 0.25) is None


def test_draws_follow_the_probabilities():
    pool = sources(2, 8)
    x, y = draw_batch(pool, 4000, np.random.default_rng(0), source_probabilities(pool, 0.2))
    picked = x[:, 0, 0, 0, 0].numpy().astype(int)
    assert x.shape == (4000, 1, 2, 4, 4) and (x == y).all()
    share = np.mean(picked >= 2)
    assert 0.18 < share < 0.22  # 0.2 +- 3 binomial standard deviations (0.0063)
    assert np.bincount(picked, minlength=10).min() > 0


def test_uniform_draw_keeps_its_random_stream():
    """Configs without a share draw exactly as before it existed (resumed runs reproduce)."""
    pool = sources(2, 3)
    rng = np.random.default_rng(7)
    expected = []
    for _ in range(16):  # the former rule: a uniform index, then that source's sample, in turn
        i = int(rng.integers(len(pool)))
        expected.append(pool[i].sample(rng)[0][0, 0, 0])
    x, _ = draw_batch(pool, 16, np.random.default_rng(7))
    np.testing.assert_array_equal(x[:, 0, 0, 0, 0].numpy(), expected)


def test_phantom_share_marks_only_phantoms_synthetic(tmp_path):
    config = TrainConfig.from_dict({"model": {"first_filters": 4, "depth": 1}, "patch": [8, 16, 16],
                                    "phantoms": 2, "phantom_shape": [12, 32, 32], "validation_phantoms": 0,
                                    "validate_on_training_volumes": False, "phantom_share": 0.5})
    built, _ = build_data(config)
    assert [s.synthetic for s in built] == [True, True]


def test_phantom_share_outside_zero_to_one_is_refused_by_name():
    with pytest.raises(ConfigError, match="phantom_share"):
        TrainConfig.from_dict({"phantoms": 1, "phantom_share": 1.5})


def _case(name: str, synthetic: bool) -> ValidationCase:
    empty = np.zeros((1, 1, 1), np.float32)
    return ValidationCase(name, empty, empty, synthetic)


def test_validation_weighs_volumes_as_training_draws_them():
    """Three phantom views must not outvote one real volume's two: per-volume means, then the share."""
    cases = [_case("a.tif (simulated, seed 1)", False), _case("a.tif (simulated, seed 2)", False),
             _case("validation phantom 0", True), _case("validation phantom 0 (randomised content, seed 6)", True),
             _case("validation phantom 1", True)]
    scores = [0.2, 0.4, 0.0, -0.8, 0.4]
    assert validation_score(cases, scores, None) == pytest.approx(np.mean(scores))
    # real: 0.3; phantoms: mean of (-0.4, 0.4) = 0.0
    assert validation_score(cases, scores, 0.25) == pytest.approx(0.75 * 0.3)
    assert validation_score(cases, scores, 1.0) == pytest.approx(0.0)
    assert validation_score(cases[2:], scores[2:], 0.25) == pytest.approx(0.0)  # phantoms only decide alone
    assert validation_score(cases[:2], scores[:2], 0.25) == pytest.approx(0.3)


def test_validation_cases_say_whether_they_come_from_a_phantom(tmp_path, rng):
    real = write_fmc_tif(tmp_path / "v.tif", rng.integers(0, 200, (16, 32, 32)).astype(np.uint16), channel="nucleus")
    config = TrainConfig.from_dict({"model": {"first_filters": 4, "depth": 1}, "patch": [8, 16, 16],
                                    "phantoms": 1, "phantom_shape": [12, 32, 32], "validation_phantoms": 1,
                                    "validation_files": [str(real)], "validation_views": 2,
                                    "validation_randomised_views": 1, "simulator": {"bright_objects": [1, 1]}})
    _, cases = build_data(config, validation_only=True)
    assert [(c.name.split(" (")[0], c.synthetic) for c in cases] == [
        ("v.tif", False)] * 3 + [("validation phantom 0", True)] * 2
    # each case carries its volume's voxel size, which the attenuation correction smooths by
    assert [c.voxel_size_zyx for c in cases] == [(1.0, 0.2, 0.2)] * 3 + [PHANTOM_VOXEL_SIZE_ZYX] * 2
