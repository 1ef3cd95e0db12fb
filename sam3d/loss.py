"""Training objective of interactive hemorrhage segmentation (the module DDP wraps)."""

from __future__ import annotations

from typing import Mapping

import torch
from monai.losses import DiceCELoss
from torch import nn

from .clicks import run_click_rounds
from .modeling.sam3d import Sam3D


def dice_ce_loss() -> DiceCELoss:
    """SAM-Med3D's loss on full-size logits: Dice (squared) + binary cross-entropy, per case."""
    return DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")


class InteractiveSegmentationLoss(nn.Module):
    """batch → (loss, logs): encoder once, then ``num_clicks`` decoder rounds for hemorrhage-positive
    cases (loss averaged over rounds) and one prompt-free round for hemorrhage-free cases, which must
    come out empty. The two groups are weighted by their number of cases.
    """

    def __init__(self, model: Sam3D, num_clicks: int = 11) -> None:
        super().__init__()
        if num_clicks < 1:
            raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
        self.model = model
        self.num_clicks = num_clicks
        self.criterion = dice_ce_loss()

    def forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(self.model.parameters()).device
        images = batch["image"].to(device, non_blocking=True)
        targets = batch["label"].to(device, non_blocking=True).float()
        embeddings = self.model.image_encoder(images)
        positive = targets.flatten(1).amax(1) > 0.5
        # Click positions come from the (per-epoch seeded) global RNG so resumed runs repeat them.
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,)).item()))
        batch_size = images.shape[0]
        loss = embeddings.new_zeros(())
        logs: dict[str, float] = {}
        if positive.any():
            pos_target = targets[positive]
            round_losses: list[torch.Tensor] = []
            run_click_rounds(
                self.model,
                embeddings[positive],
                pos_target,
                self.num_clicks,
                generator,
                on_round=lambda i, logits: round_losses.append(self.criterion(logits.float(), pos_target)),
            )
            pos_loss = torch.stack(round_losses).mean()
            loss = loss + pos_loss * positive.sum() / batch_size
            logs["loss_positive"] = pos_loss.item()
            logs["loss_last_click"] = round_losses[-1].item()
        if (~positive).any():
            neg_embeddings = embeddings[~positive]
            low_res, _ = self.model.decode(neg_embeddings)
            neg_loss = self.criterion(self.model.upsample_logits(low_res).float(), targets[~positive])
            loss = loss + neg_loss * (~positive).sum() / batch_size
            logs["loss_negative"] = neg_loss.item()
        return loss, logs
