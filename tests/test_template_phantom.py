"""Phantoms on the average real head (sam3d.data.template_phantom): truth, mimics, variants, the
dataset writer, and the pipeline's own reading of them (the skull closes, the bleed is located)."""

import json

import numpy as np
import pytest
from scipy import ndimage

from sam3d.data.io import Volume, load_volume
from sam3d.data.synthetic import make_synthetic_ich
from sam3d.data.template_phantom import MIMIC_CODES, TEMPLATE_KINDS, cormack_to_hu, synthesize_template_case
from sam3d.predict.measurement import measure
from sam3d.predict.postprocessing import intracranial_mask

SPACING = (0.9, 0.9, 5.0)


def volume_of(case) -> Volume:
    return Volume(case.image_hu.astype(np.float32), case.affine, case.spacing_mm, case.case_id)


def test_cormack_units_convert_as_the_templates_readme_says():
    assert cormack_to_hu(np.array([0.0, 1024.0, 900.0, 3100.0, 4000.0])) == pytest.approx(
        [-1024.0, (1024 + 9000) / 11 - 1024, -124.0, (3100 + 9000) / 11 - 1024, (4000 - 900) / 2 - 1024], abs=1e-3
    )


def test_the_same_arguments_give_the_same_scan_and_the_twin_differs_only_at_the_bleed():
    a, _ = synthesize_template_case(1, 3, SPACING, "intraparenchymal", variant="full")
    b, _ = synthesize_template_case(1, 3, SPACING, "intraparenchymal", variant="full")
    twin, _ = synthesize_template_case(1, 3, SPACING, "none", variant="full")
    assert np.array_equal(a.image_hu, b.image_hu) and np.array_equal(a.mask, b.mask)
    near = ndimage.binary_dilation(a.mask > 0, iterations=6)  # the bleed, its oedema rim and the blur's reach
    assert np.array_equal(a.image_hu[~near], twin.image_hu[~near]) and twin.mask.sum() == 0
    assert a.metadata["volume_ml"] > 0.5 and twin.metadata["ich"] == 0


@pytest.mark.parametrize("kind", TEMPLATE_KINDS)
def test_each_kind_is_blood_inside_a_closed_skull_and_located_as_painted(kind):
    case, mimics = synthesize_template_case(4, 0, SPACING, kind, variant="full")
    volume = volume_of(case)
    mask = case.mask > 0
    meta = case.metadata
    assert meta["ich_type"] == kind and meta["volume_ml"] == pytest.approx(
        mask.sum() * np.prod(SPACING) / 1000, abs=0.06
    )
    assert 48.0 <= meta["blood_hu"] <= 85.0
    # Acute blood after noise, blur and the slab average of the 5 mm slices (a thin subdural's voxels all
    # touch the table, whose blur lifts them by up to a few tens of HU): blood, not brain and not bone.
    assert 45.0 <= float(np.median(case.image_hu[mask])) <= 120.0
    # The pipeline's own intracranial space (bone >= 300 HU rings) holds a whole head and the bleed.
    cavity = intracranial_mask(volume)
    assert cavity.sum() * volume.voxel_volume_ml > 1000.0
    assert (mask & cavity).sum() >= 0.8 * mask.sum()
    located = measure(case.mask, volume)
    expected = {"subarachnoid": ("subarachnoid", "intraparenchymal", "subdural")}.get(kind, (kind,))
    assert located.location in expected, (kind, [(c.location, c.evidence) for c in located.components[:2]])
    assert meta["side"] in ("left", "right", "bilateral") and meta["centroid_mm"] is not None
    if meta["side"] != "bilateral":
        assert located.side == meta["side"]
    assert not (mimics[mask] == MIMIC_CODES["calcification"]).any()


def test_mimics_are_painted_at_their_densities():
    found = {name: [] for name in MIMIC_CODES}
    for index in range(4):
        case, mimics = synthesize_template_case(index, 2, SPACING, "none", variant="full")
        for name, code in MIMIC_CODES.items():
            if (mimics == code).any():
                found[name].append(float(np.median(case.image_hu[mimics == code])))
        assert {"falx", "tentorium"} <= set(case.metadata["mimics"])
    assert all(found.values()), found
    assert all(30.0 <= hu <= 75.0 for hu in found["dura"] + found["sinus"]), found
    assert max(found["calcification"]) > 100.0


def test_skull_stripped_and_brain_window_variants():
    stripped, _ = synthesize_template_case(0, 0, SPACING, "subdural", variant="skull_stripped")
    windowed, _ = synthesize_template_case(0, 0, SPACING, "subdural", variant="brain_window")
    for case in (stripped, windowed):
        assert case.image_hu.min() >= 0 and case.image_hu.max() <= 80
    assert (stripped.image_hu == 0).mean() > (windowed.image_hu == 0).mean()
    assert np.array_equal(stripped.mask, windowed.mask) and stripped.metadata["variant"] == "skull_stripped"


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="ich_type must be one of"):
        synthesize_template_case(0, 0, SPACING, "extradural")
    with pytest.raises(ValueError, match="variant must be one of"):
        synthesize_template_case(0, 0, SPACING, variant="stripped")
    with pytest.raises(ValueError, match="head_scale must be 1"):
        make_synthetic_ich("unused", num_cases=4, anatomy="template", head_scale=0.5)


def test_dataset_writer_with_template_anatomy(tmp_path):
    paths = make_synthetic_ich(
        tmp_path, num_cases=4, seed=5, spacing_mm=(1.8, 1.8, 5.0), anatomy="template", progress=False
    )
    cases = json.loads(open(paths["cases_json"]).read())
    assert [c["anatomy"] for c in cases] == ["template"] * 4
    for c in cases:
        mimics = load_volume(tmp_path / c["mimics_path"])
        assert mimics.array.shape == load_volume(tmp_path / c["path"]).array.shape
        assert c["report"].startswith("FINDINGS:")


def test_a_skull_stripped_scan_is_recognised_and_its_brain_is_the_intracranial_space():
    from sam3d.predict.postprocessing import postprocess_mask, skull_stripped_background

    readings = {}
    for variant in ("full", "skull_stripped", "brain_window"):
        case, _ = synthesize_template_case(3, 0, SPACING, "subdural", variant=variant)
        volume = volume_of(case)
        _, record = postprocess_mask(case.mask, volume)
        readings[variant] = (skull_stripped_background(volume), record["intracranial_mask"], measure(case.mask, volume))
    assert readings["full"][0] is None and readings["full"][1]["from"] == "bone"
    background, step, located = readings["skull_stripped"]
    assert background == 0.0 and step["from"].startswith("skull-stripped scan") and step["applied"]
    # The brain's own extent stands in for the inner table: the collection is still located.
    assert abs(step["intracranial_volume_ml"] - readings["full"][1]["intracranial_volume_ml"]) < 150.0
    assert located.location == "subdural"
    # A brain-windowed head keeps its skull (clipped to the window's top): not taken for a stripped one.
    assert readings["brain_window"][0] is None and not readings["brain_window"][1]["applied"]
