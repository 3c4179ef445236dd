"""Module glue of the fused cascade: reads CMRF's stage modules and drives ``cmrf.ops.triton_cascade``.

``cascade_concat_fused(y, stages)`` is what ``cmrf.ops.cascade.cascade_concat`` calls once it has
chosen the fused path. It

* decides between inference (BatchNorm folded, one ``torch.ops.cmrf.cascade_inference`` call) and
  the training-capable ops (``FusedCascade``: batch statistics, or frozen BatchNorm with gradients);
* stacks the depthwise weights and BatchNorm parameters into the ``(S, c, ...)`` fp32 tensors the
  kernels read, folds BatchNorm for inference, and **caches** both per ``stages`` module, keyed by
  each parameter's and buffer's identity, storage pointer and ``_version`` (so an in-place update,
  an optimizer step, ``load_state_dict`` or ``.to()`` invalidates it) plus ``eps``, device and
  inference mode. ``clear_cache()`` empties it. The cache is bypassed under ``torch.compile``
  tracing and CUDA graph capture, where the derived tensors are recomputed by traced/captured ops;
* updates the BatchNorm buffers as ``nn.BatchNorm2d`` does in training (momentum or cumulative
  average with ``momentum=None``, unbiased running variance, ``num_batches_tracked``), with
  in-place device ops only: ``num_batches_tracked`` stays a tensor and is never read back.

Nothing here copies host data to the device or synchronises: ``eps`` travels as Python floats
(kernel arguments), shapes as ints. Importing this module imports Triton.

The tiling helpers of the kernels are re-exported for benchmark sweeps: ``eval_configs(H, W, S)``,
``train_configs(H, W)``, ``force_config(config)`` and ``TileConfig``.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from cmrf.ops import triton_cascade as _tc
from cmrf.ops.stamps import tensor_version
from cmrf.ops.triton_cascade import (
    FusedCascade,
    TileConfig,
    default_eval_config,
    default_train_config,
    eval_configs,
    force_config,
    train_configs,
)

__all__ = [
    "TileConfig",
    "cascade_concat_fused",
    "clear_cache",
    "default_eval_config",
    "default_train_config",
    "eval_configs",
    "force_config",
    "train_configs",
]

# stages (ModuleList) -> {"packed" | "folded" | "fixed": (key, tensors)}. Weak keys: a dropped
# model frees its entry.
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear_cache() -> None:
    """Forget every cached stacked weight and folded BatchNorm (they are rebuilt on the next call)."""
    _cache.clear()


# Stages a CUDA graph has captured: its replays rewrite their weights and statistics on the device
# without bumping the versions the cache keys read (a host-side counter), so an eager call after a
# replay would get what was derived before it. Nothing is cached for them from then on.
_captured: weakref.WeakSet = weakref.WeakSet()


def _caching_allowed(y: torch.Tensor, stages=None) -> bool:
    """No cache while Dynamo traces (the ops must be in the graph), while a CUDA graph is captured,
    or for ``stages`` a CUDA graph has captured before."""
    if torch.compiler.is_compiling():
        return False
    if y.is_cuda and torch.cuda.is_current_stream_capturing():
        with contextlib.suppress(TypeError):  # (stages without weak references are never cached)
            _captured.add(stages)
            _cache.pop(stages, None)
        return False
    try:
        return stages not in _captured
    except TypeError:
        return True


def _key(y: torch.Tensor, tensors, extra=()) -> tuple | None:
    """What the cached values were made from, or ``None`` (make them afresh) when a tensor is an
    inference tensor (a module built under ``torch.inference_mode()``): it has no version
    counter, so a write in place (``load_state_dict`` in inference mode) could not be seen."""
    # id: which tensor; data_ptr: its storage (``.data = ...``, ``.to()``); version: in-place writes.
    marks = [None if t is None else (id(t), t.data_ptr(), tensor_version(t)) for t in tensors]
    if any(mark is not None and mark[2] is None for mark in marks):
        return None
    return (y.device, torch.is_inference_mode_enabled(), extra, *marks)


def _cached(stages: nn.ModuleList, kind: str, key, build):
    """``build()``'s result, from the cache when ``key`` matches (``key=None``: no cache)."""
    if key is None:
        return build()
    try:
        entries = _cache.setdefault(stages, {})
    except TypeError:  # stages without weak references (a plain list of modules): no cache
        return build()
    hit = entries.get(kind)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        value = build()
    entries[kind] = (key, value)
    return value


def _norms(stages) -> list:
    """Each stage's BatchNorm, read from ``_modules``.

    The helpers here run at every call; ``nn.Module.__getattr__`` costs about a microsecond per
    attribute, so the modules' own dicts are read instead (``fused_unsupported_reason`` has checked
    that the stages are plain ``Conv2d`` + ``BatchNorm2d``, which keep everything there).
    """
    return [stage._modules["norm"] for stage in stages]


def _conv_weights(stages) -> list:
    return [stage._modules["conv"]._parameters["weight"] for stage in stages]


def _params(stages) -> list:
    """Conv weight, BatchNorm weight and bias of every stage, flat (``None`` where not affine)."""
    tensors = []
    for weight, norm in zip(_conv_weights(stages), _norms(stages)):
        tensors += (weight, norm._parameters["weight"], norm._parameters["bias"])
    return tensors


def _buffers(stages) -> list:
    """Running statistics of every stage, and their batch counts: BatchNorm's own training forward
    (the reference path) updates the statistics in place without bumping their ``_version``, while
    it counts the batch with a versioned ``add_``, which is what shows the cache that they changed."""
    tensors = []
    for norm in _norms(stages):
        buffers = norm._buffers
        tensors += (buffers["running_mean"], buffers["running_var"], buffers.get("num_batches_tracked"))
    return tensors


def _packed(stages, c: int, y: torch.Tensor, use_cache: bool):
    """``(weight (S, c, 9), gamma (S, c), beta (S, c))`` fp32, detached: what the kernels read."""

    def build():
        weight = torch.stack([stage.conv.weight.detach().reshape(c, 9) for stage in stages]).float()
        ones = zeros = None
        gammas, betas = [], []
        for stage in stages:
            norm = stage.norm
            if norm.affine:
                gammas.append(norm.weight.detach())
                betas.append(norm.bias.detach())
            else:
                if ones is None:  # fills on the device, not host data
                    ones = torch.ones(c, device=y.device)
                    zeros = torch.zeros(c, device=y.device)
                gammas.append(ones)
                betas.append(zeros)
        return weight, torch.stack(gammas).float(), torch.stack(betas).float()

    return _cached(stages, "packed", _key(y, _params(stages)) if use_cache else None, build)


def _fixed(stages, y: torch.Tensor, use_cache: bool) -> torch.Tensor:
    """``(2, S, c)`` fp32 running mean and variance (frozen BatchNorm with gradients)."""

    def build():
        means = torch.stack([stage.norm.running_mean for stage in stages])
        variances = torch.stack([stage.norm.running_var for stage in stages])
        return torch.stack([means, variances]).float()

    return _cached(stages, "fixed", _key(y, _buffers(stages)) if use_cache else None, build)


def _folded(stages, c: int, y: torch.Tensor, use_cache: bool):
    """``(weight (S, c, 9), scale (S, c), shift (S, c))`` fp32: each BatchNorm folded into its conv."""

    def build():
        weight, gamma, beta = _packed(stages, c, y, use_cache)
        # Per stage, so each eps stays a Python scalar (no host list copied to the device).
        invstd = torch.stack([
            torch.rsqrt(stage.norm.running_var.float() + float(stage.norm.eps)) for stage in stages
        ])
        means = torch.stack([stage.norm.running_mean for stage in stages]).float()
        scale = gamma * invstd
        return weight, scale, beta - means * scale

    key = None
    if use_cache:
        key = _key(y, _params(stages) + _buffers(stages), tuple(norm.eps for norm in _norms(stages)))
    return _cached(stages, "folded", key, build)


def _update_running_stats(norms, stats: torch.Tensor) -> None:
    """Exactly what ``nn.BatchNorm2d`` does to its buffers in a training-mode forward, on the device.

    ``stats`` is ``cascade_forward``'s ``(STATS_ROWS, S, c)`` tensor (batch mean, unbiased variance).
    """
    if not (norms[0].training and norms[0].track_running_stats):
        return
    with torch.no_grad():
        means = stats[_tc.MEAN].unbind(0)
        variances = stats[_tc.UNBIASED_VAR].unbind(0)
        buffers = [norm._buffers for norm in norms]  # not norm.<name>: see _norms
        counters = [b["num_batches_tracked"] for b in buffers]
        torch._foreach_add_(counters, 1)
        running_means = [b["running_mean"] for b in buffers]
        running_vars = [b["running_var"] for b in buffers]
        momenta = {norm.momentum for norm in norms}
        fp32 = all(t.dtype == torch.float32 for t in running_means + running_vars)
        if fp32 and len(momenta) == 1 and None not in momenta:
            # One foreach op per buffer kind for all stages: (1 - m) * running + m * batch.
            momentum = momenta.pop()
            torch._foreach_mul_(running_means, 1 - momentum)
            torch._foreach_add_(running_means, means, alpha=momentum)
            torch._foreach_mul_(running_vars, 1 - momentum)
            torch._foreach_add_(running_vars, variances, alpha=momentum)
            return
        for norm, counter, mean, var, running_mean, running_var in zip(
            norms, counters, means, variances, running_means, running_vars
        ):
            if norm.momentum is None:
                # Cumulative average: factor 1 / num_batches_tracked, kept on the device (PyTorch
                # itself reads the counter back with float(); we never do).
                factor = torch.reciprocal(counter.to(torch.float32))
                running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype) * factor)
                running_var.mul_(1 - factor).add_(var.to(running_var.dtype) * factor)
            else:
                momentum = norm.momentum
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)


def cascade_concat_fused(y: torch.Tensor, stages) -> torch.Tensor:
    """The fused cascade on ``stages`` (a sequence of 2-D ``ConvNorm``: depthwise 3x3 conv + BatchNorm2d).

    The caller (``cmrf.ops.cascade.cascade_concat``) has already checked with
    ``fused_unsupported_reason`` that the stages qualify and that Triton can run on ``y``'s device,
    and sent an empty ``y`` to the reference.

    Args:
        y: ``(B, 2c, H, W)`` fp32/fp16/bf16 on a CUDA device (or CPU under ``TRITON_INTERPRET=1``).
        stages: ``S >= 1`` modules with ``.conv`` (``Conv2d(c, c, 3, padding=1, groups=c, bias=False)``)
            and ``.norm`` (``BatchNorm2d(c)``), all in the same mode.

    Returns:
        ``(B, (S + 1) c, H, W)``, equal to ``cascade_concat_reference(y, stages)``; in training mode
        the BatchNorm running statistics are updated as the reference would.

    Raises:
        ValueError: training-mode BatchNorm with one value per channel (as PyTorch).
    """
    c = y.shape[1] // 2
    norms = _norms(stages)
    first = norms[0]
    use_batch_stats = first.training or first._buffers["running_mean"] is None
    if use_batch_stats and y.shape[0] * y.shape[2] * y.shape[3] == 1:
        raise ValueError(
            f"BatchNorm needs more than 1 value per channel when training, got input size {tuple(y.shape)}"
        )
    use_cache = _caching_allowed(y, stages)
    params = _conv_weights(stages)
    affine_stages = tuple(index for index, norm in enumerate(norms) if norm.affine)
    for index in affine_stages:
        params += [norms[index]._parameters["weight"], norms[index]._parameters["bias"]]
    needs_grad = torch.is_grad_enabled() and (y.requires_grad or any(p.requires_grad for p in params))
    if not (needs_grad or use_batch_stats):
        # Inference: BatchNorm folded into each conv, one launch, no intermediate tensor.
        weight, scale, shift = _folded(stages, c, y, use_cache)
        if torch.compiler.is_compiling():
            return torch.ops.cmrf.cascade_inference(y, weight, scale, shift)
        return _tc.eval_cascade(y, weight, scale, shift)  # the op's body, without dispatcher overhead
    weight, gamma, beta = _packed(stages, c, y, use_cache)
    fixed = None if use_batch_stats else _fixed(stages, y, use_cache)
    eps = [float(norm.eps) for norm in norms]
    if needs_grad:
        out, stats = FusedCascade.apply(
            y, weight, gamma, beta, fixed, eps, use_batch_stats, affine_stages, *params
        )
    else:
        forward = torch.ops.cmrf.cascade_forward if torch.compiler.is_compiling() else _tc.train_forward
        out, _, stats = forward(y, weight, gamma, beta, fixed, eps, use_batch_stats)
    if use_batch_stats:
        _update_running_stats(norms, stats)
    return out
