"""``cmrf export``."""

from cmrf.export import build_command as build

__all__ = ["build"]
