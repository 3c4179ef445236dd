"""Building blocks: the CMRF module and the small conv blocks it is made of.

Every block takes ``spatial_dims`` (MONAI's convention): 2 for images ``(B, C, H, W)``,
3 for volumes ``(B, C, D, H, W)``. One implementation serves both.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from cmrf.ops import cascade_concat

# The reference CMRF builds every BatchNorm with these, not PyTorch's defaults.
CMRF_BN_EPS = 1e-3
CMRF_BN_MOMENTUM = 0.03

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


def check_spatial_dims(spatial_dims) -> int:
    """Return ``spatial_dims`` if it is 1, 2 or 3, else raise ``ValueError``."""
    if isinstance(spatial_dims, bool) or spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    return int(spatial_dims)


def conv_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` for ``spatial_dims`` 1/2/3."""
    return _CONV[check_spatial_dims(spatial_dims)]


def batchnorm_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.BatchNorm{1,2,3}d`` for ``spatial_dims`` 1/2/3."""
    return _BATCHNORM[check_spatial_dims(spatial_dims)]


def maxpool_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.MaxPool{1,2,3}d`` for ``spatial_dims`` 1/2/3."""
    return _MAXPOOL[check_spatial_dims(spatial_dims)]


def check_positive_int(name: str, value) -> int:
    """Return ``value`` if it is an integer >= 1, else raise ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return int(value)


class ConvNorm(nn.Sequential):
    """Convolution without bias followed by BatchNorm (and optionally an activation).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: cubic kernel side. Default 1.
        groups: convolution groups. Default 1.
        act: activation module appended after the norm, or ``None`` (default) for none.
        spatial_dims: 2 for images, 3 for volumes. Default 2.
        eps, momentum: BatchNorm settings; the defaults are the reference CMRF's (1e-3, 0.03).

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)`` (padding keeps ``S``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        groups: int = 1,
        act: nn.Module | None = None,
        spatial_dims: int = 2,
        eps: float = CMRF_BN_EPS,
        momentum: float = CMRF_BN_MOMENTUM,
    ):
        layers = {
            "conv": conv_type(spatial_dims)(
                in_channels,
                out_channels,
                kernel_size,
                padding=kernel_size // 2,
                groups=groups,
                bias=False,
            ),
            "norm": batchnorm_type(spatial_dims)(out_channels, eps=eps, momentum=momentum),
        }
        if act is not None:
            layers["act"] = act
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)


class ConvBNReLU(nn.Sequential):
    """3x3 convolution (with bias) -> BatchNorm (PyTorch defaults) -> ReLU.

    The classic block of SegNet and of CMUNeXt's ``conv_block``.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2):
        super().__init__()
        self.conv = conv_type(spatial_dims)(in_channels, out_channels, 3, padding=1)
        self.norm = batchnorm_type(spatial_dims)(out_channels)
        self.act = nn.ReLU(inplace=True)


def cmrf_channels(in_channels: int, out_channels: int, N: int) -> tuple[int, int]:
    """Validate CMRF's channel arithmetic and return ``(hidden, branch)``.

    ``hidden = out_channels / N`` is the width after the first pointwise conv; ``branch =
    out_channels / (2N)`` is the width of each parity half and of every cascade stage.

    Raises:
        ValueError: naming the offending numbers, when a count is not an integer >= 1 or
            ``out_channels`` is not divisible by ``2N``.
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("out_channels", out_channels)
    check_positive_int("N", N)
    if out_channels % (2 * N):
        raise ValueError(
            f"CMRF needs out_channels divisible by 2N: {out_channels} is not divisible by "
            f"2N = {2 * N} (N = {N}); try an out_channels that is a multiple of {2 * N} or a "
            f"smaller N"
        )
    return out_channels // N, out_channels // (2 * N)


def cmrf_num_params(in_channels: int, out_channels: int, N: int = 8, spatial_dims: int = 2) -> int:
    """Closed-form parameter count of ``CMRF(in_channels, out_channels, N)``.

    BatchNorm affine parameters are counted, running statistics are not.
    """
    hidden, branch = cmrf_channels(in_channels, out_channels, N)
    taps = 3 ** check_spatial_dims(spatial_dims)
    pw1 = in_channels * hidden + 2 * hidden
    cascade = (N - 1) * (taps * branch + 2 * branch)
    pw2 = (out_channels // 2) * out_channels + 2 * out_channels
    return pw1 + cascade + pw2


class CMRF(nn.Module):
    """Cascade Multi-Receptive Fields module (TinyU-Net, MICCAI 2024).

    With ``C = out_channels`` and ``c = C / (2N)``:

    1. ``pw1``: 1x1 conv ``in_channels -> C/N`` + BatchNorm + GELU.
    2. Split by parity: ``odd = y[:, 0::2]``, ``even = y[:, 1::2]`` (``c`` channels each).
    3. ``N - 1`` cascaded 3x3 depthwise conv + BatchNorm stages on ``even``, each fed by the
       previous one.
    4. Concatenate ``[odd + even, d_1, ..., d_{N-1}]`` (``C/2`` channels).
    5. ``pw2``: 1x1 conv ``C/2 -> C`` + BatchNorm + GELU.
    6. Add the input when ``in_channels == out_channels`` and ``shortcut`` is set.

    Every BatchNorm uses ``eps=1e-3, momentum=0.03`` as in the reference code.

    Args:
        in_channels: input channels, >= 1.
        out_channels: output channels, a multiple of ``2N``.
        N: number of receptive fields (one linear branch plus ``N - 1`` cascade stages).
            Default 8, the paper's choice.
        shortcut: add the input to the output when the channel counts match. Default True.
        spatial_dims: 2 for images (default), 3 for volumes (3x3x3 depthwise convolutions).
        fused: per-module choice of the cascade implementation: ``None`` (default) follows the
            ``CMRF_FUSED`` environment variable, ``True`` forces the fused Triton kernels,
            ``False`` forces the plain PyTorch reference.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)`` with ``len(S) == spatial_dims``.

    Raises:
        ValueError: for channel counts or ``N`` that are not integers >= 1, or an
            ``out_channels`` not divisible by ``2N``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        N: int = 8,
        shortcut: bool = True,
        spatial_dims: int = 2,
        fused: bool | None = None,
    ):
        super().__init__()
        hidden, branch = cmrf_channels(in_channels, out_channels, N)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.N = int(N)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.add_residual = bool(shortcut) and in_channels == out_channels
        self.fused = fused
        self.pw1 = ConvNorm(in_channels, hidden, act=nn.GELU(), spatial_dims=spatial_dims)
        self.cascade = nn.ModuleList(
            ConvNorm(branch, branch, kernel_size=3, groups=branch, spatial_dims=spatial_dims)
            for _ in range(N - 1)
        )
        self.pw2 = ConvNorm(
            out_channels // 2, out_channels, act=nn.GELU(), spatial_dims=spatial_dims
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected_dims = self.spatial_dims + 2
        if x.dim() != expected_dims or x.shape[1] != self.in_channels:
            raise ValueError(
                f"CMRF expected input of shape (B, {self.in_channels}, "
                f"{', '.join('*' * self.spatial_dims)}) ({expected_dims}-D), got "
                f"{tuple(x.shape)}"
            )
        y = cascade_concat(self.pw1(x), self.cascade, fused=self.fused)
        y = self.pw2(y)
        return x + y if self.add_residual else y

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, N={self.N}, "
            f"residual={self.add_residual}, spatial_dims={self.spatial_dims}"
        )
