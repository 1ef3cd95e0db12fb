"""CT volumes and chest X-rays in one report-generation run: the modality-grouped batch sampler, the
mixed dataset, per-tower freezing, and an end-to-end ``blip.training.train`` run on a mixed manifest."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from blip.cli.train import build_parser, main
from blip.data.dataset import ReportDataset
from blip.model import Blip2ReportModel
from blip.training.train import ReportTrainingConfig, build_model
from blip.vision import SAM2D_CHECKPOINT_PREFIX, VisionTowerConfig, build_vision_tower
from ich_engine.checkpoint import load_checkpoint
from ich_engine.config import ConfigError
from ich_engine.distributed import DistributedContext
from ich_engine.samplers import GroupedBatchSampler
from sam3d.export import export_encoder
from sam3d.modeling.build import build_sam3d
from tests.conftest import CT_REPORTS as REPORTS
from tests.conftest import TINY_CT, write_head_ct
from tests.conftest import TINY_CT_PREPROCESSING as PREPROCESSING

XRAY_REPORTS = [
    "FINDINGS: Clear lungs. IMPRESSION: Normal chest.",
    "FINDINGS: Right pleural effusion. IMPRESSION: Effusion.",
]
KEYS = ["ct", "xray", "ct", "ct", "xray", "ct", "xray", "ct", "ct", "xray", "ct"]  # 7 CT, 4 X-ray, interleaved


def epoch_batches(sampler: GroupedBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


# ---------------------------------------------------------------- sampler
def test_every_index_once_in_single_group_batches():
    sampler = GroupedBatchSampler(KEYS, batch_size=3, shuffle=True, seed=5)
    batches = epoch_batches(sampler, 0)
    assert sorted(i for b in batches for i in b) == list(range(len(KEYS)))
    assert all(len({KEYS[i] for i in b}) == 1 and 1 <= len(b) <= 3 for b in batches)
    assert len(batches) == len(sampler) == 3 + 2  # ceil(7/3) CT + ceil(4/3) X-ray batches


def test_shuffle_is_a_function_of_seed_and_epoch():
    a, b = (GroupedBatchSampler(KEYS, 2, shuffle=True, seed=5) for _ in range(2))
    assert epoch_batches(a, 3) == epoch_batches(b, 3)  # a resumed run draws the same batches
    assert epoch_batches(a, 0) != epoch_batches(a, 1)
    assert epoch_batches(a, 0) != epoch_batches(GroupedBatchSampler(KEYS, 2, shuffle=True, seed=6), 0)


def test_without_shuffle_groups_come_in_order():
    batches = list(GroupedBatchSampler(KEYS, 3, shuffle=False))
    assert batches == [[0, 2, 3], [5, 7, 8], [10], [1, 4, 6], [9]]


@pytest.mark.parametrize("keys, batch_size, total", [(KEYS, 2, 4 + 2), (KEYS + ["xray"], 3, 3 + 2)])
def test_ddp_ranks_get_equal_counts_and_disjoint_shares(keys, batch_size, total):
    ranks = [GroupedBatchSampler(keys, batch_size, shuffle=True, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    shares = [epoch_batches(s, 4) for s in ranks]
    assert len(shares[0]) == len(shares[1]) == len(ranks[0]) == -(-total // 2)
    seen = [i for share in shares for b in share for i in b]
    assert set(seen) == set(range(len(keys)))
    if total % 2 == 0:
        assert len(seen) == len(keys)  # each item on exactly one rank
    else:
        padded = [b for share in shares for b in share]
        assert len(padded) == total + 1 and sum(padded.count(b) > 1 for b in padded) == 2  # one batch repeated
    assert all(len({keys[i] for i in b}) == 1 for share in shares for b in share)


def test_more_ranks_than_batches_still_gives_every_rank_a_batch():
    ranks = [
        list(GroupedBatchSampler(["ct", "ct", "xray"], 4, shuffle=False, num_replicas=3, rank=r)) for r in range(3)
    ]
    assert ranks == [[[0, 1]], [[2]], [[0, 1]]]


# ---------------------------------------------------------------- dataset
def test_mixed_dataset_uses_one_transform_per_modality():
    rows = [
        {"image": "a.nii.gz", "report": "r", "modality": "ct", "id": "a"},
        {"image": ["b.png", "b_lateral.png"], "report": "r", "modality": "xray", "id": "b"},
    ]
    dataset = ReportDataset(rows, {"ct": lambda p: torch.zeros(1), "xray": lambda p: torch.ones(3)}, "mixed.jsonl")
    assert dataset.group_keys == ["ct", "xray"] and dataset.modalities == ["ct", "xray"]
    assert dataset[0]["image"].shape == (1,) and dataset[1]["image"].shape == (3,)
    with pytest.raises(ValueError, match=r"mixed.jsonl: no image transform for modality \['xray'\]"):
        ReportDataset(rows, {"ct": lambda p: p}, "mixed.jsonl")


# ---------------------------------------------------------------- end to end
def write_film(path, seed: int) -> None:
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 40), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """2 CT + 2 X-ray training studies, 1 + 1 validation; a tiny exported CT encoder and a tiny
    segment-anything checkpoint for the X-ray tower, so both towers start from known weights."""
    root = tmp_path_factory.mktemp("mixed_reports")
    manifests = {}
    for split, count in (("train", 2), ("val", 1)):
        rows = []
        for index in range(count):
            seed = index + (10 if split == "val" else 0)
            write_head_ct(root / f"{split}_ct{index}.nii.gz", bleed=index % 2 == 0, seed=seed)
            write_film(root / f"{split}_film{index}.png", seed)
            rows += [
                {
                    "image": f"{split}_ct{index}.nii.gz",
                    "report": REPORTS[index % 2 == 0],
                    "modality": "ct",
                    "id": f"{split}_ct{index}",
                    "volume_ml": 3.0 if index % 2 == 0 else 0.0,
                    "side": "left" if index % 2 == 0 else "none",
                },
                {
                    "image": f"{split}_film{index}.png",
                    "report": XRAY_REPORTS[index % 2],
                    "modality": "xray",
                    "id": f"{split}_film{index}",
                },
            ]
        manifests[split] = root / f"{split}.jsonl"
        manifests[split].write_text("".join(json.dumps(row) + "\n" for row in rows))
    torch.manual_seed(0)
    encoder = root / "sam_encoder.pth"
    export_encoder(build_sam3d(TINY_CT), encoder, TINY_CT, visual_tokens=16, preprocessing=PREPROCESSING)
    film_encoder = build_vision_tower(VisionTowerConfig("sam2d", "tiny")).encoder
    xray_encoder = root / "sam_tiny.pth"
    torch.save({SAM2D_CHECKPOINT_PREFIX + k: v for k, v in film_encoder.state_dict().items()}, xray_encoder)
    return {"root": root, "encoder": encoder, "xray_encoder": xray_encoder, **manifests}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    assert before.keys() == after.keys()
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_mixed_run_trains_both_towers_and_reloads(mixed_data, tmp_path, capsys):
    os.environ["WANDB_MODE"] = "disabled"
    out = tmp_path / "run"
    assert (
        main(
            [
                "--config",
                "sam3d/configs/blip_tiny_ct.yaml",
                "--train_manifest",
                str(mixed_data["train"]),
                "--val_manifest",
                str(mixed_data["val"]),
                "--encoder",
                str(mixed_data["encoder"]),
                "--xray_encoder",
                str(mixed_data["xray_encoder"]),
                "--xray_model_type",
                "tiny",
                "--output_dir",
                str(out),
                "--epochs",
                "1",
                "--batch_size",
                "2",
                "--max_new_tokens",
                "5",
                "--num_beams",
                "1",
                "--log_images",
                "--log_freq",
                "1",
                "--no-freeze_vision",  # loaded towers stay fixed by default
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "sample val_ct0 (ct)" in printed and "sample val_film0 (xray)" in printed
    record = load_checkpoint(out / "latest_model.pth")["history"][0]
    per_modality = record["val_loss_ct"], record["val_loss_xray"]
    assert np.isfinite(per_modality).all()
    assert min(per_modality) <= record["val_loss"] <= max(per_modality)  # the mean over both modalities' studies
    samples = json.loads((out / "val_samples.json").read_text())
    assert sorted((s["modality"], s["id"]) for s in samples) == [("ct", "val_ct0"), ("xray", "val_film0")]
    assert all((out / "attention" / f"{i}_attention.png").is_file() for i in ("val_ct0", "val_film0"))

    model = Blip2ReportModel.from_pretrained(out / "report_model").eval()
    assert "xray" in model.vision_adapters  # the tiny towers' widths differ (48 CT, 32 X-ray)
    ct_start = load_checkpoint(mixed_data["encoder"])["image_encoder_state_dict"]
    xray_start = {k[len(SAM2D_CHECKPOINT_PREFIX) :]: v for k, v in torch.load(mixed_data["xray_encoder"]).items()}
    assert changed(ct_start, model.visual_encoder.state_dict())
    assert changed(xray_start, model.visual_encoder_2d.state_dict())
    # The config conditions CT reports on measurements; X-ray reports take none.
    for modality, image, contexts in (
        ("ct", "val_ct0.nii.gz", ["Segmentation: left hemorrhage, 3.0 mL."]),
        ("xray", "val_film0.png", None),
    ):
        pixels = model.processor.image_transform(modality)(str(mixed_data["root"] / image))
        texts = model.generate(pixels[None], modality, contexts, num_beams=1, max_new_tokens=5)
        assert len(texts) == 1 and isinstance(texts[0], str)


def test_per_tower_freezing(mixed_data, tmp_path):
    from blip.language_model import build_tiny_gpt2

    lm = build_tiny_gpt2(XRAY_REPORTS, tmp_path / "lm", n_embd=32)
    argv = [
        "--train_manifest",
        str(mixed_data["train"]),
        "--encoder",
        str(mixed_data["encoder"]),
        "--xray_model_type",
        "tiny",
        "--lm",
        str(lm),
        "--num_query_tokens",
        "4",
        "--bridge",
        '{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}',
    ]
    parse = lambda *flags: ReportTrainingConfig.from_flags(build_parser().parse_args(argv + list(flags)))
    assert parse().tower_freezing() == {"ct": True, "xray": False}  # the exported encoder stays, the random one trains
    assert parse("--freeze_vision").tower_freezing() == {"ct": True, "xray": True}
    assert parse("--no-freeze_vision").tower_freezing() == {"ct": False, "xray": False}
    assert parse("--no-freeze_ct_tower").tower_freezing() == {"ct": False, "xray": False}
    assert parse("--no-freeze_vision", "--freeze_xray_tower").tower_freezing() == {"ct": False, "xray": True}
    model = build_model(parse("--freeze_vision", "--no-freeze_xray_tower"), ["ct", "xray"], [], DistributedContext())
    assert not any(p.requires_grad for p in model.visual_encoder.parameters())
    assert all(p.requires_grad for p in model.visual_encoder_2d.parameters())


def test_validation_modality_without_training_rows_is_refused(mixed_data, tmp_path):
    ct_only = mixed_data["root"] / "ct_train.jsonl"
    ct_only.write_text("".join(line + "\n" for line in mixed_data["train"].read_text().splitlines() if '"ct"' in line))
    with pytest.raises(ConfigError, match=r"validation rows of modality \['xray'\]"):
        main(
            [
                "--train_manifest",
                str(ct_only),
                "--val_manifest",
                str(mixed_data["val"]),
                "--output_dir",
                str(tmp_path / "run"),
            ]
        )
