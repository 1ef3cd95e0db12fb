"""ABC/2 (Kothari) against analytic truth: ellipsoids at any orientation on tilted grids, cuboids,
irregular shapes; the same numbers whatever the storage order."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from sam3d.predict.abc2 import FULL_SLICE_SHARE, HALF_SLICE_SHARE, abc2

SEMI_AXES_MM = np.array([22.0, 14.0, 11.0])


def grid_affine(pixel_mm: float, slice_mm: float, tilt_deg: float) -> np.ndarray:
    """RAS grid: i right, j anterior, k the slice step, sheared by a gantry tilt about the x axis."""
    affine = np.diag([pixel_mm, pixel_mm, slice_mm, 1.0])
    affine[1, 2] = slice_mm * np.tan(np.radians(tilt_deg))  # the table moves, the plane stays axial
    return affine


def grid_around(affine: np.ndarray, centre: np.ndarray, reach_mm) -> tuple[np.ndarray, np.ndarray]:
    """Voxel indices (N x 3) of the grid covering a box of half-sides ``reach_mm`` (world x, y, z)
    about ``centre``, and their world positions relative to ``centre``."""
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * reach_mm + centre
    index_corners = (corners - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    low, high = np.floor(index_corners.min(0)).astype(int), np.ceil(index_corners.max(0)).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(low, high)], indexing="ij"), -1).reshape(-1, 3)
    return grid, grid @ affine[:3, :3].T + affine[:3, 3] - centre


def inside_ellipsoid(affine: np.ndarray, centre: np.ndarray, rotation: np.ndarray, semi: np.ndarray):
    """Voxel indices (N x 3) of the grid whose centres lie in the ellipsoid, and its quadric matrix."""
    quadric = rotation @ np.diag(1.0 / semi**2) @ rotation.T
    # The ellipsoid's extent along each world axis: sqrt of the diagonal of the inverse quadric.
    grid, offsets = grid_around(affine, centre, np.sqrt(np.diag(np.linalg.inv(quadric))) + 1.0)
    return grid[np.einsum("ni,ij,nj->n", offsets, quadric, offsets) <= 1.0], quadric


def kothari_expected(affine: np.ndarray, centre: np.ndarray, quadric: np.ndarray, slices: np.ndarray):
    """(low, high) of Kothari's ABC/2 (mL) of an ellipsoid, from its sections by the grid's slice planes.

    Parallel sections of an ellipsoid are similar ellipses scaled by sqrt(1 - z^2/h^2) (z: the plane's
    offset from the centre along the normal, h: the half-height); a slice whose area share lies
    within 3% of a weight threshold may count either way on a pixel grid, hence the range."""
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    normal /= np.linalg.norm(normal)
    half_height = np.sqrt(normal @ np.linalg.inv(quadric) @ normal)
    offsets = (affine[:3, 2] * slices[:, None] + affine[:3, 3] - centre) @ normal
    area = np.clip(1.0 - (offsets / half_height) ** 2, 0.0, None)
    share = area / area.max()
    plane = np.linalg.qr(np.stack([affine[:3, 0], affine[:3, 1]], 1))[0]
    semi_axes = 1.0 / np.sqrt(np.linalg.eigvalsh(plane.T @ quadric @ plane))
    a_mm, b_mm = 2.0 * semi_axes.max() * np.sqrt(area.max()), 2.0 * semi_axes.min() * np.sqrt(area.max())
    thickness = abs(np.linalg.det(affine[:3, :3])) / np.linalg.norm(np.cross(affine[:3, 0], affine[:3, 1]))

    def c_mm(margin: float) -> float:
        weights = np.where(
            share >= FULL_SLICE_SHARE + margin, 1.0, np.where(share >= HALF_SLICE_SHARE + margin, 0.5, 0)
        )
        return float(weights.sum()) * thickness

    return (a_mm * b_mm * c_mm(0.03) / 2000.0, a_mm * b_mm * c_mm(-0.03) / 2000.0)


@pytest.mark.parametrize("slice_mm, tilt_deg", [(1.0, 0.0), (2.5, 15.0), (5.0, 0.0), (5.0, 25.0)])
@pytest.mark.parametrize("orientation", range(3))
def test_ellipsoid_abc2_matches_the_analytic_sections(slice_mm, tilt_deg, orientation):
    rng = np.random.default_rng(orientation)
    rotation = Rotation.random(random_state=rng).as_matrix() if orientation else np.eye(3)
    affine = grid_affine(0.45, slice_mm, tilt_deg)
    centre = rng.uniform(-2.0, 2.0, 3)
    voxels, quadric = inside_ellipsoid(affine, centre, rotation, SEMI_AXES_MM)
    measured = abc2(voxels, affine)
    low, high = kothari_expected(affine, centre, quadric, np.arange(voxels[:, 2].min() - 2, voxels[:, 2].max() + 3))
    assert 0.95 * low <= measured.volume_ml <= 1.05 * high, (measured, low, high)
    # The planimetric volume of the same voxels is the ellipsoid's (the reference ABC/2 estimates).
    planimetric = len(voxels) * abs(np.linalg.det(affine[:3, :3])) / 1000.0
    assert planimetric == pytest.approx(4.0 / 3.0 * np.pi * np.prod(SEMI_AXES_MM) / 1000.0, rel=0.03)


def test_kothari_weighting_makes_an_ellipsoid_two_thirds():
    """Thin slices: the weighted C is 1.37 semi-axes instead of 2, so ABC/2 is 0.65 of the ellipsoid
    (the weighting was made for the irregular bleeds whose A x B over-states each slice). On the
    pixel grid A and B are edge to edge (a pixel longer) and C holds its edge slices: 7% over."""
    affine = grid_affine(0.5, 0.5, 0.0)
    voxels, _ = inside_ellipsoid(affine, np.zeros(3), np.eye(3), SEMI_AXES_MM)
    ratio = abc2(voxels, affine).volume_ml / (4.0 / 3.0 * np.pi * np.prod(SEMI_AXES_MM) / 1000.0)
    assert ratio == pytest.approx((1.0 + 0.5 * (np.sqrt(0.75) - 0.5) * 2) * 3.0 / (2.0 * np.pi), rel=0.07)


def test_rotated_cuboid_abc2_is_its_volume():
    """A rectangle's longest diameter is its diagonal d and its width across it 2wl/d, so A x B = 2wl:
    ABC/2 of a cuboid (every slice full) is its volume."""
    affine = grid_affine(0.4, 3.0, 0.0)
    rotation = Rotation.from_euler("z", 30, degrees=True).as_matrix()
    grid, world = grid_around(affine, np.zeros(3), 20.0)
    local = world @ rotation
    voxels = grid[np.all(np.abs(local[:, :2]) <= [15.0, 6.0], axis=1) & (np.abs(local[:, 2]) <= 10.0)]
    measured = abc2(voxels, affine)
    assert measured.c_mm == pytest.approx(7 * 3.0)  # slice centres at -9 .. 9 mm
    assert measured.volume_ml == pytest.approx(30.0 * 12.0 * 21.0 / 1000.0, rel=0.04)


def test_irregular_bleed_is_over_estimated():
    """An L of two 6 mm bars through five slices: A is the diagonal between the bars' ends (42.4 mm),
    B the hull's width across it (25.5 mm), so ABC/2 is 1.67 times the planimetric volume (the known
    over-estimate on irregular shapes)."""
    affine = grid_affine(0.5, 5.0, 0.0)
    grid, world = grid_around(affine, np.array([15.0, 15.0, 0.0]), np.array([16.0, 16.0, 11.0]))
    x, y, z = world[:, 0] + 15.0, world[:, 1] + 15.0, world[:, 2]
    inside = (x >= 0) & (y >= 0) & (x < 30) & (y < 30) & ((x < 6) | (y < 6)) & (np.abs(z) <= 10.0)
    voxels = grid[inside]
    planimetric = len(voxels) * 0.5 * 0.5 * 5.0 / 1000.0
    assert planimetric == pytest.approx((30 * 6 + 24 * 6) * 25.0 / 1000.0, rel=0.05)
    expected = np.hypot(30.0, 30.0) * (36.0 / np.sqrt(2.0)) * 25.0 / 2000.0
    assert abc2(voxels, affine).volume_ml == pytest.approx(expected, rel=0.05)
    assert expected > 1.6 * planimetric


def test_storage_order_and_flips_do_not_change_abc2():
    affine = grid_affine(0.5, 5.0, 20.0)
    rotation = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()
    voxels, _ = inside_ellipsoid(affine, np.zeros(3), rotation, SEMI_AXES_MM)
    voxels -= voxels.min(0)
    reference = abc2(voxels, affine)
    # The same voxels stored as (k, i, j) with i flipped: the index -> world map changes with them.
    extent = voxels.max(0)
    stored = np.stack([voxels[:, 2], extent[0] - voxels[:, 0], voxels[:, 1]], 1)
    to_original = np.zeros((4, 4))
    to_original[0, 1], to_original[0, 3] = -1.0, extent[0]
    to_original[1, 2] = 1.0
    to_original[2, 0] = 1.0
    to_original[3, 3] = 1.0
    moved = abc2(stored, affine @ to_original)
    assert (moved.a_mm, moved.b_mm, moved.c_mm) == pytest.approx((reference.a_mm, reference.b_mm, reference.c_mm))
