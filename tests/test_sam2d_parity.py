"""The same ViT in 2-D reproduces segment-anything's image encoder (the X-ray tower of report generation)."""

import pytest
import torch

from sam3d.modeling.image_encoder import ImageEncoderViT
from tests.conftest import fixture_fill


def _encoder(cfg: dict, in_chans: int = 3, window_attention: str = "padding_free") -> ImageEncoderViT:
    return ImageEncoderViT(
        spatial_dims=2,
        img_size=cfg["img"],
        patch_size=cfg["ps"],
        in_chans=in_chans,
        embed_dim=cfg["emb"],
        depth=cfg["depth"],
        num_heads=cfg["heads"],
        out_chans=cfg["out"],
        window_size=cfg["win"],
        global_attn_indexes=tuple(cfg["glob"]),
        window_attention=window_attention,
    ).eval()


@pytest.mark.parametrize("window_attention", ["padding_free", "reference"])
def test_small_case_matches_segment_anything(sam2d_fixture, window_attention):
    case = sam2d_fixture["small"]
    encoder = _encoder(case["config"], window_attention=window_attention)
    prefix = "image_encoder."
    assert [(prefix + k, tuple(v.shape)) for k, v in encoder.state_dict().items()] == [
        (k, tuple(s)) for k, s in case["keys"]
    ]
    encoder.load_state_dict({k[len(prefix) :]: fixture_fill(k, s) for k, s in case["keys"]})
    with torch.no_grad():
        out = encoder(case["input"])
    torch.testing.assert_close(out, case["image_embedding"], atol=1e-4, rtol=0)


def test_vit_b_key_layout_matches_sam_vit_b(sam2d_fixture):
    cfg = {"img": 1024, "ps": 16, "emb": 768, "depth": 12, "heads": 12, "win": 14, "glob": (2, 5, 8, 11), "out": 256}
    with torch.device("meta"):
        encoder = _encoder(cfg)
    assert [("image_encoder." + k, tuple(v.shape)) for k, v in encoder.state_dict().items()] == [
        (k, tuple(s)) for k, s in sam2d_fixture["vit_b_keys_only"]
    ]
