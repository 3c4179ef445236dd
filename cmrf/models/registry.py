"""Model registry: ``cmrf.create_model`` / ``cmrf.list_models``, shared with timm's.

Every entry point registered here is also registered with timm, so after ``import cmrf``
``timm.create_model("tinyunet")`` and ``timm.list_models("tinyunet*")`` work.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from timm.layers import set_layer_config
from timm.models import register_model as timm_register_model
from torch import nn

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model entry point ``fn(pretrained=False, **kwargs)`` under ``fn.__name__``."""
    _ENTRYPOINTS[fn.__name__] = fn
    return timm_register_model(fn)


def list_models(pattern: str | Sequence[str] = "*") -> list[str]:
    """Sorted names of this library's models matching the shell-style ``pattern`` (or, as in
    ``timm.list_models``, any of a list of patterns).

    Raises:
        ValueError: a pattern that is not a string.
    """
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"pattern must be a string or a list of strings (shell-style, e.g. 'tinyunet*'), "
                         f"got {pattern!r}")
    return sorted(name for name in _ENTRYPOINTS if any(fnmatch.fnmatch(name, p) for p in patterns))


def is_model(name: str) -> bool:
    """Whether ``name`` is one of this library's models."""
    return name in _ENTRYPOINTS


@functools.cache
def _built_class(name: str) -> type:
    """The class ``name``'s entry point builds (raises, and so is not cached, when it cannot)."""
    # No memory, no initialisation cost: only the class is wanted. timm's global layer config
    # (scriptable=True, which the zoo refuses) must not decide it for the rest of the process.
    with torch.device("meta"), set_layer_config(scriptable=False):
        return type(_ENTRYPOINTS[name]())


def _constructor_defaults(name: str) -> Mapping[str, object]:
    """Keyword defaults of ``name``'s entry point, over those of the class it builds."""
    functions = [_ENTRYPOINTS[name]]
    with contextlib.suppress(Exception):  # an entry point that cannot build on "meta": its own defaults only
        functions.insert(0, _built_class(name).__init__)
    defaults = {}
    for function in functions:
        parameters = inspect.signature(function).parameters.values()
        defaults.update({p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty})
    return defaults


def model_defaults(name: str) -> dict:
    """The keyword defaults ``create_model(name)`` builds with (the entry point's over its class's);
    ``{}`` for an unknown name."""
    return dict(_constructor_defaults(name)) if name in _ENTRYPOINTS else {}


def _same_value(a, b) -> bool:
    """Equal, where a tuple and a list (a default and its JSON round trip) of equal items are."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def without_defaults(name: str, kwargs: Mapping[str, object]) -> dict:
    """``kwargs`` for model ``name`` without the entries equal to the constructor's default.

    ``create_model(name, N=8)`` builds what ``create_model(name)`` builds, so a run trained with an
    explicit ``--N 8`` and a command that names it, or leaves it out, describe the same model.
    Unknown names and keys are kept as they are.
    """
    if name not in _ENTRYPOINTS:
        return dict(kwargs)
    defaults = _constructor_defaults(name)
    return {key: value for key, value in kwargs.items()
            if not (key in defaults and _same_value(defaults[key], value))}


def create_model(
    name: str,
    pretrained: bool = False,
    in_chans: int | None = None,
    num_classes: int | None = None,
    checkpoint_path: str | Path | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model, optionally loading a checkpoint.

    Args:
        name: a name from ``list_models()``, e.g. ``"tinyunet"``.
        pretrained: no released weights exist, and nothing is ever downloaded: ``True`` loads
            the local file timm's ``pretrained_cfg_overlay=dict(file=PATH)`` (or a
            ``pretrained_cfg`` dict) names, and without one raises and points to
            ``checkpoint_path``.
        in_chans: input channels (timm's name; ``in_channels`` is the same argument). Default:
            the model's, 3.
        num_classes: output classes. Default: the model's, 2 (or, as in timm, the
            ``num_classes`` of a ``pretrained_cfg_overlay`` given in ``kwargs``).
        checkpoint_path: a ``.safetensors`` file or a ``torch.save``-d state dict (loaded with
            ``weights_only=True``), in this library's key names or the reference code's.
        **kwargs: passed to the model's constructor (e.g. ``N=4``, ``channels=(32, 64)``), except
            timm's layer flags ``exportable`` and ``no_jit`` (accepted: the models export as they
            are) and ``scriptable`` (``True`` is refused: the models are not TorchScript-scriptable).

    The model carries timm's ``pretrained_cfg``/``default_cfg`` (the library's normalisation) and
    has ``get_classifier()``/``reset_classifier(n)``, as with ``timm.create_model``.

    Raises:
        ValueError: unknown name or one that is not a string (the message lists the known
            ones), an argument the model does not take (named, with the accepted ones),
            ``in_chans`` and ``in_channels`` that disagree, or a checkpoint whose keys or shapes
            do not fit the model.
    """
    if not isinstance(name, str) or name not in _ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    # As timm.create_model: None means "not given" (timm's train.py passes drop_path_rate=None),
    # and an empty checkpoint_path (its --initial-checkpoint default) means no checkpoint.
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    # timm's layer flags, taken as timm.create_model takes them (the entry point sees them).
    flags = {key: kwargs.pop(key) for key in ("scriptable", "exportable", "no_jit") if key in kwargs}
    if pretrained and checkpoint_path not in (None, ""):
        from cmrf.models._builder import _local_weights

        if _local_weights(kwargs.get("pretrained_cfg_overlay"), kwargs.get("pretrained_cfg")) is None:
            # timm's train.py passes both for --pretrained --initial-checkpoint; with no published
            # weights the first has nothing to load, and the second loads the file by itself.
            raise ValueError(
                f"pretrained=True asks for published weights, and none are published for {name!r}; "
                f"checkpoint_path={str(checkpoint_path)!r} loads that file by itself: drop pretrained=True"
            )
    with set_layer_config(**flags):
        model = _ENTRYPOINTS[name](pretrained=pretrained, **kwargs)
    if checkpoint_path not in (None, ""):
        from cmrf.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    return model
