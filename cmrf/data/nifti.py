"""NIfTI volumes for 3D training: ``root/images/<stem>.nii.gz`` with ``root/masks/<stem>.nii.gz``.

Needs nibabel (``pip install 'cmrf[nifti]'``). Volumes are used as stored (voxel axes, no
reorientation or resampling to a spacing): an image and its mask must have the same shape, and
are resized to ``img_size`` per side (trilinear for images, nearest for masks). Intensities are
clipped to the 0.5 and 99.5 percentiles of each volume and channel, then scaled to ``[0, 1]``,
which suits CT (Hounsfield units) and MRI (arbitrary units) alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cmrf.data.base import DataBundle, DataError, normalize
from cmrf.data.cache import CachedSource, SourceDataset, run_checks
from cmrf.data.imageio import (
    dequantize,
    non_integer_mask,
    present_values,
    quantize,
    resize_image,
    resize_nearest,
)
from cmrf.data.masks import MAX_LISTED, MaskRule, MaskValues, resolve_classes
from cmrf.data.pairs import Pair, find_pairs, require_dir, source_key
from cmrf.data.splits import folder_split_bundle
from cmrf.data.store import Layout, StoreSpec, mask_dtype_for, open_store, reuse_disk_store

__all__ = ["NiftiSegmentation", "VolumePairSource", "find_nifti_pairs", "load_volume", "nifti_bundle",
           "read_volume", "read_volume_mask"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _nibabel():
    try:
        import nibabel
    except ImportError:
        raise DataError("reading NIfTI volumes needs nibabel: pip install 'cmrf[nifti]'") from None
    return nibabel


def find_nifti_pairs(root: str | Path) -> list[Pair]:
    """Pairs ``root/images/<stem>.nii[.gz]`` with ``root/masks/<stem>.nii[.gz]``.

    Raises:
        DataError: a missing folder, no volumes, two files with one stem, or volumes without masks.
    """
    root = require_dir(Path(root), "data root")
    return find_pairs(root / "images", root / "masks", NIFTI_SUFFIXES, kind="volume")


def _load(path: Path, kind: str):
    """A nibabel image (header read, data not yet), or :class:`DataError` naming ``path``."""
    nibabel = _nibabel()
    if not path.is_file():
        raise DataError(f"{kind} file {path} does not exist")
    try:
        return nibabel.load(str(path))
    except Exception as err:  # nibabel raises several types (ImageFileError, OSError, EOFError, ...)
        raise DataError(f"cannot read {kind} file {path}: {err}{_why_unreadable(path)}") from None


def _why_unreadable(path: Path) -> str:
    """What nibabel's "Cannot work out file type" leaves unsaid: a gzip file named ``.nii``, or a
    file shorter than a NIfTI header (an interrupted copy or download)."""
    try:
        with open(path, "rb") as file:
            start = file.read(2)
        size = path.stat().st_size
    except OSError:
        return ""
    if start == b"\x1f\x8b" and path.name.lower().endswith(".nii"):
        return " (the file is gzip-compressed: name it .nii.gz)"
    if size < 348 and not path.name.lower().endswith(".gz"):  # a NIfTI-1 header alone is 348 bytes
        return f" (the file has {size} bytes, fewer than a NIfTI header: truncated?)"
    return ""


def _voxels(path: Path, kind: str) -> np.ndarray:
    image = _load(path, kind)
    try:
        voxels = np.asarray(image.dataobj)
    except Exception as err:  # truncated or corrupt data blocks
        raise DataError(f"cannot read {kind} file {path}: {err}") from None
    if voxels.dtype.kind not in "biuf":  # RGB24 and other structured or complex voxels
        raise DataError(f"{kind} file {path} holds {voxels.dtype} voxels; expected numbers (integer or "
                        f"float), one value per voxel (channels on a fourth axis for images)")
    return voxels


def _placed(image) -> bool:
    """Whether a NIfTI file says where its voxels are: a coded sform or qform other than the
    identity (``Nifti1Image(mask, np.eye(4))``, a common way to save a mask made from the image's
    array, places nothing: its voxel order is the only link to the image, and it is the image's).
    Neither does a singular affine."""
    header = image.header
    try:
        coded = header.get_sform(coded=True)[1] > 0 or header.get_qform(coded=True)[1] > 0
    except AttributeError:  # a format without sform/qform codes: its affine is all there is
        coded = True
    # The identity in nibabel's RAS terms, or in ITK's LPS terms (diag(-1, -1, 1, 1)): default
    # geometry, as a mask written from an array without the image's header gets.
    placeholders = (np.eye(4), np.diag([-1.0, -1.0, 1.0, 1.0]))
    affine = image.affine
    if affine is None or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        return False  # a singular matrix (all zeros, a zero spacing) maps every voxel nowhere usable
    return coded and not any(np.allclose(affine, p) for p in placeholders)


def _same_grid(image_path: Path, mask_path: Path) -> None:
    """Refuse a mask placed on another voxel grid than its image (other orientation, spacing or
    origin): read in stored voxel order, as both are, it would be flipped or shifted against it.
    A file that does not say where its voxels are (see ``_placed``) is taken in voxel order."""
    import nibabel as nib

    image, mask = _load(image_path, "image"), _load(mask_path, "mask")
    if not (_placed(image) and _placed(mask)):
        return
    image_affine, mask_affine = image.affine, mask.affine
    # Where the mask's corner voxels fall on the image's grid, in voxels: the same grid within a
    # hundredth of a voxel (an sform against a float32 qform of the same grid differs by ~1e-3 mm).
    corners = np.array([[x, y, z, 1.0] for x in (0, mask.shape[0] - 1) for y in (0, mask.shape[1] - 1)
                        for z in (0, mask.shape[2] - 1)]).T
    on_image_grid = np.linalg.solve(image_affine, mask_affine @ corners)
    if np.abs(on_image_grid - corners)[:3].max() < 0.01:
        return

    def grid(affine) -> str:
        axes = "".join(nib.aff2axcodes(affine))
        spacing = ", ".join(f"{v:.3g}" for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        origin = ", ".join(f"{v:.3g}" for v in affine[:3, 3])
        return f"{axes} orientation, spacing ({spacing}), origin ({origin})"

    raise DataError(f"mask {mask_path} is stored on another voxel grid than its volume {image_path}: "
                    f"{grid(mask_affine)} against {grid(image_affine)}; volumes are used in stored voxel "
                    f"order, so resample the mask onto the volume's grid first")


def _layout(shape: tuple[int, ...], path: Path, kind: str) -> tuple[int, ...]:
    """The shape a file's voxels are used in: ``(X, Y, Z)`` for masks, ``(X, Y, Z)`` or
    ``(X, Y, Z, C)`` for images. NIfTI keeps its fourth axis for time and its fifth for vector
    components, and many tools write a single time point as an axis of 1: ``(X, Y, Z, 1, C)``
    images and ``(X, Y, Z, 1)`` or ``(X, Y, Z, 1, 1)`` masks are taken with those axes dropped."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 5 and shape[3] == 1:
        shape = shape[:3] + shape[4:]  # one time point of a vector image
    if kind == "mask" and len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 3 or (len(shape) == 4 and kind == "image"):
        return shape
    expected = ("(X, Y, Z) or (X, Y, Z, C) (also (X, Y, Z, 1, C))" if kind == "image"
                else "(X, Y, Z) (also (X, Y, Z, 1))")
    raise DataError(f"{kind} file {path} has shape {tuple(shape)}; expected {expected}")


def _spatial_shape(path: Path, kind: str) -> tuple[int, ...]:
    shape = _layout(_load(path, kind).shape, path, kind)[:3]  # an image's channel axis left out
    if 1 in shape:
        # Resizing to a cube would repeat the one slice along that axis: a 2D image trained as a volume.
        raise DataError(
            f"{kind} file {path} has shape {shape}: a single slice, not a volume (3D training "
            f"needs at least 2 voxels per axis); train 2D images with --spatial-dims 2 from PNG or "
            f"TIFF files (cmrf reads NIfTI only as volumes)"
        )
    return shape


def read_volume(path: str | Path) -> np.ndarray:
    """A NIfTI image as float32 ``(C, X, Y, Z)`` scaled to ``[0, 1]`` (see the module docstring)."""
    path = Path(path)
    _spatial_shape(path, "image")
    voxels = _voxels(path, "image")
    if not np.isfinite(voxels).all():  # checked as stored: float32 would make huge float64 values inf
        raise DataError(f"image file {path} holds NaN or infinite values")
    if voxels.dtype.kind == "f" and voxels.size and np.abs(voxels).max() > np.finfo(np.float32).max:
        raise DataError(f"image file {path} holds values beyond the float32 range (up to "
                        f"{np.abs(voxels).max():.3g}); rescale the volume (cmrf reads volumes as float32)")
    voxels = voxels.astype(np.float32)
    voxels = voxels.reshape(_layout(voxels.shape, path, "image"))
    voxels = voxels[None] if voxels.ndim == 3 else np.moveaxis(voxels, -1, 0)
    low = np.percentile(voxels, 0.5, axis=(1, 2, 3), keepdims=True)
    high = np.percentile(voxels, 99.5, axis=(1, 2, 3), keepdims=True)
    return np.clip((voxels - low) / np.maximum(high - low, 1e-6), 0.0, 1.0).astype(np.float32)


def load_volume(path: str | Path, img_size: int | None = None) -> torch.Tensor:
    """A NIfTI volume as the network sees it: float32 tensor ``(C, S, S, S)`` for ``img_size=S``, or
    ``(C, X, Y, Z)`` at the file's own size for ``None`` (default; for ``sliding_window_inference``).

    Read, scaled (:func:`read_volume`), resized, quantized to 16 bits and normalised exactly as the
    training data of :class:`NiftiSegmentation`: :func:`read_volume` alone gives ``[0, 1]``, which
    a trained model does not expect. The volume-level counterpart of :func:`cmrf.data.load_image`.

    Raises:
        DataError: the file is missing or not a volume nibabel can read.
    """
    voxels = torch.from_numpy(read_volume(path))
    if img_size is not None:
        voxels = resize_image(voxels, img_size)
    return normalize(dequantize(quantize(voxels, np.uint16)))


def read_volume_mask(path: str | Path) -> np.ndarray:
    """A NIfTI mask as int64 ``(X, Y, Z)`` of class indices; non-integer values raise :class:`DataError`."""
    path = Path(path)
    _spatial_shape(path, "mask")
    voxels = _voxels(path, "mask")
    voxels = voxels.reshape(_layout(voxels.shape, path, "mask"))
    if voxels.dtype.kind == "f" and (not np.isfinite(voxels).all() or (voxels != np.round(voxels)).any()):
        raise DataError(non_integer_mask(path, voxels, _header_scaling(path)))
    return voxels.astype(np.int64)


def _header_scaling(path: Path) -> str:
    """For a label file whose integers the header scales (``scl_slope``/``scl_inter``, written by
    nibabel for float labels saved with an integer type), why its values are not whole: the
    hint that replaces the interpolation one."""
    dataobj = _load(path, "mask").dataobj
    slope, inter = getattr(dataobj, "slope", 1.0), getattr(dataobj, "inter", 0.0)
    if slope in (None, 1.0) and inter in (None, 0.0):
        return ""
    return (f"the file stores integers scaled by its header (scl_slope={slope:.9g}, scl_inter={inter:.9g}), "
            f"which is not exact: save the labels with an integer type and no scaling "
            f"(image.set_data_dtype(np.uint8); image.header.set_slope_inter(1, 0))")


def _channels(path: Path) -> int:
    """Channels of a volume from its header: 1 for ``(X, Y, Z)``, C for ``(X, Y, Z, C)``."""
    shape = _layout(_load(path, "image").shape, path, "image")
    return 1 if len(shape) == 3 else int(shape[3])


class VolumePairSource(CachedSource):
    """NIfTI volume/mask pairs, checked at once and decoded once (see :mod:`cmrf.data.folder`).

    Args:
        pairs: the samples (see :func:`find_nifti_pairs`).
        img_size: side of the cube the volumes are resized to (trilinear; masks nearest).
        cache, cache_dir, name: see :class:`cmrf.data.folder.ImagePairSource`.

    Raises:
        DataError: listing every pair whose files are missing or unreadable, whose shapes differ,
            whose channel count differs from the first volume's, or whose mask is not integer.
    """

    spatial_dims = 3

    def __init__(self, pairs: Sequence[Pair], img_size: int, cache: str = "memory", cache_dir=None,
                 name: str = "nifti"):
        self.pairs = list(pairs)
        if not self.pairs:
            raise DataError("a dataset has no samples")
        self.img_size = img_size
        spec = StoreSpec(cache, f"{name}-{img_size}", source_key(self.pairs, img_size), cache_dir)
        self.store = reuse_disk_store(spec) or self._check_and_store(spec)
        self.in_channels = self.store.layout.image_shape[0]

    def __len__(self) -> int:
        return len(self.pairs)

    def _check(self, index: int) -> tuple[dict, np.ndarray]:
        pair = self.pairs[index]
        image_shape = _spatial_shape(pair.image, "image")
        mask = read_volume_mask(pair.mask)
        if image_shape != mask.shape:
            raise DataError(
                f"volume {pair.image} has shape {image_shape} but its mask {pair.mask} has {mask.shape}; "
                "they must match"
            )
        _same_grid(pair.image, pair.mask)
        facts = {"channels": _channels(pair.image), "values": present_values(mask).tolist(), "lossy": False}
        return facts, resize_nearest(mask, self.img_size)

    def _check_and_store(self, spec: StoreSpec):
        results = run_checks(self._check, len(self.pairs), "volume/mask pairs")
        facts = [fact for fact, _ in results]
        channels = facts[0]["channels"]
        odd = [f"{pair.image}: {fact['channels']} channels" for pair, fact in zip(self.pairs, facts)
               if fact["channels"] != channels]
        if odd:
            raise DataError(f"volumes must all have {channels} channel(s) like {self.pairs[0].image}; "
                            + "; ".join(odd[:MAX_LISTED]))
        size = (self.img_size,) * 3
        layout = Layout(len(self.pairs), (channels, *size), "uint16", size,
                        mask_dtype_for(v for fact in facts for v in fact["values"][:1] + fact["values"][-1:]))
        store = open_store(spec, layout)
        for index, (_, mask) in enumerate(results):
            store.put_mask(index, mask.astype(layout.mask_dtype))
        store.save_facts(facts)
        return store

    def mask_values(self) -> list[MaskValues]:
        """What every mask holds (learned by the check; no file is read again)."""
        facts = self.store.facts
        return [MaskValues(pair.mask, tuple(fact["values"])) for pair, fact in zip(self.pairs, facts)]

    def decode(self, index: int, image: bool, mask: bool):
        pair = self.pairs[index]
        volume = None
        if image:
            voxels = read_volume(pair.image)
            if voxels.shape[0] != self.in_channels:
                raise DataError(
                    f"volume {pair.image} has {voxels.shape[0]} channels; expected {self.in_channels}"
                )
            volume = quantize(resize_image(torch.from_numpy(voxels), self.img_size), np.uint16)
        return volume, resize_nearest(read_volume_mask(pair.mask), self.img_size) if mask else None

    def describe(self, index: int) -> str:
        return str(self.pairs[index].mask)


class NiftiSegmentation(SourceDataset):
    """Volume/mask pairs from NIfTI files, resized to ``img_size`` per side.

    A convenience over :class:`VolumePairSource` for one set of pairs (see
    :class:`cmrf.data.folder.FolderSegmentation`).

    Args:
        pairs: the samples (see :func:`find_nifti_pairs`).
        img_size: side of the cube the volumes are resized to.
        num_classes: the masks hold class indices ``0..num_classes-1``; default: binary masks only.
        augment: augment items. Default False.
        seed: augmentation seed. Default 0.
        mask_values, mask_threshold: the other mask options (see :class:`cmrf.data.masks.MaskRule`).
        cache, cache_dir: see :class:`cmrf.data.folder.ImagePairSource`.

    Items: ``(image (C, D, H, W) float32 normalised, mask (D, H, W) int64)`` with
    ``D = H = W = img_size`` and ``C`` the volumes' channels.
    """

    def __init__(self, pairs: Sequence[Pair], img_size: int, num_classes: int | None = None,
                 augment: bool = False, seed: int = 0, *, mask_values: Sequence[int] | None = None,
                 mask_threshold: int | None = None, cache: str = "memory", cache_dir=None):
        source = VolumePairSource(pairs, img_size, cache, cache_dir)
        rule = MaskRule(num_classes, None if mask_values is None else tuple(mask_values), mask_threshold)
        mapping = resolve_classes(source.mask_values(), rule)
        super().__init__(source, None, mapping, augment=augment, seed=seed)


def nifti_bundle(*, root, img_size: int, seed: int, rule: MaskRule, val_fraction: float,
                 test_fraction: float, split_dir=None, cache: str = "memory",
                 cache_dir=None) -> DataBundle:
    """The splits of a NIfTI folder (``--data folder --spatial-dims 3``); every split checked at once."""
    root = Path(root)
    return folder_split_bundle(
        root, find_nifti_pairs(root), lambda used: VolumePairSource(used, img_size, cache, cache_dir),
        seed=seed, rule=rule, val_fraction=val_fraction, test_fraction=test_fraction, split_dir=split_dir,
    )
