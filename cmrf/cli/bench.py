"""``cmrf bench`` and ``cmrf bench-cascade``."""

from cmrf.bench import build_command as build
from cmrf.ops.bench import build_command as build_cascade

__all__ = ["build", "build_cascade"]
