"""W&B: offline automatically without an API key, images logged, a resumed run keeps its id."""

import numpy as np
import pytest

from ich_engine.tracking import Tracker, wandb_mode


@pytest.fixture
def no_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_mode_selection(no_api_key, monkeypatch):
    assert wandb_mode(False) == "disabled"
    assert wandb_mode(True) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(True) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(True) == "disabled"


def test_offline_run_logs_and_resumes_same_id(no_api_key, tmp_path):
    tracker = Tracker(True, "test-project", None, {"lr": 1e-4}, tmp_path)
    assert tracker.mode == "offline" and tracker.run_id
    tracker.log({"train_loss": 0.5, "val_dice": 0.7}, step=1)
    tracker.log_images({"val/case": np.zeros((8, 8, 3), dtype=np.uint8)}, step=1)
    run_id = tracker.run_id
    tracker.finish()
    resumed = Tracker(True, "test-project", None, {"lr": 1e-4}, tmp_path, run_id=run_id)
    assert resumed.run_id == run_id
    resumed.log({"train_loss": 0.4}, step=2)
    resumed.finish()
    run_dirs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert run_dirs, list((tmp_path / "wandb").iterdir())
    assert any(p.suffix == ".wandb" for d in run_dirs for p in d.iterdir())
