"""``cmrf profile``."""

from cmrf.profile import build_command as build

__all__ = ["build"]
