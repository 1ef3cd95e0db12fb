"""Slice pictures of CT with masks (PNG outputs, W&B, the web app), in the radiological convention.

Axial slices are shown as a radiologist reads them: anterior at the top and the patient's right on
the picture's left. Which voxel axes and directions that takes is derived from the affine
(:class:`SliceView`), never from the array's storage order, so a file stored LPS, RAS, tilted or
flipped gives the same picture; orientation letters on the edges say what the picture shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .data.geometry import axial_axis

__all__ = ["RAS_VIEW", "SliceView", "axial_overlay", "label_edges", "lesion_slice_index", "overlay_slice"]

_LETTERS = {(0, 1): "R", (0, -1): "L", (1, 1): "A", (1, -1): "P", (2, 1): "S", (2, -1): "I"}


def _letter(direction_ras: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(direction_ras)))
    return _LETTERS[(axis, 1 if direction_ras[axis] > 0 else -1)]


@dataclass(frozen=True)
class SliceView:
    """Which voxel axes of a grid run down and across the screen for its axial slices.

    ``down`` is the in-plane voxel axis closest to anterior-posterior, shown top to bottom toward
    posterior; ``across`` the one closest to right-left, shown toward the patient's left. A flip
    means the voxel index decreases along the screen. ``letters`` are the patient directions at
    the picture's (top, bottom, left, right) edges: ``("A", "P", "R", "L")`` for every axial scan.
    """

    axis: int
    down: int
    across: int
    flip_down: bool
    flip_across: bool
    letters: tuple[str, str, str, str]

    @classmethod
    def from_affine(cls, affine: np.ndarray) -> SliceView:
        directions = np.asarray(affine, dtype=np.float64)[:3, :3]
        directions = directions / np.linalg.norm(directions, axis=0)
        axis = axial_axis(affine)
        a, b = (i for i in range(3) if i != axis)
        # Give right-left to the axis that leans most that way, given the other takes front-back.
        if abs(directions[0, a]) + abs(directions[1, b]) >= abs(directions[0, b]) + abs(directions[1, a]):
            across, down = a, b
        else:
            across, down = b, a
        flip_across = bool(directions[0, across] > 0)  # index toward the patient's right: reverse it
        flip_down = bool(directions[1, down] > 0)  # index toward anterior: reverse it
        right = directions[:, across] * (-1 if flip_across else 1)
        below = directions[:, down] * (-1 if flip_down else 1)
        return cls(
            axis,
            down,
            across,
            flip_down,
            flip_across,
            (_letter(-below), _letter(below), _letter(-right), _letter(right)),
        )

    def picture(self, volume: np.ndarray, index: int) -> np.ndarray:
        """Slice ``index`` of ``volume`` (same grid as the affine) as a 2-D array (rows=down, cols=across)."""
        plane = np.take(volume, index, axis=self.axis)  # remaining axes in increasing order
        if self.down > self.across:
            plane = plane.T
        if self.flip_down:
            plane = plane[::-1]
        if self.flip_across:
            plane = plane[:, ::-1]
        return np.ascontiguousarray(plane)

    def voxel(self, row: int, column: int, index: int, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Voxel index of picture pixel (row, column) on slice ``index`` of a volume of ``shape``."""
        if self.flip_down:
            row = shape[self.down] - 1 - row
        if self.flip_across:
            column = shape[self.across] - 1 - column
        voxel = [0, 0, 0]
        voxel[self.axis], voxel[self.down], voxel[self.across] = index, row, column
        return int(voxel[0]), int(voxel[1]), int(voxel[2])


RAS_VIEW = SliceView.from_affine(np.eye(4))  # model-grid arrays: axes already R, A, S


def _to_unit(slice_2d: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(slice_2d, [1, 99])
    return np.clip((slice_2d - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def overlay_slice(
    image: np.ndarray, prediction: np.ndarray | None = None, target: np.ndarray | None = None, alpha: float = 0.45
) -> np.ndarray:
    """2-D picture (H, W), already in screen orientation (:meth:`SliceView.picture`), + optional bool
    masks → RGB uint8 (H, W, 3). Prediction in red, ground truth in green, their overlap in yellow.
    """
    grey = _to_unit(image.astype(np.float32))
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    colour = np.zeros_like(rgb)
    mask_any = np.zeros(grey.shape, dtype=bool)
    if prediction is not None:
        colour[..., 0] = prediction
        mask_any |= prediction.astype(bool)
    if target is not None:
        colour[..., 1] = target
        mask_any |= target.astype(bool)
    rgb[mask_any] = (1 - alpha) * rgb[mask_any] + alpha * colour[mask_any]
    return (rgb * 255).round().astype(np.uint8)


def label_edges(picture: np.ndarray, view: SliceView) -> np.ndarray:
    """The RGB picture with the view's orientation letters at the middle of each edge (yellow)."""
    image = Image.fromarray(picture)
    size = max(8, min(picture.shape[:2]) // 14)
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(image)
    h, w = picture.shape[:2]
    top, bottom, left, right = view.letters
    for text, (x, y), anchor in (
        (top, (w / 2, 1), "mt"),
        (bottom, (w / 2, h - 1), "mb"),
        (left, (2, h / 2), "lm"),
        (right, (w - 2, h / 2), "rm"),
    ):
        draw.text((x, y), text, fill=(255, 255, 0), font=font, anchor=anchor, stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(image)


def axial_overlay(
    volume: np.ndarray,
    index: int,
    view: SliceView,
    prediction: np.ndarray | None = None,
    target: np.ndarray | None = None,
) -> np.ndarray:
    """Axial slice ``index`` of 3-D arrays on one grid, radiologically oriented, masks drawn, edges lettered."""

    def show(array):
        return None if array is None else view.picture(array, index)

    return label_edges(overlay_slice(show(volume), show(prediction), show(target)), view)


def lesion_slice_index(mask: np.ndarray, axis: int = -1) -> int:
    """Index along ``axis`` of the slice with the most lesion voxels (the middle slice if none)."""
    counts = mask.reshape(*mask.shape).sum(axis=tuple(i for i in range(mask.ndim) if i != axis % mask.ndim))
    return int(np.argmax(counts)) if counts.max() > 0 else mask.shape[axis] // 2
