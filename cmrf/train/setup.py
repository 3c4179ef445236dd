"""Building a model for training or from a trained checkpoint, and the CPU thread budget.

Shared by ``cmrf train``, ``cmrf evaluate`` and ``cmrf predict``; no command-line parsing here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn


def choose_threads(requested: int) -> int:
    """CPU threads for PyTorch: ``requested`` if > 0; 0 keeps PyTorch's default; -1 ("auto")
    uses only the cores the machine is not already busy with (the 1-minute load average).

    Why "auto": on a shared machine, PyTorch's OpenMP threads spin while waiting for each other,
    and with more threads than free cores a step can take several times longer than with one.
    """
    if requested > 0:
        return requested
    if requested == 0 or not hasattr(os, "getloadavg"):
        return torch.get_num_threads()
    free_cores = (os.cpu_count() or 1) - os.getloadavg()[0]
    return max(1, min(torch.get_num_threads(), int(free_cores + 0.5)))


@contextlib.contextmanager
def torch_threads(requested: int):
    """Run a block with ``choose_threads(requested)`` PyTorch threads, then restore the count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(choose_threads(requested))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_model(
    name: str,
    in_chans: int,
    num_classes: int,
    spatial_dims: int = 2,
    model_kwargs: dict | None = None,
    replace_blocks_n: int | None = None,
    img_size: int = 64,
    report: bool = False,
) -> tuple[nn.Module, str]:
    """Create a registry model for the data, optionally CMRF-swapped; returns ``(model, name)``.

    ``tinyunet`` becomes ``tinyunet3d`` for volumes. With ``replace_blocks_n`` the model goes
    through ``cmrf.replace_blocks(model, N=replace_blocks_n)``, probed with a zero input of
    ``img_size`` per side; ``report=True`` prints what it replaced.
    """
    from cmrf.models import create_model

    if spatial_dims == 3 and name == "tinyunet":
        name = "tinyunet3d"
    model_kwargs = model_kwargs or {}
    try:
        model = create_model(name, in_chans=in_chans, num_classes=num_classes, **model_kwargs)
    except TypeError as err:  # a constructor argument this model does not have (--N, --channels)
        if not model_kwargs:
            raise
        given = ", ".join(f"--{k} {v}" for k, v in model_kwargs.items())
        raise ValueError(f"model {name!r} does not take {given} ({err})") from err
    if replace_blocks_n is not None:
        from cmrf.surgery import replace_blocks

        example = torch.zeros(2, in_chans, *([img_size] * spatial_dims))
        replaced = replace_blocks(model, N=replace_blocks_n, example_input=example)
        if report:
            print(replaced)
    return model, name


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild and load the model of a ``cmrf train`` checkpoint; returns ``(model, metadata)``."""
    from cmrf.checkpoint import load_checkpoint
    from cmrf.train.state import read_metadata

    meta = read_metadata(path)
    data = meta.get("data", {})
    model, _ = build_model(
        meta["model"],
        meta["in_chans"],
        meta["num_classes"],
        data.get("spatial_dims") or 2,
        meta.get("model_kwargs"),
        meta.get("replace_blocks"),
        data.get("img_size") or 64,
    )
    load_checkpoint(model, path)
    return model.eval(), meta
