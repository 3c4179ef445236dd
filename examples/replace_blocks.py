"""Swap CMRF into networks you already have: a SegNet and MONAI's U-Net.

    python examples/replace_blocks.py            # reports only (a few seconds)
    python examples/replace_blocks.py --costs    # plus Table 3 style costs at 1x3x256x256

``replace_blocks`` works on any encoder-decoder: it probes the model with one example input,
replaces every outermost block that keeps the resolution and holds two or more convolutions by
``CMRF(C_in, C_out, N)``, and prints what it changed. Nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from cmrf import create_model, profile, replace_blocks


def segnet_demo(N: int, costs: bool) -> None:
    print("== SegNet (cmrf zoo, VGG16-BN encoder-decoder) ==")
    model = create_model("segnet")
    before = profile(model, (1, 3, 256, 256)) if costs else None
    report = replace_blocks(model, N)
    print(report)
    if costs:
        after = profile(model, (1, 3, 256, 256))
        print(f"before: {before}\nafter:  {after}\n(paper, Table 3: 29.44M / 80.34G -> 0.64M / 7.02G)")
    x = torch.randn(2, 3, 64, 64)
    print("output:", tuple(model(x).shape), "\n")


def monai_demo(N: int, spatial_dims: int) -> None:
    try:
        from monai.networks.nets import BasicUNet
    except ImportError:
        print("MONAI is not installed (pip install 'cmrf[dev]'); skipping its U-Net")
        return
    print(f"== MONAI BasicUNet, spatial_dims={spatial_dims} ==")
    model = BasicUNet(spatial_dims=spatial_dims, in_channels=1, out_channels=3)
    side = 64 if spatial_dims == 2 else 32
    x = torch.randn((2, 1) + (side,) * spatial_dims)
    # A dry run first: see what would change, then do it.
    print(replace_blocks(model, N, dry_run=True, example_input=x[:1]), "\n")
    report = replace_blocks(model, N, example_input=x[:1])
    print(f"replaced {len(report.replaced)} blocks; output:", tuple(model(x).shape), "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--N", type=int, default=8, help="receptive fields per CMRF (default 8)")
    parser.add_argument("--costs", action="store_true", help="profile SegNet before/after at 256x256")
    args = parser.parse_args()
    if args.N < 1:
        parser.error(f"--N must be at least 1, got {args.N}")
    warnings.simplefilter("default")
    segnet_demo(args.N, args.costs)
    monai_demo(args.N, spatial_dims=2)
    monai_demo(args.N, spatial_dims=3)


if __name__ == "__main__":
    main()
