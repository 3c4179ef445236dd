"""IoU and Dice per class, as the TinyU-Net paper reports them, built on torchmetrics.

**Accumulated over the dataset, not averaged per image.** For each class ``k`` the true
positives, false positives and false negatives are summed over every pixel of every image of
the split, then ``IoU_k = TP / (TP + FP + FN)`` and ``Dice_k = 2TP / (2TP + FP + FN)`` (Dice is
torchmetrics' per-class F1). The background is a class like any other, and ``mean_iou`` /
``mean_dice`` are the unweighted means over all classes, background included, which is how the
paper's mIoU and mDice are formed, as we read it (the paper's code release has no metric code to
check against). A class that never occurs, in prediction or ground truth, scores 0
(torchmetrics' ``zero_division=0``) and so pulls the means down; ``compute()`` names such classes
(``absent``) and counts every class's ground-truth and predicted pixels.

Scores are of what the network sees: masks resized to the data's side (``--img-size``, nearest
neighbour), not of predictions resized back to each original mask.

Under ``torch.distributed`` the counts are summed across ranks when ``compute()`` runs, so every
rank gets the score of the whole split (torchmetrics synchronises metric states itself).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch


def default_class_names(num_classes: int) -> list[str]:
    """``["background", "foreground"]`` for 2 classes, else ``["background", "class 1", ...]``
    (as the data layer names classes without a ``classes.txt``)."""
    if num_classes == 2:
        return ["background", "foreground"]
    return ["background"] + [f"class {i}" for i in range(1, num_classes)]


class SegmentationMetrics:
    """Per-class IoU and Dice accumulated over a dataset.

    Args:
        num_classes: number of classes ``K`` (background included), >= 2.
        class_names: ``K`` names for the report; default ``default_class_names(K)``.
        device: where the confusion counts live (the model's device). Default CPU.

    Call ``update(prediction, target)`` per batch with ``prediction`` either logits
    ``(B, K, *S)`` or labels ``(B, *S)`` and ``target`` labels ``(B, *S)``, then ``compute()``.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, device="cpu"):
        try:
            from torchmetrics import MetricCollection
            from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex
        except ImportError as err:
            raise ImportError(
                "SegmentationMetrics needs torchmetrics, which is not installed: pip install 'cmrf[train]'"
            ) from err

        if num_classes < 2:
            raise ValueError(f"segmentation metrics need num_classes >= 2, got {num_classes}")
        names = list(class_names) if class_names is not None else default_class_names(num_classes)
        if len(names) != num_classes:
            raise ValueError(f"got {len(names)} class names {names} for num_classes={num_classes}")
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:  # the report is keyed by name: a second class of that name would replace the first
            raise ValueError(f"class names must differ, got {', '.join(map(repr, twice))} more than once "
                             f"in {names}")
        self.num_classes = num_classes
        self.class_names = names
        # NaN logits, counted on the device (no sync per batch): argmax picks a pixel's first NaN channel
        # (class 0 when all are NaN), which scored a diverged model as background everywhere.
        self._nan_logits = torch.zeros((), dtype=torch.long, device=device)
        self.metrics = MetricCollection(
            {
                "iou": MulticlassJaccardIndex(num_classes, average="none"),
                "dice": MulticlassF1Score(num_classes, average="none", multidim_average="global"),
            }
        ).to(device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``prediction`` logits ``(B, K, *S)`` or labels ``(B, *S)``, ``target`` labels.

        Raises:
            ValueError: logits with other than ``K`` channels, shapes that differ, floating-point
                labels as ``prediction`` (probabilities or one-hot maps), a ``target`` with
                non-integer values, or labels outside ``0..K-1`` (such as an ignore value 255).
        """
        from_logits = prediction.dim() == target.dim() + 1
        if from_logits:
            if not prediction.is_floating_point():
                raise ValueError(f"prediction {tuple(prediction.shape)} has one dimension more than target "
                                 f"{tuple(target.shape)}, so it reads as logits (B, K, *S), but it is "
                                 f"{prediction.dtype}: logits are floating point; labels have target's shape")
            if prediction.shape[1] != self.num_classes:
                one = (" (a one-channel, sigmoid-style output would score as background everywhere: "
                       "give the model K = 2 outputs, or pass (logits > 0).long() as labels)"
                       if prediction.shape[1] == 1 else "")
                raise ValueError(f"prediction has {prediction.shape[1]} channels (B, K, *S), but num_classes "
                                 f"is {self.num_classes}{one}")
            # NaN only: argmax handles infinities (an fp16 overflow to +inf still wins its pixel).
            self._nan_logits += torch.isnan(prediction).sum()
            prediction = prediction.argmax(dim=1)
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape"
            )
        if prediction.is_floating_point():
            raise ValueError(f"a prediction of the target's shape must hold class indices (an integer "
                             f"tensor), got {prediction.dtype}: pass logits (B, K, *S), or their argmax(1)")
        if not target.numel():  # an empty batch adds nothing (torchmetrics cannot reshape it)
            return
        if not from_logits:  # an argmax of K channels is in range: no check (a device sync) needed
            prediction = self._labels("prediction", prediction)
        self.metrics.update(prediction.reshape(-1), self._labels("target", target).reshape(-1))

    def _labels(self, what: str, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` as class indices, checked: torchmetrics fails on values outside ``0..K-1``
        with "shape '[2, 2]' is invalid for input of size 5", naming neither."""
        if labels.is_floating_point():
            if not torch.equal(labels, labels.round()):
                raise ValueError(f"{what} holds non-integer values (soft or resized masks?); expected class "
                                 f"indices 0..{self.num_classes - 1}")
            labels = labels.long()
        if labels.numel():
            low, high = (int(v) for v in torch.aminmax(labels))
            if low < 0 or high >= self.num_classes:
                bad = low if low < 0 else high
                raise ValueError(f"{what} holds class {bad}, outside 0..{self.num_classes - 1} "
                                 f"(num_classes={self.num_classes}); an ignore value such as 255 is not "
                                 f"supported: map it to a class first")
        return labels

    def compute(self) -> dict:
        """The scores as fractions in 0..1: ``{"mean_iou", "mean_dice", "per_class": {name: {"iou",
        "dice", "target_pixels", "predicted_pixels"}}, "absent": [names]}``, where ``absent`` lists
        the classes in neither the ground truth nor the prediction (scored 0).

        Raises:
            ValueError: logits given to ``update`` held NaN (a diverged model): their argmax
                would have scored those pixels as their first NaN channel (class 0 if all are);
                or no pixel was scored (no ``update``, or empty batches only), where every score
                would read 0.
        """
        with warnings.catch_warnings():  # a process given no images (DDP) still joins the sync
            warnings.filterwarnings("ignore", message=".*compute.* called before the .*update",
                                    category=UserWarning)
            scores = self.metrics.compute()
        # The IoU metric's confusion matrix (rows: ground truth, columns: prediction) is this process's
        # own again after compute(); the pixel counts are summed across processes with the NaN count.
        confusion = self.metrics["iou"].confmat
        counts = torch.cat([self._nan_logits.reshape(1), confusion.sum(1), confusion.sum(0)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)  # every rank scores the whole split, and refuses alike
        counts = counts.cpu()
        if counts[0]:
            raise ValueError(
                f"the model's output held {int(counts[0])} NaN logits (from non-finite weights or input: a "
                f"diverged training); argmax would pick a pixel's first NaN channel (class 0, "
                f"{self.class_names[0]}, when all are NaN), so no scores are given")
        pixels = counts[1:].reshape(2, self.num_classes)
        if not pixels.any():
            raise ValueError("no pixel was scored (update() was given no image, or empty batches only): "
                             "there are no scores, and zeros would read as a model that finds nothing")
        iou, dice = scores["iou"].double().cpu(), scores["dice"].double().cpu()
        return {
            "mean_iou": float(iou.mean()),
            "mean_dice": float(dice.mean()),
            "per_class": {
                name: {"iou": float(iou[k]), "dice": float(dice[k]),
                       "target_pixels": int(pixels[0, k]), "predicted_pixels": int(pixels[1, k])}
                for k, name in enumerate(self.class_names)
            },
            "absent": [name for k, name in enumerate(self.class_names) if not pixels[:, k].any()],
        }

    def reset(self) -> None:
        self.metrics.reset()
        self._nan_logits.zero_()


def format_table(scores: dict, title: str | None = None) -> str:
    """The paper-style table of ``SegmentationMetrics.compute()``'s result, in percent."""
    names = list(scores["per_class"])
    width = max(len("mean"), *(len(n) for n in names))
    lines = [title] if title else []
    lines.append(f"{'class':<{width}}  {'IoU %':>7}  {'Dice %':>7}")
    for name in names:
        row = scores["per_class"][name]
        lines.append(f"{name:<{width}}  {100 * row['iou']:7.2f}  {100 * row['dice']:7.2f}")
    lines.append(f"{'mean':<{width}}  {100 * scores['mean_iou']:7.2f}  {100 * scores['mean_dice']:7.2f}")
    absent = [name for name in scores.get("absent", ()) if name in scores["per_class"]]
    present = [scores["per_class"][name] for name in names if name not in absent]
    if absent and present:  # a 0 by convention: give the mean it pulls down without it, too
        iou, dice = (100 * sum(row[key] for row in present) / len(present) for key in ("iou", "dice"))
        lines.append(f"({', '.join(absent)}: in neither ground truth nor prediction, scored 0; the mean "
                     f"of the other classes is IoU {iou:.2f}, Dice {dice:.2f})")
    return "\n".join(lines)
