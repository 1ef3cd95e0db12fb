"""Report generation as a task of the shared training engine: data, collation, loss and validation.

Items are dicts ``{"image": path, "report": text, "modality": "ct"|"xray", "id": str}`` (rows of a
``blip.data.reports`` manifest). Image pipelines, per modality:

- ``ct``: ``sam3d.data.transforms.build_inference_transforms`` with the exported encoder's
  ``preprocessing`` (RAS, resampling, HU clamp, normalisation), then a centred crop or pad to the
  tower's input size. Padding uses the volume's minimum, i.e. air after normalisation.
- ``xray``: grayscale → resized to the tower's square input → repeated to 3 channels → normalised with
  segment-anything's pixel statistics (what the 2-D encoder was trained on). The resize does not keep
  the aspect ratio, as R2Gen and R2GenGPT do for chest films.

A batch holds one modality (the prompt and the tower depend on it). A dataset may mix modalities:
it exposes each item's modality as ``group_keys``, from which the engine draws single-modality
batches (``sam3d.engine.samplers.GroupedBatchSampler``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, ResizeWithPadOrCropd
from monai.utils import convert_to_tensor
from torch import nn
from torch.utils.data import Dataset

from sam3d.data.transforms import build_inference_transforms
from sam3d.engine.trainer import autocast_dtype

from .labeler import precision_recall_f1
from .model import TOWER_OF_MODALITY, Blip2ReportModel, Blip2ReportOutput, attention_overlays, tokenize_reports
from .vision import SAM2D_PIXEL_MEAN, SAM2D_PIXEL_STD


def ct_image_transform(preprocessing: Mapping[str, Any] | None, img_size: int) -> Callable[[str], torch.Tensor]:
    """path → float32 (C, img_size, img_size, img_size) for the CT tower."""
    pipeline = Compose(
        [build_inference_transforms(preprocessing), ResizeWithPadOrCropd("image", (img_size,) * 3, mode="minimum")]
    )
    # A plain tensor: MetaTensor's per-op bookkeeping would slow every layer of the model down.
    return lambda path: convert_to_tensor(pipeline({"image": path})["image"], dtype=torch.float32, track_meta=False)


def xray_image_transform(img_size: int) -> Callable[[str], torch.Tensor]:
    """path → float32 (3, img_size, img_size) for the X-ray tower."""
    from PIL import Image

    mean = torch.tensor(SAM2D_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM2D_PIXEL_STD).view(3, 1, 1)

    def load(path: str) -> torch.Tensor:
        with Image.open(path) as image:
            gray = image.convert("L").resize((img_size, img_size), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(gray, dtype=np.float32))
        return (pixels.expand(3, -1, -1) - mean) / std

    return load


def image_transform(model: Blip2ReportModel, modality: str) -> Callable[[str], torch.Tensor]:
    """The pipeline that feeds ``model``'s tower for ``modality``, sized from the tower itself."""
    tower = model.tower(modality)
    if modality == "ct":
        return ct_image_transform(model.config.ct_tower.get("preprocessing"), tower.img_size)
    return xray_image_transform(tower.img_size)


class ReportDataset(Dataset):
    """Rows ``{"image", "report", "modality", "id"}`` → ``{"image": tensor, ...}``. ``transform`` is
    one pipeline (rows of one modality) or a mapping modality → pipeline (rows of several).
    ``group_keys`` (each row's modality) lets the engine batch one modality at a time. A row with
    several images (frontal + lateral views) uses the first. ``cache``: keep each preprocessed image
    in memory after its first use — the pipelines are deterministic, and re-reading and resampling a CT
    volume every epoch costs more than the small models' step (RAM: studies × channels × size³ × 4
    bytes, 8 MB per 128³ CT; each data-loader worker keeps its own copy)."""

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        transform: Callable[[str], torch.Tensor] | Mapping[str, Callable[[str], torch.Tensor]],
        source: str = "",
        cache: bool = False,
    ) -> None:
        source = source or "report rows"
        self.modalities = sorted({row["modality"] for row in rows})
        if not isinstance(transform, Mapping):
            if len(self.modalities) > 1:
                raise ValueError(
                    f"{source}: one modality per dataset with a single transform, found "
                    f"{self.modalities}; pass a mapping modality -> transform for mixed rows"
                )
            transform = {modality: transform for modality in self.modalities}
        missing = [m for m in self.modalities if m not in transform]
        if missing:
            raise ValueError(
                f"{source}: no image transform for modality {missing} (transforms for {sorted(transform)})"
            )
        self.rows = [dict(row) for row in rows]
        self.group_keys = [row["modality"] for row in self.rows]
        self.transforms = dict(transform)
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.rows)

    def path(self, index: int) -> str:
        """The row's image file (the first of several views)."""
        image = self.rows[index]["image"]
        return image if isinstance(image, str) else image[0]

    def image(self, index: int) -> torch.Tensor:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        image = self.transforms[self.rows[index]["modality"]](self.path(index))
        if self.cache is not None:
            self.cache[index] = image
        return image

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        return {
            "image": self.image(index),
            "path": self.path(index),
            "report": row["report"],
            "modality": row["modality"],
            "id": str(row.get("id", index)),
            "context": row.get("context"),
            "diagnosis": row.get("diagnosis"),
        }


class ReportCollator:
    """Items → ``{"image" (B, C, *S), "modality", "input_ids" (B, T), "attention_mask" (B, T),
    "report", "id", "path", "contexts", "diagnosis"}``; the reports are tokenized here, once per batch.
    ``contexts`` is the studies' measurement sentences and ``diagnosis`` (B, K) their reference labels
    (``blip.diagnosis``), each None when the items carry none."""

    def __init__(self, tokenizer, max_text_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        modalities = sorted({item["modality"] for item in items})
        if len(modalities) != 1:
            raise ValueError(f"a batch must hold one modality, found {modalities} (ids {[i['id'] for i in items]})")
        reports = [item["report"] for item in items]
        input_ids, attention_mask = tokenize_reports(self.tokenizer, reports, self.max_text_len)
        contexts = [item.get("context") for item in items]
        if any(c is None for c in contexts) and any(c is not None for c in contexts):
            raise ValueError(f"measurement contexts for some studies only (ids {[i['id'] for i in items]})")
        diagnosis = [item.get("diagnosis") for item in items]
        if any(d is None for d in diagnosis) and any(d is not None for d in diagnosis):
            raise ValueError(f"diagnosis labels for some studies only (ids {[i['id'] for i in items]})")
        return {
            "image": torch.stack([item["image"] for item in items]),
            "modality": modalities[0],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "report": reports,
            "id": [item["id"] for item in items],
            "path": [item.get("path") for item in items],
            "contexts": None if contexts[0] is None else contexts,
            "diagnosis": None if diagnosis[0] is None else torch.tensor(diagnosis, dtype=torch.float32),
        }


class TowerTokenCache:
    """The output of a frozen tower per image file, kept in CPU memory, so each image goes through its
    tower once per run instead of once per epoch. With a frozen tower the tower is most of a stage-2
    step: ~0.19 s of ~0.21 s for 4 CT studies (``small`` encoder, 64^3, tiny bridge and LM, 2 CPU
    cores). RAM: studies x tokens x width x 4 bytes (512 x 96 for ``small``: 0.2 MB a study; the
    released ``vit_b_ori``: 512 x 384, 0.8 MB; a 2-D ``vit_b`` X-ray: 4096 x 256, 4 MB). A trainable
    tower is never cached; a frozen one gives the same tokens in training and evaluation mode (SAM
    towers have no dropout or batch norm)."""

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
) -> Blip2ReportOutput:
    """The model's output on ``batch``; ``images`` (or their ``tower_tokens``) replace the batch's own
    (see ``ReportTask.validate``)."""
    device = next(model.bridge.parameters()).device
    images = batch["image"] if images is None else images
    diagnosis = batch.get("diagnosis")
    return model(
        images.to(device, non_blocking=True),
        batch["modality"],
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        batch.get("contexts"),
        None if diagnosis is None else diagnosis.to(device),
        tower_tokens,
    )


class ReportLoss(nn.Module):
    """batch → (loss, logs): the module the engine trains (and DDP wraps). With a diagnosis head the
    loss is LM + weighted head loss, and both parts are logged. ``token_cache``: frozen towers' outputs
    are looked up there."""

    def __init__(self, model: Blip2ReportModel, token_cache: TowerTokenCache | None = None) -> None:
        super().__init__()
        self.model = model
        self.token_cache = token_cache

    def forward(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(self.model.bridge.parameters()).device
        tokens = self.token_cache(self.model, batch, device) if self.token_cache is not None else None
        out = batch_output(self.model, batch, tower_tokens=tokens)
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
    ) -> None:
        self.num_samples = num_samples
        self.generation = dict(generation or {})
        self.samples_path = Path(samples_path) if samples_path else None
        self.use_mixed_precision = use_mixed_precision
        self.token_cache = TowerTokenCache() if cache_tokens else None
        self.samples: list[dict[str, str]] = []

    def training_module(self, model: Blip2ReportModel) -> nn.Module:
        return ReportLoss(model, self.token_cache)

    @torch.no_grad()
    def validate(self, model: Blip2ReportModel, loader: Iterable, device: torch.device) -> dict[str, float]:
        model.eval()
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        gain_total, gain_count = 0.0, 0
        head: dict[str, float] = {"lm_loss": 0.0, "diagnosis_loss": 0.0, "tp": 0, "fp": 0, "fn": 0}
        self.samples = []
        with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=self.use_mixed_precision):
            for batch in loader:
                modality, size = batch["modality"], len(batch["report"])
                tokens = self.token_cache(model, batch, device) if self.token_cache is not None else None
                out = batch_output(model, batch, tower_tokens=tokens)
                totals[modality] = totals.get(modality, 0.0) + out.loss.item() * size
                counts[modality] = counts.get(modality, 0) + size
                if size > 1:
                    swapped = batch_output(
                        model, batch, batch["image"].roll(1, dims=0), None if tokens is None else tokens.roll(1, dims=0)
                    ).lm_loss.item()
                    gain_total += (swapped - out.lm_loss.item()) * size
                    gain_count += size
                if out.diagnosis_logits is not None:
                    predicted, reference = out.diagnosis_logits > 0, batch["diagnosis"].to(device) >= 0.5
                    head["lm_loss"] += out.lm_loss.item() * size
                    head["diagnosis_loss"] += out.diagnosis_loss.item() * size
                    head["tp"] += (predicted & reference).sum().item()
                    head["fp"] += (predicted & ~reference).sum().item()
                    head["fn"] += (~predicted & reference).sum().item()
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
                    "val_lm_loss": head["lm_loss"] / count,
                    "val_diagnosis_loss": head["diagnosis_loss"] / count,
                    "val_diagnosis_f1": precision_recall_f1(head["tp"], head["fp"], head["fn"])["f1"],
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
