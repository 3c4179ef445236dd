"""The issue's speed targets, and whether the figures of this run meet them.

A target is a goal attached to some rows under stated conditions (device, batch, size,
precision). ``apply_targets`` writes the goal into the row's ``target`` and this run's verdict
into ``verdict``: ``met``, ``NOT met`` (with the failing figures), ``unmeasured`` (a figure the
goal needs is missing: a row skipped or failed) or ``n/a`` (the run's conditions are not the
target's). A goal is never shown as a measured figure. Every goal is for the same math: a row
also needs its output within ``SAME_MATH_BOUND`` of the reference's (or the target's own
``max_diff``), so a fast row with a wrong or NaN output never meets a target.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from cmrf.bench.report import Report, Row
from cmrf.bench.settings import BenchSettings

__all__ = ["TARGETS", "Target", "apply_targets"]


@dataclass(frozen=True)
class Target:
    """A goal for the rows matching ``patterns`` (shell-style) when the run matches ``conditions``.

    ``min_vs_eager``/``min_vs_compile``: least speed-up over reference eager / torch.compile(reference).
    ``max_diff``: largest allowed difference from the reference. ``peak_le_reference``: peak memory
    at most the group reference's.
    """

    patterns: tuple[str, ...]
    conditions: dict
    goal: str
    min_vs_eager: float | None = None
    min_vs_compile: float | None = None
    max_diff: float | None = None
    peak_le_reference: bool = False


_CUDA_NET = {"device": "cuda", "batch": 16, "size": 256, "precision": "bf16", "N": 8}
_CUDA_CASCADE = {"device": "cuda", "size": 256, "N": 8}
TARGETS = (
    Target(("inference.optimized", "inference.optimized-frozen", "inference.onnxruntime"),
           {"device": "cpu", "batch": 1, "size": 256, "threads": 2, "N": 8},
           ">= 5x reference eager, max diff <= 1e-4 (CPU, batch 1, 256², 2 threads)",
           min_vs_eager=5.0, max_diff=1e-4),
    Target(("inference.cmrf", "inference.optimized", "inference.optimized-graph"), _CUDA_NET,
           ">= 5x eager and >= 3x compile (batch 16, 256², bf16)", min_vs_eager=5.0, min_vs_compile=3.0),
    Target(("training.cmrf", "training.cmrf-graph", "training.cmrf-compile"), _CUDA_NET,
           ">= 4x eager and >= 4x compile, peak <= reference (batch 16, 256², bf16)",
           min_vs_eager=4.0, min_vs_compile=4.0, peak_le_reference=True),
    Target(("cascade.eval.b128.L?.*.fused",), _CUDA_CASCADE,
           ">= 3x reference (~35 % of the HBM bound)", min_vs_eager=3.0),
    Target(("cascade.train.b16.L?.*.fused", "cascade.train.b128.L?.*.fused"), _CUDA_CASCADE,
           ">= 2x reference", min_vs_eager=2.0),
)


def _condition_mismatch(target: Target, settings: BenchSettings) -> str | None:
    for key, wanted in target.conditions.items():
        value = settings.torch_device.type if key == "device" else getattr(settings, key)
        if value != wanted:
            return f"n/a: this run has {key} {value}, the target {wanted}"
    return None


# Largest difference from the reference that still counts as the same math, where a target names
# none: float rounding through the network or the cascade stays far below these; a broken kernel's
# output is off by O(1) (or NaN). Half precision rounds at about 4e-3 of a value per operation.
SAME_MATH_BOUND = {"fp32": 1e-3, "bf16": 1e-1, "fp16": 1e-1}


def _precision(row: Row, settings: BenchSettings) -> str:
    """The row's precision: cascade rows name their dtype, the others run at the run's precision."""
    return next((part for part in row.name.split(".") if part in SAME_MATH_BOUND), settings.precision)


def _verdict(target: Target, row: Row, reference: Row | None, settings: BenchSettings) -> str:
    if row.status in ("error", "skipped", "check-only"):
        return f"unmeasured ({row.status})"
    failed, missing, passed = [], [], []

    def check(label: str, value, ok: bool | None, shown: str):
        if value is None:
            missing.append(label)
        elif ok:
            passed.append(shown)
        else:
            failed.append(shown)

    if target.min_vs_eager is not None:
        v = row.vs_eager
        check("vs eager", v, v is not None and v >= target.min_vs_eager, f"{v:.2f}x eager" if v else "")
    if target.min_vs_compile is not None:
        v = row.vs_compile
        check("vs compile", v, v is not None and v >= target.min_vs_compile, f"{v:.2f}x compile" if v else "")
    # Every speed goal is for the same math: a row whose output is off (or NaN) meets none.
    bound = target.max_diff if target.max_diff is not None else SAME_MATH_BOUND[_precision(row, settings)]
    v = row.max_diff
    ok = v is not None and v <= bound  # False for NaN
    check("max diff", v, ok, "" if v is None else f"diff {v:.1e}" + ("" if ok else f" > {bound:.0e}"))
    if target.peak_le_reference:
        v, ref = row.peak_mib, reference.peak_mib if reference else None
        both = None if v is None or ref is None else v
        check("peak memory", both, both is not None and v <= ref,
              f"peak {v:.0f} vs {ref:.0f} MiB" if both is not None else "")
    if failed:
        text = "NOT met: " + ", ".join(failed)
        return text + (f" (unmeasured: {', '.join(missing)})" if missing else "")
    if missing:
        return f"unmeasured: {', '.join(missing)}" + (f" ({', '.join(passed)})" if passed else "")
    return "met: " + ", ".join(passed)


def apply_targets(report: Report, settings: BenchSettings) -> None:
    """Set ``target`` and ``verdict`` of every row a target applies to."""
    for row in report.rows:
        for target in TARGETS:
            if not any(fnmatch.fnmatchcase(row.name, p) for p in target.patterns):
                continue
            if target.conditions.get("device", settings.torch_device.type) != settings.torch_device.type:
                continue
            row.target = target.goal
            mismatch = _condition_mismatch(target, settings)
            reference = report.row(row.name.rsplit(".", 1)[0] + ".reference")
            row.verdict = mismatch or _verdict(target, row, reference, settings)
