"""fusecare.device: one rule for choosing the torch device, checked with CUDA reported present and absent."""

from __future__ import annotations

import pytest
import torch

from fusecare.device import resolve_device
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
