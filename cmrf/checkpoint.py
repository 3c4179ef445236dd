"""Loading and saving model weights safely (safetensors, or ``torch.load(weights_only=True)``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# Wrappers that training scripts commonly put around the state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file, on the CPU.

    ``torch.save`` files are opened with ``weights_only=True``: no pickled code runs. A dict
    that wraps the weights under ``state_dict``/``model`` is unwrapped, and the ``module.``
    prefix of DataParallel/DDP checkpoints is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors come in many types
            raise ValueError(
                f"cannot read {path} as a weights-only torch checkpoint ({err}); cmrf loads only "
                f"tensors (weights_only=True) or .safetensors files"
            ) from err
    if isinstance(state, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _name_list(names, limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights from ``path`` into ``model`` strictly and return the model.

    Foreign key names (e.g. the reference TinyU-Net code's) are mapped by the model's
    ``checkpoint_filter_fn`` when it has one. Everything is checked before any weight is copied,
    so a failed load leaves the model untouched. Raises ``ValueError`` listing missing keys,
    unexpected keys and shape mismatches.
    """
    state = read_state_dict(path)
    filter_fn = getattr(model, "checkpoint_filter_fn", None)
    mapped = filter_fn(state, model) if filter_fn is not None else state
    expected = model.state_dict()
    missing = expected.keys() - mapped.keys()
    unexpected = mapped.keys() - expected.keys()
    mismatched = [
        f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in mapped and mapped[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {_name_list(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_name_list(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches: {'; '.join(mismatched[:20])}")
        raise ValueError(
            f"checkpoint {path} does not fit {type(model).__name__}: " + " | ".join(problems)
        )
    model.load_state_dict(mapped)
    return model


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save ``model``'s state dict as safetensors, atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
