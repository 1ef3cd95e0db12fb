"""sam3d-bench runs both window-attention paths side by side and records every figure (not a timed test)."""

import json

import pytest

from sam3d.cli.bench import main


@pytest.mark.slow
def test_bench_compares_both_paths_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "--model_type",
                "tiny",
                "--device",
                "cpu",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--num_clicks",
                "1",
                "--step_batch_size",
                "1",
                "--kinds",
                "training step",
                "--memory_batches",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    assert [(row["kind"], row["window_attention"]) for row in record["rows"]] == [
        ("training step", "reference"),
        ("training step", "padding_free"),
    ]
    assert all(row["median_s"] > 0 and row["peak_gb"] > 0 for row in record["rows"])
    step = record["rows"][-1]["profile"]
    assert set(step) >= {"sam3d.encoder", "sam3d.decoder", "sam3d.loss", "forward", "backward"}
    assert "ratio time" in capsys.readouterr().out
