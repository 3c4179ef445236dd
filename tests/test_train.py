"""`cmrf train / evaluate / predict / demo` end to end on tiny synthetic data (in-process)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from cmrf.cli import main
from cmrf.train.state import STATE_FILE, load_training_state, read_metadata

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
    assert set(metrics) >= {"mean_iou", "mean_dice", "per_class", "history"}
    assert list(metrics["per_class"]) == ["background", "lesion"]
    for scores in metrics["per_class"].values():
        assert set(scores) == {"iou", "dice"} and 0 <= scores["iou"] <= scores["dice"] <= 1
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
    assert not list(run_dir.glob("*.tmp"))


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


def test_demo_runs_with_its_settings_overridden(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY, "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "demo done" in printed and "foreground IoU" in printed and "background" in printed
    assert (out / "metrics.json").is_file() and (out / "best.safetensors").is_file()


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


def test_train_a_cmrf_swapped_segnet_and_evaluate_it(tmp_path, capsys):
    out = tmp_path / "segnet"
    argv = ["--model", "segnet", "--replace-blocks", "--N", "4", "--synthetic-samples", "8", "--epochs", "1"]
    assert main(["train", "--img-size", "32", "--device", "cpu", *argv, "--no-plots", "--out", str(out)]) == 0
    assert "encoders.0" in capsys.readouterr().out  # replace_blocks' report
    meta = read_metadata(out / "best.safetensors")
    assert meta["model"] == "segnet" and meta["replace_blocks"] == 4
    # evaluate rebuilds the swapped network from the metadata before loading its weights
    assert main(["evaluate", str(out / "best.safetensors"), "--device", "cpu"]) == 0


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


def test_resume_refuses_a_different_length(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(["train", *TINY, "--epochs", "3", "--resume", "--out", str(copy)]) == 2
    assert "--epochs 2" in capsys.readouterr().err


def test_recipe_defaults_are_the_papers_and_threads_choice():
    from cmrf.train.loop import Recipe, autocast_dtype, resolve_device
    from cmrf.train.setup import choose_threads

    recipe = Recipe()
    assert (recipe.lr, recipe.min_lr, recipe.betas, recipe.epochs) == (1e-4, 1e-6, (0.9, 0.999), 300)
    assert recipe.augment_epochs == 180 and Recipe(epochs=10).augment_epochs == 6
    assert Recipe(epochs=10, aug_stop=0).augment_epochs == 0
    assert autocast_dtype("auto", torch.device("cpu")) is None  # the CPU trains in float32
    assert choose_threads(3) == 3 and choose_threads(0) == torch.get_num_threads()
    assert 1 <= choose_threads(-1) <= torch.get_num_threads()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
