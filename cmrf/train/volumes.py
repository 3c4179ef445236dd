"""NIfTI volumes for 3D training: ``root/images/<stem>.nii.gz`` with ``root/masks/<stem>.nii.gz``.

Needs nibabel (``pip install 'cmrf[nifti]'``). Volumes are used as stored (voxel axes, no
reorientation or resampling to a spacing): an image and its mask must have the same shape, and
are resized to ``img_size`` per side (trilinear for images, nearest for masks). Intensities are
clipped to the 0.5 and 99.5 percentiles of each volume and channel, then scaled to ``[0, 1]``,
which suits CT (Hounsfield units) and MRI (arbitrary units) alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cmrf.train.data import (
    SPLITS,
    DataBundle,
    DataError,
    Pair,
    PairedSegmentation,
    check_mask_values,
    class_names_for,
    infer_num_classes,
    present_values,
    require_dir,
    resize_pair,
    split_pairs,
)

__all__ = ["NiftiSegmentation", "find_nifti_pairs", "nifti_bundle", "read_volume", "read_volume_mask"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _nibabel():
    try:
        import nibabel
    except ImportError:
        raise DataError("reading NIfTI volumes needs nibabel: pip install 'cmrf[nifti]'") from None
    return nibabel


def _nifti_stem(path: Path) -> str | None:
    """The file name without ``.nii.gz``/``.nii``, or ``None`` for other files."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _nifti_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = _nifti_stem(path)
        if stem is None or not path.is_file() or path.name.startswith("."):
            continue
        if stem in files:
            raise DataError(
                f"two volumes with stem {stem!r} in {folder}: {files[stem].name}, {path.name}; keep one"
            )
        files[stem] = path
    return files


def find_nifti_pairs(root: str | Path) -> list[Pair]:
    """Pairs ``root/images/<stem>.nii[.gz]`` with ``root/masks/<stem>.nii[.gz]``.

    Raises:
        DataError: a missing folder, no volumes, two files with one stem, or a volume without mask.
    """
    root = require_dir(Path(root), "data root")
    image_dir = require_dir(root / "images", "image folder")
    mask_dir = require_dir(root / "masks", "mask folder")
    images, masks = _nifti_files(image_dir), _nifti_files(mask_dir)
    if not images:
        raise DataError(f"no NIfTI volumes (.nii.gz, .nii) in {image_dir}")
    pairs = []
    for stem, image in images.items():
        if stem not in masks:
            raise DataError(f"mask for volume {image} is missing: expected {mask_dir / stem}.nii.gz")
        pairs.append(Pair(stem, image, masks[stem]))
    return pairs


def _load(path: Path, kind: str):
    """A nibabel image (header read, data not yet), or :class:`DataError` naming ``path``."""
    nibabel = _nibabel()
    if not path.is_file():
        raise DataError(f"{kind} file {path} does not exist")
    try:
        return nibabel.load(str(path))
    except Exception as err:  # nibabel raises several types (ImageFileError, OSError, EOFError, ...)
        raise DataError(f"cannot read {kind} file {path}: {err}") from None


def _voxels(path: Path, kind: str) -> np.ndarray:
    image = _load(path, kind)
    try:
        return np.asarray(image.dataobj)
    except Exception as err:  # truncated or corrupt data blocks
        raise DataError(f"cannot read {kind} file {path}: {err}") from None


def _spatial_shape(path: Path, kind: str) -> tuple[int, ...]:
    shape = tuple(int(n) for n in _load(path, kind).shape)
    if len(shape) == 4 and kind == "image":
        shape = shape[:3]  # trailing channel axis
    if len(shape) != 3:
        expected = "(X, Y, Z) or (X, Y, Z, C)" if kind == "image" else "(X, Y, Z)"
        raise DataError(f"{kind} file {path} has shape {shape}; expected {expected}")
    return shape


def read_volume(path: str | Path) -> np.ndarray:
    """A NIfTI image as float32 ``(C, X, Y, Z)`` scaled to ``[0, 1]`` (see the module docstring)."""
    path = Path(path)
    _spatial_shape(path, "image")
    voxels = _voxels(path, "image").astype(np.float32)
    voxels = voxels[None] if voxels.ndim == 3 else np.moveaxis(voxels, -1, 0)
    if not np.isfinite(voxels).all():
        raise DataError(f"image file {path} holds NaN or infinite values")
    low = np.percentile(voxels, 0.5, axis=(1, 2, 3), keepdims=True)
    high = np.percentile(voxels, 99.5, axis=(1, 2, 3), keepdims=True)
    return np.clip((voxels - low) / np.maximum(high - low, 1e-6), 0.0, 1.0).astype(np.float32)


def read_volume_mask(path: str | Path) -> np.ndarray:
    """A NIfTI mask as int64 ``(X, Y, Z)`` of class indices; non-integer values raise :class:`DataError`."""
    path = Path(path)
    _spatial_shape(path, "mask")
    voxels = _voxels(path, "mask")
    if voxels.dtype.kind == "f" and (not np.isfinite(voxels).all() or (voxels != np.round(voxels)).any()):
        raise DataError(f"mask file {path} holds non-integer values; expected class indices")
    return voxels.astype(np.int64)


def check_volume_shapes(pairs: list[Pair]) -> None:
    """Check from headers (cheap) that every volume and its mask are readable and equal in shape."""
    for pair in pairs:
        image_shape, mask_shape = _spatial_shape(pair.image, "image"), _spatial_shape(pair.mask, "mask")
        if image_shape != mask_shape:
            raise DataError(
                f"volume {pair.image} has shape {image_shape} but its mask {pair.mask} has {mask_shape}; "
                "they must match"
            )


class NiftiSegmentation(PairedSegmentation):
    """Volume/mask pairs from NIfTI files, resized to ``img_size`` per side.

    Args:
        pairs: the samples (see :func:`find_nifti_pairs`).
        img_size: side of the cube the volumes are resized to.
        num_classes: class count; mask values must be in ``[0, num_classes)``.
        in_channels: channels of every volume (1 for 3D files, C for ``(X, Y, Z, C)`` files).
        augment: augment items. Default False.
        seed: augmentation seed. Default 0.

    Items: ``(image (in_channels, D, H, W) float32 normalised, mask (D, H, W) int64)`` with
    ``D = H = W = img_size``.
    """

    def __init__(self, pairs: list[Pair], img_size: int, num_classes: int, in_channels: int = 1,
                 augment: bool = False, seed: int = 0):
        super().__init__(pairs, img_size, num_classes, in_channels, 3, augment, seed)

    def load_pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pairs[index]
        image = read_volume(pair.image)
        mask = read_volume_mask(pair.mask)
        if image.shape[1:] != mask.shape:
            raise DataError(
                f"volume {pair.image} has shape {image.shape[1:]} but its mask {pair.mask} has {mask.shape}; "
                "they must match"
            )
        if image.shape[0] != self.in_channels:
            raise DataError(f"volume {pair.image} has {image.shape[0]} channels; expected {self.in_channels}")
        check_mask_values(mask, self.num_classes, pair.mask)
        return resize_pair(torch.from_numpy(image), torch.from_numpy(mask), self.img_size)


def _mask_values(path: Path) -> np.ndarray:
    return present_values(read_volume_mask(path))


def nifti_bundle(args, seed: int) -> DataBundle:
    """The train/val/test splits of a NIfTI folder (``--data folder --spatial-dims 3``)."""
    if args.root is None:
        raise DataError("--data folder needs --root DIR, the dataset folder")
    root = Path(args.root)
    pairs = find_nifti_pairs(root)
    check_volume_shapes(pairs)
    num_classes = args.num_classes or infer_num_classes(pairs, _mask_values)
    if num_classes < 2:
        raise DataError(f"--num-classes {num_classes}: segmentation needs at least 2 classes")
    first_shape = _load(pairs[0].image, "image").shape
    in_channels = 1 if len(first_shape) == 3 else int(first_shape[3])
    splits = split_pairs(args, seed, None, pairs)
    datasets = {
        split: NiftiSegmentation(splits[split], args.img_size, num_classes, in_channels,
                                 augment=split == "train", seed=seed)
        for split in SPLITS
    }
    return DataBundle(
        **datasets, num_classes=num_classes, class_names=class_names_for(root, num_classes),
        in_channels=in_channels, spatial_dims=3,
    )
