"""Cost profiling: parameters, fvcore MACs, and FLOPs in the TinyU-Net paper's convention.

The paper's tables come from a module-hook counter (thop) doubled. For each module call it counts
``out.numel() * in_channels / groups * prod(kernel)`` for convolutions (bias ignored),
``4 * out.numel()`` for affine BatchNorm, InstanceNorm and LayerNorm (``2 *`` without affine),
``in_features * out.numel()`` for Linear, a per-mode constant times ``out.numel()`` for
``nn.Upsample`` modules, as thop does ``out.numel()`` for PReLU and average pooling,
``(window + 1) * out.numel()`` for adaptive average pooling and ``rows * (3 * n - 1)`` for Softmax
over ``n`` features, and zero for everything else, functional calls such as ``F.interpolate``
included. FLOPs = 2 x that total. Both counters run the model in eval mode (BatchNorm's running
statistics are left as they are).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cmrf.layers import check_input_size, compiled_original, eval_mode
from cmrf.ops import reference_only

# thop's per-output-element cost of nn.Upsample by mode. thop's module hook itself counts
# "trilinear" as 0 (not implemented there); its own cost table says 31, which this keeps, so 3D
# models built on nn.Upsample (not TinyU-Net) count a little more than thop would (1.5 % for a 3D
# CMUNeXt at 64^3).
_UPSAMPLE_OPS = {"nearest": 1, "linear": 5, "bilinear": 11, "bicubic": 259, "trilinear": 31}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


@dataclass(frozen=True)
class Profile:
    """Costs of one forward pass.

    Attributes:
        params: trainable and frozen parameters (BatchNorm running statistics excluded).
        macs: multiply-accumulates counted by fvcore (convolutions, matmuls, norms).
        flops: floating-point operations in the paper's convention (2 x thop count).
        input_size: the profiled input shape.
    """

    params: int
    macs: int
    flops: int
    input_size: tuple[int, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"input {'x'.join(map(str, self.input_size))}: params {self.params:,} "
            f"({self.params / 1e6:.3f}M) | fvcore MACs {self.macs / 1e9:.4f}G | "
            f"paper-convention FLOPs {self.flops / 1e9:.4f}G"
        )


def _paper_ops(module: nn.Module, inputs, output) -> int:
    if not isinstance(output, torch.Tensor):
        return 0
    if isinstance(module, _CONVS):
        taps = math.prod(module.kernel_size)
        return output.numel() * (module.in_channels // module.groups) * taps
    if isinstance(module, _NORMS):
        affine = getattr(module, "affine", False) or getattr(module, "elementwise_affine", False)
        return (4 if affine else 2) * output.numel()
    if isinstance(module, nn.Linear):
        return module.in_features * output.numel()
    if isinstance(module, nn.Upsample):
        return _UPSAMPLE_OPS.get(module.mode, 0) * output.numel()
    if isinstance(module, (nn.PReLU, *_AVG_POOLS)):
        return output.numel()
    if isinstance(module, _ADAPTIVE_AVG_POOLS) and inputs and isinstance(inputs[0], torch.Tensor):
        window = math.prod(i / o for i, o in zip(inputs[0].shape[2:], output.shape[2:]) if o)
        return int((window + 1) * output.numel())
    if isinstance(module, nn.Softmax) and module.dim is not None and output.dim():
        features = output.shape[module.dim]
        return output.numel() // max(features, 1) * (3 * features - 1)
    return 0


def _check_countable(model: nn.Module) -> None:
    from cmrf.inference import InferenceCMRF  # lazy: inference is far heavier than profiling

    compiled = [name for name, m in model.named_modules() if compiled_original(m) is not m]
    if compiled:  # fvcore's trace fails on them ("using FX to torch.jit.trace a dynamo-optimized function")
        names = ", ".join(compiled[:3])
        raise ValueError(f"{type(model).__name__} holds torch.compile'd submodules ({names}), which fvcore "
                         f"cannot trace: profile the model before compiling its parts")

    if getattr(model, "inference_path", None) is not None or any(
            isinstance(m, InferenceCMRF) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} comes from optimize_for_inference, which runs its convolutions "
            "without calling their modules, so a module-hook count would miss most of them: profile "
            "the model it was made from")


def _without_autocast(example: torch.Tensor):
    """Autocast off for ``example``'s device: the counts are of the model's own dtype, and under an
    enclosing autocast region fvcore's trace fails on the casts of parameters it records."""
    if example.device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(example.device.type, enabled=False)
    return contextlib.nullcontext()


def count_paper_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of ``model(example)`` in the paper's convention (see the module docstring), counted in
    eval mode (every submodule's training flag is restored afterwards).

    Raises:
        ValueError: ``model`` comes from ``optimize_for_inference`` (its calls are not modules').
    """
    _check_countable(model)
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        total += _paper_ops(module, inputs, output)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad(), reference_only(), eval_mode(model), _without_autocast(example):
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return 2 * total


@contextlib.contextmanager
def _removing_new_hooks(model: nn.Module):
    """Remove, on the way out, the forward hooks added to ``model``'s modules meanwhile: fvcore
    registers one per module to name the trace's scopes and leaves them behind when the trace
    fails, where they would run on every later call of the user's model."""
    before = {id(m): (set(m._forward_hooks), set(m._forward_pre_hooks)) for m in model.modules()}
    try:
        yield
    finally:
        for module in model.modules():
            hooks, pre_hooks = before.get(id(module), (set(), set()))
            for key in set(module._forward_hooks) - hooks:
                del module._forward_hooks[key]
            for key in set(module._forward_pre_hooks) - pre_hooks:
                del module._forward_pre_hooks[key]


def count_fvcore_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Total MACs that fvcore's ``FlopCountAnalysis`` counts for ``model(example)``, traced in eval
    mode (every submodule's training flag is restored afterwards, and no hook is left on it)."""
    with (warnings.catch_warnings(), torch.no_grad(), reference_only(), eval_mode(model),
          _removing_new_hooks(model), _without_autocast(example)):
        # fvcore's import uses the deprecated torch.jit.script; tracing warns about the shape
        # checks in forward(). Neither concerns the user.
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, (example,))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(analysis.total())


def profile(model: nn.Module, input_size: Sequence[int]) -> Profile:
    """Count parameters, fvcore MACs and paper-convention FLOPs of ``model`` on one input.

    Args:
        model: any ``nn.Module`` taking one tensor. It is profiled in eval mode on its own device
            and dtype, and every submodule's training flag is restored afterwards.
        input_size: the full input shape, e.g. ``(1, 3, 256, 256)``.

    Returns:
        A ``Profile``; ``str()`` gives a one-line summary, ``to_dict()`` the JSON-ready figures.

    Raises:
        ValueError: a bad ``input_size``, ``model`` comes from ``optimize_for_inference`` or is on
            the meta device.
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):  # (a function would fail deep inside: "no named_modules")
        raise TypeError(f"profile needs an nn.Module, got {type(model).__name__}")
    input_size = check_input_size(input_size)
    model = compiled_original(model)  # fvcore's trace refuses Dynamo's wrapper; the counts are the module's
    _check_countable(model)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        # fvcore traces a real call, which meta tensors cannot make (torch fails deep inside)
        raise ValueError(f"cannot profile {type(model).__name__} on the meta device: it has no weights "
                         f"to run with; give it memory first (model.to_empty(device='cpu'): the counts "
                         f"do not depend on the values)")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    example = torch.zeros(input_size, device=device, dtype=dtype)
    with eval_mode(model):
        flops = count_paper_flops(model, example)
        macs = count_fvcore_macs(model, example)
    params = sum(p.numel() for p in model.parameters())
    return Profile(params=params, macs=macs, flops=flops, input_size=input_size)
