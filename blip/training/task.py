"""Report generation as a task of the shared training engine: frozen-tower token cache, loss and validation.

Batches come from ``blip.data.dataset`` (``ReportDataset`` + ``ReportCollator``; images and text go
through the model's ``blip.processor.Blip2ReportProcessor``). A batch holds one modality (the prompt
and the tower depend on it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from blip.diagnosis import drop_observations
from blip.evaluation.labeler import precision_recall_f1
from blip.model import TOWER_OF_MODALITY, Blip2ReportModel, Blip2ReportOutput, attention_overlays
from ich_engine.trainer import autocast_dtype


class TowerTokenCache:
    """The output of a frozen tower per image file, kept in CPU memory, so each image goes through its
    tower once per run instead of once per epoch: with a frozen tower the tower is most of a stage-2
    step (docs/report_generation.md). RAM: studies x tokens x width x 4 bytes (512 x 96 for ``small``:
    0.2 MB a study; the released ``vit_b_ori``: 512 x 384, 0.8 MB; a 2-D ``vit_b`` X-ray: 4096 x 256,
    4 MB). A trainable tower is never cached; a frozen one gives the same tokens in training and
    evaluation mode (SAM towers have no dropout or batch norm)."""

    def __init__(self) -> None:
        self.tokens: dict[tuple[str, str], torch.Tensor] = {}

    def __call__(self, model: Blip2ReportModel, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor | None:
        """(B, N, width) tower tokens of ``batch`` on ``device``, or None when its tower trains."""
        modality = batch["modality"]
        if model.tower_trains(modality):
            return None
        keys = [(modality, path) for path in batch["path"]]
        missing = [i for i, key in enumerate(keys) if key not in self.tokens]
        if missing:
            fresh = model.tower_tokens(batch["image"][missing].to(device, non_blocking=True), modality)
            self.tokens.update({keys[i]: tokens.detach().cpu() for i, tokens in zip(missing, fresh)})
        return torch.stack([self.tokens[key] for key in keys]).to(device, non_blocking=True)


def batch_output(
    model: Blip2ReportModel,
    batch: Mapping[str, Any],
    images: torch.Tensor | None = None,
    tower_tokens: torch.Tensor | None = None,
    diagnosis_loss_weight: float = 1.0,
    diagnosis_dropout: float = 0.0,
) -> Blip2ReportOutput:
    """The model's output on ``batch``; ``images`` (or their ``tower_tokens``) replace the batch's own
    (see ``ReportTask.validate``). In training mode each present observation is left out of the
    diagnosis sentence with probability ``diagnosis_dropout`` (``blip.diagnosis.drop_observations``)."""
    device = next(model.bridge.parameters()).device
    images = batch["image"] if images is None else images
    diagnosis = batch.get("diagnosis")
    diagnosis = None if diagnosis is None else diagnosis.to(device)
    in_prompt = None
    if diagnosis is not None and model.training and diagnosis_dropout > 0:
        in_prompt = drop_observations(diagnosis, diagnosis_dropout)
    return model(
        images.to(device, non_blocking=True),
        batch["modality"],
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        batch.get("contexts"),
        diagnosis,
        tower_tokens,
        diagnosis_in_prompt=in_prompt,
        diagnosis_loss_weight=diagnosis_loss_weight,
    )


class ReportLoss(nn.Module):
    """batch → (loss, logs): the module the engine trains (and DDP wraps). With a diagnosis head the
    loss is LM + weighted head loss, and both parts are logged. ``token_cache``: frozen towers' outputs
    are looked up there."""

    def __init__(
        self,
        model: Blip2ReportModel,
        token_cache: TowerTokenCache | None = None,
        diagnosis_loss_weight: float = 1.0,
        diagnosis_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.token_cache = token_cache
        self.diagnosis_loss_weight = diagnosis_loss_weight
        self.diagnosis_dropout = diagnosis_dropout

    def forward(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(self.model.bridge.parameters()).device
        tokens = self.token_cache(self.model, batch, device) if self.token_cache is not None else None
        out = batch_output(self.model, batch, None, tokens, self.diagnosis_loss_weight, self.diagnosis_dropout)
        if out.diagnosis_loss is None:
            return out.loss, {}
        return out.loss, {"lm_loss": out.lm_loss.item(), "diagnosis_loss": out.diagnosis_loss.item()}


class ReportTask:
    """Validation: ``val_loss`` is the training objective (the LM loss, mean over report tokens, plus the
    weighted diagnosis loss for a model with a diagnosis head) averaged over the validation studies; it
    selects the best model. With several modalities, ``val_loss_<modality>`` averages each one's studies
    too. ``val_image_gain`` is how much worse the LM loss gets when each study of a batch is given
    another study's image (batches of two or more): near 0, the reports do not depend on the image,
    however low the loss. A diagnosis head adds ``val_lm_loss``, ``val_diagnosis_loss`` and
    ``val_diagnosis_f1`` (micro F1 of its predictions against the reference labels, all observations).
    The first ``num_samples`` validation studies of each modality also get a generated report, written
    with their reference to ``samples_path`` (JSON, the latest validation's) when one is given.
    ``cache_tokens``: a frozen tower sees each image once per run (``TowerTokenCache``)."""

    monitor = "val_loss"
    monitor_mode = "min"

    def __init__(
        self,
        num_samples: int = 2,
        generation: Mapping[str, Any] | None = None,
        samples_path: str | Path | None = None,
        use_mixed_precision: bool = False,
        cache_tokens: bool = False,
        diagnosis_loss_weight: float = 1.0,
        diagnosis_dropout: float = 0.0,
    ) -> None:
        if not 0.0 <= diagnosis_dropout < 1.0:
            raise ValueError(f"diagnosis_dropout must be in [0, 1), got {diagnosis_dropout}")
        self.diagnosis_loss_weight = diagnosis_loss_weight
        self.diagnosis_dropout = diagnosis_dropout
        self.num_samples = num_samples
        self.generation = dict(generation or {})
        self.samples_path = Path(samples_path) if samples_path else None
        self.use_mixed_precision = use_mixed_precision
        self.token_cache = TowerTokenCache() if cache_tokens else None
        self.samples: list[dict[str, str]] = []

    def training_module(self, model: Blip2ReportModel) -> nn.Module:
        return ReportLoss(model, self.token_cache, self.diagnosis_loss_weight, self.diagnosis_dropout)

    @torch.no_grad()
    def validate(self, model: Blip2ReportModel, loader: Iterable, device: torch.device) -> dict[str, float]:
        model.eval()
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        gain_total, gain_count = 0.0, 0
        head_losses = {"lm_loss": 0.0, "diagnosis_loss": 0.0}
        head_counts = {"tp": 0, "fp": 0, "fn": 0}
        self.samples = []
        with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=self.use_mixed_precision):
            for batch in loader:
                modality, size = batch["modality"], len(batch["report"])
                tokens = self.token_cache(model, batch, device) if self.token_cache is not None else None
                out = batch_output(model, batch, None, tokens, self.diagnosis_loss_weight)
                totals[modality] = totals.get(modality, 0.0) + out.loss.item() * size
                counts[modality] = counts.get(modality, 0) + size
                if size > 1:
                    swapped = batch_output(
                        model, batch, batch["image"].roll(1, dims=0), None if tokens is None else tokens.roll(1, dims=0)
                    ).lm_loss.item()
                    gain_total += (swapped - out.lm_loss.item()) * size
                    gain_count += size
                if out.diagnosis_logits is not None:
                    assert out.diagnosis_loss is not None  # the model sets both or neither
                    predicted, reference = out.diagnosis_logits > 0, batch["diagnosis"].to(device) >= 0.5
                    head_losses["lm_loss"] += out.lm_loss.item() * size
                    head_losses["diagnosis_loss"] += out.diagnosis_loss.item() * size
                    head_counts["tp"] += int((predicted & reference).sum())
                    head_counts["fp"] += int((predicted & ~reference).sum())
                    head_counts["fn"] += int((~predicted & reference).sum())
                wanted = self.num_samples - sum(s["modality"] == modality for s in self.samples)
                if wanted > 0:
                    contexts = batch["contexts"][:wanted] if batch.get("contexts") else None
                    generated = model.generate(
                        batch["image"][:wanted].to(device), modality, contexts, **self.generation
                    )
                    self.samples += [
                        {"id": i, "modality": modality, "reference": r, "generated": g}
                        for i, r, g in zip(batch["id"], batch["report"], generated)
                    ]
        model.train()
        if self.samples_path is not None and self.samples:
            self.samples_path.write_text(json.dumps(self.samples, indent=2) + "\n")
        count = sum(counts.values())
        metrics = {"val_loss": sum(totals.values()) / count if count else float("nan")}
        if len(counts) > 1:
            metrics.update({f"val_loss_{m}": totals[m] / counts[m] for m in sorted(counts)})
        if gain_count:
            metrics["val_image_gain"] = gain_total / gain_count
        if model.config.diagnosis_prompt and count:
            metrics.update(
                {
                    "val_lm_loss": head_losses["lm_loss"] / count,
                    "val_diagnosis_loss": head_losses["diagnosis_loss"] / count,
                    "val_diagnosis_f1": precision_recall_f1(**head_counts)["f1"],
                }
            )
        return metrics

    @torch.no_grad()
    def visualize(
        self, model: Blip2ReportModel, loader: Iterable, device: torch.device, max_cases: int = 2
    ) -> dict[str, np.ndarray]:
        """Q-Former cross-attention overlays of the first validation studies of each modality
        (``attention_overlays``)."""
        model.eval()
        towers = {m for m, name in TOWER_OF_MODALITY.items() if getattr(model, name) is not None}
        shown: set[str] = set()
        images: dict[str, np.ndarray] = {}
        for batch in loader:
            if batch["modality"] in shown:
                continue
            shown.add(batch["modality"])
            pictures = attention_overlays(model, batch["image"][:max_cases].to(device), batch["modality"])
            images.update({f"val/{study_id}_attention": picture for study_id, picture in zip(batch["id"], pictures)})
            if shown >= towers:  # the rest of the loader holds no modality not yet shown
                break
        model.train()
        return images
