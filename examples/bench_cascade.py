"""Time CMRF's cascade, reference against fused, at TinyU-Net's four cascade shapes.

    python examples/bench_cascade.py                         # CUDA: eval batch 128, train batch 16 and 128
    python examples/bench_cascade.py --cascade-dtypes fp32 bf16 --json cascade.json

The same as ``cmrf bench --rows cascade``: every option of ``cmrf bench --help`` but ``--rows``
works. Without a GPU the fused kernels run in Triton's CPU interpreter on small shapes: the rows
then check correctness only and are not timed.
"""

import argparse
import sys

from cmrf.cli import main


def bench_arguments(argv: list[str]) -> list[str]:
    """``cmrf bench``'s arguments for this script's: the cascade rows and the caller's options."""
    parser = argparse.ArgumentParser(
        prog="python examples/bench_cascade.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other options: those of cmrf bench --help.",
    )
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    known, rest = parser.parse_known_args(argv)
    if known.rows is not None:
        parser.error(f"--rows {known.rows}: this script times the cascade rows only; for other rows run "
                     "cmrf bench --rows ...")
    return ["bench", "--rows", "cascade", *rest]


if __name__ == "__main__":
    sys.exit(main(bench_arguments(sys.argv[1:])))
