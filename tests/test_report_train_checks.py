"""Report training refuses a bad input in one line naming the file, row or key, before it trains
(issue 26 E): a manifest's volume_ml that is no volume, an unknown bridge key in the YAML config, an
exported encoder whose input channels its preprocessing does not give."""

from __future__ import annotations

import dataclasses
import json

from blip.cli.train import main
from ich_engine.cli import run_main
from sam3d.export import export_encoder
from sam3d.modeling import build_sam3d
from tests.conftest import TINY_CT, TINY_CT_PREPROCESSING


def _one_line_error(capsys, code: int, *parts: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("WARNING: ")]
    assert code != 0 and len(err) == 1 and err[0].startswith("error: "), err
    for part in parts:
        assert part in err[0], err[0]
    return err[0]


def _flags(ct_data, tmp_path, **replaced: str) -> list[str]:
    flags = [*ct_data["flags"], "--output_dir", str(tmp_path / "run"), "--epochs", "1"]
    for flag, value in replaced.items():
        flags[flags.index(f"--{flag}") + 1] = value
    return flags


def test_a_volume_ml_that_is_no_volume_names_the_manifest_row(ct_data, tmp_path, capsys):
    rows = [json.loads(line) for line in ct_data["train"].read_text().splitlines()]
    rows[1]["volume_ml"] = "4,2 mL"
    manifest = ct_data["root"] / "train_bad_volume.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code = run_main(main, _flags(ct_data, tmp_path, train_manifest=str(manifest)))
    _one_line_error(capsys, code, f"{manifest}, line 2: volume_ml '4,2 mL'", "a volume in mL")
    assert not (tmp_path / "run" / "lm").exists()  # refused before the language model was built


def test_an_unknown_bridge_key_names_the_key_and_the_known_ones(ct_data, tmp_path, capsys):
    config = tmp_path / "report.yaml"
    config.write_text('bridge: {"hidden_size": 64, "num_hiden_layers": 2}\n')
    code = run_main(main, [*_flags(ct_data, tmp_path), "--config", str(config)])
    _one_line_error(capsys, code, "bridge: unknown key 'num_hiden_layers'", "num_hidden_layers")


def test_an_encoder_whose_channels_its_preprocessing_does_not_give_is_named(ct_data, tmp_path, capsys):
    three = dataclasses.replace(TINY_CT, in_chans=3)
    encoder = tmp_path / "sam_encoder_3ch.pth"
    export_encoder(build_sam3d(three), encoder, three, visual_tokens=16, preprocessing=TINY_CT_PREPROCESSING)
    code = run_main(main, _flags(ct_data, tmp_path, encoder=str(encoder)))
    _one_line_error(capsys, code, str(encoder), "3 input channel(s)", "gives 1")
    assert not (tmp_path / "run" / "lm").exists()
