"""Smoke test of the shipped weights (``model_weights/``): a silently broken model or gate fails CI.

Every manifest loads and verifies its checksums, every member runs on a small block, and
``inference.py`` on the bundled samples scores the N-SSIM the README states, within a stated
tolerance. The expected figures live in ONE place, ``tests/data/shipped_expectations.json``:
update it with the README when the weights are retrained. That the shipped members are the
committed checkpoints ``train/shipped.json`` names is ``tests/test_reproduce_shipped.py``'s.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import REPO

from fusecare.restoration.ensemble import MANIFEST, Ensemble, load_ensemble, verify_manifest
from fusecare.restoration.gate import GateConfig
from fusecare.scoring.metrics import score_ssim

WEIGHTS = REPO / "model_weights"
SAMPLES = REPO / "samples"
EXPECTATIONS = json.loads((Path(__file__).parent / "data" / "shipped_expectations.json").read_text())
CHANNELS = sorted(EXPECTATIONS["n_ssim"])


def test_expectations_cover_every_shipped_channel():
    shipped = sorted(p.parent.name for p in WEIGHTS.glob(f"*/{MANIFEST}"))
    assert shipped == CHANNELS
    assert sorted(p.stem.removeprefix("sample_") for p in (SAMPLES / "input").glob("*.tif")) == CHANNELS
    assert 0 < EXPECTATIONS["tolerance"] <= 0.05
    assert set(EXPECTATIONS["written_back_unchanged"]) <= set(CHANNELS)


@pytest.fixture(scope="module", params=CHANNELS)
def shipped_channel(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def shipped(shipped_channel) -> Ensemble:
    """One shipped ensemble, loaded on the CPU (which verifies every file's sha256 first)."""
    return load_ensemble(WEIGHTS / shipped_channel, device="cpu")


def test_manifest_verifies_and_names_its_channel(shipped_channel, shipped):
    """The folder's channel is the manifest's (a gate belongs to the channel it was calibrated for)."""
    folder = WEIGHTS / shipped_channel
    manifest = json.loads((folder / MANIFEST).read_text())
    verify_manifest(folder, manifest)  # again, explicitly: every listed file present and matching
    assert manifest["channel"] == shipped.channel == shipped_channel
    assert len(shipped.members) == len(manifest["members"]) >= 1
    assert manifest["gate"] is None or shipped.gate == GateConfig.from_dict(manifest["gate"])


def test_every_member_runs_on_a_small_block(shipped):
    side = 2 * shipped.alignment
    block = np.random.default_rng(0).random((side, 2 * side, 2 * side), dtype=np.float32)
    x = torch.from_numpy(block)[None, None]
    with torch.inference_mode():
        for member in shipped.members:
            out = member.float()(x.contiguous())
            assert out.shape[2:] == x.shape[2:] and torch.isfinite(out).all()
            assert out[0, 0].std() > 0  # not a constant: the weights did load into something
    mean, spread = shipped.predict_block(block)
    assert mean.shape == spread.shape == block.shape
    assert np.isfinite(mean).all() and (spread >= 0).all()


@pytest.fixture(scope="module")
def sample_outputs(tmp_path_factory) -> Path:
    """``inference.py`` run as the README's command 1 does, on the bundled samples."""
    out = tmp_path_factory.mktemp("shipped") / "out"
    result = subprocess.run([sys.executable, str(REPO / "inference.py"), "--input", str(SAMPLES / "input"),
                             "--output", str(out), "--weights", str(WEIGHTS), "--device", "cpu", "--quiet"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("channel", CHANNELS)
def test_samples_score_the_readme_figures(sample_outputs, channel):
    """N-SSIM of the shipped ensemble's output on the bundled sample, as the README states it."""
    name = f"sample_{channel}.tif"
    target, source = (tifffile.imread(SAMPLES / role / name) for role in ("target", "input"))
    pred = tifffile.imread(sample_outputs / name)
    assert pred.shape == source.shape and pred.dtype == np.uint16
    expected, tolerance = EXPECTATIONS["n_ssim"][channel], EXPECTATIONS["tolerance"]
    assert score_ssim(target, pred, source).n_ssim == pytest.approx(expected, abs=tolerance)
    if channel in EXPECTATIONS["written_back_unchanged"]:  # an ungated ensemble scores within 0.02 of 0 too
        np.testing.assert_array_equal(pred, source)
    else:
        assert not np.array_equal(pred, source)


def test_input_only_gates_are_the_expected_ones(shipped_channel, shipped):
    """The channels written back unchanged are exactly those whose calibrated gate keeps the input."""
    keeps_input = shipped.gate is not None and shipped.gate.keeps_input
    assert keeps_input == (shipped_channel in EXPECTATIONS["written_back_unchanged"])


def test_readme_states_the_expected_figures():
    """The README's sample figures and the expectations file are the same numbers."""
    readme = (REPO / "README.md").read_text()
    stated = {m[0]: float(m[1]) for m in re.findall(r"N_SSIM_(\w+) ([+-]\d+\.\d+)", readme)}
    assert stated == pytest.approx(EXPECTATIONS["n_ssim"], abs=1e-9), \
        "update README.md's 'Two commands' figures and tests/data/shipped_expectations.json together"
