"""Tests for the synthetic head-CT ICH generator (sam3d/data/synthetic.py).

Small miniature heads (head_scale 0.5, 1.2 x 1.2 x 2.5 mm voxels, grid 83 x 100 x 32) keep the file
fast; the geometry is the same as at clinical resolution, only scaled.
"""

from __future__ import annotations

import csv
import functools
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from sam3d.data import synthetic
from sam3d.data.synthetic import CSV_COLUMNS, ICH_TYPES, make_synthetic_ich, synthesize_case

REPO = Path(__file__).resolve().parents[1]
SMALL = {"head_scale": 0.5, "spacing_mm": (1.2, 1.2, 2.5)}
INDICES = (0, 1, 2, 3)


@functools.cache
def case(index: int, kind: str | None, seed: int = 0):
    return synthesize_case(index, seed, ich_type=kind, **SMALL)


def patient_right_offset(c, voxel_mask: np.ndarray, reference: np.ndarray) -> float:
    """How far (voxels) the centroid of ``voxel_mask`` lies toward the patient's Right of ``reference``'s.

    Uses only the affine's orientation codes, so it checks the file convention, not the generator's.
    """
    codes = nib.aff2axcodes(c.affine)
    axis = next(a for a, code in enumerate(codes) if code in ("L", "R"))
    toward_right = 1.0 if codes[axis] == "R" else -1.0
    centre = lambda m: np.nonzero(m)[axis].mean()  # noqa: E731
    return toward_right * (centre(voxel_mask) - centre(reference))


def distance_to_skull_mm(c) -> np.ndarray:
    return ndi.distance_transform_edt(c.image_hu <= 300, sampling=c.spacing_mm)


# ---------------------------------------------------------------- determinism and independence


def test_same_seed_gives_identical_bytes_and_other_seed_differs():
    a = synthesize_case(2, 7, **SMALL)
    b = synthesize_case(2, 7, **SMALL)
    other = synthesize_case(2, 8, **SMALL)
    assert a.image_hu.dtype == np.int16 and a.mask.dtype == np.uint8
    assert a.image_hu.tobytes() == b.image_hu.tobytes()
    assert a.mask.tobytes() == b.mask.tobytes()
    assert a.metadata == b.metadata
    assert a.image_hu.tobytes() != other.image_hu.tobytes()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    paths = make_synthetic_ich(out, num_cases=8, seed=3, val_fraction=0.25, test_fraction=0.25, progress=False, **SMALL)
    return out, paths


def test_case_k_does_not_depend_on_num_cases(dataset, tmp_path):
    out, _ = dataset
    make_synthetic_ich(tmp_path, num_cases=3, seed=3, progress=False, val_fraction=0.34, **SMALL)
    for k in range(3):
        name = f"case_{k:03d}.nii.gz"
        for sub in ("volumes", "masks"):
            big = np.asarray(nib.load(out / sub / name).dataobj)
            small = np.asarray(nib.load(tmp_path / sub / name).dataobj)
            assert big.tobytes() == small.tobytes(), (sub, name)
    direct = synthesize_case(1, 3, **SMALL)
    assert np.array_equal(np.asarray(nib.load(tmp_path / "volumes/case_001.nii.gz").dataobj), direct.image_hu)


def test_drawn_types_follow_positive_fraction():
    kinds = [synthetic._draw_type(i, 0, 0.6) for i in range(50)]
    assert abs(sum(k != "none" for k in kinds) - 30) <= 2
    assert set(kinds) == set(ICH_TYPES) | {"none"}
    assert all(synthetic._draw_type(i, 0, 0.0) == "none" for i in range(20))
    assert all(synthetic._draw_type(i, 0, 1.0) != "none" for i in range(20))


# ---------------------------------------------------------------- hemorrhage content and location


@pytest.mark.parametrize("kind", ICH_TYPES)
def test_mask_is_blood_and_brighter_than_the_tissue_it_replaces(kind):
    for index in INDICES[:3]:
        c, twin = case(index, kind), case(index, "none")
        m = c.mask.astype(bool)
        assert m.any()
        hu = c.image_hu[m].astype(float)
        assert 55 <= np.median(hu) <= 85, (index, np.median(hu))
        assert np.percentile(hu, 5) >= 35 and np.percentile(hu, 95) <= 110, index
        assert hu.mean() - twin.image_hu[m].mean() > 15, index  # hyperdense vs. healthy twin
        assert c.metadata["ich"] == 1 and c.metadata["ich_type"] == kind


def test_intraparenchymal_is_inside_brain_away_from_skull():
    for index in INDICES:
        c, twin = case(index, "intraparenchymal"), case(index, "none")
        m = c.mask.astype(bool)
        assert 20 <= np.median(twin.image_hu[m]) <= 45, index  # replaced parenchyma
        assert distance_to_skull_mm(c)[m].min() >= 1.0, index  # never touches bone
        assert c.metadata["region"] in ("frontal", "parietal", "temporal", "occipital", "basal ganglia")


def test_subdural_is_a_thin_crescent_against_the_inner_table():
    for index in INDICES:
        c = case(index, "subdural")
        m = c.mask.astype(bool)
        dist = distance_to_skull_mm(c)[m]
        assert dist.min() <= 1.5 * max(c.spacing_mm[:2]), index  # touches the inner table
        assert np.median(dist) <= c.metadata["max_thickness_mm"], index
        assert max(c.metadata["extent_mm"]) >= 3 * c.metadata["max_thickness_mm"], index
        assert c.metadata["region"] == "convexity"


def central_box(c) -> np.ndarray:
    """Voxels of a head-centred box that holds the ventricles but no cortical sulci."""
    i, j, k = np.ogrid[tuple(slice(0, n) for n in c.image_hu.shape)]
    centre = np.linalg.solve(c.affine[:3, :3], np.array(c.metadata["head_centre_mm"]) - c.affine[:3, 3])
    half = np.array([22.0, 50.0, 25.0]) * SMALL["head_scale"] / np.array(c.spacing_mm)
    return (abs(i - centre[0]) < half[0]) & (abs(j - centre[1]) < half[1]) & (abs(k - centre[2]) < half[2])


def test_intraventricular_fills_ventricles():
    hydrocephalus = set()
    for index in INDICES:
        c, twin = case(index, "intraventricular"), case(index, "none")
        m = c.mask.astype(bool)
        assert distance_to_skull_mm(c)[m].min() >= 15 * SMALL["head_scale"], index
        assert c.metadata["region"] == "lateral ventricle"
        if c.metadata["hydrocephalus"]:  # ventricles (CSF + blood) enlarged relative to the twin
            box = central_box(c)
            assert (box & ((c.image_hu < 15) | m)).sum() > 1.2 * (box & (twin.image_hu < 15)).sum()
        else:
            assert np.median(twin.image_hu[m]) <= 15, index  # was CSF in the twin
        hydrocephalus.add(c.metadata["hydrocephalus"])
    assert hydrocephalus == {True, False}


def test_hemorrhage_free_cases_have_empty_masks():
    for index in INDICES[:3]:
        c = case(index, "none")
        assert not c.mask.any()
        meta = c.metadata
        assert (meta["ich"], meta["side"], meta["region"], meta["volume_ml"]) == (0, "none", "none", 0.0)
        assert meta["centroid_voxel"] is None and meta["midline_shift_mm"] == 0.0


def test_volume_ml_and_centroid_match_mask():
    for kind in ICH_TYPES:
        c = case(0, kind)
        voxel_ml = float(np.prod(c.spacing_mm)) / 1000.0
        assert c.metadata["volume_ml"] == round(int(c.mask.sum()) * voxel_ml, 1)
        centroid = np.array(np.nonzero(c.mask)).mean(axis=1)
        assert np.allclose(c.metadata["centroid_voxel"], centroid, atol=0.01)
        world = c.affine @ np.append(centroid, 1.0)
        assert np.allclose(c.metadata["centroid_mm"], world[:3], atol=0.01)


def test_side_is_the_patients_side_per_affine_orientation():
    seen = set()
    for kind in ("intraparenchymal", "subdural"):
        for index in INDICES:
            c = case(index, kind)
            head = c.image_hu > -500
            offset = patient_right_offset(c, c.mask.astype(bool), head)
            side = c.metadata["side"]
            seen.add(side)
            assert (offset < 0) if side == "left" else (offset > 0), (kind, index, side, offset)
            assert abs(offset) * c.spacing_mm[0] > 5 * SMALL["head_scale"], (kind, index)
    assert seen == {"left", "right"}


def test_mass_effect_pushes_ventricles_away_from_the_bleed():
    checked = 0
    for index in INDICES:
        c = case(index, "subdural")
        if not c.metadata["mass_effect"]:
            assert c.metadata["midline_shift_mm"] == 0.0
            continue
        assert c.metadata["midline_shift_mm"] > 0
        twin = case(index, "none")
        box = central_box(c)  # ventricular CSF = dark voxels in the central box
        shifted = patient_right_offset(c, box & (c.image_hu < 15), box & (twin.image_hu < 15))
        away = 1.0 if c.metadata["side"] == "left" else -1.0
        assert away * shifted * c.spacing_mm[0] >= 0.5 * c.metadata["midline_shift_mm"], index
        checked += 1
    assert checked >= 2


def test_tissue_hu_ranges_are_plausible():
    c = case(1, "none")
    img = c.image_hu.astype(float)
    assert img.min() >= -1024
    corner = img[:8, :8, :]
    assert corner.mean() < -900 and 2.0 < corner.std() < 10.0  # air with CT noise
    assert (img > 300).any() and np.percentile(img[img > 300], 90) > 900  # cortical bone
    i, j, k = np.ogrid[tuple(slice(0, n) for n in img.shape)]
    x, y, z = (
        c.affine[a, a] * idx + c.affine[a, 3] - c.metadata["head_centre_mm"][a] for a, idx in enumerate((i, j, k))
    )
    s = SMALL["head_scale"]
    deep_brain = (x / (40 * s)) ** 2 + (y / (55 * s)) ** 2 + (z / (35 * s)) ** 2 < 1.0
    assert 20 <= img[deep_brain].mean() <= 45


# ---------------------------------------------------------------- files, CSVs, splits


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f)), Path(path).read_text().splitlines()[0].split(",")


def test_csv_columns_split_by_patient_and_files(dataset):
    out, paths = dataset
    assert set(paths) == {
        "train_csv",
        "val_csv",
        "test_csv",
        "reports_train",
        "reports_val",
        "reports_test",
        "mask_dir",
        "cases_json",
    }
    patients = {}
    for split in ("train", "val", "test"):
        rows, header = read_csv(paths[f"{split}_csv"])
        assert header == list(CSV_COLUMNS) and header[:3] == ["path", "ich", "patient_id"]
        assert rows, split
        for row in rows:
            assert patients.setdefault(row["patient_id"], split) == split  # patient in one split only
            volume = Path(paths[f"{split}_csv"]).parent / row["path"]
            mask = np.asarray(nib.load(Path(paths["mask_dir"]) / Path(row["path"]).name).dataobj)
            assert volume.is_file()
            assert int(row["ich"]) == int(mask.any()) == int(row["ich_type"] != "none")
            assert row["spacing"] == "1.2x1.2x2.5"
            assert row["side"] in ("left", "right", "bilateral", "none")
    assert len(patients) == 8
    cases = json.loads(Path(paths["cases_json"]).read_text())
    assert [c["patient_id"] for c in cases] == [f"SYN{k:03d}" for k in range(8)]
    assert all(patients[c["patient_id"]] == c["split"] for c in cases)
    positives = [c for c in cases if c["ich"]]
    assert all(c["centroid_mm"] is not None and c["centroid_voxel"] is not None for c in positives)
    leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".")]
    assert leftovers == []  # no temp files left


def test_nifti_affine_orientation_and_spacing(dataset):
    out, _ = dataset
    vol = nib.load(out / "volumes/case_000.nii.gz")
    msk = nib.load(out / "masks/case_000.nii.gz")
    assert np.allclose(vol.header.get_zooms(), SMALL["spacing_mm"])
    assert np.allclose(np.abs(np.diag(vol.affine)[:3]), SMALL["spacing_mm"])
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert np.allclose(vol.affine, msk.affine) and vol.shape == msk.shape == (83, 100, 32)
    assert vol.get_data_dtype() == np.int16 and msk.get_data_dtype() == np.uint8
    assert int(vol.header["sform_code"]) == 1
    centre_world = vol.affine @ np.append((np.array(vol.shape) - 1) / 2.0, 1.0)
    assert np.allclose(centre_world[:3], 0.0, atol=1e-3)


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def broken_save(image, filename):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic.nib, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_ich(tmp_path, num_cases=2, val_fraction=0.5, progress=False, **SMALL)
    assert list((tmp_path / "volumes").iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_cases": 1}, "num_cases"),
        ({"spacing_mm": (1.2, -1.2, 2.5)}, "spacing_mm"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"val_fraction": 0.05}, "val_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"positive_fraction": 2.0}, "positive_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "no training"),
        ({"head_scale": 0.0}, "head_scale"),
        ({"head_scale": 0.1, "spacing_mm": (5.0, 5.0, 5.0)}, "too coarse"),
    ],
)
def test_nonsense_arguments_are_refused(tmp_path, kwargs, name):
    args = {"num_cases": 4, "progress": False, **SMALL, **kwargs}
    with pytest.raises(ValueError, match=name):
        make_synthetic_ich(tmp_path, **args)
    assert not (tmp_path / "train.csv").exists()


def test_synthesize_case_refuses_unknown_type():
    with pytest.raises(ValueError, match="ich_type"):
        synthesize_case(0, ich_type="epidural", **SMALL)


def test_cli_writes_dataset_and_prints_csv_paths(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("sam3d-make-synthetic")),  # the installed console script
            "--output_dir",
            str(out),
            "--num_cases",
            "2",
            "--val_fraction",
            "0.5",
            "--spacing",
            "1.5",
            "1.5",
            "3.0",
            "--head_scale",
            "0.4",
            "--no_progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert f"train_csv: {out / 'train.csv'}" in result.stdout
    assert f"val_csv: {out / 'val.csv'}" in result.stdout
    rows, _ = read_csv(out / "val.csv")
    assert len(rows) == 1 and rows[0]["spacing"] == "1.5x1.5x3.0"
