"""``cmrf evaluate``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from cmrf.cli.common import (
    EVALUATE_PACKAGES,
    add_runtime_arguments,
    check_output_file,
    check_replaces_only,
    folders_made_for,
    positive_int,
    require_extra,
    user_path,
)
from cmrf.cli.data_args import add_data_arguments, data_options
from cmrf.cli.model_args import (
    add_checkpoint_model_arguments,
    add_optimize_argument,
    checkpoint_model_options,
    inference_device,
    inference_model,
)
from cmrf.train.setup import model_from_checkpoint, torch_threads

_DATA_HELP = (
    "Each flag not given takes the value the checkpoint's run was trained with (cmrf train records "
    "them; for another --data or --root, not the run's --split-dir and mask options, unless that "
    "root holds the run's files, moved); the defaults "
    "named below apply only to a bare state dict and to values a run did not record."
)


def _data_arguments_from_checkpoint(parser: argparse.ArgumentParser) -> None:
    """Data flags whose defaults come from the checkpoint's run (then from the data module)."""
    data_dests = add_data_arguments(parser, _DATA_HELP)
    channels = next(action for action in parser._actions if action.dest == "in_chans")
    channels.help = ("input channels of the model, and of 2D image files (isic2018, folder): 1 reads "
                     "them grey, 3 as RGB (default: the checkpoint's; a bare state dict's first layer's)")
    defaults = {dest: parser.get_default(dest) for dest in data_dests}
    parser.set_defaults(**{dest: None for dest in data_dests}, data_defaults=defaults)


# Options that describe one dataset's files: another dataset (another --data or --root) has its own
# split lists and mask encoding, so the run's do not carry over to it.
_SITE_OPTIONS = ("split_dir", "mask_values", "mask_threshold")
# Options of this machine, not of the run: a checkpoint's are never taken.
_STORAGE_OPTIONS = ("cache", "cache_dir")


def _other_data(args: argparse.Namespace, run_data: dict) -> bool:
    """Whether ``--data``/``--root`` name another dataset than the run's."""
    if args.data is not None and args.data != run_data.get("data", "synthetic"):
        return True
    run_root = run_data.get("root")
    if args.root is None:
        return False
    return run_root is None or Path(args.root).resolve() != Path(run_root).resolve()


def _run_split_dir_at(run_data: dict, root: str | os.PathLike) -> Path | None:
    """The run's split lists as they stand now, for its data copied to ``root``: the same place
    inside ``root`` if the lists were inside the run's root (moved along), else where the run read
    them; ``None`` if neither exists."""
    lists = Path(run_data["split_dir"])
    run_root = run_data.get("root")
    if run_root is not None:
        with contextlib.suppress(ValueError):
            moved = Path(root) / lists.resolve().relative_to(Path(run_root).resolve())
            if moved.is_dir():
                return moved
    return lists if lists.is_dir() else None


def _build_evaluation_data(args: argparse.Namespace, run_data: dict, given: set[str]):
    """The datasets to score, and the data options they were read with. Another ``--root`` may be
    a copy of the run's data (moved, or on another machine): when the run's file options read it
    into the splits the run recorded, it is the run's data, and keeps them; a fresh split of it would
    score training images. Otherwise it is other data, split afresh, and the user is told when split
    lists stand where the run kept its own (an edited or broken copy of them, or another site's)."""
    from cmrf.data import DataError, build_datasets, split_file_sizes, split_fingerprint

    options = data_options(args)
    saved = run_data.get("split_files")
    site = {key: run_data[key] for key in _SITE_OPTIONS if key not in given and run_data.get(key) is not None}
    if saved is None or not site or args.data != run_data.get("data") or not _other_data(args, run_data):
        return build_datasets(seed=args.seed, **options), options
    lists = None
    if "split_dir" in site:
        lists = _run_split_dir_at(run_data, args.root)
        if lists is None:
            print(f"warning: the run's split lists, {site['split_dir']}, are gone, so {args.root} is "
                  f"split afresh; if it is a copy of the run's data, its {args.split} split may hold "
                  f"training images: give the lists with --split-dir", file=sys.stderr)
            return build_datasets(seed=args.seed, **options), options
        site["split_dir"] = lists
    with_site = {**options, **site}
    try:
        bundle = build_datasets(seed=args.seed, **with_site)
    except DataError as error:  # not the run's files: other data, below
        why = f"reading them failed: {error}"
    else:
        sizes = run_data.get("split_sizes")  # None in runs saved before sizes were recorded
        now = split_fingerprint(bundle)
        if now == saved and sizes in (None, split_file_sizes(bundle)):
            moved = f", with the run's split lists {lists}" if lists is not None else ""
            print(f"note: {args.root} holds the files of the run's splits, so it is scored as the run's "
                  f"data{moved}", file=sys.stderr)
            return bundle, with_site
        why = (f"they give {now}, the run's splits were {saved}" if now != saved
               else "its files are not the run's (other sizes)")
    if lists is not None and _inside(lists, args.root):
        print(f"warning: {args.root} has split lists, {lists}, where the run kept its own, but they do "
              f"not read it into the run's splits ({why}); it is scored as other data, split afresh: if it "
              f"is a copy of the run's data, its {args.split} split may hold training images; fix the "
              f"lists, or give lists with --split-dir", file=sys.stderr)
    return build_datasets(seed=args.seed, **options), options


def _inside(path: Path, root: str | os.PathLike) -> bool:
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def _fill_from_run(args: argparse.Namespace, run_data: dict) -> None:
    """Data flags not given take the run's values, except those the data does not read (a run
    saved before such flags were refused may hold them: they were ignored then too), and, for
    another dataset than the run's, those that describe the run's files (``_SITE_OPTIONS``)."""
    from cmrf.data.factory import unread_options

    missing = [dest for dest in args.data_defaults if getattr(args, dest) is None]
    # Where decoded samples are kept is this machine's choice, never a checkpoint's: a file from
    # elsewhere could otherwise make evaluate write gigabytes into any folder its metadata names.
    not_inherited = _STORAGE_OPTIONS + (_SITE_OPTIONS if _other_data(args, run_data) else ())
    for dest in missing:
        default = args.data_defaults[dest]
        setattr(args, dest, default if dest in not_inherited else run_data.get(dest, default))
    unread = unread_options(args.data)
    for dest in missing:
        if dest in unread:
            setattr(args, dest, args.data_defaults[dest])
    if args.seed is None:
        args.seed = run_data.get("seed", 0)


def _read_channels_of_model(args: argparse.Namespace, meta: dict) -> None:
    """2D image files are read with the model's input channels (grey for a 1-channel model);
    ``model_from_checkpoint`` has refused an ``--in-chans`` that is not the model's. Other data
    has channels of its own, and a model of other channels fails the check after building it."""
    from cmrf.data.factory import IMAGE_CHANNELS, reads_in_chans

    reads = reads_in_chans(args.data, args.spatial_dims) and meta["in_chans"] in IMAGE_CHANNELS
    args.in_chans = meta["in_chans"] if reads else None


def _check_same_splits(args: argparse.Namespace, run_data: dict, bundle) -> None:
    """With the run's own data options, the splits must hold the files they held in training:
    files added to or removed from a fraction split (or another --seed) move training images
    into the test split, and its scores would flatter the model."""
    from cmrf.data import DATA_OPTIONS, split_fingerprint

    saved = run_data.get("split_files")
    if saved is None:
        return
    options = data_options(args)

    def plain(value):  # the metadata holds paths as text
        return str(value) if isinstance(value, os.PathLike) else value

    def run_value(key):
        return plain(run_data.get(key, DATA_OPTIONS[key]))

    # Other files, or split lists of the user's own, are other data, scored as given; other
    # fractions or another seed re-split the run's files, mixing its training images into the test.
    same_data = all(plain(options[key]) == run_value(key) for key in ("data", "root", "split_dir"))
    now = split_fingerprint(bundle)
    if not same_data or now == saved:
        return
    run_seed = run_data.get("seed", 0)
    resplit = [f"--{key.replace('_', '-')} {options[key]}, the run's was {run_value(key)}"
               for key in ("val_fraction", "test_fraction") if options[key] != run_value(key)]
    if args.seed != run_seed:
        resplit.append(f"--seed {args.seed}, the run's was {run_seed}")
    if resplit:
        flags = " and ".join(part.split()[0] for part in resplit)
        cause, advice = "; ".join(resplit), f"leave {flags} out"
    else:
        cause, advice = "files added or removed", "restore the files, or give the splits with --split-dir"
    raise ValueError(
        f"the data's splits differ from those {args.checkpoint} was trained with ({cause}): they held "
        f"{saved}, now {now}, so the {args.split} split may hold training images; {advice}"
    )


def _check_not_a_runs_metrics(path: Path) -> None:
    """Refuse to replace a training run's ``metrics.json`` (its per-epoch history and best epoch,
    which only training the run again would give back) with an evaluation's scores."""
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable or not JSON: nothing of a run's to lose
        return
    if isinstance(held, dict) and "history" in held and "best_epoch" in held:
        raise ValueError(f"--json {path} holds the training run's metrics (its history and best epoch), "
                         f"which this evaluation would replace; write it to another file, e.g. "
                         f"{path.with_name('evaluation.json')}")


def build(parser: argparse.ArgumentParser):
    parser.add_argument("checkpoint", type=user_path,
                        help="best.safetensors or last.safetensors written by cmrf train, or a state dict "
                             "such as the reference code's .pth (with --model)")
    parser.add_argument(
        "--split", choices=("test", "val", "train"), default="test", help="split (default test)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per step (default 8)")
    parser.add_argument(
        "--json", dest="json_out", type=user_path, default=None, metavar="FILE",
        help="also write the scores as JSON"
    )
    add_runtime_arguments(parser, seed_default=None)
    _data_arguments_from_checkpoint(parser)
    # --num-classes and --in-chans are the data flags', which serve the model too
    add_checkpoint_model_arguments(parser, num_classes=False, in_chans=False)
    add_optimize_argument(parser, "scores")
    parser.epilog = (
        "Data flags default to the ones the checkpoint was trained with. A bare state dict (e.g. a "
        "reference-code .pth) needs --model and the data flags; --num-classes and --in-chans are read "
        "from its layers when not given."
    )
    return run_evaluate


def _scored_data(options: dict, seed: int) -> dict:
    """The data options and seed the scores were computed with, for the JSON (paths as text)."""
    options = {key: str(value) if isinstance(value, os.PathLike) else value for key, value in options.items()}
    return {**options, "seed": seed}


def _class_names(checkpoint, meta: dict, data_names: list[str]) -> list[str]:
    """The names of the table's rows: the data's, or the checkpoint's run's where the data only
    numbers its classes (no ``classes.txt``). Names that differ are warned about: the model's
    class ``k`` is what it was trained as, whatever the data calls its ``k``."""
    from cmrf.train.metrics import default_class_names

    trained = meta.get("class_names")
    if not trained or list(trained) == data_names or len(trained) != len(data_names):
        return data_names
    if data_names == default_class_names(len(data_names)):
        return list(trained)
    print(f"warning: the data names its classes {data_names}, but {checkpoint}'s model was trained on "
          f"classes named {list(trained)}: class k is scored as the model learnt it, under the data's name; "
          f"check that both mean the same classes in the same order", file=sys.stderr)
    return data_names


def run_evaluate(args: argparse.Namespace) -> int:
    require_extra(EVALUATE_PACKAGES, "cmrf evaluate", "train")
    json_folder = Path(args.json_out).parent if args.json_out else None
    with torch_threads(args.threads), folders_made_for(json_folder, "--json"):  # none left if it fails
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from cmrf.data.factory import unread_options
    from cmrf.files import atomic_write_json
    from cmrf.train.loop import Processes, eval_loader, evaluate_model
    from cmrf.train.metrics import format_table

    model, meta = model_from_checkpoint(args.checkpoint, **checkpoint_model_options(args))
    run_data = meta.get("data", {})
    run_root = run_data.get("root")
    reads_root = "root" not in unread_options(run_data.get("data", "synthetic"))  # (old runs recorded it)
    if args.root is None and args.data in (None, run_data.get("data")) and reads_root and run_root \
            and not Path(run_root).is_dir():  # moved since: the data's own error would not say what to do
        raise ValueError(f"{args.checkpoint} was trained on data at {run_root}, which is not there now: "
                         f"give --root with where the data is (a moved copy of the run's data keeps the "
                         f"run's splits)")
    if args.json_out:  # fail now, not after the evaluation
        check_output_file(args.json_out, "--json", {"checkpoint": args.checkpoint})
        check_replaces_only(args.json_out, "--json", ".json", "JSON")
        _check_not_a_runs_metrics(Path(args.json_out))
    given = {dest for dest in args.data_defaults if getattr(args, dest) is not None}
    if not run_data and not given:  # the defaults would be scored as if they were the run's data
        raise ValueError(f"{args.checkpoint} records no data options (only cmrf train, or fit() with "
                         f"metadata=model_metadata(...), records them): give the data to score on, e.g. "
                         f"--data folder --root DIR, or --data synthetic --img-size 256")
    _fill_from_run(args, run_data)
    trained = run_data.get("img_size")
    if "img_size" in given and trained and args.img_size != trained:  # as cmrf predict notes it
        print(f"note: --img-size {args.img_size}, the run trained at {trained}", file=sys.stderr)
    if meta["num_classes"] < 2:  # before the data: its class count would be blamed instead
        raise ValueError(f"{args.checkpoint} holds a model with {meta['num_classes']} output channel; cmrf "
                         f"evaluate scores the argmax of 2 or more class logits (a one-channel sigmoid head "
                         f"is not a class index)")
    _read_channels_of_model(args, meta)
    model_dims = getattr(model, "spatial_dims", None)
    if isinstance(model_dims, int) and args.spatial_dims != model_dims:  # the data's error blames the data
        if "spatial_dims" not in given:  # a bare state dict: its model says what data it reads
            args.spatial_dims = model_dims
        else:
            raise ValueError(f"{args.checkpoint} holds a {model_dims}D model, and --spatial-dims "
                             f"{args.spatial_dims} reads {args.spatial_dims}D data: leave --spatial-dims out")
    try:
        bundle, options = _build_evaluation_data(args, run_data, given)
    except ValueError as err:  # the data names --num-classes: say it is the checkpoint's, not the user's
        if "num_classes" not in given and args.num_classes is not None \
                and f"--num-classes {args.num_classes}" in str(err):
            err.args = (f"{err} (--num-classes {args.num_classes} was not given: it is the checkpoint's, "
                        f"whose model has {args.num_classes} classes)",)
        raise
    _check_same_splits(args, run_data, bundle)
    if bundle.num_classes != meta["num_classes"] or bundle.in_channels != meta["in_chans"]:
        raise ValueError(
            f"{args.checkpoint} was trained for {meta['in_chans']} channels and {meta['num_classes']} "
            f"classes, the data has {bundle.in_channels} channels and {bundle.num_classes} classes"
        )
    class_names = _class_names(args.checkpoint, meta, list(bundle.class_names))
    dataset = getattr(bundle, args.split)
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"the {args.split} split is empty; choose another with --split")
    if hasattr(dataset, "augment"):
        dataset.augment = False  # the train split is built to augment: score the images themselves
    device = inference_device(args)
    loader = eval_loader(dataset, args.batch_size, args.workers, Processes(), device=device)
    # Two input shapes at most: full batches and a last, smaller one.
    model = inference_model(model.to(device), device, args.optimize, max_graphs=2, backend=args.backend)
    scores = evaluate_model(model, loader, bundle.num_classes, class_names, device)
    scores = {**scores, "split": args.split, "images": len(dataset), "checkpoint": str(args.checkpoint),
              "checkpoint_path": str(Path(args.checkpoint).resolve()), "model": meta.get("model"),
              "epoch": meta.get("epoch"), "precision": "float32", "data": _scored_data(options, args.seed),
              "run": {"device": str(device), "batch_size": args.batch_size, "optimize": args.optimize,
                      "backend": args.backend}}
    print(format_table(scores, f"{args.split} split ({len(dataset)} images), {args.checkpoint}"))
    if args.json_out:
        atomic_write_json(scores, args.json_out)
    return 0
