"""Grounded reports: contradictions with the measurements are found, flagged and corrected."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from blip.app.grounded import contradictions, ground_report, structured_findings, subtype_contradictions
from blip.evaluation.labeler import POSITIVE, label_ct_report
from sam3d.data.synthetic import synthesize_case
from sam3d.predict import Measurements
from sam3d.predict.records import ComponentMeasurement, LocationEvidence
from tests.conftest import REPO, make_tiny_models

BLEED = Measurements(12.3, 1, [12.3], "left", [10, 14], 20.0, [50.0, 60.0, 12.0], [-30.0, 5.0, 40.0])
NONE = Measurements(0.0, 0, [], "none", None, 0.0, None, None)


def located(location: str, region: str, volume_ml: float = 12.3) -> ComponentMeasurement:
    evidence = LocationEvidence(12.0, 40.0, 20.0, 30.0, 0.0, 0.0, 20.0, False, "globular")
    return ComponentMeasurement(
        volume_ml, 8.1, [30.0, 24.0, 22.5], "left", location, region, [-30.0, 5.0, 40.0], [10, 14], evidence
    )


LEFT_IPH = Measurements(
    12.3,
    1,
    [12.3],
    "left",
    [10, 14],
    20.0,
    None,
    None,
    8.1,
    "intraparenchymal",
    [located("intraparenchymal", "frontal")],
)
SDH_TEXT = (
    "FINDINGS: A crescentic hyperdense extra-axial collection along the left cerebral convexity represents an "
    "acute subdural hematoma, approximately 12 mL. No mass effect; midline structures are centered. "
    "IMPRESSION: Acute left convexity subdural hematoma (approximately 12 mL)."
)


def test_consistent_report_has_no_flags():
    text = "FINDINGS: Acute left frontal intraparenchymal hematoma measuring approximately 12 mL. IMPRESSION: Left IPH."
    assert contradictions(text, BLEED) == []
    grounded = ground_report(text, BLEED)
    assert not grounded.corrected and "Left IPH." in grounded.report
    assert "12.3 mL" in grounded.report and "Automated segmentation" in grounded.structured_findings


@pytest.mark.parametrize(
    "text, measured, expected",
    [
        ("FINDINGS: No acute intracranial hemorrhage. IMPRESSION: Normal study.", BLEED, "does not describe"),
        ("FINDINGS: Acute right subdural hematoma. IMPRESSION: Right SDH.", BLEED, "report says right"),
        ("FINDINGS: Left intraparenchymal hemorrhage of 40 mL. IMPRESSION: Left IPH.", BLEED, "states 40 mL"),
        ("FINDINGS: Acute left subdural hematoma. IMPRESSION: SDH.", NONE, "found none"),
        # Seen from the demo's model: findings describe the bleed, the impression denies it.
        (
            "FINDINGS: Acute left intracranial hemorrhage. IMPRESSION: No acute intracranial hemorrhage.",
            BLEED,
            "impression: report does not describe",
        ),
    ],
)
def test_contradictions_are_flagged_and_the_impression_corrected(text, measured, expected):
    grounded = ground_report(text, measured)
    assert any(expected in flag for flag in grounded.flags), grounded.flags
    assert grounded.corrected and grounded.generated == text
    _, impression = grounded.report.split("IMPRESSION:")
    assert ("No acute" in impression) == (measured is NONE)
    kept = ground_report(text, measured, correct=False)
    assert kept.flags == grounded.flags and not kept.corrected


def test_subtype_contradiction_is_flagged_and_corrected_in_findings_and_impression():
    assert subtype_contradictions(SDH_TEXT, LEFT_IPH) == ["report says SDH, segmentation locates IPH"]
    grounded = ground_report(SDH_TEXT, LEFT_IPH)
    assert grounded.corrected and "report says SDH, segmentation locates IPH" in grounded.flags
    assert "subdural" not in grounded.report and "No mass effect" in grounded.report
    assert "intraparenchymal (frontal)" in grounded.report.split("IMPRESSION:")[1]
    labels = label_ct_report(grounded.report)
    assert labels["IPH"] == POSITIVE and labels["SDH"] is None and labels["side"] == "left"
    assert ground_report(SDH_TEXT, LEFT_IPH, correct=False).report.count("subdural") == 2


def test_subtype_checks_what_the_mask_can_tell():
    iph_text = SDH_TEXT.replace("subdural", "intraparenchymal")
    assert contradictions(iph_text, LEFT_IPH) == []
    # An indeterminate location, or no bleed measured, checks no subtype.
    unknown = Measurements(
        12.3, 1, [12.3], "left", [10, 14], 20.0, None, None, 8.1, "indeterminate", [located("indeterminate", "x")]
    )
    assert subtype_contradictions(SDH_TEXT, unknown) == [] and subtype_contradictions(SDH_TEXT, NONE) == []
    # A report naming one of the mask's two compartments is not contradicted; a third one is.
    both = Measurements(
        14.0,
        2,
        [12.3, 1.7],
        "left",
        [10, 14],
        20.0,
        None,
        None,
        9.0,
        "subdural",
        [located("subdural", "convexity"), located("intraventricular", "lateral ventricle", 1.7)],
    )
    assert subtype_contradictions(SDH_TEXT, both) == []
    assert subtype_contradictions(iph_text, both) == ["report says IPH, segmentation locates IVH+SDH"]
    sentence = structured_findings(both)
    assert "subdural (convexity) and intraventricular (lateral ventricle) hemorrhage" in sentence
    assert "ABC/2 9.0 mL" in sentence


def test_structured_findings_for_no_bleed():
    assert "no hemorrhage detected" in structured_findings(NONE)


@pytest.mark.slow
def test_report_cli_end_to_end(tmp_path):
    case = synthesize_case(1, seed=0, spacing_mm=(3.0, 3.0, 5.0), ich_type="subdural", head_scale=0.5)
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(case.image_hu, case.affine), scan)
    seg_checkpoint, report_model = make_tiny_models(tmp_path / "models")
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("sam3d-report")),  # the installed console script
            "--segmentation_checkpoint",
            str(seg_checkpoint),
            "--report_model",
            str(report_model),
            "--input",
            str(scan),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_new_tokens",
            "8",
            "--num_beams",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "scan_report.json").read_text())
    assert saved["structured_findings"].startswith("Automated segmentation")
    assert saved["structured_findings"] in saved["report"]
    assert nib.load(saved["segmentation"]["files"]["mask"]).shape == case.image_hu.shape
    assert (tmp_path / "out" / "scan_report.txt").read_text().startswith("FINDINGS:")


def test_a_report_reads_the_scan_once(tmp_path):
    """sam3d-report: the scan is read once and passed along as a Volume (segmentation, saving, the
    report model's CT transform)."""
    from unittest import mock

    from blip.cli.report import main as report_main

    case = synthesize_case(2, seed=0, spacing_mm=(3.0, 3.0, 5.0), ich_type="subdural", head_scale=0.5)
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(case.image_hu, case.affine), scan)
    seg_checkpoint, report_model = make_tiny_models(tmp_path / "models")
    flags = ["--segmentation_checkpoint", str(seg_checkpoint), "--report_model", str(report_model)]
    flags += ["--input", str(scan), "--output_dir", str(tmp_path / "out"), "--max_new_tokens", "4", "--num_beams", "1"]
    with mock.patch("nibabel.load", wraps=nib.load) as reads:
        assert report_main(flags) == 0
    assert [c.args[0] for c in reads.call_args_list if str(c.args[0]) == str(scan)] == [str(scan)]
