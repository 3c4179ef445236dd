"""The reference TinyU-Net algorithm, restated as plain functional PyTorch: the oracle.

``cmrf bench`` compares its inference rows against it (its training rows against the model's
plain path), and the tests hold the golden outputs to it and every inference path of the
full-width network (eager, ``optimize_for_inference`` with each path and backend) to it, with
BatchNorm statistics under which every block reaches the output. (The fused cascade's tests
compare against ``cmrf.ops.cascade``'s plain cascade, which ``tests/test_cmrf.py`` holds to a
functional CMRF of its own.) It follows the paper's
reference code step by step (``F.interpolate`` bicubic upsampling, ``torch.cat``, eval-mode
BatchNorm after every convolution) and shares no code with ``cmrf.layers`` or ``cmrf.inference``,
so a mistake there cannot hide here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["reference_cmrf", "reference_tinyunet"]

_REFERENCE_BN_EPS = 1e-3


def _reference_conv_bn(x, weights, prefix, groups=1, gelu=False):
    """Reference ``Conv`` block: conv (no bias, same padding), eval BatchNorm, optional GELU."""
    weight = weights[prefix + "conv.weight"]
    x = F.conv2d(x, weight, padding=weight.shape[-1] // 2, groups=groups)
    x = F.batch_norm(
        x,
        weights[prefix + "norm.running_mean"],
        weights[prefix + "norm.running_var"],
        weights[prefix + "norm.weight"],
        weights[prefix + "norm.bias"],
        training=False,
        eps=_REFERENCE_BN_EPS,
    )
    return F.gelu(x) if gelu else x


def reference_cmrf(x, weights, prefix, N):
    """Reference CMRF: pw1, parity split, ``N - 1`` cascaded depthwise stages, concat, pw2."""
    y = _reference_conv_bn(x, weights, prefix + "pw1.", gelu=True)
    odd, even = y[:, 0::2], y[:, 1::2]
    outputs = [odd + even]
    for k in range(N - 1):
        even = _reference_conv_bn(even, weights, f"{prefix}cascade.{k}.", groups=even.shape[1])
        outputs.append(even)
    y = _reference_conv_bn(torch.cat(outputs, dim=1), weights, prefix + "pw2.", gelu=True)
    return x + y if x.shape[1] == y.shape[1] else y


def reference_tinyunet(x: torch.Tensor, weights: dict[str, torch.Tensor], N: int = 8, depth: int = 4):
    """The reference TinyU-Net forward pass in eval mode, as plain functional PyTorch.

    Args:
        x: ``(B, C, H, W)`` with ``H`` and ``W`` multiples of ``2 ** depth`` (as the reference needs).
        weights: a ``cmrf.TinyUNet`` state dict (this library's key names).
        N: receptive fields per CMRF. depth: encoder stages.

    Returns:
        ``(B, num_classes, H, W)`` logits.
    """
    skips = []
    for i in range(depth):
        x = reference_cmrf(x, weights, f"encoders.{i}.", N)
        skips.append(x)
        x = F.max_pool2d(x, 2, 2)
    for i in reversed(range(depth)):
        x = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
        x = reference_cmrf(torch.cat([x, skips[i]], dim=1), weights, f"decoders.{i}.", N)
    return F.conv2d(x, weights["head.weight"], weights["head.bias"])
