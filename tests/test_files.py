"""``cmrf.files``: atomic writes work for every name the target itself may have."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cmrf.files import atomic_write_text


@pytest.mark.parametrize("name", [
    "1.2.840.113619." + "7" * 229 + ".png",  # 248 bytes: a DICOM-UID-like name
    "x" * 251 + ".png",  # 255 bytes: the longest most file systems allow
    "é" * 120 + ".txt",  # 244 bytes in UTF-8: cut on a character boundary
])
def test_names_up_to_the_file_systems_limit_are_written_atomically(tmp_path, name):
    if len(name.encode()) > os.pathconf(tmp_path, "PC_NAME_MAX"):
        pytest.skip("this file system takes shorter names")
    target = tmp_path / name
    atomic_write_text("first", target)
    atomic_write_text("second", target)  # replacing goes through a temporary file too
    assert target.read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind


def test_a_symlink_is_written_through_as_open_would(tmp_path):
    """Replacing the link itself left the file it names with the old contents."""
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "model.txt"
    atomic_write_text("old", target)
    link = tmp_path / "current.txt"
    link.symlink_to(Path("store") / "model.txt")
    atomic_write_text("new", link)
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["model.txt"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask from /proc")
def test_a_new_files_mode_is_found_without_touching_the_umask(tmp_path, monkeypatch):
    """Setting the umask to learn it changes it for every thread meanwhile: a file another thread
    created then was world-writable."""
    umask = os.umask(0o022)
    os.umask(umask)
    monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("os.umask called"))
    atomic_write_text("x", tmp_path / "new.txt")
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_written_in_place_not_replaced(tmp_path):
    """Renaming a file over a FIFO (or a device such as /dev/null) replaced it: its reader got
    nothing and the device was gone."""
    import stat
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    # a daemon: if the FIFO were replaced, the reader would wait for a writer forever
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    atomic_write_text("scores", fifo)
    reader.join(timeout=30)
    assert received == ["scores"] and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_name_that_is_not_utf8_is_written(tmp_path):
    """Linux names are bytes: one that is not UTF-8 (a file from an old Windows share) stopped
    `cmrf predict` with "'utf-8' codec can't encode character", naming no file."""
    target = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/mask\xff.png"))
    atomic_write_text("x", target)
    assert target.read_text() == "x" and len(list(tmp_path.iterdir())) == 1
