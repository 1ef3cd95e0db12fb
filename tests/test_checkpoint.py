"""Checkpoint safety: official layouts load, malicious pickles are refused, writes are atomic."""

import argparse
import os
import pickle

import numpy as np
import pytest
import torch

from ich_engine.checkpoint import CheckpointError, atomic_save, extract_state_dict, load_checkpoint
from sam3d.modeling import build_sam3d, load_sam3d_weights, model_config


def _small():
    return build_sam3d(model_config("small", img_size=32))


def test_official_training_checkpoint_with_namespace_loads(tmp_path):
    model = _small()
    path = tmp_path / "sam_med3d_turbo.pth"
    # What official training writes: Namespace args and numpy floats next to the weights.
    torch.save(
        {
            "epoch": 3,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": {},
            "losses": [np.float64(0.5)],
            "dices": [np.float32(0.7)],
            "args": argparse.Namespace(lr=8e-5, task_name="ft"),
        },
        path,
    )
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what breaks for users on torch >= 2.6
    fresh = _small()
    load_sam3d_weights(fresh, path)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)
    assert load_checkpoint(path)["args"].lr == 8e-5


@pytest.mark.parametrize("layout", ["bare", "module_prefix", "state_dict_key"])
def test_other_layouts(tmp_path, layout):
    model = _small()
    sd = model.state_dict()
    obj = {
        "bare": sd,
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
        "state_dict_key": {"state_dict": sd},
    }[layout]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    fresh = _small()
    load_sam3d_weights(fresh, path)
    torch.testing.assert_close(fresh.image_encoder.pos_embed, model.image_encoder.pos_embed)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {}, "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="evil.pth.*(system|allow-list)"):
        load_checkpoint(path)
    assert not marker.exists()


def test_strict_loading_names_the_bad_keys(tmp_path):
    sd = _small().state_dict()
    sd.pop("mask_decoder.iou_token.weight")
    sd["image_encoder.pos_embed"] = torch.zeros(1, 2, 2, 2, 96)
    path = tmp_path / "broken.pth"
    torch.save({"model_state_dict": sd}, path)
    with pytest.raises(CheckpointError) as err:
        load_sam3d_weights(_small(), path)
    message = str(err.value)
    assert "broken.pth" in message and "mask_decoder.iou_token.weight" in message
    assert "image_encoder.pos_embed" in message and "shape mismatch" in message


def test_atomic_save_keeps_old_file_when_write_fails(tmp_path):
    path = tmp_path / "latest_model.pth"
    atomic_save({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"epoch": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest_model.pth"]


def test_extract_rejects_non_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no tensors"):
        extract_state_dict({"epoch": 1}, "x.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_loading_a_checkpoint_keeps_other_process_wide_allow_listings(tmp_path):
    sentinel = (np._core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct")
    torch.serialization.add_safe_globals([sentinel])
    path = tmp_path / "w.pth"
    torch.save({"model_state_dict": _small().state_dict()}, path)
    load_checkpoint(path)
    assert sentinel in torch.serialization.get_safe_globals()
