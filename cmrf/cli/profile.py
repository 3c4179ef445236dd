"""``cmrf profile NAME``: parameters, fvcore MACs and paper-convention FLOPs of a registry model."""

from __future__ import annotations

import argparse
import json

from cmrf.cli.model_args import (
    add_registry_model_arguments,
    constructor_kwargs,
    default_input_size,
    positive_int,
)

__all__ = ["build", "run_profile"]


def build(parser: argparse.ArgumentParser):
    add_registry_model_arguments(parser)
    parser.add_argument("--input-size", type=positive_int, nargs="+", default=None, metavar="S",
                        help="input shape B C *spatial (default 1 C 256 256 for images, 1 C 64 64 64 for "
                        "volumes, C the model's input channels); three sides build the model for volumes "
                        "(tinyunet as tinyunet3d, other models with spatial_dims=3)")
    parser.add_argument("--json", action="store_true",
                        help="print JSON: params, macs, flops, input_size, and the model measured (model, "
                        "spatial_dims, in_chans, num_classes, model_kwargs)")
    return run_profile


def run_profile(args: argparse.Namespace) -> int:
    from cmrf.profile import profile
    from cmrf.train.setup import build_model

    if args.input_size is not None and len(args.input_size) < 3:
        raise ValueError(f"--input-size must be B C *spatial (3 numbers or more), got {args.input_size}")
    given_chans = None if args.input_size is None else args.input_size[1]
    if args.in_chans is not None and given_chans is not None and args.in_chans != given_chans:
        raise ValueError(f"--in-chans {args.in_chans} does not match C = {given_chans} of --input-size "
                         f"{' '.join(map(str, args.input_size))}: give one of them, or the same number")
    in_chans = args.in_chans if args.in_chans is not None else given_chans or 3
    # The input's rank chooses the model's dimensionality, as the data's does in cmrf train:
    # tinyunet becomes tinyunet3d for a volume, cmunext and segnet get spatial_dims=3.
    spatial_dims = None if args.input_size is None else len(args.input_size) - 2
    model, name = build_model(args.model, in_chans, args.num_classes, spatial_dims=spatial_dims,
                              model_kwargs=constructor_kwargs(args))
    input_size = args.input_size or default_input_size(model, in_chans)
    result = profile(model, input_size)
    # The model measured, not the one asked for: tinyunet3d for tinyunet and a volume.
    label = name if spatial_dims in (None, 2) or name.endswith(f"{spatial_dims}d") \
        else f"{name} (spatial_dims={spatial_dims})"
    if args.json:
        measured = {"model": name, "spatial_dims": len(input_size) - 2, "in_chans": in_chans,
                    "num_classes": args.num_classes, "model_kwargs": constructor_kwargs(args)}
        print(json.dumps({**result.to_dict(), **measured}))
    else:
        print(f"{label}: {result}")
    return 0
