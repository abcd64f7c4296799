"""The CARE 3-D U-Net (Weigert et al., Nature Methods 2018), as CSBDeep defines it.

Depth 2, 32 filters at the first level doubling per level, two 3x3x3 convolutions per level,
ReLU, no batch norm, 2x max-pooling, nearest-neighbour up-sampling, concatenated skips, a 1x1
linear head and a residual add of the input: 0.997 M parameters by default. The optional
second head is the scale of a Laplace distribution (probabilistic CARE), made positive with
softplus + 1e-3. This module knows nothing of files; depth and width are config.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from fusecare.config import Config, param
from fusecare.errors import ConfigError
from fusecare.restoration.gate import kernel_radius, smooth_torch

LAPLACE_SCALE_FLOOR = 1e-3

TOP_LEVEL_CHUNKS = 4
"""Without gradients, the full-resolution encoder and decoder (with the head) run in this many
z-slabs (see ``CareUNet._in_slabs``), each at least ``TOP_LEVEL_MIN_SLAB`` planes."""
TOP_LEVEL_MIN_SLAB = 8


class ModelConfig(Config):
    """Hyper-parameters of one ensemble member; saved as ``config.json`` beside its weights."""

    axes: str = param("ZYX", doc="Axis order of the volumes the net sees (CSBDeep writes it explicitly).",
                      choices=("ZYX",))
    depth: int = param(2, doc="U-Net levels below the first; each halves the resolution.", ge=1, le=5)
    first_filters: int = param(32, doc="Filters at the first level; doubled at every level below.",
                               ge=1, le=256)
    kernel_size: int = param(3, doc="Convolution kernel size (odd), the same along Z, Y and X.",
                             ge=1, le=7)
    convs_per_level: int = param(2, doc="Convolutions per level, in encoder and decoder alike.",
                                 ge=1, le=4)
    residual: bool = param(True, doc="Add the input to the output: the net learns a correction.")
    base_sigma: float = param(0.0, doc="Gaussian smoothing (voxels) of the input the residual correction is "
                              "added to; 0 = the input itself (CARE). With a zero correction (training's "
                              "init_zero_head) the net is then a light denoiser that already beats copying the "
                              "input on most volumes, instead of the identity.", ge=0.0, le=4.0)
    probabilistic: bool = param(False, doc="Second head: per-voxel Laplace scale (probabilistic CARE).")
    corrected_input: bool = param(
        False, doc="The member reads the normalised view times its attenuation field (estimated once on the "
        "whole view, fusecare.restoration.attenuation), so it spends its capacity on detail, not on undoing "
        "the dimming the field already undoes. Training and inference both apply the field. Before the gate, "
        "inference divides such members' prediction by the field, so the gate blends in the view's own "
        "brightness, then puts the field back; ungated, the members' prediction is written as it is.")

    def validate(self) -> None:
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"config field 'kernel_size' must be odd, got {self.kernel_size}")
        if self.base_sigma > 0 and not self.residual:
            raise ConfigError("config field 'base_sigma' smooths the residual's input: it needs 'residual' true")

    @property
    def alignment(self) -> int:
        """Block sizes and tile offsets must be multiples of this (one per pooling)."""
        return 2**self.depth

    @property
    def receptive_field_radius(self) -> int:
        """Voxels of context on each side that influence an output voxel (an upper bound).

        Each convolution at level ``l`` reaches ``kernel_size // 2`` voxels at scale ``2**l``;
        pooling and nearest up-sampling add ``2**depth - 1`` more (measured by a gradient test:
        23 for the default, one more than the 22 often quoted). The smoothed residual base reaches
        ``kernel_radius(base_sigma)``; the larger of the two paths bounds the output's reach.
        """
        half = self.kernel_size // 2
        convs = self.convs_per_level * half * (
            2 * sum(2**level for level in range(self.depth)) + 2**self.depth
        )
        return max(convs + 2**self.depth - 1, kernel_radius(self.base_sigma))

    @property
    def tiling_margin(self) -> int:
        """Context margin for tiled prediction: the receptive field rounded up to the alignment."""
        return -(-self.receptive_field_radius // self.alignment) * self.alignment


def _conv_stack(in_channels: int, out_channels: list[int], kernel_size: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for out in out_channels:
        layers += [nn.Conv3d(in_channels, out, kernel_size, padding=kernel_size // 2), nn.ReLU(inplace=True)]
        in_channels = out
    return nn.Sequential(*layers)


class CareUNet(nn.Module):
    """CARE 3-D U-Net; input and output are (N, 1, Z, Y, X) with Z, Y, X multiples of 2**depth.

    Returns one channel (the restored volume), or two when probabilistic: location and Laplace
    scale.
    """

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.config = config
        c, k, n = config.first_filters, config.kernel_size, config.convs_per_level
        self.encoders = nn.ModuleList(
            _conv_stack(1 if level == 0 else c * 2 ** (level - 1), [c * 2**level] * n, k)
            for level in range(config.depth)
        )
        # CSBDeep's bottom: n-1 convs at the widest level, the last one narrows for the way up.
        bottom = c * 2**config.depth
        self.bottom = _conv_stack(
            c * 2 ** (config.depth - 1), [bottom] * (n - 1) + [c * 2 ** max(0, config.depth - 1)], k
        )
        self.decoders = nn.ModuleList(
            _conv_stack(
                c * 2**level * 2, [c * 2**level] * (n - 1) + [c * 2 ** max(0, level - 1)], k
            )
            for level in range(config.depth)
        )
        self.head = nn.Conv3d(c, 2 if config.probabilistic else 1, kernel_size=1)

    def forward(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """``base``: ``self.base(x)`` when the caller has it already (an ensemble whose members
        share ``base_sigma`` smooths each tile once, not once per member)."""
        # Peak memory is at full resolution: every reference is dropped as soon as it is used
        # (the skip and the up-sampled map once concatenated), and without gradients the first
        # encoder and the last decoder run in z-slabs (``_in_slabs``), so a tile holds little more
        # than its full-resolution skip, and tiles can be larger in the same memory (fewer
        # margins recomputed).
        sliced = not torch.is_grad_enabled()
        skips = []
        y = x
        for level, encoder in enumerate(self.encoders):
            if sliced and level == 0:
                y = self._in_slabs(lambda first, last, run=encoder: run(x[:, :, first:last]), x.shape[2])
            else:
                y = encoder(y)
            skips.append(y)
            y = F.max_pool3d(y, 2)
        y = self.bottom(y)
        for level in reversed(range(1, self.config.depth)):
            y = torch.cat([F.interpolate(y, scale_factor=2, mode="nearest"), skips.pop()], dim=1)
            y = self.decoders[level](y)
        low, skip = y, skips.pop()

        def top(first: int, last: int) -> torch.Tensor:
            """The full-resolution decoder and the head for planes ``first:last``."""
            low_first = first // 2  # nearest up-sampling: plane z comes from low plane z // 2
            up = F.interpolate(low[:, :, low_first:(last + 1) // 2], scale_factor=2, mode="nearest")
            up = up[:, :, first - 2 * low_first:last - 2 * low_first]
            return self._head(self.decoders[0](torch.cat([up, skip[:, :, first:last]], dim=1)))

        y = self._in_slabs(top, skip.shape[2]) if sliced else top(0, skip.shape[2])
        if self.config.residual:
            location = y[:, :1] + (self.base(x) if base is None else base)
        else:
            location = y[:, :1]
        if not self.config.probabilistic:
            return location
        scale = F.softplus(y[:, 1:]) + LAPLACE_SCALE_FLOOR
        return torch.cat([location, scale], dim=1)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """What the residual correction is added to: the input, or the input smoothed by
        ``base_sigma`` with the gate's kernels (reflecting at the tile's borders, which tiling's
        margins keep away from every core but at the volume's own ends). In float32 even under
        CUDA autocast: the base carries the output's full intensity, and a float16 base would
        round the whole restored volume, not only the correction."""
        if self.config.base_sigma <= 0:
            return x
        if x.is_cuda:
            with torch.autocast("cuda", enabled=False):
                return smooth_torch(x.float(), self.config.base_sigma)
        return smooth_torch(x, self.config.base_sigma)

    def _in_slabs(self, compute: Callable[[int, int], torch.Tensor], depth: int) -> torch.Tensor:
        """``compute(0, depth)``, assembled from z-slabs: ``compute(first, last)`` gives the planes
        ``first:last`` of a full-resolution level (its convolutions zero-pad at the slab's ends),
        so each slab is computed with a halo of as many planes as a level's convolutions reach and
        cropped; the result is the whole pass's, while the level's intermediate maps exist for one
        slab at a time."""
        halo = self.config.convs_per_level * (self.config.kernel_size // 2)
        step = max(TOP_LEVEL_MIN_SLAB, math.ceil(depth / TOP_LEVEL_CHUNKS))
        out: torch.Tensor | None = None
        for z0 in range(0, depth, step):
            z1 = min(z0 + step, depth)
            first, last = max(z0 - halo, 0), min(z1 + halo, depth)
            part = compute(first, last)
            if out is None:
                layout = (torch.channels_last_3d if part.is_contiguous(memory_format=torch.channels_last_3d)
                          else torch.contiguous_format)
                out = torch.empty((*part.shape[:2], depth, *part.shape[3:]), dtype=part.dtype, device=part.device,
                                  memory_format=layout)
            out[:, :, z0:z1] = part[:, :, z0 - first:z1 - first]
        assert out is not None
        return out

    def _head(self, y: torch.Tensor) -> torch.Tensor:
        """The 1x1x1 head as a matrix product over channels: on CPU, ``Conv3d`` with a 1x1x1
        kernel takes the slow im2col path (about 8 % of a member's time on a tile) where the
        channels-last product is one pass over memory."""
        weight = self.head.weight.flatten(1)
        out = F.linear(y.movedim(1, -1), weight, self.head.bias)
        return out.movedim(-1, 1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
