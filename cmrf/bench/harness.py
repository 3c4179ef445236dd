"""The one timing harness of ``cmrf bench``: wall time, kernel time, peak memory, a deadline.

Every row of the benchmark, on every device, is timed by ``time_interleaved``: the rows of one
group are called in turn, one call each, and the order rotates every repeat. Load changes on a
shared machine then hit every row alike, and the cost of the first call after another runtime's
(threads waking up, caches) is spread evenly, where the median ignores it. A call's wall time is
``time.perf_counter`` around it, with ``torch.cuda.synchronize`` before and after on CUDA, so it
is what a user waits for (host overhead included). On CUDA, ``kernel_time_ms`` adds the GPU time
of the kernels one call launches (torch.profiler) and ``cuda_peak_mib`` the extra memory one
call needs (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = [
    "Deadline",
    "cuda_peak_mib",
    "describe_error",
    "kernel_time_ms",
    "median",
    "synchronize",
    "time_interleaved",
]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_error(err: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message``, shortened to ``limit`` characters, for a table cell."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {message}" if message else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def time_interleaved(
    calls: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    warmup: int,
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Wall milliseconds of every call, interleaved and rotated (see the module docstring).

    Args:
        calls: ``name -> fn()``; each ``fn`` does one full unit of work (a forward, a training step).
        device: where the work runs; CUDA is synchronised before and after every call.
        repeats: timed calls per name. warmup: untimed calls per name first.

    Returns:
        ``(samples, errors)``: ``samples[name]`` lists ``repeats`` times in ms; a call that raises is
        dropped from the rotation and ``errors[name]`` says why, so one failing row never stops the
        others.
    """
    samples: dict[str, list[float]] = {name: [] for name in calls}
    errors: dict[str, str] = {}
    live = list(calls)

    def call(name: str) -> float | None:
        try:
            synchronize(device)
            start = time.perf_counter()
            calls[name]()
            synchronize(device)
            return (time.perf_counter() - start) * 1e3
        except Exception as err:  # one failing row must not stop the others
            errors[name] = describe_error(err)
            live.remove(name)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    for _ in range(warmup):
        for name in list(live):
            call(name)
    for repeat in range(repeats):
        if not live:
            break
        shift = repeat % len(live)
        for name in live[shift:] + live[:shift]:
            ms = call(name)
            if ms is not None:
                samples[name].append(ms)
    return {name: s for name, s in samples.items() if name not in errors}, errors


def _device_event_us(event) -> float:
    """GPU microseconds of one profiler event that ran on the device (0 for host events)."""
    device_type = getattr(event, "device_type", None)
    if device_type is None or device_type == torch.autograd.DeviceType.CPU:
        return 0.0
    if getattr(event, "is_user_annotation", False):
        return 0.0
    total = getattr(event, "self_device_time_total", None)
    if total is None:  # torch < 2.4
        total = getattr(event, "self_cuda_time_total", 0.0)
    return float(total)


def kernel_time_ms(fn: Callable[[], object], device: torch.device, calls: int = 2) -> float | None:
    """Mean GPU time (ms) of the kernels, copies and fills one ``fn()`` launches; ``None`` off CUDA.

    Summed over the device events torch.profiler records, as its table's "Self CUDA time total".
    """
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    return sum(_device_event_us(e) for e in prof.events()) / 1e3 / calls


def cuda_peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Extra CUDA memory one ``fn()`` needs: the allocator's peak during it minus what was allocated before.

    That is the call's working set (activations, gradients, workspace), independent of what
    other rows keep alive in the same process. ``None`` off CUDA.
    """
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return max(torch.cuda.max_memory_allocated(device) - before, 0) / 2**20


class Deadline:
    """Seconds left of a wall-clock budget that started when this object was made.

    Args:
        seconds: the budget; ``None`` never expires.
        clock: a ``time.monotonic``-like function (tests pass a fake one).
    """

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        return self._clock() - self._start

    def remaining(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def allows(self, needed_s: float = 0.0) -> bool:
        """Whether ``needed_s`` more seconds fit before the deadline."""
        return self.remaining() > needed_s
