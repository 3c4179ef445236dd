"""What every dataset of ``cmrf.data`` shares: errors, the bundle, normalisation, augmentation and
the dataset base class. A leaf module: it imports nothing else of the package.

Every dataset yields ``(image, mask)``: ``image`` a float32 tensor ``(C, *S)`` normalised with
:func:`normalize`, ``mask`` an int64 tensor ``(*S)`` of class indices in ``[0, num_classes)``,
with ``S`` = ``img_size`` per side (so PyTorch's default collate stacks them).

Train datasets augment (see :func:`augment_pair`) while their ``augment`` attribute is ``True``.
All randomness comes from ``(seed, epoch, index)``: call ``dataset.set_epoch(epoch)`` before each
epoch and a seeded run gives the same batches with or without DataLoader workers. ``epoch`` and
``augment`` live in shared memory, so persistent DataLoader workers see every change.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cmrf.constants import NORMALIZE_MEAN, NORMALIZE_STD

__all__ = [
    "SPLITS",
    "DataBundle",
    "DataError",
    "DataWarning",
    "SegmentationDataset",
    "augment_pair",
    "denormalize",
    "listing",
    "normalize",
    "shared_zeros",
]

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad input data: the message names the file or option and what was expected."""

    def __init__(self, message: str = ""):
        # A DataLoader worker's error is re-raised in the main process as DataError(text) where the
        # text holds the worker's whole traceback; keep only our one-line message, which ends it.
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def read_text_lines(path) -> list[str]:
    """The lines of a text file the user wrote (split lists, ``classes.txt``): UTF-8, with or
    without the byte-order mark Windows editors put first; other encodings are a :class:`DataError`.
    """
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8 "
            f"(PowerShell 5's '>' writes UTF-16)"
        ) from None


class DataWarning(UserWarning):
    """Data was used in a way the user should know about (e.g. a cache fell back to disk)."""


def listing(names: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` of ``names`` joined by commas, with ", ..." when there are more: what
    an error or warning shows of a long list (the count it gives tells the rest)."""
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


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


# --- the dataset base class ----------------------------------------------------------------------


def shared_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor in shared memory: DataLoader workers (fork or spawn) see the same memory.

    The block is not filled or copied, but torch reserves all of it in ``/dev/shm`` at once (so a
    full ``/dev/shm`` fails here, not at a write). Where shared memory cannot be had, an ordinary
    tensor is returned (workers then get copies).
    """
    numel = math.prod(shape)
    try:
        # Unlike zeros(...).share_memory_(), this neither fills nor copies the whole block.
        storage = torch.UntypedStorage._new_shared(numel * torch.empty(0, dtype=dtype).element_size())
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    except (AttributeError, RuntimeError, OSError, TypeError):
        tensor = torch.zeros(shape, dtype=dtype)
        try:
            return tensor.share_memory_()
        except (RuntimeError, OSError):
            return tensor


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


class SegmentationDataset(Dataset):
    """Base class: normalisation and seeded augmentation around a subclass's ``load_pair``.

    Subclasses implement ``__len__`` and ``load_pair(index) -> (image, mask)`` with ``image`` a
    float tensor ``(C, *S)`` in ``[0, 1]`` and ``mask`` an int64 tensor ``(*S)``.

    ``augment`` and ``epoch`` are kept in a small shared-memory tensor, so setting them in the
    main process reaches DataLoader workers that are already running (``persistent_workers``).

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        augment: augment items (switch off by setting the attribute). Default False.
        seed: seed of the augmentation (a non-negative integer). Default 0.
    """

    def __init__(self, spatial_dims: int = 2, augment: bool = False, seed: int = 0):
        self.spatial_dims = spatial_dims
        self.seed = _non_negative_int("seed", seed)
        self._state = shared_zeros((2,), torch.int64)  # [epoch, augment]
        self.augment = augment

    @property
    def epoch(self) -> int:
        """The epoch whose augmentation draws items get (see :meth:`set_epoch`)."""
        return int(self._state[0])

    @property
    def augment(self) -> bool:
        """Whether items are augmented."""
        return bool(self._state[1])

    @augment.setter
    def augment(self, value: bool) -> None:
        self._state[1] = bool(value)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s augmentation draws from now on (0-based or 1-based, any int >= 0)."""
        self._state[0] = _non_negative_int("epoch", epoch)

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
