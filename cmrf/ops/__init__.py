"""Operators with a plain PyTorch reference and, where it pays, a fused fast path."""

from cmrf.ops.cascade import cascade_concat, cascade_concat_reference, clear_fused_cache, reference_only

__all__ = ["cascade_concat", "cascade_concat_reference", "clear_fused_cache", "reference_only"]
