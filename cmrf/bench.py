"""``cmrf bench``: CPU inference speed of TinyU-Net, measured against the reference algorithm.

Rows, each timed in the same run on the same input: ``baseline`` (the reference TinyU-Net
algorithm restated below as plain functional PyTorch, with the weights of the cmrf model),
``eager`` (``cmrf.TinyUNet``), ``optimized`` (``cmrf.optimize_for_inference``) and ``onnxruntime``
(our ONNX export of the optimized model, when ``onnxruntime`` is installed). Every row's output
is checked against the baseline before it is timed.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cmrf.reference import reference_tinyunet

# --- memory ----------------------------------------------------------------------------------


def current_rss_mib() -> float | None:
    """Resident set size of this process in MiB (Linux; ``None`` elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs``); ``False`` where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float | None:
    """Peak resident set size of this process in MiB since start or ``reset_peak_rss`` (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError):
        pass
    return None


# --- the rows --------------------------------------------------------------------------------

ROWS = ("baseline", "eager", "optimized", "onnxruntime")


def _onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def build_runners(model, rows, onnx_path: Path | None, threads: int) -> dict[str, Callable]:
    """``name -> f(x) -> Tensor`` for each requested row, all computing ``model.eval()(x)``."""
    from cmrf.inference import optimize_for_inference

    model = model.eval()
    runners = {}
    if "baseline" in rows:
        weights = {k: v.detach() for k, v in model.state_dict().items()}
        n, depth = model.encoders[0].N, len(model.channels)
        runners["baseline"] = lambda x: reference_tinyunet(x, weights, n, depth)
    if "eager" in rows:
        runners["eager"] = model
    if "optimized" in rows:
        runners["optimized"] = optimize_for_inference(model)
    if "onnxruntime" in rows:
        runners["onnxruntime"] = _onnxruntime_runner(model, onnx_path, threads)
    return runners


def _onnxruntime_runner(model, onnx_path: Path, threads: int) -> Callable:
    import onnxruntime as ort

    from cmrf.export import export_onnx

    if not onnx_path.is_file():
        export_onnx(model, onnx_path, (1, model.in_channels, 256, 256), dynamic=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # ONNX Runtime's threads spin for a while after each run by default; interleaved with the
    # PyTorch rows they would steal the cores PyTorch's threads need and distort every row.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])

    return run


def time_rows(
    runners: dict[str, Callable], x: torch.Tensor, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of every runner.

    Rows are interleaved so that load changes hit all alike, and their order rotates every
    repeat: the first call after another runtime's (its threads waking up) costs more, and
    rotating spreads that cost evenly, where the median ignores it.
    """
    times = {name: [] for name in runners}
    names = list(runners)
    with torch.inference_mode():
        for _ in range(warmup):
            for run in runners.values():
                run(x)
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                runners[name](x)
                times[name].append(time.perf_counter() - start)
    return times


def check_rows(
    runners: dict[str, Callable], x: torch.Tensor, reference: str = "baseline"
) -> dict[str, float]:
    """Largest absolute difference of every runner's output from ``reference``'s on ``x``."""
    with torch.inference_mode():
        outputs = {name: run(x).float() for name, run in runners.items()}
    expected = outputs.get(reference, next(iter(outputs.values())))
    return {name: float((out - expected).abs().max()) for name, out in outputs.items()}


def memory_probe(row: str, batch: int, size: int, onnx_path: str, threads: int, config: dict) -> dict:
    """Peak RSS growth of the first call of one row, in a fresh process (run via ``_probe_main``)."""
    torch.set_num_threads(threads)
    model = _bench_model(config)
    runner = build_runners(model, (row,), Path(onnx_path), threads)[row]
    x = torch.randn(batch, model.in_channels, size, size)
    gc.collect()
    before = current_rss_mib()
    if before is None or not reset_peak_rss():
        return {"peak_mib": None}
    with torch.inference_mode():
        runner(x)
    return {"peak_mib": max(peak_rss_mib() - before, 0.0)}


def _probe_main(argv: list[str]) -> None:
    row, batch, size, onnx_path, threads, config = argv
    print(json.dumps(memory_probe(row, int(batch), int(size), onnx_path, int(threads), json.loads(config))))


def measure_peak_memory(row: str, batch: int, size: int, onnx_path: Path, threads: int, config: dict):
    """Peak memory one call of ``row`` adds (MiB), measured in a fresh Python process.

    In a fresh process the allocator holds nothing yet, so the peak RSS growth over the first
    call (input excluded) is that call's working set: activations, workspace, one-time kernel
    set-up; in a warm process freed memory is reused and the figure would mean little.
    ``None`` where the peak RSS cannot be reset (not Linux).
    """
    import subprocess

    code = "import sys; from cmrf.bench import _probe_main; _probe_main(sys.argv[1:])"
    args = [row, str(batch), str(size), str(onnx_path), str(threads), json.dumps(config)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if result.returncode:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def rss_growth(run: Callable, x: torch.Tensor, calls: int, warmup: int = 20) -> dict:
    """RSS before and after ``calls`` repeated calls (after ``warmup`` calls); growth in MiB."""
    with torch.inference_mode():
        for _ in range(warmup):
            run(x)
        gc.collect()
        start = current_rss_mib()
        for _ in range(calls):
            run(x)
        gc.collect()
        end = current_rss_mib()
    growth = None if start is None else end - start
    return {"calls": calls, "rss_start_mib": start, "rss_end_mib": end, "growth_mib": growth}


# --- the benchmark ---------------------------------------------------------------------------


def _bench_model(config: dict):
    from cmrf.models import create_model

    torch.manual_seed(0)
    return create_model(config["model"], in_chans=3, num_classes=config["num_classes"]).eval()


def machine_info(threads: int) -> dict:
    """What the figures depend on: CPU model, core count, threads, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if _onnxruntime_available():
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    return info


def run_benchmark(
    model_name: str = "tinyunet",
    batch_sizes: tuple[int, ...] = (1, 8),
    size: int = 256,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    rows: tuple[str, ...] = ROWS,
    memory: bool = True,
    leak_calls: int = 1000,
    num_classes: int = 2,
) -> dict:
    """Time every row at every batch size; return the figures as a JSON-ready dict.

    Args:
        model_name: registry name of the TinyU-Net variant. Default ``tinyunet``.
        batch_sizes: batches to time. Default ``(1, 8)``.
        size: image side (3 x size x size inputs). Default 256.
        repeats: timed calls per row and batch (median reported). Default 20.
        warmup: untimed calls first. Default 3.
        threads: torch and ONNX Runtime threads; ``None`` keeps ``torch.get_num_threads()``
            (which follows ``OMP_NUM_THREADS``).
        rows: subset of ``ROWS``; ``onnxruntime`` is dropped when it is not installed.
        memory: measure each row's peak memory in a fresh process.
        leak_calls: repeated batch-1 calls for the RSS-growth check of ``optimized`` and
            ``onnxruntime`` (0 skips it).
    """
    threads = torch.get_num_threads() if threads is None else threads
    torch.set_num_threads(threads)
    rows = tuple(r for r in rows if r != "onnxruntime" or _onnxruntime_available())
    config = {"model": model_name, "num_classes": num_classes}
    model = _bench_model(config)
    if getattr(model, "spatial_dims", None) != 2 or not hasattr(model, "encoders"):
        raise ValueError(f"cmrf bench times 2-D TinyU-Net variants (e.g. tinyunet), got {model_name!r}")
    result = {"machine": machine_info(threads), "model": model_name, "size": size, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / f"{model_name}.onnx"
        runners = build_runners(model, rows, onnx_path, threads)
        for batch in batch_sizes:
            x = torch.randn(batch, model.in_channels, size, size)
            diffs = check_rows(runners, x)
            times = time_rows(runners, x, repeats, warmup)
            base = statistics.median(times["baseline"]) if "baseline" in times else None
            for name, seconds in times.items():
                median = statistics.median(seconds)
                peak = measure_peak_memory(name, batch, size, onnx_path, threads, config) if memory else None
                result["rows"].append({
                    "row": name,
                    "batch": batch,
                    "median_ms": median * 1e3,
                    "min_ms": min(seconds) * 1e3,
                    "images_per_s": batch / median,
                    "speedup_vs_baseline": base / median if base else None,
                    "peak_mem_mib": peak,
                    "max_abs_diff_vs_baseline": diffs[name],
                })
        if leak_calls > 0:
            x = torch.randn(1, model.in_channels, size, size)
            result["rss_growth"] = {
                name: rss_growth(runners[name], x, leak_calls)
                for name in ("optimized", "onnxruntime")
                if name in runners
            }
    return result


def format_table(result: dict) -> str:
    """The benchmark as a Markdown table plus the machine and RSS lines."""
    m = result["machine"]
    lines = [
        f"{result['model']} fp32 on {m['cpu']} ({m['logical_cpus']} logical CPUs, {m['threads']} threads), "
        f"torch {m['torch']}" + (f", onnxruntime {m['onnxruntime']}" if "onnxruntime" in m else "")
        + f", {m['date']}",
        "",
        "| row | batch | median ms | images/s | speedup vs baseline | peak memory MiB | max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        speedup = f"{r['speedup_vs_baseline']:.2f}x" if r["speedup_vs_baseline"] else "-"
        peak = f"{r['peak_mem_mib']:.0f}" if r["peak_mem_mib"] is not None else "-"
        lines.append(
            f"| {r['row']} | {r['batch']} | {r['median_ms']:.1f} | {r['images_per_s']:.1f} | {speedup} "
            f"| {peak} | {r['max_abs_diff_vs_baseline']:.1e} |"
        )
    for name, g in result.get("rss_growth", {}).items():
        if g["growth_mib"] is not None:
            lines.append(
                f"\nRSS over {g['calls']} calls of {name} (batch 1): {g['rss_start_mib']:.1f} -> "
                f"{g['rss_end_mib']:.1f} MiB (growth {g['growth_mib']:+.1f} MiB)"
            )
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------


def build_command(parser):
    parser.add_argument("--model", default="tinyunet", help="registry name (default tinyunet)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--size", type=int, default=256, help="image side (default 256)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per row (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch / ONNX Runtime threads (default: torch.get_num_threads(), set by OMP_NUM_THREADS)",
    )
    parser.add_argument(
        "--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run (default all)"
    )
    parser.add_argument("--leak-calls", type=int, default=1000, help="calls for the RSS check (0 skips)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-row peak-memory probes")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    return _run_bench


def _run_bench(args) -> int:
    from cmrf.layers import check_positive_int

    for name in ("size", "repeats"):
        check_positive_int(name, getattr(args, name))
    for b in args.batch:
        check_positive_int("batch", b)
    if args.threads is not None:
        check_positive_int("threads", args.threads)
    if args.warmup < 0 or args.leak_calls < 0:
        raise ValueError(f"--warmup and --leak-calls must be >= 0, got {args.warmup} and {args.leak_calls}")
    if args.size % 16:
        raise ValueError(f"--size must be a multiple of 16 (as the reference needs), got {args.size}")
    rows = tuple(args.rows)
    if "baseline" not in rows:
        rows = ("baseline", *rows)  # every ratio needs the baseline measured in the same run
    result = run_benchmark(
        args.model, tuple(args.batch), args.size, args.repeats, args.warmup, args.threads, rows,
        memory=not args.no_memory, leak_calls=args.leak_calls,
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
