"""Operators with a plain PyTorch reference and, where it pays, a fused fast path."""

from cmrf.ops.cascade import cascade_concat, cascade_concat_reference, clear_fused_cache, reference_only
from cmrf.ops.upsample import upsample_to

__all__ = ["cascade_concat", "cascade_concat_reference", "clear_fused_cache", "reference_only", "upsample_to"]
