"""Model registry: ``cmrf.create_model`` / ``cmrf.list_models``, shared with timm's.

Every entry point registered here is also registered with timm, so after ``import cmrf``
``timm.create_model("tinyunet")`` and ``timm.list_models("tinyunet*")`` work.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path

from timm.models import register_model as timm_register_model
from torch import nn

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model entry point ``fn(pretrained=False, **kwargs)`` under ``fn.__name__``."""
    _ENTRYPOINTS[fn.__name__] = fn
    return timm_register_model(fn)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of this library's models matching the shell-style ``pattern``."""
    return sorted(name for name in _ENTRYPOINTS if fnmatch.fnmatch(name, pattern))


def is_model(name: str) -> bool:
    """Whether ``name`` is one of this library's models."""
    return name in _ENTRYPOINTS


def create_model(
    name: str,
    pretrained: bool = False,
    in_chans: int | None = None,
    num_classes: int = 2,
    checkpoint_path: str | Path | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model, optionally loading a checkpoint.

    Args:
        name: a name from ``list_models()``, e.g. ``"tinyunet"``.
        pretrained: no released weights exist yet; ``True`` raises and points to
            ``checkpoint_path``. Nothing is ever downloaded.
        in_chans: input channels (timm's name; ``in_channels`` is the same argument). Default:
            the model's, 3.
        num_classes: output classes. Default 2.
        checkpoint_path: a ``.safetensors`` file or a ``torch.save``-d state dict (loaded with
            ``weights_only=True``), in this library's key names or the reference code's.
        **kwargs: passed to the model's constructor (e.g. ``N=4``, ``channels=(32, 64)``).

    The model carries timm's ``pretrained_cfg``/``default_cfg`` (the library's normalisation) and
    has ``get_classifier()``/``reset_classifier(n)``, as with ``timm.create_model``.

    Raises:
        ValueError: unknown name (the message lists the known ones), an argument the model does
            not take (named, with the accepted ones), ``in_chans`` and ``in_channels`` that
            disagree, or a checkpoint whose keys or shapes do not fit the model.
    """
    if name not in _ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    model = _ENTRYPOINTS[name](pretrained=pretrained, num_classes=num_classes, **kwargs)
    if checkpoint_path is not None:
        from cmrf.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    return model
