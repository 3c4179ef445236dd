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
            by suffix, such as Pillow and matplotlib, still see the right one).

    Yields:
        The temporary path: a hidden file in ``path``'s folder, ``.NAME.XXXXXXXX.tmp{suffix}``.
    """
    path = Path(path)
    if path.is_symlink():
        # Write through the link, as open() would: replacing the link itself would leave the file
        # it names with the old contents.
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file() and not path.is_dir():
        # A device (/dev/null), FIFO or socket: written in place, as open() would; renaming a file
        # over it would replace it (and /dev/null with it, for root).
        yield path
        return
    folder = path.parent if str(path.parent) else Path(".")
    # ".tmp" goes before the suffix: "x.png.tmp" would make Pillow refuse an unknown format.
    tmp_suffix = ".tmp" + (path.suffix if suffix is None else suffix)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{_fitting_stem(path.name, tmp_suffix, folder)}.",
                                        suffix=tmp_suffix, dir=folder)
    except OSError as err:  # missing or read-only folder, full disk: name the file the user asked for
        raise _naming(err, path) from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600), and some writers (safetensors) recreate it as such:
        # set the mode a plain open() would have, once the writer is done.
        os.chmod(tmp, _new_file_mode(path))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and (err.filename is None or str(err.filename) == str(tmp)):
            raise _naming(err, path) from err
        raise
    _fsync_folder(folder)


_RANDOM_PART = 8  # the characters tempfile.mkstemp puts between prefix and suffix


def _fitting_stem(name: str, tmp_suffix: str, folder: Path) -> str:
    """``name``, cut short where the temporary name (``.NAME.XXXXXXXX.tmp.SUFFIX``, 18 bytes more)
    would pass the file system's name limit: any name the target itself may have can be written."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such folder yet (mkstemp says so), Windows
        limit = 255
    room = limit - len(os.fsencode(tmp_suffix)) - _RANDOM_PART - 2  # the two dots
    # The file system's bytes: a name that is not valid UTF-8 (its bytes kept as surrogates) too.
    encoded = os.fsencode(name)
    if len(encoded) <= room:
        return name
    return encoded[:max(room, 1)].decode(errors="ignore")  # cut on a character boundary


def _new_file_mode(path: Path) -> int:
    """The permission bits ``path`` gets: those of the file it replaces, else 0666 minus the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read where the system shows it (Linux): setting it to learn it, the
    only portable way, changes it for every other thread meanwhile (files they create then would
    be world-writable)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` naming ``path``: ``write()`` errors (ENOSPC) carry no file name, and the temporary
    file's name means nothing to the user."""
    return OSError(err.errno, err.strerror or str(err), str(path))


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
