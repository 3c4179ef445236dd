"""Quickstart: build TinyU-Net, check its cost, drop CMRF into your own network.

    python examples/quickstart.py
"""

import argparse

import torch
from torch import nn

import cmrf


def main() -> None:
    # No options; --help says what the script does instead of running it.
    raw = argparse.RawDescriptionHelpFormatter
    argparse.ArgumentParser(description=__doc__, formatter_class=raw).parse_args()

    # 1. TinyU-Net as in the paper (3 input channels, 2 classes), from the registry.
    model = cmrf.create_model("tinyunet", in_chans=3, num_classes=2).eval()
    print(cmrf.profile(model, (1, 3, 256, 256)))  # 481,170 params, 3.3267 GFLOPs (paper convention)

    # 2. Any input size works, not only multiples of 16.
    with torch.inference_mode():
        print(model(torch.randn(1, 3, 250, 190)).shape)  # (1, 2, 250, 190)

    # 3. CMRF as a drop-in feature block: (B, 32, H, W) -> (B, 64, H, W).
    encoder_stage = nn.Sequential(cmrf.CMRF(32, 64, N=8), nn.MaxPool2d(2))
    print(encoder_stage(torch.randn(2, 32, 64, 64)).shape)  # (2, 64, 32, 32)

    # 4. Weights trained with the paper's reference code load as they are:
    #    cmrf.create_model("tinyunet", in_chans=1, num_classes=4, checkpoint_path="best_model.pth")


if __name__ == "__main__":
    main()
