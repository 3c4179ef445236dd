"""Segmentation datasets for training and evaluation: synthetic, ISIC 2018, image folders, NIfTI.

Every dataset yields ``(image, mask)``: ``image`` a float32 tensor ``(C, *S)`` normalised with
:func:`normalize`, ``mask`` an int64 tensor ``(*S)`` of class indices in ``[0, num_classes)``,
with ``S`` = ``img_size`` per side (so PyTorch's default collate stacks them).

Train datasets augment (see :func:`augment_pair`) while their ``augment`` attribute is ``True``.
All randomness comes from ``(seed, epoch, index)``: call ``dataset.set_epoch(epoch)`` before each
epoch and a seeded run gives the same batches with or without DataLoader workers.

Bad data raises :class:`DataError` (a ``ValueError``) naming the file and what was expected.
Pairing, split sizes and image/mask sizes are checked when a dataset is built; mask values
when an item is loaded (that needs the whole mask decoded).
"""

from __future__ import annotations

import math
import numbers
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cmrf.constants import NORMALIZE_MEAN, NORMALIZE_STD

__all__ = [
    "DataBundle",
    "DataError",
    "FolderSegmentation",
    "SegmentationDataset",
    "DATA_CHOICES",
    "DATA_OPTIONS",
    "IMAGE_SUFFIXES",
    "augment_pair",
    "build_datasets",
    "denormalize",
    "find_folder_pairs",
    "find_isic_pairs",
    "load_image",
    "normalize",
    "read_image_file",
    "read_mask_file",
    "save_mask_png",
]

DATA_CHOICES = ("synthetic", "isic2018", "folder")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# ISIC 2018 Task 1 folder names as distributed, per split: (input folder, ground-truth folder).
ISIC_FOLDERS = {
    "train": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    "val": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
}
ISIC_MASK_SUFFIX = "_segmentation.png"

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad input data: the message names the file or option and what was expected."""

    def __init__(self, message: str = ""):
        # A DataLoader worker's error is re-raised in the main process as DataError(text) where the
        # text holds the worker's whole traceback; keep only our one-line message, which ends it.
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


@dataclass
class DataBundle:
    """The three splits of a dataset and what a model needs to know about them.

    Attributes:
        train, val, test: datasets of ``(image (C, *S) float32, mask (*S) int64)`` items.
        num_classes: number of classes, background included.
        class_names: one name per class index.
        in_channels: image channels ``C``.
        spatial_dims: 2 for images, 3 for volumes.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: list[str]
    in_channels: int
    spatial_dims: int


# --- normalisation -------------------------------------------------------------------------------


def normalize(image: torch.Tensor) -> torch.Tensor:
    """Map an image with values in ``[0, 1]`` to the network's input range (float32)."""
    return ((image - NORMALIZE_MEAN) / NORMALIZE_STD).to(torch.float32)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, clamped to ``[0, 1]`` (for overlays)."""
    return (image * NORMALIZE_STD + NORMALIZE_MEAN).clamp(0.0, 1.0)


# --- augmentation --------------------------------------------------------------------------------

# Offsets that keep the random streams of augmentation and sample generation apart.
AUGMENT_STREAM = 7919


def _random_flips_and_rot90(image, mask, rng: np.random.Generator, spatial_dims: int):
    axes = range(1, spatial_dims + 1)  # spatial axes of the image (axis 0 is channels)
    flip_axes = [axis for axis in axes if rng.random() < 0.5]
    if flip_axes:
        image = image.flip(flip_axes)
        mask = mask.flip([axis - 1 for axis in flip_axes])
    turns = int(rng.integers(4))
    # Rotate in one plane: the only one in 2D, a random pair of axes in 3D (sides are equal).
    plane = sorted(rng.choice(list(axes), size=2, replace=False).tolist())
    if turns:
        image = torch.rot90(image, turns, plane)
        mask = torch.rot90(mask, turns, [axis - 1 for axis in plane])
    return image, mask


def _affine_matrix(rng: np.random.Generator, spatial_dims: int) -> torch.Tensor:
    """A light random similarity: scale 0.85-1.15, rotation up to 15 degrees, shift up to 6%."""
    scale = rng.uniform(0.85, 1.15)
    angle = math.radians(rng.uniform(-15.0, 15.0))
    rotation = np.eye(spatial_dims)
    i, j = sorted(rng.choice(spatial_dims, size=2, replace=False).tolist())
    rotation[i, i] = rotation[j, j] = math.cos(angle)
    rotation[i, j], rotation[j, i] = -math.sin(angle), math.sin(angle)
    shift = rng.uniform(-0.06, 0.06, size=(spatial_dims, 1))
    theta = np.concatenate([rotation / scale, shift], axis=1)
    return torch.as_tensor(theta, dtype=torch.float32).unsqueeze(0)


def _random_affine(image, mask, rng: np.random.Generator, spatial_dims: int):
    theta = _affine_matrix(rng, spatial_dims)
    grid = F.affine_grid(theta, [1, 1, *image.shape[1:]], align_corners=False)
    # Border padding for both, so image and mask agree on what fills the corners.
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    mask = F.grid_sample(
        mask[None, None].to(torch.float32), grid, mode="nearest", padding_mode="border", align_corners=False
    )[0, 0]
    return image, mask.round().to(torch.int64)


def _random_photometric(image, rng: np.random.Generator):
    channels = image.shape[0]
    spatial_ones = (1,) * (image.dim() - 1)
    gain = torch.as_tensor(rng.uniform(0.95, 1.05, size=channels), dtype=torch.float32)
    if channels > 1:  # a colour shift only makes sense with colour channels
        image = image * gain.view(channels, *spatial_ones)
    mean = image.mean()
    image = (image - mean) * rng.uniform(0.8, 1.2) + mean + rng.uniform(-0.08, 0.08)
    image = image.clamp(0.0, 1.0) ** rng.uniform(0.8, 1.25)
    return image


def augment_pair(
    image: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator, spatial_dims: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly flip, rotate by 90 degrees, lightly transform and recolour an image and its mask.

    Args:
        image: float tensor ``(C, *S)`` with values in ``[0, 1]``; all sides of ``S`` equal.
        mask: int64 tensor ``(*S)``.
        rng: the source of randomness (seed it from sample, epoch and seed for reproducibility).
        spatial_dims: 2 or 3.

    Returns:
        ``(image, mask)`` of the same shapes; image values stay in ``[0, 1]``.
    """
    image, mask = _random_flips_and_rot90(image, mask, rng, spatial_dims)
    if rng.random() < 0.5:
        image, mask = _random_affine(image, mask, rng, spatial_dims)
    if rng.random() < 0.8:
        image = _random_photometric(image, rng)
    return image.contiguous(), mask.contiguous()


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


class SegmentationDataset(Dataset):
    """Base class: normalisation and seeded augmentation around a subclass's ``load_pair``.

    Subclasses implement ``__len__`` and ``load_pair(index) -> (image, mask)`` with ``image`` a
    float tensor ``(C, *S)`` in ``[0, 1]`` and ``mask`` an int64 tensor ``(*S)``.

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        augment: augment items (switch off by setting the attribute). Default False.
        seed: seed of the augmentation (a non-negative integer). Default 0.
    """

    def __init__(self, spatial_dims: int = 2, augment: bool = False, seed: int = 0):
        self.spatial_dims = spatial_dims
        self.augment = augment
        self.seed = _non_negative_int("seed", seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s augmentation draws from now on (0-based or 1-based, any int >= 0)."""
        self.epoch = _non_negative_int("epoch", epoch)

    def load_pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        index = index % len(self)
        image, mask = self.load_pair(index)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index, AUGMENT_STREAM])
            image, mask = augment_pair(image, mask, rng, self.spatial_dims)
        return normalize(image), mask


# --- reading and writing files -------------------------------------------------------------------


def _open_image(path: Path, kind: str, draft: tuple[str, int] | None = None):
    """Open and decode ``path`` with Pillow, or raise :class:`DataError` naming it.

    ``draft=(mode, side)`` lets JPEG decoding skip detail finer than ``side`` per side needs (much
    faster for large photographs that are resized down anyway).
    """
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{kind} file {path} does not exist")
    try:
        image = Image.open(path)
        if draft is not None and image.format == "JPEG":
            image.draft(draft[0], (draft[1], draft[1]))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"cannot read {kind} file {path}: {err}") from None
    return image


def _image_size(path: Path, kind: str) -> tuple[int, int]:
    """``(width, height)`` from the file header only (cheap), or :class:`DataError`."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{kind} file {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"cannot read {kind} file {path}: {err}") from None


def read_image_file(path: str | Path, in_channels: int = 3, min_side: int | None = None) -> np.ndarray:
    """Read an image file as a float32 array ``(H, W, in_channels)`` with values in ``[0, 1]``.

    8-bit images are divided by 255; 16-bit and float images (e.g. CT slices saved as 16-bit PNG)
    are min-max scaled per image. ``in_channels`` 3 gives RGB, 1 gives grey levels. With
    ``min_side``, a JPEG may be decoded at a reduced scale (1/2 to 1/8) whose sides stay at least
    ``min_side``: for images that will be resized to ``min_side`` anyway.

    Raises:
        DataError: the file is missing or not an image Pillow can read.
    """
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
    path = Path(path)
    draft = None if min_side is None else ("RGB" if in_channels == 3 else "L", min_side)
    image = _open_image(path, "image", draft)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
        values = values[..., None]
        return np.repeat(values, in_channels, axis=-1) if in_channels == 3 else values
    values = np.asarray(image.convert("RGB" if in_channels == 3 else "L"), dtype=np.float32) / 255.0
    return values if in_channels == 3 else values[..., None]


def decode_mask(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`read_mask_file`, fast for large masks: ``(values, present)``.

    ``values`` keeps the file's small integer type (0/255 already mapped to 0/1) and ``present``
    lists its distinct values, counted by Pillow for 8-bit masks instead of by a sort.
    """
    path = Path(path)
    image = _open_image(path, "mask")
    if image.mode in ("LA", "PA"):
        image = image.getchannel(0)
    values = np.asarray(image)
    if values.ndim == 3:
        if not (values[..., :3] == values[..., :1]).all():
            raise DataError(
                f"mask file {path} is a colour image; expected class indices (grey levels or a palette PNG)"
            )
        values = values[..., 0]
    if values.dtype.kind == "b":
        values = values.view(np.uint8)
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or (values != np.round(values)).any():
            raise DataError(f"mask file {path} holds non-integer values; expected class indices")
        values = values.astype(np.int64)
    # Pillow's histogram counts 8-bit values in C, far faster than numpy on a large mask.
    eight_bit = image.mode in ("L", "P")
    present = np.flatnonzero(image.histogram()[:256]) if eight_bit else present_values(values)
    if present.size and set(present.tolist()) <= {0, 255} and present[-1] == 255:
        values = (values == 255).view(np.uint8)  # a binary 0/255 mask
        present = (present == 255).astype(np.int64)
    return values, present


def read_mask_file(path: str | Path) -> np.ndarray:
    """Read a mask file as an int64 array ``(H, W)`` of class indices.

    Accepted: grey-level masks holding class indices ``0..K-1``; binary masks holding 0 and 255
    (255 becomes 1, as in ISIC); palette PNGs (their indices are the classes); RGB files whose three
    channels are equal. Values are not checked against a class count here.

    Raises:
        DataError: the file is missing, unreadable, in colour, or holds non-integer values.
    """
    return decode_mask(path)[0].astype(np.int64)


def resize_mask(mask: np.ndarray, img_size: int) -> torch.Tensor:
    """Resize a 2D mask ``(H, W)`` of class indices to ``(img_size, img_size)`` (nearest); int64 tensor.

    Pillow's nearest-neighbour resize samples pixel centres and works on the small integer type,
    which is far cheaper than converting a large mask first.
    """
    from PIL import Image

    if mask.shape != (img_size, img_size):
        small = mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.int32, copy=False)
        mask = np.asarray(Image.fromarray(small).resize((img_size, img_size), Image.NEAREST))
    return torch.from_numpy(mask.astype(np.int64))


def present_values(mask: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array (a counting pass, not a sort, when they are small)."""
    flat = np.asarray(mask).ravel()
    if flat.size and flat.dtype.kind in "iu" and flat.min() >= 0 and flat.max() < 65536:
        return np.flatnonzero(np.bincount(flat))
    return np.unique(flat)


def check_mask_values(mask: np.ndarray | torch.Tensor, num_classes: int, path) -> None:
    """Raise :class:`DataError` naming ``path`` if ``mask`` has values outside ``[0, num_classes)``."""
    check_class_range(present_values(np.asarray(mask)), num_classes, path)


def check_class_range(present: np.ndarray, num_classes: int, path) -> None:
    """Like :func:`check_mask_values`, given the sorted distinct values ``present`` of a mask."""
    bad = present[(present < 0) | (present >= num_classes)]
    if bad.size:
        lossy = str(path).lower().endswith((".jpg", ".jpeg"))
        hint = " (lossy JPEG masks blur class values; save masks as PNG)" if lossy else ""
        shown = ", ".join(str(v) for v in bad[:8].tolist()) + (", ..." if bad.size > 8 else "")
        raise DataError(
            f"mask file {path} has values {shown} outside the class range 0..{num_classes - 1} "
            f"(num_classes={num_classes}){hint}"
        )


def resize_image(image: torch.Tensor, img_size: int) -> torch.Tensor:
    """Resize ``image (C, *S)`` with values in ``[0, 1]`` to ``img_size`` per side.

    Bilinear with antialiasing for 2D images, trilinear for volumes (PyTorch has no antialiased
    trilinear); an image already at that size is returned as is.
    """
    spatial_dims = image.dim() - 1
    size = (img_size,) * spatial_dims
    if tuple(image.shape[1:]) != size:
        linear = {2: "bilinear", 3: "trilinear"}[spatial_dims]
        image = F.interpolate(image[None], size=size, mode=linear, align_corners=False,
                              antialias=spatial_dims == 2)[0].clamp(0.0, 1.0)
    return image.contiguous()


def resize_pair(image: torch.Tensor, mask: torch.Tensor, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``image (C, *S)`` (see :func:`resize_image`) and ``mask (*S)`` (nearest) to ``img_size``."""
    size = (img_size,) * mask.dim()
    if tuple(mask.shape) != size:
        mask = F.interpolate(mask[None, None].to(torch.float32), size=size, mode="nearest-exact")[0, 0]
    return resize_image(image, img_size), mask.round().to(torch.int64).contiguous()


def load_image(path: str | Path, img_size: int, in_channels: int = 3) -> torch.Tensor:
    """An image file as the network sees it: float32 tensor ``(in_channels, img_size, img_size)``.

    Read, resized and normalised exactly as the training data of :class:`FolderSegmentation`.

    Raises:
        DataError: the file is missing or not an image Pillow can read.
    """
    pixels = read_image_file(path, in_channels, min_side=img_size)
    return normalize(resize_image(torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1), img_size))


def _palette(num_colours: int) -> list[int]:
    """A flat RGB palette: black background, then well-separated colours, then grey levels."""
    base = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60)]
    colours = base + [(i, i, i) for i in range(len(base), 256)]
    return [channel for colour in colours[:max(num_colours, 1)] for channel in colour]


def save_mask_png(
    mask: torch.Tensor | np.ndarray, path: str | Path, num_classes: int | None = None,
    size: tuple[int, int] | None = None,
) -> Path:
    """Write a mask ``(H, W)`` of class indices as a PNG that :func:`read_mask_file` reads back.

    Two classes are written as a grey-level 0/255 PNG (the ISIC convention); more as a palette
    PNG whose pixel values are the class indices and whose colours tell classes apart.

    Args:
        mask: integer tensor or array ``(H, W)`` with values in ``[0, num_classes)``.
        path: output file (parent folders are created).
        num_classes: class count; default ``max(2, mask.max() + 1)``.
        size: optional ``(height, width)`` to resize to (nearest), e.g. the original image's.

    Returns:
        ``path`` as a ``Path``.
    """
    from PIL import Image

    values = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if values.ndim != 2:
        raise ValueError(f"mask must have shape (H, W), got {tuple(values.shape)}")
    num_classes = max(2, int(values.max()) + 1) if num_classes is None else num_classes
    if not 2 <= num_classes <= 256:
        raise ValueError(f"num_classes must be in 2..256 to save a PNG mask, got {num_classes}")
    check_mask_values(values, num_classes, path)
    if num_classes == 2:
        image = Image.fromarray((values * 255).astype(np.uint8), mode="L")
    else:
        image = Image.fromarray(values.astype(np.uint8), mode="P")
        image.putpalette(_palette(num_classes))
    if size is not None:
        image = image.resize((int(size[1]), int(size[0])), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# --- finding image/mask pairs --------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One sample on disk: its stem (identifier), image file and mask file."""

    stem: str
    image: Path
    mask: Path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist or is not a folder")
    return path


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
        and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _unique_by_stem(files: list[Path], folder: Path, kind: str) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    for file in files:
        if file.stem in by_stem:
            raise DataError(
                f"two {kind} files with stem {file.stem!r} in {folder}: "
                f"{by_stem[file.stem].name}, {file.name}; keep one"
            )
        by_stem[file.stem] = file
    return by_stem


def find_folder_pairs(root: str | Path) -> list[Pair]:
    """Pairs of a generic folder: ``root/images/<stem>.<ext>`` with ``root/masks/<stem>.<ext>``.

    Raises:
        DataError: a missing folder, no images, two files with one stem, or an image without mask.
    """
    root = require_dir(Path(root), "data root")
    image_dir = require_dir(root / "images", "image folder")
    mask_dir = require_dir(root / "masks", "mask folder")
    images = _unique_by_stem(_image_files(image_dir), image_dir, "image")
    masks = _unique_by_stem(_image_files(mask_dir), mask_dir, "mask")
    if not images:
        volumes = any(p.name.lower().endswith((".nii", ".nii.gz")) for p in image_dir.iterdir())
        hint = "; it holds NIfTI volumes: add --spatial-dims 3" if volumes else ""
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}{hint}")
    pairs = []
    for stem, image in images.items():
        if stem not in masks:
            raise DataError(
                f"mask for image {image} is missing: expected {mask_dir / stem}.png (or another image suffix)"
            )
        pairs.append(Pair(stem, image, masks[stem]))
    return pairs


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
        truth_dir = require_dir(root / truth_name, f"ground-truth folder for {input_dir.name}, expected")
        images = _unique_by_stem(_image_files(input_dir), input_dir, "image")
        if not images:
            raise DataError(f"no images in {input_dir}")
        pairs = []
        for stem, image in images.items():
            mask = truth_dir / f"{stem}{ISIC_MASK_SUFFIX}"
            if not mask.is_file():
                raise DataError(f"mask for image {image} is missing: expected {mask}")
            pairs.append(Pair(stem, image, mask))
        found[split] = pairs
    return found


def check_pair_sizes(pairs: list[Pair]) -> None:
    """Check from file headers (cheap) that every image and its mask are readable and equal in size."""
    for pair in pairs:
        image_size = _image_size(pair.image, "image")
        mask_size = _image_size(pair.mask, "mask")
        if image_size != mask_size:
            raise DataError(
                f"image {pair.image} is {image_size[0]}x{image_size[1]} but its mask {pair.mask} is "
                f"{mask_size[0]}x{mask_size[1]} (width x height); they must match"
            )


# --- splits --------------------------------------------------------------------------------------

SPLIT_STREAM = 104729


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


def _strip_suffixes(name: str) -> str:
    for suffix in (".nii.gz", *IMAGE_SUFFIXES, ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def split_from_files(pairs: list, split_dir: str | Path) -> dict[str, list]:
    """Splits listed in ``split_dir/{train,val,test}.txt``: one stem (or file name) per line.

    Blank lines and lines starting with ``#`` are skipped.

    Raises:
        DataError: a missing or empty split file, an unknown stem, or a stem in two splits.
    """
    split_dir = require_dir(Path(split_dir), "split folder")
    by_stem = {pair.stem: pair for pair in pairs}
    splits, seen = {}, {}
    for split in SPLITS:
        file = split_dir / f"{split}.txt"
        if not file.is_file():
            raise DataError(f"split file {file} does not exist; expected train.txt, val.txt and test.txt")
        items = []
        for line_number, line in enumerate(file.read_text().splitlines(), start=1):
            stem = _strip_suffixes(line.strip())
            if not stem or stem.startswith("#"):
                continue
            if stem not in by_stem:
                raise DataError(f"{file}, line {line_number}: no image/mask pair with stem {stem!r}")
            if stem in seen:
                raise DataError(f"{file}, line {line_number}: {stem!r} is already in {seen[stem]}")
            seen[stem] = file.name
            items.append(by_stem[stem])
        if not items:
            raise DataError(f"split file {file} lists no samples: the {split} split is empty")
        splits[split] = items
    return splits


# --- datasets on disk ----------------------------------------------------------------------------


class PairedSegmentation(SegmentationDataset):
    """Base of the datasets that read image/mask file pairs: holds the pairs and the sizes."""

    def __init__(self, pairs: list[Pair], img_size: int, num_classes: int, in_channels: int,
                 spatial_dims: int, augment: bool = False, seed: int = 0):
        super().__init__(spatial_dims=spatial_dims, augment=augment, seed=seed)
        if not pairs:
            raise DataError("a dataset split has no samples")
        self.pairs = list(pairs)
        self.img_size = img_size
        self.num_classes = num_classes
        self.in_channels = in_channels

    def __len__(self) -> int:
        return len(self.pairs)


class FolderSegmentation(PairedSegmentation):
    """Image/mask pairs from disk (ISIC 2018 or a generic folder), resized to ``img_size``.

    Args:
        pairs: the samples (see :func:`find_folder_pairs`, :func:`find_isic_pairs`).
        img_size: side of the square the images are resized to (bilinear; masks nearest).
        num_classes: class count; mask values must be in ``[0, num_classes)``.
        in_channels: 3 (RGB) or 1 (grey). Default 3.
        augment: augment items. Default False.
        seed: augmentation seed. Default 0.

    Items: ``(image (in_channels, img_size, img_size) float32 normalised, mask (img_size, img_size)
    int64)``. A mask with values out of range, or a size mismatch, raises :class:`DataError`.
    """

    def __init__(self, pairs: list[Pair], img_size: int, num_classes: int, in_channels: int = 3,
                 augment: bool = False, seed: int = 0):
        super().__init__(pairs, img_size, num_classes, in_channels, 2, augment, seed)

    def load_pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pairs[index]
        mask, present = decode_mask(pair.mask)
        width, height = _image_size(pair.image, "image")  # from the header: the image may be drafted
        if (height, width) != mask.shape:
            raise DataError(
                f"image {pair.image} is {width}x{height} but its mask {pair.mask} is "
                f"{mask.shape[1]}x{mask.shape[0]} (width x height); they must match"
            )
        check_class_range(present, self.num_classes, pair.mask)
        pixels = read_image_file(pair.image, self.in_channels, min_side=self.img_size)
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
        return resize_image(image, self.img_size), resize_mask(mask, self.img_size)


def _mask_file_values(path: Path) -> np.ndarray:
    return decode_mask(path)[1]


def infer_num_classes(pairs: list, distinct_values=_mask_file_values) -> int:
    """``max(2, largest mask value + 1)`` over all masks (reads every mask once).

    ``distinct_values(path)`` gives the sorted distinct values of a mask file (default: image masks).
    """
    largest = 0
    for pair in pairs:
        present = distinct_values(pair.mask)
        if present.size and present[0] < 0:
            raise DataError(f"mask file {pair.mask} has negative values; expected class indices >= 0")
        largest = max(largest, int(present[-1]) if present.size else 0)
    return max(2, largest + 1)


def class_names_for(root: Path | None, num_classes: int) -> list[str]:
    """Names from ``root/classes.txt`` (one per line) if present, else generic names."""
    if root is not None and (root / "classes.txt").is_file():
        file = root / "classes.txt"
        names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        if len(names) != num_classes:
            raise DataError(f"{file} names {len(names)} classes but the data has {num_classes}")
        return names
    if num_classes == 2:
        return ["background", "foreground"]
    return ["background"] + [f"class {k}" for k in range(1, num_classes)]


# The paper's 256 x 256 for images; volumes default to what a CPU can train.
DEFAULT_IMG_SIZE = {2: 256, 3: 64}

# The options of ``build_datasets`` and their defaults (the command line's ``cmrf.cli.data_args``).
DATA_OPTIONS = {
    "data": "synthetic",
    "root": None,
    "img_size": None,
    "num_classes": None,
    "val_fraction": 0.2,
    "test_fraction": 0.2,
    "split_dir": None,
    "synthetic_samples": 400,
    "spatial_dims": 2,
}


def _synthetic_bundle(args, seed: int) -> DataBundle:
    from cmrf.train.synthetic import SYNTHETIC_CLASS_NAMES, SyntheticSegmentation

    num_classes = args.num_classes or 2
    if num_classes not in SYNTHETIC_CLASS_NAMES:
        raise DataError(f"--num-classes {num_classes}: synthetic data has 2 (lesions) or 4 (CT-like) classes")
    train_count = args.synthetic_samples
    held_out = max(8, train_count // 4)
    datasets = {
        split: SyntheticSegmentation(
            train_count if split == "train" else held_out, args.img_size, num_classes, args.spatial_dims,
            seed=seed, split=split, augment=split == "train",
        )
        for split in SPLITS
    }
    return DataBundle(
        **datasets, num_classes=num_classes, class_names=list(SYNTHETIC_CLASS_NAMES[num_classes]),
        in_channels=datasets["train"].in_channels, spatial_dims=args.spatial_dims,
    )


def split_pairs(args, seed: int, official: dict[str, list] | None, all_pairs: list) -> dict[str, list]:
    """Explicit split files win; then the official splits that exist; fractions for the rest."""
    if args.split_dir is not None:
        return split_from_files(all_pairs, args.split_dir)
    if not official:
        return split_by_fractions(all_pairs, args.val_fraction, args.test_fraction, seed)
    splits = dict(official)
    missing = [split for split in ("val", "test") if split not in official]
    if missing:  # e.g. only ISIC's training folder: cut the missing held-out splits off it
        cut = split_by_fractions(
            official["train"],
            args.val_fraction if "val" in missing else 0.0,
            args.test_fraction if "test" in missing else 0.0,
            seed,
        )
        splits.update({split: cut[split] for split in ["train", *missing]})
    return splits


def _disk_bundle(args, seed: int) -> DataBundle:
    if args.root is None:
        raise DataError(f"--data {args.data} needs --root DIR, the dataset folder")
    root = Path(args.root)
    if args.data == "isic2018":
        if args.num_classes not in (None, 2):
            raise DataError(f"--num-classes {args.num_classes}: ISIC 2018 Task 1 has 2 classes")
        official = find_isic_pairs(root)
        all_pairs = [pair for pairs in official.values() for pair in pairs]
        num_classes, class_names = 2, ["background", "lesion"]
    else:
        official = None
        all_pairs = find_folder_pairs(root)
        num_classes = args.num_classes or infer_num_classes(all_pairs)
        if num_classes < 2:
            raise DataError(f"--num-classes {num_classes}: segmentation needs at least 2 classes")
        class_names = class_names_for(root, num_classes)
    check_pair_sizes(all_pairs)
    splits = split_pairs(args, seed, official, all_pairs)
    datasets = {
        split: FolderSegmentation(
            splits[split], args.img_size, num_classes, augment=split == "train", seed=seed
        )
        for split in SPLITS
    }
    return DataBundle(
        **datasets, num_classes=num_classes, class_names=class_names, in_channels=3, spatial_dims=2
    )


def build_datasets(seed: int = 0, **options) -> DataBundle:
    """Build the train/val/test datasets.

    Args:
        seed: non-negative seed of the synthetic samples, the fraction split and augmentation.
        **options: ``data`` ("synthetic", "isic2018" or "folder"), ``root``, ``img_size``,
            ``num_classes``, ``val_fraction``, ``test_fraction``, ``split_dir``,
            ``synthetic_samples``, ``spatial_dims``; defaults in ``DATA_OPTIONS``. An unset
            ``img_size`` is the default for ``spatial_dims`` (``DEFAULT_IMG_SIZE``).

    Raises:
        DataError: unknown option, missing root, missing/unpaired/unreadable files, size
            mismatches, empty splits.
    """
    unknown = sorted(set(options) - set(DATA_OPTIONS))
    if unknown:
        raise DataError(f"unknown data option(s) {', '.join(unknown)}; expected {', '.join(DATA_OPTIONS)}")
    args = types.SimpleNamespace(**{**DATA_OPTIONS, **options})
    if args.img_size is None:
        # 256^3 volumes would not fit a CPU's memory, so volumes get a smaller default.
        args.img_size = DEFAULT_IMG_SIZE[args.spatial_dims]
    if args.data == "synthetic":
        return _synthetic_bundle(args, seed)
    if args.data not in DATA_CHOICES:
        raise DataError(f"--data {args.data!r}: expected one of {', '.join(DATA_CHOICES)}")
    if args.spatial_dims == 3:
        if args.data != "folder":
            raise DataError(
                f"--data {args.data} holds 2D images; --spatial-dims 3 needs --data folder or synthetic"
            )
        from cmrf.train.volumes import nifti_bundle

        return nifti_bundle(args, seed)
    return _disk_bundle(args, seed)
