"""Volumes: CMRF and TinyU-Net with spatial_dims=3 (one implementation, parameterised), NIfTI data."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cmrf
from cmrf import CMRF, TinyUNet
from cmrf.cli.data_args import add_data_arguments, data_options
from cmrf.data import DataError, build_datasets, denormalize
from cmrf.layers import cmrf_num_params


@settings(max_examples=8)
@given(
    depth=st.integers(1, 3),
    N=st.sampled_from([1, 2, 4]),
    in_ch=st.integers(1, 3),
    classes=st.integers(1, 4),
    size=st.tuples(*[st.integers(8, 11)] * 3),
)
def test_tinyunet3d_any_volume_size_shapes_and_gradients(depth, N, in_ch, classes, size):
    channels = tuple(2 * N * (i + 1) for i in range(depth))
    model = TinyUNet(in_ch, classes, N=N, channels=channels, spatial_dims=3)
    x = torch.randn(2, in_ch, *size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, classes, *size)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters())


def test_3d_layers_are_3d():
    model = cmrf.create_model("tinyunet3d", in_chans=1, num_classes=2, channels=(16, 32))
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.Conv3d in kinds and torch.nn.BatchNorm3d in kinds and torch.nn.MaxPool3d in kinds
    assert torch.nn.Conv2d not in kinds and torch.nn.BatchNorm2d not in kinds


def test_3d_params_follow_closed_form():
    widths = (64, 128, 256, 512)
    model = cmrf.create_model("tinyunet3d", in_chans=1, num_classes=2)
    encoder = sum(cmrf_num_params(a, b, 8, 3) for a, b in zip((1,) + widths[:-1], widths))
    decoder = sum(cmrf_num_params(b + c, c, 8, 3) for b, c in zip(widths[1:] + widths[-1:], widths))
    assert sum(p.numel() for p in model.parameters()) == encoder + decoder + 64 * 2 + 2


def test_3d_matches_2d_arithmetic_errors():
    with pytest.raises(ValueError, match=r"60 is not divisible by 2N = 16"):
        CMRF(64, 60, N=8, spatial_dims=3)
    with pytest.raises(ValueError, match=r"5-D input"):
        TinyUNet(spatial_dims=3)(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r">= 4"):
        TinyUNet(1, 2, channels=(16, 32), spatial_dims=3)(torch.randn(1, 1, 8, 3, 8))


def test_3d_profile_counts_3d_convolutions():
    block = CMRF(1, 4, N=2, spatial_dims=3)
    cost = cmrf.profile(block, (1, 1, 4, 4, 4))
    voxels = 4**3
    # Per voxel: pw1 2 outputs x 1 tap + BN 4x2; one 3x3x3 depthwise stage 27 + BN 4;
    # pw2 4 outputs x 2 inputs + BN 4x4. Doubled.
    assert cost.flops == 2 * voxels * (2 + 8 + 27 + 4 + 8 + 16)
    assert cost.params == cmrf_num_params(1, 4, 2, spatial_dims=3)
    assert cost.macs >= voxels * (2 + 27 + 8)


def test_3d_models_profile_from_the_command_line(capsys):
    """docs/volumes.md's `cmrf profile tinyunet3d --input-size 1 1 96 96 96`, at 32^3."""
    import json

    from cmrf.cli import main

    assert main(["profile", "tinyunet3d", "--input-size", "1", "1", "32", "32", "32", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["params"] == 496_274 and figures["input_size"] == [1, 1, 32, 32, 32]


# --- NIfTI volumes as training data (cmrf.data.nifti) --------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    return parser.parse_args(list(argv))


def build(*argv: str, seed: int = 0):
    return build_datasets(seed=seed, **data_options(parse(*argv)))


def write_volume(path: Path, values: np.ndarray) -> None:
    nibabel = pytest.importorskip("nibabel")
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(values, np.eye(4)), str(path))


@pytest.fixture
def nifti_root(tmp_path: Path) -> Path:
    """Five 6x7x8 volumes whose masks hold classes 0, 1 and 2."""
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
    volumes = ("--data", "folder", "--root", str(nifti_root), "--spatial-dims", "3", "--img-size", "8")
    bundle = build(*volumes, "--num-classes", "3")
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
    # Masks holding 0, 1, 2 are not binary: without an option the classes are not guessed.
    with pytest.raises(DataError, match=r"(?s)not binary.*vol0\.nii\.gz.*--num-classes 3"):
        build(*volumes)
    (nifti_root / "classes.txt").write_text("background\nlung\nlesion\n")
    assert build(*volumes).class_names == ["background", "lung", "lesion"]


def test_nifti_folder_read_as_images_gets_a_hint(nifti_root: Path):
    with pytest.raises(DataError, match="NIfTI volumes: add --spatial-dims 3"):
        build("--data", "folder", "--root", str(nifti_root))


def test_nifti_single_slices_are_not_trained_as_volumes(tmp_path: Path):
    """A 2D slice stored as ``(X, Y, 1)`` would be resized to a cube repeating the slice."""
    for i in range(3):
        write_volume(tmp_path / "images" / f"s{i}.nii.gz", np.random.default_rng(i).random((6, 7, 1)))
        write_volume(tmp_path / "masks" / f"s{i}.nii.gz", np.ones((6, 7, 1), dtype=np.uint8))
    single_slice = r"s0\.nii\.gz has shape \(6, 7, 1\): a single slice.*--spatial-dims 2"
    with pytest.raises(DataError, match=single_slice):
        build("--data", "folder", "--root", str(tmp_path), "--spatial-dims", "3", "--img-size", "4",
              "--val-fraction", "0.3", "--test-fraction", "0.3")


def test_nifti_multichannel_volumes(tmp_path: Path):
    for i in range(3):
        write_volume(tmp_path / "images" / f"v{i}.nii", np.random.default_rng(i).random((4, 4, 4, 2)))
        write_volume(tmp_path / "masks" / f"v{i}.nii", np.eye(4, dtype=np.float32)[None].repeat(4, 0))
    bundle = build("--data", "folder", "--root", str(tmp_path), "--spatial-dims", "3", "--img-size", "4",
                   "--val-fraction", "0.3", "--test-fraction", "0.3")
    assert bundle.in_channels == 2 and bundle.train[0][0].shape == (2, 4, 4, 4)
    assert bundle.num_classes == 2  # 0/1 masks are binary


def test_nifti_channels_keep_their_content_and_their_own_scale(tmp_path: Path):
    """(X, Y, Z, C) files: channel c is the c-th volume (not a reshape of the voxels), each scaled
    on its own (a 0..1000 channel beside a 0..1 one)."""
    ramp = np.arange(4, dtype=np.float32)[:, None, None].repeat(4, 1).repeat(4, 2)  # rises along x
    for i in range(3):
        write_volume(tmp_path / "images" / f"v{i}.nii", np.stack([ramp / 3, ramp[::-1] * 1000], axis=-1))
        write_volume(tmp_path / "masks" / f"v{i}.nii", np.eye(4, dtype=np.float32)[None].repeat(4, 0))
    bundle = build("--data", "folder", "--root", str(tmp_path), "--spatial-dims", "3", "--img-size", "4",
                   "--val-fraction", "0.3", "--test-fraction", "0.3")
    bundle.train.augment = False
    image = denormalize(bundle.train[0][0])
    rising, falling = image[0][:, 0, 0], image[1][:, 0, 0]
    assert torch.all(rising[1:] > rising[:-1]) and torch.all(falling[1:] < falling[:-1])
    torch.testing.assert_close(rising, falling.flip(0), atol=0.02, rtol=0)  # same scale after scaling


def test_nifti_singleton_time_axes_are_dropped(tmp_path: Path):
    """NIfTI's 4th axis is time and its 5th vector components: tools write one time point as an
    axis of 1, (X, Y, Z, 1, C) images and (X, Y, Z, 1) masks. Both were refused by shape; they read
    as the (X, Y, Z, C) and (X, Y, Z) files they are, and a real time series is still refused."""
    ramp = np.arange(4, dtype=np.float32)[:, None, None].repeat(4, 1).repeat(4, 2)
    image = np.stack([ramp, ramp[::-1] * 1000], axis=-1)  # (4, 4, 4, 2)
    mask = np.eye(4, dtype=np.uint8)[None].repeat(4, 0)
    for i in range(3):
        write_volume(tmp_path / "flat" / "images" / f"v{i}.nii", image)
        write_volume(tmp_path / "flat" / "masks" / f"v{i}.nii", mask)
        write_volume(tmp_path / "timed" / "images" / f"v{i}.nii", image[:, :, :, None, :])
        write_volume(tmp_path / "timed" / "masks" / f"v{i}.nii", mask[..., None])
    options = ("--spatial-dims", "3", "--img-size", "4", "--val-fraction", "0.3", "--test-fraction", "0.3")
    flat = build("--data", "folder", "--root", str(tmp_path / "flat"), *options)
    timed = build("--data", "folder", "--root", str(tmp_path / "timed"), *options)
    assert timed.in_channels == 2 and timed.num_classes == 2
    flat.train.augment = timed.train.augment = False
    for (flat_image, flat_mask), (timed_image, timed_mask) in zip(flat.train, timed.train, strict=True):
        torch.testing.assert_close(timed_image, flat_image, rtol=0, atol=0)
        assert torch.equal(timed_mask, flat_mask)
    write_volume(tmp_path / "timed" / "masks" / "v0.nii", mask[..., None].repeat(2, axis=-1))
    series = r"mask file .*v0\.nii has shape \(4, 4, 4, 2\); expected \(X, Y, Z\)"
    with pytest.raises(DataError, match=series):
        build("--data", "folder", "--root", str(tmp_path / "timed"), *options)


def test_nifti_images_with_different_channel_counts_are_refused(tmp_path: Path):
    for i, shape in enumerate([(4, 4, 4, 2), (4, 4, 4, 2), (4, 4, 4)]):
        write_volume(tmp_path / "images" / f"v{i}.nii", np.random.default_rng(i).random(shape))
        write_volume(tmp_path / "masks" / f"v{i}.nii", np.eye(4, dtype=np.float32)[None].repeat(4, 0))
    with pytest.raises(DataError, match=r"volumes must all have 2 channel\(s\) like .*v2\.nii: 1 channels"):
        build("--data", "folder", "--root", str(tmp_path), "--spatial-dims", "3", "--img-size", "4",
              "--val-fraction", "0.3", "--test-fraction", "0.3")


def test_nifti_bad_data_is_reported_with_the_file(nifti_root: Path):
    volumes = ("--data", "folder", "--root", str(nifti_root), "--spatial-dims", "3", "--img-size", "8")
    write_volume(nifti_root / "masks" / "vol1.nii.gz", np.zeros((6, 7, 9), dtype=np.uint8))
    with pytest.raises(DataError, match=r"vol1\.nii\.gz has shape \(6, 7, 8\) but its mask .* \(6, 7, 9\)"):
        build(*volumes)
    write_volume(nifti_root / "masks" / "vol1.nii.gz", np.full((6, 7, 8), 0.5, dtype=np.float32))
    # Interpolated labels: the error says so and how to fix the files (the threshold cannot read them).
    with pytest.raises(DataError, match=r"mask file .*vol1\.nii\.gz holds non-integer values \(such as "
                                        r"0\.5\); .*resample masks with nearest neighbour \(or round them\)"):
        build(*volumes)
    (nifti_root / "masks" / "vol1.nii.gz").write_bytes(b"garbage")
    (nifti_root / "masks" / "vol3.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"(?s)2 of 5 volume/mask pairs cannot be used:\n"
                                        r"  cannot read mask file .*vol1\.nii\.gz.*\n  cannot read .*vol3"):
        build(*volumes)
    (nifti_root / "masks" / "vol1.nii.gz").unlink()
    with pytest.raises(DataError, match=r"mask for volume .*vol1\.nii\.gz is missing"):
        build(*volumes)
    write_volume(nifti_root / "masks" / "vol1.nii.gz", np.full((6, 7, 8), 5, dtype=np.uint8))
    write_volume(nifti_root / "masks" / "vol3.nii.gz", np.full((6, 7, 8), 1, dtype=np.uint8))
    # Checked before any training, whichever split vol1 falls in.
    bad_value = r"(?s)1 of 5 mask file.*--num-classes 3, 0\.\.2:\n  .*vol1\.nii\.gz: 5\n"
    with pytest.raises(DataError, match=bad_value):
        build(*volumes, "--num-classes", "3")
    with pytest.raises(DataError, match="2D images"):
        build("--data", "isic2018", "--root", str(nifti_root), "--spatial-dims", "3")


def test_nifti_mask_on_another_voxel_grid_is_refused(nifti_root: Path):
    """Read in stored voxel order, a mask stored flipped (another orientation in its affine) or at
    another spacing would lie shifted against its volume: the pair is refused, both grids named.
    A mask saved with the identity affine (made from the image's array) says nothing: accepted."""
    nibabel = pytest.importorskip("nibabel")
    volumes = ("--data", "folder", "--root", str(nifti_root), "--spatial-dims", "3", "--img-size", "8",
               "--num-classes", "3")
    image_path, mask_path = nifti_root / "images" / "vol2.nii.gz", nifti_root / "masks" / "vol2.nii.gz"
    scanner = np.diag([0.8, 0.8, 2.5, 1.0])
    scanner[:3, 3] = (-100.0, -120.0, 40.0)
    image = np.asarray(nibabel.load(str(image_path)).dataobj)
    nibabel.save(nibabel.Nifti1Image(image, scanner), str(image_path))
    mask = np.asarray(nibabel.load(str(mask_path)).dataobj)
    nibabel.save(nibabel.Nifti1Image(mask, scanner), str(mask_path))
    assert len(build(*volumes).train) > 0  # the same grid
    flipped = scanner @ np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[0, 3] = scanner[0, 3] + 0.8 * 5  # the same world positions, stored with x reversed
    nibabel.save(nibabel.Nifti1Image(mask[::-1].copy(), flipped), str(mask_path))
    with pytest.raises(DataError, match=r"vol2\.nii\.gz is stored on another voxel grid .*LAS orientation.*"
                                        r"against RAS orientation"):
        build(*volumes)
    nibabel.save(nibabel.Nifti1Image(mask, np.diag([2.0, 2.0, 2.0, 1.0])), str(mask_path))
    with pytest.raises(DataError, match=r"spacing \(2, 2, 2\).* against .*spacing \(0\.8, 0\.8, 2\.5\)"):
        build(*volumes)
    shifted = scanner.copy()
    shifted[0, 3] += 0.8  # one voxel along x: every label one voxel off
    nibabel.save(nibabel.Nifti1Image(mask, shifted), str(mask_path))
    with pytest.raises(DataError, match=r"vol2\.nii\.gz is stored on another voxel grid"):
        build(*volumes)
    nibabel.save(nibabel.Nifti1Image(mask, np.eye(4)), str(mask_path))  # placed nowhere: voxel order
    assert len(build(*volumes).train) > 0
    nibabel.save(nibabel.Nifti1Image(mask, np.diag([-1.0, -1.0, 1.0, 1.0])), str(mask_path))  # ITK's default
    assert len(build(*volumes).train) > 0
    singular = nibabel.Nifti1Image(mask, np.eye(4))  # a coded all-zero sform: places nothing
    singular.set_sform(np.zeros((4, 4)), code=1)
    singular.set_qform(np.eye(4), code=0)
    nibabel.save(singular, str(mask_path))
    assert len(build(*volumes).train) > 0  # not numpy's LinAlgError


def test_nifti_same_grid_in_sform_and_in_a_float32_qform_is_one_grid(nifti_root: Path):
    """An image read through its sform and a mask written with only a qform (a float32 quaternion)
    of the same rotated grid differ by ~1e-3 mm: the same grid, accepted."""
    nibabel = pytest.importorskip("nibabel")
    angle = np.deg2rad(179.93)  # LPS-like flip plus a slight in-plane rotation, as dcm2niix writes
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 0.9, 5.0])
    affine[:3, 3] = (110.0, 95.0, -60.0)
    for folder in ("images", "masks"):
        for path in sorted((nifti_root / folder).glob("*.nii.gz")):
            values = np.asarray(nibabel.load(str(path)).dataobj)
            written = nibabel.Nifti1Image(values, affine)
            if folder == "masks":  # a qform only
                written.set_sform(None, code=0)
                written.set_qform(affine, code=1)
            nibabel.save(written, str(path))
    mask = nibabel.load(str(nifti_root / "masks" / "vol0.nii.gz"))
    image = nibabel.load(str(nifti_root / "images" / "vol0.nii.gz"))
    assert 0 < np.abs(mask.affine - image.affine).max() < 0.01  # qform rounding, not another grid
    volumes = ("--data", "folder", "--root", str(nifti_root), "--spatial-dims", "3", "--img-size", "8",
               "--num-classes", "3")
    assert len(build(*volumes).train) > 0


def test_nifti_rgb_voxels_are_a_data_error(nifti_root: Path):
    nibabel = pytest.importorskip("nibabel")
    rgb = np.zeros((6, 7, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nibabel.save(nibabel.Nifti1Image(rgb, np.eye(4)), str(nifti_root / "images" / "vol0.nii.gz"))
    from cmrf.data.nifti import read_volume

    with pytest.raises(DataError, match=r"vol0\.nii\.gz holds .* voxels; expected numbers"):
        read_volume(nifti_root / "images" / "vol0.nii.gz")


def test_nifti_label_values_can_be_mapped_and_are_cached(nifti_root: Path, tmp_path_factory, monkeypatch):
    """Large label values (an atlas's 1000, 2000) map to classes; a disk cache skips every read."""
    for i in range(5):
        mask = np.zeros((6, 7, 8), dtype=np.int16)
        mask[1:4, 2:5, 3:6], mask[4:, :2, :2] = 1000, 2000
        write_volume(nifti_root / "masks" / f"vol{i}.nii.gz", mask)
    cache_dir = tmp_path_factory.mktemp("cache")
    volumes = ("--data", "folder", "--root", str(nifti_root), "--spatial-dims", "3", "--img-size", "8",
               "--mask-values", "0", "1000", "2000", "--cache", "disk", "--cache-dir", str(cache_dir))
    first = build(*volumes)
    items = [first.train[i] for i in range(len(first.train))]
    assert first.num_classes == 3 and set(torch.cat([m.flatten() for _, m in items]).tolist()) == {0, 1, 2}
    import cmrf.data.nifti as nifti

    def no_reading(*args):
        raise AssertionError("a volume was read again")

    monkeypatch.setattr(nifti, "read_volume_mask", no_reading)
    monkeypatch.setattr(nifti, "read_volume", no_reading)
    again = build(*volumes)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(items, (again.train[i] for i in range(len(again.train)))))


def test_load_volume_gives_what_the_model_was_trained_on(nifti_root: Path):
    """Volumes had no reader normalised like training: read_volume's [0, 1] volumes gave a trained
    model wrong predictions (Dice 0.37 against 0.99) without an error."""
    from cmrf.data import load_volume

    volumes = ("--data", "folder", "--root", str(nifti_root), "--spatial-dims", "3", "--img-size", "8")
    bundle = build(*volumes, "--num-classes", "3")
    bundle.train.augment = False
    pair = bundle.train.pairs[0]
    assert torch.equal(load_volume(pair.image, img_size=8), bundle.train[0][0])
    assert load_volume(pair.image).shape == (1, 6, 7, 8)  # at its own size


def test_volume_values_that_are_not_classes_or_not_float32_are_named(tmp_path: Path):
    """A label file scaled by its header (nibabel's choice for float labels saved as int16) was
    blamed on interpolation; 1 + 1e-6 printed as "1"; a finite float64 image beyond the float32
    range was said to hold NaN or infinite values."""
    nibabel = pytest.importorskip("nibabel")
    from cmrf.data.nifti import read_volume, read_volume_mask

    labels = np.zeros((4, 4, 4), dtype=np.float32)
    labels[1:3, 1:3, 1:3] = 2.0
    labels[0, 0, 0] = 1.0
    scaled = nibabel.Nifti1Image(labels, np.eye(4))
    scaled.set_data_dtype(np.int16)
    scaled.header.set_slope_inter(3.0518e-05, 1.0000152587890625)
    nibabel.save(scaled, str(tmp_path / "scaled.nii.gz"))
    with pytest.raises(DataError, match=r"scaled by its header \(scl_slope=3\.05.*set_slope_inter\(1, 0\)"):
        read_volume_mask(tmp_path / "scaled.nii.gz")
    write_volume(tmp_path / "noise.nii.gz", labels + np.float32(1e-6) * (labels > 0))
    with pytest.raises(DataError, match=r"such as 1\.00000095\); .*linear interpolation"):
        read_volume_mask(tmp_path / "noise.nii.gz")
    write_volume(tmp_path / "huge.nii.gz", labels.astype(np.float64) * 1e40)
    with pytest.raises(DataError, match=r"beyond the float32 range \(up to 2e\+40\)"):
        read_volume(tmp_path / "huge.nii.gz")


def test_a_gzip_file_named_nii_says_so(tmp_path: Path):
    """nibabel's "Cannot work out file type" did not say that the .nii file is gzip-compressed."""
    from cmrf.data.nifti import read_volume

    write_volume(tmp_path / "v.nii.gz", np.zeros((4, 4, 4), dtype=np.float32))
    (tmp_path / "v.nii.gz").rename(tmp_path / "v.nii")
    with pytest.raises(DataError, match=r"v\.nii: .*gzip-compressed: name it \.nii\.gz"):
        read_volume(tmp_path / "v.nii")
    (tmp_path / "cut.nii").write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match=r"has 100 bytes, fewer than a NIfTI header"):
        read_volume(tmp_path / "cut.nii")
