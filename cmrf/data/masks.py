"""How mask values become classes, decided once over every mask of every split.

The conventions (docs/data.md, "Masks"):

- **binary**: masks holding only 0 and 255, or only 0 and 1 (or a subset), are two classes;
  255 (or 1) is class 1. Needs no option.
- **class indices**: ``num_classes=K`` (``--num-classes K``) or a ``classes.txt`` naming K classes
  says the masks hold ``0..K-1``. With K = 2, 0/255 masks are binary as above.
- **explicit values**: ``mask_values=(v0, v1, ...)`` (``--mask-values``) makes pixels equal to
  ``vi`` class ``i``; every other value is an error.
- **threshold**: ``mask_threshold=T`` (``--mask-threshold T``) makes two classes, class 1 where
  the value is at least T: for anti-aliased or JPEG masks.
- **lossy masks** (JPEG, JPEG-compressed TIFF, lossy WebP) are refused unless thresholded:
  compression changes their values.

Anything else is a :class:`DataError` that lists the files (up to :data:`MAX_LISTED`) with the
values found in them and suggests the option to give. The class count is never "largest value
+ 1" of whatever the masks happen to hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cmrf.data.base import DataError, listing, read_text_lines

__all__ = [
    "MAX_LISTED",
    "ClassMapping",
    "MaskRule",
    "MaskValues",
    "class_names_for",
    "problem_report",
    "resolve_classes",
]

# How many files an error message lists before "... and N more".
MAX_LISTED = 20

MASK_OPTION_HINT = (
    "Give --num-classes K if the masks hold class indices 0..K-1, --mask-values V0 V1 ... to make "
    "the i-th value class i, or --mask-threshold T for two classes split at T (docs/data.md, \"Masks\")"
)


def _check_threshold_splits(masks: Sequence[MaskValues], threshold: int) -> None:
    """Refuse a ``--mask-threshold`` that puts every pixel of every mask in one class (0/1 masks
    with the 128 meant for 0/255 ones): the run would train on nothing but background."""
    union = set().union(*(set(m.values) for m in masks)) if masks else set()
    if not union:
        return
    below = [v for v in union if v < threshold]
    if below and len(below) < len(union):
        return
    side = "below" if below else "at or above"
    cls = "background (class 0)" if below else "foreground (class 1)"
    raise DataError(
        f"--mask-threshold {threshold}: every value in the masks is {side} it (values seen: "
        f"{values_text(sorted(union))} in {len(masks)} mask(s)), so every pixel would be {cls}; "
        f"choose a threshold between the background and foreground values (for 0/1 masks, "
        f"leave it out: they are read as binary)"
    )


def values_text(values: Sequence[int], limit: int = 12) -> str:
    """``"0, 1, 2, 255"``; long lists are cut: ``"0, 1, ..., 254, 255 (256 values)"``."""
    values = [int(v) for v in values]
    if len(values) <= limit:
        return ", ".join(map(str, values))
    head, tail = values[: limit - 2], values[-2:]
    return f"{', '.join(map(str, head))}, ..., {', '.join(map(str, tail))} ({len(values)} values)"


def problem_report(header: str, lines: Sequence[str], footer: str = "", limit: int = MAX_LISTED) -> str:
    """A multi-line error: ``header``, up to ``limit`` indented ``lines`` (then "... and N more")."""
    shown = [f"  {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  ... and {len(lines) - limit} more")
    return "\n".join([header, *shown, *([footer] if footer else [])])


class MaskValues(NamedTuple):
    """What a mask file holds: its ``path``, its sorted distinct ``values``, whether it is ``lossy``."""

    path: Path
    values: tuple[int, ...]
    lossy: bool = False


@dataclass(frozen=True)
class MaskRule:
    """What the user said about the masks (all optional; see the module docstring).

    Attributes:
        num_classes: the masks hold class indices ``0..K-1`` (K = 2 also accepts 0/255).
        mask_values: pixels equal to ``mask_values[i]`` are class ``i``.
        mask_threshold: two classes, class 1 where the value is ``>= mask_threshold``.
    """

    num_classes: int | None = None
    mask_values: tuple[int, ...] | None = None
    mask_threshold: int | None = None

    def __post_init__(self):
        if self.mask_values is not None:
            values = tuple(int(v) for v in self.mask_values)
            object.__setattr__(self, "mask_values", values)
            if len(values) < 2:
                raise DataError(f"--mask-values {values_text(values)}: give at least two values (2 classes)")
            if len(set(values)) != len(values):
                raise DataError(f"--mask-values {values_text(values)}: each value may appear once")
            if self.mask_threshold is not None:
                raise DataError("give --mask-values or --mask-threshold, not both")
            if self.num_classes is not None and self.num_classes != len(values):
                raise DataError(
                    f"--num-classes {self.num_classes} disagrees with the {len(values)} --mask-values "
                    f"{values_text(values)} (one class per value)"
                )
        if self.mask_threshold is not None:
            if self.mask_threshold < 1:
                raise DataError(f"--mask-threshold {self.mask_threshold}: expected a value >= 1")
            if self.num_classes not in (None, 2):
                raise DataError(f"--mask-threshold makes 2 classes, but --num-classes is {self.num_classes}")
        if self.num_classes is not None and self.num_classes < 2:
            raise DataError(f"--num-classes {self.num_classes}: segmentation needs at least 2 classes")


@dataclass(frozen=True)
class ClassMapping:
    """Maps raw mask values to class indices.

    Attributes:
        num_classes: the class count K.
        values: with ``threshold`` None, pixels equal to ``values[i]`` are class ``i``.
        threshold: if set, class 1 where the value is ``>= threshold``, else class 0.
        description: how the masks were read, for messages and docs.
    """

    num_classes: int
    values: tuple[int, ...] | None = None
    threshold: int | None = None
    description: str = ""

    @cached_property
    def _table(self) -> np.ndarray:
        """Class of each 8-bit value, -1 for unknown ones (most masks are 8-bit: one lookup)."""
        table = np.full(256, -1, dtype=np.int64)
        if self.threshold is not None:
            table[min(self.threshold, 256):] = 1
            table[: min(self.threshold, 256)] = 0
        for index, value in enumerate(self.values or ()):
            if 0 <= value < 256:
                table[value] = index
        return table

    def apply(self, raw: np.ndarray, path=None) -> torch.Tensor:
        """Class indices (int64 tensor) of a raw mask; unknown values raise :class:`DataError`."""
        if raw.dtype == np.uint8:
            classes = self._table[raw]
            found = classes >= 0
        elif self.threshold is not None:
            classes, found = (raw >= self.threshold).astype(np.int64), None
        else:
            order = np.argsort(self.values)
            known = np.asarray(self.values, dtype=np.int64)[order]
            flat = raw.astype(np.int64, copy=False)
            position = np.clip(np.searchsorted(known, flat), 0, len(known) - 1)
            classes, found = order[position], known[position] == flat
        if found is not None and not found.all():
            unknown = np.unique(raw[~found])
            raise DataError(
                f"mask file {path} has values {values_text(unknown.tolist())} that the masks' class mapping "
                f"({self.description}) does not know; was the file changed after the data was checked?"
            )
        return torch.from_numpy(np.ascontiguousarray(classes, dtype=np.int64))


def _lookup(values: Sequence[int], description: str) -> ClassMapping:
    return ClassMapping(len(values), tuple(int(v) for v in values), None, description)


def _is_binary(union: set[int]) -> tuple[int, int] | None:
    """The binary convention ``(0, 1)`` or ``(0, 255)`` that ``union`` fits, if any."""
    if union <= {0, 1}:
        return (0, 1)
    if union <= {0, 255}:
        return (0, 255)
    return None


def _refuse_lossy(masks: Sequence[MaskValues]) -> None:
    lossy = [m for m in masks if m.lossy]
    if lossy:
        raise DataError(problem_report(
            f"{len(lossy)} mask file(s) are JPEG or lossy WebP, whose compression changes pixel values "
            "(a 0/255 mask gains values such as 1..254 along its edges), so they cannot be read as classes:",
            [f"{m.path}: values {values_text(m.values)}" for m in lossy],
            "Save the masks as PNG, or give --mask-threshold 128 to make two classes (value >= 128 is "
            "class 1).",
        ))


def _ambiguous(masks: Sequence[MaskValues], union: set[int]) -> DataError:
    """The error for non-binary masks without an option: files grouped by the values they hold."""
    groups: dict[tuple[int, ...], list[Path]] = {}
    for mask in masks:
        groups.setdefault(mask.values, []).append(mask.path)
    lines = []
    for values, paths in sorted(groups.items(), key=lambda item: -len(item[1])):
        examples = listing([str(p) for p in paths], 3)
        lines.append(f"values {values_text(values)} in {len(paths)} file(s): {examples}")
    ordered = sorted(union)
    hints = [MASK_OPTION_HINT + "."]
    mixed_binary = {1, 255} <= union and all(set(v) <= {0, 1} or set(v) <= {0, 255} for v in groups)
    if mixed_binary:  # each file binary, in one of two conventions: not three classes
        hints.append("Each file is binary, some as 0/1 and some as 0/255: --mask-threshold 1 reads both "
                     "(any value >= 1 is class 1).")
    elif ordered == list(range(len(ordered))) and len(ordered) <= 16:  # more: blurred levels, not classes
        hints.append(f"If these are class indices: --num-classes {len(ordered)}.")
    elif len(ordered) <= 16:
        hints.append(f"To make each value a class: --mask-values {' '.join(map(str, ordered))}.")
        if {0, 255} <= union and 1 not in union:  # 0, 1, 2, 255: class indices beside 255, not edges
            hints.append("If they are binary masks with blurred (anti-aliased) edges: --mask-threshold 128.")
    if len(ordered) > 16:
        hints.append("Many grey levels suggest anti-aliased or resampled binary masks: --mask-threshold 128.")
    return DataError(problem_report(
        f"the masks are not binary (0/255 or 0/1) and no class option was given, so their classes are "
        f"ambiguous; values found over {len(masks)} mask file(s): {values_text(ordered)}",
        lines, "\n".join(hints), limit=10,
    ))


def _out_of_range(masks: Sequence[MaskValues], allowed: set[int], what: str, hint: str) -> DataError | None:
    bad = [(m.path, sorted(set(m.values) - allowed)) for m in masks if not set(m.values) <= allowed]
    if not bad:
        return None
    return DataError(problem_report(
        f"{len(bad)} of {len(masks)} mask file(s) hold values that are not classes of {what}:",
        [f"{path}: {values_text(values)}" for path, values in bad], hint,
    ))


def resolve_classes(
    masks: Sequence[MaskValues], rule: MaskRule = MaskRule(), *, fixed_classes: int | None = None,
    named_classes: int | None = None, source: str = "",
) -> ClassMapping:
    """Decide the classes of a dataset from the values of all its masks (see the module docstring).

    Args:
        masks: what every mask file holds (all splits).
        rule: the user's options.
        fixed_classes: a class count the dataset imposes (ISIC 2018: 2).
        named_classes: the class count of a ``classes.txt``, if any.
        source: how to name ``fixed_classes`` in messages (e.g. "ISIC 2018 Task 1").

    Returns:
        The :class:`ClassMapping` every mask of the dataset is read with.

    Raises:
        DataError: listing every mask that does not fit (up to :data:`MAX_LISTED` files).
    """
    wanted = 2 if rule.mask_threshold is not None else rule.num_classes or (
        len(rule.mask_values) if rule.mask_values else None)
    for count, name in ((fixed_classes, source), (named_classes, "classes.txt")):
        if count is not None and wanted is not None and wanted != count:
            raise DataError(f"{name} has {count} classes, but the mask options give {wanted}")
    if rule.mask_threshold is not None:
        _check_threshold_splits(masks, rule.mask_threshold)
        return ClassMapping(2, None, rule.mask_threshold, f"value >= {rule.mask_threshold} is class 1")
    _refuse_lossy(masks)
    union = set().union(*(set(m.values) for m in masks)) if masks else set()
    if rule.mask_values is not None:
        values = rule.mask_values
        error = _out_of_range(masks, set(values), f"--mask-values {values_text(values)}",
                              "Add those values to --mask-values, or fix the files.")
        if error:
            raise error
        return _lookup(values, f"--mask-values {values_text(values)}")
    num_classes = rule.num_classes or named_classes or fixed_classes
    binary = _is_binary(union)
    if num_classes is None:
        if binary is None:
            raise _ambiguous(masks, union)
        return _lookup(binary, f"binary {binary[0]}/{binary[1]}")
    if num_classes == 2 and binary == (0, 255):
        return _lookup(binary, "binary 0/255")
    if rule.num_classes:
        origin = f"--num-classes {rule.num_classes}"
    elif named_classes:
        origin = f"classes.txt ({named_classes} names)"
    else:
        origin = f"{source} ({fixed_classes} classes)"
    hint = "255 is binary foreground only when a mask holds nothing but 0 and 255. " if 255 in union else ""
    error = _out_of_range(masks, set(range(num_classes)), f"{origin}, 0..{num_classes - 1}",
                          hint + MASK_OPTION_HINT + ".")
    if error:
        raise error
    return _lookup(range(num_classes), f"class indices 0..{num_classes - 1}")


def class_names_for(root: Path | None, num_classes: int | None = None) -> list[str] | None:
    """Names from ``root/classes.txt`` (one per line; blank lines and lines starting with ``#``,
    comments, are skipped, as in split files) if present, else generic names.

    With ``num_classes`` None, returns the file's names or None if there is no file.

    Raises:
        DataError: ``classes.txt`` names fewer than 2 classes (segmentation needs background and
            at least one more), or a different number than ``num_classes``.
    """
    file = None if root is None else root / "classes.txt"
    if file is not None and file.is_file():
        lines = (line.strip() for line in read_text_lines(file))
        names = [line for line in lines if line and not line.startswith("#")]
        if len(names) < 2:
            raise DataError(f"{file} names {len(names)} class(es); segmentation needs at least 2, "
                            f"background first, one name per line")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:  # the per-class score tables would have two rows of one name
            raise DataError(f"{file} names {listing(repeated)} more than once; one name per class")
        if num_classes is not None and len(names) != num_classes:
            raise DataError(f"{file} names {len(names)} classes but the data has {num_classes}")
        return names
    if num_classes is None:
        return None
    if num_classes == 2:
        return ["background", "foreground"]
    return ["background"] + [f"class {k}" for k in range(1, num_classes)]
