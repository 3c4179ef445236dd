"""``cmrf bench`` (TinyU-Net against the reference, on the CPU or CUDA) and ``cmrf bench-cascade``.

``bench-cascade`` is an alias of ``bench --rows cascade``: the same options, the cascade rows only.
"""

from __future__ import annotations

import argparse
import sys

from cmrf.bench.settings import GROUPS, PRECISIONS
from cmrf.cli.common import (
    check_output_file,
    check_replaces_only,
    non_negative_int,
    positive_int,
    positive_number,
    thread_count,
    user_path,
)

__all__ = ["build", "build_cascade"]


def _bench_threads(text: str) -> int:
    """``--threads`` of the bench: a set count (>= 1, up to the machine's limit), unlike the other
    commands' 0 (PyTorch's default) and -1 (the idle cores), which would make runs incomparable."""
    positive_int(text)
    return thread_count(text)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda or cuda:N (default auto: cuda when available, else cpu)")
    parser.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                        help=f"groups ({', '.join(GROUPS)}) or row names such as inference.optimized, "
                        "training.cmrf, cascade.eval (default: all); a group's reference row always runs")
    sizes = parser.add_argument_group("sizes (defaults: CPU batch 1, CUDA batch 16)")
    sizes.add_argument("--batch", type=positive_int, default=None,
                       help="images per inference call and training step")
    sizes.add_argument("--size", type=positive_int, default=None,
                       help="image side, a multiple of 16 (default 256)")
    sizes.add_argument("--precision", choices=sorted(PRECISIONS), default=None,
                       help="fp32, or bf16/fp16 autocast on CUDA (default: CUDA bf16, CPU fp32)")
    sizes.add_argument("--N", dest="N", type=positive_int, default=None,
                       help="receptive fields per CMRF (default 8)")
    sizes.add_argument("--threads", type=_bench_threads, default=None, help="CPU threads (default 2 on CPU)")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--repeats", type=positive_int, default=None, help="timed calls per row (default 10)")
    timing.add_argument("--warmup", type=non_negative_int, default=None,
                        help="untimed calls first (CUDA 3, CPU 2)")
    timing.add_argument("--train-repeats", type=positive_int, default=None,
                        help="timed steps (CUDA 10, CPU 3)")
    timing.add_argument("--train-warmup", type=non_negative_int, default=None,
                        help="untimed steps (CUDA 3, CPU 1)")
    compile_flags = timing.add_mutually_exclusive_group()
    compile_flags.add_argument("--compile", dest="compile", action="store_true", default=None,
                               help="add the torch.compile rows (default on CUDA)")
    compile_flags.add_argument("--no-compile", dest="compile", action="store_false",
                               help="skip the torch.compile rows (default on CPU: compiling takes minutes)")
    timing.add_argument("--deadline", dest="deadline_s", type=positive_number, default=None,
                        metavar="SECONDS",
                        help="start no row after this many seconds (CUDA 210, CPU 900)")
    timing.add_argument("--compile-estimate", dest="compile_estimate_s", type=positive_number, default=None,
                        metavar="SECONDS", help="expected compile time, for the deadline (CUDA 60, CPU 400)")
    cascade = parser.add_argument_group("cascade rows")
    cascade.add_argument("--cascade-eval-batch", type=positive_int, default=None,
                         help="eval batch (CUDA 128, CPU 1)")
    cascade.add_argument("--cascade-train-batch", dest="cascade_train_batches", type=positive_int, nargs="+",
                         default=None, help="training batches (CUDA 16 128, CPU 1)")
    cascade.add_argument("--cascade-dtypes", nargs="+", choices=sorted(PRECISIONS), default=None,
                         help="dtypes of the cascade rows (default fp32)")
    cascade.add_argument("--sweep", dest="cascade_sweep", action="store_true", default=None,
                         help="also time every candidate tiling of the fused kernels (rows fused.<config>)")
    cascade.add_argument("--peak-gbs", type=positive_number, default=None,
                         help="HBM bandwidth in GB/s for the %% of bound (default: from the CUDA device)")
    memory = parser.add_argument_group("CPU memory")
    memory.add_argument("--memory", action="store_true", default=None,
                        help="peak RSS of each row's first call, in a fresh process (slow)")
    memory.add_argument("--leak-calls", type=non_negative_int, default=None,
                        help="RSS growth over this many calls of the deployable rows (default 0: off)")
    parser.add_argument("--json", dest="json_path", type=user_path, default=None, metavar="PATH",
                        help="also write the figures as JSON to PATH")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


_SETTINGS = ("rows", "batch", "size", "precision", "N", "threads", "repeats", "warmup", "train_repeats",
             "train_warmup", "compile", "deadline_s", "compile_estimate_s", "cascade_eval_batch",
             "cascade_train_batches", "cascade_dtypes", "cascade_sweep", "peak_gbs", "memory", "leak_calls")


def build(parser: argparse.ArgumentParser):
    _add_arguments(parser)
    return run


def build_cascade(parser: argparse.ArgumentParser):
    """``bench-cascade``: ``bench`` with ``--rows cascade`` as the default."""
    _add_arguments(parser)
    parser.set_defaults(rows=["cascade"])
    return run


def run(args: argparse.Namespace) -> int:
    from cmrf.bench import resolve_settings, run_benchmark, to_json, to_markdown
    from cmrf.cli import EXIT_INTERRUPTED
    from cmrf.files import atomic_write_json

    options = {name: getattr(args, name) for name in _SETTINGS}
    for name in ("rows", "cascade_train_batches", "cascade_dtypes"):
        if options[name] is not None:
            options[name] = tuple(options[name])
    settings = resolve_settings(args.device, **options)
    if args.json_path:  # before a run of minutes, not after it
        check_output_file(args.json_path, "--json")
        check_replaces_only(args.json_path, "--json", ".json", "JSON")
    report = run_benchmark(settings, progress=None if args.quiet else _progress)
    print(to_markdown(report))
    if args.json_path:
        atomic_write_json(to_json(report), args.json_path)
        print(f"wrote {args.json_path}", file=sys.stderr)
    if report.interruption is not None:  # reported as any command's: Ctrl-C 130, SIGTERM 143
        raise report.interruption
    return EXIT_INTERRUPTED if report.interrupted else 0


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
