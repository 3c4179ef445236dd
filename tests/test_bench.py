"""``cmrf bench``: the timing harness, the settings, the table and JSON, failure isolation, the CLI.

The end-to-end runs use tiny images (32x32), one timed call and a few rows; they check that every
row is measured and compared with the reference, never how fast anything is. The fused cascade
runs in Triton's CPU interpreter when there is no GPU: ``TRITON_INTERPRET=1`` is set here before
anything imports the kernels.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses
import functools
import itertools
import json
import math

import pytest

from cmrf import TinyUNet
from cmrf.bench import Report, Row, resolve_settings, run_benchmark, to_json, to_markdown
from cmrf.bench.harness import Deadline, cuda_peak_mib, describe_error, kernel_time_ms, time_interleaved
from cmrf.bench.report import COLUMNS
from cmrf.bench.settings import BenchSettings, row_names, selected
from cmrf.bench.targets import apply_targets
from cmrf.cli import main as cli_main
from cmrf.reference import reference_tinyunet
from tests.conftest import GOLDEN_EVAL_ATOL, golden_state_dict, load_golden

TOL = 1e-4
CPU = torch.device("cpu")
TINY = dict(size=32, repeats=1, warmup=0, train_repeats=1, train_warmup=0, threads=1)


def test_bench_baseline_is_the_reference_algorithm():
    golden = load_golden("tinyunet_official.safetensors")
    model = TinyUNet()
    model.load_state_dict(golden_state_dict(golden))
    with torch.no_grad():
        out = reference_tinyunet(golden["input"], model.state_dict())
    assert float((out - golden["output_eval"]).abs().max()) < GOLDEN_EVAL_ATOL


# --- the harness -----------------------------------------------------------------------------


def test_time_interleaved_rotates_rows_and_isolates_a_failure():
    order = []
    calls = {name: functools.partial(order.append, name) for name in ("a", "b", "c")}
    samples, errors = time_interleaved(calls, CPU, repeats=3, warmup=1)
    assert errors == {}
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(ms >= 0 for v in samples.values() for ms in v)
    # warm-up in order, then each repeat starts one row later
    assert order == list("abc" "abc" "bca" "cab")

    count = itertools.count()

    def flaky():
        if next(count) == 1:  # the second call fails
            raise RuntimeError("compile not supported\nsecond line")

    samples, errors = time_interleaved({"ok": lambda: None, "flaky": flaky}, CPU, repeats=3, warmup=0)
    assert errors == {"flaky": "RuntimeError: compile not supported"}
    assert set(samples) == {"ok"} and len(samples["ok"]) == 3


def test_deadline_and_error_text():
    now = [100.0]
    deadline = Deadline(10, clock=lambda: now[0])
    assert deadline.allows(9.5) and deadline.remaining() == 10
    now[0] = 105.0
    assert deadline.elapsed() == 5 and deadline.allows(4) and not deadline.allows(6)
    now[0] = 111.0
    assert not deadline.allows()
    assert Deadline(None).allows(1e9)
    assert describe_error(ValueError("x" * 500), limit=50).endswith("...")
    assert describe_error(KeyError()) == "KeyError"
    wrapped = RuntimeError("outer")
    wrapped.inner_exception = ValueError("inner")  # as torch.compile's backend errors carry it
    assert describe_error(wrapped) == "RuntimeError: outer (cause: ValueError: inner)"


def test_error_text_keeps_the_cause():
    # torch.compile's and Triton's first lines only introduce the real message.
    intro = RuntimeError("backend='inductor' raised:\n\nTypeError: bad stride\n")
    assert describe_error(intro) == "RuntimeError: backend='inductor' raised: ... TypeError: bad stride"
    try:
        try:
            raise IndexError("index 3 is out of bounds")
        except IndexError as inner:
            raise RuntimeError("kernel failed") from inner
    except RuntimeError as err:
        cause = "(cause: IndexError: index 3 is out of bounds)"
        assert describe_error(err) == f"RuntimeError: kernel failed {cause}"


def test_max_diff_in_chunks_on_the_outputs_device():
    from cmrf.bench.suite import _max_abs

    a = torch.zeros(20, 3, dtype=torch.bfloat16)
    b = a.clone()
    b[19, 2] = -0.5  # in the last chunk of 8 batch items
    assert _max_abs(a, b) == 0.5 and _max_abs(b, b) == 0.0
    assert _max_abs(torch.tensor(1.0), torch.tensor(3.0)) == 2.0
    assert _max_abs(torch.empty(0, 3), torch.empty(0, 3)) == 0.0
    b[12, 0] = math.nan  # a NaN in any chunk, wherever the largest finite difference is
    assert math.isnan(_max_abs(a, b))
    with pytest.raises(ValueError, match=r"output shape \(2,\) differs from the reference's \(3,\)"):
        _max_abs(torch.zeros(2), torch.zeros(3))


def test_kernel_time_is_unmeasured_without_device_events():
    from types import SimpleNamespace

    from cmrf.bench.harness import _device_ms_per_call

    cpu_op = SimpleNamespace(device_type=torch.autograd.DeviceType.CPU, self_device_time_total=50.0)
    kernel = SimpleNamespace(device_type=torch.autograd.DeviceType.CUDA, self_device_time_total=300.0)
    assert _device_ms_per_call([cpu_op], calls=2) is None  # e.g. no CUPTI: not a measured 0
    assert _device_ms_per_call([cpu_op, kernel, kernel], calls=2) == pytest.approx(0.3)


def test_releasing_the_cuda_cache_survives_a_sticky_cuda_error(monkeypatch):
    from cmrf.bench.harness import release_cuda_cache

    def sticky():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "empty_cache", sticky)
    release_cuda_cache(torch.device("cuda"))  # does not raise: the failing row reports the error
    release_cuda_cache(CPU)


def test_cuda_figures_are_none_off_cuda():
    assert kernel_time_ms(lambda: None, CPU) is None
    assert cuda_peak_mib(lambda: None, CPU) is None


# --- settings and row selection ---------------------------------------------------------------


def test_cpu_defaults_follow_the_cpu_target():
    s = resolve_settings("cpu")
    assert (s.batch, s.size, s.threads, s.precision, s.compile) == (1, 256, 2, "fp32", False)
    names = row_names(s)
    assert "inference.onnxruntime" in names and "inference.optimized-graph" not in names
    assert sum(n.startswith("cascade.") for n in names) == 2 * 4 * 2  # eval + one train batch, 4 shapes


def test_the_step_in_a_cuda_graph_is_a_cuda_row_after_the_eager_one_and_refuses_fp16():
    from cmrf.bench.network import build_network_runner

    cuda = BenchSettings(device="cuda", batch=16, size=256, precision="bf16")
    training = [n for n in row_names(cuda) if n.startswith("training.")]
    assert training == ["training.reference", "training.compile", "training.cmrf", "training.cmrf-graph",
                        "training.cmrf-compile"]
    assert "training.cmrf-graph" not in row_names(resolve_settings("cpu"))
    fp16 = BenchSettings(device="cuda", batch=16, size=256, precision="fp16")
    with pytest.raises(ValueError, match="cannot hold fp16's loss scaler"):
        build_network_runner("training.cmrf-graph", None, fp16)


def test_selection_adds_the_group_reference_and_drops_compile_rows_when_off():
    s = resolve_settings("cpu", rows=("inference.optimized", "cascade.train.b1.L3"))
    picked = [n for n in row_names(s) if selected(s, n)]
    assert picked == [
        "inference.reference", "inference.optimized",
        "cascade.train.b1.L3.fp32.reference", "cascade.train.b1.L3.fp32.fused",
    ]
    s = resolve_settings("cpu", rows=("training",), compile=True)
    assert [n for n in row_names(s) if selected(s, n)] == [
        "training.reference", "training.compile", "training.cmrf", "training.cmrf-compile"
    ]
    with pytest.raises(ValueError, match="only torch.compile rows"):
        resolve_settings("cpu", rows=("inference.compile",))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(size=100), "multiple of 16"),
        (dict(precision="bf16"), "autocast.*CUDA"),
        (dict(rows=("inference.nonsense",)), "matches no row"),
        (dict(rows=("cascade.eval.b1.L3.fp32.fused.single.8x8.w8",), cascade_sweep=True),
         r"names one --sweep tiling; --rows selects cases: use --rows cascade\.eval\.b1\.L3\.fp32\.fused "),
        (dict(warmup=-1), "warmup must be an integer >= 0"),
        (dict(batch=0), "batch must be an integer >= 1"),
        (dict(cascade_dtypes=("fp64",)), "cascade_dtypes"),
        (dict(deadline_s=-5), "deadline_s must be a number > 0"),
        (dict(bogus=1), "unknown bench settings"),
    ],
)
def test_bad_settings_give_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_settings("cpu", **overrides)


def test_bad_device_is_rejected():
    with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        resolve_settings("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_settings("cuda")


def test_a_cuda_index_past_the_count_is_refused_as_by_train(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device cuda:2 requested but this machine has 2 CUDA devices"):
        resolve_settings("cuda:2")


# --- table, JSON and targets -----------------------------------------------------------------


def _report(settings: BenchSettings, rows: list[Row]) -> Report:
    return Report(machine={"device": "test", "logical_cpus": 2, "threads": 2, "python": "3", "date": "d",
                           "torch": "2"}, settings=dataclasses.asdict(settings), rows=rows)


def test_markdown_has_one_cell_per_column_and_json_is_ready():
    settings = resolve_settings("cpu")
    rows = [
        Row("inference.reference", "reference eager", "inference", 1, wall_ms=190.0, max_diff=0.0,
            vs_eager=1.0),
        Row("inference.optimized", "optimize_for_inference", "inference", 1, wall_ms=38.0, max_diff=7e-8,
            vs_eager=5.0, note="a | pipe"),
        Row("inference.cmrf", "cmrf default", "inference", 1).fail("TypeError: boom"),
        Row("training.cmrf", "cmrf default", "training", 1).skip("deadline 210 s reached"),
    ]
    report = _report(settings, rows)
    text = to_markdown(report)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert all(line.count("|") == len(COLUMNS) + 1 for line in table)  # the pipe in a note is escaped
    assert "| error |" in text and "TypeError: boom" in text
    assert "Skipped: training.cmrf (deadline 210 s reached)" in text
    data = json.loads(json.dumps(to_json(report)))
    assert data["skipped"] == ["training.cmrf"] and data["rows"][1]["max_diff"] == 7e-8
    rows[1].max_diff = math.nan  # strict JSON has no NaN: it is written as text
    assert json.loads(json.dumps(to_json(report), allow_nan=False))["rows"][1]["max_diff"] == "nan"


def test_targets_state_goal_and_verdict_never_a_result():
    settings = resolve_settings("cpu")
    met = Row("inference.optimized", "", "inference", 1, wall_ms=38.0, max_diff=7e-8, vs_eager=5.3)
    slow = Row("inference.optimized", "", "inference", 1, wall_ms=40.0, max_diff=7e-8, vs_eager=3.9)
    failed = Row("inference.optimized", "", "inference", 1).fail("boom")
    for row, verdict in ((met, "met: 5.30x eager"), (slow, "NOT met: 3.90x eager"), (failed, "unmeasured")):
        apply_targets(_report(settings, [row]), settings)
        assert row.target.startswith(">= 5x reference eager") and row.verdict.startswith(verdict)
    other = Row("inference.optimized", "", "inference", 8, wall_ms=30.0, max_diff=0.0, vs_eager=9.0)
    batch8 = resolve_settings("cpu", batch=8)
    apply_targets(_report(batch8, [other]), batch8)
    assert other.verdict == "n/a: this run has batch 8, the target 1"
    # a CUDA inference target needs the compile row too: without it the verdict says so
    cuda = BenchSettings(device="cuda", batch=16, size=256, precision="bf16")
    row = Row("inference.cmrf", "", "inference", 16, wall_ms=4.0, vs_eager=5.5, max_diff=0.02)
    apply_targets(_report(cuda, [row]), cuda)
    assert row.verdict == "unmeasured: vs compile (5.50x eager, diff 2.0e-02)"
    row.vs_eager, row.vs_compile = 2.0, 1.1
    apply_targets(_report(cuda, [row]), cuda)
    assert row.verdict == "NOT met: 2.00x eager, 1.10x compile"
    ref = Row("training.reference", "", "training", 16, wall_ms=130.0, peak_mib=900.0)
    fast = Row("training.cmrf", "", "training", 16, wall_ms=30.0, vs_eager=4.3, vs_compile=4.1,
               peak_mib=800.0, max_diff=0.01)
    apply_targets(_report(cuda, [ref, fast]), cuda)
    assert ref.target == ""
    assert fast.verdict == "met: 4.30x eager, 4.10x compile, diff 1.0e-02, peak 800 vs 900 MiB"
    fast.peak_mib = 1000.0  # fast, but more memory than the reference: the memory goal fails
    apply_targets(_report(cuda, [ref, fast]), cuda)
    assert fast.verdict == "NOT met: peak 1000 vs 900 MiB"
    # a bf16 cascade row in an fp32 run is judged by bf16's bound, not fp32's
    fp32_cuda = BenchSettings(device="cuda", batch=16, size=256, precision="fp32")
    cascade = Row("cascade.eval.b128.L0.bf16.fused", "", "cascade", 128, wall_ms=1.0, vs_eager=3.5,
                  max_diff=5e-2)
    apply_targets(_report(fp32_cuda, [cascade]), fp32_cuda)
    assert cascade.verdict.startswith("met: 3.50x eager, diff 5.0e-02"), cascade.verdict


def test_a_fast_row_with_a_wrong_output_meets_no_target():
    """Every goal is for the same math: garbage or NaN, however fast, is NOT met."""
    cuda = BenchSettings(device="cuda", batch=16, size=256, precision="bf16")
    for diff, shown in ((3.7, "diff 3.7e+00 > 1e-01"), (math.nan, "diff nan > 1e-01")):
        row = Row("inference.optimized", "", "inference", 16, wall_ms=1.0, vs_eager=6.0, vs_compile=4.0,
                  max_diff=diff)
        apply_targets(_report(cuda, [row]), cuda)
        assert row.verdict == f"NOT met: {shown}"
    fused = Row("cascade.eval.b128.L0.fp32.fused", "", "cascade", 128, wall_ms=1.0, vs_eager=4.0,
                max_diff=0.5)
    cascade = BenchSettings(device="cuda", size=256)
    apply_targets(_report(cascade, [fused]), cascade)
    assert fused.verdict == "NOT met: diff 5.0e-01 > 1e-03"  # fp32 cascade: the tighter bound
    cpu = resolve_settings("cpu")
    nan_row = Row("inference.onnxruntime", "", "inference", 1, wall_ms=1.0, vs_eager=9.0, max_diff=math.nan)
    apply_targets(_report(cpu, [nan_row]), cpu)
    assert nan_row.verdict == "NOT met: diff nan > 1e-04"
    # another N is another network: the goals are for TinyU-Net's N = 8
    n4 = resolve_settings("cpu", N=4)
    other = Row("inference.onnxruntime", "", "inference", 1, wall_ms=1.0, vs_eager=9.0, max_diff=1e-7)
    apply_targets(_report(n4, [other]), n4)
    assert other.verdict == "n/a: this run has N 4, the target 8"


# --- whole runs ------------------------------------------------------------------------------


def _rows(report: Report) -> dict[str, Row]:
    return {r.name: r for r in report.rows}


def test_cpu_run_checks_and_times_every_row():
    settings = resolve_settings("cpu", rows=("inference.optimized", "training.cmrf"), leak_calls=2, **TINY)
    lines = []
    report = run_benchmark(settings, progress=lines.append)
    rows = _rows(report)
    assert list(rows) == ["inference.reference", "inference.optimized", "training.reference", "training.cmrf"]
    for row in rows.values():
        assert row.status == "ok", row.note
        assert row.wall_ms > 0 and row.max_diff < TOL and row.kernel_ms is None
    assert rows["inference.reference"].vs_eager == pytest.approx(1.0)
    for name, reference in (("inference.optimized", "inference.reference"),
                            ("training.cmrf", "training.reference")):
        # the speed-up: the reference's time over the row's (> 1 is faster)
        assert rows[name].vs_eager == pytest.approx(rows[reference].wall_ms / rows[name].wall_ms)
    assert rows["inference.optimized"].extra["rss_growth"]["calls"] == 2
    assert rows["training.cmrf"].extra["grad_max_rel"] < 1e-3
    assert report.machine["threads"] == 1
    # each row's figures are in the progress log as soon as they are measured
    optimized = rows["inference.optimized"]
    assert any(f"inference.optimized: wall {optimized.wall_ms:.4g} ms" in line for line in lines)


def _fail_after(call, count):
    if next(count) >= 1:
        raise OSError("lost")
    return call()


def test_one_failing_row_does_not_stop_the_others(monkeypatch):
    import cmrf.bench.suite as suite

    real = suite.build_network_runner

    def build(name, ctx, settings):
        if name == "inference.optimized":
            raise RuntimeError("compile not supported on this device")
        runner = real(name, ctx, settings)
        if name == "inference.cmrf":  # fails while being timed, after its check passed
            runner.call = functools.partial(_fail_after, runner.call, itertools.count())
        return runner

    monkeypatch.setattr(suite, "build_network_runner", build)
    rows = ("inference.optimized", "inference.cmrf")
    settings = resolve_settings("cpu", rows=rows, **{**TINY, "repeats": 2})
    rows = _rows(run_benchmark(settings, progress=None))
    assert rows["inference.optimized"].status == "error"
    assert "RuntimeError: compile not supported" in rows["inference.optimized"].note
    assert rows["inference.cmrf"].status == "error" and "OSError: lost" in rows["inference.cmrf"].note
    assert rows["inference.reference"].status == "ok" and rows["inference.reference"].wall_ms > 0


@pytest.mark.parametrize("interrupt", [False, True])
def test_a_failing_phase_keeps_the_rows_measured_before_it(monkeypatch, interrupt):
    import cmrf.bench.suite as suite

    def sticky_error(self):
        if interrupt:  # Ctrl-C, or `timeout -s INT` in examples/gpu_check.sh
            raise KeyboardInterrupt
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(suite._Run, "cascade", sticky_error)
    settings = resolve_settings("cpu", rows=("inference.cmrf", "cascade.eval"), **TINY)
    lines = []
    report = run_benchmark(settings, progress=lines.append)
    rows = _rows(report)
    assert rows["inference.cmrf"].status == "ok" and rows["inference.cmrf"].wall_ms > 0
    # the rows the stop left are in the table, skipped, not missing
    cascade = [row for row in report.rows if row.group == "cascade"]
    assert cascade and all(row.status == "skipped" and "the run stopped" in row.note for row in cascade)
    assert report.interrupted == interrupt and to_json(report)["interrupted"] == interrupt
    if interrupt:
        assert report.notes[0].startswith("the run stopped in its cascade phase: KeyboardInterrupt")
        assert not any("Traceback" in line for line in lines)  # Ctrl-C is no bug to trace
        return
    assert report.notes[0].startswith("the run stopped in its cascade phase: RuntimeError: CUDA error")
    assert "illegal memory access" in to_markdown(report)
    assert any(line.startswith("Traceback") and "sticky_error" in line for line in lines)


def test_an_interrupt_while_timing_leaves_no_row_looking_measured(monkeypatch):
    import cmrf.bench.harness as harness

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "time_interleaved", interrupted)
    settings = resolve_settings("cpu", rows=("inference.cmrf",), **TINY)
    rows = _rows(run_benchmark(settings, progress=None))
    assert [row.status for row in rows.values()] == ["skipped", "skipped"]
    assert all(row.wall_ms is None and "not timed" in row.note for row in rows.values())


def test_a_row_whose_output_cannot_be_compared_is_not_timed(monkeypatch):
    import cmrf.bench.suite as suite

    real = suite.build_network_runner

    def build(name, ctx, settings):
        runner = real(name, ctx, settings)
        if name == "inference.optimized":  # an output one pixel narrower than the reference's
            check = runner.check
            runner.check = lambda: {k: v[..., 1:] for k, v in check().items()}
        return runner

    monkeypatch.setattr(suite, "build_network_runner", build)
    settings = resolve_settings("cpu", rows=("inference.optimized",), **TINY)
    row = _rows(run_benchmark(settings, progress=None))["inference.optimized"]
    assert row.status == "error" and "comparison with the reference failed" in row.note
    assert row.wall_ms is None and row.vs_eager is None


def test_fp16_training_rows_scale_the_loss_as_cmrf_train_does():
    """fp16 steps use a GradScaler (as `cmrf train`); the checked gradients are unscaled.
    CPU autocast stands in for CUDA's here (the settings allow fp16 on CUDA only)."""
    import dataclasses

    from cmrf.bench.network import NetworkContext, build_network_runner

    fp32 = resolve_settings("cpu", **TINY)
    fp16 = dataclasses.replace(fp32, precision="fp16")
    ctx = NetworkContext.create(fp32)
    exact = build_network_runner("training.cmrf", ctx, fp32).check()
    runner = build_network_runner("training.cmrf", ctx, fp16)
    scaled = runner.check()
    names = [name for name in exact if name.startswith("grad.")]
    exact_all = torch.cat([exact[name].flatten() for name in names])
    fp16_all = torch.cat([scaled[name].flatten() for name in names])
    # Unscaled: the same size as the fp32 gradients (scaled ones would be 65536 times larger),
    # and the same direction up to fp16 rounding.
    assert 0.8 < float(fp16_all.norm() / exact_all.norm()) < 1.25
    assert float(torch.nn.functional.cosine_similarity(fp16_all, exact_all, dim=0)) > 0.95
    runner.call()  # a scaled step: unscale, skip on infinite gradients, update the scale


def test_graph_row_fails_when_nothing_was_captured(monkeypatch):
    """If the capture fails, CUDAGraphInference runs eagerly; the graph row must not time that."""
    from types import SimpleNamespace

    import cmrf.inference as inference
    from cmrf import create_model
    from cmrf.bench.network import _optimized_graph_runner

    def capture_fails(x):
        raise RuntimeError("not capturable")

    optimize = inference.optimize_for_inference

    def uncapturable(model, cuda_graph=False):
        wrapped = inference.CUDAGraphInference(optimize(model))
        wrapped._eager = lambda x: False  # as if on a GPU
        wrapped._build = capture_fails
        return wrapped

    monkeypatch.setattr(inference, "optimize_for_inference", uncapturable)
    model = create_model("tinyunet", channels=(16, 32)).eval()
    ctx = SimpleNamespace(model=model, x=torch.randn(1, 3, 32, 32))
    runner = _optimized_graph_runner(ctx, resolve_settings("cpu", **TINY))
    warned = pytest.warns(RuntimeWarning, match="not capturable")
    with warned, pytest.raises(RuntimeError, match="no CUDA graph was captured"):
        runner.check()


def test_deadline_skips_rows_and_compile_rows_that_would_not_fit():
    selection = ("inference.optimized", "inference.compile")
    settings = resolve_settings("cpu", rows=selection, compile=True, compile_estimate_s=1e6, **TINY)
    rows = _rows(run_benchmark(settings, progress=None))
    assert rows["inference.compile"].status == "skipped"
    assert "would pass the deadline" in rows["inference.compile"].note
    assert rows["inference.optimized"].status == "ok"
    late = run_benchmark(resolve_settings("cpu", rows=selection, deadline_s=1e-6, **TINY), progress=None)
    assert late.rows and all(r.status == "skipped" and "deadline" in r.note for r in late.rows)
    assert "Skipped: inference.reference" in to_markdown(late)


def test_compile_row_is_compared_and_timed(monkeypatch):
    """The torch.compile path of the benchmark, with Dynamo's eager backend so that it stays fast."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    settings = resolve_settings("cpu", rows=("inference.compile",), compile=True, **TINY)
    rows = _rows(run_benchmark(settings, progress=None))
    compiled = rows["inference.compile"]
    assert compiled.status == "ok", compiled.note
    assert compiled.max_diff < TOL and compiled.extra["graphs"] >= 1 and "compiling" in compiled.note
    reference = rows["inference.reference"]
    assert reference.vs_compile == pytest.approx(compiled.wall_ms / reference.wall_ms)


def test_cascade_rows_run_in_the_interpreter_check_only():
    from cmrf.ops.cascade import triton_available
    from tests.conftest import fused_interpreter_problem

    if not triton_available() or fused_interpreter_problem():
        pytest.skip("no Triton that runs the fused kernels here")
    if torch.cuda.is_available():
        pytest.skip("on CUDA the cascade rows are timed at full size (the GPU check script runs them)")
    settings = resolve_settings("cpu", rows=("cascade.eval", "cascade.train.b1.L3"), N=2, **TINY)
    rows = _rows(run_benchmark(settings, progress=None))
    assert len(rows) == 2 * 4 + 2
    for name, row in rows.items():
        assert row.status == "check-only", (name, row.note)
        assert row.wall_ms is None and row.max_diff < 1e-5
        assert "Triton interpreter: correctness only, not timed" in row.note
    assert rows["cascade.train.b1.L3.fp32.fused"].extra["grad_max_rel"] < 1e-4


def test_with_n_1_the_fused_cascade_rows_are_skipped_with_the_reason():
    """N = 1 builds CMRFs without a cascade stage: the fused rows were errors."""
    settings = resolve_settings("cpu", rows=("cascade.eval.b1.L3",), N=1, **TINY)
    rows = _rows(run_benchmark(settings, progress=None))
    fused = rows["cascade.eval.b1.L3.fp32.fused"]
    assert fused.status == "skipped" and "N = 1: a CMRF has no cascade stage" in fused.note
    assert rows["cascade.eval.b1.L3.fp32.reference"].status != "error"


def test_a_run_leaves_the_callers_random_stream_and_says_when_memory_probed_nothing():
    """The rows reseeded torch's global generator (a caller's later draws changed), and --memory
    with only cascade rows probed nothing without a word."""
    settings = resolve_settings("cpu", rows=("cascade.eval.b1.L3",), N=1, memory=True, **TINY)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    report = run_benchmark(settings, progress=None)
    assert torch.equal(torch.rand(3), expected)
    assert any("--memory: no whole-network row" in note for note in to_json(report)["notes"])


def test_settings_built_by_hand_are_checked_as_resolved_ones():
    """run_benchmark(BenchSettings(...)) skipped the checks: unknown rows gave an empty report,
    repeats=0 a "StatisticsError: no median for empty data" note."""
    with pytest.raises(ValueError, match="matches no row"):
        run_benchmark(BenchSettings(rows=("nosuch",)), progress=None)
    with pytest.raises(ValueError, match="repeats must be an integer >= 1, got 0"):
        run_benchmark(BenchSettings(rows=("inference.optimized",), repeats=0, threads=1), progress=None)


def test_settings_take_one_value_or_several_without_repeats_and_refuse_non_bools():
    settings = resolve_settings("cpu", rows="inference", cascade_dtypes="fp32",
                                cascade_train_batches=[1, 1, 2])
    assert settings.rows == ("inference",) and settings.cascade_dtypes == ("fp32",)
    assert settings.cascade_train_batches == (1, 2)  # a repeated batch would time one row twice
    for name in ("compile", "memory"):
        with pytest.raises(ValueError, match=f"{name} must be True or False, got 'no'"):
            resolve_settings("cpu", **{name: "no"})
    with pytest.raises(ValueError, match="cascade_train_batches must be an integer >= 1"):
        resolve_settings("cpu", cascade_train_batches=16.5)


# --- the command line ------------------------------------------------------------------------


def test_bench_cli_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--device", "cpu", "--size", "32", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--rows", "inference.cmrf", "--json", str(path), "--quiet"]
    assert cli_main(argv) == 0
    out = capsys.readouterr()
    assert "| inference.cmrf: cmrf default | 1 |" in out.out and f"wrote {path}" in out.err
    data = json.loads(path.read_text())
    assert [r["name"] for r in data["rows"]] == ["inference.reference", "inference.cmrf"]
    assert data["settings"]["size"] == 32 and data["machine"]["torch"] == torch.__version__


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--size", "100"], "multiple of 16"),
        (["bench", "--device", "tpu"], "got 'tpu'"),
        (["bench", "--device", "cpu", "--rows", "inference.nope"], "matches no row"),
        (["bench", "--device", "cpu", "--precision", "bf16"], "CUDA"),
        (["bench-cascade", "--device", "cpu", "--rows", "training.cmrf", "--repeats", "0"], "repeats"),
        (["bench", "--device", "cpu", "--N", "3"], "multiples of 2N"),
        # flags named as flags (they were "deadline_s must be ...", "cascade_train_batches ...")
        (["bench", "--deadline", "0"], "argument --deadline: expected a finite number > 0"),
        (["bench", "--cascade-train-batch", "0"], "argument --cascade-train-batch: expected an integer >= 1"),
        (["bench", "--leak-calls", "-1"], "argument --leak-calls: expected an integer >= 0"),
        (["bench", "--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
        # an unset shell variable: the run went on for minutes and wrote no JSON (exit 0)
        (["bench", "--json", ""], "argument --json: expected a file or folder name, got ''"),
        (["train", "--out", ""], "argument --out: expected a file or folder name, got ''"),
    ],
)
def test_bench_cli_rejects_bad_arguments(argv, message, capsys):
    try:
        status = cli_main(argv)
    except SystemExit as stop:  # argparse's own refusals
        status = stop.code
    assert status == 2
    assert message in capsys.readouterr().err


def test_bench_cli_checks_the_json_path_before_running(tmp_path, monkeypatch, capsys):
    import cmrf.bench

    def must_not_run(*args, **kwargs):
        raise AssertionError("the bench ran before its --json path was checked")

    monkeypatch.setattr(cmrf.bench, "run_benchmark", must_not_run)
    base = ["bench", "--device", "cpu", "--rows", "inference.cmrf", "--json"]
    assert cli_main([*base, str(tmp_path / "missing" / "x.json")]) == 2
    assert f"{tmp_path / 'missing'}: no such folder for --json" in capsys.readouterr().err
    assert cli_main([*base, str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    weights = tmp_path / "best.safetensors"  # by a slip: kept, not replaced by the table
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert cli_main([*base, str(weights)]) == 2
    assert f"--json {weights} is an existing file that is not JSON" in capsys.readouterr().err


def test_bench_cascade_is_an_alias_for_the_cascade_rows():
    from cmrf.cli import build_parser

    args = build_parser("bench-cascade").parse_args(["bench-cascade", "--device", "cpu"])
    assert args.rows == ["cascade"] and args.run.__name__ == "run"
    args = build_parser("bench").parse_args(["bench"])
    assert args.rows is None  # all groups


def test_cpu_memory_probe_runs_a_row_in_a_fresh_process():
    from cmrf.bench.memory import probe_peak_rss

    settings = resolve_settings("cpu", rows=("inference.optimized",), **TINY)
    peak = probe_peak_rss("inference.optimized", settings, timeout_s=300)
    assert peak is None or 0 <= peak < 2048  # None where /proc cannot reset the peak (not Linux)



def test_cpu_memory_probe_failure_is_reported(monkeypatch):
    import subprocess

    import cmrf.bench.memory as memory

    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="Traceback ...\nValueError: boom\n")
    monkeypatch.setattr(memory.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError, match="memory probe failed: ValueError: boom"):
        memory.probe_peak_rss("inference.optimized", resolve_settings("cpu"))


def test_gradient_error_ignores_rounding_noise_of_zero_gradients_but_not_real_errors():
    from cmrf.bench.suite import _grad_max_rel

    ref = {"output": torch.zeros(1), "grad.w": torch.tensor([0.5, -1.0]), "grad.zero": torch.tensor([1e-9])}
    noisy = {"grad.w": torch.tensor([0.5, -1.0]), "grad.zero": torch.tensor([-2e-9])}
    assert _grad_max_rel(noisy, ref) < 1e-3
    wrong = {"grad.w": torch.tensor([0.5, -0.9]), "grad.zero": torch.tensor([1e-9])}
    assert _grad_max_rel(wrong, ref) == pytest.approx(0.1)
    assert _grad_max_rel({"output": torch.zeros(1)}, ref) is None


def test_hbm_share_uses_kernel_time_and_says_when_it_had_only_wall_time():
    import cmrf.bench.suite as suite

    settings = resolve_settings("cpu", rows=("cascade.eval",), N=2, **TINY)
    run = suite._Run(settings, lambda _: None)
    name = next(n for n in run.names if n.endswith(".fused"))
    timed = Row(name, "", "cascade", 1, wall_ms=2.0, kernel_ms=1.0)
    untimed = Row(name, "", "cascade", 1, wall_ms=2.0)
    run._hbm(timed, 1000.0)
    run._hbm(untimed, 1000.0)
    assert timed.hbm_pct == pytest.approx(2 * untimed.hbm_pct) and timed.note == ""
    assert untimed.note == "% HBM bound from wall time (no kernel time)"


def test_peak_bandwidth_from_the_properties_else_from_the_datasheet(monkeypatch):
    from types import SimpleNamespace

    from cmrf.bench.report import peak_bandwidth_gbs

    cuda = torch.device("cuda")
    props = {"clocked": SimpleNamespace(name="NVIDIA H100 80GB HBM3", memory_clock_rate=2_619_000,
                                        memory_bus_width=5120),
             "no clock": SimpleNamespace(name="NVIDIA H100 80GB HBM3", memory_clock_rate=0,
                                         memory_bus_width=5120),
             "h200": SimpleNamespace(name="NVIDIA H200", memory_clock_rate=0, memory_bus_width=0),
             "unknown": SimpleNamespace(name="Some GPU", memory_clock_rate=0, memory_bus_width=0),
             "gh200": SimpleNamespace(name="NVIDIA GH200 480GB", memory_clock_rate=0, memory_bus_width=0)}
    found = {}
    for key, value in props.items():
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, value=value: value)
        found[key] = peak_bandwidth_gbs(cuda)
    assert found["clocked"] == pytest.approx(3352.3, rel=1e-3)
    assert found["no clock"] == 3350.0 and found["h200"] == 4800.0 and found["unknown"] is None
    assert found["gh200"] is None  # 4.0 or 4.9 TB/s by model: not guessed
    assert peak_bandwidth_gbs(torch.device("cpu")) is None


def test_bench_cli_exits_130_after_printing_an_interrupted_run(tmp_path, monkeypatch, capsys):
    """Ctrl-C keeps the table and the JSON, but a script must tell the run was cut short."""
    import cmrf.bench

    def interrupted_run(settings, progress=None):
        return Report(machine={"device": "cpu"}, settings={}, notes=["the run stopped"], interrupted=True)

    monkeypatch.setattr(cmrf.bench, "run_benchmark", interrupted_run)
    monkeypatch.setattr(cmrf.bench, "to_markdown", lambda report: "| table |")
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--device", "cpu", "--rows", "inference.cmrf", "--json", str(out)]) == 130
    assert "| table |" in capsys.readouterr().out and json.loads(out.read_text())["interrupted"] is True


@pytest.mark.parametrize(("signal_name", "status", "word"), [("SIGINT", 130, "interrupted"),
                                                             ("SIGTERM", 143, "terminated")])
def test_bench_cli_reports_the_signal_that_stopped_the_run(tmp_path, monkeypatch, capsys, signal_name, status,
                                                           word):
    """SIGTERM (a scheduler's limit) stopped a run as Ctrl-C does, and was reported as Ctrl-C (130)."""
    import cmrf.bench.suite as suite
    import cmrf.cli

    stop = KeyboardInterrupt if signal_name == "SIGINT" else cmrf.cli._Terminated

    def stopped(self):
        raise stop()

    monkeypatch.setattr(suite._Run, "cascade", stopped)
    out = tmp_path / "bench.json"
    argv = ["bench", "--device", "cpu", "--rows", "inference.cmrf", "cascade.eval", "--json", str(out),
            *[str(a) for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", v)]]
    assert cli_main(argv) == status
    captured = capsys.readouterr()
    assert "inference.cmrf" in captured.out and json.loads(out.read_text())["interrupted"] is True
    assert captured.err.rstrip().endswith(f"cmrf bench: {word}")
    # --debug adds the traceback and keeps the status (it exited 1: scripts lost the signal)
    assert cli_main([*argv, "--debug"]) == status
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith(f"cmrf bench: {word}")


@pytest.mark.parametrize(("upsample_status", "expected"), [(0, 0), (3, 1)])
def test_gpu_check_script_reports_every_step_in_its_exit_status(tmp_path, upsample_status, expected):
    """examples/gpu_check.sh ignored the upsampling step's status (a timeout passed unnoticed)."""
    import subprocess
    from pathlib import Path

    fake_python = tmp_path / "python"  # stands in for each step: tests, bench, env report, upsampling
    fake_python.write_text(f"""#!/usr/bin/env bash
case "$*" in
  "-m pytest"*) echo "1 passed"; exit 0;;
  "-m cmrf bench"*) echo "| row | ms |"; exit 0;;
  "- cpu") cat >/dev/null; exit {upsample_status};;
  *) cat >/dev/null; exit 0;;
esac
""")
    fake_python.chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "examples" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": str(fake_python), "OUT": str(tmp_path / "out"), "BENCH_DEVICE": "cpu",
           "GPU_CHECK_UPSAMPLE": "1"}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == expected, result.stdout + result.stderr
    assert f"== upsampling exit status {upsample_status}" in result.stdout
    assert "== pytest exit status 0" in result.stdout and "== cmrf bench exit status 0" in result.stdout


def _fake_gpu_check(tmp_path, *args, **env_changes):
    """Run examples/gpu_check.sh with a stand-in python that logs each step's arguments."""
    import subprocess
    from pathlib import Path

    fake_python = tmp_path / "python"
    log = tmp_path / "calls.log"
    fake_python.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
case "$*" in
  "-m pytest"*) echo "1 passed"; exit 0;;
  "-m cmrf bench"*) echo "| row | ms |"; exit 0;;
  *) cat >/dev/null; exit 0;;
esac
""")
    fake_python.chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "examples" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": str(fake_python), "OUT": str(tmp_path / "out"), "BENCH_DEVICE": "cpu",
           **env_changes}
    result = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True,
                            timeout=120)
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls


def test_gpu_check_script_runs_the_benchmark_first_and_keeps_test_node_ids(tmp_path):
    """The benchmark (never yet measured on a GPU) waited behind up to 160 s of tests; node ids in
    GPU_CHECK_TESTS were dropped silently."""
    node = "tests/test_fused_cascade.py::test_cuda_graph_capture_eval_and_training"
    result, calls = _fake_gpu_check(tmp_path, GPU_CHECK_TESTS=f"{node} tests/nope.py")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [call.split()[1] if call.startswith("-m ") else call for call in calls]
    assert steps.index("cmrf") < steps.index("pytest")
    pytest_call = next(call for call in calls if call.startswith("-m pytest"))
    assert node in pytest_call and "--timeout 120" in pytest_call and "nope" not in pytest_call
    assert "== no such test file, left out: tests/nope.py" in result.stdout


def _steps(calls):
    """The steps the stand-in python saw: bench, pytest, or the upsampling script ("- cpu")."""
    names = {"-m cmrf bench": "bench", "-m pytest": "pytest", "- cpu": "upsample"}
    return [name for call in calls for prefix, name in names.items() if call.startswith(prefix)]


@pytest.mark.parametrize(("args", "env", "expected_steps", "test_limit"), [
    ((), {}, ["bench", "pytest"], 170),
    (("--tests-only",), {}, ["pytest"], 300),
    (("--bench-only",), {}, ["bench"], None),
    ((), {"GPU_CHECK_UPSAMPLE": "1"}, ["bench", "pytest", "upsample"], 170),
])
def test_gpu_check_script_steps(tmp_path, args, env, expected_steps, test_limit):
    """The CUDA test files outlast 110 s on an H200 (kernels compile per shape): the tests got a
    longer limit and a call of their own (--tests-only); the upsampling, measured, became opt-in."""
    result, calls = _fake_gpu_check(tmp_path, *args, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _steps(calls) == expected_steps
    if test_limit is not None:
        assert f"(timeout {test_limit} s)" in result.stdout


@pytest.mark.parametrize("args", [("--test-only",), ("--bench-only", "--tests-only")])
def test_gpu_check_script_refuses_an_unknown_option(tmp_path, args):
    result, calls = _fake_gpu_check(tmp_path, *args)
    assert result.returncode == 2 and "usage: bash examples/gpu_check.sh" in result.stderr
    assert calls == [] and not (tmp_path / "out").exists()


def test_gpu_check_script_help_is_usage_and_success(tmp_path):
    result, calls = _fake_gpu_check(tmp_path, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: bash examples/gpu_check.sh")
    assert calls == []


def test_gpu_check_script_runs_no_whole_suite_when_no_test_file_is_left(tmp_path):
    """An empty list made pytest collect the whole suite, which took the test step's time."""
    result, calls = _fake_gpu_check(tmp_path, GPU_CHECK_TESTS="tests/typo.py")
    assert result.returncode == 1 and "== no test to run" in result.stdout
    assert not any(call.startswith("-m pytest") for call in calls)
