"""TinyU-Net: a U-Net built from CMRF blocks (MICCAI 2024)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import torch
from timm.models import generate_default_cfgs
from torch import nn

from cmrf.layers import (
    CMRF,
    check_input,
    check_optional_bool,
    check_positive_int,
    check_positive_ints,
    check_spatial_dims,
    conv_type,
    first_parameter,
    maxpool_type,
)
from cmrf.models._base import SegmentationModel, zoo_cfg
from cmrf.models._builder import add_reference_key_hook, build_model, rename_keys
from cmrf.models.registry import register_model
from cmrf.ops.upsample import is_exporting, upsample_to

__all__ = ["TinyUNet", "checkpoint_filter_fn", "tinyunet_arguments"]

# Upsampling used by the decoder: the paper's bicubic in 2D; PyTorch has no bicubic for volumes,
# so 3D uses trilinear (and 1D linear).
_UPSAMPLE_MODE = {1: "linear", 2: "bicubic", 3: "trilinear"}


# --- reference checkpoints -------------------------------------------------------------------

_CMRF_KEY_MAP = [
    (r"\.pwconv1\.conv\.", ".pw1.conv."),
    (r"\.pwconv1\.bn\.", ".pw1.norm."),
    (r"\.pwconv2\.conv\.", ".pw2.conv."),
    (r"\.pwconv2\.bn\.", ".pw2.norm."),
    (r"\.m\.(\d+)\.conv\.", r".cascade.\1.conv."),
    (r"\.m\.(\d+)\.bn\.", r".cascade.\1.norm."),
]


def _stage_index(match: re.Match) -> str:
    kind = "encoders" if match.group(1) == "encoder" else "decoders"
    return f"{kind}.{int(match.group(2)) - 1}."


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module | None = None):
    """Map a state dict saved by the reference TinyU-Net code to this library's names.

    Reference names (``encoder{1..4}.cmrf.pwconv1.conv.weight``, ``decoder{i}.cmrf.m.{k}.bn.*``,
    ``final_conv.*``) become ``encoders.{i-1}.pw1.conv.weight``, ``decoders.{i-1}.cascade.{k}
    .norm.*``, ``head.*``. A state dict already in this library's names passes through.
    """
    if not any(k.startswith(("encoder1.cmrf.", "final_conv.")) for k in state_dict):
        return dict(state_dict)
    patterns = [(r"^(encoder|decoder)(\d+)\.cmrf\.", _stage_index), (r"^final_conv\.", "head.")]
    return rename_keys(state_dict, patterns + _CMRF_KEY_MAP)


def tinyunet_arguments(state_dict: dict[str, torch.Tensor]) -> dict | None:
    """The ``N`` and ``channels`` of the TinyUNet that ``state_dict`` (reference-code or this
    library's names) belongs to, read from its shapes, or ``None`` where it is not one's.

    Each encoder's output width is its ``pw2`` convolution's output channels, and ``N`` is one
    more than the number of cascade stages (``N - 1`` depthwise convolutions, none for ``N = 1``).
    The keys must be exactly those of that TinyUNet: other networks built from CMRF blocks
    (``segnet_cmrf``, ``cmunext_cmrf``) have ``encoders.*.pw2`` too.
    """
    state = checkpoint_filter_fn(state_dict)
    widths = []
    while (weight := state.get(f"encoders.{len(widths)}.pw2.conv.weight")) is not None:
        widths.append(int(weight.shape[0]))
    stages = {key for key in state if re.fullmatch(r"encoders\.0\.cascade\.\d+\.conv\.weight", key)}
    if not widths:
        return None
    arguments = {"N": len(stages) + 1, "channels": widths}
    spatial_dims = state["encoders.0.pw2.conv.weight"].dim() - 2
    try:
        with torch.device("meta"):  # the key names only: nothing is allocated
            expected = TinyUNet(**arguments, spatial_dims=spatial_dims).state_dict().keys()
    except ValueError:  # widths no TinyUNet of that N takes
        return None
    counters = "num_batches_tracked"  # BatchNorm step counters: optional in a state dict
    keys = {key for key in state if not key.endswith(counters)}
    return arguments if keys == {key for key in expected if not key.endswith(counters)} else None


def _export_size_oblivious():
    """While ``torch.export`` traces (non-strict), decide memory layouts without guarding on sizes of 1.

    The deepest pooled map is 1x1 for a 16-pixel side. Without this, pooling's contiguity checks
    add the guard ``size // 16 != 1``, and a dynamic export from the documented minimum of 16
    fails with "Constraints violated". The checks only pick strides, so the graph stays correct
    at size 1 (tests/test_upsample.py runs the exported graph at 16).
    """
    config = getattr(getattr(torch.fx, "experimental", None), "_config", None)
    if config is None or not is_exporting() or torch.compiler.is_dynamo_compiling():
        return contextlib.nullcontext()
    return config.patch(backed_size_oblivious=True)


class TinyUNet(SegmentationModel):
    """TinyU-Net.

    Encoder: ``len(channels)`` stages, each ``CMRF(prev, C_i)`` (its output is the skip) then a
    2x max-pool. Decoder, deepest first: upsample x2 to the skip's exact size (bicubic in 2D,
    ``align_corners=False``), concatenate ``[upsampled, skip]``, ``CMRF``. Head: 1x1 conv with bias.

    Any spatial size of at least ``2 ** len(channels)`` per side works. Where a side is not a
    multiple of ``2 ** len(channels)``, pooling floors it and each decoder stage upsamples to
    the skip's exact size instead of exactly 2x, so the output always has the input's size.
    For multiples of 16 (the reference's only supported case) this is the reference exactly.

    Args:
        in_channels: image channels. Default 3.
        num_classes: output channels (logits). Default 2.
        N: receptive fields per CMRF. Default 8.
        channels: encoder widths, shallow to deep; each a multiple of ``2N``.
            Default ``(64, 128, 256, 512)``.
        spatial_dims: 2 for images (default), 3 for volumes (trilinear upsampling), 1 for signals.
        fused: passed to every CMRF (``None``: follow ``CMRF_FUSED``).

    Shapes: ``(B, in_channels, *S) -> (B, num_classes, *S)``, floating-point input.

    timm idioms: ``pretrained_cfg``/``default_cfg`` (the library's normalisation, input size,
    classes), ``get_classifier()`` (``head``), ``reset_classifier(num_classes)``.

    Raises:
        ValueError: for arguments of the wrong type or range (``channels=64`` instead of a
            sequence, widths not multiples of ``2N``...), naming the argument.
    """

    checkpoint_filter_fn = staticmethod(checkpoint_filter_fn)

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        N: int = 8,
        channels: Sequence[int] = (64, 128, 256, 512),
        spatial_dims: int = 2,
        fused: bool | None = None,
    ):
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.num_classes = check_positive_int("num_classes", num_classes)
        N = check_positive_int("N", N)
        channels = check_positive_ints("channels", channels, "encoder widths", "(64, 128, 256, 512)")
        bad = [f"channels[{i}]={c}" for i, c in enumerate(channels) if c % (2 * N)]
        if bad:
            raise ValueError(
                f"every encoder width must be a multiple of 2N = {2 * N} (N = {N}), got {', '.join(bad)}"
            )
        self.channels = channels
        self.spatial_dims = check_spatial_dims(spatial_dims)
        check_optional_bool("fused", fused)
        self.upsample_mode = _UPSAMPLE_MODE[spatial_dims]

        def block(cin: int, cout: int) -> CMRF:
            return CMRF(cin, cout, N, spatial_dims=spatial_dims, fused=fused)

        widths_in = (in_channels,) + channels[:-1]
        self.encoders = nn.ModuleList(block(a, b) for a, b in zip(widths_in, channels))
        self.pool = maxpool_type(spatial_dims)(2, 2)
        # decoders[i] produces channels[i]; the deepest one sees the pooled deepest features.
        below = channels[1:] + channels[-1:]
        self.decoders = nn.ModuleList(block(b + c, c) for b, c in zip(below, channels))
        self.head = conv_type(spatial_dims)(channels[0], num_classes, 1)
        # Lets load_state_dict take checkpoints saved by the reference code as they are.
        add_reference_key_hook(self, checkpoint_filter_fn)
        self._init_cfg({2: "tinyunet", 3: "tinyunet3d"}.get(spatial_dims))

    @property
    def min_size(self) -> int:
        """Smallest side the network accepts: one pixel survives every pooling."""
        return 2 ** len(self.channels)

    def _check_input(self, x: torch.Tensor) -> None:
        # Also called unbound by cmrf.inference's InferenceTinyUNet, which has the same attributes.
        why = f"2 ** {len(self.channels)} poolings"
        check_input(x, self.in_channels, self.spatial_dims, "TinyUNet", min_size=self.min_size, why=why,
                    weight=first_parameter(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            with _export_size_oblivious():
                x = self.pool(x)
        for decoder, skip in zip(reversed(self.decoders), reversed(skips)):
            # = F.interpolate(..., align_corners=False); exact x2 runs a faster op with a
            # deterministic backward (cmrf.ops.upsample).
            with _export_size_oblivious():
                x = upsample_to(x, skip.shape[2:], self.upsample_mode)
            x = decoder(torch.cat([x, skip], dim=1))
        return self.head(x)


default_cfgs = generate_default_cfgs(
    {
        "tinyunet": zoo_cfg(first_conv="encoders.0.pw1.conv"),
        "tinyunet3d": zoo_cfg(spatial_dims=3, first_conv="encoders.0.pw1.conv"),
    }
)


def _create(variant: str, pretrained: bool = False, **kwargs) -> TinyUNet:
    return build_model(TinyUNet, variant, pretrained, **kwargs)


@register_model
def tinyunet(pretrained: bool = False, **kwargs) -> TinyUNet:
    """TinyU-Net as in the paper: N=8, widths (64, 128, 256, 512); 481,170 params for 3 in / 2 out."""
    return _create("tinyunet", pretrained, **kwargs)


@register_model
def tinyunet3d(pretrained: bool = False, spatial_dims: int = 3, **kwargs) -> TinyUNet:
    """TinyU-Net for volumes (``spatial_dims=3``): 3x3x3 cascades, trilinear upsampling."""
    if spatial_dims != 3:
        hint = (f"; use create_model('tinyunet', spatial_dims={spatial_dims!r})"
                if spatial_dims in (1, 2) else "")
        raise ValueError(f"tinyunet3d is TinyU-Net for volumes (spatial_dims=3), got spatial_dims="
                         f"{spatial_dims!r}{hint}")
    return _create("tinyunet3d", pretrained, spatial_dims=spatial_dims, **kwargs)
