"""Exact x2 upsampling with a deterministic backward: ``upsample_to``, the decoder's upsampling.

``upsample_to(x, size, mode)`` equals ``F.interpolate(x, size=size, mode=mode,
align_corners=False)`` forward and backward. When ``size`` is exactly twice ``x``'s spatial size
on every side it runs one of several exact formulations of the x2 case instead; any other size
runs ``F.interpolate`` itself.

Why: ``F.interpolate``'s bicubic backward scatters with atomics on CUDA. On an H200 (see
``docs/upsampling.md``) it took 8–22 ms per decoder call in fp32 and 53–216 ms in bf16, more
than a third of TinyU-Net's training step, and it is not deterministic.

The x2 case (``align_corners=False``) is a fixed filter: output ``2i + p`` samples the input at
``i - 0.25`` (``p = 0``) or ``i + 0.25`` (``p = 1``), so each output phase is a fixed 4-tap cubic
(Keys, ``a = -0.75``, as PyTorch) or 2-tap linear filter over the input. PyTorch clamps taps that
fall outside the input to the border sample, which is exactly replicate padding (for the linear
modes PyTorch also clamps the source coordinate ``-0.25`` to 0; with replicate padding that gives
the same value). Formulations (``METHODS``):

* ``"interpolate"``: ``F.interpolate`` (the oracle).
* ``"conv"``: 2-D bicubic only. Replicate-pad by 2, one depthwise 5x5 convolution with 4 output
  phases per channel, ``pixel_shuffle``. Other modes use ``"separable"`` instead.
* ``"separable"``: per spatial axis, replicate-pad, two phases as weighted sums of shifted slices,
  interleave. Any mode and ``spatial_dims``.
* ``"matmul"``: per spatial axis, a product with the ``(2n, n)`` interpolation matrix (border
  clamping included): ``A_h @ x @ A_w^T`` in 2-D. Any mode and ``spatial_dims``.

All of them are built from slicing, ``cat``, ``stack``, convolutions, matrix products and
``pixel_shuffle``; their autograd gathers and never scatters, so backward is deterministic.
Replicate padding is written as a ``cat`` of border slices because ``F.pad(mode="replicate")``'s
CUDA backward uses atomics too.

Which formulation runs (``choose_method``), in order:

0. inside ``cmrf.ops.reference_only()``: ``"interpolate"`` (the reference's operator);
1. inside ``use_method(name)``: ``name``;
2. the ``CMRF_UPSAMPLE`` environment variable, read once at import (``interpolate``, ``conv``,
   ``separable`` or ``matmul``; empty or ``auto``: no override);
3. the rule documented in ``choose_method``.

``measure()`` and ``format_measurements()`` time every formulation on the four TinyU-Net decoder
shapes on any device, so a session with a GPU can check the rule.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from cmrf.ops.cascade import reference_forced

__all__ = [
    "METHODS",
    "UPSAMPLE_ENV",
    "choose_method",
    "decoder_shapes",
    "format_measurements",
    "is_exporting",
    "measure",
    "upsample2x",
    "upsample_to",
    "use_method",
]

METHODS = ("interpolate", "conv", "separable", "matmul")
UPSAMPLE_ENV = "CMRF_UPSAMPLE"

# mode -> (spatial dims it takes, 1-D filter kind)
_MODES = {
    "linear": (1, "linear"),
    "bilinear": (2, "linear"),
    "bicubic": (2, "cubic"),
    "trilinear": (3, "linear"),
}


def cubic_weights(t: float, a: float = -0.75) -> tuple[float, ...]:
    """PyTorch's 4 bicubic weights (Keys kernel) for taps at ``-1, 0, 1, 2`` from ``floor``."""

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return (far(t + 1), near(t), near(1 - t), far(2 - t))


# kind -> (padding, ((first tap offset, weights) for output phase 0, same for phase 1)).
# Phase 0 samples i - 0.25: floor i - 1, fraction 0.75; phase 1 samples i + 0.25: floor i, 0.25.
# The weights are dyadic rationals (multiples of 2**-7), exact in every float dtype.
_PHASES = {
    "cubic": (2, ((-2, cubic_weights(0.75)), (-1, cubic_weights(0.25)))),
    "linear": (1, ((-1, (0.25, 0.75)), (0, (0.75, 0.25)))),
}


def _read_env() -> str | ValueError | None:
    """``CMRF_UPSAMPLE``'s method, ``None`` for auto, or the error a bad value is (raised when the
    value is used, ``env_method``: raising while ``cmrf`` is imported would escape every caller's
    error handling, the command line's included)."""
    raw = os.environ.get(UPSAMPLE_ENV, "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw not in METHODS:
        return ValueError(f"{UPSAMPLE_ENV} must be 'auto' or one of {', '.join(METHODS)}, got {raw!r}")
    return raw


# Read once: reading the environment inside a traced region would be baked in anyway.
_ENV_METHOD = _read_env()
_state = threading.local()


def env_method() -> str | None:
    """The method ``CMRF_UPSAMPLE`` forces (``None``: auto).

    Raises:
        ValueError: for a value that is no method.
    """
    if isinstance(_ENV_METHOD, ValueError):
        raise ValueError(str(_ENV_METHOD))
    return _ENV_METHOD


def _check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


@contextlib.contextmanager
def use_method(method: str):
    """Force ``method`` (one of ``METHODS``) for every ``upsample_to`` call in this thread and block.

    For measurements and tests (e.g. TinyU-Net with ``"interpolate"`` as the oracle). Overrides
    ``CMRF_UPSAMPLE``.
    """
    _check_method(method)
    previous = getattr(_state, "method", None)
    _state.method = method
    try:
        yield
    finally:
        _state.method = previous


# --- tracing helpers --------------------------------------------------------------------------


def is_exporting() -> bool:
    """Whether ``torch.export`` or an ONNX export is tracing (``False`` under ``torch.compile``).

    Reads the flag behind ``torch.compiler.is_exporting`` rather than calling it: Dynamo in
    torch 2.11 folds that call to ``True`` while ``torch.compile`` traces (checked; 2.14 does
    not), which would give compiled models the export choices. Releases without the flag or
    ``torch.compiler.is_exporting`` (2.4 and 2.6, checked) see only the ONNX exporter (the
    exact-2x rule then adds shape guards to a ``torch.export`` graph).
    """
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is None:  # a release without the flag: the public function, where there is one
        torch_export = getattr(torch.compiler, "is_exporting", None)
        flag = torch_export is not None and torch_export()
    return bool(flag) or torch.onnx.is_in_onnx_export()


def _tracing() -> bool:
    return torch.compiler.is_compiling() or is_exporting() or torch.jit.is_tracing()


def is_exact_2x(in_sizes: Sequence, out_sizes: Sequence) -> bool:
    """Whether every output side is exactly twice the input side.

    Under ``torch.export`` the sides may be symbolic: the test must then hold for every size the
    export allows, and must not add a guard (a guard that fails for some allowed size is a
    "Constraints violated" error), so only statically provable equality counts; anything else
    keeps ``F.interpolate``, which is correct for every size.
    """
    if len(in_sizes) != len(out_sizes):
        return False
    if is_exporting():
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return all(statically_known_true(o == 2 * i) for i, o in zip(in_sizes, out_sizes))
    return all(o == 2 * i for i, o in zip(in_sizes, out_sizes))


# --- formulations ----------------------------------------------------------------------------


def pad_replicate(x: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    """``pad`` copies of the first and last slice along ``dim`` around ``x`` (a ``cat``: its
    backward is slicing plus a sum, unlike ``F.pad(mode="replicate")``'s scatter on CUDA)."""
    n = x.shape[dim]
    first, last = x.narrow(dim, 0, 1), x.narrow(dim, n - 1, 1)
    return torch.cat([first] * pad + [x] + [last] * pad, dim)


def _separable_axis(x: torch.Tensor, dim: int, kind: str) -> torch.Tensor:
    """x2 along ``dim`` (non-negative) as weighted sums of shifted slices, phases interleaved."""
    pad, phases = _PHASES[kind]
    n = x.shape[dim]
    padded = pad_replicate(x, dim, pad)
    outs = []
    for start, weights in phases:
        acc = padded.narrow(dim, pad + start, n) * weights[0]
        for k in range(1, len(weights)):
            acc = acc + padded.narrow(dim, pad + start + k, n) * weights[k]
        outs.append(acc)
    return torch.stack(outs, dim + 1).flatten(dim, dim + 1)


def _upsample_separable(x: torch.Tensor, kind: str) -> torch.Tensor:
    for dim in range(2, x.dim()):
        x = _separable_axis(x, dim, kind)
    return x


_CACHE: dict[tuple, torch.Tensor] = {}
_CACHE_LIMIT = 64
# Entries read while a CUDA graph was being captured: the graph holds their addresses, so they
# must outlive it and are never evicted (a handful of small kernels per captured model).
_CAPTURED: dict[tuple, torch.Tensor] = {}


def _capturing(value: torch.Tensor) -> bool:
    return value.is_cuda and torch.cuda.is_current_stream_capturing()


def _cached(key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()`` memoised by ``key`` in eager mode; rebuilt with tensor ops while tracing, so a
    compiled or exported graph holds no reference to this cache (and never guards on it)."""
    if _tracing():
        return build()
    value = _CACHE.get(key)
    if value is None:
        value = _CAPTURED.get(key)
    if value is None:
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        # Built as a normal tensor even under torch.inference_mode(): an inference tensor in the
        # cache would break every later training step ("Inference tensors cannot be saved for
        # backward"), e.g. after a validation run under inference_mode.
        with torch.inference_mode(False), torch.no_grad():
            value = _CACHE[key] = build()
    if _capturing(value):
        _CAPTURED[key] = value
    return value


def _axis_matrix(n, kind: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(2n, n)`` matrix ``A`` with ``A @ v`` = x2 interpolation of ``v`` (border taps clamped).

    Built with comparisons against ``arange`` (no scatter, no host lists), so ``n`` may be
    symbolic. The entries are sums of at most 4 dyadic weights: exact in every float dtype.
    """
    _, phases = _PHASES[kind]
    rows = torch.arange(n, device=device)
    cols = rows.unsqueeze(0)
    mats = []
    for start, weights in phases:
        mat = torch.zeros(n, n, device=device, dtype=torch.float32)
        for k, w in enumerate(weights):
            src = (rows + (start + k)).clamp(0, n - 1).unsqueeze(1)
            mat = mat + (src == cols).to(torch.float32) * w
        mats.append(mat)
    return torch.stack(mats, 1).reshape(2 * n, n).to(dtype)


def _matmul_axis(x: torch.Tensor, dim: int, kind: str) -> torch.Tensor:
    n = x.shape[dim]
    mat = _cached(("matrix", n, kind, x.device, x.dtype), lambda: _axis_matrix(n, kind, x.device, x.dtype))
    if dim == x.dim() - 1:
        return x @ mat.transpose(0, 1)
    if dim == x.dim() - 2:
        return mat @ x
    # Fold the trailing axes so the product runs along ``dim``: (..., n, rest) -> (..., 2n, rest).
    shape = x.shape
    out = mat @ x.flatten(dim + 1)
    return out.unflatten(dim + 1, shape[dim + 1:])


def _upsample_matmul(x: torch.Tensor, kind: str) -> torch.Tensor:
    for dim in range(x.dim() - 1, 1, -1):
        x = _matmul_axis(x, dim, kind)
    return x


def _bicubic_kernel(channels, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(4 * channels, 1, 5, 5)`` depthwise kernel: phase ``(p, q)`` of each channel.

    Over a replicate-padded (by 2) input, output row ``i`` of phase ``p`` uses padded rows
    ``i + 2 + start_p ...``: phase 0 taps padded rows ``i .. i+3``, phase 1 ``i+1 .. i+4``.
    """
    pad, phases = _PHASES["cubic"]
    taps = torch.zeros(2, 2 * pad + 1, device=device, dtype=torch.float64)
    for p, (start, weights) in enumerate(phases):
        taps[p, pad + start: pad + start + len(weights)] = torch.tensor(weights, dtype=torch.float64)
    kernel = (taps[:, None, :, None] * taps[None, :, None, :]).reshape(4, 1, 2 * pad + 1, 2 * pad + 1)
    return kernel.to(dtype).repeat(channels, 1, 1, 1)


def _upsample_conv_bicubic(x: torch.Tensor) -> torch.Tensor:
    channels = x.shape[1]
    key = ("conv", channels, x.device, x.dtype)
    kernel = _cached(key, lambda: _bicubic_kernel(channels, x.device, x.dtype))
    padded = pad_replicate(pad_replicate(x, 2, 2), 3, 2)
    return F.pixel_shuffle(F.conv2d(padded, kernel, groups=channels), 2)


def upsample2x(x: torch.Tensor, mode: str = "bicubic", method: str = "separable") -> torch.Tensor:
    """Exact ``F.interpolate(x, scale_factor=2, mode=mode, align_corners=False)`` by ``method``.

    Args:
        x: ``(B, C, *S)`` floating point, ``len(S)`` matching ``mode``.
        mode: ``"linear"`` (1-D), ``"bilinear"``, ``"bicubic"`` (2-D) or ``"trilinear"`` (3-D).
            Default ``"bicubic"``.
        method: one of ``METHODS``. ``"conv"`` exists for bicubic only; other modes run
            ``"separable"`` for it. Default ``"separable"``.

    Returns:
        ``(B, C, *2S)`` in ``x``'s dtype.
    """
    _check_method(method)
    dims, kind = _MODES[mode]
    if x.dim() != dims + 2:
        raise ValueError(f"mode {mode!r} takes a {dims + 2}-D input (B, C, *S), got shape {tuple(x.shape)}")
    if method == "interpolate" or x.numel() == 0:
        # Empty: nothing to compute, and pixel_shuffle's backward refuses an empty batch.
        return F.interpolate(x, scale_factor=2, mode=mode, align_corners=False)
    if method == "conv" and mode != "bicubic":
        method = "separable"
    # Under autocast conv and matmul would run in the low-precision dtype, F.interpolate does not:
    # keep x's dtype, as F.interpolate does.
    autocast = x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)
    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
        if method == "conv":
            return _upsample_conv_bicubic(x)
        # Per axis, these round every partial sum (separable) or each axis (matmul) to x's dtype:
        # fp16/bf16 are computed in fp32 and rounded once, as F.interpolate (and the convolution) do.
        low = x.dtype in (torch.float16, torch.bfloat16)
        per_axis = _upsample_matmul if method == "matmul" else _upsample_separable
        out = per_axis(x.float() if low else x, kind)
        out = out.to(x.dtype) if low else out
        # Slices and products give a contiguous result; F.interpolate keeps a channels-last input so.
        layout = _channels_last_format(x)
        return out if layout is None else out.contiguous(memory_format=layout)


def _channels_last_format(x: torch.Tensor) -> torch.memory_format | None:
    """``torch.channels_last(_3d)`` when ``x`` is laid out so (and not also plainly contiguous)."""
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if layout is None or x.is_contiguous() or not x.is_contiguous(memory_format=layout):
        return None
    return layout


# --- choice ----------------------------------------------------------------------------------


def choose_method(x: torch.Tensor, mode: str = "bicubic", requires_grad: bool | None = None) -> str:
    """The formulation ``upsample_to`` uses for an exact x2 of ``x``.

    Overrides first: ``cmrf.ops.reference_only()`` (``"interpolate"``, the reference's operator),
    then ``use_method(...)``, then ``CMRF_UPSAMPLE``. Otherwise a rule (see
    ``docs/upsampling.md`` for the measurements behind it):

    * TorchScript tracing (``torch.jit.trace``, the legacy ONNX exporter, fvcore's counters):
      ``"interpolate"``; such a trace records one ``upsample_bicubic2d`` node, sized from the
      traced tensors, and FLOP counters keep counting the paper's operator.
    * ``torch.export`` (and the ONNX exporter built on it): ``"conv"`` for bicubic (one ``Conv``
      + ``DepthToSpace`` in ONNX, as ``cmrf.export`` ships) and ``"separable"`` otherwise; no
      shape enters the choice, so no guard is added on symbolic sizes.
    * CPU (measured, ``docs/upsampling.md``): in float32/float64, ``"matmul"`` for 2-D modes
      with every side at most 128 and for 3-D modes with every side at most 16; MKL/oneDNN
      matrix products beat ``F.interpolate``'s per-pixel loops there (1.8–6.8x forward,
      3.2–9x forward + backward at the 2-D decoder shapes). ``"interpolate"`` otherwise: for
      1-D, for larger sides (the product's cost grows with the side), and for bf16/fp16, where
      this CPU's convolutions and matrix products were 3–40x slower than ``F.interpolate``.
    * CUDA (``measure()`` on an H200, 2026-11-29, docs/upsampling.md):
      - bicubic with every side at most 128 (the measured decoder shapes): forward only,
        ``"interpolate"`` when the input has at least ``128 * 128`` pixels per channel (1.43
        against 1.48 ms for ``"matmul"``); otherwise, with a backward (``requires_grad`` or,
        when ``None``, autograd enabled and ``x`` requiring grad) or below that size,
        ``"matmul"``: forward + backward 0.5–2.7 ms fp32 and 0.6–3.4 ms bf16 against 8–22 and
        53–212 ms for ``F.interpolate`` and 0.6–6.5 ms for the conv form (fastest at every
        shape but bf16 (16, 512, 16, 16), a tie with the conv form: 0.83 against 0.81 ms);
        forward 0.09–0.6 ms against 2.7–5.4 and 0.27–1.84 ms. A float32 or float16 input while
        CUDA may run float32 products in TF32 (``torch.set_float32_matmul_precision("high")``,
        ``torch.backends.cuda.matmul.fp32_precision = "tf32"``) takes ``"separable"`` instead:
        TF32 would round a float32 input, and each axis's float32 result before the next axis's
        product, to 10 mantissa bits (as many as float16 keeps; bfloat16 keeps 7, so its result
        does not change).
      - other modes, and sides over 128: with a backward ``"conv"`` (bicubic) or
        ``"separable"``; forward only ``"interpolate"`` from ``128 * 128`` pixels per channel,
        ``"conv"``/``"separable"`` below (unmeasured beyond the shapes above).
      - inside ``torch.compile``: ``"separable"``; Inductor fuses its slices and sums into a few
        pointwise kernels forward and backward, where the convolution stays an external call
        (the H200 measured the compiled conv form slower than compiled ``F.interpolate``;
        the compiled formulations themselves are unmeasured).
    * any other device: ``"separable"`` (plain tensor ops, no assumptions).

    ``"conv"`` is only defined for bicubic; other modes get ``"separable"`` in its place.

    Args:
        x: the input ``(B, C, *S)``.
        mode: the ``F.interpolate`` mode. Default ``"bicubic"``.
        requires_grad: whether a backward will run; ``None`` (default) infers it from ``x``.

    Returns:
        One of ``METHODS``.
    """
    forced = getattr(_state, "method", None) or env_method()
    if reference_forced():  # the reference algorithm, e.g. a benchmark's baseline row
        method = "interpolate"
    elif forced is not None:
        method = forced
    elif torch.jit.is_tracing():
        method = "interpolate"
    elif is_exporting():
        method = "conv"
    elif x.device.type == "cpu":
        sides = x.shape[2:]
        small = max(sides) <= (128 if len(sides) == 2 else 16)
        fast_dtype = x.dtype in (torch.float32, torch.float64)
        method = "matmul" if fast_dtype and len(sides) > 1 and small else "interpolate"
    elif x.device.type == "cuda":
        if requires_grad is None:
            requires_grad = torch.is_grad_enabled() and x.requires_grad
        large = math.prod(x.shape[2:]) >= 128 * 128
        if torch.compiler.is_compiling():
            method = "separable"
        elif mode == "bicubic" and max(x.shape[2:]) <= 128:
            if large and not requires_grad:
                method = "interpolate"
            elif x.dtype in (torch.float32, torch.float16) and _tf32_products_allowed():
                method = "separable"  # exact: slices and sums, no product that TF32 could round
            else:
                method = "matmul"
        elif requires_grad:
            method = "conv"
        else:
            method = "interpolate" if large else "conv"
    else:
        method = "separable"
    if method == "conv" and mode != "bicubic":
        method = "separable"
    return method


def _tf32_products_allowed() -> bool:
    """Whether CUDA float32 matrix products may round their inputs to TF32 (either PyTorch API).

    ``torch.backends.cuda.matmul.fp32_precision`` (torch 2.9+) when set; else the legacy
    ``allow_tf32``, which ``torch.set_float32_matmul_precision`` also sets. Reading a legacy flag
    after the new API was used raises on torch 2.14; then assume they may.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return True


def upsample_to(x: torch.Tensor, size: Sequence[int], mode: str, method: str | None = None) -> torch.Tensor:
    """``F.interpolate(x, size=size, mode=mode, align_corners=False)``, exact x2 by a fast path.

    Args:
        x: ``(B, C, *S)`` floating point.
        size: the output's spatial size (e.g. a skip connection's ``shape[2:]``).
        mode: ``"linear"``, ``"bilinear"``, ``"bicubic"`` or ``"trilinear"``.
        method: force one of ``METHODS`` for this call; ``None`` (default): ``choose_method``.

    Returns:
        ``(B, C, *size)``. When every side of ``size`` is exactly twice ``x``'s, the result of
        the chosen exact formulation (equal to ``F.interpolate`` up to float rounding, with a
        deterministic backward, for finite inputs: a NaN or ``inf`` in ``x`` makes NaNs over a
        wider area than ``F.interpolate``'s, since a zero weight times either is NaN; with
        ``"matmul"`` the whole output plane, see docs/upsampling.md); otherwise
        ``F.interpolate``'s.

    Raises:
        ValueError: for an unknown ``mode`` or ``method``, or an input whose rank does not fit
            ``mode``.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
    size = tuple(size)
    if method is not None:
        _check_method(method)
    spatial = _MODES[mode][0]
    if x.dim() != spatial + 2 or len(size) != spatial:
        raise ValueError(f"mode {mode!r} takes (B, C) and {spatial} spatial side(s): an input of "
                         f"{spatial + 2} dimensions and a size of {spatial}, got shape {tuple(x.shape)} and "
                         f"size {size}")
    if not is_exact_2x(tuple(x.shape[2:]), size):
        return F.interpolate(x, size=size, mode=mode, align_corners=False)
    if method is None:
        method = choose_method(x, mode)
    if method == "interpolate":
        return F.interpolate(x, size=size, mode=mode, align_corners=False)
    return upsample2x(x, mode, method)


# --- measurement -----------------------------------------------------------------------------


def decoder_shapes(batch: int = 16, image: int = 256, channels: Sequence[int] = (64, 128, 256, 512)):
    """TinyU-Net's four decoder upsampling inputs ``(B, C, H, W)``, deepest first.

    The deepest decoder upsamples the pooled deepest features (``channels[-1]`` at
    ``image / 16``); decoder ``i`` upsamples decoder ``i + 1``'s output (``channels[i + 1]``).
    """
    depth = len(channels)
    below = list(channels[1:]) + [channels[-1]]
    return [(batch, below[i], image >> (i + 1), image >> (i + 1)) for i in reversed(range(depth))]


def _time_ms(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[len(samples) // 2]


def measure(
    shapes: Sequence[Sequence[int]] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    mode: str = "bicubic",
    methods: Sequence[str] = METHODS,
    repeat: int = 5,
    batch: int = 16,
) -> list[dict]:
    """Median wall time of every formulation, forward and forward + backward, per shape.

    The formulations of one shape are timed one after another in one process (one warm-up, then
    ``repeat`` calls each), so their ratios share the machine's state. Times include
    synchronisation on CUDA.

    Args:
        shapes: input shapes ``(B, C, *S)``; default ``decoder_shapes(batch)``.
        device: where to run. Default ``"cpu"``.
        dtype: input dtype. Default ``torch.float32``.
        mode: interpolation mode. Default ``"bicubic"``.
        methods: formulations to time. Default all of ``METHODS``.
        repeat: timed calls per formulation (median reported). Default 5.
        batch: batch of the default shapes. Default 16.

    Returns:
        One dict per (shape, method): ``shape``, ``dtype``, ``method``, ``fwd_ms``,
        ``fwd_bwd_ms``, ``max_diff`` (forward, against ``"interpolate"``).
    """
    device = torch.device(device)
    shapes = [tuple(s) for s in (shapes or decoder_shapes(batch))]
    rows = []
    for shape in shapes:
        x = torch.randn(shape, device=device, dtype=dtype)
        size = tuple(2 * s for s in shape[2:])
        grad = torch.randn((*shape[:2], *size), device=device, dtype=dtype)
        oracle = F.interpolate(x, size=size, mode=mode, align_corners=False)
        for method in methods:
            with torch.no_grad():
                out = upsample_to(x, size, mode, method=method)
                call = lambda m=method, x=x, s=size: upsample_to(x, s, mode, method=m)  # noqa: E731
                fwd = _time_ms(call, device, repeat)
            xg = x.detach().requires_grad_(True)

            def step(m=method, xg=xg, s=size, g=grad):
                upsample_to(xg, s, mode, method=m).backward(g)
                xg.grad = None

            rows.append({
                "shape": shape,
                "dtype": str(dtype).replace("torch.", ""),
                "method": method,
                "fwd_ms": fwd,
                "fwd_bwd_ms": _time_ms(step, device, repeat),
                "max_diff": (out.float() - oracle.float()).abs().max().item(),
            })
    return rows


def format_measurements(rows: list[dict]) -> str:
    """A markdown table of ``measure()``'s rows, with each time's ratio to ``"interpolate"``."""
    base = {(r["shape"], r["dtype"]): r for r in rows if r["method"] == "interpolate"}
    lines = [
        "| shape | dtype | method | fwd ms | fwd x | fwd+bwd ms | fwd+bwd x | max diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base.get((r["shape"], r["dtype"]))
        fx = f"{b['fwd_ms'] / r['fwd_ms']:.2f}" if b else "-"
        bx = f"{b['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}" if b else "-"
        lines.append(
            f"| {tuple(r['shape'])} | {r['dtype']} | {r['method']} | {r['fwd_ms']:.3f} | {fx} | "
            f"{r['fwd_bwd_ms']:.3f} | {bx} | {r['max_diff']:.1e} |"
        )
    return "\n".join(lines)
