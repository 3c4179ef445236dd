"""Reading, resizing and writing 2D images and masks (Pillow), and the uint8/uint16 form in which
decoded samples are cached. Imports only :mod:`cmrf.data.base` of the package.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from cmrf.data.base import DataError, listing, normalize

__all__ = [
    "HIGH_BIT_MODES",
    "IMAGE_SUFFIXES",
    "ImageHeader",
    "MaskFile",
    "decode_image",
    "decode_mask",
    "dequantize",
    "image_header",
    "image_size",
    "load_image",
    "read_image_file",
    "read_mask_file",
    "resize_image",
    "resize_nearest",
    "save_mask_png",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# Pillow modes of images with more than 8 bits per sample (16-bit PNG/TIFF CT slices, float TIFF).
HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")

# Formats whose compression changes pixel values (Pillow opens some JPEGs as MPO).
LOSSY_FORMATS = ("JPEG", "MPO")


# TIFF compressions that change pixel values (Pillow's names of tags 6 and 7).
LOSSY_TIFF_COMPRESSIONS = ("jpeg", "tiff_jpeg")


def _unreadable() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file it cannot decode: OSError (a truncated file; an unknown
    format, its UnidentifiedImageError), ValueError, SyntaxError (a broken PNG chunk, a corrupt
    header), DecompressionBombError (more pixels than Pillow's safety limit), and TypeError and
    struct.error (a TIFF cut off inside its directory: "Missing dimensions", "unpack requires a
    buffer"). Only Pillow's calls are wrapped with it."""
    import struct

    from PIL import Image

    return (OSError, ValueError, SyntaxError, TypeError, struct.error, Image.DecompressionBombError)


def _webp_is_lossy(path: Path) -> bool:
    """Whether a WebP file holds lossy (VP8) image data rather than lossless (VP8L): Pillow reads
    both alike. Reads the RIFF chunk headers up to the first image chunk."""
    with open(path, "rb") as file:
        if file.read(12)[8:12] != b"WEBP":
            return False
        while len(header := file.read(8)) == 8:
            fourcc, size = header[:4], int.from_bytes(header[4:], "little")
            if fourcc in (b"VP8 ", b"VP8L"):
                return fourcc == b"VP8 "
            file.seek(size + (size & 1), 1)  # chunks are padded to an even size
    return False


def _is_lossy(image, path: Path) -> bool:
    """Whether ``path`` (opened as ``image``) was stored with a compression that changes pixel
    values: JPEG (also inside a TIFF) and lossy WebP, Pillow's default for ``.webp``."""
    if image.format in LOSSY_FORMATS or path.suffix.lower() in (".jpg", ".jpeg"):
        return True
    if image.format == "TIFF":
        return image.info.get("compression") in LOSSY_TIFF_COMPRESSIONS
    return image.format == "WEBP" and _webp_is_lossy(path)


class ImageHeader(NamedTuple):
    """What an image file's header says: ``height``, ``width``, Pillow ``mode`` and ``format``;
    ``quarter_turned``: its EXIF orientation turns it a quarter (the sides are the shown ones)."""

    height: int
    width: int
    mode: str
    format: str | None
    quarter_turned: bool = False


def _missing(path: Path, kind: str) -> DataError:
    return DataError(f"{kind} file {path} does not exist")


# Raw modes of colour files with 16 bits per sample (48-bit RGB PNG/TIFF, 16-bit grey + alpha):
# Pillow opens them as 8-bit RGB/RGBA and keeps only each sample's high byte. (A BMP's "BGR;16"
# is 16 bits per pixel, decoded in full, and does not match.)
_SIXTEEN_BIT_COLOUR = re.compile(r"^(RGB|RGBA|RGBX|LA);16[BLN]?$")


def _raw_modes(image) -> list[str]:
    """The raw (stored) modes of a just-opened image's tiles."""
    modes = []
    for tile in getattr(image, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        raw = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None
        if isinstance(raw, str):
            modes.append(raw)
    return modes


def _full_resolution_pages(image) -> int:
    """Pages of a just-opened TIFF, not counting reduced-resolution ones (thumbnails, pyramid
    levels: NewSubfileType bit 0); the image is left at its first page."""
    frames = int(getattr(image, "n_frames", 1) or 1)
    if frames == 1:
        return 1
    pages = 0
    for frame in range(frames):
        image.seek(frame)
        pages += not int(image.tag_v2.get(254, 0)) & 1
    image.seek(0)
    return pages


def _check_storage(image, path: Path, kind: str) -> None:
    """Refuse files Pillow would read as something else than stored, without a word: colour with
    16 bits per sample (read to 8 bits: class values lost, low-range data nearly black) and TIFFs
    of several pages (only the first is read)."""
    sixteen_bit = [raw for raw in _raw_modes(image) if _SIXTEEN_BIT_COLOUR.match(raw)]
    if sixteen_bit:
        loss = "its class values would be lost" if kind == "mask" else "only the high bytes would be kept"
        raise DataError(
            f"{kind} file {path} stores 16 bits per colour sample ({sixteen_bit[0]}), which Pillow reads "
            f"to 8 bits ({loss}); save it with 8-bit colour samples, or as a 16-bit grey (one channel) image"
        )
    pages = _full_resolution_pages(image) if image.format == "TIFF" else 1
    if pages > 1:
        raise DataError(
            f"{kind} file {path} is a TIFF of {pages} pages; cmrf reads single-page images (only the "
            f"first page would be used): save each page as a file of its own"
        )
    if image.format != "TIFF" and getattr(image, "is_animated", False):  # GIF, APNG, WebP
        raise DataError(
            f"{kind} file {path} is an animated {image.format} of {image.n_frames} frames; cmrf reads "
            f"single images (only the first frame would be used): save each frame as a file of its own"
        )


def image_header(path: str | Path, kind: str = "image") -> ImageHeader:
    """Read an image file's header only (cheap: no pixel is decoded).

    Args:
        path: the file.
        kind: what the file is, for error messages ("image", "mask").

    Raises:
        DataError: the file is missing or not an image Pillow can read.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise _missing(path, kind)
    try:
        with Image.open(path) as image:
            _check_storage(image, path, kind)
            height, width = image.height, image.width
            turned = _orientation(image) in _QUARTER_TURNS
            if turned:  # shown (and read) a quarter turn round
                height, width = width, height
            return ImageHeader(height, width, image.mode, image.format, turned)
    except DataError:  # a file read otherwise than stored (_check_storage): its own message
        raise
    except _unreadable() as err:
        raise _unreadable_file(path, kind, err) from None


def _unreadable_file(path: Path, kind: str, err: BaseException) -> DataError:
    """The error for a file Pillow could not read; an empty one (an interrupted copy or download)
    says so: Pillow's "cannot identify image file" does not."""
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            return DataError(f"cannot read {kind} file {path}: the file is empty (0 bytes)")
    return DataError(f"cannot read {kind} file {path}: {type(err).__name__}: {err}")


# EXIF orientation (tag 274): 1 is as stored; 2-8 are mirrorings and turns, 5-8 swap the sides.
_ORIENTATION_TAG = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)


def _orientation(image) -> int:
    """The EXIF orientation of a just-opened (not yet loaded) ``image`` still to be applied, read
    without decoding pixels. ``image_header`` and ``_open_image`` both ask here, so the sizes a
    header reports are those of the pixels read.

    TIFF: Pillow turns the image itself when it opens it (its size is already the shown one).
    PNG: only an eXIf chunk before the image data counts (one after it would need the whole file
    decoded to be seen).
    """
    if image.format == "TIFF" or (image.format == "PNG" and "exif" not in image.info):
        return 1
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a malformed or cut-off EXIF block (struct.error, SyntaxError...): as stored
        return 1


def image_size(path: str | Path, kind: str = "image") -> tuple[int, int]:
    """``(height, width)`` of an image file, from its header; :class:`DataError` if unreadable."""
    header = image_header(path, kind)
    return header.height, header.width


def _open_image(path: Path, kind: str, draft: tuple[str, int] | None = None):
    """Open and decode ``path`` with Pillow, or raise :class:`DataError` naming it.

    ``draft=(mode, side)`` lets JPEG decoding skip detail finer than ``side`` per side needs (much
    faster for large photographs that are resized down anyway).
    """
    from PIL import Image, ImageOps

    if not path.is_file():
        raise _missing(path, kind)
    try:
        image = Image.open(path)
        _check_storage(image, path, kind)
        # As viewers, annotation tools and OpenCV's imread show it: a photo taken sideways carries
        # the turn in EXIF, and its mask was drawn on the turned view. Read before loading, as
        # image_header reads it.
        orientation = _orientation(image)
        if draft is not None and image.format == "JPEG":
            image.draft(draft[0], (draft[1], draft[1]))
        image.load()
        if orientation != 1:
            turned = ImageOps.exif_transpose(image)
            turned.format = image.format  # a new image has none: decode_mask asks if it was lossy
            image = turned
    except DataError:
        raise
    except _unreadable() as err:
        raise _unreadable_file(path, kind, err) from None
    return image


# --- images --------------------------------------------------------------------------------------


def _read_image(path: Path, in_channels: int, min_side: int | None) -> tuple[np.ndarray, bool]:
    """``(pixels (H, W, in_channels) float32 in [0, 1], high_bit)``: see :func:`read_image_file`."""
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
    draft = None if min_side is None else ("RGB" if in_channels == 3 else "L", min_side)
    image = _open_image(path, "image", draft)
    if image.mode in HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float32)
        bad = int(values.size - np.isfinite(values).sum())
        if bad:  # a NaN would make the min-max scaling blank the whole image
            raise DataError(f"image file {path} holds {bad} non-finite pixel value(s) (NaN or inf); "
                            f"expected finite intensities")
        low, high = float(values.min()), float(values.max())
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
        values = values[..., None]
        return (np.repeat(values, in_channels, axis=-1) if in_channels == 3 else values), True
    values = np.asarray(image.convert("RGB" if in_channels == 3 else "L"), dtype=np.float32) / 255.0
    return (values if in_channels == 3 else values[..., None]), False


def read_image_file(path: str | Path, in_channels: int = 3, min_side: int | None = None) -> np.ndarray:
    """Read an image file as a float32 array ``(H, W, in_channels)`` with values in ``[0, 1]``.

    8-bit images are divided by 255; 16-bit and float images (e.g. CT slices saved as 16-bit PNG)
    are min-max scaled per image. ``in_channels`` 3 gives RGB, 1 gives grey levels. With
    ``min_side``, a JPEG may be decoded at a reduced scale (1/2 to 1/8) whose sides stay at least
    ``min_side``: for images that will be resized to ``min_side`` anyway.

    Raises:
        DataError: the file is missing or not an image Pillow can read.
    """
    return _read_image(Path(path), in_channels, min_side)[0]


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


def quantize(image: torch.Tensor | np.ndarray, dtype=np.uint8) -> np.ndarray:
    """Values in ``[0, 1]`` as ``uint8`` (256 levels) or ``uint16`` (65536 levels), rounded."""
    dtype = np.dtype(dtype)
    values = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    top = np.iinfo(dtype).max
    return np.rint(np.clip(values, 0.0, 1.0) * top).astype(dtype)


def dequantize(values: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`quantize`: a float32 tensor with values in ``[0, 1]``."""
    return torch.from_numpy(values.astype(np.float32) / float(np.iinfo(values.dtype).max))


def as_storage(values: np.ndarray, dtype) -> np.ndarray:
    """A quantized image in a (possibly wider) storage type: 8-bit level ``k`` is ``257 k`` in uint16."""
    dtype = np.dtype(dtype)
    if values.dtype == dtype:
        return values
    if values.dtype == np.uint8 and dtype == np.uint16:
        return values.astype(np.uint16) * 257  # exact: k / 255 == 257 k / 65535
    raise ValueError(f"cannot store {values.dtype} image values as {dtype}")


def decode_image(path: str | Path, img_size: int, in_channels: int = 3) -> np.ndarray:
    """An image file read, resized to ``img_size`` and quantized: ``(in_channels, S, S)``.

    8-bit files give ``uint8``, 16-bit and float files ``uint16`` (their own precision), so a
    cached sample holds what a fresh decode gives, exactly.

    Raises:
        DataError: the file is missing or not an image Pillow can read.
    """
    pixels, high_bit = _read_image(Path(path), in_channels, img_size)
    image = resize_image(torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1), img_size)
    return quantize(image, np.uint16 if high_bit else np.uint8)


def non_integer_mask(path, values: np.ndarray, cause: str = "") -> str:
    """The error for a float mask with values that are no class (interpolated labels, NaN);
    ``cause``, where known, replaces the usual one (linear interpolation)."""
    bad = values[~np.isfinite(values) | (values != np.round(values))]
    # Nine digits: 1.00000095 must not print as "1", the whole number it is not.
    cause = cause or ("a mask resampled with linear interpolation blurs its labels, so resample masks "
                      "with nearest neighbour (or round them) before --mask-values or --mask-threshold "
                      "can read them")
    return (f"mask file {path} holds non-integer values (such as {float(bad.flat[0]):.9g}); expected class "
            f"values: {cause}")


def load_image(path: str | Path, img_size: int, in_channels: int = 3) -> torch.Tensor:
    """An image file as the network sees it: float32 tensor ``(in_channels, img_size, img_size)``.

    Read, resized, quantized and normalised exactly as the training data of
    :class:`cmrf.data.FolderSegmentation`.

    Raises:
        DataError: the file is missing or not an image Pillow can read.
    """
    return normalize(dequantize(decode_image(path, img_size, in_channels)))


# --- masks ---------------------------------------------------------------------------------------


class MaskFile(NamedTuple):
    """A decoded mask: raw ``values`` ``(H, W)`` (the file's integer type), their sorted distinct
    values ``present`` and whether the file's format is ``lossy`` (JPEG)."""

    values: np.ndarray
    present: np.ndarray
    lossy: bool


def present_values(mask: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array (a counting pass, not a sort, when they are small)."""
    flat = np.asarray(mask).ravel()
    if flat.size and flat.dtype.kind in "iu" and flat.min() >= 0 and flat.max() < 65536:
        return np.flatnonzero(np.bincount(flat))
    return np.unique(flat)


# Pillow modes whose first band holds the mask's values (with equal colour bands, or alpha).
MASK_MODES = ("1", "L", "P", "LA", "PA", "RGB", "RGBA", "RGBX", *HIGH_BIT_MODES)


def _palette_entries(image) -> list[tuple[int, ...]]:
    """A palette image's palette as ``(r, g, b)`` entries, by index."""
    palette = image.getpalette() or []
    return [tuple(palette[i:i + 3]) for i in range(0, len(palette) - 2, 3)]


def _black_and_white_palette(image) -> bool:
    """Whether a palette image is a black-and-white image stored compactly: every entry of its
    palette (used or not) is black or white.

    PNG optimisers and Pillow's ``quantize`` store 0/255 masks so, often with white (the lesion)
    at index 0: read by index, such a mask would be inverted. The test reads the palette, so the
    masks of a dataset (which share their palette) are read alike, also those that use one entry
    only; any other palette (class colours, grey class levels) is read by index, and so are used
    indices that the palette does not tell apart (padding entries are black too).
    """
    entries = _palette_entries(image)
    if not entries or not set(entries) <= {(0, 0, 0), (255, 255, 255)}:
        return False
    # Class indices under a palette padded with black: two used indices of one colour (or one past
    # the palette) are told apart by index only.
    used = np.flatnonzero(image.histogram()[:256])  # the index band comes first, also for "PA"
    return used[-1] < len(entries) and len({entries[i] for i in used}) == len(used)


def _grey_gif(image) -> bool:
    """Whether a GIF's used palette entries are all grey: a grey-level mask saved as GIF, which
    has no grey mode. Its grey levels are the values: GIF writers (Pillow's among them) renumber
    the palette to the levels a file uses, so its indices differ from file to file (0/2 becomes
    0/1)."""
    if image.format != "GIF":
        return False
    entries = _palette_entries(image)
    used = np.flatnonzero(image.histogram()[:256])
    return bool(used.size) and used[-1] < len(entries) and all(len(set(entries[i])) == 1 for i in used)


def decode_mask(path: str | Path) -> MaskFile:
    """Decode a mask file, keeping its raw values (no class mapping; see :mod:`cmrf.data.masks`).

    Accepted: grey-level and palette PNGs (palette indices are the values, except that a palette of
    black and white only is read as the 0/255 levels viewers show, and a GIF whose used entries are
    grey as its grey levels), 16-bit PNGs, 1-bit images, RGB files whose three channels are equal;
    JPEG files (also JPEG-compressed TIFFs) and lossy WebP files are decoded but flagged ``lossy``.

    Raises:
        DataError: the file is missing, unreadable, in colour, or holds non-integer values.
    """
    path = Path(path)
    image = _open_image(path, "mask")
    lossy = _is_lossy(image, path)
    if image.mode not in MASK_MODES:  # CMYK keeps the mask in K, YCbCr/LAB/HSV mix it: not values
        raise DataError(
            f"mask file {path} is a {image.mode} image; expected class values in a grey-level, palette, "
            f"1-bit, 16-bit or grey RGB image (modes {', '.join(MASK_MODES)})"
        )
    if image.mode in ("P", "PA") and (_black_and_white_palette(image) or _grey_gif(image)):
        image = image.convert("LA" if image.mode == "PA" else "L")
    if "A" in image.getbands():
        # Some tools draw the mask as transparency over a blank colour: the values would all be one.
        alpha = image.getchannel("A").getextrema()
        if alpha[0] != alpha[1]:
            raise DataError(
                f"mask file {path} has a transparency (alpha) channel that varies ({image.mode}, alpha "
                f"{alpha[0]}..{alpha[1]}); class values are read from its grey levels, palette or colour, "
                f"not from transparency: save the mask without alpha, with the classes as its values"
            )
        image = image.getchannel(0) if image.mode in ("LA", "PA") else image.convert("RGB")
    values = np.asarray(image)
    if values.ndim == 3:
        if not (values[..., :3] == values[..., :1]).all():
            raise DataError(
                f"mask file {path} is a colour image; expected class values (grey levels or a palette PNG)"
            )
        values = values[..., 0]
    if values.dtype.kind == "b":  # 1-bit: cast (the bytes under Pillow's bool array may be 0/255)
        values = values.astype(np.uint8)
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or (values != np.round(values)).any():
            raise DataError(non_integer_mask(path, values))
        values = values.astype(np.int64)
    # Pillow's histogram counts 8-bit values in C, far faster than numpy on a large mask.
    eight_bit = image.mode in ("L", "P")
    present = np.flatnonzero(image.histogram()[:256]) if eight_bit else present_values(values)
    return MaskFile(values, present.astype(np.int64), lossy)


def read_mask_file(path: str | Path) -> np.ndarray:
    """Read a mask file as an int64 array ``(H, W)`` of class indices, file by file.

    A mask holding only 0 and 255 is binary (255 becomes 1, as in ISIC); other masks keep their
    values (grey levels, palette indices). Datasets decide classes over all masks instead (see
    :mod:`cmrf.data.masks`); this is for single files such as the masks ``cmrf predict`` writes.

    Raises:
        DataError: the file is missing, unreadable, in colour, holds non-integer values, or is
            lossy (JPEG) with values other than 0 and 255: its compression blurs the edges into
            grey levels that are no class (a 0/255 JPEG mask holds dozens of values).
    """
    mask = decode_mask(path)
    present = set(mask.present.tolist())
    if mask.present.size and present <= {0, 255} and mask.present[-1] == 255:
        return (mask.values == 255).astype(np.int64)
    if mask.lossy and len(present) > 1:
        raise DataError(f"mask file {path} is lossy (JPEG or lossy WebP) and holds {len(present)} "
                        f"values, not class indices; threshold it (cmrf train --mask-threshold 128) or save "
                        f"masks as PNG")
    return mask.values.astype(np.int64)


def resize_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a mask ``(*S)`` of any integer type to ``size`` per side by nearest neighbour.

    Samples at pixel centres (as ``nearest-exact`` and Pillow's ``NEAREST``), by indexing, so the
    values are copied exactly whatever their type.
    """
    if mask.shape == (size,) * mask.ndim:
        return np.ascontiguousarray(mask)
    index = [
        np.minimum(((np.arange(size) + 0.5) * (side / size)).astype(np.int64), side - 1)
        for side in mask.shape
    ]
    return np.ascontiguousarray(mask[np.ix_(*index)])


def check_mask_values(mask: np.ndarray, num_classes: int, path) -> None:
    """Raise :class:`DataError` naming ``path`` if ``mask`` has values outside ``[0, num_classes)``."""
    present = present_values(np.asarray(mask))
    bad = present[(present < 0) | (present >= num_classes)]
    if bad.size:
        shown = listing([str(v) for v in bad.tolist()], 8)
        raise DataError(
            f"mask file {path} has values {shown} outside the class range 0..{num_classes - 1} "
            f"(num_classes={num_classes})"
        )


def _palette(num_colours: int) -> list[int]:
    """A flat RGB palette: black background, then well-separated colours, then grey levels."""
    base = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60)]
    colours = base + [(i, i, i) for i in range(len(base), 256)]
    return [channel for colour in colours[:max(num_colours, 1)] for channel in colour]


def save_mask_png(
    mask: torch.Tensor | np.ndarray, path: str | Path, num_classes: int | None = None,
    size: tuple[int, int] | None = None, metadata: dict[str, str] | None = None,
) -> Path:
    """Write a mask ``(H, W)`` of class indices as a PNG that :func:`read_mask_file` reads back.

    Two classes are written as a grey-level 0/255 PNG (the ISIC convention); more as a palette
    PNG whose pixel values are the class indices and whose colours tell classes apart.

    Args:
        mask: integer tensor or array ``(H, W)`` with values in ``[0, num_classes)``.
        path: output file (parent folders are created).
        num_classes: class count; default ``max(2, mask.max() + 1)``.
        size: optional ``(height, width)`` to resize to (nearest), e.g. the original image's
            (see :func:`image_size`).
        metadata: text entries written into the PNG (tEXt chunks, ``{"Software": ...}``). Default none.

    Returns:
        ``path`` as a ``Path``.
    """
    from PIL import Image, PngImagePlugin

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
    from cmrf.files import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, text in (metadata or {}).items():
        info.add_text(key, text)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path
