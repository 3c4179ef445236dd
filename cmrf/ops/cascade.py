"""CMRF's parity split, cascaded depthwise stages and concatenation as one operator.

``cascade_concat_reference`` is the oracle: it runs the stage modules exactly as the reference
code does, so autograd and BatchNorm running statistics behave as in plain PyTorch.
``cascade_concat`` is the dispatch every CMRF calls: it picks the reference or the fused path,
``cmrf.ops.fused_cascade`` (module glue: caches, BatchNorm folding and running statistics) over the
Triton kernels and custom ops of ``cmrf.ops.triton_cascade``; both are imported lazily, so importing
``cmrf`` never imports Triton.

Dispatch rules, in order:

1. inside ``reference_only()``: the reference, always;
2. the per-call ``fused`` argument (a CMRF's ``fused`` attribute) when it is not ``None``, else the
   ``CMRF_FUSED`` environment variable read at call time: ``auto`` (default), ``1`` or ``0``;
3. ``0``: the reference. ``auto``: the fused kernels for CUDA tensors when Triton is installed and
   the stages qualify (see ``fused_unsupported_reason``), the reference otherwise. ``1``: the fused
   kernels; a tensor that is not on CUDA is accepted only under ``TRITON_INTERPRET=1`` (Triton's
   CPU interpreter, used by the tests) and anything else raises ``FusedUnavailableError``; stages
   that do not qualify (3-D volumes, a conv with bias, ...) run the reference with a warning that
   gives the reason, never silently.

Tracing: whether a Triton the kernels support (``MIN_TRITON`` or newer) is installed is computed
once at import (``TRITON_AVAILABLE``), from package metadata, without importing Triton. The two
environment variables are read by functions marked ``torch.compiler.assume_constant_result``:
eager calls read them at every call, while ``torch.compile`` evaluates them once while tracing and
bakes the result into the graph (no graph break; changing ``CMRF_FUSED`` after compiling needs a
new ``torch.compile``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import threading
import warnings

import torch
from torch import nn
from torch.nn.modules import module as _torch_module


def cascade_concat_reference(y: torch.Tensor, stages: nn.ModuleList) -> torch.Tensor:
    """Plain PyTorch cascade.

    Args:
        y: ``(B, 2c, *S)``, the output of CMRF's first pointwise conv.
        stages: ``N - 1`` modules ``(B, c, *S) -> (B, c, *S)`` (depthwise conv + BatchNorm).

    Returns:
        ``(B, N*c, *S)``: ``[y[:, 0::2] + y[:, 1::2], d_1, ..., d_{N-1}]`` where
        ``d_k = stages[k-1](d_{k-1})`` and ``d_0 = y[:, 1::2]``.

    Raises:
        ValueError: ``y`` is not ``(B, 2c, *S)`` with an even channel count.
    """
    check_cascade_input(y)
    odd, even = y[:, 0::2], y[:, 1::2]
    outputs = [odd + even]
    for stage in stages:
        even = stage(even)
        outputs.append(even)
    return torch.cat(outputs, dim=1)


def check_cascade_input(y: torch.Tensor) -> None:
    """Refuse a ``y`` that is not ``(B, 2c, *S)``: its parity halves would differ in width."""
    if y.dim() < 3 or y.shape[1] % 2:
        raise ValueError(f"the CMRF cascade takes (B, 2c, *S), an even number of channels, got shape "
                         f"{tuple(y.shape)}")


_state = threading.local()


@contextlib.contextmanager
def reference_only():
    """Run every CMRF cascade, and TinyU-Net's x2 upsampling, as the reference does inside this block.

    Cascades take the plain PyTorch path, overriding both ``CMRF_FUSED`` and per-module
    ``fused=True``; ``cmrf.ops.upsample_to`` takes ``F.interpolate``, overriding ``CMRF_UPSAMPLE``.
    Used where module hooks must see every stage (cost profiling, ``replace_blocks`` probing, ONNX
    export) and for benchmarks' reference rows.
    """
    previous = getattr(_state, "reference_only", False)
    _state.reference_only = True
    try:
        yield
    finally:
        _state.reference_only = previous


def reference_forced() -> bool:
    """Whether the current thread is inside ``reference_only()``."""
    return getattr(_state, "reference_only", False)


FUSED_ENV = "CMRF_FUSED"
_ENV_VALUES = {"auto": "auto", "": "auto", "1": "on", "true": "on", "on": "on", "0": "off", "false": "off",
               "off": "off"}
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FusedUnavailableError(RuntimeError, ValueError):
    """The fused cascade was forced but cannot run here (no CUDA tensor, or no Triton).

    A ``RuntimeError``, and a ``ValueError`` too: forcing it (``CMRF_FUSED=1``, ``fused=True``) is
    a setting the user can change, which the command line reports on one line (exit status 2)."""


@torch.compiler.assume_constant_result
def _fused_env() -> str:
    # A constant for Dynamo: reading os.environ inside traced code would break the graph.
    return os.environ.get(FUSED_ENV, "auto")


def fused_mode(fused: bool | None = None) -> str:
    """``"on"``, ``"off"`` or ``"auto"`` from ``fused`` if given, else from ``CMRF_FUSED`` (read now).

    Raises:
        ValueError: for a ``CMRF_FUSED`` value other than auto/1/0 (or true/false/on/off).
    """
    if fused is not None:
        if fused is not True and fused is not False:  # "false" or "0" would read as on
            raise ValueError(f"fused must be True, False or None (auto), got {fused!r}")
        return "on" if fused else "off"
    raw = _fused_env()
    mode = _ENV_VALUES.get(raw.strip().lower())
    if mode is None:
        raise ValueError(f"{FUSED_ENV} must be 'auto', '1' or '0', got {raw!r}")
    return mode


# The oldest Triton the kernels are built and tested for (the ``fused`` extra asks for it). Older
# releases, such as the Triton 3.0 that torch 2.4's wheels bring, count as missing: the cascade
# then runs the PyTorch reference instead of failing in the kernels' module.
MIN_TRITON = (3, 6)
# Distributions that install the ``triton`` module (PyPI's, PyTorch's nightly and ROCm builds).
_TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton", "pytorch-triton-rocm", "triton-rocm")


def installed_triton_version() -> tuple[int, int] | None:
    """``(major, minor)`` of the installed Triton, read from its package metadata without importing it.

    ``None`` when no ``triton`` module is installed; ``MIN_TRITON`` when the module exists but no
    known distribution's metadata names its version (a source build): it is given the benefit of
    the doubt.
    """
    if importlib.util.find_spec("triton") is None:
        return None
    for name in _TRITON_DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        match = re.match(r"(\d+)\.(\d+)", version)
        if match:
            return int(match[1]), int(match[2])
    return MIN_TRITON


# Checked once, without importing Triton: find_spec inside traced code breaks Dynamo's graph (torch 2.11).
TRITON_VERSION = installed_triton_version()
TRITON_AVAILABLE = TRITON_VERSION is not None and TRITON_VERSION >= MIN_TRITON


def triton_available() -> bool:
    """Whether a Triton the kernels support (``MIN_TRITON`` or newer) is installed.

    ``TRITON_AVAILABLE``, checked once at import.
    """
    return TRITON_AVAILABLE


def triton_missing_reason() -> str:
    """Why ``triton_available()`` is false, for error messages ("" when it is true)."""
    if TRITON_AVAILABLE:
        return ""
    wanted = ".".join(map(str, MIN_TRITON))
    if TRITON_VERSION is None:
        return f"Triton is not installed (the fused kernels need Triton >= {wanted})"
    found = ".".join(map(str, TRITON_VERSION))
    return f"the installed Triton {found} is older than {wanted}, which the fused kernels need"


@torch.compiler.assume_constant_result
def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is requested (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def _is_depthwise_3x3(conv, c: int) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.in_channels == conv.out_channels == conv.groups == c
        and tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.padding in ((1, 1), "same")
        and conv.padding_mode == "zeros"
        and conv._parameters.get("bias") is None  # not conv.bias: see fused_unsupported_reason
    )


# torch's registries of global module hooks (``register_module_forward_hook`` and the like).
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _has_hooks(*modules: nn.Module) -> bool:
    """Forward or backward hooks on any of ``modules``, or global module hooks
    (``nn.modules.module.register_module_forward_hook`` and the like): the kernels never call them."""
    if any(getattr(_torch_module, name, None) for name in _GLOBAL_HOOKS):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


def _forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``): the
    kernels would drop the inputs' tangents."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def functorch_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) is running: its wrapped tensors
    have no storage for the kernels. Not asked while Dynamo traces (it handles transforms itself)."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def fused_unsupported_reason(y: torch.Tensor, stages: nn.ModuleList) -> str | None:
    """Why the fused kernels cannot reproduce ``cascade_concat_reference(y, stages)``, or ``None``.

    The kernels cover 2-D inputs ``(B, 2c, H, W)`` in fp32/fp16/bf16 and stages that are exactly
    a bias-free depthwise 3x3 ``nn.Conv2d`` (stride 1, padding 1) followed by ``nn.BatchNorm2d``
    in an ``nn.Sequential`` (or a subclass that keeps its ``forward``, as ``ConvNorm``), all in the
    same mode (training or eval, tracking running statistics or not), without hooks (forward or
    backward), outside ``torch.func`` transforms.
    """
    if len(stages) == 0:
        return "N = 1 has no cascade stage to fuse"
    if functorch_transforms_active():
        return "a torch.func transform (vmap, grad, ...) is running, which the fused kernels do not support"
    if not torch.compiler.is_compiling() and _forward_ad_active():
        return "forward-mode AD (torch.autograd.forward_ad) is active, which the fused kernels do not support"
    if y.dim() != 4:
        return (
            f"only 2-D inputs (B, C, H, W) have fused kernels, got a {y.dim()}-D input "
            f"(3-D volumes use the reference)"
        )
    if y.dtype not in _FUSED_DTYPES:
        return f"dtype {y.dtype} is not one of float32, float16, bfloat16"
    if y.shape[1] % 2:
        return f"the cascade input needs an even channel count, got {y.shape[1]}"
    c = y.shape[1] // 2
    modes = set()
    # This runs at every call: children, parameters and buffers are read from the module's own
    # dicts, since ``nn.Module.__getattr__`` costs about a microsecond per attribute. The exact
    # type checks make that safe: plain Conv2d and BatchNorm2d keep them there.
    for index, stage in enumerate(stages):
        children = stage._modules
        conv, norm = children.get("conv"), children.get("norm")
        # nn.Sequential's own forward (ConvNorm keeps it) runs conv then norm, in this order; a
        # stage with a forward of its own may compute anything from the same two children.
        sequential = type(stage).forward is nn.Sequential.forward and list(children) == ["conv", "norm"]
        if not sequential or not _is_depthwise_3x3(conv, c):
            return (
                f"stage {index} is not a bias-free depthwise 3x3 Conv2d({c}, {c}) followed by "
                f"BatchNorm2d and nothing else"
            )
        if type(norm) is not nn.BatchNorm2d or norm.num_features != c:
            return f"stage {index}'s norm is {type(norm).__name__}, not BatchNorm2d({c})"
        if _has_hooks(stage, conv, norm):  # Conv2d and BatchNorm2d have no children
            return f"stage {index} has hooks, which fused kernels would skip"
        weight = conv._parameters.get("weight")
        if weight is None:  # e.g. moved elsewhere by a reparametrization
            return f"stage {index}'s conv holds no weight parameter"
        if weight.device != y.device:
            return f"stage {index}'s weights are on {weight.device}, the input on {y.device}"
        if norm.affine and not (isinstance(norm._parameters.get("weight"), nn.Parameter)
                                and isinstance(norm._parameters.get("bias"), nn.Parameter)):
            return f"stage {index}'s norm holds its affine weight or bias other than as parameters"
        modes.add((norm.training, norm._buffers["running_mean"] is None, norm.track_running_stats))
    if len(modes) > 1:
        return "the stages' BatchNorms mix training/eval mode or running-statistics tracking"
    return None


def check_fused_device(y: torch.Tensor) -> None:
    """Raise ``FusedUnavailableError`` unless Triton can run on ``y``'s device here."""
    if not triton_available():
        raise FusedUnavailableError(
            f"the fused CMRF cascade was forced (CMRF_FUSED=1 or fused=True) but {triton_missing_reason()}; "
            f"install triton>={'.'.join(map(str, MIN_TRITON))} for CUDA (pip install 'cmrf[fused]'), "
            "or set CMRF_FUSED=0 / fused=False to use the PyTorch reference"
        )
    if y.is_cuda:
        return
    if not interpreter_enabled():
        raise FusedUnavailableError(
            f"the fused CMRF cascade was forced (CMRF_FUSED=1 or fused=True) on a {y.device.type} tensor: "
            f"its Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for Triton's CPU interpreter); "
            f"move the model and input to CUDA, or set CMRF_FUSED=0 / fused=False for the PyTorch reference"
        )
    from cmrf.ops import triton_cascade

    if not triton_cascade.INTERPRETED:
        raise FusedUnavailableError(
            "TRITON_INTERPRET=1 was set after cmrf's Triton kernels were compiled for CUDA; set it before "
            "the first fused call (before cmrf.ops.triton_cascade is imported) to run them on CPU tensors"
        )


def clear_fused_cache() -> None:
    """Drop the fused path's cached stacked weights and folded BatchNorms (no-op if never used).

    The cache follows parameters by identity, storage and ``_version``, so ordinary updates
    (optimizer steps, ``load_state_dict``, ``.to()``, in-place ops under ``no_grad``) need nothing;
    call this after writing through ``param.data`` in place, which PyTorch does not version.
    """
    module = sys.modules.get("cmrf.ops.fused_cascade")
    if module is not None:
        module.clear_cache()


def cascade_concat(y: torch.Tensor, stages: nn.ModuleList, fused: bool | None = None) -> torch.Tensor:
    """CMRF's cascade through the reference or the fused Triton kernels (rules in the module docstring).

    Args:
        y: ``(B, 2c, *S)``, the output of CMRF's first pointwise conv.
        stages: the ``N - 1`` depthwise conv + BatchNorm stages.
        fused: ``None`` follows ``CMRF_FUSED``; ``True`` forces the fused kernels; ``False`` the reference.

    Returns:
        ``(B, N*c, *S)``, as ``cascade_concat_reference``.

    Raises:
        FusedUnavailableError: when the fused path is forced where Triton cannot run.
        ValueError: for a bad ``CMRF_FUSED`` value, or a ``y`` that is not ``(B, 2c, *S)``.
    """
    check_cascade_input(y)
    if reference_forced():
        return cascade_concat_reference(y, stages)
    mode = fused_mode(fused)
    if mode == "off":
        return cascade_concat_reference(y, stages)
    if mode == "auto":
        if not (y.is_cuda and triton_available()) or fused_unsupported_reason(y, stages):
            return cascade_concat_reference(y, stages)
    else:
        # What the kernels do not compute (a volume, hooks, ...) takes the reference on any device,
        # as documented; only a cascade they would compute needs Triton's device.
        reason = fused_unsupported_reason(y, stages)
        if reason:
            warnings.warn(f"fused CMRF cascade forced but unavailable, using the reference: {reason}",
                          stacklevel=3)
            return cascade_concat_reference(y, stages)
        check_fused_device(y)
    if y.numel() == 0:
        # Nothing for the kernels to compute; the reference treats an empty batch as PyTorch does
        # (an empty output, running statistics kept).
        return cascade_concat_reference(y, stages)
    from cmrf.ops.fused_cascade import cascade_concat_fused

    return cascade_concat_fused(y, stages)
