"""Host time of one fused cascade call, kernels not run: what a GPU would wait on the CPU for.

    TRITON_INTERPRET=1 python examples/fused_host_time.py

Replaces the Triton launcher with a no-op, so only the Python and torch work around the kernels
runs (dispatch checks, cache keys, allocations, autograd, running-statistic updates), on CPU
tensors. TinyU-Net's N = 8 (seven stages), input ``(2, 16, 16, 16)``, one thread; prints the best
of 30 batches of 10 calls for eval (no grad, warm cache) and a training forward + backward.
The figures are in docs/fused.md ("Host work per call").
"""

import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels' module is imported

import torch  # noqa: E402

from cmrf import CMRF  # noqa: E402
from cmrf.ops import triton_cascade  # noqa: E402
from cmrf.ops.cascade import cascade_concat  # noqa: E402


def best_time_us(call, batches: int = 30, calls: int = 10) -> float:
    for _ in range(5):
        call()
    best = float("inf")
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    # No options; --help says what the script does instead of running it.
    raw = argparse.RawDescriptionHelpFormatter
    argparse.ArgumentParser(description=__doc__, formatter_class=raw).parse_args()
    torch.set_num_threads(1)
    triton_cascade._launch = lambda *args, **kwargs: None  # host side only
    stages = CMRF(16, 128).cascade
    y = torch.randn(2, 16, 16, 16)
    stages.eval()
    with torch.no_grad():
        eval_us = best_time_us(lambda: cascade_concat(y, stages, fused=True))
    stages.train()
    y.requires_grad_()

    def step():
        out = cascade_concat(y, stages, fused=True)
        out.backward(torch.ones_like(out))

    train_us = best_time_us(step)
    print(f"host time per fused call: eval {eval_us:.0f} us, training forward + backward {train_us:.0f} us")


if __name__ == "__main__":
    main()
