"""Command-line options shared by several commands (``--model``, ``--device``, ``--threads``...)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cmrf.constants import MAX_SEED, THREADS_PER_CORE_LIMIT, thread_limit, worker_limit_problem


def _int_at_least(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def check_output_file(path: str | Path, flag: str, reads: dict[str, str | Path | None] | None = None) -> None:
    """Refuse, before any work, an output file that the end of a command could not write or that
    would overwrite one of its inputs.

    Args:
        path: the file the command writes.
        flag: its option, for the messages (``"--json"``, ``"-o"``).
        reads: ``{option: path}`` of the files the command reads (``None`` entries are skipped).

    Raises:
        ValueError: ``path`` is one of ``reads``.
        OSError: its folder is missing or read-only, or ``path`` is (or names, ending with a
            separator) a folder.
    """
    if str(path).endswith(("/", os.sep)):  # Path() drops it, and would write a file by that name
        raise IsADirectoryError(errno.EISDIR, f"names a folder (it ends with {str(path)[-1]}), {flag} needs "
                                              f"a file name", str(path))
    if os.path.abspath(path).startswith(("/dev/", "/proc/")):
        # /dev/stdout resolves to the file a shell redirected to: replacing it (the atomic write)
        # would put the JSON where the table was, and the table on a deleted inode.
        raise ValueError(f"{flag} {path} is a stream or device, and the command writes its file by "
                         f"replacing it; give a file name")
    path = Path(path)
    for option, source in (reads or {}).items():
        if source is not None and Path(source).exists() and path.exists() and path.samefile(source):
            raise ValueError(f"{flag} {path} is the {option} this command reads; write to another file")
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"no such folder for {flag}", str(folder))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"is a folder, {flag} needs a file name", str(path))
    if path.exists() and not path.is_file():  # reading it (to protect it) or replacing it would not do
        raise ValueError(f"{flag} {path} is not a regular file (a pipe, a device or a socket): the command "
                         f"writes its file by replacing it; give a file name")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"cannot write into this folder ({flag})", str(folder))


@contextlib.contextmanager
def folders_made_for(folder: Path | None, flag: str):
    """Make ``folder`` and its missing parents; if the body fails, remove those made (while empty):
    a refused command (a bad flag, an input the model does not take) leaves no empty folders.
    ``None``: nothing to make. ``flag`` names the output option in the messages."""
    if folder is None:
        yield
        return
    missing = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    lowest = missing[-1].parent if missing else folder  # the deepest folder that exists, if a folder
    if lowest.exists() and not lowest.is_dir():  # mkdir's own word for it, "File exists", says nothing
        raise NotADirectoryError(errno.ENOTDIR, f"is not a folder: {flag} needs a folder there", str(lowest))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for path in missing:
            try:
                path.rmdir()
            except OSError:  # no longer empty: something else writes there now
                break
        raise


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return False


def check_replaces_only(path: str | Path, flag: str, suffix: str, what: str,
                        is_kind: Callable[[Path], bool] | None = None) -> None:
    """Refuse to replace an existing file that is neither named ``suffix`` nor of that kind: an
    output option naming the run's ``last.safetensors`` by a slip would lose it. A new file named
    otherwise is written, with a note on stderr.

    Args:
        path: the output file. flag: its option, for the messages. suffix: its usual suffix
            (``".json"``). what: what the command writes, in words (``"JSON"``).
        is_kind: whether an existing file holds that kind of content; default: parses as JSON.

    Raises:
        ValueError: ``path`` is an existing file of another kind.
    """
    path = Path(path)
    if path.suffix.lower() == suffix:
        return
    # An empty file holds nothing to lose (a script's mktemp).
    if path.is_file() and path.stat().st_size > 0 and not (is_kind or _is_json)(path):
        raise ValueError(f"{flag} {path} is an existing file that is not {what} (a checkpoint, weights?): it "
                         f"would be replaced; write to a file whose name ends in {suffix}")
    if not path.exists():
        print(f"note: {flag} {path} does not end in {suffix}; the file is {what}", file=sys.stderr)


# What the training and evaluation commands import from the ``train`` extra (Pillow, in it too, is
# a dependency of torchvision, which timm needs, so it is always there).
TRAIN_PACKAGES = ("torchmetrics", "monai", "tqdm")
EVALUATE_PACKAGES = ("torchmetrics", "tqdm")


def require_extra(packages: tuple[str, ...], what: str, extra: str) -> None:
    """Refuse a command whose optional packages are not installed with a ``ValueError`` (exit status 2,
    the user's to fix), naming them and the extra that installs them; an ``ImportError`` would be
    reported as an internal error (exit status 70, "please report it")."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ValueError(
            f"{what} needs {' and '.join(missing)}, which {verb} not installed: pip install 'cmrf[{extra}]'"
        )


def user_path(text: str) -> str:
    """argparse type of file and folder options: ``~`` and ``~user`` expanded, as the shell does
    for a word of its own but not after ``=`` (``--json=~/scores.json``). An empty word is refused:
    it is what an unset shell variable gives (``--json "$OUT"``), and read as a path it would be
    the current folder, or, tested for truth, no option at all."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"expected a file or folder name, got {text!r} (an unset shell variable?)")
    return os.path.expanduser(text)


def thread_count(text: str) -> int:
    """argparse type of ``--threads``: an integer from -1 (0 and -1 have meanings of their own) to
    ``cmrf.constants.thread_limit()``."""
    expected = "an integer >= 1, 0 (PyTorch's default) or -1 (the idle cores)"
    value = _int_at_least(text, -1, expected)
    if value > thread_limit():
        raise argparse.ArgumentTypeError(
            f"expected at most {thread_limit()} threads ({THREADS_PER_CORE_LIMIT} per core of the "
            f"{os.cpu_count()} this machine has), got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def positive_number(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model --N --channels --replace-blocks``: which network to train."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default="tinyunet", help="registry name (default tinyunet; tinyunet3d for 3D data)"
    )
    group.add_argument(
        "--N", dest="N", type=positive_int, default=None,
        help="receptive fields per CMRF (default: the model's)",
    )
    group.add_argument(
        "--channels",
        type=positive_int,
        nargs="+",
        default=None,
        metavar="C",
        help="encoder widths, each a multiple of 2N (16 for the default N=8), e.g. 16 32 for a tiny "
        "TinyU-Net (default: the model's)",
    )
    group.add_argument(
        "--replace-blocks",
        action="store_true",
        help="swap the model's blocks for CMRF with cmrf.replace_blocks (N from --N, default 8)",
    )


def seed_value(text: str) -> int:
    """``--seed``: an integer from 0 to ``MAX_SEED``."""
    value = _int_at_least(text, 0, f"an integer from 0 to 2**63 - 1 ({MAX_SEED})")
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63 - 1 ({MAX_SEED}), got {value}")
    return value


def workers_value(text: str) -> int | str:
    """``--workers``: ``auto`` or an integer from 0 to ``cmrf.constants.thread_limit()``."""
    if text == "auto":
        return text
    value = _int_at_least(text, 0, "auto or an integer >= 0")
    problem = worker_limit_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def add_runtime_arguments(parser: argparse.ArgumentParser, seed_default: int | None = 0) -> None:
    """``--device --workers --threads --seed``."""
    parser.add_argument(
        "--threads",
        type=thread_count,
        default=0,
        help="CPU threads of PyTorch (default 0: PyTorch's default; -1: only the cores not busy already)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (default: CUDA if available), cpu, cuda, cuda:N"
    )
    parser.add_argument(
        "--workers",
        type=workers_value,
        default="auto",
        help="DataLoader worker processes (default auto: 0 on the CPU, where the model's threads use "
        "every core; on CUDA the cores this process may use, less one, at most 8). Results do not "
        "depend on it",
    )
    parser.add_argument(
        "--seed",
        type=seed_value,
        default=seed_default,
        help="seed of data, initialisation, shuffling, augmentation"
        + (f" (default {seed_default})" if seed_default is not None else " (default: the run's)"),
    )
