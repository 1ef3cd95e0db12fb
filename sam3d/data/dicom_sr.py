"""The hemorrhage measurements (and the report, when one was written) as a DICOM SR beside the SEG.

A TID 1500 "Measurement Report" (highdicom ``sr.Comprehensive3DSR``): one volumetric measurement
group (TID 1411) for the hemorrhage in total and one per connected component, each naming the
"Hemorrhage" segment of the SEG it was measured on, so a viewer (OHIF, 3D Slicer, a PACS) shows
the numbers beside the overlay. The report's FINDINGS and IMPRESSION are TEXT items of the root's
"Qualitative Evaluations" container, as TID 1500 allows. Codes are SNOMED CT and DCM, units UCUM.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from ich_engine.checkpoint import atomic_write

from .dicom import Series
from .dicom_seg import HEMORRHAGE_SEGMENT_NUMBER, source_headers

if TYPE_CHECKING:  # sam3d.predict imports this module; the records are only read here
    from sam3d.predict.records import Measurements

__all__ = ["MILLILITER", "QUALITATIVE_EVALUATIONS", "hemorrhage_sr", "write_hemorrhage_sr"]

MILLILITER = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
# TID 1500's container for evaluations of the whole report; UMLS is the scheme the standard uses for it.
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
LATERALITY = {"left": codes.SCT.Left, "right": codes.SCT.Right, "bilateral": codes.SCT.RightAndLeft}
# Where each location class lies, as the finding site; subdural and epidural blood both lie at the dura
# (the class itself is in the group's tracking identifier), an undecided class is "intracranial".
FINDING_SITES = {
    "intraparenchymal": codes.SCT.Brain,
    "intraventricular": codes.SCT.BrainVentricle,
    "subarachnoid": codes.SCT.SubarachnoidSpace,
    "subdural": codes.SCT.DuraMater,
    "epidural": codes.SCT.DuraMater,
}
DEVICE_NAME = "sam3d-ich"
# The same device UID in every report this software writes, so an archive can tell its reports apart.
DEVICE_UID = pydicom.uid.generate_uid(entropy_srcs=[DEVICE_NAME])


def _volume_group(
    label: str,
    volume_ml: float,
    abc2_ml: float,
    side: str,
    location: str,
    segment: hd.sr.ReferencedSegment,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """One finding: its planimetric volume (the segment's voxels summed) and its ABC/2 estimate, where
    it lies and which segment of which SEG it was measured on."""
    site = hd.sr.FindingSite(FINDING_SITES.get(location, codes.SCT.Intracranial), laterality=LATERALITY.get(side))
    methods = (
        (volume_ml, codes.DCM.SumOfSegmentedVoxelMethodForVolume),
        (abc2_ml, codes.DCM.LWHMethodForVolumeOfEllipsoid),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=label),
        referenced_segment=segment,
        finding_type=codes.SCT.Hemorrhage,
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        finding_sites=[site],
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=codes.SCT.Volume, value=value, unit=MILLILITER, method=method, algorithm_id=algorithm
            )
            for value, method in methods
        ],
    )


def write_hemorrhage_sr(
    path: str | Path,
    measurements: Measurements,
    seg_path: str | Path,
    series: Series,
    software_version: str,
    report_sections: tuple[str, str] | None = None,
    algorithm: str = "SAM-Med3D ICH",
) -> Path:
    """Write :func:`hemorrhage_sr` of the SEG at ``seg_path`` to ``path`` (atomically)."""
    path = Path(path)
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    sr = hemorrhage_sr(measurements, seg, series, software_version, report_sections, algorithm)
    atomic_write(path, lambda tmp: sr.save_as(tmp))
    return path


def hemorrhage_sr(
    measurements: Measurements,
    seg: pydicom.Dataset,
    series: Series,
    software_version: str,
    report_sections: tuple[str, str] | None = None,
    algorithm: str = "SAM-Med3D ICH",
) -> hd.sr.Comprehensive3DSR:
    """The Measurement Report of ``measurements``, measured on ``seg`` (a
    :func:`~sam3d.data.dicom_seg.hemorrhage_seg` of ``series``, or its header).

    ``report_sections``: the report's (FINDINGS, IMPRESSION) text, when a report was generated; an
    empty section is left out.
    """
    # The whole segment on the source series: components share the SEG's one segment (their tracking
    # identifiers tell them apart), and a SEG without blood has no frame to point at.
    segment = hd.sr.ReferencedSegment(
        seg.SOPClassUID,
        seg.SOPInstanceUID,
        HEMORRHAGE_SEGMENT_NUMBER,
        source_series=hd.sr.SourceSeriesForSegmentation(series.uid),
    )
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm, version=software_version)
    m = measurements
    groups = [
        _volume_group(
            "Hemorrhage, all components", m.total_volume_ml, m.abc2_ml, m.side, m.location, segment, algorithm_id
        )
    ]
    groups += [  # largest first, as the measurements list them
        _volume_group(
            f"Hemorrhage, component {number}: {c.side} {c.location}, {c.region}",
            c.volume_ml,
            c.abc2_ml,
            c.side,
            c.location,
            segment,
            algorithm_id,
        )
        for number, c in enumerate(m.components, start=1)
    ]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID, name=DEVICE_NAME, model_name=algorithm
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ComputedTomographyOfHead,
        imaging_measurements=groups,
    )
    texts = [
        hd.sr.TextContentItem(name=name, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for name, text in zip((codes.DCM.Findings, codes.DCM.Impression), report_sections or ("", ""))
        if text
    ]
    if texts:
        evaluations = hd.sr.ContainerContentItem(
            name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        evaluations.ContentSequence = hd.sr.ContentSequence(texts)
        report[0].ContentSequence.append(evaluations)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source_headers(series), seg],
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=DEVICE_NAME,
        series_description="Hemorrhage measurements (automated)",
    )
    # Generated text is any Unicode (a language model's "≈", "µ", a replacement character), and the
    # patient's name may be in any script: UTF-8 encodes all of it, highdicom's Latin-1 default does not.
    sr.SpecificCharacterSet = "ISO_IR 192"
    return sr
