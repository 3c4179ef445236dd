"""Time CMRF's cascade, reference against fused, at TinyU-Net's four cascade shapes.

    python examples/bench_cascade.py                         # CUDA: eval batch 128, train batch 16 and 128
    python examples/bench_cascade.py --cascade-dtypes fp32 bf16 --json cascade.json

The same as ``cmrf bench --rows cascade`` (any option of ``cmrf bench --help`` works). Without a
GPU the fused kernels run in Triton's CPU interpreter on small shapes: the rows then check
correctness only and are not timed.
"""

import sys

from cmrf.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--rows", "cascade", *sys.argv[1:]]))
