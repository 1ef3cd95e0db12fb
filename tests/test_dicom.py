"""DICOM series as scanners write them: geometry in world space against the analytic truth.

Every series is written with pydicom from an analytic head (tests/conftest.py) sampled at the true
position of every pixel: gantry tilt, uneven and missing steps, shuffled files without extensions,
several series, localizers, per-slice rescale, MONOCHROME1 and the multi-frame Enhanced CT layout.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from sam3d.data.dicom import pixel_positions
from sam3d.data.dicom_seg import mask_on_frames, write_hemorrhage_seg
from sam3d.data.geometry import GeometryWarning
from sam3d.data.io import VolumeReadError, load_volume, scan_inputs
from sam3d.data.synthetic_dicom import SeriesSpec, table_positions, write_ct_series, write_enhanced_ct
from sam3d.predict import measure
from sam3d.visualize import SliceView, axial_overlay
from tests.conftest import bleed_volume_ml, dciodvfy_errors, head_phantom_hu, in_bleed

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _spec(steps, tilt=0.0, **kw) -> SeriesSpec:
    positions, orientation = table_positions(steps, tilt, first_z_mm=-60.0, origin_xy_mm=(-96.0, -110.0))
    kw.setdefault("rows", 96)
    kw.setdefault("columns", 80)
    kw.setdefault("pixel_spacing", (2.4, 2.4))
    return SeriesSpec(positions, orientation, gantry_tilt_deg=tilt, **kw)


def _load(path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = load_volume(path, **kw)
    return volume, [str(w.message) for w in caught if issubclass(w.category, GeometryWarning)]


def _true_pixels(spec: SeriesSpec):
    """(LPS positions (frames, rows, cols, 3), HU written) of every acquired pixel."""
    positions = np.stack(
        [pixel_positions(p, spec.orientation, spec.rows, spec.columns, spec.pixel_spacing) for p in spec.positions]
    )
    return positions, head_phantom_hu(positions.reshape(-1, 3)).reshape(positions.shape[:3])


def _hu_at(volume, lps: np.ndarray) -> np.ndarray:
    """The volume's HU looked up at world positions (trilinear), as the issue's check does."""
    voxel = np.c_[lps.reshape(-1, 3) * LPS_TO_RAS, np.ones(lps.size // 3)] @ np.linalg.inv(volume.affine).T
    return ndimage.map_coordinates(volume.array.astype(np.float32), voxel[:, :3].T, order=1, mode="nearest")


def _voxel_world_lps(volume) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in volume.array.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    return (ijk @ volume.affine[:3, :3].T + volume.affine[:3, 3]) * LPS_TO_RAS


@pytest.mark.parametrize("tilt", [0.0, 15.0, 25.0])
def test_tilted_series_keeps_every_voxel_at_its_true_position(tmp_path, tilt):
    spec = _spec([5.0] * 23, tilt)
    order = np.random.default_rng(0).permutation(len(spec.positions))  # file names / InstanceNumber shuffled
    write_ct_series(tmp_path / "ct", spec, head_phantom_hu, extension="", order=order)
    volume, warned = _load(tmp_path / "ct")

    true_lps, written_hu = _true_pixels(spec)
    # Voxel (column, row, slice) is the acquired pixel: its world position is the scanner's, exactly.
    np.testing.assert_allclose(
        _voxel_world_lps(volume).reshape(*volume.array.shape, 3), true_lps.transpose(2, 1, 0, 3), atol=0.5
    )
    assert np.median(np.abs(_hu_at(volume, true_lps) - written_hu.ravel())) <= 0.5
    assert not volume.geometry.resampled and volume.geometry.tilt_deg == pytest.approx(tilt, abs=0.05)
    assert volume.geometry.slice_steps_mm == [[round(5.0 * np.cos(np.deg2rad(tilt)), 2), 23]]
    assert any("gantry tilt" in w for w in warned) == (tilt > 0)
    # |det| is the voxel's true volume: 2.4 x 2.4 x the step along the plane normal.
    assert volume.voxel_volume_ml == pytest.approx(2.4 * 2.4 * 5.0 * np.cos(np.deg2rad(tilt)) / 1000, rel=1e-4)


@pytest.mark.parametrize("tilt", [0.0, 15.0])
def test_uneven_steps_are_resampled_along_the_slice_axis(tmp_path, tilt):
    spec = _spec([3.0] * 10 + [6.0] * 12, tilt)
    write_ct_series(tmp_path / "ct", spec, head_phantom_hu)
    volume, warned = _load(tmp_path / "ct")

    cos = np.cos(np.deg2rad(tilt))
    assert volume.geometry.resampled and volume.geometry.resampled_step_mm == pytest.approx(3.0 * cos, rel=0.01)
    assert volume.geometry.slice_steps_mm == [[round(3.0 * cos, 2), 10], [round(6.0 * cos, 2), 12]]
    assert any("uneven slice steps" in w for w in warned)
    true_lps, written_hu = _true_pixels(spec)
    error = np.abs(_hu_at(volume, true_lps) - written_hu.ravel())
    assert np.median(error) <= 1.0
    # First and last acquired slices are grid slices: there the lookup is exact.
    first_last = np.r_[true_lps[0].reshape(-1, 3), true_lps[-1].reshape(-1, 3)]
    assert np.abs(_hu_at(volume, first_last) - head_phantom_hu(first_last)).max() <= 0.6  # stored as whole numbers


@pytest.mark.parametrize("steps,tilt", [([3.0] * 30, 0.0), ([3.0] * 30, 25.0), ([2.0] * 12 + [4.0] * 12, 15.0)])
def test_bleed_volume_is_right_in_world_space(tmp_path, steps, tilt):
    """The true mask on the loaded grid, measured, is the ellipsoid's analytic volume within 2%, and so is
    the mask mapped back onto the acquired slices (each weighted by its own slab along the normal)."""
    spec = _spec(steps, tilt, rows=128, columns=112, pixel_spacing=(1.6, 1.6))
    write_ct_series(tmp_path / "ct", spec, head_phantom_hu)
    volume, _ = _load(tmp_path / "ct")
    mask = in_bleed(_voxel_world_lps(volume)).reshape(volume.array.shape)

    assert measure(mask, volume).total_volume_ml == pytest.approx(bleed_volume_ml(), rel=0.02)
    frames = mask_on_frames(mask, volume.affine, volume.dicom)
    true_lps, _ = _true_pixels(spec)
    truth = in_bleed(true_lps)
    order = np.argsort([f.position[2] for f in volume.dicom.frames])  # written in table order already
    assert (frames[order] ^ truth).sum() <= 0.03 * truth.sum()
    normal_steps = np.asarray(steps) * np.cos(np.deg2rad(tilt))
    slab = (np.r_[normal_steps, 0.0] + np.r_[0.0, normal_steps]) / 2  # each slice reaches halfway to its neighbours
    frame_ml = frames[order].sum(axis=(1, 2)) * 1.6 * 1.6 * slab / 1000
    assert frame_ml.sum() == pytest.approx(bleed_volume_ml(), rel=0.02)


def test_dicom_seg_references_each_source_slice(tmp_path):
    spec = _spec([3.0] * 8 + [6.0] * 8, 15.0)
    paths = write_ct_series(tmp_path / "ct", spec, head_phantom_hu)
    volume, _ = _load(tmp_path / "ct")
    mask = in_bleed(_voxel_world_lps(volume)).reshape(volume.array.shape)
    frames = mask_on_frames(mask, volume.affine, volume.dicom)
    seg_path = write_hemorrhage_seg(tmp_path / "seg.dcm", frames, volume.dicom, "test")

    seg = hd.seg.segread(str(seg_path))
    assert seg.SegmentSequence[0].SegmentLabel == "Hemorrhage" and seg.StudyInstanceUID == spec.study_uid
    sources = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in paths}
    by_uid = {f.sop_instance_uid: i for i, f in enumerate(volume.dicom.frames)}
    pixels = seg.pixel_array.reshape(-1, spec.rows, spec.columns)
    assert len(pixels) == int(frames.any(axis=(1, 2)).sum())  # every slice that holds blood, no other
    for item, plane in zip(seg.PerFrameFunctionalGroupsSequence, pixels):
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        source = sources[uid]
        np.testing.assert_allclose(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in source.ImagePositionPatient],
            atol=1e-3,
        )
        np.testing.assert_array_equal(plane.astype(bool), frames[by_uid[uid]])


# How anonymisers leave a series: Type 2 attributes deleted (PS3.15 "X") or emptied ("Z"), odd VRs
# (an empty DA, a PN of only the component separators).
ANONYMISED = {
    "deleted": {keyword: None for keyword in ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber")}
    | {"ReferringPhysicianName": None},
    "emptied": {"PatientName": "", "PatientBirthDate": "", "PatientSex": "", "StudyDate": "", "AccessionNumber": ""},
    "odd": {"PatientName": "^^^^", "PatientID": "", "StudyTime": "", "PatientBirthDate": None},
}


@pytest.mark.parametrize("anonymised", ["none", *ANONYMISED])
def test_dicom_seg_is_valid_for_full_and_anonymised_sources(tmp_path, anonymised):
    """dciodvfy finds 0 errors in the SEG whatever the source kept of its patient and study; what the
    source has is copied, an attribute it lacks is present and empty, and no patient data is made up."""
    spec = _spec([3.0] * 10)
    paths = write_ct_series(tmp_path / "ct", spec, head_phantom_hu)
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in ANONYMISED.get(anonymised, {}).items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)
    if anonymised == "none":
        assert dciodvfy_errors(paths[0]) == []  # the synthetic scanner writes valid CT
    volume, _ = _load(tmp_path / "ct")
    mask = in_bleed(_voxel_world_lps(volume)).reshape(volume.array.shape)
    seg_path = write_hemorrhage_seg(
        tmp_path / "seg.dcm", mask_on_frames(mask, volume.affine, volume.dicom), volume.dicom, "t"
    )
    assert dciodvfy_errors(seg_path) == []
    seg, source = pydicom.dcmread(seg_path), pydicom.dcmread(paths[0])
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber"):
        assert str(seg.get(keyword, "MISSING")) == str(source.get(keyword, ""))


def _other_object(path, modality: str, sop_class: str, **attributes) -> None:
    """A non-CT object as archives hold them beside the slices (an SR, an MR slice), written with pydicom."""
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, pydicom.uid.generate_uid(), modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1", pydicom.uid.generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_cd_export_with_dicomdir_nested_folders_and_non_image_objects_opens_from_its_top(tmp_path, capsys):
    """A CD/PACS export: DICOMDIR at the top (pydicom's FileSet writes it and the PT/ST/SE folders of
    files without extensions), two axial CT series, a localizer, an MR series, a SEG and an SR. The
    top folder reads the CT series with most slices; the other objects are skipped, counted by kind."""
    from pydicom.fileset import FileSet

    thick = write_ct_series(tmp_path / "src" / "thick", _spec([5.0] * 6, description="HEAD 5mm"), head_phantom_hu)
    thin_spec = _spec([2.5] * 12, description="HEAD 2.5mm")
    thin = write_ct_series(tmp_path / "src" / "thin", thin_spec, head_phantom_hu)
    scout_positions, _ = table_positions([0.0], 0.0, first_z_mm=0.0, origin_xy_mm=(-96.0, -110.0))
    scout = SeriesSpec(
        scout_positions,
        (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
        rows=96,
        columns=80,
        pixel_spacing=(2.4, 2.4),
        description="SCOUT",
        series_number=1,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    localizer = write_ct_series(tmp_path / "src" / "scout", scout, head_phantom_hu)
    mr = []
    for i, path in enumerate(thin[:4]):  # MR slices of the same head: Modality and storage class say so
        ds = pydicom.dcmread(path)
        ds.Modality, ds.SeriesInstanceUID = "MR", "1.2.826.0.1.3680043.8.498.77"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.77.{i + 1}"
        ds.save_as(tmp_path / "src" / f"mr{i}.dcm")
        mr.append(tmp_path / "src" / f"mr{i}.dcm")
    export = FileSet()
    for path in [*thick, *thin, *localizer, *mr]:
        export.add(path)
    export.write(tmp_path / "cd")
    series_folder = next((tmp_path / "cd").rglob("IM000000")).parent
    volume, _ = _load(series_folder)
    seg = write_hemorrhage_seg(
        series_folder / "SEG0001", mask_on_frames(volume.array > 60, volume.affine, volume.dicom), volume.dicom, "t"
    )
    _other_object(
        tmp_path / "cd" / "PT000000" / "ST000000" / "SR000000" / "SR0001",
        "SR",
        "1.2.840.10008.5.1.4.1.1.88.11",
        ValueType="CONTAINER",
    )
    assert (tmp_path / "cd" / "DICOMDIR").is_file() and seg.is_file()

    volume, _ = _load(tmp_path / "cd")
    geometry = volume.geometry
    assert geometry.series is not None and geometry.series["uid"] == thin_spec.series_uid
    assert geometry.series["frames"] == 13  # 12 steps
    assert geometry.objects_skipped == {"DICOMDIR": 1, "MR": 4, "SEG": 1, "SR": 1}
    assert {s["why"] for s in geometry.series_left_out} == {"localizer", "fewer slices (7 vs 13)"}
    assert "skipped 1 DICOMDIR, 4 MR, 1 SEG, 1 SR" in geometry.summary()
    from sam3d.cli.check_dicom import main as check_dicom

    assert check_dicom(["--list", str(tmp_path / "cd")]) == 0
    listing = capsys.readouterr().out
    assert "3 CT series" in listing and "*      2      13  HEAD 2.5mm" in listing
    assert "(localizer)" in listing and "skipped: 1 DICOMDIR, 4 MR, 1 SEG, 1 SR" in listing

    # An MR-only folder is one line naming what it holds, never a CT read of MR intensities.
    for path in mr:
        (tmp_path / "mr_only").mkdir(exist_ok=True)
        (tmp_path / "mr_only" / path.name).write_bytes(path.read_bytes())
    with pytest.raises(VolumeReadError, match=r"mr_only: no CT image series found .*it holds 4 MR$"):
        load_volume(tmp_path / "mr_only")


def test_missing_and_duplicate_slices_stop_with_positions_unless_accepted(tmp_path):
    steps = [5.0] * 20
    spec = _spec(steps)
    paths = write_ct_series(tmp_path / "gap", spec, head_phantom_hu)
    paths[9].unlink()
    with pytest.raises(VolumeReadError, match=r"missing slice.*10\.00 mm step between .*--allow_gaps"):
        load_volume(tmp_path / "gap")
    volume, _ = _load(tmp_path / "gap", allow_gaps=True)
    assert volume.array.shape[2] == 21 and volume.geometry.resampled
    assert volume.geometry.interpolated_gaps_mm == [[-20.0, -10.0]]
    assert volume.voxel_volume_ml == pytest.approx(2.4 * 2.4 * 5.0 / 1000, rel=1e-3)

    spec = _spec([5.0] * 10)
    spec.positions[4] = spec.positions[3]
    write_ct_series(tmp_path / "dup", spec, head_phantom_hu)
    with pytest.raises(VolumeReadError, match=r"duplicate slice position.*IM000[45]\.dcm and IM000[45]\.dcm"):
        load_volume(tmp_path / "dup")
    volume, _ = _load(tmp_path / "dup", allow_gaps=True)
    assert len(volume.geometry.dropped_duplicates) == 1


def test_single_slice_is_not_a_volume(tmp_path):
    write_ct_series(tmp_path / "one", _spec([]), head_phantom_hu)
    with pytest.raises(VolumeReadError, match="single slice"):
        load_volume(tmp_path / "one")


def test_series_choice_localizer_ties_and_selection(tmp_path):
    folder = tmp_path / "study"
    brain = _spec([5.0] * 19, description="HEAD BRAIN 5mm", series_number=2)
    bone = _spec([5.0] * 19, description="HEAD BONE 5mm", series_number=3)
    write_ct_series(folder, brain, head_phantom_hu, extension=".b")
    write_ct_series(folder, bone, head_phantom_hu, extension=".o")
    with pytest.raises(
        VolumeReadError,
        match=r"2 series are equally good.*HEAD BRAIN.*HEAD BONE|2 series are "
        r"equally good.*HEAD BONE.*HEAD BRAIN",
    ):
        load_volume(folder)
    volume, warned = _load(folder, series="bone")
    assert volume.geometry.series["description"] == "HEAD BONE 5mm"
    assert volume.geometry.series_left_out[0]["description"] == "HEAD BRAIN 5mm"
    assert load_volume(folder, series=brain.series_uid).geometry.series["uid"] == brain.series_uid
    with pytest.raises(VolumeReadError, match="no series matches series 'sagittal'"):
        load_volume(folder, series="sagittal")

    lone = tmp_path / "with_localizer"
    write_ct_series(lone, brain, head_phantom_hu, extension=".b")
    scout = SeriesSpec(
        np.array([[0.0, -120.0, 100.0]]),
        (0, 1, 0, 0, 0, -1),
        rows=64,
        columns=64,
        description="SCOUT",
        series_number=1,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    write_ct_series(lone, scout, head_phantom_hu, extension=".s")
    volume, warned = _load(lone)
    assert volume.geometry.series["description"] == "HEAD BRAIN 5mm"
    assert any("left out" in w and "SCOUT" in w and "localizer" in w for w in warned)


def test_per_slice_rescale_and_monochrome1_give_the_written_hu(tmp_path):
    spec = _spec([5.0] * 9, slopes=[1.0, 0.5] * 5, intercepts=[-1024.0, -1000.0] * 5, photometric="MONOCHROME1")
    write_ct_series(tmp_path / "ct", spec, head_phantom_hu)
    volume, _ = _load(tmp_path / "ct")
    true_lps, written_hu = _true_pixels(spec)
    # Stored values are rounded to whole steps of each slice's slope.
    assert np.abs(volume.array.transpose(2, 1, 0) - np.clip(written_hu, -1024, 3071)).max() <= 0.5 * 1.0 + 1e-3
    assert volume.geometry.rescale_varies and volume.geometry.photometric == "MONOCHROME1"


def test_enhanced_multiframe_ct_reads_like_the_single_frame_series(tmp_path):
    spec = _spec([4.0] * 6 + [8.0] * 6, 18.5)
    write_ct_series(tmp_path / "single", spec, head_phantom_hu)
    write_enhanced_ct(tmp_path / "multi" / "enhanced.dcm", spec, head_phantom_hu)
    single, _ = _load(tmp_path / "single")
    multi, _ = _load(tmp_path / "multi" / "enhanced.dcm")  # one file given by itself
    assert multi.geometry.multiframe
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)
    np.testing.assert_array_equal(multi.array, single.array)
    seg = write_hemorrhage_seg(
        tmp_path / "seg.dcm", mask_on_frames(multi.array > 60, multi.affine, multi.dicom), multi.dicom, "test"
    )
    assert hd.seg.segread(str(seg)).SegmentSequence[0].SegmentLabel == "Hemorrhage"


def test_sheared_nifti_gives_the_dicom_measurements(tmp_path):
    """dcm2niix writes a tilted series as a NIfTI with a sheared sform and a rigid qform: read through the
    sform (with a warning), it measures what the DICOM series measures."""
    spec = _spec([3.0] * 30, 20.0)
    write_ct_series(tmp_path / "ct", spec, head_phantom_hu)
    dicom, _ = _load(tmp_path / "ct")
    image = nib.Nifti1Image(dicom.array, dicom.affine)
    image.set_sform(dicom.affine, code=1)
    image.set_qform(dicom.affine, code=1)  # nibabel keeps the nearest rigid transform: the shear is lost here
    nib.save(image, tmp_path / "tilted.nii.gz")
    nifti, warned = _load(tmp_path / "tilted.nii.gz")
    assert any("sform and qform" in w and "sform (code 1) is used" in w for w in warned)
    np.testing.assert_allclose(nifti.affine, dicom.affine, atol=1e-4)
    assert nifti.geometry.tilt_deg == pytest.approx(20.0, abs=0.05)
    truth = in_bleed(_voxel_world_lps(dicom)).reshape(dicom.array.shape)
    assert measure(truth, nifti) == measure(truth, dicom)


def test_radiological_pictures_put_a_left_bleed_on_the_right(tmp_path):
    """Axial pictures show anterior up and the patient's right on the left, for any storage order."""
    spec = _spec([5.0] * 19, 15.0)
    write_ct_series(tmp_path / "ct", spec, head_phantom_hu)
    volume, _ = _load(tmp_path / "ct")
    mask = in_bleed(_voxel_world_lps(volume)).reshape(volume.array.shape)
    flipped = (volume.array[::-1, :, ::-1], mask[::-1, :, ::-1])  # same scan stored in another order
    flip_affine = volume.affine @ np.array(
        [[-1, 0, 0, volume.array.shape[0] - 1], [0, 1, 0, 0], [0, 0, -1, volume.array.shape[2] - 1], [0, 0, 0, 1.0]]
    )
    for array, bleed, affine in ((volume.array, mask, volume.affine), (*flipped, flip_affine)):
        view = SliceView.from_affine(affine)
        k = int(np.argmax(bleed.sum(axis=(0, 1))))
        picture = view.picture(bleed, k)
        columns = np.nonzero(picture)[1]
        assert columns.mean() > picture.shape[1] / 2  # the patient's left is on the picture's right
        head = view.picture(array > 500, k)
        assert view.letters == ("A", "P", "R", "L")
        # The head phantom is longer front-to-back: rows are anterior-posterior.
        assert np.ptp(np.nonzero(head)[0]) > np.ptp(np.nonzero(head)[1])
        rgb = axial_overlay(array, k, view, bleed)
        yellow = (rgb[..., 0] > 200) & (rgb[..., 1] > 200) & (rgb[..., 2] < 80)
        assert yellow[:, : rgb.shape[1] // 8].any() and yellow[:, -rgb.shape[1] // 8 :].any()  # "R" and "L"


def test_scan_inputs_take_dicom_folders_as_users_have_them(tmp_path):
    write_ct_series(tmp_path / "series", _spec([5.0] * 3), head_phantom_hu, extension="")
    assert scan_inputs(tmp_path / "series") == [str(tmp_path / "series")]
    write_ct_series(tmp_path / "study" / "a", _spec([5.0] * 3), head_phantom_hu)
    write_ct_series(tmp_path / "study" / "b", _spec([5.0] * 3), head_phantom_hu, extension="")
    (tmp_path / "study" / "notes").mkdir()
    (tmp_path / "study" / "notes" / "readme.txt").write_text("x")
    assert scan_inputs(tmp_path / "study") == [str(tmp_path / "study" / "a"), str(tmp_path / "study" / "b")]
    with pytest.raises(VolumeReadError, match="notes: no volumes"):
        scan_inputs(tmp_path / "study" / "notes")


def test_predict_and_report_clis_on_a_tilted_uneven_series_write_mask_seg_and_geometry(tmp_path, capsys, monkeypatch):
    from blip.cli.report import main as report_main
    from sam3d.cli.predict import main
    from tests.conftest import make_tiny_models

    checkpoint, report_model = make_tiny_models(tmp_path / "models")
    spec = _spec([4.0] * 8 + [7.0] * 8, 18.5)
    paths = write_ct_series(tmp_path / "ct", spec, head_phantom_hu, extension="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeometryWarning)
        assert (
            main(
                [
                    "--checkpoint",
                    str(checkpoint),
                    "--input",
                    str(tmp_path / "ct"),
                    "--output_dir",
                    str(tmp_path / "out"),
                    "--device",
                    "cpu",
                    "--no-intracranial_mask",
                    "--no-hyperdense_only",
                    "--threshold",
                    "0.001",
                ]
            )
            == 0
        )
    record = json.loads((tmp_path / "out" / "ct_measurements.json").read_text())
    geometry = record["geometry"]
    assert geometry["tilt_deg"] == pytest.approx(18.5, abs=0.05) and geometry["resampled"]
    assert geometry["series"]["files"] == len(paths)
    mask, _ = _load(tmp_path / "out" / "ct_mask.nii.gz")
    volume, _ = _load(tmp_path / "ct")
    np.testing.assert_allclose(mask.affine, volume.affine, atol=1e-4)
    seg = hd.seg.segread(record["files"]["dicom_seg"])
    on_slices = mask_on_frames(mask.array, volume.affine, volume.dicom)
    assert on_slices.any()  # a threshold near 0 marks nearly everything: a SEG with content
    assert int(seg.NumberOfFrames) == int(on_slices.any(axis=(1, 2)).sum())
    referenced = {
        str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced <= {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
    assert record["measurements"]["total_volume_ml"] == pytest.approx(
        mask.array.sum() * volume.voxel_volume_ml, abs=0.01
    )
    assert dciodvfy_errors(record["files"]["dicom_seg"]) == []
    assert not [
        p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".") and p.name != ".lock"
    ]  # no staging left

    # A scan whose SEG cannot be written leaves none of its files, only the batch record of the failure.
    class FullDisk:
        def save_as(self, path):
            raise OSError("No space left on device")

    monkeypatch.setattr("sam3d.predict.segmenter.hemorrhage_seg", lambda *args, **kwargs: FullDisk())
    failed_args = ["--checkpoint", str(checkpoint), "--input", str(tmp_path / "ct"), "--output_dir"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeometryWarning)
        assert main([*failed_args, str(tmp_path / "failed"), "--device", "cpu", "--no-hyperdense_only"]) == 1
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == [".lock", "predictions.json"]
    (failure,) = json.loads((tmp_path / "failed" / "predictions.json").read_text())
    assert "No space left on device" in failure["error"]
    monkeypatch.undo()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeometryWarning)
        assert (
            report_main(
                [
                    "--segmentation_checkpoint",
                    str(checkpoint),
                    "--report_model",
                    str(report_model),
                    "--input",
                    str(paths[3]),
                    "--output_dir",
                    str(tmp_path / "report"),
                    "--device",
                    "cpu",
                    "--max_new_tokens",
                    "4",
                    "--num_beams",
                    "1",
                ]
            )
            == 0
        )  # one file stands for its series
    printed = capsys.readouterr().out
    assert "geometry: DICOM series" in printed and "gantry tilt 18.5°" in printed
    report = json.loads((tmp_path / "report" / "IM0004_report.json").read_text())
    assert report["segmentation"]["geometry"]["series"]["files"] == len(paths)
