"""The shared engine: exact resume, early stopping, summaries, AMP, accumulation, bad losses."""

import json

import pytest
import torch

from ich_engine.checkpoint import load_checkpoint
from ich_engine.trainer import Trainer, TrainerConfig
from sam3d.modeling import build_sam3d, model_config
from sam3d.task import SegmentationTask
from tests.conftest import VolumeDataset


def _train(tmp_path, epochs, resume=False, task=None, **cfg):
    torch.manual_seed(0)
    model = build_sam3d(model_config("small", img_size=32))
    groups = [{"params": list(model.parameters()), "lr": 1e-3, "weight_decay": 1e-4}]
    config = TrainerConfig(
        output_dir=str(tmp_path),
        epochs=epochs,
        batch_size=2,
        gradient_accumulation_steps=2,
        resume=resume,
        seed=3,
        patience=cfg.pop("patience", 10),
        **cfg,
    )
    task = task or SegmentationTask(num_clicks=2, val_num_clicks=2, seed=0)
    trainer = Trainer(config, task, model, groups, torch.device("cpu"))
    return trainer.fit(VolumeDataset(4), VolumeDataset(2, seed=1)), model


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    full, full_model = _train(tmp_path / "full", epochs=2)
    _train(tmp_path / "split", epochs=1)
    resumed, resumed_model = _train(tmp_path / "split", epochs=2, resume=True)
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    assert [h["train_loss"] for h in full["history"]] == [h["train_loss"] for h in resumed["history"]]
    checkpoint = load_checkpoint(tmp_path / "split" / "latest_model.pth")
    assert checkpoint["epoch"] == 2 and len(checkpoint["losses"]) == 2
    summaries = list((tmp_path / "split").glob("training_summary_*.json"))
    assert len(summaries) == 1  # the resumed run continues the same summary
    summary = json.loads(summaries[0].read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
    for field in ("train_loss", "val_dice", "lr", "time_s", "ram_peak_gb"):
        assert field in summary["epochs"][-1]


class ConstantMetricTask(SegmentationTask):
    def validate(self, model, loader, device):
        return {"val_dice": 0.5}


def test_early_stopping_and_summary(tmp_path):
    result, _ = _train(tmp_path, epochs=10, patience=2, task=ConstantMetricTask(num_clicks=1))
    assert len(result["history"]) == 3
    assert result["stop_reason"].startswith("early stopping")
    summary = json.loads(next(tmp_path.glob("training_summary_*.json")).read_text())
    assert summary["stop_reason"] == result["stop_reason"] and summary["best_epoch"] == 1
    assert {p.name for p in tmp_path.glob("*.pth")} == {"best_model.pth", "latest_model.pth"}


def test_mixed_precision_and_schedulers_run(tmp_path):
    for scheduler in ("cosine", "step"):
        result, _ = _train(tmp_path / scheduler, epochs=1, use_mixed_precision=True, scheduler_type=scheduler)
        assert torch.isfinite(torch.tensor(result["history"][0]["train_loss"]))


class NanTask(SegmentationTask):
    def training_module(self, model):
        module = super().training_module(model)

        class Broken(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = module

            def forward(self, batch):
                loss, logs = self.inner(batch)
                return loss * float("nan"), logs

        return Broken()


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    with pytest.raises(FloatingPointError, match="epoch 1, step 1"):
        _train(tmp_path, epochs=1, task=NanTask(num_clicks=1))


def test_visualize_gives_rgb_overlays_through_the_lesion():
    model = build_sam3d(model_config("small", img_size=32))
    from monai.data import DataLoader

    images = SegmentationTask(val_num_clicks=1).visualize(
        model, DataLoader(VolumeDataset(2), batch_size=2), torch.device("cpu")
    )
    assert list(images) == ["val/P0", "val/P1"]
    overlay = images["val/P0"]
    assert overlay.shape == (32, 32, 3) and overlay.dtype.name == "uint8"
    assert (overlay[..., 1] > overlay[..., 0]).any()  # the green ground truth is drawn


def test_training_curves_png_is_written(tmp_path):
    result, _ = _train(tmp_path, epochs=1)
    from PIL import Image

    curves = Image.open(result["curves_path"])
    assert curves.size[0] > 500 and curves.size[1] > 200
