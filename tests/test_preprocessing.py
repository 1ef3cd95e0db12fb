"""The preprocessing contract: one typed value from flags/YAML into every checkpoint and back."""

import json
import warnings

import pytest
import torch

from ich_engine.config import parse_with_config
from sam3d.cli import train
from sam3d.data.preprocessing import Preprocessing, PreprocessingMismatch
from sam3d.export import export_encoder, load_exported_encoder
from sam3d.modeling import build_sam3d, model_config
from sam3d.training import training_preprocessing


def test_round_trip_and_older_layouts():
    contract = Preprocessing(
        target_spacing_mm=(2, 2, 2), normalization="brain_window", hu_windows=[[40, 80], [50, 150]]
    )
    assert Preprocessing.from_dict(json.loads(json.dumps(contract.to_dict()))) == contract
    assert contract.num_input_channels == 2
    # An older checkpoint: the flag's name, some keys missing.
    old = Preprocessing.from_dict({"target_spacing": [3.0, 3.0, 3.0], "normalization": "zscore"})
    assert old.target_spacing_mm == (3.0, 3.0, 3.0) and old.hu_clamp == Preprocessing().hu_clamp
    with pytest.warns(UserWarning, match="unknown preprocessing key 'resample_order'"):
        Preprocessing.from_dict({"resample_order": 3}, "old.pth")
    with pytest.raises(ValueError, match="hu_windows"):
        Preprocessing(hu_windows=[[40]])
    with pytest.raises(ValueError, match="target_spacing_mm"):
        Preprocessing(target_spacing_mm=(1.0, 0.0, 1.0))
    assert Preprocessing.from_checkpoint({}).augment is False  # official checkpoints: SAM-Med3D's defaults


def _args(tmp_path, flags):
    return parse_with_config(train.build_parser(), ["--output_dir", str(tmp_path / "run")] + flags)


def test_fine_tuning_takes_the_checkpoints_contract_and_warns_on_a_differing_flag(tmp_path):
    checkpoint = tmp_path / "model.pth"
    contract = Preprocessing(target_spacing_mm=(2, 2, 2), normalization="brain_window", augment=False)
    torch.save({"model_state_dict": {}, "preprocessing": contract.to_dict()}, checkpoint)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inherited = training_preprocessing(_args(tmp_path, ["--checkpoint", str(checkpoint)]), 64)
    assert inherited.normalization == "brain_window" and inherited.target_spacing_mm == (2.0, 2.0, 2.0)
    assert inherited.augment is True  # training-only settings are this run's, not the checkpoint's
    assert inherited.roi_size == (64, 64, 64)

    with pytest.warns(PreprocessingMismatch, match=r"--normalization zscore differs .*model\.pth.*\(brain_window\)"):
        flagged = training_preprocessing(
            _args(tmp_path, ["--checkpoint", str(checkpoint), "--normalization", "zscore"]), 64
        )
    assert flagged.normalization == "zscore" and flagged.target_spacing_mm == (2.0, 2.0, 2.0)
    # No checkpoint: the defaults; the older flag name still works.
    plain = training_preprocessing(_args(tmp_path, ["--target_spacing", "1", "1", "2"]), 64)
    assert plain.target_spacing_mm == (1.0, 1.0, 2.0) and plain.normalization == "zscore"


def test_yaml_older_key_and_duplicate_keys(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("target_spacing: [2, 2, 3]\n")
    assert _args(tmp_path, ["--config", str(config)]).target_spacing_mm == [2.0, 2.0, 3.0]
    config.write_text("target_spacing: [2, 2, 3]\ntarget_spacing_mm: [1, 1, 1]\n")
    with pytest.raises(Exception, match="keys 'target_spacing' and 'target_spacing_mm' set the same flag"):
        _args(tmp_path, ["--config", str(config)])


def test_export_carries_the_contract_for_inference(tmp_path):
    config = model_config("tiny", encoder_depth=1, window_size=0, global_attn_indexes=())
    contract = Preprocessing(target_spacing_mm=(2, 2, 2), roi_size=(64, 64, 64))
    export_encoder(build_sam3d(config), tmp_path / "enc.pth", config, 8, contract)
    _, _, meta = load_exported_encoder(tmp_path / "enc.pth")
    assert Preprocessing.from_checkpoint(meta) == contract.for_inference()
