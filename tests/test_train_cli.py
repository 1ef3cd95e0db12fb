"""train.py end to end on generated data: config checks, SIGKILL + resume, DDP, export, evaluation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ich_engine.checkpoint import load_checkpoint
from sam3d.data.synthetic import make_synthetic_ich
from sam3d.export import load_exported_encoder
from sam3d.modeling import build_sam3d, model_config
from tests.conftest import REPO

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ich")
    return make_synthetic_ich(
        root,
        num_cases=6,
        seed=1,
        val_fraction=0.34,
        spacing_mm=(3.0, 3.0, 5.0),
        positive_fraction=0.67,
        head_scale=0.5,
        progress=False,
    )


def _argv(data, output_dir, *extra):
    return [
        sys.executable,
        str(REPO / "train.py"),
        "--train_csv",
        str(data["train_csv"]),
        "--val_csv",
        str(data["val_csv"]),
        "--mask_dir",
        str(data["mask_dir"]),
        "--output_dir",
        str(output_dir),
        "--model_type",
        "small",
        "--batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--num_clicks",
        "2",
        "--val_num_clicks",
        "2",
        "--target_spacing",
        "3",
        "3",
        "3",
        "--num_workers",
        "0",
        "--seed",
        "7",
        "--lr",
        "1e-3",
        *extra,
    ]


def _run(argv, **kw):
    # CI may run without a UTF-8 locale while the progress bars print block characters.
    return subprocess.run(
        argv, cwd=REPO, env=ENV, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600, **kw
    )


@pytest.mark.slow
def test_missing_inputs_and_bad_config_are_named(tmp_path, data):
    result = _run([sys.executable, str(REPO / "train.py"), "--train_csv", str(data["train_csv"])])
    assert result.returncode == 2 and "--val_csv is required" in result.stderr
    config = tmp_path / "bad.yaml"
    config.write_text("epochs: 3\nlearning_rate: 0.1\n")
    result = _run(_argv(data, tmp_path / "out", "--config", str(config)))
    assert result.returncode == 2 and "learning_rate" in result.stderr and "bad.yaml" in result.stderr
    result = _run(_argv(data, tmp_path / "out", "--mask_dir", str(tmp_path / "nowhere")))
    assert result.returncode == 2 and "nowhere" in result.stderr
    result = _run(_argv(data, tmp_path / "out", "--img_size", "36"))
    assert (
        result.returncode == 2 and "--img_size 36 must be a positive multiple of small's patch size 8" in result.stderr
    )


@pytest.mark.slow
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tmp_path, data):
    common = ["--epochs", "3", "--patience", "5"]
    reference = _run(_argv(data, tmp_path / "reference", *common))
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert "patience (5) >= epochs (3)" in reference.stderr  # up-front warning

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        _argv(data, killed_dir, *common), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    latest = killed_dir / "latest_model.pth"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and load_checkpoint(latest)["epoch"] >= 1:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch_at_kill = load_checkpoint(latest)["epoch"]
    assert 1 <= epoch_at_kill < 3, "the run should have been killed mid-training"

    resumed = _run(_argv(data, killed_dir, *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resumed from {latest} at epoch {epoch_at_kill}" in resumed.stdout
    ref_state = load_checkpoint(tmp_path / "reference" / "latest_model.pth")["model_state_dict"]
    res_state = load_checkpoint(latest)["model_state_dict"]
    for key, value in ref_state.items():
        assert torch.equal(value, res_state[key]), key
    assert not list(killed_dir.glob(".*.tmp"))  # stale temp files cleaned on restart

    outputs = {p.name for p in killed_dir.iterdir()}
    assert {
        "best_model.pth",
        "latest_model.pth",
        "sam_encoder.pth",
        "config.json",
        "training_curves.png",
        "val_overlays",
    } <= outputs
    assert len(list((killed_dir / "val_overlays").glob("*.png"))) == 2  # the two validation scans
    summary = json.loads(next(killed_dir.glob("training_summary_*.json")).read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2, 3]
    assert summary["stop_reason"] == "completed all epochs"

    # The export loads the way existing users load it: plain torch.load, then load_state_dict.
    export = torch.load(killed_dir / "sam_encoder.pth")
    encoder = build_sam3d(model_config("small")).image_encoder
    encoder.load_state_dict(export["image_encoder_state_dict"])
    encoder, projector, meta = load_exported_encoder(killed_dir / "sam_encoder.pth")
    assert meta["visual_tokens"] == 256 and list(meta["preprocessing"]["target_spacing_mm"]) == [3.0, 3.0, 3.0]
    assert meta["preprocessing"]["negative_random_crop_prob"] == 0.5  # training-crop settings travel too
    tokens = projector(encoder(torch.zeros(1, 1, 64, 64, 64)))
    assert tokens.shape == (1, 512, 256)

    evaluation = _run(
        [
            str(Path(sys.executable).with_name("sam3d-evaluate")),  # the installed console script
            "--checkpoint",
            str(killed_dir / "best_model.pth"),
            "--csv",
            str(data["val_csv"]),
            "--mask_dir",
            str(data["mask_dir"]),
            "--output_dir",
            str(tmp_path / "eval"),
            "--num_clicks",
            "2",
        ]
    )
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    lines = (tmp_path / "eval" / "per_case.csv").read_text().strip().splitlines()
    val_rows = Path(data["val_csv"]).read_text().strip().splitlines()
    assert len(lines) == len(val_rows)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["cases"] == len(val_rows) - 1 and 0.0 <= summary["dice"]["mean"] <= 1.0
    assert summary["spacing_mm"] == [3.0, 3.0, 3.0]


@pytest.mark.slow
def test_img_size_travels_from_training_to_the_report_tower(tmp_path, data):
    result = _run(_argv(data, tmp_path / "run", "--epochs", "1", "--patience", "1", "--img_size", "32"))
    assert result.returncode == 0, result.stderr[-2000:]
    encoder, projector, meta = load_exported_encoder(tmp_path / "run" / "sam_encoder.pth")
    assert meta["model_config"]["img_size"] == 32 and tuple(meta["preprocessing"]["roi_size"]) == (32, 32, 32)
    assert projector(encoder(torch.zeros(1, 1, 32, 32, 32))).shape == (1, 64, 256)  # (32 / 8)^3 tokens

    from blip.processor import ct_image_transform
    from blip.vision import VisionTowerConfig, build_vision_tower

    tower = build_vision_tower(VisionTowerConfig("sam3d", checkpoint=str(tmp_path / "run" / "sam_encoder.pth")))
    volume = Path(data["val_csv"]).parent / Path(data["val_csv"]).read_text().splitlines()[1].split(",")[0]
    image = ct_image_transform(tower.config.preprocessing, tower.encoder.img_size)(str(volume))
    assert image.shape == (1, 32, 32, 32)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path, data):
    argv = _argv(data, tmp_path / "ddp", "--epochs", "1", "--patience", "1")
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561"] + argv[1:]
    result = _run(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(tmp_path / "ddp" / "latest_model.pth")
    assert checkpoint["epoch"] == 1 and not any(k.startswith("module.") for k in checkpoint["model_state_dict"])
    assert result.stdout.count("best val Dice") == 1  # only rank 0 reports


@pytest.mark.slow
def test_system_check_passes_and_prints_one_line_per_check(tmp_path):
    result = _run([sys.executable, str(REPO / "train.py"), "--test", "--output_dir", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    names = [line.split("]")[1].split(":")[0].strip() for line in lines]
    assert names == ["versions", "gpu", "ram", "disk", "packages", "output dir", "end-to-end tiny training"]
    assert all(line.startswith("[OK  ]") for line in lines)
