"""Checkpoints that survive a kill at any moment, and the exact training state for ``--resume``.

A run directory holds, for ``tag`` in ``("last", "best")``:

- ``{tag}.safetensors``: the model weights (``cmrf.checkpoint.save_weights``), with metadata that
  lets ``cmrf evaluate`` / ``cmrf predict`` rebuild the model (see ``model_metadata``);
- ``last_state.pt``: everything ``--resume`` needs, loadable with ``torch.load(weights_only=True)``:
  the model weights again, optimizer, scheduler, gradient scaler, completed epochs, history, best
  score and the random generator states (as tensors and lists, never pickled objects).

The state file repeats the weights on purpose: it is then the one file that defines where a run
stands, written with a single atomic rename, so a kill between two writes can never pair the
weights of one epoch with the optimizer of another.

Every file is written to ``name.tmp`` first, flushed to disk, then renamed over the old one
(``os.replace`` is atomic on POSIX and Windows): a reader sees the old file or the new, never half.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

STATE_FORMAT = "cmrf-train-state/1"
STATE_FILE = "last_state.pt"


def _replace_atomically(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    # Make the rename itself durable (a no-op where directories cannot be opened, e.g. Windows).
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    _replace_atomically(tmp, path)


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _replace_atomically(tmp, path)


def atomic_write_json(obj, path: str | Path) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


# --- random generator states as plain tensors and lists -----------------------------------------


def get_rng_state() -> dict:
    """The states of Python's, NumPy's and torch's global generators (CPU and CUDA).

    Only tensors, lists, ints and floats, so ``torch.load(weights_only=True)`` reads them back.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``get_rng_state`` returned."""
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- model metadata -----------------------------------------------------------------------------


def model_metadata(
    model_name: str,
    model_kwargs: dict,
    in_chans: int,
    num_classes: int,
    class_names: list[str],
    replace_blocks_n: int | None = None,
    data: dict | None = None,
    **extra,
) -> dict[str, str]:
    """String metadata stored in every ``.safetensors`` a run writes, enough to rebuild the model.

    Args:
        model_name: registry name passed to ``cmrf.create_model``.
        model_kwargs: constructor keyword arguments (JSON-serialisable).
        in_chans, num_classes: the model's input channels and classes.
        class_names: one name per class.
        replace_blocks_n: ``N`` when the model went through ``cmrf.replace_blocks``, else ``None``.
        data: the data options of the run (image size, dataset, seed...), for ``evaluate``.
        **extra: further values, stored with ``json.dumps``.
    """
    meta = {
        "format": "cmrf",
        "model": model_name,
        "model_kwargs": json.dumps(model_kwargs),
        "in_chans": str(in_chans),
        "num_classes": str(num_classes),
        "class_names": json.dumps(list(class_names)),
        "replace_blocks": json.dumps(replace_blocks_n),
        "data": json.dumps(data or {}),
    }
    meta.update({key: json.dumps(value) for key, value in extra.items()})
    return meta


def read_metadata(path: str | Path) -> dict:
    """The decoded ``model_metadata`` of a ``.safetensors`` checkpoint written by ``cmrf train``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not safetensors or carries no cmrf training metadata.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for foreign files
        raise ValueError(f"{path} is not a safetensors file written by cmrf train ({err})") from err
    if meta.get("format") != "cmrf" or "model" not in meta:
        raise ValueError(
            f"{path} carries no cmrf training metadata (model name, classes); pass a best.safetensors "
            f"or last.safetensors written by cmrf train"
        )
    decoded = {"model": meta["model"]}
    for key, value in meta.items():
        if key not in ("format", "model"):
            decoded[key] = json.loads(value)
    return decoded


# --- the resumable training state ---------------------------------------------------------------


def save_training_state(path: str | Path, state: dict) -> None:
    """Write the training ``state`` dict atomically (adds the format tag)."""
    atomic_torch_save({"format": STATE_FORMAT, **state}, path)


def load_training_state(path: str | Path) -> dict:
    """Read a state written by ``save_training_state`` with ``weights_only=True``.

    Raises:
        ValueError: the file is not a cmrf training state (or is damaged).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"cannot read training state {path} ({err})") from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a cmrf training state (expected format {STATE_FORMAT!r})")
    return state
