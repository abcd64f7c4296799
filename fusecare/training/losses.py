"""Training losses on (N, C, Z, Y, X) tensors: pixel losses of CARE plus an optional SSIM term."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def ssim_torch(a: torch.Tensor, b: torch.Tensor, win: int = 7, data_range: float = 1.0) -> torch.Tensor:
    """Differentiable mean 3-D SSIM with a uniform window (valid region, as skimage crops)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = win**3
    pool = lambda t: F.avg_pool3d(t, win, stride=1)  # noqa: E731
    mu_a, mu_b = pool(a), pool(b)
    cov = n / (n - 1)
    var_a = cov * (pool(a * a) - mu_a * mu_a)
    var_b = cov * (pool(b * b) - mu_b * mu_b)
    cov_ab = cov * (pool(a * b) - mu_a * mu_b)
    s = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean()


def training_loss(output: torch.Tensor, target: torch.Tensor, *, loss: str, ssim_weight: float = 0.0
                  ) -> torch.Tensor:
    """MAE, MSE or Laplace negative log-likelihood (location, scale), plus (1 - SSIM) if weighted."""
    location = output[:, :1]
    if loss == "mae":
        value = (location - target).abs().mean()
    elif loss == "mse":
        value = ((location - target) ** 2).mean()
    elif loss == "laplace":
        scale = output[:, 1:2]
        value = (torch.log(2 * scale) + (location - target).abs() / scale).mean()
    else:
        raise ValueError(f"unknown loss {loss!r}")
    if ssim_weight:
        value = value + ssim_weight * (1 - ssim_torch(location, target))
    return value
