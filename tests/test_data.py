"""cmrf.data: synthetic generator, augmentation, ISIC/folder readers, mask conventions, checks, caching.

NIfTI volumes are tested in test_volumes.py."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import stat
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from cmrf.cli.data_args import add_data_arguments, data_options
from cmrf.data import (
    ISIC_FOLDERS,
    DataError,
    DataWarning,
    FolderSegmentation,
    SyntheticSegmentation,
    augment_pair,
    build_datasets,
    denormalize,
    find_folder_pairs,
    generate_sample,
    image_size,
    load_image,
    normalize,
    read_image_file,
    read_mask_file,
    save_mask_png,
)
from cmrf.data.imageio import decode_image, decode_mask, dequantize, image_header, quantize, resize_image
from cmrf.data.masks import ClassMapping, MaskRule, MaskValues, resolve_classes


def as_stored(image: torch.Tensor) -> torch.Tensor:
    """An image in [0, 1] as a dataset keeps it: quantized to 8 bits."""
    return dequantize(quantize(image))


def _build(args, seed=0):
    return build_datasets(seed=seed, **data_options(args))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    return parser.parse_args(list(argv))


def write_pair(root: Path, stem: str, size=(20, 16), mask_values=(0, 255), image_dir="images",
               mask_dir="masks", mask_name=None, image_suffix=".png", seed=0) -> tuple[Path, Path]:
    """An RGB image and a mask whose left part is mask_values[1] (width x height = size)."""
    rng = np.random.default_rng(seed)
    width, height = size
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    (root / mask_dir).mkdir(parents=True, exist_ok=True)
    image_path = root / image_dir / f"{stem}{image_suffix}"
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image_path)
    mask = np.full((height, width), mask_values[0], dtype=np.uint8)
    mask[:, : width // 2] = mask_values[1]
    mask_path = root / mask_dir / (mask_name or f"{stem}.png")
    Image.fromarray(mask, mode="L").save(mask_path)
    return image_path, mask_path


# Black background, then red, green and blue classes; the rest black padding.
CLASS_PALETTE = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12)


def write_palette_mask(path: Path, values: np.ndarray, palette: list[int] = CLASS_PALETTE) -> None:
    image = Image.fromarray(np.asarray(values).astype(np.uint8), mode="P")
    image.putpalette(palette)
    image.save(path)


@pytest.fixture
def isic_root(tmp_path: Path) -> Path:
    """A tiny ISIC 2018 Task 1 tree with the official names: 6 train, 2 val, 3 test images."""
    counts = {"train": 6, "val": 2, "test": 3}
    number = 0
    for split, (input_name, truth_name) in ISIC_FOLDERS.items():
        for _ in range(counts[split]):
            stem = f"ISIC_{number:07d}"
            write_pair(tmp_path, stem, image_dir=input_name, mask_dir=truth_name,
                       mask_name=f"{stem}_segmentation.png", image_suffix=".jpg", seed=number)
            number += 1
        (tmp_path / input_name / "LICENSE.txt").write_text("not an image")
    return tmp_path


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    """A generic folder of 10 pairs with binary 0/255 masks."""
    for i in range(10):
        write_pair(tmp_path, f"case{i}", seed=i)
    return tmp_path


# --- synthetic -----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("spatial_dims,channels,size", [(2, 3, 48), (3, 1, 16)])
def test_synthetic_shapes_dtypes_and_determinism(num_classes, spatial_dims, channels, size):
    image, mask = generate_sample(5, 3, size, num_classes, spatial_dims, channels)
    assert image.shape == (channels,) + (size,) * spatial_dims and image.dtype == torch.float32
    assert mask.shape == (size,) * spatial_dims and mask.dtype == torch.int64
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert int(mask.min()) >= 0 and int(mask.max()) < num_classes
    again = generate_sample(5, 3, size, num_classes, spatial_dims, channels)
    assert torch.equal(image, again[0]) and torch.equal(mask, again[1])
    for other in (generate_sample(5, 4, size, num_classes, spatial_dims, channels),
                  generate_sample(6, 3, size, num_classes, spatial_dims, channels),
                  generate_sample(5, 3, size, num_classes, spatial_dims, channels, split="val")):
        assert not torch.equal(image, other[0])


def test_synthetic_masks_match_what_the_image_shows():
    """Lesions are darker than the skin around them; lungs darker than the body; all classes occur."""
    for index in range(6):
        image, mask = generate_sample(0, index, 64, 2)
        grey = image.mean(0)
        assert 0.01 < mask.float().mean() < 0.7
        assert grey[mask == 1].mean() < grey[mask == 0].mean() - 0.05
    seen = torch.zeros(4, dtype=torch.bool)
    for index in range(6):
        image, mask = generate_sample(0, index, 64, 4)
        seen |= torch.bincount(mask.flatten(), minlength=4) > 0
        lungs = image[0][mask == 1]
        body = image[0][(mask == 0) & (image[0] > 0.3)]
        assert lungs.mean() < body.mean() - 0.2
    assert seen.all()


def test_synthetic_generation_is_cheap():
    generate_sample(0, 0, 64)
    start = time.perf_counter()
    for index in range(20):
        generate_sample(0, index, 64)
    per_image = (time.perf_counter() - start) / 20
    # About 1 ms on an idle core; the bound leaves room for a busy shared CI machine.
    assert per_image < 0.05, f"{per_image * 1000:.1f} ms per 64x64 image"


def test_synthetic_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="2 or 4 classes"):
        SyntheticSegmentation(4, 32, num_classes=3)
    with pytest.raises(ValueError, match="num_samples"):
        SyntheticSegmentation(0, 32)
    with pytest.raises(ValueError, match="seed"):
        SyntheticSegmentation(4, 32, seed=-1)
    with pytest.raises(IndexError):
        SyntheticSegmentation(4, 32)[4]
    with pytest.raises(ValueError, match="epoch"):
        SyntheticSegmentation(4, 32).set_epoch(-1)


# --- augmentation ----------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**32 - 1), spatial_dims=st.sampled_from([2, 3]))
def test_augmentation_keeps_image_and_mask_aligned(seed, spatial_dims):
    size = 24 if spatial_dims == 2 else 12
    generator = np.random.default_rng(seed)
    mask = torch.from_numpy(generate_sample(seed % 1000, 0, size, 2, spatial_dims, 1)[1].numpy())
    image = mask[None].to(torch.float32)  # the image *is* the mask, so alignment is checkable
    new_image, new_mask = augment_pair(image, mask, generator, spatial_dims)
    assert new_image.shape == image.shape and new_mask.shape == mask.shape and new_mask.dtype == torch.int64
    assert float(new_image.min()) >= 0.0 and float(new_image.max()) <= 1.0
    assert set(new_mask.unique().tolist()) <= {0, 1}
    agreement = ((new_image[0] > 0.5).long() == new_mask).float().mean()
    assert agreement > 0.97  # only border pixels may differ (bilinear image vs nearest mask)


def test_augmentation_is_seeded_by_epoch_and_index_and_can_be_switched_off():
    dataset = SyntheticSegmentation(4, 32, seed=3, augment=True)
    first = dataset[1]
    assert torch.equal(first[0], dataset[1][0])  # same epoch, same item: same draw
    plain = normalize(as_stored(generate_sample(3, 1, 32)[0]))
    assert not torch.equal(first[0], plain)
    dataset.set_epoch(1)
    assert not torch.equal(first[0], dataset[1][0])
    dataset.augment = False
    assert torch.equal(dataset[1][0], plain)


def test_workers_give_the_same_batches_and_see_augment_switched_off():
    dataset = SyntheticSegmentation(4, 24, seed=1, augment=True)
    dataset.set_epoch(2)

    def batches(workers):
        loader = DataLoader(dataset, batch_size=2, num_workers=workers)
        return [torch.cat([x.flatten(), y.flatten().float()]) for x, y in loader]

    in_process = batches(0)
    with_workers = batches(2)
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers, strict=True))
    dataset.augment = False  # what the loop does after --aug-stop; workers are re-created per epoch
    plain = torch.cat([normalize(as_stored(generate_sample(1, i, 24)[0])).flatten() for i in range(2)])
    x, _ = next(iter(DataLoader(dataset, batch_size=2, num_workers=1)))
    assert torch.equal(x.flatten(), plain)


# --- options and the synthetic bundle ------------------------------------------------------------


def test_build_synthetic_bundle_from_options():
    args = parse("--img-size", "32", "--synthetic-samples", "40", "--num-classes", "4")
    bundle = _build(args, seed=0)
    assert (bundle.num_classes, bundle.in_channels, bundle.spatial_dims) == (4, 3, 2)
    assert bundle.class_names == ["background", "lung field", "GGO", "consolidation"]
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (40, 10, 10)
    assert bundle.train.augment and not bundle.val.augment and not bundle.test.augment
    image, mask = bundle.train[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
    # The held-out splits are different samples from the training ones.
    assert not torch.equal(bundle.val[0][1], SyntheticSegmentation(40, 32, 4, seed=0)[0][1])

    volumes = _build(parse("--img-size", "12", "--synthetic-samples", "2", "--spatial-dims", "3"), 0)
    assert (volumes.in_channels, volumes.spatial_dims, volumes.num_classes) == (1, 3, 2)
    assert volumes.train[0][0].shape == (1, 12, 12, 12) and volumes.train[0][1].shape == (12, 12, 12)
    with pytest.raises(DataError, match="2 .* or 4"):
        _build(parse("--num-classes", "3"), 0)


def test_synthetic_disk_caches_of_two_seeds_are_two(tmp_path: Path):
    """The seed is part of the cache's key: seed 1 must not read seed 0's samples."""
    args = parse("--img-size", "16", "--synthetic-samples", "4", "--cache", "disk",
                 "--cache-dir", str(tmp_path))
    first, second = _build(args, seed=0), _build(args, seed=1)
    first.train.augment = second.train.augment = False
    assert not torch.equal(first.train[0][0], second.train[0][0])
    assert len(list(tmp_path.glob("synthetic-train-*"))) == 2
    again = _build(args, seed=0)  # and the same seed finds its own
    again.train.augment = False
    assert torch.equal(again.train[0][0], first.train[0][0]) and len(cache_folders(tmp_path)) == 6


@pytest.mark.parametrize("spatial_dims, side", [("2", 256), ("3", 64)])
def test_default_size_depends_on_dimensions(spatial_dims, side):
    args = parse("--synthetic-samples", "1", "--spatial-dims", spatial_dims)
    image, _ = _build(args, 0).train[0]
    assert image.shape[-1] == side  # the paper's 256 for images; volumes a CPU can train


def test_option_values_are_checked_by_the_parser(capsys):
    args = parse()
    assert (args.data, args.img_size, args.spatial_dims, args.num_classes) == ("synthetic", None, 2, None)
    assert (args.mask_values, args.mask_threshold, args.cache, args.cache_dir) == (None, None, "memory", None)
    for bad in (["--val-fraction", "1.5"], ["--img-size", "0"], ["--data", "mnist"], ["--spatial-dims", "4"],
                ["--cache", "gpu"], ["--mask-threshold", "0"], ["--mask-values", "a"], ["--mask-values"]):
        with pytest.raises(SystemExit):
            parse(*bad)
    assert parse("--mask-values", "0", "128", "255").mask_values == [0, 128, 255]
    with pytest.raises(DataError, match="--mask-threshold: only for data read from files"):
        build_datasets(**data_options(parse("--mask-threshold", "128")))
    # a forgotten --data folder: the file options are refused, not dropped for synthetic images
    forgotten = parse("--root", "/data/ncp", "--split-dir", "/data/ncp/splits", "--val-fraction", "0.3")
    with pytest.raises(DataError, match=r"--root, --split-dir, --val-fraction: only for data read from "
                                        r"files .* add --data folder"):
        build_datasets(**data_options(forgotten))
    with pytest.raises(DataError, match=r"--synthetic-samples: only for --data synthetic, and the data is "
                                        r"--data folder"):
        build_datasets(**data_options(parse("--data", "folder", "--root", "x", "--synthetic-samples", "8")))
    with pytest.raises(DataError, match="unknown data option"):
        build_datasets(masks="png")


# --- files ---------------------------------------------------------------------------------------


def test_mask_png_round_trip_binary_and_multiclass(tmp_path: Path):
    binary = torch.tensor([[0, 1], [1, 0]])
    path = save_mask_png(binary, tmp_path / "out" / "binary.png")
    assert set(np.unique(np.asarray(Image.open(path))).tolist()) == {0, 255}  # ISIC convention
    assert np.array_equal(read_mask_file(path), binary.numpy())
    classes = np.array([[0, 1, 2], [3, 2, 1]])
    path = save_mask_png(classes, tmp_path / "classes.png", num_classes=4)
    assert Image.open(path).mode == "P" and np.array_equal(read_mask_file(path), classes)
    resized = read_mask_file(save_mask_png(classes, tmp_path / "big.png", size=(4, 6)))
    assert resized.shape == (4, 6) and set(np.unique(resized).tolist()) == {0, 1, 2, 3}
    with pytest.raises(DataError, match="outside the class range"):
        save_mask_png(classes, tmp_path / "bad.png", num_classes=2)
    with pytest.raises(DataError, match=r"has values 4 outside the class range 0\.\.3"):  # 4 is no class of 4
        save_mask_png(classes + 1, tmp_path / "bad.png", num_classes=4)


def test_sixteen_bit_and_one_bit_masks_are_read_as_class_indices(tmp_path: Path):
    wide = np.array([[0, 2], [300, 2]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert np.array_equal(read_mask_file(tmp_path / "wide.png"), wide)
    Image.fromarray(np.array([[True, False]])).convert("1").save(tmp_path / "bits.png")
    assert read_mask_file(tmp_path / "bits.png").tolist() == [[1, 0]]
    Image.fromarray(np.array([[255, 255]], dtype=np.uint8)).save(tmp_path / "full.png")
    assert read_mask_file(tmp_path / "full.png").tolist() == [[1, 1]]  # all-lesion binary mask
    Image.fromarray(np.array([[0, 1, 255]], dtype=np.uint8)).save(tmp_path / "three.png")
    assert read_mask_file(tmp_path / "three.png").tolist() == [[0, 1, 255]]  # not binary: values kept


def test_a_lossy_mask_file_is_refused_not_read_as_grey_level_classes(tmp_path: Path):
    """JPEG blurs a 0/255 mask's edges into dozens of grey levels, none of them a class."""
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 5:21] = 255
    Image.fromarray(mask).save(tmp_path / "mask.jpg", quality=75)
    lossy = r"is lossy \(JPEG or lossy WebP\) and holds"
    with pytest.raises(DataError, match=rf"mask\.jpg {lossy} \d+ values.*threshold"):
        read_mask_file(tmp_path / "mask.jpg")
    flat = np.zeros((16, 16), dtype=np.uint8)
    flat[:, 8:] = 100  # block-aligned flat halves: JPEG keeps exactly two values, still no classes
    Image.fromarray(flat).save(tmp_path / "two.jpg", quality=75)
    assert decode_mask(tmp_path / "two.jpg").present.tolist() == [0, 100]  # the premise
    with pytest.raises(DataError, match=r"two\.jpg is lossy \(JPEG or lossy WebP\) and holds 2 values"):
        read_mask_file(tmp_path / "two.jpg")
    Image.fromarray(flat).save(tmp_path / "named.png", format="JPEG")  # JPEG data, whatever the name
    with pytest.raises(DataError, match=r"named\.png is lossy \(JPEG or lossy WebP\)"):
        read_mask_file(tmp_path / "named.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "empty.jpg")
    assert read_mask_file(tmp_path / "empty.jpg").tolist() == [[0] * 8] * 8  # one value: nothing blurred


def test_load_image_matches_the_training_pipeline(tmp_path: Path):
    image_path, _ = write_pair(tmp_path, "a", size=(40, 30))
    loaded = load_image(image_path, 16)
    pairs = find_folder_pairs(tmp_path)
    from_dataset, mask = FolderSegmentation(pairs, 16, num_classes=2)[0]
    assert loaded.shape == (3, 16, 16) and torch.allclose(loaded, from_dataset)
    assert torch.allclose(denormalize(loaded), denormalize(normalize(denormalize(loaded))))
    assert set(mask.unique().tolist()) == {0, 1} and (mask[:, :8] == 1).all()
    grey = load_image(image_path, 16, in_channels=1)
    assert grey.shape == (1, 16, 16)


def test_large_jpegs_are_decoded_at_reduced_scale_without_changing_the_result(tmp_path: Path):
    """Drafted JPEG decoding (fast) stays close to decoding at full size, and equals load_image."""
    y, x = np.mgrid[0:600, 0:800]
    photo = np.stack([x * 255 // 800, y * 255 // 600, (x + y) * 255 // 1400], -1).astype(np.uint8)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(photo).save(tmp_path / "images" / "big.jpg", quality=95)
    Image.fromarray(((x < 400) * 255).astype(np.uint8)).save(tmp_path / "masks" / "big.png")
    image, mask = FolderSegmentation(find_folder_pairs(tmp_path), 32, num_classes=2)[0]
    assert torch.equal(image, load_image(tmp_path / "images" / "big.jpg", 32))
    full = read_image_file(tmp_path / "images" / "big.jpg")
    assert read_image_file(tmp_path / "images" / "big.jpg", min_side=32).shape[0] < full.shape[0]
    Image.fromarray(photo[:96, :128]).save(tmp_path / "small.jpg", quality=95)
    # Halving 128x96 would give 64x48, below 64 per side: such a JPEG is decoded at full size.
    assert read_image_file(tmp_path / "small.jpg", min_side=64).shape[:2] == (96, 128)
    assert read_image_file(tmp_path / "small.jpg", min_side=48).shape[:2] == (48, 64)
    reference = torch.nn.functional.interpolate(torch.from_numpy(full).permute(2, 0, 1)[None], size=(32, 32),
                                                mode="bilinear", antialias=True)[0]
    assert (denormalize(image) - reference).abs().mean() < 0.02
    assert (mask[:, :15] == 1).all() and (mask[:, 17:] == 0).all()


def test_sixteen_bit_images_are_scaled_to_unit_range(tmp_path: Path):
    values = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "ct.png")
    pixels = read_image_file(tmp_path / "ct.png", in_channels=1)
    assert pixels.shape == (2, 2, 1)
    assert np.allclose(pixels[..., 0], values / 4000.0)
    Image.fromarray(values + 1000).save(tmp_path / "offset.png")  # a CT slice whose darkest value is 1000
    assert np.allclose(read_image_file(tmp_path / "offset.png", in_channels=1)[..., 0], values / 4000.0)


def test_unreadable_and_missing_files_are_named(tmp_path: Path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"cannot read mask file .*broken\.png"):
        read_mask_file(tmp_path / "broken.png")
    with pytest.raises(DataError, match=r"image file .*nothing\.jpg does not exist"):
        load_image(tmp_path / "nothing.jpg", 16)
    colour = np.zeros((4, 4, 3), dtype=np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match=r"colour\.png is a colour image"):
        read_mask_file(tmp_path / "colour.png")
    colour[0, 0] = (7, 7, 200)  # red and green equal, blue not: colour too
    Image.fromarray(colour).save(tmp_path / "blue.png")
    with pytest.raises(DataError, match=r"blue\.png is a colour image"):
        read_mask_file(tmp_path / "blue.png")
    colour[0, 0] = (7, 7, 7)
    Image.fromarray(colour).save(tmp_path / "grey.png")
    assert read_mask_file(tmp_path / "grey.png")[0, :2].tolist() == [7, 0]  # grey RGB: its values


def test_broken_links_are_reported_not_skipped(folder_root: Path):
    """A dangling symlink (a moved dataset) is named: skipped, the image would silently leave the
    data, and a mask would be reported missing although its file is there."""
    (folder_root / "images" / "gone.png").symlink_to(folder_root / "elsewhere" / "gone.png")
    (folder_root / "masks" / "gone.png").write_bytes((folder_root / "masks" / "case0.png").read_bytes())
    with pytest.raises(DataError, match=r"image file .*gone\.png is a broken link: its target .*elsewhere"):
        find_folder_pairs(folder_root)
    (folder_root / "images" / "gone.png").unlink()
    (folder_root / "masks" / "case3.png").unlink()
    (folder_root / "masks" / "case3.png").symlink_to(folder_root / "elsewhere" / "case3.png")
    with pytest.raises(DataError, match=r"mask file .*case3\.png is a broken link") as raised:
        find_folder_pairs(folder_root)
    assert "missing" not in str(raised.value)
    (folder_root / "masks" / "case3.png").unlink()
    (folder_root / "masks" / "case3.png").symlink_to(folder_root / "masks" / "case3.png")
    with pytest.raises(DataError, match=r"case3\.png is a symbolic link that leads back to itself"):
        find_folder_pairs(folder_root)


def test_upper_case_suffixes_are_found_and_hidden_files_ignored(folder_root: Path):
    """Cameras write IMG_1.JPG; macOS leaves ._case0.png (AppleDouble) files on shared drives."""
    for folder in ("images", "masks"):
        (folder_root / folder / "case0.png").rename(folder_root / folder / "case0.PNG")
    (folder_root / "images" / "._case1.png").write_bytes(b"\x00\x05\x16\x07 not an image")
    (folder_root / "masks" / ".case2.png").write_bytes(b"not an image either")
    (folder_root / "images" / "scans.png").mkdir()  # a folder named like an image is none
    pairs = find_folder_pairs(folder_root)
    assert [pair.stem for pair in pairs] == [f"case{i}" for i in range(10)]
    assert (pairs[0].image.name, pairs[0].mask.name) == ("case0.PNG", "case0.PNG")


def test_webp_and_gif_images_are_read_and_masks_without_an_image_are_named(folder_root: Path):
    """Images in another format than the suffixes read took their masks out of the data silently."""
    originals = {}
    for stem, suffix in (("case0", ".webp"), ("case1", ".gif")):
        png = folder_root / "images" / f"{stem}.png"
        originals[stem] = decode_image(png, 16)
        with Image.open(png) as image:
            image.save(png.with_suffix(suffix), lossless=True)  # webp: lossless; gif: palette of the colours
        png.unlink()
    pairs = find_folder_pairs(folder_root)
    assert [pair.image.name for pair in pairs[:2]] == ["case0.webp", "case1.gif"] and len(pairs) == 10
    assert np.array_equal(decode_image(pairs[0].image, 16), originals["case0"])
    assert decode_image(pairs[1].image, 16).shape == originals["case1"].shape
    (folder_root / "images" / "case2.png").rename(folder_root / "images" / "case2.heic")  # not read
    with pytest.warns(DataWarning, match=r"1 mask file\(s\) have no image in .*images and are left out: "
                                         r"case2\.png$"):
        pairs = find_folder_pairs(folder_root)
    assert "case2" not in [pair.stem for pair in pairs]


def test_an_image_folder_given_as_root_and_split_subfolders_are_named(folder_root: Path, tmp_path_factory):
    images = folder_root / "images"
    expected = (rf"data root {images} holds image files itself; --root is the folder that holds images/ "
                rf"and masks/: did you mean --root {folder_root}, ")
    with pytest.raises(DataError, match=expected):
        find_folder_pairs(images)
    # images/train/, images/val/: the layout of many downloads; subfolders are not searched
    nested = tmp_path_factory.mktemp("nested")
    for split in ("train", "val"):
        write_pair(nested, f"{split}0", image_dir=f"images/{split}", mask_dir=f"masks/{split}")
    with pytest.raises(DataError, match=r"no images \(.*\) in .*images; its subfolders train/, val/ hold "
                                        r"images, but subfolders are not searched: .*--split-dir"):
        find_folder_pairs(nested)


def test_a_mask_whose_stem_differs_in_case_is_named(folder_root: Path):
    (folder_root / "masks" / "case4.png").rename(folder_root / "masks" / "Case4.png")
    with pytest.raises(DataError, match=r"mask for image .*case4\.png is missing: expected .*case4\.png .*"
                                        r"\(Case4\.png is there: stems must match in case too\)"):
        find_folder_pairs(folder_root)


def test_masks_named_with_an_ending_or_in_another_unicode_form_are_named(folder_root: Path):
    for i in range(10):  # a common naming: case0_mask.png beside images/case0.png
        (folder_root / "masks" / f"case{i}.png").rename(folder_root / "masks" / f"case{i}_mask.png")
    with pytest.raises(DataError, match=r"case0_mask\.png is there: a mask's stem must be its image's stem; "
                                        r"rename the masks without the '_mask' ending"):
        find_folder_pairs(folder_root)
    (folder_root / "masks" / "case0_mask.png").rename(folder_root / "masks" / "Case0_mask.png")
    with pytest.raises(DataError, match=r"without the '_mask' ending, and match the image's case\)"):
        find_folder_pairs(folder_root)
    (folder_root / "masks" / "Case0_mask.png").rename(folder_root / "masks" / "case0_mask.png")
    for i in range(10):
        (folder_root / "masks" / f"case{i}_mask.png").rename(folder_root / "masks" / f"case{i}.png")
    # macOS writes "é" as "e" plus a combining accent (NFD); the image's name has one character (NFC)
    (folder_root / "images" / "case0.png").rename(folder_root / "images" / "caf\u00e9.png")
    (folder_root / "masks" / "case0.png").rename(folder_root / "masks" / "cafe\u0301.png")
    with pytest.raises(DataError, match=r"is there, its name in another Unicode form"):
        find_folder_pairs(folder_root)


def test_a_mask_of_another_image_is_not_offered_as_a_near_miss(folder_root: Path):
    """case1_b.png belongs to images/case1_b.png: no hint that it is case1's mask; nor is a
    leftover case1_11.png (an ending that is no word: another scan, not a naming)."""
    write_pair(folder_root, "case1_b", seed=11)
    (folder_root / "masks" / "case1.png").rename(folder_root / "masks" / "case1_11.png")
    with pytest.raises(DataError) as raised:
        find_folder_pairs(folder_root)
    message = str(raised.value)
    assert message.endswith("case1.png (or another image suffix)") and "is there" not in message


def test_classes_txt_comments_are_skipped_and_one_name_is_refused(folder_root: Path):
    options = folder_options(folder_root)
    (folder_root / "classes.txt").write_text("# names of the classes\nbackground\n\nlesion\n")
    assert build_datasets(**options).class_names == ["background", "lesion"]
    (folder_root / "classes.txt").write_text("background\n")
    with pytest.raises(DataError, match=r"classes\.txt names 1 class\(es\); segmentation needs at least 2"):
        build_datasets(**options)
    (folder_root / "classes.txt").write_text("bg\nbg\n")  # two score rows of one name
    with pytest.raises(DataError, match=r"classes\.txt names bg more than once; one name per class"):
        build_datasets(**options)


def test_an_empty_image_file_is_named_empty(folder_root: Path):
    """Pillow's "cannot identify image file" does not say the file is empty (an interrupted copy)."""
    from cmrf.data import image_size, load_image

    empty = folder_root / "images" / "empty.png"
    empty.write_bytes(b"")
    for read in (image_size, lambda path: load_image(path, 8, 3)):
        with pytest.raises(DataError, match=r"image file .*empty\.png: the file is empty \(0 bytes\)"):
            read(empty)


def test_class_names_must_match_the_class_count(folder_root: Path):
    from cmrf.data.masks import class_names_for

    assert class_names_for(None) is None and class_names_for(folder_root) is None
    assert class_names_for(folder_root, 3) == ["background", "class 1", "class 2"]
    (folder_root / "classes.txt").write_text("background\nlesion\n")
    assert class_names_for(folder_root) == class_names_for(folder_root, 2) == ["background", "lesion"]
    with pytest.raises(DataError, match=r"classes\.txt names 2 classes but the data has 3"):
        class_names_for(folder_root, 3)


def test_an_image_replaced_by_a_16_bit_one_after_the_checks_is_named(folder_root: Path):
    bundle = build_datasets(**{**folder_options(folder_root), "cache": "memory"})
    image = bundle.train.pairs[0].image
    Image.fromarray(np.full((16, 20), 3000, dtype=np.uint16)).save(image)
    with pytest.raises(DataError, match=r"the image of sample \d+ \(.*\) now decodes to uint16 values, "
                                        r"the checked data to uint8; was the file changed"):
        bundle.train[0]


# --- ISIC 2018 -----------------------------------------------------------------------------------


def test_isic_tree_uses_the_official_splits(isic_root: Path):
    bundle = _build(parse("--data", "isic2018", "--root", str(isic_root), "--img-size", "8"), seed=0)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (6, 2, 3)
    assert bundle.class_names == ["background", "lesion"] and bundle.in_channels == 3
    assert bundle.val.pairs[0].mask.name == "ISIC_0000006_segmentation.png"
    image, mask = bundle.test[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) == {0, 1}


def test_isic_training_folder_only_is_split_by_fractions(isic_root: Path):
    for split in ("val", "test"):
        for folder in ISIC_FOLDERS[split]:
            for file in (isic_root / folder).iterdir():
                file.unlink()
            (isic_root / folder).rmdir()
    args = parse("--data", "isic2018", "--root", str(isic_root), "--val-fraction", "0.2",
                 "--test-fraction", "0.3")
    bundle = _build(args, seed=0)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (3, 1, 2)
    stems = [p.stem for ds in (bundle.train, bundle.val, bundle.test) for p in ds.pairs]
    assert sorted(stems) == [f"ISIC_{i:07d}" for i in range(6)]
    assert [p.stem for p in _build(args, seed=0).val.pairs] == [p.stem for p in bundle.val.pairs]


def test_isic_without_a_test_folder_cuts_only_the_test_split_off_training(isic_root: Path):
    """The official validation set stays the val split, and no training image is lost to a val
    share that is not cut (nor kept anywhere)."""
    for folder in ISIC_FOLDERS["test"]:
        for file in (isic_root / folder).iterdir():
            file.unlink()
        (isic_root / folder).rmdir()
    bundle = _build(parse("--data", "isic2018", "--root", str(isic_root), "--val-fraction", "0.2",
                          "--test-fraction", "0.3"), seed=0)
    assert [p.stem for p in bundle.val.pairs] == ["ISIC_0000006", "ISIC_0000007"]
    assert (len(bundle.train), len(bundle.test)) == (4, 2)
    stems = [p.stem for ds in (bundle.train, bundle.test) for p in ds.pairs]
    assert sorted(stems) == [f"ISIC_{i:07d}" for i in range(6)]


def test_isic_errors_name_the_missing_thing(isic_root: Path, tmp_path_factory):
    (isic_root / ISIC_FOLDERS["train"][1] / "ISIC_0000002_segmentation.png").unlink()
    with pytest.raises(DataError, match=r"mask for image .*ISIC_0000002\.jpg is missing: expected .*"
                                        r"ISIC_0000002_segmentation\.png"):
        _build(parse("--data", "isic2018", "--root", str(isic_root)), 0)
    for file in (isic_root / ISIC_FOLDERS["test"][1]).iterdir():
        file.unlink()
    (isic_root / ISIC_FOLDERS["test"][1]).rmdir()
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DataError, match="ISIC2018_Task1-2_Training_Input"):
        _build(parse("--data", "isic2018", "--root", str(empty)), 0)
    with pytest.raises(DataError, match="needs --root"):
        _build(parse("--data", "isic2018"), 0)
    with pytest.raises(DataError, match=r"data root .*nowhere does not exist"):
        _build(parse("--data", "isic2018", "--root", str(empty / "nowhere")), 0)
    with pytest.raises(DataError, match="2 classes"):
        _build(parse("--data", "isic2018", "--root", str(isic_root), "--num-classes", "3"), 0)


@pytest.mark.parametrize(("saved_as", "hint"), [
    ("ISIC_0000002_segmentation.jpg", "ISIC_0000002_segmentation.jpg is there, but masks are read from .png "
                                      "files only: JPEG's compression"),
    ("ISIC_0000002.png", "ISIC_0000002.png is there, named as its image: this layout names the mask of "
                         "ISIC_0000002 ISIC_0000002_segmentation.png"),
], ids=["jpeg", "image-stem"])
def test_isic_mask_saved_under_another_name_is_named(isic_root: Path, saved_as, hint):
    """The file that is there was not named; the error said only which one was expected."""
    truth = isic_root / ISIC_FOLDERS["train"][1]
    (truth / "ISIC_0000002_segmentation.png").rename(truth / saved_as)
    with pytest.raises(DataError, match=re.escape(hint)):
        _build(parse("--data", "isic2018", "--root", str(isic_root)), 0)


# --- generic folder ------------------------------------------------------------------------------


def test_folder_with_binary_masks_and_fractions(folder_root: Path):
    args = parse("--data", "folder", "--root", str(folder_root), "--img-size", "8")
    bundle = _build(args, seed=0)
    assert bundle.num_classes == 2 and bundle.class_names == ["background", "foreground"]
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (6, 2, 2)
    other_seed = _build(args, seed=1)
    assert {p.stem for p in other_seed.val.pairs} != {p.stem for p in bundle.val.pairs} or \
        {p.stem for p in other_seed.test.pairs} != {p.stem for p in bundle.test.pairs}
    _, mask = bundle.train[0]
    assert mask.shape == (8, 8) and set(mask.unique().tolist()) == {0, 1}


def test_the_fraction_split_of_a_seed_does_not_change_between_versions():
    """Runs record their split (split_fingerprint) and a resume compares it: a new version must cut
    the same samples off for the same seed, or every earlier run would be refused on resume."""
    from cmrf.data.splits import split_by_fractions

    assert split_by_fractions(list(range(10)), 0.2, 0.2, 0) == {
        "val": [2, 6], "test": [1, 3], "train": [8, 7, 4, 9, 0, 5]}
    assert split_by_fractions(list(range(10)), 0.2, 0.2, 7) == {
        "val": [7, 6], "test": [2, 1], "train": [8, 4, 9, 5, 3, 0]}


def test_masks_drawn_in_transparency_are_refused_and_opaque_alpha_ignored(tmp_path: Path):
    values = np.zeros((6, 8), dtype=np.uint8)
    values[:, :4] = 255
    opaque = Image.fromarray(np.stack([values, np.full_like(values, 255)], -1), mode="LA")
    opaque.save(tmp_path / "opaque.png")
    assert np.array_equal(read_mask_file(tmp_path / "opaque.png"), values // 255)
    white = np.full((6, 8, 3), 255, dtype=np.uint8)  # the mask lives in the alpha channel only
    Image.fromarray(np.concatenate([white, values[..., None]], -1), mode="RGBA").save(tmp_path / "rgba.png")
    with pytest.raises(DataError, match=r"rgba.png has a transparency \(alpha\) channel that varies "
                                        r"\(RGBA, alpha 0..255\)"):
        read_mask_file(tmp_path / "rgba.png")


def test_black_and_white_palette_masks_read_as_viewers_show_them(tmp_path: Path):
    """PNG optimisers and Pillow's quantize store a 0/255 mask as a black-and-white palette, often
    white (the lesion) at index 0: read by index, it was inverted, silently. The palette decides,
    so a mask that uses one entry only (no lesion) is read like the others."""
    for i in range(4):
        _, mask_path = write_pair(tmp_path, f"case{i}", seed=i)  # left half 255: the lesion
        if i == 3:  # a healthy case: background only
            Image.new("L", (20, 16), 0).save(mask_path)
        Image.open(mask_path).convert("RGB").quantize(2).save(mask_path)
    assert Image.open(tmp_path / "masks" / "case0.png").getpalette()[:3] == [255, 255, 255]
    assert decode_mask(tmp_path / "masks" / "case3.png").present.tolist() == [0]
    bundle = _build(parse("--data", "folder", "--root", str(tmp_path), "--img-size", "16"), 0)
    splits = (bundle.train, bundle.val, bundle.test)
    masks = [dataset[i][1] for dataset in splits for i in range(len(dataset))]
    assert bundle.num_classes == 2
    healthy = [mask for mask in masks if not mask.any()]
    assert len(healthy) == 1 and all(mask[:, :8].eq(1).all() and mask[:, 8:].eq(0).all()
                                     for mask in masks if mask.any())  # the lesion: the left half


@pytest.mark.parametrize("palette, indices, expected", [
    # class colours, a background-only file among them: by index, like the files with lesions
    ([255, 255, 255, 255, 0, 0], [[0, 0], [0, 0]], [0]),
    ([255, 255, 255, 255, 0, 0], [[0, 1], [1, 0]], [0, 1]),
    # grey class levels (three classes): by index, as --num-classes 3 expects
    ([0, 0, 0, 128, 128, 128, 255, 255, 255], [[0, 1], [2, 0]], [0, 1, 2]),
    # black padding: indices 0 and 5 are both black, only the index tells them apart
    ([0, 0, 0, 255, 255, 255] + [0] * (254 * 3), [[0, 5], [5, 0]], [0, 5]),
    # an index past a one-entry palette
    ([0, 0, 0], [[0, 1], [1, 0]], [0, 1]),
    # black and white: the levels (white at index 0 is 255)
    ([255, 255, 255, 0, 0, 0], [[0, 1], [1, 1]], [0, 255]),
])
def test_other_palettes_are_read_by_index(tmp_path: Path, palette, indices, expected):
    write_palette_mask(tmp_path / "m.png", np.array(indices), palette)
    assert decode_mask(tmp_path / "m.png").present.tolist() == expected


def test_save_mask_png_palettes_read_back_exactly(tmp_path: Path):
    for num_classes in (3, 12, 256):
        own = np.zeros((4, 4), dtype=np.int64)
        own[0, 0], own[1, 1] = num_classes - 1, min(num_classes - 1, 11)
        save_mask_png(own, tmp_path / "own.png", num_classes=num_classes)
        assert np.array_equal(read_mask_file(tmp_path / "own.png"), own), num_classes


def test_folder_with_palette_masks_infers_classes_and_reads_names(tmp_path: Path):
    for i in range(5):
        write_pair(tmp_path, f"slice{i}", seed=i)
        values = np.zeros((16, 20), dtype=np.uint8)
        values[2:6, 2:6], values[8:12, 2:6] = 1, 2
        values[8:12, 10:14] = 3 if i == 4 else 1
        write_palette_mask(tmp_path / "masks" / f"slice{i}.png", values)
    (tmp_path / "classes.txt").write_text("BG\nlung field\nGGO\nconsolidation\n")
    bundle = _build(parse("--data", "folder", "--root", str(tmp_path), "--img-size", "20"), 0)
    assert bundle.num_classes == 4 and bundle.class_names == ["BG", "lung field", "GGO", "consolidation"]
    datasets = (bundle.train, bundle.val, bundle.test)
    masks = torch.cat([dataset[i][1].flatten() for dataset in datasets for i in range(len(dataset))])
    assert set(masks.unique().tolist()) == {0, 1, 2, 3}
    (tmp_path / "classes.txt").write_text("BG\nlesion\n")  # names 2 classes: values 2 and 3 are not classes
    with pytest.raises(DataError, match=r"(?s)not classes of classes\.txt \(2 names\), 0\.\.1:.*slice0\.png"):
        _build(parse("--data", "folder", "--root", str(tmp_path)), 0)
    with pytest.raises(DataError, match="classes.txt has 2 classes, but the mask options give 4"):
        _build(parse("--data", "folder", "--root", str(tmp_path), "--num-classes", "4"), 0)
    (tmp_path / "classes.txt").unlink()  # without names or options, 0..3 is ambiguous
    with pytest.raises(DataError, match=r"(?s)not binary.*If these are class indices: --num-classes 4"):
        _build(parse("--data", "folder", "--root", str(tmp_path)), 0)
    with_option = parse("--data", "folder", "--root", str(tmp_path), "--num-classes", "4")
    assert _build(with_option, 0).num_classes == 4


def test_folder_with_split_files(folder_root: Path, tmp_path_factory):
    split_dir = tmp_path_factory.mktemp("splits")
    # blanks around names (an editor's trailing spaces, an indented list) are not part of them
    (split_dir / "train.txt").write_text("# training cases\ncase0 \ncase1.png\n  case2\t\n\ncase3\n")
    (split_dir / "val.txt").write_text("case4\ncase5\n")
    (split_dir / "test.txt").write_text("case6\n")
    args = parse("--data", "folder", "--root", str(folder_root), "--split-dir", str(split_dir))
    # case7..case9 are listed nowhere: left out, as listed, and said (a forgotten line looks the same)
    with pytest.warns(DataWarning, match=r"3 of 10 samples are in none of the split files of .*splits.* and "
                                         r"are not used: case7, case8, case9$"):
        bundle = _build(args, 0)
    assert [p.stem for p in bundle.train.pairs] == ["case0", "case1", "case2", "case3"]
    assert [p.stem for p in bundle.test.pairs] == ["case6"]
    (split_dir / "test.txt").write_text("case6\ncase7.webp\ncase8\ncase9\n")  # every pair listed: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert [p.stem for p in _build(args, 0).test.pairs] == ["case6", "case7", "case8", "case9"]

    (split_dir / "test.txt").write_text("# nothing\n")
    with pytest.raises(DataError, match=r"test\.txt lists no samples: the test split is empty"):
        _build(args, 0)
    (split_dir / "test.txt").write_text("case5\n")
    with pytest.raises(DataError, match=r"test\.txt, line 1: 'case5' is already in val\.txt"):
        _build(args, 0)
    (split_dir / "test.txt").write_text("case6\ncase99\n")
    with pytest.raises(DataError, match=r"test\.txt, line 2: no image/mask pair with stem 'case99'"):
        _build(args, 0)
    (split_dir / "test.txt").unlink()
    with pytest.raises(DataError, match=r"split file .*test\.txt does not exist"):
        _build(args, 0)


@pytest.mark.filterwarnings("ignore:.*in none of the split files")
@pytest.mark.parametrize(("file_stem", "listed", "hint"), [
    ("cafe\u0301 1", "caf\u00e9 1", "accents decomposed (NFD)"),  # files from macOS, list typed elsewhere
    ("caf\u00e9 1", "cafe\u0301 1", "accents composed (NFC)"),
    ("Case2", "case2", "must match in case too"),
], ids=["nfd-files", "nfc-files", "case"])
def test_a_listed_stem_that_differs_in_unicode_form_or_case_is_named(tmp_path, file_stem, listed, hint):
    """The list's name and the file's look identical on screen: the error said only "no pair"."""
    from cmrf.data.pairs import Pair
    from cmrf.data.splits import split_from_files

    stems = (file_stem, "b", "c")
    pairs = [Pair(stem, tmp_path / f"{stem}.png", tmp_path / f"{stem}_m.png") for stem in stems]
    for name, text in (("train", f"{listed}\n"), ("val", "b\n"), ("test", "c\n")):
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=f"line 1: no image/mask pair with stem .* \\(pair {file_stem!r} is "
                                        f"there.*{re.escape(hint)}"):
        split_from_files(pairs, tmp_path)


@pytest.mark.filterwarnings("ignore:.*in none of the split files")  # listed subsets, on purpose
def test_split_fingerprint_names_membership_and_file_sizes_name_both_files(folder_root: Path,
                                                                           tmp_path_factory):
    """A resume compares these: the same samples listed in another order are the same split; a
    mask rewritten to another byte size is other data (as an image would be)."""
    from cmrf.data.splits import split_file_sizes, split_fingerprint

    def bundle_of(train: str):
        split_dir = tmp_path_factory.mktemp("splits")
        for name, text in (("train", train), ("val", "case4\n"), ("test", "case5\n")):
            (split_dir / f"{name}.txt").write_text(text)
        return _build(parse("--data", "folder", "--root", str(folder_root), "--img-size", "8",
                            "--split-dir", str(split_dir)), 0)

    first = bundle_of("case0\ncase1\ncase2\ncase3\n")
    reordered = bundle_of("case3\ncase1\ncase0\ncase2\n")
    other = bundle_of("case0\ncase1\ncase2\ncase6\n")
    assert split_fingerprint(first) == split_fingerprint(reordered) != split_fingerprint(other)
    assert split_fingerprint(first).startswith("train 4, val 1, test 1 (sha1 ")
    sizes = split_file_sizes(first)
    assert split_file_sizes(reordered) == sizes
    mask = folder_root / "masks" / "case0.png"
    values = np.asarray(Image.open(mask))
    Image.fromarray(values).save(mask, compress_level=0)  # same values, other byte size
    assert split_file_sizes(first) != sizes


def test_only_the_training_split_is_augmented(folder_root: Path):
    """Validation and test scores are of the images as they are."""
    bundle = _build(parse("--data", "folder", "--root", str(folder_root), "--img-size", "8"), 0)
    assert (bundle.train.augment, bundle.val.augment, bundle.test.augment) == (True, False, False)


def test_a_root_with_other_folder_names_says_what_it_holds_and_how_to_link(tmp_path: Path):
    """A Decathlon-style root (imagesTr/, labelsTr/) or one with labels/ got only "mask folder
    .../masks does not exist"; the error names the folders there and the link that fits."""
    from cmrf.data.folder import find_folder_pairs
    from cmrf.data.pairs import find_pairs

    for i in range(2):
        write_pair(tmp_path, f"case{i}", seed=i)
    (tmp_path / "masks").rename(tmp_path / "labelsTr")
    (tmp_path / "notes").mkdir()
    with pytest.raises(DataError) as info:
        find_folder_pairs(tmp_path)
    assert str(info.value) == (
        f"mask folder {tmp_path / 'masks'} does not exist: the data root must hold images/ and masks/, "
        f"with files of the same stem paired; {tmp_path} holds labelsTr/, notes/: if labelsTr/ holds the "
        f"masks, rename it to masks/ or link it (ln -s labelsTr {shlex.quote(str(tmp_path / 'masks'))})"
    )
    (tmp_path / "images").rename(tmp_path / "my images")  # quoted for the shell
    with pytest.raises(DataError, match=r"image folder .*holds labelsTr/, my images/, notes/: if my images/ "
                                        r"holds the images, .*\(ln -s 'my images' "):
        find_folder_pairs(tmp_path)
    (tmp_path / "labelsTr").rename(tmp_path / "cache")  # nothing that looks meant: no link suggested
    with pytest.raises(DataError, match=r"mask folder .* holds cache/, notes/$"):
        find_pairs(tmp_path / "my images", tmp_path / "masks", (".png",))
    (tmp_path / "masks").write_text("")  # a file in the way: a link cannot go there
    with pytest.raises(DataError, match=r"mask folder .*masks does not exist or is not a folder$"):
        find_pairs(tmp_path / "my images", tmp_path / "masks", (".png",))
    (tmp_path / "masks").unlink()
    (tmp_path / "cache").rename(tmp_path / "labelsTr")
    (tmp_path / "my images").rename(tmp_path / "imagesTr")
    with pytest.raises(DataError) as info:  # both folders lacking: both fixes at once, not one per run
        find_folder_pairs(tmp_path)
    assert str(info.value).startswith(f"image folder {tmp_path / 'images'} and mask folder "
                                      f"{tmp_path / 'masks'} do not exist: ")
    assert str(info.value).endswith(
        f"holds imagesTr/, labelsTr/, notes/: if imagesTr/ holds the images, rename it to images/ or link "
        f"it (ln -s imagesTr {shlex.quote(str(tmp_path / 'images'))}); if labelsTr/ holds the masks, "
        f"rename it to masks/ or link it (ln -s labelsTr {shlex.quote(str(tmp_path / 'masks'))})")
    (tmp_path / "images").symlink_to("imagesTr")
    (tmp_path / "masks").symlink_to("labelsTr")
    assert [pair.stem for pair in find_folder_pairs(tmp_path)] == ["case0", "case1"]


def test_folder_bad_data_is_reported_with_the_file(tmp_path: Path):
    def folder_args(*extra):
        return parse("--data", "folder", "--root", str(tmp_path), "--img-size", "8", *extra)

    with pytest.raises(DataError, match=r"image folder .*images does not exist"):
        _build(folder_args(), 0)
    for i in range(2):
        write_pair(tmp_path, f"case{i}", seed=i)
    with pytest.raises(DataError, match="the train split is empty: 2 samples"):
        _build(folder_args(), 0)
    with pytest.raises(DataError, match="--test-fraction 0.5 leave nothing to train on"):
        _build(folder_args("--val-fraction", "0.5", "--test-fraction", "0.5"), 0)
    write_pair(tmp_path, "case2", seed=2)

    write_pair(tmp_path, "orphan")
    (tmp_path / "masks" / "orphan.png").unlink()
    with pytest.raises(DataError, match=r"mask for image .*orphan\.png is missing"):
        _build(folder_args(), 0)
    (tmp_path / "images" / "orphan.png").unlink()

    write_pair(tmp_path, "case0", image_suffix=".jpg")
    with pytest.raises(DataError, match="two image files with stem 'case0'"):
        _build(folder_args(), 0)
    (tmp_path / "images" / "case0.jpg").unlink()

    Image.new("L", (21, 16)).save(tmp_path / "masks" / "case1.png")
    with pytest.raises(DataError, match=r"image .*case1\.png is 20x16 but its mask .*case1\.png is 21x16"):
        _build(folder_args(), 0)
    write_pair(tmp_path, "case1", seed=1)

    (tmp_path / "masks" / "case2.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match=r"cannot read mask file .*case2\.png"):
        _build(folder_args(), 0)
    write_pair(tmp_path, "case2", mask_values=(0, 3))
    # Mask values are checked when the datasets are built, for every split, and every bad file is
    # listed: with case2 holding 3, the others' 255 is no longer binary foreground either.
    listed = (r"3 of 3 mask file\(s\) hold values that are not classes of --num-classes 2, 0\.\.1:\n"
              r"  .*case0\.png: 255\n  .*case1\.png: 255\n  .*case2\.png: 3\n"
              r"255 is binary foreground only when")
    with pytest.raises(DataError, match=listed):
        _build(folder_args("--num-classes", "2"), 0)
    bundle = _build(folder_args("--mask-values", "0", "255", "3"), 0)
    assert bundle.num_classes == 3 and bundle.class_names == ["background", "class 1", "class 2"]
    # An image whose header is fine but whose pixels are cut off fails when loaded, naming the file,
    # and from a DataLoader worker the error arrives without the worker's traceback in its message.
    write_pair(tmp_path, "case2", seed=2, size=(64, 48))
    image = tmp_path / "images" / "case2.png"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    dataset = FolderSegmentation([p for p in find_folder_pairs(tmp_path) if p.stem == "case2"], 8)
    with pytest.raises(DataError) as caught:
        list(DataLoader(dataset, num_workers=1))
    assert str(caught.value).startswith(f"cannot read image file {image}")


# --- mask conventions: read right or refused, before any training -------------------------------


def folder_of(root: Path, masks: dict[str, np.ndarray], suffix: str = ".png", size=(20, 16)) -> Path:
    """A folder with one random image per entry of ``masks`` (stem -> mask values (H, W) uint8)."""
    for i, (stem, values) in enumerate(masks.items()):
        write_pair(root, stem, size=size, seed=i)
        (root / "masks" / f"{stem}.png").unlink()
        mask = Image.fromarray(values.astype(np.uint8), mode="L")
        mask.save(root / "masks" / f"{stem}{suffix}", quality=75)
    return root


def halves(left: int, right: int, size=(20, 16)) -> np.ndarray:
    width, height = size
    values = np.full((height, width), right, dtype=np.uint8)
    values[:, : width // 2] = left
    return values


def folder_options(root: Path, *extra: str) -> dict:
    return data_options(parse("--data", "folder", "--root", str(root), "--img-size", "8", *extra))


def every_mask(bundle) -> torch.Tensor:
    return torch.cat([mask.flatten() for _, mask in load_all(bundle)])


@pytest.mark.parametrize("values", [(0, 255), (0, 1), (0, 0), (255, 255), (1, 1)])
@pytest.mark.parametrize("first_has_background", [True, False])
def test_binary_masks_are_two_classes(tmp_path: Path, values, first_has_background):
    """Also when no mask holds a 0 (all lesion: every mask all 255 or all 1)."""
    first = halves(0, values[1]) if first_has_background else halves(*values)
    folder_of(tmp_path, {f"c{i}": halves(*values) if i else first for i in range(5)})
    bundle = build_datasets(**folder_options(tmp_path))
    assert bundle.num_classes == 2 and bundle.class_names == ["background", "foreground"]
    bundle.train.augment = False
    _, mask = bundle.train[0]
    assert set(mask.unique().tolist()) <= {0, 1}
    foreground = values[1] != 0
    assert (mask[:, 4:] == int(foreground)).all()  # 255 (or 1) is class 1


def test_hints_for_two_binary_conventions_and_blurred_edges():
    """Following a hint must not turn binary masks into more classes."""
    mixed = [MaskValues(Path(name), values) for name, values in (("a.png", (0, 1)), ("b.png", (0, 255)),
                                                                  ("c.png", (0,)))]
    with pytest.raises(DataError) as caught:
        resolve_classes(mixed)
    assert "some as 0/1 and some as 0/255: --mask-threshold 1" in str(caught.value)
    assert "--mask-values 0 1 255" not in str(caught.value)
    mapping = resolve_classes(mixed, MaskRule(mask_threshold=1))  # what the hint says works
    assert mapping.num_classes == 2
    blurred = [MaskValues(Path("d.png"), (0, 4, 28, 32, 195, 223, 255))]
    with pytest.raises(DataError) as caught:
        resolve_classes(blurred)
    assert "--mask-values 0 4 28 32 195 223 255" in str(caught.value)
    assert "binary masks with blurred (anti-aliased) edges: --mask-threshold 128" in str(caught.value)
    with pytest.raises(DataError) as caught:  # grey levels without both extremes: no such guess
        resolve_classes([MaskValues(Path("e.png"), (0, 100, 200))])
    assert "--mask-threshold 128" not in str(caught.value)


def test_masks_with_0_1_2_255_stop_before_training_naming_files_and_values(tmp_path: Path):
    masks = {f"ok{i}": halves(0, 255) for i in range(4)}
    masks.update(odd0=halves(1, 2), odd1=halves(0, 255))
    masks["odd1"][0, 0] = 1
    folder_of(tmp_path, masks)
    with pytest.raises(DataError) as caught:
        build_datasets(**folder_options(tmp_path))
    message = str(caught.value)
    assert "not binary" in message and "values found over 6 mask file(s): 0, 1, 2, 255" in message
    assert "values 0, 255 in 4 file(s)" in message and "ok0.png" in message
    assert f"values 1, 2 in 1 file(s): {tmp_path / 'masks' / 'odd0.png'}" in message
    assert "values 0, 1, 255 in 1 file(s)" in message and "odd1.png" in message
    assert "--mask-values 0 1 2 255" in message and "--num-classes K" in message
    assert "--mask-threshold 128" not in message  # 1 and 2 look like classes, not blurred edges
    # The same folder from the command line: exit status 2, one error, and no run was started.
    from cmrf.cli import main

    out = tmp_path / "run"
    status = main(["train", "--data", "folder", "--root", str(tmp_path), "--img-size", "8", "--epochs", "1",
                   "--channels", "16", "32", "--device", "cpu", "--out", str(out)])
    assert status == 2 and not (out / "last.safetensors").exists()
    # Told which value is which class, the same masks are four classes.
    bundle = build_datasets(**folder_options(tmp_path, "--mask-values", "0", "1", "2", "255"))
    assert bundle.num_classes == 4 and set(every_mask(bundle).tolist()) == {0, 1, 2, 3}


def test_mask_values_map_each_value_to_its_class_and_refuse_others(tmp_path: Path):
    folder_of(tmp_path, {f"c{i}": halves(128, 255 if i % 2 else 0) for i in range(5)})
    bundle = build_datasets(**folder_options(tmp_path, "--mask-values", "0", "128", "255"))
    assert bundle.num_classes == 3
    dataset = bundle.train
    dataset.augment = False
    for index, pair in enumerate(dataset.pairs):
        _, mask = dataset[index]
        right = 2 if int(pair.stem[1:]) % 2 else 0
        assert (mask[:, :3] == 1).all() and (mask[:, 5:] == right).all()
    with pytest.raises(DataError, match=r"(?s)2 of 5 mask file\(s\) hold values that are not classes of "
                                        r"--mask-values 0, 128:\n  .*c1\.png: 255\n  .*c3\.png: 255"):
        build_datasets(**folder_options(tmp_path, "--mask-values", "0", "128"))
    with pytest.raises(DataError, match="--num-classes 2 disagrees with the 3 --mask-values"):
        build_datasets(**folder_options(tmp_path, "--mask-values", "0", "128", "255", "--num-classes", "2"))
    with pytest.raises(DataError, match="each value may appear once"):
        build_datasets(**folder_options(tmp_path, "--mask-values", "0", "0"))
    with pytest.raises(DataError, match="not both"):
        build_datasets(**folder_options(tmp_path, "--mask-values", "0", "255", "--mask-threshold", "9"))


def test_num_classes_reads_class_indices_and_lists_files_outside(tmp_path: Path):
    """The issue's case: 0/1 masks where one test mask holds 255, with --num-classes 2."""
    masks = {f"c{i}": halves(0, 1) for i in range(6)}
    masks["c5"] = halves(0, 255)
    folder_of(tmp_path, masks)
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    (split_dir / "train.txt").write_text("c0\nc1\nc2\nc3\n")
    (split_dir / "val.txt").write_text("c4\n")
    (split_dir / "test.txt").write_text("c5\n")  # the bad mask is in the test split
    options = folder_options(tmp_path, "--num-classes", "2", "--split-dir", str(split_dir))
    with pytest.raises(DataError, match=r"(?s)1 of 6 mask.*--num-classes 2, 0\.\.1:\n  .*c5\.png: 255\n"):
        build_datasets(**options)
    Image.fromarray(halves(0, 1), mode="L").save(tmp_path / "masks" / "c5.png")
    assert build_datasets(**options).num_classes == 2
    # 16-bit masks: class values beyond 255 are indices like any other.
    wide = np.zeros((16, 20), dtype=np.uint16)
    wide[:, 10:] = 300
    Image.fromarray(wide).save(tmp_path / "masks" / "c5.png")
    bundle = build_datasets(**folder_options(tmp_path, "--mask-values", "0", "1", "300", "--split-dir",
                                             str(split_dir)))
    assert bundle.num_classes == 3 and set(bundle.test[0][1].unique().tolist()) == {0, 2}


def test_jpeg_masks_are_refused_or_thresholded_on_request(tmp_path: Path):
    """JPEG 0/255 masks gain compression noise; they are refused unless --mask-threshold is given."""
    circle = np.zeros((48, 64), dtype=np.uint8)
    y, x = np.mgrid[:48, :64]
    circle[(y - 24) ** 2 + (x - 30) ** 2 < 15**2] = 255
    folder_of(tmp_path, {f"c{i}": np.roll(circle, 3 * i, axis=1) for i in range(5)}, ".jpg", size=(64, 48))
    noisy = np.unique(np.asarray(Image.open(tmp_path / "masks" / "c0.jpg")))
    assert len(noisy) > 2  # the premise: JPEG did add values
    with pytest.raises(DataError) as caught:
        build_datasets(**folder_options(tmp_path))
    message = str(caught.value)
    assert message.startswith("5 mask file(s) are JPEG or lossy WebP, whose compression changes pixel values")
    assert f"{tmp_path / 'masks' / 'c0.jpg'}: values 0, " in message and "--mask-threshold 128" in message
    with pytest.raises(DataError, match="are JPEG"):  # --num-classes 2 does not make them exact
        build_datasets(**folder_options(tmp_path, "--num-classes", "2"))
    options = data_options(parse("--data", "folder", "--root", str(tmp_path), "--mask-threshold", "128"))
    bundle = build_datasets(**{**options, "img_size": 64})
    bundle.train.augment = False
    image, mask = bundle.train[0]
    index = [p.stem for p in bundle.train.pairs][0]
    expected = torch.from_numpy((np.roll(circle, 3 * int(index[1:]), axis=1) > 0).astype(np.int64))
    expected = torch.nn.functional.interpolate(expected[None, None].float(), (64, 64), mode="nearest-exact")
    assert bundle.num_classes == 2 and mask.shape == (64, 64)
    assert (mask != expected[0, 0].long()).float().mean() < 0.02  # only edge pixels may differ


def test_many_grey_levels_suggest_a_threshold(tmp_path: Path):
    ramp = np.tile(np.arange(20, dtype=np.uint8) * 13, (16, 1))  # anti-aliased-like: 20 levels
    folder_of(tmp_path, {f"c{i}": ramp for i in range(5)})
    with pytest.raises(DataError, match=r"(?s)values found over 5 mask file\(s\): 0, 13, 26, .* \(20 values\)"
                                        r".*--mask-threshold 128"):
        build_datasets(**folder_options(tmp_path))
    bundle = build_datasets(**folder_options(tmp_path, "--mask-threshold", "128"))
    bundle.train.augment = False
    assert bundle.num_classes == 2 and set(bundle.train[0][1].unique().tolist()) == {0, 1}


@pytest.mark.parametrize("masks, side", [((0, 1), "below"), ((200, 255), "at or above")])
def test_a_threshold_that_leaves_one_class_is_refused(tmp_path: Path, masks, side):
    """--mask-threshold 128 on 0/1 masks would make every pixel background (and 200/255 masks
    every pixel foreground): the run would learn nothing, so the data is refused."""
    folder_of(tmp_path, {f"c{i}": halves(*masks) for i in range(5)})
    with pytest.raises(DataError, match=rf"--mask-threshold 128: every value in the masks is {side} it "
                                        rf"\(values seen: {masks[0]}, {masks[1]} in 5 mask\(s\)\)"):
        build_datasets(**folder_options(tmp_path, "--mask-threshold", "128"))


def test_a_threshold_equal_to_the_foreground_value_splits_the_masks():
    """Pixels at the threshold are class 1 (docs/data.md), so 0/128 masks with --mask-threshold 128
    are two classes, not "every value below it"; 128/200 masks are refused as all foreground."""
    masks = [MaskValues(Path("a.png"), (0, 128)), MaskValues(Path("b.png"), (0,))]
    mapping = resolve_classes(masks, MaskRule(mask_threshold=128))
    assert mapping.num_classes == 2
    assert mapping.apply(np.array([[0, 127, 128]], np.uint8)).tolist() == [[0, 0, 1]]
    with pytest.raises(DataError, match=r"every value in the masks is at or above it \(values seen: 128, "):
        resolve_classes([MaskValues(Path("c.png"), (128, 200))], MaskRule(mask_threshold=128))


@pytest.mark.parametrize(
    ("options", "message"),
    [(dict(num_classes=1), r"--num-classes 1: segmentation needs at least 2 classes"),
     (dict(mask_values=(255,)), r"--mask-values 255: give at least two values"),
     (dict(mask_threshold=0), r"--mask-threshold 0: expected a value >= 1"),
     (dict(mask_threshold=128, num_classes=3), r"--mask-threshold makes 2 classes, but --num-classes is 3")],
)
def test_mask_options_that_cannot_make_a_segmentation_are_refused_from_python(folder_root: Path, options,
                                                                              message):
    """build_datasets takes the options without argparse's checks: one class, one value, a threshold
    of 0 (every pixel foreground) or a class count a threshold cannot make are refused, not trained."""
    with pytest.raises(DataError, match=message):
        build_datasets(**{**folder_options(folder_root), **options})
    # The nearest valid options are accepted.
    for valid in (dict(num_classes=2), dict(mask_threshold=1, num_classes=2)):
        assert build_datasets(**{**folder_options(folder_root), **valid}).num_classes == 2


def test_every_bad_file_is_reported_up_to_a_cap(tmp_path: Path):
    masks = {f"c{i:02d}": halves(0, 255) for i in range(30)}
    for i in range(25):
        masks[f"c{i:02d}"] = halves(0, 7)
    folder_of(tmp_path, masks)
    with pytest.raises(DataError) as caught:
        build_datasets(**folder_options(tmp_path, "--num-classes", "2"))
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("30 of 30 mask file(s)")  # 7 is out of range; so 255 is not binary either
    listed = [line for line in lines if line.startswith("  /")]
    assert len(listed) == 20 and "  ... and 10 more" in lines
    for i in range(25):  # several unreadable files are all reported too
        (tmp_path / "masks" / f"c{i:02d}.png").write_bytes(b"broken")
    with pytest.raises(DataError) as caught:
        build_datasets(**folder_options(tmp_path))
    lines = str(caught.value).splitlines()
    assert lines[0] == "25 of 30 image/mask pairs cannot be used:" and "  ... and 5 more" in lines
    assert sum("cannot read mask file" in line for line in lines) == 20


def test_isic_bad_mask_in_the_official_test_folder_fails_the_build(isic_root: Path):
    truth = isic_root / ISIC_FOLDERS["test"][1] / "ISIC_0000010_segmentation.png"
    Image.fromarray(halves(0, 128), mode="L").save(truth)
    with pytest.raises(DataError, match=r"(?s)1 of 11 mask file.*ISIC 2018 Task 1 \(2 classes\), 0\.\.1:\n"
                                        r"  .*ISIC_0000010_segmentation\.png: 128"):
        build_datasets(**data_options(parse("--data", "isic2018", "--root", str(isic_root))))


# --- stored roots are absolute --------------------------------------------------------------------


def test_relative_root_and_split_dir_are_stored_absolute(folder_root: Path, monkeypatch):
    monkeypatch.chdir(folder_root.parent)
    relative = folder_root.name
    options = data_options(parse("--data", "folder", "--root", relative, "--split-dir", f"./{relative}/../x",
                                 "--cache-dir", "~/c"))
    assert options["root"] == folder_root and options["root"].is_absolute()
    assert parse("--root", relative).root == folder_root  # what cmrf train stores from the parsed flags
    assert options["split_dir"] == folder_root.parent / "x"
    assert options["cache_dir"] == Path.home() / "c"
    # A namespace filled by hand (evaluate fills it from a run's stored strings) is resolved too.
    assert data_options(argparse.Namespace(root=relative, split_dir=None))["root"] == folder_root
    # What cmrf train stores in its metadata works from another folder.
    monkeypatch.chdir("/")
    assert build_datasets(**{**options, "split_dir": None, "img_size": 8}).num_classes == 2


# --- one helper for image sizes -------------------------------------------------------------------


def test_image_size_is_height_width(tmp_path: Path):
    from cmrf.data import image_size

    write_pair(tmp_path, "wide", size=(40, 30))
    assert image_size(tmp_path / "images" / "wide.png") == (30, 40)
    with pytest.raises(DataError, match=r"image file .*none\.png does not exist"):
        image_size(tmp_path / "none.png")


# --- decoded once, cached ---------------------------------------------------------------------


def cache_folders(cache_dir: Path) -> list[Path]:
    """The disk caches in ``cache_dir``, without their lock files (``.NAME.lock``)."""
    return [path for path in cache_dir.iterdir() if not path.name.startswith(".")]


class Counter:
    """Wraps a function and counts its calls (in this process)."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def count_decoding(monkeypatch) -> tuple[Counter, Counter]:
    import cmrf.data.folder as folder

    images, masks = Counter(folder.decode_image), Counter(folder.decode_mask)
    monkeypatch.setattr(folder, "decode_image", images)
    monkeypatch.setattr(folder, "decode_mask", masks)
    return images, masks


def load_all(bundle) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [ds[i] for ds in (bundle.train, bundle.val, bundle.test) for i in range(len(ds))]


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_each_file_is_decoded_once(folder_root: Path, tmp_path_factory, monkeypatch, cache):
    images, masks = count_decoding(monkeypatch)
    cache_dir = tmp_path_factory.mktemp("cache")
    options = folder_options(folder_root, "--cache", cache, "--cache-dir", str(cache_dir))
    bundle = build_datasets(**options)
    assert (images.calls, masks.calls) == (0, 10)  # every mask read once, by the check
    first = load_all(bundle)
    assert (images.calls, masks.calls) == (10, 10)  # images on first use; masks came from the check
    for epoch in range(1, 3):
        bundle.train.set_epoch(epoch)
        load_all(bundle)
    assert (images.calls, masks.calls) == (10, 10)
    bundle.train.augment = False
    held_out = len(bundle.train)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[held_out:], load_all(bundle)[held_out:]))
    again = build_datasets(**options)
    load_all(again)
    if cache == "disk":  # a second run reads nothing: no mask for the check, no image
        assert (images.calls, masks.calls) == (10, 10)
        assert len(cache_folders(cache_dir)) == 1
    else:
        assert (images.calls, masks.calls) == (20, 20)


def test_a_disk_cache_whose_data_check_was_not_saved_is_made_again(folder_root: Path, tmp_path_factory,
                                                                    monkeypatch):
    """A run stopped after the store was made but before its data check was saved (no
    facts.json): the next run checks the masks again instead of trusting an unchecked store."""
    cache_dir = tmp_path_factory.mktemp("cache")
    options = folder_options(folder_root, "--cache", "disk", "--cache-dir", str(cache_dir))
    load_all(build_datasets(**options))
    (facts,) = cache_dir.glob("*/facts.json")
    facts.unlink()
    images, masks = count_decoding(monkeypatch)
    load_all(build_datasets(**options))
    assert masks.calls == 10 and (facts.parent / "facts.json").is_file()
    assert images.calls == 0  # the images the stopped run decoded are still used


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_a_disk_cache_is_private_and_one_of_another_user_is_refused(folder_root: Path, tmp_path_factory,
                                                                       monkeypatch):
    """The cache holds decoded patient images: it was made with the umask's permissions (readable
    by every user), and a store folder another user owned or could write was read as found (files
    planted in a shared --cache-dir were trained on as the data): one of ours that others can write
    is made afresh, one of another user, or a link, refused."""
    cache_dir = tmp_path_factory.mktemp("cache")
    options = folder_options(folder_root, "--cache", "disk", "--cache-dir", str(cache_dir))
    load_all(build_datasets(**options))
    (store,) = cache_folders(cache_dir)
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    store.chmod(0o755)  # as an older version left it: reused, and made private
    images, _ = count_decoding(monkeypatch)
    load_all(build_datasets(**options))
    assert images.calls == 0 and stat.S_IMODE(store.stat().st_mode) == 0o700
    store.chmod(0o775)  # others could have put files in it (umask 002): not read, made afresh
    planted = next(store.glob("*.npy"))
    with pytest.warns(DataWarning, match=rf"data cache {re.escape(str(store))} was writable by other users "
                                         r"\(mode 775.*cannot be trusted: it is made afresh"):
        load_all(build_datasets(**options))
    assert images.calls == 10 and stat.S_IMODE(store.stat().st_mode) == 0o700 and planted.is_file()
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)
    with pytest.raises(DataError, match=rf"belongs to user id {real_uid}, so its contents cannot be trusted"):
        build_datasets(**options)
    monkeypatch.undo()
    moved = store.rename(cache_dir / "elsewhere")
    store.symlink_to(moved)
    with pytest.raises(DataError, match=r"is a link, so its contents cannot be trusted"):
        build_datasets(**options)


def _fill_shared_store(cache_dir: Path, barrier, errors) -> None:
    from cmrf.data.store import Layout, StoreSpec, open_store

    layout = Layout(6, (2, 4, 4), "uint8", (4, 4), "uint8")
    barrier.wait()  # every process opens the store at the same moment, as torchrun's ranks do
    try:
        store = open_store(StoreSpec("disk", "race", ("same files",), cache_dir), layout)
        for index in range(layout.count):  # as a dataset does: decode only what no one has kept
            if store.get_image(index) is None:
                store.put_image(index, np.full(layout.image_shape, index + 1, np.uint8))
    except Exception as err:  # reported to the parent: a child's traceback is lost
        errors.put(f"{type(err).__name__}: {err}")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks processes")
def test_processes_opening_one_disk_cache_at_once_share_it_intact(tmp_path: Path, monkeypatch):
    """A process that lost the race to create the folder removed the winner's, which had opened some
    files by then: it wrote pixels into deleted files and marked them filled in the new folder, where
    they read back black (4 of 10 trials with 4 processes), or failed on a file gone missing."""
    import multiprocessing

    from cmrf.data import store as store_module
    from cmrf.data.store import Layout, StoreSpec, open_store

    original_map = store_module._map

    def slow_map(*args):  # widen the window between mapping one file and the next
        mapped = original_map(*args)
        time.sleep(0.05)
        return mapped

    monkeypatch.setattr(store_module, "_map", slow_map)  # (forked children inherit it)
    context = multiprocessing.get_context("fork")
    for trial in range(3):
        cache_dir = tmp_path / f"cache{trial}"
        barrier, errors = context.Barrier(4), context.Queue()
        processes = [context.Process(target=_fill_shared_store, args=(cache_dir, barrier, errors))
                     for _ in range(4)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
        assert errors.empty(), errors.get()
        assert len(cache_folders(cache_dir)) == 1
        layout = Layout(6, (2, 4, 4), "uint8", (4, 4), "uint8")
        store = open_store(StoreSpec("disk", "race", ("same files",), cache_dir), layout)
        for index in range(layout.count):
            assert (store.get_image(index) == index + 1).all(), (trial, index)


@pytest.mark.parametrize("cut", ["images.npy", "masks.npy"])
def test_a_cut_disk_cache_file_is_made_again_not_read_as_zeros(folder_root: Path, tmp_path_factory, cut):
    """numpy's read-write mapping extended a file cut short (a partial copy of the cache) with
    zeros: 9 of 10 images read black, their flags still set, and training ran on them silently."""
    cache_dir = tmp_path_factory.mktemp("cache")
    options = folder_options(folder_root, "--cache", "disk", "--cache-dir", str(cache_dir))
    bundle = build_datasets(**options)
    bundle.train.augment = False
    expected = load_all(bundle)
    (file,) = cache_dir.glob(f"*/{cut}")
    size = file.stat().st_size
    with open(file, "r+b") as handle:
        handle.truncate(128 + (size - 128) // 2)  # the header (128 bytes) and half the data
    again = build_datasets(**options)
    again.train.augment = False
    for (image, mask), (want_image, want_mask) in zip(load_all(again), expected, strict=True):
        assert torch.equal(image, want_image) and torch.equal(mask, want_mask)
    assert file.stat().st_size == size  # made afresh


def test_without_cache_files_are_decoded_on_every_load(folder_root: Path, monkeypatch):
    images, masks = count_decoding(monkeypatch)
    bundle = build_datasets(**folder_options(folder_root, "--cache", "none"))
    load_all(bundle)
    load_all(bundle)
    assert (images.calls, masks.calls) == (20, 30)


@pytest.mark.parametrize("persistent", [False, True])
def test_workers_share_the_cache_and_see_epoch_and_augment(folder_root: Path, persistent):
    """Samples decoded by workers in epoch 1 are in the shared cache: later epochs read no file
    (the files are deleted after the first epoch), and set_epoch/augment reach running workers."""
    bundle = build_datasets(**folder_options(folder_root))
    train = bundle.train
    loader = DataLoader(train, batch_size=2, num_workers=2, persistent_workers=persistent)

    def epoch(number: int) -> torch.Tensor:
        train.set_epoch(number)
        return torch.cat([x.flatten() for x, _ in loader])

    first = epoch(0)
    for path in (folder_root / "images").iterdir():
        path.unlink()
    assert torch.equal(first, epoch(0))  # same epoch, same draws, from the cache
    assert not torch.equal(first, epoch(1))
    train.augment = False
    plain = torch.cat([train[i][0].flatten() for i in range(len(train))])
    assert torch.equal(epoch(2), plain)


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_pickled_datasets_share_the_cache(folder_root: Path, tmp_path_factory, cache):
    """Spawned workers get the dataset through torch's pickler: the copy writes to the same cache."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 (registers torch's reductions, as DataLoader does)

    cache_dir = tmp_path_factory.mktemp("cache")
    bundle = build_datasets(**folder_options(folder_root, "--cache", cache, "--cache-dir", str(cache_dir)))
    copy = pickle.loads(ForkingPickler.dumps(bundle.val))
    assert copy.source.store is not bundle.val.source.store
    loaded = [copy[i][0] for i in range(len(copy))]
    for path in (folder_root / "images").iterdir():
        path.unlink()
    assert all(torch.equal(image, bundle.val[i][0]) for i, image in enumerate(loaded))


def test_memory_cache_falls_back_to_disk_if_too_big(folder_root: Path, tmp_path_factory, monkeypatch):
    import cmrf.data.store as store

    monkeypatch.setattr(store, "_memory_room", lambda: 1000)
    cache_dir = tmp_path_factory.mktemp("cache")
    # Sizes in a unit that shows them: a small cache is not "0.00 GiB but only 0.00 GiB".
    sizes = r"needs \d+\.\d\d KiB but only 0\.98 KiB of shared memory.*on disk in"
    with pytest.warns(DataWarning, match=sizes):
        bundle = build_datasets(**folder_options(folder_root, "--cache-dir", str(cache_dir)))
    assert bundle.train.source.store.kind == "disk" and any(cache_dir.iterdir())
    assert bundle.train[0][0].shape == (3, 8, 8)


def test_mask_values_beyond_8_bits_or_negative_are_stored_exactly(tmp_path: Path):
    """A 16-bit mask's 256 is not stored as 8 bits (where it would read back as 0, background)."""
    from cmrf.data.store import mask_dtype_for

    stored = [mask_dtype_for(values) for values in ([0, 255], [0, 256], [-1, 0], [])]
    assert stored == ["uint8", "int32", "int32", "uint8"]
    for i in range(5):
        write_pair(tmp_path, f"c{i}", seed=i)
        wide = np.zeros((16, 20), dtype=np.uint16)
        wide[:, :10] = 256
        Image.fromarray(wide).save(tmp_path / "masks" / f"c{i}.png")
    bundle = build_datasets(**folder_options(tmp_path, "--mask-values", "0", "256", "--cache", "memory"))
    bundle.train.augment = False
    for _ in range(2):  # decoded, then read from the store
        mask = bundle.train[0][1]
        assert (mask[:, :4] == 1).all() and (mask[:, 4:] == 0).all()


def test_a_disk_cache_larger_than_the_free_space_is_refused(folder_root: Path, tmp_path_factory, monkeypatch):
    import types

    import cmrf.data.store as store

    monkeypatch.setattr(store.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=100))
    cache_dir = tmp_path_factory.mktemp("cache")
    with pytest.raises(DataError, match=r"the disk cache needs \d+\.\d\d KiB in .* but only 100 bytes are "):
        build_datasets(**folder_options(folder_root, "--cache", "disk", "--cache-dir", str(cache_dir)))
    assert not cache_folders(cache_dir)


def test_a_dataset_of_no_samples_is_refused(folder_root: Path):
    from cmrf.data.cache import SourceDataset

    train = build_datasets(**folder_options(folder_root)).train
    with pytest.raises(DataError, match="a dataset split has no samples"):
        SourceDataset(train.source, [], train.mapping)
    assert len(SourceDataset(train.source, [1], train.mapping)) == 1


def test_the_default_cache_folder_follows_the_environment(tmp_path: Path, monkeypatch):
    from cmrf.data.store import default_cache_dir

    monkeypatch.delenv("CMRF_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "cmrf" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "cmrf" / "data"
    monkeypatch.setenv("CMRF_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"  # wins over XDG_CACHE_HOME


def test_a_full_disk_when_reserving_the_cache_is_a_clear_error(folder_root: Path, tmp_path_factory,
                                                              monkeypatch):
    """Without its blocks reserved, writing into the memory-mapped cache on a full disk would kill
    the process (SIGBUS); a file system that cannot reserve (EOPNOTSUPP) is used as it is."""
    import errno

    import cmrf.data.store as store

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "posix_fallocate", no_room)
    cache_dir = tmp_path_factory.mktemp("cache")
    options = folder_options(folder_root, "--cache", "disk", "--cache-dir", str(cache_dir))
    with pytest.raises(DataError, match=r"cannot create the data cache .*No space left on device"):
        build_datasets(**options)
    assert not cache_folders(cache_dir)  # nothing half-made left behind

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(store.os, "posix_fallocate", unsupported)
    assert build_datasets(**options).train.source.store.kind == "disk"


def test_unusable_cache_folder_is_a_clear_error(folder_root: Path, tmp_path_factory):
    not_a_folder = tmp_path_factory.mktemp("cache") / "file"
    not_a_folder.write_text("")
    options = folder_options(folder_root, "--cache", "disk", "--cache-dir", str(not_a_folder / "x"))
    with pytest.raises(DataError, match=r"cannot create the data cache folder .*file/x: .*--cache-dir"):
        build_datasets(**options)


def test_disk_cache_follows_changed_files(folder_root: Path, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache")
    options = folder_options(folder_root, "--cache", "disk", "--cache-dir", str(cache_dir), "--val-fraction",
                             "0.1", "--test-fraction", "0.1")
    bundle = build_datasets(**options)
    stems = [p.stem for p in bundle.train.pairs]
    before = bundle.train[0][1]
    write_pair(folder_root, stems[0], mask_values=(255, 0))  # the mask inverted: a new file
    after = build_datasets(**options).train[0][1]
    assert torch.equal(after, 1 - before)
    assert len(cache_folders(cache_dir)) == 2
    # rewritten with the same size (uncompressed PNGs) and its modification time put back, as
    # rsync -t or cp -p do: still a new file
    mask = bundle.train.pairs[0].mask
    values = np.asarray(Image.open(mask))
    Image.fromarray(values).save(mask, compress_level=0)
    build_datasets(**options)
    stat = mask.stat()
    Image.fromarray(255 - values).save(mask, compress_level=0)
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert mask.stat().st_size == stat.st_size and mask.stat().st_mtime_ns == stat.st_mtime_ns
    assert torch.equal(build_datasets(**options).train[0][1], before)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_images_are_turned_by_their_exif_orientation(tmp_path: Path, suffix):
    """A photo taken sideways stores its pixels unturned with EXIF orientation 6; viewers and
    annotation tools show it turned, and its mask is drawn on that view. The image is read as
    shown, so the two line up (and the header reports the shown sides)."""
    shown = np.zeros((24, 32, 3), dtype=np.uint8)  # H 24, W 32 as displayed: bright top-left block
    shown[:8, :12] = 250
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    for i in range(5):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        stored.save(tmp_path / "images" / f"p{i}{suffix}", exif=exif.tobytes())
        mask = np.zeros((24, 32), dtype=np.uint8)
        mask[:8, :12] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"p{i}.png")
    path = tmp_path / "images" / f"p0{suffix}"
    assert image_size(path) == (24, 32)
    pixels = read_image_file(path)
    assert pixels.shape == (24, 32, 3) and pixels[:8, :12].mean() > 0.9 and pixels[8:].mean() < 0.1
    bundle = build_datasets(**folder_options(tmp_path))  # sizes agree: the pairs are accepted
    bundle.train.augment = False
    image, mask = bundle.train[0]
    bright = denormalize(image).mean(0) > 0.5
    assert (bright == mask.bool()).float().mean() > 0.9


# How a camera stores the shown view for each EXIF orientation (the inverse of the turn a viewer applies).
STORED_FOR_ORIENTATION = {
    1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(STORED_FOR_ORIENTATION))
def test_every_exif_orientation_is_read_as_shown(tmp_path: Path, orientation: int):
    """Mirrorings (2, 4), the half turn (3) and all four quarter turns and transposes (5-8): the
    pixels read and the header's sides are those of the view a viewer shows."""
    shown = (np.arange(24 * 32) % 251).astype(np.uint8).reshape(24, 32)  # no two pixels alike nearby
    transform = STORED_FOR_ORIENTATION[orientation]
    stored = Image.fromarray(shown) if transform is None else Image.fromarray(shown).transpose(transform)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "x.png", exif=exif.tobytes())
    assert image_size(tmp_path / "x.png") == (24, 32)
    pixels = read_image_file(tmp_path / "x.png", in_channels=1)[..., 0]
    assert np.array_equal(pixels, shown.astype(np.float32) / 255)


def test_a_mask_drawn_on_the_stored_pixels_of_a_turned_photo_gets_a_hint(tmp_path: Path):
    exif = Image.Exif()
    exif[0x0112] = 6
    for i in range(5):
        image_path, mask_path = write_pair(tmp_path, f"p{i}", size=(32, 24), image_suffix=".jpg", seed=i)
        Image.open(image_path).save(image_path, exif=exif.tobytes())  # stored 32x24, shown 24x32
    with pytest.raises(DataError, match=r"p0\.jpg is 24x32 but its mask .* is 32x24 .*EXIF orientation "
                                        r"turns it a quarter \(stored 32x24\)"):
        build_datasets(**folder_options(tmp_path))


def _png_with_16_bit_samples(path: Path, samples: np.ndarray) -> None:
    """A PNG of ``samples`` (H, W, C) uint16, C = 2 (grey + alpha) or 3 (RGB): what OpenCV writes
    for a 3-channel uint16 array, and what Pillow cannot save."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, channels = samples.shape
    header = struct.pack(">IIBBBBB", width, height, 16, {2: 4, 3: 2}[channels], 0, 0, 0)
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_colour_files_with_16_bit_samples_are_refused(tmp_path: Path):
    """Pillow reads them to 8 bits (the high byte): classes 1..3 became 0, 12-bit data nearly black."""
    classes = np.zeros((6, 8, 3), dtype=np.uint16)
    classes[:, :4] = 3
    _png_with_16_bit_samples(tmp_path / "m.png", classes)
    with pytest.raises(DataError, match=r"^mask file .*m\.png stores 16 bits per colour sample \(RGB;16B\)"):
        decode_mask(tmp_path / "m.png")  # its own message, not wrapped in "cannot read mask file"
    _png_with_16_bit_samples(tmp_path / "la.png", np.ones((6, 8, 2), dtype=np.uint16))
    with pytest.raises(DataError, match=r"la\.png stores 16 bits per colour sample \(LA;16B\)"):
        decode_mask(tmp_path / "la.png")
    _png_with_16_bit_samples(tmp_path / "i.png", np.full((6, 8, 3), 4000, dtype=np.uint16))
    with pytest.raises(DataError, match=r"image file .*i\.png stores 16 bits per colour sample"):
        decode_image(tmp_path / "i.png", 8)
    with pytest.raises(DataError, match=r"image file .*i\.png stores 16 bits"):
        image_size(tmp_path / "i.png")  # the header check, before any decoding
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(tmp_path / "rgb565.bmp", bits=16)
    assert image_size(tmp_path / "rgb565.bmp") == (6, 8)  # 16 bits per pixel, read in full: fine


def test_tiffs_of_several_pages_are_refused(tmp_path: Path):
    pages = [Image.fromarray(np.full((6, 8), value, dtype=np.uint8)) for value in (0, 255)]
    pages[0].save(tmp_path / "m.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(DataError, match=r"mask file .*m\.tif is a TIFF of 2 pages"):
        decode_mask(tmp_path / "m.tif")
    pages[0].save(tmp_path / "one.tif")
    assert decode_mask(tmp_path / "one.tif").present.tolist() == [0]
    thumbnail = Image.fromarray(np.zeros((3, 4), dtype=np.uint8))
    thumbnail.encoderinfo = {"tiffinfo": {254: 1}}  # NewSubfileType: a reduced-resolution copy
    pages[1].save(tmp_path / "thumb.tif", save_all=True, append_images=[thumbnail])
    assert decode_mask(tmp_path / "thumb.tif").present.tolist() == [255]  # a scanner's thumbnail: one page


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif", ".webp"])
def test_header_sizes_are_those_of_the_pixels_read(tmp_path: Path, suffix):
    """Whatever the format does with EXIF orientation (Pillow turns TIFF images itself when it
    opens them), the header's size and the decoded array agree, and both are the shown view."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"x{suffix}"
    Image.fromarray(np.zeros((60, 40, 3), dtype=np.uint8)).save(path, exif=exif.tobytes())
    assert image_size(path) == read_image_file(path).shape[:2] == (40, 60)


def test_undecodable_and_non_finite_images_are_named(tmp_path: Path):
    """Pillow raises SyntaxError for a broken PNG chunk and DecompressionBombError for a huge
    image; a float image with a NaN would be scaled to a blank one. Each is a DataError."""
    broken = tmp_path / "broken.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(broken)
    data = bytearray(broken.read_bytes())
    data[36] = 0  # a chunk's type after IHDR: Pillow's "broken PNG file" SyntaxError
    broken.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"cannot read image file .*broken.png: SyntaxError"):
        read_image_file(broken)
    nan = tmp_path / "nan.tif"
    values = np.ones((5, 6), dtype=np.float32)
    values[2, 3] = np.nan
    Image.fromarray(values, mode="F").save(nan)
    with pytest.raises(DataError, match=r"nan.tif holds 1 non-finite pixel value\(s\)"):
        read_image_file(nan)


def test_sixteen_bit_images_keep_their_precision_and_match_load_image(tmp_path: Path):
    for i in range(5):
        write_pair(tmp_path, f"ct{i}", seed=i)
        values = (np.random.default_rng(i).random((16, 20)) * 4000).astype(np.uint16)
        (tmp_path / "images" / f"ct{i}.png").unlink()
        Image.fromarray(values).save(tmp_path / "images" / f"ct{i}.png")
    bundle = build_datasets(**folder_options(tmp_path))
    assert bundle.train.source.store.layout.image_dtype == "uint16"
    bundle.train.augment = False
    image, _ = bundle.train[0]
    path = bundle.train.pairs[0].image
    assert torch.equal(image, load_image(path, 8))
    exact = resize_image(torch.from_numpy(read_image_file(path)).permute(2, 0, 1), 8)
    assert (denormalize(image) - exact).abs().max() < 1e-4  # far finer than 8 bits (1/255)


def test_eight_bit_images_beside_16_bit_ones_are_kept_exactly(tmp_path: Path):
    """A folder mixing 8-bit and 16-bit images is stored in 16 bits: an 8-bit image still gives
    what load_image gives for it, exactly (level k is k/255)."""
    for i in range(5):
        write_pair(tmp_path, f"c{i}", seed=i)
    for i in range(2):
        values = (np.random.default_rng(i).random((16, 20)) * 4000).astype(np.uint16)
        Image.fromarray(values).save(tmp_path / "images" / f"c{i}.png")
    bundle = build_datasets(**folder_options(tmp_path, "--cache", "memory"))
    assert bundle.train.source.store.layout.image_dtype == "uint16"
    for dataset in (bundle.train, bundle.val, bundle.test):
        dataset.augment = False
        for index, pair in enumerate(dataset.pairs):
            assert torch.equal(dataset[index][0], load_image(pair.image, 8)), pair.stem


def test_images_are_rounded_to_the_nearest_level(tmp_path: Path):
    """Resized values are kept as the nearest of the 256 levels: never more than half a level off."""
    image_path, _ = write_pair(tmp_path, "a", size=(20, 16))
    exact = resize_image(torch.from_numpy(read_image_file(image_path)).permute(2, 0, 1), 8)
    error = (denormalize(load_image(image_path, 8)) - exact).abs().max().item()
    assert 0.1 / 255 < error <= 0.5 / 255 + 1e-6  # the premise: resizing made values between levels


def test_float_masks_must_hold_whole_numbers(tmp_path: Path):
    values = np.zeros((4, 6), dtype=np.float32)
    values[:, 3:] = 2.0
    Image.fromarray(values, mode="F").save(tmp_path / "whole.tif")
    assert read_mask_file(tmp_path / "whole.tif").tolist() == [[0, 0, 0, 2, 2, 2]] * 4
    values[0, 0] = 0.5
    Image.fromarray(values, mode="F").save(tmp_path / "half.tif")
    with pytest.raises(DataError, match=r"half\.tif holds non-integer values \(such as 0\.5\); expected "
                                        r"class values: a mask resampled with linear interpolation"):
        read_mask_file(tmp_path / "half.tif")


@pytest.mark.parametrize(("shape", "size"), [((7, 5), 3), ((4, 4), 2), ((5, 9), 12), ((6, 10, 4), 5)])
def test_masks_are_resized_at_pixel_centres_as_nearest_exact(shape, size):
    """The mask sample at each output pixel's centre, as torch's nearest-exact and Pillow's NEAREST
    take it (not the top-left corner), whatever the integer type."""
    from cmrf.data.imageio import resize_nearest

    mask = np.arange(np.prod(shape), dtype=np.int32).reshape(shape) * 1000
    reference = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].double(),
                                                size=(size,) * len(shape), mode="nearest-exact")[0, 0]
    resized = resize_nearest(mask, size)
    assert resized.dtype == np.int32 and np.array_equal(resized, reference.numpy().astype(np.int32))


def test_synthetic_samples_are_generated_once_per_index(monkeypatch):
    import cmrf.data.synthetic as synthetic

    generated = Counter(synthetic.generate_sample)
    monkeypatch.setattr(synthetic, "generate_sample", generated)
    dataset = SyntheticSegmentation(6, 24, seed=2, augment=True)
    draws = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        draws.append(torch.stack([dataset[i][0] for i in range(6)]))
    assert generated.calls == 6
    assert not torch.equal(draws[0], draws[1])  # augmentation is still drawn per epoch
    uncached = SyntheticSegmentation(6, 24, seed=2, augment=True, cache="none")
    uncached.set_epoch(2)
    assert torch.equal(torch.stack([uncached[i][0] for i in range(6)]), draws[2])


def test_fill_decodes_everything_up_front(folder_root: Path, monkeypatch):
    images, _ = count_decoding(monkeypatch)
    bundle = build_datasets(**folder_options(folder_root))
    bundle.test.fill()
    assert images.calls == len(bundle.test)
    load_all(bundle)
    assert images.calls == 10


# --- structure ------------------------------------------------------------------------------------


def test_data_package_has_no_import_cycle_and_a_leaf_base():
    """Module-level and function-level imports between cmrf.data modules form no cycle."""
    import ast
    import graphlib

    import cmrf.data

    folder = Path(cmrf.data.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        name = f"cmrf.data.{path.stem}" if path.stem != "__init__" else "cmrf.data"
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cmrf.data"):
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names if a.name.startswith("cmrf.data"))
        graph[name] = imported
    assert graph["cmrf.data.base"] == set()
    assert all("cmrf.data" not in deps for name, deps in graph.items() if name != "cmrf.data")
    tuple(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert not list(folder.parent.glob("data.py")) and not (folder.parent / "train" / "data.py").exists()


def test_one_bit_masks_hold_values_zero_and_one(tmp_path: Path):
    """Pillow's bool array over a 1-bit image has bytes 0/255: read as 0/255, a 1-bit mask
    mixed with 0/1 PNGs looked like a three-value (0, 1, 255) mask set."""
    from cmrf.data.imageio import decode_mask

    Image.fromarray(np.array([[True, False], [False, True]])).save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    assert decode_mask(tmp_path / "bits.png").present.tolist() == [0, 1]


def test_a_cmyk_mask_is_refused_not_read_as_background(tmp_path: Path):
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:6, 2:6] = 255
    Image.fromarray(mask).convert("CMYK").save(tmp_path / "mask.tif")
    with pytest.raises(DataError, match=r"mask\.tif is a CMYK image; expected class values"):
        read_mask_file(tmp_path / "mask.tif")


@pytest.mark.parametrize("cut", [8, 10])
def test_a_damaged_png_exif_block_reads_the_pixels_as_stored(tmp_path: Path, cut: int):
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = np.arange(24 * 32 * 3, dtype=np.uint8).reshape(24, 32, 3)
    Image.fromarray(pixels).save(tmp_path / "a.png", exif=exif.tobytes()[:cut])
    assert image_size(tmp_path / "a.png") == (24, 32)
    assert read_image_file(tmp_path / "a.png").shape == (24, 32, 3)


def test_a_png_exif_chunk_after_the_pixels_is_not_applied(tmp_path: Path):
    """Only an eXIf chunk before the image data counts (docs of _orientation): seeing one after it
    would mean decoding the whole file to read a header. Header and pixels agree: as stored."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = (np.arange(24 * 32) % 251).astype(np.uint8).reshape(24, 32)
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", 32, 24, 8, 0, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"eXIf", exif.tobytes())
    (tmp_path / "late.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunks + chunk(b"IEND", b""))
    with Image.open(tmp_path / "late.png") as image:  # the premise: Pillow finds it once decoded
        image.load()
        assert image.getexif().get(0x0112) == 6
    assert image_size(tmp_path / "late.png") == (24, 32)
    read = read_image_file(tmp_path / "late.png", in_channels=1)[..., 0]
    assert np.array_equal(read, pixels.astype(np.float32) / 255)


@pytest.mark.filterwarnings("ignore:.*in none of the split files")  # a listed subset, on purpose
def test_split_and_class_files_from_windows_editors(folder_root: Path, tmp_path_factory):
    """Notepad's UTF-8 starts with a byte-order mark; PowerShell 5's '>' writes UTF-16."""
    split_dir = tmp_path_factory.mktemp("splits")
    for name, text in (("train", "case0\ncase1\ncase2\ncase3\n"), ("val", "case4\n"), ("test", "case5\n")):
        (split_dir / f"{name}.txt").write_text(text, encoding="utf-8-sig")
    args = parse("--data", "folder", "--root", str(folder_root), "--split-dir", str(split_dir))
    assert [p.stem for p in _build(args, 0).train.pairs] == ["case0", "case1", "case2", "case3"]
    (split_dir / "val.txt").write_text("case4\n", encoding="utf-16")
    with pytest.raises(DataError, match=r"val\.txt is not UTF-8 text .*save it as UTF-8"):
        _build(args, 0)
    from cmrf.data.masks import class_names_for

    (folder_root / "classes.txt").write_text("background\nlesion\n", encoding="utf-8-sig")
    assert class_names_for(folder_root, 2) == ["background", "lesion"]


def test_a_full_range_of_grey_levels_is_not_offered_as_256_classes(tmp_path: Path):
    """Soft edges covering every level 0..255 look like class indices 0..255: only the threshold
    is a sensible suggestion."""
    ramp = np.resize(np.arange(256, dtype=np.uint8), (16, 20))  # the folder's images are 20 wide, 16 high
    folder_of(tmp_path, {f"c{i}": ramp for i in range(5)})
    with pytest.raises(DataError, match=r"(?s)--mask-threshold 128") as error:
        build_datasets(**folder_options(tmp_path))
    assert "--num-classes 256" not in str(error.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [(dict(val_fraction=0.0), r"--val-fraction 0\.0: expected a fraction strictly between 0 and 1"),
     (dict(test_fraction="0.2"), r"--test-fraction '0\.2': expected a fraction"),
     (dict(seed=-1), r"seed -1: expected an integer >= 0")],
)
def test_build_datasets_checks_fractions_and_seed_up_front(options, message):
    """From Python (no argparse in between) these gave "a dataset split has no samples", a bare
    TypeError or numpy's own message."""
    with pytest.raises(DataError, match=message):
        build_datasets(data="synthetic", img_size=32, synthetic_samples=8, **options)


def test_class_mapping_at_the_threshold_and_with_unknown_16_bit_values():
    """Pixels exactly at --mask-threshold are class 1, in 8 and 16 bits; a 16-bit value outside
    --mask-values is an error naming it, as an 8-bit one is."""

    assert ClassMapping(2, None, 128).apply(np.array([[127, 128, 129]], np.uint8)).tolist() == [[0, 1, 1]]
    assert ClassMapping(2, None, 1000).apply(np.array([[999, 1000, 1001]], np.uint16)).tolist() == [[0, 1, 1]]
    atlas = ClassMapping(3, (0, 1000, 2000), None, "--mask-values 0 1000 2000")
    assert atlas.apply(np.array([[2000, 0, 1000]], np.uint16)).tolist() == [[2, 0, 1]]
    with pytest.raises(DataError, match=r"mask file m\.png has values 1500 that"):
        atlas.apply(np.array([[0, 1500]], np.uint16), path="m.png")


# --- image channels (--in-chans) -----------------------------------------------------------------


def write_grey_pair(root: Path, stem: str, side: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """A 16-bit grey image (as CT slices come) and a mask whose left half is 255."""
    image, mask = write_pair(root, stem, size=(side, side), seed=seed)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 4096, (side, side), dtype=np.uint16)).save(image)
    return image, mask


def test_folder_images_are_read_grey_with_in_chans_1(tmp_path: Path):
    for i in range(5):
        write_grey_pair(tmp_path, f"ct{i}", seed=i)
    args = parse("--data", "folder", "--root", str(tmp_path), "--img-size", "32")
    rgb = _build(args)  # no flag: RGB, as every run read before the flag existed
    grey = _build(parse("--data", "folder", "--root", str(tmp_path), "--img-size", "32", "--in-chans", "1"))
    assert (rgb.in_channels, grey.in_channels) == (3, 1)
    assert rgb.val[0][0].shape == (3, 32, 32) and grey.val[0][0].shape == (1, 32, 32)
    assert torch.equal(grey.val[0][0][0], rgb.val[0][0][1])  # the grey that RGB repeats, 16 bits kept


def test_isic_images_are_read_grey_with_in_chans_1(isic_root: Path):
    bundle = build_datasets(data="isic2018", root=isic_root, img_size=8, in_chans=1)
    assert bundle.in_channels == 1 and bundle.test[0][0].shape == (1, 8, 8)


@pytest.mark.parametrize(
    ("options", "message"),
    [(dict(in_chans=2), r"--in-chans 2: expected 1 \(grey\) or 3 \(RGB\)"),
     (dict(in_chans=True), r"--in-chans True: expected 1 \(grey\) or 3 \(RGB\)"),
     (dict(in_chans=1.0), r"--in-chans 1\.0: expected 1 \(grey\) or 3 \(RGB\)"),
     (dict(data="synthetic", root=None, in_chans=1), r"^--in-chans: only for data read from files"),
     (dict(spatial_dims=3, in_chans=1), r"--in-chans 1: only for 2D images; NIfTI volumes are read with")],
)
def test_in_chans_that_cannot_be_read_is_refused(folder_root: Path, options, message):
    with pytest.raises(DataError, match=message):
        build_datasets(**{"data": "folder", "root": folder_root, "img_size": 8, **options})


@pytest.mark.parametrize("dims, side", [(2, 8193), (3, 1025)])
def test_an_image_size_beyond_any_run_is_refused(dims, side):
    """A checkpoint's recorded img_size is read back by evaluate: unbounded, 10**6 asked for 60 TB."""
    with pytest.raises(DataError, match=rf"--img-size {side}: expected at most {side - 1} for {dims}D data"):
        build_datasets(data="synthetic", img_size=side, spatial_dims=dims)


def test_lossy_webp_and_jpeg_in_tiff_masks_are_flagged_lossy(tmp_path: Path):
    """Pillow's default WebP is lossy, and a TIFF may hold JPEG: both were read as exact class values
    (class 3 vanished from whole masks, 4-14 % of binary pixels flipped, no word said)."""
    mask = np.zeros((48, 48), dtype=np.uint8)
    mask[8:30, 8:30], mask[20:40, 25:45], mask[35:46, 2:20] = 1, 2, 3
    saves = {"lossy.webp": {}, "lossless.webp": {"lossless": True}, "jpeg.tif": {"compression": "jpeg"},
             "lzw.tif": {"compression": "tiff_lzw"}}
    for name, options in saves.items():
        Image.fromarray(mask).save(tmp_path / name, **options)
    lossy = {name: decode_mask(tmp_path / name).lossy for name in saves}
    assert lossy == {"lossy.webp": True, "lossless.webp": False, "jpeg.tif": True, "lzw.tif": False}
    assert np.array_equal(decode_mask(tmp_path / "lossless.webp").values, mask)
    with pytest.raises(DataError, match="is lossy"):
        read_mask_file(tmp_path / "lossy.webp")


def test_grey_gif_masks_are_read_by_grey_level(tmp_path: Path):
    """GIF has no grey mode: a grey 0/2 mask saved as GIF is a palette renumbered to 0/1, which was
    read by index, so its class-2 pixels trained as class 1."""
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 4:12] = 2
    Image.fromarray(mask).save(tmp_path / "m.gif")
    assert Image.open(tmp_path / "m.gif").getpalette()[3:6] == [2, 2, 2]  # the premise: index 1 is grey 2
    decoded = decode_mask(tmp_path / "m.gif")
    assert decoded.present.tolist() == [0, 2] and np.array_equal(decoded.values, mask)


def test_animated_images_and_cut_off_tiffs_are_named(tmp_path: Path):
    """An animated GIF was read as its first frame (a blank mask); a TIFF cut off inside its
    directory raised a bare TypeError ("Missing dimensions"), an internal error in cmrf predict."""
    frames = [Image.fromarray(np.full((8, 8), value, dtype=np.uint8)) for value in (0, 255)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match=r"a\.gif is an animated GIF of 2 frames"):
        decode_mask(tmp_path / "a.gif")
    whole = tmp_path / "whole.tif"
    page = Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))
    page.save(whole, save_all=True, append_images=[page])
    (tmp_path / "cut.tif").write_bytes(whole.read_bytes()[:900])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's "Corrupt EXIF data"
        with pytest.raises(DataError, match=r"cannot read image file .*cut\.tif: TypeError"):
            image_header(tmp_path / "cut.tif")


def test_a_reordered_split_list_gives_the_same_dataset_order(tmp_path):
    """The dataset followed the list's order while the split fingerprint (which a resume compares)
    sorted the names: a reordered train.txt resumed silently with other batches."""
    from types import SimpleNamespace

    from cmrf.data.splits import split_from_files

    pairs = [SimpleNamespace(stem=f"case{i}") for i in range(6)]
    train = ["case0", "case1", "case2", "case3"]
    orders = []
    for name, listed in (("as-found", train), ("reversed", train[::-1])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "train.txt").write_text("".join(f"{stem}\n" for stem in listed))
        (folder / "val.txt").write_text("case4\n")
        (folder / "test.txt").write_text("case5\n")
        orders.append([p.stem for p in split_from_files(pairs, folder)["train"]])
    assert orders[0] == orders[1] == train


def test_a_cache_folder_without_file_locks_is_one_data_error(tmp_path, monkeypatch):
    """Lustre without -o flock, NFS without lockd: a bare [Errno 38] naming neither cache nor fix."""
    import errno
    import fcntl

    from cmrf.data.store import _store_lock

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    message = r"cannot lock the data cache folder .*no file locks.*--cache-dir"
    with pytest.raises(DataError, match=message), _store_lock(tmp_path / "cache" / "folder-32-abc"):
        pass


def test_the_memory_cache_leaves_half_of_dev_shm_to_the_loader_workers(monkeypatch):
    """A cache that fit all of the free /dev/shm took it (reserved at once), and the first batch a
    worker sent failed with "unable to allocate shared memory": an internal error (Docker's 64 MiB)."""
    import os as os_module
    from types import SimpleNamespace

    import cmrf.data.store as store

    real_statvfs = os_module.statvfs
    monkeypatch.setattr(store.os, "statvfs", lambda path: SimpleNamespace(f_bavail=1024, f_frsize=4096)
                        if path == "/dev/shm" else real_statvfs(path))
    monkeypatch.setattr(store.os.path, "isdir", lambda path: True)
    assert store._memory_room() <= 2 * 1024 * 1024


def test_fractions_beside_split_files_are_refused(tmp_path):
    """They were dropped without a word (the lists fix every split), yet a resume refused a changed
    value of them: the rule for options the data does not read is to refuse them."""
    options = data_options(parse("--data", "folder", "--root", str(tmp_path), "--split-dir", str(tmp_path),
                                 "--val-fraction", "0.5"))
    with pytest.raises(DataError, match=r"--val-fraction: the split files of --split-dir .* fix every split, "
                                        r"so no fraction is cut; drop --val-fraction"):
        build_datasets(**options)
