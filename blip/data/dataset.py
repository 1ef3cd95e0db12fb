"""Report studies as a PyTorch dataset and their batches.

Items are dicts ``{"image": path, "report": text, "modality": "ct"|"xray", "id": str}`` (rows of a
``blip.data.reports`` manifest); images go through the report model's processor
(``blip.processor``). A batch holds one modality (the prompt and the tower depend on it). A dataset
may mix modalities: it exposes each item's modality as ``group_keys``, from which the engine draws
single-modality batches (``ich_engine.samplers.GroupedBatchSampler``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from ..processor import Blip2ReportProcessor

__all__ = ["ReportCollator", "ReportDataset"]


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

    def __init__(self, processor: Blip2ReportProcessor) -> None:
        self.processor = processor

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        modalities = sorted({item["modality"] for item in items})
        if len(modalities) != 1:
            raise ValueError(f"a batch must hold one modality, found {modalities} (ids {[i['id'] for i in items]})")
        reports = [item["report"] for item in items]
        input_ids, attention_mask = self.processor.tokenize_reports(reports)
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
