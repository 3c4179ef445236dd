"""Losses, metrics (against hand-computed confusion matrices) and atomic checkpoint files."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmrf.train.losses import CEDiceLoss
from cmrf.train.metrics import SegmentationMetrics, default_class_names, format_table
from cmrf.train.state import (
    atomic_torch_save,
    atomic_write_json,
    get_rng_state,
    load_training_state,
    model_metadata,
    read_metadata,
    save_training_state,
    set_rng_state,
)

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
    assert metrics.compute()["per_class"]["class2"] == {"iou": 0.0, "dice": 0.0}
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.update(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="class names"):
        SegmentationMetrics(3, ["a", "b"])
    with pytest.raises(ValueError, match="num_classes >= 2"):
        SegmentationMetrics(1)


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


def test_loss_is_small_for_confident_correct_logits_and_checks_shapes():
    target = torch.randint(0, 2, (2, 8, 8))
    good = F.one_hot(target, 2).movedim(-1, 1).float() * 20
    assert CEDiceLoss()(good, target) < 1e-3
    assert CEDiceLoss()(-good, target) > 1.0
    with pytest.raises(ValueError, match="logits"):
        CEDiceLoss()(good, target[:, None])
    with pytest.raises(ValueError, match="loss weights"):
        CEDiceLoss(ce_weight=0, dice_weight=0)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails inside torch.save
        atomic_torch_save({"epoch": 2, "bad": lambda: 0}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    atomic_write_json({"a": 1}, tmp_path / "m.json")
    assert (tmp_path / "m.json").read_text().strip().startswith("{")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")) == ["m.json", "state.pt"]


def test_training_state_round_trips_with_weights_only_and_restores_rng(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10, 1e-6)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    rng = get_rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(2))
    save_training_state(
        tmp_path / "s.pt",
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": [rng],
            "best": None,
        },
    )
    state = load_training_state(tmp_path / "s.pt")  # weights_only=True inside
    set_rng_state(state["rng"][0])
    assert (random.random(), np.random.rand()) == draws[:2]
    assert torch.equal(torch.rand(2), draws[2])
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    fresh.load_state_dict(state["optimizer"])
    assert fresh.state_dict()["state"][0]["step"] == 1
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_training_state(tmp_path / "junk.pt")


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
