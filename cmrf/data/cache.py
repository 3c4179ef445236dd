"""Samples decoded and resized once, then kept: the sample store, and the dataset that reads it.

A *source* (a folder of files, the synthetic generator) decodes sample ``i`` to a quantized image
``(C, *S)`` (uint8, or uint16 for 16-bit data) and a raw mask ``(*S)`` at the training size; its
:class:`~cmrf.data.store.SampleStore` keeps them, so later epochs never decode a file again. Three stores:

- ``"memory"`` (default): shared memory (``torch`` shared storage). Every process that loads
  samples, DataLoader workers included (fork or spawn, persistent or not), writes into and reads
  from the same block, so a sample is decoded once per run, whichever process asks first. Pages
  are taken only as samples arrive. If the block would not fit (``/dev/shm`` or available memory
  too small), the disk store is used instead, with a :class:`DataWarning`.
- ``"disk"``: memory-mapped ``.npy`` files in a folder of the cache directory, named by a hash
  of the files' paths, sizes and modification times and the decoding options. Shared by the
  workers through the page cache, and kept between runs: a second run decodes nothing, and does
  not even re-read the masks to validate them (what the check learned is saved beside).
- ``"none"``: decode on every access (the behaviour before caching).

Augmentation is not cached: it is drawn per epoch from ``(seed, epoch, index)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from cmrf.data.base import DataError, SegmentationDataset
from cmrf.data.imageio import as_storage, dequantize
from cmrf.data.masks import ClassMapping, problem_report
from cmrf.data.store import SampleStore

__all__ = ["CachedSource", "SourceDataset", "run_checks"]


def run_checks(check: Callable[[int], object], count: int, what: str, threads: int | None = None) -> list:
    """``[check(i) for i in range(count)]`` on a thread pool, collecting every :class:`DataError`.

    Decoding (Pillow, zlib) releases the GIL, so threads read files in parallel.

    Raises:
        DataError: one message listing every failure (up to a cap), after all items ran.
    """
    threads = threads or min(8, os.cpu_count() or 1, max(count, 1))

    def guarded(index: int):
        try:
            return check(index), None
        except DataError as err:
            return None, str(err)

    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(guarded, range(count)))
    else:
        results = [guarded(index) for index in range(count)]
    errors = [error for _, error in results if error is not None]
    if len(errors) == 1:
        raise DataError(errors[0])
    if errors:
        raise DataError(problem_report(f"{len(errors)} of {count} {what} cannot be used:", errors))
    return [value for value, _ in results]


class CachedSource:
    """Samples of a dataset decoded once into a :class:`SampleStore` (see the module docstring).

    Subclasses set ``store``, ``img_size``, ``in_channels``, ``spatial_dims`` and implement
    ``__len__``, ``decode(index, image, mask) -> (image or None, mask or None)`` (decode what is
    asked: a quantized image ``(C, *S)`` and a raw mask ``(*S)``) and ``describe(index)`` (the mask
    file, for messages).
    """

    store: SampleStore
    img_size: int
    in_channels: int
    spatial_dims: int

    def __len__(self) -> int:
        raise NotImplementedError

    def decode(self, index: int, image: bool, mask: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"sample {index}"

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image, raw mask)`` of sample ``index``, from the store or decoded (and then stored)."""
        store, layout = self.store, self.store.layout
        image, mask = store.get_image(index), store.get_mask(index)
        if image is None or mask is None:
            new_image, new_mask = self.decode(index, image is None, mask is None)
            if image is None:
                try:
                    image = as_storage(new_image, layout.image_dtype)
                except ValueError:  # 16-bit now, 8-bit when checked: the file was replaced meanwhile
                    raise DataError(
                        f"the image of sample {index} ({self.describe(index)}) now decodes to "
                        f"{new_image.dtype} values, the checked data to {np.dtype(layout.image_dtype)}; "
                        f"was the file changed after the data was checked?"
                    ) from None
                store.put_image(index, image)
            if mask is None:
                mask = new_mask.astype(layout.mask_dtype, copy=False)
                store.put_mask(index, mask)
        return image, mask

    def fill(self, indices: Iterable[int] | None = None, threads: int | None = None) -> None:
        """Decode now, on a thread pool, every sample of ``indices`` (default all) not stored yet.

        Useful to pay the decoding before training starts; without it, samples are decoded the
        first time they are loaded.
        """
        todo = list(range(len(self)) if indices is None else indices)
        run_checks(lambda position: self.sample(todo[position]), len(todo), "samples", threads)


class SourceDataset(SegmentationDataset):
    """The items ``indices`` of a :class:`CachedSource`, masks mapped to classes by ``mapping``.

    Args:
        source: where the samples come from.
        indices: which of its samples, in order (default all).
        mapping: raw mask values to classes; None if the source's masks already hold classes.
        augment: augment items. Default False.
        seed: augmentation seed. Default 0.

    Items: ``(image (C, *S) float32 normalised, mask (*S) int64)``.
    """

    def __init__(self, source: CachedSource, indices: Sequence[int] | None = None,
                 mapping: ClassMapping | None = None, augment: bool = False, seed: int = 0):
        super().__init__(spatial_dims=source.spatial_dims, augment=augment, seed=seed)
        self.source = source
        self.indices = list(range(len(source)) if indices is None else indices)
        if not self.indices:
            raise DataError("a dataset split has no samples")
        self.mapping = mapping
        self.img_size = source.img_size
        self.in_channels = source.in_channels
        self.num_classes = mapping.num_classes if mapping is not None else source.num_classes

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def pairs(self) -> list:
        """The files of this dataset's items, for sources of file pairs."""
        return [self.source.pairs[index] for index in self.indices]

    def fill(self, threads: int | None = None) -> None:
        """Decode every sample of this dataset that is not stored yet (see :meth:`CachedSource.fill`)."""
        self.source.fill(self.indices, threads)

    def load_pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        position = self.indices[index]
        image, mask = self.source.sample(position)
        if self.mapping is None:
            classes = torch.from_numpy(mask.astype(np.int64))
        else:
            classes = self.mapping.apply(mask, self.source.describe(position))
        return dequantize(image), classes
