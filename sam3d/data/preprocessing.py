"""The preprocessing contract: how a head CT becomes the model's input, one typed value for all.

SAM-Med3D users' most common failure is a model that scores well in training and badly at inference
because the two preprocessed scans differently. Here one frozen :class:`Preprocessing` is built from
``train.py``'s flags and YAML (:func:`add_preprocessing_arguments`, :func:`preprocessing_from_args`),
saved in every checkpoint and exported encoder (``to_dict``), and read back by everything that
preprocesses a scan (training, validation, predict, evaluate, the report towers, the app) with
:meth:`Preprocessing.from_checkpoint`. Its field names are the flag names and the checkpoint keys.
Checkpoints without one (official SAM-Med3D) get the defaults, which are SAM-Med3D's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LEGACY_KEYS",
    "Preprocessing",
    "PreprocessingMismatch",
    "add_preprocessing_arguments",
    "preprocessing_from_args",
]

NORMALIZATIONS = ("zscore", "brain_window")
# Older flag / key names, still read from command lines, YAML configs and checkpoints.
LEGACY_KEYS = {"target_spacing": "target_spacing_mm", "lesion_jitter": "lesion_jitter_voxels"}


class PreprocessingMismatch(UserWarning):
    """An explicit flag differs from the preprocessing the model was trained with."""


def _help(text: str, training_only: bool = False) -> dict[str, Any]:
    return {"help": text, "training_only": training_only}


@dataclass(frozen=True)
class Preprocessing:
    """What a scan goes through before the model (see ``sam3d.data.transforms`` for the steps).

    Fields marked training-only (crop sampling, augmentation) shape how a model is trained, not
    what it expects at inference; ``for_inference()`` turns augmentation off.
    """

    orientation: str = field(default="RAS", metadata=_help("axis codes every scan is reoriented to"))
    target_spacing_mm: tuple[float, float, float] = field(
        default=(1.5, 1.5, 1.5), metadata=_help("resampling spacing in mm (SAM-Med3D's pre-training data: 1.5 mm)")
    )
    roi_size: tuple[int, int, int] = field(
        default=(128, 128, 128), metadata=_help("model input cube in voxels (set from the model's img_size)")
    )
    hu_clamp: tuple[float, float] = field(default=(-1000.0, 1000.0), metadata=_help("HU clamp MIN MAX (air .. bone)"))
    normalization: str = field(
        default="zscore",
        metadata=_help("zscore: official SAM-Med3D (stats over voxels > 0); brain_window: HU windows to [0,1]"),
    )
    hu_windows: tuple[tuple[float, float], ...] = field(
        default=((40.0, 80.0),),
        metadata=_help("(level, width) HU windows for brain_window normalisation, one input channel each"),
    )
    head_threshold_hu: float = field(
        default=-500.0, metadata=_help("voxels above this are 'head' when centring crops of negatives")
    )
    augment: bool = field(default=True, metadata=_help("random flips, small affine, intensity", training_only=True))
    lesion_jitter_voxels: int = field(
        default=8, metadata=_help("random shift (voxels) of the lesion-centred crop", training_only=True)
    )
    # Automatic (whole-head sliding-window) prediction shows the model skull, scalp and air edges far
    # from the brain's centre; with only lesion- and head-centred crops it never learns that these hold
    # no blood and marks the inner skull table. Positives get a smaller share so most of their crops
    # still contain the lesion.
    negative_random_crop_prob: float = field(
        default=0.5,
        metadata=_help("share of crops of hemorrhage-free scans centred anywhere in the head", training_only=True),
    )
    positive_random_crop_prob: float = field(
        default=0.2,
        metadata=_help("share of crops of scans with a hemorrhage centred anywhere in the head", training_only=True),
    )
    flip_axes: tuple[int, ...] = field(
        default=(0,),
        metadata=_help("RAS axes of random flips (0 = left-right; other flips are not anatomical)", training_only=True),
    )

    def __post_init__(self) -> None:
        coerce: dict[str, Callable[[Any], Any]] = {
            "target_spacing_mm": lambda v: tuple(float(s) for s in v),
            "roi_size": lambda v: tuple(int(s) for s in v),
            "hu_clamp": lambda v: tuple(float(s) for s in v),
            "head_threshold_hu": float,
            "lesion_jitter_voxels": int,
            "negative_random_crop_prob": float,
            "positive_random_crop_prob": float,
            "flip_axes": lambda v: tuple(int(a) for a in v),
            "augment": bool,
        }
        object.__setattr__(self, "hu_windows", _windows(self.hu_windows))
        for key, convert in coerce.items():
            value = getattr(self, key)
            try:
                object.__setattr__(self, key, convert(value))
            except (TypeError, ValueError):
                raise ValueError(f"{key}: cannot read {value!r}") from None
        self._check()

    def _check(self) -> None:
        """ValueError naming the field for a contract the pipelines would refuse."""
        if self.orientation != "RAS":
            raise ValueError(f"orientation must be 'RAS' (axis 0 = left-right is assumed), got {self.orientation!r}")
        if len(self.target_spacing_mm) != 3 or min(self.target_spacing_mm) <= 0:
            raise ValueError(f"target_spacing_mm must be 3 positive numbers, got {self.target_spacing_mm}")
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be 3 positive ints, got {self.roi_size}")
        if len(self.hu_clamp) != 2 or self.hu_clamp[0] >= self.hu_clamp[1]:
            raise ValueError(f"hu_clamp must be MIN < MAX, got {self.hu_clamp}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be 'zscore' or 'brain_window', got {self.normalization!r}")
        if self.lesion_jitter_voxels < 0:
            raise ValueError(f"lesion_jitter_voxels must be >= 0, got {self.lesion_jitter_voxels}")
        for key in ("negative_random_crop_prob", "positive_random_crop_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if any(axis not in (0, 1, 2) for axis in self.flip_axes):
            raise ValueError(f"flip_axes must be spatial axes 0, 1 or 2, got {self.flip_axes}")

    @property
    def num_input_channels(self) -> int:
        """1 for z-score, one per HU window for brain_window."""
        return len(self.hu_windows) if self.normalization == "brain_window" else 1

    def for_inference(self) -> Preprocessing:
        return dataclasses.replace(self, augment=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON- and checkpoint-friendly (lists, not tuples)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, source: str = "preprocessing") -> Preprocessing:
        """From a checkpoint's or config's mapping. Older layouts (``target_spacing``, missing keys)
        still load; an unknown key is a warning naming it, a bad value a ValueError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        given: dict[str, Any] = {}
        for key, value in (values or {}).items():
            key = LEGACY_KEYS.get(key, key)
            if key in known:
                given[key] = value
            else:
                warnings.warn(f"{source}: unknown preprocessing key {key!r} ignored", stacklevel=2)
        return cls(**given)

    @classmethod
    def coerce(cls, value: Preprocessing | Mapping[str, Any] | None) -> Preprocessing:
        """A contract from itself, its dict form (checkpoint payloads) or None (the defaults)."""
        return value if isinstance(value, Preprocessing) else cls.from_dict(value)

    @classmethod
    def from_checkpoint(cls, meta: Mapping[str, Any], source: str = "checkpoint") -> Preprocessing:
        """The contract a model was trained with (``meta["preprocessing"]``), for inference; official
        checkpoints carry none and get SAM-Med3D's defaults."""
        return cls.from_dict(meta.get("preprocessing"), source).for_inference()


def _windows(value: Any) -> tuple[tuple[float, float], ...]:
    if isinstance(value, str):
        value = json.loads(value)
    if (
        not isinstance(value, (list, tuple))
        or not value
        or any(
            not isinstance(w, (list, tuple))
            or len(w) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in w)
            or w[1] <= 0
            for w in value
        )
    ):
        raise ValueError(f"hu_windows must be a list of [level, width] pairs in HU with width > 0, got {value!r}")
    return tuple((float(level), float(width)) for level, width in value)


_FLAG_TYPES: dict[str, dict[str, Any]] = {
    "orientation": {"choices": ["RAS"]},
    "target_spacing_mm": {"type": float, "nargs": 3, "metavar": ("X", "Y", "Z")},
    "hu_clamp": {"type": float, "nargs": 2, "metavar": ("MIN", "MAX")},
    "normalization": {"choices": list(NORMALIZATIONS)},
    "hu_windows": {"type": json.loads, "metavar": "JSON"},
    "head_threshold_hu": {"type": float},
    "augment": {"action": argparse.BooleanOptionalAction},
    "lesion_jitter_voxels": {"type": int},
    "negative_random_crop_prob": {"type": float},
    "positive_random_crop_prob": {"type": float},
    "flip_axes": {"type": int, "nargs": "*"},
}


def add_preprocessing_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """One flag per contract field (``roi_size`` follows the model's ``--img_size``), named as the
    field, older names as aliases. Defaults are None: a flag not given takes the value of the
    ``--checkpoint``'s contract, else the default shown (see :func:`preprocessing_from_args`)."""
    g = parser.add_argument_group("preprocessing (saved in every checkpoint; predict and export read it back)")
    aliases = {new: old for old, new in LEGACY_KEYS.items()}
    for f in dataclasses.fields(Preprocessing):
        if f.name == "roi_size":
            continue
        flags = [f"--{f.name}"] + ([f"--{aliases[f.name]}"] if f.name in aliases else [])
        inherited = "" if f.metadata["training_only"] else "the --checkpoint's, else "
        help_text = f"{f.metadata['help']} (default: {inherited}{_flag_value(f.default)})"
        g.add_argument(*flags, default=None, help=help_text, **_FLAG_TYPES[f.name])
    return g


def preprocessing_from_args(
    args: argparse.Namespace, roi_size: int, model_contract: Mapping[str, Any] | None = None, source: str = ""
) -> Preprocessing:
    """The contract of a training run: each flag given, else the model's (``model_contract``, from
    the ``--checkpoint`` being fine-tuned) for what the model expects, else the default. A flag that
    differs from the model's contract is a :class:`PreprocessingMismatch` warning naming both."""
    base = Preprocessing.from_dict(model_contract, source) if model_contract else Preprocessing()
    values: dict[str, Any] = {"roi_size": (roi_size,) * 3}
    for f in dataclasses.fields(Preprocessing):
        if f.name == "roi_size":
            continue
        given = getattr(args, f.name, None)
        inherit = model_contract is not None and not f.metadata["training_only"]
        values[f.name] = given if given is not None else getattr(base if inherit else Preprocessing(), f.name)
    contract = Preprocessing(**values)
    if model_contract:
        for f in dataclasses.fields(Preprocessing):
            if f.metadata["training_only"] or f.name == "roi_size" or getattr(args, f.name, None) is None:
                continue
            if getattr(contract, f.name) != getattr(base, f.name):
                warnings.warn(
                    f"--{f.name} {_shown(getattr(contract, f.name))} differs from the preprocessing {source} was "
                    f"trained with ({_shown(getattr(base, f.name))}); training uses the flag",
                    PreprocessingMismatch,
                    stacklevel=2,
                )
    return contract


def _flag_value(value: Any) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return json.dumps(value)
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, tuple) else str(value)
