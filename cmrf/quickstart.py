"""What ``cmrf quickstart`` prints: TinyU-Net's costs beside the paper's, and one timed forward pass."""

from __future__ import annotations

import time

__all__ = ["PAPER_GFLOPS", "PAPER_PARAMS_M", "quickstart_report"]

# TinyU-Net in the paper (3 in, 2 classes, 256x256).
PAPER_PARAMS_M = 0.48
PAPER_GFLOPS = 3.33


def quickstart_report(size: int = 256) -> str:
    """Build TinyU-Net (3 in, 2 classes), profile it and run one forward pass on a random image.

    Args:
        size: image side in pixels (default 256, the paper's); 16 or more (one pixel survives
            the four poolings; the decoder upsamples to each skip's size, so any such side works).

    Returns:
        A small table (parameters, paper-convention GFLOPs, fvcore GMACs; the paper's row and
        ours) and a line with the forward pass's output shape and wall time.
    """
    import torch

    from cmrf import create_model, profile

    model = create_model("tinyunet").eval()
    cost = profile(model, (1, 3, size, size))
    lines = [
        f"{'':12}{'params':>12}{'GFLOPs (paper conv.)':>24}{'fvcore GMACs':>16}",
        f"{'paper, 256²':12}{PAPER_PARAMS_M:>11.2f}M{PAPER_GFLOPS:>24.2f}{'-':>16}",
        f"{f'cmrf, {size}²':12}{cost.params / 1e6:>11.3f}M{cost.flops / 1e9:>24.4f}{cost.macs / 1e9:>16.4f}",
    ]
    image = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        start = time.perf_counter()
        logits = model(image)
        elapsed = time.perf_counter() - start
    lines.append(
        f"forward {tuple(image.shape)} -> {tuple(logits.shape)} in {elapsed * 1e3:.0f} ms "
        f"({torch.get_num_threads()} threads)"
    )
    return "\n".join(lines)
