"""Caption metrics (pycocoevalcap) and the report evaluation script.

METEOR starts a JVM that loads its paraphrase tables (about 20 s here), so it runs once per module.
"""

from __future__ import annotations

import csv
import json
import logging

import psutil
import pytest

from blip.cli import evaluate as evaluate_reports
from blip.evaluation import metrics
from blip.evaluation.metrics import caption_metrics, simple_tokenize

REFERENCES = [
    "The heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly. Small left pleural effusion. No pneumothorax.",
    "No acute cardiopulmonary abnormality. Degenerative changes of the thoracic spine.",
]
HYPOTHESES = [
    "Heart size is normal. Lungs are clear. No effusion or pneumothorax.",
    "The heart is enlarged. There is a small left pleural effusion.",
    "No acute cardiopulmonary disease.",
]
# Computed once with PTB tokenisation (pycocoevalcap 1.2, meteor-1.5.jar) and checked for plausibility:
# close paraphrases, so BLEU falls from ~0.55 (1-gram) to ~0.32 (4-gram); pair 3 has no 4-gram match
# (per-report BLEU-4 ~0); CIDEr is high because a 3-report corpus gives most n-grams a large idf.
EXPECTED_CORPUS = {
    "BLEU_1": 0.54964,
    "BLEU_2": 0.49663,
    "BLEU_3": 0.42786,
    "BLEU_4": 0.32366,
    "METEOR": 0.32151,
    "ROUGE_L": 0.56419,
    "CIDEr": 3.05003,
}
EXPECTED_PER_SAMPLE = {
    "BLEU_4": [0.43954, 0.23462, 0.0],
    "METEOR": [0.45923, 0.29541, 0.16568],
    "ROUGE_L": [0.86136, 0.43339, 0.39783],
}


def _java_children() -> list[psutil.Process]:
    return [c for c in psutil.Process().children(recursive=True) if "java" in c.name()]


@pytest.fixture(scope="module")
def known_pairs():
    if not metrics.java_available():
        pytest.skip("java not on PATH (METEOR and the PTB tokenizer need it)")
    return caption_metrics(REFERENCES, HYPOTHESES, tokenize="ptb", meteor=True)


def test_known_pairs_match_recorded_values(known_pairs):
    assert known_pairs["tokenize"] == "ptb" and known_pairs["n"] == 3
    for key, value in EXPECTED_CORPUS.items():
        assert known_pairs["corpus"][key] == pytest.approx(value, abs=1e-4), key
    for key, values in EXPECTED_PER_SAMPLE.items():
        assert known_pairs["per_sample"][key] == pytest.approx(values, abs=1e-4), key


def test_meteor_jvm_is_closed(known_pairs):
    assert known_pairs["corpus"]["METEOR"] > 0
    assert _java_children() == []


def test_identical_and_unrelated():
    same = caption_metrics(REFERENCES, REFERENCES, tokenize="simple", meteor=False)
    assert same["corpus"]["BLEU_4"] == pytest.approx(1.0, abs=1e-6)
    assert same["corpus"]["ROUGE_L"] == pytest.approx(1.0)
    assert same["corpus"]["METEOR"] is None and same["per_sample"]["METEOR"] is None
    unrelated = caption_metrics(
        REFERENCES, ["banana sandwich", "quantum lattice gauge", "opera tickets"], tokenize="simple", meteor=False
    )
    assert unrelated["corpus"]["BLEU_4"] < 1e-6
    assert unrelated["corpus"]["ROUGE_L"] == 0.0 and unrelated["corpus"]["CIDEr"] == 0.0


def test_simple_tokenizer_matches_ptb_on_plain_text(known_pairs):
    simple = caption_metrics(REFERENCES, HYPOTHESES, tokenize="simple", meteor=False)
    for key in ("BLEU_4", "ROUGE_L", "CIDEr"):
        assert simple["corpus"][key] == pytest.approx(known_pairs["corpus"][key], abs=1e-9)
    assert simple_tokenize("No pleural-effusion, XXXX.\nClear lungs!") == "no pleural effusion xxxx clear lungs"


def test_empty_inputs():
    with pytest.raises(ValueError, match="no samples"):
        caption_metrics([], [], tokenize="simple", meteor=False)
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        caption_metrics(["a b", "c d"], ["a b"], tokenize="simple", meteor=False)
    with pytest.raises(ValueError, match="index 1"):
        caption_metrics(["a b", "..."], ["a b", "c"], tokenize="simple", meteor=False)
    empty = caption_metrics(REFERENCES, ["", HYPOTHESES[1], "  "], tokenize="simple", meteor=False)
    assert empty["n_empty_hypotheses"] == 2
    assert empty["per_sample"]["BLEU_4"][0] == 0.0 and empty["per_sample"]["ROUGE_L"][2] == 0.0


def test_without_java(monkeypatch, caplog):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="METEOR needs Java"):
        caption_metrics(REFERENCES, HYPOTHESES)
    with pytest.raises(RuntimeError, match="needs Java"):
        caption_metrics(REFERENCES, HYPOTHESES, tokenize="ptb", meteor=False)
    with caplog.at_level(logging.WARNING, logger="blip.evaluation.metrics"):
        result = caption_metrics(REFERENCES, HYPOTHESES, meteor=False)
    assert result["tokenize"] == "simple" and "java not found" in caplog.text


def _write_csv(path, rows, fields):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_evaluate_reports_script(tmp_path):
    rows = [
        {
            "id": "cxr1",
            "reference": "FINDINGS: Mild cardiomegaly. XXXX XXXX. IMPRESSION: Small left pleural effusion.",
            "generated": "FINDINGS: The heart is enlarged. IMPRESSION: No pleural effusion.",
            "modality": "xray",
        },
        {
            "id": "cxr2",
            "reference": "The lungs are clear. No pneumothorax.",
            "generated": "Lungs are clear.",
            "modality": "",
        },
        {
            "id": "ct1",
            "reference": "Acute left subdural hematoma with 5 mm rightward midline shift.",
            "generated": "Left subdural hematoma. No midline shift.",
            "modality": "ct",
        },
    ]
    manifest = tmp_path / "generations.csv"
    _write_csv(manifest, rows, ["id", "reference", "generated", "modality"])
    out = tmp_path / "eval"
    assert (
        evaluate_reports.main(
            [
                "--input",
                str(manifest),
                "--output_dir",
                str(out),
                "--modality",
                "xray",
                "--tokenize",
                "simple",
                "--no_meteor",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 3 and summary["tokenize"] == "simple"
    assert set(summary["caption_metrics"]) == set(metrics.METRIC_KEYS) and summary["caption_metrics"]["METEOR"] is None
    xray, ct = summary["clinical_efficacy"]["xray"], summary["clinical_efficacy"]["ct"]
    assert xray["n"] == 2 and xray["per_observation"]["Cardiomegaly"]["f1"] == 1.0
    assert xray["per_observation"]["Pleural Effusion"]["fn"] == 1
    assert ct["per_observation"]["SDH"]["f1"] == 1.0 and ct["per_observation"]["midline_shift"]["fn"] == 1
    assert ct["side_accuracy"] == 1.0
    with open(out / "per_sample.csv", newline="", encoding="utf-8") as f:
        per_sample = list(csv.DictReader(f))
    assert [r["id"] for r in per_sample] == ["cxr1", "cxr2", "ct1"]
    assert per_sample[1]["modality"] == "xray" and per_sample[0]["METEOR"] == ""
    assert json.loads(per_sample[2]["reference_labels"])["midline_shift"] == 1
    assert float(per_sample[2]["label_agreement"]) == pytest.approx(7 / 8)


def test_evaluate_reports_errors(tmp_path, capsys):
    missing = tmp_path / "missing.csv"
    _write_csv(missing, [{"id": "a", "reference": "No effusion."}], ["id", "reference"])
    from ich_engine.cli import run_main

    # A bad row is a data error: one line, exit 1 (usage errors exit 2).
    assert (
        run_main(
            evaluate_reports.main,
            ["--input", str(missing), "--output_dir", str(tmp_path / "o"), "--modality", "xray", "--no_meteor"],
        )
        == 1
    )
    err = capsys.readouterr().err
    assert str(missing) in err and "line 2" in err and "generated" in err

    jsonl = tmp_path / "no_modality.jsonl"
    jsonl.write_text(json.dumps({"id": "a", "reference": "No effusion.", "generated": "No effusion."}) + "\n")
    assert (
        run_main(evaluate_reports.main, ["--input", str(jsonl), "--output_dir", str(tmp_path / "o"), "--no_meteor"])
        == 1
    )
    err = capsys.readouterr().err
    assert "line 1" in err and "modality" in err


def test_meteor_failure_is_an_error_and_frees_the_jvm(monkeypatch):
    """A JVM that dies mid-score leaves Meteor's lock held; the error must be clear and nothing may hang."""
    if not metrics.java_available():
        pytest.skip("java not on PATH")
    from pycocoevalcap.meteor.meteor import Meteor

    def dying_jvm(self, gts, res):
        self.lock.acquire()
        raise ValueError("could not convert string to float: ''")

    monkeypatch.setattr(Meteor, "compute_score", dying_jvm)
    with pytest.raises(RuntimeError, match="METEOR .* returned no score"):
        caption_metrics(REFERENCES, HYPOTHESES, tokenize="simple")
    assert _java_children() == []
