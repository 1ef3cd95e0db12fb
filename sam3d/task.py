"""Interactive hemorrhage segmentation as a task of the shared training engine."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ich_engine.trainer import autocast_dtype

from .clicks import run_click_rounds
from .loss import InteractiveSegmentationLoss, dice_ce_loss, model_inputs
from .metrics import dice_score, surface_metrics
from .modeling.sam3d import Sam3D
from .visualize import RAS_VIEW, axial_overlay, lesion_slice_index


class SegmentationTask:
    """Validation: hemorrhage-positive scans get ``val_num_clicks`` simulated clicks (seeded the same
    every epoch, so epochs are comparable) and are scored by Dice and NSD after the first and the last
    click; hemorrhage-free scans are predicted without prompts and must come out empty.
    ``val_dice`` (last click, positives) selects the best model. With ``automatic_round``,
    ``val_dice_automatic`` scores the prompt-free prediction of the hemorrhage-positive scans.
    """

    monitor = "val_dice"
    monitor_mode = "max"
    # Official SAM-Med3D checkpoints list each epoch's validation Dice under "dices".
    checkpoint_history = {"dices": "val_dice"}

    def __init__(
        self,
        num_clicks: int = 11,
        val_num_clicks: int = 5,
        spacing_mm: Sequence[float] = (1.5, 1.5, 1.5),
        seed: int = 0,
        use_mixed_precision: bool = False,
        automatic_round: bool = False,
    ) -> None:
        self.num_clicks = num_clicks
        self.automatic_round = automatic_round
        self.val_num_clicks = val_num_clicks
        self.spacing_mm = tuple(spacing_mm)
        self.seed = seed
        self.use_mixed_precision = use_mixed_precision
        self.criterion = dice_ce_loss()

    def training_module(self, model: Sam3D) -> nn.Module:
        return InteractiveSegmentationLoss(model, self.num_clicks, self.automatic_round)

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=autocast_dtype(device), enabled=self.use_mixed_precision)

    @torch.no_grad()
    def predict_batch(self, model: Sam3D, batch: dict, device: torch.device, generator: torch.Generator) -> dict:
        """Logits (B, 1, *S) of a batch: ``first`` and ``last`` after the first and the last simulated
        click (hemorrhage-free scans get the prompt-free prediction there), and ``automatic``, the
        prompt-free prediction of every scan. Also ``targets`` (bool) and ``positive`` (B,)."""
        images, labels = model_inputs(batch, device)
        targets = labels > 0.5
        with self._autocast(device):
            embeddings = model.image_encoder(images)
        embeddings = embeddings.float()
        positive = targets.flatten(1).any(1)
        low_res, _ = model.decode(embeddings)
        automatic = model.upsample_logits(low_res).float()
        first, last = automatic.clone(), automatic.clone()
        if positive.any():
            rounds: list[torch.Tensor] = []
            run_click_rounds(
                model,
                embeddings[positive],
                targets[positive],
                self.val_num_clicks,
                generator,
                on_round=lambda i, logits: rounds.append(logits.float()),
            )
            first[positive] = rounds[0]
            last[positive] = rounds[-1]
        return {"targets": targets, "positive": positive, "first": first, "last": last, "automatic": automatic}

    @torch.no_grad()
    def validate(self, model: Sam3D, loader: Iterable, device: torch.device) -> dict[str, float]:
        model.eval()
        generator = torch.Generator().manual_seed(self.seed)
        scores: dict[str, list[float]] = {k: [] for k in ("first", "last", "nsd", "automatic", "loss", "clean")}
        for batch in loader:
            out = self.predict_batch(model, batch, device, generator)
            targets, last = out["targets"], out["last"]
            scores["loss"].append(self.criterion(last, targets.float()).item())
            dice = {key: dice_score(out[key] > 0, targets) for key in ("first", "last", "automatic")}
            for b in range(targets.shape[0]):
                if out["positive"][b]:
                    for key in ("first", "last", "automatic"):
                        scores[key].append(dice[key][b].item())
                    scores["nsd"].append(surface_metrics(last[b] > 0, targets[b], self.spacing_mm)["nsd"])
                else:
                    scores["clean"].append(float(not (last[b] > 0).any()))
        model.train()
        metrics = {"val_loss": float(np.mean(scores["loss"])) if scores["loss"] else float("nan")}
        if scores["last"]:
            metrics.update(
                val_dice=float(np.mean(scores["last"])),
                val_dice_first_click=float(np.mean(scores["first"])),
                val_nsd=float(np.mean(scores["nsd"])),
            )
            if self.automatic_round:
                metrics["val_dice_automatic"] = float(np.mean(scores["automatic"]))
        if scores["clean"]:
            metrics["val_negative_clean"] = float(np.mean(scores["clean"]))
        if "val_dice" not in metrics:
            # A validation set without hemorrhages can still rank models by clean negatives.
            metrics["val_dice"] = metrics.get("val_negative_clean", float("nan"))
        return metrics

    @torch.no_grad()
    def visualize(
        self, model: Sam3D, loader: Iterable, device: torch.device, max_cases: int = 2
    ) -> dict[str, np.ndarray]:
        """Axial overlays through the largest lesion slice of the first validation cases."""
        model.eval()
        generator = torch.Generator().manual_seed(self.seed)
        images: dict[str, np.ndarray] = {}
        for batch in loader:
            out = self.predict_batch(model, batch, device, generator)
            targets, last = out["targets"], out["last"]
            for b in range(targets.shape[0]):
                if len(images) >= max_cases:
                    break
                volume = batch["image"][b, 0].cpu().numpy()
                target = targets[b, 0].cpu().numpy()
                prediction = (last[b, 0] > 0).cpu().numpy()
                z = lesion_slice_index(target, axis=-1)
                name = str(batch.get("patient_id", [f"case{len(images)}"])[b])
                images[f"val/{name}"] = axial_overlay(volume, z, RAS_VIEW, prediction, target)  # model grid is RAS
            if len(images) >= max_cases:
                break
        model.train()
        return images
