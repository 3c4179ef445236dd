"""What every model entry point shares: argument checks, timm's cfg, reference-key hooks."""

from __future__ import annotations

import functools
import inspect
import math
import re
import warnings
from collections.abc import Callable, Sequence

import torch
from timm.layers import is_scriptable
from timm.models import adapt_input_conv, get_pretrained_cfg, resolve_pretrained_cfg
from torch import nn

from cmrf.checkpoint import load_state_dict_checked, map_to_model_keys, read_state_dict, record_create_call
from cmrf.models._base import fit_cfg

# Bookkeeping arguments timm.create_model passes to every entry point; they do not describe the model.
_TIMM_BOOKKEEPING = ("cache_dir", "pretrained_model_args")
# timm training scripts pass these with value 0 (the default: no dropout), which is exactly what
# our models do; any other value would change the model, so it is refused.
_NEUTRAL_TIMM_KWARGS = ("drop_rate", "drop_path_rate", "drop_block_rate")

class UnknownArgumentError(ValueError, TypeError):
    """An argument a model does not take. A ``ValueError`` with a clear message; also a ``TypeError``,
    which is what Python raises for an unexpected keyword, so code that catches that keeps working."""


FilterFn = Callable[[dict[str, torch.Tensor], nn.Module | None], dict[str, torch.Tensor]]


def rename_keys(state_dict: dict[str, torch.Tensor], patterns) -> dict[str, torch.Tensor]:
    """Apply every ``(regex, replacement)`` in ``patterns`` to every key, in order."""
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in patterns:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def map_reference_keys(module: nn.Module, state_dict: dict, prefix: str, *_, filter_fn: FilterFn) -> None:
    """``load_state_dict`` pre-hook body: rename the keys under ``prefix`` with ``filter_fn``, in place."""
    own = {k[len(prefix):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)}
    for key, value in filter_fn(own, module).items():
        state_dict[prefix + key] = value


def reference_key_hook(filter_fn: FilterFn) -> functools.partial:
    """A ``load_state_dict`` pre-hook that maps foreign key names with ``filter_fn``.

    With it, ``model.load_state_dict(torch.load("best_model.pth"))`` accepts a checkpoint saved
    by the reference code, also when the model is nested inside another one. The hook is a
    ``functools.partial`` of module-level functions, so the model still pickles (``torch.save``,
    ``copy.deepcopy``, multiprocessing) when ``filter_fn`` is a module-level function too.
    """
    return functools.partial(map_reference_keys, filter_fn=filter_fn)


def add_reference_key_hook(module: nn.Module, filter_fn: FilterFn) -> None:
    """Register ``reference_key_hook(filter_fn)`` on ``module`` as a ``load_state_dict`` pre-hook.

    ``Module.register_load_state_dict_pre_hook`` is public from torch 2.5; torch 2.4 has the same
    hook (module first) under ``_register_load_state_dict_pre_hook(..., with_module=True)``.
    """
    hook = reference_key_hook(filter_fn)
    if hasattr(module, "register_load_state_dict_pre_hook"):
        module.register_load_state_dict_pre_hook(hook)
    else:  # torch 2.4
        module._register_load_state_dict_pre_hook(hook, with_module=True)


def _resolve_in_channels(kwargs: dict) -> None:
    """Make timm's ``in_chans`` and our ``in_channels`` one argument (in place)."""
    if "in_chans" not in kwargs:
        return
    in_chans = kwargs.pop("in_chans")
    if kwargs.setdefault("in_channels", in_chans) != in_chans:
        raise ValueError(
            f"in_chans={in_chans!r} and in_channels={kwargs['in_channels']!r} disagree; they are "
            f"the same argument (timm's name and ours): give one of them"
        )


def _defaults_from_cfg(cfg: dict | str | None, kwargs: dict) -> None:
    """As in timm: a given cfg's ``num_classes`` and ``input_size[0]`` are the model's defaults.

    ``timm.create_model(name, pretrained_cfg_overlay=dict(num_classes=5))`` builds five classes; an
    argument given explicitly wins (and ``fit_cfg`` then refuses the overlay that contradicts it).
    Only the keys the user wrote count: a tag (a string) or an empty cfg changes nothing.
    """
    if not isinstance(cfg, dict):
        return
    if cfg.get("num_classes") is not None:
        kwargs.setdefault("num_classes", cfg["num_classes"])
    size = cfg.get("input_size")
    if isinstance(size, (list, tuple)) and size:
        kwargs.setdefault("in_channels", size[0])


def _device_and_dtype(device, dtype) -> tuple[torch.device | None, torch.dtype | None]:
    """timm's ``device``/``dtype`` arguments, checked: a floating-point ``torch.dtype`` (weights
    are trained), and a device torch knows."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype such as torch.float32 or "
                         f"torch.bfloat16, got {dtype!r}")
    if device is None:
        return None, dtype
    try:
        return torch.device(device), dtype
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be a torch.device or a name such as 'cpu' or 'cuda:0', got {device!r} "
                         f"({err})") from err


def _check_kwargs(model_cls: type[nn.Module], variant: str, kwargs: dict, entry_args: Sequence[str]) -> None:
    """Raise ``UnknownArgumentError`` naming an argument neither the constructor nor entry point takes."""
    accepted = [p for p in inspect.signature(model_cls).parameters if p != "self"]
    accepted += [*entry_args, "device", "dtype"]
    unknown = [k for k in kwargs if k not in accepted and k not in _NEUTRAL_TIMM_KWARGS]
    changing = [k for k in _NEUTRAL_TIMM_KWARGS if kwargs.get(k, 0) != 0]
    if not unknown and not changing:
        return
    given = ", ".join(f"{k}={kwargs[k]!r}" for k in unknown + changing)
    names = ", ".join("in_chans (or in_channels)" if a == "in_channels" else a for a in accepted)
    note = ""
    if changing:
        neutral = "/".join(_NEUTRAL_TIMM_KWARGS)
        note = f" ({variant} has no dropout or stochastic depth: only {neutral}=0 is accepted)"
    raise UnknownArgumentError(f"{variant} does not take {given}{note}; it accepts: {names}")


def require_requested_n(report, N: int, variant: str, base: str) -> None:
    """Refuse an ``N`` that a block's channels do not allow: ``replace_blocks`` (``report`` is its
    report) gave that block a smaller ``N'``, where ``create_model(variant, N=N)`` promises ``N``.

    Raises:
        ValueError: naming the blocks, their channels, the ``N`` each would get, and the ``N``
            every block allows.
    """
    reduced = [r for r in report.replaced if r.N != N]
    if not reduced:
        return
    common = math.gcd(*(r.out_channels for r in report.replaced))
    allowed = [n for n in range(1, common // 2 + 1) if common % (2 * n) == 0]
    blocks = ", ".join(f"{r.path} ({r.out_channels} channels, N={r.N} there)" for r in reduced)
    raise ValueError(
        f"{variant} with N={N}: every CMRF needs 2N to divide its output channels, which {blocks} "
        f"do not allow; choose N from {allowed}, or build replace_blocks(create_model({base!r}), {N}), "
        f"which lowers N only where the channels need it"
    )


def _has_tag(variant: str, tag: str) -> bool:
    # Older timm falls back to ImageNet's cfg with a warning for an unknown tag, newer timm raises.
    try:
        return get_pretrained_cfg(f"{variant}.{tag}") is not None
    except RuntimeError:
        return False


def build_model(
    model_cls: type[nn.Module],
    variant: str,
    pretrained: bool,
    entry_args: Sequence[str] = (),
    finish: Callable[[nn.Module], nn.Module] | None = None,
    **kwargs,
) -> nn.Module:
    """Instantiate ``model_cls`` for the registry entry point ``variant``.

    Accepts timm's argument names (``in_chans``) beside ours (``in_channels``), uses timm's
    ``pretrained_cfg``/``pretrained_cfg_overlay`` for the model's ``pretrained_cfg`` (see
    ``cmrf.models._base``) and drops timm's bookkeeping arguments (``cache_dir``).

    Args:
        model_cls: the network class.
        variant: the entry point's name (``"tinyunet"``), also the cfg's ``architecture``.
        pretrained: ``True`` loads the local file that ``pretrained_cfg_overlay`` or
            ``pretrained_cfg`` names as ``file`` (timm's idiom; as ``checkpoint_path`` does, but a
            classifier of another ``num_classes`` keeps its fresh initialisation, as in timm), and
            raises without one: no weights are published and nothing is downloaded, ever.
        entry_args: arguments the entry point itself took (e.g. ``N`` of ``segnet_cmrf``), listed
            in the error for an unknown argument.
        finish: applied to the built model before its cfg is filled in (e.g. ``replace_blocks``).
        **kwargs: constructor arguments, ``in_chans``, ``device``, ``dtype``.

    Raises:
        ValueError: ``pretrained=True`` without a ``file``, ``features_only=True``, timm's
            ``scriptable=True``, ``in_chans`` and ``in_channels`` that disagree, or
            (``UnknownArgumentError``, also a ``TypeError``) an argument the model does not take,
            named, with the accepted ones; a ``file`` that does not fit, as ``checkpoint_path``.
    """
    for key in _TIMM_BOOKKEEPING:
        kwargs.pop(key, None)
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    local_weights = _local_weights(overlay, pretrained_cfg)
    if pretrained and local_weights is None:
        raise ValueError(
            f"no pretrained weights are published for {variant!r} and cmrf never downloads; "
            f"train one (cmrf train) or load your own with checkpoint_path='best_model.pth' or "
            f"pretrained=True, pretrained_cfg_overlay=dict(file='best_model.pth') "
            f"(a .safetensors file or a state dict saved by the reference code); with "
            f"checkpoint_path given as well, drop pretrained=True: the checkpoint loads by itself"
        )
    if isinstance(pretrained_cfg, str) and not _has_tag(variant, pretrained_cfg):
        raise ValueError(f"{variant!r} has no pretrained tag {pretrained_cfg!r} (cmrf publishes no weights)")
    if kwargs.pop("features_only", False):
        raise ValueError(f"{variant!r} does not support timm's features_only")
    if is_scriptable():  # timm's scriptable=True: the promise would break at torch.jit.script
        raise ValueError(f"{variant!r} is not TorchScript-scriptable (scriptable=True): trace it with "
                         f"torch.jit.trace, or export it with torch.export or cmrf.export_onnx")
    _resolve_in_channels(kwargs)
    # What the caller asked for: only those may differ from a local pretrained file's weights. A
    # cfg's num_classes / input_size describe the weights (timm resets a head only for a num_classes
    # other than the cfg's), so they are not a request to change them.
    requested = {name for name in ("num_classes", "in_channels") if name in kwargs}
    _defaults_from_cfg(overlay, kwargs)  # as timm, which lays the overlay over the cfg first
    _defaults_from_cfg(pretrained_cfg, kwargs)
    _check_kwargs(model_cls, variant, kwargs, entry_args)
    for key in _NEUTRAL_TIMM_KWARGS:
        kwargs.pop(key, None)
    device, dtype = _device_and_dtype(kwargs.pop("device", None), kwargs.pop("dtype", None))
    model = model_cls(**kwargs).to(device=device, dtype=dtype)
    if finish is not None:
        model = finish(model)
    record_create_call(model, variant, kwargs)
    if isinstance(pretrained_cfg, dict):
        # Laid over the model's own cfg: timm would fill the keys it leaves out with ImageNet's
        # (224 px, bicubic, 0.875 crop, ImageNet mean/std), which describe no model here.
        base = {**resolve_pretrained_cfg(variant).to_dict(), **pretrained_cfg}
    else:
        base = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg).to_dict()
    overlay = _file_facts_dropped(overlay, requested, kwargs)
    model.pretrained_cfg = fit_cfg(base, model, architecture=variant, overlay=overlay)
    if model.pretrained_cfg.get("state_dict") is not None:  # loaded below; not kept alive (nor pickled)
        model.pretrained_cfg["state_dict"] = None
    if pretrained:
        _load_local_pretrained(model, local_weights, requested)
    return model


def _file_facts_dropped(overlay, requested: set[str], kwargs: dict):
    """``overlay`` without what describes the weights file rather than the model: its ``num_classes``
    and ``input_size[0]`` when the caller asked for classes or channels of their own (timm's
    fine-tuning idiom, ``pretrained_cfg_overlay=dict(file=..., num_classes=2), num_classes=5``).
    The model's cfg then gives the model's values; any other disagreement is still refused."""
    if not isinstance(overlay, dict):
        return overlay
    overlay = dict(overlay)
    if "num_classes" in requested:
        overlay.pop("num_classes", None)
    size = overlay.get("input_size")
    if "in_channels" in requested and isinstance(size, (list, tuple)) and len(size) > 1:
        overlay["input_size"] = (kwargs["in_channels"], *size[1:])
    return overlay


def load_pretrained_weights(model: nn.Module, path) -> list[str]:
    """Start ``model`` from the weights in ``path`` for fine-tuning (``cmrf train --init``).

    Loaded as ``pretrained=True`` loads a local file for a model that asks for its own classes and
    input channels: every tensor must fit, except a classifier of another class count, which keeps
    its fresh initialisation, and a first convolution of other input channels, adapted by timm's
    rule (``adapt_input_conv``). Reference-code names and wrapper prefixes are mapped.

    Returns:
        What was not loaded as it is, in words (``[]`` when every tensor was).

    Raises:
        ValueError: the file does not fit otherwise (other ``channels``/``N``, another model),
            naming the keys; the model is left untouched.
    """
    own = {key: value.shape for key, value in model.state_dict().items()}
    state = read_state_dict(path)  # read once: its shapes say below what was adapted
    mapped = map_to_model_keys(model, state, str(path), quiet=True)
    saved = {key: value.shape for key, value in mapped.items()}
    _check_same_spatial_dims(own, saved, path)
    _load_local_pretrained(model, state, {"num_classes", "in_channels"}, label=str(path))
    head = getattr(model, "classifier_name", "head")
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    notes = []
    if any(key in saved and saved[key] != own[key] for key in own if key.startswith(f"{head}.")):
        notes.append(f"the classifier {head} starts afresh (the file's is for other classes)")
    key = f"{first}.weight"
    if first and key in saved and key in own and saved[key][1] != own[key][1]:
        notes.append(f"{first} adapted from {saved[key][1]} input channels to {own[key][1]}")
    return notes


def _check_same_spatial_dims(own: dict, saved: dict, path) -> None:
    """Refuse weights of a model with other spatial dimensions (2D weights for a 3D model), named as
    such: the shape list of every convolution would not say it."""
    for key, shape in own.items():
        if key.endswith(".weight") and key in saved and len(shape) >= 3 and len(saved[key]) >= 3 \
                and len(saved[key]) != len(shape):
            file_dims, model_dims = len(saved[key]) - 2, len(shape) - 2
            raise ValueError(
                f"{path} holds weights of a {file_dims}D model ({key} is {tuple(saved[key])}), and the model "
                f"to start is {model_dims}D ({tuple(shape)}): give weights of a {model_dims}D model")


def _load_local_pretrained(model: nn.Module, source: str | dict, requested: set[str], label: str | None = None
                           ) -> None:
    """timm's local pretrained weights: loaded as ``checkpoint_path`` loads them (strictly), except,
    as in timm, where the caller asked for other classes or input channels than the weights have:
    with ``num_classes`` in ``requested`` a classifier of another class count keeps its fresh
    initialisation (fine-tuning on other classes), with ``in_channels`` (``in_chans``) the first
    convolution is adapted. Without the request, such a file is a mismatch, not a silently different model."""
    if isinstance(source, dict):  # timm's pretrained_cfg_overlay=dict(state_dict=...), or a file read
        state, path = dict(source), label or "the state_dict of pretrained_cfg_overlay"
        if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} must map names to tensors (a model's state_dict())")
    else:
        state, path = read_state_dict(source), source
    state = map_to_model_keys(model, state, path)
    own = model.state_dict()
    if "in_channels" in requested:
        _adapt_first_conv(model, state, own, path)
    head = f"{getattr(model, 'classifier_name', 'head')}."
    head_keys = [key for key in own if key.startswith(head)]
    if "num_classes" in requested and any(key in state and state[key].shape != own[key].shape
                                          for key in head_keys):
        state = {k: v for k, v in state.items() if not k.startswith(head)}
        state.update({key: own[key] for key in head_keys})
    load_state_dict_checked(model, state, path)


def _adapt_first_conv(model: nn.Module, state: dict, own: dict, path: str) -> None:
    """Weights saved for other input channels fitted in ``state`` by timm's rule
    (``adapt_input_conv``: summed for one channel, else repeated and scaled), on the layer the
    model's ``pretrained_cfg`` names ``first_conv``. Where timm cannot adapt them, that layer keeps
    its fresh initialisation, with a warning, as timm does."""
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    key = f"{first}.weight"
    if not first or key not in state or key not in own or state[key].shape[1:] == own[key].shape[1:]:
        return
    saved, wanted = state[key], own[key]
    if saved.shape[2:] != wanted.shape[2:]:
        return  # another kernel: not a channel question; the strict load names the mismatch
    as_2d = saved.reshape(*saved.shape[:3], -1)  # timm adapts OIHW weights; 3D kernels flattened
    try:
        if "base_chans" in inspect.signature(adapt_input_conv).parameters:
            adapted = adapt_input_conv(wanted.shape[1], as_2d, base_chans=saved.shape[1])
        elif saved.shape[1] == 3 or wanted.shape[1] == 1:  # older timm: adapts from RGB only
            adapted = adapt_input_conv(wanted.shape[1], as_2d)
        else:
            raise NotImplementedError("timm before base_chans adapts from 3 channels only")
        state[key] = adapted.reshape(wanted.shape)
    except NotImplementedError as why:
        warnings.warn(f"{path}: {first} was saved for {saved.shape[1]} input channels, the model takes "
                      f"{wanted.shape[1]}, and timm cannot adapt it ({why}); that layer starts afresh",
                      stacklevel=4)
        state[key] = wanted


def _local_weights(*cfgs) -> str | dict | None:
    """The local weights timm's ``pretrained_cfg_overlay`` or ``pretrained_cfg`` (dicts or timm's
    ``PretrainedCfg``) name, the first one that names any: an in-memory ``state_dict`` (timm's
    first choice), else a ``file``. The only pretrained weights cmrf loads."""
    for field in ("state_dict", "file"):
        for cfg in cfgs:
            value = cfg.get(field) if isinstance(cfg, dict) else getattr(cfg, field, None)
            if value is not None and (field == "file" or isinstance(value, dict)):
                return value or None
    return None
