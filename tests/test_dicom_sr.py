"""DICOM SR beside the SEG: a TID 1500 Measurement Report that dciodvfy accepts, whatever the source
kept of its patient, and that highdicom reads back to the numbers measured and the report written."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from sam3d.data.dicom_seg import mask_on_frames, write_hemorrhage_seg
from sam3d.data.dicom_sr import QUALITATIVE_EVALUATIONS, write_hemorrhage_sr
from sam3d.data.io import load_volume
from sam3d.data.synthetic_dicom import SeriesSpec, table_positions, write_ct_series
from sam3d.predict import measure
from sam3d.predict.records import ComponentMeasurement, LocationEvidence, Measurements
from tests.conftest import dciodvfy_errors, head_phantom_hu, in_bleed
from tests.test_dicom import ANONYMISED


def read_measurement_report(source: str | Path | pydicom.Dataset) -> dict:
    """What a reader of the SR gets back: per measurement group its tracking identifier, volumes by
    method, finding site and laterality and the segment it refers to; the report's text items."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(
        source if isinstance(source, pydicom.Dataset) else pydicom.dcmread(source), copy=False
    )
    groups = []
    for group in sr.content.get_volumetric_roi_measurement_groups():
        volumes = {m.method.meaning: m.value for m in group.get_measurements(name=codes.SCT.Volume)}
        assert {m.unit.value for m in group.get_measurements(name=codes.SCT.Volume)} == {"mL"}
        site = group.finding_sites[0]
        segment = group.referenced_segment
        groups.append(
            {
                "identifier": group.tracking_identifier,
                "uid": str(group.tracking_uid),
                "planimetric_ml": volumes["Sum of segmented voxel method for volume"],
                "abc2_ml": volumes["LWH method for volume of ellipsoid"],
                "site": site.value,
                "laterality": site.laterality,
                "seg_uid": str(segment[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
                "segment": int(segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber),
            }
        )
    texts = {
        str(item.ConceptNameCodeSequence[0].CodeMeaning): str(item.TextValue)
        for container in sr.ContentSequence
        if container.ConceptNameCodeSequence[0].CodeValue == QUALITATIVE_EVALUATIONS.value
        for item in container.ContentSequence
    }
    evidence = {
        str(series.SeriesInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
    }
    return {"groups": groups, "texts": texts, "evidence_series": evidence}


def _series(folder: Path) -> SeriesSpec:
    positions, orientation = table_positions([5.0] * 19, first_z_mm=-50.0, origin_xy_mm=(-96.0, -110.0))
    spec = SeriesSpec(positions, orientation, rows=96, columns=80, pixel_spacing=(2.4, 2.4))
    write_ct_series(folder, spec, head_phantom_hu)
    return spec


def _bleed_mask(volume) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in volume.array.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    lps = (ijk @ volume.affine[:3, :3].T + volume.affine[:3, 3]) * np.array([-1.0, -1.0, 1.0])
    return in_bleed(lps).reshape(volume.array.shape)


def _component(volume_ml: float, abc2_ml: float, side: str, location: str, region: str) -> ComponentMeasurement:
    evidence = LocationEvidence(
        inner_table_distance_mm=1.0,
        depth_mm=20.0,
        thickness_mm=10.0,
        span_mm=30.0,
        table_contact_fraction=0.1,
        ventricle_overlap_fraction=0.0,
        midline_distance_mm=25.0,
        crosses_midline=False,
        shape="globular",
    )
    return ComponentMeasurement(
        volume_ml=volume_ml,
        abc2_ml=abc2_ml,
        abc2_axes_mm=[30.0, 20.0, 10.0],
        side=side,
        location=location,
        region=region,
        centroid_mm=[0.0, 0.0, 0.0],
        slice_extent=[3, 9],
        evidence=evidence,
    )


def test_sr_holds_the_total_and_each_component_and_reads_back_the_same(tmp_path):
    spec = _series(tmp_path / "ct")
    volume = load_volume(tmp_path / "ct")
    seg_path = write_hemorrhage_seg(
        tmp_path / "seg.dcm", mask_on_frames(_bleed_mask(volume), volume.affine, volume.dicom), volume.dicom, "t"
    )
    components = [
        _component(21.37, 19.9, "left", "intraparenchymal", "basal ganglia"),
        _component(3.25, 4.1, "right", "subdural", "convexity"),
    ]
    measurements = Measurements(
        24.62, 2, [21.37, 3.25], "bilateral", [3, 9], 40.0, None, None, 24.0, "intraparenchymal", components
    )
    # Generated text is any Unicode, not only what Latin-1 encodes.
    report = ("Hyperdense blood (≈ 21 mL, 60–80 HU) in the left basal ganglia.", "Acute left ICH \ufffd.")
    sr_path = write_hemorrhage_sr(tmp_path / "sr.dcm", measurements, seg_path, volume.dicom, "t", report)

    assert dciodvfy_errors(sr_path) == []
    back = read_measurement_report(sr_path)
    seg = pydicom.dcmread(seg_path)
    expected = [
        ("all components", 24.62, 24.0, codes.SCT.Brain, codes.SCT.RightAndLeft),
        ("component 1: left intraparenchymal, basal ganglia", 21.37, 19.9, codes.SCT.Brain, codes.SCT.Left),
        ("component 2: right subdural, convexity", 3.25, 4.1, codes.SCT.DuraMater, codes.SCT.Right),
    ]
    assert len(back["groups"]) == len(expected)
    for group, (label, planimetric, abc2, site, laterality) in zip(back["groups"], expected):
        assert group["identifier"] == f"Hemorrhage, {label}"
        assert (group["planimetric_ml"], group["abc2_ml"]) == (planimetric, abc2)
        assert group["site"] == site and group["laterality"] == laterality
        assert (group["seg_uid"], group["segment"]) == (str(seg.SOPInstanceUID), 1)
    assert len({g["uid"] for g in back["groups"]}) == 3  # each finding its own tracking UID
    assert back["texts"] == {"Findings": report[0], "Impression": report[1]}
    # The evidence names the source series and the SEG's, so an archive links all three.
    assert back["evidence_series"] == {spec.series_uid, str(seg.SeriesInstanceUID)}
    sr = pydicom.dcmread(sr_path)
    assert sr.StudyInstanceUID == spec.study_uid and sr.Modality == "SR"


@pytest.mark.parametrize("anonymised", [*ANONYMISED])
def test_sr_is_valid_from_anonymised_sources_and_without_a_report(tmp_path, anonymised):
    """A source stripped of Type 2 patient and study attributes still gives a valid SR, with them
    present and empty; measurements only (sam3d-predict) means no text items; and an empty mask is
    reported as 0 mL rather than left out."""
    _series(tmp_path / "ct")
    for path in sorted((tmp_path / "ct").iterdir()):
        ds = pydicom.dcmread(path)
        for keyword, value in ANONYMISED[anonymised].items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)
    volume = load_volume(tmp_path / "ct")
    mask = np.zeros(volume.array.shape, bool) if anonymised == "odd" else _bleed_mask(volume)
    seg_path = write_hemorrhage_seg(
        tmp_path / "seg.dcm", mask_on_frames(mask, volume.affine, volume.dicom), volume.dicom, "t"
    )
    measurements = measure(mask, volume)
    sr_path = write_hemorrhage_sr(tmp_path / "sr.dcm", measurements, seg_path, volume.dicom, "t")

    assert dciodvfy_errors(sr_path) == []
    sr, source = pydicom.dcmread(sr_path), pydicom.dcmread(next((tmp_path / "ct").iterdir()))
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber"):
        assert str(sr.get(keyword, "MISSING")) == str(source.get(keyword, ""))
    back = read_measurement_report(sr_path)
    assert back["texts"] == {}
    assert back["groups"][0]["planimetric_ml"] == pytest.approx(measurements.total_volume_ml)
    assert len(back["groups"]) == 1 + len(measurements.components)
    if anonymised == "odd":
        assert measurements.total_volume_ml == 0.0 and back["groups"][0]["laterality"] is None
