"""Flags that say which registry model to build: by name (``profile``, ``export``) or, for a
checkpoint that cannot say (a reference ``.pth``), beside the checkpoint (``evaluate``, ``predict``,
``export``); and the module that ``evaluate`` and ``predict`` run (``inference_model``)."""

from __future__ import annotations

import argparse

import torch

from cmrf.cli.common import positive_int, require_extra
from cmrf.inference import BACKENDS

__all__ = [
    "add_checkpoint_model_arguments",
    "add_registry_model_arguments",
    "checkpoint_model_options",
    "constructor_kwargs",
    "default_input_size",
    "positive_int",
]


def default_input_size(model, in_chans: int, side: int | None = None) -> list[int]:
    """``[1, in_chans, side, ...]`` for ``model``'s spatial dims: ``side`` or 256 for images, 64 for
    volumes (and 1D signals), raised to the model's ``min_size`` (a deep TinyU-Net's 2 ** levels)."""
    spatial_dims = int(getattr(model, "spatial_dims", 2))
    min_size = getattr(model, "min_size", None)
    side = side or max(256 if spatial_dims == 2 else 64, min_size if isinstance(min_size, int) else 1)
    return [1, in_chans, *([side] * spatial_dims)]


def _add_constructor_arguments(group) -> None:
    group.add_argument("--N", dest="N", type=positive_int, default=None,
                       help="receptive fields per CMRF (default: the model's)")
    group.add_argument("--channels", type=positive_int, nargs="+", default=None, metavar="C",
                       help="encoder widths (default: the model's)")


def add_registry_model_arguments(
    parser: argparse.ArgumentParser, name_required: bool = True, num_classes_default: int | None = 2
) -> None:
    """``NAME --in-chans --num-classes --N --channels``: a model built from the registry.

    Args:
        parser: the command's parser.
        name_required: ``False`` makes ``NAME`` optional (a checkpoint may name the model).
        num_classes_default: default of ``--num-classes`` (``None``: from the checkpoint, else 2).
    """
    parser.add_argument("model", metavar="NAME", nargs=None if name_required else "?", default=None,
                        help="registry name, e.g. tinyunet (see cmrf.list_models())"
                        + ("" if name_required else "; optional with a --checkpoint written by cmrf train"))
    parser.add_argument("--in-chans", type=positive_int, default=None,
                        help="input channels (default: C of --input-size, else 3)")
    default_text = num_classes_default if num_classes_default is not None else "the checkpoint's, else 2"
    parser.add_argument("--num-classes", type=positive_int, default=num_classes_default,
                        help=f"output classes (default {default_text})")
    _add_constructor_arguments(parser)


def add_checkpoint_model_arguments(parser: argparse.ArgumentParser, num_classes: bool = True,
                                   in_chans: bool = True) -> None:
    """``--model [--in-chans] [--num-classes] --N --channels`` for checkpoints without cmrf metadata.

    A ``.safetensors`` written by ``cmrf train`` names its model; a state dict saved by the
    reference code does not, and needs ``--model``. ``--in-chans`` and ``--num-classes`` are read
    from its layer shapes when possible. ``num_classes=False`` (``in_chans=False``) when the
    command already has a ``--num-classes`` (``--in-chans``): ``evaluate``'s data flags, which
    then serve both.
    """
    group = parser.add_argument_group(
        "model of a bare state dict (e.g. a reference-code .pth; a cmrf train checkpoint names its own)"
    )
    group.add_argument("--model", default=None, metavar="NAME",
                       help="registry name of the checkpoint's model, e.g. tinyunet")
    if in_chans:
        group.add_argument("--in-chans", type=positive_int, default=None,
                           help="input channels (default: read from the first layer's shape)")
    if num_classes:
        group.add_argument("--num-classes", type=positive_int, default=None,
                           help="classes incl. background (default: read from the last layer's shape)")
    _add_constructor_arguments(group)


def constructor_kwargs(args: argparse.Namespace) -> dict:
    """Constructor keyword arguments (``N``, ``channels``) from the flags that were given."""
    return {k: v for k, v in (("N", args.N), ("channels", args.channels)) if v is not None}


def checkpoint_model_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of ``cmrf.train.setup.model_from_checkpoint`` held by the flags."""
    return {
        "model": args.model,
        "num_classes": getattr(args, "num_classes", None),
        "in_chans": args.in_chans,
        "model_kwargs": constructor_kwargs(args),
    }


def add_optimize_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--no-optimize`` (``args.optimize``, default ``True``) and ``--backend`` (``args.backend``,
    default ``torch``) for commands that only run the model."""
    parser.add_argument(
        "--no-optimize", dest="optimize", action="store_false",
        help=f"run the model as loaded; by default 2D CMRF models on the CPU run through "
             f"optimize_for_inference(freeze=True), which gives the same {what} faster",
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default="torch",
        help="torch (default) or onnxruntime: run the optimized model in ONNX Runtime (CPU, fp32; "
             "pip install 'cmrf[onnx]'; exports it once per input size, a few seconds), the fastest "
             "CPU option measured",
    )


def inference_device(args: argparse.Namespace) -> torch.device:
    """``--device``, where ``auto`` means the CPU for ``--backend onnxruntime`` (it runs on the CPU)."""
    from cmrf.train.processes import resolve_device

    return resolve_device("cpu" if args.backend == "onnxruntime" and args.device == "auto" else args.device)


def inference_model(
    model: torch.nn.Module, device: torch.device, optimize: bool = True, max_graphs: int = 2,
    backend: str = "torch",
) -> torch.nn.Module:
    """The module ``cmrf predict`` and ``cmrf evaluate`` run: ``model``, or its optimized form on the CPU.

    These commands feed the network one or two input shapes (one image size; a last, smaller
    batch), so on the CPU an fp32 2D model holding CMRF blocks runs through
    ``optimize_for_inference(freeze=True, max_graphs=max_graphs)``: a frozen graph per shape,
    built on its first batch (about a second), gives the same outputs to float rounding several
    times faster (docs/inference.md). On CUDA the model runs as loaded: the optimized GPU paths
    are not yet measured on a GPU. Volumes (3D), models without CMRF blocks, other dtypes and
    ``optimize=False`` run as loaded too.

    ``backend="onnxruntime"`` runs the model, optimized when it holds CMRF blocks, in ONNX
    Runtime instead (``optimize_for_inference(backend="onnxruntime")``, or
    ``OnnxRuntimeInference`` for other models); it needs an fp32 model on the CPU and
    ``optimize=True``, and says so otherwise.
    """
    from cmrf.inference import optimize_for_inference
    from cmrf.layers import cmrf_blocks

    first = next(iter(model.parameters()), None)
    fp32_cpu = device.type == "cpu" and first is not None and first.dtype == torch.float32
    blocks = cmrf_blocks(model)
    if backend == "onnxruntime":
        return _onnxruntime_model(model, device, optimize, fp32_cpu, bool(blocks), max_graphs)
    if not optimize or not fp32_cpu or not blocks or any(b.spatial_dims != 2 for b in blocks):
        return model.eval()
    return optimize_for_inference(model, freeze=True, max_graphs=max_graphs)


def _onnxruntime_model(model: torch.nn.Module, device: torch.device, optimize: bool, fp32_cpu: bool,
                       has_blocks: bool, max_graphs: int) -> torch.nn.Module:
    from cmrf.inference import OnnxRuntimeInference, optimize_for_inference

    if not optimize:
        raise ValueError(
            "--backend onnxruntime runs the optimized model; drop --no-optimize or use --backend torch"
        )
    if not fp32_cpu:
        raise ValueError(
            f"--backend onnxruntime runs fp32 models on the CPU, got device {device}: use --device cpu "
            f"or --backend torch"
        )
    require_extra(("onnxruntime", "onnxscript"), "--backend onnxruntime", "onnx")
    if has_blocks:
        return optimize_for_inference(model, backend="onnxruntime", max_graphs=max_graphs)
    return OnnxRuntimeInference(model.eval(), max_graphs=max_graphs).eval()
