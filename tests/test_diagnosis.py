"""Diagnosis-driven prompts: the labels and their sentence, the head's plumbing through training,
generation and save/load, and a model whose reports follow the diagnosis it predicts from the image."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from blip.data.dataset import ReportCollator
from blip.diagnosis import DiagnosisHead, diagnosis_sentence, drop_observations, reference_diagnosis
from blip.evaluation.labeler import POSITIVE, binary_observations, label_ct_report
from blip.language_model import build_tiny_gpt2
from blip.model import Blip2ReportModel
from blip.processor import Blip2ReportProcessor
from blip.training.task import ReportTask, batch_output
from tests.conftest import TINY_REPORTS as REPORTS
from tests.conftest import ct_images, tiny_config

SDH = "FINDINGS: Acute left subdural hematoma with mass effect. IMPRESSION: Left subdural hematoma with mass effect."
NORMAL = "FINDINGS: No intracranial hemorrhage. IMPRESSION: Normal head CT."


def test_reference_labels_and_their_sentence():
    sdh = reference_diagnosis(SDH, "ct")
    assert len(sdh) == len(binary_observations("ct"))
    assert diagnosis_sentence(sdh, "ct") == "Diagnosis: hemorrhage, subdural, mass effect."
    assert diagnosis_sentence(reference_diagnosis(NORMAL, "ct"), "ct") == "Diagnosis: no hemorrhage."
    # Uncertain counts as present, as in clinical efficacy.
    assert (
        diagnosis_sentence(reference_diagnosis("Possible small subarachnoid hemorrhage.", "ct"), "ct")
        == "Diagnosis: hemorrhage, subarachnoid."
    )
    xray = reference_diagnosis("The heart is enlarged. Small left pleural effusion.", "xray")
    assert diagnosis_sentence(xray, "xray") == "Diagnosis: cardiomegaly, pleural effusion."
    assert diagnosis_sentence(reference_diagnosis("The lungs are clear.", "xray"), "xray") == "Diagnosis: no finding."
    with pytest.raises(ValueError, match=r"3 diagnosis labels for ct, expected 8 \(hemorrhage, IPH"):
        diagnosis_sentence([1, 0, 0], "ct")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    texts = REPORTS + [
        SDH,
        NORMAL,
        diagnosis_sentence(reference_diagnosis(SDH, "ct"), "ct"),
        "Diagnosis: no hemorrhage.",
    ]
    return build_tiny_gpt2(texts, tmp_path_factory.mktemp("lm"), n_embd=32)


def diagnosed(lm, **changes) -> Blip2ReportModel:
    torch.manual_seed(0)
    return Blip2ReportModel(dataclasses.replace(tiny_config(lm), diagnosis_prompt=True, **changes))


def test_the_head_joins_the_loss_and_the_prompt(lm, tmp_path):
    model = diagnosed(lm)
    assert {m: head.score.out_features for m, head in model.diagnosis_heads.items()} == {"ct": 8, "xray": 14}
    ids, mask = model.processor.tokenize_reports([SDH, NORMAL])
    labels = torch.tensor([reference_diagnosis(SDH, "ct"), reference_diagnosis(NORMAL, "ct")])
    with pytest.raises(ValueError, match="pass the reference labels"):
        model(ct_images(), "ct", ids, mask)
    with pytest.raises(ValueError, match=r"shape \(2, 3\), expected \(2, 8\)"):
        model(ct_images(), "ct", ids, mask, diagnosis=labels[:, :3])
    out = model(ct_images(), "ct", ids, mask, diagnosis=labels, diagnosis_loss_weight=0.5)
    assert out.diagnosis_logits.shape == (2, 8)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.diagnosis_logits, labels)
    torch.testing.assert_close(out.diagnosis_loss, expected)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * expected)
    # The LM reads the sentence of the labels it is given: the prefix grows by its tokens.
    prefix_sdh = model.soft_prompt(ct_images(1), "ct", diagnosis=labels[:1])[0].shape[1]
    prefix_normal = model.soft_prompt(ct_images(1), "ct", diagnosis=labels[1:])[0].shape[1]
    sentence = diagnosis_sentence(labels[0].tolist(), "ct")
    assert prefix_sdh == 4 + len(model.processor.prompt_ids("ct", sentence))
    assert prefix_sdh > prefix_normal
    # Labels only mean something to a model with a head.
    plain = Blip2ReportModel(tiny_config(lm))
    with pytest.raises(ValueError, match="no diagnosis head"):
        plain.generate(ct_images(1), "ct", diagnosis=labels[:1], max_new_tokens=2)
    with pytest.raises(ValueError, match="no diagnosis head"):
        plain.diagnose(ct_images(1), "ct")
    # The heads travel with save_pretrained.
    model.save_pretrained(tmp_path / "m")
    loaded = Blip2ReportModel.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(loaded.diagnose(ct_images(1), "ct"), model.eval().diagnose(ct_images(1), "ct"))


def test_observation_dropout_thins_sentences_but_never_empties_them(lm):
    labels = torch.tensor([reference_diagnosis(SDH, "ct"), reference_diagnosis(NORMAL, "ct")] * 500)
    torch.manual_seed(0)
    dropped = drop_observations(labels, 0.5)
    sdh = labels[0].bool()
    assert not dropped[1::2].any()  # nothing is added
    assert not dropped[0::2][:, ~sdh].any()
    kept = dropped[0::2][:, sdh]  # hemorrhage, SDH, mass effect
    assert kept.any(1).all()  # a study with findings keeps at least one: an empty list says "no hemorrhage"
    # Each present observation goes with probability 0.5, and the 1/8 of studies that would lose all three
    # keep them: kept with probability 0.5 + 1/8 (500 draws: standard error 0.022).
    assert kept.float().mean(0).tolist() == pytest.approx([0.625] * 3, abs=0.07)
    assert diagnosis_sentence(dropped[0].tolist(), "ct").startswith("Diagnosis: ")
    torch.testing.assert_close(drop_observations(labels, 0.0), labels)
    # In training the LM reads the thinned sentence while the head still learns every label; eval reads all.
    # Dropout is a training setting (blip.training.train --diagnosis_dropout), applied by the task's batches.
    model = diagnosed(lm)
    ids, mask = model.processor.tokenize_reports([SDH])
    full = model.soft_prompt(ct_images(1), "ct", diagnosis=labels[:1])[0].shape[1]
    batch = {"image": ct_images(1), "modality": "ct", "input_ids": ids, "attention_mask": mask}
    batch["diagnosis"] = labels[:1]
    torch.manual_seed(0)
    out = batch_output(model.train(), batch, diagnosis_dropout=0.5)
    torch.testing.assert_close(
        out.diagnosis_loss, torch.nn.functional.binary_cross_entropy_with_logits(out.diagnosis_logits, labels[:1])
    )
    assert out.logits.shape[1] < full + ids.shape[1]
    assert batch_output(model.eval(), batch, diagnosis_dropout=0.5).logits.shape[1] == full + ids.shape[1]
    with pytest.raises(ValueError, match=r"diagnosis_dropout must be in \[0, 1\), got 1.0"):
        ReportTask(diagnosis_dropout=1.0)


def test_one_region_showing_a_finding_is_enough_for_the_head():
    """Log-mean-exp pooling: one token of 512 with score 14.1 lifts the logit to 7.9, where a mean over
    the image would give 0.03."""
    head = DiagnosisHead(4, 1)
    with torch.no_grad():
        head.norm.weight.fill_(1.0), head.norm.bias.zero_()
        head.score.weight.copy_(torch.tensor([[5.0, -5.0, 0.0, 0.0]])), head.score.bias.zero_()
    background = torch.zeros(1, 512, 4)  # layer-normed to 0: score 0 everywhere
    lesion = background.clone()
    lesion[0, 77] = torch.tensor([1.0, -1.0, 0.0, 0.0])  # normed to (1.41, -1.41, 0, 0): score 14.1
    score = 10 * math.sqrt(2)
    assert head(background).item() == pytest.approx(0.0, abs=1e-6)
    assert head(lesion).item() == pytest.approx(math.log((511 + math.exp(score)) / 512), rel=1e-4)
    assert head(lesion).item() > 7 > score / 512


def test_collation_stacks_the_labels_of_every_study_or_none(lm):
    from transformers import AutoTokenizer

    collate = ReportCollator(Blip2ReportProcessor(AutoTokenizer.from_pretrained(lm), max_text_len=8))
    item = {"image": torch.zeros(1, 4, 4, 4), "report": SDH, "modality": "ct", "id": "a", "context": None}
    batch = collate([{**item, "diagnosis": [1.0] * 8}, {**item, "id": "b", "diagnosis": [0.0] * 8}])
    assert batch["diagnosis"].shape == (2, 8) and batch["diagnosis"][0].sum() == 8
    assert collate([{**item, "diagnosis": None}])["diagnosis"] is None
    with pytest.raises(ValueError, match=r"diagnosis labels for some studies only \(ids \['a', 'b'\]\)"):
        collate([{**item, "diagnosis": [1.0] * 8}, {**item, "id": "b", "diagnosis": None}])


def test_reports_follow_the_diagnosis_the_head_reads_from_the_image(lm):
    """Two scans, one report each: trained, the head tells the scans apart and each generated report
    follows its own predicted diagnosis (no labels given at generation). Without observation dropout: with
    two studies the queries tell them apart as well as the sentence, and a thinned SDH sentence tips the
    LM towards the queries, which the override below would then not move."""
    model = diagnosed(lm)
    images = ct_images(2, seed=3)
    ids, mask = model.processor.tokenize_reports([SDH, NORMAL])
    labels = torch.tensor([reference_diagnosis(SDH, "ct"), reference_diagnosis(NORMAL, "ct")])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(60):
        loss = model(images, "ct", ids, mask, diagnosis=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert torch.equal(model.diagnose(images, "ct") >= 0.5, labels.bool())
    sdh, normal = model.generate(images, "ct", num_beams=1, max_new_tokens=40)
    assert label_ct_report(sdh)["SDH"] == POSITIVE and label_ct_report(sdh)["side"] == "left", sdh
    assert label_ct_report(normal)["hemorrhage"] != POSITIVE, normal
    # Given labels override the head: the first scan with the normal diagnosis gets the normal report.
    assert model.generate(images[:1], "ct", diagnosis=labels[1:], num_beams=1, max_new_tokens=40) == [normal]
