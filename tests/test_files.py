"""``cmrf.files``: atomic writes work for every name the target itself may have."""

from __future__ import annotations

import os

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
