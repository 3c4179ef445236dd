"""``cmrf quickstart``: TinyU-Net's costs beside the paper's, and one forward pass."""

from __future__ import annotations

import argparse

from cmrf.cli.model_args import positive_int

__all__ = ["build", "run_quickstart"]


def build(parser: argparse.ArgumentParser):
    parser.add_argument("--size", type=positive_int, default=256, help="image side (default 256)")
    return run_quickstart


def run_quickstart(args: argparse.Namespace) -> int:
    from cmrf.quickstart import quickstart_report

    print(quickstart_report(args.size))
    return 0
