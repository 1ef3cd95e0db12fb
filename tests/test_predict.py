"""Prediction: masks come back in the input geometry, measurements follow the mask, both modes run."""

import json

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Compose

from engine.checkpoint import atomic_save
from sam3d.data.io import load_volume
from sam3d.data.synthetic import synthesize_case
from sam3d.data.transforms import DEFAULT_TRANSFORM_CONFIG, _resampling_steps
from sam3d.metrics import volume_ml
from sam3d.modeling import build_sam3d, model_config
from sam3d.predict import Click, HemorrhageSegmenter, measure, to_input_grid


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    c = synthesize_case(3, seed=0, spacing_mm=(1.2, 1.2, 4.0), ich_type="intraparenchymal", head_scale=0.6)
    nib.save(nib.Nifti1Image(c.image_hu, c.affine), root / "scan.nii.gz")
    nib.save(nib.Nifti1Image(c.mask, c.affine), root / "mask.nii.gz")
    return c, root


def test_mapping_back_to_the_input_grid_preserves_the_lesion(case):
    c, root = case
    cfg = {**DEFAULT_TRANSFORM_CONFIG, "target_spacing_mm": (2.0, 2.0, 2.0)}
    item = Compose(_resampling_steps(cfg, ["image", "label"]))({"image": str(root / "scan.nii.gz"), "label": str(root / "mask.nii.gz")})
    label = item["label"]
    back = to_input_grid(label.as_tensor()[0].numpy(), np.asarray(label.affine), load_volume(root / "scan.nii.gz"))
    back = back > 0.5
    truth = c.mask > 0
    dice = 2 * (back & truth).sum() / (back.sum() + truth.sum())
    assert back.shape == truth.shape and dice > 0.85


def test_measurements_follow_the_mask(case):
    c, root = case
    volume = load_volume(root / "scan.nii.gz")
    m = measure(c.mask, volume)
    assert m.total_volume_ml == pytest.approx(volume_ml(c.mask > 0, c.spacing_mm), abs=0.01)
    assert m.num_components >= 1 and m.side == c.metadata["side"]
    assert m.slice_extent[0] <= m.centroid_voxel[2] <= m.slice_extent[1]
    two = np.zeros_like(c.mask)
    two[10:14, 40:44, 5:7] = 1
    two[-14:-10, 40:44, 5:7] = 1
    bilateral = measure(two, volume)
    assert bilateral.num_components == 2 and bilateral.side == "bilateral"
    assert measure(np.zeros_like(c.mask), volume).side == "none"


@pytest.mark.parametrize("clicks", [None, "voxel", "mm"])
def test_predict_writes_mask_in_input_geometry(case, tmp_path, clicks):
    c, root = case

    config = model_config("small", img_size=32)
    atomic_save({"model_state_dict": build_sam3d(config).state_dict(), "model_config": config.to_dict(),
                 "preprocessing": {"target_spacing_mm": (3.0, 3.0, 3.0)}}, tmp_path / "model.pth")
    segmenter = HemorrhageSegmenter(tmp_path / "model.pth")
    centre = [int(v) for v in np.argwhere(c.mask).mean(0)]
    click_list = None
    if clicks == "voxel":
        click_list = [Click(tuple(centre)), Click(tuple(np.add(centre, 2)), positive=False)]
    elif clicks == "mm":
        click_list = [Click(tuple(c.affine[:3, :3] @ centre + c.affine[:3, 3]), space="mm")]
    result = segmenter.save(segmenter.predict(root / "scan.nii.gz", click_list, threshold=0.5), tmp_path / "out")
    written = nib.load(result.files["mask"])
    assert written.shape == c.image_hu.shape and np.allclose(written.affine, c.affine)
    saved = json.loads(open(result.files["measurements"]).read())
    assert saved["mode"] == ("interactive" if clicks else "automatic")
    assert saved["measurements"]["total_volume_ml"] == result.measurements.total_volume_ml
    assert result.files["overlays"] and all(p.endswith(".png") for p in result.files["overlays"])
