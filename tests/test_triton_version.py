"""Which Triton counts as available: the fused kernels need ``MIN_TRITON`` or newer; an older one
(torch 2.4's wheels bring Triton 3.0) must mean "use the PyTorch reference", never a crash."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch

from cmrf.ops import cascade


def _pretend_installed(monkeypatch, versions: dict[str, str], module: bool = True) -> None:
    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: (object() if module else None) if name == "triton"
        else real_find_spec(name, *a)
    )


@pytest.mark.parametrize(
    ("versions", "expected"),
    [
        ({"triton": "3.0.0"}, (3, 0)),
        ({"triton": "3.6.0"}, (3, 6)),
        ({"triton": "3.10.1+git4f3a"}, (3, 10)),
        ({"pytorch-triton": "3.7.0+gitabc"}, (3, 7)),
        ({}, cascade.MIN_TRITON),  # a module without known metadata: a source build
    ],
)
def test_installed_version_is_read_from_metadata(monkeypatch, versions, expected):
    _pretend_installed(monkeypatch, versions)
    assert cascade.installed_triton_version() == expected


def test_no_triton_module_is_none(monkeypatch):
    _pretend_installed(monkeypatch, {"triton": "3.6.0"}, module=False)
    assert cascade.installed_triton_version() is None


def test_an_old_triton_is_unavailable_and_forcing_names_both_versions(monkeypatch):
    monkeypatch.setattr(cascade, "TRITON_VERSION", (3, 0))
    monkeypatch.setattr(cascade, "TRITON_AVAILABLE", False)
    assert not cascade.triton_available()
    reason = cascade.triton_missing_reason()
    assert "3.0" in reason and "3.6" in reason
    with pytest.raises(cascade.FusedUnavailableError, match=r"Triton 3\.0 is older than 3\.6"):
        cascade.check_fused_device(torch.zeros(1, 4, 3, 3))


def test_missing_triton_is_named(monkeypatch):
    monkeypatch.setattr(cascade, "TRITON_VERSION", None)
    monkeypatch.setattr(cascade, "TRITON_AVAILABLE", False)
    assert "not installed" in cascade.triton_missing_reason()


def test_available_triton_has_no_reason():
    if cascade.TRITON_AVAILABLE:
        assert cascade.triton_missing_reason() == ""
        assert cascade.TRITON_VERSION >= cascade.MIN_TRITON
    else:
        assert cascade.triton_missing_reason()


def test_interpreter_tests_need_a_recent_triton_or_an_older_numpy(monkeypatch):
    import tests.conftest
    from tests.conftest import fused_interpreter_problem

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(tests.conftest, "_numpy_version", lambda: (2, 4))
    monkeypatch.setattr(cascade, "TRITON_VERSION", (3, 6))
    assert "Triton 3.6's CPU interpreter cannot run the fused kernels under NumPy 2.4" in (
        fused_interpreter_problem())
    monkeypatch.setattr(cascade, "TRITON_VERSION", (3, 8))
    assert fused_interpreter_problem() is None
    monkeypatch.setattr(cascade, "TRITON_VERSION", (3, 6))
    monkeypatch.setattr(tests.conftest, "_numpy_version", lambda: (2, 3))  # checked: 3.6 runs them
    assert fused_interpreter_problem() is None
    monkeypatch.setattr(tests.conftest, "_numpy_version", lambda: (2, 4))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled kernels: 3.6 is fine
    assert fused_interpreter_problem() is None
