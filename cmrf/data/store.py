"""Where decoded samples are kept: shared memory, memory-mapped files on disk, or nowhere.

See :mod:`cmrf.data.cache` for how sources use a store, and docs/data.md ("Caching").
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import stat
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cmrf.data.base import DataError, DataWarning, shared_zeros

__all__ = [
    "CACHE_CHOICES",
    "Layout",
    "SampleStore",
    "StoreSpec",
    "default_cache_dir",
    "mask_dtype_for",
    "open_store",
    "reuse_disk_store",
]

CACHE_CHOICES = ("memory", "disk", "none")

# Bump when what a store holds changes meaning: old disk caches are then rebuilt, not misread.
CACHE_FORMAT = 5  # 2: images turned by their EXIF orientation; 3: NIfTI pairs checked for one grid;
# 4: palette masks whose palette is black and white only read as 0/255 (not by index);
# 5: lossy WebP and JPEG-in-TIFF masks flagged lossy, GIF masks of grey entries read as grey levels


def default_cache_dir() -> Path:
    """``$CMRF_CACHE_DIR``, else ``$XDG_CACHE_HOME/cmrf/data``, else ``~/.cache/cmrf/data``."""
    if os.environ.get("CMRF_CACHE_DIR"):
        return Path(os.environ["CMRF_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cmrf" / "data"


@dataclass(frozen=True)
class Layout:
    """Shapes and types of a store: ``count`` images ``image_shape`` and masks ``mask_shape``."""

    count: int
    image_shape: tuple[int, ...]
    image_dtype: str
    mask_shape: tuple[int, ...]
    mask_dtype: str

    @property
    def nbytes(self) -> int:
        image = math.prod(self.image_shape) * np.dtype(self.image_dtype).itemsize
        mask = math.prod(self.mask_shape) * np.dtype(self.mask_dtype).itemsize
        return self.count * (image + mask + 2)

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def mask_dtype_for(values: Iterable[int]) -> str:
    """The smallest store type for raw mask values: uint8 for 0..255, else int32."""
    values = list(values)
    low, high = (min(values), max(values)) if values else (0, 0)
    if low >= 0 and high < 256:
        return "uint8"
    if low >= -(2**31) and high < 2**31:
        return "int32"
    raise DataError(f"mask values {low}..{high} do not fit 32-bit integers; expected class values")


def _gib(nbytes: float) -> str:
    """A size in the unit that shows it (a small cache in MiB or KiB, not "0.00 GiB")."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale / 10:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} bytes"


@dataclass(frozen=True)
class StoreSpec:
    """Where a source keeps its samples.

    Attributes:
        cache: "memory", "disk" or "none".
        name: a readable prefix of the disk folder (e.g. "folder-256").
        key: everything the decoded samples depend on (file paths, sizes, times, options): the
            disk folder is named by its hash, so a change of any of them gives a new folder.
        cache_dir: parent of the disk folders (default :func:`default_cache_dir`).
    """

    cache: str = "memory"
    name: str = "data"
    key: tuple = ()
    cache_dir: str | Path | None = None

    def __post_init__(self):
        if self.cache not in CACHE_CHOICES:
            raise DataError(f"--cache {self.cache!r}: expected one of {', '.join(CACHE_CHOICES)}")

    @property
    def folder(self) -> Path:
        digest = hashlib.sha256(json.dumps([CACHE_FORMAT, self.name, self.key], default=str).encode())
        root = default_cache_dir() if self.cache_dir is None else Path(self.cache_dir).expanduser()
        return root / f"{self.name}-{digest.hexdigest()[:20]}"


class SampleStore:
    """Images ``(count, *image_shape)`` and raw masks ``(count, *mask_shape)`` kept once each.

    ``facts`` holds what the data check learned about every sample (JSON-able), or None.
    This base class keeps nothing (``--cache none``).
    """

    kind = "none"

    def __init__(self, layout: Layout):
        self.layout = layout
        self.facts: list | None = None

    def get_image(self, index: int) -> np.ndarray | None:
        return None

    def get_mask(self, index: int) -> np.ndarray | None:
        return None

    def put_image(self, index: int, values: np.ndarray) -> None:
        pass

    def put_mask(self, index: int, values: np.ndarray) -> None:
        pass

    def save_facts(self, facts: list) -> None:
        self.facts = facts


class _ArrayStore(SampleStore):
    """A store over arrays ``images``, ``masks`` and ``filled (2, count)`` (1: that entry is set)."""

    def _views(self, images: np.ndarray, masks: np.ndarray, filled: np.ndarray) -> None:
        self._images, self._masks, self._filled = images, masks, filled

    def get_image(self, index: int) -> np.ndarray | None:
        return np.asarray(self._images[index]) if self._filled[0, index] else None

    def get_mask(self, index: int) -> np.ndarray | None:
        return np.asarray(self._masks[index]) if self._filled[1, index] else None

    # The flag is set after the values, so a reader never sees a half-written entry as filled.
    def put_image(self, index: int, values: np.ndarray) -> None:
        self._images[index] = values
        self._filled[0, index] = 1

    def put_mask(self, index: int, values: np.ndarray) -> None:
        self._masks[index] = values
        self._filled[1, index] = 1


class _MemoryStore(_ArrayStore):
    """Shared-memory tensors: pickled to DataLoader workers as handles to the same memory."""

    kind = "memory"

    def __init__(self, layout: Layout):
        super().__init__(layout)
        self._tensors = (
            shared_zeros((layout.count, *layout.image_shape), _TORCH_TYPES[layout.image_dtype]),
            shared_zeros((layout.count, *layout.mask_shape), _TORCH_TYPES[layout.mask_dtype]),
            shared_zeros((2, layout.count), torch.uint8),
        )
        self._numpy_views()

    def _numpy_views(self) -> None:
        images, masks, filled = (tensor.numpy() for tensor in self._tensors)
        self._views(images.view(self.layout.image_dtype), masks.view(self.layout.mask_dtype), filled)

    def __getstate__(self):
        return {"layout": self.layout, "facts": self.facts, "tensors": self._tensors}

    def __setstate__(self, state):
        self.layout, self.facts, self._tensors = state["layout"], state["facts"], state["tensors"]
        self._numpy_views()


# Same-size torch types (torch.uint16 is too new for every torch this package supports).
_TORCH_TYPES = {"uint8": torch.uint8, "uint16": torch.int16, "int32": torch.int32}


class _DiskStore(_ArrayStore):
    """Memory-mapped ``.npy`` files in ``folder``; workers reopen them by path."""

    kind = "disk"
    FILES = ("images.npy", "masks.npy", "filled.npy")

    def __init__(self, layout: Layout, folder: Path):
        super().__init__(layout)
        self.folder = folder
        self._open()
        facts = folder / "facts.json"
        self.facts = json.loads(facts.read_text()) if facts.is_file() else None

    def _open(self) -> None:
        try:
            self._views(*(_map(self.folder / name, shape, dtype)
                          for name, (shape, dtype) in zip(self.FILES, _file_shapes(self.layout))))
        except (OSError, ValueError) as err:
            raise DataError(
                f"cannot open the data cache {self.folder}: {err}; delete that folder, or give another "
                "--cache-dir, or --cache memory"
            ) from None

    def save_facts(self, facts: list) -> None:
        from cmrf.files import atomic_write_json

        atomic_write_json(facts, self.folder / "facts.json")
        self.facts = facts

    def __getstate__(self):
        return {"layout": self.layout, "folder": self.folder}

    def __setstate__(self, state):
        self.layout, self.folder, self.facts = state["layout"], state["folder"], None
        self._open()


def _file_shapes(layout: Layout) -> tuple:
    """``(shape, dtype)`` of the images, masks and filled flags files of a store of ``layout``."""
    return (((layout.count, *layout.image_shape), layout.image_dtype),
            ((layout.count, *layout.mask_shape), layout.mask_dtype),
            ((2, layout.count), "uint8"))


def _map(path: Path, shape: tuple, dtype: str) -> np.ndarray:
    """``path`` memory-mapped for reading and writing, after checking it holds ``shape`` and
    ``dtype`` in full: numpy's ``r+`` mapping extends a short file with zeros (a cache cut by a
    partial copy would read as black images and background masks, marked filled)."""
    whole = np.load(path, mmap_mode="r")  # "r" refuses a file shorter than its header says
    if whole.shape != shape or whole.dtype != np.dtype(dtype):
        raise ValueError(f"{path.name} holds {whole.dtype} {whole.shape}, expected {dtype} {shape}")
    del whole
    return np.load(path, mmap_mode="r+")


def _info(layout: Layout) -> dict:
    return {"format": CACHE_FORMAT, "layout": layout.to_json()}


def _layout_from(info: dict) -> Layout:
    fields = info["layout"]
    return Layout(
        fields["count"], tuple(fields["image_shape"]), fields["image_dtype"], tuple(fields["mask_shape"]),
        fields["mask_dtype"],
    )


def _check_store_folder(folder: Path) -> None:
    """Refuse an existing store folder that another user owns, and keep our own private: a cache
    holds decoded (patient) images, and files planted in it by someone else would be trained on and
    scored as if they were the data's. No-op where there are no uids.

    A folder of ours that others can write is removed (with a ``DataWarning``), to be made again.

    Raises:
        DataError: the folder is a link or belongs to another user.
    """
    if not hasattr(os, "getuid"):
        return
    try:
        info = folder.lstat()
    except OSError:
        return  # not there yet: it is made private when created
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
        what = "is a link" if stat.S_ISLNK(info.st_mode) else f"belongs to user id {info.st_uid}"
        raise DataError(
            f"the data cache {folder} {what}, so its contents cannot be trusted; remove it, or give "
            "--cache-dir a folder of your own, or --cache memory"
        )
    if info.st_mode & 0o022:  # ours, but others could have put files in it: made afresh
        mode = stat.S_IMODE(info.st_mode)
        warnings.warn(f"the data cache {folder} was writable by other users (mode {mode:o}; older versions "
                      f"made caches with the umask's permissions), so its contents cannot be trusted: it is "
                      f"made afresh", DataWarning, stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
        return
    if info.st_mode & 0o077:  # made by an older version with the umask's permissions
        with contextlib.suppress(OSError):
            os.chmod(folder, 0o700)


@contextlib.contextmanager
def _store_lock(folder: Path):
    """Hold an exclusive lock for ``folder`` (a file beside it) while a process checks, removes,
    creates or opens it: torchrun ranks and runs sharing a ``--cache-dir`` start together, and one
    that removed a folder another had just made and opened left that one writing pixels into deleted
    files while marking them filled in the new folder (black images read back as data). Where
    ``fcntl`` is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(folder.with_name(f".{folder.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise DataError(f"cannot create the data cache folder {folder.parent}: {err}; give another "
                        "--cache-dir, or --cache memory") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:  # Lustre without -o flock (ENOSYS), NFS without lockd (ENOLCK)
            raise DataError(f"cannot lock the data cache folder {folder.parent} ({err.strerror or err}: its "
                            "file system has no file locks); give a --cache-dir on a local disk, or "
                            "--cache memory") from None
        yield
    finally:
        os.close(handle)  # releases the lock


def reuse_disk_store(spec: StoreSpec) -> SampleStore | None:
    """The existing disk store of ``spec`` if it is complete (its data check saved), else None.

    Raises:
        DataError: the store's folder belongs to another user (see ``open_store``).
    """
    if spec.cache != "disk":
        return None
    folder = spec.folder
    if not folder.parent.is_dir():  # nothing to reuse (and no lock file to make)
        return None
    with _store_lock(folder):
        _check_store_folder(folder)
        try:
            info = json.loads((folder / "info.json").read_text())
            if info.get("format") != CACHE_FORMAT or not (folder / "facts.json").is_file():
                return None
            return _DiskStore(_layout_from(info), folder)
        except (OSError, ValueError, KeyError, TypeError, DataError):
            return None


def _reserve(path: Path) -> None:
    """Allocate a file's blocks now: writing into a sparse memory-mapped file on a full disk would
    kill the process (SIGBUS) instead of raising an error."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "rb+") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise
            # Some file systems cannot reserve blocks (EOPNOTSUPP): the free-space check must do.


def _create_disk_store(folder: Path, layout: Layout) -> None:
    """Create the store's files in a temporary folder renamed into place (under ``_store_lock``)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder.parent).free
    except OSError as err:
        raise DataError(f"cannot create the data cache folder {folder.parent}: {err}; give another "
                        "--cache-dir, or --cache memory") from None
    if layout.nbytes > free:
        raise DataError(
            f"the disk cache needs {_gib(layout.nbytes)} in {folder.parent} but only {_gib(free)} are free; "
            "give --cache-dir on a larger disk, or --cache none"
        )
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.mkdir(mode=0o700)  # only this user reads the decoded images
        for name, (shape, dtype) in zip(_DiskStore.FILES, _file_shapes(layout)):
            array = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=dtype, shape=shape)
            del array
            # Reserve the blocks now: writing into a sparse file on a full disk would kill the process.
            _reserve(tmp / name)
        (tmp / "info.json").write_text(json.dumps(_info(layout)))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)  # incomplete or of another format
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():
                raise
    except OSError as err:
        raise DataError(f"cannot create the data cache {folder}: {err}; give another --cache-dir") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _memory_room() -> int | None:
    """Bytes of shared memory the cache may take: half the free ``/dev/shm`` (DataLoader workers
    pass every batch through it too, and a worker that finds it full fails), half the available
    memory."""
    room = []
    if os.path.isdir("/dev/shm"):
        stats = os.statvfs("/dev/shm")
        room.append(stats.f_bavail * stats.f_frsize // 2)
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    room.append(int(line.split()[1]) * 1024 // 2)
    except OSError:
        pass
    return min(room) if room else None


def open_store(spec: StoreSpec, layout: Layout) -> SampleStore:
    """A new (or, on disk, existing) store for ``layout``, as ``spec.cache`` asks.

    Raises:
        DataError: a disk cache that cannot be created (no space, read-only folder), or an existing
            one that is a link or belongs to another user (its files could have been planted; one
            of ours that others can write is made afresh). New disk caches are folders only their
            user can read.
    """
    if spec.cache == "none":
        return SampleStore(layout)
    if spec.cache == "memory":
        room = _memory_room()
        if room is None or layout.nbytes <= room:
            return _MemoryStore(layout)
        warnings.warn(
            f"the data cache needs {_gib(layout.nbytes)} but only {_gib(room)} of shared memory can be "
            f"taken; caching on disk in {spec.folder} instead (--cache disk; --cache none to not cache)",
            DataWarning, stacklevel=3,
        )
    folder = spec.folder
    with _store_lock(folder):  # one process makes the folder; the others open it
        _check_store_folder(folder)
        try:
            info = json.loads((folder / "info.json").read_text())
            if info == _info(layout):
                return _DiskStore(layout, folder)
        except (OSError, ValueError):  # DataError too: a damaged store (a cut file) is made afresh
            pass
        _create_disk_store(folder, layout)
        return _DiskStore(layout, folder)
