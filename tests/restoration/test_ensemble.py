"""Ensembles on disk: manifest checksums, member configs, mean and disagreement."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_ensemble

from fusecare.errors import WeightsError
from fusecare.restoration.ensemble import (
    MANIFEST,
    Ensemble,
    _shared_base,
    load_ensemble,
    save_member,
    write_manifest,
)
from fusecare.restoration.gate import GateConfig
from fusecare.restoration.model import CareUNet, ModelConfig


def _member_outputs(ensemble: Ensemble, block: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(block)[None, None]
    with torch.inference_mode():
        return torch.stack([m.float()(x.contiguous())[0] for m in ensemble.members])


def test_saved_members_reload_identically(tmp_path, rng):
    torch.manual_seed(3)
    model = CareUNet(ModelConfig(first_filters=4)).eval()
    save_member(tmp_path / "nucleus" / "member_0", model)
    write_manifest(tmp_path / "nucleus", "nucleus")
    ensemble = load_ensemble(tmp_path / "nucleus")
    block = rng.random((8, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(block)[None, None])[0, 0].numpy()
    mean, spread = ensemble.predict_block(block)
    np.testing.assert_allclose(mean, expected, atol=1e-5)
    np.testing.assert_array_equal(spread, 0.0)  # one member: no disagreement
    config = json.loads((tmp_path / "nucleus" / "member_0" / "config.json").read_text())
    assert config["axes"] == "ZYX" and config["first_filters"] == 4


def test_mean_and_spread_are_across_members(tmp_path, rng):
    ensemble = load_ensemble(make_tiny_ensemble(tmp_path, "nucleus", members=3))
    block = rng.random((8, 16, 24)).astype(np.float32)
    outputs = _member_outputs(ensemble, block)[:, 0].numpy()
    mean, spread = ensemble.predict_block(block)
    np.testing.assert_allclose(mean, outputs.mean(0), atol=1e-5)
    np.testing.assert_allclose(spread, outputs.std(0), atol=1e-4)
    assert spread.max() > 0


def test_members_sharing_a_base_smooth_each_block_once(tmp_path, rng, monkeypatch):
    """Members with the same ``base_sigma`` share one smoothed input per block, and the ensemble
    still equals its members run one by one; a member with another base smooths its own."""
    folder = tmp_path / "membrane"
    for k, sigma in enumerate((0.45, 0.45, 0.8)):
        torch.manual_seed(k)
        save_member(folder / f"member_{k}", CareUNet(ModelConfig(first_filters=4, base_sigma=sigma)).eval())
    write_manifest(folder, "membrane")
    ensemble = load_ensemble(folder)
    block = rng.random((8, 16, 24)).astype(np.float32)
    outputs = _member_outputs(ensemble, block)[:, 0].numpy()
    smoothed: list[float] = []
    original = CareUNet.base

    def counting(self, x):
        smoothed.append(self.config.base_sigma)
        return original(self, x)

    monkeypatch.setattr(CareUNet, "base", counting)
    mean, spread = ensemble.predict_block(block)
    assert smoothed == [0.45, 0.8]
    np.testing.assert_allclose(mean, outputs.mean(0), atol=1e-5)
    np.testing.assert_allclose(spread, outputs.std(0), atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: float16 autocast is CUDA's")
def test_shared_base_stays_float32_under_float16(tmp_path, rng):
    """The shared base carries the output's full intensity: float32 even when members run in float16."""
    folder = tmp_path / "membrane"
    for k in range(2):
        torch.manual_seed(k)
        save_member(folder / f"member_{k}", CareUNet(ModelConfig(first_filters=4, base_sigma=0.45)).eval())
    write_manifest(folder, "membrane")
    ensemble = load_ensemble(folder, device="cuda", fp16=True)
    block = rng.random((8, 16, 24)).astype(np.float32)
    x = torch.from_numpy(block)[None, None].cuda()
    bases: dict[float, torch.Tensor] = {}
    assert _shared_base(ensemble.members[0], x, bases).dtype == torch.float32
    reference = load_ensemble(folder, device="cpu").predict_block(block)
    np.testing.assert_allclose(ensemble.predict_block(block)[0], reference[0], atol=5e-3)


class _Constant(torch.nn.Module):
    """A stand-in member predicting one value everywhere."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.value)


def test_spread_of_nearly_agreeing_members_at_high_intensity_is_accurate():
    """sqrt(E[x^2] - E[x]^2) in float32 would lose it: 1e-4 apart at 10 is below its rounding."""
    values = [10.0, 10.0001, 10.0002, 10.0003, 10.0004]
    ensemble = Ensemble(members=[_Constant(v) for v in values], channel="nucleus", device=torch.device("cpu"),
                        channels_last=False)
    mean, spread = ensemble.predict_block(np.zeros((4, 8, 8), np.float32))
    expected = np.std(np.float32(values).astype(np.float64))
    np.testing.assert_allclose(spread, expected, rtol=0.05)
    np.testing.assert_allclose(mean, np.mean(np.float32(values)), rtol=1e-6)


def test_probabilistic_spread_is_the_laplace_mixture_std(tmp_path, rng):
    ensemble = load_ensemble(make_tiny_ensemble(tmp_path, "membrane", members=2, probabilistic=True))
    block = rng.random((8, 16, 16)).astype(np.float32)
    outputs = _member_outputs(ensemble, block).numpy()
    loc, scale = outputs[:, 0], outputs[:, 1]
    expected = np.sqrt(np.mean(2 * scale**2 + loc**2, axis=0) - loc.mean(0) ** 2)
    np.testing.assert_allclose(ensemble.predict_block(block)[1], expected, rtol=1e-4, atol=1e-5)


def test_channels_last_gives_the_same_prediction(tmp_path, rng):
    folder = make_tiny_ensemble(tmp_path, "nucleus")
    block = rng.random((8, 16, 16)).astype(np.float32)
    fast = load_ensemble(folder, channels_last=True).predict_block(block)
    plain = load_ensemble(folder, channels_last=False).predict_block(block)
    np.testing.assert_allclose(fast, plain, atol=1e-5)


def test_margin_is_receptive_field_rounded_to_alignment(tmp_path):
    ensemble = load_ensemble(make_tiny_ensemble(tmp_path, "nucleus"))
    assert (ensemble.receptive_field_radius, ensemble.alignment, ensemble.margin) == (23, 4, 24)


def test_gate_is_read_from_the_manifest(tmp_path):
    ensemble = load_ensemble(make_tiny_ensemble(tmp_path, "nucleus", gate_scale=0.2))
    assert ensemble.gate == GateConfig(spread_scale=0.2)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_weights_fail_the_checksum(tmp_path):
    folder = make_tiny_ensemble(tmp_path, "nucleus")
    _flip_byte(folder / "member_1" / "weights.pt")
    with pytest.raises(WeightsError, match="checksum mismatch.*member_1/weights.pt"):
        load_ensemble(folder)


def test_missing_member_file_is_named(tmp_path):
    folder = make_tiny_ensemble(tmp_path, "nucleus")
    (folder / "member_0" / "config.json").unlink()
    with pytest.raises(WeightsError, match="missing weights file .*member_0/config.json"):
        load_ensemble(folder)


@pytest.mark.parametrize(
    ("manifest", "fragment"),
    [("not json", "not valid JSON"), ('{"format": "other"}', "not a fusecare-ensemble/1 manifest"),
     ('{"format": "fusecare-ensemble/1", "members": ["member_0"], "files": {}}', "is not listed")],
)
def test_bad_manifests_are_refused(tmp_path, manifest, fragment):
    folder = make_tiny_ensemble(tmp_path, "nucleus")
    (folder / MANIFEST).write_text(manifest)
    with pytest.raises(WeightsError, match=fragment):
        load_ensemble(folder)


def test_member_config_with_unknown_key_is_refused_by_name(tmp_path):
    folder = make_tiny_ensemble(tmp_path, "nucleus", members=1)
    config_path = folder / "member_0" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "dropout": 0.1}))
    write_manifest(folder, "nucleus")
    with pytest.raises(WeightsError, match=r"unknown ModelConfig key\(s\) \['dropout'\]"):
        load_ensemble(folder)


def test_missing_folder_and_manifest_are_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="no weights folder"):
        load_ensemble(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no manifest.json"):
        load_ensemble(tmp_path / "empty")


@pytest.fixture
def autocast_calls(monkeypatch) -> list[dict[str, object]]:
    """Every ``torch.autocast`` the ensemble enters (device type, dtype, enabled), as a no-op."""
    calls: list[dict[str, object]] = []

    def record(device_type: str, dtype: torch.dtype | None = None, enabled: bool = True, **_: object):
        calls.append({"device_type": device_type, "dtype": dtype, "enabled": enabled})
        return contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", record)
    return calls


@pytest.mark.parametrize("fp16", [True, False])
def test_fp16_autocast_is_never_enabled_on_cpu(tmp_path, rng, autocast_calls, fp16):
    """bf16/fp16 autocast on CPU is ~200x slower: --fp16 is ignored there. No autocast is entered
    at all, not even a disabled one: torch 2.1-2.2 raise on a CPU autocast with dtype float16."""
    ensemble = load_ensemble(make_tiny_ensemble(tmp_path, "nucleus"), device="cpu", fp16=fp16)
    ensemble.predict_block(rng.random((8, 16, 16), dtype=np.float32))
    assert autocast_calls == []


@pytest.mark.parametrize("fp16", [True, False])
def test_fp16_autocast_is_enabled_on_cuda_when_asked(tmp_path, rng, fake_cuda, autocast_calls, fp16):
    """On CUDA (faked: tensors stay on the CPU), --fp16 enters a float16 autocast around every member;
    without it, none."""
    ensemble = load_ensemble(make_tiny_ensemble(tmp_path, "nucleus"), device="auto", fp16=fp16)
    assert ensemble.device == torch.device("cuda")
    out = ensemble.predict_block(rng.random((8, 16, 16), dtype=np.float32))
    assert out.shape == (2, 8, 16, 16)
    assert autocast_calls == [{"device_type": "cuda", "dtype": torch.float16, "enabled": True}] * (2 if fp16 else 0)


def test_non_finite_float16_blocks_are_redone_in_float32(tmp_path, rng, fake_cuda, monkeypatch, caplog):
    """A member that overflows under float16 autocast gives a finite float32 block, one warning."""
    from fusecare.restoration.model import CareUNet

    half = []

    @contextlib.contextmanager
    def autocast(device_type: str, dtype: torch.dtype | None = None, enabled: bool = True, **_: object):
        half.append(enabled and dtype == torch.float16)
        try:
            yield
        finally:
            half.pop()

    real_forward = CareUNet.forward

    def overflowing(self, x):
        out = real_forward(self, x)
        return out * float("inf") if half and half[-1] else out
    monkeypatch.setattr(torch, "autocast", autocast)
    monkeypatch.setattr(CareUNet, "forward", overflowing)
    block = rng.random((8, 16, 16), dtype=np.float32)
    folder = make_tiny_ensemble(tmp_path, "nucleus")
    fp32 = load_ensemble(folder, device="auto", fp16=False).predict_block(block)
    fp16 = load_ensemble(folder, device="auto", fp16=True).predict_block(block)
    np.testing.assert_array_equal(fp16, fp32)
    assert caplog.text.count("redone in float32") == 2  # one per member


def test_members_that_disagree_on_reading_the_corrected_view_are_refused(tmp_path):
    folder = make_tiny_ensemble(tmp_path, "membrane")
    config = json.loads((folder / "member_1" / "config.json").read_text())
    (folder / "member_1" / "config.json").write_text(json.dumps({**config, "corrected_input": True}))
    write_manifest(folder, "membrane")
    with pytest.raises(WeightsError, match="'corrected_input'"):
        load_ensemble(folder)
    (folder / "member_0" / "config.json").write_text(json.dumps({**config, "corrected_input": True}))
    write_manifest(folder, "membrane")
    assert load_ensemble(folder).corrected_input


def test_a_weights_folder_one_level_too_deep_is_named_with_the_fix(tmp_path):
    folder = make_tiny_ensemble(tmp_path / "w", "membrane")
    with pytest.raises(WeightsError, match=r"is itself an ensemble: pass the folder above it"):
        load_ensemble(folder / "membrane")
    with pytest.raises(WeightsError, match=r"^no weights folder \S+$"):
        load_ensemble(tmp_path / "w" / "nucleus")
