"""``cmrf quickstart``."""

from cmrf.quickstart import build_command as build

__all__ = ["build"]
