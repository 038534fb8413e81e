"""Training losses: soft Dice (the reference's loss) and Dice + cross-entropy."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import Tensor, nn

LossName = Literal["dice", "dice_ce"]


class SegmentationLoss(nn.Module):
    """Multiclass soft Dice on softmax probabilities (all classes), optionally plus CE."""

    def __init__(self, name: LossName = "dice", ce_weight: float = 1.0):
        super().__init__()
        if name not in ("dice", "dice_ce"):
            raise ValueError(f"loss must be 'dice' or 'dice_ce', got {name!r}")
        self.name = name
        self.ce_weight = ce_weight
        self.dice = DiceLoss(mode="multiclass", from_logits=True)

    def forward(self, logits: Tensor, mask: Tensor) -> Tensor:
        # In fp32 whatever the autocast: CUDA's autocast runs softmax in fp32 but the CPU's
        # does not, and a bf16 soft Dice (per-class sums over every pixel of the batch) trained
        # worse personalized models on the CPU. A no-op for fp32 logits.
        logits = logits.float()
        loss = self.dice(logits, mask)
        if self.name == "dice_ce":
            loss = loss + self.ce_weight * F.cross_entropy(logits, mask)
        return loss
