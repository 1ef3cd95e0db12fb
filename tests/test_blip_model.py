"""The BLIP-2 report model: vision towers (exported CT encoder, SAM 2-D layout and loading, freezing),
the language model (tiny GPT-2 folder, frozen/full/LoRA), LM loss masking, learning, generation and
save/load symmetry."""

from __future__ import annotations

import pytest
import torch

from blip.language_model import build_tiny_gpt2, load_language_model, lora_target_modules
from blip.model import Blip2ReportModel
from blip.vision import SAM2D_CONFIGS, VisionTowerConfig, build_vision_tower
from ich_engine.checkpoint import CheckpointError
from sam3d.export import export_encoder
from sam3d.modeling.build import build_sam3d
from tests.conftest import TINY_CT, ct_images, tiny_config
from tests.conftest import TINY_REPORTS as REPORTS


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    return build_tiny_gpt2(REPORTS, tmp_path_factory.mktemp("lm"), n_embd=32)


@pytest.fixture(scope="module")
def model(lm_folder):
    torch.manual_seed(0)
    return Blip2ReportModel(tiny_config(lm_folder))


def test_shapes_and_labels_mask_prefix_and_padding(model):
    input_ids, attention_mask = model.processor.tokenize_reports(REPORTS)
    assert attention_mask[1].sum() < attention_mask[0].sum()  # the short report is padded
    assert input_ids[0, attention_mask[0].sum() - 1] == model.tokenizer.eos_token_id
    out = model(ct_images(), "ct", input_ids, attention_mask)
    prefix = 4 + len(model.processor.prompt_ids("ct"))
    assert out.logits.shape == (2, prefix + input_ids.shape[1], len(model.tokenizer))
    assert torch.isfinite(out.loss)
    assert (out.labels[:, :prefix] == -100).all()
    report_labels = out.labels[:, prefix:]
    assert torch.equal(report_labels[attention_mask == 1], input_ids[attention_mask == 1])
    assert (report_labels[attention_mask == 0] == -100).all()
    assert model.image_tokens(ct_images(1), "ct").shape == (1, 64, 48)  # 4^3 grid, neck width 48


def test_a_few_steps_reduce_the_loss(lm_folder):
    torch.manual_seed(0)
    model = Blip2ReportModel(tiny_config(lm_folder, xray=False))
    images = ct_images()
    input_ids, attention_mask = model.processor.tokenize_reports(REPORTS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(6):
        loss = model(images, "ct", input_ids, attention_mask).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_generation_returns_one_string_per_image_for_each_modality(model):
    model.eval()
    ct = model.generate(ct_images(), "ct", num_beams=2, max_new_tokens=8)
    xray = model.generate(
        torch.randn(3, 3, 64, 64),
        "xray",
        max_new_tokens=5,
        do_sample=True,
        top_p=0.9,
        repetition_penalty=2.0,
        no_repeat_ngram_size=2,
    )
    assert len(ct) == 2 and len(xray) == 3 and all(isinstance(t, str) for t in ct + xray)
    assert "xray" in model.vision_adapters  # the 2-D tower (32 wide) is adapted to the CT width (48)
    with pytest.raises(ValueError, match="modality"):
        model.generate(ct_images(), "mri")


def test_exported_encoder_loads_from_config_and_the_users_way(tmp_path, lm_folder):
    torch.manual_seed(1)
    sam = build_sam3d(TINY_CT)
    path = tmp_path / "sam_encoder.pth"
    preprocessing = {"target_spacing_mm": (3.0, 3.0, 3.0), "roi_size": (64, 64, 64)}
    export_encoder(sam, path, TINY_CT, visual_tokens=16, preprocessing=preprocessing)
    expected = sam.image_encoder.state_dict()

    from_export = Blip2ReportModel(tiny_config(lm_folder, ct_checkpoint=str(path), xray=False))
    for key, value in from_export.visual_encoder.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert from_export.config.ct_tower.encoder_config == TINY_CT.to_dict()
    assert tuple(from_export.config.ct_tower.preprocessing["roi_size"]) == (64, 64, 64)

    users_way = Blip2ReportModel(tiny_config(lm_folder, xray=False))
    users_way.visual_encoder.load_state_dict(torch.load(path)["image_encoder_state_dict"])
    for key, value in users_way.visual_encoder.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_sam2d_vit_b_tower_has_the_sam_vit_b_key_layout(sam2d_fixture):
    with torch.device("meta"):
        tower = build_vision_tower(VisionTowerConfig("sam2d", "vit_b"))
    assert [("image_encoder." + k, tuple(v.shape)) for k, v in tower.encoder.state_dict().items()] == [
        (k, tuple(s)) for k, s in sam2d_fixture["vit_b_keys_only"]
    ]
    assert tower.config.encoder_config == SAM2D_CONFIGS["vit_b"]


def test_sam2d_checkpoint_loads_image_encoder_keys_and_notes_the_rest(tmp_path):
    source = build_vision_tower(VisionTowerConfig("sam2d", "tiny")).encoder
    checkpoint = {"image_encoder." + k: torch.randn_like(v) for k, v in source.state_dict().items()}
    checkpoint["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 8)
    checkpoint["mask_decoder.iou_token.weight"] = torch.zeros(1, 8)
    path = tmp_path / "sam_vit_tiny.pth"
    torch.save(checkpoint, path)
    tower = build_vision_tower(VisionTowerConfig("sam2d", "tiny", checkpoint=str(path), freeze=True))
    key = "neck.0.weight"
    assert torch.equal(tower.encoder.state_dict()[key], checkpoint["image_encoder." + key])
    assert any("mask_decoder" in note and "prompt_encoder" in note for note in tower.notes)
    assert not any(p.requires_grad for p in tower.encoder.parameters())

    del checkpoint["image_encoder." + key]
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="missing.*neck.0.weight"):
        build_vision_tower(VisionTowerConfig("sam2d", "tiny", checkpoint=str(path)))


def test_freeze_flags_and_lm_modes(lm_folder):
    frozen = Blip2ReportModel(tiny_config(lm_folder, lm_mode="frozen", freeze_ct=True, xray=False))
    assert not any(p.requires_grad for p in frozen.visual_encoder.parameters())
    assert not any(p.requires_grad for p in frozen.language_model.parameters())
    assert all(p.requires_grad for p in frozen.bridge.parameters())
    frozen.train()
    assert not frozen.language_model.training and not frozen.visual_encoder.training and frozen.bridge.training

    lora = Blip2ReportModel(tiny_config(lm_folder, lm_mode="lora", xray=False))
    trainable = [n for n, p in lora.language_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "c_attn" in n for n in trainable)
    assert all(p.requires_grad for p in lora.visual_encoder.parameters())
    assert len(lora.eval().generate(ct_images(1), "ct", max_new_tokens=3)) == 1  # through peft's generate


def test_language_model_loading_errors(tmp_path, lm_folder):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_language_model(tmp_path)
    with pytest.raises(ValueError, match="lm mode"):
        load_language_model(lm_folder, mode="half")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="bitsandbytes"):
            load_language_model(lm_folder, load_in_4bit=True)
    model, tokenizer = load_language_model(lm_folder)
    assert lora_target_modules(model) == ["c_attn"] and tokenizer.pad_token == "<|pad|>"


@pytest.mark.parametrize("lm_mode", ["full", "lora"])
def test_save_and_from_pretrained_give_the_same_model(tmp_path, lm_folder, lm_mode):
    torch.manual_seed(2)
    model = Blip2ReportModel(tiny_config(lm_folder, lm_mode=lm_mode, xray=False)).eval()
    if lm_mode == "lora":  # non-zero adapters, so merging them into the saved LM is visible
        for name, param in model.language_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
    model.save_pretrained(tmp_path / "report_model")
    reloaded = Blip2ReportModel.from_pretrained(tmp_path / "report_model").eval()
    input_ids, attention_mask = model.processor.tokenize_reports(REPORTS)
    images = ct_images()
    with torch.no_grad():
        expected = model(images, "ct", input_ids, attention_mask).logits
        found = reloaded(images, "ct", input_ids, attention_mask).logits
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-5)
    assert reloaded.config.ct_tower.checkpoint is None and reloaded.config.language_model.mode == lm_mode


def test_cross_attention_maps_and_overlays(model, tmp_path):
    from PIL import Image

    from blip.model import write_attention_overlays

    model.eval()
    ct = ct_images()
    maps = model.cross_attention_map(ct, "ct")
    assert maps.shape == (2, 64, 64, 64) and (maps >= 0).all()
    # Averaged softmax weights over the 4^3 = 64 tokens: their mean is 1/64 before upsampling.
    assert abs(maps.mean().item() - 1 / 64) < 2e-3
    paths = write_attention_overlays(model, ct, "ct", ["a", "b"], tmp_path)
    xray_paths = write_attention_overlays(model, torch.randn(1, 3, 64, 64), "xray", ["film"], tmp_path)
    assert [p.name for p in paths + xray_paths] == ["a_attention.png", "b_attention.png", "film_attention.png"]
    with Image.open(paths[0]) as picture:
        assert picture.size == (64, 64) and picture.mode == "RGB"


def test_generation_stops_at_the_language_models_last_position(tmp_path):
    short_lm = build_tiny_gpt2(REPORTS, tmp_path / "lm", n_embd=32, n_positions=24)
    model = Blip2ReportModel(tiny_config(short_lm, xray=False)).eval()
    prefix_length = model.soft_prompt(ct_images(1), "ct")[0].shape[1]
    texts = model.generate(ct_images(1), "ct", num_beams=2, max_new_tokens=100)  # GPT-2 fails past position 24
    assert len(model.tokenizer(texts[0]).input_ids) <= 24 - prefix_length


def test_processor_saves_and_loads_beside_the_model(tmp_path, lm_folder, ct_data):
    """Blip2ReportProcessor: prompts, tokenisation and per-modality image transforms travel with the
    model (processor_config.json); a folder saved before the processor (prompts in config.json) loads."""
    import json

    from blip.processor import PROCESSOR_NAME, Blip2ReportProcessor

    model = Blip2ReportModel(tiny_config(lm_folder), prompts={"ct": "CT:", "xray": "CXR:"}, max_text_len=12)
    model.save_pretrained(tmp_path / "m")
    processor = Blip2ReportProcessor.from_pretrained(tmp_path / "m")
    assert processor.to_dict() == model.processor.to_dict()
    assert processor.prompt_text("ct", "Segmentation: no hemorrhage.") == "Segmentation: no hemorrhage. CT:"
    ids, mask = processor.tokenize_reports(REPORTS)
    assert ids.shape[1] <= 12 and torch.equal(ids, model.processor.tokenize_reports(REPORTS)[0])
    scan = str(ct_data["root"] / "val_0.nii.gz")
    batch = processor(images=[scan], modality="ct", reports=REPORTS[:1])
    assert batch["images"].shape == (1, 1, 64, 64, 64) and batch["input_ids"].shape[0] == 1
    torch.testing.assert_close(batch["images"][0], model.processor.image_transform("ct")(scan))
    with pytest.raises(KeyError, match="no prompt for modality 'mri'"):
        processor.prompt_text("mri")
    # The layout before the processor: prompts and text length inside config.json.
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(prompts={"ct": "Old CT:", "xray": "Old CXR:"}, max_text_len=10, diagnosis_dropout=0.3)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    (tmp_path / "m" / PROCESSOR_NAME).unlink()
    old = Blip2ReportModel.from_pretrained(tmp_path / "m")
    assert old.processor.prompts["ct"] == "Old CT:" and old.processor.max_text_len == 10
