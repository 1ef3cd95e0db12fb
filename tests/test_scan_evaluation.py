"""sam3d-evaluate --input: the whole pipeline scored on scans with and without masks."""

import csv
import json
import re

import nibabel as nib
import numpy as np
import pytest

from ich_engine.cli import run_main
from sam3d.cli import evaluate
from sam3d.data.io import Volume, VolumeReadError
from sam3d.data.synthetic import synthesize_case
from sam3d.predict.measurement import measure
from sam3d.predict.records import SegmentationResult
from sam3d.predict.scan_evaluation import EvaluationScan, find_scans_and_masks, score, summarize
from tests.conftest import make_tiny_models


def result_for(predicted: np.ndarray, affine: np.ndarray) -> SegmentationResult:
    volume = Volume(np.zeros(predicted.shape, np.float32), affine, tuple(np.diag(affine)[:3]), "scan")
    return SegmentationResult("scan", predicted.astype(np.uint8), volume, measure(predicted, volume), "automatic")


def save(array: np.ndarray, affine: np.ndarray, path) -> str:
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def test_scores_against_a_mask_and_on_a_normal_scan(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    truth = np.zeros((20, 20, 10), np.uint8)
    truth[5:15, 5:15, 2:6] = 1  # 400 voxels of 2 uL: 0.8 mL
    predicted = np.zeros_like(truth)
    predicted[5:15, 5:15, 3:7] = 1  # 300 shared, 100 outside
    row = score(EvaluationScan("a", save(truth, affine, tmp_path / "a.nii.gz"), None), result_for(predicted, affine))
    assert row["dice"] == pytest.approx(0.75) and row["volume_error"] == pytest.approx(0.0)
    assert row["false_positive_ml"] == pytest.approx(0.2) and row["normal"] == 0
    empty = save(np.zeros_like(truth), affine, tmp_path / "b.nii.gz")
    normal = score(EvaluationScan("b", empty, False), result_for(predicted, affine))  # the empty mask outranks ich
    assert normal["normal"] == 1 and normal["false_positive_ml"] == pytest.approx(0.8) and normal["dice"] == ""
    unknown = score(EvaluationScan("c", None, None), result_for(predicted, affine))
    assert unknown["normal"] == "" and unknown["false_positive_ml"] == "" and unknown["measured_ml"] == 0.8
    summary = summarize([row, normal, unknown])
    assert summary["dice_mean"] == 0.75 and summary["normal_false_positive_ml_max"] == 0.8
    assert summary["unknown_scans"] == 1 and summary["normal_scans_over_1_ml"] == 0


def test_masks_are_found_by_name_or_csv_and_a_bleed_without_one_is_named(tmp_path):
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "s1.nii.gz").write_bytes(b"")
    scans = find_scans_and_masks(
        [str(tmp_path / "s1.nii"), str(tmp_path / "s2.nrrd")], None, str(tmp_path / "masks"), False
    )
    assert [s.mask_path for s in scans] == [str(tmp_path / "masks" / "s1.nii.gz"), None]
    assert [s.normal for s in scans] == [None, None]
    table = tmp_path / "list.csv"
    table.write_text("path,ich\ns1.nii,0\ns2.nii,1\n")
    with pytest.raises(VolumeReadError, match=r"list.csv row 3: ich is 1 but no mask was found"):
        find_scans_and_masks([str(tmp_path / "s1.nii"), str(tmp_path / "s2.nii")], str(table), None, False)


def test_the_command_on_a_folder_with_masks_and_on_normals_without(tmp_path, capsys):
    checkpoint, _ = make_tiny_models(tmp_path / "models")
    (tmp_path / "scans").mkdir()
    (tmp_path / "masks").mkdir()
    for index, kind in enumerate(("subdural", "none")):
        case = synthesize_case(index, 0, (3.0, 3.0, 5.0), kind, head_scale=0.5)
        save(case.image_hu, case.affine, tmp_path / "scans" / f"{case.case_id}.nii.gz")
        save(case.mask, case.affine, tmp_path / "masks" / f"{case.case_id}.nii.gz")
    flags = ["--checkpoint", str(checkpoint), "--input", str(tmp_path / "scans")]
    assert evaluate.main([*flags, "--mask_dir", str(tmp_path / "masks"), "--output_dir", str(tmp_path / "e1")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "e1" / "per_scan.csv")))
    assert [r["normal"] for r in rows] == ["0", "1"] and rows[0]["dice"] != "" and rows[1]["dice"] == ""
    assert float(rows[1]["false_positive_ml"]) == float(rows[1]["measured_ml"])
    summary = json.loads((tmp_path / "e1" / "summary.json").read_text())
    assert summary["bleeds_with_masks"] == 1 and summary["normal_scans"] == 1
    assert evaluate.main([*flags, "--normal", "--output_dir", str(tmp_path / "e2")]) == 0
    summary = json.loads((tmp_path / "e2" / "summary.json").read_text())
    assert summary["normal_scans"] == 2 and summary["bleeds_with_masks"] == 0
    assert "normal scans: largest false positive" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, pattern",
    [
        ([], "give --csv .* or --input .*, exactly one"),
        (["--csv", "x.csv"], "--csv needs --mask_dir"),
        (["--csv", "x.csv", "--mask_dir", "m", "--normal"], "--normal goes with --input"),
    ],
)
def test_flag_combinations_are_refused_in_one_line(tmp_path, capsys, flags, pattern):
    code = run_main(evaluate.main, ["--checkpoint", "c.pth", "--output_dir", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(pattern, err[0]), err
