"""Volumes: CMRF and TinyU-Net with spatial_dims=3 (one implementation, parameterised)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cmrf
from cmrf import CMRF, TinyUNet
from cmrf.layers import cmrf_num_params


@settings(max_examples=8)
@given(
    depth=st.integers(1, 3),
    N=st.sampled_from([1, 2, 4]),
    in_ch=st.integers(1, 3),
    classes=st.integers(1, 4),
    size=st.tuples(*[st.integers(8, 11)] * 3),
)
def test_tinyunet3d_any_volume_size_shapes_and_gradients(depth, N, in_ch, classes, size):
    channels = tuple(2 * N * (i + 1) for i in range(depth))
    model = TinyUNet(in_ch, classes, N=N, channels=channels, spatial_dims=3)
    x = torch.randn(2, in_ch, *size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, classes, *size)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters())


def test_3d_layers_are_3d():
    model = cmrf.create_model("tinyunet3d", in_chans=1, num_classes=2, channels=(16, 32))
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.Conv3d in kinds and torch.nn.BatchNorm3d in kinds and torch.nn.MaxPool3d in kinds
    assert torch.nn.Conv2d not in kinds and torch.nn.BatchNorm2d not in kinds


def test_3d_params_follow_closed_form():
    widths = (64, 128, 256, 512)
    model = cmrf.create_model("tinyunet3d", in_chans=1, num_classes=2)
    encoder = sum(cmrf_num_params(a, b, 8, 3) for a, b in zip((1,) + widths[:-1], widths))
    decoder = sum(cmrf_num_params(b + c, c, 8, 3) for b, c in zip(widths[1:] + widths[-1:], widths))
    assert sum(p.numel() for p in model.parameters()) == encoder + decoder + 64 * 2 + 2


def test_3d_matches_2d_arithmetic_errors():
    with pytest.raises(ValueError, match=r"60 is not divisible by 2N = 16"):
        CMRF(64, 60, N=8, spatial_dims=3)
    with pytest.raises(ValueError, match=r"5-D input"):
        TinyUNet(spatial_dims=3)(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r">= 4"):
        TinyUNet(1, 2, channels=(16, 32), spatial_dims=3)(torch.randn(1, 1, 8, 3, 8))


def test_3d_profile_counts_3d_convolutions():
    block = CMRF(1, 4, N=2, spatial_dims=3)
    cost = cmrf.profile(block, (1, 1, 4, 4, 4))
    voxels = 4**3
    # Per voxel: pw1 2 outputs x 1 tap + BN 4x2; one 3x3x3 depthwise stage 27 + BN 4;
    # pw2 4 outputs x 2 inputs + BN 4x4. Doubled.
    assert cost.flops == 2 * voxels * (2 + 8 + 27 + 4 + 8 + 16)
    assert cost.params == cmrf_num_params(1, 4, 2, spatial_dims=3)
    assert cost.macs >= voxels * (2 + 27 + 8)
