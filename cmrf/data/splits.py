"""Train/validation/test splits: listed in files, official, or a seeded shuffle by fractions."""

from __future__ import annotations

import hashlib
import json
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cmrf.data.base import SPLITS, DataBundle, DataError, DataWarning, listing, read_text_lines
from cmrf.data.imageio import IMAGE_SUFFIXES
from cmrf.data.masks import MaskRule, class_names_for, resolve_classes
from cmrf.data.pairs import Pair, file_stem, pairs_bundle, require_dir, used_pairs

__all__ = ["folder_split_bundle", "split_by_fractions", "split_file_sizes", "split_fingerprint",
           "split_from_files", "split_pairs"]

SPLIT_STREAM = 104729

# Suffixes stripped from the names listed in split files (so "case1.png" names stem "case1").
LISTED_SUFFIXES = (".nii.gz", ".nii", *IMAGE_SUFFIXES)


def split_by_fractions(pairs: list, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list]:
    """Shuffle ``pairs`` with ``seed`` and cut off ``val_fraction`` and ``test_fraction`` of them.

    Each fraction above zero gets at least one item; a zero fraction leaves its split empty.

    Raises:
        DataError: the training split, or a split with a fraction above zero, would be empty.
    """
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"--val-fraction {val_fraction} and --test-fraction {test_fraction} leave nothing to train on; "
            "their sum must be below 1"
        )
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(len(pairs))
    shuffled = [pairs[i] for i in order]
    n_val = max(1, round(len(pairs) * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(len(pairs) * test_fraction)) if test_fraction > 0 else 0
    splits = {
        "val": shuffled[:n_val],
        "test": shuffled[n_val:n_val + n_test],
        "train": shuffled[n_val + n_test:],
    }
    fractions = {"val": val_fraction, "test": test_fraction, "train": 1.0}
    for name, items in splits.items():
        if not items and fractions[name] > 0:
            raise DataError(
                f"the {name} split is empty: {len(pairs)} samples with --val-fraction {val_fraction} and "
                f"--test-fraction {test_fraction}; add data or change the fractions"
            )
    return splits


def split_from_files(pairs: list, split_dir: str | Path) -> dict[str, list]:
    """Splits listed in ``split_dir/{train,val,test}.txt``: one stem (or file name) per line.

    Blank lines and lines starting with ``#`` are skipped. Each split keeps the folder's order of
    its samples, not the list's: a split is the set of names (what its fingerprint records), so a
    reordered list gives the same dataset, the same batches and an exact resume.

    Raises:
        DataError: a missing or empty split file, an unknown stem, or a stem in two splits.
    """
    split_dir = require_dir(Path(split_dir), "split folder")
    by_stem = {pair.stem: pair for pair in pairs}
    position = {pair.stem: index for index, pair in enumerate(pairs)}
    splits, seen = {}, {}
    for split in SPLITS:
        file = split_dir / f"{split}.txt"
        if not file.is_file():
            raise DataError(f"split file {file} does not exist; expected train.txt, val.txt and test.txt")
        items = []
        for line_number, line in enumerate(read_text_lines(file), start=1):
            name = line.strip()
            stem = file_stem(name, LISTED_SUFFIXES) or name
            if not stem or stem.startswith("#"):
                continue
            if stem not in by_stem:
                raise DataError(f"{file}, line {line_number}: no image/mask pair with stem {stem!r}"
                                f"{_listed_near_miss(stem, by_stem)}")
            if stem in seen:
                raise DataError(f"{file}, line {line_number}: {stem!r} is already in {seen[stem]}")
            seen[stem] = file.name
            items.append(by_stem[stem])
        if not items:
            raise DataError(f"split file {file} lists no samples: the {split} split is empty")
        splits[split] = sorted(items, key=lambda pair: position[pair.stem])
    unlisted = [pair.stem for pair in pairs if pair.stem not in seen]
    if unlisted:  # a subset on purpose, or a forgotten line: say it, the run would not
        warnings.warn(f"{len(unlisted)} of {len(pairs)} samples are in none of the split files of "
                      f"{split_dir} and are not used: {listing(unlisted)}", DataWarning, stacklevel=2)
    return splits


def _listed_near_miss(stem: str, stems) -> str:
    """A hint for a listed ``stem`` that is not there: a pair whose stem differs only in case, or
    only in Unicode form (macOS writes accents decomposed, NFD; a list typed elsewhere has them
    composed, NFC, and the two look the same on screen); "" when there is none."""
    def composed(name: str) -> str:
        return unicodedata.normalize("NFC", name)

    for other in stems:
        if composed(other) == composed(stem):
            form = "decomposed (NFD)" if not unicodedata.is_normalized("NFC", other) else "composed (NFC)"
            return (f" (pair {other!r} is there, the same name with its accents {form} in the file names: "
                    f"write the list with the names as the files spell them, or rename the files)")
    for other in stems:
        if composed(other).casefold() == composed(stem).casefold():
            return f" (pair {other!r} is there: listed stems must match in case too)"
    return ""


def split_pairs(
    pairs: Sequence, *, seed: int, val_fraction: float, test_fraction: float, split_dir=None,
    official: dict[str, list] | None = None,
) -> dict[str, list]:
    """The three splits: explicit split files win; then the official splits that exist; fractions
    (a seeded shuffle) for the rest.

    Args:
        pairs: every sample found.
        seed: seed of the shuffle.
        val_fraction, test_fraction: held-out shares where no split is given.
        split_dir: folder of ``train.txt``, ``val.txt``, ``test.txt``.
        official: the splits a dataset comes with (ISIC 2018), at least ``"train"``.
    """
    pairs = list(pairs)
    if split_dir is not None:
        return split_from_files(pairs, split_dir)
    if not official:
        return split_by_fractions(pairs, val_fraction, test_fraction, seed)
    splits = dict(official)
    missing = [split for split in ("val", "test") if split not in official]
    if missing:  # e.g. only ISIC's training folder: cut the missing held-out splits off it
        cut = split_by_fractions(
            official["train"],
            val_fraction if "val" in missing else 0.0,
            test_fraction if "test" in missing else 0.0,
            seed,
        )
        splits.update({split: cut[split] for split in ["train", *missing]})
    return splits


def folder_split_bundle(root: Path, pairs: Sequence[Pair], make_source, *, seed: int, rule: MaskRule,
                        val_fraction: float, test_fraction: float, split_dir=None) -> DataBundle:
    """The splits of the pairs found in a folder, class names from its ``classes.txt`` if any.

    ``make_source(pairs)`` reads the pairs that some split uses; every split's masks are then
    checked in one pass (``resolve_classes``) before any dataset exists.
    """
    splits = split_pairs(pairs, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                         split_dir=split_dir)
    source = make_source(used_pairs(pairs, splits))
    named = class_names_for(root)
    mapping = resolve_classes(source.mask_values(), rule, named_classes=len(named) if named else None)
    return pairs_bundle(source, splits, mapping, class_names_for(root, mapping.num_classes), seed)


def split_fingerprint(bundle: DataBundle) -> str | None:
    """Which files each split holds, in a short text: ``"train 6, val 2, test 2 (sha1 3f2a9c01b7de)"``.

    A fraction split is recomputed from the files found at every start, so files added to or
    removed from the folder (or another ``--seed``) move samples between splits; a run records
    this text, and a resume or an evaluation with the same data options compares it. ``None`` for
    generated (synthetic) data, whose splits the options alone fix.
    """
    pairs = _split_pairs(bundle)
    if pairs is None:
        return None
    stems = {split: sorted(pair.stem for pair in items) for split, items in pairs.items()}
    return f"{', '.join(f'{split} {len(items)}' for split, items in stems.items())} (sha1 {_digest(stems)})"


def split_file_sizes(bundle: DataBundle) -> str | None:
    """A digest of the byte sizes of every split's image and mask files, ``"sha1 3f2a9c01b7de"``.

    ``split_fingerprint`` names which samples each split holds; this tells a copy of those files
    (moved, or on another machine) from other data that uses the same names (``case_001.png``),
    for the rules that accept the run's data at another ``--root``. ``None`` where
    ``split_fingerprint`` is.
    """
    pairs = _split_pairs(bundle)
    if pairs is None:
        return None
    sizes = {split: sorted([pair.stem, _size(pair.image), _size(pair.mask)] for pair in items)
             for split, items in pairs.items()}
    return f"sha1 {_digest(sizes)}"


def _split_pairs(bundle: DataBundle) -> dict[str, list[Pair]] | None:
    """Each split's pairs, or ``None`` for data without files."""
    pairs = {}
    for split in SPLITS:
        dataset = getattr(bundle, split)
        items = [] if dataset is None else getattr(dataset, "pairs", None)
        if items is None:
            return None
        pairs[split] = list(items)
    return pairs


def _size(path: Path) -> int | None:
    try:
        return Path(path).stat().st_size
    except OSError:  # gone since it was read: no size, which no copy matches
        return None


def _digest(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]
