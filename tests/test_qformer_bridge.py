"""The Q-Former bridge against LAVIS BLIP-2: parity on the recorded fixture, LAVIS key conversion
(dropped parts, re-initialised interfaces, errors), save/load symmetry and cross-attention maps."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from blip.cli.convert_lavis import main
from blip.convert_lavis import convert_lavis_state_dict, load_lavis_into_bridge
from blip.qformer import QFormerBridge, QFormerBridgeConfig
from ich_engine.checkpoint import CheckpointError
from tests.conftest import fixture_fill, load_fixture

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def lavis_fixture() -> dict:
    return load_fixture("lavis_qformer_parity.pt")


@pytest.fixture(scope="module")
def fixture_config(lavis_fixture) -> QFormerBridgeConfig:
    """The fixture's LAVIS config in QFormerBridgeConfig terms (layer-norm eps are the defaults)."""
    c = lavis_fixture["config"]
    return QFormerBridgeConfig(
        vision_width=c["vision_width"],
        num_query_tokens=c["num_query_token"],
        hidden_size=c["hidden"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        intermediate_size=c["inter"],
        lm_hidden_size=c["lm_hidden"],
        cross_attention_frequency=c["freq"],
    )


@pytest.fixture()
def lavis_sd(lavis_fixture) -> dict[str, torch.Tensor]:
    """The LAVIS stage-2 state dict, refilled by the fixture's rule."""
    return {key: fixture_fill(key, shape) for key, shape in lavis_fixture["keys"]}


def test_lavis_parity(tmp_path, lavis_fixture, fixture_config, lavis_sd):
    checkpoint = tmp_path / "blip2_opt.pth"
    torch.save({"model": lavis_sd, "config": {"arch": "blip2_opt"}}, checkpoint)  # LAVIS checkpoint layout
    bridge = QFormerBridge(fixture_config).eval()
    notes = load_lavis_into_bridge(bridge, checkpoint)
    assert any("Qformer.bert.embeddings.position_ids" in note for note in notes)

    with torch.no_grad():
        out = bridge(lavis_fixture["image_embeds"])
    assert (out.query_output - lavis_fixture["qformer_last_hidden_state"]).abs().max() < TOLERANCE
    assert (out.projected - lavis_fixture["projected"]).abs().max() < TOLERANCE
    assert out.cross_attentions is None


def test_other_vision_and_lm_widths_reinitialise_interfaces_with_warning(fixture_config, lavis_sd):
    """A checkpoint made for another vision tower (width 48 here, 1408 for EVA-CLIP) and another LM:
    ln_vision, cross-attention key/value weights and the projection restart; all the rest loads."""
    config = dataclasses.replace(fixture_config, vision_width=24, lm_hidden_size=16)
    bridge = QFormerBridge(config)
    fresh = {key: value.clone() for key, value in bridge.state_dict().items()}
    with pytest.warns(UserWarning, match="re-initialised") as caught:
        converted, notes = convert_lavis_state_dict(lavis_sd, config)
    message = str(caught[0].message)
    reinitialised = [
        "ln_vision.weight",
        "ln_vision.bias",
        "language_projection.weight",
        "language_projection.bias",
        *(f"qformer.encoder.layer.{i}.crossattention.attention.{kv}.weight" for i in (0, 2) for kv in ("key", "value")),
    ]
    for key in reinitialised:
        assert key in message and key not in converted
    assert message in notes

    state_dict = {**bridge.state_dict(), **converted}
    bridge.load_state_dict(state_dict, strict=True)
    for key in reinitialised:
        assert torch.equal(bridge.state_dict()[key], fresh[key])
    assert torch.equal(
        bridge.state_dict()["qformer.encoder.layer.0.crossattention.attention.query.weight"],
        lavis_sd["Qformer.bert.encoder.layer.0.crossattention.self.query.weight"],
    )
    assert bridge(torch.randn(1, 5, 24)).projected.shape == (1, config.num_query_tokens, 16)


def test_stage1_checkpoint_drops_text_parts_and_reinitialises_projection(fixture_config, lavis_sd):
    hidden, inter = fixture_config.hidden_size, fixture_config.intermediate_size
    del lavis_sd["opt_proj.weight"], lavis_sd["opt_proj.bias"]
    lavis_sd.update(
        {
            "visual_encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3),
            "Qformer.bert.embeddings.word_embeddings.weight": torch.zeros(30523, hidden),
            "Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(inter, hidden),
            "Qformer.bert.encoder.layer.0.output.LayerNorm.weight": torch.zeros(hidden),
            "Qformer.cls.predictions.bias": torch.zeros(30523),
            "itm_head.weight": torch.zeros(2, hidden),
            "temp": torch.tensor(0.07),
        }
    )
    with pytest.warns(UserWarning, match=r"language_projection\.weight \(not in the checkpoint\)"):
        converted, notes = convert_lavis_state_dict(lavis_sd, fixture_config)
    assert "language_projection.weight" not in converted and "qformer.layernorm.weight" in converted
    for key in (
        "visual_encoder.blocks.0",
        "word_embeddings",
        "layer.0.intermediate.dense",
        "layer.0.output.LayerNorm",
        "Qformer.cls.",
        "itm_head",
        "'temp'",
    ):
        assert any(key in note for note in notes), key


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (
            lambda sd: sd.update({"Qformer.bert.encoder.layer.1.crossattention.self.key.weight": torch.zeros(64, 48)}),
            "Qformer.bert.encoder.layer.1.crossattention.self.key.weight",
        ),
        (lambda sd: sd.update({"llm_proj.weight": torch.zeros(32, 64)}), "llm_proj.weight"),
        (
            lambda sd: sd.pop("Qformer.bert.encoder.layer.3.output_query.dense.bias"),
            "qformer.encoder.layer.3.output_query.dense.bias",
        ),
        (lambda sd: sd.update({"query_tokens": torch.zeros(1, 4, 64)}), "query_tokens"),
        (lambda sd: sd.update({"t5_proj.weight": torch.zeros(32, 64)}), "t5_proj.weight"),
    ],
    ids=["unexpected", "unknown-prefix", "missing", "shape", "duplicate"],
)
def test_keys_that_do_not_fit_are_errors_naming_them(fixture_config, lavis_sd, edit, named):
    edit(lavis_sd)
    with pytest.raises(CheckpointError, match=re.escape(named)):
        convert_lavis_state_dict(lavis_sd, fixture_config)


def test_save_pretrained_round_trip(tmp_path, fixture_config):
    bridge = QFormerBridge(fixture_config).eval()
    image_embeds = torch.randn(2, 10, fixture_config.vision_width)
    bridge.save_pretrained(tmp_path / "bridge")
    assert {p.name for p in (tmp_path / "bridge").iterdir()} == {"config.json", "model.safetensors"}
    reloaded = QFormerBridge.from_pretrained(tmp_path / "bridge").eval()
    assert reloaded.config == fixture_config
    with torch.no_grad():
        assert torch.equal(bridge(image_embeds).projected, reloaded(image_embeds).projected)

    (tmp_path / "bridge" / "model.safetensors").rename(tmp_path / "bridge" / "unused")
    torch.save(bridge.state_dict(), tmp_path / "bridge" / "pytorch_model.bin")
    from_bin = QFormerBridge.from_pretrained(tmp_path / "bridge").eval()
    with torch.no_grad():
        assert torch.equal(bridge(image_embeds).projected, from_bin(image_embeds).projected)

    with pytest.raises(ValueError, match="num_query_token"):
        QFormerBridgeConfig.from_dict({"num_query_token": 8})


def test_cross_attentions_one_per_cross_layer_and_mask_respected(fixture_config):
    c = fixture_config
    bridge = QFormerBridge(c).eval()
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        out = bridge(torch.randn(2, 10, c.vision_width), image_attention_mask=mask, output_attentions=True)
    assert len(out.cross_attentions) == len(range(0, c.num_hidden_layers, c.cross_attention_frequency))
    for attention in out.cross_attentions:
        assert attention.shape == (2, c.num_attention_heads, c.num_query_tokens, 10)
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, c.num_attention_heads, c.num_query_tokens))
        assert attention[1, ..., 6:].abs().max() == 0
    with pytest.raises(ValueError, match=r"\(B, N, 48\)"):
        bridge(torch.randn(2, 10, 47))


def test_cli_writes_a_loadable_bridge(tmp_path, lavis_fixture, fixture_config, lavis_sd):
    torch.save({"model": lavis_sd}, tmp_path / "lavis.pth")
    flags = [
        f"--{field.name.replace('_', '-')}={getattr(fixture_config, field.name)}"
        for field in dataclasses.fields(fixture_config)
    ]
    main(["--lavis", str(tmp_path / "lavis.pth"), "--output", str(tmp_path / "bridge.pth"), *flags])
    main(["--lavis", str(tmp_path / "lavis.pth"), "--output", str(tmp_path / "bridge"), *flags])

    written = torch.load(tmp_path / "bridge.pth", weights_only=True)
    from_file = QFormerBridge(QFormerBridgeConfig.from_dict(written["config"])).eval()
    from_file.load_state_dict(written["model"])
    for bridge in (from_file, QFormerBridge.from_pretrained(tmp_path / "bridge").eval()):
        with torch.no_grad():
            projected = bridge(lavis_fixture["image_embeds"]).projected
        assert (projected - lavis_fixture["projected"]).abs().max() < TOLERANCE
