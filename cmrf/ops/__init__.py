"""Operators with a plain PyTorch reference and, where it pays, a fused fast path."""

from cmrf.ops.cascade import (
    cascade_concat,
    cascade_concat_reference,
    clear_fused_cache,
    fused_mode,
    reference_only,
)
from cmrf.ops.upsample import env_method, upsample_to

__all__ = [
    "cascade_concat",
    "cascade_concat_reference",
    "check_environment",
    "clear_fused_cache",
    "reference_only",
    "upsample_to",
]


def check_environment() -> None:
    """Check the environment variables the operators read (``CMRF_FUSED``, ``CMRF_UPSAMPLE``) now,
    rather than at their first use, which some commands never reach.

    Raises:
        ValueError: naming the variable, its value and the accepted ones.
    """
    fused_mode()
    env_method()
