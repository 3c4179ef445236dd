"""Benchmark CMRF's fused Triton cascade against the eager PyTorch reference.

    python examples/bench_cascade.py                  # CUDA: TinyU-Net shapes, batch 16, 256x256
    python examples/bench_cascade.py --dtypes bf16    # any option of `cmrf bench-cascade --help`

Without a GPU it runs the kernels in Triton's CPU interpreter on tiny shapes: a correctness check,
not a speed measurement. Figures are printed and written to bench_cascade.json (``--json``).
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    # Triton reads this when kernels are defined, so set it before cmrf's kernels are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cmrf.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench-cascade", *sys.argv[1:]]))
