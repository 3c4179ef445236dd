"""`cmrf train / evaluate / predict / demo` end to end on tiny synthetic data (in-process)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmrf.checkpoint import read_state_dict, safetensors_metadata
from cmrf.cli import main
from cmrf.train.setup import build_model
from cmrf.train.state import STATE_FILE, load_training_state, read_metadata
from tests.conftest import temporary_files

# A TinyU-Net with two stages of 16 and 32 channels on 32x32 images: about a second per epoch.
TINY = ["--img-size", "32", "--synthetic-samples", "16", "--channels", "16", "32", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny convolutions gain nothing from more threads, and on a busy machine extra threads spin.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--epochs", "2", "--lr", "3e-3", "--out", str(out)]) == 0
    return out


def test_train_writes_metrics_checkpoints_and_figures(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= {"mean_iou", "mean_dice", "per_class", "history", "absent"}
    assert metrics["precision"] == "float32"  # whatever --amp trained in, as cmrf evaluate scores
    assert list(metrics["per_class"]) == ["background", "lesion"]
    for scores in metrics["per_class"].values():
        assert set(scores) == {"iou", "dice", "target_pixels", "predicted_pixels"}
        assert 0 <= scores["iou"] <= scores["dice"] <= 1 and scores["target_pixels"] > 0
    assert metrics["mean_iou"] == pytest.approx(sum(s["iou"] for s in metrics["per_class"].values()) / 2)
    history = metrics["history"]
    assert [r["epoch"] for r in history] == [1, 2]
    assert all(set(r) == {"epoch", "train_loss", "val_mean_iou", "lr"} for r in history)
    assert history[0]["lr"] == pytest.approx(3e-3) and history[1]["lr"] < history[0]["lr"]  # cosine
    assert metrics["best_epoch"] == max(history, key=lambda r: r["val_mean_iou"])["epoch"]

    state = load_training_state(run_dir / STATE_FILE)  # weights_only=True
    assert state["epoch"] == 2 and state["history"] == history
    meta = read_metadata(run_dir / "last.safetensors")
    assert meta["model"] == "tinyunet" and meta["model_kwargs"] == {"channels": [16, 32]}
    assert meta["epoch"] == 2 and meta["data"]["img_size"] == 32
    assert read_metadata(run_dir / "best.safetensors")["epoch"] == metrics["best_epoch"]
    for name in ("training_curve.png", "overlays.png"):
        with Image.open(run_dir / name) as image:
            assert image.format == "PNG" and image.width > 100
    assert temporary_files(run_dir) == []


def test_augmentation_stops_after_aug_stop_epochs(tmp_path, monkeypatch):
    from cmrf.train.loaders import EpochSampler

    augmented, real = [], EpochSampler.set_epoch

    def set_epoch(self, epoch, augment):
        augmented.append(augment)
        real(self, epoch, augment)

    monkeypatch.setattr(EpochSampler, "set_epoch", set_epoch)
    argv = ["train", *TINY, "--epochs", "3", "--aug-stop", "1", "--no-plots", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert augmented == [True, False, False]


def test_final_scores_are_the_best_epochs_not_the_last(tmp_path, monkeypatch):
    """Epoch 1 validates best: best.safetensors is epoch 1 and the final scores come from it."""
    import cmrf.checkpoint
    import cmrf.train.loop as loop

    real_evaluate, validations = loop.evaluate_model, iter([0.9, 0.5])

    def evaluate(*args, **kwargs):
        scores = real_evaluate(*args, **kwargs)
        if args[6] == "val" and args[7]:  # an epoch's validation (the final scores pass False)
            scores = {**scores, "mean_iou": next(validations)}
        return scores

    loaded, real_load = [], cmrf.checkpoint.load_checkpoint

    def load_checkpoint(model, path):
        loaded.append(Path(path))
        return real_load(model, path)

    monkeypatch.setattr(loop, "evaluate_model", evaluate)
    monkeypatch.setattr(cmrf.checkpoint, "load_checkpoint", load_checkpoint)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--no-plots", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and read_metadata(out / "best.safetensors")["epoch"] == 1
    assert loaded == [out / "best.safetensors"]


def test_evaluate_reproduces_the_test_scores(run_dir, capsys, tmp_path):
    out = tmp_path / "scores.json"
    assert main(["evaluate", str(run_dir / "best.safetensors"), "--device", "cpu", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "lesion" in table and "mean" in table and "IoU %" in table
    scores, metrics = json.loads(out.read_text()), json.loads((run_dir / "metrics.json").read_text())
    # Data flags come from the checkpoint, so this is the same test split and the same model.
    assert scores["per_class"] == metrics["per_class"] and scores["images"] == 8


def test_predict_writes_masks_at_the_input_size_and_overlays(run_dir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i, (w, h) in enumerate([(40, 30), (32, 32)]):
        Image.new("RGB", (w, h), (200, 120 + 40 * i, 90)).save(images / f"img{i}.png")
    out = tmp_path / "pred"
    assert (
        main(
            ["predict", str(run_dir / "best.safetensors"), str(images), "--out", str(out), "--device", "cpu"]
        )
        == 0
    )
    with Image.open(out / "img0_mask.png") as mask:
        assert mask.size == (40, 30)
    assert (out / "img0_overlay.png").is_file() and (out / "img1_mask.png").is_file()
    assert "wrote 2 mask(s)" in capsys.readouterr().out


def test_demo_runs_with_its_settings_overridden_and_reruns_into_its_own_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY, "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    # the class by the name the score table gives it ("foreground IoU" beside a "lesion" row)
    assert "demo done" in printed and "lesion IoU" in printed and "background" in printed
    assert (out / "metrics.json").is_file() and (out / "best.safetensors").is_file()
    assert read_metadata(out / "best.safetensors")["command"] == "demo"
    # README's demo command, run again: the demo replaces its own earlier run (and says so).
    (out / "metrics.json").write_text("{}")
    assert main(["demo", "--out", str(out), *TINY, "--epochs", "1", "--no-plots"]) == 0
    assert f"replacing the earlier demo run in {out}" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["history"][0]["epoch"] == 1
    assert not (out / "overlays.png").exists()  # the earlier run's figures went with it
    # A stopped demo (no metrics.json yet) is not replaced: its epochs are kept for --resume.
    (out / "metrics.json").unlink()
    before = _hashes(out)
    assert main(["demo", "--out", str(out), *TINY, "--epochs", "1", "--no-plots"]) == 2
    assert f"{out} already holds a run" in _one_error_line(capsys) and _hashes(out) == before
    assert main(["demo", "--out", str(out), *TINY, "--epochs", "1", "--no-plots", "--resume"]) == 0


def _hashes(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", ["train", "demo"])
def test_a_second_run_into_the_same_out_is_refused_and_the_first_stays_byte_identical(
    run_dir, command, capsys
):
    before = _hashes(run_dir)
    assert main([command, *TINY, "--epochs", "1", "--out", str(run_dir)]) == 2
    err = _one_error_line(capsys)
    assert f"{run_dir} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert _hashes(run_dir) == before


def test_overwrite_replaces_the_run_files_and_only_them(run_dir, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    (out / "notes.txt").write_text("the user's own file")
    assert main(["train", *TINY, "--epochs", "1", "--no-plots", "--overwrite", "--out", str(out)]) == 0
    assert f"deleted 6 file(s) of the previous run in {out}" in capsys.readouterr().out
    # No mix of two runs: the first run's figures are gone, the user's file stays.
    assert sorted(p.name for p in out.iterdir()) == [
        "best.safetensors", "last.safetensors", "last_state.pt", "metrics.json", "notes.txt"
    ]  # fmt: skip
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 1
    assert main(["train", *TINY, "--resume", "--overwrite", "--out", str(out)]) == 2
    assert "choose one" in _one_error_line(capsys)


WITHOUT_CHANNELS = ["--img-size", "32", "--synthetic-samples", "16", "--device", "cpu", "--lr", "3e-3"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", *TINY, "--channels", "16", "32", "64"], ["--channels 16 32 (given 16 32 64)"]),
        (["train", *WITHOUT_CHANNELS, "--model", "segnet_cmrf"], ["--model tinyunet (given segnet_cmrf)"]),
        (
            ["train", *TINY, "--img-size", "48", "--synthetic-samples", "8"],
            ["--img-size 32 (given 48)", "--synthetic-samples 16 (given 8)"],
        ),
        (
            ["train", *TINY, "--lr", "1e-3", "--batch-size", "4"],
            ["--batch-size 8 (given 4)", "--lr 0.003 (given 0.001)"],
        ),
        (["demo"], ["--epochs 2 (given 8)", "--img-size 32 (given 64)", "--channels 16 32 (given default)"]),
    ],
)
def test_resume_with_other_settings_is_one_line_listing_the_differences(run_dir, argv, expected, capsys):
    before = _hashes(run_dir)
    epochs = [] if argv[0] == "demo" else ["--epochs", "2"]
    assert main([*argv, *epochs, "--resume", "--out", str(run_dir)]) == 2
    err = _one_error_line(capsys)
    assert f"cannot resume {run_dir}, its run has other settings" in err
    assert all(difference in err for difference in expected), err
    assert _hashes(run_dir) == before


def test_a_failed_final_evaluation_says_the_epochs_are_safe_and_resume_finishes(
    tmp_path, capsys, monkeypatch
):
    import cmrf.data

    build_datasets = cmrf.data.build_datasets

    class BrokenTestSplit(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise ValueError("mask file t.png has values 2, 255 outside the class range 0..1")

    def with_a_bad_test_mask(**options):
        bundle = build_datasets(**options)
        bundle.test = BrokenTestSplit()
        return bundle

    monkeypatch.setattr(cmrf.data, "build_datasets", with_a_bad_test_mask)
    out = tmp_path / "run"
    argv = ["train", *TINY, "--synthetic-samples", "8", "--epochs", "2", "--no-plots", "--out", str(out)]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert "values 2, 255" in err and f"2 trained epoch(s) are safe in {out / STATE_FILE}" in err
    assert "--resume to finish the run" in err
    assert not (out / "metrics.json").exists()
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    assert f"resuming {out} after epoch 2/2" in capsys.readouterr().out
    assert [r["epoch"] for r in json.loads((out / "metrics.json").read_text())["history"]] == [1, 2]


def test_resume_removes_a_killed_writers_temporaries_and_names_a_damaged_state(tmp_path, capsys):
    """A kill during the state write leaves its temporary file; a damaged state is one short line,
    without torch's advice to load with weights_only=False."""
    out = tmp_path / "run"
    argv = ["train", *TINY, "--synthetic-samples", "8", "--epochs", "1", "--no-plots", "--out", str(out)]
    # A run killed before its first state: a new run into the folder removes what the kill left.
    out.mkdir()
    (out / ".best.safetensors.k1ll3d.tmp.safetensors").write_bytes(b"half the weights")
    (out / "notes.txt").write_text("mine")
    assert main(argv) == 0
    assert not temporary_files(out) and (out / "notes.txt").exists()
    left = out / ".last_state.pt.k1ll3d.tmp.pt"
    left.write_bytes(b"half a state")
    assert main([*argv, "--resume"]) == 0
    assert not left.exists() and not temporary_files(out)
    capsys.readouterr()
    (out / STATE_FILE).write_bytes(b"garbage\n")
    assert main([*argv, "--resume"]) == 2
    err = _one_error_line(capsys)
    assert f"cannot read training state {out / STATE_FILE}: damaged or not a torch file (" in err
    # what is still usable, and how to go on
    assert "best.safetensors and last.safetensors beside it are separate files" in err
    assert err.endswith("--overwrite starts the run afresh")
    assert "weights_only" not in err and len(err) < 400


@pytest.mark.skipif(sys.platform == "win32", reason="no flock")
@pytest.mark.parametrize("stray_rank", [None, "1"])
def test_a_second_training_into_a_folder_in_use_is_refused(tmp_path, capsys, monkeypatch, stray_rank):
    """Two trainings started at once into one --out both found it empty and both wrote there.
    A RANK left in the environment without torchrun (no WORLD_SIZE) took no lock at all."""
    from cmrf.train.run_folder import RunFolderError, run_folder_lock

    if stray_rank is not None:
        monkeypatch.setenv("RANK", stray_rank)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    with run_folder_lock(out):
        with pytest.raises(RunFolderError, match="is in use by another training"), run_folder_lock(out):
            pass
        argv = ["train", *TINY, "--synthetic-samples", "8", "--epochs", "1", "--no-plots", "--out", str(out)]
        assert main(argv) == 2
        assert f"{out} is in use by another training" in _one_error_line(capsys)
        assert not any(out.iterdir())
    with run_folder_lock(out):  # released
        pass


@pytest.mark.skipif(sys.platform == "win32", reason="no flock")
def test_every_rank_stops_with_the_main_processs_lock_failure(tmp_path, monkeypatch):
    """Any failure to take the folder (not only "in use": a file system without locks) reaches
    the other ranks, which otherwise waited for rank 0 at the next collective."""
    import errno
    import fcntl

    import cmrf.train.loop as loop
    from cmrf.train.processes import Processes
    from cmrf.train.run_folder import RunFolderError

    sent = []

    class TwoRanks(Processes):
        def from_main(self, value):  # what broadcast_object_list delivers, without a process group
            sent.append(value) if self.is_main else None
            return sent[-1] if sent else value

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "run"
    main_rank, other_rank = TwoRanks(rank=0, world_size=2), TwoRanks(rank=1, world_size=2)
    with pytest.raises(OSError, match=f"No locks available: '{out}'"), loop._run_folder_held(out, main_rank):
        pass  # the folder is named
    with pytest.raises(RunFolderError, match=f"No locks available: '{out}'"), loop._run_folder_held(
            out, other_rank):
        pass


class _FillsUp(io.RawIOBase):
    """A writable file that takes ``room`` bytes into ``f``, then fails as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)


@pytest.mark.parametrize("writer", ["os_error", "torch_zip_writer"])
def test_a_full_disk_while_saving_the_state_keeps_the_previous_one(tmp_path, capsys, monkeypatch, writer):
    """``torch_zip_writer``: torch.save's own writer turns the write's OSError into a RuntimeError
    ("unexpected pos ..."), which was reported as an internal error (exit status 70)."""
    out = tmp_path / "run"
    state_file = out / STATE_FILE
    real_save, saved = torch.save, []

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        if not saved:  # epoch 1 is written; epoch 2's write fails halfway
            saved.append(real_save(obj, f, *args, **kwargs))
            return
        saved.append(state_file.read_bytes())
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        if writer == "torch_zip_writer":
            real_save(obj, _FillsUp(f, len(buffer.getvalue()) // 2), *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    argv = ["train", *TINY, "--synthetic-samples", "8", "--epochs", "2", "--no-plots", "--out", str(out)]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert str(state_file) in err and "No space left on device" in err
    assert state_file.read_bytes() == saved[1] and temporary_files(out) == []
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0  # the run goes on from the intact state
    assert f"resuming {out} after epoch 1/2" in capsys.readouterr().out


def test_a_full_disk_while_writing_metrics_keeps_the_previous_file(run_dir, tmp_path, capsys, monkeypatch):
    import os

    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    before = _hashes(out)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    # The run is complete: --resume only evaluates again and rewrites metrics.json.
    argv = ["train", *TINY, "--epochs", "2", "--lr", "3e-3", "--no-plots", "--resume", "--out", str(out)]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert str(out / "metrics.json") in err and "No space left on device" in err
    assert f"the 2 trained epoch(s) are safe in {out / 'last_state.pt'}" in err and "--resume" in err
    assert _hashes(out) == before and temporary_files(out) == []


def test_results_do_not_depend_on_the_worker_count(tmp_path):
    from safetensors.torch import load_file

    # Two epochs with augmentation: persistent workers must see the epoch change.
    common = [*TINY, "--synthetic-samples", "8", "--epochs", "2", "--aug-stop", "2", "--no-plots"]
    for workers in ("0", "2"):
        assert main(["train", *common, "--workers", workers, "--out", str(tmp_path / workers)]) == 0
    a, b = (load_file(str(tmp_path / w / "last.safetensors")) for w in ("0", "2"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    histories = [json.loads((tmp_path / w / "metrics.json").read_text())["history"] for w in ("0", "2")]
    assert histories[0] == histories[1]


def test_compile_trains_the_same_network_and_saves_plain_weights(tmp_path):
    from safetensors.torch import load_file

    # A very small network and dynamo's "eager" backend keep this test to seconds; the CLI's
    # default backend is inductor.
    tiny = ["--img-size", "32", "--synthetic-samples", "8", "--N", "2", "--channels", "8", "16"]
    common = ["train", *tiny, "--device", "cpu", "--epochs", "1", "--no-plots"]
    assert main([*common, "--compile", "eager", "--out", str(tmp_path / "compiled")]) == 0
    assert main([*common, "--out", str(tmp_path / "eager")]) == 0
    compiled, eager = (load_file(str(tmp_path / d / "last.safetensors")) for d in ("compiled", "eager"))
    assert compiled.keys() == eager.keys()  # no "_orig_mod." prefix
    assert all(torch.allclose(compiled[k], eager[k], atol=1e-6) for k in eager)
    assert main(["evaluate", str(tmp_path / "compiled" / "best.safetensors"), "--device", "cpu"]) == 0


def test_train_3d_volumes(tmp_path):
    out = tmp_path / "vol"
    args = ["--spatial-dims", "3", "--img-size", "16", "--synthetic-samples", "4", "--channels", "16", "32"]
    assert (
        main(["train", *args, "--epochs", "1", "--batch-size", "2", "--device", "cpu", "--out", str(out)])
        == 0
    )
    assert read_metadata(out / "best.safetensors")["model"] == "tinyunet3d"
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 1
    assert (out / "overlays.png").is_file()


def test_other_zoo_models_are_built_for_volumes_too(tmp_path, capsys):
    """--model cmunext on volumes failed after the data were read ("expects a 4-D input")."""
    out = tmp_path / "cmunext3d"
    args = ["--model", "cmunext", "--spatial-dims", "3", "--img-size", "16", "--synthetic-samples", "4"]
    assert main(["train", *args, "--epochs", "1", "--device", "cpu", "--no-plots", "--out", str(out)]) == 0
    assert main(["evaluate", str(out / "best.safetensors"), "--device", "cpu"]) == 0  # rebuilt in 3D
    capsys.readouterr()
    refused = (r"'tinyunet3d' is built for spatial_dims=3 and cannot take 2D data \(spatial_dims=2\); "
               r"use tinyunet, which builds tinyunet3d for volumes")
    with pytest.raises(ValueError, match=refused):
        build_model("tinyunet3d", 3, 2, spatial_dims=2)
    # the command refuses it before reading any data (here: a missing data folder)
    argv = ["train", "--model", "tinyunet3d", "--data", "isic2018", "--root", str(tmp_path / "none")]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert "'tinyunet3d' is built for spatial_dims=3" in _one_error_line(capsys)


def test_train_a_cmrf_swapped_segnet_and_evaluate_it(tmp_path, capsys):
    out = tmp_path / "segnet"
    argv = ["--model", "segnet", "--replace-blocks", "--N", "4", "--synthetic-samples", "8", "--epochs", "1"]
    assert main(["train", "--img-size", "32", "--device", "cpu", *argv, "--no-plots", "--out", str(out)]) == 0
    assert "encoders.0" in capsys.readouterr().out  # replace_blocks' report
    meta = read_metadata(out / "best.safetensors")
    assert meta["model"] == "segnet" and meta["replace_blocks"] == 4
    # evaluate rebuilds the swapped network from the metadata before loading its weights
    assert main(["evaluate", str(out / "best.safetensors"), "--device", "cpu"]) == 0


def test_replace_blocks_on_a_cmrf_model_is_refused(tmp_path, capsys):
    """TinyU-Net is made of CMRF blocks: --replace-blocks would swap nothing and its --N would not
    reach the model (it trained with N=8 while the metadata said 2)."""
    argv = ["train", *TINY, "--replace-blocks", "--N", "2", "--epochs", "1", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "--replace-blocks: model 'tinyunet' is built from CMRF blocks already" in capsys.readouterr().err
    # also with widths the model's default N=8 does not allow (that error named an N not given)
    assert main([*argv, "--channels", "8", "16"]) == 2
    assert "--replace-blocks: model 'tinyunet' is built from CMRF blocks already" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_seeded_cpu_runs_are_reproducible(tmp_path):
    from safetensors.torch import load_file

    common = [*TINY, "--synthetic-samples", "8", "--epochs", "1", "--no-plots", "--seed", "3"]
    for name in ("a", "b"):
        assert main(["train", *common, "--out", str(tmp_path / name)]) == 0
    a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    main(["train", *common, "--seed", "4", "--out", str(tmp_path / "c")])
    c = load_file(str(tmp_path / "c" / "last.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "folder", "--epochs", "1"], "--root"),
        (["train", "--epochs", "0"], "epochs must be an integer >= 1"),
        (["train", "--aug-stop", "9", "--epochs", "2"], "aug_stop"),
        (["train", "--dice-weight", "nan"], "dice_weight must be a finite number, got nan"),
        (["train", "--lr", "inf"], "lr must be a finite number, got inf"),
        (["train", "--weight-decay", "nan"], "weight_decay must be a finite number, got nan"),
        (["train", "--device", "tpu"], "device"),
        (["train", "--model", "segnet", "--channels", "8", "--img-size", "32"], "does not take --channels"),
        (["train", "--model", "nonet", "--img-size", "32"], "unknown model 'nonet'"),
        (["evaluate", "missing.safetensors"], "missing.safetensors"),
        (["predict", "missing.safetensors", "x.png", "--out", "o"], "missing.safetensors"),
    ],
)
def test_bad_input_is_one_clean_error_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_resume_refuses_a_different_length(run_dir, capsys):
    assert main(["train", *TINY, "--epochs", "3", "--lr", "3e-3", "--resume", "--out", str(run_dir)]) == 2
    assert "--epochs 2 (given 3)" in _one_error_line(capsys)


def test_demo_names_only_the_figures_it_wrote(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", *TINY, "--epochs", "1", "--overlays", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"open {out}/training_curve.png" in printed and "overlays.png" not in printed
    assert (out / "training_curve.png").is_file() and not (out / "overlays.png").exists()


def test_resume_with_another_thread_count_says_it_is_not_bit_for_bit(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--epochs", "1", "--lr", "3e-3", "--no-plots", "--out", str(out)]
    assert main([*argv, "--threads", "1"]) == 0
    held = f"{out} holds best.safetensors, last.safetensors, last_state.pt, metrics.json ("
    printed = capsys.readouterr().out
    assert held in printed  # --no-plots: no figures claimed
    assert re.search(r"\(\d+\.\d min, 1 CPU thread\)", printed)  # the count that set the rounding
    assert main([*argv, "--threads", "2", "--resume"]) == 0
    assert ("note: the run trained with 1 CPU thread(s), this process has 2: it continues correctly, but "
            "its float rounding differs") in capsys.readouterr().out
    assert main([*argv, "--threads", "1", "--resume"]) == 0
    assert "note:" not in capsys.readouterr().out
    # a run from a bigger machine: no advice this one's --threads would refuse
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # at most 4 threads here
    state = torch.load(out / STATE_FILE, weights_only=True)
    torch.save({**state, "cpu_threads": 32}, out / STATE_FILE)
    assert main([*argv, "--threads", "1", "--resume"]) == 0
    assert "only a machine that allows --threads 32 would keep it bit for bit" in capsys.readouterr().out


def test_resume_never_writes_over_weights_that_have_no_state(tmp_path, capsys):
    """Weights of epoch 1 without last_state.pt were taken for what a kill under 0.1.0's save order
    left, and --resume started a new run over them: also over the best.safetensors a user kept of a
    finished run (best at epoch 1), for a model of other widths, without a word."""
    out = tmp_path / "run"
    argv = ["train", *TINY, "--epochs", "1", "--lr", "3e-3", "--no-plots", "--out", str(out)]
    assert main(argv) == 0
    for name in ("last_state.pt", "metrics.json", "last.safetensors"):  # the user kept best only
        (out / name).unlink()
    kept = (out / "best.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    assert "holds a run's files (best.safetensors) but no last_state.pt" in _one_error_line(capsys)
    assert (out / "best.safetensors").read_bytes() == kept


def test_a_stop_between_state_and_weights_is_caught_up_by_resume(run_dir, tmp_path, capsys, monkeypatch):
    """The state is written first: a run stopped before it wrote the last epoch's weights files
    resumes with them written from the state, equal to an uninterrupted run's."""
    import cmrf.checkpoint

    real_save = cmrf.checkpoint.save_weights

    def full_disk_in_epoch_2(model, path, metadata=None):
        if metadata and metadata.get("epoch") == "2":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(model, path, metadata=metadata)

    out = tmp_path / "run"
    argv = ["train", *TINY, "--epochs", "2", "--lr", "3e-3", "--no-plots", "--out", str(out)]
    monkeypatch.setattr(cmrf.checkpoint, "save_weights", full_disk_in_epoch_2)
    assert main(argv) == 2
    assert "No space left on device" in _one_error_line(capsys)
    assert load_training_state(out / STATE_FILE)["epoch"] == 2
    assert read_metadata(out / "last.safetensors")["epoch"] == 1  # one epoch behind the state
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    shown = capsys.readouterr().out
    assert "last.safetensors" in shown.split("note: wrote ")[1].split("\n")[0], shown
    for name in ("best.safetensors", "last.safetensors"):
        ours, uninterrupted = read_state_dict(out / name), read_state_dict(run_dir / name)
        assert all(torch.equal(ours[k], uninterrupted[k]) for k in uninterrupted), name
        assert read_metadata(out / name)["epoch"] == read_metadata(run_dir / name)["epoch"], name
    assert main([*argv, "--resume"]) == 0  # caught up: nothing more to write
    assert "note: wrote" not in capsys.readouterr().out


def test_a_best_file_of_another_epoch_is_named_on_resume(run_dir, tmp_path, capsys):
    """cmrf 0.1.0 wrote best before the state: a stop between them could leave a killed epoch's
    weights as best, which the state cannot restore; --resume says so instead of keeping quiet."""
    from safetensors.torch import save_file

    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == 1  # this test's premise
    meta = safetensors_metadata(out / "best.safetensors") | {"epoch": "2"}
    save_file(read_state_dict(out / "best.safetensors"), str(out / "best.safetensors"), metadata=meta)
    argv = ["train", *TINY, "--epochs", "2", "--lr", "3e-3", "--no-plots", "--resume", "--out", str(out)]
    assert main(argv) == 0
    assert ("warning: best.safetensors holds the weights of epoch 2, but the run's best is epoch 1"
            in capsys.readouterr().out)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_lost_best_file_of_an_earlier_epoch_is_named_not_left_to_resume(run_dir, tmp_path, capsys, damage):
    """The state holds the last epoch's weights only: "--resume to finish the run" led in a circle."""
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == 1  # this test's premise
    best = out / "best.safetensors"
    if damage == "missing":
        best.unlink()
    else:
        best.write_bytes(best.read_bytes()[:100])
    argv = ["train", *TINY, "--epochs", "2", "--lr", "3e-3", "--no-plots", "--resume", "--out", str(out)]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert f"the best checkpoint {best} (epoch 1) cannot be read" in err
    assert f"its weights are nowhere else: {out / 'last_state.pt'} holds epoch 2's" in err
    assert f"cmrf evaluate {out / 'last.safetensors'}" in err and "--resume" not in err


def _folder_dataset(root, count: int) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for i in range(count):
        Image.new("RGB", (32, 32), (20 * i % 256, 90, 160)).save(root / "images" / f"s{i:02d}.png")
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (0, 0, 16, 8 + i))
        mask.save(root / "masks" / f"s{i:02d}.png")


def test_a_run_folder_that_is_the_datas_image_or_mask_folder_is_refused(tmp_path, capsys):
    """The run's figures written into images/ became samples without masks: the run could then not
    be resumed or evaluated, nor the data trained on, until they were deleted by hand."""
    from cmrf.data.factory import data_file_folders

    root = tmp_path / "data"
    _folder_dataset(root, 6)
    before = sorted(p.name for p in (root / "images").iterdir())
    for folder in ("images", "masks"):
        argv = ["train", "--data", "folder", "--root", str(root), "--img-size", "32", "--channels", "16",
                "32", "--device", "cpu", "--out", str(root / folder / ".")]
        assert main(argv) == 2
        assert f"is the data's folder {root / folder}: the run's files would be written among the samples" \
            in _one_error_line(capsys)
    assert sorted(p.name for p in (root / "images").iterdir()) == before
    isic = data_file_folders("isic2018", tmp_path)
    assert tmp_path / "ISIC2018_Task1-2_Training_Input" in isic and len(isic) == 6
    assert data_file_folders("synthetic", None) == []


def test_files_added_to_a_fraction_split_stop_resume_and_evaluate(tmp_path, capsys):
    """The fraction split is recomputed from the files found: added files move samples between
    splits, so a resume (or an evaluation) would train on (or score) the test images."""
    root, out = tmp_path / "data", tmp_path / "run"
    _folder_dataset(root, 10)
    data = ["--data", "folder", "--root", str(root), "--img-size", "32", "--channels", "16", "32"]
    argv = ["train", *data, "--device", "cpu", "--epochs", "1", "--no-plots", "--out", str(out)]
    assert main(argv) == 0
    assert read_metadata(out / "best.safetensors")["data"]["split_files"].startswith("train 6, val 2, test 2")
    evaluate = ["evaluate", str(out / "best.safetensors"), "--device", "cpu"]
    assert main(evaluate) == 0
    assert main([*evaluate, "--seed", "5"]) == 2
    assert "(--seed 5, the run's was 0)" in _one_error_line(capsys)
    # Other fractions re-split the same files: the test split would hold training images.
    assert main([*evaluate, "--test-fraction", "0.5", "--val-fraction", "0.1"]) == 2
    resplit = "(--val-fraction 0.1, the run's was 0.2; --test-fraction 0.5, the run's was 0.2)"
    assert resplit in _one_error_line(capsys)
    _folder_dataset(root, 12)  # two more pairs
    assert main([*argv, "--epochs", "2", "--resume"]) == 2
    error = _one_error_line(capsys)
    assert "the splits' files train 6, val 2, test 2 (sha1" in error
    assert "(given train 8, val 2, test 2" in error
    assert main(evaluate) == 2
    assert "the data's splits differ from those" in _one_error_line(capsys)


def test_a_run_resumes_on_its_data_moved_to_another_root(tmp_path, capsys):
    """The dataset moved (another disk, another machine): the same files in the same splits are
    the same data, so --resume takes the new --root; other files there are still refused."""
    import shutil

    root, out = tmp_path / "data", tmp_path / "run"
    _folder_dataset(root, 10)
    common = ["--data", "folder", "--img-size", "32", "--channels", "16", "32", "--device", "cpu",
              "--no-plots", "--out", str(out)]
    assert main(["train", *common, "--root", str(root), "--epochs", "1"]) == 0
    moved = tmp_path / "moved"
    shutil.move(root, moved)
    capsys.readouterr()
    assert main(["train", *common, "--root", str(moved), "--epochs", "1", "--resume"]) == 0
    assert f"the data moved to {moved}" in capsys.readouterr().out
    # The weights files still name the old root: evaluate says where to point, then scores the move.
    assert main(["evaluate", str(out / "best.safetensors")]) == 2
    assert _one_error_line(capsys).endswith(
        f"was trained on data at {root}, which is not there now: give --root with where the data is "
        f"(a moved copy of the run's data keeps the run's splits)")
    assert main(["evaluate", str(out / "best.safetensors"), "--root", str(moved)]) == 0
    assert "test split (2 images)" in capsys.readouterr().out
    _folder_dataset(moved, 12)  # two more pairs: other splits, refused wherever the data is
    assert main(["train", *common, "--root", str(moved), "--epochs", "1", "--resume"]) == 2
    error = _one_error_line(capsys)
    assert "the splits' files train 6, val 2, test 2 (sha1" in error
    assert f"--root {root} (given {moved})" in error  # other files: the new --root is no move either


def test_other_data_with_the_runs_file_names_at_another_root_is_not_taken_for_a_move(tmp_path, capsys):
    """Another site that names its files as the run's (s00.png ...) is other data: a resume on it
    is refused, while a mask corrected in place at the run's own root is not a move."""
    root, other, out = tmp_path / "data", tmp_path / "other", tmp_path / "run"
    _folder_dataset(root, 10)
    _folder_dataset(other, 10)
    rng = np.random.default_rng(0)
    for image in sorted((other / "images").iterdir()):  # other pixels: other file sizes
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    common = ["--data", "folder", "--img-size", "32", "--channels", "16", "32", "--device", "cpu",
              "--no-plots", "--out", str(out)]
    assert main(["train", *common, "--root", str(root), "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["train", *common, "--root", str(other), "--epochs", "1", "--resume"]) == 2
    why = "its files have the run's names but other sizes"
    assert f"--root {root} (given {other}: {why}" in _one_error_line(capsys)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 30, 30))
    mask.save(root / "masks" / "s03.png")
    assert main(["train", *common, "--root", str(root), "--epochs", "1", "--resume"]) == 0


def test_a_damaged_test_image_stops_the_run_before_training(tmp_path, capsys):
    """The check at start reads image headers only; a truncated test-split JPEG used to be found at
    the final evaluation, after all the training time. Now it stops the run before epoch 1."""
    from cmrf.data import build_datasets

    root, out = tmp_path / "data", tmp_path / "run"
    _folder_dataset(root, 10)
    test_split = build_datasets(seed=0, data="folder", root=root, img_size=32, cache="none").test
    test_image = test_split.pairs[0].image
    test_image.unlink()
    damaged = test_image.with_suffix(".jpg")
    noise = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.numpy()).save(damaged, quality=95)
    damaged.write_bytes(damaged.read_bytes()[:-400])  # the header stays readable, the pixels end early
    data = ["--data", "folder", "--root", str(root), "--img-size", "32", "--channels", "16", "32"]
    argv = ["train", *data, "--device", "cpu", "--epochs", "1", "--no-plots", "--out", str(out)]
    for cache in ("memory", "none"):
        assert main([*argv, "--cache", cache]) == 2
        out_text, err = capsys.readouterr()
        assert f"cannot read image file {damaged}" in err and "truncated" in err.lower(), err
        assert "epoch 1/1" not in out_text and not (out / STATE_FILE).exists()


def test_recipe_defaults_are_the_papers_and_threads_choice():
    from cmrf.train.processes import autocast_dtype, resolve_device
    from cmrf.train.recipe import Recipe
    from cmrf.train.setup import choose_threads

    recipe = Recipe()
    assert (recipe.lr, recipe.min_lr, recipe.betas, recipe.epochs) == (1e-4, 1e-6, (0.9, 0.999), 300)
    assert (recipe.workers, recipe.compile, recipe.compile_backend) == ("auto", False, None)
    assert Recipe(compile=True).compile_backend == "inductor"
    assert recipe.augment_epochs == 180 and Recipe(epochs=10).augment_epochs == 6
    assert Recipe(epochs=10, aug_stop=0).augment_epochs == 0
    assert autocast_dtype("auto", torch.device("cpu")) is None  # the CPU trains in float32
    assert choose_threads(3) == 3 and choose_threads(0) == torch.get_num_threads()
    assert 1 <= choose_threads(-1) <= torch.get_num_threads()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_a_cuda_device_past_the_machines_count_is_named(monkeypatch):
    """torch accepts torch.device("cuda:7") on a machine with two GPUs and fails at the first copy."""
    from cmrf.train.processes import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device cuda:7 requested but this machine has 2 CUDA devices "
                                         r"\(cuda:0 to cuda:1;"):
        resolve_device("cuda:7")
    with pytest.raises(ValueError, match=r"device 'cuda' \(process 2: cuda:2\) requested .* 2 CUDA devices"):
        resolve_device("cuda", local_rank=2)
    with pytest.raises(ValueError, match=r"device 'auto' \(process 2: cuda:2\) requested"):
        resolve_device("auto", local_rank=2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"has 1 CUDA device \(cuda:0;"):
        resolve_device("cuda:1")


def test_torchrun_processes_get_one_gpu_each_or_a_message(monkeypatch):
    """Under torchrun, --device cuda:0 put every process on cuda:0 (NCCL: "Duplicate GPU detected",
    reported as an internal error), and a LOCAL_RANK past the GPUs gave CUDA's "invalid device
    ordinal" before the message resolve_device has for it."""
    from cmrf.train import processes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(processes.dist, "init_process_group", lambda backend: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"--device cuda:0 puts all 2 processes on one GPU; give --device"):
        processes.init_processes("cuda:0")
    with pytest.raises(ValueError, match=r"device 'cuda' \(process 1: cuda:1\) requested but this machine "
                                         r"has 1 CUDA device"):
        processes.init_processes("cuda")
    assert chosen == []
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    processes.init_processes("auto")
    assert chosen == [torch.device("cuda", 0)]


def test_amp_auto_takes_bf16_only_where_the_gpu_computes_it_natively(monkeypatch):
    from contextlib import nullcontext

    from cmrf.train.processes import autocast_dtype

    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation  # an old GPU: bf16 emulated only

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    cuda = torch.device("cuda", 0)
    assert autocast_dtype("auto", cuda) == torch.float16 and asked == [False]
    assert autocast_dtype("bf16", cuda) == torch.bfloat16  # asked for explicitly: given


def test_resume_restores_the_gpus_this_machine_has(monkeypatch):
    """A state saved with more GPUs visible (a DDP node) resumes on a machine with fewer."""
    from cmrf.train.state import get_rng_state, set_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    state = get_rng_state()
    state["cuda"] = [torch.zeros(8, dtype=torch.uint8), torch.ones(8, dtype=torch.uint8)]
    set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], state["cuda"][0])


def test_workers_auto_is_zero_on_the_cpu_and_one_per_free_core_on_cuda(monkeypatch):
    from types import SimpleNamespace

    from cmrf.train import loaders
    from cmrf.train.loaders import choose_workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_workers("auto", cpu) == 0 and choose_workers(3, cpu) == 3 and choose_workers(2, cuda) == 2
    monkeypatch.setattr(loaders, "_usable_cores", lambda: 16)
    assert choose_workers("auto", cuda) == loaders.MAX_AUTO_WORKERS == 8
    assert choose_workers("auto", cuda, processes_per_machine=4) == 3  # 4 cores each, one trains
    monkeypatch.setattr(loaders, "_usable_cores", lambda: 1)
    assert choose_workers("auto", cuda) == 0
    monkeypatch.setattr(loaders, "_usable_cores", lambda: 16)
    monkeypatch.setattr(loaders.multiprocessing, "current_process", lambda: SimpleNamespace(daemon=True))
    assert choose_workers("auto", cuda) == 0  # a daemonic process cannot start workers
    with pytest.raises(SystemExit):
        main(["train", "--workers", "-1"])


def test_a_seed_out_of_range_is_a_usage_error_naming_the_flag(capsys):
    """torch.manual_seed takes seeds below 2**64 and each process is seeded with seed + rank: a
    larger one failed after the data was read with "Overflow when unpacking long long"."""
    for bad in (str(2**64), str(2**63), "-1", "seven"):
        with pytest.raises(SystemExit):
            main(["train", "--seed", bad])
        assert "argument --seed: expected an integer from 0 to 2**63 - 1" in capsys.readouterr().err
    from cmrf.cli.common import seed_value

    assert seed_value(str(2**63 - 1)) == 2**63 - 1 and seed_value("0") == 0


def test_an_unknown_compile_backend_is_a_usage_error_before_the_data(tmp_path, capsys):
    from cmrf.train.recipe import Recipe

    with pytest.raises(ValueError, match=r"backend 'nosuch' is not one torch.compile knows; .*aot_eager"):
        Recipe(compile="nosuch")
    assert Recipe(compile="aot_eager").compile_backend == "aot_eager"
    argv = ["train", "--data", "folder", "--root", str(tmp_path / "none"), "--compile", "nosuch",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 2  # the missing data folder would be the error if the data came first
    assert "compile backend 'nosuch'" in _one_error_line(capsys)


def test_demo_speaks_once_under_torchrun(tmp_path, capsys, monkeypatch):
    """Every rank runs the command; only rank 0 prints the demo's own lines."""
    out = tmp_path / "demo"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    import argparse

    import cmrf.cli.train as cli_train

    monkeypatch.setattr(cli_train, "_replaces_earlier_demo", lambda out: True)
    run_demo = cli_train._demo(lambda args: _write_metrics(args.out))
    args = argparse.Namespace(resume=False, overwrite=False, out=str(out), plots=False, overlays=0)
    assert run_demo(args) == 0
    assert capsys.readouterr().out == "" and args.overwrite


def _write_metrics(out) -> int:
    import pathlib

    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    per_class = {"background": {"iou": 0.9}, "lesion": {"iou": 0.8}}
    (pathlib.Path(out) / "metrics.json").write_text(json.dumps({"per_class": per_class}))
    return 0


def test_a_figure_that_fails_to_draw_does_not_stop_the_run(tmp_path, monkeypatch, capsys):
    """The curve and overlays are extras: a broken matplotlib must not cost the trained run."""
    import cmrf.train.plots

    def broken(*args, **kwargs):
        raise RuntimeError("Failed to find font DejaVu Sans")

    monkeypatch.setattr(cmrf.train.plots, "plot_history", broken)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    curve = out / "training_curve.png"
    assert f"warning: could not draw {curve} (RuntimeError: Failed to find font" in printed
    assert (out / "metrics.json").is_file() and (out / "overlays.png").is_file()


def test_overlays_that_fail_to_draw_do_not_stop_the_run(tmp_path, monkeypatch, capsys):
    import cmrf.train.plots

    def broken(*args, **kwargs):
        raise ValueError("Image size of 100000x400 pixels is too large")

    monkeypatch.setattr(cmrf.train.plots, "plot_overlays", broken)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    overlays = out / "overlays.png"
    assert f"warning: could not draw {overlays} (ValueError: Image size of" in capsys.readouterr().out
    assert not overlays.exists()
    for name in ("metrics.json", "training_curve.png", "best.safetensors", "last.safetensors", STATE_FILE):
        assert (out / name).is_file(), name


def test_a_run_without_matplotlib_trains_and_says_so(tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    def without_matplotlib(name, *args):
        return None if name == "matplotlib" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_matplotlib)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    assert "warning: matplotlib is not installed, so this run draws no plots" in capsys.readouterr().out
    assert (out / "metrics.json").is_file() and not (out / "training_curve.png").exists()


def test_the_training_state_file_serves_as_a_checkpoint(tmp_path, capsys):
    """last_state.pt holds the run's metadata and the last epoch's weights: evaluate reads it as
    it reads last.safetensors, rather than calling it a bare state dict without metadata."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--no-plots", "--out", str(out)]) == 0
    scores = {}
    for name in ("last_state.pt", "last.safetensors"):
        json_out = tmp_path / f"{name}.json"
        argv = ["evaluate", str(out / name), "--device", "cpu", "--no-optimize", "--json", str(json_out)]
        assert main(argv) == 0, capsys.readouterr().err
        scores[name] = {k: v for k, v in json.loads(json_out.read_text()).items()
                        if k not in ("checkpoint", "checkpoint_path")}
    assert scores["last_state.pt"] == scores["last.safetensors"]


def test_a_run_that_fails_before_writing_anything_leaves_no_folder(tmp_path):
    """A corrupt image found in epoch 1 left an empty --out folder behind; one that was there
    before, or holds a file, stays."""
    from cmrf.train.run_folder import run_folder_lock

    fresh, existing, written = tmp_path / "fresh" / "run", tmp_path / "existing", tmp_path / "written"
    existing.mkdir()
    for out in (fresh, existing, written):
        with pytest.raises(RuntimeError), run_folder_lock(out):
            if out is written:
                (out / "log.txt").write_text("epoch 1\n")
            raise RuntimeError("a corrupt image")
    assert not fresh.exists() and fresh.parent.is_dir()  # only the run's own folder goes
    assert existing.is_dir() and (written / "log.txt").is_file()


def test_init_starts_a_run_from_earlier_weights_and_resume_compares_it(tmp_path, capsys):
    """cmrf train had no way to start from earlier weights (fine-tuning); --init loads them, the
    classifier of another class count afresh, and the run records the file for --resume."""
    from safetensors import safe_open

    import cmrf

    source = cmrf.create_model("tinyunet", channels=(16, 32), N=8, num_classes=4)
    init = tmp_path / "four.safetensors"
    cmrf.save_weights(source, init)
    out = tmp_path / "run"
    argv = ["train", *TINY, "--epochs", "1", "--no-plots", "--out", str(out), "--init", str(init)]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"starting from {init}: the classifier head starts afresh" in printed
    with safe_open(out / "best.safetensors", "pt") as file:
        meta = json.loads(file.metadata()["init"])
    assert meta["file"] == str(init.resolve()) and len(meta["sha256"]) == 64
    assert main(argv[:-2] + ["--resume"]) == 2
    assert f"--init a file of sha256 {meta['sha256'][:12]} (given none)" in capsys.readouterr().err
    moved = tmp_path / "moved.safetensors"  # the same weights elsewhere: compared by content
    init.rename(moved)
    assert main([*argv[:-1], str(moved), "--resume"]) == 0
    assert "starting from" not in capsys.readouterr().out  # the state holds the weights since
    wrong = tmp_path / "other.safetensors"
    cmrf.save_weights(cmrf.create_model("tinyunet", channels=(16, 64), N=8), wrong)
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "x"), "--init", str(wrong)]) == 2
    err = capsys.readouterr().err
    # It listed some 40 tensors in 3,000 characters and named a Python call: the options say it.
    assert "shape mismatches" in err and err.rstrip().endswith("cmrf train --channels 16 64 --N 8"), err
    assert len(err) < 1000 and "(86 more)" in err, err
    bare = tmp_path / "other.pth"  # no metadata: the widths come from the shapes
    torch.save(cmrf.create_model("tinyunet", channels=(16, 64), N=4).state_dict(), bare)
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "x"), "--init", str(bare)]) == 2
    assert capsys.readouterr().err.rstrip().endswith("cmrf train --channels 16 64 --N 4")
    # Weights of a 3D model for a 2D run: a list of every convolution's shape did not say so.
    volume = tmp_path / "volume.safetensors"
    cmrf.save_weights(cmrf.create_model("tinyunet3d", channels=(16, 32), N=8), volume)
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "y"), "--init", str(volume)]) == 2
    err = capsys.readouterr().err
    assert f"{volume} holds weights of a 3D model (" in err and "the model to start is 2D" in err
    assert "give weights of a 2D model" in err and "mismatches" not in err


def test_a_dangling_link_named_like_a_run_file_is_refused(tmp_path, capsys):
    """A link in a fresh --out named best.safetensors, to a missing file, was written through: the
    run created the weights wherever the link pointed."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").symlink_to(tmp_path / "elsewhere" / "planted.json")
    assert main(["train", *TINY, "--epochs", "1", "--no-plots", "--out", str(out)]) == 2
    assert "metrics.json -> " in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()


def test_a_device_is_checked_with_the_recipe_before_any_data_is_read(monkeypatch, capsys, tmp_path):
    """A typo or --device cuda without CUDA was named after every image was built and decoded
    (30 s on 400 synthetic images, minutes on ISIC); Recipe(device=None) reached torch's
    multi-line TypeError inside fit."""
    import cmrf.data
    from cmrf.train.recipe import Recipe

    assert Recipe(device=torch.device("cpu")).device == "cpu"  # taken by its name
    for bad, message in ((None, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got None"),
                         ("cdua", "unknown device 'cdua'"), ("mps", "unsupported device 'mps'")):
        with pytest.raises(ValueError, match=re.escape(message)):
            Recipe(device=bad)

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr(cmrf.data, "build_datasets", no_data)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert main(["train", "--device", "cuda", "--out", str(out), "--no-plots"]) == 2
    assert "device 'cuda' requested but CUDA is not available" in capsys.readouterr().err
    assert not out.exists()


def test_a_last_training_batch_of_one_image_is_left_out():
    """--batch-size 8 on 17 images made a last step of 1 image: BatchNorm statistics of a single
    image, and for CMUNeXt at 16 px a failure after a whole epoch that asked for a batch of 2."""
    from torch.utils.data import TensorDataset

    from cmrf.train.loaders import train_loader
    from cmrf.train.processes import Processes

    def batch_sizes(samples, batch_size, rank=0, world_size=1):
        processes = Processes(rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size)
        loader, sampler = train_loader(TensorDataset(torch.arange(samples)), batch_size, 0, processes, seed=0)
        sampler.set_epoch(0, False)
        return [len(batch[0]) for batch in loader]

    assert batch_sizes(17, 8) == [8, 8]
    assert batch_sizes(18, 8) == [8, 8, 2]  # a batch of two stays
    assert batch_sizes(17, 8, rank=1, world_size=2) == [8]  # 9 per shard
    assert batch_sizes(1, 8) == [1] and batch_sizes(5, 1) == [1] * 5  # nothing else to train on


def test_each_processes_loader_workers_get_their_own_seeds():
    """The workers' base seed came from the run's seed alone, so worker k of every torchrun rank
    drew the same augmentation from `random` in a user's dataset."""
    import random as python_random

    from torch.utils.data import Dataset

    from cmrf.train.loaders import train_loader
    from cmrf.train.processes import Processes

    class DrawsFromRandom(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.tensor(python_random.randint(0, 10**9))

    draws = []
    for rank in (0, 1):
        processes = Processes(rank=rank, world_size=2, local_rank=rank, local_world_size=2)
        loader, sampler = train_loader(DrawsFromRandom(), 2, 1, processes, seed=0)
        sampler.set_epoch(0, False)
        draws.append(torch.cat(list(loader)).tolist())
    assert draws[0] != draws[1]
