"""Time ``optimize_for_inference`` against the reference TinyU-Net algorithm on the CPU, interleaved.

    PYTHONPATH=. python examples/bench_inference_cpu.py --threads 2 --repeats 15
    PYTHONPATH=. python examples/bench_inference_cpu.py --threads 1 --size 256 --batch 1
    PYTHONPATH=. python examples/bench_inference_cpu.py --threads 2 --freeze --compile

``--freeze`` adds ``optimize_for_inference(model, freeze=True)`` (frozen TorchScript per shape);
``--compile`` adds ``torch.compile`` with Inductor and ``freezing`` over the optimized module
(needs a C++ compiler; minutes to compile on a small machine). Their build time is printed.

Both run in one process on the same input and weights (BatchNorm statistics randomised, as in
``cmrf bench``), one call of each in turn, so a machine whose load changes during the run slows
both alike. Prints the median of each and their ratio, plus the max |difference| of the outputs.
The reference is ``cmrf.reference.reference_tinyunet``, the baseline of ``cmrf bench``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import cmrf
from cmrf.bench.network import randomise_batchnorm
from cmrf.cli.common import thread_count
from cmrf.inference import PATHS
from cmrf.reference import reference_tinyunet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=thread_count, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls of each (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each first (default 3)")
    parser.add_argument("--size", type=int, default=256, help="image side (default 256)")
    parser.add_argument("--batch", type=int, default=1, help="batch (default 1)")
    parser.add_argument("--path", default="auto", choices=["auto", *PATHS],
                        help="optimize_for_inference path (default auto)")
    parser.add_argument("--freeze", action="store_true", help="also time freeze=True")
    parser.add_argument("--compile", action="store_true", help="also time Inductor over the optimized module")
    args = parser.parse_args()
    if args.size < 16 or args.size % 16:
        parser.error(f"--size must be a multiple of 16 (the reference TinyU-Net needs it), got {args.size}")
    for name in ("threads", "repeats", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = randomise_batchnorm(cmrf.create_model("tinyunet")).eval()
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    n, depth = model.encoders[0].N, len(model.channels)
    fast = cmrf.optimize_for_inference(model, path=args.path)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))

    fns: dict[str, Callable[[], torch.Tensor]] = {
        "reference": lambda: reference_tinyunet(x, weights, n, depth),
        "optimized": lambda: fast(x),
    }
    with torch.inference_mode():
        expected = model(x)
    builders = {}
    if args.freeze:
        builders["frozen"] = lambda: cmrf.optimize_for_inference(model, path=args.path, freeze=True)
    if args.compile:
        import torch._inductor.config as inductor_config

        # freezing: weights become constants, so Inductor folds them and prepacks them for oneDNN
        inductor_config.freezing = True
        builders["compiled"] = lambda: torch.compile(fast, dynamic=False)
    difference = {}
    with torch.inference_mode():
        for name, build in builders.items():
            start = time.perf_counter()
            module = build()
            module(x)  # the first call traces / compiles
            print(f"{name}: built and first call in {time.perf_counter() - start:.1f} s")
            fns[name] = lambda module=module: module(x)
        for name, fn in fns.items():
            difference[name] = (fn() - expected).abs().max().item()
        for _ in range(args.warmup):
            for fn in fns.values():
                fn()
        wall = {name: [] for name in fns}
        cpu = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(1e3 * (time.perf_counter() - start))
                cpu[name].append(1e3 * (time.process_time() - start_cpu))
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, "
          f"3x{args.size}x{args.size}, fp32, path {fast.inference_path}, medians of {args.repeats}")
    # Wall time is what counts; process CPU time (all threads) is steadier on a loaded machine,
    # where the wall clock also counts the time other processes hold the cores.
    for label, times in (("wall", wall), ("cpu", cpu)):
        ref = statistics.median(times["reference"])
        for name in fns:
            median, best = statistics.median(times[name]), min(times[name])
            print(f"{label:4s} {name:9s} {median:7.1f} ms (min {best:7.1f}): {ref / median:5.2f}x "
                  f"(min/min {min(times['reference']) / best:5.2f}x), "
                  f"max |difference| vs model {difference[name]:.1e}")


if __name__ == "__main__":
    main()
