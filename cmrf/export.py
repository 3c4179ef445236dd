"""ONNX export of CMRF models (``cmrf.export_onnx``; the command is ``cmrf export``, in ``cmrf.cli.export``).

The exported graph is the one ``optimize_for_inference`` builds: BatchNorms folded, decoder
``pw1`` split around the upsampling, bicubic x2 as a depthwise convolution plus
``DepthToSpace``. ONNX Runtime runs it several times faster than an export of the plain model,
whose bicubic ``Resize`` is slow.

The file is written atomically (``cmrf.files.atomic_path``): a failed export (full disk,
read-only folder, an exporter error) leaves a previous file at ``path`` intact and no temporary
file behind.

The exporter call itself and its checks are in ``cmrf.onnx_writer``, which
``cmrf.inference.OnnxRuntimeInference`` (``optimize_for_inference(model, backend="onnxruntime")``)
shares.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from cmrf._warnings import caller_stacklevel
from cmrf.checkpoint import check_text_metadata
from cmrf.files import atomic_path
from cmrf.inference import GraphPerShape, optimize_for_inference
from cmrf.layers import check_input_size, cmrf_blocks, eval_mode, inference_only_parts, without_wrappers
from cmrf.onnx_writer import (
    DEFAULT_OPSET,
    TESTED_TORCH_FOR_ONNX,
    ExportUnsupportedError,
    check_exporter,
    check_onnx_packages,
    check_opset,
    write_onnx,
)

__all__ = ["DEFAULT_OPSET", "ExportUnsupportedError", "export_onnx"]

# Upper bound torch.export needs for symbolic sizes; generous for any image or batch.
_MAX_SIDE = 1 << 15


def _check_dynamic_axes(path: Path, rank: int) -> None:
    """Refuse a "dynamic" file whose input sizes the exporter fixed to the example's.

    Some torch releases ignore part of ``dynamic_shapes`` and write fixed sizes (2.6 fixes the batch
    of TinyU-Net); ONNX Runtime then refuses every other size. Better no file than one that lies.
    """
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    fixed = [i for i in (0, *range(2, rank)) if not dims[i].dim_param]
    if fixed:
        raise ExportUnsupportedError(
            f"torch {torch.__version__}'s ONNX exporter fixed the dynamic input axes {fixed} to the "
            f"example's sizes; dynamic export is tested with torch {TESTED_TORCH_FOR_ONNX}: upgrade "
            f"torch, or export with dynamic=False once per input size you need"
        )


_MAX_UNPOOLS = (nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d)


def _check_dynamic_supported(model: nn.Module) -> None:
    """Refuse dynamic export of models whose graph cannot follow a new input size.

    The exporter lowers max-unpooling (SegNet) to a ScatterND whose flattened output size is
    fixed at the example's: the graph runs at that size only, and ONNX Runtime fails at any
    other one ("ScatterND ... invalid indice"). Refusing is better than a file that lies.
    """
    unpools = [name or "the model" for name, m in model.named_modules() if isinstance(m, _MAX_UNPOOLS)]
    if unpools:
        raise ValueError(
            f"dynamic=True cannot export {type(model).__name__}: its max-unpooling ({unpools[0]}) is "
            f"exported with the example's sizes, so ONNX Runtime fails at any other input size; export "
            f"with dynamic=False (without --dynamic) once per input size you need"
        )


def _dynamic_shapes(size: tuple[int, ...], spatial_multiple: int) -> tuple[dict, ...]:
    """Dynamic batch and spatial sides; sides stay multiples of ``spatial_multiple``.

    TinyU-Net upsamples by exactly 2 only when every side is a multiple of ``2 ** depth``;
    constraining the sides so lets the exported graph keep the fast bicubic x2 for every size.
    """
    from torch.export import Dim

    bad = [s for s in size[2:] if s % spatial_multiple]
    if bad:
        raise ValueError(
            f"dynamic export needs spatial sides that are multiples of {spatial_multiple} (the sides "
            f"one graph of this model can follow), got input_size {size}; pick such a size or export "
            f"with dynamic=False (without --dynamic) for exactly this shape"
        )
    axes = {0: Dim("batch", min=1, max=_MAX_SIDE)}
    for i in range(2, len(size)):
        side = Dim(f"side{i - 2}", min=1, max=_MAX_SIDE // spatial_multiple)
        axes[i] = spatial_multiple * side if spatial_multiple > 1 else side
    return (axes,)


def _dynamic_example_size(size: tuple[int, ...], spatial_multiple: int) -> tuple[int, ...]:
    """The shape a dynamic export traces: ``size`` with a batch of at least 2 and sides of at
    least twice ``spatial_multiple``.

    torch.export fixes every size it sees at 1 (size-1 specialisation): a batch of 1 fixed the
    batch of 1-D convolutions, and sides of exactly ``min_size`` leave one pixel at TinyU-Net's
    bottom, which fixed every side. The graph still takes those sizes.
    """
    sides = (max(side, 2 * spatial_multiple) for side in size[2:])
    return (max(size[0], 2), size[1], *sides)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module a per-shape wrapper (``optimize_for_inference`` with ``freeze=True``,
    ``backend="onnxruntime"`` or ``cuda_graph=True``), ``torch.compile`` or ``(Distributed)
    DataParallel`` runs: what the export traces anyway, what says which input it takes (channels,
    rank, sizes), and what ``optimize`` can rewrite (the compiled wrapper's copy would run the
    original; a dynamic export of a wrapper failed in the exporter)."""
    while True:
        inner = model.module if isinstance(model, GraphPerShape) else without_wrappers(model)
        if inner is model:
            return model
        model = inner


def _check_not_on_meta(model: nn.Module) -> None:
    """Refuse a model whose tensors are on the meta device: it has no weights to write (the
    exporter failed deep inside an ONNX pass)."""
    meta = next((name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise ValueError(f"export_onnx: {type(model).__name__} is on the meta device ({meta}), with no "
                         f"weights to export; load weights into it first (load_state_dict(..., assign=True))")


def _example_size(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int, ...]:
    """``input_size`` checked against what the model says it takes (channels, spatial rank), or
    the default 2D size for it; the exporter's own errors about these are long and indirect."""
    channels = getattr(model, "in_channels", None)
    spatial_dims = getattr(model, "spatial_dims", None)  # checked only where the model says it
    min_size = getattr(model, "min_size", None)  # TinyU-Net: one pixel must survive every pooling
    at_least = min_size if isinstance(min_size, int) else 1  # a deep model takes more than the defaults
    if input_size is None:
        if spatial_dims not in (None, 2):
            side = str(max(64, at_least))
            raise ValueError(f"{type(model).__name__} takes {spatial_dims}D inputs: give input_size "
                             f"(B, C, {', '.join('*' * spatial_dims)}), e.g. (1, {channels or 1}, "
                             f"{', '.join([side] * spatial_dims)})")
        side = max(256, at_least)
        input_size = (1, channels or 3, side, side)
    size = check_input_size(input_size)
    if isinstance(spatial_dims, int) and len(size) == spatial_dims + 1 and size[0] == channels:
        # timm's pretrained_cfg["input_size"] is (C, *spatial): read as (B, C, ...) it would blame C
        raise ValueError(f"input_size {size} has no batch dimension (timm's pretrained_cfg['input_size'] "
                         f"is (C, *spatial)): {type(model).__name__} needs (B, C, *spatial), "
                         f"e.g. {(1, *size)}")
    if isinstance(channels, int) and size[1] != channels:
        raise ValueError(f"input_size {size} has {size[1]} channels, but {type(model).__name__} takes "
                         f"in_channels={channels}: use (B, {channels}, ...)")
    if isinstance(spatial_dims, int) and len(size) != spatial_dims + 2:
        raise ValueError(f"input_size {size} has {len(size) - 2} spatial sides, but "
                         f"{type(model).__name__} takes {spatial_dims}D inputs")
    if isinstance(min_size, int) and min(size[2:]) < min_size:
        raise ValueError(f"input_size {size} has a side below {min_size}, the smallest "
                         f"{type(model).__name__} takes (every spatial side >= {min_size})")
    multiple = getattr(model, "input_multiple", None)  # CMUNeXt: its decoder adds skips of equal size
    if isinstance(multiple, int) and any(side % multiple for side in size[2:]):
        raise ValueError(f"input_size {size} has sides that are not multiples of {multiple}, as every "
                         f"spatial side of {type(model).__name__} must be")
    return size


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: Sequence[int] | None = None,
    dynamic: bool = False,
    optimize: bool = True,
    opset_version: int = DEFAULT_OPSET,
    verbose: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export ``model`` (optimized for inference first) to an ONNX file.

    Args:
        model: a TinyUNet, CMRF or any model holding CMRF blocks; it is not modified. A wrapper
            from ``optimize_for_inference`` (``freeze=True``, ``backend="onnxruntime"``) exports
            the module it runs.
        path: the ``.onnx`` file to write (parent folders are created). Weights are stored
            inside the file.
        input_size: the example input shape ``(B, C, *spatial)``; ``C`` must be the model's
            ``in_channels`` where it has one. Default ``(1, in_channels, 256, 256)`` for 2D
            models (``in_channels`` 3 if the model does not say; sides of ``model.min_size`` if
            that is more, for TinyU-Nets of nine or more levels); 3D models need it given.
        dynamic: ``False`` (default) fixes the graph to ``input_size``; ``True`` makes the batch
            and every spatial side dynamic (for TinyU-Net the sides stay multiples of
            ``model.min_size``, so ``input_size``'s sides must be such multiples too).
        optimize: run ``optimize_for_inference`` first (default ``True``; ignored for models
            without CMRF blocks).
        opset_version: ONNX opset. Default 20, the first with a native ``Gelu``.
        verbose: print the exporter's progress.
        metadata: text entries for the file's ``metadata_props`` (what ONNX Runtime's
            ``session.get_modelmeta().custom_metadata_map`` reads back), e.g. how to prepare the
            input; ``None`` (default) writes none. ``cmrf export`` records a run's (docs/cli.md).

    Returns:
        The path written. The graph has one input ``input`` and one output ``output``.

    Raises:
        ExportUnsupportedError: (a ``ValueError``) on torch older than 2.5, and when this torch's
            exporter fixes the sizes of a dynamic export (torch 2.6 does).
        ValueError: for a malformed ``input_size`` or one whose channels or spatial rank the
            model does not take, a dynamic export of a TinyU-Net with
            sides that are not multiples of ``model.min_size``, or a dynamic export of a model
            with max-unpooling (SegNet), which ONNX Runtime could run only at the example's size.
        OSError: the file cannot be written (the previous file, if any, is left as it was).
        ImportError: ``onnx`` or ``onnxscript`` is not installed (``pip install 'cmrf[onnx]'``).

    Warns:
        UserWarning: for a float64 or bfloat16 model, whose graph ONNX Runtime's CPU provider
            cannot run (it has no such convolution); the file is written all the same.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"export_onnx expects an nn.Module, got {type(model).__name__}")
    check_text_metadata(metadata, "ONNX")
    model = _unwrapped(model)
    _check_not_on_meta(model)
    check_exporter()
    check_onnx_packages(("onnx", "onnxscript"), "export_onnx")
    check_opset(opset_version)
    if dynamic:
        _check_dynamic_supported(model)
    # The multiple every side must keep: TinyU-Net's 2 ** depth, CMUNeXt's 16.
    spatial_multiple = int(getattr(model, "input_multiple", None) or getattr(model, "min_size", 1))
    size = _example_size(model, input_size)
    # An optimized copy (inference-only parts) may keep a block as it is (hooks, its own forward):
    # it is exported as it is, not optimized again.
    if optimize and cmrf_blocks(model) and not inference_only_parts(model):
        model = optimize_for_inference(model)  # a copy
    param = next(model.parameters(), None)
    example_size = _dynamic_example_size(size, spatial_multiple) if dynamic else size
    example = torch.randn(
        example_size,
        device=param.device if param is not None else "cpu",
        dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32,
    )
    if example.dtype in (torch.float64, torch.bfloat16):  # a valid graph most users could not run
        dtype = str(example.dtype).removeprefix("torch.")
        warnings.warn(
            f"export_onnx: {type(model).__name__} is {dtype}, and ONNX Runtime's CPU provider has no "
            f"{dtype} convolution, so it cannot run the exported graph; export model.float() to run it "
            f"there", stacklevel=caller_stacklevel())
    _check_runs(model, example)
    dynamic_shapes = _dynamic_shapes(size, spatial_multiple) if dynamic else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Eval mode for the export only: without a copy (optimize=False, no CMRF blocks) this is the
    # caller's own model, which must come back in the mode it had.
    with eval_mode(model), atomic_path(path) as tmp:
        write_onnx(model, example, tmp, dynamic_shapes=dynamic_shapes, opset_version=opset_version,
                   verbose=verbose)
        if dynamic:
            _check_dynamic_axes(tmp, len(size))
            _check_at_another_size(model, tmp, example, spatial_multiple)
        if metadata:
            _write_metadata(tmp, metadata)
    return path


def _write_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """Add ``metadata`` to the ONNX file ``path``'s ``metadata_props``, in place."""
    import onnx

    graph = onnx.load(str(path))
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(path))


def _check_at_another_size(model: nn.Module, path: Path, example: torch.Tensor, multiple: int) -> None:
    """Run a dynamic file in ONNX Runtime at other sizes than the example's (one more multiple per
    side: odd sides for a general model) and refuse it where it fails or disagrees with the model.

    A forward that branches on its input size, or pads skip connections to fit, makes torch.export
    narrow or specialise the sizes; the exporter then writes a graph whose every axis is named free
    and which is wrong, or fails, at other sizes. Skipped without ONNX Runtime, for non-fp32
    models (the CPU provider's kernels), and where the model itself refuses the size.
    """
    if importlib.util.find_spec("onnxruntime") is None or example.dtype != torch.float32:
        return
    import onnxruntime

    other = torch.randn(example.shape[0] + 1, example.shape[1],
                        *(side + multiple for side in example.shape[2:]), device=example.device)
    try:
        with torch.no_grad():
            expected = model(other)
    except Exception:  # a size the model itself does not take: nothing to compare
        return
    if not isinstance(expected, torch.Tensor):
        return
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = tuple(other.shape)
    try:
        got = torch.from_numpy(session.run(None, {"input": other.cpu().numpy()})[0])
    except Exception as err:
        raise ExportUnsupportedError(
            f"the dynamic ONNX file of {type(model).__name__} fails in ONNX Runtime at {shape}, a size "
            f"the model takes ({_first_line(err)}): its forward depends on the input size in a way the "
            f"exporter could not keep dynamic; export without --dynamic (dynamic=False) for each size"
        ) from None
    expected = expected.detach().cpu().float()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=0, atol=1e-3 * scale):
        difference = (float((got - expected).abs().max()) if got.shape == expected.shape
                      else f"shape {tuple(got.shape)} against {tuple(expected.shape)}")
        raise ExportUnsupportedError(
            f"the dynamic ONNX file of {type(model).__name__} disagrees with the model at {shape} (max "
            f"difference {difference}): its forward depends on the input size in a way the exporter "
            f"could not keep dynamic; export without --dynamic (dynamic=False) for each size")


def _check_runs(model: nn.Module, example: torch.Tensor) -> None:
    """Run ``model`` once on ``example``: a model that cannot take it (another rank, too few
    channels) fails here with its own one-line message, not inside the exporter, whose error is a
    page of advice to change torch's code with the cause at its end."""
    try:
        with torch.no_grad(), eval_mode(model):
            model(example)
    except Exception as err:
        raise ValueError(f"{type(model).__name__} cannot run on the example input {tuple(example.shape)} "
                         f"({type(err).__name__}: {_first_line(err)}); give an input_size it takes") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]
