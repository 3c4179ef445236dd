"""ONNX export of CMRF models (``cmrf.export_onnx`` and ``cmrf export onnx NAME``).

The exported graph is the one ``optimize_for_inference`` builds: BatchNorms folded, decoder
``pw1`` split around the upsampling, bicubic x2 as a depthwise convolution plus
``DepthToSpace``. ONNX Runtime runs it several times faster than an export of the plain model,
whose bicubic ``Resize`` is slow.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cmrf.inference import optimize_for_inference
from cmrf.layers import CMRF
from cmrf.ops import reference_only

__all__ = ["export_onnx"]

DEFAULT_OPSET = 20  # the first opset with a Gelu operator: 1.6x faster in ONNX Runtime than Erf
# Upper bound torch.export needs for symbolic sizes; generous for any image or batch.
_MAX_SIDE = 1 << 15


def _holds_cmrf(model: nn.Module) -> bool:
    return any(isinstance(m, CMRF) for m in model.modules())


def _check_input_size(input_size: Sequence[int]) -> tuple[int, ...]:
    try:
        size = tuple(int(s) for s in input_size)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"input_size must be a sequence of integers (B, C, *spatial), got {input_size!r}"
        ) from err
    if len(size) < 3 or any(s < 1 for s in size):
        raise ValueError(f"input_size must be (B, C, *spatial) with positive sides, got {size}")
    return size


def _dynamic_shapes(size: tuple[int, ...], spatial_multiple: int) -> tuple[dict, ...]:
    """Dynamic batch and spatial sides; sides stay multiples of ``spatial_multiple``.

    TinyU-Net upsamples by exactly 2 only when every side is a multiple of ``2 ** depth``;
    constraining the sides so lets the exported graph keep the fast bicubic x2 for every size.
    """
    from torch.export import Dim

    bad = [s for s in size[2:] if s % spatial_multiple]
    if bad:
        raise ValueError(
            f"dynamic export needs spatial sides that are multiples of {spatial_multiple} "
            f"(the model's 2 ** depth), got input_size {size}; pick such a size or export with "
            f"dynamic=False for exactly this shape"
        )
    axes = {0: Dim("batch", min=1, max=_MAX_SIDE)}
    for i in range(2, len(size)):
        side = Dim(f"side{i - 2}", min=1, max=_MAX_SIDE // spatial_multiple)
        axes[i] = spatial_multiple * side if spatial_multiple > 1 else side
    return (axes,)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: Sequence[int] = (1, 3, 256, 256),
    dynamic: bool = False,
    optimize: bool = True,
    opset_version: int = DEFAULT_OPSET,
    verbose: bool = False,
) -> Path:
    """Export ``model`` (optimized for inference first) to an ONNX file.

    Args:
        model: a TinyUNet, CMRF or any model holding CMRF blocks; it is not modified.
        path: the ``.onnx`` file to write (parent folders are created). Weights are stored
            inside the file.
        input_size: the example input shape ``(B, C, *spatial)``. Default ``(1, 3, 256, 256)``.
        dynamic: ``False`` (default) fixes the graph to ``input_size``; ``True`` makes the batch
            and every spatial side dynamic (for TinyU-Net the sides stay multiples of
            ``model.min_size``, so ``input_size``'s sides must be such multiples too).
        optimize: run ``optimize_for_inference`` first (default ``True``; ignored for models
            without CMRF blocks).
        opset_version: ONNX opset. Default 20, the first with a native ``Gelu``.
        verbose: print the exporter's progress.

    Returns:
        The path written. The graph has one input ``input`` and one output ``output``.

    Raises:
        ValueError: for a malformed ``input_size``, or a dynamic export of a TinyU-Net with
            sides that are not multiples of ``model.min_size``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"export_onnx expects an nn.Module, got {type(model).__name__}")
    spatial_multiple = int(getattr(model, "min_size", 1))
    size = _check_input_size(input_size)
    if optimize and _holds_cmrf(model):
        model = optimize_for_inference(model)
    model = model.eval()
    param = next(model.parameters(), None)
    example = torch.randn(
        size,
        device=param.device if param is not None else "cpu",
        dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32,
    )
    dynamic_shapes = _dynamic_shapes(size, spatial_multiple) if dynamic else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter reports its progress on stdout; keep the library quiet unless asked.
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with torch.no_grad(), reference_only(), quiet:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["output"],
            opset_version=opset_version,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
        )
    return path


# --- command line ----------------------------------------------------------------------------


def build_command(parser):
    """``cmrf export onnx NAME [--checkpoint PATH] [--input-size ...] [--dynamic] -o FILE``."""
    from cmrf.profile import add_model_arguments

    parser.add_argument("format", choices=["onnx"], help="export format (onnx)")
    add_model_arguments(parser)
    parser.add_argument(
        "--checkpoint", default=None, help="weights to load (.safetensors or a weights-only .pth)"
    )
    parser.add_argument(
        "--input-size", type=int, nargs="+", default=[1, 3, 256, 256], metavar="S",
        help="example input shape B C *spatial (default 1 3 256 256)",
    )
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch and spatial size")
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})"
    )
    parser.add_argument(
        "--no-optimize", action="store_true", help="export the plain model (slower in ONNX Runtime)"
    )
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    return _run_export


def _run_export(args) -> int:
    from cmrf.checkpoint import load_checkpoint
    from cmrf.models import create_model
    from cmrf.profile import model_kwargs

    in_chans = args.in_chans if args.in_chans is not None else args.input_size[1]
    model = create_model(args.model, in_chans=in_chans, num_classes=args.num_classes, **model_kwargs(args))
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    path = export_onnx(
        model, args.output, args.input_size, dynamic=args.dynamic, optimize=not args.no_optimize,
        opset_version=args.opset,
    )
    size_mb = path.stat().st_size / 2**20
    shape = "x".join(map(str, args.input_size))
    dynamic = ", dynamic batch and size" if args.dynamic else ""
    print(f"wrote {path} ({size_mb:.2f} MiB, input {shape}{dynamic})")
    return 0

