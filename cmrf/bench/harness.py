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

import contextlib
import statistics
import time
from collections.abc import Callable

import torch

__all__ = [
    "Deadline",
    "cuda_peak_mib",
    "describe_error",
    "device_event_us",
    "kernel_time_ms",
    "median",
    "release_cuda_cache",
    "synchronize",
    "time_interleaved",
]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_cuda_cache(device: torch.device) -> None:
    """Return the caching allocator's free blocks to the driver (CUDA only), never raising.

    After a sticky CUDA error (an illegal address in a kernel) every CUDA call fails, this one
    too; the row that caused it is already marked failed, and the run must still print the rows
    it measured.
    """
    if device.type != "cuda":
        return
    with contextlib.suppress(Exception):  # see above: the failing row reports the error
        torch.cuda.empty_cache()


def _summary(err: BaseException) -> str:
    """``Type: message`` in one line: the first line, and the last too when the first only
    introduces the rest (``... raised:``, Triton's ``at 12:8:``)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    message = lines[0] if lines else ""
    if message.endswith(":") and len(lines) > 1:
        message = f"{message} ... {lines[-1]}"
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def describe_error(err: BaseException, limit: int = 240) -> str:
    """One line for a table cell: the error's summary and its cause's (``raise ... from``, or the
    ``inner_exception`` torch.compile wraps), shortened to ``limit`` characters."""
    text = _summary(err)
    cause = getattr(err, "inner_exception", None) or err.__cause__
    if cause is not None and cause is not err:
        text = f"{text} (cause: {_summary(cause)})"
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
            release_cuda_cache(device)
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


def device_event_us(event) -> float:
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
    """Mean GPU time (ms) of the kernels, copies and fills one ``fn()`` launches; ``None`` off CUDA
    and when the profiler recorded no device event at all (no CUPTI: not measured, rather than 0).

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
    return _device_ms_per_call(prof.events(), calls)


def _device_ms_per_call(events, calls: int) -> float | None:
    """Milliseconds per call of the device ``events``; ``None`` when there are none."""
    device_us = [device_event_us(e) for e in events]
    return sum(device_us) / 1e3 / calls if any(device_us) else None


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
