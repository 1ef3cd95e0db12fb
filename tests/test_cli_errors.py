"""A user's mistakes end as one line naming the flag, key, file or row, before any heavy work; nothing is lost.

Issue classes: readable errors with exit codes (2 usage, 1 data), clicks outside the scan, records
that say what ran (crash summaries, resume with changed flags), safe outputs (lock, umask, name
clashes), and a batch that survives one bad scan.
"""

from __future__ import annotations

import csv
import json
import os
import re
import stat
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ich_engine.checkpoint import atomic_save, atomic_write, lock_output_dir
from ich_engine.cli import run_main
from ich_engine.config import ConfigError
from ich_engine.settings import check_resume
from ich_engine.trainer import Trainer, TrainerConfig
from sam3d.cli import train
from sam3d.cli.predict import main as predict_main
from sam3d.data.synthetic import synthesize_case
from sam3d.modeling import build_sam3d, model_config
from sam3d.predict import Click, HemorrhageSegmenter
from sam3d.task import SegmentationTask
from sam3d.training import SegmentationTrainingConfig
from tests.conftest import VolumeDataset, make_tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def train_inputs(tmp_path):
    """Files that exist, so the checks reach the flag under test (none of them is read)."""
    (tmp_path / "train.csv").write_text("path,ich,patient_id\n")
    (tmp_path / "val.csv").write_text("path,ich,patient_id\n")
    (tmp_path / "masks").mkdir()
    return [
        "--train_csv",
        str(tmp_path / "train.csv"),
        "--val_csv",
        str(tmp_path / "val.csv"),
        "--mask_dir",
        str(tmp_path / "masks"),
        "--output_dir",
        str(tmp_path / "run"),
        "--epochs",
        "3",
        "--patience",
        "2",
    ]


def _one_line_error(capsys, code, expected_rc, pattern):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == expected_rc, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert pattern in err[0], err[0]


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--model_type", "vit_huge"], "--model_type 'vit_huge': unknown; choose one of"),
        (["--negative_random_crop_prob", "1.5"], "negative_random_crop_prob must be in [0, 1]"),
        (["--hu_windows", "[40]"], "hu_windows must be a list of [level, width] pairs"),
        (["--device", "cuda"], "--device cuda: CUDA is not available here"),
        (["--max_steps_per_epoch", "-1"], "max_steps_per_epoch must be >= 1"),
        (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    ],
    ids=["model_type", "crop_prob", "hu_windows", "device", "max_steps", "argparse"],
)
def test_train_flags_fail_in_one_line_before_any_work(train_inputs, capsys, flags, pattern):
    if flags[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _one_line_error(capsys, run_main(train.main, train_inputs + flags), 2, pattern)


def test_yaml_values_are_checked_like_flags(train_inputs, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("target_spacing: 1.5\n")
    _one_line_error(
        capsys,
        run_main(train.main, train_inputs + ["--config", str(config)]),
        2,
        f"--config {config}: key 'target_spacing' expects a list of 3 values, found 1.5",
    )
    config.write_text("scheduler_type: linear\n")
    _one_line_error(
        capsys,
        run_main(train.main, train_inputs + ["--config", str(config)]),
        2,
        "key 'scheduler_type' must be one of ['reduce_on_plateau', 'cosine', 'step'], found 'linear'",
    )
    config.write_text("use_mixed_precision: 'yes'\n")
    _one_line_error(
        capsys,
        run_main(train.main, train_inputs + ["--config", str(config)]),
        2,
        "key 'use_mixed_precision' expects true or false, found 'yes'",
    )


def test_debug_shows_the_traceback(train_inputs):
    with pytest.raises(ConfigError, match="unknown; choose one of"):
        run_main(train.main, train_inputs + ["--model_type", "vit_huge", "--debug"])


@pytest.fixture
def scan(tmp_path):
    case = synthesize_case(1, seed=0, spacing_mm=(3.0, 3.0, 5.0), ich_type="subdural", head_scale=0.5)
    path = tmp_path / "scans" / "scan.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(case.image_hu, case.affine), path)
    return path


@pytest.mark.parametrize(
    "flags, rc, pattern",
    [
        (["--threshold", "2"], 2, "--threshold 2: a probability strictly between 0 and 1"),
        (["--click", "10", "x", "3"], 2, "--click 10 x 3: X Y Z must be numbers"),
    ],
    ids=["threshold", "click"],
)
def test_predict_flags_fail_in_one_line(models, scan, tmp_path, capsys, flags, rc, pattern):
    code = run_main(
        predict_main,
        ["--checkpoint", str(models[0]), "--input", str(scan), "--output_dir", str(tmp_path / "out"), *flags],
    )
    _one_line_error(capsys, code, rc, pattern)


def test_evaluate_refuses_zero_clicks_before_reading_anything(tmp_path, capsys):
    from sam3d.cli.evaluate import main as evaluate_main

    flags = ["--checkpoint", str(tmp_path / "none.pth"), "--csv", "none.csv", "--mask_dir", str(tmp_path)]
    code = run_main(evaluate_main, [*flags, "--output_dir", str(tmp_path / "out"), "--num_clicks", "0"])
    _one_line_error(capsys, code, 2, "--num_clicks must be >= 1")


def test_wrong_or_empty_checkpoints_are_named(models, scan, tmp_path, capsys):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    code = run_main(predict_main, ["--checkpoint", str(empty), "--input", str(scan), "--output_dir", str(tmp_path)])
    _one_line_error(capsys, code, 1, "the checkpoint file is empty (0 bytes)")
    export = tmp_path / "sam_encoder.pth"
    atomic_save({"image_encoder_state_dict": {"w": torch.zeros(1)}, "model_config": {}}, export)
    code = run_main(predict_main, ["--checkpoint", str(export), "--input", str(scan), "--output_dir", str(tmp_path)])
    _one_line_error(capsys, code, 1, "an exported encoder (sam_encoder.pth")


def test_clicks_outside_the_scan_are_refused_with_its_bounds(models, scan):
    segmenter = HemorrhageSegmenter(models[0])
    with pytest.raises(ConfigError, match=r"--click 500 10 3 \(voxel\): outside .*voxel indices 0\.\.\d+, 0\.\.\d+"):
        segmenter.predict(scan, [Click((500.0, 10.0, 3.0))])
    with pytest.raises(ConfigError, match=r"\(mm\): outside .*RAS mm -?\d"):
        segmenter.predict(scan, [Click((0.0, 0.0, 900.0), space="mm")])


def test_a_batch_records_a_bad_scan_and_goes_on(models, scan, tmp_path, capsys):
    (scan.parent / "broken.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "out"
    code = run_main(
        predict_main,
        ["--checkpoint", str(models[0]), "--input", str(scan.parent), "--output_dir", str(out), "--device", "cpu"],
    )
    assert code == 1
    records = json.loads((out / "predictions.json").read_text())
    assert [("error" in r) for r in records] == [True, False]  # broken.nii.gz first, then scan.nii.gz
    assert "broken.nii.gz: cannot read" in records[0]["error"] and (out / "scan_mask.nii.gz").is_file()
    assert "1 of 2 scan(s) failed" in capsys.readouterr().err
    code = run_main(
        predict_main,
        [
            "--checkpoint",
            str(models[0]),
            "--input",
            str(scan.parent),
            "--output_dir",
            str(tmp_path / "fast"),
            "--fail_fast",
        ],
    )
    assert code == 1 and not (tmp_path / "fast" / "scan_mask.nii.gz").exists()


def test_inputs_that_would_share_output_names_are_refused(models, scan, tmp_path, capsys):
    (scan.parent / "scan.nrrd").write_bytes(b"")
    code = run_main(
        predict_main,
        ["--checkpoint", str(models[0]), "--input", str(scan.parent), "--output_dir", str(tmp_path / "out")],
    )
    _one_line_error(capsys, code, 2, "would both write outputs named 'scan_*'")


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", lambda tmp: tmp.write_text("{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


def test_a_second_run_on_one_output_dir_is_refused(tmp_path):
    with lock_output_dir(tmp_path):
        with pytest.raises(ConfigError, match=rf"--output_dir {tmp_path}: in use by PID {os.getpid()} on .*started"):
            with lock_output_dir(tmp_path):
                pass
    with lock_output_dir(tmp_path):  # released at the end of the first run
        pass


@pytest.mark.parametrize("command", ["predict", "report", "evaluate"])
def test_scan_commands_lock_their_output_folder_and_check_it_before_loading_a_model(
    models, scan, tmp_path, capsys, command
):
    from blip.cli.report import main as report_main
    from sam3d.cli.evaluate import main as evaluate_main

    seg, report_model = models
    run = {
        "predict": (predict_main, ["--checkpoint", str(seg), "--input", str(scan)]),
        "report": (report_main, ["--segmentation_checkpoint", str(seg), "--report_model", str(report_model)]),
        "evaluate": (evaluate_main, ["--checkpoint", str(seg), "--csv", str(tmp_path / "no.csv"), "--mask_dir", "m"]),
    }[command]
    main, flags = run[0], run[1] + (["--input", str(scan)] if command == "report" else [])
    out = tmp_path / "out"
    with lock_output_dir(out):  # a run in progress on that folder
        code = run_main(main, [*flags, "--output_dir", str(out)])
    _one_line_error(capsys, code, 2, f"--output_dir {out}: in use by PID {os.getpid()}")
    (tmp_path / "a_file").write_text("")
    code = run_main(main, [*flags, "--output_dir", str(tmp_path / "a_file")])
    _one_line_error(capsys, code, 2, "a_file: is a file; a folder")
    code = run_main(main, [*flags, "--output_dir", str(tmp_path / "a_file" / "out")])
    _one_line_error(capsys, code, 2, "a_file/out: cannot write into it (Not a directory)")


def test_a_second_batch_keeps_the_records_of_the_first(models, scan, tmp_path, capsys):
    other = scan.parent / "other.nii.gz"
    other.write_bytes(scan.read_bytes())
    out = tmp_path / "out"
    base = ["--checkpoint", str(models[0]), "--output_dir", str(out), "--device", "cpu"]
    assert run_main(predict_main, [*base, "--input", str(scan)]) == 0
    assert run_main(predict_main, [*base, "--input", str(other)]) == 0
    assert run_main(predict_main, [*base, "--input", str(scan)]) == 0  # a scan run again: its newest record
    records = json.loads((out / "predictions.json").read_text())
    assert sorted(Path(r["source"]).name for r in records) == ["other.nii.gz", "scan.nii.gz"]
    (out / "predictions.json").write_text("{not json")
    capsys.readouterr()
    assert run_main(predict_main, [*base, "--input", str(other)]) == 0
    assert "predictions.json: not a list of records; kept aside as" in capsys.readouterr().err
    assert (out / "predictions.json.unreadable").read_text() == "{not json"


class FailingTask(SegmentationTask):
    def validate(self, model, loader, device):
        if getattr(self, "_calls", 0) == 1:
            raise RuntimeError("disk went away")
        self._calls = getattr(self, "_calls", 0) + 1
        return super().validate(model, loader, device)


def test_a_crashed_run_says_so_in_its_summary(tmp_path):
    torch.manual_seed(0)
    model = build_sam3d(model_config("small", img_size=32))
    config = TrainerConfig(output_dir=str(tmp_path), epochs=3, batch_size=2, seed=3, patience=10)
    trainer = Trainer(
        config,
        FailingTask(num_clicks=1, val_num_clicks=1, seed=0),
        model,
        [{"params": list(model.parameters()), "lr": 1e-3}],
        torch.device("cpu"),
    )
    with pytest.raises(RuntimeError, match="disk went away"):
        trainer.fit(VolumeDataset(4), VolumeDataset(2, seed=1))
    summary = json.loads(next(tmp_path.glob("training_summary_*.json")).read_text())
    assert summary["stop_reason"].startswith("failed during epoch 2 (RuntimeError: disk went away)")
    assert summary["epochs_trained"] == 1


def test_a_save_that_fails_after_the_last_epoch_is_not_called_a_later_epoch(tmp_path, monkeypatch):
    import ich_engine.trainer as trainer_module

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer_module, "atomic_save", full_disk)
    torch.manual_seed(0)
    model = build_sam3d(model_config("small", img_size=32))
    config = TrainerConfig(output_dir=str(tmp_path), epochs=1, batch_size=2, seed=3, patience=10)
    task = SegmentationTask(num_clicks=1, val_num_clicks=1, seed=0)
    trainer = Trainer(config, task, model, [{"params": list(model.parameters()), "lr": 1e-3}], torch.device("cpu"))
    with pytest.raises(OSError):
        trainer.fit(VolumeDataset(2), VolumeDataset(2, seed=1))
    summary = json.loads(next(tmp_path.glob("training_summary_*.json")).read_text())
    assert summary["stop_reason"].startswith("failed after epoch 1, saving its checkpoint (OSError:")


def test_resume_with_changed_flags_is_refused_unless_allowed(tmp_path, train_inputs):
    parser = train.build_parser()

    def parse(flags):  # as train.py's main: flags left out take the preprocessing contract's values
        return SegmentationTrainingConfig.from_flags(
            parser.parse_args(train_inputs + ["--output_dir", str(tmp_path)] + flags)
        )

    (tmp_path / "config.json").write_text(json.dumps(parse([]).to_dict(), default=str))
    changed = parse(["--resume", "--epochs", "9", "--normalization", "brain_window"])
    with pytest.raises(
        ConfigError, match=r"--normalization 'zscore' -> 'brain_window' differ .*--allow_changed normalization"
    ):
        check_resume(changed)
    changed = changed.replace(allow_changed=["normalization"])
    assert check_resume(changed) == ["normalization: 'zscore' -> 'brain_window'"]  # epochs may always grow
    lr = parse(["--resume", "--lr", "3e-4", "--allow_changed", "lr"])
    with pytest.raises(ConfigError, match=r"--lr 0\.0001 -> 0\.0003 cannot change on resume"):
        check_resume(lr)


def test_unknown_or_implausible_geometry_is_an_error_naming_the_file(tmp_path):
    from sam3d.data.io import VolumeReadError, load_volume

    # As other tools write it: qform code 1, no sform, pixdim 0 (nibabel itself refuses to write one).
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), tmp_path / "pixdim0.nii")
    raw = bytearray((tmp_path / "pixdim0.nii").read_bytes())
    raw[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)  # pixdim[1..3]
    raw[252:256] = struct.pack("<2h", 1, 0)  # qform_code, sform_code
    (tmp_path / "pixdim0.nii").write_bytes(bytes(raw))
    with pytest.raises(VolumeReadError, match=r"pixdim0\.nii: voxel size unknown: pixdim \[0\.0, 0\.0, 0\.0\]"):
        load_volume(tmp_path / "pixdim0.nii")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.diag([400.0, 400.0, 400.0, 1.0])), tmp_path / "huge.nii")
    with pytest.raises(VolumeReadError, match=r"huge\.nii: implausible grid: voxel size \[400\.0, 400\.0, 400\.0\] mm"):
        load_volume(tmp_path / "huge.nii")


def test_scans_that_are_no_head_ct_are_refused_or_flagged(models, tmp_path):
    from sam3d.data.geometry import GeometryWarning
    from sam3d.data.io import VolumeReadError

    segmenter = HemorrhageSegmenter(models[0])
    affine = np.diag([3.0, 3.0, 5.0, 1.0])
    nib.save(nib.Nifti1Image(np.full((40, 40, 24), -1000, np.int16), affine), tmp_path / "blank.nii.gz")
    with pytest.raises(VolumeReadError, match=r"blank\.nii\.gz: the scan is constant \(-1000 everywhere\)"):
        segmenter.predict(tmp_path / "blank.nii.gz")
    mri_like = np.random.default_rng(0).uniform(0, 255, (40, 40, 24)).astype(np.float32)
    nib.save(nib.Nifti1Image(mri_like, affine), tmp_path / "mri.nii.gz")
    with pytest.warns(GeometryWarning, match="does not look like a head CT: no air"):
        result = segmenter.predict(tmp_path / "mri.nii.gz")
    assert any("no bone" in note for note in result.to_json()["geometry"]["notes"])


def _scan_and_mask(folder, name, mask_value=1, hu=40):
    folder.mkdir(parents=True, exist_ok=True)
    image = np.full((8, 8, 8), hu, np.int16)
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:4, 2:4, 2:4] = mask_value
    nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"{name}.nii.gz")
    return folder / f"{name}.nii.gz", mask


def test_masks_matched_by_stem_across_sites_are_refused_and_a_mask_column_works(tmp_path):
    from sam3d.data.dataset import ManifestError, read_manifest

    a, mask = _scan_and_mask(tmp_path / "site1", "scan")
    b, _ = _scan_and_mask(tmp_path / "site2", "scan", hu=41)  # another scan with the same file name
    (tmp_path / "masks").mkdir()
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "masks" / "scan.nii.gz")
    (tmp_path / "train.csv").write_text(f"path,ich,patient_id\n{a},1,P1\n{b},1,P2\n")
    with pytest.raises(ManifestError, match=r"row 3 .*takes the same mask .*masks/scan\.nii\.gz as row 2"):
        read_manifest(tmp_path / "train.csv", tmp_path / "masks")
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "site1" / "scan_mask.nii.gz")
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "site2" / "scan_mask.nii.gz")
    (tmp_path / "train.csv").write_text(
        f"path,ich,patient_id,mask\n{a},1,P1,site1/scan_mask.nii.gz\n{b},1,P2,site2/scan_mask.nii.gz\n"
    )
    rows, _ = read_manifest(tmp_path / "train.csv", tmp_path / "masks")
    assert [r.mask_path for r in rows] == [
        str(tmp_path / "site1" / "scan_mask.nii.gz"),
        str(tmp_path / "site2" / "scan_mask.nii.gz"),
    ]
    (tmp_path / "dup.csv").write_text(
        f"path,ich,patient_id,mask\n{a},1,P1,site1/scan_mask.nii.gz\n{a},1,P1,site1/scan_mask.nii.gz\n"
    )
    with pytest.raises(ManifestError, match=r"row 3 .*duplicate of row 2"):
        read_manifest(tmp_path / "dup.csv", None)


def test_mask_values_are_checked_when_a_mask_is_read_even_without_full_validation(tmp_path):
    from sam3d.data.dataset import read_manifest
    from sam3d.data.io import VolumeReadError
    from sam3d.data.transforms import LoadVolumed

    scan, mask = _scan_and_mask(tmp_path / "scans", "s1", mask_value=2)
    (tmp_path / "masks").mkdir()
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "masks" / "s1.nii.gz")
    (tmp_path / "train.csv").write_text(f"path,ich,patient_id\n{scan},1,P1\n")
    rows, _ = read_manifest(tmp_path / "train.csv", tmp_path / "masks", validate="paths")
    with pytest.raises(VolumeReadError, match=r"s1\.nii\.gz: a mask must hold only 0 and 1, found values \[0, 2\]"):
        LoadVolumed()({"image": rows[0].path, "label": rows[0].mask_path})


def _three_phantoms(folder):
    """Two training phantoms and one validation phantom, miniature and coarse."""
    from sam3d.data.synthetic import make_synthetic_ich

    return make_synthetic_ich(
        folder, num_cases=3, seed=0, val_fraction=0.34, spacing_mm=(3.0, 3.0, 5.0), head_scale=0.5, progress=False
    )


def test_a_bad_mask_met_by_a_loader_worker_is_one_line_naming_the_csv_row(tmp_path, capsys):
    data = _three_phantoms(tmp_path / "data")
    first = Path(next(csv.DictReader(open(data["train_csv"])))["path"])
    mask_path = Path(data["mask_dir"]) / first.name
    mask = nib.load(mask_path)
    nib.save(nib.Nifti1Image(np.asarray(mask.dataobj) * 2, mask.affine), mask_path)  # {0, 2}
    flags = [
        "--train_csv",
        str(data["train_csv"]),
        "--val_csv",
        str(data["val_csv"]),
        "--mask_dir",
        str(data["mask_dir"]),
    ]
    code = run_main(
        train.main,
        [*flags, "--output_dir", str(tmp_path / "run"), "--model_type", "small", "--img_size", "32", "--epochs", "1"]
        + ["--validate_data", "paths", "--num_workers", "1", "--batch_size", "1", "--target_spacing_mm", "4", "4", "4"],
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1, errors
    assert re.fullmatch(
        rf"error: \S*train\.csv, row \d \(\S*{first.name}\): \S*{first.name}: a mask must hold only 0 and 1, "
        r"found values \[0, 2\]",
        errors[0],
    )
    summary = json.loads(next((tmp_path / "run").glob("training_summary_*.json")).read_text())
    assert "a mask must hold only 0 and 1" in summary["stop_reason"]


def test_patients_shared_by_train_and_val_are_refused(tmp_path, capsys):
    data = _three_phantoms(tmp_path / "data")
    code = run_main(
        train.main,
        [
            "--train_csv",
            str(data["train_csv"]),
            "--val_csv",
            str(data["train_csv"]),
            "--mask_dir",
            str(data["mask_dir"]),
            "--output_dir",
            str(tmp_path / "run"),
            "--model_type",
            "small",
            "--epochs",
            "2",
            "--patience",
            "1",
            "--num_workers",
            "0",
        ],
    )
    assert code == 2
    errors = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")
    ]  # after progress bars
    assert len(errors) == 1 and "share 2 patient_id(s)" in errors[0] and "--allow_patient_overlap" in errors[0]
