"""CMUNeXt (Tang et al., ISBI 2024): a U-Net with large-kernel depthwise ConvMixer blocks.

``cmunext`` matches the reference implementation (3,149,202 params for 3 in / 2 classes) and
loads its checkpoints; ``cmunext_cmrf`` is TinyU-Net's Table 3 variant: the five encoder blocks
replaced by CMRF through ``replace_blocks`` (1,967,799 params, 12.23 paper-convention GFLOPs).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence

import torch
from timm.models import generate_default_cfgs
from torch import nn

from cmrf.layers import (
    ConvBNReLU,
    batchnorm_type,
    check_input,
    check_positive_int,
    check_positive_ints,
    check_spatial_dims,
    conv_type,
    first_parameter,
    maxpool_type,
)
from cmrf.models._base import SegmentationModel, zoo_cfg
from cmrf.models._builder import add_reference_key_hook, build_model, rename_keys, require_requested_n
from cmrf.models.registry import register_model

__all__ = ["CMUNeXt", "checkpoint_filter_fn"]

# nn.Upsample mode of the decoder: the reference's bilinear, and its analogues in 1D/3D.
_UPSAMPLE_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


# --- reference checkpoints -------------------------------------------------------------------

# Inside one ConvMixer layer: Sequential(Residual(dw conv, GELU, BN), 1x1, GELU, BN, 1x1, GELU, BN).
_LAYER_KEYS = {
    "0.fn.0": "spatial.conv",
    "0.fn.2": "spatial.norm",
    "1": "expand.conv",
    "3": "expand.norm",
    "4": "project.conv",
    "6": "project.norm",
}
# fusion_conv: Sequential(grouped 3x3, GELU, BN, 1x1, GELU, BN, 1x1, GELU, BN).
_FUSION_KEYS = {
    "0": "spatial.conv",
    "2": "spatial.norm",
    "3": "expand.conv",
    "5": "expand.norm",
    "6": "project.conv",
    "8": "project.norm",
}


def _encoder_layer(match: re.Match) -> str:
    return f"encoders.{int(match.group(1)) - 1}.layers.{match.group(2)}.{_LAYER_KEYS[match.group(3)]}."


def _fusion(match: re.Match) -> str:
    return f"fusions.{int(match.group(1)) - 2}.{_FUSION_KEYS[match.group(2)]}."


_REFERENCE_PATTERNS = [
    (r"^stem\.conv\.0\.", "stem.conv."),
    (r"^stem\.conv\.1\.", "stem.norm."),
    (r"^encoder(\d+)\.block\.(\d+)\.(0\.fn\.0|0\.fn\.2|1|3|4|6)\.", _encoder_layer),
    (r"^encoder(\d+)\.up\.conv\.0\.", lambda m: f"encoders.{int(m.group(1)) - 1}.proj.conv."),
    (r"^encoder(\d+)\.up\.conv\.1\.", lambda m: f"encoders.{int(m.group(1)) - 1}.proj.norm."),
    (r"^Up(\d+)\.up\.1\.", lambda m: f"ups.{int(m.group(1)) - 2}.conv."),
    (r"^Up(\d+)\.up\.2\.", lambda m: f"ups.{int(m.group(1)) - 2}.norm."),
    (r"^Up_conv(\d+)\.conv\.(\d+)\.", _fusion),
    (r"^Conv_1x1\.", "head."),
]


# Top-level names that only the reference uses (ours are stem.conv|norm, encoders, ups, fusions, head).
_REFERENCE_NAME = re.compile(r"^(stem\.conv\.\d|encoder\d|Up\d|Up_conv\d|Conv_1x1)\.")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module | None = None):
    """Map a state dict saved by the reference CMUNeXt code to this library's names.

    ``stem.conv.{0,1}`` -> ``stem.{conv,norm}``; ``encoder{i}.block.{j}.{0.fn.0|0.fn.2|1|3|4|6}``
    -> ``encoders.{i-1}.layers.{j}.{spatial|expand|project}.{conv|norm}``; ``encoder{i}.up.conv``
    -> ``encoders.{i-1}.proj``; ``Up{k}.up.{1,2}`` -> ``ups.{k-2}.{conv,norm}``;
    ``Up_conv{k}.conv.{0,2,3,5,6,8}`` -> ``fusions.{k-2}.*``; ``Conv_1x1`` -> ``head``.
    A state dict already in this library's names passes through.
    """
    if not any(_REFERENCE_NAME.match(k) for k in state_dict):
        return dict(state_dict)
    return rename_keys(state_dict, _REFERENCE_PATTERNS)


# --- building blocks -------------------------------------------------------------------------


class ConvActNorm(nn.Sequential):
    """Convolution (with bias) -> GELU -> BatchNorm: CMUNeXt's ordering (norm after activation).

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)`` (padding keeps ``S``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        groups: int = 1,
        spatial_dims: int = 2,
    ):
        super().__init__()
        self.conv = conv_type(spatial_dims)(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups
        )
        self.act = nn.GELU()
        self.norm = batchnorm_type(spatial_dims)(out_channels)


class ConvMixerLayer(nn.Module):
    """``x + spatial(x)`` (k x k depthwise), then an inverted bottleneck ``C -> 4C -> C``.

    Shapes: ``(B, channels, *S) -> (B, channels, *S)``.
    """

    def __init__(self, channels: int, kernel_size: int, spatial_dims: int = 2):
        super().__init__()
        self.spatial = ConvActNorm(
            channels, channels, kernel_size, groups=channels, spatial_dims=spatial_dims
        )
        self.expand = ConvActNorm(channels, 4 * channels, spatial_dims=spatial_dims)
        self.project = ConvActNorm(4 * channels, channels, spatial_dims=spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.spatial(x)
        return self.project(self.expand(x))


class CMUNeXtBlock(nn.Module):
    """``depth`` ConvMixer layers at ``in_channels``, then a 3x3 ConvBNReLU to ``out_channels``.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, depth: int, kernel_size: int, spatial_dims: int = 2
    ):
        super().__init__()
        self.layers = nn.Sequential(
            *(ConvMixerLayer(in_channels, kernel_size, spatial_dims) for _ in range(depth))
        )
        self.proj = ConvBNReLU(in_channels, out_channels, spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.layers(x))


class UpConv(nn.Sequential):
    """``nn.Upsample`` x2 (bilinear in 2D) -> 3x3 ConvBNReLU (the reference ``up_conv``)."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode=_UPSAMPLE_MODE[spatial_dims])
        self.conv = conv_type(spatial_dims)(in_channels, out_channels, 3, padding=1)
        self.norm = batchnorm_type(spatial_dims)(out_channels)
        self.act = nn.ReLU(inplace=True)


class FusionConv(nn.Sequential):
    """Grouped 3x3 (2 groups) -> 1x1 to ``4 * out`` -> 1x1 to ``out``, each conv-GELU-BN.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``; ``in_channels`` must be even.
    """

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2):
        super().__init__()
        self.spatial = ConvActNorm(in_channels, in_channels, 3, groups=2, spatial_dims=spatial_dims)
        self.expand = ConvActNorm(in_channels, 4 * out_channels, spatial_dims=spatial_dims)
        self.project = ConvActNorm(4 * out_channels, out_channels, spatial_dims=spatial_dims)


# --- the network -----------------------------------------------------------------------------


class CMUNeXt(SegmentationModel):
    """CMUNeXt.

    ``stem`` (3x3 ConvBNReLU to ``dims[0]``); five encoder blocks ``encoders[i] =
    CMUNeXtBlock(dims[i-1], dims[i], depths[i], kernels[i])`` (the first maps ``dims[0]`` to
    itself), separated by 2x max-pools; decoder, deepest first: ``ups[i]`` upsamples x2 and maps
    ``dims[i+1] -> dims[i]``, then ``fusions[i]`` fuses ``cat([skip, up])`` (skip first) to
    ``dims[i]``; ``head`` is a 1x1 conv with bias. BatchNorm uses PyTorch's defaults.

    ``replace_blocks`` uses ``replace_blocks_targets`` (the five encoder blocks) by default: that
    is the mapping that gives TinyU-Net's Table 3 row.

    Args:
        in_channels: image channels. Default 3.
        num_classes: output channels (logits). Default 2.
        dims: widths of the five stages. Default ``(16, 32, 128, 160, 256)``.
        depths: ConvMixer layers per encoder block. Default ``(1, 1, 1, 3, 1)``.
        kernels: depthwise kernel side per encoder block (odd). Default ``(3, 3, 7, 7, 7)``.
        spatial_dims: 2 for images (default), 3 for volumes (trilinear upsampling), 1 for signals.

    Shapes: ``(B, in_channels, *S) -> (B, num_classes, *S)``, floating-point input; every side a
    multiple of 16.

    timm idioms: ``pretrained_cfg``/``default_cfg`` (the library's normalisation, input size,
    classes), ``get_classifier()`` (``head``), ``reset_classifier(num_classes)``.

    Raises:
        ValueError: for arguments of the wrong type, length or range (``dims=16``, an even
            kernel...), naming the argument.
    """

    # Four poolings, then x2 upsampling back: every side must be a multiple of 2 ** 4.
    input_multiple = 16
    checkpoint_filter_fn = staticmethod(checkpoint_filter_fn)
    replace_blocks_targets = ("encoders.*",)

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        dims: Sequence[int] = (16, 32, 128, 160, 256),
        depths: Sequence[int] = (1, 1, 1, 3, 1),
        kernels: Sequence[int] = (3, 3, 7, 7, 7),
        spatial_dims: int = 2,
    ):
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        dims = check_positive_ints("dims", dims, "stage widths", "(16, 32, 128, 160, 256)", length=5)
        depths = check_positive_ints("depths", depths, "layers per stage", "(1, 1, 1, 3, 1)", length=5)
        kernels = check_positive_ints("kernels", kernels, "odd kernel sides", "(3, 3, 7, 7, 7)", length=5)
        if any(k % 2 == 0 for k in kernels):
            raise ValueError(f"kernels must be odd (padding k // 2 keeps the size), got {kernels}")
        self.dims = dims
        sd = spatial_dims
        self.stem = ConvBNReLU(in_channels, dims[0], sd)
        widths_in = dims[:1] + dims[:-1]
        self.encoders = nn.ModuleList(
            CMUNeXtBlock(a, b, d, k, sd) for a, b, d, k in zip(widths_in, dims, depths, kernels)
        )
        self.pool = maxpool_type(sd)(2, 2)
        self.ups = nn.ModuleList(UpConv(dims[i + 1], dims[i], sd) for i in range(4))
        self.fusions = nn.ModuleList(FusionConv(2 * dims[i], dims[i], sd) for i in range(4))
        self.head = conv_type(sd)(dims[0], num_classes, 1)
        # Lets load_state_dict take checkpoints saved by the reference code as they are.
        add_reference_key_hook(self, checkpoint_filter_fn)
        self._init_cfg("cmunext")

    @property
    def smallest_side(self) -> int:
        return self.input_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(
            x,
            self.in_channels,
            self.spatial_dims,
            "CMUNeXt",
            multiple_of=self.input_multiple,
            why="four poolings, then x2 upsampling back",
            weight=first_parameter(self),
        )
        # (eager only: a guard on the sizes would constrain what torch.compile and torch.export trace)
        eager = not (torch.jit.is_tracing() or torch.compiler.is_compiling())
        deepest = (side // self.input_multiple for side in x.shape[2:])
        if self.training and eager and x.shape[0] * math.prod(deepest) == 1:
            # torch's BatchNorm would say "Expected more than 1 value per channel when training"
            raise ValueError(
                f"CMUNeXt in training mode needs more than one value per channel in its deepest block: "
                f"a batch of 1 at spatial size {tuple(x.shape[2:])} leaves it 1 pixel; train with a "
                f"batch of 2 or more, or sides of {2 * self.input_multiple} or more")
        skips = []
        x = self.stem(x)
        for i, encoder in enumerate(self.encoders):
            x = encoder(self.pool(x) if i else x)
            skips.append(x)
        for i in reversed(range(4)):
            x = self.fusions[i](torch.cat([skips[i], self.ups[i](x)], dim=1))
        return self.head(x)


default_cfgs = generate_default_cfgs(
    {name: zoo_cfg(first_conv="stem.conv") for name in ("cmunext", "cmunext_cmrf", "cmunext_s", "cmunext_l")}
)


def _create(variant: str, pretrained: bool = False, **kwargs) -> CMUNeXt:
    return build_model(CMUNeXt, variant, pretrained, **kwargs)


def _with_cmrf(model: CMUNeXt, N: int) -> CMUNeXt:
    from cmrf.surgery import replace_blocks

    param = next(model.parameters())
    probe = torch.zeros(
        (1, model.in_channels) + (32,) * model.spatial_dims, device=param.device, dtype=param.dtype
    )
    report = replace_blocks(model, N, example_input=probe)
    require_requested_n(report, N, "cmunext_cmrf", "cmunext")
    return model


@register_model
def cmunext(pretrained: bool = False, **kwargs) -> CMUNeXt:
    """CMUNeXt as in the reference: dims (16, 32, 128, 160, 256), depths (1, 1, 1, 3, 1),
    kernels (3, 3, 7, 7, 7); 3,149,202 params for 3 in / 2 classes."""
    return _create("cmunext", pretrained, **kwargs)


@register_model
def cmunext_cmrf(pretrained: bool = False, N: int = 8, **kwargs) -> CMUNeXt:
    """CMUNeXt with its five encoder blocks replaced by ``CMRF`` (TinyU-Net's Table 3 row):
    1,967,799 params, 12.23 paper-convention GFLOPs at 1x3x256x256."""
    finish = functools.partial(_with_cmrf, N=N)
    return _create("cmunext_cmrf", pretrained, entry_args=("N",), finish=finish, **kwargs)


@register_model
def cmunext_s(
    pretrained: bool = False,
    dims: Sequence[int] = (8, 16, 32, 64, 128),
    depths: Sequence[int] = (1, 1, 1, 1, 1),
    kernels: Sequence[int] = (3, 3, 7, 7, 9),
    **kwargs,
) -> CMUNeXt:
    """CMUNeXt-S (reference configuration): dims (8, 16, 32, 64, 128), depths (1, 1, 1, 1, 1),
    kernels (3, 3, 7, 7, 9); 417,514 params for 3 in / 2 classes."""
    return _create("cmunext_s", pretrained, dims=dims, depths=depths, kernels=kernels, **kwargs)


@register_model
def cmunext_l(
    pretrained: bool = False,
    dims: Sequence[int] = (32, 64, 128, 256, 512),
    depths: Sequence[int] = (1, 1, 1, 6, 3),
    kernels: Sequence[int] = (3, 3, 7, 7, 7),
    **kwargs,
) -> CMUNeXt:
    """CMUNeXt-L (reference configuration): dims (32, 64, 128, 256, 512), depths (1, 1, 1, 6, 3),
    kernels (3, 3, 7, 7, 7); 8,286,754 params for 3 in / 2 classes."""
    return _create("cmunext_l", pretrained, dims=dims, depths=depths, kernels=kernels, **kwargs)
