"""Fast inference: an eval-only rewrite of CMRF models that computes the same function.

``optimize_for_inference(model)`` returns a copy in which every rewrite is exact in real
arithmetic (outputs agree with the original to float rounding, well within 1e-4 in fp32):

* every BatchNorm is folded into the convolution before it (eval-mode statistics);
* ``pw1``'s output channels are reordered so that CMRF's parity halves are contiguous slices;
* in each TinyU-Net decoder stage the part of ``pw1`` that reads the upsampled tensor runs at
  the low resolution *before* upsampling (a 1x1 conv mixes channels, interpolation is linear
  and acts on each channel alike, so they commute; the bias stays on the skip half), so only
  ``C/N`` channels are interpolated and the concatenation becomes a sum of two 1x1 convolutions;
* bicubic upsampling by exactly 2 (``align_corners=False``) runs as one depthwise convolution
  with a fixed 5x5 kernel per output phase plus ``pixel_shuffle``; other sizes (odd inputs)
  fall back to ``F.interpolate``;
* 2x max-pooling is two elementwise maxima of strided views (no indices);
* the cascade's depthwise convolutions run on channels-last copies of their few channels;
* ``pw2`` is one matrix product with its bias folded in as an extra column;
* wide block outputs are produced in bands of rows and handed, band by band, to the layers that
  read them (pooling, the next 1x1 convolution, the head), so they never exist at full size.

While a model is being exported (``torch.export``/ONNX) the plain operators are used instead of
the eager-only tricks (layouts, bands). Nothing here dispatches to fused kernels.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from cmrf.layers import CMRF, ConvNorm, conv_type
from cmrf.models.tinyunet import TinyUNet

__all__ = [
    "InferenceCMRF",
    "InferenceTinyUNet",
    "fold_conv_norm",
    "max_pool2x",
    "optimize_for_inference",
    "pointwise",
    "upsample_bicubic2x",
]


# --- BatchNorm folding -----------------------------------------------------------------------


def fold_conv_norm(block: ConvNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution equal to ``block.conv`` followed by eval-mode ``block.norm``.

    ``norm(conv(x)) = scale * (W x + b - mean) + beta`` with ``scale = gamma / sqrt(var + eps)``,
    so the folded weight is ``scale * W`` (per output channel) and the bias
    ``scale * (b - mean) + beta``. Folding runs in float64 to keep the rounding of the folded
    weights below that of the convolution itself.

    Returns:
        ``(weight, bias)`` in the convolution's dtype; ``weight`` has ``block.conv.weight``'s shape.
    """
    conv, norm = block.conv, block.norm
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(weight.shape[0]).double()
    mean = norm.running_mean.double() if norm.running_mean is not None else torch.zeros_like(bias)
    var = norm.running_var.double() if norm.running_var is not None else torch.ones_like(bias)
    scale = torch.rsqrt(var + norm.eps)
    if norm.affine:
        scale = scale * norm.weight.detach().double()
    shift = norm.bias.detach().double() if norm.affine else torch.zeros_like(bias)
    folded_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    folded_bias = (bias - mean) * scale + shift
    dtype = conv.weight.dtype
    return folded_weight.to(dtype), folded_bias.to(dtype)


def _conv_from(
    weight: torch.Tensor, bias: torch.Tensor | None, spatial_dims: int, groups: int = 1
) -> nn.Module:
    """A biased convolution module holding ``weight`` and ``bias`` ("same" padding, stride 1)."""
    out_channels, in_per_group, *kernel = weight.shape
    conv = conv_type(spatial_dims)(
        in_per_group * groups,
        out_channels,
        kernel,
        padding=[k // 2 for k in kernel],
        groups=groups,
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv.requires_grad_(False)


# --- bicubic x2 ------------------------------------------------------------------------------


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """PyTorch's 4 bicubic weights (Keys kernel, ``a = -0.75``) for taps at ``-1, 0, 1, 2`` from floor."""

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _bicubic2x_kernel(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(4, 1, 5, 5)``: for output phase ``(p, q)`` the weights over input rows/cols ``i-2..i+2``.

    With ``align_corners=False`` output pixel ``2i + p`` samples the input at ``i - 0.25`` (p=0,
    taps ``i-2..i+1`` with fraction 0.75) or ``i + 0.25`` (p=1, taps ``i-1..i+2``, fraction 0.25).
    """
    taps = torch.zeros(2, 5, dtype=torch.float64)
    taps[0, 0:4] = torch.tensor(_cubic_weights(0.75), dtype=torch.float64)
    taps[1, 1:5] = torch.tensor(_cubic_weights(0.25), dtype=torch.float64)
    kernel = torch.einsum("pi,qj->pqij", taps, taps).reshape(4, 1, 5, 5)
    return kernel.to(device=device, dtype=dtype)


def upsample_bicubic2x(x: torch.Tensor, kernel: torch.Tensor | None = None) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)`` for 4-D ``x``, faster.

    PyTorch clamps the taps that fall outside the input to the border pixel, which is exactly a
    replicate padding of 2. Each of the 4 output phases is then a fixed 5x5 depthwise filter
    (a separable 4-tap cubic inside it), and ``pixel_shuffle`` interleaves the phases.

    Args:
        x: ``(B, C, H, W)``.
        kernel: ``_bicubic2x_kernel`` repeated ``C`` times, ``(4C, 1, 5, 5)``; built when omitted.

    Returns:
        ``(B, C, 2H, 2W)``.
    """
    channels = x.shape[1]
    if kernel is None:
        kernel = _bicubic2x_kernel(x.dtype, x.device).repeat(channels, 1, 1, 1)
    phases = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=channels)
    return F.pixel_shuffle(phases, 2)


# --- layout and pooling ---------------------------------------------------------------------


def _exporting() -> bool:
    """Whether the model is being traced for export, where memory layouts do not exist."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def max_pool2x(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2, 2)`` for 4-D ``x`` as two elementwise maxima of strided views.

    On the CPU this is several times faster than ``max_pool2d``, which also computes indices.
    Rows go first: pairing whole rows reads memory contiguously and halves the data before the
    strided column pass. Odd sides are floored as ``max_pool2d`` does.

    Shapes: ``(B, C, H, W) -> (B, C, H // 2, W // 2)``.
    """
    h, w = 2 * (x.shape[2] // 2), 2 * (x.shape[3] // 2)
    rows = torch.maximum(x[:, :, 0:h:2, :w], x[:, :, 1:h:2, :w])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def pointwise(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 1x1 convolution, computed as a matrix product.

    On the CPU oneDNN converts NCHW tensors to a blocked layout and back around every
    convolution; for a 1x1 convolution with few output channels that costs more than the
    product itself. Contiguous inputs only; anything else, and exported graphs, use ``conv``.

    Shapes: ``(B, C_in, *S) -> (B, C_out, *S)``.
    """
    if _exporting() or not x.is_contiguous():
        return conv(x)
    batch, channels = x.shape[:2]
    weight = conv.weight.reshape(conv.weight.shape[0], channels)
    if batch == 1:
        flat = x.reshape(channels, -1)
        y = torch.mm(weight, flat) if conv.bias is None else torch.addmm(conv.bias[:, None], weight, flat)
    else:
        y = torch.matmul(weight, x.reshape(batch, channels, -1))
        if conv.bias is not None:
            y = y + conv.bias[:, None]
    return y.view(batch, -1, *x.shape[2:])


# --- optimized blocks ------------------------------------------------------------------------


# Target size of one band of CMRF's pw2 output: small enough to stay in a core's L2 cache.
BAND_BYTES = 4 << 20


class InferenceCMRF(nn.Module):
    """Eval-only CMRF with BatchNorms folded and parity halves made contiguous.

    Built from a ``CMRF`` with ``InferenceCMRF.from_cmrf``; computes ``cmrf.eval()(x)``.
    ``pw1``'s output channels are reordered ``[0, 2, 4, ..., 1, 3, 5, ...]`` so that CMRF's
    ``y[:, 0::2]`` and ``y[:, 1::2]`` are the slices ``y[:, :c]`` and ``y[:, c:]``.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """

    def __init__(
        self,
        pw1: nn.Module,
        cascade: nn.ModuleList,
        pw2: nn.Module,
        branch: int,
        add_residual: bool,
        spatial_dims: int = 2,
    ):
        super().__init__()
        self.in_channels = pw1.in_channels
        self.spatial_dims = spatial_dims
        self.pw1 = pw1
        self.cascade = cascade
        self.pw2 = pw2
        self.branch = branch
        self.add_residual = add_residual
        # pw2 as one matrix [W | b]: multiplying it with the concatenation plus a channel of ones
        # adds the bias inside the matrix product, instead of first filling the wide output
        # with the bias as the convolution does.
        augmented = torch.cat([pw2.weight.flatten(1), pw2.bias[:, None]], dim=1)
        self.register_buffer("pw2_augmented", augmented.detach().clone(), persistent=False)

    @classmethod
    def from_cmrf(cls, cmrf: CMRF) -> InferenceCMRF:
        dims = cmrf.spatial_dims
        weight, bias = fold_conv_norm(cmrf.pw1)
        order = torch.cat([torch.arange(0, weight.shape[0], 2), torch.arange(1, weight.shape[0], 2)])
        pw1 = _conv_from(weight[order], bias[order], dims)
        branch = weight.shape[0] // 2
        cascade = nn.ModuleList(
            _conv_from(*fold_conv_norm(stage), dims, groups=branch) for stage in cmrf.cascade
        )
        pw2 = _conv_from(*fold_conv_norm(cmrf.pw2), dims)
        return cls(pw1, cascade, pw2, branch, cmrf.add_residual, dims)

    def cascade_outputs(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """``[odd + even, d_1, ..., d_{N-1}]`` from the activated ``pw1`` output ``(B, 2c, *S)``."""
        odd, even = hidden[:, : self.branch], hidden[:, self.branch :]
        outputs = [odd + even]
        if self.spatial_dims == 2 and not _exporting():
            # oneDNN's depthwise convolution is several times faster on channels-last tensors,
            # and the cascade's few channels make the conversion cheap.
            even = even.contiguous(memory_format=torch.channels_last)
        for stage in self.cascade:
            even = stage(even)
            outputs.append(even)
        return outputs

    def band_rows(self, hidden: torch.Tensor) -> int:
        """Rows (along the first spatial axis) per band: about ``BAND_BYTES`` of ``pw2`` output.

        Even, so that a 2x pooling of a band is a band of the pooled tensor, and at least the
        cascade depth, so that the halo never costs more than the band.
        """
        row_bytes = hidden[:, :1, 0].numel() * self.pw2.out_channels * hidden.element_size()
        rows = max(len(self.cascade), 2, BAND_BYTES // max(row_bytes, 1))
        return rows + rows % 2

    def _band(self, hidden: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
        """``gelu(pw2(cat(cascade_outputs)))`` for rows ``top:bottom`` only.

        The cascade runs on the band plus a halo of ``N - 1`` rows on each side: each stage's
        zero padding at an inner band edge spoils one more halo row, never a kept one, and at
        the tensor's own borders the padding is the true one.
        """
        if (top, bottom) == (0, hidden.shape[2]):
            parts = self.cascade_outputs(hidden)  # the whole tensor: no slicing in exported graphs
        else:
            halo = len(self.cascade)
            first, last = max(top - halo, 0), min(bottom + halo, hidden.shape[2])
            parts = self.cascade_outputs(hidden[:, :, first:last])
            parts = [part[:, :, top - first : bottom - first] for part in parts]
        if _exporting():
            return F.gelu(self.pw2(torch.cat(parts, dim=1)))
        parts.append(parts[0].new_ones((parts[0].shape[0], 1, *parts[0].shape[2:])))
        stacked = torch.cat(parts, dim=1)
        batch, channels = stacked.shape[:2]
        if batch == 1:  # one matrix product, not a batched one of size 1
            y = torch.mm(self.pw2_augmented, stacked.reshape(channels, -1))
        else:
            y = torch.matmul(self.pw2_augmented, stacked.reshape(batch, channels, -1))
        # In place: y is ours, and a fresh output would cost a new allocation per band.
        return torch.ops.aten.gelu_(y.view(batch, -1, *stacked.shape[2:]))

    def mix_into(
        self,
        hidden: torch.Tensor,
        consumers: list[Callable[[torch.Tensor], torch.Tensor] | None],
        residual: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Everything after ``pw1``, then each of ``consumers``, band by band.

        Large inputs run in bands of rows (``band_rows``): each band's wide ``pw2`` output is
        handed to every consumer (a 1x1 convolution or a 2x pooling of the next layer) while
        it is still in cache, so the block's full-size output is never written to memory.

        Args:
            hidden: the activated ``pw1`` output ``(B, 2c, *S)``, parity halves first/second.
            consumers: functions applied to the block output, each keeping the rows (a 1x1
                convolution) or halving them (2x pooling, floored); ``None`` returns the block
                output itself.
            residual: added to the block output before the consumers (the residual CMRF).

        Returns:
            One tensor per consumer, each equal to ``consumer(full block output)``.
        """
        height = hidden.shape[2]
        rows = self.band_rows(hidden) if not _exporting() else None
        if rows is None or rows >= height:
            y = self._band(hidden, 0, height)
            y = y if residual is None else y + residual
            return [y if consumer is None else consumer(y) for consumer in consumers]
        results: list[torch.Tensor | None] = [None] * len(consumers)
        shrinks = [1] * len(consumers)  # 1: the consumer keeps the rows; 2: it pools them
        top = 0
        while top < height:
            bottom = min(top + rows, height)
            if bottom == height - 1:  # a last band of one row would pool to nothing: merge it
                bottom = height
            y = self._band(hidden, top, bottom)
            if residual is not None:
                y = y + residual[:, :, top:bottom]
            for k, consumer in enumerate(consumers):
                part = y if consumer is None else consumer(y)
                if top == 0:
                    shrinks[k] = 1 if part.shape[2] == bottom - top else 2
                    results[k] = part.new_empty((*part.shape[:2], height // shrinks[k], *part.shape[3:]))
                start = top // shrinks[k]
                results[k][:, :, start : start + part.shape[2]] = part
            top = bottom
        return results

    def mix(self, hidden: torch.Tensor) -> torch.Tensor:
        """Cascade, concatenation, ``pw2`` and GELU on the activated ``pw1`` output ``(B, 2c, *S)``."""
        return self.mix_into(hidden, [None])[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"CMRF expected input of shape (B, {self.in_channels}, "
                f"{', '.join('*' * self.spatial_dims)}), got {tuple(x.shape)}"
            )
        residual = x if self.add_residual else None
        return self.mix_into(F.gelu(pointwise(self.pw1, x)), [None], residual)[0]


class InferenceDecoderCMRF(nn.Module):
    """A TinyU-Net decoder stage: ``CMRF(cat([upsample(low, skip size), skip]))``, reordered.

    ``pw1``'s weight is split into the columns that read the upsampled tensor (``pw1_low``,
    applied at the low resolution, no bias) and those that read the skip (``pw1_skip``, with
    the folded bias); only their ``C/N``-channel result is upsampled.

    Shapes: ``low (B, C_low, *s)``, ``skip (B, C_skip, *S) -> (B, out_channels, *S)``.
    """

    def __init__(self, block: InferenceCMRF, low_channels: int, mode: str, spatial_dims: int):
        super().__init__()
        weight, bias = block.pw1.weight, block.pw1.bias
        self.pw1_low = _conv_from(weight[:, :low_channels], None, spatial_dims)
        self.pw1_skip = _conv_from(weight[:, low_channels:], bias, spatial_dims)
        block.pw1 = None  # replaced by the two halves above
        self.block = block
        self.mode = mode
        if mode == "bicubic":
            kernel = _bicubic2x_kernel(weight.dtype, weight.device).repeat(weight.shape[0], 1, 1, 1)
            self.register_buffer("bicubic2x", kernel, persistent=False)

    def upsample(self, low: torch.Tensor, size) -> torch.Tensor:
        if self.mode == "bicubic" and size[0] == 2 * low.shape[2] and size[1] == 2 * low.shape[3]:
            return upsample_bicubic2x(low, self.bicubic2x)
        return F.interpolate(low, size=size, mode=self.mode, align_corners=False)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        hidden = self.pw1_skip(skip) + self.upsample(self.pw1_low(low), skip.shape[2:])
        return self.block.mix(F.gelu(hidden))


class InferenceTinyUNet(nn.Module):
    """Eval-only TinyU-Net built by ``optimize_for_inference``; same input checks and output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.in_channels = model.in_channels
        self.channels = model.channels
        self.spatial_dims = model.spatial_dims
        self.encoders = nn.ModuleList(InferenceCMRF.from_cmrf(block) for block in model.encoders)
        self.pool = copy.deepcopy(model.pool)
        below = model.channels[1:] + model.channels[-1:]
        self.decoders = nn.ModuleList(
            InferenceDecoderCMRF(InferenceCMRF.from_cmrf(block), low, model.upsample_mode, model.spatial_dims)
            for block, low in zip(model.decoders, below, strict=True)
        )
        self.head = copy.deepcopy(model.head).requires_grad_(False)

    min_size = TinyUNet.min_size

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial_dims == 2 and not _exporting():
            return max_pool2x(x)
        return self.pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        TinyUNet._check_input(self, x)  # the original's validation: same messages
        # Each wide block output is consumed band by band (see InferenceCMRF.mix_into) by the
        # layers that read it: an encoder's by the pooling and by its decoder's pw1 (the skip
        # half), a decoder's by the next decoder's pw1 (the upsampled half) or by the head.
        skip_projections = []
        for encoder, decoder in zip(self.encoders, self.decoders, strict=True):
            residual = x if encoder.add_residual else None
            consumers = [self.downsample, partial(pointwise, decoder.pw1_skip)]
            x, projection = encoder.mix_into(F.gelu(pointwise(encoder.pw1, x)), consumers, residual)
            skip_projections.append(projection)
        low = pointwise(self.decoders[-1].pw1_low, x)
        for i in reversed(range(len(self.decoders))):
            decoder, projection = self.decoders[i], skip_projections[i]
            hidden = F.gelu(projection + decoder.upsample(low, projection.shape[2:]))
            consumer = self.decoders[i - 1].pw1_low if i > 0 else self.head
            (low,) = decoder.block.mix_into(hidden, [partial(pointwise, consumer)])
        return low


# --- entry point -----------------------------------------------------------------------------


def _optimized(module: nn.Module) -> nn.Module | None:
    """The optimized replacement of ``module``, or ``None`` when it is not a CMRF model part."""
    if isinstance(module, TinyUNet):
        return InferenceTinyUNet(module)
    if isinstance(module, CMRF):
        return InferenceCMRF.from_cmrf(module)
    return None


def _replace_blocks(module: nn.Module) -> int:
    """Swap, in place, every TinyUNet / CMRF below ``module`` for its optimized form; return the count."""
    count = 0
    for name, child in module.named_children():
        replacement = _optimized(child)
        if replacement is None:
            count += _replace_blocks(child)
        else:
            setattr(module, name, replacement)
            count += 1
    return count


@torch.no_grad()
def optimize_for_inference(model: nn.Module) -> nn.Module:
    """An eval-only copy of ``model`` that computes the same outputs faster.

    Works on a ``TinyUNet``, a ``CMRF``, and any model holding them (for example the output of
    ``replace_blocks``): each one is replaced by its optimized form (see the module docstring);
    everything else is copied as it is. ``model`` itself is left untouched. BatchNorm running
    statistics are baked in, so the copy is for inference only: its parameters do not require
    grad, and its CMRF parts compute eval-mode outputs even after ``.train()`` (other layers of
    a generic model are plain copies and follow ``.train()``/``.eval()`` as usual).

    Args:
        model: the model to optimize, on the CPU or a CUDA device, in any floating dtype.

    Returns:
        The optimized copy in eval mode. Its outputs equal ``model.eval()``'s within float
        rounding (below 1e-6 for TinyU-Net in fp32).

    Raises:
        ValueError: when ``model`` holds no CMRF block.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"optimize_for_inference expects an nn.Module, got {type(model).__name__}")
    replacement = _optimized(model)
    if replacement is not None:
        return replacement.eval()
    optimized = copy.deepcopy(model).eval()
    if _replace_blocks(optimized) == 0:
        raise ValueError(
            f"optimize_for_inference found no CMRF block in {type(model).__name__}; it optimizes "
            f"TinyUNet, CMRF and models that contain them"
        )
    return optimized.requires_grad_(False)
