"""Train TinyU-Net on the built-in synthetic lesions with the Python API: no download, CPU only.

    python examples/train_synthetic.py --epochs 8 --out runs/synthetic
    python examples/train_synthetic.py --epochs 8 --out runs/synthetic --overwrite   # run it again

The same run from the command line is ``cmrf train --img-size 64 --synthetic-samples 160
--epochs 8 --lr 3e-3 --device cpu --out runs/synthetic`` (on synthetic data this script's
``--img-size`` defaults to 64, 32 for volumes, and ``--synthetic-samples`` to 160; ``--data
folder``/``isic2018`` keep ``cmrf train``'s defaults; ``--spatial-dims 3`` trains ``tinyunet3d``).
This script shows the pieces it is made of, for users who want to plug in their own model or
dataset. Like ``cmrf train``, ``fit`` refuses a folder that holds another run unless told to
continue it (``--resume``) or replace it (``--overwrite``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cmrf
from cmrf.cli.data_args import add_data_arguments, data_options
from cmrf.data import DATA_OPTIONS, DataError, build_datasets
from cmrf.train import Recipe, RunFolderError, fit, format_table
from cmrf.train.processes import seed_everything
from cmrf.train.state import model_metadata


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_arguments(parser)  # --data synthetic (default), --img-size, --synthetic-samples, ...
    # Smaller than `cmrf train`'s defaults so that it runs in a minute on a CPU; left unset here so
    # that data read from files keeps the library's own defaults (and its check of unread options).
    parser.set_defaults(img_size=None, synthetic_samples=None)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/synthetic")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    args = parser.parse_args()
    synthetic = args.data == "synthetic"
    if args.img_size is None:
        args.img_size = (32 if args.spatial_dims == 3 else 64) if synthetic else DATA_OPTIONS["img_size"]
    if args.synthetic_samples is None:
        args.synthetic_samples = 160 if synthetic else DATA_OPTIONS["synthetic_samples"]

    options = data_options(args)
    try:
        bundle = build_datasets(seed=args.seed, **options)
    except DataError as err:  # a bad folder or option: one line, as `cmrf train` says it
        raise SystemExit(f"train_synthetic.py: error: {err}") from None
    seed_everything(args.seed)  # the initial weights are part of a seeded run, as in `cmrf train`
    model_name = "tinyunet3d" if args.spatial_dims == 3 else "tinyunet"
    model = cmrf.create_model(model_name, in_chans=bundle.in_channels, num_classes=bundle.num_classes)
    # With this metadata in the checkpoints, `cmrf evaluate` and `cmrf predict` can rebuild the
    # model, and a resume with other data or another model is refused.
    data = {key: str(value) if isinstance(value, Path) else value for key, value in options.items()}
    metadata = model_metadata(
        model_name,
        {},
        bundle.in_channels,
        bundle.num_classes,
        bundle.class_names,
        data={**data, "seed": args.seed},
    )
    try:
        recipe = Recipe(epochs=args.epochs, lr=args.lr, seed=args.seed, device="cpu")
        result = fit(
            model, bundle, args.out, recipe, resume=args.resume, overwrite=args.overwrite, metadata=metadata
        )
    except (RunFolderError, ValueError) as err:  # another run there, a bad value: one line, as `cmrf train`
        raise SystemExit(f"train_synthetic.py: error: {err}") from None
    print(format_table(result, f"{result['split']} split, best epoch {result['best_epoch']}"))
    print(f"cmrf evaluate {args.out}/best.safetensors   # the same scores from the command line")


if __name__ == "__main__":
    main()
