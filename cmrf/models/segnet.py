"""SegNet (Badrinarayanan et al., TPAMI 2017): the classic VGG16-BN encoder-decoder.

``segnet`` is the original (29,444,162 params for 3 in / 2 classes, as in TinyU-Net's Table 3);
``segnet_cmrf`` is the same network after ``replace_blocks`` (see docs/replace_blocks.md for the
mapping and its costs beside the paper's).
"""

from __future__ import annotations

import functools

import torch
from timm.models import generate_default_cfgs
from torch import nn

from cmrf.layers import (
    ConvBNReLU,
    check_input,
    check_positive_int,
    check_spatial_dims,
    conv_type,
    first_parameter,
)
from cmrf.models._base import SegmentationModel, zoo_cfg
from cmrf.models._builder import build_model, require_requested_n
from cmrf.models.registry import register_model

__all__ = ["SegNet"]

# Widths of every 3x3 conv, stage by stage; each stage starts from the previous one's end.
ENCODER_WIDTHS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# Deepest stage first; the last stage's last conv becomes the classifier (num_classes outputs).
DECODER_WIDTHS = ((512, 512, 512), (512, 512, 256), (256, 256, 128), (128, 64), (64, None))

_MAXUNPOOL = {1: nn.MaxUnpool1d, 2: nn.MaxUnpool2d, 3: nn.MaxUnpool3d}
_MAXPOOL_INDICES = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


def _stage(in_channels: int, widths, num_classes: int, spatial_dims: int) -> nn.Sequential:
    """ConvBNReLU layers through ``widths``; a ``None`` width is a plain 3x3 classifier conv."""
    layers = []
    for width in widths:
        if width is None:
            layers.append(conv_type(spatial_dims)(in_channels, num_classes, 3, padding=1))
        else:
            layers.append(ConvBNReLU(in_channels, width, spatial_dims))
            in_channels = width
    return nn.Sequential(*layers)


class SegNet(SegmentationModel):
    """SegNet with a VGG16-BN encoder and pooling-index unpooling.

    Encoder: five stages of 3x3 ConvBNReLU (widths 64-64, 128-128, 256x3, 512x3, 512x3), each
    followed by a 2x max-pool that keeps its indices. Decoder, deepest first: max-unpool with the
    matching indices (to the pre-pool size), then a stage mirroring the encoder (512x3,
    512-512-256, 256-256-128, 128-64, 64 then a plain 3x3 conv to ``num_classes``).

    Every stage is its own ``nn.Sequential`` (``encoders[i]``, ``decoders[i]``) running at one
    resolution, so ``replace_blocks`` sees one block per stage; the last decoder stage holds the
    classifier and is kept.

    Args:
        in_channels: image channels. Default 3.
        num_classes: output channels (logits). Default 2.
        spatial_dims: 2 for images (default), 3 for volumes, 1 for signals.

    Shapes: ``(B, in_channels, *S) -> (B, num_classes, *S)``, floating-point input; every side
    must be at least 32 (five poolings). Sides that are not multiples of 32 work: unpooling
    restores the exact sizes.

    timm idioms: ``pretrained_cfg``/``default_cfg`` (the library's normalisation, input size,
    classes), ``get_classifier()`` (the last decoder stage's 3x3 conv, ``decoders.4.1``),
    ``reset_classifier(num_classes)``.
    """

    classifier_name = f"decoders.{len(DECODER_WIDTHS) - 1}.{len(DECODER_WIDTHS[-1]) - 1}"

    def __init__(self, in_channels: int = 3, num_classes: int = 2, spatial_dims: int = 2):
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        encoders, width = [], in_channels
        for widths in ENCODER_WIDTHS:
            encoders.append(_stage(width, widths, num_classes, spatial_dims))
            width = widths[-1]
        decoders = []
        for widths in DECODER_WIDTHS:
            decoders.append(_stage(width, widths, num_classes, spatial_dims))
            width = widths[-1]
        self.encoders = nn.ModuleList(encoders)
        self.decoders = nn.ModuleList(decoders)
        self.pool = _MAXPOOL_INDICES[spatial_dims](2, 2, return_indices=True)
        self.unpool = _MAXUNPOOL[spatial_dims](2, 2)
        self._init_cfg("segnet")

    @property
    def min_size(self) -> int:
        return 2 ** len(self.encoders)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(
            x, self.in_channels, self.spatial_dims, "SegNet", min_size=self.min_size, why="five poolings",
            weight=first_parameter(self),
        )
        # torch.jit.trace records a size read in Python as a constant: the unpooling's output size
        # would be the example's, and a traced SegNet given another size returned a map of the
        # example's size or failed. Traced, the unpooling scatters into a tensor of the pre-pool shape.
        tracing = torch.jit.is_tracing()
        pooled = []  # (indices, size before pooling or, traced, the tensor before it), shallow to deep
        for encoder in self.encoders:
            x = encoder(x)
            # Plain ints: unpooling checks the size with Python conditions, which tracing breaks.
            size = x if tracing else [int(s) for s in x.shape[2:]]
            x, indices = self.pool(x)
            pooled.append((indices, size))
        for decoder, (indices, size) in zip(self.decoders, reversed(pooled)):
            x = _unpool_into(x, indices, size) if tracing else self.unpool(x, indices, output_size=size)
            x = decoder(x)
        return x


def _unpool_into(x: torch.Tensor, indices: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """``max_unpool`` of ``x`` into zeros shaped like ``before`` (the tensor that was pooled):
    the pooling's indices are flat within each channel's map, so one scatter puts every value back."""
    out = torch.zeros_like(before).flatten(2)
    return out.scatter(2, indices.flatten(2), x.flatten(2)).view_as(before)


default_cfgs = generate_default_cfgs(
    {
        "segnet": zoo_cfg(classifier=SegNet.classifier_name, first_conv="encoders.0.0.conv", min_side=32),
        "segnet_cmrf": zoo_cfg(classifier=SegNet.classifier_name, first_conv="encoders.0.pw1.conv",
                               min_side=32),
    }
)


def _create(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    return build_model(SegNet, variant, pretrained, **kwargs)


def _with_cmrf(model: SegNet, N: int) -> SegNet:
    from cmrf.surgery import replace_blocks

    param = next(model.parameters())
    probe = torch.zeros((1, model.in_channels) + (model.min_size,) * model.spatial_dims)
    report = replace_blocks(model, N, example_input=probe.to(device=param.device, dtype=param.dtype))
    require_requested_n(report, N, "segnet_cmrf", "segnet")
    return model


@register_model
def segnet(pretrained: bool = False, **kwargs) -> SegNet:
    """SegNet (VGG16-BN encoder-decoder): 29,444,162 params for 3 in / 2 classes."""
    return _create("segnet", pretrained, **kwargs)


@register_model
def segnet_cmrf(pretrained: bool = False, N: int = 8, **kwargs) -> SegNet:
    """SegNet with every stage except the classifier's replaced by ``CMRF`` (``replace_blocks``).

    Nine stages become ``CMRF(C_in, C_out, N)``; the last decoder stage (64 -> 64 ConvBNReLU
    and the 3x3 classifier) is kept. 643,186 params for 3 in / 2 classes, N=8.
    """
    finish = functools.partial(_with_cmrf, N=N)
    return _create("segnet_cmrf", pretrained, entry_args=("N",), finish=finish, **kwargs)
