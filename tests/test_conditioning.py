"""Measurements as conditioning for generation: the sentence, its sources (manifest rows and
segmenter measurements), left-padded prompts that give every study the same result alone or in a
batch, and a model that learns to follow the measurement it is given."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from blip.conditioning import context_from_measurements, context_from_row, measurement_context
from blip.evaluation.labeler import POSITIVE, label_ct_report
from blip.language_model import build_tiny_gpt2
from blip.model import Blip2ReportModel
from tests.conftest import TINY_REPORTS as REPORTS
from tests.conftest import ct_images, tiny_config

LEFT = "FINDINGS: Acute left frontal hemorrhage. IMPRESSION: Left intraparenchymal hemorrhage."
NONE = "FINDINGS: No acute intracranial hemorrhage. IMPRESSION: Normal head CT."


def test_measurement_sentence_and_its_sources():
    assert measurement_context(12.34, "left") == "Segmentation: left hemorrhage, 12.3 mL."
    assert measurement_context(0.2, "left") == "Segmentation: no hemorrhage."  # below MIN_HEMORRHAGE_ML
    with pytest.raises(ValueError, match="side"):
        measurement_context(5.0, "none")
    assert (
        context_from_row({"volume_ml": "6.3", "side": "Right"}, "m.jsonl, line 2")
        == "Segmentation: right hemorrhage, 6.3 mL."
    )
    assert context_from_row({"volume_ml": 0, "side": "none"}, "x") == "Segmentation: no hemorrhage."
    with pytest.raises(ValueError, match=r"m.jsonl, line 4: .*volume_ml"):
        context_from_row({"side": "left"}, "m.jsonl, line 4")
    with pytest.raises(ValueError, match=r"line 5: volume_ml is 9 but side is 'none'"):
        context_from_row({"volume_ml": 9, "side": "none"}, "line 5")

    @dataclasses.dataclass
    class Measured:
        total_volume_ml: float
        side: str

    assert context_from_measurements(Measured(30.04, "bilateral")) == "Segmentation: bilateral hemorrhage, 30.0 mL."


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
    lm = build_tiny_gpt2(
        REPORTS + [LEFT, NONE, measurement_context(12.3, "left")], tmp_path_factory.mktemp("lm"), n_embd=32
    )
    torch.manual_seed(0)
    config = dataclasses.replace(tiny_config(lm, xray=False), condition_on_measurements=True)
    return Blip2ReportModel(config)


def test_contexts_are_required_exactly_when_the_model_is_conditioned(conditioned, tmp_path):
    with pytest.raises(ValueError, match="conditioned on measurements"):
        conditioned.generate(ct_images(1), "ct", max_new_tokens=2)
    with pytest.raises(ValueError, match="2 contexts for a batch of 1"):
        conditioned.generate(ct_images(1), "ct", ["a", "b"], max_new_tokens=2)
    plain = Blip2ReportModel(
        dataclasses.replace(conditioned.config, condition_on_measurements=False),
        conditioned.language_model,
        conditioned.tokenizer,
    )
    with pytest.raises(ValueError, match="does not condition"):
        plain.generate(ct_images(1), "ct", ["Segmentation: no hemorrhage."], max_new_tokens=2)
    conditioned.save_pretrained(tmp_path / "m")
    assert Blip2ReportModel.from_pretrained(tmp_path / "m").config.condition_on_measurements


def test_left_padding_gives_each_study_its_own_result(conditioned):
    """A short and a long context in one batch: loss terms and generated text equal those of each
    study alone, so padding and position ids are right in training and in generation."""
    conditioned.eval()
    contexts = ["Segmentation: no hemorrhage.", "Segmentation: bilateral hemorrhage, 123.4 mL."]
    assert len(conditioned.processor.prompt_ids("ct", contexts[0])) < len(
        conditioned.processor.prompt_ids("ct", contexts[1])
    )
    images = ct_images(2)
    ids, mask = conditioned.processor.tokenize_reports([LEFT, NONE])
    with torch.no_grad():
        batch_logits = conditioned(images, "ct", ids, mask, contexts).logits
        batched = conditioned.generate(images, "ct", contexts, num_beams=1, max_new_tokens=8)
        for i in range(2):
            alone_ids, alone_mask = conditioned.processor.tokenize_reports([[LEFT, NONE][i]])
            alone = conditioned(images[i : i + 1], "ct", alone_ids, alone_mask, contexts[i : i + 1]).logits[0]
            report_len = int(alone_mask.sum())
            torch.testing.assert_close(
                batch_logits[i, -ids.shape[1] :][:report_len],
                alone[-alone_ids.shape[1] :][:report_len],
                atol=1e-4,
                rtol=1e-4,
            )
            assert conditioned.generate(
                images[i : i + 1], "ct", contexts[i : i + 1], num_beams=1, max_new_tokens=8
            ) == [batched[i]]


def test_a_conditioned_model_learns_to_follow_the_measurement(conditioned):
    """Same image, two measurements, two reports: after training the report follows the sentence."""
    model = Blip2ReportModel(conditioned.config)
    image = ct_images(1).expand(2, -1, -1, -1, -1)
    contexts = [measurement_context(12.3, "left"), measurement_context(0.0, "none")]
    ids, mask = model.processor.tokenize_reports([LEFT, NONE])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(60):
        loss = model(image, "ct", ids, mask, contexts).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    left, none = model.generate(image, "ct", contexts, num_beams=1, max_new_tokens=40)
    assert label_ct_report(left)["hemorrhage"] == POSITIVE and label_ct_report(left)["side"] == "left", left
    assert label_ct_report(none)["hemorrhage"] != POSITIVE, none


def test_scan_reporter_conditions_on_the_segmentation_it_measured(tmp_path, monkeypatch):
    """The report of a conditioned model is written after the segmentation, from its measurements."""
    import nibabel as nib

    from blip.app.grounded import ScanReporter
    from sam3d.data.synthetic import synthesize_case
    from tests.conftest import make_tiny_models

    case = synthesize_case(1, seed=0, spacing_mm=(3.0, 3.0, 5.0), ich_type="subdural", head_scale=0.5)
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(case.image_hu, case.affine), scan)
    reporter = ScanReporter(*make_tiny_models(tmp_path / "models"), generation={"max_new_tokens": 4, "num_beams": 1})
    assert reporter.conditioned
    given = []
    generate = reporter.model.generate
    monkeypatch.setattr(
        reporter.model,
        "generate",
        lambda images, modality, contexts, **kw: given.append(contexts) or generate(images, modality, contexts, **kw),
    )
    result = reporter.run(scan, "ct")
    measured = result.to_json()["segmentation"]["measurements"]
    assert given == [[measurement_context(measured["total_volume_ml"], measured["side"])]]
    with pytest.raises(ValueError, match="segment the scan first"):
        reporter.generate(str(scan), "ct")
