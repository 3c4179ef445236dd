"""The data flags shared by ``cmrf train``, ``demo`` and ``evaluate``, and their mapping to
``cmrf.data.build_datasets`` keyword arguments."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cmrf.cli.common import positive_int, user_path
from cmrf.data import CACHE_CHOICES, DATA_CHOICES, DATA_OPTIONS

__all__ = ["add_data_arguments", "data_options"]

# Options holding folders: stored absolute, so a run's metadata works from any working folder.
PATH_OPTIONS = ("root", "split_dir", "cache_dir")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer mask value, got {text!r}") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1, got {value}")
    return value


def absolute_path(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` expanded, made absolute against the current folder and normalised."""
    return Path(os.path.abspath(user_path(os.fspath(path))))


def add_data_arguments(parser: argparse.ArgumentParser, description: str | None = None) -> list[str]:
    """Add the data options (``--data``, ``--root``, ``--img-size``, ...) in a group "data" with
    ``description`` (shown by ``--help``); return their destinations."""
    before = {action.dest for action in parser._actions}
    group = parser.add_argument_group("data", description)
    group.add_argument("--data", choices=DATA_CHOICES, default="synthetic",
                       help="dataset: built-in synthetic lesions (default, no download), an ISIC 2018 "
                            "Task 1 tree, or a folder with images/ and masks/")
    group.add_argument("--root", type=absolute_path, default=None,
                       help="dataset folder (isic2018, folder); stored absolute in the run")
    group.add_argument("--img-size", type=positive_int, default=None,
                       help="side in pixels (voxels in 3D) that every sample is resized to (default 256 "
                            "for images as in the paper, 64 for volumes)")
    group.add_argument("--num-classes", type=positive_int, default=None,
                       help="classes incl. background. Synthetic: 2 (default) or 4. Files: the masks hold "
                            "class indices 0..K-1 (K=2 also accepts 0/255); without it, masks must be "
                            "binary (0/255 or 0/1) or root/classes.txt must name the classes")
    # Any count parses: cmrf evaluate's --in-chans also names a bare state dict's input channels
    # (4 for BraTS-like volumes); build_datasets refuses all but 1 and 3 for images.
    group.add_argument("--in-chans", type=positive_int, default=None, metavar="C",
                       help="channels 2D image files (isic2018, folder) are read with: 3 as RGB "
                            "(default), 1 as grey (CT slices, 16-bit PNGs); the model takes as many")
    group.add_argument("--mask-values", type=_integer, nargs="+", default=None, metavar="V",
                       help="mask files: pixels equal to the i-th value are class i (e.g. 0 128 255: three "
                            "classes); any other value is an error")
    group.add_argument("--mask-threshold", type=positive_int, default=None, metavar="T",
                       help="mask files: two classes, class 1 where the value is >= T (for JPEG or "
                            "anti-aliased masks, e.g. 128)")
    group.add_argument("--val-fraction", type=_fraction, default=0.2,
                       help="share of the samples held out for validation when no official or listed split "
                            "exists (default 0.2)")
    group.add_argument("--test-fraction", type=_fraction, default=0.2,
                       help="share held out for testing, likewise (default 0.2)")
    group.add_argument("--split-dir", type=absolute_path, default=None,
                       help="folder with train.txt, val.txt, test.txt listing sample stems (overrides "
                            "fractions and ISIC's official split)")
    group.add_argument("--synthetic-samples", type=positive_int, default=400,
                       help="synthetic training samples (validation and test get a quarter each, at least 8; "
                            "default 400)")
    group.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2,
                       help="2: images; 3: volumes (synthetic volumes, or NIfTI files with --data folder)")
    group.add_argument("--cache", choices=CACHE_CHOICES, default="memory",
                       help="keep decoded, resized samples so later epochs decode nothing: in shared memory "
                            "(default; falls back to disk if it would not fit), on disk (kept between runs), "
                            "or not at all")
    group.add_argument("--cache-dir", type=absolute_path, default=None,
                       help="folder of --cache disk (default $CMRF_CACHE_DIR, else "
                            "$XDG_CACHE_HOME/cmrf/data, else ~/.cache/cmrf/data)")
    return [action.dest for action in parser._actions if action.dest not in before]


def data_options(args: argparse.Namespace) -> dict:
    """The ``build_datasets`` keyword arguments held by parsed data flags.

    Folders (``root``, ``split_dir``, ``cache_dir``) are returned absolute, so what ``cmrf train``
    stores in its checkpoints finds the data from any working folder.
    """
    options = {name: getattr(args, name) for name in DATA_OPTIONS if hasattr(args, name)}
    for name in PATH_OPTIONS:
        if options.get(name) is not None:
            options[name] = absolute_path(options[name])
    return options
