"""Shared test fixtures: golden files from ../shared/golden and a fast hypothesis profile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# cmrf.export_onnx refuses torch older than 2.5 (no dynamo exporter); tests that export skip there.
requires_onnx_exporter = pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5),
    reason=f"ONNX export needs torch >= 2.5, this is {torch.__version__}",
)

# Under NumPy 2.4 and newer, Triton 3.6's CPU interpreter cannot run the fused kernels' persistent
# tile loop (docs/fused.md); Triton 3.8 can, and so can 3.6 under NumPy 2.3. Compiled on a GPU,
# 3.6 runs them whatever NumPy is.
MIN_TRITON_INTERPRETER = (3, 8)
NUMPY_BREAKING_OLD_INTERPRETER = (2, 4)


def _numpy_version() -> tuple[int, int]:
    import numpy

    return tuple(int(part) for part in numpy.__version__.split(".")[:2])


def fused_interpreter_problem() -> str | None:
    """Why the fused kernels cannot run in this process's Triton interpreter, or ``None``."""
    from cmrf.ops.cascade import TRITON_VERSION, interpreter_enabled

    if torch.cuda.is_available() or not interpreter_enabled() or TRITON_VERSION is None:
        return None
    numpy_version = _numpy_version()
    if TRITON_VERSION < MIN_TRITON_INTERPRETER and numpy_version >= NUMPY_BREAKING_OLD_INTERPRETER:
        found, wanted, numpy_found, numpy_wanted = (".".join(map(str, v)) for v in (
            TRITON_VERSION, MIN_TRITON_INTERPRETER, numpy_version, NUMPY_BREAKING_OLD_INTERPRETER))
        return (f"Triton {found}'s CPU interpreter cannot run the fused kernels under NumPy {numpy_found} "
                f"(Triton {wanted}, or NumPy older than {numpy_wanted}, can)")
    return None


def randomise_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (from the global RNG), so
    folding and running statistics are exercised."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return module


def temporary_files(folder: Path) -> list[str]:
    """Names of the files in ``folder`` that look like ``cmrf.files.atomic_path``'s temporary files
    (``.NAME.XXXXXXXX.tmp<suffix>``, e.g. ``.last_state.pt.k1ll3d0x.tmp.pt``)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".") and ".tmp" in p.name)


GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "golden"

# CI runs on 2 cores: keep property tests small and free of deadlines (timings are noisy).
settings.register_profile(
    "ci", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))


# Eager eval outputs agree with the golden ones to about 1e-7 (outputs up to 0.09 for TinyU-Net,
# 0.34 for CMUNeXt); 1e-6 still catches a wrong BatchNorm eps (1e-5 instead of 1e-3 moves
# TinyU-Net's eval output by 4.7e-5), which the specs' "ample" 1e-4 lets through.
GOLDEN_EVAL_ATOL = 1e-6


def golden_path(name: str) -> Path:
    """Path of a golden file; fails under CI when it is missing, skips elsewhere."""
    path = GOLDEN_DIR / name
    if not path.is_file():
        message = f"golden file {path} is missing (it lives in ../shared/golden beside the project)"
        if "CI" in os.environ:  # set, even to "" or "false": a CI run never skips the parity checks
            pytest.fail(message)
        pytest.skip(message)
    return path


def load_golden(name: str) -> dict[str, torch.Tensor]:
    """All tensors of a golden safetensors file."""
    from safetensors.torch import load_file

    return load_file(str(golden_path(name)))


def golden_state_dict(golden: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference model's state dict stored in a golden file (``state_dict.`` stripped)."""
    prefix = "state_dict."
    return {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
