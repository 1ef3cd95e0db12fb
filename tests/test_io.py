"""sam3d.data.io: every format gives the same array and RAS affine; bad files fail with their path."""

import collections
import gzip
import os
import pickle
import re

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from sam3d.data.io import Volume, VolumeReadError, align_mask_to_volume, load_volume, save_nifti


def _oblique_affine(spacing=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, -30.0)):
    """A rotated, anisotropic voxel->RAS affine, so an axis or sign mix-up cannot go unnoticed."""
    a, b = np.deg2rad(20), np.deg2rad(-15)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


@pytest.fixture
def volume_array():
    return np.random.default_rng(0).normal(0, 100, size=(7, 6, 5)).astype(np.float32)


def test_nifti_round_trip_keeps_array_affine_spacing(tmp_path, volume_array):
    affine = _oblique_affine()
    path = tmp_path / "scan.nii.gz"
    save_nifti(path, volume_array, affine)
    vol = load_volume(path)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, volume_array)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    np.testing.assert_allclose(vol.spacing_mm, (0.8, 0.9, 2.5), atol=1e-5)
    assert vol.geometry_known and vol.source == str(path)


def test_nifti_integer_mask_keeps_integer_dtype(tmp_path):
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[1:3, 1:3, 1:3] = True
    save_nifti(tmp_path / "m.nii", mask, np.eye(4))
    vol = load_volume(tmp_path / "m.nii")
    assert vol.array.dtype == np.uint8 and vol.array.sum() == 8


@pytest.mark.parametrize("ext", ["nrrd", "mha", "mhd"])
def test_itk_formats_match_the_nifti_they_were_converted_from(tmp_path, volume_array, ext):
    affine = _oblique_affine()
    save_nifti(tmp_path / "scan.nii.gz", volume_array, affine)
    itk_image = sitk.ReadImage(str(tmp_path / "scan.nii.gz"))
    clean = sitk.GetImageFromArray(sitk.GetArrayFromImage(itk_image))  # without NIfTI-only metadata
    clean.CopyInformation(itk_image)
    sitk.WriteImage(clean, str(tmp_path / f"scan.{ext}"))

    nifti, converted = load_volume(tmp_path / "scan.nii.gz"), load_volume(tmp_path / f"scan.{ext}")
    np.testing.assert_array_equal(converted.array, nifti.array)
    np.testing.assert_allclose(converted.affine, nifti.affine, atol=1e-4)
    np.testing.assert_allclose(converted.spacing_mm, nifti.spacing_mm, atol=1e-4)


def _write_dicom_series(folder, volume_xyz, spacing, origin, series_uid):
    """Write a (x, y, z) int16 volume as one CT DICOM file per slice, ITK/LPS geometry."""
    folder.mkdir(exist_ok=True)
    image = sitk.GetImageFromArray(volume_xyz.transpose())
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetDepth()):
        slice_ = image[:, :, z]
        position = image.TransformIndexToPhysicalPoint((0, 0, z))
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0032": "\\".join(str(p) for p in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(z + 1),
            "0018|0050": str(spacing[2]),
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid}_{z}.dcm"))
        writer.Execute(slice_)


def test_dicom_series_folder_reads_largest_series_in_ras(tmp_path):
    rng = np.random.default_rng(1)
    ct = rng.integers(-1000, 1000, size=(8, 6, 3)).astype(np.int16)
    _write_dicom_series(tmp_path / "dcm", ct, (0.7, 0.8, 2.5), (10.0, -5.0, 3.0), "1.2.3.3")
    other = rng.integers(-1000, 1000, size=(8, 6, 2)).astype(np.int16)  # a second, smaller series
    _write_dicom_series(tmp_path / "dcm", other, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), "1.2.3.2")

    vol = load_volume(tmp_path / "dcm")
    np.testing.assert_array_equal(vol.array, ct)
    # LPS origin (10, -5, 3) and +x/+y axes become RAS (-10, 5, 3) with -x/-y axes.
    expected = np.array([[-0.7, 0, 0, -10.0], [0, -0.8, 0, 5.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(vol.affine, expected, atol=1e-4)
    np.testing.assert_allclose(vol.spacing_mm, (0.7, 0.8, 2.5), atol=1e-4)


def test_dicom_folder_errors_name_the_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VolumeReadError, match=r"empty.*DICOM folder is empty"):
        load_volume(empty)
    no_dicom = tmp_path / "notes"
    no_dicom.mkdir()
    (no_dicom / "readme.txt").write_text("not an image")
    with pytest.raises(
        VolumeReadError, match=r"notes: no CT image series found \(only CT slices are read\); it holds 1 non-DICOM$"
    ):
        load_volume(no_dicom)


def test_npy_has_no_geometry_and_drops_singleton_channel(tmp_path, volume_array):
    np.save(tmp_path / "a.npy", volume_array[None])
    vol = load_volume(tmp_path / "a.npy")
    assert vol.array.shape == (7, 6, 5)
    assert not vol.geometry_known
    np.testing.assert_array_equal(vol.affine, np.eye(4))
    assert vol.spacing_mm == (1.0, 1.0, 1.0)


def test_npz_key_selection(tmp_path, volume_array):
    np.savez(tmp_path / "named.npz", image=volume_array, other=np.zeros(3))
    np.testing.assert_array_equal(load_volume(tmp_path / "named.npz").array, volume_array)
    np.savez(tmp_path / "single.npz", whatever=volume_array)
    np.testing.assert_array_equal(load_volume(tmp_path / "single.npz").array, volume_array)
    np.savez(tmp_path / "ambiguous.npz", foo=volume_array, bar=volume_array)
    with pytest.raises(VolumeReadError, match=r"ambiguous\.npz.*found keys \['foo', 'bar'\]"):
        load_volume(tmp_path / "ambiguous.npz")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_of_bare_array(tmp_path, volume_array, protocol):
    with open(tmp_path / "a.pkl", "wb") as f:
        pickle.dump(volume_array, f, protocol=protocol)
    vol = load_volume(tmp_path / "a.pkl")
    np.testing.assert_array_equal(vol.array, volume_array)
    assert not vol.geometry_known


def test_pickle_dict_with_spacing_or_affine(tmp_path, volume_array):
    with open(tmp_path / "s.pickle", "wb") as f:
        pickle.dump({"image": volume_array, "spacing": (np.float64(0.5), 0.5, 5.0), "id": "049"}, f)
    vol = load_volume(tmp_path / "s.pickle")
    np.testing.assert_array_equal(vol.array, volume_array)
    assert vol.geometry_known and vol.spacing_mm == (0.5, 0.5, 5.0)
    np.testing.assert_array_equal(vol.affine, np.diag([0.5, 0.5, 5.0, 1.0]))

    affine = _oblique_affine()
    with open(tmp_path / "a.pkl", "wb") as f:
        pickle.dump(collections.OrderedDict(volume=volume_array.astype(np.int16), affine=affine), f)
    vol = load_volume(tmp_path / "a.pkl")
    assert vol.array.dtype == np.int16
    np.testing.assert_allclose(vol.affine, affine)

    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump({"image": volume_array, "affine": affine, "spacing": (1, 1, 1)}, f)
    with pytest.raises(VolumeReadError, match="disagrees with the affine"):
        load_volume(tmp_path / "bad.pkl")
    with open(tmp_path / "nokey.pkl", "wb") as f:
        pickle.dump({"pixels": volume_array}, f)
    with pytest.raises(VolumeReadError, match=r"nokey\.pkl.*found keys \['pixels'\]"):
        load_volume(tmp_path / "nokey.pkl")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"image": np.zeros((4, 4, 4)), "payload": _Exploit(marker)}, f)
    with pytest.raises(VolumeReadError, match=r"evil\.pkl: refused to unpickle '(posix|nt|os)\.system'"):
        load_volume(path)
    assert not marker.exists()

    with open(tmp_path / "builtin.pkl", "wb") as f:
        pickle.dump(eval, f)  # any callable outside numpy is refused
    with pytest.raises(VolumeReadError, match=r"refused to unpickle 'builtins\.eval'"):
        load_volume(tmp_path / "builtin.pkl")


def test_nan_and_inf_are_counted(tmp_path, volume_array):
    volume_array[0, 0, 0] = np.nan
    volume_array[1, 2, 3] = np.inf
    np.save(tmp_path / "nan.npy", volume_array)
    with pytest.raises(VolumeReadError, match=r"nan\.npy: 2 NaN/Inf voxel\(s\) out of 210"):
        load_volume(tmp_path / "nan.npy")


@pytest.mark.parametrize("shape", [(5, 6), (2, 5, 6, 7), (1, 1, 5, 6)])
def test_non_3d_shapes_are_rejected_with_the_shape(tmp_path, shape):
    np.save(tmp_path / "x.npy", np.zeros(shape, np.float32))
    with pytest.raises(VolumeReadError, match=r"x\.npy: expected a 3-D volume.*" + re.escape(str(shape))):
        load_volume(tmp_path / "x.npy")


def test_4d_nifti_with_one_channel_is_accepted(tmp_path, volume_array):
    save_nifti(tmp_path / "c.nii", volume_array[..., None], np.eye(4))
    assert load_volume(tmp_path / "c.nii").array.shape == (7, 6, 5)


def test_corrupt_missing_and_unknown_files(tmp_path):
    corrupt = tmp_path / "broken.nii.gz"
    corrupt.write_bytes(gzip.compress(b"this is not a nifti header"))
    with pytest.raises(VolumeReadError, match=r"broken\.nii\.gz: cannot read \("):
        load_volume(corrupt)
    (tmp_path / "trunc.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(VolumeReadError, match=r"trunc\.npy: cannot read"):
        load_volume(tmp_path / "trunc.npy")
    with pytest.raises(VolumeReadError, match=r"missing\.nii: file does not exist"):
        load_volume(tmp_path / "missing.nii")
    (tmp_path / "scan.txt").write_text("1 2 3")
    expected = r"scan\.txt: unsupported file type; supported: .*\.nii\.gz.*\.pkl.*DICOM"
    with pytest.raises(VolumeReadError, match=expected):
        load_volume(tmp_path / "scan.txt")


def test_save_nifti_is_atomic(tmp_path, volume_array, monkeypatch):
    path = tmp_path / "out.nii.gz"
    save_nifti(path, volume_array, np.eye(4))
    before = path.read_bytes()

    def failing_save(image, filename):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(path, volume_array * 2, np.eye(4))
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]  # no temp file left


def test_align_mask_lends_geometry_and_detects_mismatch():
    affine = _oblique_affine()
    array = np.zeros((4, 5, 6), np.float32)
    bare_scan = Volume(array, np.eye(4), (1.0, 1.0, 1.0), "scan.pkl", geometry_known=False)
    scan, _ = align_mask_to_volume(bare_scan, Volume(array, affine, (0.8, 0.9, 2.5), "mask.nii.gz"))
    np.testing.assert_allclose(scan.affine, affine)
    assert scan.geometry_known and scan.spacing_mm == pytest.approx((0.8, 0.9, 2.5))

    scan = Volume(array, affine, (0.8, 0.9, 2.5), "s.nii")
    shifted = affine.copy()
    shifted[0, 3] += 0.01  # 10 micrometres: more than the 1e-3 mm tolerance
    with pytest.raises(VolumeReadError, match=r"geometry mismatch: affine of mask m\.nii.*volume s\.nii"):
        align_mask_to_volume(scan, Volume(array, shifted, (0.8, 0.9, 2.5), "m.nii"))
    with pytest.raises(VolumeReadError, match=r"shape mismatch: mask m\.nii has shape \(4, 5, 5\)"):
        align_mask_to_volume(scan, Volume(array[..., :5], affine, (0.8, 0.9, 2.5), "m.nii"))
