"""Click simulation and the interactive loss follow SAM-Med3D's training recipe."""

import torch

from sam3d.clicks import run_click_rounds, sample_next_clicks
from sam3d.loss import InteractiveSegmentationLoss
from sam3d.modeling import build_sam3d, model_config


def _target(size=32):
    t = torch.zeros(2, 1, size, size, size, dtype=torch.bool)
    t[0, 0, 10:16, 12:20, 8:14] = True
    t[1, 0, 3:6, 3:6, 3:6] = True
    return t


def test_first_click_is_positive_inside_the_hemorrhage():
    target = _target()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        points, labels = sample_next_clicks(torch.zeros_like(target), target, g)
        assert labels.tolist() == [[1], [1]]
        for b in range(2):
            assert target[b, 0][tuple(points[b, 0].long())]


def test_next_clicks_come_from_the_error_region():
    target = _target()
    prediction = target.clone()
    prediction[0, 0, 20:24, 20:24, 20:24] = True  # false positive only
    prediction[1] = False  # complete miss
    g = torch.Generator().manual_seed(1)
    points, labels = sample_next_clicks(prediction, target, g)
    assert labels.tolist() == [[0], [1]]
    assert 20 <= points[0, 0].min() and points[0, 0].max() < 24
    perfect, perfect_labels = sample_next_clicks(target, target, g)
    assert perfect_labels.tolist() == [[-1], [-1]]


def test_click_rounds_accumulate_points_and_feed_back_the_mask():
    model = build_sam3d(model_config("small", img_size=32)).eval()
    target = _target()
    emb = model.image_encoder(torch.randn(2, 1, 32, 32, 32))
    seen = []
    with torch.no_grad():
        logits = run_click_rounds(
            model, emb, target, 3, torch.Generator().manual_seed(0), on_round=lambda i, lg: seen.append(lg.clone())
        )
    assert logits.shape == (2, 1, 32, 32, 32) and len(seen) == 3
    assert not torch.equal(seen[0], seen[2])  # new clicks and mask prompt change the prediction


def test_loss_trains_the_prompt_free_path_for_negatives():
    model = build_sam3d(model_config("small", img_size=32))
    module = InteractiveSegmentationLoss(model, num_clicks=2)
    target = _target().float()
    target[1] = 0  # hemorrhage-free scan
    loss, logs = module({"image": torch.randn(2, 1, 32, 32, 32), "label": target})
    assert set(logs) == {"loss_positive", "loss_last_click", "loss_negative"}
    loss.backward()
    assert model.prompt_encoder.no_mask_embed.weight.grad.abs().sum() > 0
    assert model.prompt_encoder.point_embeddings[1].weight.grad.abs().sum() > 0
    assert model.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = build_sam3d(model_config("small", img_size=32))
    x = torch.randn(1, 1, 32, 32, 32)
    model.image_encoder(x).sum().backward()
    reference = model.image_encoder.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    model.image_encoder.gradient_checkpointing = True
    model.image_encoder(x).sum().backward()
    torch.testing.assert_close(model.image_encoder.blocks[0].attn.qkv.weight.grad, reference, atol=1e-6, rtol=1e-5)


def test_automatic_round_trains_prompt_free_segmentation_of_bleeds():
    model = build_sam3d(model_config("small", img_size=32))
    target = _target().float()
    batch = {"image": torch.randn(2, 1, 32, 32, 32), "label": target}
    _, logs = InteractiveSegmentationLoss(model, num_clicks=1)(batch)
    assert "loss_automatic" not in logs
    loss, logs = InteractiveSegmentationLoss(model, num_clicks=1, automatic_round=True)(batch)
    assert "loss_automatic" in logs and "loss_negative" not in logs
    loss.backward()
    assert model.prompt_encoder.no_mask_embed.weight.grad.abs().sum() > 0
