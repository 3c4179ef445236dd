"""ISIC 2018 Task 1 (lesion boundary segmentation) as distributed: official folders and splits."""

from __future__ import annotations

from pathlib import Path

from cmrf.data.base import DataBundle, DataError
from cmrf.data.folder import ImagePairSource
from cmrf.data.imageio import IMAGE_SUFFIXES
from cmrf.data.masks import MaskRule, resolve_classes
from cmrf.data.pairs import Pair, find_pairs, pairs_bundle, require_dir, used_pairs
from cmrf.data.splits import split_pairs

__all__ = ["ISIC_CLASS_NAMES", "ISIC_FOLDERS", "ISIC_MASK_SUFFIX", "find_isic_pairs", "isic_bundle"]

# Folder names per split, as distributed: (input folder, ground-truth folder).
ISIC_FOLDERS = {
    "train": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    "val": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
}
ISIC_MASK_SUFFIX = "_segmentation"
ISIC_CLASS_NAMES = ["background", "lesion"]


def find_isic_pairs(root: str | Path) -> dict[str, list[Pair]]:
    """Pairs of an ISIC 2018 Task 1 tree as distributed, per official split present.

    ``root/ISIC2018_Task1-2_Training_Input/ISIC_*.jpg`` with ``root/ISIC2018_Task1_Training_GroundTruth/
    ISIC_*_segmentation.png`` (required), and the Validation/Test equivalents where present.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` holding only the splits found.

    Raises:
        DataError: missing training folder, an input folder without its ground-truth folder, an
            image without its mask, or an empty input folder.
    """
    root = require_dir(Path(root), "data root")
    found = {}
    for split, (input_name, truth_name) in ISIC_FOLDERS.items():
        input_dir = root / input_name
        if not input_dir.is_dir():
            if split == "train":
                raise DataError(f"ISIC 2018 training images not found: expected folder {input_dir}")
            continue
        require_dir(root / truth_name, f"ground-truth folder for {input_dir.name}, expected")
        found[split] = find_pairs(
            input_dir, root / truth_name, IMAGE_SUFFIXES, mask_suffixes=(".png",),
            mask_stem=lambda stem: stem + ISIC_MASK_SUFFIX,
        )
    return found


def isic_bundle(*, root, img_size: int, seed: int, rule: MaskRule, val_fraction: float,
                test_fraction: float, split_dir=None, cache: str = "memory",
                cache_dir=None, in_channels: int = 3) -> DataBundle:
    """The splits of an ISIC 2018 tree (``--data isic2018``): 2 classes, masks 0/255; the images
    read as RGB (``in_channels`` 3) or grey (1, ``--in-chans``).

    The official validation and test folders are the val and test splits where present (the
    missing ones are cut off the training set by fractions); ``split_dir`` overrides both.
    """
    if rule.num_classes not in (None, 2):
        raise DataError(f"--num-classes {rule.num_classes}: ISIC 2018 Task 1 has 2 classes")
    official = find_isic_pairs(root)
    pairs = [pair for split_pairs_ in official.values() for pair in split_pairs_]
    splits = split_pairs(pairs, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                         split_dir=split_dir, official=official)
    source = ImagePairSource(used_pairs(pairs, splits), img_size, in_channels, cache, cache_dir,
                             name="isic2018")
    mapping = resolve_classes(source.mask_values(), rule, fixed_classes=2, source="ISIC 2018 Task 1")
    return pairs_bundle(source, splits, mapping, list(ISIC_CLASS_NAMES), seed)
