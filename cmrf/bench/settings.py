"""What one ``cmrf bench`` run measures: its settings, their per-device defaults, the row names.

Row names are dotted: ``inference.<variant>``, ``training.<variant>`` and
``cascade.<mode>.b<batch>.L<level>.<dtype>.<reference|fused>``. A selector picks every row whose name is
the selector or starts with it followed by a dot (``inference``, ``training.cmrf``,
``cascade.eval``). The reference row of a group is always run with it: every ratio needs it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch

from cmrf.constants import THREADS_PER_CORE_LIMIT, thread_limit
from cmrf.layers import check_positive_int

__all__ = [
    "CASCADE_WIDTHS",
    "GROUPS",
    "INFERENCE_VARIANTS",
    "PRECISIONS",
    "TRAINING_VARIANTS",
    "cascade_cases",
    "BenchSettings",
    "resolve_settings",
    "row_names",
    "selected",
    "validate_settings",
]

GROUPS = ("inference", "training", "cascade")
# variant -> label, in table order (what each runs: docs/benchmarks.md)
INFERENCE_VARIANTS = {
    "reference": "reference eager",
    "compile": "torch.compile(reference)",
    "cmrf": "cmrf default",
    "optimized": "optimize_for_inference",
    "optimized-frozen": "optimize_for_inference(freeze=True)",
    "optimized-graph": "optimize_for_inference + CUDA graph",
    "onnxruntime": "optimize_for_inference(backend='onnxruntime')",
}
TRAINING_VARIANTS = {
    "reference": "reference eager",
    "compile": "torch.compile(reference)",
    "cmrf": "cmrf default",
    "cmrf-graph": "cmrf, step in a CUDA graph",
    "cmrf-compile": "cmrf + torch.compile",
}
COMPILED_VARIANTS = ("compile", "cmrf-compile")
CUDA_ONLY = ("inference.optimized-graph", "training.cmrf-graph")
CPU_ONLY = ("inference.optimized-frozen", "inference.onnxruntime")
# TinyU-Net's CMRF widths; its cascade sees (B, width / N, side, side) at side = size / 2**level.
CASCADE_WIDTHS = (64, 128, 256, 512)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BenchSettings:
    """One run's settings (build them with ``resolve_settings``, which fills the device defaults).

    Attributes:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        batch: images per inference call and per training step (CPU 1, CUDA 16).
        size: image side, a multiple of 16 (the reference needs it). Default 256.
        precision: ``fp32``, or ``bf16``/``fp16`` autocast (CUDA only). CPU fp32, CUDA bf16.
        threads: CPU threads for PyTorch and ONNX Runtime (CPU default 2; ``None`` leaves them).
        repeats, warmup: timed and untimed calls per inference and cascade row (10 and 3; 2 on CPU).
        train_repeats, train_warmup: the same for training rows (CUDA 10 and 3, CPU 3 and 1).
        rows: selectors (module docstring). Default all groups.
        compile: run the ``torch.compile`` rows (CUDA default on; CPU default off: compiling
            TinyU-Net takes minutes on a small CPU).
        deadline_s: start no new row after this many seconds (CUDA 210, CPU 900); ``None``: none.
        compile_estimate_s: how long one compile is assumed to take when deciding whether it
            still fits before the deadline (CUDA 60, CPU 400); updated by the first compile.
        cascade_eval_batch, cascade_train_batches: batches of the cascade rows (CUDA 128 and
            (16, 128); CPU 1 and (1,)).
        cascade_dtypes: dtypes of the cascade rows. Default ``("fp32",)``.
        cascade_sweep: also time every candidate tiling of the fused kernels (one extra row per
            ``cmrf.ops.fused_cascade.eval_configs``/``train_configs`` entry). Default off.
        tiny_cascade: an eighth of TinyU-Net's widths at sides 16, 8, 4, 2, for the Triton
            interpreter (always on CPU, where cascade rows check correctness only).
        N: receptive fields per CMRF. Default 8.
        memory: CPU only: peak RSS of each row's first call, in a fresh process (slow: off).
        leak_calls: CPU only: RSS before/after this many calls of the deployable rows (0: off).
        peak_gbs: the HBM bandwidth (GB/s) for the "% of bound" column; default from the device.
    """

    device: str = "cpu"
    batch: int = 1
    size: int = 256
    precision: str = "fp32"
    threads: int | None = 2
    repeats: int = 10
    warmup: int = 2
    train_repeats: int = 3
    train_warmup: int = 1
    rows: tuple[str, ...] = GROUPS
    compile: bool = False
    deadline_s: float | None = 900.0
    compile_estimate_s: float = 400.0
    cascade_eval_batch: int = 1
    cascade_train_batches: tuple[int, ...] = (1,)
    cascade_dtypes: tuple[str, ...] = ("fp32",)
    cascade_sweep: bool = False
    tiny_cascade: bool = True
    N: int = 8
    memory: bool = False
    leak_calls: int = 0
    peak_gbs: float | None = None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def on_cuda(self) -> bool:
        return self.torch_device.type == "cuda"


_CUDA_DEFAULTS = dict(
    batch=16, precision="bf16", threads=None, repeats=10, warmup=3, train_repeats=10, train_warmup=3,
    compile=True, deadline_s=210.0, compile_estimate_s=60.0, cascade_eval_batch=128,
    cascade_train_batches=(16, 128), tiny_cascade=False,
)
_CPU_DEFAULTS = dict(
    batch=1, precision="fp32", threads=2, repeats=10, warmup=2, train_repeats=3, train_warmup=1,
    compile=False, deadline_s=900.0, compile_estimate_s=400.0, cascade_eval_batch=1,
    cascade_train_batches=(1,), tiny_cascade=True,
)


def _check_device(device: str | None) -> str:
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str) or not (device == "cpu" or device.split(":")[0] == "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if parsed.type == "cuda":
        from cmrf.train.processes import resolve_device

        resolve_device(device)  # CUDA there, and the index within the machine's count (as cmrf train)
    return device


def row_names(settings: BenchSettings) -> list[str]:
    """Every row name this device can run (before selection)."""
    names = [f"inference.{v}" for v in INFERENCE_VARIANTS] + [f"training.{v}" for v in TRAINING_VARIANTS]
    names = [n for n in names if n not in (CPU_ONLY if settings.on_cuda else CUDA_ONLY)]
    for mode, batch in cascade_cases(settings):
        for dtype in settings.cascade_dtypes:
            for level in range(len(CASCADE_WIDTHS)):
                prefix = f"cascade.{mode}.b{batch}.L{level}.{dtype}"
                names += [f"{prefix}.{side}" for side in ("reference", "fused")]
    return names


def cascade_cases(settings: BenchSettings) -> list[tuple[str, int]]:
    """``(mode, batch)`` of the cascade rows: eval at one batch, train at each training batch."""
    return [("eval", settings.cascade_eval_batch)] + [("train", b) for b in settings.cascade_train_batches]


def _matches(name: str, selector: str) -> bool:
    return name == selector or name.startswith(selector + ".")


def selected(settings: BenchSettings, name: str) -> bool:
    """Whether row ``name`` runs: picked by a selector, or the reference of a group with a picked row.

    ``torch.compile`` rows run only when ``settings.compile`` is on.
    """
    if _compiled(name) and not settings.compile:
        return False
    if _picked(settings, name):
        return True
    head, _, variant = name.rpartition(".")
    return variant == "reference" and any(
        other.rpartition(".")[0] == head and _picked(settings, other) for other in row_names(settings)
    )


def _picked(settings: BenchSettings, name: str) -> bool:
    return (settings.compile or not _compiled(name)) and any(_matches(name, s) for s in settings.rows)


def _compiled(name: str) -> bool:
    return name.rpartition(".")[2] in COMPILED_VARIANTS


def _check_selectors(settings: BenchSettings) -> None:
    names = row_names(settings)
    for selector in settings.rows:
        if not isinstance(selector, str) or not any(_matches(n, selector) for n in names):
            case = next((n for n in names if n.endswith(".fused") and selector.startswith(n + ".")), None)
            if case is not None:  # a --sweep tiling's row: --sweep times every tiling of a case
                raise ValueError(
                    f"row selector {selector!r} names one --sweep tiling; --rows selects cases: use "
                    f"--rows {case} --sweep, which times every tiling of that case"
                )
            groups = ", ".join(GROUPS)
            raise ValueError(
                f"row selector {selector!r} matches no row on {settings.device}; use a group ({groups}) "
                f"or a row name such as inference.optimized, training.cmrf, cascade.eval"
            )
    if not any(selected(settings, n) for n in names):
        raise ValueError(
            f"rows {list(settings.rows)} select only torch.compile rows, which are off (compile=False)"
        )


def resolve_settings(device: str | None = "cpu", **overrides) -> BenchSettings:
    """``BenchSettings`` for ``device`` with its defaults, overridden by every non-``None`` keyword.

    Raises:
        ValueError: naming the bad value and what was expected (size not a multiple of 16, a
            precision the device cannot run, an unknown row selector, CUDA not available...).
    """
    device = _check_device(device)
    known = {f.name for f in BenchSettings.__dataclass_fields__.values()}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown bench settings {sorted(unknown)}; known: {sorted(known)}")
    defaults = _CUDA_DEFAULTS if torch.device(device).type == "cuda" else _CPU_DEFAULTS
    given = {k: _as_tuple(v) if k in _TUPLE_SETTINGS else v for k, v in overrides.items() if v is not None}
    values = {**defaults, **given}
    settings = replace(BenchSettings(device=device), **values)
    validate_settings(settings)
    return settings


_TUPLE_SETTINGS = ("rows", "cascade_train_batches", "cascade_dtypes")
_BOOL_SETTINGS = ("compile", "cascade_sweep", "tiny_cascade", "memory")


def _as_tuple(value) -> tuple:
    """One value or several as a tuple without repeats (a repeated batch would time one row twice)."""
    if isinstance(value, (str, int)):
        return (value,)
    try:
        return tuple(dict.fromkeys(value))
    except TypeError:  # not iterable, or unhashable items: validate_settings names the value
        return (value,)


def validate_settings(s: BenchSettings) -> None:
    """Raise ``ValueError`` naming the first setting of ``s`` that is out of range."""
    for name in _BOOL_SETTINGS:
        if not isinstance(getattr(s, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(s, name)!r}")
    for name in ("batch", "size", "repeats", "train_repeats", "cascade_eval_batch", "N"):
        check_positive_int(name, getattr(s, name))
    for name in ("warmup", "train_warmup", "leak_calls"):
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    for b in s.cascade_train_batches:
        check_positive_int("cascade_train_batches", b)
    if s.threads is not None:
        check_positive_int("threads", s.threads)
        if s.threads > thread_limit():
            raise ValueError(f"threads must be at most {thread_limit()} ({THREADS_PER_CORE_LIMIT} per core "
                             f"of the {os.cpu_count()} this machine has), got {s.threads}")
    bad_widths = [w for w in CASCADE_WIDTHS if w % (2 * s.N)]
    if bad_widths:
        raise ValueError(f"N must make TinyU-Net's widths {CASCADE_WIDTHS} multiples of 2N (N = 1, 2, 4, "
                         f"8, 16 or 32), got N={s.N}")
    if s.size % 16:
        raise ValueError(f"size must be a multiple of 16 (as the reference TinyU-Net needs), got {s.size}")
    if s.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {s.precision!r}")
    if s.precision != "fp32" and not s.on_cuda:
        raise ValueError(f"precision {s.precision!r} (autocast) is for CUDA; CPU rows run in fp32")
    bad = [d for d in s.cascade_dtypes if d not in PRECISIONS]
    if bad or not s.cascade_dtypes:
        raise ValueError(f"cascade_dtypes must be among {sorted(PRECISIONS)}, got {list(s.cascade_dtypes)}")
    for name in ("deadline_s", "compile_estimate_s", "peak_gbs"):
        value = getattr(s, name)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if (s.memory or s.leak_calls) and s.on_cuda:
        raise ValueError("memory probes and leak_calls measure CPU resident memory: use them with device cpu")
    if not s.rows:
        raise ValueError("rows must select at least one row (e.g. inference, training, cascade)")
    _check_selectors(s)
