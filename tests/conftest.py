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

# Triton 3.6's CPU interpreter cannot run the fused kernels' persistent tile loop (docs/fused.md);
# 3.8 can. Compiled on a GPU, 3.6 runs them.
MIN_TRITON_INTERPRETER = (3, 8)


def fused_interpreter_problem() -> str | None:
    """Why the fused kernels cannot run in this process's Triton interpreter, or ``None``."""
    from cmrf.ops.cascade import TRITON_VERSION, interpreter_enabled

    if torch.cuda.is_available() or not interpreter_enabled() or TRITON_VERSION is None:
        return None
    if TRITON_VERSION < MIN_TRITON_INTERPRETER:
        found, wanted = (".".join(map(str, v)) for v in (TRITON_VERSION, MIN_TRITON_INTERPRETER))
        return f"Triton {found}'s CPU interpreter cannot run the fused kernels (tested: {wanted} can)"
    return None


GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "golden"

# CI runs on 2 cores: keep property tests small and free of deadlines (timings are noisy).
settings.register_profile(
    "ci", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def golden_path(name: str) -> Path:
    """Path of a golden file; fails under CI when it is missing, skips elsewhere."""
    path = GOLDEN_DIR / name
    if not path.is_file():
        message = f"golden file {path} is missing (it lives in ../shared/golden beside the project)"
        if os.environ.get("CI"):
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
