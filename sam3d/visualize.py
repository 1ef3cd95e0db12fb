"""Slice overlays of CT, ground truth and prediction as RGB images (W&B, PNG outputs)."""

from __future__ import annotations

import numpy as np


def _to_unit(slice_2d: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(slice_2d, [1, 99])
    return np.clip((slice_2d - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def overlay_slice(
    image: np.ndarray, prediction: np.ndarray | None = None, target: np.ndarray | None = None, alpha: float = 0.45
) -> np.ndarray:
    """2-D image (H, W) + optional bool masks → RGB uint8 (H, W, 3).

    Prediction in red, ground truth in green, their overlap in yellow.
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
    # Radiological display: the volume's first axis runs left→right on screen, superior up.
    return (np.rot90(rgb, k=1) * 255).round().astype(np.uint8)


def lesion_slice_index(mask: np.ndarray, axis: int = -1) -> int:
    """Index along ``axis`` of the slice with the most lesion voxels (the middle slice if none)."""
    counts = mask.reshape(*mask.shape).sum(axis=tuple(i for i in range(mask.ndim) if i != axis % mask.ndim))
    return int(np.argmax(counts)) if counts.max() > 0 else mask.shape[axis] // 2
