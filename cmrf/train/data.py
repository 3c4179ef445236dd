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

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "DataBundle",
    "DataError",
    "FolderSegmentation",
    "SegmentationDataset",
    "add_data_arguments",
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

# Images are scaled to [0, 1] then mapped to roughly zero mean, unit spread with these constants,
# the same for every channel and every dataset, so a model trained on one source accepts another.
NORMALIZE_MEAN = 0.5
NORMALIZE_STD = 0.25

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
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.spatial_dims = spatial_dims
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s augmentation draws from now on (0-based or 1-based, any int >= 0)."""
        self.epoch = int(epoch)

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
