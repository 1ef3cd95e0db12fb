"""Paths inside configs: a shipped config names the package's own files from any folder and from an
installed wheel; a user's config finds its inputs beside it; a path spelled differently is the same
file on resume; a folder where a file belongs is named as such."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blip.cli import train as report_train
from ich_engine.cli import run_main
from ich_engine.config import parse_with_config
from ich_engine.settings import check_resume
from sam3d import CONFIG_DIR, PRETRAINED_DIR
from sam3d.cli import train
from sam3d.training import SegmentationTrainingConfig
from tests.conftest import REPO


def test_the_demo_config_names_the_packages_stand_in_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse_with_config(train.build_parser(), ["--config", str(CONFIG_DIR / "sam3d_demo.yaml")])
    assert Path(args.checkpoint) == (PRETRAINED_DIR / "sam_med3d_small_ich.pth").resolve()
    assert args.output_dir == "outputs/demo/sam3d"  # outputs follow the working folder


def test_a_users_config_finds_its_inputs_beside_it_and_flags_follow_the_working_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data" / "masks").mkdir(parents=True)
    for name in ("train.csv", "val.csv"):
        (project / "data" / name).write_text("path,ich,patient_id\n")
    (project / "runs").mkdir()
    (project / "runs" / "ich.yaml").write_text(
        "train_csv: ../data/train.csv\nval_csv: ../data/val.csv\nmask_dir: ../data/masks\n"
        "checkpoint: weights.pth\n"  # not beside the config: taken from the working folder
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    args = parse_with_config(train.build_parser(), ["--config", str(project / "runs" / "ich.yaml")])
    assert Path(args.train_csv) == project / "data" / "train.csv" and Path(args.mask_dir) == project / "data" / "masks"
    assert Path(args.checkpoint) == tmp_path / "elsewhere" / "weights.pth"
    flagged = parse_with_config(
        train.build_parser(), ["--config", str(project / "runs" / "ich.yaml"), "--val_csv", "../project/data/train.csv"]
    )
    assert Path(flagged.val_csv) == project / "data" / "train.csv"  # a flag is relative to the working folder

    report = parse_with_config(report_train.build_parser(), ["--train_manifest", "reports.jsonl"])
    assert Path(report.train_manifest) == tmp_path / "elsewhere" / "reports.jsonl"


def test_one_csv_spelled_two_ways_is_no_change_on_resume(tmp_path, monkeypatch):
    (tmp_path / "data" / "masks").mkdir(parents=True)
    for name in ("train.csv", "val.csv"):
        (tmp_path / "data" / name).write_text("path,ich,patient_id\n")
    (tmp_path / "work").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    flags = ["--val_csv", "data/val.csv", "--mask_dir", "data/masks", "--output_dir", str(run)]
    monkeypatch.chdir(tmp_path)
    first = SegmentationTrainingConfig.from_flags(
        parse_with_config(train.build_parser(), ["--train_csv", "data/train.csv", *flags])
    )
    saved = first.to_dict() | {"train_csv": "data/train.csv"}  # as a run started before paths were recorded absolute
    (run / "config.json").write_text(json.dumps(saved, default=str))
    monkeypatch.chdir(tmp_path / "work")
    again = SegmentationTrainingConfig.from_flags(
        parse_with_config(
            train.build_parser(),
            ["--train_csv", "../data/train.csv", *[f.replace("data/", "../data/") for f in flags], "--resume"],
        )
    )
    monkeypatch.chdir(tmp_path)  # the old record's relative path names the file from where it was made
    assert check_resume(again) == []


def test_a_folder_where_a_csv_belongs_is_named_as_a_folder(tmp_path, capsys):
    (tmp_path / "masks").mkdir()
    (tmp_path / "val.csv").write_text("path,ich,patient_id\n")
    flags = [
        "--train_csv",
        str(tmp_path),
        "--val_csv",
        str(tmp_path / "val.csv"),
        "--mask_dir",
        str(tmp_path / "masks"),
    ]
    assert run_main(train.main, [*flags, "--output_dir", str(tmp_path / "run")]) == 2
    assert f"error: --train_csv {tmp_path}: is a folder; a file is expected" in capsys.readouterr().err


@pytest.mark.slow
def test_the_demo_config_works_from_an_installed_wheel_without_a_checkout(tmp_path):
    """pip builds and installs the package (not editable) into a folder; from another folder, with only
    that on the path, the demo config names the installed stand-in."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-compile",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
    )
    probe = (
        "import sam3d, sam3d.cli.train as t; from ich_engine.config import parse_with_config; "
        "a = parse_with_config(t.build_parser(), ['--config', str(sam3d.CONFIG_DIR / 'sam3d_demo.yaml')]); "
        "import os; print(sam3d.__file__); print(a.checkpoint, os.path.isfile(a.checkpoint))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    module, checkpoint = out.stdout.splitlines()
    assert module.startswith(str(target)) and checkpoint.startswith(str(target)) and checkpoint.endswith(" True")
