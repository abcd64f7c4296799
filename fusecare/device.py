"""Which torch device a run uses: one rule for inference, training, scoring and segmentation."""

from __future__ import annotations

import torch

from fusecare.errors import FuseCareError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FuseCareError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FuseCareError(f"device {name!r} requested but CUDA is not available here")
    return device
