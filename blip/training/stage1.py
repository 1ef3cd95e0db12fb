"""BLIP-2 stage 1: the Q-Former learns to read the image before any language model is attached.

Three objectives on the Q-Former's shared layers (Li et al. 2023, section 3.2; LAVIS ``Blip2Qformer``):

- ITC, image-text contrastive: the best-matching query embedding against the report's ``[CLS]``
  embedding, in both directions, with a learned temperature;
- ITM, image-text matching: a binary head on the queries of a joint pass (queries and text see each
  other), on the batch's pairs and on one hard negative per image and per report, drawn in proportion to
  the contrastive similarity;
- ITG, image-grounded text generation: the report written token by token by the Q-Former's text path,
  which can only reach the image through the queries.

Reports are tokenised with the report model's LM tokenizer; three ids past its vocabulary are the
``[CLS]`` / ``[ENC]`` / ``[DEC]`` tokens that start the text of each objective. Two studies whose reports
the labeler reads the same (same findings, side and subtype) count as a match for ITC and are never drawn
as each other's ITM negative: with templated reports, two normal studies are not a mismatch.

The trained bridge (Q-Former, queries, ``ln_vision``, text path) is saved with
``QFormerBridge.save_pretrained`` and the heads beside it (``save_pretrained``); ``sam3d-report-train
--init_from`` starts stage 2 (or more stage 1) from that folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from blip.evaluation.labeler import label_report
from blip.model import Blip2ReportModel
from blip.training.task import TowerTokenCache
from ich_engine.checkpoint import load_state_dict_strict

__all__ = ["QFormerPretraining", "QFormerPretrainingTask", "SPECIAL_TEXT_TOKENS", "findings_key"]

SPECIAL_TEXT_TOKENS = ("[CLS]", "[ENC]", "[DEC]")
HEADS_NAME = "stage1_heads.safetensors"
HEADS = ("vision_proj", "text_proj", "itm_head", "itg_head", "temp")


@lru_cache(maxsize=65536)
def findings_key(report: str, modality: str) -> tuple:
    """What the labeler reads in ``report``: reports with the same key say the same thing."""
    return tuple(sorted(label_report(report, modality).items()))


class QFormerPretraining(nn.Module):
    """A report model's towers and bridge with the stage-1 heads; ``forward(batch)`` → (loss, logs).

    The bridge must read text (``QFormerBridgeConfig.text_vocab_size`` = LM vocabulary + 3). The
    language model is held but never run."""

    def __init__(
        self, report_model: Blip2ReportModel, embed_dim: int = 256, token_cache: TowerTokenCache | None = None
    ) -> None:
        super().__init__()
        bridge = report_model.bridge.config
        self.vocab = len(report_model.tokenizer)
        if bridge.text_vocab_size != self.vocab + len(SPECIAL_TEXT_TOKENS):
            raise ValueError(
                f"stage 1 needs a bridge with text_vocab_size {self.vocab + len(SPECIAL_TEXT_TOKENS)} "
                f"(LM vocabulary + {SPECIAL_TEXT_TOKENS}), found {bridge.text_vocab_size}"
            )
        self.report_model = report_model
        hidden = bridge.hidden_size
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.itg_head = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.LayerNorm(hidden, eps=bridge.layer_norm_eps),
            nn.Linear(hidden, bridge.text_vocab_size),
        )
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.token_cache = token_cache

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] in HEADS}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """The bridge (``QFormerBridge.save_pretrained``) and the stage-1 heads beside it."""
        self.report_model.bridge.save_pretrained(folder)
        save_file(
            {k: v.detach().contiguous() for k, v in self.heads_state_dict().items()}, str(Path(folder) / HEADS_NAME)
        )

    def load_heads(self, folder: str | os.PathLike) -> None:
        """The heads of a ``save_pretrained`` folder, to continue stage 1 (the bridge is loaded by the caller)."""
        path = Path(folder) / HEADS_NAME
        heads = nn.Module()
        for name in HEADS[:-1]:
            heads.add_module(name, getattr(self, name))
        heads.register_parameter("temp", self.temp)
        load_state_dict_strict(heads, load_file(str(path)), str(path))

    def _text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, special: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        first = torch.full_like(input_ids[:, :1], self.vocab + SPECIAL_TEXT_TOKENS.index(special))
        return torch.cat([first, input_ids], dim=1), torch.cat(
            [torch.ones_like(attention_mask[:, :1]), attention_mask], dim=1
        )

    def features(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(vision tokens (B, N, width), normalised query features (B, Q, D), normalised [CLS] text
        features (B, D))."""
        bridge = self.report_model.bridge
        device = self.temp.device
        tokens = self.token_cache(self.report_model, batch, device) if self.token_cache is not None else None
        vision = self.report_model.image_tokens(batch["image"].to(device), batch["modality"], tokens)
        image_feats = F.normalize(self.vision_proj(bridge.queries(vision).last_hidden_state), dim=-1)
        ids, mask = self._text(batch["input_ids"].to(device), batch["attention_mask"].to(device), "[CLS]")
        text_feats = F.normalize(self.text_proj(bridge.text(ids, mask)[:, 0]), dim=-1)
        return vision, image_feats, text_feats

    def forward(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        vision, image_feats, text_feats = self.features(batch)
        device = vision.device
        keys = [findings_key(r, batch["modality"]) for r in batch["report"]]
        same = torch.tensor([[a == b for b in keys] for a in keys], device=device)
        temp = self.temp.clamp(0.001, 0.5)
        sim_i2t = torch.einsum("iqd,jd->ijq", image_feats, text_feats).amax(-1) / temp  # best query per pair
        targets = same.float() / same.sum(1, keepdim=True)
        loss_itc = (F.cross_entropy(sim_i2t, targets) + F.cross_entropy(sim_i2t.t(), targets.t())) / 2

        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        images, texts, labels = self._itm_pairs(sim_i2t.detach(), same)
        enc_ids, enc_mask = self._text(ids[texts], mask[texts], "[ENC]")
        joint = self.report_model.bridge.image_grounded_text(vision[images], enc_ids, enc_mask, causal=False)
        num_queries = self.report_model.bridge.config.num_query_tokens
        loss_itm = F.cross_entropy(self.itm_head(joint[:, :num_queries]).mean(1), labels.to(device))

        dec_ids, dec_mask = self._text(ids, mask, "[DEC]")
        grounded = self.report_model.bridge.image_grounded_text(vision, dec_ids, dec_mask, causal=True)
        logits = self.itg_head(grounded[:, num_queries:-1])
        targets_itg = dec_ids[:, 1:].masked_fill(dec_mask[:, 1:] == 0, -100)
        loss_itg = F.cross_entropy(logits.flatten(0, 1).float(), targets_itg.flatten())
        loss = loss_itc + loss_itm + loss_itg
        return loss, {"loss_itc": loss_itc.item(), "loss_itm": loss_itm.item(), "loss_itg": loss_itg.item()}

    @staticmethod
    def _itm_pairs(sim_i2t: torch.Tensor, same: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image index, text index, label) of the ITM pairs: every positive pair, and per image (per
        text) one non-matching text (image) drawn with probability softmax(similarity)."""
        batch = sim_i2t.shape[0]
        images, texts = list(range(batch)), list(range(batch))
        labels = [1] * batch
        for sim, rows_are_images in ((sim_i2t, True), (sim_i2t.t(), False)):
            weights = sim.float().softmax(dim=1).masked_fill(same, 0.0)
            for i in range(batch):
                if weights[i].sum() <= 0:  # every other study says the same: no negative to draw
                    continue
                j = int(torch.multinomial(weights[i], 1))
                images.append(i if rows_are_images else j)
                texts.append(j if rows_are_images else i)
                labels.append(0)
        return torch.tensor(images), torch.tensor(texts), torch.tensor(labels)


class QFormerPretrainingTask:
    """Validation of stage 1: ``val_loss`` (ITC + ITM + ITG, mean over batches) selects the best model;
    ``val_itc`` / ``val_itm`` / ``val_itg`` each objective; image → report retrieval over the whole
    validation set: ``val_i2t_r1`` / ``val_i2t_r5`` (the study's own report ranked first / in the top 5)
    and ``val_i2t_r1_findings`` (the top report says what the study's own says, by the labeler)."""

    monitor = "val_loss"
    monitor_mode = "min"

    def training_module(self, model: QFormerPretraining) -> nn.Module:
        return model

    @torch.no_grad()
    def validate(self, model: QFormerPretraining, loader: Iterable, device: torch.device) -> dict[str, float]:
        model.eval()
        sums = {"loss": 0.0, "loss_itc": 0.0, "loss_itm": 0.0, "loss_itg": 0.0}
        batches = 0
        image_feats, text_feats, keys = [], [], []
        for batch in loader:
            loss, logs = model(batch)
            for key in sums:
                sums[key] += loss.item() if key == "loss" else logs[key]
            batches += 1
            _, images, texts = model.features(batch)
            image_feats.append(images)
            text_feats.append(texts)
            keys += [findings_key(r, batch["modality"]) for r in batch["report"]]
        model.train()
        metrics = {
            f"val_{k.removeprefix('loss_')}" if k != "loss" else "val_loss": v / max(batches, 1)
            for k, v in sums.items()
        }
        if image_feats:
            sim = torch.einsum("iqd,jd->ijq", torch.cat(image_feats), torch.cat(text_feats)).amax(-1)
            order = sim.argsort(dim=1, descending=True).cpu().numpy()
            own = np.arange(len(order))
            rank = np.argmax(order == own[:, None], axis=1)
            metrics.update(
                {
                    "val_i2t_r1": float((rank < 1).mean()),
                    "val_i2t_r5": float((rank < 5).mean()),
                    "val_i2t_r1_findings": float(np.mean([keys[order[i, 0]] == keys[i] for i in own])),
                }
            )
        return metrics

    def visualize(self, model: QFormerPretraining, loader: Iterable, device: torch.device) -> dict[str, np.ndarray]:
        return {}
