"""The one pair finder: images in one folder matched by stem with masks in another.

Used by every source on disk: generic folders (``images/`` + ``masks/``), ISIC 2018 (``..._Input/``
+ ``..._GroundTruth/`` with a ``_segmentation`` suffix) and NIfTI volumes (``.nii.gz`` files).
"""

from __future__ import annotations

import errno
import os
import shlex
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cmrf.data.base import SPLITS, DataBundle, DataError, DataWarning, listing
from cmrf.data.cache import CachedSource, SourceDataset
from cmrf.data.masks import problem_report

__all__ = ["Pair", "file_stem", "find_pairs", "pairs_bundle", "require_dir", "source_key", "used_pairs"]


@dataclass(frozen=True)
class Pair:
    """One sample on disk: its stem (identifier), image file and mask file."""

    stem: str
    image: Path
    mask: Path


# Words in the folder names other datasets use, to suggest which folder to link (MONAI's Decathlon
# layout: imagesTr/ and labelsTr/; others: img/, labels/, gt/, annotations/, segmentations/).
_LIKELY_NAMES = {"image": ("image", "img"), "volume": ("image", "img", "vol"),
                 "mask": ("mask", "label", "gt", "annot", "seg", "truth")}


def _require_pair_dirs(image_dir: Path, mask_dir: Path, kind: str) -> None:
    """``require_dir`` for a data root's two folders; a root that lacks one gets an error naming the
    folders it holds and, where one looks meant (``labelsTr/``), the link that would point at it."""
    root = image_dir.parent
    missing = []
    for path, role in ((image_dir, kind), (mask_dir, "mask")):
        # A file or a broken link in the way is the plain error's to name: a link cannot go there.
        if path.exists() or path.is_symlink() or mask_dir.parent != root or not root.is_dir():
            require_dir(path, f"{role} folder")
            continue
        missing.append((path, role))
    if not missing:
        return
    others = sorted(p.name for p in root.iterdir() if p.is_dir() and p not in (image_dir, mask_dir))
    if not others:
        path, role = missing[0]
        require_dir(path, f"{role} folder")
    fixes = []  # every folder's fix in one message: a Decathlon root lacks both
    for path, role in missing:
        likely = [name for name in others if any(w in name.lower() for w in _LIKELY_NAMES[role])]
        if likely:
            fixes.append(f"if {likely[0]}/ holds the {role}s, rename it to {path.name}/ or link it "
                         f"(ln -s {shlex.quote(likely[0])} {shlex.quote(str(path))})")
    absent = " and ".join(f"{role} folder {path}" for path, role in missing)
    raise DataError(
        f"{absent} {'does' if len(missing) == 1 else 'do'} not exist: the data root must hold "
        f"{image_dir.name}/ and {mask_dir.name}/, with files of the same stem paired; {root} holds "
        f"{listing([f'{name}/' for name in others], 8)}{': ' + '; '.join(fixes) if fixes else ''}"
    )


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else :class:`DataError` naming it as ``what``."""
    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist or is not a folder")
    return path


def file_stem(name: str, suffixes: Sequence[str]) -> str | None:
    """``name`` without the first of ``suffixes`` it ends with (case-insensitive), else None."""
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def broken_link_reason(path: Path) -> str:
    """Why the symbolic link ``path`` leads to no file: a missing target, or a loop."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symbolic link that leads back to itself (a loop)"
    return f"is a broken link: its target {os.readlink(path)} does not exist"


def _files_by_stem(folder: Path, suffixes: Sequence[str], kind: str, problems: list[str]) -> dict[str, Path]:
    """Visible files of ``folder`` with one of ``suffixes``, by stem; duplicates and broken links go
    to ``problems``."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = file_stem(path.name, suffixes)
        if stem is None or path.name.startswith("."):
            continue
        broken_link = path.is_symlink() and not path.exists()
        if broken_link:
            # Reported, and kept as found: skipped, an image would vanish from the data unnoticed
            # and a mask be reported missing although its file is there.
            problems.append(f"{kind} file {path} {broken_link_reason(path)}")
        elif not path.is_file():
            continue
        if stem in found:
            problems.append(
                f"two {kind} files with stem {stem!r} in {folder}: {found[stem].name}, {path.name}; keep one"
            )
            continue
        found[stem] = path
    return found


def find_pairs(
    image_dir: Path, mask_dir: Path, suffixes: Sequence[str], *, mask_suffixes: Sequence[str] | None = None,
    mask_stem: Callable[[str], str] = str, kind: str = "image", empty_hint: str = "",
) -> list[Pair]:
    """Match every file of ``image_dir`` with the mask of the same stem in ``mask_dir``.

    Hidden files and files with other suffixes (``LICENSE.txt``) are ignored.

    Args:
        image_dir, mask_dir: the two folders (both must exist).
        suffixes: image file suffixes, lower case (e.g. ``(".png", ".jpg")`` or ``(".nii.gz", ".nii")``).
        mask_suffixes: mask file suffixes (default ``suffixes``); the first is the one suggested.
        mask_stem: the mask's stem for an image stem (ISIC: ``stem + "_segmentation"``).
        kind: "image" or "volume", for messages.
        empty_hint: appended to the error for an image folder without images.

    Returns:
        The pairs, sorted by image file name.

    Raises:
        DataError: a missing folder, no images, or (all listed at once, up to a cap) images without
            a mask, stems that two files share and files that are broken symbolic links.
    """
    _require_pair_dirs(image_dir, mask_dir, kind)
    mask_suffixes = suffixes if mask_suffixes is None else mask_suffixes
    problems: list[str] = []
    images = _files_by_stem(image_dir, suffixes, kind, problems)
    masks = _files_by_stem(mask_dir, mask_suffixes, "mask", problems)
    if not images and not problems:
        raise DataError(f"no {kind}s ({', '.join(suffixes)}) in {image_dir}{empty_hint}")
    others = " (or another image suffix)" if len(mask_suffixes) > 1 and mask_suffixes == suffixes else ""
    pairs = []
    claimed = {mask_stem(stem) for stem in images}
    near_miss = _near_misses({stem: path for stem, path in masks.items() if stem not in claimed})
    unread = None
    for stem, image in images.items():
        mask = masks.get(mask_stem(stem))
        if mask is None:
            expected = mask_dir / f"{mask_stem(stem)}{mask_suffixes[0]}"
            hint = near_miss(mask_stem(stem))
            if not hint:
                unread = _files_of_other_suffixes(mask_dir, mask_suffixes) if unread is None else unread
                hint = _misnamed_mask_hint(stem, mask_stem(stem), masks, unread, mask_suffixes)
            problems.append(f"mask for {kind} {image} is missing: expected {expected}{others}{hint}")
        else:
            pairs.append(Pair(stem, image, mask))
    if problems:
        if len(problems) == 1:
            raise DataError(problems[0])
        header = f"{len(problems)} problems pairing {image_dir} with {mask_dir}:"
        raise DataError(problem_report(header, problems))
    _warn_unclaimed_masks([path for stem, path in masks.items() if stem not in claimed], image_dir, kind)
    return pairs


def _files_of_other_suffixes(folder: Path, suffixes: Sequence[str]) -> dict[str, str]:
    """The names of ``folder``'s files that masks are not read from, by stem (``x.jpg`` as ``x``)."""
    found = {}
    for path in folder.iterdir():
        name = path.name
        if name.startswith(".") or file_stem(name, suffixes) is not None or "." not in name:
            continue
        head = name.rsplit(".", 1)[0]
        found.setdefault(head.rsplit(".", 1)[0] if name.lower().endswith(".gz") else head, name)
    return found


def _misnamed_mask_hint(image_stem: str, wanted: str, masks: dict[str, Path], unread: dict[str, str],
                        suffixes: Sequence[str]) -> str:
    """For a missing mask: a file of its stem whose suffix masks are not read from (an ISIC mask saved
    as JPEG), or a mask named as its image where this layout names masks otherwise; "" if none."""
    if wanted in unread:
        name = unread[wanted]
        lossy = (": JPEG's compression changes the labels at every edge; save masks losslessly"
                 if name.lower().endswith((".jpg", ".jpeg")) else "")
        return f" ({name} is there, but masks are read from {', '.join(suffixes)} files only{lossy})"
    if wanted != image_stem and image_stem in masks:
        return (f" ({masks[image_stem].name} is there, named as its image: this layout names the mask of "
                f"{image_stem} {wanted}{suffixes[0]})")
    return ""


def _warn_unclaimed_masks(masks: Sequence[Path], image_dir: Path, kind: str) -> None:
    """Say which masks no image claims: a dataset whose images are in a format not read (their
    masks left out with them) would otherwise shrink without a word."""
    if not masks:
        return
    names = listing([path.name for path in masks])
    warnings.warn(f"{len(masks)} mask file(s) have no {kind} in {image_dir} and are left out: {names}",
                  DataWarning, stacklevel=3)


def _near_misses(masks: dict[str, Path]) -> Callable[[str], str]:
    """A function giving, for a mask stem that is not there, a hint naming one of ``masks`` (those
    no image claims) that looks meant for it: the stem in other case, in another Unicode form
    (macOS writes names decomposed, NFD), or with an ending such as ``_mask`` (a common naming);
    "" when there is none."""

    def folded(name: str) -> str:
        return unicodedata.normalize("NFC", name).casefold()

    by_case = {stem.casefold(): path.name for stem, path in masks.items()}
    by_form = {folded(stem): path.name for stem, path in masks.items()}
    by_head: dict[str, tuple[str, str, str]] = {}
    for stem, path in masks.items():
        for separator in "_-":
            head, found, ending = stem.rpartition(separator)
            # A word ("_mask", "-label", "_gt"): "scan_11" is another scan, not scan's mask.
            if found and head and ending.isalpha():
                by_head.setdefault(folded(head), (path.name, separator + ending, head))

    def hint(wanted: str) -> str:
        if wanted.casefold() in by_case:
            return f" ({by_case[wanted.casefold()]} is there: stems must match in case too)"
        if folded(wanted) in by_form:
            return (f" ({by_form[folded(wanted)]} is there, its name in another Unicode form: macOS writes "
                    f"accents as separate characters (NFD); rename it, or copy the files with a tool that "
                    f"normalises names)")
        if folded(wanted) in by_head:
            name, ending, head = by_head[folded(wanted)]
            case = "" if head == wanted else ", and match the image's case"
            return (f" ({name} is there: a mask's stem must be its image's stem; rename the masks "
                    f"without the '{ending}' ending{case})")
        return ""

    return hint


def _stat(path: Path) -> tuple[int, ...]:
    try:
        stat = os.stat(path)
    except OSError:
        return (-1, -1, -1, -1)
    # ctime and inode too: a tool that rewrites a file and restores its mtime (rsync -t, cp -p,
    # os.utime) cannot restore those.
    return (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


def source_key(pairs: Sequence[Pair], *options) -> tuple:
    """What decoded samples depend on: every file's absolute path, size, modification and status
    change times and inode."""
    files = tuple(
        (os.path.abspath(path), *_stat(path)) for pair in pairs for path in (pair.image, pair.mask)
    )
    return (*options, files)


def pairs_bundle(source: CachedSource, splits: dict[str, list[Pair]], mapping, class_names: list[str],
                 seed: int) -> DataBundle:
    """Split datasets over one source of pairs (``source.pairs`` holds every pair of ``splits``)."""
    position = {pair: index for index, pair in enumerate(source.pairs)}
    datasets = {
        split: SourceDataset(source, [position[pair] for pair in splits[split]], mapping,
                             augment=split == "train", seed=seed)
        for split in SPLITS
    }
    return DataBundle(
        **datasets, num_classes=mapping.num_classes, class_names=class_names, in_channels=source.in_channels,
        spatial_dims=source.spatial_dims,
    )


def used_pairs(pairs: Sequence[Pair], splits: dict[str, list[Pair]]) -> list[Pair]:
    """The pairs of ``splits`` in the order found (so the cache does not depend on the seed)."""
    used = {pair for items in splits.values() for pair in items}
    return [pair for pair in pairs if pair in used]
