"""End-to-end report training on the engine: fake CT volumes + a JSONL manifest, an exported tiny
SAM-Med3D encoder, the tiny GPT-2 built from the training reports; 2 epochs, resume, reload, generate;
plus the data pipeline pieces (CT/X-ray transforms, one-modality batches)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from blip.cli.train import main
from blip.data.dataset import ReportCollator, ReportDataset
from blip.model import Blip2ReportModel
from blip.processor import Blip2ReportProcessor, xray_image_transform
from ich_engine.checkpoint import load_checkpoint
from tests.conftest import CT_REPORTS


def test_train_resume_reload_generate(ct_data, tmp_path, capsys):
    os.environ["WANDB_MODE"] = "disabled"
    out = tmp_path / "run"
    argv = [
        *ct_data["flags"],
        "--output_dir",
        str(out),
        "--max_new_tokens",
        "10",
        "--log_images",
        "--log_freq",
        "1",
        "--epochs",
        "2",
    ]
    assert main(argv) == 0
    first = capsys.readouterr().out
    history = load_checkpoint(out / "latest_model.pth")["history"]
    assert len(history) == 2 and history[1]["train_loss"] < history[0]["train_loss"]
    assert "generated:" in first and (out / "lm" / "config.json").is_file()
    assert (out / "attention" / "val0_attention.png").is_file()
    samples = json.loads((out / "val_samples.json").read_text())
    assert [s["id"] for s in samples] == ["val0"] and isinstance(samples[0]["generated"], str)
    # sam3d/configs/blip_tiny_ct.yaml conditions on measurements: the manifest's volume_ml and side columns.
    assert "Segmentation: right hemorrhage, 4.2 mL." in first
    assert all(np.isfinite(h["val_image_gain"]) for h in history)  # val batches of 2 swap their images

    assert main(argv[:-1] + ["3", "--resume"]) == 0
    resumed = load_checkpoint(out / "latest_model.pth")
    assert "Resumed from" in capsys.readouterr().out
    assert resumed["epoch"] == 3 and resumed["history"][:2] == history

    model = Blip2ReportModel.from_pretrained(out / "report_model").eval()
    # The CT pipeline is rebuilt from the preprocessing saved with the model.
    image = model.processor.image_transform("ct")(str(ct_data["root"] / "val_0.nii.gz"))
    assert image.shape == (1, 64, 64, 64)
    assert model.config.condition_on_measurements
    texts = model.generate(image[None], "ct", ["Segmentation: no hemorrhage."], num_beams=2, max_new_tokens=12)
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_token_cache_changes_the_speed_not_the_results(ct_data, tmp_path, monkeypatch):
    """A frozen tower's tokens cached per image give the run of the uncached model: same losses and
    image gain (validation's swapped images become swapped cached tokens), with far fewer tower passes."""
    os.environ["WANDB_MODE"] = "disabled"
    passes: list[int] = []
    tower_tokens = Blip2ReportModel.tower_tokens
    monkeypatch.setattr(
        Blip2ReportModel,
        "tower_tokens",
        lambda self, images, modality: passes.append(len(images)) or tower_tokens(self, images, modality),
    )
    runs = {}
    for flag in ("--cache_tokens", "--no-cache_tokens"):
        passes.clear()
        out = tmp_path / flag
        assert (
            main(
                [
                    *ct_data["flags"],
                    "--output_dir",
                    str(out),
                    "--max_new_tokens",
                    "2",
                    "--epochs",
                    "3",
                    "--num_val_samples",
                    "0",
                    flag,
                ]
            )
            == 0
        )
        runs[flag] = (load_checkpoint(out / "latest_model.pth")["history"], sum(passes))
    (cached, cached_passes), (plain, plain_passes) = runs["--cache_tokens"], runs["--no-cache_tokens"]
    print(f"tower passes (images): cached {cached_passes}, uncached {plain_passes}")
    for key in ("train_loss", "val_loss", "val_image_gain"):
        assert [h[key] for h in cached] == pytest.approx([h[key] for h in plain], rel=1e-4, abs=1e-6), key
    # 4 training + 2 validation images once, plus the end-of-run sample; uncached: every step, every epoch.
    assert cached_passes <= 6 + 2 and plain_passes >= 3 * (4 + 2 + 2)


def test_diagnosis_prompt_run(ct_data, tmp_path, capsys):
    """--diagnosis_prompt on top of the config's measurement conditioning: both sentences lead the
    prompt, the head's loss and F1 are logged, and the saved model predicts with its head."""
    os.environ["WANDB_MODE"] = "disabled"
    out = tmp_path / "run"
    assert (
        main(
            [
                *ct_data["flags"],
                "--output_dir",
                str(out),
                "--max_new_tokens",
                "4",
                "--epochs",
                "1",
                "--diagnosis_prompt",
                "--diagnosis_loss_weight",
                "2",
                "--lr",
                "1e-3",
                "--diagnosis_lr_ratio",
                "4",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "predicted: Diagnosis: " in printed
    checkpoint = load_checkpoint(out / "latest_model.pth")
    groups = {g["name"]: g["initial_lr"] for g in checkpoint["optimizer_state_dict"]["param_groups"]}
    assert groups == pytest.approx({"report_model": 1e-3, "diagnosis_heads": 4e-3})
    history = checkpoint["history"]
    assert {"train_diagnosis_loss", "val_diagnosis_loss", "val_diagnosis_f1", "val_lm_loss"} <= set(history[0])
    torch.testing.assert_close(
        history[0]["val_loss"], history[0]["val_lm_loss"] + 2 * history[0]["val_diagnosis_loss"], rtol=1e-4, atol=1e-4
    )
    model = Blip2ReportModel.from_pretrained(out / "report_model").eval()
    assert model.config.diagnosis_prompt and model.config.condition_on_measurements
    image = model.processor.image_transform("ct")(str(ct_data["root"] / "val_0.nii.gz"))[None]
    assert model.diagnose(image, "ct").shape == (1, 8)
    prompt = model.soft_prompt(image, "ct", ["Segmentation: no hemorrhage."], torch.zeros(1, 8))[0]
    both = "Segmentation: no hemorrhage. Diagnosis: no hemorrhage."
    assert prompt.shape[1] == model.config.num_query_tokens + len(model.processor.prompt_ids("ct", both))


def test_xray_pipeline_and_one_modality_batches(tmp_path):
    from PIL import Image

    path = tmp_path / "film.png"
    Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8), (30, 1))).save(path)
    image = xray_image_transform(64)(str(path))
    assert image.shape == (3, 64, 64)
    torch.testing.assert_close(image[0] * 58.395 + 123.675, image[2] * 57.375 + 103.53)  # one gray film, 3 channels

    rows = [
        {"image": "a.png", "report": "r", "modality": "xray"},
        {"image": "b.nii.gz", "report": "r", "modality": "ct"},
    ]
    with pytest.raises(ValueError, match="one modality per dataset"):
        ReportDataset(rows, lambda p: p, "mixed.jsonl")

    class Tokenizer:
        eos_token = "</s>"

    items = [{"image": torch.zeros(1), "report": "r", "modality": m, "id": m} for m in ("ct", "xray")]
    with pytest.raises(ValueError, match="one modality"):
        ReportCollator(Blip2ReportProcessor(Tokenizer(), max_text_len=8))(items)


def test_xray_run_and_config_errors(tmp_path, capsys):
    from PIL import Image

    rows = []
    for index, (split, text) in enumerate(
        [
            ("train", "FINDINGS: Clear lungs. IMPRESSION: Normal chest."),
            ("train", "FINDINGS: Right pleural effusion. IMPRESSION: Effusion."),
            ("val", "FINDINGS: Clear lungs. IMPRESSION: Normal chest."),
        ]
    ):
        film = np.random.default_rng(index).integers(0, 255, (48, 40), dtype=np.uint8)
        Image.fromarray(film).save(tmp_path / f"film{index}.png")
        rows.append({"image": f"film{index}.png", "report": text, "split": split})  # modality from the suffix
    manifest = tmp_path / "films.csv"
    manifest.write_text("image,report,split\n" + "".join(f"{r['image']},{r['report']},{r['split']}\n" for r in rows))
    out = tmp_path / "xray_run"
    argv = [
        "--config",
        "sam3d/configs/blip_tiny_ct.yaml",
        "--train_manifest",
        str(manifest),
        "--val_manifest",
        "",
        "--encoder",
        "",
        "--xray_model_type",
        "tiny",
        "--output_dir",
        str(out),
        "--epochs",
        "1",
        "--max_new_tokens",
        "5",
        "--lm_mode",
        "lora",
    ]
    assert main(argv) == 0  # without --val_manifest the split column separates train and val
    assert "sample film2" in capsys.readouterr().out and (out / "attention" / "film2_attention.png").is_file()
    model = Blip2ReportModel.from_pretrained(out / "report_model")
    assert (
        model.visual_encoder is None
        and model.visual_encoder_2d is not None
        and model.config.language_model.mode == "lora"
    )

    from ich_engine.cli import run_main

    capsys.readouterr()
    assert run_main(main, argv[:4] + ["--train_manifest", str(tmp_path / "missing.jsonl")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "missing.jsonl: file not found" in error[0]


def test_lavis_checkpoint_initialises_the_bridge(ct_data, tmp_path):
    """The recorded LAVIS fixture has the tiny tower's width (48) and a 32-wide LM: every bridge
    tensor, interfaces included, comes from the LAVIS checkpoint."""
    from blip.cli.train import build_parser
    from blip.language_model import build_tiny_gpt2
    from blip.training.train import ReportTrainingConfig, build_model
    from ich_engine.distributed import DistributedContext
    from tests.conftest import fixture_fill, load_fixture

    lavis = load_fixture("lavis_qformer_parity.pt")
    c = lavis["config"]
    lavis_sd = {key: fixture_fill(key, shape) for key, shape in lavis["keys"]}
    checkpoint = tmp_path / "blip2_opt.pth"
    torch.save({"model": lavis_sd}, checkpoint)
    lm = build_tiny_gpt2(list(CT_REPORTS.values()), tmp_path / "lm", n_embd=c["lm_hidden"])
    bridge = {
        "hidden_size": c["hidden"],
        "num_hidden_layers": c["layers"],
        "num_attention_heads": c["heads"],
        "intermediate_size": c["inter"],
        "cross_attention_frequency": c["freq"],
    }
    args = build_parser().parse_args(
        [
            "--train_manifest",
            str(ct_data["train"]),
            "--encoder",
            str(ct_data["encoder"]),
            "--lm",
            str(lm),
            "--bridge",
            json.dumps(bridge),
            "--num_query_tokens",
            str(c["num_query_token"]),
            "--qformer_checkpoint",
            str(checkpoint),
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    model = build_model(ReportTrainingConfig.from_flags(args), "ct", [], DistributedContext())
    state = model.bridge.state_dict()
    for ours, theirs in (
        ("query_tokens", "query_tokens"),
        ("ln_vision.weight", "ln_vision.weight"),
        ("language_projection.weight", "opt_proj.weight"),
    ):
        assert torch.equal(state[ours], lavis_sd[theirs]), ours


def test_image_cache_preprocesses_each_study_once():
    calls = []
    transform = lambda path: calls.append(path) or torch.full((1, 2, 2, 2), float(len(calls)))
    rows = [{"image": f"{i}.nii.gz", "report": "r", "modality": "ct", "id": str(i)} for i in range(2)]
    cached, plain = ReportDataset(rows, transform, "m.jsonl", cache=True), ReportDataset(rows, transform, "m.jsonl")
    first = [cached[i]["image"] for i in (0, 1)]
    assert [cached[i]["image"] for i in (0, 1)] == first and calls == ["0.nii.gz", "1.nii.gz"]
    plain[0]
    plain[0]
    assert calls[2:] == ["0.nii.gz", "0.nii.gz"]  # without the cache every access runs the pipeline
