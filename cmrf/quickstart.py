"""``cmrf quickstart``: build TinyU-Net, print its costs beside the paper's, run one forward."""

from __future__ import annotations

import time

# TinyU-Net in the paper (3 in, 2 classes, 256x256).
PAPER_PARAMS_M = 0.48
PAPER_GFLOPS = 3.33


def build_command(parser):
    parser.add_argument("--size", type=int, default=256, help="image side (default 256)")
    return run


def run(args) -> int:
    import torch

    from cmrf import create_model, profile

    model = create_model("tinyunet").eval()
    cost = profile(model, (1, 3, args.size, args.size))
    print(f"{'':12}{'params':>12}{'GFLOPs (paper conv.)':>24}{'fvcore GMACs':>16}")
    print(f"{'paper':12}{PAPER_PARAMS_M:>11.2f}M{PAPER_GFLOPS:>24.2f}{'-':>16}")
    print(f"{'cmrf':12}{cost.params / 1e6:>11.3f}M{cost.flops / 1e9:>24.4f}{cost.macs / 1e9:>16.4f}")
    image = torch.randn(1, 3, args.size, args.size)
    with torch.inference_mode():
        start = time.perf_counter()
        logits = model(image)
        elapsed = time.perf_counter() - start
    print(f"forward {tuple(image.shape)} -> {tuple(logits.shape)} in {elapsed * 1e3:.0f} ms "
          f"({torch.get_num_threads()} threads)")
    return 0
