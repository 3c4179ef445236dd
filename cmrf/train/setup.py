"""Building a model for training or from a trained checkpoint, and the CPU thread budget.

Shared by ``cmrf train``, ``cmrf evaluate`` and ``cmrf predict``; no command-line parsing here.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from cmrf.layers import cmrf_blocks


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
    spatial_dims: int | None = None,
    model_kwargs: dict | None = None,
    replace_blocks_n: int | None = None,
    img_size: int = 64,
    report: bool = False,
    new_run: bool = False,
) -> tuple[nn.Module, str]:
    """Create a registry model for the data, optionally CMRF-swapped; returns ``(model, name)``.

    The model is built for the data's ``spatial_dims`` (2 for images, 3 for volumes; ``None``, for a
    bare state dict that says nothing of its data: the model's own): ``tinyunet`` becomes
    ``tinyunet3d`` for volumes, other zoo models get ``spatial_dims``. With ``replace_blocks_n``
    the model goes through ``cmrf.replace_blocks(model, N=replace_blocks_n)``, probed with a zero
    input of ``img_size`` per side; ``report=True`` prints what it replaced. ``new_run=True`` (training)
    refuses ``replace_blocks_n`` for a model already built from CMRF blocks, where it would swap
    nothing (checkpoints recorded that way before still load).
    """
    from cmrf.models import create_model

    swapping = replace_blocks_n is not None and new_run
    name, dims = resolve_model_choice(name, spatial_dims, replace_blocks=swapping)
    model_kwargs = model_kwargs or {}
    try:
        model = create_model(name, in_chans=in_chans, num_classes=num_classes, **model_kwargs, **dims)
    except TypeError as err:  # a constructor argument this model does not have (--N, --channels)
        if not model_kwargs:
            raise
        given = ", ".join(f"--{k} {v}" for k, v in model_kwargs.items())
        raise ValueError(f"model {name!r} does not take {given} ({err})") from err
    if replace_blocks_n is not None:
        from cmrf.surgery import replace_blocks

        if new_run and cmrf_blocks(model):  # nothing to swap, and --N went to replace_blocks, not the model
            raise ValueError(f"--replace-blocks: model {name!r} is built from CMRF blocks already; "
                             f"leave --replace-blocks out (--N then sets their N)")
        sides = spatial_dims or getattr(model, "spatial_dims", 2)
        example = torch.zeros(2, in_chans, *([img_size] * sides))
        replaced = replace_blocks(model, N=replace_blocks_n, example_input=example)
        if report:
            print(replaced)
    return model, name


def resolve_model_choice(name: str, spatial_dims: int | None = None, replace_blocks: bool = False
                         ) -> tuple[str, dict]:
    """The registry name and the extra constructor arguments that build model ``name`` for data of
    ``spatial_dims``, after the checks that need no data (``cmrf train`` runs them before reading
    any): ``tinyunet`` becomes ``tinyunet3d`` for volumes, another zoo model gets ``spatial_dims``
    (not recorded in the run, whose data options say it).

    Args:
        name: registry name.
        spatial_dims: the data's (2 images, 3 volumes); ``None``: the model's own.
        replace_blocks: the model is to go through ``replace_blocks`` in a new run.

    Raises:
        ValueError: the model cannot be built for ``spatial_dims``, or ``replace_blocks`` for a
            model built from CMRF blocks already (it would swap nothing).
    """
    if spatial_dims == 3 and name == "tinyunet":
        name = "tinyunet3d"
    default = _default_on_meta(name)
    if replace_blocks and default is not None and cmrf_blocks(default):
        # Before building with the user's arguments: their --channels may not suit the model's
        # default N, an error about an N the user did not give.
        raise ValueError(f"--replace-blocks: model {name!r} is built from CMRF blocks already; "
                         f"leave --replace-blocks out (--N then sets their N)")
    built_for = getattr(default, "spatial_dims", None)
    if spatial_dims is None or built_for in (None, spatial_dims):
        return name, {}
    _check_builds_for(name, built_for, spatial_dims)
    return name, {"spatial_dims": spatial_dims}


def _check_builds_for(name: str, built_for: int, spatial_dims: int) -> None:
    """Refuse model ``name`` (built for ``built_for`` dimensions) when it cannot be built for the
    data's ``spatial_dims``, naming both, before anything is allocated."""
    from cmrf.models import create_model

    try:
        with torch.device("meta"):
            create_model(name, spatial_dims=spatial_dims)
    except (TypeError, ValueError) as err:
        data = "volumes" if spatial_dims == 3 else f"{spatial_dims}D data"
        # "tinyunet" in every command (cmrf train's --model, cmrf profile's NAME): it builds both.
        hint = "; use tinyunet, which builds tinyunet3d for volumes" if name == "tinyunet3d" else f" ({err})"
        raise ValueError(f"model {name!r} is built for spatial_dims={built_for} and cannot take {data} "
                         f"(spatial_dims={spatial_dims}){hint}") from err


def _default_on_meta(name: str) -> nn.Module | None:
    """Model ``name`` with its default arguments, built on the meta device (no memory, no
    initialisation), to read what it is; ``None`` when it cannot be built there."""
    from cmrf.models import create_model

    try:
        with torch.device("meta"):
            return create_model(name)
    except Exception:  # an entry point that cannot build on "meta": the checks after building decide
        return None


def model_from_checkpoint(
    path: str | Path,
    model: str | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    model_kwargs: dict | None = None,
) -> tuple[nn.Module, dict]:
    """Rebuild and load the model of a checkpoint; returns ``(model in eval mode, metadata)``.

    Two kinds of file are accepted:

    - a ``.safetensors`` written by ``cmrf train`` (or its ``last_state.pt``): its metadata names
      the model, its classes and the run's data options. Arguments that are given must agree
      with it (an empty ``model_kwargs`` counts as not given).
    - a bare state dict (a ``.pth`` saved by the reference code with
      ``torch.save(model.state_dict(), ...)``, or any ``.safetensors`` without cmrf metadata):
      ``model`` is then required; ``in_chans`` and ``num_classes`` are read from the first and
      last layers' shapes (``cmrf.models.io_channels.infer_io_channels``) when not given.

    Args:
        path: the checkpoint file.
        model: registry name (``--model`` on the command line), needed for bare state dicts.
        num_classes, in_chans: the model's classes and input channels, when the file cannot say.
        model_kwargs: further constructor arguments of a bare state dict's model (``N``, ``channels``).

    Returns:
        ``(model, metadata)``; ``metadata`` has at least ``model``, ``in_chans``, ``num_classes``,
        ``class_names`` (``None`` for a bare state dict, which records none) and ``data`` (the run's
        data options, empty for a bare state dict).

    Raises:
        OSError: the file cannot be opened.
        ValueError: a truncated or corrupt file, a bare state dict without ``model``, values that
            disagree with the file, or weights that do not fit the model; each names the file.
    """
    from cmrf.checkpoint import (
        load_state_dict_checked,
        read_state_dict,
        recorded_create_call,
        safetensors_metadata,
    )
    from cmrf.train.state import training_state_metadata

    state = read_state_dict(path)  # a last_state.pt: the weights it holds under "model"
    if safetensors_metadata(path).get("format") == "cmrf" or training_state_metadata(path) is not None:
        meta = _run_metadata(
            path, model=model, num_classes=num_classes, in_chans=in_chans, model_kwargs=model_kwargs
        )
    else:
        recorded = recorded_create_call(path)  # a save_weights file of a create_model model
        if recorded is not None and model is None:
            model, recorded_kwargs = recorded[0], dict(recorded[1])
            # The call's classes and channels are values the flags may give (and _bare_metadata checks).
            recorded_classes = recorded_kwargs.pop("num_classes", None)
            recorded_chans = recorded_kwargs.pop("in_channels", recorded_kwargs.pop("in_chans", None))
            num_classes = recorded_classes if num_classes is None else num_classes
            in_chans = recorded_chans if in_chans is None else in_chans
            # Flags given (--channels, --N) take the place of the call's; a file they do not fit is
            # then a mismatch naming the call, not "carries no cmrf metadata".
            model_kwargs = {**recorded_kwargs, **(model_kwargs or {})}
        meta = _bare_metadata(path, state, model, num_classes, in_chans, model_kwargs or {})
    data = meta["data"]
    _check_recorded_kwargs(meta.get("model_kwargs"), path)
    build = (meta["model"], meta["in_chans"], meta["num_classes"],
             data.get("spatial_dims"))  # None for a bare state dict: the model's own
    if meta.get("replace_blocks") is None:
        # Checked on the meta device first: a file's metadata (a million classes, huge channels)
        # must not allocate a model its weights do not fit.
        with torch.device("meta"):  # (create_model's device= builds on the CPU, then moves)
            skeleton, _ = build_model(*build, meta.get("model_kwargs"))
        load_state_dict_checked(skeleton, state, path, check_only=True)
    net, _ = build_model(*build, meta.get("model_kwargs"), meta.get("replace_blocks"),
                         data.get("img_size") or 64)
    load_state_dict_checked(net, state, path)
    return net.eval(), meta


# create_model arguments that load files or place the model: a checkpoint's recorded constructor
# arguments never hold them (cmrf writes N, channels and the like), so a file that does is refused.
_NOT_CONSTRUCTOR_ARGS = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                         "device", "dtype", "cache_dir")


def _check_recorded_kwargs(kwargs, path) -> None:
    """Refuse recorded ``model_kwargs`` that are not a dict of constructor arguments."""
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise ValueError(f"{path}: its metadata's model arguments are a {type(kwargs).__name__}, not a dict")
    foreign = [key for key in kwargs if not isinstance(key, str) or key in _NOT_CONSTRUCTOR_ARGS]
    if foreign:
        raise ValueError(f"{path}: its metadata's model arguments hold {', '.join(map(repr, foreign))}, "
                         f"which are not constructor arguments (cmrf records only those, such as N and "
                         f"channels)")


def _run_metadata(path: str | Path, **given) -> dict:
    """The metadata of a ``cmrf train`` checkpoint, checked against the values that were ``given``."""
    from cmrf.train.state import read_metadata

    meta = read_metadata(path)
    meta.setdefault("data", {})
    given_kwargs = given.pop("model_kwargs", None) or {}
    clashes = [f"{k}={v!r} (the file has {meta.get(k)!r})" for k, v in given.items() if v and v != meta[k]]
    clashes += _kwarg_clashes(meta["model"], given_kwargs, meta.get("model_kwargs") or {},
                              meta.get("replace_blocks"))
    # cmrf train stores "tinyunet" trained on volumes as "tinyunet3d"; asking for "tinyunet" is fine.
    if clashes and clashes != ["model='tinyunet' (the file has 'tinyunet3d')"]:
        raise ValueError(f"{path} was written by cmrf train with other settings: {', '.join(clashes)}")
    return meta


_UNSET = object()


def _kwarg_clashes(model: str, given: dict, saved: dict, replace_blocks_n: int | None = None) -> list[str]:
    """The constructor arguments in ``given`` that differ from those the run was built with. An
    argument the run left out was built at the constructor's default (``--N 8`` names TinyU-Net's
    default); in a ``--replace-blocks`` run, ``--N`` is the N of the swapped-in blocks."""
    from cmrf.models.registry import model_defaults
    from cmrf.train.state import shown_setting

    run_values = {**model_defaults(model), **saved}
    if replace_blocks_n is not None and "N" not in run_values:  # a model of its own N swapped nothing
        run_values["N"] = replace_blocks_n
    run_values = {key: run_values[key] for key in given if key in run_values}
    # JSON's view: the file's lists and the caller's tuples compare equal.
    given, run_values = (json.loads(json.dumps(values, default=_plain)) for values in (given, run_values))
    clashes = []
    for key, value in given.items():
        if run_values.get(key, _UNSET) != value:
            held = shown_setting(run_values[key]) if key in run_values else f"no {key}"
            clashes.append(f"--{key} {shown_setting(value)} (the file has {held})")
    return clashes


def _plain(value):
    """A value JSON cannot write, as one it can: a numpy or torch scalar's number, else its text."""
    return value.item() if hasattr(value, "item") else str(value)


def _bare_metadata(
    path: str | Path, state: dict, model: str | None, num_classes: int | None, in_chans: int | None,
    model_kwargs: dict,
) -> dict:
    """Metadata of a state dict without any: the given values, the rest inferred from shapes."""
    from cmrf.models import is_model, list_models
    from cmrf.models.io_channels import infer_io_channels

    if model is None:
        raise ValueError(
            f"{path} carries no cmrf metadata (a state dict such as the reference code saves), so it "
            f"cannot say which model it holds: give the model name (--model NAME, or NAME before "
            f"--checkpoint for cmrf export; one of {', '.join(list_models())})"
        )
    if not is_model(model):
        raise ValueError(f"unknown model {model!r}; available: {', '.join(list_models())}")
    try:
        inferred = infer_io_channels(model, state, model_kwargs, source=path)
    except TypeError as err:  # a constructor argument this model does not have
        given = ", ".join(f"--{k} {v}" for k, v in model_kwargs.items())
        raise ValueError(f"model {model!r} does not take {given} ({err})") from err
    values = {}
    given = (("num_classes", num_classes, "--num-classes"), ("in_chans", in_chans, "--in-chans"))
    for arg, value, flag in given:
        found = inferred[arg]
        if value is not None and found is not None and value != found:
            raise ValueError(f"{path} holds a {model} with {arg}={found}, but {flag} {value} was given")
        if value is None and found is None:
            raise ValueError(
                f"cannot tell {arg} from {path}: its layers do not look like a {model}'s (is --model right? "
                f"other --N/--channels?); give {flag} if they are"
            )
        values[arg] = value if value is not None else found
    return {
        "model": model,
        "model_kwargs": model_kwargs,
        **values,
        "class_names": None,  # not recorded: names made up here would contradict the data's
        "replace_blocks": None,
        "data": {},
        "source": "state dict",
    }
