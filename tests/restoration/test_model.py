"""The CARE 3-D U-Net: CSBDeep's layout, parameter count, receptive field, heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from fusecare.errors import ConfigError
from fusecare.restoration.model import LAPLACE_SCALE_FLOOR, CareUNet, ModelConfig, count_parameters


def test_default_has_csbdeep_parameter_count():
    assert count_parameters(CareUNet(ModelConfig())) == 996_769  # 0.997 M, as CSBDeep's CARE


def test_probabilistic_head_adds_one_output_channel():
    assert count_parameters(CareUNet(ModelConfig(probabilistic=True))) == 996_769 + 33


def test_layers_follow_the_config():
    model = CareUNet(ModelConfig(depth=3, first_filters=8, convs_per_level=3))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convs) == 3 * 3 * 2 + 3 + 1  # encoder + decoder levels, bottom, head
    assert max(c.out_channels for c in convs) == 8 * 2**3
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _empirical_radius(config: ModelConfig) -> int:
    """Largest distance from an output voxel to an input voxel with a non-zero gradient."""
    torch.manual_seed(0)
    model = CareUNet(config).double()
    for p in model.parameters():
        p.data.uniform_(-0.5, 0.5)
    worst = 0
    for offset in range(config.alignment):  # every position relative to the pooling grid
        x = torch.randn(1, 1, 8, 128, 8, dtype=torch.float64, requires_grad=True)
        centre = 64 + offset
        model(x)[0, 0, 4, centre, 4].backward()
        touched = torch.nonzero(x.grad[0, 0].abs().sum(dim=(0, 2)) > 0).flatten()
        worst = max(worst, centre - int(touched.min()), int(touched.max()) - centre)
    return worst


@pytest.mark.parametrize("config", [ModelConfig(first_filters=4), ModelConfig(depth=1, first_filters=4),
                                    ModelConfig(convs_per_level=1, first_filters=4)])
def test_receptive_field_radius_matches_gradient(config):
    assert _empirical_radius(config) == config.receptive_field_radius


def test_default_receptive_field_and_alignment():
    assert ModelConfig().receptive_field_radius == 23
    assert ModelConfig().alignment == 4
    assert ModelConfig().tiling_margin == 24


def test_residual_net_with_zero_weights_is_identity_and_scale_is_positive():
    model = CareUNet(ModelConfig(first_filters=4, probabilistic=True))
    for p in model.parameters():
        p.data.zero_()
    x = torch.randn(1, 1, 8, 16, 16)
    out = model(x)
    assert out.shape == (1, 2, 8, 16, 16)
    torch.testing.assert_close(out[:, :1], x)
    assert torch.all(out[:, 1] >= LAPLACE_SCALE_FLOOR)


@pytest.mark.parametrize("sigma", [0.45, 1.5])
def test_zero_correction_on_a_smoothed_base_is_the_gates_gaussian(sigma):
    """``base_sigma``: with a zero correction the net is the light Gaussian the benchmark tunes, not
    the identity (scipy's reflect at the borders, as the gate smooths)."""
    model = CareUNet(ModelConfig(first_filters=4, base_sigma=sigma))
    for p in model.parameters():
        p.data.zero_()
    x = torch.rand(1, 1, 8, 16, 12)
    expected = ndimage.gaussian_filter(x[0, 0].numpy(), sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(model(x)[0, 0].detach().numpy(), expected, atol=1e-6)


def test_a_wide_base_reaches_past_the_network():
    config = ModelConfig(first_filters=4, depth=1, convs_per_level=1, base_sigma=3.0)  # net 5, base 12
    assert config.receptive_field_radius == 12 == _empirical_radius(config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: float16 autocast is CUDA's")
def test_the_smoothed_base_stays_float32_under_autocast():
    """Under float16 autocast only the correction is half precision; the base, which carries the
    output's intensity, is not rounded."""
    model = CareUNet(ModelConfig(first_filters=4, base_sigma=0.45)).cuda().eval()
    x = torch.rand(1, 1, 8, 16, 16, device="cuda")
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cuda", dtype=torch.float16):
            half = model(x)
    assert half.dtype == torch.float32
    torch.testing.assert_close(model.base(x), ndimage_gaussian(x, 0.45), atol=1e-6, rtol=0)
    assert float((half - full).abs().max()) < 5e-3


def ndimage_gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    out = ndimage.gaussian_filter(x[0, 0].cpu().numpy(), sigma, mode="reflect", truncate=4.0)
    return torch.from_numpy(out)[None, None].to(x.device)


def test_a_smoothed_base_needs_the_residual():
    with pytest.raises(ConfigError, match="base_sigma"):
        ModelConfig(residual=False, base_sigma=0.5)


def test_even_kernel_is_rejected():
    with pytest.raises(ConfigError, match="kernel_size"):
        ModelConfig(kernel_size=4)


@pytest.mark.parametrize("config", [ModelConfig(first_filters=4),
                                    ModelConfig(first_filters=4, depth=3, probabilistic=True),
                                    ModelConfig(first_filters=4, depth=1, convs_per_level=3)])
@pytest.mark.parametrize("depth", [8, 40])
def test_inference_in_slabs_equals_the_whole_pass(config, depth):
    """Without gradients the full-resolution decoder runs in z-slabs with a halo: the same output
    as the pass training uses, where the slabs' edges fall inside the volume too."""
    torch.manual_seed(0)
    model = CareUNet(config).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.rand(1, 1, depth, 24, 16)
    whole = model(x).detach()
    with torch.inference_mode():
        slabs = model(x)
    torch.testing.assert_close(slabs, whole, atol=1e-5, rtol=1e-5)
