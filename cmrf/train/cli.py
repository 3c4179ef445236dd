"""The ``cmrf train``, ``cmrf evaluate``, ``cmrf predict`` and ``cmrf demo`` commands."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from cmrf.train.loop import AMP_CHOICES, Recipe

# The demo: TinyU-Net at full width on small synthetic lesion images, on the CPU, in about two
# to three minutes on two cores. It departs from the paper's recipe to fit that budget: 64x64
# images instead of 256x256, 160 training images, 8 epochs instead of 300, and lr 3e-3 instead of
# 1e-4 (a short run needs larger steps; the cosine schedule still ends at 1e-6). Augmentation is on
# for the first 60% of the epochs, as in the paper.
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


# --- arguments ----------------------------------------------------------------------------------


def _add_data_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """``cmrf.train.data.add_data_arguments``; returns the destinations it added."""
    from cmrf.train.data import add_data_arguments

    before = {action.dest for action in parser._actions}
    add_data_arguments(parser)
    return [action.dest for action in parser._actions if action.dest not in before]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model --N --channels --replace-blocks``: which network to train."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default="tinyunet", help="registry name (default tinyunet; tinyunet3d for 3D data)"
    )
    group.add_argument(
        "--N", dest="N", type=int, default=None, help="receptive fields per CMRF (default: the model's)"
    )
    group.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=None,
        metavar="C",
        help="encoder widths, each a multiple of 2N (16 for the default N=8), e.g. 16 32 for a tiny "
        "TinyU-Net (default: the model's)",
    )
    group.add_argument(
        "--replace-blocks",
        action="store_true",
        help="swap the model's blocks for CMRF with cmrf.replace_blocks (N from --N, default 8)",
    )


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``Recipe`` field; defaults are the paper's recipe."""
    d = Recipe()
    group = parser.add_argument_group("recipe (defaults: the paper's)")
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
    add_runtime_arguments(parser, seed_default=d.seed)


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


def add_runtime_arguments(parser: argparse.ArgumentParser, seed_default: int | None = 0) -> None:
    """``--device --workers --threads --seed``."""
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads of PyTorch (default 0: PyTorch's default; -1: only the cores not busy already)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (default: CUDA if available), cpu, cuda, cuda:N"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader worker processes (default %(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=seed_default,
        help="seed of data, initialisation, shuffling, augmentation"
        + (f" (default {seed_default})" if seed_default is not None else " (default: the run's)"),
    )


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
    )


# --- models -------------------------------------------------------------------------------------


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


def _jsonable(value):
    return str(value) if isinstance(value, Path) else value


# --- train / demo -------------------------------------------------------------------------------


def build_train(parser: argparse.ArgumentParser):
    data_dests = _add_data_arguments(parser)
    add_model_arguments(parser)
    add_recipe_arguments(parser)
    parser.add_argument("--out", default="runs/cmrf", help="run directory (default %(default)s)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out exactly where it stopped"
    )
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG figures")
    parser.set_defaults(data_dests=data_dests)
    return run_train


def run_train(args: argparse.Namespace) -> int:
    with torch_threads(args.threads):
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    from cmrf.train.data import build_datasets
    from cmrf.train.loop import fit
    from cmrf.train.metrics import format_table

    recipe = recipe_from_args(args)  # checks the recipe before any data is read
    bundle = build_datasets(args, seed=args.seed)
    model_kwargs = {k: v for k, v in (("N", args.N), ("channels", args.channels)) if v is not None}
    replace_n = (args.N or 8) if args.replace_blocks else None
    if replace_n is not None:
        model_kwargs.pop("N", None)  # --N then configures the swapped-in CMRFs
    from cmrf.train.loop import seed_everything

    seed_everything(args.seed)  # the initial weights are part of a seeded run
    model, name = build_model(
        args.model,
        bundle.in_channels,
        bundle.num_classes,
        bundle.spatial_dims,
        model_kwargs,
        replace_n,
        args.img_size,
        report=int(os.environ.get("RANK", "0")) == 0,
    )
    from cmrf.train.state import model_metadata

    data = {dest: _jsonable(getattr(args, dest)) for dest in args.data_dests}
    data.update(seed=args.seed, spatial_dims=bundle.spatial_dims)
    metadata = model_metadata(
        name, model_kwargs, bundle.in_channels, bundle.num_classes, bundle.class_names, replace_n, data
    )
    started = time.perf_counter()
    result = fit(model, bundle, args.out, recipe, resume=args.resume, metadata=metadata, plots=args.plots)
    minutes = (time.perf_counter() - started) / 60
    if int(os.environ.get("RANK", "0")) == 0:
        title = f"{result['split']} split, best epoch {result['best_epoch']} (by validation mIoU)"
        print(format_table(result, title))
        print(f"wrote {args.out}/metrics.json, best/last.safetensors, figures ({minutes:.1f} min)")
    return 0


def build_demo(parser: argparse.ArgumentParser):
    run = build_train(parser)
    parser.set_defaults(**DEMO_DEFAULTS)
    parser.description = (
        "Train TinyU-Net on synthetic lesion images on the CPU (no download), evaluate it on held-out "
        "images and write metrics.json, checkpoints, training curve and overlays to --out. Any train "
        "flag can override the demo's settings: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_DEFAULTS.items() if k != "out")
        + "."
    )
    return _demo(run)


def _demo(run_train_fn):
    def run_demo(args: argparse.Namespace) -> int:
        started = time.perf_counter()
        status = run_train_fn(args)
        metrics = json.loads((Path(args.out) / "metrics.json").read_text())
        foreground = [v["iou"] for k, v in metrics["per_class"].items() if k != "background"]
        print(
            f"demo done in {time.perf_counter() - started:.0f} s: foreground IoU "
            f"{min(foreground):.3f}; open {args.out}/overlays.png and {args.out}/training_curve.png"
        )
        return status

    return run_demo


# --- evaluate -----------------------------------------------------------------------------------


def _data_arguments_from_checkpoint(parser: argparse.ArgumentParser) -> None:
    """Data flags whose defaults come from the checkpoint's run (then from the data module)."""
    data_dests = _add_data_arguments(parser)
    defaults = {dest: parser.get_default(dest) for dest in data_dests}
    parser.set_defaults(**{dest: None for dest in data_dests}, data_defaults=defaults)


def _fill_from_run(args: argparse.Namespace, run_data: dict) -> None:
    for dest, default in args.data_defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, run_data.get(dest, default))
    if args.seed is None:
        args.seed = run_data.get("seed", 0)


def build_evaluate(parser: argparse.ArgumentParser):
    parser.add_argument("checkpoint", help="best.safetensors or last.safetensors written by cmrf train")
    parser.add_argument(
        "--split", choices=("test", "val", "train"), default="test", help="split (default test)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    parser.add_argument(
        "--json", dest="json_out", default=None, metavar="FILE", help="also write the scores as JSON"
    )
    add_runtime_arguments(parser, seed_default=None)
    _data_arguments_from_checkpoint(parser)
    parser.epilog = "Data flags default to the ones the checkpoint was trained with."
    return run_evaluate


def run_evaluate(args: argparse.Namespace) -> int:
    with torch_threads(args.threads):
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from cmrf.train.data import build_datasets
    from cmrf.train.loop import Processes, eval_loader, evaluate_model, resolve_device
    from cmrf.train.metrics import format_table
    from cmrf.train.state import atomic_write_json

    model, meta = model_from_checkpoint(args.checkpoint)
    _fill_from_run(args, meta.get("data", {}))
    bundle = build_datasets(args, seed=args.seed)
    if bundle.num_classes != meta["num_classes"] or bundle.in_channels != meta["in_chans"]:
        raise ValueError(
            f"{args.checkpoint} was trained for {meta['in_chans']} channels and {meta['num_classes']} "
            f"classes, the data has {bundle.in_channels} channels and {bundle.num_classes} classes"
        )
    dataset = getattr(bundle, args.split)
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"the {args.split} split is empty; choose another with --split")
    device = resolve_device(args.device)
    loader = eval_loader(dataset, args.batch_size, args.workers, Processes())
    scores = evaluate_model(model.to(device), loader, bundle.num_classes, list(bundle.class_names), device)
    scores = {**scores, "split": args.split, "images": len(dataset), "checkpoint": str(args.checkpoint)}
    print(format_table(scores, f"{args.split} split ({len(dataset)} images), {args.checkpoint}"))
    if args.json_out:
        atomic_write_json(scores, args.json_out)
    return 0


# --- predict ------------------------------------------------------------------------------------


def _image_files(inputs: list[str]) -> list[Path]:
    from cmrf.train.data import IMAGE_SUFFIXES

    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {item}")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"no such image file or folder: {item}")
    return files


def _image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, read from its header."""
    from PIL import Image

    with Image.open(path) as image:
        return image.height, image.width


def build_predict(parser: argparse.ArgumentParser):
    parser.add_argument("checkpoint", help="best.safetensors or last.safetensors written by cmrf train")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--out", required=True, help="folder for NAME_mask.png and NAME_overlay.png")
    parser.add_argument("--img-size", type=int, default=None, help="network input side (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--no-overlays", dest="overlays", action="store_false", help="write only the masks")
    return run_predict


@torch.no_grad()
def run_predict(args: argparse.Namespace) -> int:
    from cmrf.train.data import denormalize, load_image, save_mask_png
    from cmrf.train.loop import resolve_device
    from cmrf.train.plots import plot_overlays

    model, meta = model_from_checkpoint(args.checkpoint)
    img_size = args.img_size or meta.get("data", {}).get("img_size") or 256
    files = _image_files(args.inputs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    model.to(device)
    for path in files:
        image = load_image(path, img_size, meta["in_chans"])
        prediction = model(image[None].to(device)).argmax(dim=1)[0].cpu()
        # The mask file matches the input image's size; the overlay shows what the network saw.
        save_mask_png(prediction, out / f"{path.stem}_mask.png", meta["num_classes"], _image_size(path))
        if args.overlays:
            plot_overlays(
                denormalize(image)[None],
                None,
                prediction[None],
                out / f"{path.stem}_overlay.png",
                titles=[path.name],
            )
    print(f"wrote {len(files)} mask(s){' and overlays' if args.overlays else ''} to {out}")
    return 0
