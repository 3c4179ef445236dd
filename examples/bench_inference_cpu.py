"""Time ``optimize_for_inference`` against the reference TinyU-Net algorithm on the CPU, interleaved.

    PYTHONPATH=. python examples/bench_inference_cpu.py --threads 2 --repeats 15
    PYTHONPATH=. python examples/bench_inference_cpu.py --threads 1 --size 256 --batch 1

Both run in one process on the same input and weights (BatchNorm statistics randomised, as in
``cmrf bench``), one call of each in turn, so a machine whose load changes during the run slows
both alike. Prints the median of each and their ratio, plus the max |difference| of the outputs.
The reference is ``cmrf.reference.reference_tinyunet``, the baseline of ``cmrf bench``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import cmrf
from cmrf.bench.network import randomise_batchnorm
from cmrf.reference import reference_tinyunet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls of each (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each first (default 3)")
    parser.add_argument("--size", type=int, default=256, help="image side (default 256)")
    parser.add_argument("--batch", type=int, default=1, help="batch (default 1)")
    parser.add_argument("--path", default="auto", help="optimize_for_inference path (default auto)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = randomise_batchnorm(cmrf.create_model("tinyunet")).eval()
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    n, depth = model.encoders[0].N, len(model.channels)
    fast = cmrf.optimize_for_inference(model, path=args.path)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))

    def reference():
        return reference_tinyunet(x, weights, n, depth)

    def optimized():
        return fast(x)

    wall = {"reference": [], "optimized": []}
    cpu = {"reference": [], "optimized": []}
    with torch.inference_mode():
        difference = (optimized() - reference()).abs().max().item()
        for _ in range(args.warmup):
            reference(), optimized()
        for _ in range(args.repeats):
            for name, fn in (("reference", reference), ("optimized", optimized)):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(1e3 * (time.perf_counter() - start))
                cpu[name].append(1e3 * (time.process_time() - start_cpu))
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, "
          f"3x{args.size}x{args.size}, fp32, path {fast.inference_path}, max |difference| {difference:.1e}")
    # Wall time is what counts; process CPU time (all threads) is steadier on a loaded machine,
    # where the wall clock also counts the time other processes hold the cores.
    for label, times in (("wall", wall), ("cpu", cpu)):
        ref, opt = statistics.median(times["reference"]), statistics.median(times["optimized"])
        best = min(times["reference"]) / min(times["optimized"])
        print(f"{label:4s} reference {ref:7.1f} ms (min {min(times['reference']):7.1f}), optimized "
              f"{opt:6.1f} ms (min {min(times['optimized']):6.1f}): {ref / opt:.2f}x "
              f"(medians of {args.repeats}; min/min {best:.2f}x)")


if __name__ == "__main__":
    main()
