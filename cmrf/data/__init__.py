"""``cmrf.data``: the datasets of ``cmrf train`` (synthetic, ISIC 2018, folders, NIfTI volumes).

Modules (arrows point down; ``base`` is a leaf):

- ``base``: ``DataError``, ``DataBundle``, normalisation, augmentation, the dataset base class;
- ``imageio``: reading, resizing and writing images and masks;
- ``masks``: how mask values become classes (binary, class indices, explicit values, threshold);
- ``store`` (where decoded samples are kept: shared memory, disk), ``cache`` (sources that decode
  each sample once into a store, and the dataset over them);
- ``pairs`` (the one image/mask pair finder), ``splits``;
- one module per source: ``synthetic``, ``folder``, ``isic``, ``nifti``;
- ``factory``: ``build_datasets(seed=0, **options)``.

Layouts, mask conventions, checks and caching are described in docs/data.md.
"""

from cmrf.data.base import SPLITS, DataBundle, DataError, DataWarning, augment_pair, denormalize, normalize
from cmrf.data.cache import SourceDataset
from cmrf.data.factory import DATA_CHOICES, DATA_OPTIONS, DEFAULT_IMG_SIZE, build_datasets
from cmrf.data.folder import FolderSegmentation, find_folder_pairs
from cmrf.data.imageio import (
    IMAGE_SUFFIXES,
    image_size,
    load_image,
    read_image_file,
    read_mask_file,
    save_mask_png,
)
from cmrf.data.isic import ISIC_FOLDERS, find_isic_pairs
from cmrf.data.masks import ClassMapping, MaskRule
from cmrf.data.nifti import load_volume
from cmrf.data.pairs import Pair, find_pairs
from cmrf.data.splits import split_file_sizes, split_fingerprint
from cmrf.data.store import CACHE_CHOICES
from cmrf.data.synthetic import SyntheticSegmentation, generate_sample

__all__ = [
    "CACHE_CHOICES",
    "DATA_CHOICES",
    "DATA_OPTIONS",
    "DEFAULT_IMG_SIZE",
    "IMAGE_SUFFIXES",
    "ISIC_FOLDERS",
    "SPLITS",
    "ClassMapping",
    "DataBundle",
    "DataError",
    "DataWarning",
    "FolderSegmentation",
    "MaskRule",
    "Pair",
    "SourceDataset",
    "SyntheticSegmentation",
    "augment_pair",
    "build_datasets",
    "denormalize",
    "find_folder_pairs",
    "find_isic_pairs",
    "find_pairs",
    "generate_sample",
    "image_size",
    "load_image",
    "load_volume",
    "normalize",
    "read_image_file",
    "read_mask_file",
    "save_mask_png",
    "split_file_sizes",
    "split_fingerprint",
]
