"""The causal language model of the report model: any local Hugging Face folder, or a tiny GPT-2.

``load_language_model`` reads a folder written by ``save_pretrained`` (GPT-2, OPT, Llama ...) with
``local_files_only=True``: these machines have no network, and a local folder works exactly like a
hub name. Training modes, as BLIP-2 and R2GenGPT use them:

- ``frozen``: the LM only reads the soft prompt (BLIP-2 stage 2).
- ``full``: every LM weight trains (small LMs).
- ``lora``: low-rank adapters (peft) on the attention projections; the base weights stay frozen.

``build_tiny_gpt2`` is the offline default: a tokenizer trained on the training reports and a small
GPT-2, saved to a folder and reloaded from it, so the rest of the code only ever sees the
``from_pretrained`` path. Its tokenizer is byte-level BPE (any text) or word-level (``"word"``):
a word-level model can only write whole words it has seen, never a fragment such as
"ventricleerdense", at the price of an unknown-word token for words outside its vocabulary.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

if TYPE_CHECKING:
    from peft import PeftModel

    # What AutoModelForCausalLM.from_pretrained is annotated to return: a PreTrainedModel that generates.
    from transformers.models.auto.modeling_auto import _BaseModelWithGenerate as CausalLM

LM_MODES = ("frozen", "full", "lora")
END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
UNKNOWN = "<|unk|>"
TOKENIZER_KINDS = ("bpe", "word")

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


def load_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A local LM folder's tokenizer as reports are tokenised here: GPT-2 has no pad token, so the
    end-of-text one pads (padding is masked anyway), on the right (reports follow the soft prompt)."""
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_language_model(
    path: str | os.PathLike,
    mode: str = "frozen",
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    load_in_4bit: bool = False,
) -> tuple[CausalLM | PeftModel, PreTrainedTokenizerBase]:
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
            raise RuntimeError(
                f"4-bit loading needs bitsandbytes (installed: {has_bnb}) and a CUDA GPU "
                f"(available: {has_cuda}); load the LM unquantised instead"
            )
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model  # tens of seconds to import on 2 cores: LoRA runs only

        targets = lora_target_modules(model)
        lora_model = get_peft_model(
            model,
            LoraConfig(
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=targets,
                fan_in_fan_out=targets == ["c_attn"],  # GPT-2's Conv1D stores weights as (in, out)
                task_type="CAUSAL_LM",
            ),
        )
        return lora_model, tokenizer
    if mode == "frozen" or load_in_4bit:
        model.requires_grad_(False)
    return model, tokenizer


def train_word_tokenizer(texts: list[str], min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``texts``: words (with a leading-space marker), each punctuation mark
    and each digit are tokens, so any number can be written and decoding gives back the exact text."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNKNOWN))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(prepend_scheme="always"),
            pre_tokenizers.Split(Regex(r"[^\w▁]"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="always")
    digits = [str(d) for d in range(10)]  # every number is writable even if a digit is rare in ``texts``
    tokenizer.train_from_iterator(
        list(texts) + digits,
        trainers.WordLevelTrainer(
            special_tokens=[END_OF_TEXT, PAD, UNKNOWN], min_frequency=min_frequency, show_progress=False
        ),
    )
    # Slots such as blip.conditioning's "<|volume|>" are one token, and decoding keeps them.
    slots = sorted({m for text in texts for m in re.findall(r"<\|[a-z_]+\|>", text)} - {END_OF_TEXT, PAD, UNKNOWN})
    tokenizer.add_tokens([AddedToken(slot, special=False, normalized=False) for slot in slots])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, pad_token=PAD, unk_token=UNKNOWN)


def _train_bpe_tokenizer(texts: list[str], vocab_size: int, folder: Path) -> PreTrainedTokenizerBase:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=1, special_tokens=[END_OF_TEXT, PAD], show_progress=False
    )
    bpe.save_model(str(folder))
    # transformers 5: GPT2Tokenizer is the tokenizers-backed class (GPT2TokenizerFast only an alias of it)
    return GPT2Tokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), pad_token=PAD)


def build_tiny_gpt2(
    reports: list[str],
    folder: str | os.PathLike,
    vocab_size: int = 1000,
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 2,
    n_positions: int = 256,
    seed: int = 0,
    tokenizer: str = "bpe",
) -> Path:
    """Train a tokenizer (``tokenizer``: "bpe" or "word", see the module) on ``reports``, create a small
    GPT-2 with that vocabulary and write both to ``folder`` with ``save_pretrained``; returns the
    folder for ``load_language_model``.

    ``vocab_size`` bounds the BPE vocabulary (a few reports yield fewer merges); a word-level
    vocabulary holds every word of ``reports``. ``<|endoftext|>`` ends every report (and starts
    nothing: the soft prompt comes first); ``<|pad|>`` pads.
    """
    if tokenizer not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer must be one of {TOKENIZER_KINDS}, got {tokenizer!r}")
    texts = [r for r in reports if r and r.strip()]
    if not texts:
        raise ValueError("build_tiny_gpt2 needs at least one non-empty report to train its tokenizer")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text_tokenizer = (
        train_word_tokenizer(texts) if tokenizer == "word" else _train_bpe_tokenizer(texts, vocab_size, folder)
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the same reports and seed give the same initial LM
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(text_tokenizer),
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            n_positions=n_positions,
            bos_token_id=text_tokenizer.eos_token_id,
            eos_token_id=text_tokenizer.eos_token_id,
            pad_token_id=text_tokenizer.pad_token_id,
        )
    )
    torch.random.set_rng_state(generator_state)
    model.save_pretrained(folder)
    text_tokenizer.save_pretrained(folder)
    return folder
