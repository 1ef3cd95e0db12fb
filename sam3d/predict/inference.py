"""Inference: the model's probabilities for a scan, mapped back onto the scan's own grid.

Automatic mode (no clicks) covers the whole head with model-sized windows (MONAI sliding window,
Gaussian blending), so hemorrhages larger than one window are not cut. Interactive mode takes clicks
in voxel indices of the input file or in world millimetres (RAS), crops one window around the first
click and refines the mask click by click, feeding back the previous low-res logits as SAM does.
Either way the probabilities are mapped back onto the input grid through the affines (the model grid
is RAS at the contract's spacing), so the mask has exactly the input's shape and affine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import EllipsisType

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from ich_engine.config import ConfigError
from ich_engine.stage_timing import stage

from ..data.geometry import grid_corners
from ..data.io import Volume, VolumeReadError
from ..data.preprocessing import Preprocessing
from ..data.transforms import build_inference_transforms
from ..modeling.sam3d import Sam3D
from .records import Click

__all__ = [
    "AUTOMATIC_THRESHOLD",
    "THRESHOLD",
    "ModelInput",
    "Sam3DInferer",
    "check_clicks_inside",
    "check_head_ct",
    "click_world",
    "input_box",
    "to_input_grid",
]

# The probability threshold of automatic mode when the hyperdense gate bounds the mask by density: the
# model then only has to find the bleed, and a lower threshold keeps the whole of it
# (docs/automatic_segmentation.md). Without the gate, and with clicks, 0.5.
AUTOMATIC_THRESHOLD = 0.3
THRESHOLD = 0.5


def to_input_grid(
    values: np.ndarray, model_affine: np.ndarray, volume: Volume, order: int = 1, box: tuple[slice, ...] | None = None
) -> np.ndarray:
    """Resample a model-grid array (X, Y, Z) onto the input volume's grid through both affines; with
    ``box`` only that part of the input grid is computed (the rest is 0), where ``values`` can be non-zero."""
    voxel_to_model = np.linalg.inv(model_affine) @ volume.affine
    shape = volume.array.shape[:3]
    box = box or tuple(slice(0, n) for n in shape)
    start = np.array([b.start for b in box], dtype=float)
    inside = ndimage.affine_transform(
        values,
        voxel_to_model[:3, :3],
        offset=voxel_to_model[:3, :3] @ start + voxel_to_model[:3, 3],
        output_shape=tuple(b.stop - b.start for b in box),
        order=order,
        mode="constant",
        cval=0.0,
    )
    if inside.shape == shape:
        return inside
    on_input = np.zeros(shape, dtype=inside.dtype)
    on_input[box] = inside
    return on_input


def input_box(
    model_start: np.ndarray, model_stop: np.ndarray, model_affine: np.ndarray, volume: Volume
) -> tuple[slice, ...]:
    """The input-grid voxels (slices, clipped to the scan) whose positions fall in the model-grid box
    [start, stop) widened by one model voxel, where linear interpolation can still reach."""
    corners = grid_corners(tuple(int(n) for n in model_stop - model_start + 2)) + (model_start - 1.0)[:, None]
    to_input = np.linalg.inv(volume.affine) @ model_affine
    on_input = to_input[:3, :3] @ corners + to_input[:3, 3:]
    shape = volume.array.shape[:3]
    low = np.clip(np.floor(on_input.min(1)).astype(int), 0, shape)
    high = np.clip(np.ceil(on_input.max(1)).astype(int) + 1, 0, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def click_world(click: Click, volume: Volume) -> np.ndarray:
    """Homogeneous RAS mm position (4,) of a click given in voxels of ``volume`` or in mm."""
    if click.space not in ("voxel", "mm"):
        raise ValueError(f"click space must be 'voxel' or 'mm', got {click.space!r}")
    position = np.append(np.asarray(click.position, dtype=float), 1.0)
    return volume.affine @ position if click.space == "voxel" else position


# A head is well over 100 mm across (an adult's about 150 x 190 mm, a newborn's about 100 x 120 mm): a
# field of view under this on two axes holds none. A whole head takes about 30 slices at 5 mm (15 at
# 10 mm): a handful is a partial scan, in which no hemorrhage found says nothing of the rest.
MIN_HEAD_EXTENT_MM = 100.0
MIN_HEAD_SLICES = 10


def check_head_ct(volume: Volume) -> None:
    """A blank or constant scan is refused (a clean "no hemorrhage" would be a lie); one that does not
    look like a whole head CT (no air, no bone, values outside the HU range, a field of view no head
    fits in, a handful of slices) is listed in ``volume.geometry.not_a_head_ct`` and warned, so every
    result on it (command line, JSON, report) says so."""
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
        problems.append(
            f"a field of view of {np.round(extent_mm).astype(int).tolist()} mm is too small to hold a head "
            f"(well over {MIN_HEAD_EXTENT_MM:.0f} mm across)"
        )
    directions = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
    head_to_foot = int(np.argmax(np.abs(directions[2])))
    if shape[head_to_foot] < MIN_HEAD_SLICES:
        problems.append(
            f"{shape[head_to_foot]} slices head to foot: a partial scan (a whole head takes {MIN_HEAD_SLICES} or more)"
        )
    volume.geometry.not_a_head_ct = problems
    for problem in problems:
        volume.geometry.warn(f"{volume.source}: does not look like a head CT: {problem}; read the result with care")


def check_clicks_inside(clicks: Sequence[Click], volume: Volume) -> None:
    """A click outside the scan is a mistake, not a prompt: ConfigError with the scan's bounds."""
    shape = np.array(volume.array.shape)
    to_voxel = np.linalg.inv(volume.affine)
    for click in clicks:
        voxel = (to_voxel @ click_world(click, volume))[:3]
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


@dataclass(eq=False)
class ModelInput:
    """A scan preprocessed by the model's contract, and the image embedding of every window computed on
    it so far: segment-anything's ``SamPredictor.set_image`` state, in 3-D. A new click inside a window
    already seen costs the decoder only."""

    image: torch.Tensor  # (1, C, X, Y, Z) on the model grid (RAS, the contract's spacing)
    affine: np.ndarray  # model-grid voxel -> RAS mm
    embeddings: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)


class Sam3DInferer:
    """A SAM-Med3D model behind its preprocessing contract: ``probabilities(volume, clicks)`` is the
    hemorrhage probability of every voxel of the scan's own grid (float32, the scan's shape)."""

    def __init__(
        self,
        model: Sam3D,
        preprocessing: Preprocessing,
        device: torch.device,
        overlap: float = 0.5,
        sw_batch_size: int = 1,
    ) -> None:
        self.model = model
        self.preprocessing = preprocessing
        self.transform = build_inference_transforms(preprocessing)
        self.device = device
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size

    def prepare(self, volume: Volume) -> ModelInput:
        """The scan on the model's grid, by the contract; reuse it for every click on this scan."""
        with stage("resample to model grid"):
            item = self.transform({"image": volume})
            image = item["image"]
            return ModelInput(image.as_tensor()[None].float().to(self.device), np.asarray(image.affine, np.float64))

    def probabilities(
        self, volume: Volume, clicks: Sequence[Click] = (), model_input: ModelInput | None = None
    ) -> np.ndarray:
        """``model_input``: :meth:`prepare`'s result for ``volume``, kept between calls (made if None)."""
        model_input = model_input or self.prepare(volume)
        if clicks:
            on_model_grid, start, stop = self._interactive(model_input, volume, clicks)
            box = input_box(start, stop, model_input.affine, volume)
        else:
            on_model_grid, box = self._automatic(model_input.image), None
        with stage("resample to scan grid"):
            return to_input_grid(on_model_grid.float().cpu().numpy(), model_input.affine, volume, 1, box)

    def _embed(self, window: torch.Tensor) -> torch.Tensor:
        with stage("encoder"):
            return self.model.image_encoder(window)

    def _decode(self, embeddings: torch.Tensor, *prompts: torch.Tensor | None) -> torch.Tensor:
        with stage("decoder"):
            low_res, _ = self.model.decode(embeddings, *prompts)
            return low_res

    @torch.no_grad()
    def _automatic(self, image: torch.Tensor) -> torch.Tensor:
        size = (self.model.img_size,) * 3

        def predictor(window: torch.Tensor) -> torch.Tensor:
            low_res = self._decode(self._embed(window))
            with stage("decoder"):
                return torch.sigmoid(self.model.upsample_logits(low_res))

        probabilities = sliding_window_inference(
            image,
            size,
            self.sw_batch_size,
            predictor,
            overlap=self.overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=float(image.min()),
        )
        assert isinstance(probabilities, torch.Tensor)  # one tensor per window in, one tensor out
        return probabilities[0, 0]

    @torch.no_grad()
    def _interactive(
        self, model_input: ModelInput, volume: Volume, clicks: Sequence[Click]
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Probabilities on the model grid (0 outside the window) and the window's [start, stop) there."""
        image = model_input.image
        points = [(np.linalg.inv(model_input.affine) @ click_world(click, volume))[:3] for click in clicks]
        size = self.model.img_size
        grid = np.array(image.shape[-3:])
        # One window around the first click, shifted inside the scan where possible.
        start = np.clip(np.round(points[0]).astype(int) - size // 2, 0, np.maximum(grid - size, 0))
        stop = np.minimum(start + size, grid)
        crop = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))  # on the scan's grid
        inside = tuple(slice(0, int(b - a)) for a, b in zip(start, stop))  # the same voxels in the window
        key = (int(start[0]), int(start[1]), int(start[2]))
        if key not in model_input.embeddings:
            window = torch.full((1, image.shape[1], size, size, size), float(image.min()), device=self.device)
            batch_and_channels: tuple[EllipsisType | slice, ...] = (...,)
            window[batch_and_channels + inside] = image[batch_and_channels + crop]
            model_input.embeddings[key] = self._embed(window)
        embeddings = model_input.embeddings[key]
        coords = torch.tensor(np.stack(points) - start, dtype=torch.float32, device=self.device)[None]
        labels = torch.tensor([[1 if c.positive else 0 for c in clicks]], device=self.device)
        low_res = torch.zeros(
            (1, 1, *(4 * s for s in self.model.prompt_encoder.image_embedding_size)), device=self.device
        )
        for i in range(len(clicks)):  # refine click by click, as a user would
            low_res = self._decode(embeddings, coords[:, : i + 1], labels[:, : i + 1], low_res)
        probabilities = torch.zeros(image.shape[-3:], device=self.device)
        with stage("decoder"):
            window_probs = torch.sigmoid(self.model.upsample_logits(low_res))[0, 0]
        probabilities[crop] = window_probs[inside]
        return probabilities, start, stop
