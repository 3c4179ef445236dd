"""``build_datasets``: the train/val/test datasets of ``cmrf train`` from keyword options."""

from __future__ import annotations

import numbers
from pathlib import Path

from cmrf.data.base import DataBundle, DataError
from cmrf.data.masks import MaskRule
from cmrf.data.store import CACHE_CHOICES

__all__ = ["DATA_CHOICES", "DATA_OPTIONS", "DEFAULT_IMG_SIZE", "IMAGE_CHANNELS", "build_datasets",
           "data_file_folders", "option_flag", "reads_in_chans", "unread_options"]

DATA_CHOICES = ("synthetic", "isic2018", "folder")

# The paper's 256 x 256 for images; volumes default to what a CPU can train.
DEFAULT_IMG_SIZE = {2: 256, 3: 64}

# The options of ``build_datasets`` and their defaults (the command line's ``cmrf.cli.data_args``).
DATA_OPTIONS = {
    "data": "synthetic",
    "root": None,
    "img_size": None,
    "num_classes": None,
    "in_chans": None,
    "mask_values": None,
    "mask_threshold": None,
    "val_fraction": 0.2,
    "test_fraction": 0.2,
    "split_dir": None,
    "synthetic_samples": 400,
    "spatial_dims": 2,
    "cache": "memory",
    "cache_dir": None,
}

# The largest side samples are resized to: far above any segmentation run's (the paper's is 256), and
# a bound on what a run's recorded options, read back from a checkpoint, can make evaluate allocate.
MAX_IMG_SIZE = {2: 8192, 3: 1024}

# Options that only files (isic2018, folder) or only synthetic data read: given for the other kind
# they would be dropped without a word (a forgotten --data folder trains on synthetic images).
_FILE_OPTIONS = ("root", "split_dir", "val_fraction", "test_fraction", "mask_values", "mask_threshold",
                 "in_chans")
_SYNTHETIC_OPTIONS = ("synthetic_samples",)

# The channels 2D image files may be read with: grey or RGB (``decode_image``).
IMAGE_CHANNELS = (1, 3)


def option_flag(name: str) -> str:
    """The command-line flag of option ``name``: ``val_fraction`` -> ``--val-fraction``."""
    return f"--{name.replace('_', '-')}"


def unread_options(data: str) -> tuple[str, ...]:
    """The options that data ``data`` ("synthetic", "isic2018", "folder") does not read."""
    return _FILE_OPTIONS if data == "synthetic" else _SYNTHETIC_OPTIONS


def data_file_folders(data: str, root) -> list[Path]:
    """The folders whose files ``data`` reads as samples under ``root`` (images and masks): a file
    written there by something else would be read as data, or break the pairing."""
    if data == "synthetic" or root is None:
        return []
    root = Path(root)
    if data == "isic2018":
        from cmrf.data.isic import ISIC_FOLDERS

        return [root / name for names in ISIC_FOLDERS.values() for name in names]
    return [root / "images", root / "masks"]


def reads_in_chans(data: str, spatial_dims: int) -> bool:
    """Whether data ``data`` of ``spatial_dims`` reads ``in_chans`` (2D image files do)."""
    return data != "synthetic" and spatial_dims == 2


def _check_options_apply(options: dict) -> None:
    """Refuse options the chosen data does not read (each differs from its default)."""
    synthetic = options["data"] == "synthetic"
    ignored = unread_options(options["data"])
    given = [option_flag(name) for name in ignored if options[name] != DATA_OPTIONS[name]]
    if not given and options["split_dir"] is not None:  # the lists fix every split
        fractions = [option_flag(name) for name in ("val_fraction", "test_fraction")
                     if options[name] != DATA_OPTIONS[name]]
        if fractions:
            raise DataError(f"{', '.join(fractions)}: the split files of --split-dir {options['split_dir']} "
                            f"fix every split, so no fraction is cut; drop {' and '.join(fractions)}")
    if not given:
        return
    if synthetic:
        raise DataError(f"{', '.join(given)}: only for data read from files (--data isic2018 or "
                        f"--data folder), and the data is synthetic; add --data folder (or isic2018) "
                        f"to train on files")
    raise DataError(f"{', '.join(given)}: only for --data synthetic, and the data is "
                    f"--data {options['data']}")


def _check_options(options: dict) -> None:
    unknown = sorted(set(options) - set(DATA_OPTIONS))
    if unknown:
        raise DataError(f"unknown data option(s) {', '.join(unknown)}; expected {', '.join(DATA_OPTIONS)}")
    if options["data"] not in DATA_CHOICES:
        raise DataError(f"--data {options['data']!r}: expected one of {', '.join(DATA_CHOICES)}")
    if options["spatial_dims"] not in (2, 3):
        raise DataError(f"--spatial-dims {options['spatial_dims']!r}: expected 2 or 3")
    if options["cache"] not in CACHE_CHOICES:
        raise DataError(f"--cache {options['cache']!r}: expected one of {', '.join(CACHE_CHOICES)}")
    in_chans = options["in_chans"]  # True and 1.0 equal 1, but are no channel count
    integral = isinstance(in_chans, numbers.Integral) and not isinstance(in_chans, bool)
    if in_chans is not None and not (integral and in_chans in IMAGE_CHANNELS):
        raise DataError(f"--in-chans {in_chans!r}: expected 1 (grey) or 3 (RGB)")
    img_size = options["img_size"]
    if isinstance(img_size, bool) or not isinstance(img_size, numbers.Integral) or img_size < 1:
        raise DataError(f"--img-size {img_size!r}: expected an integer >= 1")
    largest = MAX_IMG_SIZE[options["spatial_dims"]]
    if img_size > largest:  # also a checkpoint's recorded size, which evaluate reads: bounded memory
        raise DataError(f"--img-size {img_size}: expected at most {largest} for {options['spatial_dims']}D "
                        f"data (every sample is resized to it per side)")
    for name in ("val_fraction", "test_fraction"):  # as the command line's flag types check them
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
            raise DataError(f"{option_flag(name)} {value!r}: expected a fraction strictly between 0 and 1")


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise DataError(f"seed {seed!r}: expected an integer >= 0")


def build_datasets(seed: int = 0, **options) -> DataBundle:
    """Build the train/val/test datasets, checking every split's data first.

    Every mask of every split (test included) is read once, here, and checked against the mask
    conventions (docs/data.md); every bad file is reported at once. Nothing is trained on data
    that has not been checked.

    Args:
        seed: non-negative seed of the synthetic samples, the fraction split and augmentation.
        **options: (defaults in ``DATA_OPTIONS``)
            data: "synthetic", "isic2018" or "folder".
            root: the dataset folder (isic2018, folder).
            img_size: side every sample is resized to; default ``DEFAULT_IMG_SIZE[spatial_dims]``.
            num_classes: synthetic: 2 or 4; files: the masks hold class indices ``0..K-1``.
            in_chans: 2D image files (isic2018, folder): 1 reads them grey, 3 (default) as RGB.
            mask_values: files: pixels equal to the i-th value are class i.
            mask_threshold: files: two classes, class 1 where the value is at least this.
            val_fraction, test_fraction: held-out shares where no split is given.
            split_dir: folder with ``train.txt``, ``val.txt``, ``test.txt`` (stems).
            synthetic_samples: synthetic training samples (val and test: a quarter, at least 8).
            spatial_dims: 2 (images) or 3 (volumes: synthetic, or NIfTI with data="folder").
            cache: "memory", "disk" or "none": where decoded samples are kept (docs/data.md).
            cache_dir: folder of disk caches (default ``~/.cache/cmrf/data``).

    Raises:
        DataError: an unknown or bad option, a missing root, missing/unpaired/unreadable files, size
            mismatches, masks that do not fit the conventions, empty splits.
    """
    options = {**DATA_OPTIONS, **options}
    if options["img_size"] is None:
        # 256^3 volumes would not fit a CPU's memory, so volumes get a smaller default.
        options["img_size"] = DEFAULT_IMG_SIZE.get(options["spatial_dims"], 256)
    _check_options(options)
    _check_seed(seed)
    _check_options_apply(options)
    data, spatial_dims = options["data"], options["spatial_dims"]
    caching = {"cache": options["cache"], "cache_dir": options["cache_dir"]}
    if data == "synthetic":
        from cmrf.data.synthetic import synthetic_bundle

        return synthetic_bundle(img_size=options["img_size"], num_classes=options["num_classes"],
                                spatial_dims=spatial_dims, synthetic_samples=options["synthetic_samples"],
                                seed=seed, **caching)
    if options["root"] is None:
        raise DataError(f"--data {data} needs --root DIR, the dataset folder")
    mask_values = options["mask_values"]
    rule = MaskRule(options["num_classes"], None if mask_values is None else tuple(mask_values),
                    options["mask_threshold"])
    files = {
        "root": options["root"], "img_size": options["img_size"], "seed": seed, "rule": rule,
        "val_fraction": options["val_fraction"], "test_fraction": options["test_fraction"],
        "split_dir": options["split_dir"], **caching,
    }
    if spatial_dims == 3:
        if data != "folder":
            raise DataError(
                f"--data {data} holds 2D images; --spatial-dims 3 needs --data folder or synthetic"
            )
        if options["in_chans"] is not None:  # a volume's channels are the file's, not a choice
            raise DataError(f"--in-chans {options['in_chans']}: only for 2D images; NIfTI volumes are read "
                            f"with the channels their files hold, so leave it out")
        from cmrf.data.nifti import nifti_bundle

        return nifti_bundle(**files)
    in_channels = options["in_chans"] or 3  # RGB unless asked: what every run read before the option
    if data == "isic2018":
        from cmrf.data.isic import isic_bundle

        return isic_bundle(**files, in_channels=in_channels)
    from cmrf.data.folder import folder_bundle

    return folder_bundle(**files, in_channels=in_channels)
