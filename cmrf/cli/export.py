"""``cmrf export onnx [NAME] [--checkpoint FILE] [--input-size B C *S] [--dynamic] -o FILE``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cmrf.cli.common import check_output_file, check_replaces_only, folders_made_for, require_extra, user_path
from cmrf.cli.model_args import (
    add_registry_model_arguments,
    constructor_kwargs,
    default_input_size,
    positive_int,
)
from cmrf.onnx_writer import DEFAULT_OPSET, MIN_OPSET

__all__ = ["build", "run_export"]


def build(parser: argparse.ArgumentParser):
    parser.add_argument("format", choices=["onnx"], help="export format (onnx)")
    add_registry_model_arguments(parser, name_required=False, num_classes_default=None)
    parser.add_argument("--checkpoint", type=user_path, default=None, metavar="FILE",
                        help="weights to load: a .safetensors written by cmrf train (names its model), or "
                             "a state dict (.pth/.safetensors, e.g. the reference code's) with NAME")
    parser.add_argument("--input-size", type=positive_int, nargs="+", default=None, metavar="S",
                        help="example input shape B C *spatial (default 1, the model's channels, then the "
                             "run's image size or 256 per side, 64 for volumes)")
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch and spatial size")
    parser.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, from {MIN_OPSET} to the newest the installed exporter writes "
                             f"(default {DEFAULT_OPSET})")
    parser.add_argument("--no-optimize", action="store_true",
                        help="export the plain model (slower in ONNX Runtime)")
    parser.add_argument("-o", "--output", type=user_path, required=True, metavar="FILE",
                        help="the .onnx file to write (atomically: a failed export keeps an old file intact)")
    parser.epilog = "A checkpoint's model, channels and classes come from the file where it can tell them."
    return run_export


def _model(args: argparse.Namespace):
    """``(model, its input channels, the checkpoint's metadata)`` from the flags and the checkpoint."""
    from cmrf.train.setup import build_model, model_from_checkpoint

    if args.checkpoint:
        model, meta = model_from_checkpoint(
            args.checkpoint, model=args.model, num_classes=args.num_classes, in_chans=args.in_chans,
            model_kwargs=constructor_kwargs(args),
        )
        return model, meta["in_chans"], meta
    if args.model is None:
        raise ValueError("give a model NAME (e.g. tinyunet) or a --checkpoint written by cmrf train")
    in_chans = args.in_chans or (args.input_size[1] if args.input_size and len(args.input_size) > 1 else 3)
    model, _ = build_model(args.model, in_chans, args.num_classes or 2, model_kwargs=constructor_kwargs(args))
    return model, in_chans, {}


def _graph_metadata(args: argparse.Namespace, model, in_chans: int, meta: dict,
                    input_size: list[int]) -> dict[str, str]:
    """What a deployer needs beside the graph, as ONNX ``metadata_props``: the model, its channels
    and classes and, for a run of ``cmrf train`` (whose data options say), how its images were
    prepared and how to read the output. The size to resize to is the graph's input's (a fixed
    ``--input-size`` other than the run's is what the graph takes); ``cmrf_img_size`` is given
    where that size is one side repeated."""
    from cmrf.constants import NORMALIZE_MEAN, NORMALIZE_STD

    entries = {"cmrf_model": str(meta.get("model") or args.model), "cmrf_in_chans": str(in_chans)}
    num_classes = meta.get("num_classes") or getattr(model, "num_classes", None)
    if num_classes:
        entries["cmrf_num_classes"] = str(num_classes)
    if meta.get("class_names"):
        entries["cmrf_class_names"] = json.dumps(list(meta["class_names"]))
    data = meta.get("data") or {}
    side = data.get("img_size")
    if side:
        dims = 3 if data.get("spatial_dims") == 3 else 2
        sides = [side] * dims if args.dynamic else list(input_size[2:])
        if len(set(sides)) == 1:
            entries["cmrf_img_size"] = str(sides[0])
        entries["cmrf_normalize_mean"] = str(NORMALIZE_MEAN)
        entries["cmrf_normalize_std"] = str(NORMALIZE_STD)
        shape = "x".join(map(str, sides))
        if len(set(sides)) > 1:  # which side is which (PIL's resize takes width first)
            shape += " (depth x height x width)" if dims == 3 else " (height x width)"
        # Volumes of a run are NIfTI files read by cmrf.data.nifti (recorded as data "folder").
        if dims == 3 and data.get("data") in ("folder", "nifti"):
            read = (f"{in_chans} channel(s) as stored; clip each volume and channel to its 0.5 and 99.5 "
                    f"percentiles and scale that range to [0, 1]; resize to {shape} (trilinear)")
        elif dims == 2:  # (cmrf.data.imageio; synthetic data is made in [0, 1] at this size)
            read = (f"read as {'RGB' if in_chans == 3 else 'one grey channel'}; scale 8-bit values by "
                    f"1/255, 16-bit and float images from their own minimum and maximum to [0, 1]; resize "
                    f"to {shape} (bilinear, antialiased; the aspect ratio is not kept)")
        else:
            read = f"{in_chans} channel(s) in [0, 1] at {shape}"
        entries["cmrf_preprocess"] = (
            f"{read}; then (x - {NORMALIZE_MEAN}) / {NORMALIZE_STD}; float32, channels first, batch first")
        entries["cmrf_postprocess"] = (
            "argmax over dimension 1 gives class indices (0 = background); resize them to the image's "
            "size with nearest neighbour"
        )
    return entries


def _input_size(args: argparse.Namespace, model, in_chans: int, data: dict) -> list[int]:
    if args.input_size is None:
        return default_input_size(model, in_chans, data.get("img_size"))
    spatial_dims = getattr(model, "spatial_dims", None)
    given = " ".join(map(str, args.input_size))
    # Without --in-chans or a checkpoint the model took its channels from --input-size's second value.
    channels = in_chans if args.in_chans or args.checkpoint else 3
    if isinstance(spatial_dims, int) and len(args.input_size) != spatial_dims + 2:
        if len(args.input_size) < 2:
            raise ValueError(f"--input-size {given}: give B C and {spatial_dims} sides ({spatial_dims + 2} "
                             f"values), got {len(args.input_size)}")
        # "C S S S" lacks the batch; "1 1 16 16" for a 1-channel volume may lack a side instead.
        if len(args.input_size) == spatial_dims + 1 and args.input_size[0] == channels \
                and args.input_size[1] != channels:
            raise ValueError(f"--input-size {given} has no batch size: give B C and {spatial_dims} sides, "
                             f"e.g. --input-size 1 {given}")
        raise ValueError(f"--input-size {given} has {len(args.input_size) - 2} spatial side(s), but the "
                         f"model takes {spatial_dims}: give B C and {spatial_dims} sides")
    if len(args.input_size) >= 2 and args.input_size[1] != in_chans:
        raise ValueError(
            f"--input-size {' '.join(map(str, args.input_size))} has {args.input_size[1]} channels, but the "
            f"model takes {in_chans}"
        )
    return list(args.input_size)


def _is_onnx_graph(path: Path) -> bool:
    """Whether ``path`` parses as an ONNX model with a graph (protobuf may accept other bytes)."""
    import onnx

    try:
        return len(onnx.load(str(path), load_external_data=False).graph.node) > 0
    except Exception:  # any parse failure (protobuf, I/O): not a graph
        return False


def run_export(args: argparse.Namespace) -> int:
    from cmrf.export import export_onnx

    require_extra(("onnx", "onnxscript"), "cmrf export onnx", "onnx")
    with folders_made_for(Path(args.output).parent, "-o"):  # before the check, which needs the folder
        check_output_file(args.output, "-o", {"--checkpoint": args.checkpoint})
        check_replaces_only(args.output, "-o", ".onnx", "an ONNX graph", _is_onnx_graph)
        model, in_chans, meta = _model(args)
        input_size = _input_size(args, model, in_chans, meta.get("data") or {})
        path = export_onnx(
            model, args.output, input_size, dynamic=args.dynamic, optimize=not args.no_optimize,
            opset_version=args.opset, metadata=_graph_metadata(args, model, in_chans, meta, input_size),
        )
    size_mb = path.stat().st_size / 2**20
    shape = "x".join(map(str, input_size))
    dynamic = ", dynamic batch and size" if args.dynamic else ""
    print(f"wrote {path} ({size_mb:.2f} MiB, input {shape}{dynamic})")
    return 0
