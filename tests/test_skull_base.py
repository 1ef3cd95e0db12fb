"""The skull-base rule of post-processing: bone deep below the head's surface is the skull base, and
predictions next to it are cleared, while bleeds against the convexity's inner table are kept."""

import numpy as np
import pytest
from scipy import ndimage

from sam3d.data.io import Volume
from sam3d.data.template_phantom import MIMIC_CODES, synthesize_template_case
from sam3d.predict import SKULL_BASE_MARGIN_MM, postprocess_mask, skull_base_bone
from sam3d.predict.postprocessing import SKULL_BASE_DEPTH_MM


def analytic_head(spacing, bottom_mm=-45.0, top_mm=85.0):
    """A ball head (radius 80 mm: 5 mm scalp, 7 mm skull, brain at 32 HU) with a 'skull base': a bone
    ridge 30 x 10 x 8 mm centred 20 mm below the ball's centre, over 50 mm below the scalp's surface.
    The grid starts ``bottom_mm`` below the centre, as a head CT starts at the foramen magnum, so the
    head fills its first slice, and ends at ``top_mm``."""
    axes = [np.arange(-85.0, 85.0, s) for s in spacing[:2]] + [np.arange(bottom_mm, top_mm, spacing[2])]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    hu = np.full(r.shape, -1000.0, np.float32)
    hu[r < 80.0] = 20.0  # scalp
    hu[r < 75.0] = 1200.0  # skull
    hu[r < 68.0] = 32.0  # brain
    ridge = (np.abs(x) < 15.0) & (np.abs(y) < 5.0) & (np.abs(z + 20.0) < 4.0)
    hu[ridge] = 1100.0
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [a[0] for a in axes]
    return Volume(hu, affine, tuple(spacing), "", True), (x, y, z, r), ridge


@pytest.mark.parametrize("spacing", [(0.9, 0.9, 5.0), (1.0, 1.0, 1.0)])
def test_deep_bone_is_the_skull_base_and_the_convexity_is_not(spacing):
    volume, (x, y, z, r), ridge = analytic_head(spacing)
    deep = skull_base_bone(volume)
    assert deep is not None
    assert deep[ridge].mean() > 0.99  # the ridge, though the grid starts 25 mm below it
    assert not deep[r >= 68.0].any()  # the skull: 5-12 mm below the surface

    # A bleed against the inner table at the vertex and one against the ridge's upper face.
    convexity = (r < 68.0) & (r >= 64.0) & (z > 40.0)
    at_ridge = (np.abs(x) < 12.0) & (np.abs(y) < 4.0) & (z >= -16.0) & (z < -16.0 + 2.0 * SKULL_BASE_MARGIN_MM)
    mask = convexity | at_ridge
    kept, record = postprocess_mask(mask, volume, min_component_ml=0, min_component_hu=None)
    kept = kept.astype(bool)
    assert kept[convexity].all()
    voxel_mm = np.array(spacing)
    gap = ndimage.distance_transform_edt(~ridge, sampling=voxel_mm)  # mm to the ridge
    assert not kept[at_ridge & (gap <= SKULL_BASE_MARGIN_MM - voxel_mm.max())].any()
    assert kept[at_ridge & (gap > SKULL_BASE_MARGIN_MM + voxel_mm.max())].all()
    step = record["skull_base"]
    assert step["applied"] and step["removed_ml"] == pytest.approx(
        float((mask & ~kept).sum()) * volume.voxel_volume_ml, abs=0.01
    )

    # Off, and a click on the component: both keep it.
    off, record = postprocess_mask(mask, volume, min_component_ml=0, min_component_hu=None, skull_base_margin_mm=0)
    assert off.astype(bool)[mask].all() and "skull_base" not in record
    point = np.argwhere(at_ridge)[0]
    clicked, _ = postprocess_mask(mask, volume, keep_points=[point], min_component_ml=0, min_component_hu=None)
    assert clicked.astype(bool)[at_ridge].all()


@pytest.mark.parametrize("flip", [False, True])
def test_a_scan_that_cuts_the_vertex_has_no_deep_skull_cap(flip):
    """Cut 70 mm above the centre, the cap is a bone disc 27 mm across under 39 mm of scalp in plane:
    its middle is deep in that slice, but the scan's superior end is the head's surface (either way
    the slices are stored)."""
    volume, (x, y, z, r), ridge = analytic_head((1.0, 1.0, 2.0), top_mm=71.0)
    if flip:  # slices stored head to foot: the superior end is the first slice
        affine = volume.affine @ np.array(
            [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, volume.array.shape[2] - 1], [0, 0, 0, 1]]
        )
        volume = Volume(volume.array[:, :, ::-1].copy(), affine, volume.spacing_mm, "", True)
        ridge = ridge[:, :, ::-1]
    deep = skull_base_bone(volume)
    assert deep is not None and deep[ridge].mean() > 0.99
    cap = np.argwhere(deep)[:, 2]
    top = 0 if flip else volume.array.shape[2] - 1
    assert not np.any(np.abs(cap - top) < 8)  # nothing in the 16 mm below the cut


def test_small_dense_bodies_deep_in_the_head_are_not_skull_base():
    """A calcified pineal or plexus is as deep as the clivus but a fraction of a mL: blood around it stays."""
    volume, (x, y, z, r), _ = analytic_head((1.0, 1.0, 2.0))
    pineal = np.sqrt(x**2 + (y + 20.0) ** 2 + (z - 10.0) ** 2) < 3.0
    volume.array[pineal] = 400.0
    deep = skull_base_bone(volume)
    assert deep is not None and not deep[pineal].any()


def test_a_scan_without_bone_has_no_skull_base_and_the_record_says_so():
    volume, (x, y, z, r), _ = analytic_head((1.0, 1.0, 2.0))
    brain_only = np.where(r < 68.0, volume.array, 0.0).astype(np.float32)
    stripped = Volume(brain_only, volume.affine, volume.spacing_mm, "", True)
    stripped.array[stripped.array >= 300] = 40.0
    assert skull_base_bone(stripped) is None
    mask = (np.abs(x) < 5) & (np.abs(y) < 5) & (np.abs(z) < 5)
    kept, record = postprocess_mask(mask, stripped, min_component_ml=0, min_component_hu=None)
    assert kept.astype(bool)[mask].all()
    assert record["skull_base"] == {
        "depth_mm": SKULL_BASE_DEPTH_MM,
        "margin_mm": SKULL_BASE_MARGIN_MM,
        "applied": False,
        "reason": "no bone in the scan",
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind, index", [("subdural", 4), ("subdural", 9), ("epidural", 4)])
def test_template_phantoms_skull_base_found_and_convexity_bleeds_kept(kind, index):
    """On the average real head at 5 mm slices: the skull-base region is next to the deep bone found,
    and an extra-axial bleed over a convexity keeps its volume within 10% (the issue's figure)."""
    case, mimics = synthesize_template_case(index, 5, (0.9, 0.9, 5.0), kind, variant="full")
    volume = Volume(case.image_hu.astype(np.float32), case.affine, case.spacing_mm, "", True)
    deep = skull_base_bone(volume)
    assert deep is not None and float(deep.sum()) * volume.voxel_volume_ml > 20.0
    region = mimics == MIMIC_CODES["skull base"]
    near = ndimage.binary_dilation(deep, np.ones((3, 3, 1), bool), iterations=4)
    assert (region & near).sum() > 0.05 * region.sum()  # the petrous and sellar boxes border it
    truth = case.mask > 0
    with_rule, _ = postprocess_mask(truth, volume, min_component_ml=0, min_component_hu=None)
    without, _ = postprocess_mask(truth, volume, min_component_ml=0, min_component_hu=None, skull_base_margin_mm=0)
    assert with_rule.sum() >= 0.9 * without.sum() > 0
