"""Training objective of interactive hemorrhage segmentation (the module DDP wraps)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.losses import DiceCELoss
from monai.utils import convert_to_tensor
from torch import nn
from torch.profiler import record_function

from .clicks import run_click_rounds
from .modeling.sam3d import Sam3D


def model_inputs(batch: Mapping[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's ``image`` and float ``label`` as plain tensors on ``device``. The pipelines hand out
    MetaTensors (affine tracking, needed up to the crop); inside the model that bookkeeping runs on every
    op, ~11% of a ``small`` 64^3 training step on CPU, and nothing reads it there."""
    image, label = (convert_to_tensor(batch[key], track_meta=False) for key in ("image", "label"))
    return image.to(device, non_blocking=True), label.to(device, non_blocking=True).float()


def dice_ce_loss() -> DiceCELoss:
    """SAM-Med3D's loss on full-size logits: Dice (squared) + binary cross-entropy, per case."""
    return DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")


class InteractiveSegmentationLoss(nn.Module):
    """batch → (loss, logs): encoder once, then ``num_clicks`` decoder rounds for hemorrhage-positive
    cases (loss averaged over rounds) and one prompt-free round for hemorrhage-free cases, which must
    come out empty. The two groups are weighted by their number of cases.

    With ``automatic_round`` the prompt-free round also runs on hemorrhage-positive cases and must find
    the bleed without clicks: this trains the automatic mode (sliding-window prediction without
    clicks) that official SAM-Med3D lacks. Its loss is added with the weight of those cases.
    """

    def __init__(self, model: Sam3D, num_clicks: int = 11, automatic_round: bool = False) -> None:
        super().__init__()
        if num_clicks < 1:
            raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
        self.model = model
        self.num_clicks = num_clicks
        self.automatic_round = automatic_round
        self.criterion = dice_ce_loss()

    def forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(self.model.parameters()).device
        images, targets = model_inputs(batch, device)
        # Named ranges (sam3d.*) let sam3d-bench say where a training step's time goes.
        with record_function("sam3d.encoder"):
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
                on_round=lambda i, logits: round_losses.append(self._loss(logits, pos_target)),
            )
            pos_loss = torch.stack(round_losses).mean()
            loss = loss + pos_loss * positive.sum() / batch_size
            logs["loss_positive"] = pos_loss.item()
            logs["loss_last_click"] = round_losses[-1].item()
        for name, selected in (("loss_negative", ~positive), ("loss_automatic", positive)):
            if not selected.any() or (name == "loss_automatic" and not self.automatic_round):
                continue
            with record_function("sam3d.decoder"):
                low_res, _ = self.model.decode(embeddings[selected])
            with record_function("sam3d.upsample"):
                logits = self.model.upsample_logits(low_res)
            prompt_free_loss = self._loss(logits, targets[selected])
            loss = loss + prompt_free_loss * selected.sum() / batch_size
            logs[name] = prompt_free_loss.item()
        return loss, logs

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with record_function("sam3d.loss"):
            return self.criterion(logits.float(), target)
