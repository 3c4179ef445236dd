"""CPU memory of a row: peak RSS of its first call in a fresh process, and RSS growth over many calls.

Linux only (``/proc``); elsewhere the figures are ``None``. A fresh process is used for the peak
because in a warm one the allocator reuses memory freed by earlier rows and the figure would
mean little; the probe costs a Python start and a model build per row, so it is opt-in.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys

__all__ = ["current_rss_mib", "peak_rss_mib", "probe_peak_rss", "reset_peak_rss", "rss_growth"]


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
    """Peak RSS of this process in MiB since start or ``reset_peak_rss`` (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError):
        pass
    return None


def _probe(name: str, settings_json: str) -> dict:
    """In the fresh process: build row ``name``, then peak RSS growth over its first call."""
    import torch

    from cmrf.bench.network import NetworkContext, build_network_runner
    from cmrf.bench.settings import BenchSettings

    settings = BenchSettings(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in json.loads(settings_json).items()})
    if settings.threads:
        torch.set_num_threads(settings.threads)
    runner = build_network_runner(name, NetworkContext.create(settings), settings)
    gc.collect()
    before = current_rss_mib()
    if before is None or not reset_peak_rss():
        return {"peak_mib": None}
    runner.call()
    return {"peak_mib": max(peak_rss_mib() - before, 0.0)}


def probe_main() -> None:
    """Entry point of the probe process: ``argv = [name, settings_json]``; prints one JSON line."""
    print(json.dumps(_probe(sys.argv[1], sys.argv[2])))


def probe_peak_rss(name: str, settings, timeout_s: float = 600) -> float | None:
    """Peak memory (MiB) the first call of row ``name`` adds, measured in a fresh Python process.

    The model copy exists before the measurement starts, so the figure is the call's working set:
    activations, workspace, one-time kernel set-up, and for the rows that make their graph on the
    first call (``freeze=True``, ONNX Runtime) the trace or export.

    Raises:
        RuntimeError: when the probe process fails (its last stderr line is in the message).
    """
    code = "from cmrf.bench.memory import probe_main; probe_main()"
    env = dict(os.environ)
    if settings.threads:
        env["OMP_NUM_THREADS"] = str(settings.threads)
    args = [sys.executable, "-c", code, name, json.dumps(dataclasses.asdict(settings))]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout_s)
    if result.returncode:
        lines = result.stderr.strip().splitlines() or ["no output"]
        raise RuntimeError(f"memory probe failed: {lines[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def rss_growth(call, calls: int, warmup: int = 20) -> dict:
    """RSS before and after ``calls`` calls of ``call()`` (after ``warmup`` calls); growth in MiB."""
    for _ in range(warmup):
        call()
    gc.collect()
    start = current_rss_mib()
    for _ in range(calls):
        call()
    gc.collect()
    end = current_rss_mib()
    growth = None if start is None or end is None else end - start
    return {"calls": calls, "rss_start_mib": start, "rss_end_mib": end, "growth_mib": growth}
