"""Loading and saving model weights safely (safetensors, or ``torch.load(weights_only=True)``).

Also what a bare state dict can tell about the model that wrote it (``infer_io_channels``), so
that a checkpoint saved by the reference code, which carries no metadata, can be rebuilt.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import reprlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from cmrf._warnings import caller_stacklevel

__all__ = [
    "is_safetensors_file",
    "load_checkpoint",
    "read_state_dict",
    "safetensors_metadata",
    "save_weights",
]

# Wrappers that training scripts commonly put around the state dict; the first that holds tensors
# is taken.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "network", "weights", "params")
# Where they put the averaged (EMA) weights: timm's train.py writes "state_dict_ema" beside
# "state_dict". These come first by default, as in timm's loader (use_ema=True), so that
# cmrf.create_model and timm.create_model load the same weights from one file.
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema")


def _existing_file(path: str | Path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        got = f"{type(path).__name__} ({reprlib.repr(path)})"
        if isinstance(path, dict):  # model.load_state_dict's argument, passed here by habit
            got = f"{type(path).__name__}: for weights already in memory, use model.load_state_dict(state)"
        raise TypeError(f"the checkpoint path must be a str or os.PathLike, got {got}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no such checkpoint file", str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, expected a checkpoint file", str(path))
    with open(path, "rb"):  # a PermissionError here names the file; readers' own errors may not
        pass
    return path


def is_safetensors_file(path: str | Path) -> bool:
    """Whether ``path`` is (meant to be) safetensors: by its first bytes, else by its suffix.

    A safetensors file starts with an 8-byte header length and then the JSON header's ``{``;
    ``torch.save`` files start with a zip (``PK``) or pickle (``0x80``) signature.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return True
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # a torch.save file, whatever its name says
        return False
    return path.suffix == ".safetensors"


def _first_sentence(err: BaseException) -> str:
    """The reader's own first sentence: torch's zip errors go on for several more."""
    text = str(err).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(err).__name__


def _truncated(path: Path, kind: str, err: BaseException) -> ValueError:
    if "TorchScript" in str(err):  # torch.jit.save's archive: a program, not a state dict
        return ValueError(f"cannot read weights from {path}: it is a TorchScript archive (torch.jit.save), "
                          f"which cmrf does not load; save the model's state_dict() instead")
    return ValueError(f"cannot read weights from {path}: file is truncated or not a {kind} file "
                      f"({_first_sentence(err)})")


def load_error_detail(err: BaseException) -> str:
    """The one fact in a ``torch.load(weights_only=True)`` failure: the unpickler's reason, else the
    error's first sentence (torch's messages go on with advice, such as dropping ``weights_only``,
    that must not reach users)."""
    if "WeightsUnpickler error:" in str(err):
        return _weights_unpickler_reason(err)
    return _first_sentence(err)


def _weights_unpickler_reason(err: BaseException) -> str:
    """The first non-empty line after torch's "WeightsUnpickler error:" (the message's only fact)."""
    text = str(err).partition("WeightsUnpickler error:")[2]
    return next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)


@contextlib.contextmanager
def _safetensors_name(path: Path) -> Iterator[str]:
    """A name of ``path`` that the safetensors library can open: it takes UTF-8 text only, and a
    Linux file name may hold other bytes (then the file is opened here and named by descriptor)."""
    name = str(path)
    try:
        name.encode("utf-8")
        utf8 = True
    except UnicodeEncodeError:
        utf8 = False
    if utf8:
        yield name
        return
    with open(path, "rb") as f:  # not inside the except: the block's errors would chain to it
        yield f"/proc/self/fd/{f.fileno()}"


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (``{}`` when it has none or is a torch file).

    Only the header is read. Raises ``ValueError`` naming the file when it is truncated or not
    safetensors, ``OSError`` when it cannot be opened.
    """
    path = _existing_file(path)
    if not is_safetensors_file(path):
        return {}
    from safetensors import safe_open

    try:
        with _safetensors_name(path) as name, safe_open(name, framework="pt") as f:
            return dict(f.metadata() or {})
    except OSError:
        raise
    except Exception as err:  # safetensors has its own error type, not an OSError
        raise _truncated(path, "safetensors", err) from err


def _is_onnx_graph(path: Path) -> bool:
    """Whether ``path`` is an ONNX model: its suffix, or the protobuf's first field (``ir_version``,
    field 1 as a varint: byte 0x08) followed by a small version number."""
    if path.suffix.lower() == ".onnx":
        return True
    with open(path, "rb") as file:
        head = file.read(2)
    return len(head) == 2 and head[0] == 0x08 and 3 <= head[1] <= 20


# torch.save stores its zip entries uncompressed: a file that expands far beyond its size is a
# re-packed archive built to exhaust memory (a 195 KB file held a 200 MB tensor, 1 GB to read).
_MAX_EXPANSION = 20


def check_not_a_zip_bomb(path: Path) -> None:
    """Refuse a zip (``torch.save``'s format) whose entries expand ``_MAX_EXPANSION`` times its size."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            expanded = sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        return  # torch.load names a damaged file
    size = path.stat().st_size
    if expanded > _MAX_EXPANSION * size + 2**20:
        raise ValueError(f"cannot read weights from {path}: its zip entries expand to {expanded} bytes from "
                         f"{size} (torch.save stores them uncompressed); a re-compressed archive is not read")


def _read_torch_file(path: Path):
    check_not_a_zip_bomb(path)
    try:
        with warnings.catch_warnings():
            # torch warns about a foreign file before failing (a TorchScript archive: "call
            # torch.jit.load", which would run its code; a plain pickle's protocol): the error
            # below says what the file is, in one line.
            warnings.simplefilter("ignore")
            # An open file, not the path: torch 2.14 reads any path ending in .safetensors as
            # safetensors, also a torch.save file given that name.
            with open(path, "rb") as file:
                return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # "Unsupported global: GLOBAL builtins.eval", or for modules torch blocks outright
        # (os, sys, posix) "Trying to load unsupported GLOBAL posix.system whose module ..."
        found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(err), re.IGNORECASE)
        if found is None and _is_onnx_graph(path):  # what cmrf export writes, given back by habit
            raise ValueError(
                f"cannot read weights from {path}: it is an ONNX graph (what cmrf export writes), not a "
                f"weights file; give the checkpoint it was exported from (.safetensors or .pt): "
                f"cmrf predict and cmrf evaluate run it in ONNX Runtime with --backend onnxruntime"
            ) from err
        if found is None:  # not a pickle at all (an image): torch's weights-only reader
            raise ValueError(  # stops at its first byte ("Unsupported operand 80")
                f"cannot read weights from {path}: not a torch checkpoint or safetensors file "
                f"({_weights_unpickler_reason(err)})") from err
        reason = f"{found.group(1)} is not a tensor type"
        raise ValueError(
            f"cannot read {path}: it holds pickled objects other than tensors ({reason}); cmrf loads "
            f"checkpoints only with torch.load(weights_only=True) or as .safetensors, so no pickled code runs"
        ) from err
    except Exception as err:  # zip and pickle errors come in many types (RuntimeError, EOFError, OSError...)
        raise _truncated(path, "torch checkpoint", err) from err


def _without_extra_state(state: dict) -> dict:
    """``state`` without modules' extra state (``get_extra_state()``: any value, no weights; e.g. an
    optimized copy's channel order); ``state`` itself when it holds none."""
    def is_extra(key) -> bool:
        return isinstance(key, str) and key.rpartition(".")[2] == "_extra_state"

    if not any(is_extra(key) for key in state):
        return state
    return {key: value for key, value in state.items() if not is_extra(key)}


def read_state_dict(path: str | Path, *, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file, on the CPU.

    ``torch.save`` files are opened with ``weights_only=True``: no pickled code runs. A dict
    that wraps the weights under one of ``_WRAPPER_KEYS`` (``state_dict``, ``model``,
    ``model_state_dict``, ``net``, ...) or ``_EMA_KEYS`` (``state_dict_ema``, ``model_ema``,
    ``ema``) is unwrapped, and the prefixes that wrappers put before every key are removed:
    ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (``torch.compile``), in either order.

    Args:
        path: the file.
        use_ema: when the file holds averaged (EMA) weights beside the raw ones (timm's
            ``train.py`` writes both), read the averaged ones, as timm's loader does (default
            ``True``), else the raw ones. Either way a ``UserWarning`` names the one read.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError: the file cannot be opened.
        ValueError: the file is truncated or corrupt, holds pickled objects, or holds no state
            dict of tensors; the message names the file.
    """
    path = _existing_file(path)
    if is_safetensors_file(path):
        from safetensors.torch import load_file

        try:
            with _safetensors_name(path) as name:
                state = load_file(name, device="cpu")
        except OSError:
            raise
        except Exception as err:  # SafetensorError, not an OSError
            raise _truncated(path, "safetensors", err) from err
    else:
        state = _read_torch_file(path)
    top = state
    order = _EMA_KEYS + _WRAPPER_KEYS if use_ema else _WRAPPER_KEYS + _EMA_KEYS
    if isinstance(state, dict):
        held = [key for key in order if _holds_tensors(state.get(key))]
        if held:
            state = state[held[0]]
            _warn_if_both_copies(path, held)
    if isinstance(state, dict):
        state = _without_extra_state(state)
    tensors_only = isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    if not tensors_only or not state:
        if isinstance(top, dict) and top:
            names = [repr(k) for k in top]
            held = f"its top-level keys are {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}"
        else:
            held = f"it holds {'an empty dict' if isinstance(top, dict) else 'a ' + type(top).__name__}"
        raise ValueError(f"{path} does not hold a state dict of tensors: {held}; the weights are read from "
                         f"the top level or from the first of {', '.join(order)} that holds tensors")
    return _strip_wrapper_prefixes(state)


def _holds_tensors(inner) -> bool:
    """Whether a wrapper key's value is weights: a dict holding tensors (a model's configuration,
    also found under "model", holds none)."""
    return isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values())


def _warn_if_both_copies(path: Path, held: list[str]) -> None:
    """Name the copy read when a file holds both the averaged (EMA) and the raw weights."""
    averaged = [key for key in held if key in _EMA_KEYS]
    raw = [key for key in held if key not in _EMA_KEYS]
    if not (averaged and raw):
        return
    other = "use_ema=True" if held[0] in raw else "use_ema=False"
    kind = "averaged (EMA)" if held[0] in averaged else "raw"
    warnings.warn(
        f"{path} holds averaged (EMA) weights under {averaged[0]!r} and raw ones under {raw[0]!r}: "
        f"read the {kind} ones, {held[0]!r}; for the other copy, cmrf.load_checkpoint(model, path, "
        f"{other}) or cmrf.checkpoint.read_state_dict(path, {other})",
        UserWarning, stacklevel=caller_stacklevel(),
    )


# What wrappers put before every key: DistributedDataParallel/DataParallel ("module.") and
# torch.compile ("_orig_mod."), nested either way round.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _wrapper_prefix(keys) -> str:
    """The wrapper prefixes every one of ``keys`` starts with, joined (``"_orig_mod.module."``)."""
    keys, prefix = list(keys), ""
    found = bool(keys)
    while found:
        found = False
        for wrapper in _WRAPPER_PREFIXES:
            if all(k.startswith(wrapper) for k in keys):
                keys = [k[len(wrapper):] for k in keys]
                prefix, found = prefix + wrapper, True
    return prefix


def _strip_wrapper_prefixes(state: dict) -> dict:
    prefix = _wrapper_prefix(state)
    return {k[len(prefix):]: v for k, v in state.items()} if prefix else state


# How many keys or shapes a mismatch message names of each kind: enough to see the pattern, short
# enough for one line of a CLI error (a model of other widths differs in hundreds of tensors).
SHOWN_PROBLEMS = 5


def _name_list(names, limit: int = SHOWN_PROBLEMS, sep: str = ", ", order: bool = True) -> str:
    """The first ``limit`` of ``names`` joined, and how many more there are."""
    names = sorted(names) if order else list(names)
    shown = sep.join(names[:limit])
    return shown + (f"{sep}... ({len(names) - limit} more)" if len(names) > limit else "")


def map_to_model_keys(
    model: nn.Module, state: dict[str, torch.Tensor], source: str | Path | None = None, quiet: bool = False
) -> dict[str, torch.Tensor]:
    """``state`` in ``model``'s key names, also for a model inside wrappers (``DataParallel``/DDP's
    ``module``, ``torch.compile``'s ``_orig_mod``).

    The reference code's names are mapped by the model's ``checkpoint_filter_fn``. A training
    checkpoint that holds the model's weights under a name (a Lightning checkpoint's ``model.`` or
    ``net.``: the LightningModule's attribute) gives the weights under the one name whose keys are
    exactly the model's, provided they are most of the file (beside them, say, a loss's class
    weights); a model's part is never picked out of a larger network's weights. Otherwise the
    keys stay as they are, for the strict load to report. Keys left out beside the chosen name
    are named in a ``UserWarning`` unless ``quiet`` (for a caller that only reads shapes).

    Raises:
        ValueError: the weights under more than one name fit the model (``model.`` and
            ``ema_model.``), so which to load is the caller's choice; ``source`` names the file.
    """
    model = _unwrapped_model(model)
    filter_fn = getattr(model, "checkpoint_filter_fn", None)

    def in_model_names(candidate: dict) -> dict:
        return filter_fn(candidate, model) if filter_fn is not None else candidate

    keys = list(model.state_dict())
    own = _wrapper_prefix(keys)  # a wrapper with no filter: its keys as read_state_dict leaves a file's
    expected = {k[len(own):] for k in keys}
    whole = in_model_names(state)
    if _keys_fit(whole, expected):
        return whole
    fitting = {}
    for name, used, part in _named_parts(state):
        candidate = in_model_names(part)
        if _keys_fit(candidate, expected):
            fitting[name] = (used, candidate)
    model_name = type(_innermost(model)).__name__
    where = f"{source} holds" if source is not None else "the checkpoint holds"
    if len(fitting) > 1:
        raise ValueError(
            f"{where} {len(fitting)} sets of weights that fit {model_name}, under {', '.join(fitting)}: "
            f"save the one to load as a state dict of its own (its keys without the name)"
        )
    if not fitting:
        return whole
    (name, (used, mapped)), = fitting.items()
    left_out = [key for key in state if key not in used]
    if len(left_out) >= len(used):  # a part of a larger network, not a model beside a few extras
        return whole
    if left_out and not quiet:  # not silent: the rest of a training checkpoint (a loss's weights)
        shown = sorted({key.partition(".")[0] + ("." if "." in key else "") for key in left_out})
        warnings.warn(f"{where} the weights of {model_name} under {name}; loaded those, left out "
                      f"{len(left_out)} other key(s): {', '.join(shown)}", UserWarning,
                      stacklevel=caller_stacklevel())
    return mapped


def _named_parts(state: dict):
    """``(name, keys used, part)`` for each first name of ``state``'s keys (``"model."``),
    ``part`` holding the keys under it without it and without wrapper prefixes after it; then,
    while every key of ``part`` starts with one more name, the same one name further down
    (``"net.model."``). A model's own nested blocks (``encoders.0.``) are never candidates."""
    groups: dict[str, dict] = {}
    for key in state:
        first, dot, rest = key.partition(".")
        if dot and rest:
            groups.setdefault(first + ".", {})[rest] = key
    for name, originals in groups.items():  # originals: the key under the name -> the file's key
        used = set(originals.values())
        part = _strip_wrapper_prefixes({rest: state[key] for rest, key in originals.items()})
        yield name, used, part
        while len(inner := {key.partition(".")[0] for key in part}) == 1 and all("." in k for k in part):
            below = inner.pop() + "."
            name, part = name + below, _strip_wrapper_prefixes({k[len(below):]: v for k, v in part.items()})
            yield name, used, part


def _unwrapped_model(model: nn.Module) -> nn.Module:
    """The model with a ``checkpoint_filter_fn`` inside wrappers, or ``model`` itself if none has one."""
    found = model
    while getattr(found, "checkpoint_filter_fn", None) is None:
        inner = _wrapped(found)
        if inner is None:
            return model
        found = inner
    return found


def _wrapped(model: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile``/``DataParallel``/DDP wrapper holds, or ``None``."""
    inner = getattr(model, "_orig_mod", None)
    if not isinstance(inner, nn.Module):  # (a Sequential may be empty, hence no "or")
        inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else None


def _innermost(model: nn.Module) -> nn.Module:
    """``model`` inside every wrapper, for messages that name it."""
    while (inner := _wrapped(model)) is not None:
        model = inner
    return model


def _keys_fit(state: dict, expected: set[str]) -> bool:
    """Whether ``state`` holds exactly the ``expected`` keys, BatchNorm step counters optional."""
    keys = state.keys()
    return not keys - expected and all(k.rpartition(".")[2] == "num_batches_tracked" for k in expected - keys)


def _unusable(value, own: torch.Tensor) -> str:
    """Why ``value`` cannot be copied into the model's ``own`` tensor, or ``""``: what torch's
    ``load_state_dict`` would fail on after copying the tensors before it (a meta or sparse
    tensor), or would cast without a word (integer or complex values into floating weights)."""
    if not isinstance(value, torch.Tensor):
        return f"a {type(value).__name__}, not a tensor"
    if value.is_meta:
        return "a meta tensor (no values: saved from a model built on the meta device)"
    if value.layout != torch.strided:
        return f"a {str(value.layout).removeprefix('torch.')} tensor, not a dense one"
    if own.is_floating_point() and not value.is_floating_point():
        return f"{str(value.dtype).removeprefix('torch.')} values for a floating-point weight"
    return ""


def load_state_dict_checked(
    model: nn.Module, state: dict[str, torch.Tensor], source: str | Path, *, check_only: bool = False
) -> nn.Module:
    """Load ``state`` into ``model`` strictly after checking every key and shape (see ``load_checkpoint``).

    ``check_only=True`` runs the checks and loads nothing (and says nothing a load would warn
    about): for a model built on the meta device, to learn whether a file fits before building it.
    """
    expected = model.state_dict()
    # The file's wrapper prefixes are gone (read_state_dict); the model's own go back on: a compiled
    # model, a DDP-wrapped one, or one whose only child is named "module", loads its own weights.
    prefix = _wrapper_prefix(expected)
    mapped = {prefix + k: v for k, v in map_to_model_keys(model, state, source, quiet=check_only).items()}
    # BatchNorm loads a state without its step counter (older and converted checkpoints lack it),
    # as torch's strict load_state_dict and timm do.
    missing = {k for k in expected.keys() - mapped.keys() if k.rpartition(".")[2] != "num_batches_tracked"}
    unexpected = mapped.keys() - expected.keys()
    mismatched = [
        f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in mapped and mapped[k].shape != v.shape
    ]
    unusable = [f"{k}: {why}" for k, v in mapped.items()
                if k in expected and (why := _unusable(v, expected[k]))]
    if missing or unexpected or mismatched or unusable:
        problems = []
        if unusable:  # load_state_dict would fail on them partway, the model half overwritten
            problems.append(f"unusable tensors: {_name_list(unusable, sep='; ', order=False)}")
        if missing:
            problems.append(f"missing keys: {_name_list(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_name_list(unexpected)}")
        if len(_folded_keys(unexpected, expected.keys())) >= 2:
            problems.append(
                "these look like the weights of an optimize_for_inference copy (BatchNorm folded into its "
                "convolutions), which no trainable model loads: save the model before optimizing it "
                "(cmrf.save_weights(model, path)), and optimize again after loading"
            )
        if mismatched:
            problems.append(f"shape mismatches: {_name_list(mismatched, sep='; ', order=False)}")
            ranks = _other_spatial_dims(mapped, expected)
            if ranks:
                problems.append(f"these are the weights of a {ranks[0]}D model and the model is {ranks[1]}D "
                                f"(spatial_dims={ranks[1]}): build a {ranks[0]}D model to load them")
        head = f"{getattr(model, 'classifier_name', None)}."
        channels = _input_channels_hint(model, mapped, expected, prefix)
        if channels and not missing and not unexpected and all(
                m.startswith((head, channels[0] + ":")) for m in mismatched):
            problems.append(channels[1])
        elif mismatched and not missing and not unexpected and all(m.startswith(head) for m in mismatched):
            problems.append(
                "only the classifier differs: to fine-tune for other classes, load the rest with "
                "create_model(..., num_classes=K, pretrained=True, pretrained_cfg_overlay=dict(file=PATH)) "
                "or cmrf train --init PATH"
            )
        raise ValueError(
            f"checkpoint {source} does not fit {type(model).__name__}{_how_it_was_built(source)}: "
            + " | ".join(problems)
        )
    if not check_only:
        model.load_state_dict(mapped)
    return model


def _input_channels_hint(model: nn.Module, mapped: dict, expected: dict,
                         prefix: str) -> tuple[str, str] | None:
    """``(key, hint)`` when the file's first convolution (the cfg's ``first_conv``) takes other
    input channels than the model's: the model was built for other images than the weights."""
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    key = f"{prefix}{first}.weight"
    if not first or key not in mapped or key not in expected or mapped[key].dim() < 2:
        return None
    saved, own = mapped[key].shape[1], expected[key].shape[1]
    if saved == own:
        return None
    return key, (f"the file is for {saved} input channel(s) and the model takes {own}: build it with "
                 f"in_chans={saved}, or, to adapt the weights to {own} channels as timm does, with "
                 f"in_chans={own}, pretrained=True, pretrained_cfg_overlay=dict(file=PATH) "
                 f"(cmrf train --init)")


def _other_spatial_dims(mapped: dict, expected: dict) -> tuple[int, int] | None:
    """``(file's, model's)`` spatial dimensions where every convolution weight of the file has
    another rank than the model's (3D weights for a 2D model), else ``None``."""
    ranks = {(mapped[k].dim() - 2, v.dim() - 2) for k, v in expected.items()
             if k in mapped and k.endswith(".weight") and v.dim() >= 3 and mapped[k].dim() >= 3}
    if len(ranks) == 1 and (pair := ranks.pop())[0] != pair[1]:
        return pair
    return None


def _folded_keys(unexpected: set[str], expected) -> list[str]:
    """The ``unexpected`` keys that an ``optimize_for_inference`` copy's ``state_dict`` has: a
    conv's folded ``weight``/``bias`` where the model has a ``conv`` + ``norm`` pair, or a
    decoder's split first convolution (``pw1_low``, ``pw1_skip``)."""
    return [key for key in unexpected
            if f"{key.rpartition('.')[0]}.conv.weight" in expected
            or key.endswith(("pw1_low.weight", "pw1_skip.weight"))]


def _recorded_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata a weights file records: a safetensors header's, or the ``metadata``
    dict a ``last_state.pt`` of ``cmrf train`` holds beside its weights; ``{}`` for other files."""
    path = _existing_file(path)
    if is_safetensors_file(path):
        return safetensors_metadata(path)
    top = _read_torch_file(path)
    meta = top.get("metadata") if isinstance(top, dict) else None
    if not isinstance(meta, dict):
        return {}
    return {key: value for key, value in meta.items() if isinstance(key, str) and isinstance(value, str)}


def _how_it_was_built(source: str | Path) -> str:
    """For a file ``cmrf train`` wrote, the call that builds its model (its metadata says), as a
    clause of the mismatch message: a model built with default arguments is the usual cause."""
    try:
        meta = _recorded_metadata(source)
        if meta.get("format") != "cmrf":
            return _saved_from(meta)
        name, values = meta["model"], json.loads(meta.get("model_kwargs") or "{}")
        in_chans, num_classes = json.loads(meta["in_chans"]), json.loads(meta["num_classes"])
        dims = json.loads(meta.get("data") or "{}").get("spatial_dims")
        replace_n = json.loads(meta.get("replace_blocks") or "null")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""
    arguments = [repr(name), f"in_chans={in_chans}", f"num_classes={num_classes}"]
    arguments += [f"{key}={value!r}" for key, value in values.items()]
    if dims not in (None, 2) and not name.endswith(f"{dims}d"):
        arguments.append(f"spatial_dims={dims}")
    call = f"cmrf.create_model({', '.join(arguments)})"
    if replace_n is not None:
        call += f", then cmrf.replace_blocks(model, N={replace_n})"
    return f" (cmrf train wrote it for {call}: build the model that way)"


# Metadata key of a save_weights file whose model create_model built: the call, as JSON.
CREATE_CALL_KEY = "cmrf_create_model"


def _layout_fingerprint(model: nn.Module) -> str:
    """Names and shapes of ``model``'s state: equal while nothing swapped or resized a part."""
    layout = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    return hashlib.sha256(repr(layout).encode()).hexdigest()


def record_create_call(model: nn.Module, name: str, kwargs: dict) -> None:
    """Note on ``model`` (``cmrf_create_call``) the ``create_model(name, **kwargs)`` call that built
    it, for ``save_weights`` to store. Arguments JSON cannot hold (a class, a tensor) note nothing."""
    try:
        call = json.dumps({"model": name, "kwargs": kwargs})
    except (TypeError, ValueError):
        return
    model.cmrf_create_call = (call, _layout_fingerprint(model))


def _create_call(model: nn.Module) -> str | None:
    """The recorded call, if ``model`` still has the layout that call builds (``replace_blocks``
    or timm's ``reset_classifier`` since would make it name another model)."""
    recorded = getattr(model, "cmrf_create_call", None)
    if not (isinstance(recorded, tuple) and len(recorded) == 2):
        return None
    call, fingerprint = recorded
    return call if fingerprint == _layout_fingerprint(model) else None


def model_create_call(model: nn.Module) -> tuple[str, dict] | None:
    """``(name, kwargs)`` of the ``create_model`` call that built ``model``, if its layout is still
    the one that call builds, else ``None``."""
    call = _create_call(model)
    return None if call is None else _create_call_of({CREATE_CALL_KEY: call})


def _create_call_of(meta: dict) -> tuple[str, dict] | None:
    """``(name, kwargs)`` of the ``create_model`` call ``save_weights`` recorded in ``meta``."""
    try:
        call = json.loads(meta[CREATE_CALL_KEY])
        name, kwargs = call["model"], call["kwargs"]
    except (KeyError, TypeError, ValueError):
        return None
    return (name, kwargs) if isinstance(name, str) and isinstance(kwargs, dict) else None


def training_create_call(path: str | Path) -> tuple[str, dict] | None:
    """The ``create_model(name, **kwargs)`` call that built the model of a file ``cmrf train``
    wrote, as ``(name, kwargs)``, or ``None`` (another file, or a ``--replace-blocks`` model, which
    no such call builds): a ``.safetensors`` it wrote or its ``last_state.pt``."""
    try:
        meta = _recorded_metadata(path)
        if meta.get("format") != "cmrf" or json.loads(meta.get("replace_blocks") or "null") is not None:
            return None
        name, kwargs = meta["model"], json.loads(meta.get("model_kwargs") or "{}")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (name, kwargs) if isinstance(name, str) and isinstance(kwargs, dict) else None


def recorded_create_call(path: str | Path) -> tuple[str, dict] | None:
    """The ``create_model(name, **kwargs)`` call ``save_weights`` recorded in a ``.safetensors``
    file, as ``(name, kwargs)``, or ``None`` (another file, or none recorded)."""
    try:
        return _create_call_of(safetensors_metadata(path))
    except (OSError, ValueError):
        return None


def _saved_from(meta: dict) -> str:
    """The clause naming the ``create_model`` call ``save_weights`` recorded, or ``""``."""
    call = _create_call_of(meta)
    if call is None:
        return ""
    arguments = [repr(call[0])] + [f"{key}={value!r}" for key, value in call[1].items()]
    return f" (it was saved from cmrf.create_model({', '.join(arguments)}): build the model that way)"


def load_checkpoint(model: nn.Module, path: str | Path, *, use_ema: bool = True) -> nn.Module:
    """Load weights from ``path`` into ``model`` strictly and return the model.

    Foreign key names (e.g. the reference TinyU-Net code's) are mapped by the model's
    ``checkpoint_filter_fn`` when it has one. Everything is checked before any weight is copied,
    so a failed load leaves the model untouched. Raises ``ValueError`` listing missing keys,
    unexpected keys and shape mismatches, or naming a truncated/corrupt file.

    ``use_ema``: of a file holding averaged (EMA) weights beside the raw ones, load the averaged
    ones (default, as timm does) or the raw ones (see ``read_state_dict``).
    """
    return load_state_dict_checked(model, read_state_dict(path, use_ema=use_ema), path)


# torch.save's usual suffixes: a safetensors file under one of them is one torch.load cannot read.
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")


def check_text_metadata(metadata, store: str) -> None:
    """``metadata`` is ``None`` or a dict of text to text, all that ``store``'s header keeps."""
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    wrong = [f"{key!r}: {value!r}" for key, value in (metadata or {}).items()
             if not isinstance(key, str) or not isinstance(value, str)]
    if wrong:
        raise ValueError(f"metadata must map str to str ({store} stores text only), got "
                         f"{', '.join(wrong)}: convert them with str() or json.dumps()")


def _refuse_inference_copy(model: nn.Module) -> None:
    """Refuse an ``optimize_for_inference`` copy, whose folded, reordered weights no trainable
    model loads back (its parts say so with a class attribute ``inference_only = True``)."""
    from cmrf.layers import inference_only_parts

    parts = inference_only_parts(model)
    if parts:
        where = "it is" if parts[0] == "" else f"its part {parts[0].removeprefix('module.')!r} is"
        raise ValueError(
            f"save_weights got an optimize_for_inference copy ({type(model).__name__}: {where} "
            f"inference-only): its weights have BatchNorm folded in, and no trainable model loads them "
            f"back; save the model you optimized (cmrf.save_weights(model, path)) and call "
            f"optimize_for_inference again after loading it"
        )


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save ``model``'s state dict as safetensors, atomically (``cmrf.files.atomic_path``).

    A failed write (full disk, read-only folder) leaves a previous ``path`` as it was and no
    temporary file behind.

    Args:
        model: whose ``state_dict()`` to save (tied weights are stored under each name).
        path: the file to write; any suffix but a pickle's (``.pt``, ``.pth``, ``.ckpt``,
            ``.bin``, ``.tar``), which ``torch.load`` could not read. ``.safetensors`` is usual.
        metadata: string keys and string values stored in the file's header, or ``None``. A
            model that ``cmrf.create_model`` built, unchanged in layout since, also records that
            call (key ``cmrf_create_model``), which a load that does not fit then names.

    A ``torch.compile`` or ``(Distributed)DataParallel`` wrapper is looked through: the file holds
    the wrapped model's keys, without ``_orig_mod.``/``module.``, and its recorded call.

    Raises:
        ValueError: for a pickle suffix, metadata that is not ``str`` to ``str``, a copy made by
            ``optimize_for_inference`` (save the model it was made from instead), or a model
            on the meta device (no values to save).
        OSError: the file cannot be written.
    """
    from safetensors.torch import save_file

    from cmrf.files import atomic_path
    from cmrf.layers import without_wrappers

    # The wrapped model: keys without "module."/"_orig_mod.", and its recorded create_model call.
    model = without_wrappers(model)
    _refuse_inference_copy(model)
    suffix = Path(path).suffix.lower()
    if suffix in _PICKLE_SUFFIXES:
        raise ValueError(
            f"save_weights writes safetensors, which torch.load cannot read, but {str(path)!r} ends in "
            f"{suffix!r} (a torch.save pickle's suffix): name it *.safetensors, or use "
            f"torch.save(model.state_dict(), path) for a pickle"
        )
    check_text_metadata(metadata, "safetensors")
    call = _create_call(model)
    if call is not None and CREATE_CALL_KEY not in (metadata or {}):
        metadata = {**(metadata or {}), CREATE_CALL_KEY: call}
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        if value.is_meta:
            raise ValueError(
                f"save_weights: {key!r} is a meta tensor: a model built on the meta device has no "
                f"values to save; give it weights first (model.load_state_dict(state, assign=True), "
                f"or model.to_empty(device='cpu') and an initialisation)"
            )
        value = value.detach().cpu().contiguous()
        # Tied weights share storage, which safetensors refuses: store each name's own copy
        # (loading copies both names into the one tied tensor, so the tie survives a round trip).
        storage = value.untyped_storage().data_ptr() if value.numel() else None
        state[key] = value.clone() if storage in seen else value
        seen.add(storage)
    with atomic_path(path) as tmp:
        try:
            save_file(state, str(tmp), metadata=metadata)
        except OSError:
            raise
        except Exception as err:  # safetensors reports I/O errors as "... (os error 28)"
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from err
