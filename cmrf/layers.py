"""Building blocks: the CMRF module and the small conv blocks it is made of.

Every block takes ``spatial_dims`` (MONAI's convention): 2 for images ``(B, C, H, W)``,
3 for volumes ``(B, C, D, H, W)``. One implementation serves both.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from cmrf.ops import cascade_concat

# The reference CMRF builds every BatchNorm with these, not PyTorch's defaults.
CMRF_BN_EPS = 1e-3
CMRF_BN_MOMENTUM = 0.03

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


def check_spatial_dims(spatial_dims) -> int:
    """Return ``spatial_dims`` if it is the integer 1, 2 or 3, else raise ``ValueError``."""
    integral = isinstance(spatial_dims, numbers.Integral) and not isinstance(spatial_dims, bool)
    if not integral or spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    return int(spatial_dims)


def conv_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` for ``spatial_dims`` 1/2/3."""
    return _CONV[check_spatial_dims(spatial_dims)]


def batchnorm_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.BatchNorm{1,2,3}d`` for ``spatial_dims`` 1/2/3."""
    return _BATCHNORM[check_spatial_dims(spatial_dims)]


def maxpool_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.MaxPool{1,2,3}d`` for ``spatial_dims`` 1/2/3."""
    return _MAXPOOL[check_spatial_dims(spatial_dims)]


def compiled_original(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, else ``model`` itself.

    By class name, so that Dynamo is not imported to ask."""
    while type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None),
                                                                     nn.Module):
        model = model._orig_mod
    return model


def without_wrappers(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` and ``(Distributed)DataParallel`` wrappers, nested in
    any order, else ``model`` itself: the one whose ``state_dict`` keys carry no wrapper prefix."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif (inner := compiled_original(model)) is not model:
            model = inner
        else:
            return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the ``with`` block, then every submodule's own training flag
    back as it was (``model.train(was_training)`` would also switch on a BatchNorm the caller
    had frozen with ``.eval()``)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_user_hooks(module: nn.Module) -> bool:
    """Whether ``module`` itself has forward or backward hooks of the user's.

    torch's own hooks (``spectral_norm``, ``weight_norm``) go with their module and do not count.
    """

    def users(hook) -> bool:
        origin = getattr(hook, "__module__", None) or type(hook).__module__
        return not (origin == "torch" or origin.startswith("torch."))

    return any(users(hook) for name in _HOOK_DICTS for hook in (getattr(module, name, None) or {}).values())


def check_positive_int(name: str, value) -> int:
    """Return ``value`` if it is an integer >= 1, else raise ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return int(value)


def check_positive_ints(
    name: str, values, what: str, example: str, length: int | None = None
) -> tuple[int, ...]:
    """Return ``values`` as a tuple of Python ints, each >= 1, else raise ``ValueError`` naming it.

    Args:
        name: the argument's name, used in messages (``"channels"``).
        values: any iterable of integers (tuple, list, ...); a single number or a string is refused.
        what: what the entries are, for messages (``"encoder widths"``).
        example: a valid value shown in the message, e.g. ``"(64, 128, 256, 512)"``.
        length: the required number of entries, or ``None`` (default) for any number >= 1.
    """
    if isinstance(values, (str, bytes, numbers.Number)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of {what}, e.g. {example}, got {values!r}")
    values = tuple(values)
    if length is not None and len(values) != length:
        raise ValueError(f"{name} must have {length} entries, e.g. {example}, got {values}")
    if not values:
        raise ValueError(f"{name} must have at least one entry, e.g. {example}, got ()")
    return tuple(check_positive_int(f"{name}[{i}]", value) for i, value in enumerate(values))


def check_input_size(input_size) -> tuple[int, ...]:
    """``input_size`` as a tuple of ints ``(B, C, *spatial)``, every entry an integer >= 1,
    at least one spatial side; else ``ValueError`` naming it (floats are refused, not truncated)."""
    if isinstance(input_size, torch.Tensor):  # its repr would fill the message
        raise ValueError(f"input_size must be a shape (B, C, *spatial), e.g. (1, 3, 256, 256), got a tensor; "
                         f"pass its .shape, {tuple(input_size.shape)}")
    size = check_positive_ints("input_size", input_size, "integers (B, C, *spatial)", "(1, 3, 256, 256)")
    if len(size) < 3:
        raise ValueError(f"input_size must be (B, C, *spatial) with at least one spatial side, got {size}")
    return size


def _is_numpy_bool(value) -> bool:
    """Whether ``value`` is NumPy's bool scalar (``np.True_``), told by its type so that NumPy
    need not be imported to ask."""
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")


def check_bool(name: str, value) -> bool:
    """Return ``value`` as a Python bool if it is ``True`` or ``False`` (NumPy's too), else raise
    ``ValueError`` naming it: ``bool("false")`` is ``True``, so a string would mean the opposite."""
    if not (isinstance(value, bool) or _is_numpy_bool(value)):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_optional_bool(name: str, value) -> bool | None:
    """Return ``value`` if it is ``None``, ``True`` or ``False`` (NumPy's too, as a Python bool),
    else raise ``ValueError``.

    Strict on purpose: ``bool("false")`` is ``True``, so a string would silently mean the opposite.
    """
    if value is not None and not (isinstance(value, bool) or _is_numpy_bool(value)):
        raise ValueError(f"{name} must be True, False or None, got {value!r} ({type(value).__name__})")
    return None if value is None else bool(value)


def first_parameter(module: nn.Module) -> torch.Tensor | None:
    """The first parameter of ``module`` (None if it has none): its dtype is the model's."""
    return next(module.parameters(), None)


def _autocast_on(device_type: str) -> bool:
    if device_type in ("cpu", "cuda"):  # no try block on the common path (traced by torch.compile)
        return torch.is_autocast_enabled(device_type)
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


# Named in the message of ``check_input``; any other dtype (integer, bool, complex) is refused.
_FLOAT_DTYPES = "float32, float16, bfloat16, float64"


def check_input(
    x,
    in_channels: int,
    spatial_dims: int,
    name: str,
    min_size: int = 1,
    multiple_of: int = 1,
    why: str = "",
    weight: torch.Tensor | None = None,
) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating-point ``(B, in_channels, *S)`` tensor.

    The one input check of every model and block of this library, so they all say the same thing.

    Args:
        x: the input.
        in_channels: the channel count ``x.shape[1]`` must have.
        spatial_dims: ``len(S)``; ``x`` must have ``spatial_dims + 2`` dimensions.
        name: the model or block named in the messages (``"TinyUNet"``).
        min_size: smallest allowed spatial side. Default 1.
        multiple_of: every spatial side must be a multiple of this. Default 1.
        why: the reason for ``min_size``/``multiple_of``, shown in parentheses (``"4 poolings"``).
        weight: a weight of the model (:func:`first_parameter`); outside autocast ``x`` must have
            its dtype. Default None: not checked.

    Raises:
        ValueError: naming what was expected and what was received: not a tensor, wrong number of
            dimensions, wrong channel count, a non-floating dtype (an integer image needs
            ``x.float() / 255`` and the training normalisation), a floating dtype other than the
            weights' outside autocast, or a side that is too small or not a multiple of
            ``multiple_of``.
        TypeError: ``x`` is a ``torch.fx.Proxy`` (``torch.fx.symbolic_trace``, which these checks
            defeat; ``torch.export`` and ``torch.jit.trace`` work).
    """
    if not isinstance(x, torch.Tensor):
        if isinstance(x, torch.fx.Proxy):  # torch.fx.symbolic_trace: Python checks of shapes cannot run
            raise TypeError(
                f"{name} cannot be traced by torch.fx.symbolic_trace: its forward checks the input's shape "
                f"in Python; use torch.export.export(model, (x,)) or torch.jit.trace(model, x) instead"
            )
        raise ValueError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    ndim = spatial_dims + 2
    expected = f"(B, {in_channels}, {', '.join('*' * spatial_dims)})"
    if x.dim() != ndim:
        raise ValueError(
            f"{name} (spatial_dims={spatial_dims}) expects a {ndim}-D input {expected}, "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{name} expected {in_channels} input channels, received {x.shape[1]}: expected shape "
            f"{expected}, got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        hint = "x.float() / 255" if x.dtype == torch.uint8 else "x.float()"
        raise ValueError(
            f"{name} expects a floating-point input ({_FLOAT_DTYPES}), got {x.dtype}; convert with "
            f"{hint} (then normalise as in training)"
        )
    if weight is not None and x.dtype != weight.dtype:
        _check_dtypes_agree(x, weight, name)
    reason = f" ({why})" if why else ""
    if any(side < min_size for side in x.shape[2:]):
        raise ValueError(
            f"{name} needs every spatial side >= {min_size}{reason}, got spatial size {tuple(x.shape[2:])}"
        )
    if multiple_of > 1 and any(side % multiple_of for side in x.shape[2:]):
        raise ValueError(
            f"{name} needs every spatial side to be a multiple of {multiple_of}{reason}, got spatial "
            f"size {tuple(x.shape[2:])}"
        )


# What autocast computes in: a float64 input or model is never cast by it.
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtypes_agree(x: torch.Tensor, weight: torch.Tensor, name: str) -> None:
    """Refuse an input whose dtype is not the weights' where autocast does not reconcile them."""
    autocast = _autocast_on(x.device.type)
    if autocast and x.dtype in _AUTOCAST_DTYPES and weight.dtype in _AUTOCAST_DTYPES:
        return
    convert = f"convert the input (x.to({weight.dtype})) or the model (model.to({x.dtype}))"
    if autocast:  # a float64 side: autocast leaves it as it is, and the first convolution fails
        raise ValueError(f"{name}'s weights are {weight.dtype} but the input is {x.dtype}, and autocast "
                         f"does not cast float64: {convert}")
    castable = x.dtype in _AUTOCAST_DTYPES and weight.dtype in _AUTOCAST_DTYPES
    hint = ", or run under torch.autocast" if castable else ""
    raise ValueError(f"{name}'s weights are {weight.dtype} but the input is {x.dtype}: {convert}{hint}")


class ConvNorm(nn.Sequential):
    """Convolution without bias followed by BatchNorm (and optionally an activation).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: cubic kernel side, odd (the padding of ``kernel_size // 2`` keeps the size
            only then). Default 1.
        groups: convolution groups. Default 1.
        act: activation module appended after the norm, or ``None`` (default) for none.
        spatial_dims: 2 for images, 3 for volumes. Default 2.
        eps, momentum: BatchNorm settings; the defaults are the reference CMRF's (1e-3, 0.03).

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)`` (padding keeps ``S``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        groups: int = 1,
        act: nn.Module | None = None,
        spatial_dims: int = 2,
        eps: float = CMRF_BN_EPS,
        momentum: float = CMRF_BN_MOMENTUM,
    ):
        in_channels = check_positive_int("in_channels", in_channels)
        out_channels = check_positive_int("out_channels", out_channels)
        kernel_size = check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"ConvNorm keeps the spatial size only with an odd kernel_size, "
                             f"got {kernel_size}")
        layers = {
            "conv": conv_type(spatial_dims)(
                in_channels,
                out_channels,
                kernel_size,
                padding=kernel_size // 2,
                groups=groups,
                bias=False,
            ),
            "norm": batchnorm_type(spatial_dims)(out_channels, eps=eps, momentum=momentum),
        }
        if act is not None:
            layers["act"] = act
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)


class ConvBNReLU(nn.Sequential):
    """3x3 convolution (with bias) -> BatchNorm (PyTorch defaults) -> ReLU.

    The classic block of SegNet and of CMUNeXt's ``conv_block``.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2):
        super().__init__()
        self.conv = conv_type(spatial_dims)(in_channels, out_channels, 3, padding=1)
        self.norm = batchnorm_type(spatial_dims)(out_channels)
        self.act = nn.ReLU(inplace=True)


def cmrf_channels(in_channels: int, out_channels: int, N: int) -> tuple[int, int]:
    """Validate CMRF's channel arithmetic and return ``(hidden, branch)``.

    ``hidden = out_channels / N`` is the width after the first pointwise conv; ``branch =
    out_channels / (2N)`` is the width of each parity half and of every cascade stage.

    Raises:
        ValueError: naming the offending numbers, when a count is not an integer >= 1 or
            ``out_channels`` is not divisible by ``2N``.
    """
    # Python ints from here on: NumPy's would reach the modules' attributes (see CMRF).
    check_positive_int("in_channels", in_channels)
    out_channels = check_positive_int("out_channels", out_channels)
    N = check_positive_int("N", N)
    if out_channels % (2 * N):
        raise ValueError(
            f"CMRF needs out_channels divisible by 2N: {out_channels} is not divisible by "
            f"2N = {2 * N} (N = {N}); try an out_channels that is a multiple of {2 * N} or a "
            f"smaller N"
        )
    return out_channels // N, out_channels // (2 * N)


def cmrf_num_params(in_channels: int, out_channels: int, N: int = 8, spatial_dims: int = 2) -> int:
    """Closed-form parameter count of ``CMRF(in_channels, out_channels, N)``.

    BatchNorm affine parameters are counted, running statistics are not.
    """
    hidden, branch = cmrf_channels(in_channels, out_channels, N)
    taps = 3 ** check_spatial_dims(spatial_dims)
    pw1 = in_channels * hidden + 2 * hidden
    cascade = (N - 1) * (taps * branch + 2 * branch)
    pw2 = (out_channels // 2) * out_channels + 2 * out_channels
    return pw1 + cascade + pw2


class CMRF(nn.Module):
    """Cascade Multi-Receptive Fields module (TinyU-Net, MICCAI 2024).

    With ``C = out_channels`` and ``c = C / (2N)``:

    1. ``pw1``: 1x1 conv ``in_channels -> C/N`` + BatchNorm + GELU.
    2. Split by parity: ``odd = y[:, 0::2]``, ``even = y[:, 1::2]`` (``c`` channels each).
    3. ``N - 1`` cascaded 3x3 depthwise conv + BatchNorm stages on ``even``, each fed by the
       previous one.
    4. Concatenate ``[odd + even, d_1, ..., d_{N-1}]`` (``C/2`` channels).
    5. ``pw2``: 1x1 conv ``C/2 -> C`` + BatchNorm + GELU.
    6. Add the input when ``in_channels == out_channels`` and ``shortcut`` is set.

    Every BatchNorm uses ``eps=1e-3, momentum=0.03`` as in the reference code.

    Args:
        in_channels: input channels, >= 1.
        out_channels: output channels, a multiple of ``2N``.
        N: number of receptive fields (one linear branch plus ``N - 1`` cascade stages).
            Default 8, the paper's choice.
        shortcut: add the input to the output when the channel counts match. Default True.
        spatial_dims: 2 for images (default), 3 for volumes (3x3x3 depthwise convolutions),
            1 for signals.
        fused: per-module choice of the cascade implementation: ``None`` (default) follows the
            ``CMRF_FUSED`` environment variable, ``True`` forces the fused Triton kernels,
            ``False`` forces the plain PyTorch reference.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)`` with ``len(S) == spatial_dims``.

    Integer arguments may be any integral type (NumPy's included); they are kept as Python ints.

    Raises:
        ValueError: for channel counts or ``N`` that are not integers >= 1, an ``out_channels``
            not divisible by ``2N``, a ``spatial_dims`` other than 1, 2 or 3, or a ``shortcut``
            or ``fused`` that is not a bool (``fused`` also ``None``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        N: int = 8,
        shortcut: bool = True,
        spatial_dims: int = 2,
        fused: bool | None = None,
    ):
        super().__init__()
        hidden, branch = cmrf_channels(in_channels, out_channels, N)
        # Python ints and bools: NumPy's in attributes made torch.compile(fullgraph=True) fail on
        # `x + y if self.add_residual` ("data-dependent branching").
        in_channels, out_channels, N = int(in_channels), int(out_channels), int(N)
        self.in_channels, self.out_channels, self.N = in_channels, out_channels, N
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.add_residual = check_bool("shortcut", shortcut) and in_channels == out_channels
        self.fused = check_optional_bool("fused", fused)
        self.pw1 = ConvNorm(in_channels, hidden, act=nn.GELU(), spatial_dims=spatial_dims)
        self.cascade = nn.ModuleList(
            ConvNorm(branch, branch, kernel_size=3, groups=branch, spatial_dims=spatial_dims)
            for _ in range(N - 1)
        )
        self.pw2 = ConvNorm(
            out_channels // 2, out_channels, act=nn.GELU(), spatial_dims=spatial_dims
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.spatial_dims, "CMRF", weight=self.pw1.conv.weight)
        y = cascade_concat(self.pw1(x), self.cascade, fused=self.fused)
        y = self.pw2(y)
        return x + y if self.add_residual else y

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, N={self.N}, "
            f"shortcut={self.add_residual}, spatial_dims={self.spatial_dims}"
            + ("" if self.fused is None else f", fused={self.fused}")
        )

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first on every module it is given; without it, scripting a
        # model holding CMRF failed deep in the TorchScript compiler ("Expected a value of type
        # 'Tensor' for argument 'self' but instead found type 'str'").
        raise TypeError(
            "torch.jit.script cannot compile CMRF: its forward checks the input and chooses the cascade "
            "implementation in Python; use torch.jit.trace, torch.export, torch.compile or cmrf.export_onnx "
            "(cmrf.optimize_for_inference(model, freeze=True) gives a frozen TorchScript graph on the CPU)"
        )


def cmrf_blocks(module: nn.Module) -> list[CMRF]:
    """Every ``CMRF`` in ``module`` (``module`` itself included), in ``module.modules()`` order."""
    return [m for m in module.modules() if isinstance(m, CMRF)]


def inference_only_parts(module: nn.Module) -> list[str]:
    """Names (``""`` for ``module`` itself) of the parts of ``module`` that come from
    ``optimize_for_inference``: their classes say so with ``inference_only = True``."""
    return [name for name, m in module.named_modules() if getattr(type(m), "inference_only", False)]
