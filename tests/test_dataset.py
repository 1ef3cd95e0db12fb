"""sam3d.data.dataset: manifest problems are reported with file + row; items batch with MONAI."""

import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from monai.data import DataLoader, PersistentDataset

import sam3d.data.transforms as transforms_module
from sam3d.data.dataset import ManifestError, build_segmentation_dataset, check_no_scan_in_both, read_manifest
from sam3d.data.io import save_nifti
from sam3d.data.preprocessing import Preprocessing
from sam3d.data.transforms import build_transforms

SHAPE = (40, 40, 20)
SPACING = (1.5, 1.5, 3.0)
AFFINE = np.diag([*SPACING, 1.0])


def _scan(seed=0):
    """Air with a noisy head block, in HU."""
    image = np.full(SHAPE, -1000.0, np.float32)
    image[4:36, 4:36, 2:18] = np.random.default_rng(seed).normal(40, 10, size=(32, 32, 16))
    return image


def _lesion_mask():
    mask = np.zeros(SHAPE, np.uint8)
    mask[12:18, 20:26, 8:12] = 1
    return mask


def _write_pkl(path, image=None):
    """The existing users' format: a pickled dict with the array and its spacing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"image": _scan() if image is None else image, "spacing": SPACING}, f)


@pytest.fixture
def data(tmp_path):
    """Two good cases: 000.pkl with hemorrhage (mask 000.nii.gz) and sub/001.pkl without (no mask)."""
    (tmp_path / "masks").mkdir()
    _write_pkl(tmp_path / "000.pkl")
    save_nifti(tmp_path / "masks" / "000.nii.gz", _lesion_mask(), AFFINE)
    _write_pkl(tmp_path / "sub" / "001.pkl", _scan(1))  # another scan: equal voxels would be a duplicate
    return tmp_path


def _csv(folder, *lines, header="path,ich,patient_id,site"):
    path = folder / "manifest.csv"
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def test_reads_rows_with_paths_masks_and_extra_columns(data):
    save_nifti(data / "002.nii.gz", _scan(2), AFFINE)
    np.save(data / "masks" / "002.npy", _lesion_mask())  # a bare-array mask takes the scan's geometry
    csv = _csv(data, "000.pkl,1,p0,a", "sub/001.pkl,0,p1,b", f"{data / '002.nii.gz'},1,p0,c")
    rows, skipped = read_manifest(csv, data / "masks")
    assert skipped == []
    assert [r.row for r in rows] == [2, 3, 4]
    assert [r.path for r in rows] == [str(data / n) for n in ("000.pkl", "sub/001.pkl", "002.nii.gz")]
    assert [r.ich for r in rows] == [1, 0, 1]
    assert [r.mask_path for r in rows] == [str(data / "masks/000.nii.gz"), None, str(data / "masks/002.npy")]
    assert rows[0].patient_id == "p0" and rows[2].extra == {"site": "c"}


def test_empty_csv_gets_a_clear_message(data):
    csv = _csv(data)  # header only
    with pytest.raises(ManifestError, match=r"manifest\.csv: the CSV has a header but no data rows"):
        read_manifest(csv, data / "masks")
    csv.write_text("")
    with pytest.raises(ManifestError, match=r"manifest\.csv: the CSV is empty"):
        read_manifest(csv, data / "masks")


def test_missing_column_lists_the_columns_found(data):
    csv = _csv(data, "000.pkl,1", header="path,ICH")
    expected = r"manifest\.csv, row 1 .*\['ich', 'patient_id'\]; found columns \['path', 'ICH'\]"
    with pytest.raises(ManifestError, match=expected):
        read_manifest(csv, data / "masks")


def _nan_scan(d):
    image = _scan()
    image[0, 0, :3] = np.nan
    _write_pkl(d / "003.pkl", image)


def _mask(d, mask, affine=AFFINE):
    _write_pkl(d / "003.pkl")
    save_nifti(d / "masks" / "003.nii.gz", mask, affine)


# case: (CSV line for row 3, files it needs, expected reason as a regex)
BAD_ROWS = {
    "ich not 0/1": ("003.pkl,2,p3,x", lambda d: _write_pkl(d / "003.pkl"), r"'ich' must be 0 or 1, got '2'"),
    "volume missing": ("003.pkl,0,p3,x", lambda d: None, r"volume file not found: .*003\.pkl"),
    "ich=1 without mask": (
        "003.pkl,1,p3,x",
        lambda d: _write_pkl(d / "003.pkl"),
        r"ich=1 but no mask found in .*masks \(tried 003\.nii\.gz, 003\.nii, 003\.nrrd, 003\.mha, .*, 003\.pickle\)",
    ),
    "unreadable volume": (
        "003.pkl,0,p3,x",
        lambda d: (d / "003.pkl").write_bytes(b"garbage"),
        r"003\.pkl: cannot read",
    ),
    "NaN in volume": ("003.pkl,0,p3,x", _nan_scan, r"003\.pkl: 3 NaN/Inf voxel"),
    "mask shape": (
        "003.pkl,1,p3,x",
        lambda d: _mask(d, _lesion_mask()[:, :, :19]),
        r"shape mismatch: mask .*003\.nii\.gz",
    ),
    "mask geometry": (
        "003.pkl,1,p3,x",
        lambda d: _mask(d, _lesion_mask(), np.diag([1.5, 1.5, 2.5, 1.0])),
        r"geometry mismatch: affine of mask .*003\.nii\.gz .* volume .*003\.pkl",
    ),
    "mask values": (
        "003.pkl,1,p3,x",
        lambda d: _mask(d, _lesion_mask() * 2),
        r"must contain only 0 and 1, found values \[0, 2\]",
    ),
    "ich=1 empty mask": (
        "003.pkl,1,p3,x",
        lambda d: _mask(d, np.zeros(SHAPE, np.uint8)),
        r"ich=1 but mask .* is all zero",
    ),
    "ich=0 lesion mask": (
        "003.pkl,0,p3,x",
        lambda d: _mask(d, _lesion_mask()),
        r"ich=0 but mask .* marks 144 hemorrhage voxel",
    ),
    "more cells than the header": (
        "003.pkl,0,p3,x,extra,cells",
        lambda d: _write_pkl(d / "003.pkl"),
        r"has 6 cell\(s\), the header has 4 \(path, ich, patient_id, site\)",
    ),
    "fewer cells than the header": (
        "003.pkl,0,p3",
        lambda d: _write_pkl(d / "003.pkl"),
        r"has 3 cell\(s\), the header has 4",
    ),
    "the same scan under another name and patient": (
        "003.pkl,0,P_0,x",
        lambda d: (d / "003.pkl").write_bytes((d / "sub" / "001.pkl").read_bytes()),
        r"the same scan as row 2 \(.*001\.pkl\): equal voxels and affine",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_is_reported_with_file_row_and_path(data, case):
    line, make_files, reason = BAD_ROWS[case]
    make_files(data)
    first = "sub/001.pkl,0,p1,a" if "same scan" in case else "000.pkl,1,p0,a"
    csv = _csv(data, first, line)
    with pytest.raises(ManifestError, match=r"manifest\.csv, row 3 \(.*003\.pkl\): .*" + reason):
        read_manifest(csv, data / "masks")

    with pytest.warns(UserWarning, match=r"skipping .*manifest\.csv, row 3"):
        rows, skipped = read_manifest(csv, data / "masks", skip_invalid=True)
    assert [r.row for r in rows] == [2]
    assert len(skipped) == 1 and skipped[0]["row"] == 3 and skipped[0]["path"].endswith("003.pkl")
    assert re.search(reason, skipped[0]["reason"])


def test_the_same_scan_in_training_and_validation_is_refused_whatever_its_path_or_patient(data):
    (data / "val").mkdir()
    (data / "val" / "copy.pkl").write_bytes((data / "000.pkl").read_bytes())
    save_nifti(data / "masks" / "copy.nii.gz", _lesion_mask(), AFFINE)
    train, _ = read_manifest(_csv(data, "000.pkl,1,SYN000,a", "sub/001.pkl,0,SYN001,a"), data / "masks")
    (data / "val" / "val.csv").write_text("path,ich,patient_id\ncopy.pkl,1,P_0\n")
    val, _ = read_manifest(data / "val" / "val.csv", data / "masks")
    with pytest.raises(
        ManifestError, match=r"val\.csv, row 2 \(.*copy\.pkl\) is the same scan as .*manifest\.csv, row 2"
    ):
        check_no_scan_in_both(train, val)
    check_no_scan_in_both(train, val, allowed=True)  # --allow_patient_overlap
    check_no_scan_in_both(train[1:], val)  # another scan: no error


def test_a_data_error_met_while_loading_names_the_csv_row_in_one_line(data):
    save_nifti(data / "masks" / "000.nii.gz", _lesion_mask() * 2, AFFINE)  # {0, 2}: not a mask
    rows, _ = read_manifest(_csv(data, "000.pkl,1,p0,a"), data / "masks", validate="paths")
    dataset = build_segmentation_dataset(rows, build_transforms(Preprocessing(roi_size=(16, 16, 16)), train=False))
    with pytest.raises(
        ManifestError,
        match=r"^\S*manifest\.csv, row 2 \(\S*000\.pkl\): \S*000\.nii\.gz: a mask must hold only 0 and 1, "
        r"found values \[0, 2\]$",
    ):
        dataset[0]


def test_paths_mode_only_checks_existence(data):
    BAD_ROWS["mask geometry"][1](data)
    csv = _csv(data, "000.pkl,1,p0,a", "003.pkl,1,p3,x")
    rows, _ = read_manifest(csv, data / "masks", validate="paths")
    assert [r.row for r in rows] == [2, 3]


def test_all_rows_skipped_is_an_error_not_an_empty_dataset(data):
    csv = _csv(data, "nope.pkl,0,p0,a", "000.pkl,7,p0,a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ManifestError, match=r"no usable rows left; all 2 were skipped"):
            read_manifest(csv, data / "masks", skip_invalid=True)


def test_scans_without_geometry_are_warned_about(data):
    np.save(data / "004.npy", _scan())
    csv = _csv(data, "004.npy,0,p4,a")
    with pytest.warns(UserWarning, match=r"1 scan\(s\) carry no voxel spacing.*004\.npy"):
        read_manifest(csv, data / "masks")


@pytest.mark.parametrize("cached", [False, True])
def test_dataloader_batches_two_items(data, cached, monkeypatch):
    csv = _csv(data, "000.pkl,1,p0,a", "sub/001.pkl,0,p1,b")
    rows, _ = read_manifest(csv, data / "masks")
    pipeline = build_transforms({"roi_size": (32, 32, 32)}, train=not cached)
    dataset = build_segmentation_dataset(rows, pipeline, cache_dir=str(data / "cache") if cached else None)
    assert isinstance(dataset, PersistentDataset) == cached

    batch = next(iter(DataLoader(dataset, batch_size=2, num_workers=0)))
    assert batch["image"].shape == batch["label"].shape == (2, 1, 32, 32, 32)
    assert batch["image"].dtype == batch["label"].dtype == torch.float32
    assert set(batch["label"].unique().tolist()) == {0.0, 1.0}
    assert batch["label"][0].sum() > 0 and batch["label"][1].sum() == 0  # positive, then the ich=0 scan
    assert batch["ich"].tolist() == [1, 0] and batch["row"].tolist() == [2, 3]
    assert batch["patient_id"] == ["p0", "p1"] and batch["extra"] == {"site": ["a", "b"]}
    assert batch["path"] == [rows[0].path, rows[1].path]

    if cached:  # the second pass must come from the cache: reading a file now would fail
        assert len(list((data / "cache").glob("*.pt"))) == 2

        def no_reading(path):
            raise AssertionError(f"cache miss: {path} was read again")

        monkeypatch.setattr(transforms_module, "load_volume", no_reading)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # MONAI warns and recomputes when a cache file will not load
            again = next(iter(DataLoader(dataset, batch_size=2, num_workers=0)))
        torch.testing.assert_close(again["image"].as_tensor(), batch["image"].as_tensor())
        torch.testing.assert_close(again["label"].as_tensor(), batch["label"].as_tensor())
