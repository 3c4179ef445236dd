"""``cmrf quickstart``: TinyU-Net's costs beside the paper's, and one forward pass."""

from __future__ import annotations

import argparse

from cmrf.cli.common import _int_at_least

__all__ = ["build", "run_quickstart"]


def _side(text: str) -> int:
    """argparse type of ``--size``: TinyU-Net's four poolings need a side of 16 or more."""
    return _int_at_least(text, 16, "an image side >= 16")


def build(parser: argparse.ArgumentParser):
    parser.add_argument("--size", type=_side, default=256, help="image side, >= 16 (default 256)")
    return run_quickstart


def run_quickstart(args: argparse.Namespace) -> int:
    from cmrf.quickstart import quickstart_report

    print(quickstart_report(args.size))
    return 0
