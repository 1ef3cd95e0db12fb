"""MONAI dictionary pipelines that turn a head-CT scan (+ hemorrhage mask) into SAM-Med3D input.

Items are dicts with ``"image"`` (a path) and, for training, ``"label"`` (a mask path, or None for
an ``ich=0`` scan that has no mask). Every tensor is a ``monai.data.MetaTensor`` (C, X, Y, Z) whose
``affine`` (voxel -> RAS mm) is updated by each spatial step, so a crop can always be located in the
original scan.

Training/validation pipeline, in order (``build_transforms``):

1. ``LoadVolumed``       read any format (``sam3d.data.io``), channel-first, affine in meta
2. ``EnsureTyped``       float32 MetaTensor
3. ``Orientationd``      RAS axes, so "axis 0 = left-right" holds for every scan
4. ``Spacingd``          resample to ``target_spacing_mm`` (bilinear image, nearest label)
5. ``ClampHUd``          clamp to ``hu_clamp`` (values are still HU)
6. ``CropAroundLesiond`` ``roi_size`` box around the lesion, or around the head for negatives; in
   training a share of crops (``negative_random_crop_prob`` / ``positive_random_crop_prob``) is
   centred anywhere in the head instead, so skull, scalp and air edges are seen as background. It
   runs before normalisation because the head is found with a HU threshold and padding uses air.
7. spatial augmentation  (training only) left-right flip, small rotation/scaling
8. normalisation         ``zscore`` (SAM-Med3D's own) or ``brain_window``
9. intensity augmentation (training only) scale/shift/noise. It runs after normalisation because a
   z-score would undo a global intensity scale or shift applied before it.
10. label -> float32 {0, 1}

Output: image float32 (C, *roi_size) with C = ``Preprocessing.num_input_channels``, label float32
(1, *roi_size) in {0, 1}. Steps 1-5 are deterministic, so ``monai.data.PersistentDataset`` caches
them; caching stops at ``CropAroundLesiond``, which is randomised (jitter).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    AsDiscreted,
    BorderPad,
    Compose,
    EnsureTyped,
    MapTransform,
    Orientationd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialCrop,
)
from monai.utils import convert_to_tensor

from sam3d.data.io import Volume, VolumeReadError, align_mask_to_volume, load_volume
from sam3d.data.preprocessing import Preprocessing

__all__ = [
    "BrainWindowd",
    "ClampHUd",
    "CropAroundLesiond",
    "LoadVolumed",
    "ZNormalizeForegroundd",
    "build_inference_transforms",
    "build_transforms",
]


class LoadVolumed(MapTransform):
    """Load ``keys`` with :func:`sam3d.data.io.load_volume` into channel-first MetaTensors.

    The first key is the image; later keys are its masks. An entry is a path or a
    :class:`~sam3d.data.io.Volume` already read (read once, e.g. with a DICOM series chosen). A mask
    entry that is ``None`` (an ``ich=0`` scan without a mask file) becomes an all-zero volume on the
    image's grid. A mask must match the image's shape and affine; if only one of the two files
    carries geometry (e.g. a bare ``.pkl`` array with a NIfTI mask) the other one inherits it.

    Output per key: float32 MetaTensor (1, X, Y, Z) with ``affine`` (voxel -> RAS mm) and meta
    ``filename_or_obj`` (path, "" for a synthesised mask), ``spacing_mm`` (as read),
    ``geometry_known``, ``original_affine`` and ``spatial_shape`` (to map predictions back).
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image_key, *mask_keys = self.keys
        image = _volume(d[image_key])
        masks: dict[Hashable, Volume] = {}
        for key in mask_keys:
            if key not in d:
                if not self.allow_missing_keys:
                    raise KeyError(f"key {key!r} is missing from the data item")
            elif d[key] is None:
                empty = np.zeros(image.array.shape, dtype=np.uint8)
                masks[key] = Volume(empty, image.affine, image.spacing_mm, "", image.geometry_known)
            else:
                image, masks[key] = align_mask_to_volume(image, _volume(d[key]))
                values = masks[key].array
                if not np.all((values == 0) | (values == 1)):  # also when --validate_data paths skipped the read
                    raise VolumeReadError(
                        f"{masks[key].source}: a mask must hold only 0 and 1, found values "
                        f"{np.unique(values)[:10].tolist()}"
                    )
        d[image_key] = _to_meta_tensor(image)
        for key, mask in masks.items():
            # The image's exact affine (masks agree within 1e-3 mm): Spacingd sizes its output grid
            # from the affine, so a rounding difference could give image and mask different shapes.
            d[key] = _to_meta_tensor(mask, image.affine)
        return d


def _volume(entry: object) -> Volume:
    if isinstance(entry, Volume):
        return entry
    if not isinstance(entry, (str, os.PathLike)):
        raise TypeError(f"a volume entry must be a path or a Volume, got {type(entry).__name__}")
    return load_volume(entry)


def _to_meta_tensor(volume: Volume, affine: np.ndarray | None = None) -> MetaTensor:
    """(X, Y, Z) Volume -> float32 MetaTensor (1, X, Y, Z); ``affine`` overrides the volume's."""
    affine_t = torch.as_tensor(volume.affine if affine is None else affine, dtype=torch.float64)
    meta = {
        "filename_or_obj": volume.source,
        "spacing_mm": volume.spacing_mm,
        "geometry_known": volume.geometry_known,
        "original_affine": affine_t.clone(),
        "spatial_shape": torch.as_tensor(volume.array.shape),
    }
    array = torch.from_numpy(volume.array.astype(np.float32, copy=False))[None]
    return MetaTensor(array, affine=affine_t, meta=meta)


class ClampHUd(MapTransform):
    """Clamp intensities to [hu_min, hu_max] HU: metal and beyond-air values carry no information."""

    def __init__(self, keys: KeysCollection, hu_min: float = -1000.0, hu_max: float = 1000.0):
        super().__init__(keys)
        if hu_min >= hu_max:
            raise ValueError(f"hu_min ({hu_min}) must be below hu_max ({hu_max})")
        self.hu_min, self.hu_max = float(hu_min), float(hu_max)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.clamp(d[key], self.hu_min, self.hu_max)
        return d


class ZNormalizeForegroundd(MapTransform):
    """SAM-Med3D's normalisation: ``(x - mean) / std`` with mean/std taken over voxels > 0 only.

    Statistics come from the foreground (after ``ClampHUd`` in HU: brain, blood, bone; not air or
    fat) so the amount of air in the field of view does not shift them; they are applied to every
    voxel. With no voxel > 0 the whole volume is used. If std < ``eps`` (constant values) the volume
    is only shifted by the mean, rather than blown up by dividing by ~0.
    """

    def __init__(self, keys: KeysCollection, eps: float = 1e-6):
        super().__init__(keys)
        self.eps = eps

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = convert_to_tensor(d[key], track_meta=False)  # statistics need no meta bookkeeping
            foreground = x > 0
            values = (x[foreground] if bool(foreground.any()) else x.reshape(-1)).double()
            mean = values.mean().item()
            std = values.std(correction=0).item()
            std = std if std >= self.eps else 1.0
            d[key] = (d[key] - mean) / std
        return d


class BrainWindowd(MapTransform):
    """Map HU to [0, 1] through CT display windows, one output channel per window.

    A (level, width) window maps ``level - width/2`` -> 0 and ``level + width/2`` -> 1, clipping
    outside. Input (1, X, Y, Z) HU; output (len(windows), X, Y, Z). The model must be built with
    ``in_chans = len(windows)``; SAM-Med3D's pre-trained patch embedding has one channel, so more
    than one window needs a re-initialised or widened first layer.
    """

    def __init__(self, keys: KeysCollection, windows: Sequence[Sequence[float]] = ((40.0, 80.0),)):
        super().__init__(keys)
        self.windows = [(float(level), float(width)) for level, width in windows]
        if not self.windows or any(width <= 0 for _, width in self.windows):
            raise ValueError(f"windows must be a non-empty list of (level, width > 0), got {windows!r}")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            channels = [((x - (level - width / 2)) / width).clamp(0.0, 1.0) for level, width in self.windows]
            d[key] = torch.cat(channels, dim=0)
        return d


class CropAroundLesiond(Randomizable, MapTransform):
    """Crop a ``roi_size`` box centred on the lesion (or the head when there is none), padding as needed.

    Centre: the bounding-box centre of ``label > 0.5``; if the label is empty or absent (negative
    scan, inference) the bounding-box centre of ``image > foreground_threshold_hu``, so the image
    must still be in HU (place this transform before normalisation); with no such voxel, the volume
    centre. For training, ``jitter_voxels`` shifts the centre by a random integer in
    [-jitter, jitter] per axis so the lesion is not always in the middle, and with probability
    ``negative_random_prob`` (empty label) or ``positive_random_prob`` (lesion present) the centre is
    instead a uniformly random point of the head's bounding box, so crops also show the skull, scalp
    and surrounding air (such a crop of a positive scan may hold part of the lesion or none of it).
    All randomness comes from the transform's own RNG (``set_random_state``), and every call draws the
    same numbers whichever branch it takes, so a seeded pipeline repeats its crops exactly.

    The box stays centred even at the volume border (as torchio's ``CropOrPad`` does with a mask):
    the part outside the scan is padded with the image's minimum (air after
    ``ClampHUd``) and 0 for masks. MONAI's ``SpatialCrop``/``BorderPad`` do the work so the affine
    follows. Input (C, X, Y, Z) per key, output (C, *roi_size).
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        roi_size: Sequence[int] = (128, 128, 128),
        label_key: str = "label",
        image_key: str = "image",
        foreground_threshold_hu: float = -500.0,
        jitter_voxels: int = 0,
        negative_random_prob: float = 0.0,
        positive_random_prob: float = 0.0,
        allow_missing_keys: bool = True,
    ):
        super().__init__(keys, allow_missing_keys)
        self.roi_size = np.asarray(roi_size, dtype=int)
        if self.roi_size.shape != (3,) or np.any(self.roi_size < 1):
            raise ValueError(f"roi_size must be 3 positive ints, got {roi_size!r}")
        if jitter_voxels < 0:
            raise ValueError(f"jitter_voxels must be >= 0, got {jitter_voxels}")
        for name, prob in (
            ("negative_random_prob", negative_random_prob),
            ("positive_random_prob", positive_random_prob),
        ):
            if not 0.0 <= prob <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {prob}")
        self.label_key, self.image_key = label_key, image_key
        self.foreground_threshold_hu = foreground_threshold_hu
        self.jitter_voxels = int(jitter_voxels)
        self.negative_random_prob, self.positive_random_prob = float(negative_random_prob), float(positive_random_prob)
        self._jitter = np.zeros(3, dtype=int)

    def randomize(self, data: object = None) -> None:
        self._jitter = self.R.randint(-self.jitter_voxels, self.jitter_voxels + 1, size=3)
        self._random_draw = self.R.uniform()
        self._head_fraction = self.R.uniform(size=3)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image = d[self.image_key]
        shape = np.asarray(image.shape[1:])
        label = d.get(self.label_key)
        lesion = _bbox(label > 0.5) if label is not None else None
        head = _bbox(image > self.foreground_threshold_hu)
        self.randomize()
        random_prob = self.negative_random_prob if lesion is None else self.positive_random_prob
        if head is not None and self._random_draw < random_prob:
            centre = head[0] + self._head_fraction * (head[1] - head[0])
        else:
            box = lesion if lesion is not None else head
            middle = (box[0] + box[1]) / 2 if box is not None else (shape - 1) / 2
            centre = middle + self._jitter
        centre = np.clip(centre, 0, shape - 1)
        # Put `centre` at the output's middle, (roi - 1) / 2, rounding half up.
        start = np.floor(centre - (self.roi_size - 1) / 2 + 0.5).astype(int)
        end = start + self.roi_size
        crop = SpatialCrop(roi_start=np.maximum(start, 0), roi_end=np.minimum(end, shape))
        pad_before, pad_after = np.maximum(-start, 0), np.maximum(end - shape, 0)
        border = [int(b) for axis in range(3) for b in (pad_before[axis], pad_after[axis])]  # BorderPad order
        for key in self.key_iterator(d):
            out = crop(d[key])
            if any(border):
                fill = float(d[key].min()) if key == self.image_key else 0.0
                out = BorderPad(border, mode="constant", value=fill)(out)
            d[key] = out
        return d


def _bbox(mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """First and last voxel index (3,) each of the bounding box of a (C, X, Y, Z) boolean mask; None if empty."""
    mask = convert_to_tensor(mask, track_meta=False).any(dim=0)
    first, last = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = torch.nonzero(mask.any(dim=other)).flatten()
        if hits.numel() == 0:
            return None
        first.append(hits[0].item())
        last.append(hits[-1].item())
    return np.asarray(first, dtype=float), np.asarray(last, dtype=float)


# ----------------------------------------------------------------------------------------------
# Builders


def build_transforms(preprocessing: Preprocessing | Mapping | None, train: bool) -> Compose:
    """Training (``train=True``) or validation pipeline; see the module docstring for the steps.

    Args:
        preprocessing: the contract (or its dict form; None: the defaults).
        train: adds centre jitter, crops centred anywhere in the head and, if ``augment``,
            augmentation. Seed it with ``compose.set_random_state(seed)``; MONAI's DataLoader seeds each worker.

    Items need ``"image"``; ``"label"`` may be a path, None (empty mask) or absent.
    """
    c = Preprocessing.coerce(preprocessing)
    keys = ["image", "label"]
    augment = train and c.augment
    steps = _resampling_steps(c, keys)
    steps.append(
        CropAroundLesiond(
            keys,
            roi_size=c.roi_size,
            foreground_threshold_hu=c.head_threshold_hu,
            jitter_voxels=c.lesion_jitter_voxels if train else 0,
            negative_random_prob=c.negative_random_crop_prob if train else 0.0,
            positive_random_prob=c.positive_random_crop_prob if train else 0.0,
        )
    )
    if augment:
        steps += [RandFlipd(keys, prob=0.5, spatial_axis=axis, allow_missing_keys=True) for axis in c.flip_axes]
        steps.append(
            RandAffined(
                keys,
                prob=0.3,
                rotate_range=(np.deg2rad(10.0),) * 3,  # radians, each axis
                scale_range=(0.1,) * 3,  # zoom factor 1 +- 0.1
                mode=("bilinear", "nearest"),
                padding_mode=("border", "zeros"),
                spatial_size=c.roi_size,
                cache_grid=True,
                allow_missing_keys=True,
            )
        )
    steps.append(_normalization(c))
    if augment:
        # Units are those of the normalised image (z-scores, or [0, 1] for windows).
        steps += [
            RandScaleIntensityd("image", factors=0.1, prob=0.3),
            RandShiftIntensityd("image", offsets=0.1, prob=0.3),
            RandGaussianNoised("image", prob=0.2, std=0.05),
        ]
    steps += [
        AsDiscreted("label", threshold=0.5, allow_missing_keys=True),
        EnsureTyped(keys, dtype=torch.float32, track_meta=True, allow_missing_keys=True),
    ]
    return Compose(steps)


def build_inference_transforms(preprocessing: Preprocessing | Mapping | None) -> Compose:
    """Whole-scan pipeline for sliding-window prediction: load, RAS, resample, clamp, normalise.

    No label, no crop: output image float32 (C, X, Y, Z) at ``target_spacing_mm``. Its
    ``applied_operations`` let ``monai.transforms.Invertd`` map a prediction back to the scan's grid.
    Z-score statistics come from the whole scan here rather than a 128^3 crop, a small difference.
    """
    c = Preprocessing.coerce(preprocessing)
    steps = _resampling_steps(c, ["image"])
    steps += [_normalization(c), EnsureTyped("image", dtype=torch.float32, track_meta=True)]
    return Compose(steps)


def _resampling_steps(c: Preprocessing, keys: list[str]) -> list:
    """Deterministic prefix shared by all pipelines: load -> float32 -> RAS -> spacing -> HU clamp."""
    return [
        LoadVolumed(keys),
        EnsureTyped(keys, dtype=torch.float32, track_meta=True, allow_missing_keys=True),
        Orientationd(keys, axcodes=c.orientation, labels=None, allow_missing_keys=True),
        Spacingd(
            keys,
            pixdim=c.target_spacing_mm,
            mode=("bilinear", "nearest")[: len(keys)],
            dtype=np.float32,
            allow_missing_keys=True,
        ),
        ClampHUd("image", *c.hu_clamp),
    ]


def _normalization(c: Preprocessing) -> MapTransform:
    if c.normalization == "zscore":
        return ZNormalizeForegroundd("image")
    return BrainWindowd("image", windows=c.hu_windows)
