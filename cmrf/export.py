"""ONNX export of CMRF models (``cmrf.export_onnx``; the command is ``cmrf export``, in ``cmrf.cli.export``).

The exported graph is the one ``optimize_for_inference`` builds: BatchNorms folded, decoder
``pw1`` split around the upsampling, bicubic x2 as a depthwise convolution plus
``DepthToSpace``. ONNX Runtime runs it several times faster than an export of the plain model,
whose bicubic ``Resize`` is slow.

The file is written atomically (``cmrf.files.atomic_path``): a failed export (full disk,
read-only folder, an exporter error) leaves a previous file at ``path`` intact and no temporary
file behind.

``OnnxRuntimeInference`` (what ``optimize_for_inference(model, backend="onnxruntime")`` returns)
runs that graph in ONNX Runtime from PyTorch: one export and one session per input shape, made
on the first call with that shape, tensors in and tensors out.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cmrf.files import atomic_path
from cmrf.inference import CPUGraphPerShape, optimize_for_inference
from cmrf.layers import CMRF
from cmrf.ops import reference_only

__all__ = ["ExportUnsupportedError", "OnnxRuntimeInference", "export_onnx"]

DEFAULT_OPSET = 20  # the first opset with a Gelu operator: 1.6x faster in ONNX Runtime than Erf
# Upper bound torch.export needs for symbolic sizes; generous for any image or batch.
_MAX_SIDE = 1 << 15


# ``torch.onnx.export(..., dynamo=True)`` (the exporter used here) exists from torch 2.5.
MIN_TORCH_FOR_ONNX = (2, 5)
# Releases this module's export is tested with (the test suite, ONNX Runtime checks included).
TESTED_TORCH_FOR_ONNX = "2.11 and 2.14"


class ExportUnsupportedError(ValueError):
    """The installed torch's ONNX exporter cannot export the model as asked (upgrade torch).

    A ``ValueError``, so the command line reports it on one line (exit status 2).
    """


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _check_onnxruntime() -> None:
    """Raise ``ImportError`` (naming the extra to install) when ONNX Runtime or the exporter is missing,
    and ``ExportUnsupportedError`` when this torch cannot export to ONNX."""
    _check_exporter()
    missing = [name for name in ("onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ImportError(
            f"running in ONNX Runtime needs {' and '.join(missing)}, which {verb} not installed: "
            f"pip install 'cmrf[onnx]'"
        )


def _check_exporter() -> None:
    if _torch_version() < MIN_TORCH_FOR_ONNX:
        wanted = ".".join(map(str, MIN_TORCH_FOR_ONNX))
        raise ExportUnsupportedError(
            f"ONNX export needs torch >= {wanted} (its dynamo exporter), found torch {torch.__version__}; "
            f"it is tested with torch {TESTED_TORCH_FOR_ONNX}"
        )


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


def _holds_cmrf(model: nn.Module) -> bool:
    return any(isinstance(m, CMRF) for m in model.modules())


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
            f"with dynamic=False once per input size you need"
        )


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
        ExportUnsupportedError: (a ``ValueError``) on torch older than 2.5, and when this torch's
            exporter fixes the sizes of a dynamic export (torch 2.6 does).
        ValueError: for a malformed ``input_size``, a dynamic export of a TinyU-Net with
            sides that are not multiples of ``model.min_size``, or a dynamic export of a model
            with max-unpooling (SegNet), which ONNX Runtime could run only at the example's size.
        OSError: the file cannot be written (the previous file, if any, is left as it was).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"export_onnx expects an nn.Module, got {type(model).__name__}")
    _check_exporter()
    if dynamic:
        _check_dynamic_supported(model)
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
    with torch.no_grad(), reference_only(), quiet, atomic_path(path) as tmp:
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["input"],
            output_names=["output"],
            opset_version=opset_version,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
        )
        if dynamic:
            _check_dynamic_axes(tmp, len(size))
    return path


class OnnxRuntimeInference(CPUGraphPerShape):
    """Runs ``module`` on the CPU in ONNX Runtime, one exported graph and session per input shape.

    The first fp32 CPU call with a new shape exports ``module`` for exactly that shape
    (``export_onnx``, which optimizes a model holding CMRF blocks first; a few seconds) and opens
    an ONNX Runtime session on it (CPU provider); every later call with that shape runs the
    session. ONNX Runtime's fused CPU kernels run TinyU-Net's optimized graph faster than the
    PyTorch paths (docs/inference.md has the figures). Inputs may have any strides; outputs are
    new contiguous fp32 CPU tensors.

    ``module`` runs in PyTorch instead for non-CPU or non-fp32 inputs, an empty batch, under CPU
    autocast, while a trace or compilation is running, when a gradient is needed, and for new
    shapes once ``max_graphs`` sessions exist. The sessions hold copies of the weights taken when
    they were made: after changing ``module``'s parameters call ``reset()``. Copies and pickles
    leave the sessions behind (each copy makes its own).

    Args:
        module: an eval-only fp32 CPU module, typically from ``optimize_for_inference``.
        max_graphs: sessions kept at most (>= 1). Default 4.
        threads: ONNX Runtime's intra-op threads; ``None`` (default) takes
            ``torch.get_num_threads()`` when a session is made, so ``torch.set_num_threads`` and
            ``OMP_NUM_THREADS`` govern both libraries alike.
        spinning: let ONNX Runtime's threads busy-wait for work after each call (its own default).
            Default ``False``: between calls the cores stay free for PyTorch and the rest of the
            program (decoding images, writing masks); ``True`` is slightly faster for back-to-back
            calls on an otherwise idle machine.

    Shapes: those of ``module``.

    Raises:
        ImportError: ONNX Runtime or ``onnxscript`` is not installed (``pip install 'cmrf[onnx]'``).
        ExportUnsupportedError: torch is older than 2.5 (no dynamo ONNX exporter).
    """

    def __init__(self, module: nn.Module, max_graphs: int = 4, threads: int | None = None,
                 spinning: bool = False):
        super().__init__(module, max_graphs)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
        if not isinstance(spinning, bool):
            raise TypeError(f"spinning must be a bool, got {type(spinning).__name__}")
        _check_onnxruntime()
        self.threads = threads
        self.spinning = spinning

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        return tuple(x.shape)  # the session takes a contiguous copy: strides do not matter

    def _build(self, x: torch.Tensor):  # export for this shape and open a session
        import onnxruntime as ort

        with tempfile.TemporaryDirectory(prefix="cmrf-onnx-") as tmp:
            path = export_onnx(self.module, Path(tmp) / "model.onnx", tuple(x.shape))
            graph = path.read_bytes()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def _run(self, session, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().contiguous().numpy()
        return torch.from_numpy(session.run(None, {"input": array})[0])
