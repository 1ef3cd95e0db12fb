"""Post-processing of a thresholded mask on the scan's grid: intracranial space, hyperdense gate, skull
base, components.

Whole-head windows mark bone, scalp, the CSF/cortex rim along the inner table (where subdurals lie)
and scattered specks as blood, and the decoder's mask is 4 model voxels coarse, which inflates small
bleeds. So voxels outside the intracranial space found in the scan itself are cleared; components
that are not hyperdense are dropped and the rim of the kept ones over brain trimmed (acute blood is
50-100 HU, brain 20-45, CSF 0-15); voxels next to the skull base (petrous ridges, clivus, sella),
whose partial volume and streaks read as blood, are cleared; and connected components smaller than
a minimum volume are dropped. A component holding a positive click is the user's explicit choice
and is left untouched by every step. The returned record says what ran and what it removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TypedDict

import numpy as np
from scipy import ndimage

from ..data.geometry import axial_axis
from ..data.io import Volume

__all__ = [
    "BONE_THRESHOLD_HU",
    "INTRACRANIAL_MARGIN_MM",
    "MAX_BLOOD_HU",
    "MIN_COMPONENT_HU",
    "MIN_COMPONENT_ML",
    "MIN_VOXEL_HU",
    "SKULL_BASE_MARGIN_MM",
    "HyperdenseOptions",
    "PostprocessingOptions",
    "hyperdense_gate",
    "hyperdense_options",
    "intracranial_mask",
    "postprocess_mask",
    "skull_base_bone",
    "skull_stripped_background",
]

BONE_THRESHOLD_HU = 300.0  # above acute blood (<= ~100 HU), below diploe and cortical bone
# Clears the inner table's partial-volume rim (about one voxel on thin-slice scans; on coarser grids
# the erosion rounds down to nothing). Kept small because subdural blood lies against the table
# (docs/automatic_segmentation.md has what larger margins cost).
INTRACRANIAL_MARGIN_MM = 0.5
SKULL_SEAL_MM = 4.0  # gaps in the skull ring (sutures, thin bone, partial volume) narrower than 2x this are bridged
MIN_INTRACRANIAL_ML = 50.0  # less than this: no skull in the scan (e.g. brain-windowed), so nothing is restricted
STRIPPED_MAX_BONE_ML = 1.0  # a skull-stripped scan has no bone; a head with its skull has hundreds of mL
STRIPPED_BORDER_SHARE = 0.95  # of the grid's faces at the background value
STRIPPED_MAX_AT_TOP = 0.1  # share of the head at its highest value: a skull clipped to a window is ~20%,
# a large bleed clipped with the brain a few %
MIN_COMPONENT_ML = 0.2
# Acute blood is hyperdense: a component less than HYPERDENSE_SHARE of which reaches MIN_COMPONENT_HU is
# CSF or brain; a kept one is trimmed to its half-maximum edge against its surroundings, never below
# MIN_VOXEL_HU (hyperdense_gate). Subacute and chronic blood is iso- or hypodense: turn the gate off.
MIN_COMPONENT_HU = 45.0
MIN_VOXEL_HU = 40.0
HYPERDENSE_SHARE = 0.25
MAX_BLOOD_HU = 100.0  # a component whose median is denser is no acute blood (clotted blood is 50-90 HU)
# ... nor one whose median after the gate's fit is denser than this: the fit grows a blood-dense core to
# its half-maximum edge, which on bone's partial volume (a thick slice through the vertex's cap, the
# orbital roofs) is mostly 150-300 HU; a thin subdural whose every voxel touches the table reads up to
# ~135 HU through the scanner's blur.
MAX_FITTED_HU = 150.0
HYPERDENSE_BLUR_MM = 0.5  # in-plane Gaussian sigma against noise before the half-maximum trim
HYPERDENSE_SHELL_MM = 3.0  # the background around a component is measured in a shell this thick
# The skull base: bone deeper than SKULL_BASE_DEPTH_MM below the head's surface (petrous ridges, clivus,
# sella, sphenoid wings, orbital roofs; the convexity's inner table is 8-18 mm deep) in a bone structure
# of at least SKULL_BASE_MIN_BONE_ML (not a calcified pineal or plexus). Its partial volume and streaks
# read as blood on thick slices; predictions within SKULL_BASE_MARGIN_MM of it are cleared.
SKULL_BASE_DEPTH_MM = 30.0
SKULL_BASE_MARGIN_MM = 3.0
SKULL_BASE_MIN_BONE_ML = 1.0
SKULL_BASE_GRID_MM = 2.0  # depth is found on a grid this coarse (it varies over centimetres)
HEAD_HU = -300.0  # soft tissue and bone; air and the table's padding are below
HEAD_SEAL_MM = 8.0  # the ear canals and nostrils, notches this deep into the head, are closed over


class PostprocessingOptions(TypedDict, total=False):
    """Keywords of :func:`postprocess_mask` (and of ``HemorrhageSegmenter``, which passes them on);
    a keyword left out takes :func:`postprocess_mask`'s default."""

    restrict_intracranial: bool
    min_component_ml: float
    bone_hu: float
    margin_mm: float
    min_component_hu: float | None  # None: the hyperdense gate is off
    min_voxel_hu: float | None
    skull_base_margin_mm: float  # 0: predictions next to the skull base are kept


class HyperdenseOptions(TypedDict):
    """The hyperdense gate's two keywords of :class:`PostprocessingOptions`."""

    min_component_hu: float | None
    min_voxel_hu: float | None


def hyperdense_options(on: bool) -> HyperdenseOptions:
    """The hyperdense gate's keywords: the defaults, or off."""
    return {"min_component_hu": MIN_COMPONENT_HU if on else None, "min_voxel_hu": MIN_VOXEL_HU if on else None}


def _ellipsoid(radius_mm: float, spacing_mm: Sequence[float], flat_axis: int | None = None) -> np.ndarray:
    """Boolean ball of ``radius_mm`` on a grid of ``spacing_mm``; one voxel thick along ``flat_axis``."""
    radii = [0 if axis == flat_axis else int(radius_mm // s) for axis, s in enumerate(spacing_mm)]
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    squared_mm = np.zeros([1] * len(radii))  # the open grids broadcast to the full ball
    for g, s in zip(grid, spacing_mm):
        squared_mm = squared_mm + (g * s) ** 2
    return squared_mm <= radius_mm**2


def _block_any(mask: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Downsample a boolean array by integer ``factors``: a block is True if any voxel in it is."""
    padded = np.pad(mask, [(0, -n % f) for n, f in zip(mask.shape, factors)])
    blocks = padded.reshape([x for n, f in zip(padded.shape, factors) for x in (n // f, f)])
    return np.asarray(blocks.any(axis=(1, 3, 5)))


def _block_repeat(mask: np.ndarray, factors: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`_block_any`'s grid: each coarse voxel becomes its block, cropped to ``shape``."""
    for axis, f in enumerate(factors):
        mask = np.repeat(mask, f, axis=axis)
    return mask[tuple(slice(0, n) for n in shape)]


def _seal_skull(bone: np.ndarray, spacing_mm: Sequence[float], axial: int, seal_mm: float) -> np.ndarray:
    """Bone plus the bridges a 2-D closing by a ``seal_mm`` disc adds across gaps in the ring.

    The closing runs on a grid of about 1 mm in plane, where the disc has a few voxels instead of a few
    hundred (at full resolution it was most of the post-processing time on thin-slice scans). Only
    blocks free of bone are taken back as bridges, each grown by one block so it meets the
    full-resolution bone without a leak at its ends; the bone itself stays at full resolution, so the
    cavity's edge along the inner table is not coarsened.
    """
    factors = [1 if axis == axial else max(1, int(1.0 // s)) for axis, s in enumerate(spacing_mm)]
    coarse = _block_any(bone, factors)
    coarse_spacing = [s * f for s, f in zip(spacing_mm, factors)]
    closed = ndimage.binary_closing(coarse, _ellipsoid(seal_mm, coarse_spacing, flat_axis=axial))
    bridges = _block_repeat(closed & ~coarse, factors, bone.shape)
    if max(factors) > 1:
        reach = np.expand_dims(np.ones([2 * f - 1 for a, f in enumerate(factors) if a != axial], dtype=bool), axial)
        bridges = ndimage.binary_dilation(bridges, reach)
    return bone | bridges


def intracranial_mask(
    volume: Volume,
    bone_hu: float = BONE_THRESHOLD_HU,
    margin_mm: float = INTRACRANIAL_MARGIN_MM,
    seal_mm: float = SKULL_SEAL_MM,
) -> np.ndarray:
    """The space inside the skull, found in the scan's own HU values: bool array on the input grid.

    Bone is ``HU >= bone_hu``. On each axial slice the bone ring is closed over gaps up to
    ``2 * seal_mm`` wide and its holes are filled; the bone is removed again, enclosed bone (calcified
    plexus or pineal) is given back to the cavity, and the cavity is eroded by ``margin_mm`` in 3-D.
    Axial slices whose skull is not a closed ring even after sealing (foramen magnum, a field of view
    cutting the skull, a craniectomy) get no cavity, so a hemorrhage there is only kept by a click.
    """
    axial = axial_axis(volume.affine)
    in_plane = np.expand_dims(np.ones((3, 3), dtype=bool), axial)  # 8-connected within a slice only
    background = skull_stripped_background(volume, bone_hu)
    if background is not None:
        # A skull-stripped scan is its brain: the intracranial space is what differs from the background.
        cavity = ndimage.binary_fill_holes(volume.array != background, in_plane)
    else:
        bone = volume.array >= bone_hu
        sealed = _seal_skull(bone, volume.spacing_mm, axial, seal_mm)
        # With no through-plane neighbours in the structure each fill is 2-D, slice by slice.
        cavity = ndimage.binary_fill_holes(sealed, in_plane) & ~bone
        cavity = ndimage.binary_fill_holes(cavity, in_plane)
    if margin_mm > 0:
        cavity = ndimage.binary_erosion(cavity, _ellipsoid(margin_mm, volume.spacing_mm))
    return cavity


def skull_stripped_background(volume: Volume, bone_hu: float = BONE_THRESHOLD_HU) -> float | None:
    """The background value of a skull-stripped scan, or None for a scan with its skull.

    Skull stripping leaves no bone (under STRIPPED_MAX_BONE_ML at or above ``bone_hu``) and sets all
    that was not brain to one value, which the grid's border then holds almost everywhere
    (STRIPPED_BORDER_SHARE of its faces)."""
    array = volume.array
    if float(np.count_nonzero(array >= bone_hu)) * volume.voxel_volume_ml >= STRIPPED_MAX_BONE_ML:
        return None
    faces = np.concatenate([np.take(array, index, axis).ravel() for axis in range(3) for index in (0, -1)])
    values, counts = np.unique(faces, return_counts=True)
    if counts.max() < STRIPPED_BORDER_SHARE * faces.size:
        return None
    background = float(values[np.argmax(counts)])
    head = array[array != background]
    # The brain must be there (a blank grid is no stripped head), and a brain-windowed head with its
    # skull is not one either: its skull is clipped to the window's top, a good share of the head.
    if float(head.size) * volume.voxel_volume_ml < MIN_INTRACRANIAL_ML:
        return None
    return background if float(np.mean(head >= head.max())) < STRIPPED_MAX_AT_TOP else None


def skull_base_bone(volume: Volume, bone_hu: float = BONE_THRESHOLD_HU) -> np.ndarray | None:
    """Bone of the skull base, found in the scan itself: bool array on the input grid, or None when the
    scan has no bone (skull-stripped, brain-windowed).

    Depth is measured from the head's surface (``HU > HEAD_HU``, closed over HEAD_SEAL_MM notches and
    filled per axial slice, so the sinuses, air cells and ear canals count as head) in 3-D on a grid of
    about SKULL_BASE_GRID_MM; the grid's inferior end is not surface, so a scan that starts at the
    foramen magnum still finds its petrous bones deep, and its superior end is, so a scan that cuts the
    vertex does not find its skull cap deep. Bone deeper than SKULL_BASE_DEPTH_MM in a
    structure of at least SKULL_BASE_MIN_BONE_ML is the skull base.
    """
    array = volume.array
    bone = array >= bone_hu
    if float(np.count_nonzero(bone)) * volume.voxel_volume_ml < SKULL_BASE_MIN_BONE_ML:
        return None
    factors = [max(1, int(round(SKULL_BASE_GRID_MM / s))) for s in volume.spacing_mm]
    coarse_spacing = [s * f for s, f in zip(volume.spacing_mm, factors)]
    axial = axial_axis(volume.affine)
    in_plane = np.expand_dims(np.ones((3, 3), dtype=bool), axial)
    coarse_bone = _block_any(bone, factors)
    head = _block_any(array > HEAD_HU, factors)
    head = ndimage.binary_closing(
        np.pad(head, [(0, 0) if a == axial else (1, 1) for a in range(3)]),
        _ellipsoid(HEAD_SEAL_MM, coarse_spacing, flat_axis=axial),
    )[tuple(slice(None) if a == axial else slice(1, -1) for a in range(3))]
    head = ndimage.binary_fill_holes(head | coarse_bone, in_plane)
    # Outside the grid in plane is outside the head (a field of view that cuts the scalp finds no deep
    # bone there), and so is above it (a scan that cuts the vertex has its cap there, under the scalp);
    # below it the head goes on (a scan that starts at the foramen magnum has its skull base deep).
    up = 1 if float(volume.affine[2, axial]) > 0 else 0  # which end of the axial axis is superior
    pads = [((1 - up, up) if a == axial else (1, 1)) for a in range(3)]
    depth = ndimage.distance_transform_edt(np.pad(head, pads), sampling=coarse_spacing)[
        tuple(slice(before, n + before) for (before, _), n in zip(pads, head.shape))
    ]
    labels, count = ndimage.label(coarse_bone, structure=np.ones((3, 3, 3)))
    block_ml = float(np.prod(coarse_spacing)) / 1000.0
    sizes_ml = np.bincount(labels.ravel(), minlength=count + 1)[1:] * block_ml
    structures = np.isin(labels, np.flatnonzero(sizes_ml >= SKULL_BASE_MIN_BONE_ML) + 1)
    deep = _block_repeat(structures & (depth > SKULL_BASE_DEPTH_MM), factors, array.shape)
    return deep & bone


def _per_component(labels: np.ndarray, count: int, values: np.ndarray) -> np.ndarray:
    """Sum of ``values`` over each component 1..count of ``labels`` (float64, count entries)."""
    where = labels > 0
    return np.bincount(labels[where], weights=values[where], minlength=count + 1)[1:]


def _blur_sigma(volume: Volume, blur_mm: float) -> list[float]:
    """The hyperdense gate's Gaussian sigma in voxels: in plane only (slices may be 5 mm apart)."""
    axial = axial_axis(volume.affine)
    return [0.0 if axis == axial else blur_mm / s for axis, s in enumerate(volume.spacing_mm)]


def _growth(volume: Volume, shell_mm: float) -> np.ndarray:
    """How far the hyperdense gate grows a component toward its half-maximum edge: the shell in plane
    and at least the neighbouring slice. The decoder's mask is 4 model voxels (6 mm) coarse and falls
    short of the blood's edge, and of whole end slices on 5 mm scans, about as often as it overshoots."""
    shell = _ellipsoid(shell_mm, volume.spacing_mm)
    axial = axial_axis(volume.affine)
    return shell if shell.shape[axial] > 1 else np.concatenate([shell] * 3, axis=axial)


def _gate_reach(volume: Volume, blur_mm: float, shell_mm: float) -> list[int]:
    """Voxels around a component that the hyperdense gate reads: its shell or growth, and beyond that
    the blur's Gaussian, which scipy truncates at 4 sigma, so a box with this margin blurs exactly as
    the whole scan does."""
    growth_reach = [n // 2 for n in _growth(volume, shell_mm).shape]
    blur_reach = [int(np.ceil(4 * sigma)) + 1 for sigma in _blur_sigma(volume, blur_mm)]
    return [a + b for a, b in zip(growth_reach, blur_reach)]


def _grown_box(mask: np.ndarray, grow: Sequence[int]) -> tuple[slice, ...]:
    """``mask``'s bounding box grown by ``grow`` voxels on each side, clipped to the grid (an empty mask:
    its first voxel, so the steps after it still see a 3-D array)."""
    box = []
    for axis, g in enumerate(grow):
        along = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if along.size == 0:
            return tuple(slice(0, 1) for _ in mask.shape)
        box.append(slice(max(0, int(along[0]) - g), min(mask.shape[axis], int(along[-1]) + 1 + g)))
    return tuple(box)


def _cropped(volume: Volume, box: tuple[slice, ...]) -> Volume:
    """The part ``box`` of ``volume``, its affine moved so every voxel keeps its world position."""
    shift = np.eye(4)
    shift[:3, 3] = [b.start for b in box]
    return replace(volume, array=volume.array[box], affine=volume.affine @ shift, dicom=None)


def hyperdense_gate(
    mask: np.ndarray,
    volume: Volume,
    protected: np.ndarray,
    min_component_hu: float,
    min_voxel_hu: float,
    blur_mm: float = HYPERDENSE_BLUR_MM,
    shell_mm: float = HYPERDENSE_SHELL_MM,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Drop components of ``mask`` of which less than ``HYPERDENSE_SHARE`` is at or above ``min_component_hu``,
    or whose median is above MAX_BLOOD_HU; fit each kept one to the voxels (HU blurred by ``blur_mm`` in plane
    against noise) at or above half-way between its hyperdense voxels' median and the median of a ``shell_mm``
    shell around it, the half-maximum edge of a blurred blob, never below ``min_voxel_hu``: trimmed where the
    mask overshoots that edge, grown up to it (within :func:`_growth`'s reach) where the mask falls short;
    drop it if its median, fitted, is above MAX_FITTED_HU. ``protected`` voxels are kept as they are."""
    labels, count = ndimage.label(mask & ~protected, structure=np.ones((3, 3, 3)))
    index = np.arange(1, count + 1)
    dense = volume.array >= min_component_hu
    shares = _per_component(labels, count, dense) / np.maximum(_per_component(labels, count, labels > 0), 1)
    # Denser than any acute blood in its middle: a calcification, or the partial-volume rim of bone.
    # Over the labelled voxels only: ndimage.median sorts all it is given, the whole box otherwise.
    labelled = labels > 0
    medians = (
        np.asarray(ndimage.median(volume.array[labelled], labels[labelled], index), dtype=float).reshape(-1)
        if count
        else np.zeros(0)
    )
    too_dense = medians > MAX_BLOOD_HU
    shares[too_dense] = 0.0
    sigma = _blur_sigma(volume, blur_mm)
    shell = _ellipsoid(shell_mm, volume.spacing_mm)
    growth = _growth(volume, shell_mm)
    reach = _gate_reach(volume, blur_mm, shell_mm)
    gated = mask & protected
    edges = []
    too_dense_fitted = 0
    # Each component is handled in its bounding box grown by the shell (and the blur's reach), so
    # the cost is the scan once plus the components' boxes, not components x scan.
    boxes = ndimage.find_objects(labels)
    for label in index[shares >= HYPERDENSE_SHARE]:
        box = tuple(
            slice(max(0, b.start - r), min(n, b.stop + r)) for b, r, n in zip(boxes[label - 1], reach, mask.shape)
        )
        hu = volume.array[box]
        component = labels[box] == label
        soft_tissue = (hu > -100) & (hu < BONE_THRESHOLD_HU)  # the table is not background
        reached = ndimage.binary_dilation(component, shell)
        around = reached & ~mask[box] & soft_tissue
        background = float(np.median(hu[around])) if around.any() else min_voxel_hu
        edge = max(min_voxel_hu, (float(np.median(hu[component & dense[box]])) + background) / 2)
        blurred = ndimage.gaussian_filter(hu.astype(np.float32), sigma)
        blood = (blurred >= edge) & soft_tissue & ~protected[box]
        # On thin slices the growth is the shell itself: its dilation is done once.
        within_reach = (reached if growth.shape == shell.shape else ndimage.binary_dilation(component, growth)) & blood
        fitted = ndimage.binary_propagation(component & blood, mask=within_reach)
        if fitted.any() and float(np.median(hu[fitted])) > MAX_FITTED_HU:
            too_dense_fitted += 1
            continue
        gated[box] |= fitted
        edges.append(round(edge, 1))
    voxel_ml = volume.voxel_volume_ml
    return gated, {
        "min_component_hu": min_component_hu,
        "min_voxel_hu": min_voxel_hu,
        "edges_hu": edges,
        "components_removed": int(np.sum(shares < HYPERDENSE_SHARE)),
        "max_median_hu": MAX_BLOOD_HU,
        "too_dense_components_removed": int(too_dense.sum()),
        "max_fitted_median_hu": MAX_FITTED_HU,
        "too_dense_after_fit_removed": too_dense_fitted,
        "removed_ml": round(float((mask & ~gated).sum()) * voxel_ml, 2),
        "added_ml": round(float((gated & ~mask).sum()) * voxel_ml, 2),
    }


def _clear_near(mask: np.ndarray, obstacle: np.ndarray, spacing_mm: Sequence[float], margin_mm: float) -> np.ndarray:
    """``mask`` without its voxels within ``margin_mm`` of ``obstacle``, found component by component in
    each one's box grown by the margin (a distance map over the whole scan costs seconds at 0.45 mm)."""
    out = mask.copy()
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    grow = [int(np.ceil(margin_mm / s)) for s in spacing_mm]
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        box = tuple(slice(max(0, b.start - g), min(n, b.stop + g)) for b, g, n in zip(box, grow, mask.shape))
        near = obstacle[box]
        if near.any():
            near = ndimage.distance_transform_edt(~near, sampling=spacing_mm) <= margin_mm
            out[box] &= ~((labels[box] == label) & near)
    return out


def postprocess_mask(
    mask: np.ndarray,
    volume: Volume,
    keep_points: Sequence[Sequence[float]] = (),
    restrict_intracranial: bool = True,
    min_component_ml: float = MIN_COMPONENT_ML,
    bone_hu: float = BONE_THRESHOLD_HU,
    margin_mm: float = INTRACRANIAL_MARGIN_MM,
    min_component_hu: float | None = MIN_COMPONENT_HU,
    min_voxel_hu: float | None = MIN_VOXEL_HU,
    intracranial: np.ndarray | None = None,
    skull_base_margin_mm: float = SKULL_BASE_MARGIN_MM,
    skull_base: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Clear voxels outside the intracranial space, keep hyperdense components (:func:`hyperdense_gate`;
    ``min_component_hu=None`` turns it off), clear voxels within ``skull_base_margin_mm`` of the skull
    base (:func:`skull_base_bone`; 0 turns it off), then drop components under ``min_component_ml``.

    ``keep_points`` are voxel indices (input grid) of positive clicks: a component of ``mask`` holding
    one is kept whole by every step. ``min_component_ml=0`` disables the size filter. Components are
    26-connected, as in :func:`measure`. ``intracranial``: ``intracranial_mask(volume, bone_hu, margin_mm)``
    computed before for this scan (the scan's part that does not change from click to click); computed
    here if None; ``skull_base`` likewise ``skull_base_bone(volume, bone_hu)``. Returns the new uint8
    mask and a record of what ran.
    """
    mask = mask.astype(bool)
    voxel_ml = volume.voxel_volume_ml
    record: dict[str, Any] = {"volume_before_ml": round(float(mask.sum()) * voxel_ml, 2)}
    inside = None
    if restrict_intracranial:
        inside = intracranial_mask(volume, bone_hu, margin_mm) if intracranial is None else intracranial
        inside_ml = float(inside.sum()) * voxel_ml
        stripped = skull_stripped_background(volume, bone_hu)
        step: dict[str, Any] = {
            "bone_hu": bone_hu,
            "margin_mm": margin_mm,
            "intracranial_volume_ml": round(inside_ml, 1),
            "from": "bone" if stripped is None else f"skull-stripped scan: all that is not background ({stripped:g})",
        }
        if inside_ml < MIN_INTRACRANIAL_ML:
            step["applied"] = False
            step["reason"] = f"under {MIN_INTRACRANIAL_ML:g} mL enclosed by bone: no skull found in the scan"
            inside = None
        record["intracranial_mask"] = step
    if skull_base_margin_mm > 0 and skull_base is None:
        skull_base = skull_base_bone(volume, bone_hu)
    # Every step looks at the mask's voxels and, at most, a shell and a blur's reach around them (and
    # the skull-base margin beyond that): the steps run in the mask's bounding box grown by that reach,
    # so their cost follows the prediction, not the scan (a click's window is a small part of a
    # thin-slice scan).
    full_shape = mask.shape
    reach = _gate_reach(volume, HYPERDENSE_BLUR_MM, HYPERDENSE_SHELL_MM)
    reach = [r + int(np.ceil(skull_base_margin_mm / s)) for r, s in zip(reach, volume.spacing_mm)]
    box = _grown_box(mask, reach)
    mask, volume = mask[box], _cropped(volume, box)
    inside = None if inside is None else inside[box]
    keep_points = np.asarray(keep_points, dtype=float).reshape(-1, 3) - [b.start for b in box]
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    shape = np.array(mask.shape)
    clicked = {int(labels[tuple(p)]) for p in np.round(keep_points).astype(int) if np.all((p >= 0) & (p < shape))} - {0}
    protected = np.isin(labels, sorted(clicked))
    record["clicked_components_kept"] = len(clicked)
    if inside is not None:
        kept = mask & (inside | protected)
        record["intracranial_mask"].update(applied=True, removed_ml=round(float((mask & ~kept).sum()) * voxel_ml, 2))
        mask = kept
    if min_component_hu is not None:
        mask, record["hyperdense"] = hyperdense_gate(
            mask, volume, protected, min_component_hu, min_component_hu if min_voxel_hu is None else min_voxel_hu
        )
    if skull_base_margin_mm > 0:
        step = {"depth_mm": SKULL_BASE_DEPTH_MM, "margin_mm": skull_base_margin_mm}
        if skull_base is None:
            step.update(applied=False, reason="no bone in the scan")
        else:
            kept = _clear_near(mask & ~protected, skull_base[box], volume.spacing_mm, skull_base_margin_mm) | (
                mask & protected
            )
            step.update(applied=True, removed_ml=round(float((mask & ~kept).sum()) * voxel_ml, 2))
            mask = kept
        record["skull_base"] = step
    if min_component_ml > 0:
        labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        sizes_ml = _per_component(labels, count, mask) * voxel_ml
        touches_click = _per_component(labels, count, protected) > 0
        small = np.flatnonzero((sizes_ml < min_component_ml) & ~touches_click) + 1
        record["min_component"] = {
            "min_component_ml": min_component_ml,
            "components_removed": int(small.size),
            "removed_ml": round(float(sizes_ml[small - 1].sum()), 2),
        }
        mask = mask & ~np.isin(labels, small)
    record["volume_after_ml"] = round(float(mask.sum()) * voxel_ml, 2)
    on_scan = np.zeros(full_shape, dtype=np.uint8)
    on_scan[box] = mask
    return on_scan, record
