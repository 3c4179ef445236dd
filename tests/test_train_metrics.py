"""Losses, metrics (against hand-computed confusion matrices), the training state, atomic run files
and the run-folder rule."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmrf.train.losses import CEDiceLoss
from cmrf.train.metrics import SegmentationMetrics, default_class_names, format_table
from cmrf.train.plots import plot_history
from cmrf.train.recipe import Recipe
from cmrf.train.run_folder import RunFiles, RunFolderError, check_run_folder
from cmrf.train.state import (
    STATE_FILE,
    Progress,
    TrainingParts,
    capture_state,
    get_rng_state,
    load_training_state,
    model_metadata,
    read_metadata,
    restore_state,
    resume_differences,
    save_training_state,
)
from tests.conftest import temporary_files

# 3 classes, 6 pixels. Confusion (rows = truth, columns = prediction):
#   truth 0: pred 0 x2, pred 1 x1      class 0: TP 2 FP 0 FN 1 -> IoU 2/3, Dice 4/5
#   truth 1: pred 1 x1, pred 2 x1      class 1: TP 1 FP 1 FN 1 -> IoU 1/3, Dice 1/2
#   truth 2: pred 2 x1                 class 2: TP 1 FP 1 FN 0 -> IoU 1/2, Dice 2/3
PRED = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
TRUTH = torch.tensor([[[0, 1, 0], [2, 1, 0]]])
IOU = [2 / 3, 1 / 3, 1 / 2]
DICE = [4 / 5, 1 / 2, 2 / 3]


def test_metrics_match_hand_computed_confusion_matrix():
    metrics = SegmentationMetrics(3, ["bg", "a", "b"])
    metrics.update(PRED, TRUTH)
    scores = metrics.compute()
    assert [scores["per_class"][n]["iou"] for n in ("bg", "a", "b")] == pytest.approx(IOU)
    assert [scores["per_class"][n]["dice"] for n in ("bg", "a", "b")] == pytest.approx(DICE)
    assert scores["mean_iou"] == pytest.approx(sum(IOU) / 3)
    assert scores["mean_dice"] == pytest.approx(sum(DICE) / 3)


def test_metrics_accept_logits_and_accumulate_over_the_dataset_not_per_image():
    # Image 1: 1 foreground pixel predicted exactly. Image 2: 3 truth pixels, 1 found.
    truth = torch.tensor([[[1, 0, 0, 0]], [[1, 1, 1, 0]]])
    pred = torch.tensor([[[1, 0, 0, 0]], [[1, 0, 0, 0]]])
    logits = F.one_hot(pred, 2).permute(0, 3, 1, 2).float() * 5
    metrics = SegmentationMetrics(2)
    metrics.update(logits[:1], truth[:1])  # two batches, like a DataLoader
    metrics.update(logits[1:], truth[1:])
    scores = metrics.compute()
    # Summed over the dataset: TP 2, FP 0, FN 2 -> IoU 2/4; per-image averaging would give (1 + 1/3) / 2.
    assert scores["per_class"]["foreground"]["iou"] == pytest.approx(0.5)
    assert scores["per_class"]["background"]["iou"] == pytest.approx(4 / 6)
    metrics.reset()
    metrics.update(truth, truth)
    assert metrics.compute()["mean_iou"] == pytest.approx(1.0)


def test_metrics_absent_class_scores_zero_and_bad_input_raises():
    metrics = SegmentationMetrics(3)
    metrics.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    scores = metrics.compute()
    expected = {"iou": 0.0, "dice": 0.0, "target_pixels": 0, "predicted_pixels": 0}
    assert scores["per_class"]["class 2"] == expected
    assert scores["absent"] == ["class 1", "class 2"]
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.update(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="class names"):
        SegmentationMetrics(3, ["a", "b"])
    with pytest.raises(ValueError, match="num_classes >= 2"):
        SegmentationMetrics(1)


def test_absent_classes_are_named_with_the_mean_of_the_others():
    """A class in neither ground truth nor prediction scores 0 by convention and pulls the mean down,
    unmarked in the table or the JSON."""
    metrics = SegmentationMetrics(4)
    truth, pred = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 0]]), torch.tensor([[0, 1, 1, 1], [0, 2, 0, 0]])
    metrics.update(pred, truth)
    scores = metrics.compute()
    assert scores["absent"] == ["class 3"]
    assert scores["per_class"]["class 1"]["target_pixels"] == 2
    assert scores["per_class"]["class 1"]["predicted_pixels"] == 3
    # present classes: IoU 3/5, 2/3, 1/2 -> mean 58.89; Dice 3/4, 4/5, 2/3 -> mean 73.89
    assert format_table(scores).splitlines()[-1] == (
        "(class 3: in neither ground truth nor prediction, scored 0; the mean of the other classes is "
        "IoU 58.89, Dice 73.89)")
    assert scores["mean_iou"] == pytest.approx((3 / 5 + 2 / 3 + 1 / 2) / 4)


def test_nan_logits_are_refused_not_scored_as_background():
    """A NaN checkpoint scored background 86.79, mean 43.40, exit 0: argmax picks the first NaN
    channel, class 0 when all are. Infinities are scored: argmax handles them."""
    metrics = SegmentationMetrics(2)
    logits = torch.randn(2, 2, 4, 4)
    logits[1, :, 0, 0] = float("nan")
    logits[0, 1, 2, 2] = float("inf")
    metrics.update(logits, torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"output held 2 NaN logits .*so no scores are given"):
        metrics.compute()
    metrics.reset()
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = float("inf")  # an fp16 overflow of the right class still wins its pixels
    metrics.update(logits, torch.ones(1, 2, 2, dtype=torch.long))
    assert metrics.compute()["per_class"]["foreground"]["iou"] == 1.0
    metrics.reset()  # the count goes with the rest
    metrics.update(torch.randn(2, 2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    assert metrics.compute()["absent"] == []


def test_duplicate_names_integer_logits_and_empty_batches():
    """Duplicate names dropped a row (the mean over 3 classes beside 2 rows); integer labels with an
    extra dimension were argmaxed as logits; an empty batch failed in torchmetrics' reshape."""
    with pytest.raises(ValueError, match=r"class names must differ, got 'lesion' more than once"):
        SegmentationMetrics(3, ["bg", "lesion", "lesion"])
    metrics = SegmentationMetrics(2)
    with pytest.raises(ValueError, match=r"reads as logits \(B, K, \*S\), but it is torch.int64"):
        metrics.update(torch.ones(1, 2, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    metrics.update(torch.zeros(0, 2, 3, 3), torch.zeros(0, 3, 3, dtype=torch.long))
    metrics.update(torch.zeros(0, 3, 3, dtype=torch.long), torch.zeros(0, 3, 3, dtype=torch.long))
    # Empty batches only: zeros would read as a model that finds nothing (torchmetrics only warned).
    with pytest.raises(ValueError, match="no pixel was scored"):
        metrics.compute()
    metrics.update(torch.ones(1, 3, 3, dtype=torch.long), torch.ones(1, 3, 3, dtype=torch.long))
    assert metrics.compute()["per_class"]["foreground"]["iou"] == 1.0


def test_format_table_in_percent():
    metrics = SegmentationMetrics(3, ["bg", "a", "b"])
    metrics.update(PRED, TRUTH)
    table = format_table(metrics.compute(), "test")
    assert table.splitlines()[0] == "test"
    assert "66.67" in table and "80.00" in table and "mean" in table
    assert default_class_names(2) == ["background", "foreground"]


def _soft_dice_ce(logits, target, eps=1e-5):
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
    dims = [0] + list(range(2, logits.dim()))
    dice = (2 * (probs * onehot).sum(dims) + eps) / (probs.sum(dims) + onehot.sum(dims) + eps)
    return F.cross_entropy(logits, target), 1 - dice.mean()


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (2, 4, 3, 4, 5)])
def test_loss_is_cross_entropy_plus_batch_dice(shape):
    logits = torch.randn(shape, requires_grad=True)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    ce, dice = _soft_dice_ce(logits, target)
    assert float(CEDiceLoss()(logits, target).detach()) == pytest.approx(
        float((ce + dice).detach()), rel=1e-5
    )
    assert float(CEDiceLoss(ce_weight=0.5, dice_weight=2)(logits, target).detach()) == pytest.approx(
        float((0.5 * ce + 2 * dice).detach()), rel=1e-5
    )
    CEDiceLoss()(logits, target).backward()
    assert logits.grad.abs().sum() > 0


def test_per_image_dice_averages_each_images_dice():
    """batch_dice=False: Dice per image and class, then the mean; it differs from the batch Dice
    when a class is missing from one image."""
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0][target[0] == 2] = 1  # class 2 absent from image 0
    ce, _ = _soft_dice_ce(logits, target)
    per_image = torch.stack([_soft_dice_ce(logits[i:i + 1], target[i:i + 1])[1] for i in range(2)]).mean()
    per_image_loss = float(CEDiceLoss(batch_dice=False)(logits, target))
    assert per_image_loss == pytest.approx(float(ce + per_image), rel=1e-5)
    assert per_image_loss != pytest.approx(float(CEDiceLoss()(logits, target)))


def test_overlay_colours_each_class_and_volumes_show_their_middle_slice():
    from cmrf.train.plots import _display_slice, overlay

    mask = torch.tensor([[0, 1], [2, 1]])
    blended = overlay(torch.zeros(3, 2, 2), mask)
    assert (blended[0, 0] == 0).all()  # background: the image itself
    assert (blended[0, 1] == blended[1, 1]).all() and (blended[0, 1] != blended[1, 0]).any()
    volume = torch.arange(5.0)[:, None, None].expand(5, 4, 4)  # slice d holds the value d
    assert (_display_slice(volume[None], 3) == 2).all() and (_display_slice(volume, 3) == 2).all()


def test_loss_is_small_for_confident_correct_logits_and_checks_shapes():
    target = torch.randint(0, 2, (2, 8, 8))
    good = F.one_hot(target, 2).movedim(-1, 1).float() * 20
    assert CEDiceLoss()(good, target) < 1e-3
    assert CEDiceLoss()(-good, target) > 1.0
    with pytest.raises(ValueError, match="logits"):
        CEDiceLoss()(good, target[:, None])
    with pytest.raises(ValueError, match="loss weights"):
        CEDiceLoss(ce_weight=0, dice_weight=0)


def _full_disk_halfway(real_save):
    """A ``torch.save`` that writes half of its bytes, then fails as a full disk does."""

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_state_write_failing_halfway_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / STATE_FILE
    save_training_state(path, {"format": "cmrf-train-state/1", "epoch": 1, "w": torch.ones(3)})
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _full_disk_halfway(torch.save))
    with pytest.raises(OSError) as raised:
        save_training_state(path, {"format": "cmrf-train-state/1", "epoch": 2, "w": torch.zeros(3)})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)  # names the file
    assert path.read_bytes() == before and temporary_files(tmp_path) == []
    monkeypatch.undo()
    assert load_training_state(path)["epoch"] == 1


class _TouchesWhenUnpickled:
    """An object whose unpickling creates a file: what a malicious state would run instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_state_that_would_run_code_is_refused_without_running_it(tmp_path):
    """--resume reads last_state.pt from a run folder, which may come from anywhere."""
    marker, path = tmp_path / "code_ran", tmp_path / STATE_FILE
    torch.save({"format": "cmrf-train-state/1", "epoch": 1, "x": _TouchesWhenUnpickled(marker)}, path)
    with pytest.raises(ValueError, match=f"cannot read training state {path}"):
        load_training_state(path)
    assert not marker.exists()


def test_plot_write_failing_halfway_keeps_the_previous_figure(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    history = [{"epoch": 1, "train_loss": 1.0, "val_mean_iou": 0.5, "lr": 1e-3}]
    path = plot_history(history, tmp_path / "curve.png")
    before = path.read_bytes()
    real_savefig = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        real_savefig(self, fname, *args, **kwargs)
        with open(fname, "r+b") as f:  # half of the picture made it to the disk
            f.truncate(len(before) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig)
    with pytest.raises(OSError, match="No space left") as raised:
        plot_history(history * 2, path)
    assert raised.value.filename == str(path)
    assert path.read_bytes() == before and temporary_files(tmp_path) == []


def _parts(seed: int) -> TrainingParts:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10, 1e-6)
    return TrainingParts(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))


def test_capture_and_restore_round_trip_with_weights_only(tmp_path):
    parts = _parts(0)
    parts.model(torch.randn(5, 3)).sum().backward()
    parts.optimizer.step()
    parts.scheduler.step()
    progress = Progress(epoch=1, history=[{"epoch": 1, "train_loss": 0.5}], best_score=0.25, best_epoch=1)
    meta = model_metadata("tinyunet", {}, 3, 2, ["bg", "fg"], data={"img_size": 32})
    rngs = [get_rng_state()]
    state = capture_state(parts, progress, recipe=Recipe(epochs=10), metadata=meta, rng_states=rngs)
    draws = (random.random(), np.random.rand(), torch.rand(2))
    save_training_state(tmp_path / "s.pt", state)

    fresh = _parts(1)
    # --amp may change on resume: a scaler saved disabled (empty) leaves an enabled one as it is.
    fresh.scaler = torch.amp.GradScaler("cpu", enabled=True)
    restored = restore_state(load_training_state(tmp_path / "s.pt"), fresh)  # weights_only=True inside
    assert restored == progress
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(2), draws[2])
    for a, b in zip(parts.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)  # running statistics included
    assert fresh.optimizer.state_dict()["state"][0]["step"] == 1
    assert fresh.scheduler.state_dict() == parts.scheduler.state_dict()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_training_state(tmp_path / "junk.pt")


def test_restore_refuses_weights_of_another_network_before_loading_anything():
    parts, other = _parts(0), _parts(1)
    state = capture_state(parts, Progress(), recipe=Recipe(), metadata={}, rng_states=[get_rng_state()])
    other.model.append(torch.nn.Linear(4, 2))
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(ValueError, match="another network .*2 missing"):
        restore_state(state, other)
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())


def test_resume_differences_name_the_flags_that_matter():
    data = {"img_size": 32, "seed": 0}
    meta = model_metadata("tinyunet", {"channels": [16, 32]}, 3, 2, ["bg", "fg"], None, data)
    saved = capture_state(_parts(0), Progress(), recipe=Recipe(epochs=4), metadata=meta, rng_states=[])
    # Where and how fast it runs may change; what it computes may not.
    same = Recipe(epochs=4, workers=3, device="cpu", amp="none", overlays=0, compile="eager")
    assert resume_differences(saved, recipe=same, metadata=meta) == []
    other_meta = model_metadata("segnet", {}, 3, 2, ["bg", "fg"], 4, {"img_size": 64, "seed": 0})
    found = resume_differences(saved, recipe=Recipe(epochs=5, lr=3e-3, seed=1), metadata=other_meta)
    assert found == [
        "--epochs 4 (given 5)",
        "--lr 0.0001 (given 0.003)",
        "--seed 0 (given 1)",
        "--model tinyunet (given segnet)",
        "--replace-blocks off (given N=4)",
        "--channels 16 32 (given default)",
        "--img-size 32 (given 64)",
    ]
    # --N 8 is TinyU-Net's default: naming it is the same model, and so is leaving it out.
    with_default = model_metadata("tinyunet", {"channels": [16, 32], "N": 8}, 3, 2, ["bg", "fg"], None, data)
    assert resume_differences(saved, recipe=same, metadata=with_default) == []
    with_n4 = model_metadata("tinyunet", {"channels": [16, 32], "N": 4}, 3, 2, ["bg", "fg"], None, data)
    assert resume_differences(saved, recipe=same, metadata=with_n4) == ["--N default (given 4)"]
    # --num-classes left out (the data's classes: 2) names the model's classes, on either side.
    with_data_default = model_metadata("tinyunet", {"channels": [16, 32]}, 3, 2, ["bg", "fg"], None,
                                       {**data, "num_classes": None})
    saved_default = capture_state(_parts(0), Progress(), recipe=Recipe(epochs=4), metadata=with_data_default,
                                  rng_states=[])
    four = model_metadata("tinyunet", {"channels": [16, 32]}, 3, 4, ["0", "1", "2", "3"], None,
                          {**data, "num_classes": 4})
    assert resume_differences(saved_default, recipe=same, metadata=four) == ["--num-classes 2 (given 4)"]
    two = model_metadata("tinyunet", {"channels": [16, 32]}, 3, 2, ["bg", "fg"], None,
                         {**data, "num_classes": 2})
    assert resume_differences(saved_default, recipe=same, metadata=two) == []
    # aug_stop is compared by its effect: 60% of 4 epochs is 2.
    assert resume_differences(saved, recipe=Recipe(epochs=4, aug_stop=2), metadata=meta) == []
    assert resume_differences(saved, recipe=Recipe(epochs=4, aug_stop=3), metadata=meta) == [
        "--aug-stop 2 (given 3)"
    ]


def test_a_run_saved_with_more_workers_than_this_machine_allows_resumes(monkeypatch):
    """The saved recipe is rebuilt to compare it: its --workers 16 from a larger machine must not
    stop the resume here (workers are free to change)."""
    saved = capture_state(_parts(0), Progress(), recipe=Recipe(epochs=4), metadata={}, rng_states=[])
    saved["recipe"]["workers"] = 16  # as a 16-core machine saved it
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert resume_differences(saved, recipe=Recipe(epochs=4, workers=2), metadata={}) == []


def test_another_root_or_split_dir_is_free_on_resume_only_when_the_splits_hold_the_same_files(tmp_path):
    """The splits' files are what shows the data moved: without them (a state saved before they
    were recorded) or with other files, another --root or --split-dir is other data."""
    from cmrf.train.state import moved_data_root

    splits = "train 6, val 2, test 2 (sha1 3f2a9c01b7de)"
    site, moved = tmp_path / "site", tmp_path / "moved"

    def metadata(root, split_dir, split_files=None, split_sizes=None):
        data = {"data": "folder", "root": str(root), "split_dir": str(split_dir), "img_size": 32, "seed": 0}
        if split_files is not None:
            data["split_files"] = split_files
        if split_sizes is not None:
            data["split_sizes"] = split_sizes
        return model_metadata("tinyunet", {"channels": [16, 32]}, 3, 2, ["bg", "fg"], None, data)

    def saved(meta):
        return capture_state(_parts(0), Progress(), recipe=Recipe(epochs=4), metadata=meta, rng_states=[])

    run = saved(metadata(site, site / "splits", splits))
    elsewhere = metadata(moved, moved / "splits", splits)
    assert resume_differences(run, recipe=Recipe(epochs=4), metadata=elsewhere) == []
    assert moved_data_root(run, elsewhere) == (str(site), str(moved))
    other_files = "train 8, val 2, test 2 (sha1 0123456789ab)"
    other = metadata(moved, moved / "splits", other_files)
    assert resume_differences(run, recipe=Recipe(epochs=4), metadata=other) == [
        f"--root {site} (given {moved})",
        f"--split-dir {site / 'splits'} (given {moved / 'splits'})",
        f"the splits' files {splits} (given {other_files})",
    ]
    unrecorded = saved(metadata(site, site / "splits"))  # saved before the splits' files were recorded
    assert resume_differences(unrecorded, recipe=Recipe(epochs=4), metadata=elsewhere) == [
        f"--root {site} (given {moved})",
        f"--split-dir {site / 'splits'} (given {moved / 'splits'})",
    ]
    # The same folder spelled another way did not move.
    same_site = metadata(site / "splits" / "..", site / "splits", splits)
    assert resume_differences(run, recipe=Recipe(epochs=4), metadata=same_site) == []
    assert moved_data_root(run, same_site) is None
    # Files of other sizes with the run's names: another site's data, not the run's moved; at the
    # run's own root the same change (a corrected mask) is no difference.
    sized = saved(metadata(site, site / "splits", splits, "sha1 000000000001"))
    resized = metadata(moved, moved / "splits", splits, "sha1 000000000002")
    assert resume_differences(sized, recipe=Recipe(epochs=4), metadata=resized) == [  # why it is refused
        f"--root {site} (given {moved}: its files have the run's names but other sizes, so they are not a "
        f"copy of the run's data)",
        f"--split-dir {site / 'splits'} (given {moved / 'splits'})",
    ]
    edited = metadata(site, site / "splits", splits, "sha1 000000000002")
    assert resume_differences(sized, recipe=Recipe(epochs=4), metadata=edited) == []


def test_an_out_that_cannot_be_written_is_refused_before_training(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match=r"--out .*file/run: .*file is a file, not a folder"):
        check_run_folder(tmp_path / "file" / "run")
    # a dangling link: it said "File exists", and only after the data was read
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(RunFolderError, match=r"--out .*link: .*link is a link to .*nowhere, which does not"):
        check_run_folder(tmp_path / "link")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only mount, as root sees it
    with pytest.raises(RunFolderError, match=r"--out .*new: .* is not writable"):
        check_run_folder(tmp_path / "new")


def test_a_run_file_name_taken_by_a_folder_is_refused_before_training(tmp_path):
    (tmp_path / "best.safetensors").mkdir()
    os.mkfifo(tmp_path / "overlays.png")
    taken = r"--out .*: best.safetensors, overlays.png are not a file, but the run writes a file by that name"
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(RunFolderError, match=taken):
            check_run_folder(tmp_path, **flags)


def test_run_folder_rule(tmp_path):
    check_run_folder(tmp_path / "new")  # a missing folder is fine
    (tmp_path / "notes.txt").write_text("mine")
    check_run_folder(tmp_path)  # so is a folder without a run's files
    check_run_folder(tmp_path, resume=True)  # nothing to resume: a new run, nothing to overwrite
    (tmp_path / "metrics.json").write_text("{}")
    # as cmrf.files.atomic_path names them: ".NAME.<random>.tmp<suffix>"
    (tmp_path / ".last_state.pt.abc123.tmp.pt").write_bytes(b"left by a kill")
    names = r"already holds a run \(metrics.json\).*--resume.*--overwrite.*resume=True, overwrite=True in fit"
    with pytest.raises(RunFolderError, match=names):
        check_run_folder(tmp_path)
    with pytest.raises(RunFolderError, match="choose one"):
        check_run_folder(tmp_path, resume=True, overwrite=True)
    # a run's files without its state: --resume cannot continue it and must not overwrite it
    with pytest.raises(RunFolderError, match=r"--resume: .* files \(metrics.json\) but no last_state.pt"):
        check_run_folder(tmp_path, resume=True)
    (tmp_path / "last_state.pt").write_bytes(b"")
    check_run_folder(tmp_path, resume=True)
    check_run_folder(tmp_path, overwrite=True)
    assert RunFiles(tmp_path).remove() == [tmp_path / "last_state.pt", tmp_path / "metrics.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # only the run's files go


def test_model_metadata_round_trip(tmp_path):
    from cmrf.checkpoint import save_weights

    meta = model_metadata("tinyunet", {"channels": [16, 32]}, 3, 2, ["bg", "lesion"], None, {"img_size": 32})
    save_weights(torch.nn.Linear(2, 2), tmp_path / "w.safetensors", metadata=meta)
    decoded = read_metadata(tmp_path / "w.safetensors")
    assert decoded["model"] == "tinyunet" and decoded["model_kwargs"] == {"channels": [16, 32]}
    assert decoded["class_names"] == ["bg", "lesion"] and decoded["data"]["img_size"] == 32
    save_weights(torch.nn.Linear(2, 2), tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="no cmrf training metadata"):
        read_metadata(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "missing.safetensors")


def test_a_non_finite_training_loss_stops_the_epoch_with_advice():
    from cmrf.train.loop import train_one_epoch
    from cmrf.train.processes import Processes

    model = torch.nn.Conv2d(3, 2, 1)
    batches = [(torch.randn(2, 3, 4, 4), torch.randint(0, 2, (2, 4, 4))) for _ in range(3)]
    optimizer = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    args = (CEDiceLoss(), optimizer, scaler, torch.device("cpu"), None, Processes())
    assert train_one_epoch(model, batches, *args) > 0
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    advice = "training loss is nan; .* --resume with --amp bf16 or none .* lower --lr and train afresh"
    with pytest.raises(ValueError, match=advice):
        train_one_epoch(model, batches, *args)


def test_recipe_takes_any_finite_real_number_and_refuses_nan_and_inf():
    recipe = Recipe(lr=np.float32(1e-3), betas=(np.float32(0.9), np.float32(0.999)),
                    ce_weight=np.float64(0.5))
    assert recipe.betas == (pytest.approx(0.9), pytest.approx(0.999))
    # plain floats: the recipe goes into metrics.json and into weights-only torch files
    assert type(recipe.lr) is float and type(recipe.ce_weight) is float
    json.loads(json.dumps(recipe.to_dict()))
    buffer = io.BytesIO()
    torch.save({"recipe": recipe.to_dict()}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["recipe"]["lr"] == pytest.approx(1e-3)
    bad = (("lr", math.nan), ("min_lr", math.inf), ("dice_weight", math.nan), ("weight_decay", "0"))
    for name, value in bad:
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            Recipe(**{name: value})
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -0.5"):
        Recipe(weight_decay=-0.5)
    for betas in ((0.9, 1.0), (-0.1, 0.999), (0.9,)):
        with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\)"):
            Recipe(betas=betas)


def test_the_training_curve_has_whole_epochs_and_says_what_it_cannot_draw():
    """Four epochs were ticked 1.5, 2.5, ...; a NaN or inf was left out as a silent gap; the loss
    panel said "CE + Dice" whatever the recipe's weights."""
    pytest.importorskip("matplotlib")
    from cmrf.train.plots import _history_figure

    history = [{"epoch": e, "train_loss": [1.0, float("nan"), 0.5, 0.4][e - 1], "val_mean_iou": 0.5 + e / 10,
                "lr": 1e-3} for e in range(1, 5)]
    figure = _history_figure(history)
    figure.canvas.draw()  # the locators place their ticks
    loss, iou, _ = figure.axes
    assert all(float(t).is_integer() for t in iou.get_xticks())
    assert loss.get_title() == "training loss"
    assert [t.get_text() for t in loss.texts] == ["1 of 4 values not finite (not drawn)"] and not iou.texts


def test_overlays_give_eighteen_foreground_classes_colours_of_their_own():
    """Class 7 had class 1's colour (six colours), so a 15-organ overlay could not be read."""
    from cmrf.train.plots import CLASS_COLOURS

    colours = [tuple(c) for c in CLASS_COLOURS]
    assert len(colours) >= 18 and len(set(colours)) == len(colours)
    assert min(np.abs(np.subtract(a, b)).sum() for i, a in enumerate(colours) for b in colours[i + 1:]) > 0.15
