"""The demo's record (outputs/demo/summary.json): the labeler's reading of a report in the summary's
words, and the goal figures computed from per-scan records."""

from __future__ import annotations

import pytest

from blip.cli.demo import figures, goals, report_labels

LEFT_SDH = (
    "FINDINGS: There is an acute subdural hematoma along the left convexity, approximately 12 mL. "
    "IMPRESSION: Acute left subdural hematoma."
)
NORMAL = "FINDINGS: There is no acute intracranial hemorrhage. IMPRESSION: No acute intracranial hemorrhage."


LOCATIONS = {"SDH": "subdural", "IPH": "intraparenchymal", "none": "none"}


def record(
    true_subtype, true_side, true_ml, measured_ml, measured_side, dice, report, components=(), grounded=None, on=None
):
    return {
        "true_subtype": true_subtype,
        "true_location": LOCATIONS[true_subtype],
        "true_side": true_side,
        "true_ml": true_ml,
        "measured_ml": measured_ml,
        "measured_side": measured_side,
        "component_locations": list(components),
        "component_on_truth": list(on) if on is not None else [true_subtype != "none"] * len(components),
        "dice": dice,
        "generated_labels": report_labels(report),
        "report_labels": report_labels(grounded or report),
        "words_outside_vocabulary": [],
        "contradictions": [],
        "subtype_contradictions": int(grounded is not None),
    }


def test_report_labels_in_the_summarys_words():
    assert report_labels(LEFT_SDH) == {"presence": True, "side": "left", "subtype": "SDH"}
    assert report_labels(NORMAL) == {"presence": False, "side": "none", "subtype": "none"}


def test_figures_and_goals_from_records():
    left_iph = LEFT_SDH.replace("subdural", "intraparenchymal")
    records = [
        # +20% volume, all right, and a false-positive fragment off the bleed (no true location to score)
        record("SDH", "left", 10.0, 12.0, "left", 0.8, LEFT_SDH, ["subdural", "subarachnoid"], on=[True, False]),
        # -5%, wrong side; the generated SDH was grounded to IPH, one of its two components misplaced
        record("IPH", "right", 20.0, 19.0, "left", 0.6, LEFT_SDH, ["intraparenchymal", "subdural"], left_iph),
        record("IPH", "right", 20.0, 18.0, "right", 0.7, NORMAL.replace("no acute", "an acute right")),  # -10%
        record("none", "none", 0.0, 1.5, "left", None, NORMAL, ["indeterminate"]),  # a normal scan with 1.5 mL
    ]
    f = figures(records)
    assert f["automatic_dice"] == pytest.approx(0.7) and f["median_volume_error"] == pytest.approx(0.1)
    assert f["median_signed_volume_error"] == pytest.approx(-0.05)
    assert f["max_normal_ml"] == 1.5 and f["side_correct"] == pytest.approx(2 / 3, abs=1e-4)
    # 2 of the 3 components on true bleeds; the normal scan's and the fragment's are false positives
    assert f["location_correct"] == pytest.approx(2 / 3, abs=1e-4) and f["false_positive_components"] == 2
    assert f["report_subtype"] == 0.75 and f["report_subtype_iph"] == 0.5 and f["generated_subtype"] == 0.5
    assert f["subtype_contradictions"] == 1
    g = goals({**f, "minutes_total": 9.0})
    assert g["automatic_dice"] == {"goal": ">= 0.75", "measured": 0.7, "met": False}
    assert g["max_normal_ml"]["met"] is False and g["minutes_total"]["met"]
    assert g["median_signed_volume_error"] == {"goal": "|<=| 0.05", "measured": -0.05, "met": True}
