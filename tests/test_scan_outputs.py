"""Every output of a scan is written on its own (issue 26 C, 5): a DICOM SEG or SR that cannot be made
is a note with the reason beside the mask, measurements and report; a derivable frame of reference is
derived; a volume that cannot be a head says so in the command's line, the JSON and the report."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from ich_engine.cli import run_main
from sam3d.cli.predict import main as predict_main
from sam3d.data.geometry import GeometryWarning
from sam3d.data.io import load_volume
from sam3d.data.synthetic_dicom import SeriesSpec, table_positions, write_ct_series
from tests.conftest import dciodvfy_errors, head_phantom_hu, make_tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("models"))


def _series(folder: Path, slices: int = 10, **kw) -> list[Path]:
    positions, orientation = table_positions([5.0] * (slices - 1), 0.0, first_z_mm=-30.0, origin_xy_mm=(-96.0, -110.0))
    spec = SeriesSpec(positions, orientation, rows=96, columns=80, pixel_spacing=(2.4, 2.4), **kw)
    return write_ct_series(folder, spec, head_phantom_hu)


def _edit(paths: list[Path], **attributes) -> None:
    """Set (or, for None, delete) attributes of every file, as an exporter leaves them."""
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)


# A near-zero threshold on the untrained model: a mask, so a SEG with frames.
MARK_ALL = ("--no-intracranial_mask", "--no-hyperdense_only", "--threshold", "0.001")


def _predict(models, scan: Path, out: Path, capsys, *flags: str) -> tuple[int, dict, list[str]]:
    """sam3d-predict as a user runs it: (exit code, the scan's batch record, the lines printed)."""
    flags = ("--device", "cpu", *flags)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code = run_main(
            predict_main, ["--checkpoint", str(models[0]), "--input", str(scan), "--output_dir", str(out), *flags]
        )
    captured = capsys.readouterr()
    records = json.loads((out / "predictions.json").read_text())
    return code, records[0], (captured.out + captured.err).splitlines()


def test_a_series_without_frame_of_reference_gets_one_derived_from_the_series(models, tmp_path, capsys):
    """highdicom refuses a SEG of slices with no FrameOfReferenceUID; all slices of a series share one
    geometry, so the series' UID gives one, the same at every read, and the note says so."""
    paths = _series(tmp_path / "ct")
    _edit(paths, FrameOfReferenceUID=None, PositionReferenceIndicator=None)
    code, record, lines = _predict(models, tmp_path / "ct", tmp_path / "out", capsys, *MARK_ALL)
    assert code == 0, lines
    series_uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    derived = pydicom.uid.generate_uid(entropy_srcs=["FrameOfReferenceUID", series_uid])
    assert any(f"use {derived}, derived from the SeriesInstanceUID" in note for note in record["geometry"]["notes"])
    assert load_volume(tmp_path / "ct").dicom.frame_of_reference_uid == derived  # the same at every read
    assert str(pydicom.dcmread(record["files"]["dicom_seg"]).FrameOfReferenceUID) == derived
    for kind in ("dicom_seg", "dicom_sr"):
        assert dciodvfy_errors(record["files"][kind]) == []
    assert "not_written" not in record["files"]


def test_a_duplicate_slice_accepted_with_allow_gaps_leaves_it_out_of_the_seg(models, tmp_path, capsys):
    paths = _series(tmp_path / "ct")
    duplicate = pydicom.dcmread(paths[4])
    duplicate.SOPInstanceUID = duplicate.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    duplicate.InstanceNumber = 99
    duplicate.save_as(tmp_path / "ct" / "IM0099.dcm")
    code, record, lines = _predict(models, tmp_path / "ct", tmp_path / "out", capsys, *MARK_ALL, "--allow_gaps")
    assert code == 0, lines
    assert record["geometry"]["dropped_duplicates"] == [str(tmp_path / "ct" / "IM0099.dcm")]
    seg = hd.seg.segread(record["files"]["dicom_seg"])
    referenced = {
        str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced and str(duplicate.SOPInstanceUID) not in referenced
    assert referenced <= {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
    assert dciodvfy_errors(record["files"]["dicom_seg"]) == []
    assert dciodvfy_errors(record["files"]["dicom_sr"]) == []


def test_a_seg_that_cannot_be_made_is_a_note_and_the_other_outputs_are_written(models, tmp_path, capsys):
    """Slices that name two frames of reference allow no SEG (nor an SR referring to one): the mask,
    overlays, measurements and report are written all the same, the reason recorded and printed."""
    from blip.cli.report import main as report_main

    paths = _series(tmp_path / "ct")
    _edit(paths[5:], FrameOfReferenceUID="1.2.826.0.1.3680043.8.498.3")
    code, record, lines = _predict(models, tmp_path / "ct", tmp_path / "out", capsys, *MARK_ALL)
    assert code == 0, lines
    reasons = record["files"]["not_written"]
    assert set(reasons) == {"dicom_seg", "dicom_sr"}
    assert "2 different FrameOfReferenceUIDs" in reasons["dicom_seg"] and "IM0006.dcm" in reasons["dicom_seg"]
    assert "no DICOM SEG" in reasons["dicom_sr"]
    assert f"warning: {tmp_path / 'ct'}: no DICOM SEG written: {reasons['dicom_seg']}" in lines
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "ct_mask.nii.gz" in written and "ct_measurements.json" in written
    assert any(name.endswith(".png") for name in written) and not any(name.endswith(".dcm") for name in written)

    flags = ["--max_new_tokens", "4", "--num_beams", "1", "--device", "cpu", "--output_dir", str(tmp_path / "report")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeometryWarning)
        code = run_main(
            report_main,
            ["--segmentation_checkpoint", str(models[0]), "--report_model", str(models[1]), "--input"]
            + [str(tmp_path / "ct"), *flags],
        )
    assert code == 0
    report = json.loads((tmp_path / "report" / "ct_report.json").read_text())
    assert report["report"] and set(report["segmentation"]["files"]["not_written"]) == {"dicom_seg", "dicom_sr"}


def test_a_volume_no_head_fits_in_says_so_in_the_line_the_json_and_the_report(models, tmp_path, capsys):
    """The issue's 8x8x4-voxel NIfTI (16x16x8 mm): not "0.0 mL ... side none" alone."""
    from blip.cli.report import main as report_main

    rng = np.random.default_rng(0)
    scan = tmp_path / "tiny.nii.gz"
    nib.save(nib.Nifti1Image(rng.integers(-1000, 1500, (8, 8, 4)).astype(np.int16), np.diag([2, 2, 2, 1.0])), scan)
    code, record, lines = _predict(models, scan, tmp_path / "out", capsys)
    assert code == 0
    problems = record["geometry"]["not_a_head_ct"]
    assert any("field of view of [16, 16, 8] mm" in p for p in problems)
    assert any("4 slices" in p for p in problems)
    (line,) = [line for line in lines if line.startswith(f"{scan}: ")]
    assert "0.0 mL in 0 component(s), side none" in line and "NOT A HEAD CT" in line

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeometryWarning)
        code = run_main(
            report_main,
            ["--segmentation_checkpoint", str(models[0]), "--report_model", str(models[1]), "--input", str(scan)]
            + ["--max_new_tokens", "4", "--num_beams", "1", "--device", "cpu", "--output_dir", str(tmp_path / "r")],
        )
    assert code == 0
    report = json.loads((tmp_path / "r" / "tiny_report.json").read_text())
    assert "cannot exclude" in report["impression"] and "does not look like a head CT" in report["impression"]
