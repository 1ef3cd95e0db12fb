"""Tests for the synthetic head-CT reports (sam3d/data/synthetic_reports.py) and their manifests.

A small rule-based labeler (sentence-level keywords with "no"/"without" negation, the kind of
labeler the generator promises to satisfy) reads every report back and must recover the labels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from blip.data import join_sections, read_report_manifest, split_sections
from sam3d.data.synthetic import make_synthetic_ich
from sam3d.data.synthetic_reports import write_ct_report

TINY = {"head_scale": 0.4, "spacing_mm": (1.5, 1.5, 3.0)}
SUBTYPES = {
    "intraparenchymal": "intraparenchymal",
    "subdural": "subdural hematoma",
    "intraventricular": "intraventricular hemorrhage",
}


def base(**changes) -> dict:
    meta = {
        "case_id": "case_x",
        "ich_type": "none",
        "side": "none",
        "region": "none",
        "volume_ml": 0.0,
        "midline_shift_mm": 0.0,
        "mass_effect": 0,
        "oedema": False,
        "hydrocephalus": False,
        "max_thickness_mm": None,
    }
    return {**meta, **changes}


# Metadata as the generator writes it, one per pattern the reports must distinguish (plus mass effect
# without shift, which the generator does not produce but user metadata may).
CASES = [
    base(),
    base(
        ich_type="intraparenchymal",
        side="right",
        region="frontal",
        volume_ml=23.4,
        midline_shift_mm=1.6,
        mass_effect=1,
        oedema=True,
    ),
    base(ich_type="intraparenchymal", side="left", region="basal ganglia", volume_ml=6.4),
    base(ich_type="intraparenchymal", side="left", region="temporal", volume_ml=12.0, mass_effect=1),  # no shift
    base(
        ich_type="subdural",
        side="left",
        region="convexity",
        volume_ml=41.0,
        midline_shift_mm=5.0,
        mass_effect=1,
        max_thickness_mm=14.2,
    ),
    base(ich_type="subdural", side="right", region="convexity", volume_ml=3.6, max_thickness_mm=3.8),
    base(ich_type="intraventricular", side="bilateral", region="lateral ventricle", volume_ml=3.2, hydrocephalus=True),
    base(ich_type="intraventricular", side="right", region="lateral ventricle", volume_ml=0.4),
]


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=\.)\s+(?=[A-Z0-9])", text) if s.strip()]


def asserted(sentence: str, phrase: str) -> bool:
    """The sentence mentions ``phrase`` and does not negate it."""
    low = sentence.lower()
    return phrase in low and not re.search(rf"\b(no|without)\b[^.]*{phrase}", low)


def label(report: str) -> dict:
    """Rule-based labels from a report: presence, subtype, side, midline shift, mass effect."""
    findings, impression = split_sections(report)
    all_sentences = sentences(findings) + sentences(impression)
    present = not impression.startswith("No acute intracranial hemorrhage")
    subtype = side = None
    for kind, phrase in SUBTYPES.items():
        naming = [s for s in sentences(impression) if phrase in s.lower()]
        if naming:
            subtype = kind
            words = set(re.findall(r"[a-z]+", naming[0].lower()))
            side = "bilateral" if words & {"bilateral", "bilaterally"} else ({"left", "right"} & words).pop()
    return {
        "ich": int(present),
        "ich_type": subtype or "none",
        "side": side or "none",
        "midline_shift": any(asserted(s, "midline shift") for s in all_sentences),
        "mass_effect": any(asserted(s, "mass effect") for s in all_sentences),
    }


def volume_in(text: str) -> float:
    return float(re.search(r"approximately (\d+(?:\.\d+)?) mL", text).group(1))


def check_report(meta: dict, report: dict) -> None:
    assert report["report"] == join_sections(report["findings"], report["impression"])  # blip's format
    assert split_sections(report["report"]) == (report["findings"], report["impression"])
    labels = label(report["report"])
    assert labels == {
        "ich": int(meta["ich_type"] != "none"),
        "ich_type": meta["ich_type"],
        "side": meta["side"],
        "midline_shift": meta["midline_shift_mm"] > 0,
        "mass_effect": bool(meta["mass_effect"]),
    }, (meta, report["report"])
    if meta["ich_type"] == "none":
        return
    for section in ("findings", "impression"):
        assert abs(volume_in(report[section]) - meta["volume_ml"]) <= 0.5, report[section]
        assert SUBTYPES[meta["ich_type"]] in report[section].lower()
        assert all(other not in report["report"] for kind, other in SUBTYPES.items() if kind != meta["ich_type"])
    if meta["midline_shift_mm"] > 0:  # direction away from the bleed, in its own sentence
        away = {"left": "rightward", "right": "leftward"}[meta["side"]]
        shift = re.search(
            r"(\d+(?:\.\d+)?) mm (?:of )?(\w+) midline shift|(\w+) midline shift of (\d+(?:\.\d+)?) mm",
            report["findings"],
        )
        mm, direction = (shift.group(1), shift.group(2)) if shift.group(1) else (shift.group(4), shift.group(3))
        assert direction == away and abs(float(mm) - meta["midline_shift_mm"]) < 0.05
    if meta["ich_type"] == "intraparenchymal":
        (oedema,) = [s for s in sentences(report["findings"]) if "edema" in s]
        assert asserted(oedema, "edema") == meta["oedema"], oedema
    assert ("hydrocephalus" in report["impression"]) == bool(meta["hydrocephalus"])
    if meta["ich_type"] == "subdural":
        thickness = re.search(r"up to (\S+) mm in thickness|thickness of (\S+) mm", report["findings"])
        assert abs(float(thickness.group(1) or thickness.group(2)) - meta["max_thickness_mm"]) <= 0.5


@pytest.mark.parametrize("meta", CASES, ids=lambda m: f"{m['ich_type']}-{m['side']}")
def test_reports_state_what_the_ground_truth_says(meta):
    for seed in range(12):
        check_report(meta, write_ct_report(meta, np.random.default_rng(seed)))


def test_negative_reports_name_normal_structures():
    for seed in range(12):
        report = write_ct_report(CASES[0], np.random.default_rng(seed))
        assert report["impression"].startswith("No acute intracranial hemorrhage.")
        findings = report["findings"].lower()
        assert "normal in size" in findings and "midline shift" in findings
        assert re.search(r"gr[ae]y-white", findings)


def test_oedema_and_hydrocephalus_are_stated_either_way():
    iph = CASES[1]
    with_oedema = write_ct_report(iph, np.random.default_rng(0))["findings"]
    without = write_ct_report({**iph, "oedema": False}, np.random.default_rng(0))["findings"]
    assert re.search(r"(surrounding|perihematomal) edema", with_oedema)
    assert re.search(r"\bno\b[^.]*edema", without.lower())
    ivh = CASES[-1]  # intraventricular, no hydrocephalus
    assert "no hydrocephalus" in write_ct_report(ivh, np.random.default_rng(0))["findings"].lower()


def test_same_generator_state_gives_the_same_report_and_phrasing_varies():
    for meta in CASES:
        assert write_ct_report(meta, np.random.default_rng(5)) == write_ct_report(meta, np.random.default_rng(5))
    forms = set()
    for meta in CASES:
        reports = {write_ct_report(meta, np.random.default_rng(seed))["report"] for seed in range(30)}
        assert len(reports) >= 10, meta
        for seed in range(30):
            text = write_ct_report(meta, np.random.default_rng(seed))["report"]
            forms.update(re.sub(r"\d+(?:\.\d+)?", "N", s) for s in sentences(split_sections(text)[0]))
    assert len(forms) >= 40  # distinct findings sentence forms, numbers masked


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"ich_type": "contusion", "side": "left"}, "unknown ich_type 'contusion'"),
        ({"ich_type": "subdural", "side": "bilateral", "max_thickness_mm": 5.0}, "side 'bilateral' is not valid"),
        ({"ich_type": "subdural", "side": "left"}, "needs max_thickness_mm"),
    ],
)
def test_refuses_metadata_it_cannot_describe(changes, message):
    with pytest.raises(ValueError, match=message):
        write_ct_report(base(**changes), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"lacks \['volume_ml'\]"):
        write_ct_report({k: v for k, v in base().items() if k != "volume_ml"}, np.random.default_rng(0))


# ---------------------------------------------------------------- written with the dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_reports")
    paths = make_synthetic_ich(
        out, num_cases=8, seed=0, val_fraction=0.25, test_fraction=0.25, positive_fraction=0.8, progress=False, **TINY
    )
    return out, paths


def test_dataset_reports_manifests_and_labels(dataset):
    out, paths = dataset
    cases = {c["case_id"]: c for c in json.loads(Path(paths["cases_json"]).read_text())}
    assert {c["ich_type"] for c in cases.values()} == {"none", "intraparenchymal", "subdural", "intraventricular"}
    seen = []
    for split in ("train", "val", "test"):
        assert paths[f"reports_{split}"] == str(out / f"reports_{split}.jsonl")
        records = read_report_manifest(paths[f"reports_{split}"], check_files=True)
        assert records and all(r.split == split and r.modality == "ct" for r in records)
        for record in records:
            case = cases[record.id]
            assert record.image == str(out / case["path"]) and case["split"] == split
            assert (record.report, record.findings, record.impression) == (
                case["report"],
                case["findings"],
                case["impression"],
            )
            assert record.extra["ich_type"] == case["ich_type"] and record.extra["mask_path"] == case["mask_path"]
            check_report(case, case)
            seen.append(record.id)
    assert sorted(seen) == sorted(cases)
    header = Path(paths["train_csv"]).read_text().splitlines()[0]
    assert "report" not in header  # segmentation CSVs unchanged


def test_dataset_reports_are_deterministic_and_per_case(dataset, tmp_path):
    out, _ = dataset
    before = json.loads((out / "cases.json").read_text())
    again = make_synthetic_ich(
        tmp_path, num_cases=3, seed=0, val_fraction=0.34, positive_fraction=0.8, progress=False, **TINY
    )
    assert again["reports_test"] is None and not (tmp_path / "reports_test.jsonl").exists()
    for case in json.loads(Path(again["cases_json"]).read_text()):  # case k's report ignores num_cases
        assert case["report"] == before[int(case["case_id"][-3:])]["report"]
    reports = [c["report"] for c in before]
    assert len(set(reports)) == len(reports)


def test_project_labeler_recovers_the_ground_truth():
    """The reports are the reference side of the clinical-efficacy metric: blip.evaluation.labeler must read
    them back exactly, or CE on synthetic CT would measure the generator's phrasing, not the model."""
    from blip.evaluation.labeler import label_ct_report

    subtypes = {"intraparenchymal": "IPH", "subdural": "SDH", "intraventricular": "IVH"}
    for meta in CASES:
        for seed in range(20):
            labels = label_ct_report(write_ct_report(meta, np.random.default_rng(seed))["report"])
            expected = {
                "hemorrhage": int(meta["ich_type"] != "none"),
                "side": meta["side"],
                "midline_shift": int(meta["midline_shift_mm"] > 0),
                "mass_effect": int(bool(meta["mass_effect"])),
            }
            expected.update({abbreviation: int(meta["ich_type"] == kind) for kind, abbreviation in subtypes.items()})
            got = {key: int(labels[key] == 1) if key != "side" else labels[key] for key in expected}
            assert got == expected, (meta, seed)
