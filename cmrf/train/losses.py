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
        from monai.losses import DiceCELoss

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
        # Softmax and Dice in float32 even under autocast: half precision sums overflow.
        return self.loss(logits.float(), target.unsqueeze(1))
