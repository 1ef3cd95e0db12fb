"""Scan → hemorrhage mask in the scan's own geometry, measurements and overlays (Python API).

Automatic mode (no clicks) covers the whole head with model-sized windows (MONAI sliding window,
Gaussian blending), so hemorrhages larger than one 128^3 patch are not cut. Interactive mode takes
clicks in voxel indices of the input file or in world millimetres (RAS), crops one window around the
first click and refines the mask click by click, feeding back the previous low-res logits as SAM does.
Either way the probabilities are mapped back onto the input grid through the affines (the model grid
is RAS at the training spacing), so the mask has exactly the input's shape and affine.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from .data.io import Volume, load_volume, save_nifti
from .data.transforms import DEFAULT_TRANSFORM_CONFIG, build_inference_transforms
from .metrics import volume_ml
from .modeling import load_trained_sam3d
from .modeling.sam3d import Sam3D
from .visualize import overlay_slice

HEAD_THRESHOLD_HU = -500.0


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
    """What the CLI writes: the mask (input shape and affine), its measurements and where files went."""

    source: str
    mask: np.ndarray = field(repr=False)
    affine: np.ndarray = field(repr=False)
    spacing_mm: tuple[float, float, float]
    measurements: Measurements
    mode: str
    files: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "mode": self.mode, "shape": list(self.mask.shape),
                "spacing_mm": list(self.spacing_mm), "measurements": asdict(self.measurements), "files": self.files}


def measure(mask: np.ndarray, volume: Volume, head_midline_x_mm: float | None = None) -> Measurements:
    """Radiologist's numbers for a binary mask on the input grid (spacing and affine from ``volume``)."""
    mask = mask.astype(bool)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
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
    axial_axis = int(np.argmax(np.abs(volume.affine[2, :3])))  # the voxel axis closest to superior
    slices = idx[:, axial_axis]
    return Measurements(
        total_volume_ml=round(volume_ml(mask, volume.spacing_mm), 2),
        num_components=int(count),
        component_volumes_ml=component_ml,
        side=side,
        slice_extent=[int(slices.min()), int(slices.max())],
        craniocaudal_extent_mm=round(float(world[:, 2].max() - world[:, 2].min() + volume.spacing_mm[axial_axis]), 1),
        centroid_voxel=[round(float(v), 1) for v in idx.mean(0)],
        centroid_mm=[round(float(v), 1) for v in world.mean(0)],
    )


def to_input_grid(values: np.ndarray, model_affine: np.ndarray, volume: Volume, order: int = 1) -> np.ndarray:
    """Resample a model-grid array (X, Y, Z) onto the input volume's grid through both affines."""
    voxel_to_model = np.linalg.inv(model_affine) @ volume.affine
    return ndimage.affine_transform(
        values, voxel_to_model[:3, :3], offset=voxel_to_model[:3, 3], output_shape=volume.array.shape[:3],
        order=order, mode="constant", cval=0.0,
    )


class HemorrhageSegmenter:
    """Load once, predict many: ``HemorrhageSegmenter("best_model.pth").predict("scan.nii.gz")``."""

    def __init__(self, checkpoint: str | os.PathLike, device: str | torch.device = "cpu",
                 model_type: str | None = None, overlap: float = 0.5, sw_batch_size: int = 1) -> None:
        model, meta = load_trained_sam3d(checkpoint, model_type)
        self.device = torch.device(device)
        self.model: Sam3D = model.to(self.device).eval()
        self.preprocessing = {**DEFAULT_TRANSFORM_CONFIG, **meta.get("preprocessing", {}), "augment": False}
        self.transform = build_inference_transforms(self.preprocessing)
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size

    def _preprocess(self, path: str) -> tuple[torch.Tensor, np.ndarray]:
        item = self.transform({"image": str(path)})
        image = item["image"]
        return image.as_tensor()[None].float().to(self.device), np.asarray(image.affine, dtype=np.float64)

    @torch.no_grad()
    def _automatic(self, image: torch.Tensor) -> torch.Tensor:
        size = (self.model.img_size,) * 3

        def predictor(window: torch.Tensor) -> torch.Tensor:
            low_res, _ = self.model.decode(self.model.image_encoder(window))
            return torch.sigmoid(self.model.upsample_logits(low_res))

        return sliding_window_inference(image, size, self.sw_batch_size, predictor, overlap=self.overlap,
                                        mode="gaussian", padding_mode="constant", cval=float(image.min()))[0, 0]

    @torch.no_grad()
    def _interactive(self, image: torch.Tensor, model_affine: np.ndarray, volume: Volume,
                     clicks: Sequence[Click]) -> torch.Tensor:
        points = []
        for click in clicks:
            if click.space not in ("voxel", "mm"):
                raise ValueError(f"click space must be 'voxel' or 'mm', got {click.space!r}")
            world = np.append(np.asarray(click.position, dtype=float), 1.0)
            if click.space == "voxel":
                world = volume.affine @ world
            points.append((np.linalg.inv(model_affine) @ world)[:3])
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
        low_res = torch.zeros((1, 1, *(4 * s for s in self.model.prompt_encoder.image_embedding_size)), device=self.device)
        for i in range(len(clicks)):  # refine click by click, as a user would
            low_res, _ = self.model.decode(embeddings, coords[:, : i + 1], labels[:, : i + 1], low_res)
        probabilities = torch.zeros(image.shape[-3:], device=self.device)
        window_probs = torch.sigmoid(self.model.upsample_logits(low_res))[0, 0]
        probabilities[crop] = window_probs[tuple(slice(0, int(b - a)) for a, b in zip(start, stop))]
        return probabilities

    def predict(self, path: str | os.PathLike, clicks: Sequence[Click] | None = None,
                threshold: float = 0.5) -> SegmentationResult:
        volume = load_volume(path)
        image, model_affine = self._preprocess(str(path))
        if clicks:
            probabilities = self._interactive(image, model_affine, volume, clicks)
        else:
            probabilities = self._automatic(image)
        on_input = to_input_grid(probabilities.float().cpu().numpy(), model_affine, volume, order=1)
        mask = (on_input > threshold).astype(np.uint8)
        return SegmentationResult(str(path), mask, volume.affine, volume.spacing_mm, measure(mask, volume),
                                  "interactive" if clicks else "automatic")

    def save(self, result: SegmentationResult, output_dir: str | os.PathLike, max_overlays: int = 3) -> SegmentationResult:
        """Write ``<stem>_mask.nii.gz``, ``<stem>_measurements.json`` and axial PNG overlays."""
        from PIL import Image

        from .data.io import strip_volume_extension

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = strip_volume_extension(Path(result.source).name)
        mask_path = out / f"{stem}_mask.nii.gz"
        save_nifti(mask_path, result.mask, result.affine)
        result.files["mask"] = str(mask_path)
        volume = load_volume(result.source)
        axial = int(np.argmax(np.abs(result.affine[2, :3])))
        counts = result.mask.sum(axis=tuple(i for i in range(3) if i != axial))
        chosen = np.argsort(counts)[::-1][:max_overlays] if counts.max() > 0 else [result.mask.shape[axial] // 2]
        for k in sorted(int(c) for c in chosen):
            picture = overlay_slice(np.take(volume.array, k, axis=axial), np.take(result.mask, k, axis=axial))
            png = out / f"{stem}_slice{k:03d}.png"
            Image.fromarray(picture).save(png)
            result.files.setdefault("overlays", []).append(str(png))
        json_path = out / f"{stem}_measurements.json"
        result.files["measurements"] = str(json_path)
        json_path.write_text(json.dumps(result.to_json(), indent=2))
        return result
