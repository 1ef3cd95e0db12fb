"""The embedded default's pretrained stand-ins and how they are made: the word-level tokenizer, the
synthetic report corpus, text-only LM pretraining on the engine, and the committed weights in
sam3d/pretrained/ (they load as users load the released ones)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from blip.conditioning import VOLUME_SLOT, fill_volume_slot, volume_slot_text
from blip.evaluation.labeler import label_ct_report
from blip.language_model import build_tiny_gpt2, load_language_model, train_word_tokenizer
from blip.training.lm_pretraining import PromptedReports, pretrain_report_lm
from ich_engine.checkpoint import load_checkpoint
from sam3d import PRETRAINED_DIR
from sam3d.data.synthetic_reports import report_corpus
from sam3d.modeling import load_trained_sam3d

PRETRAINED = PRETRAINED_DIR
CASES = [
    {
        "case_id": "a",
        "ich_type": "subdural",
        "side": "left",
        "region": "convexity",
        "volume_ml": 20.0,
        "midline_shift_mm": 4.0,
        "mass_effect": 1,
        "max_thickness_mm": 8.0,
    },
    {
        "case_id": "b",
        "ich_type": "none",
        "side": "none",
        "region": "none",
        "volume_ml": 0.0,
        "midline_shift_mm": 0.0,
        "mass_effect": 0,
    },
]


def test_word_tokenizer_round_trips_and_writes_only_whole_words():
    texts = ["FINDINGS: A left-sided hematoma (approximately 12.5 mL). IMPRESSION: Gray-white matter preserved."]
    tokenizer = train_word_tokenizer(texts)
    ids = tokenizer(texts[0], add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == texts[0]
    assert tokenizer.decode(tokenizer("hematoma 907 mL", add_special_tokens=False).input_ids) == "hematoma 907 mL"
    words = {t for t in tokenizer.get_vocab() if t.startswith("▁")}
    assert "▁hematoma" in words and not any(w in words for w in ("▁hemat", "▁ma"))
    assert tokenizer.decode(tokenizer("zebra", add_special_tokens=False).input_ids) == "<|unk|>"


def test_report_corpus_varies_sizes_and_keeps_the_findings():
    rows = report_corpus(CASES, variants=30, seed=0)
    assert len(rows) == 60 and rows == report_corpus(CASES, variants=30, seed=0)
    volumes = {r["volume_ml"] for r in rows if r["ich_type"] == "subdural"}
    assert len(volumes) > 20 and 5.0 <= min(volumes) and max(volumes) <= 80.0
    for row in rows:
        labels = label_ct_report(row["report"])
        assert labels["SDH" if row["ich_type"] == "subdural" else "hemorrhage"] == (
            1 if row["ich_type"] != "none" else 0
        )
        stated = re.findall(r"approximately (\d+(?:\.\d)?) mL", row["report"])
        if row["ich_type"] != "none":
            assert stated and abs(float(stated[0]) - row["volume_ml"]) <= 0.5


def test_prompted_reports_take_the_loss_on_the_report_only(tmp_path):
    rows = report_corpus(CASES, variants=4, seed=0)
    lm = build_tiny_gpt2(
        [r["report"] for r in rows] + ["Segmentation: left hemorrhage, no. Head CT report:", VOLUME_SLOT],
        tmp_path / "lm",
        n_embd=32,
        tokenizer="word",
    )
    _, tokenizer = load_language_model(lm, "full")
    data = PromptedReports(rows, tokenizer, 256, conditioned_share=1.0, seed=0)
    ids, labels = data[0]
    prompt = (labels == -100).sum().item()
    assert tokenizer.decode(ids[:prompt]).startswith("Segmentation: left hemorrhage") and tokenizer.decode(
        ids[:prompt]
    ).endswith("Head CT report:")
    # Given the measurement, the report's volume is the slot the reporter fills.
    slotted = volume_slot_text(rows[0]["report"], rows[0]["volume_ml"])
    assert VOLUME_SLOT in slotted and tokenizer.decode(labels[prompt:]) == slotted + "<|endoftext|>"
    batch = data.collate([data[0], data[-1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


def test_lm_pretraining_learns_the_report_language(tmp_path):
    rows = report_corpus(CASES, variants=40, seed=0)
    result = pretrain_report_lm(
        rows[:70],
        rows[70:],
        tmp_path / "lm",
        tmp_path / "run",
        epochs=25,
        lr=5e-3,
        batch_size=8,
        n_layer=1,
        n_embd=32,
        n_head=2,
        seed=0,
    )
    history = result["history"]
    assert history[-1]["val_loss"] < 0.6 * history[0]["train_loss"]
    model, tokenizer = load_language_model(tmp_path / "lm", "frozen")
    prompt = tokenizer("Head CT report:", return_tensors="pt", add_special_tokens=False).input_ids
    text = tokenizer.decode(
        model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)[
            0, prompt.shape[1] :
        ]
    )
    assert text.strip().startswith("FINDINGS:")


@pytest.mark.skipif(not (PRETRAINED / "sam_med3d_small_ich.pth").is_file(), reason="stand-in not made yet")
def test_committed_sam3d_stand_in_loads_with_its_contract_and_recipe():
    model, meta = load_trained_sam3d(PRETRAINED / "sam_med3d_small_ich.pth")
    assert model.config.img_size == 64 and meta["preprocessing"]["normalization"] == "brain_window"
    payload = load_checkpoint(PRETRAINED / "sam_med3d_small_ich.pth")
    assert payload["recipe"]["command"].endswith("make_pretrained.py --part sam3d")  # made before the package move
    assert all(v.dtype == torch.float16 for v in payload["model_state_dict"].values() if v.is_floating_point())
    assert (PRETRAINED / "sam_med3d_small_ich.pth").stat().st_size < 20e6


@pytest.mark.skipif(not (PRETRAINED / "report_lm" / "config.json").is_file(), reason="stand-in not made yet")
def test_committed_report_lm_writes_a_report_for_a_measurement():
    model, tokenizer = load_language_model(PRETRAINED / "report_lm", "frozen")
    recipe = json.loads((PRETRAINED / "report_lm" / "recipe.json").read_text())
    assert recipe["command"].endswith("make_pretrained.py --part lm")
    prompt = tokenizer(
        "Segmentation: left hemorrhage, 23.4 mL. Head CT report:", return_tensors="pt", add_special_tokens=False
    ).input_ids
    out = model.generate(
        prompt,
        max_new_tokens=128,
        num_beams=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    labels = label_ct_report(text)
    assert labels["hemorrhage"] == 1 and labels["side"] == "left"
    # The volume is never copied by the LM: it writes the slot, which the measurement fills.
    assert "IMPRESSION:" in text and VOLUME_SLOT in text and not re.findall(r"\d+(?:\.\d)? mL", text)
    assert "approximately 23 mL" in fill_volume_slot(text, 23.4)
