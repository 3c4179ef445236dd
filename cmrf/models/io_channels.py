"""What a bare state dict says about the registry model it was saved from."""

from __future__ import annotations

import torch
from torch import nn

from cmrf.checkpoint import map_to_model_keys
from cmrf.models.registry import create_model

__all__ = ["infer_io_channels"]

# Two probe values per argument; each is far from the usual 1-4 so no other width equals it by chance.
_PROBES = {"in_chans": (3, 5), "num_classes": (2, 7)}


def _probe_shapes(name: str, model_kwargs: dict, **io) -> tuple[nn.Module, dict[str, torch.Size]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = create_model(name, **io, **model_kwargs)
    return model, {k: v.shape for k, v in model.state_dict().items()}


def _solve(got: torch.Size, low: torch.Size, high: torch.Size, values: tuple[int, int]) -> int | None:
    """The argument value that makes the probe shape ``low``/``high`` (at ``values``) equal ``got``.

    Widths depend linearly on in_chans/num_classes (``a * value + b``); ``None`` if ``got`` does
    not fit that line at an integer >= 1.
    """
    if len(got) != len(low):
        return None
    found = set()
    for g, lo, hi in zip(got, low, high):
        if lo == hi:
            if g != lo:
                return None  # another constructor argument (N, channels...) differs: cannot tell
            continue
        slope, rest = divmod(hi - lo, values[1] - values[0])
        if rest or slope == 0:
            return None
        value, rest = divmod(g - (lo - slope * values[0]), slope)
        if rest or value < 1:
            return None
        found.add(value)
    return found.pop() if len(found) == 1 else None


def infer_io_channels(
    name: str, state: dict[str, torch.Tensor], model_kwargs: dict | None = None, source=None
) -> dict[str, int | None]:
    """``in_chans`` and ``num_classes`` of registry model ``name`` that ``state`` was saved from.

    The layers that depend on each argument are found by building the model on the ``meta``
    device (no memory used) at two values of it; their shapes in ``state`` (mapped to this
    library's key names, so reference checkpoints work) then give the value.

    Args:
        name: registry name, e.g. ``"tinyunet"``.
        state: a state dict, in this library's or the reference code's key names.
        model_kwargs: further constructor arguments (``N``, ``channels``) the model was built with.
        source: the file ``state`` came from, for messages (see ``map_to_model_keys``).

    Returns:
        ``{"in_chans": int | None, "num_classes": int | None}``; ``None`` where the state dict
        cannot say (a layer is missing or its shape fits no value).
    """
    model_kwargs = dict(model_kwargs or {})
    base_io = {arg: values[0] for arg, values in _PROBES.items()}
    base_model, base = _probe_shapes(name, model_kwargs, **base_io)
    mapped = map_to_model_keys(base_model, state, source, quiet=True)  # loading it warns, if need be
    result: dict[str, int | None] = {}
    for arg, values in _PROBES.items():
        _, other = _probe_shapes(name, model_kwargs, **{**base_io, arg: values[1]})
        dependent = [k for k in base if base[k] != other.get(k)]
        answers = {
            _solve(mapped[k].shape, base[k], other[k], values) if k in mapped else None for k in dependent
        }
        result[arg] = answers.pop() if len(answers) == 1 else None
    return result
