"""The exact training state that ``--resume`` continues from, and the metadata of checkpoints.

A run folder (``cmrf.train.run_folder.RunFiles``) holds:

- ``last.safetensors`` / ``best.safetensors``: model weights (``cmrf.checkpoint.save_weights``)
  with metadata that lets ``cmrf evaluate`` / ``cmrf predict`` rebuild the model
  (``model_metadata``);
- ``last_state.pt``: everything ``--resume`` needs, loadable with ``torch.load(weights_only=True)``:
  weights, optimizer, scheduler, gradient scaler, progress, random generator states, and the
  recipe and metadata of the run (so that a resume with other settings is refused). Its content is
  defined once, by the pair ``capture_state`` / ``restore_state``;
- ``metrics.json``, ``training_curve.png``, ``overlays.png``.

The state repeats the weights on purpose: it is the one file that defines where a run stands,
written with a single atomic rename, so a kill between two writes can never pair the weights of
one epoch with the optimizer of another. Every file goes through ``cmrf.files``: temporary file in
the same folder, fsync, rename; on a failure (a full disk) the previous file stays as it was and
no temporary file is left.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cmrf.data.factory import option_flag, reads_in_chans, unread_options
from cmrf.files import atomic_write
from cmrf.models.registry import without_defaults
from cmrf.train.run_folder import STATE_FILE, RunFiles, naming_errors

__all__ = [
    "STATE_FILE",
    "Progress",
    "TrainingParts",
    "capture_state",
    "check_run_metadata",
    "decode_metadata",
    "get_rng_state",
    "load_training_state",
    "model_metadata",
    "read_metadata",
    "restore_state",
    "moved_data_root",
    "resume_differences",
    "save_training_state",
    "training_state_metadata",
    "saved_run_metadata",
    "set_rng_state",
]

STATE_FORMAT = "cmrf-train-state/1"


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
        # One state per GPU the saving process saw; a machine with fewer GPUs restores the
        # first ones (what this process can use) instead of failing on the missing devices.
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


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
        data: the data options of the run (``cmrf.data.build_datasets`` keywords and ``seed``),
            for ``evaluate`` and for the checks of ``--resume``.
        **extra: further values, stored with ``json.dumps`` (e.g. ``command="demo"``).
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


def check_run_metadata(metadata) -> dict[str, str]:
    """``fit``'s ``metadata``, checked before training: text to text (a safetensors header keeps
    only text), each value but ``format``'s and ``model``'s JSON, as ``model_metadata`` writes them:
    ``--resume`` and ``cmrf evaluate`` read them back so. Returns a copy."""
    from cmrf.checkpoint import check_text_metadata

    check_text_metadata(metadata, "every checkpoint's header")
    for key, value in (metadata or {}).items():
        if key in ("format", "model"):
            continue
        try:
            json.loads(value)
        except (ValueError, RecursionError):
            raise ValueError(f"metadata[{key!r}] = {value!r} is not JSON, and a run's metadata is read back "
                             f"as JSON (--resume, cmrf evaluate): store json.dumps(value) "
                             f"(cmrf.train.state.model_metadata does)") from None
    return dict(metadata or {})


def decode_metadata(meta: dict[str, str]) -> dict:
    """The values of ``model_metadata``'s strings (``model`` and ``format`` stay strings)."""
    return {key: value if key in ("format", "model") else json.loads(value) for key, value in meta.items()}


def training_state_metadata(path: str | Path) -> dict[str, str] | None:
    """The (encoded) model metadata a ``last_state.pt`` carries, or ``None`` for any other file."""
    try:
        state = load_training_state(path)
    except (ValueError, OSError):
        return None
    meta = state.get("metadata")
    if not isinstance(meta, dict) or not meta:
        return None
    if "epoch" not in meta and isinstance(state.get("epoch"), int):  # as last.safetensors records it
        meta = {**meta, "epoch": str(state["epoch"])}
    return meta


def read_metadata(path: str | Path) -> dict:
    """The decoded ``model_metadata`` of a ``.safetensors`` checkpoint written by ``cmrf train``,
    or of its ``last_state.pt`` (which holds the same metadata and the last epoch's weights).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not safetensors or carries no cmrf training metadata.
    """
    from cmrf.checkpoint import is_safetensors_file, safetensors_metadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_safetensors_file(path):
        meta = safetensors_metadata(path)  # a damaged file: ValueError naming it
    else:
        meta = training_state_metadata(path)
        if meta is None:
            raise ValueError(f"{path} is neither a safetensors file nor a last_state.pt of cmrf train")
    if meta.get("format") != "cmrf" or "model" not in meta:
        raise ValueError(
            f"{path} carries no cmrf training metadata (model name, classes); pass a best.safetensors "
            f"or last.safetensors written by cmrf train"
        )
    try:
        decoded = decode_metadata(meta)
    except (ValueError, RecursionError) as err:  # not JSON, or nested past the parser's depth
        raise ValueError(f"{path}: its cmrf metadata is damaged (not JSON: {type(err).__name__})") from None
    decoded.pop("format")
    wrong = [f"{key} ({type(decoded[key]).__name__}, expected {kind})" for key, types, kind in _METADATA_TYPES
             if key in decoded and (not isinstance(decoded[key], types) or isinstance(decoded[key], bool))]
    if wrong:
        raise ValueError(f"{path}: its cmrf metadata has entries of the wrong type: {', '.join(wrong)}")
    return decoded


# The decoded metadata entries whose type the code relies on: a file from elsewhere is checked first.
_METADATA_TYPES = (
    ("model", str, "a name"), ("in_chans", int, "an integer"), ("num_classes", int, "an integer"),
    ("class_names", list, "a list"), ("data", dict, "a dict"), ("model_kwargs", (dict, type(None)), "a dict"),
    ("replace_blocks", (int, type(None)), "an integer or null"),
)


def saved_run_metadata(files: RunFiles) -> dict | None:
    """The decoded ``model_metadata`` of the run in a folder, or ``None`` if none is readable."""
    for path in (files.last, files.best):
        with contextlib.suppress(ValueError, OSError):
            return read_metadata(path)
    with contextlib.suppress(ValueError, OSError, KeyError):
        return decode_metadata(load_training_state(files.state)["metadata"])
    return None


# --- what must agree for a resume ---------------------------------------------------------------

# Metadata entries that define the network and the data, with the flag that sets each.
_MODEL_FLAGS = {"model": "--model", "in_chans": "input channels"}
_MODEL_KWARG_FLAGS = {"N": "--N", "channels": "--channels"}
# Data options that say where decoded samples are kept, not which samples: free to change.
_DATA_STORAGE_OPTIONS = ("cache", "cache_dir")
# Data entries that are not flags: how a difference names them.
_DATA_LABELS = {"split_files": "the splits' files"}
# Data entries compared only when the data moved: a file edited in place (a corrected mask) is
# still the run's data, but other data with the same file names at another --root is not.
_DATA_COPY_CHECKS = ("split_sizes",)
# Where the data lies: free to change when the splits hold the same files (the data moved).
_DATA_LOCATION_FLAGS = ("--root", "--split-dir")
# Recipe fields that may change on resume: where and how fast it runs, not what it computes.
RESUME_FREE_FIELDS = ("amp", "workers", "device", "overlays", "compile")


def shown_setting(value) -> str:
    """A setting as a flag value reads: lists space-separated, ``None`` as "default"."""
    if value is None:
        return "default"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def _metadata_settings(meta: dict) -> dict[str, object]:
    """Flag -> value of the decoded metadata entries that define the model and the data."""
    settings = {flag: meta.get(key) for key, flag in _MODEL_FLAGS.items()}
    replace_n = meta.get("replace_blocks")
    settings["--replace-blocks"] = "off" if replace_n is None else f"N={replace_n}"
    # An argument at its default is the same model as one left out (``--N 8`` for TinyU-Net).
    kwargs = without_defaults(meta.get("model", ""), meta.get("model_kwargs") or {})
    settings.update({_MODEL_KWARG_FLAGS.get(key, f"model {key}"): value for key, value in kwargs.items()})
    data = meta.get("data") or {}
    # Options the data does not read never mattered (a run saved before they were refused may
    # hold them), so they are not compared.
    unread = unread_options(data.get("data", "synthetic"))
    settings.update({_DATA_LABELS.get(key, option_flag(key)): value for key, value in data.items()
                     if key not in _DATA_STORAGE_OPTIONS + _DATA_COPY_CHECKS and key not in unread})
    if settings.get("--num-classes") is None:  # left out: the classes the data had, which the model has
        settings["--num-classes"] = meta.get("num_classes")
    init = meta.get("init")  # --init: the weights the run started from, by content (a moved copy is the same)
    settings["--init"] = f"a file of sha256 {init['sha256'][:12]}" if init else "none"
    settings.pop("--in-chans", None)  # the model's input channels are the data's: compared once
    if reads_in_chans(data.get("data", "synthetic"), data.get("spatial_dims", 2)):
        # named by the flag that sets them (runs saved before it existed, or left at the default,
        # read their images as RGB: their models have 3, which the default gives again)
        settings["--in-chans"] = settings.pop("input channels")
    return settings


def _recipe_settings(recipe) -> dict[str, object]:
    """Flag -> value of the recipe fields that change the computation (``aug_stop`` as epochs)."""
    settings = {
        option_flag(f.name): getattr(recipe, f.name)
        for f in fields(recipe) if f.name not in RESUME_FREE_FIELDS
    }
    settings["--aug-stop"] = recipe.augment_epochs
    if "--betas" in settings:
        settings["--betas"] = list(settings["--betas"])
    return settings


def _differences(saved: dict, given: dict) -> list[str]:
    keys = list(dict.fromkeys([*saved, *given]))
    return [
        f"{key} {shown_setting(saved.get(key))} (given {shown_setting(given.get(key))})"
        for key in keys
        if saved.get(key) != given.get(key)
    ]


# --- the resumable training state ---------------------------------------------------------------


@dataclass
class Progress:
    """Where a run stands.

    Attributes:
        epoch: completed epochs.
        history: one record per completed epoch (``epoch`` 1-based, ``train_loss``,
            ``val_mean_iou``, ``lr``).
        best_score: best validation mIoU so far (``-inf`` before the first epoch).
        best_epoch: the 1-based epoch that scored ``best_score`` (0 before the first epoch).
    """

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0


@dataclass
class TrainingParts:
    """The objects whose state a run saves: the plain model (not DDP- or compile-wrapped),
    its optimizer, the lr scheduler and the gradient scaler."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def capture_state(
    parts: TrainingParts,
    progress: Progress,
    *,
    recipe,
    metadata: dict[str, str],
    rng_states: list[dict],
) -> dict:
    """The training state after ``progress.epoch`` epochs, as ``restore_state`` reads it.

    Args:
        parts: model, optimizer, scheduler, scaler.
        progress: completed epochs, history, best score.
        recipe: the run's ``cmrf.train.Recipe`` (stored as a dict).
        metadata: the run's ``model_metadata`` strings (``{}`` when the caller gave none).
        rng_states: ``get_rng_state()`` of every process, by rank.

    Returns:
        A dict of tensors, lists, numbers and strings (``torch.load(weights_only=True)`` reads it).
    """
    return {
        "format": STATE_FORMAT,
        "epoch": progress.epoch,
        "history": progress.history,
        "best_score": progress.best_score,
        "best_epoch": progress.best_epoch,
        "model": {k: v.detach().cpu() for k, v in parts.model.state_dict().items()},
        # Which parameters were frozen (requires_grad=False): a resume must freeze the same ones.
        "frozen": frozen_parameters(parts.model),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "rng": rng_states,
        "world_size": len(rng_states),
        "recipe": recipe.to_dict(),
        "metadata": dict(metadata),
        # CPU sums add up per thread: another count on resume changes the rounding (see _resume).
        "cpu_threads": torch.get_num_threads(),
    }


def resume_differences(
    state: dict, *, recipe, metadata: dict[str, str], world_size: int | None = None
) -> list[str]:
    """The settings in which a run about to resume from ``state`` differs from the saved run.

    Compares the network and data (``metadata``, when both sides have it), the recipe fields
    that change what is computed (all but ``RESUME_FREE_FIELDS``) and, when ``world_size`` is
    given, the number of processes (the batch of a step is that many times ``--batch-size``); the
    data's cache settings may change too.

    Returns:
        One ``"--flag SAVED (given GIVEN)"`` entry per difference; empty when they agree.
    """
    known = {f.name for f in fields(recipe)}
    # Fields free to change are not compared, nor checked against this machine (a run saved with
    # --workers 16 on a larger one resumes here).
    saved_recipe = type(recipe)(**{k: v for k, v in state["recipe"].items()
                                   if k in known and k not in RESUME_FREE_FIELDS})
    differences = _differences(_recipe_settings(saved_recipe), _recipe_settings(recipe))
    if saved_recipe.aug_stop is None and recipe.aug_stop is None:  # both 60% of --epochs: said there
        differences = [d for d in differences if not d.startswith("--aug-stop ")]
    saved_meta = state.get("metadata") or {}
    if saved_meta and metadata:
        saved = _metadata_settings(decode_metadata(saved_meta))
        given = _metadata_settings(decode_metadata(metadata))
        for label in _DATA_LABELS.values():
            if label not in saved:  # a state saved before this was recorded: nothing to compare
                given.pop(label, None)
        splits = _DATA_LABELS["split_files"]
        same_names = saved.get(splits) is not None and saved.get(splits) == given.get(splits)
        copies = _same_copies(saved_meta, metadata)
        if same_names and copies:
            for flag in _DATA_LOCATION_FLAGS:
                saved.pop(flag, None)
                given.pop(flag, None)
        elif same_names and given.get("--root") not in (None, saved.get("--root")):
            # why a moved copy is taken and this look-alike is not
            given["--root"] = (f"{given['--root']}: its files have the run's names but other sizes, so they "
                               f"are not a copy of the run's data")
        # --seed is also a recipe field: report it once.
        differences += [d for d in _differences(saved, given) if not d.startswith("--seed ")]
    saved_world = state.get("world_size")
    if world_size is not None and saved_world is not None and saved_world != world_size:
        differences.append(f"processes {saved_world} (given {world_size}; torchrun --nproc_per_node sets "
                           f"them, and each step's batch is processes x --batch-size)")
    return differences


def _same_copies(saved_meta: dict[str, str], metadata: dict[str, str]) -> bool:
    """Whether the files at the given data location can be copies of the saved run's: their sizes
    agree, or the run recorded none (saved before they were)."""
    saved = decode_metadata(saved_meta).get("data") or {}
    given = decode_metadata(metadata).get("data") or {}
    return all(saved.get(key) is None or saved.get(key) == given.get(key) for key in _DATA_COPY_CHECKS)


def moved_data_root(state: dict, metadata: dict[str, str]) -> tuple[str, str] | None:
    """``(saved_root, root)`` when a resume reads the run's data from another ``--root``."""
    saved_meta = state.get("metadata") or {}
    if not saved_meta or not metadata:
        return None
    saved = (decode_metadata(saved_meta).get("data") or {}).get("root")
    given = (decode_metadata(metadata).get("data") or {}).get("root")
    if saved is None or given is None or Path(saved).resolve() == Path(given).resolve():
        return None
    return saved, given


def _check_weights_fit(model: nn.Module, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    expected = model.state_dict()
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & weights.keys() if expected[k].shape != weights[k].shape)
    if missing or unexpected or reshaped:
        counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} reshaped tensors"
        first = (missing or unexpected or reshaped)[0]
        raise ValueError(
            f"cannot resume {source}: its weights belong to another network ({counts}, e.g. {first}); "
            f"resume with the model flags of that run, or train into another --out"
        )


def restore_state(
    state: dict, parts: TrainingParts, *, rank: int = 0, world_size: int = 1, source: str | Path = STATE_FILE
) -> Progress:
    """Load a ``capture_state`` dict into ``parts`` and this process's random generators.

    Check the settings first with ``resume_differences``. A state saved by another number of
    processes restores rank 0's generators everywhere (the run continues, not bit for bit).
    ``source`` names the state in error messages (its file).

    Returns:
        The saved ``Progress``.

    Raises:
        ValueError: the saved weights do not fit ``parts.model`` (nothing is loaded then).
    """
    _check_weights_fit(parts.model, state["model"], source)
    _check_same_frozen(parts.model, state.get("frozen"), source)
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when saved without fp16 scaling: --amp may change on resume
        parts.scaler.load_state_dict(state["scaler"])
    rng_states = state["rng"]
    set_rng_state(rng_states[rank] if len(rng_states) == world_size else rng_states[0])
    return Progress(
        epoch=state["epoch"],
        history=list(state["history"]),
        best_score=state["best_score"],
        best_epoch=state["best_epoch"],
    )


def frozen_parameters(model: nn.Module) -> list[str]:
    """The names of ``model``'s parameters that do not require grad (frozen for fine-tuning)."""
    return [name for name, param in model.named_parameters() if not param.requires_grad]


def _check_same_frozen(model: nn.Module, saved: list[str] | None, source: str | Path) -> None:
    """Refuse to resume a run whose frozen parameters differ from the model's now: resumed without
    freezing them again, the frozen encoder of a fine-tune trained on, without a word."""
    if saved is None:  # a state saved before this was recorded
        return
    now = frozen_parameters(model)
    if set(saved) == set(now):
        return
    unfrozen, newly = [n for n in saved if n not in now], [n for n in now if n not in saved]
    parts = []
    if unfrozen:
        parts.append(f"{len(unfrozen)} frozen in the run require grad now ({', '.join(unfrozen[:4])}"
                     f"{', ...' if len(unfrozen) > 4 else ''})")
    if newly:
        parts.append(f"{len(newly)} trained in the run are frozen now ({', '.join(newly[:4])}"
                     f"{', ...' if len(newly) > 4 else ''})")
    raise ValueError(f"cannot resume from {source}: the model's frozen parameters differ from the run's: "
                     f"{'; '.join(parts)}; freeze (requires_grad_(False)) exactly what the run froze, "
                     f"then resume")


def save_training_state(path: str | Path, state: dict) -> None:
    """Write a ``capture_state`` dict to ``path`` atomically (the previous file survives a failure).

    Raises:
        OSError: the file could not be written (full disk, read-only folder); names ``path``.
    """
    with naming_errors(path), atomic_write(path) as f:
        try:
            torch.save(state, f)
        except RuntimeError as err:
            # A failed write inside torch's zip writer (a full disk) surfaces as its RuntimeError
            # ("unexpected pos ..."), with the write's OSError only as the context: report that.
            cause = _os_error_behind(err)
            if cause is None:
                raise
            raise cause from err


def _os_error_behind(err: BaseException) -> OSError | None:
    """The first ``OSError`` in ``err``'s chain of context, or ``None``."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def load_training_state(path: str | Path) -> dict:
    """Read a state written by ``save_training_state`` with ``weights_only=True``.

    Raises:
        ValueError: the file is not a cmrf training state (or is damaged).
    """
    from cmrf.checkpoint import check_not_a_zip_bomb

    path = Path(path)
    check_not_a_zip_bomb(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        from cmrf.checkpoint import load_error_detail

        # States are written atomically, so a damaged one was damaged afterwards (a disk error, a
        # partial copy): say what is still usable beside it.
        weights = [name for name in ("best.safetensors", "last.safetensors")
                   if (path.parent / name).is_file()]
        kept = (f"; {' and '.join(weights)} beside it are separate files, usable as they are" if weights
                else "")
        raise ValueError(f"cannot read training state {path}: damaged or not a torch file "
                         f"({load_error_detail(err)}){kept}; --overwrite starts the run afresh") from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a cmrf training state (expected format {STATE_FORMAT!r})")
    return state
