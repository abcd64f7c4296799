"""The architecture shipped inside a BioImage Model Zoo package: an ensemble's mean as one module.

This file travels alone (``pytorch_state_dict`` weights name it as their architecture source),
so it imports nothing from fusecare: Fiji/deepImageJ, ilastik or BiaPy load it without our
package installed. ``CareUNet3D`` rebuilds ``fusecare.restoration.model.CareUNet`` layer for layer, with
the same state-dict keys, so a member's ``weights.pt`` loads into it unchanged; the export test
checks that both give the same numbers. ``EnsembleMean`` holds the members and returns the mean
of their restored volumes (the location head of probabilistic members). Ungated: fusecare's
do-no-harm gate is not part of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _conv_stack(in_channels: int, out_channels: list[int], kernel_size: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for out in out_channels:
        layers += [nn.Conv3d(in_channels, out, kernel_size, padding=kernel_size // 2), nn.ReLU(inplace=True)]
        in_channels = out
    return nn.Sequential(*layers)


def _gaussian_weights(sigma: float) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian (radius ``int(4 * sigma + 0.5)``), normalised."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (x / sigma) ** 2)
    return (weights / weights.sum()).float()


def _smooth(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian of a (N, 1, Z, Y, X) tensor, padded as scipy's ``mode='reflect'``
    (``c b a | a b c``: the edge voxel repeated), radius at most each side's length."""
    radius = (weights.numel() - 1) // 2
    for dim in (2, 3, 4):
        size = x.shape[dim]
        x = torch.cat([x.narrow(dim, 0, radius).flip([dim]), x,
                       x.narrow(dim, size - radius, radius).flip([dim])], dim=dim)
        shape = [1, 1, 1, 1, 1]
        shape[dim] = weights.numel()
        x = F.conv3d(x, weights.to(x.dtype).view(shape))
    return x


class CareUNet3D(nn.Module):
    """CARE 3-D U-Net (Weigert et al. 2018): (N, 1, Z, Y, X) -> (N, 1, Z, Y, X), restored volume.

    Z, Y and X must be multiples of ``2**depth``. A probabilistic member's scale head is
    computed by the weights but not returned: the package gives the restored volume only.
    """

    def __init__(self, depth: int = 2, first_filters: int = 32, kernel_size: int = 3,
                 convs_per_level: int = 2, residual: bool = True, probabilistic: bool = False,
                 base_sigma: float = 0.0) -> None:
        super().__init__()
        self.depth, self.residual = depth, residual
        # the residual adds the correction to the input smoothed by base_sigma voxels (0: the input)
        self.smooths_base = base_sigma > 0
        self.register_buffer("base_weights", _gaussian_weights(base_sigma) if self.smooths_base
                             else torch.ones(1), persistent=False)
        c, k, n = first_filters, kernel_size, convs_per_level
        self.encoders = nn.ModuleList(
            _conv_stack(1 if level == 0 else c * 2 ** (level - 1), [c * 2**level] * n, k) for level in range(depth)
        )
        self.bottom = _conv_stack(c * 2 ** (depth - 1), [c * 2**depth] * (n - 1) + [c * 2 ** max(0, depth - 1)], k)
        self.decoders = nn.ModuleList(
            _conv_stack(c * 2**level * 2, [c * 2**level] * (n - 1) + [c * 2 ** max(0, level - 1)], k)
            for level in range(depth)
        )
        self.head = nn.Conv3d(c, 2 if probabilistic else 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        y = x
        for encoder in self.encoders:
            y = encoder(y)
            skips.append(y)
            y = F.max_pool3d(y, 2)
        y = self.bottom(y)
        for step, decoder in enumerate(self.decoders[::-1]):  # deepest level first (TorchScript-friendly)
            y = F.interpolate(y, scale_factor=2.0, mode="nearest")
            y = decoder(torch.cat([y, skips[self.depth - 1 - step]], dim=1))
        y = self.head(y)[:, :1]
        if not self.residual:
            return y
        return y + (_smooth(x, self.base_weights) if self.smooths_base else x)


class EnsembleMean(nn.Module):
    """Members inside, their mean out: ``members`` is one keyword dict of ``CareUNet3D`` per member."""

    def __init__(self, members: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        self.members = nn.ModuleList(CareUNet3D(**dict(kwargs)) for kwargs in members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(x)
        for member in self.members:
            total = total + member(x)
        return total / len(self.members)
