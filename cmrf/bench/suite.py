"""``run_benchmark``: every selected row, in groups, within a deadline, one failure at a time.

Order of work (the table is sorted back into row order at the end):

1. the whole-network inference rows, then the training rows, without ``torch.compile``;
2. the per-cascade cases (one group per shape, reference and fused);
3. the ``torch.compile`` rows, last because one compilation can take a minute or more: a compile
   row starts only if the time left before the deadline exceeds the expected compile time
   (``compile_estimate_s``, then what the previous compilation took).

Inside a group, each row is built and checked against the group's reference (its first call,
which also compiles, is not timed), then all rows are timed together by
``cmrf.bench.harness.time_interleaved``. Any exception is caught per row and written into that
row; the rest go on. When the deadline has passed, the remaining rows are listed as skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial

import torch

from cmrf.bench import harness
from cmrf.bench.cascade import cascade_bytes, cascade_case_runners, cascade_cases_of, cascade_sweep_sides
from cmrf.bench.network import NetworkContext, Runner, build_network_runner
from cmrf.bench.report import Report, Row, machine_info, peak_bandwidth_gbs
from cmrf.bench.settings import (
    COMPILED_VARIANTS,
    INFERENCE_VARIANTS,
    PRECISIONS,
    TRAINING_VARIANTS,
    BenchSettings,
    resolve_settings,
    row_names,
    selected,
    validate_settings,
)
from cmrf.bench.targets import apply_targets

__all__ = ["run_benchmark"]

# torch.compile(training) compiles a forward and a backward graph: about this many inference compiles.
_TRAINING_COMPILE_FACTOR = 1.5
LEAK_ROWS = ("inference.optimized", "inference.onnxruntime")  # the deployable rows --leak-calls checks


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _compiled(name: str) -> bool:
    return name.rpartition(".")[2] in COMPILED_VARIANTS


def _reference_of(name: str) -> str:
    if name.startswith("cascade.") and ".fused." in name:  # --sweep rows: <case>.fused.<config>
        return name.partition(".fused.")[0] + ".reference"
    return name.rpartition(".")[0] + ".reference"


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in fp32, computed where ``a`` is (a GPU's outputs never copied to the host),
    a few batch items at a time (the cascade's outputs are about 1 GiB at batch 128)."""
    if a.shape != b.shape:
        raise ValueError(f"output shape {tuple(a.shape)} differs from the reference's {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    b = b.to(a.device)
    chunks = zip(a.split(8), b.split(8)) if a.dim() else [(a, b)]
    maxima = [float((x.float() - y.float()).abs().max()) for x, y in chunks]
    # max() of floats keeps or drops a NaN depending on where it stands: a NaN anywhere is the answer.
    return math.nan if any(math.isnan(m) for m in maxima) else max(maxima)


# Gradients that are zero in exact arithmetic (e.g. the bias of a BatchNorm whose output only
# feeds another batch-statistics BatchNorm) hold rounding noise of ~1e-9; dividing by their own
# maximum would report noise as a 100 % error. Scales below this fraction of the largest
# gradient are raised to it.
_GRAD_SCALE_FLOOR = 1e-4


def _figures_line(row: Row) -> str:
    """``name: wall ... ms (min ...)[, kernel ... ms][, peak ... MiB]`` for the progress log."""
    parts = [f"{row.name}: wall {row.wall_ms:.4g} ms (min {row.wall_min_ms:.4g})"]
    if row.kernel_ms is not None:
        parts.append(f"kernel {row.kernel_ms:.4g} ms")
    if row.peak_mib is not None:
        parts.append(f"peak {row.peak_mib:.1f} MiB")
    return ", ".join(parts)


def _grad_max_rel(outputs: dict, reference: dict) -> float | None:
    """Largest ``max|g - g_ref| / max(max|g_ref|, floor)`` over the gradients both runs returned.

    ``floor`` is ``_GRAD_SCALE_FLOOR`` times the largest ``max|g_ref|`` of all gradients.
    """
    pairs = [(outputs[k], ref) for k, ref in reference.items() if k.startswith("grad.") and k in outputs]
    if not pairs:
        return None
    scales = [float(ref.abs().max()) for _, ref in pairs]
    floor = _GRAD_SCALE_FLOOR * max(scales) or 1.0
    return max(_max_abs(out, ref) / max(scale, floor) for (out, ref), scale in zip(pairs, scales))


class _Run:
    """The state of one benchmark run (see the module docstring for the order of work)."""

    def __init__(self, settings: BenchSettings, progress: Callable[[str], None]):
        self.settings = settings
        self.device = settings.torch_device
        self.deadline = harness.Deadline(settings.deadline_s)
        self._progress = progress
        self.report = Report(machine_info(self.device, settings.threads), dataclasses.asdict(settings))
        self.references: dict[str, dict[str, torch.Tensor]] = {}
        self.estimates = {"inference": settings.compile_estimate_s,
                          "training": settings.compile_estimate_s * _TRAINING_COMPILE_FACTOR}
        self.names = [n for n in row_names(settings) if selected(settings, n)]
        self.extra_notes: list[str] = []
        self.stopped: str | None = None  # why the run ended before its last phase, if it did

    def log(self, message: str) -> None:
        self._progress(f"[{self.deadline.elapsed():6.1f} s] {message}")

    # --- one group -----------------------------------------------------------------------------

    def _skip_reason(self, name: str) -> str | None:
        if self.settings.N == 1 and name.startswith("cascade.") and ".fused" in name:
            return "N = 1: a CMRF has no cascade stage, nothing to fuse"
        d = self.deadline
        if not d.allows():
            return f"deadline {self.settings.deadline_s:.0f} s reached"
        if _compiled(name):
            needed = self.estimates[name.partition(".")[0]]
            if not d.allows(needed):
                return (f"would pass the deadline: {d.remaining():.0f} s left, compiling takes about "
                        f"{needed:.0f} s (raise --deadline or run --rows {name})")
        return None

    def _build(self, row: Row, build: Callable[[str], Runner]) -> Runner | None:
        reason = self._skip_reason(row.name)
        if reason:
            row.skip(reason)
            self.log(f"{row.name}: skipped ({reason})")
            return None
        start = time.perf_counter()
        try:
            runner = build(row.name)
            outputs = runner.check()
            harness.synchronize(self.device)
        except Exception as err:  # one failing row must not stop the others
            row.fail(harness.describe_error(err))
            self.log(f"{row.name}: FAILED: {row.note}")
            self._free()
            return None
        seconds = time.perf_counter() - start
        row.add_note(runner.note).extra = dict(runner.extra)
        if _compiled(row.name):  # the next compilation will take about as long
            if row.name.startswith("inference."):
                self.estimates.update(inference=seconds, training=seconds * _TRAINING_COMPILE_FACTOR)
            else:
                self.estimates["training"] = seconds
        self._compare(row, outputs)
        if row.status == "error":  # its output cannot be compared: its time would mean nothing
            self.log(f"{row.name}: FAILED: {row.note}")
            return None
        diff = "" if row.max_diff is None else f", max diff {row.max_diff:.1e}"
        self.log(f"{row.name}: built and checked in {seconds:.1f} s{diff}")
        return runner

    def _compare(self, row: Row, outputs: dict[str, torch.Tensor]) -> None:
        reference_name = _reference_of(row.name)
        if row.name == reference_name:
            self.references[reference_name] = outputs
            row.max_diff = 0.0
            return
        reference = self.references.get(reference_name)
        if reference is None:
            row.add_note("no reference output to compare with")
            return
        try:
            row.max_diff = _max_abs(outputs["output"], reference["output"])
            grad = _grad_max_rel(outputs, reference)
            if grad is not None:
                row.extra["grad_max_rel"] = grad
        except Exception as err:
            row.fail(f"comparison with the reference failed: {harness.describe_error(err)}")

    def run_group(self, rows: list[Row], build: Callable[[str], Runner], repeats: int, warmup: int,
                  timed: bool = True) -> None:
        """Build and check ``rows`` in order (reference first), then time the built ones together."""
        self.report.rows.extend(rows)
        runners = {}
        for row in rows:
            runner = self._build(row, build)
            if runner is not None:
                runners[row.name] = runner
        if not runners:
            return
        if not timed:
            for name in runners:
                row = self.report.row(name)
                row.status = "check-only"
            return
        self.log(f"timing {', '.join(runners)}: {repeats} calls each after {warmup} warm-up")
        samples, errors = harness.time_interleaved({n: r.call for n, r in runners.items()},
                                                   self.device, repeats, warmup)
        for name, runner in runners.items():
            row = self.report.row(name)
            if name in errors:
                row.fail(f"while timing: {errors[name]}")
                continue
            row.wall_ms, row.wall_min_ms = harness.median(samples[name]), min(samples[name])
            row.extra["wall_samples_ms"] = [round(s, 4) for s in samples[name]]
            self._device_figures(row, runner)
            self.log(_figures_line(row))  # kept in the log even if the run dies before its table
        del runners
        self._free()

    def _device_figures(self, row: Row, runner: Runner) -> None:
        if not self.settings.on_cuda:
            return
        try:
            row.kernel_ms = harness.kernel_time_ms(runner.call, self.device)
            peak = harness.cuda_peak_mib(runner.call, self.device)
            row.peak_mib = runner.peak_mib if runner.peak_mib is not None else peak
        except Exception as err:
            row.add_note(f"profiling failed: {harness.describe_error(err)}")

    def _free(self) -> None:
        gc.collect()
        harness.release_cuda_cache(self.device)

    # --- the phases ----------------------------------------------------------------------------

    def _network_rows(self, group: str, compiled: bool) -> list[Row]:
        labels = INFERENCE_VARIANTS if group == "inference" else TRAINING_VARIANTS
        s = self.settings
        names = [n for n in self.names if n.startswith(group + ".") and _compiled(n) == compiled]
        names.sort(key=lambda n: n.rpartition(".")[2] != "reference")  # reference first
        shape = f"({s.batch}, 3, {s.size}, {s.size})"
        return [Row(n, labels[n.rpartition(".")[2]], group, s.batch, shape) for n in names]

    def network(self, compiled: bool) -> None:
        s = self.settings
        rows = {g: self._network_rows(g, compiled) for g in ("inference", "training")}
        if not rows["inference"] and not rows["training"]:
            return
        if not hasattr(self, "context"):
            self.context = NetworkContext.create(s)

        def build(name: str) -> Runner:
            return build_network_runner(name, self.context, s)

        if rows["inference"]:
            self.run_group(rows["inference"], build, s.repeats, s.warmup)
        if rows["training"]:
            self.run_group(rows["training"], build, s.train_repeats, s.train_warmup)

    def cascade(self) -> None:
        s = self.settings
        for case in cascade_cases_of(s):
            names = [f"{case.prefix}.{side}" for side in ("reference", "fused")]
            names = [n for n in names if n in self.names]
            if s.cascade_sweep and f"{case.prefix}.fused" in names:
                names += [f"{case.prefix}.{side}" for side in cascade_sweep_sides(case)]
            if not names:
                continue
            rows = [Row(n, f"{n[len(case.prefix) + 1:]} {case.mode} {case.dtype} {case.shape}", "cascade",
                        case.batch, str(case.shape)) for n in names]
            if not s.on_cuda:
                for row in rows:
                    row.note = "Triton interpreter: correctness only, not timed"
            built = {}

            def build(name: str, case=case, built=built) -> Runner:
                if not built:
                    built.update(cascade_case_runners(case, self.device, sweep=s.cascade_sweep))
                return built[name[len(case.prefix) + 1:]]

            self.run_group(rows, build, s.repeats, s.warmup, timed=s.on_cuda)
            built.clear()
            self.references.pop(f"{case.prefix}.reference", None)  # up to GiBs; no later row needs it
            self._free()

    def memory(self) -> None:
        """CPU only: peak RSS of each whole-network row in a fresh process, RSS growth over many calls."""
        from cmrf.bench.memory import probe_peak_rss, rss_growth

        s = self.settings
        rows = [r for r in self.report.rows if r.group != "cascade" and r.status == "ok"]
        if s.memory:
            if not rows:
                self.extra_notes.append("--memory: no whole-network row (inference, training) ran, so "
                                        "no peak RSS was probed.")
            for row in rows:
                if _compiled(row.name) or not self.deadline.allows():
                    why = "a torch.compile row" if _compiled(row.name) else "the deadline had passed"
                    row.add_note(f"peak RSS not probed: {why}")
                    continue
                try:
                    row.peak_mib = probe_peak_rss(row.name, s)
                    self.log(f"{row.name}: peak RSS of the first call {row.peak_mib} MiB")
                except Exception as err:
                    row.add_note(harness.describe_error(err))
        if s.leak_calls:
            if not any(row.name in LEAK_ROWS for row in rows):
                self.extra_notes.append(f"--leak-calls: none of its rows ({', '.join(LEAK_ROWS)}) ran, so "
                                        "nothing was checked.")
            for row in rows:
                if row.name not in LEAK_ROWS:
                    continue
                runner = build_network_runner(row.name, self.context, s)
                growth = rss_growth(runner.call, s.leak_calls)
                row.extra["rss_growth"] = growth
                if growth["growth_mib"] is not None:
                    row.add_note(f"RSS {growth['growth_mib']:+.1f} MiB over {s.leak_calls} calls")

    # --- the figures -----------------------------------------------------------------------------

    def _mark_rows_a_stop_left(self) -> None:
        """After a stop, rows built but not timed say so, and rows never reached are listed."""
        reason = "not run: the run stopped before it"
        for row in self.report.rows:
            if row.status == "ok" and row.wall_ms is None:
                row.skip("not timed: the run stopped first")
        present = {row.name for row in self.report.rows}
        for name in self.names:
            if name not in present:
                group = name.partition(".")[0]
                # a cascade row's batch is the second part of its name (cascade.eval.b16...)
                batch = self.settings.batch if group != "cascade" else int(name.split(".")[2][1:])
                self.report.rows.append(Row(name, name, group, batch).skip(reason))

    def finish(self) -> Report:
        if self.stopped is not None:
            self._mark_rows_a_stop_left()
        order = {n: i for i, n in enumerate(row_names(self.settings))}

        def position(row: Row) -> float:  # --sweep rows right after their case's fused row
            if row.name in order:
                return order[row.name]
            return order.get(row.name.partition(".fused.")[0] + ".fused", len(order)) + 0.5

        self.report.rows.sort(key=position)
        peak_gbs = self.settings.peak_gbs or peak_bandwidth_gbs(self.device)
        for row in self.report.rows:
            self._ratios(row)
            if row.group == "cascade" and peak_gbs and row.status == "ok":
                self._hbm(row, peak_gbs)
        apply_targets(self.report, self.settings)
        self.report.notes = self._notes()
        self.report.elapsed_s = round(self.deadline.elapsed(), 1)
        return self.report

    def _wall(self, name: str) -> float | None:
        row = self.report.row(name)
        return row.wall_ms if row is not None and row.status == "ok" else None

    def _ratios(self, row: Row) -> None:
        if row.wall_ms is None:
            return
        eager = self._wall(_reference_of(row.name))
        row.vs_eager = eager / row.wall_ms if eager else None
        if row.group != "cascade":
            compiled = self._wall(f"{row.group}.compile")
            row.vs_compile = compiled / row.wall_ms if compiled else None

    def _hbm(self, row: Row, peak_gbs: float) -> None:
        case = next(c for c in cascade_cases_of(self.settings) if row.name.startswith(c.prefix + "."))
        itemsize = torch.empty(0, dtype=PRECISIONS[case.dtype]).element_size()
        # Kernel time, as the column says; without the profiler's device events, the wall time
        # (host overhead included) with a note, never silently.
        ms = row.kernel_ms if row.kernel_ms is not None else row.wall_ms
        row.hbm_pct = 100 * cascade_bytes(case, itemsize) / (ms * 1e-3) / 1e9 / peak_gbs
        row.extra["hbm_peak_gbs"] = peak_gbs
        if row.kernel_ms is None:
            row.add_note("% HBM bound from wall time (no kernel time)")

    def stop(self, phase: str, err: BaseException) -> None:
        """End the run after ``phase`` raised (a sticky CUDA error fails every later call): the
        report keeps the rows measured so far and says why the others are missing."""
        self.stopped = f"the run stopped in its {phase} phase: {harness.describe_error(err)}"
        self.log(f"STOPPED: {self.stopped}")
        if isinstance(err, KeyboardInterrupt):  # the user's doing: no traceback to read
            self.report.interrupted, self.report.interruption = True, err
            return
        self._progress(traceback.format_exc().rstrip())  # where it happened, for the next fix

    def _notes(self) -> list[str]:
        s = self.settings
        notes = [] if self.stopped is None else [f"{self.stopped}; the rows after it did not run."]
        notes += self.extra_notes
        dtypes = ", ".join(s.cascade_dtypes)
        precision = f"network rows {s.precision}, cascade rows their own dtype ({dtypes})"
        notes += ["max diff: largest absolute difference of the output from the group's reference "
                 f"(same input, same precision: {precision}); training rows compare the logits of "
                 "the first step, and their JSON has grad_max_rel for the gradients."]
        if s.on_cuda:
            notes.append("kernel ms: GPU time of one call's kernels (torch.profiler); peak MiB: "
                         "max_memory_allocated during one call minus what was allocated before it; "
                         "% HBM bound: compulsory traffic over kernel time, against the device's bandwidth.")
        else:
            if any(r.group == "cascade" for r in self.report.rows):
                notes.append("cascade rows: the fused kernels run only in Triton's CPU interpreter here, "
                             "so they are compared with the reference at small shapes and not timed.")
            if not s.memory:
                notes.append("peak MiB: not measured (add --memory for the peak RSS of each row's first "
                             "call in a fresh process).")
        if any(_compiled(r.name) for r in self.report.rows):
            notes.append("torch.compile rows are timed in their own group after the others; their first "
                         "call (the compilation) is not timed.")
        elif not s.compile:
            notes.append("torch.compile rows are off "
                         "(--compile adds them; on CPU compiling takes minutes).")
        return notes


@contextlib.contextmanager
def _cpu_threads(threads: int | None):
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_benchmark(settings: BenchSettings | None = None, progress: Callable[[str], None] | None = _stderr,
                  **overrides) -> Report:
    """Run the benchmark and return its ``Report`` (``cmrf.bench.to_markdown`` / ``to_json`` format it).

    Args:
        settings: from ``resolve_settings`` (or built by hand; checked the same way, a
            ``ValueError`` naming the first bad one); ``None`` builds them from ``overrides``
            (e.g. ``device="cuda"``, ``rows=("inference",)``), with the device's defaults.
        progress: called with one line per step (elapsed time first); ``None`` is silent.
            Default: print to stderr.

    Off CUDA with cascade rows selected, ``TRITON_INTERPRET=1`` is set in this process (if unset)
    before the kernels are first imported, so that the fused cascade can run in the interpreter.
    torch's random streams (CPU, and the bench's GPU) are restored afterwards: the rows seed them.
    """
    if settings is None:
        settings = resolve_settings(**overrides)
    elif overrides:
        raise ValueError("pass either settings or keyword overrides, not both")
    else:  # settings built by hand: checked as resolve_settings checks its own
        validate_settings(settings)
    run = _Run(settings, progress or (lambda _: None))
    if not settings.on_cuda and any(n.startswith("cascade.") for n in run.names):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    phases = [("whole-network", partial(run.network, compiled=False)), ("cascade", run.cascade),
              ("torch.compile", partial(run.network, compiled=True))]
    if not settings.on_cuda:
        phases.append(("memory", run.memory))
    # Triton launches on the current GPU, not on the tensors' one: make the bench's device current.
    on_device = torch.cuda.device(run.device) if settings.on_cuda else contextlib.nullcontext()
    # The rows seed torch for their inputs and weights: the caller's random streams are left as they were.
    rng_devices = [run.device] if settings.on_cuda else []
    with _cpu_threads(settings.threads), on_device, torch.random.fork_rng(devices=rng_devices):
        run.log(f"cmrf bench on {run.report.machine['device']}: {len(run.names)} rows, "
                f"deadline {settings.deadline_s} s")
        for phase, work in phases:
            try:
                work()
            # Keep the figures measured so far (see _Run.stop), also on Ctrl-C or a SIGINT from
            # `timeout -s INT`: the table of a long run that was cut short is still printed.
            except (Exception, KeyboardInterrupt) as err:
                run.stop(phase, err)
                break
        return run.finish()
