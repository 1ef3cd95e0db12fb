"""Location class of each hemorrhage component against truth: the phantom generator's kind of bleed,
and analytic heads for the kinds it does not render (epidural, subarachnoid)."""

import numpy as np
import pytest

from sam3d.data.io import Volume
from sam3d.data.synthetic import ICH_TYPES, synthesize_case
from sam3d.predict.measurement import measure
from sam3d.predict.postprocessing import MIN_COMPONENT_ML
from sam3d.predict.records import LOCATIONS, LocationEvidence

SPACING_MM = (0.9, 0.9, 5.0)
SKULL_HU, BRAIN_HU, CSF_HU, BLOOD_HU = 1200.0, 30.0, 5.0, 70.0


def phantom_volume(index: int, seed: int, kind: str):
    case = synthesize_case(index, seed, spacing_mm=SPACING_MM, ich_type=kind)
    return case, Volume(case.image_hu.astype(np.float32), case.affine, case.spacing_mm, case.case_id)


@pytest.mark.slow
def test_phantom_components_are_located_as_rendered():
    """Nine phantoms (three of each kind the generator renders): >= 90% of the components of their true
    masks get the kind's class, and the cases located right their region as the generator names it."""
    right, total, regions = 0, 0, []
    for kind in ICH_TYPES:
        for index in range(3):
            case, volume = phantom_volume(index, 11, kind)
            m = measure(case.mask, volume)
            kept = [c for c in m.components if c.volume_ml >= MIN_COMPONENT_ML]
            right += sum(c.location == kind for c in kept)
            total += len(kept)
            if kept[0].location == kind:
                regions.append((case.metadata["region"], kept[0].region))
    assert right / total >= 0.9, (right, total)
    assert all(true == found for true, found in regions), regions


@pytest.mark.parametrize("kind", ICH_TYPES)
def test_one_phantom_of_each_kind(kind):
    case, volume = phantom_volume(2, 0, kind)
    m = measure(case.mask, volume)
    assert m.location == kind and m.components[0].location == kind
    assert m.components[0].evidence.shape in ("crescentic", "lentiform", "globular")
    assert m.abc2_ml == pytest.approx(sum(c.abc2_ml for c in m.components), abs=0.02)


def analytic_head(shape=(160, 180, 36), spacing=(1.0, 1.0, 5.0)):
    """A sphere of brain (radius 70 mm) in a 6 mm skull, with two CSF ventricles beside the midline.
    Returns the HU array, the affine and the world coordinates (x, y, z broadcastable) of the grid."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(shape, spacing)]
    x, y, z = (
        (affine[a, a] * np.arange(n) + affine[a, 3]).reshape([-1 if b == a else 1 for b in range(3)])
        for a, n in enumerate(shape)
    )
    radius = np.sqrt(x**2 + y**2 + z**2)
    hu = np.where(radius <= 76.0, SKULL_HU, -1000.0) * np.ones(shape)
    hu[np.broadcast_to(radius < 70.0, shape)] = BRAIN_HU
    for side in (-1, 1):
        ventricle = ((x - side * 9.0) / 5.0) ** 2 + (y / 25.0) ** 2 + ((z - 8.0) / 12.0) ** 2 <= 1.0
        hu[np.broadcast_to(ventricle, shape)] = CSF_HU
    return hu.astype(np.float32), affine, (x, y, z), radius


def measure_blood(blood: np.ndarray, hu: np.ndarray, affine: np.ndarray):
    hu = hu.copy()
    hu[blood] = BLOOD_HU
    return measure(blood.astype(np.uint8), Volume(hu, affine, tuple(np.diag(affine)[:3]), "analytic"))


def test_analytic_epidural_subdural_subarachnoid_intraventricular_and_parenchymal():
    hu, affine, (x, y, z), radius = analytic_head()
    shape = hu.shape
    towards = (x / np.maximum(radius, 1e-6), y / np.maximum(radius, 1e-6), z / np.maximum(radius, 1e-6))
    right = towards[0]
    # Epidural: a lens against the right inner table, 16 mm thick at its centre, 50 mm across.
    lens_axis = np.sqrt(np.maximum(0.0, 1.0 - ((y / 25.0) ** 2 + (z / 25.0) ** 2)))
    epidural = np.broadcast_to((radius < 70.0) & (x > 70.0 - 16.0 * lens_axis - 0.01) & (x > 0), shape)
    # Subdural: an 8 mm crescent over the left convexity, 110 degrees of arc.
    subdural = np.broadcast_to((radius < 70.0) & (radius >= 62.0) & (-right > 0.57), shape)
    # Subarachnoid: thin blood over the surface and down three sulci, 14 mm deep, 2 mm wide.
    on_surface = (radius < 70.0) & (radius >= 68.5) & (towards[1] > 0.75)
    sulci = (radius < 70.0) & (radius >= 56.0) & (towards[1] > 0.75) & (np.abs(np.sin(x / 6.0)) < 0.17)
    subarachnoid = np.broadcast_to(on_surface | sulci, shape)
    # Intraventricular: blood in the posterior half of both ventricles (one component per side).
    ventricles = hu == CSF_HU
    intraventricular = ventricles & np.broadcast_to(y < -5.0, shape)
    # Intraparenchymal: a 12 mm ball in the right hemisphere, deep to the cortex.
    parenchymal = np.broadcast_to((x - 35.0) ** 2 + (y - 25.0) ** 2 + (z + 10.0) ** 2 <= 144.0, shape)
    # Lobar: a 20 mm ball in the left frontal lobe whose edge reaches the inner table.
    lobar = np.broadcast_to((radius < 70.0) & ((x + 30.0) ** 2 + (y - 46.0) ** 2 + z**2 <= 400.0), shape)
    for blood, kind in (
        (epidural, "epidural"),
        (subdural, "subdural"),
        (subarachnoid, "subarachnoid"),
        (intraventricular, "intraventricular"),
        (parenchymal, "intraparenchymal"),
        (lobar, "intraparenchymal"),
    ):
        m = measure_blood(np.ascontiguousarray(blood), hu, affine)
        found = {c.location for c in m.components if c.volume_ml >= MIN_COMPONENT_ML}
        assert found == {kind}, (kind, [(c.location, c.evidence) for c in m.components])
    # Two bleeds in one scan: each component is located on its own, the largest names the scan.
    m = measure_blood(np.ascontiguousarray(subdural | parenchymal), hu, affine)
    assert [c.location for c in m.components] == ["subdural", "intraparenchymal"]
    assert m.location == "subdural" and m.components[1].side == "right" and m.components[0].side == "left"


def test_without_a_skull_the_location_is_indeterminate_unless_the_scan_is_skull_stripped():
    hu, affine, (x, y, z), radius = analytic_head()
    ball = np.broadcast_to((x - 35.0) ** 2 + y**2 + z**2 <= 144.0, hu.shape).copy()
    # Brain-windowed: the skull clipped to the window's top, no bone to measure from.
    windowed = np.clip(hu, 0.0, 80.0)
    m = measure_blood(ball, windowed, affine)
    assert m.location == "indeterminate" and m.components[0].region == "indeterminate"
    assert m.components[0].evidence.inner_table_distance_mm is None
    # Skull-stripped: all that was not brain set to one value; the brain's extent is the frame.
    stripped = np.where(np.broadcast_to(radius < 70.0, hu.shape), hu, 0.0).astype(np.float32)
    m = measure_blood(ball, stripped, affine)
    assert m.location == "intraparenchymal" and m.components[0].evidence.inner_table_distance_mm > 10.0


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({}, "intraparenchymal"),
        ({"ventricle_overlap_fraction": 0.7}, "intraventricular"),
        ({"inner_table_distance_mm": 0.5, "table_contact_fraction": 0.5, "shape": "crescentic"}, "subdural"),
        ({"inner_table_distance_mm": 0.5, "table_contact_fraction": 0.5, "shape": "lentiform"}, "epidural"),
        ({"inner_table_distance_mm": 0.5, "table_contact_fraction": 0.5, "shape": "globular"}, "indeterminate"),
        ({"inner_table_distance_mm": 0.5, "thickness_mm": 2.0, "depth_mm": 12.0}, "subarachnoid"),
        # A lobar hematoma reaching the cortex touches the table over a small share of its surface.
        ({"inner_table_distance_mm": 0.0, "table_contact_fraction": 0.06}, "intraparenchymal"),
        ({"inner_table_distance_mm": 0.0, "table_contact_fraction": 0.06, "shape": "lentiform"}, "intraparenchymal"),
        ({"inner_table_distance_mm": None, "table_contact_fraction": None}, "indeterminate"),
    ],
)
def test_classification_rules(changes, expected):
    from sam3d.predict.location import classify_location

    evidence = LocationEvidence(
        inner_table_distance_mm=12.0,
        depth_mm=40.0,
        thickness_mm=20.0,
        span_mm=30.0,
        table_contact_fraction=0.0,
        ventricle_overlap_fraction=0.0,
        midline_distance_mm=20.0,
        crosses_midline=False,
        shape="globular",
    )
    for name, value in changes.items():
        setattr(evidence, name, value)
    if evidence.table_contact_fraction is None:
        evidence.ventricle_overlap_fraction = None
    assert classify_location(evidence) == expected and expected in LOCATIONS
