"""The predictor: a scan (read once, a :class:`~sam3d.data.io.Volume`) → inference → post-processing →
measurement → files. Load once, predict many."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import psutil
import pydicom
import torch
from PIL import Image

from ich_engine.stage_timing import stage

from .. import __version__
from ..data.dicom_seg import hemorrhage_seg, mask_on_frames
from ..data.dicom_sr import hemorrhage_sr
from ..data.errors import VolumeReadError
from ..data.io import Volume, load_volume, save_nifti, strip_volume_extension
from ..data.preprocessing import Preprocessing
from ..modeling import load_trained_sam3d
from ..modeling.sam3d import Sam3D
from ..visualize import SliceView, axial_overlay
from .inference import (
    AUTOMATIC_THRESHOLD,
    THRESHOLD,
    ModelInput,
    Sam3DInferer,
    check_clicks_inside,
    check_head_ct,
    click_world,
)
from .location import IntracranialFrame
from .measurement import head_centre_x_mm, measure_in_frame
from .postprocessing import (
    BONE_THRESHOLD_HU,
    INTRACRANIAL_MARGIN_MM,
    MIN_COMPONENT_HU,
    MIN_COMPONENT_ML,
    SKULL_BASE_MARGIN_MM,
    PostprocessingOptions,
    intracranial_mask,
    postprocess_mask,
    skull_base_bone,
)
from .records import Click, SegmentationResult

__all__ = ["HemorrhageSegmenter", "PreparedScan", "check_memory_for", "dicom_objects"]

DICOM_OBJECT_SUFFIXES = {"dicom_seg": "seg.dcm", "dicom_sr": "sr.dcm"}
DICOM_OBJECT_NAMES = {"dicom_seg": "DICOM SEG", "dicom_sr": "DICOM SR"}


def dicom_objects(
    result: SegmentationResult, report_sections: tuple[str, str] | None = None
) -> tuple[dict[str, pydicom.Dataset], dict[str, str]]:
    """The DICOM SEG and SR of a result on a DICOM series, made in memory: ({"dicom_seg": SEG,
    "dicom_sr": SR}, {the kind of each one that cannot be made: why}).

    One that cannot be made (highdicom's checks of the source slices, e.g. slices with different frames
    of reference) is a reason, not an error: the mask, measurements and report hold without it, and an
    SR without its SEG has nothing to refer to.
    """
    series = result.volume.dicom
    assert series is not None, "a DICOM SEG needs the DICOM series the scan was read from"
    made: dict[str, pydicom.Dataset] = {}
    try:
        with stage("DICOM SEG writing"):
            frames = mask_on_frames(result.mask, result.volume.affine, series)
            made["dicom_seg"] = hemorrhage_seg(frames, series, __version__)
    except Exception as err:  # whatever highdicom refuses in the source slices; written files are not at stake
        return made, {"dicom_seg": _reason(err), "dicom_sr": "no DICOM SEG for its measurements to refer to"}
    try:
        with stage("DICOM SR writing"):
            seg = made["dicom_seg"]
            made["dicom_sr"] = hemorrhage_sr(result.measurements, seg, series, __version__, report_sections)
    except Exception as err:
        return made, {"dicom_sr": _reason(err)}
    return made, {}


# Peak memory of segmenting a scan beyond the model's, per voxel of the scan's grid: measured about 18
# bytes (444x533x32 against 111x133x32 voxels: the scan as read, float32 probabilities mapped back onto
# it, masks, component labels), with headroom. A 512x512x1000 head CT needs about 6 GB.
SEGMENTATION_BYTES_PER_VOXEL = 24


def check_memory_for(volume: Volume) -> None:
    """Refuse a scan whose segmentation would not fit in the memory available now, before any of it is
    computed: one line naming the scan, its size and the limit, not a MemoryError minutes later."""
    shape = volume.array.shape[:3]
    need = int(np.prod(shape)) * SEGMENTATION_BYTES_PER_VOXEL
    available = psutil.virtual_memory().available
    if need > available:
        raise VolumeReadError(
            f"{volume.source}: {'x'.join(map(str, shape))} voxels need about {_bytes(need)} to segment "
            f"({SEGMENTATION_BYTES_PER_VOXEL} bytes a voxel), but {_bytes(available)} of memory is "
            "available; crop or downsample the scan, or free memory"
        )


def _bytes(count: int) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{count / 1e6:.0f} MB"


def _reason(err: Exception) -> str:
    return str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"


@dataclass(eq=False)
class PreparedScan:
    """A scan ready for repeated prediction (:meth:`HemorrhageSegmenter.prepare`): the volume as read,
    its model input with the image embeddings computed so far, and the parts of post-processing and
    measurement that depend on the scan alone, each computed on first use."""

    volume: Volume
    model_input: ModelInput
    _cavities: dict[tuple[float, float], np.ndarray] = field(default_factory=dict, repr=False)
    _skull_bases: dict[float, np.ndarray | None] = field(default_factory=dict, repr=False)
    _frame: tuple[IntracranialFrame | None] | None = field(default=None, repr=False)

    def cavity(self, options: PostprocessingOptions) -> np.ndarray:
        """The intracranial space for ``options``' bone threshold and margin."""
        key = (options.get("bone_hu", BONE_THRESHOLD_HU), options.get("margin_mm", INTRACRANIAL_MARGIN_MM))
        if key not in self._cavities:
            with stage("post-processing"):
                self._cavities[key] = intracranial_mask(self.volume, *key)
        return self._cavities[key]

    def skull_base(self, options: PostprocessingOptions) -> np.ndarray | None:
        """The skull base's bone for ``options``' bone threshold (None: no bone in the scan)."""
        key = options.get("bone_hu", BONE_THRESHOLD_HU)
        if key not in self._skull_bases:
            with stage("post-processing"):
                self._skull_bases[key] = skull_base_bone(self.volume, key)
        return self._skull_bases[key]

    def frame(self) -> IntracranialFrame | None:
        """The inner table's distances, the ventricles and the midline that locate each component
        (None when the scan shows no skull), from the default intracranial space."""
        if self._frame is None:
            cavity = self.cavity({})
            with stage("measurement"):
                self._frame = (IntracranialFrame.from_scan(self.volume, cavity, head_centre_x_mm(self.volume)),)
        return self._frame[0]


class HemorrhageSegmenter:
    """Load once, predict many: ``HemorrhageSegmenter("best_model.pth").predict("scan.nii.gz")``.

    Post-processing (see :func:`postprocess_mask`), on by default:

    - ``restrict_intracranial``: clear predictions outside the skull's cavity, found from the scan by
      a ``bone_hu`` threshold, slice-wise hole filling and a ``margin_mm`` erosion off the inner table.
      It assumes an intact skull; turn it off for skull-stripped images or after a craniectomy.
    - ``min_component_hu`` / ``min_voxel_hu``: keep hyperdense (acute) blood only; None turns it off
      (subacute or chronic hemorrhage, contrast-free scans of anaemic patients).
    - ``skull_base_margin_mm``: clear predictions this close to the skull base's bone (petrous ridges,
      clivus, sella: bone deep below the head's surface), whose partial volume reads as blood; 0 keeps them.
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
        **postprocessing: Unpack[PostprocessingOptions],
    ) -> None:
        """``postprocessing``: keywords of :func:`postprocess_mask` (its defaults for those left out)."""
        min_ml = postprocessing.get("min_component_ml", MIN_COMPONENT_ML)
        margin_mm = postprocessing.get("margin_mm", INTRACRANIAL_MARGIN_MM)
        base_mm = postprocessing.get("skull_base_margin_mm", SKULL_BASE_MARGIN_MM)
        if min(min_ml, margin_mm, base_mm) < 0:
            raise ValueError(
                "min_component_ml, margin_mm and skull_base_margin_mm must be >= 0, got "
                f"{min_ml}, {margin_mm} and {base_mm}"
            )
        model, meta = load_trained_sam3d(checkpoint, model_type)
        self.device = torch.device(device)
        self.model: Sam3D = model.to(self.device).eval()
        self.preprocessing = Preprocessing.from_checkpoint(meta, str(checkpoint))
        self.inferer = Sam3DInferer(self.model, self.preprocessing, self.device, overlap, sw_batch_size)
        self.postprocessing = postprocessing

    def prepare(self, scan: str | os.PathLike | Volume | PreparedScan) -> PreparedScan:
        """Read (if a path), check and preprocess a scan once; pass the result to :meth:`predict` for
        every click on it, as segment-anything's ``SamPredictor.set_image`` is called once per image."""
        if isinstance(scan, PreparedScan):
            return scan
        volume = scan if isinstance(scan, Volume) else load_volume(scan)
        check_memory_for(volume)
        check_head_ct(volume)
        return PreparedScan(volume, self.inferer.prepare(volume))

    def predict(
        self,
        scan: str | os.PathLike | Volume | PreparedScan,
        clicks: Sequence[Click] | None = None,
        threshold: float | None = None,
    ) -> SegmentationResult:
        """Segment ``scan``: a path (any format :func:`load_volume` reads), a Volume already read (read
        it yourself to choose a DICOM series or accept gaps), or :meth:`prepare`'s PreparedScan, which
        keeps what does not change between clicks (the preprocessed scan, the image embedding of each
        window seen, the intracranial space), so a new click costs the decoder and the post-processing.
        ``threshold``: the probability above which a voxel is blood; default AUTOMATIC_THRESHOLD without
        clicks when the hyperdense gate is on, else THRESHOLD."""
        if isinstance(scan, PreparedScan):
            check_clicks_inside(clicks or [], scan.volume)
        else:
            volume = scan if isinstance(scan, Volume) else load_volume(scan)
            check_clicks_inside(clicks or [], volume)  # before the scan is preprocessed
        prepared = self.prepare(scan if isinstance(scan, PreparedScan) else volume)
        volume = prepared.volume
        on_input = self.inferer.probabilities(volume, clicks or [], prepared.model_input)
        keep_points = [(np.linalg.inv(volume.affine) @ click_world(c, volume))[:3] for c in clicks or [] if c.positive]
        if threshold is None:
            gated = self.postprocessing.get("min_component_hu", MIN_COMPONENT_HU) is not None
            threshold = AUTOMATIC_THRESHOLD if gated and not clicks else THRESHOLD
        inside = prepared.cavity(self.postprocessing)
        skull_base_on = self.postprocessing.get("skull_base_margin_mm", SKULL_BASE_MARGIN_MM) > 0
        skull_base = prepared.skull_base(self.postprocessing) if skull_base_on else None
        with stage("post-processing"):
            mask, record = postprocess_mask(
                on_input > threshold,
                volume,
                keep_points,
                intracranial=inside,
                skull_base=skull_base,
                **self.postprocessing,
            )
        record["threshold"] = threshold
        frame = prepared.frame() if mask.any() else None  # a clean scan needs no location frame
        with stage("measurement"):
            measurements = measure_in_frame(mask, volume, frame)
        return SegmentationResult(
            volume.source, mask, volume, measurements, "interactive" if clicks else "automatic", record
        )

    def save(
        self,
        result: SegmentationResult,
        output_dir: str | os.PathLike,
        max_overlays: int = 3,
        stem: str | None = None,
        report_sections: tuple[str, str] | None = None,
    ) -> SegmentationResult:
        """Write ``<stem>_mask.nii.gz``, ``<stem>_measurements.json``, axial PNG overlays (radiological
        convention, lettered) and, for a DICOM input, ``<stem>_seg.dcm``: the mask on the acquired
        slices as DICOM SEG referencing them, and ``<stem>_sr.dcm``: the measurements as a DICOM SR
        Measurement Report referring to that SEG, with the report's (FINDINGS, IMPRESSION)
        ``report_sections`` when a report was written.

        The files appear together or, on an error, not at all; a SEG or SR the series allows no one to
        make is left out instead, its reason recorded under ``files["not_written"]`` and warned."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = stem or strip_volume_extension(Path(result.source).name)
        # Every file is written into a hidden staging folder first and moved into ``out`` only when
        # all of them were written, the measurements last: a scan whose mask (or any file) cannot be
        # written leaves none of its files behind beside a batch record saying it failed.
        staging = Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=".tmp", dir=out))
        files: dict[str, Any] = {}
        not_written: dict[str, str] = {}
        moved: list[Path] = []
        try:
            with stage("NIfTI writing"):
                save_nifti(staging / f"{stem}_mask.nii.gz", result.mask, result.affine)
            files["mask"] = f"{stem}_mask.nii.gz"
            volume = result.volume
            if volume.dicom is not None:
                derived, not_written = dicom_objects(result, report_sections)
                for kind, dataset in derived.items():
                    files[kind] = f"{stem}_{DICOM_OBJECT_SUFFIXES[kind]}"
                    dataset.save_as(staging / files[kind])
            view = SliceView.from_affine(result.affine)
            counts = result.mask.sum(axis=tuple(i for i in range(3) if i != view.axis))
            chosen = (
                np.argsort(counts)[::-1][:max_overlays] if counts.max() > 0 else [result.mask.shape[view.axis] // 2]
            )
            for k in sorted(int(c) for c in chosen):
                with stage("overlays"):
                    picture = axial_overlay(volume.array, k, view, result.mask)
                    Image.fromarray(picture).save(staging / f"{stem}_slice{k:03d}.png", format="PNG")
                files.setdefault("overlays", []).append(f"{stem}_slice{k:03d}.png")
            files["measurements"] = f"{stem}_measurements.json"
            named = {k: [str(out / n) for n in v] if isinstance(v, list) else str(out / v) for k, v in files.items()}
            result.files.update(named)
            if not_written:
                result.files["not_written"] = not_written
            (staging / files["measurements"]).write_text(json.dumps(result.to_json(), indent=2))
            umask = os.umask(0)
            os.umask(umask)
            for name in sorted(p.name for p in staging.iterdir()):
                os.chmod(staging / name, 0o666 & ~umask)  # the files get a new file's mode, as a plain open gives
            for name in sorted(p.name for p in staging.iterdir() if p.name != files["measurements"]) + [
                files["measurements"]
            ]:
                os.replace(staging / name, out / name)
                moved.append(out / name)
        except BaseException:
            for path in moved:
                path.unlink(missing_ok=True)
            for key in [*files, "not_written"]:
                result.files.pop(key, None)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for kind, reason in not_written.items():
            warnings.warn(f"{result.source}: no {DICOM_OBJECT_NAMES[kind]} written: {reason}", stacklevel=2)
        return result
