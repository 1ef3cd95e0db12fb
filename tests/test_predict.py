"""Prediction: masks come back in the input geometry, measurements follow the mask, both modes run."""

import json

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Compose
from scipy import ndimage

from ich_engine.checkpoint import atomic_save
from ich_engine.config import ConfigError
from sam3d.cli import predict as predict_cli
from sam3d.data.io import Volume, load_volume
from sam3d.data.preprocessing import Preprocessing
from sam3d.data.synthetic import synthesize_case
from sam3d.data.transforms import _resampling_steps
from sam3d.metrics import volume_ml
from sam3d.modeling import build_sam3d, model_config
from sam3d.predict import (
    MAX_BLOOD_HU,
    MIN_COMPONENT_HU,
    MIN_VOXEL_HU,
    Click,
    HemorrhageSegmenter,
    hyperdense_gate,
    intracranial_mask,
    measure,
    postprocess_mask,
    to_input_grid,
)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    c = synthesize_case(3, seed=0, spacing_mm=(1.2, 1.2, 4.0), ich_type="intraparenchymal", head_scale=0.6)
    nib.save(nib.Nifti1Image(c.image_hu, c.affine), root / "scan.nii.gz")
    nib.save(nib.Nifti1Image(c.mask, c.affine), root / "mask.nii.gz")
    return c, root


def test_mapping_back_to_the_input_grid_preserves_the_lesion(case):
    c, root = case
    cfg = Preprocessing(target_spacing_mm=(2.0, 2.0, 2.0))
    item = Compose(_resampling_steps(cfg, ["image", "label"]))(
        {"image": str(root / "scan.nii.gz"), "label": str(root / "mask.nii.gz")}
    )
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
    atomic_save(
        {
            "model_state_dict": build_sam3d(config).state_dict(),
            "model_config": config.to_dict(),
            "preprocessing": {"target_spacing_mm": (3.0, 3.0, 3.0)},
        },
        tmp_path / "model.pth",
    )
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
    post = saved["postprocessing"]
    assert post["intracranial_mask"]["applied"] and post["min_component"]["min_component_ml"] > 0
    assert post["volume_after_ml"] == result.measurements.total_volume_ml
    assert saved["measurements"]["total_volume_ml"] == result.measurements.total_volume_ml
    assert result.files["overlays"] and all(p.endswith(".png") for p in result.files["overlays"])


@pytest.fixture(scope="module")
def small_head():
    """A miniature subdural case at coarse spacing: (67, 80, 20) voxels, the bleed against the inner table."""
    c = synthesize_case(1, seed=0, spacing_mm=(1.5, 1.5, 4.0), ich_type="subdural", head_scale=0.5)
    return c, Volume(c.image_hu.astype(np.float32), c.affine, c.spacing_mm, "", True)


def test_intracranial_mask_keeps_the_brain_and_drops_scalp_skull_and_air(small_head):
    c, volume = small_head
    hu = volume.array
    inside = intracranial_mask(volume)
    head = hu > -500
    scalp = head & ~ndimage.binary_erosion(head, np.ones((3, 3, 1), bool), iterations=2)  # outer 3 mm, in-plane
    assert inside[tuple(np.array(hu.shape) // 2)]  # the middle of the brain
    assert not (inside & (hu >= 300)).any() and not (inside & ~head).any() and not (inside & scalp).any()
    assert np.all((hu[inside] > -50) & (hu[inside] < 150))  # CSF, brain and blood only
    assert 0.5 < inside.sum() / head.sum() < 0.8  # scalp and skull make up a good part of the head
    assert (inside & (c.mask > 0)).sum() == (c.mask > 0).sum()  # the subdural crescent survives


def test_postprocessing_clears_outside_the_skull_unless_clicked_and_skips_skull_free_scans(small_head):
    c, volume = small_head
    in_scalp = np.zeros(c.mask.shape, bool)
    in_scalp[0:6, 35:45, 8:12] = True  # the head's left edge: scalp, skull and air
    mask = (c.mask > 0) | in_scalp
    cleared, record = postprocess_mask(mask, volume, min_component_ml=0, min_component_hu=None)
    assert not (cleared.astype(bool) & in_scalp).any() and cleared[c.mask > 0].all()
    step = record["intracranial_mask"]
    assert step["applied"] and step["removed_ml"] == pytest.approx(volume_ml(in_scalp, c.spacing_mm), abs=0.01)
    clicked, record = postprocess_mask(
        mask, volume, keep_points=[(2, 40, 10)], min_component_ml=0, min_component_hu=None
    )
    assert clicked[in_scalp].all() and record["clicked_components_kept"] == 1

    stripped = Volume(np.where(volume.array >= 300, 0.0, volume.array), volume.affine, volume.spacing_mm, "", True)
    untouched, record = postprocess_mask(mask, stripped, min_component_ml=0, min_component_hu=None)
    assert not record["intracranial_mask"]["applied"] and np.array_equal(untouched.astype(bool), mask)


def test_component_filter_drops_small_blobs_by_volume_in_ml():
    spacing = (1.5, 1.5, 4.0)  # 9 mm^3 per voxel
    volume = Volume(np.zeros((40, 40, 10), np.float32), np.diag([*spacing, 1.0]), spacing, "", True)
    mask = np.zeros(volume.array.shape, bool)
    mask[2:4, 2:4, 2:4] = True  # 8 voxels = 0.072 mL
    mask[20:30, 20:30, 4:7] = True  # 300 voxels = 2.7 mL
    kept, record = postprocess_mask(
        mask, volume, restrict_intracranial=False, min_component_ml=0.1, min_component_hu=None
    )
    assert not kept[2:4, 2:4, 2:4].any() and kept[20:30, 20:30, 4:7].all()
    assert record["min_component"] == {"min_component_ml": 0.1, "components_removed": 1, "removed_ml": 0.07}
    assert record["volume_after_ml"] == 2.7 and "intracranial_mask" not in record
    assert postprocess_mask(mask, volume, restrict_intracranial=False, min_component_ml=0.05, min_component_hu=None)[0][
        2, 2, 2
    ]
    assert (
        postprocess_mask(mask, volume, restrict_intracranial=False, min_component_ml=0, min_component_hu=None)[0].sum()
        == 308
    )
    clicked, _ = postprocess_mask(
        mask, volume, keep_points=[(2.2, 3.4, 2.9)], restrict_intracranial=False, min_component_ml=0.1
    )
    assert clicked[2:4, 2:4, 2:4].all()


def test_hyperdense_gate_drops_brain_and_csf_components_and_trims_a_coarse_mask_to_the_blood(small_head):
    """What whole-head windows add: a coarse (dilated) mask around the subdural, and a rim component
    over CSF and cortex on the other side. The gate keeps the blood and clears the rest, unless clicked."""
    c, volume = small_head
    blood = c.mask > 0
    coarse = ndimage.binary_dilation(blood, np.ones((3, 3, 1), bool), iterations=2) & intracranial_mask(volume)
    rim = np.zeros_like(blood)
    x0 = blood.shape[0] - 1 - int(np.argwhere(blood)[:, 0].mean())  # the mirror side of the bleed
    rim[x0 - 2 : x0 + 2, 30:50, 8:12] = True
    rim &= intracranial_mask(volume) & ~coarse
    assert rim.sum() > 100 and np.median(volume.array[rim]) < MIN_COMPONENT_HU
    gated, record = postprocess_mask(coarse | rim, volume, min_component_ml=0)
    gated = gated.astype(bool)
    assert not (gated & rim).any() and record["hyperdense"]["components_removed"] == 1
    dice = 2 * (gated & blood).sum() / (gated.sum() + blood.sum())
    assert coarse.sum() > 1.4 * blood.sum() and dice > 0.9 and abs(gated.sum() / blood.sum() - 1) < 0.1
    point = np.argwhere(rim)[0]
    clicked, _ = postprocess_mask(coarse | rim, volume, keep_points=[point], min_component_ml=0)
    assert clicked[rim].all()
    off, record = postprocess_mask(coarse | rim, volume, min_component_ml=0, min_component_hu=None)
    assert off[rim].all() and "hyperdense" not in record


def test_components_denser_than_acute_blood_are_dropped(small_head):
    """A calcification (200 HU) and the partial-volume rim of bone are hyperdense but no acute blood:
    a component whose median is above MAX_BLOOD_HU goes; the subdural against the table stays."""
    c, volume = small_head
    blood = c.mask > 0
    hu = volume.array.copy()
    centre = np.argwhere(intracranial_mask(volume)).mean(0).astype(int)
    ball = np.zeros_like(blood)
    ball[tuple(slice(p - 3, p + 3) for p in centre[:2]) + (slice(centre[2] - 1, centre[2] + 1),)] = True
    hu[ball] = 200.0
    calcified = Volume(hu, volume.affine, volume.spacing_mm, "calcified")
    gated, record = postprocess_mask(blood | ball, calcified, min_component_ml=0)
    assert not gated[ball].any() and record["hyperdense"]["too_dense_components_removed"] == 1
    assert gated[blood].mean() > 0.9
    clicked, _ = postprocess_mask(blood | ball, calcified, keep_points=[np.argwhere(ball)[0]], min_component_ml=0)
    assert clicked[ball].all()


def test_a_blood_dense_core_that_fits_onto_bone_partial_volume_is_dropped(small_head):
    """A core at 90 HU passes the median rule, but the gate's fit grows it onto the 220 HU beside it (a
    thick slice through the vertex's cap): fitted, its median is above MAX_FITTED_HU, so it goes. The
    same core in brain is kept."""
    c, volume = small_head
    x, y, z = np.argwhere(intracranial_mask(volume)).mean(0).astype(int)
    core = np.zeros(c.mask.shape, bool)
    core[x : x + 2, y : y + 2, z] = True
    hu = volume.array.copy()
    hu[x - 3 : x + 6, y - 3 : y + 6, z - 1 : z + 2] = 35.0  # brain around it
    hu[core] = 90.0
    in_brain = Volume(hu.copy(), volume.affine, volume.spacing_mm, "in brain")
    kept, record = postprocess_mask(core, in_brain, min_component_ml=0)
    assert kept[core].all() and record["hyperdense"]["too_dense_after_fit_removed"] == 0
    hu[x + 2 : x + 4, y - 2 : y + 4, z - 1 : z + 2] = 220.0  # partial-volume bone, within the fit's reach
    on_bone = Volume(hu, volume.affine, volume.spacing_mm, "on bone")
    gated, record = postprocess_mask(core, on_bone, min_component_ml=0)
    assert not gated.any() and record["hyperdense"]["too_dense_after_fit_removed"] == 1
    assert record["hyperdense"]["too_dense_components_removed"] == 0  # the core itself passed


def test_hyperdense_gate_in_component_boxes_equals_the_whole_scan_computation(small_head):
    """The gate works in each component's box (so its cost is linear in the scan, not components x
    scan); it must give what the same rule computed over the whole scan gives, for blobs anywhere,
    including against the scan's edges where the box is clipped."""
    c, volume = small_head
    rng = np.random.default_rng(3)
    mask = np.zeros(volume.array.shape, bool)
    for centre in rng.integers(0, volume.array.shape, size=(25, 3)):
        mask[tuple(slice(max(0, p - 2), p + 2) for p in centre)] = True
    mask |= ndimage.binary_dilation(c.mask > 0, np.ones((3, 3, 1), bool))
    mask[0:3, 0:4, 0:2] = True  # a corner: the box is clipped by the scan
    gated, record = hyperdense_gate(mask, volume, np.zeros_like(mask), MIN_COMPONENT_HU, MIN_VOXEL_HU)

    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    hu = volume.array
    sigma = [0.5 / s if axis != 2 else 0.0 for axis, s in enumerate(volume.spacing_mm)]
    blurred = ndimage.gaussian_filter(hu, sigma)
    radius = [int(3.0 // s) for s in volume.spacing_mm]
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    shell = sum((g * s) ** 2 for g, s in zip(grid, volume.spacing_mm)) <= 9.0
    growth = shell if shell.shape[2] > 1 else np.concatenate([shell] * 3, axis=2)  # at least a slice
    expected = np.zeros_like(mask)
    kept = 0
    for label in range(1, count + 1):
        component = labels == label
        if np.mean(hu[component] >= MIN_COMPONENT_HU) < 0.25 or np.median(hu[component]) > MAX_BLOOD_HU:
            continue
        kept += 1
        around = ndimage.binary_dilation(component, shell) & ~mask & (hu > -100) & (hu < 300)
        background = np.median(hu[around]) if around.any() else MIN_VOXEL_HU
        edge = max(MIN_VOXEL_HU, (np.median(hu[component & (hu >= MIN_COMPONENT_HU)]) + background) / 2)
        blood = (blurred >= edge) & (hu > -100) & (hu < 300)
        reach = ndimage.binary_dilation(component, growth) & blood
        expected |= ndimage.binary_propagation(component & blood, mask=reach)
    assert count > 10 and 1 <= kept < count and record["components_removed"] == count - kept
    assert np.array_equal(gated, expected)


def test_cli_postprocessing_flags_reach_the_segmenter(case, tmp_path, monkeypatch):
    _, root = case
    seen = {}

    class Built(Exception):
        """The segmenter's options are all this test needs: stop before loading a model."""

    def recorder(checkpoint, device, model_type, overlap, **options):
        seen.clear()
        seen.update(options)
        raise Built

    monkeypatch.setattr(predict_cli, "HemorrhageSegmenter", recorder)
    (tmp_path / "m.pth").write_bytes(b"checkpoint")  # the CLI checks that it exists; the recorder never reads it
    base = [
        "--checkpoint",
        str(tmp_path / "m.pth"),
        "--input",
        str(root / "scan.nii.gz"),
        "--output_dir",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    with pytest.raises(Built):
        predict_cli.main(base)
    assert seen["restrict_intracranial"] is True and seen["min_component_ml"] > 0
    with pytest.raises(Built):
        predict_cli.main(
            base
            + [
                "--no-intracranial_mask",
                "--min_component_ml",
                "0",
                "--bone_hu",
                "250",
                "--intracranial_margin_mm",
                "0.5",
                "--skull_base_margin_mm",
                "0",
            ]
        )
    assert seen == {
        "restrict_intracranial": False,
        "min_component_ml": 0.0,
        "bone_hu": 250.0,
        "margin_mm": 0.5,
        "skull_base_margin_mm": 0.0,
        "min_component_hu": MIN_COMPONENT_HU,
        "min_voxel_hu": MIN_VOXEL_HU,
    }
    with pytest.raises(Built):
        predict_cli.main(base + ["--no-hyperdense_only"])
    assert seen["min_component_hu"] is None and seen["min_voxel_hu"] is None
    with pytest.raises(ConfigError, match="--min_component_ml -1: expected >= 0"):
        predict_cli.main(base + ["--min_component_ml", "-1"])
    with pytest.raises(ConfigError, match="--skull_base_margin_mm -2: expected >= 0"):
        predict_cli.main(base + ["--skull_base_margin_mm", "-2"])


@pytest.mark.parametrize("gap_mm, sealed", [(5.0, True), (12.0, False)])
def test_skull_gaps_narrower_than_twice_the_seal_are_bridged_on_thin_slices(gap_mm, sealed):
    """0.45 mm voxels: the seal runs on a coarser grid, and must still close a 5 mm suture without a leak."""
    spacing = (0.45, 0.45, 5.0)
    x, y = np.meshgrid(*(np.arange(220) * 0.45 - 49.5,) * 2, indexing="ij")
    radius = np.hypot(x, y)
    slice_hu = np.where(radius < 40, 35.0, -1000.0)
    slice_hu[(radius >= 40) & (radius < 44) & (np.abs(y) >= gap_mm / 2)] = 1200.0  # the gap opens at +x
    slice_hu[(radius >= 44) & (radius < 47)] = 20.0  # scalp, so the gap opens onto soft tissue
    hu = np.repeat(slice_hu[:, :, None], 3, axis=2).astype(np.float32)
    inside = intracranial_mask(Volume(hu, np.diag([*spacing, 1.0]), spacing, "", True))
    assert inside[110, 110, 1] == sealed
    if sealed:
        brain = radius < 39  # clear of the 0.5 mm margin
        assert inside[..., 1][brain].mean() > 0.99 and not inside[..., 1][radius >= 44].any()
