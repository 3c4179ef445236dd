"""CMRF's parity split, cascaded depthwise stages and concatenation as one operator.

``cascade_concat_reference`` is the oracle: it runs the stage modules exactly as the reference
code does, so autograd and BatchNorm running statistics behave as in plain PyTorch.
``cascade_concat`` is the dispatch every CMRF calls.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn


def cascade_concat_reference(y: torch.Tensor, stages: nn.ModuleList) -> torch.Tensor:
    """Plain PyTorch cascade.

    Args:
        y: ``(B, 2c, *S)``, the output of CMRF's first pointwise conv.
        stages: ``N - 1`` modules ``(B, c, *S) -> (B, c, *S)`` (depthwise conv + BatchNorm).

    Returns:
        ``(B, N*c, *S)``: ``[y[:, 0::2] + y[:, 1::2], d_1, ..., d_{N-1}]`` where
        ``d_k = stages[k-1](d_{k-1})`` and ``d_0 = y[:, 1::2]``.
    """
    odd, even = y[:, 0::2], y[:, 1::2]
    outputs = [odd + even]
    for stage in stages:
        even = stage(even)
        outputs.append(even)
    return torch.cat(outputs, dim=1)


_state = threading.local()


@contextlib.contextmanager
def reference_only():
    """Run every CMRF cascade through the plain PyTorch reference inside this block.

    Overrides both ``CMRF_FUSED`` and per-module ``fused=True``. Used where module hooks must
    see every stage (cost profiling, ``replace_blocks`` probing, ONNX export).
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


def cascade_concat(y: torch.Tensor, stages: nn.ModuleList, fused: bool | None = None) -> torch.Tensor:
    """Dispatch between the reference and the fused implementation (see ``cascade_concat_reference``)."""
    return cascade_concat_reference(y, stages)
