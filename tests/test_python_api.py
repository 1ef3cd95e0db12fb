"""Both trainings from Python, no argument lists: a typed config (from a shipped YAML, with overrides)
into ``run_training``; ``config.json`` is the config's own serialisation."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from blip.training.train import ReportTrainingConfig
from blip.training.train import run_training as run_report_training
from ich_engine.config import ConfigError
from sam3d import CONFIG_DIR
from sam3d.data.synthetic import make_synthetic_ich
from sam3d.training import SegmentationTrainingConfig
from sam3d.training import run_training as run_segmentation_training


def _recorded(output_dir: str) -> dict:
    return json.loads((Path(output_dir) / "config.json").read_text())


def test_segmentation_trains_the_demo_config_from_python(tmp_path):
    os.environ["WANDB_MODE"] = "disabled"
    data = make_synthetic_ich(
        tmp_path / "data",
        num_cases=3,
        seed=0,
        val_fraction=0.34,
        spacing_mm=(3.0, 3.0, 5.0),
        positive_fraction=1.0,
        head_scale=0.5,
        progress=False,
    )
    config = SegmentationTrainingConfig.from_yaml(
        CONFIG_DIR / "sam3d_demo.yaml",
        train_csv=str(data["train_csv"]),
        val_csv=str(data["val_csv"]),
        mask_dir=str(data["mask_dir"]),
        output_dir=str(tmp_path / "run"),
        epochs=1,
        max_steps_per_epoch=1,
        num_clicks=1,
        val_num_clicks=1,
    )
    assert config.model_type == "small" and config.contract.normalization == "brain_window"  # the YAML's
    result = run_segmentation_training(config)
    assert result["history"][0]["epoch"] == 1 and Path(result["outputs"]["sam_encoder"]).is_file()
    recorded = _recorded(config.output_dir)
    assert {key: recorded[key] for key in config.to_dict()} == config.to_dict()
    assert recorded["preprocessing"] == config.contract.to_dict()
    with pytest.raises(ConfigError, match="num_clicks and val_num_clicks must be >= 1"):
        dataclasses.replace(config, num_clicks=0)  # validated on construction


def test_report_model_trains_from_python(ct_data, tmp_path):
    os.environ["WANDB_MODE"] = "disabled"
    config = ReportTrainingConfig.from_yaml(
        CONFIG_DIR / "blip_tiny_ct.yaml",
        train_manifest=str(ct_data["train"]),
        val_manifest=str(ct_data["val"]),
        encoder=str(ct_data["encoder"]),
        output_dir=str(tmp_path / "run"),
        epochs=1,
        max_new_tokens=8,
    )
    result = run_report_training(config)
    assert Path(result["outputs"]["report_model"], "config.json").is_file()
    assert [s["id"] for s in result["samples"]] == ["val0"]
    recorded = _recorded(config.output_dir)
    assert {key: recorded[key] for key in config.to_dict()} == config.to_dict()
    with pytest.raises(ConfigError, match="--diagnosis_dropout must be in"):
        config.replace(diagnosis_dropout=1.5)
