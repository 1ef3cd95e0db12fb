"""Rule-based findings labeler: negation, uncertainty, No Finding, head-CT subtypes/side/shift,
clinical efficacy, and agreement with the human MeSH labels of the real IU X-ray reports."""

from __future__ import annotations

import pytest

from blip.evaluation.labeler import (
    CHEXPERT_OBSERVATIONS,
    CT_FINDINGS,
    clinical_efficacy,
    label_chest_report,
    label_ct_report,
)
from tests.conftest import SHARED

IU_REPORTS = SHARED / "data" / "iu_xray" / "indiana_reports.csv"


@pytest.mark.parametrize(
    "text, observation, label",
    [
        ("No pleural effusion.", "Pleural Effusion", 0),
        ("There is no evidence of pneumothorax.", "Pneumothorax", 0),
        ("Lungs are free of focal consolidation.", "Consolidation", 0),
        ("No focal consolidation, pleural effusion, or pneumothorax.", "Pneumothorax", 0),
        ("The heart is not enlarged.", "Cardiomegaly", 0),
        ("Heart size is normal.", "Cardiomegaly", 0),
        ("Right pleural effusion has resolved.", "Pleural Effusion", 0),
        ("Atelectasis rather than pneumonia.", "Pneumonia", 0),
        ("Atelectasis rather than pneumonia.", "Atelectasis", 1),
        ("Possible pneumonia.", "Pneumonia", -1),
        ("Pneumothorax cannot be excluded.", "Pneumothorax", -1),
        ("Borderline cardiomegaly.", "Cardiomegaly", -1),
        ("Bibasilar opacities likely represent atelectasis.", "Atelectasis", -1),
        ("Bibasilar opacities likely represent atelectasis.", "Lung Opacity", 1),
        ("Atelectasis versus consolidation in the left base.", "Consolidation", -1),
        ("Cardiomegaly. Small left pleural effusion.", "Pleural Effusion", 1),
        ("Moderate cardiomegaly.", "Cardiomegaly", 1),
        ("Healed right rib fractures.", "Fracture", 1),
        ("Left PICC line with tip in the SVC.", "Support Devices", 1),
        ("No change in cardiomegaly.", "Cardiomegaly", 1),
        ("No pneumothorax, but there is a small right pleural effusion.", "Pleural Effusion", 1),
        ("Heart size is normal.", "Pneumonia", None),
    ],
)
def test_chest_mentions(text, observation, label):
    assert label_chest_report(text)[observation] == label


def test_no_finding_follows_chexpert():
    normal = label_chest_report("Heart size is normal. Lungs are clear. No effusion or pneumothorax.")
    assert set(normal) == set(CHEXPERT_OBSERVATIONS)
    assert normal["No Finding"] == 1
    assert label_chest_report("Possible small effusion.")["No Finding"] is None
    assert label_chest_report("Cardiomegaly.")["No Finding"] is None
    # Support Devices do not count as a pathology.
    assert label_chest_report("Pacemaker in place. Lungs are clear.")["No Finding"] == 1


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "No acute intracranial hemorrhage. No midline shift or mass effect.",
            {"hemorrhage": 0, "side": "none", "midline_shift": 0, "mass_effect": 0, "SDH": None},
        ),
        (
            "Acute left subdural hematoma with 6 mm rightward midline shift.",
            {"hemorrhage": 1, "SDH": 1, "side": "left", "midline_shift": 1, "IPH": None},
        ),
        (
            "Right frontal intraparenchymal hemorrhage with intraventricular extension. Mild mass effect.",
            {"hemorrhage": 1, "IPH": 1, "IVH": 1, "side": "right", "mass_effect": 1},
        ),
        ("Small bilateral subarachnoid hemorrhage.", {"SAH": 1, "side": "bilateral"}),
        ("Right temporal epidural hematoma. No midline shift.", {"EDH": 1, "side": "right", "midline_shift": 0}),
        ("Left extradural haematoma.", {"EDH": 1, "hemorrhage": 1, "side": "left"}),
        ("Left intracerebral hematoma displacing the midline to the right.", {"IPH": 1, "side": "left"}),
        ("Possible small subdural hematoma along the left convexity.", {"SDH": -1, "hemorrhage": -1, "side": "left"}),
        ("Intraventricular hemorrhage without mass effect.", {"IVH": 1, "mass_effect": 0, "side": "none"}),
        ("No subdural or epidural hematoma.", {"SDH": 0, "EDH": 0, "hemorrhage": 0}),
        ("Known SAH in the right sylvian fissure.", {"SAH": 1, "hemorrhage": 1, "side": "right"}),
    ],
)
def test_ct_labels(text, expected):
    labels = label_ct_report(text)
    assert set(labels) == set(CT_FINDINGS)
    assert {k: labels[k] for k in expected} == expected


def test_clinical_efficacy_counts_uncertain_as_positive():
    refs = ["Cardiomegaly. Small right pleural effusion.", "Possible pneumonia.", "Lungs are clear."]
    gens = ["Cardiomegaly. No effusion.", "Pneumonia.", "Small left pleural effusion."]
    ce = clinical_efficacy(refs, gens, "xray")
    assert ce["per_observation"]["Cardiomegaly"]["f1"] == 1.0
    assert ce["per_observation"]["Pneumonia"]["tp"] == 1  # reference -1 counts as positive
    effusion = ce["per_observation"]["Pleural Effusion"]
    assert (effusion["tp"], effusion["fp"], effusion["fn"]) == (0, 1, 1)
    strict = clinical_efficacy(refs, gens, "xray", uncertain_as_positive=False)
    assert strict["per_observation"]["Pneumonia"]["fp"] == 1
    assert 0 < ce["micro"]["f1"] < 1


def test_clinical_efficacy_ct_side_accuracy_and_errors():
    ce = clinical_efficacy(
        ["Left subdural hematoma.", "No hemorrhage."], ["Right subdural hematoma.", "No acute hemorrhage."], "ct"
    )
    assert ce["per_observation"]["SDH"]["f1"] == 1.0
    assert ce["side_accuracy"] == 0.5
    with pytest.raises(ValueError, match="modality"):
        clinical_efficacy(["a"], ["b"], "mri")
    with pytest.raises(ValueError, match="1 reference reports but 2"):
        clinical_efficacy(["a"], ["b", "c"], "ct")


def test_agreement_with_iu_human_labels():
    """Floors a little below what was measured on the 3,826 IU reports with text (see the script)."""
    if not IU_REPORTS.exists():
        pytest.skip(f"{IU_REPORTS} not present")
    from blip.cli.labeler_agreement import measure

    observations = measure(IU_REPORTS)["observations"]
    floors = {
        "Cardiomegaly": 0.92,
        "Lung Opacity": 0.90,
        "Atelectasis": 0.88,
        "Pleural Effusion": 0.83,
        "Pneumothorax": 0.80,
        "Edema": 0.75,
        "Fracture": 0.78,
    }
    for observation, floor in floors.items():
        assert observations[observation]["f1"] >= floor, (observation, observations[observation])


def test_empty_report_states_nothing():
    assert set(label_chest_report("  ").values()) == {None}
    assert label_ct_report("")["side"] == "none" and label_ct_report("")["hemorrhage"] is None
