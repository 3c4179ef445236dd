"""Fast inference: an eval-only rewrite of CMRF models that computes the same function.

``optimize_for_inference(model)`` returns a copy in which every rewrite is exact in real
arithmetic (outputs agree with the original to float rounding, well within 1e-4 in fp32 for
outputs of order one):

* every BatchNorm is folded into the convolution before it (eval-mode statistics);
* in each TinyU-Net decoder stage the part of ``pw1`` that reads the upsampled tensor runs at
  the low resolution *before* upsampling (a 1x1 conv mixes channels, interpolation is linear
  and acts on each channel alike, so they commute; the bias stays on the skip half), so only
  ``C/N`` channels are interpolated and the concatenation becomes a sum of two 1x1 convolutions;
* bicubic upsampling by exactly 2 (``align_corners=False``) runs as one depthwise convolution
  with a fixed 5x5 kernel per output phase plus ``pixel_shuffle``; other sizes (odd inputs)
  fall back to ``F.interpolate``.

On top of these, one of three *paths* runs the blocks (``choose_path`` picks one from the
model's device and dtype; ``optimize_for_inference(path=...)`` forces one):

* ``"onednn"`` (CPU, fp32): ``pw1``'s output channels reordered so CMRF's parity halves are
  contiguous slices; 1x1 convolutions as matrix products; the cascade's depthwise convolutions
  on channels-last copies of their few channels; ``pw2`` as one matrix product with its bias
  folded in as an extra column; 2x max-pooling as strided maxima; wide block outputs produced in
  bands of rows (``run_in_bands``) and handed band by band to the layers that read them, so they
  never exist at full size.
* ``"fused"`` (CUDA): the plain graph, with each cascade computed by the Triton eval kernel
  ``torch.ops.cmrf.cascade_inference`` (all stages in one launch, BatchNorm folded).
* ``"plain"``: the rewrites above with ordinary PyTorch operators only. Used for other devices
  and dtypes, and always while a model is traced (``torch.export``, ONNX, ``torch.compile``)
  or run under autocast on the CPU.

The path is a preference: each call falls back to ``"plain"`` when its input does not suit the
path (another device or dtype, tracing), so the CPU-specialised graph never runs on a GPU.
``optimize_for_inference(model, cuda_graph=True)`` further wraps the result in
``CUDAGraphInference``, which replays one CUDA graph per input shape;
``optimize_for_inference(model, freeze=True)`` wraps it in ``FrozenCPUInference``, which runs one
frozen TorchScript graph (oneDNN layouts end to end) per input shape on the CPU;
``optimize_for_inference(model, backend="onnxruntime")`` wraps it in
``OnnxRuntimeInference``, which exports it and runs it in ONNX Runtime per input shape.
"""

from __future__ import annotations

import collections
import copy
import tempfile
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from cmrf._warnings import caller_stacklevel
from cmrf.layers import (
    CMRF,
    ConvNorm,
    check_input,
    cmrf_blocks,
    conv_type,
    first_parameter,
    has_user_hooks,
    inference_only_parts,
)
from cmrf.models.tinyunet import TinyUNet
from cmrf.onnx_writer import check_onnxruntime, write_onnx
from cmrf.ops.cascade import (
    functorch_transforms_active,
    interpreter_enabled,
    triton_available,
    triton_missing_reason,
)
from cmrf.ops.stamps import TensorStamp
from cmrf.ops.upsample import cubic_weights, is_exporting, pad_replicate, upsample_to

__all__ = [
    "BACKENDS",
    "PATHS",
    "CPUGraphPerShape",
    "CUDAGraphInference",
    "FrozenCPUInference",
    "GraphPerShape",
    "InferenceCMRF",
    "InferenceTinyUNet",
    "OnnxRuntimeInference",
    "choose_path",
    "fold_conv_norm",
    "max_pool2x",
    "optimize_for_inference",
    "pointwise",
    "run_in_bands",
    "upsample_bicubic2x",
]

PATHS = ("onednn", "fused", "plain")


# --- paths -----------------------------------------------------------------------------------


def choose_path(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """The path ``optimize_for_inference(path="auto")`` builds for a model on ``device`` in ``dtype``.

    * ``"onednn"`` for fp32 on the CPU (the specialised graph, see the module docstring);
    * ``"fused"`` for fp32/fp16/bf16 on CUDA when Triton is installed;
    * ``"plain"`` otherwise (other dtypes or devices).

    Args:
        device: the model's device. dtype: the model's parameter dtype. Default fp32.
    """
    device = torch.device(device)
    if device.type == "cpu" and dtype == torch.float32:
        return "onednn"
    kernel_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    if device.type == "cuda" and dtype in kernel_dtypes and triton_available():
        return "fused"
    return "plain"


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, except that tensors a module keeps outside its parameters and
    buffers that are part of an autograd graph are copied detached: ``deepcopy`` refuses those ("Only
    Tensors created explicitly by the user (graph leaves) support the deepcopy protocol"), and MONAI's
    ``DynUNet(deep_supervision=True)`` keeps its last deep-supervision outputs so, after any forward
    with gradients on. The model itself is left as it is."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for name, value in vars(module).items():
            if name not in ("_parameters", "_buffers", "_modules"):
                for tensor in _graph_tensors(value):
                    memo[id(tensor)] = tensor.detach().clone()
    return copy.deepcopy(model, memo)


def _graph_tensors(value, depth: int = 0):
    """The tensors with a ``grad_fn`` in ``value`` and the lists, tuples and dicts it holds."""
    if isinstance(value, torch.Tensor):
        if value.grad_fn is not None:
            yield value
    elif isinstance(value, (list, tuple)) and depth < 4:
        for item in value:
            yield from _graph_tensors(item, depth + 1)
    elif isinstance(value, dict) and depth < 4:
        for item in value.values():
            yield from _graph_tensors(item, depth + 1)


def _tracing() -> bool:
    """Whether the model is being traced (export, ONNX, ``torch.compile``): plain operators only."""
    return is_exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing()


# Kept under its old name: ``pointwise`` and callers outside this module test for export.
_exporting = _tracing


def _result_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the module's convolutions would give ``x``: autocast's where it is on."""
    device = x.device.type
    if x.is_floating_point() and device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _needs_grad(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether this call must record a graph: for ``x``, or for weights a user set
    ``requires_grad`` on (``copy.requires_grad_()``), which only the plain operators give."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _call_path(path: str, x: torch.Tensor, module: nn.Module) -> str:
    """The path this call of ``module`` takes: ``path`` if ``x`` suits it, else ``"plain"``."""
    if path == "plain" or _tracing() or functorch_transforms_active():  # vmap/grad: no out=, no kernels
        return "plain"
    if path == "onednn":
        cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32
        # The CPU graph writes into preallocated buffers (out=, in place): no autograd through it.
        needs_grad = _needs_grad(x, module)
        return "onednn" if cpu_fp32 and not needs_grad and not torch.is_autocast_enabled("cpu") else "plain"
    # fused: the Triton kernel runs CUDA tensors (CPU ones only in Triton's interpreter) and has
    # no backward here, so a call that needs a gradient takes the plain operators.
    runnable = x.is_cuda or (x.device.type == "cpu" and interpreter_enabled())
    needs_grad = _needs_grad(x, module)
    # The kernels compute in fp32 at most: a float64 model keeps its precision on the plain path.
    kernel_dtype = x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return "fused" if runnable and kernel_dtype and x.dim() == 4 and not needs_grad else "plain"


def _fused_cascade(y: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
    """``cat([odd + even, d_1, ..., d_S])`` of ``y`` (``(B, 2c, H, W)``, parity interleaved) in one kernel.

    ``d_k = depthwise3x3(d_{k-1}, weight[k - 1]) * scale[k - 1] + shift[k - 1]``. The one place
    that calls the fused op, so a change of its interface is adapted here.
    """
    import cmrf.ops.triton_cascade  # noqa: F401  (registers torch.ops.cmrf.cascade_inference)

    return torch.ops.cmrf.cascade_inference(y, weight, scale, shift)


# --- BatchNorm folding -----------------------------------------------------------------------


def fold_conv_norm(block: ConvNorm, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution equal to ``block.conv`` followed by eval-mode ``block.norm``.

    ``norm(conv(x)) = scale * (W x + b - mean) + beta`` with ``scale = gamma / sqrt(var + eps)``,
    so the folded weight is ``scale * W`` (per output channel) and the bias
    ``scale * (b - mean) + beta``. Folding runs in float64 to keep the rounding of the folded
    weights below that of the convolution itself.

    Args:
        block: a ``ConvNorm`` (its norm's running statistics are used).
        dtype: dtype of the result. Default: the convolution's.

    Returns:
        ``(weight, bias)`` on the convolution's device; ``weight`` has ``block.conv.weight``'s shape.
    """
    conv, norm = block.conv, block.norm
    if norm.running_mean is None or norm.running_var is None:
        # Such a BatchNorm normalises with each batch's own statistics, in eval mode too: a function
        # of the batch, which no folded weight can reproduce.
        raise ValueError(f"cannot fold {norm} into its convolution: it has no running statistics "
                         f"(track_running_stats=False), so it normalises every batch with that batch's "
                         f"statistics; run this model without optimize_for_inference")
    weight = conv.weight.detach().double()
    zeros = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    bias = conv.bias.detach().double() if conv.bias is not None else zeros
    mean, var = norm.running_mean.double(), norm.running_var.double()
    scale = torch.rsqrt(var + norm.eps)
    # A weight or bias of None (affine=False, or removed afterwards) is 1 or 0, as in BatchNorm itself.
    if norm.weight is not None:
        scale = scale * norm.weight.detach().double()
    shift = norm.bias.detach().double() if norm.bias is not None else zeros
    folded_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    folded_bias = (bias - mean) * scale + shift
    dtype = dtype or conv.weight.dtype
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


def _bicubic2x_kernel(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(4, 1, 5, 5)``: for output phase ``(p, q)`` the weights over input rows/cols ``i-2..i+2``.

    With ``align_corners=False`` output pixel ``2i + p`` samples the input at ``i - 0.25`` (p=0,
    taps ``i-2..i+1`` with fraction 0.75) or ``i + 0.25`` (p=1, taps ``i-1..i+2``, fraction 0.25).
    """
    taps = torch.zeros(2, 5, dtype=torch.float64)
    taps[0, 0:4] = torch.tensor(cubic_weights(0.75), dtype=torch.float64)
    taps[1, 1:5] = torch.tensor(cubic_weights(0.25), dtype=torch.float64)
    kernel = torch.einsum("pi,qj->pqij", taps, taps).reshape(4, 1, 5, 5)
    return kernel.to(device=device, dtype=dtype)


def _bicubic2x_transposed_kernel(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(1, 1, 10, 10)``: bicubic x2 as one transposed convolution (stride 2, padding 8).

    A transposed convolution adds ``x_pad[j] * w[o + 8 - 2j]`` into output ``o``. With ``x_pad``
    the input padded by 2 and ``o = 2i + p``, input ``i + t`` meets tap ``p + 4 - 2t``, so
    ``w[p + 4 - 2t]`` is the cubic weight of offset ``t`` for phase ``p`` (``_bicubic2x_kernel``).
    """
    taps = torch.zeros(2, 5, dtype=torch.float64)
    taps[0, 0:4] = torch.tensor(cubic_weights(0.75), dtype=torch.float64)
    taps[1, 1:5] = torch.tensor(cubic_weights(0.25), dtype=torch.float64)
    line = torch.zeros(10, dtype=torch.float64)
    for phase in range(2):
        for offset in range(-2, 3):
            line[phase + 4 - 2 * offset] = taps[phase, offset + 2]
    return torch.outer(line, line).reshape(1, 1, 10, 10).to(device=device, dtype=dtype)


def _upsample_bicubic2x_channels_last(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``upsample_bicubic2x`` as one depthwise transposed convolution on channels-last tensors.

    On the CPU oneDNN runs it several times faster than the phase convolutions plus
    ``pixel_shuffle`` (which interleaves memory in NCHW). Returns a channels-last tensor.

    Args:
        x: ``(B, C, H, W)``. kernel: ``_bicubic2x_transposed_kernel`` repeated ``C`` times.
    """
    x = F.pad(x.contiguous(memory_format=torch.channels_last), (2, 2, 2, 2), mode="replicate")
    return F.conv_transpose2d(x, kernel, stride=2, padding=8, groups=x.shape[1])


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

    Raises:
        ValueError: ``x`` is not ``(B, C, H, W)`` with ``C, H, W >= 1``, or ``kernel`` is not
            ``(4C, 1, 5, 5)``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or 0 in x.shape[1:]:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"upsample_bicubic2x takes a (B, C, H, W) tensor with C, H, W >= 1, got {got}")
    channels = x.shape[1]
    if kernel is None:
        kernel = _bicubic2x_kernel(x.dtype, x.device).repeat(channels, 1, 1, 1)
    elif tuple(kernel.shape) != (4 * channels, 1, 5, 5):
        raise ValueError(f"upsample_bicubic2x: kernel of shape {tuple(kernel.shape)} for {channels} "
                         f"channels, expected (4 * C, 1, 5, 5) = {(4 * channels, 1, 5, 5)}")
    if x.device.type == "cpu" and x.dtype == torch.float16 and not _tracing():
        # torch 2.4 has no fp16 replicate padding on the CPU; a cat of border slices is the same copy.
        padded = pad_replicate(pad_replicate(x, 2, 2), 3, 2)
    else:
        padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    phases = F.conv2d(padded, kernel, groups=channels)
    return F.pixel_shuffle(phases, 2)


# --- layout and pooling ---------------------------------------------------------------------


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




# --- bands -----------------------------------------------------------------------------------


def run_in_bands(
    fn: Callable[..., torch.Tensor],
    inputs: torch.Tensor | Sequence[torch.Tensor],
    band_rows: int,
    halo: int = 0,
    consumers: Sequence[Callable[[torch.Tensor], torch.Tensor] | None] = (None,),
) -> list[torch.Tensor]:
    """``[consumer(fn(*inputs, rows=slice(None))) for consumer in consumers]``, in bands of rows.

    ``fn`` is called on bands of ``band_rows`` rows (along dim 2, the first spatial axis) of
    every tensor in ``inputs``, each band widened by ``halo`` rows on both sides where they
    exist, with ``rows``, the slice of the widened band that is the band itself: ``fn`` returns
    its output for those rows only (so work after the part that needs the halo, such as a 1x1
    convolution, skips the halo rows). This is exact when each output row of ``fn`` depends
    only on input rows within ``halo`` of it; when ``fn`` treats a band's first and last rows
    as the tensor's borders (zero padding), that spoils only halo rows. Each band's output is
    handed to every consumer at once, while it is still in cache, so the full output of ``fn``
    never exists.

    Args:
        fn: ``fn(*bands, rows=slice)`` maps bands ``(B, C_i, h, *rest)`` of ``inputs`` to the
            rows ``rows`` of its output, ``(B, C_out, len(rows), *rest)``.
        inputs: one tensor or several with the same number of rows.
        band_rows: rows per band (>= 1; even when a consumer halves rows). A last band of one
            row is merged into the band before it.
        halo: extra rows on each side of a band (>= 0). Default 0.
        consumers: functions of ``fn``'s output that keep its rows (a 1x1 convolution) or
            halve them, floored (a 2x pooling); ``None`` returns ``fn``'s output itself.
            Default ``(None,)``.

    Returns:
        One tensor per consumer.
    """
    tensors = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not tensors:
        raise ValueError("run_in_bands needs at least one input tensor")
    if isinstance(band_rows, bool) or not isinstance(band_rows, int) or band_rows < 1:
        raise ValueError(f"band_rows must be an int >= 1, got {band_rows!r}")
    if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
        raise ValueError(f"halo must be an int >= 0, got {halo!r}")
    height = tensors[0].shape[2]
    if band_rows >= height:  # one band: the whole tensors, no slicing
        y = fn(*tensors, rows=slice(None))
        return [y if consumer is None else consumer(y) for consumer in consumers]
    results: list[torch.Tensor | None] = [None] * len(consumers)
    shrinks = [1] * len(consumers)  # 1: the consumer keeps the rows; 2: it pools them
    top = 0
    while top < height:
        bottom = min(top + band_rows, height)
        if bottom == height - 1:  # a last band of one row would pool to nothing: merge it
            bottom = height
        first, last = max(top - halo, 0), min(bottom + halo, height)
        y = fn(*(t[:, :, first:last] for t in tensors), rows=slice(top - first, bottom - first))
        for k, consumer in enumerate(consumers):
            part = y if consumer is None else consumer(y)
            if top == 0:
                shrinks[k] = 1 if part.shape[2] == bottom - top else 2
                if shrinks[k] == 2 and band_rows % 2:  # bands would pool across their borders
                    raise ValueError(f"band_rows must be even when a consumer halves the rows (2x "
                                     f"pooling), got {band_rows}")
                results[k] = part.new_empty((*part.shape[:2], height // shrinks[k], *part.shape[3:]))
            start = top // shrinks[k]
            results[k][:, :, start : start + part.shape[2]] = part
        top = bottom
    return results


# --- optimized blocks ------------------------------------------------------------------------


# Target size of one band of CMRF's pw2 output: small enough to stay in a core's cache.
BAND_BYTES = 2 << 20
# Channels x pixels from which a 2-D cascade stage runs as shifted multiply-adds, not oneDNN.
SHIFTED_MIN_ELEMENTS = 1 << 17


def _depthwise3x3_into(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:] = F.conv2d(x, weight, bias, padding=1, groups=C)`` as nine shifted multiply-adds.

    Each tap adds ``weight[:, 0, i, j] * x`` shifted by ``(i - 1, j - 1)`` to the part of
    ``out`` it reaches; the parts it misses are where the zero padding would be read. ``out``
    may be a strided view (a slice of a larger buffer), so no copy is made.

    Shapes: ``x``, ``out``: ``(B, C, H, W)``; ``weight`` ``(C, 1, 3, 3)``; ``bias`` ``(C,)``.
    """
    height, width = x.shape[2:]
    taps = weight.reshape(1, -1, 9, 1, 1)
    torch.addcmul(bias.view(1, -1, 1, 1), x, taps[:, :, 4], out=out)  # the centre tap and the bias
    for i in range(3):
        for j in range(3):
            if (i, j) == (1, 1):
                continue
            di, dj = i - 1, j - 1
            rows_out = slice(max(0, -di), height - max(0, di))
            cols_out = slice(max(0, -dj), width - max(0, dj))
            rows_in = slice(max(0, di), height - max(0, -di))
            cols_in = slice(max(0, dj), width - max(0, -dj))
            out[:, :, rows_out, cols_out].addcmul_(x[:, :, rows_in, cols_in], taps[:, :, 3 * i + j])


class _EvalOnly(nn.Module):
    """A module of ``optimize_for_inference``'s copy: ``save_weights`` refuses a model holding one
    (``inference_only``: its folded weights load into nothing trainable), and it stays in eval mode:
    ``train()`` warns and changes nothing (the copy computes the eval-mode forward and has no
    gradients to train, which a later backward would only report as torch's generic error)."""

    inference_only = True

    def train(self, mode: bool = True):
        if mode:
            warnings.warn(
                f"{type(self).__name__} is an eval-only copy made by optimize_for_inference (BatchNorm "
                f"folded, no trainable parameters): train() leaves it in eval mode; train the original model",
                UserWarning, stacklevel=caller_stacklevel())
        return super().train(False)


class InferenceCMRF(_EvalOnly):
    """Eval-only CMRF with BatchNorms folded; computes ``cmrf.eval()(x)``.

    Built from a ``CMRF`` with ``InferenceCMRF.from_cmrf(cmrf, path)``. On the ``"onednn"`` path
    ``pw1``'s output channels are reordered ``[0, 2, 4, ..., 1, 3, 5, ...]`` so that CMRF's
    ``y[:, 0::2]`` and ``y[:, 1::2]`` are the slices ``y[:, :c]`` and ``y[:, c:]``; the other
    paths keep CMRF's interleaved order, which the fused kernel reads.

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
        path: str = "onednn",
        fused_params: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.in_channels = pw1.in_channels
        self.out_channels = pw2.out_channels
        self.spatial_dims = spatial_dims
        self.pw1 = pw1
        self.cascade = cascade
        self.pw2 = pw2
        self.branch = branch
        self.add_residual = add_residual
        self.path = path
        self.halves_first = path == "onednn"  # pw1's parity halves reordered into two slices
        # pw2 as one matrix [W | b]: multiplying it with the concatenation plus a channel of ones
        # adds the bias inside the matrix product, instead of first filling the wide output
        # with the bias as the convolution does.
        self.register_buffer("pw2_augmented", self._pw2_matrix(), persistent=False)
        self.fused = fused_params is not None
        if fused_params is not None:
            for name, tensor in zip(self.FUSED_BUFFERS, fused_params, strict=True):
                self.register_buffer(name, tensor, persistent=False)
        # The buffers above are derived from parameters: remade when those change (_refresh_derived).
        self._derived_from = TensorStamp(self._derived_sources())

    FUSED_BUFFERS = ("fused_weight", "fused_scale", "fused_shift")

    def _pw1_order(self) -> str:
        return "halves_first" if self.halves_first else "interleaved"

    def get_extra_state(self) -> dict:
        """The order of ``pw1``'s output channels, saved in the state dict: a state dict of a copy
        built for another path has the same keys and shapes but another order, and would load
        without an error into wrong outputs."""
        return {"pw1_order": self._pw1_order()}

    def set_extra_state(self, state) -> None:
        saved = state.get("pw1_order") if isinstance(state, dict) else None
        if saved != self._pw1_order():
            raise ValueError(
                f"this state dict's pw1 channels are in {saved!r} order, this {type(self).__name__}'s in "
                f"{self._pw1_order()!r} (copies for path 'onednn' reorder them, 'fused' and 'plain' do "
                f"not): load the original model's weights and call optimize_for_inference again"
            )

    def _pw2_matrix(self) -> torch.Tensor:
        weight, bias = self.pw2.weight, self.pw2.bias
        return torch.cat([weight.flatten(1), bias[:, None]], dim=1).detach().clone()

    def _fused_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kernel's fp32 ``(weight (S, c, 9), scale (S, c), shift (S, c))`` from the cascade's
        (BatchNorm-folded) convolutions."""
        weight = torch.stack([stage.weight.detach().reshape(self.branch, 9) for stage in self.cascade])
        shift = torch.stack([stage.bias.detach() for stage in self.cascade]).float()
        return weight.float().contiguous(), torch.ones_like(shift), shift.contiguous()

    def _derived_sources(self) -> list[torch.Tensor]:
        # Read from the modules' own dicts: this runs at every call, and nn.Module.__getattr__
        # costs about a microsecond per attribute.
        pw2 = self._modules["pw2"]._parameters
        sources = [pw2["weight"], pw2["bias"]]
        if self.fused:
            for stage in self._modules["cascade"]._modules.values():
                sources += (stage._parameters["weight"], stage._parameters["bias"])
        return sources

    def _refresh_derived(self) -> None:
        """Remake ``pw2_augmented`` (and the fused kernel's parameters) when ``pw2`` (or the
        cascade) was changed since they were made: ``load_state_dict``, an in-place write, a
        replaced parameter. Without it this module would keep computing with the old weights.

        Skipped while tracing or capturing a CUDA graph (the buffers are read as they are; the
        graph wrappers make their graphs again after a change).
        """
        if _tracing():  # Dynamo and export cannot read storage pointers or version counters
            return
        sources = self._derived_sources()
        if self._derived_from.matches(sources):
            return
        if sources[0].is_cuda and torch.cuda.is_current_stream_capturing():
            return
        with torch.no_grad():
            self.pw2_augmented = self._pw2_matrix()
            if self.fused:
                # From the folded convolutions in their own dtype: from_cmrf folded in fp32,
                # which a bf16/fp16 module's convolutions no longer hold.
                for name, tensor in zip(self.FUSED_BUFFERS, self._fused_params(), strict=True):
                    setattr(self, name, tensor)
        self._derived_from = TensorStamp(sources)

    @classmethod
    def from_cmrf(cls, cmrf: CMRF, path: str = "onednn") -> InferenceCMRF:
        """The optimized form of ``cmrf`` (its eval-mode function) for ``path`` (one of ``PATHS``)."""
        dims = cmrf.spatial_dims
        weight, bias = fold_conv_norm(cmrf.pw1)
        if path == "onednn":
            order = torch.arange(weight.shape[0], device=weight.device)
            order = torch.cat([order[0::2], order[1::2]])
            weight, bias = weight[order], bias[order]
        pw1 = _conv_from(weight, bias, dims)
        branch = weight.shape[0] // 2
        cascade = nn.ModuleList(
            _conv_from(*fold_conv_norm(stage), dims, groups=branch) for stage in cmrf.cascade
        )
        pw2 = _conv_from(*fold_conv_norm(cmrf.pw2), dims)
        fused_params = None
        if path == "fused" and dims == 2 and len(cmrf.cascade) > 0:
            # The kernel's parameters: fp32 whatever the model's dtype (it computes in fp32),
            # BatchNorm folded into the weights, so its scale is one and its shift the bias.
            folded = [fold_conv_norm(stage, torch.float32) for stage in cmrf.cascade]
            fused_weight = torch.stack([w.reshape(branch, 9) for w, _ in folded]).contiguous()
            fused_shift = torch.stack([b for _, b in folded]).contiguous()
            fused_params = (fused_weight, torch.ones_like(fused_shift), fused_shift)
        return cls(pw1, cascade, pw2, branch, cmrf.add_residual, dims, path, fused_params)

    def _halves(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CMRF's ``(y[:, 0::2], y[:, 1::2])`` of the activated ``pw1`` output."""
        if self.halves_first:
            return hidden[:, : self.branch], hidden[:, self.branch :]
        return hidden[:, 0::2], hidden[:, 1::2]

    def cascade_outputs(self, hidden: torch.Tensor, channels_last: bool = False) -> list[torch.Tensor]:
        """``[odd + even, d_1, ..., d_{N-1}]`` from the activated ``pw1`` output ``(B, 2c, *S)``."""
        odd, even = self._halves(hidden)
        outputs = [odd + even]
        if channels_last and self.spatial_dims == 2:
            # oneDNN's depthwise convolution is several times faster on channels-last tensors,
            # and the cascade's few channels make the conversion cheap.
            even = even.contiguous(memory_format=torch.channels_last)
        for stage in self.cascade:
            even = stage(even)
            outputs.append(even)
        return outputs

    def band_rows(self, hidden: torch.Tensor) -> int:
        """Rows (along the first spatial axis) per band: about ``BAND_BYTES`` of ``pw2`` output.

        Even, so that a 2x pooling of a band is a band of the pooled tensor.
        """
        row_bytes = hidden[:, :1, 0].numel() * self.pw2.out_channels * hidden.element_size()
        rows = max(2, BAND_BYTES // max(row_bytes, 1))
        return rows + rows % 2

    def stacked_cascade(self, hidden: torch.Tensor) -> torch.Tensor:
        """``cat([odd + even, d_1, ..., d_{N-1}, ones])``, ``(B, N c + 1, *S)``, contiguous (CPU path).

        Each part is written straight into its slice of one buffer (no ``cat``); the channel
        of ones lets ``pw2``'s matrix product add the bias. Wide 2-D stages are computed as
        nine shifted multiply-adds into the buffer (memory-bound, no padding copy, no layout
        change); small ones by oneDNN's depthwise convolution on channels-last tensors, whose
        fixed cost per call is lower.
        """
        odd, even = self._halves(hidden)
        c = self.branch
        stacked = hidden.new_empty((hidden.shape[0], (len(self.cascade) + 1) * c + 1, *hidden.shape[2:]))
        torch.add(odd, even, out=stacked[:, :c])
        stacked[:, -1].fill_(1)
        shifted = self.spatial_dims == 2 and even[0].numel() >= SHIFTED_MIN_ELEMENTS
        if self.spatial_dims == 2 and not shifted:
            # oneDNN's depthwise convolution is several times faster on channels-last tensors.
            even = even.contiguous(memory_format=torch.channels_last)
        for k, stage in enumerate(self.cascade):
            out = stacked[:, (k + 1) * c : (k + 2) * c]
            if shifted:
                _depthwise3x3_into(even, stage.weight, stage.bias, out)
                even = out
            else:
                even = stage(even)
                out.copy_(even)
        return stacked

    def _mix_band(
        self,
        stacked: torch.Tensor,
        residual: torch.Tensor | None = None,
        rows: slice = slice(None),
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``gelu(pw2(stacked)) [+ residual]`` for rows ``rows`` of a band of ``stacked_cascade``'s output.

        With batch 1 the result is written into ``scratch`` (1-D, large enough) when given: the
        band's output is consumed before the next band is computed, and reusing one buffer
        saves a fresh allocation, and its page faults, per band.
        """
        stacked = stacked[:, :, rows]
        batch, channels = stacked.shape[:2]
        if batch == 1:  # one matrix product (rows of a contiguous tensor are a strided matrix)
            flat = stacked.reshape(channels, -1)
            out = None
            if scratch is not None:
                out = scratch[: self.pw2_augmented.shape[0] * flat.shape[1]].view(-1, flat.shape[1])
            y = torch.mm(self.pw2_augmented, flat, out=out)
        else:
            y = torch.matmul(self.pw2_augmented, stacked.reshape(batch, channels, -1))
        # In place: y is ours, and a fresh output would cost a new allocation per band.
        y = torch.ops.aten.gelu_(y.view(batch, -1, *stacked.shape[2:]))
        return y if residual is None else y.add_(residual[:, :, rows])

    def _mix_plain(self, hidden: torch.Tensor, path: str) -> torch.Tensor:
        """``gelu(pw2(cat(cascade_outputs)))`` with plain operators (and the fused cascade)."""
        if path == "fused" and self.fused:
            stacked = _fused_cascade(hidden, self.fused_weight, self.fused_scale, self.fused_shift)
        else:
            stacked = torch.cat(self.cascade_outputs(hidden), dim=1)
        return F.gelu(self.pw2(stacked))

    def mix_into(
        self,
        hidden: torch.Tensor,
        consumers: Sequence[Callable[[torch.Tensor], torch.Tensor] | None],
        residual: torch.Tensor | None = None,
        path: str | None = None,
    ) -> list[torch.Tensor]:
        """Everything after ``pw1``, then each of ``consumers``.

        On the ``"onednn"`` path large inputs run in bands of rows (``band_rows``,
        ``run_in_bands``): each band's wide ``pw2`` output is handed to every consumer (a 1x1
        convolution or a 2x pooling of the next layer) while it is still in cache, so the
        block's full-size output is never written to memory.

        Args:
            hidden: the activated ``pw1`` output ``(B, 2c, *S)``.
            consumers: functions applied to the block output, each keeping the rows (a 1x1
                convolution) or halving them (2x pooling, floored); ``None`` returns the block
                output itself.
            residual: added to the block output before the consumers (the residual CMRF).
            path: this call's path. Default: the one ``hidden`` suits (``_call_path``).

        Returns:
            One tensor per consumer, each equal to ``consumer(full block output)``.
        """
        self._refresh_derived()
        path = path or _call_path(self.path, hidden, self)
        if path != "onednn":
            y = self._mix_plain(hidden, path)
            y = y if residual is None else y + residual
            return [y if consumer is None else consumer(y) for consumer in consumers]
        # The cascade runs on the whole tensor (its 3x3 stages would need halo rows in bands);
        # pw2, the GELU and the consumers, where the wide output lives, run in bands.
        stacked = self.stacked_cascade(hidden)
        inputs = (stacked,) if residual is None else (stacked, residual)
        band_rows = self.band_rows(hidden)
        mix_band = self._mix_band
        if hidden.shape[2] > band_rows and hidden.shape[0] == 1 and None not in consumers:
            # bands: one output buffer for all of them (a last band may be band_rows + 1 rows)
            band_pixels = (band_rows + 1) * hidden[0, 0, 0].numel()
            scratch = hidden.new_empty(self.pw2_augmented.shape[0] * band_pixels)
            mix_band = partial(self._mix_band, scratch=scratch)
        return run_in_bands(mix_band, inputs, band_rows, 0, consumers)

    def mix(self, hidden: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """Cascade, concatenation, ``pw2`` and GELU on the activated ``pw1`` output ``(B, 2c, *S)``."""
        return self.mix_into(hidden, [None], path=path)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the original's checks and messages
        check_input(x, self.in_channels, self.spatial_dims, "CMRF", weight=first_parameter(self))
        if x.shape[0] == 0 and not _tracing():  # an empty batch: nothing to compute
            return x.new_empty((0, self.out_channels, *x.shape[2:]), dtype=_result_dtype(x))
        path = _call_path(self.path, x, self)
        residual = x if self.add_residual else None
        hidden = F.gelu(pointwise(self.pw1, x) if path == "onednn" else self.pw1(x))
        return self.mix_into(hidden, [None], residual, path)[0]


class InferenceDecoderCMRF(_EvalOnly):
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
            if block.path == "onednn":
                kernel = _bicubic2x_transposed_kernel(weight.dtype, weight.device)
                kernel = kernel.repeat(weight.shape[0], 1, 1, 1)
                self.register_buffer("bicubic2x_transposed", kernel, persistent=False)

    def upsample(self, low: torch.Tensor, size, channels_last: bool = False) -> torch.Tensor:
        """``F.interpolate(low, size, mode, align_corners=False)``; exact x2 bicubic as convolutions.

        ``channels_last`` (CPU graph) returns a channels-last tensor from one transposed convolution.
        On CUDA the formulation is ``cmrf.ops.upsample.choose_method``'s, the one measured fastest
        per shape on an H200 (a matrix product per axis below 128x128 pixels, ``F.interpolate``
        from there); forward, the phase convolutions below took 2.1–4.5x the product's time there.
        """
        if low.is_cuda and not _tracing():
            return upsample_to(low, size, self.mode)
        if self.mode == "bicubic" and size[0] == 2 * low.shape[2] and size[1] == 2 * low.shape[3]:
            if channels_last and hasattr(self, "bicubic2x_transposed"):
                return _upsample_bicubic2x_channels_last(low, self.bicubic2x_transposed)
            return upsample_bicubic2x(low, self.bicubic2x.to(low.dtype))
        return F.interpolate(low, size=size, mode=self.mode, align_corners=False)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        hidden = self.pw1_skip(skip) + self.upsample(self.pw1_low(low), skip.shape[2:])
        return self.block.mix(F.gelu(hidden))


class InferenceTinyUNet(_EvalOnly):
    """Eval-only TinyU-Net built by ``optimize_for_inference``; same input checks and output.

    Args:
        model: the ``TinyUNet`` to rewrite (left untouched).
        path: one of ``PATHS``. Default ``"onednn"``.
    """

    def __init__(self, model: nn.Module, path: str = "onednn"):
        super().__init__()
        self.in_channels = model.in_channels
        self.channels = model.channels
        self.spatial_dims = model.spatial_dims
        self.num_classes = model.num_classes
        self.path = path
        self.encoders = nn.ModuleList(InferenceCMRF.from_cmrf(block, path) for block in model.encoders)
        self.pool = copy.deepcopy(model.pool)
        below = model.channels[1:] + model.channels[-1:]
        self.decoders = nn.ModuleList(
            InferenceDecoderCMRF(
                InferenceCMRF.from_cmrf(block, path), low, model.upsample_mode, model.spatial_dims
            )
            for block, low in zip(model.decoders, below, strict=True)
        )
        self.head = copy.deepcopy(model.head).requires_grad_(False)

    min_size = TinyUNet.min_size

    def _forward_plain(self, x: torch.Tensor, path: str) -> torch.Tensor:
        """The graph with plain operators (the fused cascade on ``"fused"``)."""
        skips = []
        for encoder in self.encoders:
            y = encoder.mix(F.gelu(encoder.pw1(x)), path)
            x = y + x if encoder.add_residual else y
            skips.append(x)
            x = self.pool(x)
        low = self.decoders[-1].pw1_low(x)
        for i in reversed(range(len(self.decoders))):
            decoder = self.decoders[i]
            skip = decoder.pw1_skip(skips[i])
            hidden = F.gelu(skip + decoder.upsample(low, skip.shape[2:]))
            y = decoder.block.mix(hidden, path)
            low = self.decoders[i - 1].pw1_low(y) if i > 0 else self.head(y)
        return low

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        TinyUNet._check_input(self, x)  # the original's validation: same messages
        if x.shape[0] == 0 and not _tracing():  # an empty batch: nothing to compute
            return x.new_empty((0, self.num_classes, *x.shape[2:]), dtype=_result_dtype(x))
        path = _call_path(self.path, x, self)
        if path != "onednn":
            return self._forward_plain(x, path)
        # Each wide block output is consumed band by band (see InferenceCMRF.mix_into) by the
        # layers that read it: an encoder's by the pooling and by its decoder's pw1 (the skip
        # half), a decoder's by the next decoder's pw1 (the upsampled half) or by the head.
        downsample = max_pool2x if self.spatial_dims == 2 else self.pool
        skip_projections = []
        for encoder, decoder in zip(self.encoders, self.decoders, strict=True):
            residual = x if encoder.add_residual else None
            consumers = [downsample, partial(pointwise, decoder.pw1_skip)]
            hidden = torch.ops.aten.gelu_(pointwise(encoder.pw1, x))  # in place: a fresh tensor
            x, projection = encoder.mix_into(hidden, consumers, residual, path)
            skip_projections.append(projection)
        low = pointwise(self.decoders[-1].pw1_low, x)
        for i in reversed(range(len(self.decoders))):
            decoder, projection = self.decoders[i], skip_projections[i]
            # In place into the projection (ours): a fresh full-size tensor costs more than the sum.
            upsampled = decoder.upsample(low, projection.shape[2:], channels_last=self.spatial_dims == 2)
            hidden = torch.ops.aten.gelu_(projection.add_(upsampled))
            consumer = self.decoders[i - 1].pw1_low if i > 0 else self.head
            (low,) = decoder.block.mix_into(hidden, [partial(pointwise, consumer)], path=path)
        return low


# --- one prepared graph per input shape: CUDA graphs, TorchScript graphs, ONNX Runtime ------


class GraphPerShape(nn.Module):
    """Runs ``module`` through one prepared graph per input key, eagerly where no graph fits.

    A module in training mode always runs eagerly (the graphs are of its eval-mode forward).
    Subclasses say when else to run eagerly (``_eager``), what keys a graph (``_key``), how one is
    made (``_build``) and run (``_run``). At most ``max_graphs`` graphs are kept; new keys beyond
    that run eagerly. ``.to()``/``.cuda()`` and ``reset()`` drop the graphs, and so does a call
    after a change to ``module``'s parameters or buffers (a replaced tensor or an in-place write:
    ``load_state_dict``, an optimizer step), since the graphs hold copies of the weights or read
    tensors that the change replaced.
    """

    # Whether a graph that cannot be made is an error (default), or makes its key run eagerly
    # from then on, with one warning (CUDA graphs: an operator that cannot be captured).
    eager_when_build_fails = False

    def __init__(self, module: nn.Module, max_graphs: int = 4):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"{type(self).__name__} wraps an nn.Module, got {type(module).__name__}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self.module = module
        self.max_graphs = max_graphs
        self._graphs: collections.OrderedDict = collections.OrderedDict()
        self._weights_seen = TensorStamp()

    def reset(self) -> None:
        """Drop every graph (the next call with each key makes it again)."""
        self._graphs.clear()

    def _drop_graphs_if_weights_changed(self) -> None:
        """``reset()`` when a parameter or buffer of ``module`` was replaced or written in place
        since the graphs were made (``load_state_dict``, an optimizer step, ``.data = ...``).

        Without it a frozen graph or a session (copies of the weights) or a CUDA graph (the
        tensors as they were at capture) would keep answering with the old weights. About 0.1 ms
        per call for TinyU-Net on this project's 2-core VM.
        """
        tensors = _module_tensors(self.module)
        if not self._weights_seen.matches(tensors):
            self._graphs.clear()
            self._weights_seen = TensorStamp(tensors)

    def __getstate__(self) -> dict:
        # The graphs are caches bound to this object (CUDA graphs, TorchScript graphs, ONNX
        # Runtime sessions, some of which cannot be copied or pickled): copies start without them.
        state = self.__dict__.copy()
        state["_graphs"] = collections.OrderedDict()
        state["_weights_seen"] = TensorStamp()
        return state

    def _apply(self, fn, *args, **kwargs):
        self.reset()  # moved or cast: the graphs hold the old tensors
        return super()._apply(fn, *args, **kwargs)

    @property
    def num_graphs(self) -> int:
        """How many graphs exist."""
        return sum(graph is not _NO_GRAPH for graph in self._graphs.values())

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return _needs_grad(x, self.module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A module in training mode computes something else than the eval-mode graphs (batch
        # statistics, dropout): it runs as it is. So does a non-tensor: the module names it, and
        # so do torch.func transforms (vmap, grad), whose wrapped tensors a graph cannot take.
        if (not isinstance(x, torch.Tensor) or self.module.training or functorch_transforms_active()
                or self._eager(x)):
            return self.module(x)
        self._drop_graphs_if_weights_changed()
        key = self._key(x)
        graph = self._graphs.get(key)
        if graph is _NO_GRAPH:
            return self.module(x)
        if graph is None:
            if len(self._graphs) >= self.max_graphs:
                return self.module(x)
            try:
                graph = self._build(x)
            except Exception as err:
                if not self.eager_when_build_fails:
                    raise
                warnings.warn(f"{type(self).__name__}: no graph for input shape {tuple(x.shape)} "
                              f"({type(err).__name__}: {err}); it runs eagerly from now on",
                              RuntimeWarning, stacklevel=2)
                self._graphs[key] = _NO_GRAPH
                return self.module(x)
            self._graphs[key] = graph
            # Stamped again: a CUDA graph's warm-up may have remade the module's derived tensors.
            self._weights_seen = TensorStamp(_module_tensors(self.module))
        return self._run(graph, x)


_NO_GRAPH = object()  # a key whose graph could not be made (GraphPerShape.eager_when_build_fails)


def _module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer below ``module``, read from the modules' own dicts: about five
    times faster than ``parameters()`` + ``buffers()``, which matters at every call."""
    tensors, stack = [], [module]
    while stack:
        current = stack.pop()
        if current is None:  # a child registered as None
            continue
        tensors += [t for t in current._parameters.values() if t is not None]
        tensors += [t for t in current._buffers.values() if t is not None]
        stack += current._modules.values()
    return tensors


class CUDAGraphInference(GraphPerShape):
    """Runs ``module`` on CUDA by replaying one captured CUDA graph per input shape.

    A whole-network forward at small batches is dominated by kernel-launch overhead on a GPU;
    a graph replays all its kernels with one launch. The first call with a new key (shape,
    strides, dtype, device, autocast state, inference mode) copies the input into a static
    buffer, warms ``module`` up on a side stream, captures one forward and keeps it; every
    later call with that key copies the input in and replays. Autocast is captured without its
    weight cache (a cached cast would be a stale tensor in the graph).

    The module runs eagerly (no graph) in training mode, for CPU inputs, an empty batch, while
    tracing or an outer capture is running, when a gradient is needed, for new keys once ``max_graphs``
    graphs exist, and for a key whose capture failed (one ``RuntimeWarning`` says why).
    ``.to()``/``.cuda()`` drop the graphs (they point at the old memory); so does ``reset()``,
    and so does a call after a change to ``module``'s parameters or buffers (the next call
    captures again: the optimized module's derived tensors are remade in new memory).

    Not thread-safe: a call with a key writes that graph's one input buffer and reads its one
    output buffer, so concurrent callers need a wrapper each.

    Args:
        module: an eval-only module (typically from ``optimize_for_inference``) on a CUDA device.
        max_graphs: graphs kept at most (>= 1). Default 4. Each holds its own memory pool.
        clone_output: return a copy of the graph's static output (default ``True``); with
            ``False`` the returned tensor is overwritten by the next replay of the same graph.

    Shapes: those of ``module``.
    """

    eager_when_build_fails = True  # a graph is an optimisation: an uncapturable forward still runs

    def __init__(self, module: nn.Module, max_graphs: int = 4, clone_output: bool = True):
        super().__init__(module, max_graphs)
        if not isinstance(clone_output, bool):
            raise TypeError(f"clone_output must be a bool, got {type(clone_output).__name__}")
        self.clone_output = clone_output

    def _eager(self, x: torch.Tensor) -> bool:
        if not x.is_cuda or x.numel() == 0 or _tracing():
            return True
        return torch.cuda.is_current_stream_capturing() or self._needs_grad(x)

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        autocast = torch.is_autocast_enabled("cuda")
        autocast_dtype = torch.get_autocast_dtype("cuda") if autocast else None
        return (tuple(x.shape), x.stride(), x.dtype, x.device, autocast, autocast_dtype,
                torch.is_inference_mode_enabled())

    def _build(self, x: torch.Tensor):  # capture
        autocast = torch.is_autocast_enabled("cuda")
        autocast_dtype = torch.get_autocast_dtype("cuda")

        def context():
            return torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast, cache_enabled=False)

        with torch.cuda.device(x.device):
            static_input = x.detach().clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad(), context():
                for _ in range(2):  # lazy initialisation (Triton compiles, cuBLAS handles) off the graph
                    self.module(static_input)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # Captured on the warm-up stream, which is on x's GPU; torch.cuda.graph's own default
            # stream is one per process, made on whichever GPU was current at the first capture.
            with torch.no_grad(), context(), torch.cuda.graph(graph, stream=stream):
                static_output = self.module(static_input)
        return graph, static_input, static_output

    def _run(self, entry, x: torch.Tensor) -> torch.Tensor:
        graph, static_input, static_output = entry
        static_input.copy_(x)
        graph.replay()
        if not self.clone_output:
            return static_output
        # Every tensor of the output (a tensor, or tuples, lists, dicts of them): models with
        # auxiliary heads return more than one.
        return tree_map_only(torch.Tensor, torch.Tensor.clone, static_output)


class CPUGraphPerShape(GraphPerShape):
    """A ``GraphPerShape`` whose graphs run fp32 on the CPU: the module runs eagerly for other
    devices and dtypes, an empty batch, CPU autocast, tracing and calls that need a gradient."""

    def _eager(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() == 0 or _tracing():
            return True
        return torch.is_autocast_enabled("cpu") or self._needs_grad(x)


class FrozenCPUInference(CPUGraphPerShape):
    """Runs ``module`` on the CPU through one frozen TorchScript graph per input shape.

    The first fp32 CPU call with a new key (shape, strides) traces ``module`` on that input
    (tracing takes the plain operators, see ``_tracing``), freezes the trace (weights become
    constants) and passes it through ``torch.jit.optimize_for_inference``, which moves the
    convolutions to oneDNN's blocked layout end to end and fuses the activations that follow
    them; later calls with that key run the frozen graph. A trace is valid only for the shape
    it was made with (the network's choices that depend on sizes are baked in), so every other
    shape gets its own graph, and beyond ``max_graphs`` graphs new shapes run ``module`` eagerly.

    ``module`` also runs eagerly in training mode, for non-CPU or non-fp32 inputs, an empty batch,
    under CPU autocast, while another trace or compilation is running, and when a gradient is
    needed.
    ``.to()`` and ``reset()`` drop the graphs. The graphs hold copies of the weights taken when
    they were built, so every call first checks ``module``'s parameters and buffers (identity,
    storage, in-place writes: about 0.1 ms) and drops the graphs when one changed since.

    Args:
        module: an eval-only module (typically from ``optimize_for_inference``) on the CPU.
        max_graphs: graphs kept at most (>= 1). Default 4.

    Shapes: those of ``module``.
    """

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        return tuple(x.shape), x.stride()

    def _build(self, x: torch.Tensor) -> torch.jit.ScriptModule:  # trace and freeze
        with torch.no_grad():
            # Eagerly first: an input the module refuses gets its one-line error, with sizes as
            # numbers (inside the trace they are tensors).
            self.module(x)
        # Tracing warns at every Python branch on a size (they are exactly what the per-shape
        # key accounts for) and about TorchScript's maintenance mode; neither concerns the caller.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # strict=False: a model may return a dict (auxiliary heads), as the other paths allow.
            traced = torch.jit.trace(self.module, x, check_trace=False, strict=False)
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))

    def _run(self, graph: torch.jit.ScriptModule, x: torch.Tensor) -> torch.Tensor:
        return graph(x)


class OnnxRuntimeInference(CPUGraphPerShape):
    """Runs ``module`` on the CPU in ONNX Runtime, one exported graph and session per input shape.

    The first fp32 CPU call with a new shape exports ``module`` for exactly that shape
    (``cmrf.onnx_writer``; a model holding CMRF blocks is optimized first; a few seconds) and opens
    an ONNX Runtime session on it (CPU provider); every later call with that shape runs the
    session. ONNX Runtime's fused CPU kernels run TinyU-Net's optimized graph faster than the
    PyTorch paths (docs/inference.md has the figures). Inputs may have any strides; outputs are
    new contiguous fp32 CPU tensors.

    ``module`` runs in PyTorch instead in training mode, for non-CPU or non-fp32 inputs, an empty
    batch, under CPU autocast, while a trace or compilation is running, when a gradient is
    needed, and for new shapes once ``max_graphs`` sessions exist. The sessions hold copies of
    the weights taken when they were made, so every call first checks ``module``'s parameters and
    buffers and drops the sessions when one changed since (as ``FrozenCPUInference``). Copies and
    pickles leave the sessions behind (each copy makes its own).

    Args:
        module: an eval-only fp32 CPU module, typically from ``optimize_for_inference``.
        max_graphs: sessions kept at most (>= 1). Default 4.
        threads: ONNX Runtime's intra-op threads; ``None`` (default) takes
            ``torch.get_num_threads()`` when a session is made, so ``torch.set_num_threads`` and
            ``OMP_NUM_THREADS`` govern both libraries alike.
        spinning: let ONNX Runtime's threads busy-wait for work after each call (its own default).
            Default ``False``: between calls the cores stay free for PyTorch and the rest of the
            program (decoding images, writing masks); ``True`` is slightly faster for back-to-back
            calls on an otherwise idle machine.

    Shapes: those of ``module``.

    Raises:
        ImportError: ONNX Runtime or ``onnxscript`` is not installed (``pip install 'cmrf[onnx]'``).
        ExportUnsupportedError: torch is older than 2.5 (no dynamo ONNX exporter).
    """

    def __init__(self, module: nn.Module, max_graphs: int = 4, threads: int | None = None,
                 spinning: bool = False):
        super().__init__(module, max_graphs)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
        if not isinstance(spinning, bool):
            raise TypeError(f"spinning must be a bool, got {type(spinning).__name__}")
        check_onnxruntime()
        self.threads = threads
        self.spinning = spinning

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        return tuple(x.shape)  # the session takes a contiguous copy: strides do not matter

    def _build(self, x: torch.Tensor):  # export for this shape and open a session
        import onnxruntime as ort

        module = self.module
        # Not optimized yet: export the fast graph. An optimized copy may still hold a CMRF block
        # kept as it is (hooks, its own forward); optimizing it again would find nothing to do.
        if cmrf_blocks(module) and not inference_only_parts(module):
            module = optimize_for_inference(module)
        # The graph's outputs are the module's output tensors, flattened: a module with auxiliary
        # heads returns a tuple or a dict, which the session's outputs are put back into. Run
        # before the export, so an input the module refuses gets its one-line error, not the
        # exporter's report.
        with torch.no_grad():
            leaves, structure = tree_flatten(module(x))
        with tempfile.TemporaryDirectory(prefix="cmrf-onnx-") as tmp:
            path = Path(tmp) / "model.onnx"
            write_onnx(module, x.detach().contiguous(), path)
            graph = path.read_bytes()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        outputs = len(session.get_outputs())
        if len(leaves) != outputs or not all(isinstance(t, torch.Tensor) for t in leaves):
            raise ValueError(f"{type(self.module).__name__}'s output ({structure}) is not the tensors the "
                             f"ONNX graph returns ({outputs} outputs), one for one; use backend='torch'")
        return session, structure

    def _run(self, entry, x: torch.Tensor) -> torch.Tensor:
        session, structure = entry
        outputs = session.run(None, {"input": x.detach().contiguous().numpy()})
        return tree_unflatten([torch.from_numpy(output) for output in outputs], structure)


# --- entry point -----------------------------------------------------------------------------


# What the rewrite reads of each layer besides its weights; a layer that differs from the one the
# constructor builds computes something the rewrite would not.
_LAYER_FIELDS = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                               "dilation", "groups", "padding_mode")),
    (nn.modules.pooling._MaxPoolNd, ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                     "return_indices")),
    (nn.GELU, ("approximate",)),
)


def _same_form(value):
    """One spelling of a layer setting: ``kernel_size=2``, ``(2, 2)`` and ``[2, 2]`` are one setting."""
    if isinstance(value, (list, tuple)):
        value = tuple(value)
        return value[0] if value and len(set(value)) == 1 else value
    return value


def _layer_fields(module: nn.Module) -> dict:
    for kind, fields in _LAYER_FIELDS:
        if isinstance(module, kind):
            return {field: _same_form(getattr(module, field)) for field in fields}
    return {}


def _same_kind(layer: nn.Module, built: nn.Module) -> bool:
    """Whether ``layer`` computes what ``built`` (the class's own layer) computes in eval mode: a
    subclass that keeps its forward, or torch's SyncBatchNorm for a BatchNorm (in eval it normalises
    with the running statistics, as BatchNorm does; folding reads only those)."""
    norms = nn.modules.batchnorm._BatchNorm
    if isinstance(built, norms) and type(layer).forward in (norms.forward, nn.SyncBatchNorm.forward):
        return True
    return isinstance(layer, type(built)) and type(layer).forward is type(built).forward


def _twin(module: CMRF | TinyUNet) -> nn.Module:
    """A freshly built module of ``module``'s class arguments, on the meta device (no memory)."""
    with torch.device("meta"):
        if isinstance(module, CMRF):
            return CMRF(module.in_channels, module.out_channels, module.N, spatial_dims=module.spatial_dims)
        N = next((block.N for block in cmrf_blocks(module)), 8)
        return TinyUNet(module.in_channels, module.num_classes, N, module.channels, module.spatial_dims)


def _departures(module: CMRF | TinyUNet, name: str) -> list[str]:
    """Why ``module`` cannot be rewritten as a whole: where it departs from what its class builds
    (another class or forward, other layer settings, extra layers in a ``Sequential``, hooks).

    A TinyUNet's CMRF blocks are checked on their own (``_rewritable``), not here.
    """
    prefix = f"{name}." if name else ""
    try:
        expected = dict(_twin(module).named_modules())
    except (AttributeError, TypeError, ValueError) as err:  # attributes changed after building
        return [f"its attributes no longer describe a {type(module).__qualname__} ({err})"]
    if isinstance(module, TinyUNet):
        blocks = tuple(f"{group}.{i}." for group in ("encoders", "decoders")
                       for i in range(len(getattr(module, group, ()))))
    else:
        blocks = ()
    reasons = []
    actual = dict(module.named_modules())
    for path, twin in expected.items():
        if path.startswith(blocks):
            continue
        label = prefix + path if path else "it"
        layer = actual.get(path)
        if layer is None:
            reasons.append(f"{label} is missing (its class builds a {type(twin).__name__})")
        elif not isinstance(layer, type(twin)) and not _same_kind(layer, twin):
            reasons.append(f"{label} is {type(layer).__name__}, where its class builds {type(twin).__name__}")
        elif not _same_kind(layer, twin) or "forward" in vars(layer):
            reasons.append(f"{label} has its own forward")
        elif _layer_fields(layer) != _layer_fields(twin):
            reasons.append(f"{label} is {layer}, where its class builds {twin}")
    for path, layer in actual.items():
        if path.startswith(blocks):
            continue
        parent = path.rpartition(".")[0]
        # A layer added to a Sequential the class builds runs; one added elsewhere is never called.
        if path and path not in expected and isinstance(expected.get(parent), nn.Sequential):
            reasons.append(f"{prefix + path} was added to {prefix + parent}")
        if has_user_hooks(layer) and not (isinstance(layer, CMRF) and f"{path}.".startswith(blocks)):
            # (a TinyUNet's CMRF block with hooks gets its own entry: "is customised" below)
            reasons.append(f"{prefix + path if path else 'it'} has hooks registered")
    return reasons


def _rewritable(module: nn.Module, name: str, kept: list[str]) -> bool:
    """Whether ``module`` (a TinyUNet or a CMRF) computes what its class builds, so that its
    optimized form computes the same; when it does not, say why in ``kept``."""
    reasons = _departures(module, name)
    if isinstance(module, TinyUNet):
        custom = [f"{name + '.' if name else ''}{group}.{i}"
                  for group in ("encoders", "decoders")
                  for i, block in enumerate(getattr(module, group, ()))
                  if isinstance(block, CMRF) and _departures(block, "")]
        if len(custom) == 1:
            reasons.append(f"its block {custom[0]} is customised (see its own entry)")
        elif custom:
            reasons.append(f"its blocks {', '.join(custom)} are customised (see their own entries)")
    if reasons:
        kept.append(f"{name or 'the model'} ({type(module).__qualname__}): {'; '.join(reasons)}")
    return not reasons


def _optimized(module: nn.Module, path: str, name: str, kept: list[str]) -> nn.Module | None:
    """The optimized replacement of ``module``, or ``None`` when it is not a CMRF model part it
    can rewrite (a customised one is noted in ``kept``; its parts may still be rewritten)."""
    if not isinstance(module, (TinyUNet, CMRF)) or not _rewritable(module, name, kept):
        return None
    if isinstance(module, TinyUNet):
        return InferenceTinyUNet(module, path)
    return InferenceCMRF.from_cmrf(module, path)


def _replace_blocks(module: nn.Module, path: str, prefix: str, kept: list[str]) -> int:
    """Swap, in place, every rewritable TinyUNet / CMRF below ``module`` for its optimized form;
    return the count."""
    count = 0
    for name, child in module.named_children():
        child_name = f"{prefix}{name}"
        replacement = _optimized(child, path, child_name, kept)
        if replacement is None:
            count += _replace_blocks(child, path, f"{child_name}.", kept)
        else:
            setattr(module, name, replacement)
            count += 1
    return count


def _resolve_path(path: str, device: torch.device, dtype: torch.dtype) -> str:
    """``path`` checked against the model's device and dtype (``"auto"``: ``choose_path``)."""
    if not isinstance(path, str) or path not in ("auto", *PATHS):
        raise ValueError(f"path must be 'auto' or one of {list(PATHS)}, got {path!r}")
    if path == "auto":
        return choose_path(device, dtype)
    if path == "onednn" and device.type != "cpu":
        raise ValueError(
            f"path='onednn' is the CPU-specialised graph; the model is on {device}: "
            f"use 'auto', 'fused' or 'plain'"
        )
    if path == "fused":
        if not triton_available():
            raise ValueError(
                f"path='fused' needs Triton, but {triton_missing_reason()}: use 'auto' or 'plain'"
            )
        if device.type != "cuda" and not (device.type == "cpu" and interpreter_enabled()):
            raise ValueError(
                f"path='fused' runs Triton kernels on CUDA (on the CPU only with TRITON_INTERPRET=1); "
                f"the model is on {device}"
            )
    return path


BACKENDS = ("torch", "onnxruntime")


def _check_backend(backend: str, device: torch.device, dtype: torch.dtype, cuda_graph: bool,
                   freeze: bool) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return
    if cuda_graph or freeze or device.type != "cpu" or dtype != torch.float32:
        extra = " with cuda_graph=True" if cuda_graph else " with freeze=True" if freeze else ""
        raise ValueError(
            f"backend='onnxruntime' runs fp32 models on the CPU, got a {dtype} model on {device}{extra}: "
            f"use backend='torch'" + (" or drop the other option" if extra else "")
        )


@torch.no_grad()
@torch.inference_mode(False)  # normal tensors even when called under inference_mode (see the docstring)
def optimize_for_inference(
    model: nn.Module,
    *,
    path: str = "auto",
    cuda_graph: bool = False,
    freeze: bool = False,
    backend: str = "torch",
    max_graphs: int = 4,
) -> nn.Module:
    """An eval-only copy of ``model`` that computes the same outputs faster.

    Works on a ``TinyUNet``, a ``CMRF``, and any model holding them (for example the output of
    ``replace_blocks``): each one is replaced by its optimized form (see the module docstring);
    everything else is copied as it is. ``model`` itself is left untouched. BatchNorm running
    statistics are baked in, so the copy is for inference only: its parameters do not require
    grad, and its CMRF parts compute eval-mode outputs even after ``.train()`` (other layers of
    a generic model are plain copies and follow ``.train()``/``.eval()`` as usual). Constants
    are built on the model's device and in its dtype, and as normal tensors even when called
    under ``torch.inference_mode()`` (inference tensors would break the eager fallback for
    inputs that need a gradient). Hooks: a TinyUNet or CMRF of ``model`` with hooks registered
    (on it or a layer inside) is kept as a plain copy, its hooks running and nothing optimized
    (with no other block to rewrite, the call refuses: remove them first with their handles'
    ``.remove()``). On the copy, hooks inside an optimized part never run, and with
    ``freeze``/``backend="onnxruntime"`` hooks run only while a graph is traced
    (docs/inference.md).

    Args:
        model: the model to optimize, on the CPU or a CUDA device, in any floating dtype.
        path: ``"auto"`` (default: ``choose_path`` of the model's device and dtype), ``"onednn"``
            (CPU only), ``"fused"`` (CUDA, needs Triton) or ``"plain"``. Each call still falls
            back to ``"plain"`` for inputs the path does not suit (see the module docstring).
        cuda_graph: wrap the result in ``CUDAGraphInference`` (CUDA models only), which replays
            a CUDA graph per input shape instead of launching every kernel. Default ``False``.
        freeze: wrap the result in ``FrozenCPUInference`` (fp32 CPU models only), which runs
            one frozen TorchScript graph per input shape, built on the first call with that
            shape (seconds): oneDNN layouts end to end and fused activations. Default ``False``.
        backend: ``"torch"`` (default) runs the copy in PyTorch; ``"onnxruntime"`` (fp32 CPU
            models, ``pip install 'cmrf[onnx]'``) wraps it in ``OnnxRuntimeInference``,
            which exports the copy once per input shape (seconds, on the first call with that
            shape) and runs it in ONNX Runtime, the fastest CPU option measured
            (docs/inference.md).
        max_graphs: with ``cuda_graph``, ``freeze`` or ``backend="onnxruntime"``, how many shapes
            get a graph or session (>= 1). Default 4.

    Returns:
        The optimized copy in eval mode; its ``inference_path`` attribute names the path.
        Its outputs equal ``model.eval()``'s within float rounding (below 1e-5 for TinyU-Net
        in fp32).

    Raises:
        ValueError: when ``model`` holds no CMRF block, for an unknown ``path`` or one the model's
            device cannot run, for ``cuda_graph=True`` on a model that is not on CUDA, and for
            ``freeze=True`` on a model that is not fp32 on the CPU, or with ``cuda_graph=True``,
            for an unknown ``backend``, and for ``backend="onnxruntime"`` on a model that is not
            fp32 on the CPU or with ``cuda_graph``/``freeze``, and for a CMRF whose BatchNorm
            has no running statistics (``track_running_stats=False``: nothing to fold).
        TypeError: when ``cuda_graph`` or ``freeze`` is not a bool.
        ImportError: ``backend="onnxruntime"`` without ONNX Runtime installed.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"optimize_for_inference expects an nn.Module, got {type(model).__name__}")
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    if not isinstance(freeze, bool):
        raise TypeError(f"freeze must be a bool, got {type(freeze).__name__}")
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    if cuda_graph and device.type != "cuda":
        raise ValueError(
            f"cuda_graph=True needs a model on a CUDA device, got one on {device}: CUDA graphs do not "
            f"exist there (move the model with .cuda() first, or leave cuda_graph=False)"
        )
    if freeze and (cuda_graph or device.type != "cpu" or dtype != torch.float32):
        raise ValueError(
            f"freeze=True builds frozen TorchScript graphs for fp32 CPU models, got a {dtype} model on "
            f"{device}" + (" with cuda_graph=True" if cuda_graph else "") + ": use freeze=False"
        )
    _check_backend(backend, device, dtype, cuda_graph, freeze)
    path = _resolve_path(path, device, dtype)
    kept: list[str] = []  # customised CMRF parts left as they are, and why
    optimized = _optimized(model, path, "", kept)
    if optimized is None:
        optimized = copy_model(model)
        count = _replace_blocks(optimized, path, "", kept)
        if count == 0 and kept:
            hooks = "; hooks keep a block as it is: remove them (handle.remove()) to optimize it" if any(
                "has hooks registered" in entry for entry in kept) else ""
            raise ValueError(
                f"optimize_for_inference found no CMRF block it can rewrite in {type(model).__name__}: "
                f"{' | '.join(kept)}; the rewrite computes only what TinyUNet and CMRF build{hooks}"
            )
        already = inference_only_parts(model)
        if count == 0 and already:  # "no CMRF block" would send the user looking for one
            part = (f"its part {already[0]} ({type(model.get_submodule(already[0])).__name__})"
                    if already[0] else "it")
            raise ValueError(
                f"{type(model).__name__} is already optimized: {part} comes from "
                f"optimize_for_inference; call optimize_for_inference on the original model")
        if count == 0:
            raise ValueError(
                f"optimize_for_inference found no CMRF block in {type(model).__name__}; it optimizes "
                f"TinyUNet, CMRF and models that contain them"
            )
    if kept:
        warnings.warn(
            f"optimize_for_inference kept these parts as they are (plain copies, not optimized), "
            f"because they compute something other than what their class builds: {' | '.join(kept)}",
            stacklevel=caller_stacklevel(),
        )
    optimized = optimized.eval().requires_grad_(False)
    if cuda_graph:
        optimized = CUDAGraphInference(optimized, max_graphs).eval()
    if freeze:
        optimized = FrozenCPUInference(optimized, max_graphs).eval()
    if backend == "onnxruntime":
        optimized = OnnxRuntimeInference(optimized, max_graphs).eval()
    optimized.inference_path = path
    return optimized
