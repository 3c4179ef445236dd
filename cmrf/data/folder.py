"""2D image/mask pairs on disk: a generic folder (``images/`` + ``masks/``), also used by ISIC 2018.

Every pair is checked when the dataset is built, all splits at once and each mask read once: the
image's header (readable, same size as its mask) and the mask's values (readable, grey or palette,
and fitting the mask conventions of :mod:`cmrf.data.masks`). The resized mask is kept in the sample
store right away, so training never decodes a mask again; images are decoded the first time they
are loaded, then kept too (see :mod:`cmrf.data.cache`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cmrf.data.base import DataBundle, DataError, listing
from cmrf.data.cache import CachedSource, SourceDataset, run_checks
from cmrf.data.imageio import (
    HIGH_BIT_MODES,
    IMAGE_SUFFIXES,
    decode_image,
    decode_mask,
    image_header,
    resize_nearest,
)
from cmrf.data.masks import MaskRule, MaskValues, resolve_classes
from cmrf.data.pairs import Pair, find_pairs, require_dir, source_key
from cmrf.data.splits import folder_split_bundle
from cmrf.data.store import Layout, StoreSpec, mask_dtype_for, open_store, reuse_disk_store

__all__ = [
    "FolderSegmentation",
    "ImagePairSource",
    "find_folder_pairs",
    "folder_bundle",
]


def find_folder_pairs(root: str | Path) -> list[Pair]:
    """Pairs of a generic folder: ``root/images/<stem>.<ext>`` with ``root/masks/<stem>.<ext>``.

    Raises:
        DataError: a missing folder, no images, two files with one stem, or images without masks.
    """
    root = require_dir(Path(root), "data root")
    image_dir = root / "images"
    if not image_dir.exists() and not image_dir.is_symlink():
        _refuse_an_image_folder_as_root(root)
    hint = ""
    if image_dir.is_dir() and any(p.name.lower().endswith((".nii", ".nii.gz")) for p in image_dir.iterdir()):
        hint = "; it holds NIfTI volumes: add --spatial-dims 3"
    elif image_dir.is_dir():
        hint = _nested_images_hint(image_dir)
    return find_pairs(image_dir, root / "masks", IMAGE_SUFFIXES, empty_hint=hint)


def holds_images(folder: Path) -> bool:
    """Whether ``folder`` itself holds image files (hidden files aside; subfolders not searched)."""
    return any(p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") for p in folder.iterdir())


def _refuse_an_image_folder_as_root(root: Path) -> None:
    """A root that holds the images themselves (``--root data/images``) is the image folder, not
    the root: say so, and name the root that fits when there is one."""
    if not holds_images(root):
        return
    parent = root.parent
    meant = (f": did you mean --root {parent}, which holds {root.name}/ and masks/?"
             if (parent / "masks").is_dir() else "")
    raise DataError(f"data root {root} holds image files itself; --root is the folder that holds images/ "
                    f"and masks/{meant}")


def _nested_images_hint(image_dir: Path) -> str:
    """For an image folder without images: the subfolders that hold some (``images/train/``), which
    are not searched, and how to lay such data out."""
    nested = sorted(p.name for p in image_dir.iterdir() if p.is_dir() and holds_images(p))
    if not nested:
        return ""
    shown = listing([f"{name}/" for name in nested])
    return (f"; its subfolders {shown} hold images, but subfolders are not searched: put every image in "
            f"images/ and every mask in masks/, and list the splits in train.txt, val.txt and test.txt "
            f"for --split-dir")


class ImagePairSource(CachedSource):
    """2D image/mask file pairs, checked at once and decoded once (see the module docstring).

    Args:
        pairs: the samples (see :func:`find_folder_pairs`, :func:`cmrf.data.isic.find_isic_pairs`).
        img_size: side of the square the images are resized to (bilinear; masks nearest).
        in_channels: 3 (RGB) or 1 (grey). Default 3.
        cache: "memory" (default), "disk" or "none" (see :mod:`cmrf.data.cache`).
        cache_dir: folder of disk caches (default ``~/.cache/cmrf/data``).
        name: prefix of the disk cache's folder name.

    Raises:
        DataError: listing every pair whose files are missing, unreadable, of different sizes, or
            whose mask is in colour or holds non-integer values.
    """

    spatial_dims = 2

    def __init__(self, pairs: Sequence[Pair], img_size: int, in_channels: int = 3, cache: str = "memory",
                 cache_dir: str | Path | None = None, name: str = "folder"):
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        self.pairs = list(pairs)
        if not self.pairs:
            raise DataError("a dataset has no samples")
        self.img_size, self.in_channels = img_size, in_channels
        key = source_key(self.pairs, img_size, in_channels)
        spec = StoreSpec(cache, f"{name}-{img_size}", key, cache_dir)
        self.store = reuse_disk_store(spec) or self._check_and_store(spec)

    def __len__(self) -> int:
        return len(self.pairs)

    def _check(self, index: int) -> tuple[dict, np.ndarray]:
        pair = self.pairs[index]
        header = image_header(pair.image, "image")
        mask = decode_mask(pair.mask)
        height, width = mask.values.shape
        if (header.height, header.width) != (height, width):
            turned = ""
            if header.quarter_turned and (header.width, header.height) == (height, width):
                turned = (f"; the image's EXIF orientation turns it a quarter (stored {header.height}x"
                          f"{header.width}) and cmrf reads it as viewers show it, so a mask drawn on "
                          f"the stored pixels must be turned alike")
            raise DataError(
                f"image {pair.image} is {header.width}x{header.height} but its mask {pair.mask} is "
                f"{width}x{height} (width x height); they must match{turned}"
            )
        facts = {"image_mode": header.mode, "values": mask.present.tolist(), "lossy": bool(mask.lossy)}
        return facts, resize_nearest(mask.values, self.img_size)

    def _check_and_store(self, spec: StoreSpec):
        results = run_checks(self._check, len(self.pairs), "image/mask pairs")
        facts = [fact for fact, _ in results]
        high_bit = any(fact["image_mode"] in HIGH_BIT_MODES for fact in facts)
        side = self.img_size
        layout = Layout(
            len(self.pairs), (self.in_channels, side, side), "uint16" if high_bit else "uint8", (side, side),
            mask_dtype_for(v for fact in facts for v in fact["values"][:1] + fact["values"][-1:]),
        )
        store = open_store(spec, layout)
        for index, (_, mask) in enumerate(results):
            store.put_mask(index, mask.astype(layout.mask_dtype))
        store.save_facts(facts)
        return store

    def mask_values(self) -> list[MaskValues]:
        """What every mask holds (learned by the check; no file is read again)."""
        return [
            MaskValues(pair.mask, tuple(fact["values"]), fact["lossy"])
            for pair, fact in zip(self.pairs, self.store.facts)
        ]

    def decode(self, index: int, image: bool, mask: bool):
        pair = self.pairs[index]
        return (
            decode_image(pair.image, self.img_size, self.in_channels) if image else None,
            resize_nearest(decode_mask(pair.mask).values, self.img_size) if mask else None,
        )

    def describe(self, index: int) -> str:
        return str(self.pairs[index].mask)


class FolderSegmentation(SourceDataset):
    """Image/mask pairs from disk (ISIC 2018 or a generic folder), resized to ``img_size``.

    A convenience over :class:`ImagePairSource` and :class:`SourceDataset` for one set of pairs:
    the pairs are checked, their classes decided (see :mod:`cmrf.data.masks`), then loaded from
    the cache.

    Args:
        pairs: the samples (see :func:`find_folder_pairs`).
        img_size: side of the square the images are resized to (bilinear; masks nearest).
        num_classes: the masks hold class indices ``0..num_classes-1`` (2 also accepts 0/255);
            default: binary masks only.
        in_channels: 3 (RGB) or 1 (grey). Default 3.
        augment: augment items. Default False.
        seed: augmentation seed. Default 0.
        mask_values, mask_threshold: the other mask options (see :class:`cmrf.data.masks.MaskRule`).
        cache, cache_dir: see :class:`ImagePairSource`.

    Items: ``(image (in_channels, img_size, img_size) float32 normalised, mask (img_size, img_size)
    int64)``.
    """

    def __init__(self, pairs: Sequence[Pair], img_size: int, num_classes: int | None = None,
                 in_channels: int = 3, augment: bool = False, seed: int = 0, *,
                 mask_values: Sequence[int] | None = None, mask_threshold: int | None = None,
                 cache: str = "memory", cache_dir: str | Path | None = None):
        source = ImagePairSource(pairs, img_size, in_channels, cache, cache_dir)
        rule = MaskRule(num_classes, None if mask_values is None else tuple(mask_values), mask_threshold)
        mapping = resolve_classes(source.mask_values(), rule)
        super().__init__(source, None, mapping, augment=augment, seed=seed)


def folder_bundle(*, root, img_size: int, seed: int, rule: MaskRule, val_fraction: float,
                  test_fraction: float, split_dir=None, cache: str = "memory",
                  cache_dir=None, in_channels: int = 3) -> DataBundle:
    """The splits of a generic folder (``--data folder``); every split's masks checked in one pass.
    ``in_channels``: 3 reads the images as RGB, 1 as grey (``--in-chans``)."""
    root = Path(root)
    return folder_split_bundle(
        root, find_folder_pairs(root),
        lambda used: ImagePairSource(used, img_size, in_channels, cache, cache_dir, name="folder"),
        seed=seed, rule=rule, val_fraction=val_fraction, test_fraction=test_fraction, split_dir=split_dir,
    )
