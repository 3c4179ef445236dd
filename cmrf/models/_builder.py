"""What every model entry point shares: argument normalisation and reference-key hooks."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

# Arguments timm.create_model passes to every entry point that our constructors do not take.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")

FilterFn = Callable[[dict[str, torch.Tensor], nn.Module | None], dict[str, torch.Tensor]]


def rename_keys(state_dict: dict[str, torch.Tensor], patterns) -> dict[str, torch.Tensor]:
    """Apply every ``(regex, replacement)`` in ``patterns`` to every key, in order."""
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in patterns:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def reference_key_hook(filter_fn: FilterFn):
    """A ``load_state_dict`` pre-hook that maps foreign key names with ``filter_fn``.

    With it, ``model.load_state_dict(torch.load("best_model.pth"))`` accepts a checkpoint saved
    by the reference code, also when the model is nested inside another one.
    """

    def hook(module, state_dict, prefix, *_):
        own = {k[len(prefix):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)}
        for key, value in filter_fn(own, module).items():
            state_dict[prefix + key] = value

    return hook


def build_model(model_cls: type[nn.Module], variant: str, pretrained: bool, **kwargs) -> nn.Module:
    """Instantiate ``model_cls`` for a registry entry point.

    Accepts timm's argument names (``in_chans``) beside ours (``in_channels``) and drops the
    extras ``timm.create_model`` passes. ``pretrained=True`` raises: no weights are published
    and nothing is downloaded, ever.
    """
    if pretrained:
        raise ValueError(
            f"no pretrained weights are published for {variant!r} and cmrf never downloads; "
            f"train one (cmrf train) or load your own with checkpoint_path='best_model.pth' "
            f"(a .safetensors file or a state dict saved by the reference code)"
        )
    for key in _TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
    if kwargs.pop("features_only", False):
        raise ValueError(f"{variant!r} does not support timm's features_only")
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    if "in_chans" in kwargs:
        in_chans = kwargs.pop("in_chans")
        if kwargs.setdefault("in_channels", in_chans) != in_chans:
            raise ValueError(f"in_chans={in_chans} and in_channels={kwargs['in_channels']} disagree")
    return model_cls(**kwargs).to(device=device, dtype=dtype)
