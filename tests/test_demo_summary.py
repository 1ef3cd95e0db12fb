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


def record(true_subtype, true_side, true_ml, measured_ml, measured_side, dice, report):
    return {
        "true_subtype": true_subtype,
        "true_side": true_side,
        "true_ml": true_ml,
        "measured_ml": measured_ml,
        "measured_side": measured_side,
        "dice": dice,
        "report_labels": report_labels(report),
        "words_outside_vocabulary": [],
        "contradictions": [],
    }


def test_report_labels_in_the_summarys_words():
    assert report_labels(LEFT_SDH) == {"presence": True, "side": "left", "subtype": "SDH"}
    assert report_labels(NORMAL) == {"presence": False, "side": "none", "subtype": "none"}


def test_figures_and_goals_from_records():
    records = [
        record("SDH", "left", 10.0, 12.0, "left", 0.8, LEFT_SDH),  # 20% volume error, all right
        record("IPH", "right", 20.0, 19.0, "left", 0.6, LEFT_SDH),  # 5%, wrong side and subtype
        record("none", "none", 0.0, 1.5, "left", None, NORMAL),  # a normal scan measured 1.5 mL
    ]
    f = figures(records)
    assert f["automatic_dice"] == pytest.approx(0.7) and f["median_volume_error"] == pytest.approx(0.125)
    assert f["max_normal_ml"] == 1.5 and f["side_correct"] == 0.5
    assert f["report_presence"] == 1.0 and f["report_side"] == 0.6667
    assert f["report_subtype"] == 0.6667
    g = goals({**f, "minutes_total": 9.0})
    assert g["automatic_dice"] == {"goal": ">= 0.75", "measured": 0.7, "met": False}
    assert g["max_normal_ml"]["met"] is False and g["report_presence"]["met"] is True and g["minutes_total"]["met"]
