"""Interactive hemorrhage segmentation as a task of the shared training engine."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from engine.trainer import autocast_dtype

from .clicks import run_click_rounds
from .loss import InteractiveSegmentationLoss, dice_ce_loss
from .metrics import dice_score, surface_metrics
from .modeling.sam3d import Sam3D
from .visualize import lesion_slice_index, overlay_slice


class SegmentationTask:
    """Validation: hemorrhage-positive scans get ``val_num_clicks`` simulated clicks (seeded the same
    every epoch, so epochs are comparable) and are scored by Dice and NSD after the first and the last
    click; hemorrhage-free scans are predicted without prompts and must come out empty.
    ``val_dice`` (last click, positives) selects the best model.
    """

    monitor = "val_dice"
    monitor_mode = "max"

    def __init__(
        self,
        num_clicks: int = 11,
        val_num_clicks: int = 5,
        spacing_mm: Sequence[float] = (1.5, 1.5, 1.5),
        seed: int = 0,
        use_mixed_precision: bool = False,
    ) -> None:
        self.num_clicks = num_clicks
        self.val_num_clicks = val_num_clicks
        self.spacing_mm = tuple(spacing_mm)
        self.seed = seed
        self.use_mixed_precision = use_mixed_precision
        self.criterion = dice_ce_loss()

    def training_module(self, model: Sam3D) -> nn.Module:
        return InteractiveSegmentationLoss(model, self.num_clicks)

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=autocast_dtype(device), enabled=self.use_mixed_precision)

    @torch.no_grad()
    def predict_batch(self, model: Sam3D, batch: dict, device: torch.device, generator: torch.Generator):
        """(logits after the first click, logits after the last click) for a batch; negatives get the
        prompt-free prediction in both."""
        images = batch["image"].to(device)
        targets = batch["label"].to(device) > 0.5
        with self._autocast(device):
            embeddings = model.image_encoder(images)
        positive = targets.flatten(1).any(1)
        first = torch.zeros(targets.shape, device=device)
        last = torch.zeros(targets.shape, device=device)
        if positive.any():
            rounds: list[torch.Tensor] = []
            run_click_rounds(
                model, embeddings[positive].float(), targets[positive], self.val_num_clicks, generator,
                on_round=lambda i, logits: rounds.append(logits.float()),
            )
            first[positive] = rounds[0]
            last[positive] = rounds[-1]
        if (~positive).any():
            low_res, _ = model.decode(embeddings[~positive].float())
            logits = model.upsample_logits(low_res).float()
            first[~positive] = logits
            last[~positive] = logits
        return targets, positive, first, last

    @torch.no_grad()
    def validate(self, model: Sam3D, loader: Iterable, device: torch.device) -> dict[str, float]:
        model.eval()
        generator = torch.Generator().manual_seed(self.seed)
        dice_first, dice_last, nsd_last, losses, negatives_clean = [], [], [], [], []
        for batch in loader:
            targets, positive, first, last = self.predict_batch(model, batch, device, generator)
            losses.append(self.criterion(last, targets.float()).item())
            d1 = dice_score(first > 0, targets)
            d2 = dice_score(last > 0, targets)
            for b in range(targets.shape[0]):
                if positive[b]:
                    dice_first.append(d1[b].item())
                    dice_last.append(d2[b].item())
                    nsd_last.append(surface_metrics(last[b] > 0, targets[b], self.spacing_mm)["nsd"])
                else:
                    negatives_clean.append(float(not (last[b] > 0).any()))
        model.train()
        metrics = {"val_loss": float(np.mean(losses)) if losses else float("nan")}
        if dice_last:
            metrics.update(
                val_dice=float(np.mean(dice_last)),
                val_dice_first_click=float(np.mean(dice_first)),
                val_nsd=float(np.mean(nsd_last)),
            )
        if negatives_clean:
            metrics["val_negative_clean"] = float(np.mean(negatives_clean))
        if "val_dice" not in metrics:
            # A validation set without hemorrhages can still rank models by clean negatives.
            metrics["val_dice"] = metrics.get("val_negative_clean", float("nan"))
        return metrics

    @torch.no_grad()
    def visualize(self, model: Sam3D, loader: Iterable, device: torch.device, max_cases: int = 2) -> dict[str, np.ndarray]:
        """Axial overlays through the largest lesion slice of the first validation cases."""
        model.eval()
        generator = torch.Generator().manual_seed(self.seed)
        images: dict[str, np.ndarray] = {}
        for batch in loader:
            targets, _, _, last = self.predict_batch(model, batch, device, generator)
            for b in range(targets.shape[0]):
                if len(images) >= max_cases:
                    break
                volume = batch["image"][b, 0].cpu().numpy()
                target = targets[b, 0].cpu().numpy()
                prediction = (last[b, 0] > 0).cpu().numpy()
                z = lesion_slice_index(target, axis=-1)
                name = str(batch.get("patient_id", [f"case{len(images)}"])[b])
                images[f"val/{name}"] = overlay_slice(volume[..., z], prediction[..., z], target[..., z])
            if len(images) >= max_cases:
                break
        model.train()
        return images
