"""The data flags shared by ``cmrf train``, ``demo`` and ``evaluate``, and their mapping to
``cmrf.data.build_datasets`` keyword arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

from cmrf.data import DATA_CHOICES, DATA_OPTIONS

__all__ = ["add_data_arguments", "data_options"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1, got {value}")
    return value


def add_data_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """Add the data options (``--data``, ``--root``, ``--img-size``, ...); return their destinations."""
    before = {action.dest for action in parser._actions}
    group = parser.add_argument_group("data")
    group.add_argument("--data", choices=DATA_CHOICES, default="synthetic",
                       help="dataset: built-in synthetic lesions (default, no download), an ISIC 2018 "
                            "Task 1 tree, or a folder with images/ and masks/")
    group.add_argument("--root", type=Path, default=None, help="dataset folder (isic2018, folder)")
    group.add_argument("--img-size", type=_positive_int, default=None,
                       help="side in pixels (voxels in 3D) that every sample is resized to (default 256 "
                            "for images as in the paper, 64 for volumes)")
    group.add_argument("--num-classes", type=_positive_int, default=None,
                       help="classes incl. background: synthetic 2 (default) or 4; folder: inferred from "
                            "the masks if not given")
    group.add_argument("--val-fraction", type=_fraction, default=0.2,
                       help="share of the samples held out for validation when no official or listed split "
                            "exists (default 0.2)")
    group.add_argument("--test-fraction", type=_fraction, default=0.2,
                       help="share held out for testing, likewise (default 0.2)")
    group.add_argument("--split-dir", type=Path, default=None,
                       help="folder with train.txt, val.txt, test.txt listing sample stems (overrides "
                            "fractions and ISIC's official split)")
    group.add_argument("--synthetic-samples", type=_positive_int, default=400,
                       help="synthetic training samples (validation and test get a quarter each, at least 8; "
                            "default 400)")
    group.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2,
                       help="2: images; 3: volumes (synthetic volumes, or NIfTI files with --data folder)")
    return [action.dest for action in parser._actions if action.dest not in before]


def data_options(args: argparse.Namespace) -> dict:
    """The ``build_datasets`` keyword arguments held by parsed data flags."""
    return {name: getattr(args, name) for name in DATA_OPTIONS if hasattr(args, name)}


