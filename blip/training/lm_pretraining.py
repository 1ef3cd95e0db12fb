"""Text-only pretraining of the report language model, on the same engine as every other training.

Real report models put a pretrained LM behind the Q-Former, so it writes fluent report language
before it ever sees an image. Offline, the stand-in is a small GPT-2 with a word-level tokenizer
(``blip.language_model.train_word_tokenizer``) trained here on report text alone. Each sequence is
what the LM reads in the report model after the soft prompt: the prompt (preceded, for a share of
the rows, by the measurement sentence of ``blip.conditioning``) and the report, with the loss on
the report's tokens only. One LM so serves conditioned and image-only report models.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from blip.conditioning import VOLUME_SLOT, measurement_context, volume_slot_text
from blip.language_model import build_tiny_gpt2, load_language_model
from blip.processor import DEFAULT_PROMPTS, prompt_text
from ich_engine.checkpoint import load_checkpoint
from ich_engine.trainer import BEST_CHECKPOINT, Trainer, TrainerConfig

__all__ = ["LanguageModelTask", "PromptedReports", "pretrain_report_lm"]


class PromptedReports(Dataset):
    """Rows ``{'report', 'volume_ml', 'side'}`` → ``input_ids`` / ``labels`` (prompt tokens -100). A
    row given the measurement sentence has its volume as the slot, as conditioned report models see it."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], tokenizer, max_len: int, conditioned_share: float, seed: int):
        rng = np.random.default_rng(seed)
        self.items = []
        for row in rows:
            context = (
                measurement_context(float(row["volume_ml"]), row["side"]) if rng.random() < conditioned_share else None
            )
            prompt = tokenizer(prompt_text(DEFAULT_PROMPTS["ct"], context), add_special_tokens=False).input_ids
            text = volume_slot_text(row["report"], float(row["volume_ml"])) if context else row["report"]
            report = tokenizer(text.strip() + tokenizer.eos_token, add_special_tokens=False).input_ids
            ids = (prompt + report)[:max_len]
            labels = ([-100] * len(prompt) + report)[:max_len]
            self.items.append((torch.tensor(ids), torch.tensor(labels)))
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[index]

    def collate(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(ids) for ids, _ in items)
        batch = {
            "input_ids": torch.full((len(items), longest), self.pad_id),
            "labels": torch.full((len(items), longest), -100),
            "attention_mask": torch.zeros((len(items), longest), dtype=torch.long),
        }
        for i, (ids, labels) in enumerate(items):
            batch["input_ids"][i, : len(ids)], batch["labels"][i, : len(ids)] = ids, labels
            batch["attention_mask"][i, : len(ids)] = 1
        return batch


class _LanguageModelLoss(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(self.model.parameters()).device
        out = self.model(**{k: v.to(device) for k, v in batch.items()})
        return out.loss, {}


class LanguageModelTask:
    """``val_loss``: next-token loss per report token over the validation rows (selects the best model);
    ``val_perplexity`` its exponential."""

    monitor = "val_loss"
    monitor_mode = "min"

    def training_module(self, model: nn.Module) -> nn.Module:
        return _LanguageModelLoss(model)

    @torch.no_grad()
    def validate(self, model: nn.Module, loader: Iterable, device: torch.device) -> dict[str, float]:
        model.eval()
        total, tokens = 0.0, 0
        for batch in loader:
            count = int((batch["labels"][:, 1:] != -100).sum())  # the LM shifts labels by one
            total += _LanguageModelLoss(model)(batch)[0].item() * count
            tokens += count
        model.train()
        loss = total / max(tokens, 1)
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}

    def visualize(self, model: nn.Module, loader: Iterable, device: torch.device) -> dict[str, np.ndarray]:
        return {}


def pretrain_report_lm(
    train_rows: Sequence[Mapping[str, Any]],
    val_rows: Sequence[Mapping[str, Any]],
    folder: str | os.PathLike,
    work_dir: str | os.PathLike,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 2e-3,
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    n_positions: int = 256,
    conditioned_share: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Build the word-level GPT-2 on the rows' vocabulary, train it on the engine in ``work_dir``
    (resumable checkpoints, summary) and write the best epoch's LM to ``folder`` (a Hugging Face
    folder for ``--lm``). Returns the engine's result."""
    prompts = [
        prompt_text(DEFAULT_PROMPTS["ct"], measurement_context(float(r["volume_ml"]), r["side"])) for r in train_rows
    ] + [VOLUME_SLOT]
    folder = Path(folder)
    build_tiny_gpt2(
        [r["report"] for r in train_rows] + prompts,
        folder,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        seed=seed,
        tokenizer="word",
    )
    model, tokenizer = load_language_model(folder, "full")
    train_set = PromptedReports(train_rows, tokenizer, n_positions, conditioned_share, seed)
    val_set = PromptedReports(val_rows, tokenizer, n_positions, conditioned_share, seed + 1)
    cfg = TrainerConfig(
        output_dir=str(work_dir),
        epochs=epochs,
        batch_size=batch_size,
        gradient_accumulation_steps=1,
        scheduler_type="cosine",
        patience=epochs,
        seed=seed,
        extra={"kind": "report language model pretraining", "rows": len(train_rows)},
    )
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "weight_decay": 0.01}]
    trainer = Trainer(cfg, LanguageModelTask(), model, groups, torch.device("cpu"), collate_fn=train_set.collate)
    result = trainer.fit(train_set, val_set)
    model.load_state_dict(load_checkpoint(Path(work_dir) / BEST_CHECKPOINT)["model_state_dict"])
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(folder)
    return result
