"""A seeded generator of lesion-like images and volumes, so training needs no download.

Two scenes, both written once for 2D images and 3D volumes:

- **lesions** (2 classes: background, lesion), in the spirit of dermoscopy (ISIC): skin with
  texture and uneven lighting, one irregular lobulated lesion with a soft border, inner texture
  and varying contrast, plus distractors that are *not* lesions: small moles and, in 2D, hairs
  crossing the image; colour shifts and noise on top.
- **ct** (4 classes: background, lung field, ground-glass opacity, consolidation), in the spirit
  of the NCP CT slices: a body in air, two dark lungs with vessel specks, hazy GGO patches and
  dense consolidations inside the lungs.

Sample ``index`` of split ``split`` is generated from ``(seed, split, index)`` only, the first time
it is loaded, then kept (quantized to 8 bits, like a photograph) in the sample store of
:mod:`cmrf.data.cache`: later epochs only augment it. A 64x64 image takes about a millisecond
to generate, a 256x256 one about 15 ms.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cmrf.data.base import SPLITS, DataBundle, DataError
from cmrf.data.cache import CachedSource, SourceDataset
from cmrf.data.imageio import quantize
from cmrf.data.store import Layout, StoreSpec, open_store

__all__ = ["SYNTHETIC_CLASS_NAMES", "SyntheticSegmentation", "SyntheticSource", "generate_sample",
           "synthetic_bundle"]

# Bump when the generator's output changes, so disk caches of old samples are not reused.
GENERATOR_VERSION = 1

SYNTHETIC_CLASS_NAMES = {
    2: ["background", "lesion"],
    4: ["background", "lung field", "GGO", "consolidation"],
}

_INTERPOLATION = {2: "bicubic", 3: "trilinear"}


# --- building blocks (any number of spatial dimensions) ----------------------------------------


def _coordinates(size: int, spatial_dims: int) -> list[np.ndarray]:
    """Open grid of pixel-centre coordinates in ``[-1, 1]``: one broadcastable array per axis."""
    axis = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2.0 - 1.0
    return [axis.reshape([size if d == i else 1 for d in range(spatial_dims)]) for i in range(spatial_dims)]


def smooth_field(rng: np.random.Generator, size: int, spatial_dims: int, cells: int) -> np.ndarray:
    """A smooth random field of shape ``(size,) * spatial_dims``, values of about unit spread.

    ``cells`` random values per side are interpolated to ``size``: few cells give slow, large
    undulations, many give fine texture.
    """
    coarse = torch.from_numpy(rng.standard_normal((1, 1) + (cells,) * spatial_dims).astype(np.float32))
    mode = _INTERPOLATION[spatial_dims]
    field = F.interpolate(coarse, size=(size,) * spatial_dims, mode=mode, align_corners=True)
    return field[0, 0].numpy()


def blob_level(coords, centre, radii, roughness: float, boundary_noise: np.ndarray) -> np.ndarray:
    """Level function of an irregular blob: negative inside, positive outside, 0 on the border.

    An ellipsoid (``centre``, ``radii`` per axis, in ``[-1, 1]`` units) whose border is pushed in
    and out by ``roughness * boundary_noise``, which makes it lobulated.
    """
    radius = np.sqrt(sum(((x - c) / r) ** 2 for x, c, r in zip(coords, centre, radii, strict=True)))
    return radius - 1.0 + roughness * boundary_noise


def soft_alpha(level: np.ndarray, sharpness: float) -> np.ndarray:
    """Opacity from a level function: 1 well inside, 0 well outside, a soft ramp across the border."""
    return 1.0 / (1.0 + np.exp(np.clip(level * sharpness, -30.0, 30.0)))


def _colour(rgb, channels: int, spatial_dims: int) -> np.ndarray:
    """An RGB colour as a ``(channels, 1, ...)`` array: itself for 3 channels, its grey for 1."""
    rgb = np.asarray(rgb, dtype=np.float32)
    values = rgb if channels == 3 else np.full(channels, rgb.mean(), dtype=np.float32)
    return values.reshape((channels,) + (1,) * spatial_dims)


def _blend(image: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return image * (1.0 - alpha) + colour * alpha


def _add_noise_and_shift(image, rng: np.random.Generator, colour_shift: bool):
    """Global brightness shift, per-channel gain (``colour_shift``) and Gaussian noise; clip to [0, 1]."""
    channels = image.shape[0]
    gain_shape = (channels if colour_shift else 1,) + (1,) * (image.ndim - 1)
    image = image * rng.uniform(0.93, 1.07, size=gain_shape).astype(np.float32) + rng.uniform(-0.05, 0.05)
    image = image + rng.normal(0.0, rng.uniform(0.01, 0.04), size=image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0)


# --- scenes ------------------------------------------------------------------------------------


def _hairs(rng: np.random.Generator, coords, size: int, count: int) -> np.ndarray:
    """Opacity of ``count`` thin, slightly curved dark lines (2D only)."""
    x, y = coords
    alpha = np.zeros((size, size), dtype=np.float32)
    pixel = 2.0 / size
    for _ in range(count):
        px, py = rng.uniform(-0.8, 0.8, size=2)
        angle = rng.uniform(0.0, np.pi)
        along = (x - px) * np.cos(angle) + (y - py) * np.sin(angle)
        across = -(x - px) * np.sin(angle) + (y - py) * np.cos(angle) + rng.uniform(-0.4, 0.4) * along**2
        width = rng.uniform(0.5, 1.0) * pixel
        alpha = np.maximum(alpha, np.clip(1.0 - np.abs(across) / width, 0.0, 1.0) * rng.uniform(0.5, 0.9))
    return alpha


def lesion_scene(rng: np.random.Generator, size: int, spatial_dims: int, channels: int):
    """Skin with one irregular lesion (class 1) and distractors; returns ``(image, mask)`` arrays."""
    coords = _coordinates(size, spatial_dims)
    skin = np.array([0.84, 0.66, 0.56]) + rng.uniform(-0.08, 0.06) + rng.normal(0.0, 0.02, size=3)
    lighting = sum(rng.uniform(-0.1, 0.1) * x for x in coords)
    texture = 0.04 * smooth_field(rng, size, spatial_dims, 8)
    texture = texture + 0.02 * smooth_field(rng, size, spatial_dims, 20)
    image = (_colour(skin, channels, spatial_dims) * (1.0 + lighting + texture)).astype(np.float32)

    # The lesion: brown, textured, with a darker core and a soft border of varying width; its
    # outline is an ellipse pushed in and out by coarse (lobes) and finer (ragged edge) noise.
    centre = rng.uniform(-0.3, 0.3, size=spatial_dims)
    radii = rng.uniform(0.22, 0.5, size=spatial_dims)
    boundary_noise = smooth_field(rng, size, spatial_dims, 5)
    boundary_noise = boundary_noise + 0.35 * smooth_field(rng, size, spatial_dims, 10)
    level = blob_level(coords, centre, radii, rng.uniform(0.25, 0.5), boundary_noise)
    mask = level < 0.0
    brown = np.array([1.0, 0.8, 0.72]) * rng.uniform(0.3, 0.6) + rng.normal(0.0, 0.02, size=3)
    lesion_rgb = skin * brown
    contrast = rng.uniform(0.45, 1.0)
    shading = 1.0 + 0.1 * smooth_field(rng, size, spatial_dims, 10) + 0.15 * np.clip(level, -1.0, 0.0)
    lesion_colour = _colour(skin + contrast * (lesion_rgb - skin), channels, spatial_dims) * shading
    image = _blend(image, lesion_colour, soft_alpha(level, rng.uniform(10.0, 30.0))[None])

    # Distractors: small moles anywhere, and hairs over everything (neither is in the mask).
    for _ in range(rng.integers(0, 4)):
        mole_centre = rng.uniform(-0.85, 0.85, size=spatial_dims)
        mole_level = blob_level(coords, mole_centre, rng.uniform(0.03, 0.07, size=spatial_dims), 0.0, 0.0)
        mole_colour = _colour(skin + rng.uniform(0.4, 0.8) * (lesion_rgb - skin), channels, spatial_dims)
        image = _blend(image, mole_colour, soft_alpha(mole_level, 15.0)[None])
    if spatial_dims == 2:
        hair_alpha = _hairs(rng, coords, size, int(rng.integers(0, 4)))
        image = _blend(image, _colour([0.15, 0.10, 0.08], channels, 2), hair_alpha[None])
    return _add_noise_and_shift(image, rng, colour_shift=True), mask.astype(np.int64)


def ct_scene(rng: np.random.Generator, size: int, spatial_dims: int, channels: int):
    """A CT-like slice or volume: lung field (1), GGO (2), consolidation (3); ``(image, mask)``."""
    coords = _coordinates(size, spatial_dims)
    body_level = blob_level(coords, [0.0] * spatial_dims, rng.uniform(0.8, 0.92, size=spatial_dims), 0.05,
                            smooth_field(rng, size, spatial_dims, 4))
    tissue = 0.55 + 0.03 * smooth_field(rng, size, spatial_dims, 12)
    image = 0.02 + (tissue - 0.02) * soft_alpha(body_level, 40.0)

    # Two lungs side by side along the last axis, taller than wide.
    lung_mask = np.zeros((size,) * spatial_dims, dtype=bool)
    lungs = []
    for side in (-1.0, 1.0):
        centre = rng.uniform(-0.08, 0.08, size=spatial_dims)
        centre[-1] = side * rng.uniform(0.33, 0.43)
        radii = rng.uniform(0.45, 0.6, size=spatial_dims)
        radii[-1] = rng.uniform(0.22, 0.3)
        lung_level = blob_level(coords, centre, radii, 0.1, smooth_field(rng, size, spatial_dims, 4))
        lung_mask |= lung_level < 0.0
        lungs.append((centre, radii))
        image = _blend(image, 0.1, soft_alpha(lung_level, 30.0))
    vessels = np.clip(smooth_field(rng, size, spatial_dims, max(8, size // 4)) - 1.2, 0.0, None)
    image = image + 0.25 * vessels * lung_mask

    mask = lung_mask.astype(np.int64)
    # Lesions sit inside a lung; hazy GGO first, then dense consolidation on top.
    for label, count, radius_range, intensity, sharpness in (
        (2, rng.integers(1, 4), (0.1, 0.25), 0.33, 8.0),
        (3, rng.integers(0, 3), (0.06, 0.16), 0.68, 25.0),
    ):
        for _ in range(count):
            lung_centre, lung_radii = lungs[rng.integers(2)]
            centre = lung_centre + rng.uniform(-0.6, 0.6, size=spatial_dims) * lung_radii
            level = blob_level(coords, centre, rng.uniform(*radius_range, size=spatial_dims), 0.2,
                               smooth_field(rng, size, spatial_dims, 6))
            inside = (level < 0.0) & lung_mask
            mask[inside] = label
            alpha = soft_alpha(level, sharpness) * lung_mask
            patch = intensity + 0.04 * smooth_field(rng, size, spatial_dims, 10)
            image = _blend(image, patch, alpha)

    image = np.broadcast_to(image[None], (channels,) + image.shape).astype(np.float32)
    return _add_noise_and_shift(image, rng, colour_shift=False), mask


_SCENES = {2: lesion_scene, 4: ct_scene}


def generate_sample(
    seed: int, index: int, size: int, num_classes: int = 2, spatial_dims: int = 2, channels: int = 3,
    split: str = "train",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate one synthetic sample from ``(seed, split, index)``.

    Args:
        seed, index: non-negative integers; the same pair always gives the same sample.
        size: side in pixels/voxels.
        num_classes: 2 (lesions) or 4 (CT-like). Default 2.
        spatial_dims: 2 (image ``(C, size, size)``) or 3 (volume ``(C, size, size, size)``).
        channels: image channels, 1 or 3. Default 3.
        split: ``"train"``, ``"val"`` or ``"test"``; each has its own stream of samples.

    Returns:
        ``(image, mask)``: float32 tensor ``(channels, *S)`` in ``[0, 1]``, int64 tensor ``(*S)``.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    image, mask = _SCENES[num_classes](rng, size, spatial_dims, channels)
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), torch.from_numpy(mask)


class SyntheticSource(CachedSource):
    """The samples of one split of the generator, generated once each and kept in a store.

    Args: as :class:`SyntheticSegmentation` (all checked there).
    """

    def __init__(self, num_samples: int, img_size: int, num_classes: int, spatial_dims: int, in_channels: int,
                 seed: int, split: str, cache: str = "memory", cache_dir=None):
        self.num_samples, self.img_size, self.num_classes = num_samples, img_size, num_classes
        self.spatial_dims, self.in_channels, self.seed, self.split = spatial_dims, in_channels, seed, split
        size = (img_size,) * spatial_dims
        layout = Layout(num_samples, (in_channels, *size), "uint8", size, "uint8")
        key = (GENERATOR_VERSION, seed, split, num_samples, img_size, num_classes, spatial_dims, in_channels)
        self.store = open_store(StoreSpec(cache, f"synthetic-{split}-{img_size}", key, cache_dir), layout)

    def __len__(self) -> int:
        return self.num_samples

    def decode(self, index: int, image: bool, mask: bool):
        pixels, classes = generate_sample(
            self.seed, index, self.img_size, self.num_classes, self.spatial_dims, self.in_channels, self.split
        )
        return quantize(pixels), classes.numpy().astype(np.uint8)


class SyntheticSegmentation(SourceDataset):
    """``num_samples`` synthetic samples, generated once each (see the module docstring).

    Args:
        num_samples: number of items.
        img_size: side in pixels/voxels.
        num_classes: 2 (lesions) or 4 (CT-like). Default 2.
        spatial_dims: 2 or 3. Default 2.
        in_channels: 1 or 3; default 3 for images, 1 for volumes.
        seed: seed of both the samples and their augmentation. Default 0.
        split: which stream of samples: ``"train"``, ``"val"`` or ``"test"``. Default ``"train"``.
        augment: augment items. Default False.
        cache: where generated samples are kept: "memory" (default), "disk" or "none".
        cache_dir: folder of disk caches (default ``~/.cache/cmrf/data``).

    Items: ``(image (in_channels, *S) float32 normalised, mask (*S) int64)``; the image is the
    generated one quantized to 8 bits.
    """

    def __init__(
        self,
        num_samples: int,
        img_size: int,
        num_classes: int = 2,
        spatial_dims: int = 2,
        in_channels: int | None = None,
        seed: int = 0,
        split: str = "train",
        augment: bool = False,
        cache: str = "memory",
        cache_dir=None,
    ):
        if num_classes not in _SCENES:
            raise ValueError(f"synthetic data has 2 or 4 classes, got num_classes={num_classes!r}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"synthetic data has spatial_dims 2 or 3, got {spatial_dims!r}")
        in_channels = (3 if spatial_dims == 2 else 1) if in_channels is None else in_channels
        if in_channels not in (1, 3):
            raise ValueError(f"synthetic data has 1 or 3 channels, got in_channels={in_channels!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        for name, value in (("num_samples", num_samples), ("img_size", img_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        source = SyntheticSource(num_samples, img_size, num_classes, spatial_dims, in_channels, seed, split,
                                 cache, cache_dir)
        super().__init__(source, None, None, augment=augment, seed=seed)
        self.num_samples = num_samples
        self.split = split


def synthetic_bundle(*, img_size: int, num_classes: int | None, spatial_dims: int, synthetic_samples: int,
                     seed: int, cache: str = "memory", cache_dir=None) -> DataBundle:
    """The generator's three splits: ``synthetic_samples`` for training, a quarter (at least 8) each
    for validation and test, each split its own stream of samples."""
    num_classes = num_classes or 2
    if num_classes not in SYNTHETIC_CLASS_NAMES:
        raise DataError(f"--num-classes {num_classes}: synthetic data has 2 (lesions) or 4 (CT-like) classes")
    held_out = max(8, synthetic_samples // 4)
    datasets = {
        split: SyntheticSegmentation(
            synthetic_samples if split == "train" else held_out, img_size, num_classes, spatial_dims,
            seed=seed, split=split, augment=split == "train", cache=cache, cache_dir=cache_dir,
        )
        for split in SPLITS
    }
    return DataBundle(
        **datasets, num_classes=num_classes, class_names=list(SYNTHETIC_CLASS_NAMES[num_classes]),
        in_channels=datasets["train"].in_channels, spatial_dims=spatial_dims,
    )
