"""BLIP-2 stage 1 (blip.training.stage1): the Q-Former's text path and attention masks, the three losses, hard
negatives, validation retrieval, and a stage-1 run whose bridge starts stage 2."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from blip.cli.train import build_parser, main
from blip.data.dataset import ReportCollator
from blip.language_model import build_tiny_gpt2, load_language_model
from blip.model import Blip2ReportConfig, Blip2ReportModel, LanguageModelConfig
from blip.qformer import QFormerBridgeConfig
from blip.training.stage1 import SPECIAL_TEXT_TOKENS, QFormerPretraining, QFormerPretrainingTask, findings_key
from blip.training.train import ReportTrainingConfig, build_model
from blip.vision import VisionTowerConfig
from ich_engine.checkpoint import load_checkpoint
from ich_engine.config import ConfigError, parse_with_config
from ich_engine.distributed import DistributedContext
from tests.conftest import CT_REPORTS as REPORTS

POSITIVE_LEFT = (
    "FINDINGS: There is an acute subdural hematoma along the left convexity. IMPRESSION: Left subdural hematoma."
)


@pytest.fixture(scope="module")
def stage1_model(tmp_path_factory):
    lm = build_tiny_gpt2(
        list(REPORTS.values()) + [POSITIVE_LEFT], tmp_path_factory.mktemp("lm"), n_embd=32, tokenizer="word"
    )
    _, tokenizer = load_language_model(lm, "frozen")
    torch.manual_seed(0)
    config = Blip2ReportConfig(
        ct_tower=VisionTowerConfig("sam3d", "tiny", None, True),
        language_model=LanguageModelConfig(str(lm)),
        num_query_tokens=4,
        bridge=QFormerBridgeConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            text_vocab_size=len(tokenizer) + len(SPECIAL_TEXT_TOKENS),
        ),
    )
    return QFormerPretraining(Blip2ReportModel(config), embed_dim=16)


def _batch(model, reports):
    collate = ReportCollator(model.report_model.processor)
    torch.manual_seed(1)
    items = [
        {"image": torch.randn(1, 64, 64, 64), "report": r, "modality": "ct", "id": str(i)}
        for i, r in enumerate(reports)
    ]
    return collate(items)


def test_itg_mask_queries_never_see_text_and_text_sees_no_future(stage1_model):
    model = stage1_model.eval()
    bridge = model.report_model.bridge
    vision = torch.randn(2, 512, bridge.config.vision_width)
    ids = torch.randint(0, 10, (2, 7))
    mask = torch.ones_like(ids)
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 10
    q = bridge.config.num_query_tokens
    with torch.no_grad():
        causal, causal_changed = (bridge.image_grounded_text(vision, x, mask, causal=True) for x in (ids, changed))
        joint, joint_changed = (bridge.image_grounded_text(vision, x, mask, causal=False) for x in (ids, changed))
        alone = bridge.queries(vision).last_hidden_state
    torch.testing.assert_close(causal[:, :q], causal_changed[:, :q])  # queries: no text at all
    torch.testing.assert_close(causal[:, :q], alone)  # ...so they equal the queries-only pass
    torch.testing.assert_close(causal[:, : q + 5], causal_changed[:, : q + 5])  # text before token 5
    assert not torch.allclose(causal[:, q + 5 :], causal_changed[:, q + 5 :])
    assert not torch.allclose(joint[:, :q], joint_changed[:, :q])  # ITM: queries read the text


def test_losses_are_finite_and_learn(stage1_model):
    model = stage1_model.train()
    batch = _batch(model, [REPORTS[True], REPORTS[False], POSITIVE_LEFT, REPORTS[False]])
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(15):
        loss, logs = model(batch)
        assert set(logs) == {"loss_itc", "loss_itm", "loss_itg"} and torch.isfinite(loss)
        first = first or logs
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert logs["loss_itg"] < 0.7 * first["loss_itg"] and logs["loss_itc"] < first["loss_itc"]


def test_hard_negatives_never_say_the_same_as_the_positive():
    keys = [
        findings_key(r, "ct") for r in (REPORTS[True], REPORTS[False], REPORTS[False].replace("Normal", "Unremarkable"))
    ]
    same = torch.tensor([[a == b for b in keys] for a in keys])
    assert same[1, 2]  # two normal reports worded differently say the same
    torch.manual_seed(0)
    for _ in range(20):
        images, texts, labels = QFormerPretraining._itm_pairs(torch.randn(3, 3), same)
        negatives = labels == 0
        assert not same[images[negatives], texts[negatives]].any()
        # One negative text per image and one negative image per text; studies 1 and 2 can only get study 0.
        assert labels[:3].tolist() == [1, 1, 1] and negatives.sum() == 6
        assert texts[3:][images[3:] != 0].eq(0).all() and images[3:][texts[3:] != 0].eq(0).all()


def test_validation_retrieval_figures(stage1_model):
    batch = _batch(stage1_model, [REPORTS[True], REPORTS[False], POSITIVE_LEFT])
    metrics = QFormerPretrainingTask().validate(stage1_model, [batch], torch.device("cpu"))
    assert {"val_loss", "val_itc", "val_itm", "val_itg", "val_i2t_r1", "val_i2t_r5", "val_i2t_r1_findings"} <= set(
        metrics
    )
    assert metrics["val_i2t_r5"] == 1.0 and 0.0 <= metrics["val_i2t_r1"] <= 1.0


def test_stage1_run_starts_stage2(ct_data, tmp_path, capsys):
    os.environ["WANDB_MODE"] = "disabled"
    common = [*ct_data["flags"], "--epochs", "2", "--max_new_tokens", "5"]
    one = tmp_path / "stage1"
    assert main(common + ["--stage", "1", "--output_dir", str(one)]) == 0
    history = load_checkpoint(one / "latest_model.pth")["history"]
    assert {"val_itc", "val_itm", "val_itg", "val_i2t_r1"} <= set(history[-1])
    assert history[1]["train_loss"] < history[0]["train_loss"]
    folder = one / "qformer"
    assert json.loads((folder / "config.json").read_text())["text_vocab_size"] > 0
    assert (folder / "stage1_heads.safetensors").is_file() and not (one / "report_model").exists()
    two = ["--init_from", str(folder), "--output_dir", str(tmp_path / "stage2"), "--lm", str(one / "lm")]
    # Stage 2's model starts with stage 1's bridge, tensor for tensor, and then trains behind the LM.
    model = build_model(
        ReportTrainingConfig.from_flags(parse_with_config(build_parser(), common + two)),
        "ct",
        list(REPORTS.values()),
        DistributedContext(),
    )
    saved = load_file(str(folder / "model.safetensors"))
    assert saved.keys() == model.bridge.state_dict().keys()
    assert all(torch.equal(v, model.bridge.state_dict()[k]) for k, v in saved.items())
    assert main(common + two + ["--epochs", "1"]) == 0
    assert "bridge initialised from" in capsys.readouterr().out
    # More stage 1 from the folder continues with its heads too.
    model = QFormerPretraining(
        build_model(
            ReportTrainingConfig.from_flags(parse_with_config(build_parser(), common + two + ["--stage", "1"])),
            "ct",
            list(REPORTS.values()),
            DistributedContext(),
        )
    )
    model.load_heads(folder)
    heads = load_file(str(folder / "stage1_heads.safetensors"))
    assert all(torch.equal(v, model.heads_state_dict()[k]) for k, v in heads.items())
    (folder / "stage1_heads.safetensors").unlink()  # a bridge alone cannot continue stage 1: one line
    with pytest.raises(ConfigError, match="no stage1_heads.safetensors"):
        main(common + two + ["--stage", "1"])
