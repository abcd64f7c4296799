"""fusecare.device: one rule for choosing the torch device, checked with CUDA reported present and absent."""

from __future__ import annotations

import logging

import pytest
import torch

from fusecare.device import inference_device, resolve_device
from fusecare.errors import FuseCareError


@pytest.mark.parametrize("available", [True, False])
def test_auto_picks_cuda_exactly_when_cuda_is_available(monkeypatch, available):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert resolve_device("auto") == torch.device("cuda" if available else "cpu")
    assert resolve_device() == resolve_device("auto")


def test_cuda_by_name_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_by_name_without_cuda_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FuseCareError, match="'cuda' requested but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(FuseCareError, match="'cuda:0' requested but CUDA is not available"):
        resolve_device("cuda:0")
    assert resolve_device("cpu") == torch.device("cpu")


def test_unknown_device_names_the_choices():
    with pytest.raises(FuseCareError, match="unknown device 'tpu9'; use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu9")


def test_auto_without_cuda_is_one_loud_warning_for_inference(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_device("auto") == torch.device("cpu")
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "NO USABLE GPU" in record.getMessage()
    caplog.clear()
    assert inference_device("cpu") == torch.device("cpu") and not caplog.records


def test_a_cuda_that_fails_its_probe_is_named(monkeypatch, caplog, fake_cuda):
    def broken(self, *args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
    assert inference_device("auto") == torch.device("cuda") and not caplog.records  # the probe passes
    monkeypatch.setattr(torch.Tensor, "to", broken)
    assert inference_device("auto") == torch.device("cpu")
    assert "no kernel image" in caplog.text and "NO USABLE GPU" in caplog.text
    with pytest.raises(FuseCareError, match="'cuda' requested but unusable: .*no kernel image"):
        inference_device("cuda")
