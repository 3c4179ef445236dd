"""Operators with a plain PyTorch reference and, where it pays, a fused fast path."""

from cmrf.ops.cascade import cascade_concat, cascade_concat_reference, reference_only
from cmrf.ops.upsample import upsample_to as upsample_to  # re-exported

__all__ = ["cascade_concat", "cascade_concat_reference", "reference_only"]
