"""``cmrf train`` and ``cmrf demo``."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from cmrf.cli.common import (
    TRAIN_PACKAGES,
    add_model_arguments,
    add_runtime_arguments,
    require_extra,
    user_path,
)
from cmrf.cli.data_args import add_data_arguments, data_options
from cmrf.train.processes import is_main_process, resolve_device
from cmrf.train.recipe import AMP_CHOICES, Recipe
from cmrf.train.run_folder import RunFiles, check_run_folder
from cmrf.train.setup import build_model, resolve_model_choice, torch_threads

# The demo: TinyU-Net at full width on small synthetic lesion images, on the CPU, in about two
# to three minutes on two cores. It departs from the paper's recipe to fit that budget: 64x64
# images instead of 256x256, 160 training images, 8 epochs instead of 300, and lr 3e-3 instead of
# 1e-4 (a short run needs larger steps; the cosine schedule still ends at 1e-6). Augmentation is on
# for the first 60% of the epochs, as in the paper. Re-running the demo into the same --out replaces
# the earlier demo run there (and nothing else: a folder holding another run is refused).
DEMO_DEFAULTS = {
    "out": "cmrf-demo",
    "device": "cpu",
    "img_size": 64,
    "synthetic_samples": 160,
    "epochs": 8,
    "lr": 3e-3,
    "batch_size": 8,
    "threads": -1,
}


RECIPE_GROUP = "recipe (defaults: the paper's)"


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``Recipe`` field; defaults are the paper's recipe."""
    d = Recipe()
    group = parser.add_argument_group(RECIPE_GROUP)
    group.add_argument("--epochs", type=int, default=d.epochs, help="training epochs (default %(default)s)")
    group.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="images per step and process (default %(default)s; not stated in the paper)",
    )
    group.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default %(default)g)")
    group.add_argument(
        "--min-lr", type=float, default=d.min_lr, help="end of the cosine schedule (default %(default)g)"
    )
    group.add_argument(
        "--betas",
        type=float,
        nargs=2,
        default=list(d.betas),
        metavar=("B1", "B2"),
        help="Adam betas (default 0.9 0.999)",
    )
    group.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help="Adam weight decay (default 0)"
    )
    group.add_argument(
        "--aug-stop",
        type=int,
        default=None,
        help="augment during epochs 1..AUG_STOP only (default 60%% of --epochs, 180 of 300)",
    )
    group.add_argument(
        "--ce-weight", type=float, default=d.ce_weight, help="cross-entropy weight (default 1)"
    )
    group.add_argument(
        "--dice-weight", type=float, default=d.dice_weight, help="Dice loss weight (default 1)"
    )
    group.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default=d.amp,
        help="mixed precision on GPU (default auto: bf16 if supported, else fp16); CPU is float32",
    )
    group.add_argument(
        "--overlays", type=int, default=d.overlays, help="test images in overlays.png (default 4)"
    )
    group.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        metavar="BACKEND",
        help="torch.compile the model (opt-in; backend inductor unless named, e.g. aot_eager); compiling "
        "costs time before the first steps and pays off on long GPU runs",
    )
    add_runtime_arguments(parser, seed_default=d.seed)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    return Recipe(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.min_lr,
        betas=tuple(args.betas),
        weight_decay=args.weight_decay,
        aug_stop=args.aug_stop,
        ce_weight=args.ce_weight,
        dice_weight=args.dice_weight,
        amp=args.amp,
        workers=args.workers,
        seed=args.seed,
        device=args.device,
        overlays=args.overlays,
        compile=args.compile,
    )


def _jsonable(value):
    return str(value) if isinstance(value, Path) else value


def build_train(parser: argparse.ArgumentParser):
    add_data_arguments(parser)
    add_model_arguments(parser)
    add_recipe_arguments(parser)
    parser.add_argument(
        "--out",
        type=user_path,
        default="runs/cmrf",
        help="run folder (default %(default)s); one that holds another run is refused unless --resume "
        "or --overwrite",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out exactly where it stopped"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the files of the run already in --out (and only those) before training",
    )
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG figures")
    parser.add_argument(
        "--init", type=user_path, default=None, metavar="FILE",
        help="fine-tune: start from the weights in FILE (a checkpoint of cmrf train, a save_weights file "
        "or a reference-code state dict) instead of a random initialisation; a classifier for other "
        "classes starts afresh and a first layer for other input channels is adapted, everything else "
        "must fit (give the file's --channels/--N)",
    )
    parser.set_defaults(run_kind="train")
    return run_train


def run_train(args: argparse.Namespace) -> int:
    require_extra(TRAIN_PACKAGES, f"cmrf {args.run_kind}", "train")
    with torch_threads(args.threads):
        return _train(args)


def _model_kwargs(args: argparse.Namespace) -> tuple[dict, int | None]:
    """The model's constructor arguments and the ``N`` of ``--replace-blocks`` (or ``None``)."""
    model_kwargs = {k: v for k, v in (("N", args.N), ("channels", args.channels)) if v is not None}
    replace_n = (args.N or 8) if args.replace_blocks else None
    if replace_n is not None:
        model_kwargs.pop("N", None)  # --N then configures the swapped-in CMRFs
    return model_kwargs, replace_n


def _data_metadata(args: argparse.Namespace, bundle) -> dict:
    """The run's data options (``data_options``), seed, resolved image size and (file data) the
    fingerprint of its splits' files, for the metadata."""
    from cmrf.data import split_file_sizes, split_fingerprint

    data = {key: _jsonable(value) for key, value in data_options(args).items()}
    if data.get("img_size") is None:  # the data's default: record the size the run used
        data["img_size"] = int(bundle.train[0][0].shape[-1])
    data.update(seed=args.seed, spatial_dims=bundle.spatial_dims)
    fingerprint = split_fingerprint(bundle)
    if fingerprint is not None:  # which files each split holds: a resume must see the same
        data["split_files"] = fingerprint
        # and their sizes, which tell a copy of them at another --root from other data so named
        data["split_sizes"] = split_file_sizes(bundle)
    return data


def _start_from(model, path, resuming: bool, built: tuple[str, dict]) -> dict:
    """Load ``--init``'s weights into ``model`` (``load_pretrained_weights``) and say what was not
    loaded as it is, unless ``resuming`` a run whose state holds the weights since; the file (as
    found) and its SHA-256 for the run's metadata, which ``--resume`` compares by content.
    ``built`` is the model's ``(name, constructor arguments)``: a file of another model is refused
    with the options that build the file's model, where the file or its shapes say them."""
    import hashlib

    from cmrf.models._builder import load_pretrained_weights

    if not resuming:
        try:
            notes = load_pretrained_weights(model, path)
        except ValueError as err:
            options = _options_building(path, built)
            if options:
                raise ValueError(f"{err} | the file holds the model of: cmrf train {options}") from None
            raise
        if is_main_process():
            print(f"starting from {path}" + (f": {'; '.join(notes)}" if notes else ""))
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(2**20), b""):
            digest.update(chunk)
    return {"file": str(Path(path).resolve()), "sha256": digest.hexdigest()}


def _options_building(path, built: tuple[str, dict]) -> str | None:
    """The ``--model``/``--channels``/``--N`` options that build the model of the weights in
    ``path``, as recorded in the file (``save_weights``, ``cmrf train``) or, for a TinyUNet, read
    from its shapes; ``None`` where neither says or they are the options ``built`` already has."""
    from cmrf.checkpoint import read_state_dict, recorded_create_call, training_create_call
    from cmrf.models.tinyunet import tinyunet_arguments

    call = recorded_create_call(path) or training_create_call(path)
    if call is None:
        try:
            kwargs = tinyunet_arguments(read_state_dict(path))
        except (OSError, ValueError):
            return None
        call = None if kwargs is None else (None, kwargs)
    if call is None:
        return None
    name, kwargs = call
    options = [] if name in (None, built[0]) else ["--model", name]
    if kwargs.get("channels") is not None:
        options += ["--channels", *map(str, kwargs["channels"])]
    if kwargs.get("N") is not None:
        options += ["--N", str(kwargs["N"])]
    mine = {key: list(value) if key == "channels" else value for key, value in built[1].items()}
    same = name in (None, built[0]) and all(mine.get(key) == kwargs.get(key) for key in ("N", "channels")
                                            if kwargs.get(key) is not None)
    return None if same or not options else " ".join(options)


def _check_out_is_not_a_data_folder(args: argparse.Namespace) -> None:
    """A run folder that is the data's image or mask folder puts the run's figures among the samples:
    the next read of the data (a resume, an evaluation, any new run on it) fails to pair them."""
    from cmrf.data.factory import data_file_folders

    out = Path(args.out).resolve()
    for folder in data_file_folders(args.data, args.root):
        if folder.resolve() == out:
            raise ValueError(f"--out {args.out} is the data's folder {folder}: the run's files would be "
                             f"written among the samples and read as data next time; choose another --out")


def _train(args: argparse.Namespace) -> int:
    from cmrf.data import build_datasets
    from cmrf.train.loop import fit
    from cmrf.train.metrics import format_table
    from cmrf.train.processes import seed_everything
    from cmrf.train.state import model_metadata

    recipe = recipe_from_args(args)  # checks the recipe before any data is read
    _check_out_is_not_a_data_folder(args)
    check_run_folder(args.out, resume=args.resume, overwrite=args.overwrite)  # before reading data, too
    resolve_model_choice(args.model, args.spatial_dims, replace_blocks=args.replace_blocks)  # and this
    resolve_device(recipe.device, int(os.environ.get("LOCAL_RANK", "0") or 0))  # and CUDA's presence
    bundle = build_datasets(seed=args.seed, **data_options(args))
    data = _data_metadata(args, bundle)
    model_kwargs, replace_n = _model_kwargs(args)
    seed_everything(args.seed)  # the initial weights are part of a seeded run
    model, name = build_model(
        args.model,
        bundle.in_channels,
        bundle.num_classes,
        bundle.spatial_dims,
        model_kwargs,
        replace_n,
        data["img_size"],  # --replace-blocks probes the model with an input of this size
        report=is_main_process(),
        new_run=True,
    )
    resuming = args.resume and RunFiles(Path(args.out)).state.is_file()
    extra = {"init": _start_from(model, args.init, resuming, (name, model_kwargs))} \
        if getattr(args, "init", None) else {}
    metadata = model_metadata(
        name,
        model_kwargs,
        bundle.in_channels,
        bundle.num_classes,
        bundle.class_names,
        replace_n,
        data,
        command=args.run_kind,
        **extra,
    )
    started = time.perf_counter()
    result = fit(
        model,
        bundle,
        args.out,
        recipe,
        resume=args.resume,
        overwrite=args.overwrite,
        metadata=metadata,
        plots=args.plots,
    )
    minutes = (time.perf_counter() - started) / 60
    if is_main_process():
        title = f"{result['split']} split, best epoch {result['best_epoch']} (by validation mIoU)"
        print(format_table(result, title))
        # What the folder holds, not what this call wrote: a resumed finished run rewrites only the
        # scores, and a figure may be off (--no-plots, --overlays 0) or have failed to draw.
        names = ", ".join(path.name for path in RunFiles(Path(args.out)).existing())
        # The CPU thread count changes the float rounding, so a run is repeatable only with the same
        # count: --threads -1 picks it from the load, so say what it picked.
        threads = torch.get_num_threads()
        on_cpu = resolve_device(recipe.device).type == "cpu"
        where = f", {threads} CPU thread{'s' if threads > 1 else ''}" if on_cpu else ""
        print(f"{args.out} holds {names} ({minutes:.1f} min{where})")
    return 0


def build_demo(parser: argparse.ArgumentParser):
    run = build_train(parser)
    parser.set_defaults(**DEMO_DEFAULTS, run_kind="demo")
    for action in parser._actions:  # fixed help texts state train's defaults: add the demo's
        if action.dest in DEMO_DEFAULTS and action.help and "%(default)" not in action.help:
            action.help = f"{action.help} [cmrf demo: {DEMO_DEFAULTS[action.dest]}]"
    for group in parser._action_groups:
        if group.title == RECIPE_GROUP:
            group.title = "recipe (defaults: the demo's; the paper's are 300 epochs at lr 1e-4)"
    parser.description = (
        "Train TinyU-Net on synthetic lesion images on the CPU (no download), evaluate it on held-out "
        "images and write metrics.json, checkpoints, training curve and overlays to --out. Any train "
        "flag can override the demo's settings: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_DEFAULTS.items() if k != "out")
        + ". Re-running it into the same --out replaces the earlier demo run there; a folder that holds "
        "any other run is refused."
    )
    return _demo(run)


def _replaces_earlier_demo(out: str | Path) -> bool:
    """True when ``out`` holds a finished run made by ``cmrf demo`` (its metadata says so, and its
    ``metrics.json`` is there). An unfinished one is left to the usual choice, ``--resume`` or
    ``--overwrite``: replacing it would throw away the epochs a stopped demo has trained."""
    from cmrf.train.state import saved_run_metadata

    files = RunFiles(Path(out))
    if not files.existing() or not files.metrics.is_file():
        return False
    meta = saved_run_metadata(files) or {}
    return meta.get("command") == "demo"


def _quiet(*args, **kwargs) -> None:
    pass


def _demo(run_train_fn):
    def run_demo(args: argparse.Namespace) -> int:
        started = time.perf_counter()
        say = print if is_main_process() else _quiet  # once under torchrun
        if not (args.resume or args.overwrite) and _replaces_earlier_demo(args.out):
            say(f"replacing the earlier demo run in {args.out}")
            args.overwrite = True
        status = run_train_fn(args)
        metrics = json.loads((Path(args.out) / "metrics.json").read_text())
        # The weakest class other than the first (background), by the name the table gives it.
        weakest = min(list(metrics["per_class"].items())[1:], key=lambda item: item[1]["iou"])
        # The figures in the folder: off by flags, or not drawn (no matplotlib, a failed drawing).
        shown = [name for name in ("overlays.png", "training_curve.png") if (Path(args.out) / name).is_file()]
        figures = f"; open {' and '.join(f'{args.out}/{name}' for name in shown)}" if shown else ""
        seconds = time.perf_counter() - started
        say(f"demo done in {seconds:.0f} s: {weakest[0]} IoU {weakest[1]['iou']:.3f}{figures}")
        return status

    return run_demo
