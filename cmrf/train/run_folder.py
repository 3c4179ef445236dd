"""A run folder: the files a training run writes, and the rule that protects another run's files.

Training into a folder that already holds a run's files is refused unless the caller says what to
do with that run: continue it (``resume``) or replace it (``overwrite``, which deletes the run's
files, and only those, first). So a second run never mixes its files with, or silently replaces,
those of the first.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "last_state.pt"


@dataclass(frozen=True)
class RunFiles:
    """The files a run writes in its folder ``out``."""

    out: Path

    @property
    def state(self) -> Path:
        return self.out / STATE_FILE

    @property
    def last(self) -> Path:
        return self.out / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.out / "best.safetensors"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.json"

    @property
    def curve(self) -> Path:
        return self.out / "training_curve.png"

    @property
    def overlays(self) -> Path:
        return self.out / "overlays.png"

    def all(self) -> list[Path]:
        """Every file of a run, in the order they are first written."""
        return [self.best, self.last, self.state, self.curve, self.metrics, self.overlays]

    def existing(self) -> list[Path]:
        """The files of a run that are already in the folder (a run, or part of one, is there)."""
        return [path for path in self.all() if path.is_file()]

    def remove(self) -> list[Path]:
        """Delete the files of a run (and temporary files a killed writer left); return them.

        Only the names a run writes are touched: other files in the folder stay.
        """
        removed = self.existing()
        for path in removed:
            path.unlink()
        self.remove_temporaries()
        return removed

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files a writer killed mid-write left (a run's files are written to
        a temporary file renamed into place); return them."""
        # cmrf.files names its temporary files ".NAME.<random>.tmp<suffix>"
        found = [tmp for path in self.all() for tmp in self.out.glob(f".{path.name}.*.tmp*")]
        for tmp in found:
            tmp.unlink(missing_ok=True)
        return found


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (it holds another run, or nothing to resume)."""


def check_run_folder(out: str | Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse to train into ``out`` when it holds another run and neither flag says what to do.

    Args:
        out: the run folder.
        resume: the run in ``out`` is to be continued.
        overwrite: the run in ``out`` is to be replaced (its files are deleted first).

    Raises:
        RunFolderError: both flags are set, ``out`` holds a run's files and neither is, or
            ``resume`` is set and ``out`` holds a run's files but not its training state (except
            the weights of a first epoch killed before its state was saved: a new run starts).
    """
    if resume and overwrite:
        raise RunFolderError("--resume (resume=True) continues the run in --out and --overwrite "
                             "(overwrite=True) deletes it: choose one")
    _check_writable(Path(out))
    _check_names_free(RunFiles(Path(out)))
    if overwrite:
        return
    files = RunFiles(Path(out))
    found = files.existing()
    if resume:
        # Nothing at all: a new run (a script may pass --resume every time). A run's files without
        # its state: continuing is impossible, and starting afresh would overwrite them. (Weights
        # of epoch 1 were once let through, as what a kill under 0.1.0's save order could leave;
        # but so is the best.safetensors a user kept of a finished run whose best epoch was 1, and
        # the state is now written first, so no kill leaves weights without it.)
        if found and not files.state.is_file():
            names = ", ".join(path.name for path in found)
            raise RunFolderError(
                f"--resume: {out} holds a run's files ({names}) but no {files.state.name} to continue "
                f"from; pass --overwrite (overwrite=True) to replace that run, or choose another --out"
            )
        return
    if found:
        names = ", ".join(path.name for path in found)
        raise RunFolderError(
            f"{out} already holds a run ({names}); pass --resume to continue it, --overwrite to "
            f"replace it (resume=True, overwrite=True in fit), or choose another --out"
        )


def _check_names_free(files: RunFiles) -> None:
    """Refuse a folder where a name the run writes is taken by something that is not a file (a
    folder named ``best.safetensors``): the first save would fail after an epoch of training, and
    ``--overwrite`` does not delete it."""
    dangling = [f"{path.name} -> {os.readlink(path)}" for path in files.all()
                if path.is_symlink() and not path.exists()]
    if dangling:  # written through, the link would create its target, wherever that is
        raise RunFolderError(
            f"--out {files.out}: {', '.join(dangling)}: a link to a missing file, where the run writes a "
            f"file by that name, which would create the link's target; remove the link, or choose another "
            f"--out"
        )
    taken = [path.name for path in files.all() if path.exists() and not path.is_file()]
    if taken:
        raise RunFolderError(
            f"--out {files.out}: {', '.join(taken)} {'is' if len(taken) == 1 else 'are'} not a file, but the "
            f"run writes a file by that name: move it away, or choose another --out"
        )


def _check_writable(out: Path) -> None:
    """Refuse an ``out`` (or, while it does not exist, the folder it would be made in) that cannot
    be written: otherwise a whole epoch trains before the first save fails."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: making the folder would fail with "File exists"
            raise RunFolderError(f"--out {out}: {existing} is a link to {os.readlink(existing)}, which does "
                                 f"not exist; create that folder, or choose another --out")
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise RunFolderError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {out}: {existing} is not writable (read-only folder or file system?)")


@contextlib.contextmanager
def run_folder_lock(out: str | Path) -> Iterator[None]:
    """Hold the run folder ``out`` for one training (created if missing) while the block runs.

    Two trainings started into one folder at the same time both found it empty and both wrote
    there, leaving one run's best weights beside the other's history. The lock (``flock`` on the
    folder itself: no file is added, and the kernel releases it when the process ends, however it
    ends) refuses the second. A distributed run has its main process take it (``cmrf.train.fit``);
    where ``fcntl`` is missing (Windows) nothing is locked.

    Raises:
        RunFolderError: another process holds the folder.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    out = Path(out)
    _check_writable(out)  # a file in the way, a read-only parent: said plainly, before mkdir fails
    created = not out.exists()
    with naming_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        folder = os.open(out, os.O_RDONLY)
    try:
        try:
            with naming_errors(out):  # a file system without locks (ENOLCK) names the folder
                fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(
                f"{out} is in use by another training; wait for it to end, or choose another --out"
            ) from None
        yield
    finally:
        # Unlocked for every copy of the descriptor: DataLoader workers forked inside the block
        # hold one, and may outlive it (kept alive by a traceback the caller holds on to).
        with contextlib.suppress(OSError):
            fcntl.flock(folder, fcntl.LOCK_UN)
        os.close(folder)
        if created:  # a run that failed before writing anything (a corrupt image in epoch 1) leaves no folder
            with contextlib.suppress(OSError):
                out.rmdir()  # only if still empty


@contextlib.contextmanager
def naming_errors(path: str | Path) -> Iterator[None]:
    """Re-raise an ``OSError`` of the block with ``path`` as its file name.

    Writers report a full disk as ``OSError(ENOSPC)`` without a file name, or with the name of
    the temporary file; the user needs to know which file of the run could not be written.
    """
    try:
        yield
    except OSError as err:
        if err.filename is not None and Path(err.filename) == Path(path):
            raise
        cause = err.strerror or str(err) or type(err).__name__
        raise OSError(err.errno, cause, str(path)) from err
