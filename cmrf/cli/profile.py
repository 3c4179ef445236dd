"""``cmrf profile NAME``: parameters, fvcore MACs and paper-convention FLOPs of a registry model."""

from __future__ import annotations

import argparse
import json

from cmrf.cli.model_args import add_registry_model_arguments, constructor_kwargs, positive_int

__all__ = ["build", "run_profile"]


def build(parser: argparse.ArgumentParser):
    add_registry_model_arguments(parser)
    parser.add_argument("--input-size", type=positive_int, nargs="+", default=[1, 3, 256, 256], metavar="S",
                        help="input shape B C *spatial (default 1 3 256 256)")
    parser.add_argument("--json", action="store_true", help="print JSON: params, macs, flops, input_size")
    return run_profile


def run_profile(args: argparse.Namespace) -> int:
    from cmrf.profile import profile
    from cmrf.train.setup import build_model

    if len(args.input_size) < 3:
        raise ValueError(f"--input-size must be B C *spatial (3 numbers or more), got {args.input_size}")
    in_chans = args.in_chans if args.in_chans is not None else args.input_size[1]
    model, _ = build_model(args.model, in_chans, args.num_classes, model_kwargs=constructor_kwargs(args))
    result = profile(model, args.input_size)
    print(json.dumps(result.to_dict()) if args.json else f"{args.model}: {result}")
    return 0
