"""BLIP-2 report model: vision tower → Q-Former bridge → causal language model.

Module layout (state-dict prefixes):

- ``visual_encoder``: the CT tower, SAM-Med3D's ``ImageEncoderViT`` itself, so the exported encoder
  loads as ``model.visual_encoder.load_state_dict(ckpt["image_encoder_state_dict"])``.
- ``visual_encoder_2d``: the chest X-ray tower, segment-anything's 2-D encoder (optional).
- ``vision_adapters``: a Linear per tower whose width differs from the bridge's ``vision_width``
  (the bridge takes the first tower's width), so both modalities share one Q-Former.
- ``bridge``: ``ln_vision`` → Q-Former (``num_query_tokens`` queries) → ``language_projection``.
- ``language_model``: any Hugging Face causal LM (frozen, fully trained, or with LoRA adapters).

The LM reads ``[projected queries (Q)] [prompt tokens (P)] [report tokens (T)]`` and is trained with
its own next-token loss on the report only: labels are -100 on the Q + P prefix and on padding
(BLIP-2 stage 2). With ``condition_on_measurements`` the prompt of each CT study starts with its
measurement sentence (``blip.conditioning``), so prompts differ in length: the prefix is left-padded
and position ids follow the attention mask, as Hugging Face generation does for left padding. With
``diagnosis_prompt`` a head on the tower's tokens predicts the labeler's observations and the prompt
also starts with their sentence (``blip.diagnosis``); its binary cross-entropy joins the LM loss. A
batch holds one modality, since the prompt and the tower depend on it; one model with both towers
serves both modalities (``blip.training.train`` batches a mixed run by modality).
Generated reports follow the training text's "FINDINGS: ... IMPRESSION: ..." format; cut them with
``blip.data.reports.split_sections``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from blip.evaluation.labeler import binary_observations
from ich_engine.checkpoint import CheckpointError, load_state_dict_strict
from ich_engine.config import from_known_keys
from sam3d.modeling.image_encoder import ImageEncoderViT
from sam3d.visualize import RAS_VIEW, lesion_slice_index

from .diagnosis import DiagnosisHead, diagnosis_sentence
from .language_model import LM_MODES, load_language_model
from .processor import PROCESSOR_NAME, Blip2ReportProcessor
from .qformer import QFormerBridge, QFormerBridgeConfig
from .vision import VisionTowerConfig, build_vision_tower, encoder_tokens, tower_width

if TYPE_CHECKING:
    from peft import PeftModel

    from .language_model import CausalLM

CONFIG_NAME = "config.json"
# The settings of Blip2ReportModel.generate that commands and training configs expose, by their flag names.
GENERATION_KEYS = ("num_beams", "max_new_tokens", "repetition_penalty", "no_repeat_ngram_size")
WEIGHTS_NAME = "model.safetensors"
LM_FOLDER = "lm"
TOWER_OF_MODALITY = {"ct": "visual_encoder", "xray": "visual_encoder_2d"}
LM_PREFIX = "language_model."
# Keys of configs saved before the processor: read by the processor (prompts, max_text_len) or the
# training run (diagnosis_loss_weight, diagnosis_dropout) instead.
LEGACY_CONFIG_KEYS = ("prompts", "max_text_len", "diagnosis_loss_weight", "diagnosis_dropout")


@dataclass
class LanguageModelConfig:
    """The causal LM: ``path`` is a local Hugging Face folder (relative paths in a saved model are
    relative to its folder); ``mode`` frozen / full / lora, with the LoRA adapter's rank, alpha and dropout."""

    path: str | None = None
    mode: str = "frozen"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05

    def __post_init__(self) -> None:
        if self.mode not in LM_MODES:
            raise ValueError(f"language_model.mode must be one of {LM_MODES}, got '{self.mode}'")


# Flat LM keys of configs saved before LanguageModelConfig, and where they live now.
LEGACY_LM_KEYS = {
    "lm_path": "path",
    "lm_mode": "mode",
    "lora_r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
}


@dataclass
class Blip2ReportConfig:
    """Everything needed to rebuild a report model, as typed sub-configs (Hugging Face's Blip2Config
    has vision, Q-Former and text configs the same way): ``ct_tower`` / ``xray_tower`` (None: no such
    modality), ``bridge`` (the Q-Former: its ``vision_width``, ``lm_hidden_size`` and
    ``num_query_tokens`` are set when the model is built, from the first tower, the LM and
    ``num_query_tokens`` here) and ``language_model``. Dicts are accepted for each (a saved
    ``config.json``). Training settings (loss weights, dropout of the diagnosis sentence) are the
    training run's; prompts and text length the processor's."""

    ct_tower: VisionTowerConfig | None = field(default_factory=lambda: VisionTowerConfig("sam3d"))
    xray_tower: VisionTowerConfig | None = None
    bridge: QFormerBridgeConfig = field(default_factory=QFormerBridgeConfig)
    language_model: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    num_query_tokens: int = 32
    condition_on_measurements: bool = False  # CT prompts start with a measurement sentence
    diagnosis_prompt: bool = False  # a findings head; prompts start with its diagnosis sentence

    def __post_init__(self) -> None:
        for key in ("ct_tower", "xray_tower"):
            if isinstance(getattr(self, key), Mapping):
                setattr(self, key, VisionTowerConfig.from_dict(getattr(self, key)))
        if isinstance(self.bridge, Mapping):
            self.bridge = QFormerBridgeConfig.from_dict(self.bridge)
        if isinstance(self.language_model, Mapping):
            self.language_model = LanguageModelConfig(**self.language_model)
        if self.ct_tower is None and self.xray_tower is None:
            raise ValueError("a report model needs at least one vision tower (ct_tower or xray_tower)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Blip2ReportConfig:
        """Also reads the layouts of older folders: flat ``lm_path`` / ``lm_mode`` / ``lora_*`` keys (and
        such overrides of ``from_pretrained``) go into ``language_model``; ``prompts`` and
        ``max_text_len`` are the processor's now (``Blip2ReportModel.from_pretrained`` reads them from
        this file), the diagnosis loss weight and dropout the training run's."""
        values = {k: v for k, v in values.items() if k not in LEGACY_CONFIG_KEYS}
        language_model = dict(values.pop("language_model", None) or {})
        for old, new in LEGACY_LM_KEYS.items():
            if old in values:
                language_model[new] = values.pop(old)
        return from_known_keys(cls, values, language_model=LanguageModelConfig(**language_model))


def generation_settings(settings: Any) -> dict[str, Any]:
    """The keywords of :meth:`Blip2ReportModel.generate` that ``settings`` (a training config or
    parsed flags) names, among :data:`GENERATION_KEYS`."""
    return {key: getattr(settings, key) for key in GENERATION_KEYS if hasattr(settings, key)}


@dataclass
class Blip2ReportOutput:
    """``loss``: what training minimises, ``lm_loss`` (+ ``diagnosis_loss_weight`` x ``diagnosis_loss``
    for a model with a diagnosis head); ``lm_loss``: mean next-token loss over report tokens;
    ``logits`` (B, Q + P + T, vocab); ``labels`` (B, Q + P + T), -100 where no loss is taken;
    ``diagnosis_logits`` (B, observations) and ``diagnosis_loss`` (mean binary cross-entropy against
    the reference labels) when the model has the head."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    diagnosis_logits: torch.Tensor | None = None
    diagnosis_loss: torch.Tensor | None = None


class Blip2ReportModel(nn.Module):
    """Image (B, C, *spatial) of one modality → report text."""

    def __init__(
        self,
        config: Blip2ReportConfig,
        language_model: CausalLM | PeftModel | None = None,
        tokenizer: Any = None,
        prompts: Mapping[str, str] | None = None,
        max_text_len: int = 128,
    ) -> None:
        """``prompts`` and ``max_text_len`` go to the model's :class:`~blip.processor.Blip2ReportProcessor`
        (``self.processor``), which builds its prompts and tokenises its reports."""
        super().__init__()
        config = copy.deepcopy(config)  # the towers write their resolved configs into it
        if language_model is None:
            lm = config.language_model
            if not lm.path:
                raise ValueError("Blip2ReportConfig.language_model.path is empty and no language model was given")
            language_model, tokenizer = load_language_model(lm.path, lm.mode, lm.lora_r, lm.lora_alpha, lm.lora_dropout)
        elif tokenizer is None:
            raise ValueError("a language model passed in needs its tokenizer too")
        self.notes: list[str] = []
        self.visual_encoder = self._tower(config, "ct_tower")
        self.visual_encoder_2d = self._tower(config, "xray_tower")
        widths = {
            m: tower_width(getattr(self, name))
            for m, name in TOWER_OF_MODALITY.items()
            if getattr(self, name) is not None
        }
        vision_width = next(iter(widths.values()))
        self.vision_adapters = nn.ModuleDict(
            {m: nn.Linear(w, vision_width) for m, w in widths.items() if w != vision_width}
        )
        lm_hidden = input_embeddings(language_model).embedding_dim
        config.bridge = dataclasses.replace(
            config.bridge, vision_width=vision_width, lm_hidden_size=lm_hidden, num_query_tokens=config.num_query_tokens
        )
        self.bridge = QFormerBridge(config.bridge)
        # One head per modality on the tower's tokens: its observations are the labeler's for that modality.
        self.diagnosis_heads = nn.ModuleDict(
            {m: DiagnosisHead(vision_width, len(binary_observations(m))) for m in widths}
            if config.diagnosis_prompt
            else {}
        )
        self.language_model: CausalLM | PeftModel = language_model
        self.config = config
        ct, xray = self.visual_encoder, self.visual_encoder_2d
        self.processor = Blip2ReportProcessor(
            tokenizer,
            prompts,
            max_text_len,
            ct_preprocessing=config.ct_tower.preprocessing if config.ct_tower else None,
            ct_img_size=None if ct is None else ct.img_size,
            xray_img_size=None if xray is None else xray.img_size,
        )

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def _tower(self, config: Blip2ReportConfig, key: str) -> ImageEncoderViT | None:
        """Build the tower of ``config.<key>`` and store its resolved config back (architecture and
        preprocessing read from the checkpoint travel with the model)."""
        tower_config = getattr(config, key)
        if tower_config is None:
            return None
        tower = build_vision_tower(tower_config)
        setattr(config, key, tower.config)
        self.notes += tower.notes
        return tower.encoder

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> Blip2ReportModel:
        """Frozen parts stay in eval mode (no dropout), as LAVIS does for its frozen LM."""
        super().train(mode)
        if self.config.language_model.mode == "frozen":
            self.language_model.eval()
        for modality, name in TOWER_OF_MODALITY.items():
            if getattr(self, name) is not None and not self.tower_trains(modality):
                getattr(self, name).eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute tower blocks and (trained) LM layers in backward instead of storing activations."""
        for name in TOWER_OF_MODALITY.values():
            if getattr(self, name) is not None:
                getattr(self, name).gradient_checkpointing = True
        if self.config.language_model.mode != "frozen":
            self.language_model.gradient_checkpointing_enable()

    # ------------------------------------------------------------------ encoding
    def tower(self, modality: str) -> ImageEncoderViT:
        if modality not in TOWER_OF_MODALITY:
            raise ValueError(f"modality must be one of {sorted(TOWER_OF_MODALITY)}, got '{modality}'")
        tower: ImageEncoderViT | None = getattr(self, TOWER_OF_MODALITY[modality])
        if tower is None:
            raise ValueError(
                f"this model has no {modality} tower (config.{'ct' if modality == 'ct' else 'xray'}_tower is None)"
            )
        return tower

    def tower_trains(self, modality: str) -> bool:
        """Whether the modality's tower has trainable weights (else it is frozen)."""
        return any(p.requires_grad for p in self.tower(modality).parameters())

    def tower_tokens(self, images: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, C, *spatial) → (B, N, tower width): the modality's tower alone; a frozen tower runs without
        autograd, which saves its activations."""
        with torch.set_grad_enabled(self.tower_trains(modality) and torch.is_grad_enabled()):
            return encoder_tokens(self.tower(modality), images)

    def image_tokens(
        self, images: torch.Tensor, modality: str, tower_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, C, *spatial) → (B, N, vision_width) tokens for the bridge. ``tower_tokens``: the tower's
        output for ``images`` when already at hand (a frozen tower's, cached by ``blip.training.task``)."""
        tokens = self.tower_tokens(images, modality) if tower_tokens is None else tower_tokens
        if modality in self.vision_adapters:
            tokens = self.vision_adapters[modality](tokens)
        return tokens

    def _contexts(self, modality: str, contexts: list[str] | None, batch: int) -> list[str | None]:
        """One context per study: required for CT when the model is conditioned, refused otherwise
        (a model never trained with them would read words it has not seen in that place)."""
        conditioned = self.config.condition_on_measurements and modality == "ct"
        if conditioned and contexts is None:
            raise ValueError(
                "this report model is conditioned on measurements (config.condition_on_measurements): "
                "pass contexts, e.g. blip.conditioning.context_from_measurements(...)"
            )
        if not conditioned and contexts is not None:
            raise ValueError(f"contexts given, but this model does not condition {modality} reports on measurements")
        if contexts is not None and len(contexts) != batch:
            raise ValueError(f"{len(contexts)} contexts for a batch of {batch} images")
        return list(contexts) if contexts is not None else [None] * batch

    def _diagnosis_logits(self, tokens: torch.Tensor, modality: str) -> torch.Tensor | None:
        """(B, observations) logits of the modality's diagnosis head; None for a model without heads."""
        if not self.config.diagnosis_prompt:
            return None
        return self.diagnosis_heads[modality](tokens)

    def _diagnosis_sentences(
        self, logits: torch.Tensor | None, diagnosis: torch.Tensor | None, modality: str, batch: int
    ) -> list[str | None]:
        """One "Diagnosis: ..." sentence per study, from ``diagnosis`` (given labels, >= 0.5 present) or
        else the head's prediction (logit > 0); Nones for a model without heads."""
        if logits is None:
            if diagnosis is not None:
                raise ValueError(
                    "diagnosis labels given, but this model has no diagnosis head (config.diagnosis_prompt is False)"
                )
            return [None] * batch
        if diagnosis is not None and tuple(diagnosis.shape) != tuple(logits.shape):
            raise ValueError(
                f"diagnosis labels of shape {tuple(diagnosis.shape)}, expected {tuple(logits.shape)}: "
                f"one column per observation of {modality} ({', '.join(binary_observations(modality))})"
            )
        present = logits > 0 if diagnosis is None else diagnosis >= 0.5
        return [diagnosis_sentence(row, modality) for row in present.tolist()]

    def soft_prompt(
        self,
        images: torch.Tensor,
        modality: str,
        contexts: list[str] | None = None,
        diagnosis: torch.Tensor | None = None,
        output_attentions: bool = False,
        tower_tokens: torch.Tensor | None = None,
    ):
        """(prefix embeddings (B, L, H_lm), prefix mask (B, L), bridge output, diagnosis logits (B, K)
        or None): projected queries, then the (measurement context +) (diagnosis sentence +) prompt,
        left-padded to the longest prompt of the batch."""
        tokens = self.image_tokens(images, modality, tower_tokens)
        bridge_out = self.bridge(tokens, output_attentions=output_attentions)
        logits = self._diagnosis_logits(tokens, modality)
        sentences = self._diagnosis_sentences(logits, diagnosis, modality, len(images))
        study_contexts = self._contexts(modality, contexts, len(images))
        texts = [" ".join(t for t in (c, d) if t) or None for c, d in zip(study_contexts, sentences)]
        embed = input_embeddings(self.language_model)
        queries = bridge_out.projected.to(embed.weight.dtype)
        prompts = [self.processor.prompt_ids(modality, text).to(images.device) for text in texts]
        longest = max(len(p) for p in prompts)
        batch, num_queries, width = queries.shape
        prefix = queries.new_zeros(batch, longest + num_queries, width)
        mask = torch.zeros(batch, longest + num_queries, dtype=torch.long, device=images.device)
        for i, prompt in enumerate(prompts):
            pad = longest - len(prompt)
            prefix[i, pad : pad + num_queries] = queries[i]
            prefix[i, pad + num_queries :] = embed(prompt)
            mask[i, pad:] = 1
        return prefix, mask, bridge_out, logits

    # ------------------------------------------------------------------ training and generation
    def forward(
        self,
        images: torch.Tensor,
        modality: str,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        contexts: list[str] | None = None,
        diagnosis: torch.Tensor | None = None,
        tower_tokens: torch.Tensor | None = None,
        diagnosis_in_prompt: torch.Tensor | None = None,
        diagnosis_loss_weight: float = 1.0,
    ) -> Blip2ReportOutput:
        """``images`` (B, C, *spatial), ``input_ids`` / ``attention_mask`` (B, T) from the processor's
        ``tokenize_reports``; ``contexts``: one measurement sentence per study for a conditioned model;
        ``diagnosis`` (B, K): the reference labels (``blip.diagnosis.reference_diagnosis``) for a model
        with a diagnosis head, the head's targets and (unless ``diagnosis_in_prompt`` gives other labels,
        e.g. training's ``drop_observations``) the sentence the LM reads; ``diagnosis_loss_weight``: of
        the head's loss in ``loss``; ``tower_tokens``: see ``image_tokens``."""
        if self.config.diagnosis_prompt and diagnosis is None:
            raise ValueError(
                "this report model has a diagnosis head (config.diagnosis_prompt): pass the reference "
                "labels, blip.diagnosis.reference_diagnosis(report, modality) per study"
            )
        sentence_labels = diagnosis if diagnosis_in_prompt is None else diagnosis_in_prompt
        prefix, prefix_mask, _, diagnosis_logits = self.soft_prompt(
            images, modality, contexts, sentence_labels, tower_tokens=tower_tokens
        )
        report_embeds = input_embeddings(self.language_model)(input_ids)
        attention_mask = torch.cat([prefix_mask, attention_mask.to(prefix_mask)], dim=1)
        labels = torch.cat(
            [
                torch.full_like(prefix_mask, -100),
                input_ids.masked_fill(attention_mask[:, prefix.shape[1] :] == 0, -100),
            ],
            dim=1,
        )
        out = self.language_model(
            inputs_embeds=torch.cat([prefix, report_embeds], dim=1),
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0),
            labels=labels,
        )
        if diagnosis_logits is None:
            return Blip2ReportOutput(loss=out.loss, lm_loss=out.loss, logits=out.logits, labels=labels)
        assert diagnosis is not None  # a model with heads refuses a batch without labels (above)
        diagnosis_loss = F.binary_cross_entropy_with_logits(diagnosis_logits.float(), diagnosis.float())
        return Blip2ReportOutput(
            loss=out.loss + diagnosis_loss_weight * diagnosis_loss,
            lm_loss=out.loss,
            logits=out.logits,
            labels=labels,
            diagnosis_logits=diagnosis_logits,
            diagnosis_loss=diagnosis_loss,
        )

    @torch.no_grad()
    def diagnose(self, images: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, K) probabilities of ``blip.evaluation.labeler.binary_observations(modality)`` from the diagnosis head."""
        if not self.config.diagnosis_prompt:
            raise ValueError("this report model has no diagnosis head (config.diagnosis_prompt is False)")
        logits = self._diagnosis_logits(self.image_tokens(images, modality), modality)
        assert logits is not None  # config.diagnosis_prompt: the model has its heads
        return torch.sigmoid(logits.float())

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        modality: str,
        contexts: list[str] | None = None,
        diagnosis: torch.Tensor | None = None,
        num_beams: int = 3,
        max_new_tokens: int = 100,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
    ) -> list[str]:
        """One report per image of the batch. Defaults follow R2GenGPT (beam 3, ~100 new tokens);
        it also uses ``repetition_penalty=2.0, no_repeat_ngram_size=2``. ``contexts``: one measurement
        sentence per study for a conditioned model. A model with a diagnosis head writes after its own
        predicted diagnosis, or after ``diagnosis`` (B, K) labels when given."""
        prefix, prefix_mask, _, _ = self.soft_prompt(images, modality, contexts, diagnosis)
        # An LM with learned positions (GPT-2's n_positions) cannot write past its last one.
        lm_config = self.language_model.config
        positions = getattr(lm_config, "n_positions", None) or getattr(lm_config, "max_position_embeddings", None)
        if positions:
            max_new_tokens = max(1, min(max_new_tokens, positions - prefix.shape[1]))
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        tokens = self.language_model.generate(
            inputs_embeds=prefix,
            attention_mask=prefix_mask,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **sampling,
        )
        return self.processor.decode(tokens)

    @torch.no_grad()
    def cross_attention_map(self, images: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, *spatial): where the Q-Former reads the image. Its cross-attention weights (one
        (B, heads, Q, N) map per cross-attention layer) are averaged over layers, heads and queries,
        laid back onto the tower's token grid (N = prod(grid), row-major like the neck output) and
        upsampled (tri/bilinear) to the input size."""
        bridge_out = self.bridge(self.image_tokens(images, modality), output_attentions=True)
        weights = torch.stack(bridge_out.cross_attentions).float().mean(dim=(0, 2, 3))  # (B, N)
        grid = self.tower(modality).grid_size
        mode = "trilinear" if len(grid) == 3 else "bilinear"
        maps = F.interpolate(weights.reshape(-1, 1, *grid), size=images.shape[2:], mode=mode, align_corners=False)
        return maps[:, 0]

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """``config.json`` + ``model.safetensors`` (towers, adapters, bridge) + ``lm/`` (the LM and its
        tokenizer via their own ``save_pretrained``). LoRA adapters are merged into a copy of the LM
        first, so the folder is self-contained; ``from_pretrained`` re-adds fresh (zero) adapters."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = dataclasses.replace(
            self.config, language_model=dataclasses.replace(self.config.language_model, path=LM_FOLDER)
        )
        for key in ("ct_tower", "xray_tower"):
            if getattr(config, key) is not None:  # weights are in model.safetensors now
                setattr(config, key, dataclasses.replace(getattr(config, key), checkpoint=None))
        (folder / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        weights = {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith(LM_PREFIX)}
        save_file(weights, str(folder / WEIGHTS_NAME))
        language_model = self.language_model
        if self.config.language_model.mode == "lora":
            from peft import PeftModel  # tens of seconds to import on 2 cores: only LoRA models load it

            assert isinstance(language_model, PeftModel)  # load_language_model wraps a LoRA LM in one
            language_model = copy.deepcopy(language_model).merge_and_unload()
        language_model.save_pretrained(str(folder / LM_FOLDER))
        self.tokenizer.save_pretrained(folder / LM_FOLDER)
        self.processor.save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **overrides: Any) -> Blip2ReportModel:
        """Rebuild from a ``save_pretrained`` folder; ``overrides`` replace config fields (e.g.
        ``lm_mode="lora"`` to continue training with adapters; the flat LM keys are understood)."""
        folder = Path(folder)
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not a Blip2ReportModel folder")
        saved = json.loads(config_path.read_text())
        config = Blip2ReportConfig.from_dict({**saved, **overrides})
        lm = config.language_model
        if lm.path and not Path(lm.path).is_absolute():
            lm.path = str(folder / lm.path)
        text = json.loads((folder / PROCESSOR_NAME).read_text()) if (folder / PROCESSOR_NAME).is_file() else saved
        model = cls(config, prompts=text.get("prompts"), max_text_len=text.get("max_text_len", 128))
        weights_path = folder / WEIGHTS_NAME
        if not weights_path.is_file():
            raise CheckpointError(f"{weights_path} not found")
        vision_and_bridge = nn.Module()
        for name, child in model.named_children():
            if name != "language_model":
                vision_and_bridge.add_module(name, child)
        load_state_dict_strict(vision_and_bridge, load_file(str(weights_path)), str(weights_path))
        return model


def input_embeddings(language_model: CausalLM | PeftModel) -> nn.Embedding:
    """The LM's token embedding table (an ``nn.Embedding`` or a subclass in Hugging Face causal LMs)."""
    embed = language_model.get_input_embeddings()
    assert isinstance(embed, nn.Embedding)
    return embed


def attention_overlays(
    model: Blip2ReportModel, images: torch.Tensor, modality: str, alpha: float = 0.5
) -> list[np.ndarray]:
    """One RGB uint8 (H, W, 3) picture per image: the cross-attention map (``jet`` colours) over the
    image in grey. CT: the axial slice that receives the most attention, in the radiological
    convention (the tower's input grid is RAS); X-ray: the film."""
    from matplotlib import colormaps  # seconds to import; only attention overlays need it

    maps = model.cross_attention_map(images, modality).cpu().numpy()
    pictures = []
    for image, attention in zip(images[:, 0].float().cpu().numpy(), maps):
        if attention.ndim == 3:
            z = lesion_slice_index(attention, axis=-1)
            image, attention = RAS_VIEW.picture(image, z), RAS_VIEW.picture(attention, z)
        lo, hi = np.percentile(image, [1, 99])
        grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0)[..., None]
        heat = (attention - attention.min()) / max(float(attention.max() - attention.min()), 1e-12)
        rgb = (1 - alpha) * grey + alpha * colormaps["jet"](heat)[..., :3]
        pictures.append((rgb * 255).round().astype(np.uint8))
    return pictures


def write_attention_overlays(
    model: Blip2ReportModel, images: torch.Tensor, modality: str, ids: list[str], folder: str | os.PathLike
) -> list[Path]:
    """``attention_overlays`` written as ``<folder>/<id>_attention.png``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for study_id, picture in zip(ids, attention_overlays(model, images, modality)):
        paths.append(folder / f"{study_id}_attention.png")
        Image.fromarray(picture).save(paths[-1])
    return paths
