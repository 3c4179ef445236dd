"""Datasets of cmrf.train: synthetic generator, augmentation, ISIC/folder/NIfTI readers, bad data."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from cmrf.cli.data_args import add_data_arguments, data_options
from cmrf.train.data import (
    ISIC_FOLDERS,
    DataError,
    FolderSegmentation,
    augment_pair,
    build_datasets,
    denormalize,
    find_folder_pairs,
    load_image,
    normalize,
    read_image_file,
    read_mask_file,
    save_mask_png,
)
from cmrf.train.synthetic import SyntheticSegmentation, generate_sample


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


def write_palette_mask(path: Path, values: np.ndarray) -> None:
    image = Image.fromarray(values.astype(np.uint8), mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
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
    plain = normalize(generate_sample(3, 1, 32)[0])
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
    plain = torch.cat([normalize(generate_sample(1, i, 24)[0]).flatten() for i in range(2)])
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


@pytest.mark.parametrize("spatial_dims, side", [("2", 256), ("3", 64)])
def test_default_size_depends_on_dimensions(spatial_dims, side):
    args = parse("--synthetic-samples", "1", "--spatial-dims", spatial_dims)
    image, _ = _build(args, 0).train[0]
    assert image.shape[-1] == side  # the paper's 256 for images; volumes a CPU can train


def test_option_values_are_checked_by_the_parser(capsys):
    args = parse()
    assert (args.data, args.img_size, args.spatial_dims, args.num_classes) == ("synthetic", None, 2, None)
    for bad in (["--val-fraction", "1.5"], ["--img-size", "0"], ["--data", "mnist"], ["--spatial-dims", "4"]):
        with pytest.raises(SystemExit):
            parse(*bad)


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


def test_sixteen_bit_and_one_bit_masks_are_read_as_class_indices(tmp_path: Path):
    wide = np.array([[0, 2], [300, 2]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert np.array_equal(read_mask_file(tmp_path / "wide.png"), wide)
    Image.fromarray(np.array([[True, False]])).convert("1").save(tmp_path / "bits.png")
    assert read_mask_file(tmp_path / "bits.png").tolist() == [[1, 0]]
    Image.fromarray(np.array([[255, 255]], dtype=np.uint8)).save(tmp_path / "full.png")
    assert read_mask_file(tmp_path / "full.png").tolist() == [[1, 1]]  # all-lesion binary mask


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
    (tmp_path / "classes.txt").write_text("BG\nlesion\n")
    with pytest.raises(DataError, match=r"classes\.txt names 2 classes but the data has 4"):
        _build(parse("--data", "folder", "--root", str(tmp_path)), 0)


def test_folder_with_split_files(folder_root: Path, tmp_path_factory):
    split_dir = tmp_path_factory.mktemp("splits")
    (split_dir / "train.txt").write_text("# training cases\ncase0\ncase1.png\ncase2\n\ncase3\n")
    (split_dir / "val.txt").write_text("case4\ncase5\n")
    (split_dir / "test.txt").write_text("case6\n")
    args = parse("--data", "folder", "--root", str(folder_root), "--split-dir", str(split_dir))
    bundle = _build(args, 0)
    assert [p.stem for p in bundle.train.pairs] == ["case0", "case1", "case2", "case3"]
    assert [p.stem for p in bundle.test.pairs] == ["case6"]

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
    # Checked per item: the values need the whole mask decoded.
    bundle = _build(folder_args("--num-classes", "2"), 0)
    datasets = (bundle.train, bundle.val, bundle.test)
    with pytest.raises(DataError, match=r"file .*case2\.png has values 3 outside the class range 0\.\.1"):
        for dataset in datasets:
            for i in range(len(dataset)):
                dataset[i]
    assert _build(folder_args(), 0).num_classes == 4  # inferred from the masks instead
    # From a DataLoader worker the error arrives without the worker's traceback in its message.
    loader = DataLoader(FolderSegmentation(find_folder_pairs(tmp_path), 8, num_classes=2), num_workers=1)
    with pytest.raises(DataError) as caught:
        list(loader)
    assert str(caught.value).startswith(f"mask file {tmp_path / 'masks' / 'case2.png'} has values 3 outside")


# --- NIfTI volumes -------------------------------------------------------------------------------

nibabel = pytest.importorskip("nibabel")


def write_volume(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(values, np.eye(4)), str(path))


@pytest.fixture
def nifti_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(5):
        mask = np.zeros((6, 7, 8), dtype=np.uint8)
        mask[1:4, 2:5, 3:6] = 1
        mask[4:, :2, :2] = 2
        image = rng.normal(-500.0, 200.0, size=(6, 7, 8)).astype(np.float32) + 400.0 * mask
        write_volume(tmp_path / "images" / f"vol{i}.nii.gz", image)
        write_volume(tmp_path / "masks" / f"vol{i}.nii.gz", mask)
    return tmp_path


def test_nifti_folder_gives_normalised_resized_volumes(nifti_root: Path):
    args = parse("--data", "folder", "--root", str(nifti_root), "--spatial-dims", "3", "--img-size", "8")
    bundle = _build(args, seed=0)
    assert (bundle.num_classes, bundle.in_channels, bundle.spatial_dims) == (3, 1, 3)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (3, 1, 1)
    bundle.train.augment = False
    image, mask = bundle.train[0]
    assert image.shape == (1, 8, 8, 8) and image.dtype == torch.float32
    assert mask.shape == (8, 8, 8) and set(mask.unique().tolist()) == {0, 1, 2}
    unit = denormalize(image)
    assert unit[0][mask == 1].mean() > unit[0][mask == 0].mean() + 0.2  # intensities kept their meaning
    bundle.train.augment = True
    assert bundle.train[0][0].shape == (1, 8, 8, 8)


def test_nifti_folder_read_as_images_gets_a_hint(nifti_root: Path):
    with pytest.raises(DataError, match="NIfTI volumes: add --spatial-dims 3"):
        _build(parse("--data", "folder", "--root", str(nifti_root)), 0)


def test_nifti_multichannel_volumes(tmp_path: Path):
    for i in range(3):
        write_volume(tmp_path / "images" / f"v{i}.nii", np.random.default_rng(i).random((4, 4, 4, 2)))
        write_volume(tmp_path / "masks" / f"v{i}.nii", np.eye(4, dtype=np.float32)[None].repeat(4, 0))
    args = parse("--data", "folder", "--root", str(tmp_path), "--spatial-dims", "3", "--img-size", "4",
                 "--val-fraction", "0.3", "--test-fraction", "0.3")
    bundle = _build(args, 0)
    assert bundle.in_channels == 2 and bundle.train[0][0].shape == (2, 4, 4, 4)


def test_nifti_bad_data_is_reported_with_the_file(nifti_root: Path):
    args = parse("--data", "folder", "--root", str(nifti_root), "--spatial-dims", "3", "--img-size", "8")
    write_volume(nifti_root / "masks" / "vol1.nii.gz", np.zeros((6, 7, 9), dtype=np.uint8))
    with pytest.raises(DataError, match=r"vol1\.nii\.gz has shape \(6, 7, 8\) but its mask .* \(6, 7, 9\)"):
        _build(args, 0)
    write_volume(nifti_root / "masks" / "vol1.nii.gz", np.full((6, 7, 8), 0.5, dtype=np.float32))
    with pytest.raises(DataError, match=r"mask file .*vol1\.nii\.gz holds non-integer values"):
        _build(args, 0)
    (nifti_root / "masks" / "vol1.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read mask file .*vol1\.nii\.gz"):
        _build(args, 0)
    (nifti_root / "masks" / "vol1.nii.gz").unlink()
    with pytest.raises(DataError, match=r"mask for volume .*vol1\.nii\.gz is missing"):
        _build(args, 0)
    write_volume(nifti_root / "masks" / "vol1.nii.gz", np.full((6, 7, 8), 5, dtype=np.uint8))
    bundle = _build(parse("--data", "folder", "--root", str(nifti_root), "--spatial-dims", "3",
                                  "--img-size", "8", "--num-classes", "3"), 0)
    with pytest.raises(DataError, match=r"vol1\.nii\.gz has values 5 outside the class range 0\.\.2"):
        for dataset in (bundle.train, bundle.val, bundle.test):
            for i in range(len(dataset)):
                dataset[i]
    with pytest.raises(DataError, match="2D images"):
        _build(parse("--data", "isic2018", "--root", str(nifti_root), "--spatial-dims", "3"), 0)
