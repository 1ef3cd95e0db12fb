"""Segmentation metrics with the true voxel spacing: Dice, NSD (surface Dice), HD95, volumes in mL."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice


def dice_score(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-case Dice of bool masks (B, 1, *S) → (B,). Both empty counts as 1 (a correct "no bleed")."""
    prediction = prediction.flatten(1).float()
    target = target.flatten(1).float()
    intersection = (prediction * target).sum(1)
    total = prediction.sum(1) + target.sum(1)
    return torch.where(total > 0, 2 * intersection / total.clamp_min(1e-8), torch.ones_like(total))


def volume_ml(mask: torch.Tensor | np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Volume of a binary mask in millilitres (1 mL = 1000 mm^3)."""
    voxels = float(mask.sum())
    return voxels * float(np.prod(spacing_mm)) / 1000.0


def surface_metrics(
    prediction: torch.Tensor, target: torch.Tensor, spacing_mm: Sequence[float], tolerance_mm: float = 1.0
) -> dict[str, float]:
    """NSD at ``tolerance_mm`` and HD95 (mm) for one case, bool (1, *S) masks, MONAI implementations.

    Conventions for empty masks: both empty → NSD 1, HD95 0; exactly one empty → NSD 0, HD95 NaN
    (a distance to nothing is undefined; summaries report how many cases that affects).
    """
    pred_empty = not bool(prediction.any())
    target_empty = not bool(target.any())
    if pred_empty and target_empty:
        return {"nsd": 1.0, "hd95_mm": 0.0}
    if pred_empty or target_empty:
        return {"nsd": 0.0, "hd95_mm": float("nan")}
    pred = prediction.reshape(1, 1, *prediction.shape[-3:]).float()
    gt = target.reshape(1, 1, *target.shape[-3:]).float()
    spacing = [float(s) for s in spacing_mm]
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about an argument its own metric code still passes internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        nsd = compute_surface_dice(pred, gt, class_thresholds=[tolerance_mm], include_background=True, spacing=spacing)
        hd95 = compute_hausdorff_distance(pred, gt, include_background=True, percentile=95, spacing=spacing)
    return {"nsd": float(nsd.item()), "hd95_mm": float(hd95.item())}
