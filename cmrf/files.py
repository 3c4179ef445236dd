"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of either.

Every file the library writes (weights, training state, metrics, plots, ONNX graphs, predicted
masks) goes through ``atomic_write``: the bytes go to a temporary file in the target's own folder
(so the final rename never crosses file systems), are flushed and fsync-ed, and the temporary file
is renamed over the target with ``os.replace`` (atomic on POSIX and Windows). On any error (a full
disk, a read-only folder, an exception in the writer) the temporary file is removed and the
previous target is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "atomic_path",
    "atomic_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
]


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block succeeds.

    For writers that take a file name rather than a file object (``safetensors.save_file``,
    ``torch.onnx.export``, ``matplotlib.savefig``). The file is fsync-ed before the rename.

    Args:
        path: the final file.
        suffix: the temporary file's suffix (default: ``path``'s, so writers that choose a format
            by suffix still see the right one).

    Yields:
        The temporary path (a hidden file in ``path``'s folder).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    tmp_suffix = (path.suffix if suffix is None else suffix) + ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=tmp_suffix, dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_folder(folder)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; it replaces ``path`` when the block succeeds.

    Args:
        path: the final file.
        mode: ``"wb"`` (default) or ``"w"`` (text).
        encoding: text encoding for ``mode="w"`` (default UTF-8).

    Yields:
        The open temporary file.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f
        f.flush()


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_write_json(obj, path: str | Path) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def atomic_save(path: str | Path, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)`` and rename the result over ``path`` atomically; return ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)
