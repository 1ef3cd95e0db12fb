"""The BLIP-2 bridge from a vision tower to a language model: ``ln_vision`` → Q-Former → projection.

The Q-Former is transformers' ``Blip2QFormerModel`` built from a ``Blip2QFormerConfig`` whose
``encoder_hidden_size`` is the vision width (384 for the SAM-Med3D neck). ``Blip2Config`` is not used
on purpose: it overwrites that width with its own vision tower's, which would rule out a foreign
encoder. Parameter names follow transformers (``qformer.encoder.layer.0.crossattention.attention.key``),
so ``blip.convert_lavis`` maps LAVIS checkpoints onto this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from ich_engine.checkpoint import CheckpointError, extract_state_dict, load_checkpoint, load_state_dict_strict
from ich_engine.config import from_known_keys

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"


@dataclass
class QFormerBridgeConfig:
    """Hyperparameters of the bridge; the defaults are BLIP-2's Q-Former (BERT-base shape) fed by the
    SAM-Med3D neck (384 channels, 8^3 = 512 tokens) and feeding a 768-wide language model."""

    vision_width: int = 384
    num_query_tokens: int = 32
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    layer_norm_eps: float = 1e-12
    vision_layer_norm_eps: float = 1e-5
    lm_hidden_size: int = 768
    # > 0: the Q-Former also reads text (BLIP-2 stage 1: ITC, ITM, ITG): word embeddings of this many
    # ids and each layer's text feed-forward, as LAVIS's BERT-based Q-Former has. 0: queries only.
    text_vocab_size: int = 0
    max_text_positions: int = 512

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> QFormerBridgeConfig:
        return from_known_keys(cls, values)

    def qformer_config(self) -> Blip2QFormerConfig:
        """The transformers config of the Q-Former. Attention is ``eager`` because only eager attention
        can return the cross-attention maps (which vision tokens each query reads); with 32 queries the
        fused SDPA kernel would save little."""
        return Blip2QFormerConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            cross_attention_frequency=self.cross_attention_frequency,
            layer_norm_eps=self.layer_norm_eps,
            encoder_hidden_size=self.vision_width,
            use_qformer_text_input=self.text_vocab_size > 0,
            vocab_size=max(self.text_vocab_size, 1),
            max_position_embeddings=self.max_text_positions,
            pad_token_id=None,
            # transformers 5 configs take attn_implementation through an __init__ wrapper their typed signature lacks
            attn_implementation="eager",  # type: ignore[call-arg]
        )


@dataclass
class QFormerBridgeOutput:
    """``query_output`` (B, Q, hidden_size): the Q-Former's last hidden state.
    ``projected`` (B, Q, lm_hidden_size): soft prompt tokens for the language model.
    ``cross_attentions``: one (B, heads, Q, N) map per cross-attention layer, when asked for."""

    query_output: torch.Tensor
    projected: torch.Tensor
    cross_attentions: tuple[torch.Tensor, ...] | None = None


class QFormerBridge(nn.Module):
    """Vision features (B, N, vision_width) → ``ln_vision`` → Q-Former (``num_query_tokens`` learned
    queries, cross-attention to the vision features every ``cross_attention_frequency`` layers) →
    ``language_projection`` → (B, num_query_tokens, lm_hidden_size)."""

    def __init__(self, config: QFormerBridgeConfig | None = None) -> None:
        super().__init__()
        self.config = config or QFormerBridgeConfig()
        qformer_config = self.config.qformer_config()
        self.ln_vision = nn.LayerNorm(self.config.vision_width, eps=self.config.vision_layer_norm_eps)
        self.query_tokens = nn.Parameter(torch.empty(1, self.config.num_query_tokens, self.config.hidden_size))
        nn.init.normal_(self.query_tokens, mean=0.0, std=qformer_config.initializer_range)  # as LAVIS
        self.qformer = Blip2QFormerModel(qformer_config)
        self.text_embeddings = Blip2TextEmbeddings(qformer_config) if self.config.text_vocab_size > 0 else None
        self.language_projection = nn.Linear(self.config.hidden_size, self.config.lm_hidden_size)

    def queries(
        self,
        image_embeds: torch.Tensor,
        image_attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ):
        """The Q-Former over ``ln_vision(image_embeds)`` with the queries alone (transformers output)."""
        if image_embeds.ndim != 3 or image_embeds.shape[-1] != self.config.vision_width:
            raise ValueError(
                f"image_embeds must be (B, N, {self.config.vision_width}), found {tuple(image_embeds.shape)}"
            )
        image_embeds = self.ln_vision(image_embeds)
        return self.qformer(
            query_embeds=self.query_tokens.expand(image_embeds.shape[0], -1, -1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_attention_mask,
            output_attentions=output_attentions,
        )

    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, hidden) for text alone (ITC's text side): no queries, no image."""
        text_embeddings = self._require_text()
        return self.qformer(
            query_embeds=text_embeddings(input_ids), query_length=0, attention_mask=attention_mask
        ).last_hidden_state

    def image_grounded_text(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        """(B, Q + T, hidden): queries and text in one pass, the queries reading the image. ``causal``
        False (ITM): every position sees every other. True (ITG): queries see only queries, text sees the
        queries and the text before it, so the text is generated from what the queries took from the image."""
        text_embeddings = self._require_text()
        image_embeds = self.ln_vision(image_embeds)
        batch, num_queries = image_embeds.shape[0], self.config.num_query_tokens
        queries = self.query_tokens.expand(batch, -1, -1)
        embeds = text_embeddings(input_ids, query_embeds=queries)
        keys = torch.cat([attention_mask.new_ones(batch, num_queries), attention_mask], dim=1).bool()
        length = num_queries + input_ids.shape[1]
        allowed = keys[:, None, :].expand(batch, length, length).clone()
        if causal:
            allowed[:, :num_queries, num_queries:] = False
            allowed[:, num_queries:, num_queries:] &= torch.tril(
                torch.ones(length - num_queries, length - num_queries, dtype=torch.bool, device=keys.device)
            )
        additive = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device)
        additive = additive.masked_fill(~allowed, torch.finfo(embeds.dtype).min)[:, None]
        return self.qformer(
            query_embeds=embeds, query_length=num_queries, attention_mask=additive, encoder_hidden_states=image_embeds
        ).last_hidden_state

    def _require_text(self) -> Blip2TextEmbeddings:
        """The text embeddings; a ValueError for a bridge built without them."""
        if self.text_embeddings is None:
            raise ValueError(
                "this Q-Former reads no text (QFormerBridgeConfig.text_vocab_size is 0): "
                "stage-1 objectives need a bridge built with text_vocab_size > 0"
            )
        return self.text_embeddings

    def forward(
        self,
        image_embeds: torch.Tensor,
        image_attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> QFormerBridgeOutput:
        """``image_embeds`` (B, N, vision_width), e.g. the SAM-Med3D neck output flattened to (B, 512, 384);
        ``image_attention_mask`` (B, N), 1 for tokens to read and 0 for padding (all read when None)."""
        outputs = self.queries(image_embeds, image_attention_mask, output_attentions)
        query_output = outputs.last_hidden_state
        return QFormerBridgeOutput(
            query_output=query_output,
            projected=self.language_projection(query_output),
            cross_attentions=outputs.cross_attentions,
        )

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors``, the layout ``from_pretrained`` reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> QFormerBridge:
        """Rebuild a bridge from a ``save_pretrained`` folder; weights come from ``model.safetensors`` or,
        for folders written with ``torch.save``, ``pytorch_model.bin``."""
        folder = Path(folder)
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not a QFormerBridge folder")
        bridge = cls(QFormerBridgeConfig.from_dict(json.loads(config_path.read_text())))
        weights_path = folder / WEIGHTS_NAME
        if weights_path.is_file():
            state_dict = load_file(str(weights_path))
        elif (folder / TORCH_WEIGHTS_NAME).is_file():
            weights_path = folder / TORCH_WEIGHTS_NAME
            state_dict = extract_state_dict(load_checkpoint(weights_path), weights_path)
        else:
            raise CheckpointError(f"{folder} holds neither {WEIGHTS_NAME} nor {TORCH_WEIGHTS_NAME}")
        load_state_dict_strict(bridge, state_dict, str(weights_path))
        return bridge
