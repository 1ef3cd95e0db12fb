"""LAVIS BLIP-2 checkpoints → ``QFormerBridge`` weights.

LAVIS (``Blip2OPT``, ``Blip2T5``, stage-1 ``Blip2Qformer``) names the Q-Former as a BERT
(``Qformer.bert.encoder.layer.0.attention.self.query``); transformers' ``Blip2QFormerModel`` names the
same tensors differently (``qformer.encoder.layer.0.attention.attention.query``). The mapping:

======================================================  =================================================
LAVIS                                                   QFormerBridge
======================================================  =================================================
``query_tokens``                                        ``query_tokens``
``ln_vision.*``                                         ``ln_vision.*``
``opt_proj.*`` / ``t5_proj.*``                          ``language_projection.*``
``Qformer.bert.embeddings.LayerNorm.*``                 ``qformer.layernorm.*``
``Qformer.bert.encoder.layer.N.attention.self.*``       ``qformer.encoder.layer.N.attention.attention.*``
``Qformer.bert.encoder.layer.N.crossattention.self.*``  ``qformer.encoder.layer.N.crossattention.attention.*``
``Qformer.bert.encoder.layer.N.{attention,crossattention}.output.*``, ``...intermediate_query.*``,
``...output_query.*``                                   same names under ``qformer.encoder.layer.N.``
======================================================  =================================================

Dropped, because the bridge has no such part: the vision encoder, the language model, the position-id
buffer, the text embeddings, the text-path FFNs (``layer.N.intermediate`` / ``layer.N.output``: the bridge
only runs query positions), stage 1's ``cls`` head and its ITC/ITM heads.

The bridge's interfaces to foreign models are re-initialised, with a warning, when their width differs
from the checkpoint's: ``ln_vision`` and the cross-attention key/value weights (a LAVIS checkpoint made
for EVA-CLIP, width 1408, feeding a 384-wide SAM-Med3D bridge; the key/value biases have the Q-Former's
width and still load) and ``language_projection`` (a different language model, or a stage-1 checkpoint
that has no projection). Anything else that does not fit is an
error naming the keys.

Command line: ``sam3d-convert-lavis`` (``blip.cli.convert_lavis``).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence

import torch

from blip.qformer import QFormerBridge, QFormerBridgeConfig
from ich_engine.checkpoint import CheckpointError, extract_state_dict, load_checkpoint, load_state_dict_strict

_LAYER = r"Qformer\.bert\.encoder\.layer\.(\d+)\."

# (LAVIS pattern, bridge replacement); the first match renames a key.
RENAMES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^(query_tokens)$"), r"\1"),
    (re.compile(r"^ln_vision\.(weight|bias)$"), r"ln_vision.\1"),
    (re.compile(r"^(?:opt|t5)_proj\.(weight|bias)$"), r"language_projection.\1"),
    (re.compile(r"^Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)$"), r"qformer.layernorm.\1"),
    (re.compile(rf"^{_LAYER}(attention|crossattention)\.self\."), r"qformer.encoder.layer.\1.\2.attention."),
    (
        re.compile(rf"^{_LAYER}(attention\.output|crossattention\.output|intermediate_query|output_query)\."),
        r"qformer.encoder.layer.\1.\2.",
    ),
]

# (LAVIS pattern, what it is); keys matching these have no counterpart in the bridge.
DROPPED: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^visual_encoder\."), "vision encoder (the bridge takes its features as input)"),
    (re.compile(r"^(?:opt|t5)_model\."), "language model"),
    (re.compile(r"^Qformer\.bert\.embeddings\.position_ids$"), "position-id buffer"),
    (re.compile(r"^Qformer\.bert\.embeddings\.(?:word|position)_embeddings\."), "text embeddings"),
    (re.compile(rf"^{_LAYER}(?:intermediate|output)\."), "text-path FFNs (the bridge runs query positions only)"),
    (re.compile(r"^Qformer\.cls\."), "stage-1 language-modelling head"),
    (re.compile(r"^(?:vision_proj\.|text_proj\.|itm_head\.|temp$)"), "stage-1 contrastive/matching heads"),
]

# Bridge keys at the interfaces to the vision tower and the language model: re-initialised when the
# checkpoint's width differs. Only the projection may be absent (stage-1 checkpoints have none).
REINIT_ON_MISMATCH = re.compile(
    r"^(?:ln_vision\.|language_projection\."
    r"|qformer\.encoder\.layer\.\d+\.crossattention\.attention\.(?:key|value)\.weight$)"
)
REINIT_WHEN_MISSING = re.compile(r"^language_projection\.")


def _bridge_shapes(config: QFormerBridgeConfig) -> dict[str, torch.Size]:
    """Key → shape of a bridge with this config, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return {key: value.shape for key, value in QFormerBridge(config).state_dict().items()}


def _listing(items: Sequence[str], limit: int = 8) -> str:
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{list(items[:limit])}{more}"


def convert_lavis_state_dict(
    lavis_sd: Mapping[str, torch.Tensor], config: QFormerBridgeConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a LAVIS BLIP-2 state dict onto a bridge built from ``config``.

    Returns the bridge state dict and human-readable notes (what was dropped, what is re-initialised).
    Re-initialised keys are absent from the returned dict, so the caller keeps its fresh values for them;
    they are also reported through ``warnings.warn``. Raises ``CheckpointError`` naming every key that is
    unknown, missing or mis-shaped outside the re-initialisable interfaces.
    """
    expected = _bridge_shapes(config)
    converted: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    dropped: dict[str, list[str]] = {}
    unexpected: list[str] = []
    for lavis_key, tensor in lavis_sd.items():
        why_dropped = next((why for pattern, why in DROPPED if pattern.search(lavis_key)), None)
        if why_dropped is not None:
            dropped.setdefault(why_dropped, []).append(lavis_key)
            continue
        bridge_key = next(
            (pattern.sub(repl, lavis_key) for pattern, repl in RENAMES if pattern.search(lavis_key)), None
        )
        if bridge_key is None or bridge_key not in expected:
            unexpected.append(lavis_key if bridge_key is None else f"{lavis_key} (-> {bridge_key})")
            continue
        if bridge_key in converted:
            raise CheckpointError(f"LAVIS keys {source_of[bridge_key]!r} and {lavis_key!r} both map to {bridge_key!r}")
        converted[bridge_key] = tensor
        source_of[bridge_key] = lavis_key

    reinitialised: dict[str, str] = {}  # bridge key -> why
    mismatched: list[str] = []
    for key in sorted(set(converted) & set(expected)):
        if converted[key].shape != expected[key]:
            detail = f"checkpoint {tuple(converted[key].shape)} vs bridge {tuple(expected[key])}"
            if REINIT_ON_MISMATCH.search(key):
                reinitialised[key] = detail
            else:
                mismatched.append(f"{source_of[key]}: {detail}")
    missing = []
    for key in sorted(set(expected) - set(converted)):
        if REINIT_WHEN_MISSING.search(key):
            reinitialised[key] = "not in the checkpoint"
        else:
            missing.append(key)

    if unexpected or missing or mismatched:
        parts = [
            f"{title} ({len(items)}): {_listing(items)}"
            for title, items in (("unexpected", unexpected), ("missing", missing), ("shape mismatch", mismatched))
            if items
        ]
        raise CheckpointError("LAVIS state dict does not fit the Q-Former bridge: " + "; ".join(parts))

    loaded = {key: value for key, value in converted.items() if key not in reinitialised}
    notes = [f"loaded {len(loaded)} of the bridge's {len(expected)} tensors from LAVIS keys"]
    notes += [f"dropped {len(keys)} key(s) of the {why}: {_listing(keys, 3)}" for why, keys in dropped.items()]
    if reinitialised:
        message = (
            "re-initialised, to be trained (the checkpoint was made for a different vision tower or language "
            "model): " + "; ".join(f"{key} ({why})" for key, why in reinitialised.items())
        )
        warnings.warn(message, stacklevel=2)
        notes.append(message)
    return loaded, notes


def load_lavis_into_bridge(bridge: QFormerBridge, checkpoint_path: str | os.PathLike) -> list[str]:
    """Load a LAVIS checkpoint (``{'model': state_dict, ...}`` or a bare state dict) into ``bridge``,
    strictly: every bridge tensor comes from the checkpoint except the re-initialised interfaces, which
    keep the bridge's current values. Returns the conversion notes."""
    lavis_sd = extract_state_dict(load_checkpoint(checkpoint_path), checkpoint_path)
    converted, notes = convert_lavis_state_dict(lavis_sd, bridge.config)
    state_dict = {**bridge.state_dict(), **converted}
    load_state_dict_strict(bridge, state_dict, str(checkpoint_path))
    return notes
