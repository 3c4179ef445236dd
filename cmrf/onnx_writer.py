"""Writing one module's ONNX graph with torch's dynamo exporter, and the checks around it.

The layer under the two users of ONNX: ``cmrf.export.export_onnx`` (optimizes a CMRF model
first, makes sizes dynamic on request, writes the file atomically) and
``cmrf.inference.OnnxRuntimeInference`` (exports the optimized copy it runs, once per input
shape). This module exports whatever module it is given and knows nothing of models.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from cmrf.ops import reference_only

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "MIN_TORCH_FOR_ONNX",
    "TESTED_TORCH_FOR_ONNX",
    "ExportUnsupportedError",
    "check_exporter",
    "check_opset",
    "check_onnx_packages",
    "check_onnxruntime",
    "write_onnx",
]

DEFAULT_OPSET = 20  # the first opset with a Gelu operator: 1.6x faster in ONNX Runtime than Erf
MIN_OPSET = 18  # torch's dynamo exporter writes opset 18 and converts it up (converting down fails)


def newest_opset() -> int:
    """The newest opset the exporter can write: what the installed ``onnx`` knows, and, where
    onnxscript states it, what its version converter converts to (the exporter writes opset 18
    and converts it up; past that limit it keeps 18)."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    try:  # a private constant: absent in other onnxscript releases
        from onnxscript.version_converter._version_converter import SUPPORTED_MAX_ONNX_OPSET
    except ImportError:
        return newest
    return min(newest, int(SUPPORTED_MAX_ONNX_OPSET))


def check_opset(opset_version) -> int:
    """``opset_version`` if the exporter can write it: an int from ``MIN_OPSET`` to
    ``newest_opset()``; else ``ValueError`` naming the range."""
    newest = newest_opset()
    if isinstance(opset_version, bool) or not isinstance(opset_version, int) or not (
            MIN_OPSET <= opset_version <= newest):
        raise ValueError(f"opset {opset_version!r}: expected an integer from {MIN_OPSET} to {newest} "
                         f"(default {DEFAULT_OPSET})")
    return opset_version


def _default_opset(path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)
# ``torch.onnx.export(..., dynamo=True)`` (the exporter used here) exists from torch 2.5.
MIN_TORCH_FOR_ONNX = (2, 5)
# Releases the export is tested with (the test suite, ONNX Runtime checks included).
TESTED_TORCH_FOR_ONNX = "2.11 and 2.14"


class ExportUnsupportedError(ValueError):
    """The installed torch's ONNX exporter cannot export the model as asked (upgrade torch).

    A ``ValueError``, so the command line reports it on one line (exit status 2).
    """


def torch_version() -> tuple[int, int]:
    """The installed torch's ``(major, minor)``."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def check_exporter() -> None:
    """Raise ``ExportUnsupportedError`` when this torch has no dynamo ONNX exporter (before 2.5)."""
    if torch_version() < MIN_TORCH_FOR_ONNX:
        wanted = ".".join(map(str, MIN_TORCH_FOR_ONNX))
        raise ExportUnsupportedError(
            f"ONNX export needs torch >= {wanted} (its dynamo exporter), found torch {torch.__version__}; "
            f"it is tested with torch {TESTED_TORCH_FOR_ONNX}"
        )


def check_onnx_packages(packages: tuple[str, ...], what: str) -> None:
    """Raise ``ImportError`` naming the extra to install when one of ``packages`` is missing (not
    the bare ``ModuleNotFoundError`` of an import deep inside the exporter)."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ImportError(
            f"{what} needs {' and '.join(missing)}, which {verb} not installed: pip install 'cmrf[onnx]'"
        )


def check_onnxruntime() -> None:
    """Raise ``ImportError`` (naming the extra to install) when ONNX Runtime or the exporter's
    ``onnxscript`` is missing, and ``ExportUnsupportedError`` when this torch cannot export."""
    check_exporter()
    check_onnx_packages(("onnxruntime", "onnxscript"), "running in ONNX Runtime")


# What onnx_ir logs as a warning to the exporter's own authors while it builds a graph, about
# a choice it makes correctly: the empty integer list of a Constant in the exporter's index_put
# (SegNet's max-unpooling, five lines per export) is typed INTS.
_EXPORTER_NOTES = ("Attribute type is ambiguous because it is an empty sequence",)


class _HideExporterNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_EXPORTER_NOTES)


@contextmanager
def _exporter_notes_hidden(hide: bool) -> Iterator[None]:
    """Keeps ``_EXPORTER_NOTES`` (and nothing else) off the log while the exporter runs."""
    if not hide:
        yield
        return
    logger, note_filter = logging.getLogger("onnx_ir._convenience"), _HideExporterNotes()
    logger.addFilter(note_filter)
    try:
        yield
    finally:
        logger.removeFilter(note_filter)


@contextmanager
def _narrowing_seen(narrowed: list[str]) -> Iterator[None]:
    """Record, in ``narrowed``, each time the ONNX exporter narrows the requested dynamic shapes.

    When ``torch.export`` finds that the model's code constrains a dynamic size (a branch on its
    parity, a pad that makes skip connections fit), the exporter re-exports with torch's suggested
    fixes applied (``refine_dynamic_shapes_from_suggested_fixes``) and says nothing; the file still
    names every side as free. Its message is kept for the refusal.
    """
    shapes = torch.export.dynamic_shapes
    refine = getattr(shapes, "refine_dynamic_shapes_from_suggested_fixes", None)
    if refine is None:
        yield
        return

    def recording(message, dynamic_shapes):
        narrowed.append(str(message))
        return refine(message, dynamic_shapes)

    shapes.refine_dynamic_shapes_from_suggested_fixes = recording
    try:
        yield
    finally:
        shapes.refine_dynamic_shapes_from_suggested_fixes = refine


def write_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    dynamic_shapes: tuple[dict, ...] | None = None,
    opset_version: int = DEFAULT_OPSET,
    verbose: bool = False,
) -> None:
    """Export ``module`` as traced on ``example`` to the ONNX file ``path`` (weights inside).

    The graph has one input ``input`` and one output ``output``. The trace takes CMRF's
    reference cascade (``reference_only``): plain operators every exporter knows.

    Args:
        module: the module to export, as it is (eval mode is the caller's choice).
        example: an input ``(B, C, *S)``; its sizes are fixed unless ``dynamic_shapes`` frees them.
        path: the file to write (its folder must exist); not atomic.
        dynamic_shapes: ``torch.export`` dynamic shapes for the one input, or ``None`` (fixed).
        opset_version: ONNX opset. Default 20, the first with a native ``Gelu``.
        verbose: let the exporter print its progress (default: kept quiet).
    """
    check_opset(opset_version)
    # The exporter reports its progress on stdout unless told not to (verbose=False). Not a
    # redirect of sys.stdout: that would silence every other thread of the program meanwhile.
    narrowed: list[str] = []
    with torch.no_grad(), reference_only(), _exporter_notes_hidden(not verbose), _narrowing_seen(narrowed):
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["output"],
            opset_version=opset_version,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            verbose=verbose,
        )
    if narrowed and dynamic_shapes is not None:
        why = next((line.strip() for line in narrowed[0].splitlines() if line.strip()), "")
        raise ExportUnsupportedError(
            f"{type(module).__name__}'s forward depends on its input size in a way torch.export cannot "
            f"keep dynamic ({why[:300]}); the ONNX exporter narrowed the dynamic sizes without saying so "
            f"and would write a file that is wrong or fails at other sizes: export without --dynamic "
            f"(dynamic=False) for each input size you need")
    written = _default_opset(path)
    if written != opset_version:  # the exporter's version converter gave up and kept its own opset
        raise ValueError(f"the exporter wrote opset {written} instead of the requested {opset_version}; "
                         f"export with opset {MIN_OPSET} or above (default {DEFAULT_OPSET})")
