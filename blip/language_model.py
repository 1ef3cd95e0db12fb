"""The causal language model of the report model: any local Hugging Face folder, or a tiny GPT-2.

``load_language_model`` reads a folder written by ``save_pretrained`` (GPT-2, OPT, Llama ...) with
``local_files_only=True``: these machines have no network, and a local folder works exactly like a
hub name. Training modes, as BLIP-2 and R2GenGPT use them:

- ``frozen``: the LM only reads the soft prompt (BLIP-2 stage 2).
- ``full``: every LM weight trains (small LMs).
- ``lora``: low-rank adapters (peft) on the attention projections; the base weights stay frozen.

``build_tiny_gpt2`` is the offline default: a byte-level BPE tokenizer trained on the training
reports and a 2-layer GPT-2, saved to a folder and reloaded from it, so the rest of the code only
ever sees the ``from_pretrained`` path.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

LM_MODES = ("frozen", "full", "lora")
END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"

# Attention projections that carry LoRA adapters, by the module names of each architecture family.
LORA_TARGETS = (
    ("c_attn",),  # GPT-2 (fused q/k/v Conv1D)
    ("q_proj", "v_proj"),  # OPT, Llama, Mistral, Qwen
    ("query_key_value",),  # GPT-NeoX, Falcon, BLOOM
)


def lora_target_modules(model: PreTrainedModel) -> list[str]:
    """Module-name suffixes to put LoRA on, detected from the model's own module names."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for targets in LORA_TARGETS:
        if set(targets) <= leaf_names:
            return list(targets)
    raise ValueError(
        f"cannot find attention projections for LoRA in {type(model).__name__}: looked for "
        f"{[list(t) for t in LORA_TARGETS]}; use --lm_mode frozen or full"
    )


def load_language_model(
    path: str | os.PathLike,
    mode: str = "frozen",
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    load_in_4bit: bool = False,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a local HF causal-LM folder, prepared for ``mode``.

    A tokenizer without a pad token (GPT-2, Llama) gets its end-of-text token as pad: report batches
    are right-padded and padding is excluded through the attention mask, never by token id.
    4-bit loading (QLoRA) needs bitsandbytes and a CUDA device.
    """
    if mode not in LM_MODES:
        raise ValueError(f"lm mode must be one of {LM_MODES}, got '{mode}'")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json, not a Hugging Face model folder (runs are offline)")
    kwargs: dict = {"local_files_only": True}
    if load_in_4bit:
        has_bnb, has_cuda = importlib.util.find_spec("bitsandbytes") is not None, torch.cuda.is_available()
        if not (has_bnb and has_cuda):
            raise RuntimeError(f"4-bit loading needs bitsandbytes (installed: {has_bnb}) and a CUDA GPU "
                               f"(available: {has_cuda}); load the LM unquantised instead")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = lora_target_modules(model)
        model = get_peft_model(model, LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
            fan_in_fan_out=targets == ["c_attn"],  # GPT-2's Conv1D stores weights as (in, out)
            task_type="CAUSAL_LM",
        ))
    elif mode == "frozen" or load_in_4bit:
        model.requires_grad_(False)
    return model, tokenizer


def build_tiny_gpt2(
    reports: list[str],
    folder: str | os.PathLike,
    vocab_size: int = 1000,
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 2,
    n_positions: int = 256,
    seed: int = 0,
) -> Path:
    """Train a byte-level BPE tokenizer on ``reports``, create a small GPT-2 with that vocabulary and
    write both to ``folder`` with ``save_pretrained``; returns the folder for ``load_language_model``.

    ``vocab_size`` is an upper bound: a few reports yield fewer merges. ``<|endoftext|>`` ends every
    report (and starts nothing: the soft prompt comes first); ``<|pad|>`` pads.
    """
    from tokenizers import ByteLevelBPETokenizer

    texts = [r for r in reports if r and r.strip()]
    if not texts:
        raise ValueError("build_tiny_gpt2 needs at least one non-empty report to train its tokenizer")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=[END_OF_TEXT, PAD],
                            show_progress=False)
    bpe.save_model(str(folder))
    tokenizer = GPT2TokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), pad_token=PAD)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the same reports and seed give the same initial LM
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    torch.random.set_rng_state(generator_state)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
