"""The benchmark's one table: ``Row``, ``Report``, and their Markdown and JSON forms."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from dataclasses import dataclass, field

import torch

__all__ = ["COLUMNS", "Report", "Row", "machine_info", "to_json", "to_markdown"]


@dataclass
class Row:
    """One line of the table. Times in milliseconds, memory in MiB; ``None`` where not measured.

    Attributes:
        name: dotted row name (``inference.optimized``, ``cascade.eval.b128.L0.fused``).
        label: what runs, in words. group: ``inference``, ``training`` or ``cascade``.
        batch: images per call. shape: the input shape, as text.
        status: ``ok``, ``error``, ``skipped`` or ``check-only`` (compared, not timed).
        wall_ms / wall_min_ms: median / fastest synchronised wall time of one call.
        kernel_ms: GPU kernel time of one call (CUDA). peak_mib: see docs/benchmarks.md.
        max_diff: largest absolute difference of the output from the group's reference.
        vs_eager / vs_compile: reference eager / ``torch.compile(reference)`` wall time over this
            row's. hbm_pct: compulsory traffic over kernel time, in % of the device's bandwidth.
        target / verdict: the goal that applies to this row and whether this run meets it.
        note: errors, skip reasons, caveats. extra: further figures for the JSON.
    """

    name: str
    label: str
    group: str
    batch: int
    shape: str = ""
    status: str = "ok"
    wall_ms: float | None = None
    wall_min_ms: float | None = None
    kernel_ms: float | None = None
    peak_mib: float | None = None
    max_diff: float | None = None
    vs_eager: float | None = None
    vs_compile: float | None = None
    hbm_pct: float | None = None
    target: str = ""
    verdict: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)

    def fail(self, message: str) -> Row:
        self.status, self.note = "error", _join(self.note, message)
        return self

    def skip(self, reason: str) -> Row:
        self.status, self.note = "skipped", _join(self.note, reason)
        return self

    def add_note(self, text: str) -> Row:
        """Append ``text`` to the note (``"; "`` between notes), the status unchanged."""
        self.note = _join(self.note, text)
        return self


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a and b else a or b


@dataclass
class Report:
    """A whole run: what it ran on, its settings, its rows, and what it skipped."""

    machine: dict
    settings: dict
    rows: list[Row] = field(default_factory=list)
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False  # stopped by Ctrl-C / SIGINT: the command exits 130 after the table
    # The KeyboardInterrupt (or SIGTERM's subclass of it) that stopped the run, for the command to
    # report after the table as it reports any other interruption; not part of the figures.
    interruption: BaseException | None = field(default=None, repr=False, compare=False)

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)

    @property
    def skipped(self) -> list[Row]:
        return [r for r in self.rows if r.status == "skipped"]


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except Exception:  # a broken optional install must not stop the benchmark
        return None
    return getattr(module, "__version__", None)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Datasheet DRAM bandwidth (GB/s) by device name, most specific first: for CUDA builds whose
# device properties carry no memory clock (CUDA 13 dropped it from its properties struct).
# (A GH200's memory depends on its model, 4.0 or 4.9 TB/s: not guessed.)
DATASHEET_GBS = (("GH200", None), ("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0),
                 ("H100", 3350.0))


def peak_bandwidth_gbs(device: torch.device) -> float | None:
    """Theoretical DRAM bandwidth in GB/s from the CUDA device properties (double data rate), else
    from ``DATASHEET_GBS`` by name; ``None`` when neither knows (``--peak-gbs`` gives it)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    return next((gbs for name, gbs in DATASHEET_GBS if name in props.name), None)


def machine_info(device: torch.device, threads: int | None) -> dict:
    """What the figures depend on: device, CPU, threads, library versions, date."""
    from cmrf import __version__

    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {_cpu_name()}",
        "cpu": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "cmrf": __version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "onnxruntime": _version("onnxruntime") if device.type == "cpu" else None,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            capability=f"sm_{props.major}{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            peak_gbs=peak_bandwidth_gbs(device),
            cuda=torch.version.cuda,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    return info


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ") if text else ""


def _wall(row: Row) -> str:
    if row.status in ("error", "skipped"):
        return row.status
    if row.status == "check-only":
        return "not timed"
    return _ms(row.wall_ms)


# (header, cell of a row)
COLUMNS = (
    ("row", lambda r: f"{r.name}: {r.label}"),
    ("batch", lambda r: str(r.batch)),
    ("wall ms", _wall),
    ("kernel ms", lambda r: _ms(r.kernel_ms)),
    ("peak MiB", lambda r: "-" if r.peak_mib is None else f"{r.peak_mib:.0f}"),
    ("max diff", lambda r: "-" if r.max_diff is None else f"{r.max_diff:.1e}"),
    ("vs eager", lambda r: _ratio(r.vs_eager)),
    ("vs compile", lambda r: _ratio(r.vs_compile)),
    ("% HBM bound", lambda r: "-" if r.hbm_pct is None else f"{r.hbm_pct:.1f}"),
    ("target: goal -> this run", lambda r: f"{r.target} -> {r.verdict}" if r.target else ""),
    ("note", lambda r: r.note),
)


def to_markdown(report: Report) -> str:
    """The report as a header paragraph, one Markdown table and its notes."""
    m, s = report.machine, report.settings
    libraries = ("cmrf", "torch", "triton", "onnxruntime", "cuda")
    versions = ", ".join(f"{k} {m[k]}" for k in libraries if m.get(k))
    threads = f", {m['threads']} threads" if s["device"] == "cpu" else ""
    lines = [
        f"cmrf bench on {m['device']} ({m['logical_cpus']} logical CPUs{threads}), {versions}, "
        f"python {m['python']}, {m['date']}",
        "",
        f"Batch {s['batch']}, 3x{s['size']}x{s['size']}, {s['precision']}"
        + (" autocast" if s["precision"] != "fp32" else "")
        + f"; {s['repeats']} timed calls per row ({s['train_repeats']} per training row) after "
        f"{s['warmup']} ({s['train_warmup']}) warm-up; medians; ran {report.elapsed_s:.0f} s.",
        "",
        "| " + " | ".join(h for h, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in report.rows:
        lines.append("| " + " | ".join(_cell(cell(row)) for _, cell in COLUMNS) + " |")
    skipped = report.skipped
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{r.name} ({r.note})" for r in skipped)]
    lines += [""] + [f"- {n}" for n in report.notes] if report.notes else []
    return "\n".join(lines)


def _strict(value):
    """``value`` with every non-finite float as text (``"nan"``, ``"inf"``): strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def to_json(report: Report) -> dict:
    """The report as a JSON-ready dict (``json.dumps(..., allow_nan=False)`` works on it; a NaN
    difference, the sign of a broken kernel, is the text ``"nan"``)."""
    return _strict({
        "machine": report.machine,
        "settings": report.settings,
        "elapsed_s": report.elapsed_s,
        "rows": [dataclasses.asdict(r) for r in report.rows],
        "skipped": [r.name for r in report.skipped],
        "notes": report.notes,
        "interrupted": report.interrupted,
    })
