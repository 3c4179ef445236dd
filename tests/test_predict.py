"""``cmrf predict``: it keeps going past bad inputs, names outputs uniquely, writes atomically, and
takes reference-code checkpoints."""

from __future__ import annotations

import errno
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cmrf
from cmrf.cli import main
from cmrf.cli.predict import output_stems
from cmrf.train.state import model_metadata
from tests.conftest import golden_state_dict, load_golden, requires_onnx_exporter


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small TinyU-Net saved as ``cmrf train`` saves it (weights plus metadata)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "best.safetensors"
    kwargs = {"channels": [16, 32], "N": 4}
    meta = model_metadata("tinyunet", kwargs, 3, 2, ["background", "lesion"], data={"img_size": 32})
    cmrf.save_weights(cmrf.TinyUNet(channels=(16, 32), N=4), path, metadata=meta)
    return path


def _image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    _image(folder / "a.png", 40, 24, 1)
    _image(folder / "a.jpg", 30, 20, 2)  # same stem as a.png
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is garbage")  # corrupt
    _image(folder / "c.png", 33, 17, 3)
    return folder


def test_output_stems_are_unique_whatever_the_inputs():
    names = ["x/a.png", "x/a.jpg", "y/a.png", "x/b.png", "x/B.tif", "x/c.png"]
    paths = [Path(name) for name in names]
    stems = output_stems(paths)
    assert stems == ["a.png", "a.jpg", "a.png-2", "b.png", "B.tif", "c"]
    assert len({s.casefold() for s in stems}) == len(paths)


def test_bad_inputs_are_reported_and_skipped(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "missing.png"
    # A link whose image moved away was skipped without a word (exit 0 when all else went well).
    (images / "d.png").symlink_to(tmp_path / "moved.png")
    # A TIFF cut off inside its directory was an internal error (TypeError) that stopped the run.
    whole = tmp_path / "whole.tif"
    page = Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))
    page.save(whole, save_all=True, append_images=[page])
    (images / "e.tif").write_bytes(whole.read_bytes()[:900])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's "Corrupt EXIF data" for the cut TIFF
        status = main(["predict", str(checkpoint), str(images), str(missing), "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 1
    errors = [line for line in captured.err.strip().splitlines() if line.startswith("cmrf predict")]
    assert len(errors) == 4 and "Traceback" not in captured.err, captured.err
    assert errors[0].startswith(f"cmrf predict: error: {images / 'd.png'}: a broken link: its target")
    assert errors[1].startswith(f"cmrf predict: error: {missing}: ") and "skipped" in errors[1]
    assert errors[2].startswith("cmrf predict: error: ") and str(images / "b.png") in errors[2]
    assert f"{images / 'e.tif'}: TypeError" in errors[3]
    assert f"wrote 3 mask(s) and overlays to {out}; 4 input(s) failed" in captured.out
    expected = {"a.png": (40, 24), "a.jpg": (30, 20), "c": (33, 17)}  # stems that collide keep their suffix
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([f"{s}_mask.png" for s in expected] + [f"{s}_overlay.png" for s in expected])
    for stem, (height, width) in expected.items():
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255}


def test_all_good_inputs_exit_zero(checkpoint, images, tmp_path, capsys):
    (images / "b.png").unlink()
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(images / "c.png"), "--out", str(out), "--no-overlays"]) == 0
    assert "wrote 1 mask(s) to" in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == ["c_mask.png"]


def test_no_overlays_removes_an_earlier_runs_overlay_of_the_same_image(checkpoint, images, tmp_path, capsys):
    """An overlay left beside a new mask would show another prediction than that mask."""
    out = tmp_path / "out"
    argv = ["predict", str(checkpoint), str(images / "c.png"), "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    other = _image(out / "z_overlay.png", 8, 8)  # not an overlay of this run's images: kept
    capsys.readouterr()
    assert main([*argv, "--no-overlays"]) == 0
    summary = capsys.readouterr().out
    assert f"wrote 1 mask(s) to {out}; removed 1 file(s) of an earlier run; 0 input(s)" in summary
    assert sorted(p.name for p in out.iterdir()) == ["c_mask.png", "z_overlay.png"] and other.is_file()


def test_an_input_that_fails_now_leaves_no_mask_of_an_earlier_run(checkpoint, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    good, later_bad = _image(folder / "a.png", 20, 20), _image(folder / "b.png", 20, 20)
    out = tmp_path / "out"
    argv = ["predict", str(checkpoint), str(folder), "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    later_bad.write_bytes(b"no longer an image")
    capsys.readouterr()
    assert main(argv) == 1
    assert "removed 2 file(s) of an earlier run; 1 input(s) failed" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "a_overlay.png"] and good.is_file()


def test_a_volume_given_to_predict_is_named_as_one(checkpoint, tmp_path, capsys):
    """A .nii.gz was reported as "UnidentifiedImageError: cannot identify image file"."""
    volume = tmp_path / "ct.nii.gz"
    volume.write_bytes(b"\x1f\x8b not read")
    _image(tmp_path / "a.png", 20, 20, 1)
    argv = ["predict", str(checkpoint), str(volume), str(tmp_path / "a.png"), "--out", str(tmp_path / "out"),
            "--device", "cpu", "--no-overlays"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{volume}: a NIfTI volume: cmrf predict segments 2D images" in err and "Unidentified" not in err


def test_files_cmrf_did_not_write_are_neither_replaced_nor_removed(checkpoint, tmp_path, capsys):
    """A ground-truth folder given as --out: its a_mask.png would be replaced by the prediction,
    and the b_mask.png of an input that cannot be read removed as an earlier run's output."""
    folder, out = tmp_path / "images", tmp_path / "truth"
    folder.mkdir(), out.mkdir()
    _image(folder / "a.png", 20, 20, 1)
    (folder / "b.png").write_bytes(b"not an image")
    truth_a, truth_b = _image(out / "a_mask.png", 20, 20, 2), _image(out / "b_mask.png", 20, 20, 3)
    before = {path: path.read_bytes() for path in (truth_a, truth_b)}
    argv = ["predict", str(checkpoint), str(folder), "--out", str(out), "--device", "cpu", "--no-overlays"]
    assert main(argv) == 2  # refused before anything is written
    err = capsys.readouterr().err
    assert ("holds 2 file(s) named like this run's outputs that cmrf predict did not write "
            "(a_mask.png, b_mask.png)") in err
    assert "--overwrite" in err
    assert {path: path.read_bytes() for path in before} == before and len(list(out.iterdir())) == 2
    # --overwrite replaces a_mask.png; b_mask.png, not this command's, stays though b.png fails
    assert main([*argv, "--overwrite"]) == 1
    summary = capsys.readouterr().out
    assert "left 1 file(s) named like an earlier run's outputs, which cmrf predict did not write" in summary
    assert truth_a.read_bytes() != before[truth_a] and truth_b.read_bytes() == before[truth_b]
    with Image.open(truth_a) as mask:  # the mark that lets the next run replace it
        assert mask.text["Software"] == "cmrf predict"
    (folder / "b.png").unlink()
    assert main(argv) == 0  # a re-run replaces its own mask without --overwrite


def test_outputs_of_a_stem_that_now_collides_are_removed(checkpoint, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    _image(folder / "a.png", 20, 20)
    out = tmp_path / "out"
    argv = ["predict", str(checkpoint), str(folder), "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    _image(folder / "a.jpg", 20, 20, seed=1)  # a_mask.png would now pass for either image's
    capsys.readouterr()
    assert main(argv) == 0
    assert "removed 2 file(s) of an earlier run" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a.jpg_mask.png", "a.jpg_overlay.png", "a.png_mask.png", "a.png_overlay.png"]
    (folder / "a.jpg").unlink()  # the other way round: a.png_mask.png would pass for a.png's mask
    capsys.readouterr()
    assert main(argv) == 0
    assert "removed 2 file(s) of an earlier run" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())  # a.jpg's own outputs stay, as a missing input's do
    assert names == ["a.jpg_mask.png", "a.jpg_overlay.png", "a_mask.png", "a_overlay.png"]


def test_an_image_given_twice_is_predicted_once(checkpoint, tmp_path, capsys):
    """A file and its folder, or the same file twice: one output, not a second stem for it."""
    folder = tmp_path / "images"
    folder.mkdir()
    _image(folder / "a.png", 20, 20, 1)
    _image(folder / "c.png", 20, 20, 2)
    out = tmp_path / "out"
    argv = ["predict", str(checkpoint), str(folder / "a.png"), str(folder), str(folder / "a.png")]
    assert main([*argv, "--out", str(out), "--device", "cpu", "--no-overlays"]) == 0
    assert "wrote 2 mask(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "c_mask.png"]


def test_hidden_files_are_skipped_and_a_link_is_named_as_its_file(checkpoint, tmp_path, capsys):
    """macOS writes "._a.png" (not an image) beside "a.png": training skips it, so does predict.
    A link to an image in the same folder is one file: named as the file, not the link."""
    folder = tmp_path / "images"
    folder.mkdir()
    _image(folder / "rgb.png", 20, 20, 1)
    (folder / "._rgb.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / "link.png").symlink_to(folder / "rgb.png")
    out = tmp_path / "out"
    argv = ["predict", str(checkpoint), str(folder), "--out", str(out), "--device", "cpu", "--no-overlays"]
    assert main(argv) == 0
    assert "wrote 1 mask(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["rgb_mask.png"]


def test_out_that_is_a_file_is_named_as_not_a_folder(checkpoint, images, tmp_path, capsys):
    """mkdir's "File exists" (for --out /dev/null, or a file) did not say what was wrong."""
    a_file = tmp_path / "masks.png"
    a_file.write_bytes(b"x")
    assert main(["predict", str(checkpoint), str(images), "--out", str(a_file), "--device", "cpu"]) == 2
    assert f"{a_file}: is not a folder: --out takes the masks' folder" in capsys.readouterr().err
    assert a_file.read_bytes() == b"x"


def test_out_must_not_be_an_input_folder_nor_overwrite_an_input(checkpoint, images, tmp_path, capsys):
    """Masks written among the images would overwrite a ground-truth a_mask.png there and be read
    as images by the next run over that folder."""
    truth = _image(images / "c_mask.png", 33, 17, 9)
    before = truth.read_bytes()
    assert main(["predict", str(checkpoint), str(images), "--out", str(images), "--device", "cpu"]) == 2
    assert "is also an input folder" in capsys.readouterr().err
    assert truth.read_bytes() == before and not list(images.glob("*_overlay.png"))
    # the images given as files (the shell's data/*.png): their folder is refused as well
    files = [str(images / "a.png"), str(images / "c.png")]
    assert main(["predict", str(checkpoint), *files, "--out", str(images), "--device", "cpu"]) == 2
    assert f"is also the folder of the input {images / 'a.png'}" in capsys.readouterr().err
    assert truth.read_bytes() == before and not list(images.glob("*_overlay.png"))
    # through a folder that does not exist yet: images/new/.. is images once new is made
    through = images / "new" / ".."
    assert main(["predict", str(checkpoint), str(images), "--out", str(through), "--device", "cpu"]) == 2
    assert "is also an input folder" in capsys.readouterr().err
    assert truth.read_bytes() == before and not (images / "new").exists()
    # an input in --out, named like another input's output: refused before anything is written
    out = tmp_path / "out"
    out.mkdir()
    shown = _image(out / "d_mask.png", 20, 20, 4)
    source = _image(tmp_path / "d.png", 20, 20, 5)
    before = shown.read_bytes()
    argv = ["predict", str(checkpoint), str(source), str(shown), "--out", str(out), "--device", "cpu"]
    assert main(argv) == 2
    assert f"is also the folder of the input {shown}" in capsys.readouterr().err
    assert shown.read_bytes() == before and [p.name for p in out.iterdir()] == ["d_mask.png"]


def test_an_output_that_links_to_an_input_is_refused_before_anything_is_written(checkpoint, tmp_path, capsys):
    """Files are written through symbolic links, so a c_mask.png in --out that links to the input c.png
    made predict overwrite its own input with the mask."""
    source = _image(tmp_path / "c.png", 20, 20, 3)
    before = source.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (out / "c_overlay.png").symlink_to(source)
    argv = ["predict", str(checkpoint), str(source), "--out", str(out), "--device", "cpu"]
    assert main(argv) == 2
    assert f"{out / 'c_overlay.png'} is a link to the input {source}" in capsys.readouterr().err
    assert source.read_bytes() == before and [p.name for p in out.iterdir()] == ["c_overlay.png"]
    # a link loop there names no input (nor an internal error): a link to nothing, which predict did
    # not write, refused as such files are, and replaced with --overwrite
    (out / "c_overlay.png").unlink()
    (out / "c_mask.png").symlink_to(out / "c_mask.png")
    assert main(argv) == 2 and "did not write (c_mask.png)" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0 and source.read_bytes() == before


def test_file_names_are_titles_not_mathtext(checkpoint, tmp_path, capsys):
    """matplotlib reads ``$...$`` as a formula: a file name must neither fail nor be typeset."""
    folder = tmp_path / "odd"
    folder.mkdir()
    for name in ("cost$\\alpha_$.png", "scan_$x^$.png"):
        _image(folder / name, 20, 20)
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(folder), "--out", str(out), "--device", "cpu"]) == 0
    assert len(list(out.glob("*_overlay.png"))) == 2 and len(list(out.glob("*_mask.png"))) == 2


def test_file_names_that_are_not_utf8_or_lack_glyphs_are_drawn(checkpoint, tmp_path, capsys):
    """A Latin-1 name on a UTF-8 system (Python keeps its byte as a lone surrogate) stopped the run
    with "internal error" (exit 70) in the overlay's title; CJK names printed matplotlib's glyph
    warnings, two per image."""
    folder = tmp_path / "names"
    folder.mkdir()
    latin1 = os.fsdecode(b"M\xfcller.png")  # "Müller.png" as Latin-1 bytes
    for name in (latin1, "\u6f22\u5b57.png", "z.png"):
        _image(folder / name, 20, 20)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["predict", str(checkpoint), str(folder), "--out", str(out), "--device", "cpu"]) == 0
    assert len(list(out.glob("*_overlay.png"))) == 3 and len(list(out.glob("*_mask.png"))) == 3


def test_an_onnx_file_given_as_checkpoint_is_named(checkpoint, images, tmp_path, capsys):
    """An exported .onnx given to predict got "not a torch checkpoint or safetensors file
    (Unsupported operand 8)"."""
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x0a\x12\x07pytorch")  # an ONNX protobuf starts with its ir_version
    for path in (onnx, tmp_path / "model.bin"):
        path.write_bytes(onnx.read_bytes())
        assert main(["predict", str(path), str(images / "c.png"), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "it is an ONNX graph (what cmrf export writes), not a weights file" in err
        assert "--backend onnxruntime" in err


def test_a_file_without_the_training_size_is_noted(checkpoint, images, tmp_path, capsys):
    """A save_weights file records no img_size: predict guessed 256 without a word."""
    bare = tmp_path / "weights.safetensors"
    cmrf.save_weights(cmrf.create_model("tinyunet", channels=(16, 32), N=4), bare)
    argv = ["predict", str(bare), str(images / "c.png"), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main(argv) == 0
    assert "records no training image size; predicting at 256 (give --img-size" in capsys.readouterr().err
    assert main([*argv, "--img-size", "32"]) == 0
    assert "records no training image size" not in capsys.readouterr().err


@pytest.mark.parametrize("model, kwargs, message", [
    ("tinyunet", {"num_classes": 1}, "holds a model with 1 output channel(s)"),
    ("tinyunet3d", {}, "holds a 3D model; cmrf predict handles 2D image files"),
])
def test_models_predict_cannot_write_are_refused_before_any_image(tmp_path, capsys, model, kwargs, message):
    path = tmp_path / "weights.pth"
    torch.save(cmrf.create_model(model, channels=(16, 32), N=4, **kwargs).state_dict(), path)
    image = _image(tmp_path / "a.png", 20, 20)
    argv = ["predict", str(path), str(image), "--model", model, "--N", "4", "--channels", "16", "32",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "mps"], "unsupported device 'mps'"),
        (["--device", "gpu"], "unknown device 'gpu'"),
        (["--backend", "onnxruntime", "--no-optimize"], "drop --no-optimize"),
    ],
)
def test_refused_flags_leave_no_output_folder(checkpoint, images, tmp_path, capsys, flags, message):
    """A typo in --device (or a backend the flags rule out) is refused before --out is made: no empty
    folder is left behind by a command that wrote nothing."""
    argv = ["predict", str(checkpoint), str(images / "c.png"), "--out", str(tmp_path / "out")]
    assert main([*argv, *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_img_size_other_than_the_runs_is_noted_and_too_small_refused(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["predict", str(checkpoint), str(images / "c.png"), "--out", str(out), "--device", "cpu"]
    assert main([*argv, "--img-size", "48"]) == 0
    assert "note: --img-size 48, the run trained at 32" in capsys.readouterr().err
    assert main([*argv, "--img-size", "2"]) == 2
    assert "--img-size 2 is below the smallest side TinyUNet takes (4)" in capsys.readouterr().err


def test_full_disk_halfway_keeps_the_previous_mask(checkpoint, images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    inputs = [str(images / "a.png"), str(images / "c.png")]
    assert main(["predict", str(checkpoint), *inputs, "--out", str(out), "--no-overlays"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save = Image.Image.save
    calls = []

    def save_until_the_disk_is_full(image, fp, format=None, **params):
        calls.append(fp)
        if len(calls) < 2:
            return real_save(image, fp, format, **params)
        encoded = io.BytesIO()
        real_save(image, encoded, "PNG")
        Path(fp).write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save_until_the_disk_is_full)
    capsys.readouterr()
    assert main(["predict", str(checkpoint), *inputs, "--out", str(out), "--no-overlays"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"cmrf predict: error: {out / 'c_mask.png'}: No space left on device"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # same files, no temporary one


def test_truncated_checkpoint_is_one_line(checkpoint, images, tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(checkpoint.read_bytes()[:100])
    assert main(["predict", str(broken), str(images), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    expected = f"cmrf predict: error: cannot read weights from {broken}: file is truncated"
    assert err.strip().startswith(expected)
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_reference_checkpoint(images, tmp_path, capsys):
    reference = tmp_path / "best_model.pth"
    torch.save(golden_state_dict(load_golden("tinyunet_official.safetensors")), reference)
    out = tmp_path / "out"
    image = str(images / "c.png")
    assert main(["predict", str(reference), image, "--out", str(out)]) == 2
    assert "give the model name (--model NAME" in capsys.readouterr().err
    argv = ["predict", str(reference), image, "--model", "tinyunet", "--img-size", "32", "--out", str(out)]
    assert main(argv) == 0
    assert sorted(os.listdir(out)) == ["c_mask.png", "c_overlay.png"]


def test_cpu_predict_runs_one_frozen_graph_and_same_masks(checkpoint, images, tmp_path, monkeypatch):
    """By default the CPU run goes through optimize_for_inference(freeze=True), one graph for all
    images (each is resized to the run's size); --no-optimize runs the loaded model. Same masks."""
    from cmrf.inference import FrozenCPUInference

    (images / "b.png").unlink()
    builds = []
    original_build = FrozenCPUInference._build

    def counting_build(self, x):
        builds.append(x.shape)
        return original_build(self, x)

    monkeypatch.setattr(FrozenCPUInference, "_build", counting_build)
    masks = {}
    for flags in ([], ["--no-optimize"]):
        out = tmp_path / f"out{len(flags)}"
        args = ["predict", str(checkpoint), str(images), "--out", str(out), "--no-overlays"]
        assert main([*args, "--device", "cpu", *flags]) == 0
        masks[len(flags)] = {p.name: np.asarray(Image.open(p)) for p in sorted(out.iterdir())}
        assert builds == [(1, 3, 32, 32)]  # built once by the default run, not again with --no-optimize
    assert masks[0].keys() == masks[1].keys() and len(masks[0]) == 3
    for name, mask in masks[0].items():
        np.testing.assert_array_equal(mask, masks[1][name], err_msg=name)


def test_inference_model_keeps_models_it_cannot_speed_up():
    from cmrf.cli.model_args import inference_model

    cpu = torch.device("cpu")
    plain = torch.nn.Conv2d(3, 2, 1)
    assert inference_model(plain, cpu) is plain  # no CMRF block
    tiny = cmrf.TinyUNet(channels=(16, 32), N=4)
    assert inference_model(tiny, cpu, optimize=False) is tiny
    assert inference_model(tiny.double(), cpu) is tiny  # not fp32
    assert type(inference_model(tiny.float(), cpu)).__name__ == "FrozenCPUInference"
    volume = cmrf.TinyUNet(channels=(16, 32), N=4, spatial_dims=3)
    assert inference_model(volume, cpu) is volume  # 2D only


@requires_onnx_exporter
def test_predict_with_onnxruntime_backend_gives_the_same_masks(checkpoint, images, tmp_path):
    """--backend onnxruntime writes the masks the torch backend writes."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    (images / "b.png").unlink()
    masks = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        args = ["predict", str(checkpoint), str(images), "--out", str(out), "--no-overlays"]
        assert main([*args, "--backend", backend]) == 0
        masks[backend] = {p.name: np.asarray(Image.open(p)) for p in sorted(out.iterdir())}
    assert masks["torch"].keys() == masks["onnxruntime"].keys() and len(masks["torch"]) == 3
    for name, mask in masks["torch"].items():
        np.testing.assert_array_equal(mask, masks["onnxruntime"][name], err_msg=name)


@requires_onnx_exporter
def test_onnxruntime_backend_refuses_what_it_cannot_run(checkpoint, images, tmp_path, capsys, monkeypatch):
    """--no-optimize and non-CPU devices are refused on one line; --device auto means the CPU."""
    from argparse import Namespace

    from cmrf.cli.model_args import inference_device, inference_model

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    args = ["predict", str(checkpoint), str(images), "--out", str(tmp_path / "out")]
    assert main([*args, "--backend", "onnxruntime", "--no-optimize"]) == 2
    assert "--backend onnxruntime runs the optimized model; drop --no-optimize" in capsys.readouterr().err
    tiny = cmrf.TinyUNet(channels=(16, 32), N=4)
    with pytest.raises(ValueError, match="runs fp32 models on the CPU, got device meta"):
        inference_model(tiny, torch.device("meta"), backend="onnxruntime")
    plain = torch.nn.Conv2d(3, 2, 1)  # no CMRF block: exported as it is
    wrapped = inference_model(plain, torch.device("cpu"), backend="onnxruntime")
    assert type(wrapped).__name__ == "OnnxRuntimeInference"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert inference_device(Namespace(backend="onnxruntime", device="auto")) == torch.device("cpu")
    assert inference_device(Namespace(backend="torch", device="auto")).type == "cuda"


def test_backend_onnxruntime_not_installed_is_a_user_error(checkpoint, images, tmp_path, capsys, monkeypatch):
    """A missing extra is the user's to install (exit status 2), not a bug (70, "please report it")."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "onnxruntime" else real_find_spec(name, *args),
    )
    argv = ["predict", str(checkpoint), str(images / "c.png"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cmrf predict: error: ") and "pip install 'cmrf[onnx]'" in err
    assert not (tmp_path / "out").exists()


def test_inputs_naming_no_image_make_no_output_folder_and_name_subfolders(checkpoint, tmp_path, capsys):
    """A folder whose images are all in subfolders said only "holds no images", and an empty --out
    folder was left behind."""
    scans = tmp_path / "scans"
    (scans / "day1").mkdir(parents=True)
    _image(scans / "day1" / "a.png", 20, 20)
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(scans), str(tmp_path / "missing.png"), "--out", str(out),
                 "--device", "cpu", "--no-optimize"]) == 1
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert "its subfolders day1/ hold images, but subfolders are not searched" in err
    assert "none of the 2 input(s) names an image" in captured.out
    assert not out.exists()


def test_planted_links_and_control_characters_in_names(checkpoint, tmp_path, capsys):
    """A link named like an output whose target is missing was written through (creating the
    target anywhere) without the foreign-file check; a file name's newline or escape sequence
    reached the terminal as it is."""
    folder = tmp_path / "images"
    folder.mkdir()
    _image(folder / "a.png", 20, 20)
    (folder / "b\n FAKE: all ok\x1b[31m.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "elsewhere" / "owned.png"
    (out / "a_mask.png").symlink_to(victim)
    argv = ["predict", str(checkpoint), str(folder), "--out", str(out), "--device", "cpu"]
    assert main(argv) == 2
    assert "that cmrf predict did not write (a_mask.png)" in capsys.readouterr().err
    assert not victim.exists() and not victim.parent.exists()
    (out / "a_mask.png").unlink()
    assert main(argv) == 1  # the bad file is reported, a.png written
    err = capsys.readouterr().err
    assert "\\n FAKE: all ok\\x1b[31m.png" in err and "\x1b" not in err and err.count("\n") == 1


def test_a_checkpoints_huge_image_size_is_refused(tmp_path, capsys, images):
    from cmrf.train.state import model_metadata

    meta = model_metadata("tinyunet", {"channels": [16, 32], "N": 4}, 3, 2, ["background", "lesion"],
                          data={"img_size": 40000})
    path = tmp_path / "huge.safetensors"
    cmrf.save_weights(cmrf.TinyUNet(channels=(16, 32), N=4), path, metadata=meta)
    assert main(["predict", str(path), str(images / "c.png"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--img-size 40000 (the checkpoint's): expected an integer of at most 8192" in err


def test_overlays_without_matplotlib_are_refused_before_anything_is_written(checkpoint, images, tmp_path,
                                                                           capsys, monkeypatch):
    """It failed as an "internal error" (exit 70, "please report it") after writing the first mask."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "matplotlib" else find_spec(name, *args))
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(images / "c.png"), "--out", str(out)]) == 2
    assert "needs matplotlib, which is not installed: pip install 'cmrf[train]'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["predict", str(checkpoint), str(images / "c.png"), "--out", str(out), "--no-overlays"]) == 0
