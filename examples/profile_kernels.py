"""Where a `cmrf bench` row spends its time: the top kernels and host/device totals of a few calls.

    python examples/profile_kernels.py                         # CUDA defaults (batch 16, bf16)
    python examples/profile_kernels.py --rows training.cmrf --top 25
    python examples/profile_kernels.py --device cpu --batch 1  # CPU operators instead of kernels

Builds each row exactly as `cmrf bench` does (`cmrf.bench.network`: same model, input, precision
and variant), runs its untimed check and warm-up calls, then profiles ``--calls`` calls with
``torch.profiler`` and prints, per row: the wall time per call (the profiler slows the host a
little), the device time per call, and the operators or kernels that take most of it. On CUDA a
wall time well above the device time means the row waits on the host (launch overhead).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cmrf.bench.harness import device_event_us
from cmrf.bench.network import NetworkContext, build_network_runner
from cmrf.bench.settings import resolve_settings, row_names, selected

CUDA_ROWS = ["inference.cmrf", "inference.optimized-graph", "training.reference", "training.cmrf"]
CPU_ROWS = ["inference.cmrf", "inference.optimized", "training.reference", "training.cmrf"]


def profile_row(name: str, ctx: NetworkContext, settings, calls: int, top: int) -> None:
    runner = build_network_runner(name, ctx, settings)
    runner.check()
    for _ in range(3):
        runner.call()
    on_cuda = settings.on_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    device = settings.torch_device
    if on_cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            runner.call()
        if on_cuda:
            torch.cuda.synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / calls
    events = prof.key_averages()
    if on_cuda:
        # Kernels, copies and fills, as the bench sums them: not the operators' self device time
        # (it repeats their kernels') nor annotations such as the optimizer step's range.
        key = "self_device_time_total"
        device_us = sum(device_event_us(e) for e in events)
    else:
        key = "self_cpu_time_total"
        device_us = sum(e.self_cpu_time_total for e in events)
    device_ms = device_us / 1e3 / calls
    where = "kernels" if on_cuda else "CPU operators (self time)"
    print(f"## {name}: {wall_ms:.2f} ms wall per call under the profiler, {device_ms:.2f} ms of {where}\n")
    # Totals in the table are over all profiled calls; the header line above is per call.
    print(events.table(sort_by=key, row_limit=top, max_name_column_width=60))
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--rows", nargs="+", help="inference.* / training.* rows (default: "
                        f"CUDA {' '.join(CUDA_ROWS)}; CPU {' '.join(CPU_ROWS)})")
    parser.add_argument("--batch", type=int, help="images per call (CUDA 16, CPU 1)")
    parser.add_argument("--size", type=int, default=256, help="image side, a multiple of 16")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="CUDA bf16, CPU fp32")
    parser.add_argument("--calls", type=int, default=5, help="profiled calls per row (default 5)")
    parser.add_argument("--top", type=int, default=15, help="operators or kernels listed (default 15)")
    args = parser.parse_args()
    selectors = args.rows or (CPU_ROWS if args.device == "cpu" else CUDA_ROWS)
    overrides = {k: v for k, v in (("batch", args.batch), ("precision", args.precision)) if v is not None}
    try:  # the bench's own checks (device, size, precision, row names): one line each
        settings = resolve_settings(args.device, size=args.size, rows=tuple(selectors), **overrides)
    except ValueError as err:
        parser.error(str(err))
    # Groups and prefixes as `cmrf bench --rows` reads them (a group's reference row comes along).
    rows = [name for name in row_names(settings)
            if name.split(".")[0] in ("inference", "training") and selected(settings, name)]
    if not rows:
        parser.error(f"--rows {' '.join(selectors)}: no inference.* or training.* row (cascade rows "
                     "are profiled by `cmrf bench` itself)")
    ctx = NetworkContext.create(settings)
    print(f"{settings.device}, batch {settings.batch}, {settings.size}², {settings.precision}, "
          f"torch {torch.__version__}\n")
    for name in rows:
        profile_row(name, ctx, settings, args.calls, args.top)


if __name__ == "__main__":
    main()
