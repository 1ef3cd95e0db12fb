"""Scan → hemorrhage mask in the scan's own geometry, measurements and overlays (Python API).

Automatic mode (no clicks) covers the whole head with model-sized windows (MONAI sliding window,
Gaussian blending), so hemorrhages larger than one 128^3 patch are not cut. Interactive mode takes
clicks in voxel indices of the input file or in world millimetres (RAS), crops one window around the
first click and refines the mask click by click, feeding back the previous low-res logits as SAM does.
Either way the probabilities are mapped back onto the input grid through the affines (the model grid
is RAS at the training spacing), so the mask has exactly the input's shape and affine.

The thresholded mask is then post-processed (:func:`postprocess_mask`): voxels outside the
intracranial space found in the scan itself are cleared; components that are not hyperdense are
dropped and the rim of the kept ones over brain trimmed (acute blood is 50-100 HU, brain 20-45,
CSF 0-15); and connected components smaller than a minimum volume are dropped. Whole-head windows
mark bone, scalp, the CSF/cortex rim along the inner table (where subdurals lie) and scattered specks
as blood, and the decoder's mask is 4 model voxels coarse, which inflates small bleeds. A component
holding a positive click is the user's explicit choice and is left untouched by every step.
``SegmentationResult.postprocessing`` records what ran and what it removed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from sam3d.engine.checkpoint import atomic_write
from sam3d.engine.config import ConfigError

from . import __version__
from .data.dicom_seg import mask_on_frames, write_hemorrhage_seg
from .data.geometry import axial_axis, grid_corners
from .data.io import Volume, VolumeReadError, load_volume, save_nifti, strip_volume_extension
from .data.preprocessing import Preprocessing
from .data.transforms import build_inference_transforms
from .modeling import load_trained_sam3d
from .modeling.sam3d import Sam3D
from .visualize import SliceView, axial_overlay

HEAD_THRESHOLD_HU = -500.0
BONE_THRESHOLD_HU = 300.0  # above acute blood (<= ~100 HU), below diploe and cortical bone
# Clears the inner table's partial-volume rim (about one voxel on thin-slice scans; on coarser grids
# the erosion rounds down to nothing). Kept small because subdural blood lies against the table: on
# 0.45 mm synthetic voxels 0.5 / 1 mm took 3% / 7% more of a subdural than no margin, and on 2 mm voxels
# a 2 mm margin took 15% of the true blood of 11 synthetic cases.
INTRACRANIAL_MARGIN_MM = 0.5
SKULL_SEAL_MM = 4.0  # gaps in the skull ring (sutures, thin bone, partial volume) narrower than 2x this are bridged
MIN_INTRACRANIAL_ML = 50.0  # less than this: no skull in the scan (e.g. skull-stripped), so nothing is restricted
MIN_COMPONENT_ML = 0.2
# Acute blood is hyperdense: a component less than HYPERDENSE_SHARE of which reaches MIN_COMPONENT_HU is
# CSF or brain; a kept one is trimmed to its half-maximum edge against its surroundings, never below
# MIN_VOXEL_HU (hyperdense_gate). Subacute and chronic blood is iso- or hypodense: turn the gate off.
MIN_COMPONENT_HU = 45.0
HYPERDENSE_SHARE = 0.25
# The probability threshold of automatic mode when the gate bounds the mask by density: the model then
# only has to find the bleed, and a lower threshold keeps the whole of it (docs/results.md). Without
# the gate, and with clicks, 0.5.
AUTOMATIC_THRESHOLD = 0.3
THRESHOLD = 0.5


def hyperdense_options(on: bool) -> dict[str, float | None]:
    """``HemorrhageSegmenter`` keywords for the hyperdense gate: the defaults, or off."""
    return {"min_component_hu": MIN_COMPONENT_HU if on else None, "min_voxel_hu": MIN_VOXEL_HU if on else None}


MIN_VOXEL_HU = 40.0


@dataclass
class Click:
    """A click in the input file's voxel indices (``space='voxel'``) or in RAS world mm (``'mm'``)."""

    position: tuple[float, float, float]
    positive: bool = True
    space: str = "voxel"


@dataclass
class Measurements:
    total_volume_ml: float
    num_components: int
    component_volumes_ml: list[float]
    side: str  # left / right / bilateral / none, in patient coordinates
    slice_extent: list[int] | None  # first and last axial slice index (input grid) holding hemorrhage
    craniocaudal_extent_mm: float
    centroid_voxel: list[float] | None
    centroid_mm: list[float] | None


@dataclass
class SegmentationResult:
    """What the CLI writes: the mask (input shape and affine), its measurements and where files went.

    ``volume`` is the scan as read (array, affine, geometry record, DICOM series) so writing the
    outputs reads nothing again.
    """

    source: str
    mask: np.ndarray = field(repr=False)
    volume: Volume = field(repr=False)
    measurements: Measurements
    mode: str
    postprocessing: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)

    @property
    def affine(self) -> np.ndarray:
        return self.volume.affine

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "mode": self.mode,
            "shape": list(self.mask.shape),
            "spacing_mm": list(self.volume.spacing_mm),
            "voxel_volume_ml": self.volume.voxel_volume_ml,
            "geometry": self.volume.geometry.to_json(),
            "geometry_summary": self.volume.geometry.summary(),
            "measurements": asdict(self.measurements),
            "postprocessing": self.postprocessing,
            "files": self.files,
        }


def measure(mask: np.ndarray, volume: Volume, head_midline_x_mm: float | None = None) -> Measurements:
    """Radiologist's numbers for a binary mask on the input grid, in world space through ``volume``'s
    affine: a voxel's volume is |det(affine)|, side and extents come from world positions."""
    mask = mask.astype(bool)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    voxel_ml = volume.voxel_volume_ml
    sizes = ndimage.sum_labels(mask, labels, index=range(1, count + 1)) if count else []
    component_ml = sorted((round(float(s) * voxel_ml, 2) for s in sizes), reverse=True)
    if count == 0:
        return Measurements(0.0, 0, [], "none", None, 0.0, None, None)
    idx = np.argwhere(mask)
    world = idx @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    if head_midline_x_mm is None:
        head = np.argwhere(volume.array > HEAD_THRESHOLD_HU)
        head_midline_x_mm = float((head.mean(0) @ volume.affine[:3, :3].T + volume.affine[:3, 3])[0])
    # RAS+: world x grows toward the patient's right. A side holding < 10% of the blood is noise.
    right = float((world[:, 0] > head_midline_x_mm).mean())
    side = "bilateral" if 0.1 <= right <= 0.9 else ("right" if right > 0.9 else "left")
    axial = axial_axis(volume.affine)
    slices = idx[:, axial]
    return Measurements(
        total_volume_ml=round(float(mask.sum()) * voxel_ml, 2),
        num_components=int(count),
        component_volumes_ml=component_ml,
        side=side,
        slice_extent=[int(slices.min()), int(slices.max())],
        # One slice's own superior-inferior reach added: the centres span one step less than the voxels.
        craniocaudal_extent_mm=round(float(world[:, 2].max() - world[:, 2].min() + abs(volume.affine[2, axial])), 1),
        centroid_voxel=[round(float(v), 1) for v in idx.mean(0)],
        centroid_mm=[round(float(v), 1) for v in world.mean(0)],
    )


def _ellipsoid(radius_mm: float, spacing_mm: Sequence[float], flat_axis: int | None = None) -> np.ndarray:
    """Boolean ball of ``radius_mm`` on a grid of ``spacing_mm``; one voxel thick along ``flat_axis``."""
    radii = [0 if axis == flat_axis else int(radius_mm // s) for axis, s in enumerate(spacing_mm)]
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    return sum((g * s) ** 2 for g, s in zip(grid, spacing_mm)) <= radius_mm**2


def _block_any(mask: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Downsample a boolean array by integer ``factors``: a block is True if any voxel in it is."""
    padded = np.pad(mask, [(0, -n % f) for n, f in zip(mask.shape, factors)])
    blocks = padded.reshape([x for n, f in zip(padded.shape, factors) for x in (n // f, f)])
    return blocks.any(axis=(1, 3, 5))


def _block_repeat(mask: np.ndarray, factors: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`_block_any`'s grid: each coarse voxel becomes its block, cropped to ``shape``."""
    for axis, f in enumerate(factors):
        mask = np.repeat(mask, f, axis=axis)
    return mask[tuple(slice(0, n) for n in shape)]


def _seal_skull(bone: np.ndarray, spacing_mm: Sequence[float], axial: int, seal_mm: float) -> np.ndarray:
    """Bone plus the bridges a 2-D closing by a ``seal_mm`` disc adds across gaps in the ring.

    The closing runs on a grid of about 1 mm in plane, where the disc has a few voxels instead of a few
    hundred (on 0.45 mm scans it took 3.6 of 5 s). Only blocks free of bone are taken back as bridges,
    each grown by one block so it meets the full-resolution bone without a leak at its ends; the bone
    itself stays at full resolution, so the cavity's edge along the inner table is not coarsened.
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
    bone = volume.array >= bone_hu
    sealed = _seal_skull(bone, volume.spacing_mm, axial, seal_mm)
    # With no through-plane neighbours in the structure each fill is 2-D, slice by slice.
    cavity = ndimage.binary_fill_holes(sealed, in_plane) & ~bone
    cavity = ndimage.binary_fill_holes(cavity, in_plane)
    if margin_mm > 0:
        cavity = ndimage.binary_erosion(cavity, _ellipsoid(margin_mm, volume.spacing_mm))
    return cavity


def hyperdense_gate(
    mask: np.ndarray,
    volume: Volume,
    protected: np.ndarray,
    min_component_hu: float,
    min_voxel_hu: float,
    blur_mm: float = 0.5,
    shell_mm: float = 3.0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Drop components of ``mask`` of which less than ``HYPERDENSE_SHARE`` is at or above
    ``min_component_hu``; trim each kept one to the voxels (HU blurred by ``blur_mm`` in plane against
    noise) at or above half-way between its hyperdense voxels' median and the median of a ``shell_mm``
    shell around it, the half-maximum edge of a blurred blob, never below ``min_voxel_hu``.
    ``protected`` voxels are kept as they are."""
    labels, count = ndimage.label(mask & ~protected, structure=np.ones((3, 3, 3)))
    index = np.arange(1, count + 1)
    dense = volume.array >= min_component_hu
    shares = np.asarray(ndimage.mean(dense, labels, index)) if count else np.zeros(0)
    axial = axial_axis(volume.affine)
    sigma = [0.0 if axis == axial else blur_mm / s for axis, s in enumerate(volume.spacing_mm)]
    blurred = ndimage.gaussian_filter(volume.array.astype(np.float32), sigma)
    shell = _ellipsoid(shell_mm, volume.spacing_mm)
    soft_tissue = (volume.array > -100) & (volume.array < BONE_THRESHOLD_HU)  # the table is not background
    gated = mask & protected
    edges = []
    for label in index[shares >= HYPERDENSE_SHARE]:
        component = labels == label
        around = ndimage.binary_dilation(component, shell) & ~mask & soft_tissue
        background = float(np.median(volume.array[around])) if around.any() else min_voxel_hu
        edge = max(min_voxel_hu, (float(np.median(volume.array[component & dense])) + background) / 2)
        gated |= component & (blurred >= edge)
        edges.append(round(edge, 1))
    voxel_ml = volume.voxel_volume_ml
    return gated, {
        "min_component_hu": min_component_hu,
        "min_voxel_hu": min_voxel_hu,
        "edges_hu": edges,
        "components_removed": int(np.sum(shares < HYPERDENSE_SHARE)),
        "removed_ml": round(float((mask & ~gated).sum()) * voxel_ml, 2),
    }


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
) -> tuple[np.ndarray, dict[str, Any]]:
    """Clear voxels outside the intracranial space, keep hyperdense components (:func:`hyperdense_gate`;
    ``min_component_hu=None`` turns it off), then drop components under ``min_component_ml``.

    ``keep_points`` are voxel indices (input grid) of positive clicks: a component of ``mask`` holding
    one is kept whole by every step. ``min_component_ml=0`` disables the size filter. Components are
    26-connected, as in :func:`measure`. Returns the new uint8 mask and a record of what ran.
    """
    mask = mask.astype(bool)
    voxel_ml = volume.voxel_volume_ml
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    shape = np.array(mask.shape)
    clicked = {
        int(labels[tuple(p)])
        for p in np.round(np.asarray(keep_points, dtype=float).reshape(-1, 3)).astype(int)
        if np.all((p >= 0) & (p < shape))
    } - {0}
    protected = np.isin(labels, sorted(clicked))
    record: dict[str, Any] = {
        "volume_before_ml": round(float(mask.sum()) * voxel_ml, 2),
        "clicked_components_kept": len(clicked),
    }
    if restrict_intracranial:
        inside = intracranial_mask(volume, bone_hu, margin_mm)
        inside_ml = float(inside.sum()) * voxel_ml
        step: dict[str, Any] = {
            "bone_hu": bone_hu,
            "margin_mm": margin_mm,
            "intracranial_volume_ml": round(inside_ml, 1),
        }
        if inside_ml < MIN_INTRACRANIAL_ML:
            step["applied"] = False
            step["reason"] = f"under {MIN_INTRACRANIAL_ML:g} mL enclosed by bone: no skull found in the scan"
        else:
            kept = mask & (inside | protected)
            step.update(applied=True, removed_ml=round(float((mask & ~kept).sum()) * voxel_ml, 2))
            mask = kept
        record["intracranial_mask"] = step
    if min_component_hu is not None:
        mask, record["hyperdense"] = hyperdense_gate(
            mask, volume, protected, min_component_hu, min_component_hu if min_voxel_hu is None else min_voxel_hu
        )
    if min_component_ml > 0:
        labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        sizes_ml = np.asarray(ndimage.sum_labels(mask, labels, index=range(1, count + 1))) * voxel_ml
        touches_click = np.asarray(ndimage.maximum(protected, labels, index=range(1, count + 1)), dtype=bool)
        small = np.flatnonzero((sizes_ml < min_component_ml) & ~touches_click) + 1
        record["min_component"] = {
            "min_component_ml": min_component_ml,
            "components_removed": int(small.size),
            "removed_ml": round(float(sizes_ml[small - 1].sum()), 2),
        }
        mask = mask & ~np.isin(labels, small)
    record["volume_after_ml"] = round(float(mask.sum()) * voxel_ml, 2)
    return mask.astype(np.uint8), record


def to_input_grid(values: np.ndarray, model_affine: np.ndarray, volume: Volume, order: int = 1) -> np.ndarray:
    """Resample a model-grid array (X, Y, Z) onto the input volume's grid through both affines."""
    voxel_to_model = np.linalg.inv(model_affine) @ volume.affine
    return ndimage.affine_transform(
        values,
        voxel_to_model[:3, :3],
        offset=voxel_to_model[:3, 3],
        output_shape=volume.array.shape[:3],
        order=order,
        mode="constant",
        cval=0.0,
    )


def _click_world(click: Click, volume: Volume) -> np.ndarray:
    """Homogeneous RAS mm position (4,) of a click given in voxels of ``volume`` or in mm."""
    if click.space not in ("voxel", "mm"):
        raise ValueError(f"click space must be 'voxel' or 'mm', got {click.space!r}")
    position = np.append(np.asarray(click.position, dtype=float), 1.0)
    return volume.affine @ position if click.space == "voxel" else position


MIN_HEAD_EXTENT_MM = 60.0  # a head is ~150 mm across; less than this on two axes holds no head


def check_head_ct(volume: Volume) -> None:
    """A blank or constant scan is refused (a clean "no hemorrhage" would be a lie); one that does not
    look like a head CT (no air, no bone, values outside the HU range, too small to hold a head)
    gets a warning recorded with its geometry, shown wherever the result is."""
    sample = volume.array[::2, ::2, ::2].astype(np.float32)
    lo, hi = float(volume.array.min()), float(volume.array.max())
    if hi - lo < 1.0:
        raise VolumeReadError(f"{volume.source}: the scan is constant ({lo:g} everywhere): there is nothing to segment")
    problems = []
    if lo < -3100 or hi > 40000:
        problems.append(f"values {lo:g}..{hi:g} lie outside the CT range in HU (about -1024..3071)")
    if float(np.percentile(sample, 1)) > -500:
        problems.append(
            f"no air (1st percentile {np.percentile(sample, 1):.0f}, air is about -1000 HU): not in HU, or not a CT"
        )
    if float(np.percentile(sample, 99.9)) < 300:
        problems.append("no bone (99.9th percentile below 300 HU)")
    shape = np.array(volume.array.shape)
    extent_mm = shape * np.array(volume.spacing_mm)
    if np.sort(extent_mm)[1] < MIN_HEAD_EXTENT_MM:
        problems.append(f"a field of view of {np.round(extent_mm).astype(int).tolist()} mm is too small to hold a head")
    for problem in problems:
        volume.geometry.warn(f"{volume.source}: does not look like a head CT: {problem}; read the result with care")


def check_clicks_inside(clicks: Sequence[Click], volume: Volume) -> None:
    """A click outside the scan is a mistake, not a prompt: ConfigError with the scan's bounds."""
    shape = np.array(volume.array.shape)
    to_voxel = np.linalg.inv(volume.affine)
    for click in clicks:
        voxel = (to_voxel @ _click_world(click, volume))[:3]
        if np.all(voxel >= -0.5) and np.all(voxel <= shape - 0.5):
            continue
        world = volume.affine[:3, :3] @ grid_corners(volume.array.shape) + volume.affine[:3, 3:]
        bounds = (
            f"voxel indices 0..{shape[0] - 1}, 0..{shape[1] - 1}, 0..{shape[2] - 1}"
            if click.space == "voxel"
            else "RAS mm " + ", ".join(f"{lo:.1f}..{hi:.1f}" for lo, hi in zip(world.min(1), world.max(1)))
        )
        raise ConfigError(
            f"--click {' '.join(f'{v:g}' for v in click.position)} ({click.space}): outside "
            f"{volume.source}, which spans {bounds}"
        )


class HemorrhageSegmenter:
    """Load once, predict many: ``HemorrhageSegmenter("best_model.pth").predict("scan.nii.gz")``.

    Post-processing (see :func:`postprocess_mask`), on by default:

    - ``restrict_intracranial``: clear predictions outside the skull's cavity, found from the scan by
      a ``bone_hu`` threshold, slice-wise hole filling and a ``margin_mm`` erosion off the inner table.
      It assumes an intact skull; turn it off for skull-stripped images or after a craniectomy.
    - ``min_component_hu`` / ``min_voxel_hu``: keep hyperdense (acute) blood only; None turns it off
      (subacute or chronic hemorrhage, contrast-free scans of anaemic patients).
    - ``min_component_ml``: drop connected components smaller than this (mL); 0 keeps every one.

    In interactive mode a component holding a positive click is never removed or trimmed.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        device: str | torch.device = "cpu",
        model_type: str | None = None,
        overlap: float = 0.5,
        sw_batch_size: int = 1,
        restrict_intracranial: bool = True,
        min_component_ml: float = MIN_COMPONENT_ML,
        bone_hu: float = BONE_THRESHOLD_HU,
        margin_mm: float = INTRACRANIAL_MARGIN_MM,
        min_component_hu: float | None = MIN_COMPONENT_HU,
        min_voxel_hu: float | None = MIN_VOXEL_HU,
    ) -> None:
        if min_component_ml < 0 or margin_mm < 0:
            raise ValueError(f"min_component_ml and margin_mm must be >= 0, got {min_component_ml} and {margin_mm}")
        model, meta = load_trained_sam3d(checkpoint, model_type)
        self.device = torch.device(device)
        self.model: Sam3D = model.to(self.device).eval()
        self.preprocessing = Preprocessing.from_checkpoint(meta, str(checkpoint))
        self.transform = build_inference_transforms(self.preprocessing)
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size
        self.postprocessing = {
            "restrict_intracranial": restrict_intracranial,
            "min_component_ml": min_component_ml,
            "bone_hu": bone_hu,
            "margin_mm": margin_mm,
            "min_component_hu": min_component_hu,
            "min_voxel_hu": min_voxel_hu,
        }

    def _preprocess(self, volume: Volume) -> tuple[torch.Tensor, np.ndarray]:
        item = self.transform({"image": volume})
        image = item["image"]
        return image.as_tensor()[None].float().to(self.device), np.asarray(image.affine, dtype=np.float64)

    @torch.no_grad()
    def _automatic(self, image: torch.Tensor) -> torch.Tensor:
        size = (self.model.img_size,) * 3

        def predictor(window: torch.Tensor) -> torch.Tensor:
            low_res, _ = self.model.decode(self.model.image_encoder(window))
            return torch.sigmoid(self.model.upsample_logits(low_res))

        return sliding_window_inference(
            image,
            size,
            self.sw_batch_size,
            predictor,
            overlap=self.overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=float(image.min()),
        )[0, 0]

    @torch.no_grad()
    def _interactive(
        self, image: torch.Tensor, model_affine: np.ndarray, volume: Volume, clicks: Sequence[Click]
    ) -> torch.Tensor:
        points = [(np.linalg.inv(model_affine) @ _click_world(click, volume))[:3] for click in clicks]
        size = self.model.img_size
        grid = np.array(image.shape[-3:])
        # One window around the first click, shifted inside the scan where possible.
        start = np.clip(np.round(points[0]).astype(int) - size // 2, 0, np.maximum(grid - size, 0))
        window = torch.full((1, image.shape[1], size, size, size), float(image.min()), device=self.device)
        stop = np.minimum(start + size, grid)
        crop = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
        window[(..., *[slice(0, int(b - a)) for a, b in zip(start, stop)])] = image[(..., *crop)]
        embeddings = self.model.image_encoder(window)
        coords = torch.tensor(np.stack(points) - start, dtype=torch.float32, device=self.device)[None]
        labels = torch.tensor([[1 if c.positive else 0 for c in clicks]], device=self.device)
        low_res = torch.zeros(
            (1, 1, *(4 * s for s in self.model.prompt_encoder.image_embedding_size)), device=self.device
        )
        for i in range(len(clicks)):  # refine click by click, as a user would
            low_res, _ = self.model.decode(embeddings, coords[:, : i + 1], labels[:, : i + 1], low_res)
        probabilities = torch.zeros(image.shape[-3:], device=self.device)
        window_probs = torch.sigmoid(self.model.upsample_logits(low_res))[0, 0]
        probabilities[crop] = window_probs[tuple(slice(0, int(b - a)) for a, b in zip(start, stop))]
        return probabilities

    def predict(
        self, scan: str | os.PathLike | Volume, clicks: Sequence[Click] | None = None, threshold: float | None = None
    ) -> SegmentationResult:
        """Segment ``scan``: a path (any format :func:`load_volume` reads) or a Volume already read
        (read it yourself to choose a DICOM series or accept gaps). ``threshold``: the probability above which
        a voxel is blood; default AUTOMATIC_THRESHOLD without clicks when the hyperdense gate is on, else THRESHOLD."""
        volume = scan if isinstance(scan, Volume) else load_volume(scan)
        check_clicks_inside(clicks or [], volume)
        check_head_ct(volume)
        image, model_affine = self._preprocess(volume)
        if clicks:
            probabilities = self._interactive(image, model_affine, volume, clicks)
        else:
            probabilities = self._automatic(image)
        on_input = to_input_grid(probabilities.float().cpu().numpy(), model_affine, volume, order=1)
        keep_points = [(np.linalg.inv(volume.affine) @ _click_world(c, volume))[:3] for c in clicks or [] if c.positive]
        if threshold is None:
            gated = self.postprocessing["min_component_hu"] is not None
            threshold = AUTOMATIC_THRESHOLD if gated and not clicks else THRESHOLD
        mask, record = postprocess_mask(on_input > threshold, volume, keep_points, **self.postprocessing)
        record["threshold"] = threshold
        return SegmentationResult(
            volume.source, mask, volume, measure(mask, volume), "interactive" if clicks else "automatic", record
        )

    def save(
        self, result: SegmentationResult, output_dir: str | os.PathLike, max_overlays: int = 3, stem: str | None = None
    ) -> SegmentationResult:
        """Write ``<stem>_mask.nii.gz``, ``<stem>_measurements.json``, axial PNG overlays (radiological
        convention, lettered) and, for a DICOM input, ``<stem>_seg.dcm``: the mask on the acquired
        slices as DICOM SEG referencing them. Every file is written atomically."""
        from PIL import Image

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = stem or strip_volume_extension(Path(result.source).name)
        mask_path = out / f"{stem}_mask.nii.gz"
        save_nifti(mask_path, result.mask, result.affine)
        result.files["mask"] = str(mask_path)
        volume = result.volume
        if volume.dicom is not None:
            seg_path = write_hemorrhage_seg(
                out / f"{stem}_seg.dcm",
                mask_on_frames(result.mask, volume.affine, volume.dicom),
                volume.dicom,
                __version__,
            )
            result.files["dicom_seg"] = str(seg_path)
        view = SliceView.from_affine(result.affine)
        counts = result.mask.sum(axis=tuple(i for i in range(3) if i != view.axis))
        chosen = np.argsort(counts)[::-1][:max_overlays] if counts.max() > 0 else [result.mask.shape[view.axis] // 2]
        for k in sorted(int(c) for c in chosen):
            picture = axial_overlay(volume.array, k, view, result.mask)
            png = out / f"{stem}_slice{k:03d}.png"
            atomic_write(png, lambda tmp, picture=picture: Image.fromarray(picture).save(tmp, format="PNG"))
            result.files.setdefault("overlays", []).append(str(png))
        json_path = out / f"{stem}_measurements.json"
        result.files["measurements"] = str(json_path)
        text = json.dumps(result.to_json(), indent=2)
        atomic_write(json_path, lambda tmp: tmp.write_text(text))
        return result
