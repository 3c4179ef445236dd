"""The paper's loss: cross-entropy plus Dice, on logits and integer masks."""

from __future__ import annotations

import math

import torch
from torch import nn


class CEDiceLoss(nn.Module):
    """``ce_weight * cross_entropy + dice_weight * (1 - soft Dice)``, background included.

    A thin adapter over MONAI's ``DiceCELoss`` (softmax, one-hot targets, Dice summed over the
    whole batch before the per-class mean) that takes the integer masks the datasets yield.

    Args:
        ce_weight: weight of the cross-entropy term. Default 1.
        dice_weight: weight of the Dice term. Default 1.
        batch_dice: compute Dice over the whole batch (True, default) rather than per image;
            the batch version is stable when a class is absent from one image.

    Shapes: ``logits (B, K, *S)`` float, ``target (B, *S)`` int64 in ``0..K-1`` -> scalar.
    """

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0, batch_dice: bool = True):
        super().__init__()
        try:
            from monai.losses import DiceCELoss
        except ImportError as err:
            message = "CEDiceLoss needs monai, which is not installed: pip install 'cmrf[train]'"
            raise ImportError(message) from err

        if not (ce_weight >= 0 and dice_weight >= 0) or ce_weight + dice_weight in (0, math.inf):
            raise ValueError(
                f"loss weights must be finite, >= 0 and not both 0, got ce_weight={ce_weight}, "
                f"dice_weight={dice_weight}"
            )
        self.loss = DiceCELoss(
            to_onehot_y=True, softmax=True, batch=batch_dice, lambda_ce=ce_weight, lambda_dice=dice_weight
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() != logits.dim() - 1 or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f"loss expects logits (B, K, *S) and target (B, *S), got {tuple(logits.shape)} and "
                f"{tuple(target.shape)}"
            )
        classes = logits.shape[1]
        if classes < 2:
            raise ValueError(f"loss expects logits of K >= 2 classes (B, K, *S), softmax over K, got "
                             f"{classes} channel(s): a one-channel (sigmoid) model needs num_classes=2 here")
        if target.is_floating_point() and not torch.equal(target, target.round()):
            raise ValueError(f"target holds non-integer values (soft or resized masks?); expected class "
                             f"indices 0..{classes - 1}")
        try:
            # Softmax and Dice in float32 even under autocast: half precision sums overflow.
            return self.loss(logits.float(), target.unsqueeze(1))
        except RuntimeError as err:  # MONAI's one-hot: "index 255 is out of bounds for dimension 1"
            low, high = (int(v) for v in torch.aminmax(target.detach()))
            if low >= 0 and high < classes:
                raise
            bad = low if low < 0 else high
            raise ValueError(f"target holds class {bad}, outside 0..{classes - 1} of the model's {classes} "
                             f"outputs; an ignore value such as 255 is not supported: map it to a class "
                             f"first") from err
