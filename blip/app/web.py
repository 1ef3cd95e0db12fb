#!/usr/bin/env python
"""Web app: upload a head CT or a chest X-ray, get the mask, the measurements and the report.

    sam3d-app                                   # the demo's models (outputs/demo/...)
    sam3d-app --segmentation_checkpoint best_model.pth --report_model report_model/ --port 7860

CT (NIfTI, NRRD, MHA/MHD, a DICOM file or a zipped DICOM series): the scan is segmented, measured and
reported through the same path as ``sam3d-report`` (the report is checked against the measurements
and contradictions are flagged). The page shows the axial slices in the radiological convention
(anterior up, the patient's right on the left, lettered edges) with the mask in red under brain,
subdural or bone windows, the measurements, how the scan's geometry was read (series, gantry tilt,
slice steps), the report, and downloads for the mask (NIfTI, and DICOM SEG for DICOM input) and the report.
Clicking the slice adds a refinement click (positive or negative) in that slice's voxel space and
re-runs the segmentation; the report is re-grounded on the new measurements (and rewritten from them
when the report model is conditioned on measurements).
X-ray (PNG/JPEG): the film and its report. A file that cannot be used gives a message on the page.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from blip.app.grounded import ScanReporter
from blip.data.reports import IMAGE_2D_SUFFIXES
from sam3d.data.dicom import choose_series, find_series, is_dicom_file
from sam3d.data.errors import SliceGapError
from sam3d.data.geometry import Geometry
from sam3d.data.io import SUPPORTED_FORMATS, VolumeReadError, is_volume_file, load_volume, strip_volume_extension
from sam3d.predict.records import Click, Measurements, SegmentationResult
from sam3d.visualize import SliceView, label_edges, lesion_slice_index

DEFAULT_SEGMENTATION_CHECKPOINT = Path("outputs/demo/sam3d/best_model.pth")  # where `make demo` writes them
DEFAULT_REPORT_MODEL = Path("outputs/demo/blip/report_model")
# Level / width in HU; the radio label is what the user sees.
WINDOWS = {"brain (40/80)": (40.0, 80.0), "subdural (75/215)": (75.0, 215.0), "bone (600/2800)": (600.0, 2800.0)}
KEEP_UPLOADS_S = 3600.0  # a visitor's uploads and results (patient data) are deleted after this much idle time
MAX_UPLOAD_MB = 2048
MAX_ZIP_BYTES = 4 << 30  # uncompressed; a larger "DICOM series" is more likely a zip bomb than a head CT
MASK_ALPHA = 0.45
# What the page says of a series with missing or duplicate slices, which it reads complete only.
PAGE_GAP_REMEDY = (
    "this page reads complete series only: upload the series with every slice, or run sam3d-report with "
    "--allow_gaps on it to interpolate across missing slices and keep one of each duplicate"
)
# What an upload's automatic segmentation and report leave in a case, restored when the clicks are cleared.
AUTOMATIC_RESULT_KEYS = ("mask", "measurements", "report", "flags", "corrected", "downloads")
# A click re-segments from the cached embeddings in about a second; writing the report (and the
# downloads that carry it) waits until the user asks, so clicking stays interactive.
STALE_REPORT = " The report and downloads are from before the clicks: **Update report** rewrites them."
VIEWER_PIXELS = 512  # small slices are enlarged by a whole factor (nearest) so voxels stay sharp and clickable

log = logging.getLogger("app")


class UploadError(ValueError):
    """An upload the app cannot use; the message is shown on the page as it is."""


def for_the_page(message: str) -> str:
    """A reader's message with the command line's series flag put as this page's series box."""
    return message.replace("choose one with --series_uid", "choose one in the DICOM series box")


def extract_zip(archive: Path, destination: Path) -> None:
    """Unpack ``archive`` into ``destination``, refusing members that would land outside it.

    Member names are attacker-controlled (``../../etc/x``, absolute paths), so each target is
    resolved and checked before anything is written; the total size is capped against zip bombs.
    """
    root = destination.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
                raise UploadError(f"{archive.name}: the zip unpacks to more than {MAX_ZIP_BYTES >> 30} GB")
            for member in members:
                target = (root / member.filename).resolve()
                if not target.is_relative_to(root):
                    raise UploadError(f"{archive.name}: refused member {member.filename!r} (path outside the archive)")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile as e:
        raise UploadError(f"{archive.name}: not a valid zip file ({e})") from e


def find_dicom_series(root: Path, archive_name: str, series: str | None) -> tuple[Path, str, list[dict]]:
    """The folder and UID of the series to read among all series under ``root`` (a zip may nest
    them in folders), chosen as for a DICOM folder; also the series left out."""
    try:
        found, _ = find_series(root, recursive=True)
        if not found:
            raise UploadError(f"{archive_name}: the zip holds no DICOM series")
        chosen, left_out = choose_series(found, archive_name, series)
    except VolumeReadError as e:
        raise UploadError(for_the_page(str(e)).replace(str(root), archive_name)) from e
    folders = {Path(f.path).parent for f in chosen.frames}
    if len(folders) > 1:
        raise UploadError(f"{archive_name}: series {chosen.uid} is spread over {len(folders)} folders")
    return folders.pop(), chosen.uid, left_out


def zoom_factor(slice_shape: tuple[int, int]) -> int:
    """Whole-number enlargement of a slice to about VIEWER_PIXELS (one voxel = zoom x zoom pixels)."""
    return max(1, VIEWER_PIXELS // max(slice_shape))


def window_overlay(picture_hu: np.ndarray, mask: np.ndarray, level: float, width: float, view: SliceView) -> np.ndarray:
    """Axial slice in HU and its mask, both already in screen orientation (``view.picture``) → the
    viewer's RGB uint8 picture, mask in red, enlarged by :func:`zoom_factor`, edges lettered.

    The window is the radiologist's (level/width), not a percentile stretch, so brain, subdural and
    bone views differ as they do at a workstation.
    """
    grey = np.clip((picture_hu.astype(np.float32) - (level - width / 2)) / width, 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    red = mask.astype(bool)
    rgb[red] = (1 - MASK_ALPHA) * rgb[red] + MASK_ALPHA * np.array([1.0, 0.0, 0.0])
    zoom = zoom_factor(picture_hu.shape)
    picture = (rgb * 255).round().astype(np.uint8).repeat(zoom, axis=0).repeat(zoom, axis=1)
    return label_edges(picture, view)


def display_to_voxel(x: int, y: int, slice_index: int, view: SliceView, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Pixel (x, y) of the viewer's picture (:func:`window_overlay`) → voxel index of a volume of ``shape``."""
    rows, columns = shape[view.down], shape[view.across]
    zoom = zoom_factor((rows, columns))
    return view.voxel(min(y // zoom, rows - 1), min(x // zoom, columns - 1), slice_index, shape)


def geometry_markdown(geometry: Geometry) -> str:
    """How the scan's grid was read, with every note a user must know (tilt, steps, series left out)."""
    return f"**Scan geometry:** {geometry.summary()}" + "".join(f"\n- {note}" for note in geometry.notes)


def measurements_markdown(m: Measurements) -> str:
    """The numbers a radiologist checks, as a table (the mask is the source of every figure)."""
    components = f"{m.num_components}" + (
        f" ({', '.join(f'{v:.2f}' for v in m.component_volumes_ml)} mL)" if m.num_components else ""
    )
    rows = [
        ("Total hemorrhage volume", f"{m.total_volume_ml:.2f} mL (ABC/2 {m.abc2_ml:.2f} mL)"),
        ("Components", components),
        ("Side", m.side),
        ("Location (largest component)", m.location),
        ("Axial slices", f"{m.slice_extent[0]}–{m.slice_extent[1]}" if m.slice_extent else "—"),
        ("Craniocaudal extent", f"{m.craniocaudal_extent_mm:.1f} mm"),
        ("Centroid (voxel)", ", ".join(f"{v:.1f}" for v in m.centroid_voxel) if m.centroid_voxel else "—"),
        ("Centroid (RAS mm)", ", ".join(f"{v:.1f}" for v in m.centroid_mm) if m.centroid_mm else "—"),
    ]
    table = "| Measurement | Value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if not m.components:
        return table
    # One row per component: the planimetric volume beside the bedside estimate, and where it lies.
    per_component = "\n".join(
        f"| {i} | {c.volume_ml:.2f} | {c.abc2_ml:.2f} ({' x '.join(f'{a:.0f}' for a in c.abc2_axes_mm)} mm) | "
        f"{c.side} | {c.location} | {c.region or '—'} |"
        for i, c in enumerate(m.components, start=1)
    )
    return (
        table
        + "\n\n| # | mL | ABC/2 mL (A x B x C) | side | location | region |\n|---|---|---|---|---|---|\n"
        + per_component
    )


def flags_markdown(flags: list[str], corrected: bool) -> str:
    if not flags:
        return "No contradictions between the generated report and the measurements."
    note = " The impression was rewritten from the measurements." if corrected else ""
    return "**Contradictions with the measurements:**" + note + "\n" + "\n".join(f"- {f}" for f in flags)


class ReportSession:
    """The models, loaded once per app, and the work one upload needs (no Gradio types here).

    Every visitor's files (unpacked zips, masks, SEG, reports: patient data) live under
    ``work_dir/<visitor>/``; :meth:`end_visit` deletes them when the page is closed, and any
    visitor's folder untouched for ``keep_s`` seconds is deleted when a new folder is made.
    """

    def __init__(self, reporter: ScanReporter, work_dir: Path, keep_s: float = KEEP_UPLOADS_S) -> None:
        self.reporter = reporter
        self.work_dir = work_dir
        self.keep_s = keep_s

    def _new_dir(self, visitor: str) -> Path:
        self.purge_stale()
        folder = self.work_dir / _safe_name(visitor)
        folder.mkdir(parents=True, exist_ok=True)
        os.utime(folder)  # marks the visitor as active
        return Path(tempfile.mkdtemp(dir=folder))

    def end_visit(self, visitor: str) -> None:
        shutil.rmtree(self.work_dir / _safe_name(visitor), ignore_errors=True)

    def purge_stale(self) -> None:
        cutoff = time.time() - self.keep_s
        for folder in self.work_dir.iterdir():
            if folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)

    def resolve_upload(self, upload: Path, name: str, visitor: str = "local") -> tuple[Path, str]:
        """The path to analyse and its modality; a zip is unpacked (its series is chosen in analyse_ct)."""
        lower = name.lower()
        if lower.endswith(".zip"):
            unpacked = self._new_dir(visitor) / "dicom"
            extract_zip(upload, unpacked)
            return unpacked, "ct"
        if lower.endswith(IMAGE_2D_SUFFIXES):
            return upload, "xray"
        if is_volume_file(name) or is_dicom_file(upload):
            return upload, "ct"
        raise UploadError(
            f"{name}: unsupported file type; upload a volume ({SUPPORTED_FORMATS}), a zipped DICOM series "
            f"(.zip) or an X-ray image ({', '.join(IMAGE_2D_SUFFIXES)})"
        )

    def analyse_ct(self, path: Path, name: str, series: str | None = None, visitor: str = "local") -> dict[str, Any]:
        left_out: list[dict] = []
        try:
            if path.is_dir():  # an unpacked zip
                path, series, left_out = find_dicom_series(path, name, series)
            volume = load_volume(path, series=series)  # before the models, so a bad file gets io's clear message
        except VolumeReadError as e:
            # The command line's remedy for slice gaps (--allow_gaps) is no control of this page.
            message = f"{e.problem}; {PAGE_GAP_REMEDY}" if isinstance(e, SliceGapError) else for_the_page(str(e))
            raise UploadError(message.replace(str(path), name)) from e
        # The page names the upload, not the server's work folder.
        volume.geometry.notes = [note.replace(str(path), name) for note in volume.geometry.notes]
        if left_out:  # the zip's series were chosen among all its folders, not within one
            volume.geometry.series_left_out = left_out
            volume.geometry.notes.append(
                f"{name}: left out " + "; ".join(f"{s['uid']} '{s['description']}' ({s['why']})" for s in left_out)
            )
        segmenter = self.reporter.segmenter
        if segmenter is None:  # a reporter built without a segmentation checkpoint
            raise UploadError(f"{name}: this app has no segmentation model, so it cannot read CT scans")
        # An unconditioned model's text does not depend on the segmentation: written once, re-grounded after clicks.
        generated = None if self.reporter.conditioned else self.reporter.generate(volume, "ct")
        case = {
            "modality": "ct",
            "scan": volume,
            # Preprocessed once; each window's image embedding is kept, so a click costs the decoder.
            "prepared": segmenter.prepare(volume),
            "name": name,
            "volume": volume.array.astype(np.float32),
            "view": SliceView.from_affine(volume.affine),
            "generated": generated,
            "clicks": [],
            "visitor": visitor,
        }
        case = self.segment_and_report(case)
        return {**case, "automatic": {k: case[k] for k in AUTOMATIC_RESULT_KEYS}}

    def refine(self, case: dict[str, Any]) -> dict[str, Any]:
        """Re-segment with the case's clicks from the prepared scan; the report and the downloads stay
        as they were (``report_stale``) until :meth:`segment_and_report` is asked for them."""
        if not case["clicks"]:  # back to the automatic result, kept from the upload
            return {**case, **case["automatic"], "report_stale": False}
        segmentation = self._segment(case)
        return {**case, "mask": segmentation.mask, "measurements": segmentation.measurements, "report_stale": True}

    @staticmethod
    def _clicks(case: dict[str, Any]) -> list[Click]:
        """The page's clicks ([x, y, z, positive] in the scan's voxels) as the segmenter takes them."""
        return [Click(tuple(c[:3]), c[3], space="voxel") for c in case["clicks"]]

    def _segment(self, case: dict[str, Any]) -> SegmentationResult:
        assert self.reporter.segmenter is not None  # analyse_ct refuses a CT without one
        return self.reporter.segmenter.predict(case["prepared"], self._clicks(case) or None)

    def segment_and_report(self, case: dict[str, Any]) -> dict[str, Any]:
        """Segment with the case's clicks, ground the generated text (rewritten from the new
        measurements by a conditioned model, kept otherwise), write the downloads."""
        segmentation = self._segment(case)
        out = self._new_dir(case["visitor"])
        # An unconditioned model's text, written at upload, is re-grounded; a conditioned one writes anew.
        generated = None if self.reporter.conditioned else case["generated"]
        name = case["name"]
        stem = name[:-4] if name.lower().endswith(".zip") else strip_volume_extension(name)
        scan = self.reporter.report_segmentation(case["scan"], segmentation, out, generated, self._clicks(case))
        scan = dataclasses.replace(scan, source=name).write(out, stem)
        assert scan.segmentation is not None and scan.grounding is not None  # a CT report
        files = scan.segmentation.files
        dicom = [files[key] for key in ("dicom_seg", "dicom_sr") if key in files]
        return {
            **case,
            "generated": scan.generated,
            "report_stale": False,
            "mask": scan.segmentation.mask,
            "measurements": scan.segmentation.measurements,
            "report": scan.report,
            "flags": scan.grounding.flags,
            "corrected": scan.grounding.corrected,
            "downloads": [files["mask"], *dicom, scan.files["report_txt"], scan.files["report_json"]],
        }

    def analyse_xray(self, path: Path, name: str, visitor: str = "local") -> dict[str, Any]:
        try:
            with Image.open(path) as image:
                film = np.asarray(image.convert("RGB"))
        except OSError as e:
            raise UploadError(f"{name}: cannot read the image ({e})") from e
        scan = self.reporter.run(path, "xray")
        scan = dataclasses.replace(scan, source=name).write(self._new_dir(visitor), Path(name).stem)
        return {
            "modality": "xray",
            "name": name,
            "film": film,
            "report": scan.report,
            "downloads": [scan.files["report_txt"]],
        }


def _safe_name(visitor: str) -> str:
    return "".join(c for c in visitor if c.isalnum() or c in "-_") or "anonymous"


def _error_outputs(message: str) -> tuple:
    hidden = gr.Slider(visible=False)
    return (f"**Error:** {message}", None, None, hidden, gr.Radio(visible=False), "", "", "", None, "")


def build_app(
    segmentation_checkpoint: str | Path,
    report_model: str | Path,
    device: str = "cpu",
    generation: dict | None = None,
    keep_s: float = KEEP_UPLOADS_S,
    segmenter_options: Mapping[str, Any] | None = None,
) -> gr.Blocks:
    """The whole page; the models are loaded here, once, and shared by every visitor. Requests
    queue and run one at a time (one model in memory, never several passes in parallel); each
    visitor's state and files are their own and are deleted when the page closes or after ``keep_s``."""
    reporter = ScanReporter(
        segmentation_checkpoint, report_model, device, generation=generation, segmenter_options=segmenter_options
    )
    session = ReportSession(reporter, Path(tempfile.mkdtemp(prefix="sam3d_app_")), keep_s)

    def render(case: dict | None, slice_index: float, window: str) -> np.ndarray | None:
        if case is None:
            return None
        if case["modality"] == "xray":
            return case["film"]
        view, k = case["view"], int(slice_index)
        level, width = WINDOWS[window]
        return window_overlay(view.picture(case["volume"], k), view.picture(case["mask"], k), level, width, view)

    def show(case: dict[str, Any], status: str, slice_index: int | None, window: str) -> tuple:
        if case["modality"] == "xray":
            return (
                status,
                case,
                render(case, 0, window),
                gr.Slider(visible=False),
                gr.Radio(visible=False),
                "",
                case["report"],
                "",
                case["downloads"],
                "",
            )
        axis = case["view"].axis
        if slice_index is None:  # open on the slice with the most hemorrhage, else the middle one
            slice_index = lesion_slice_index(case["mask"], axis)
        slider = gr.Slider(minimum=0, maximum=case["volume"].shape[axis] - 1, step=1, value=slice_index, visible=True)
        clicks = ", ".join(f"{'+' if c[3] else '−'}({c[0]}, {c[1]}, {c[2]})" for c in case["clicks"])
        return (
            status,
            case,
            render(case, slice_index, window),
            slider,
            gr.Radio(visible=True),
            measurements_markdown(case["measurements"]) + "\n\n" + geometry_markdown(case["scan"].geometry),
            case["report"],
            flags_markdown(case["flags"], case["corrected"]),
            case["downloads"],
            f"Refinement clicks (voxel): {clicks}" if clicks else "",
        )

    def analyse(upload: str | None, window: str, series: str, request: gr.Request) -> tuple:
        if not upload:
            return _error_outputs("no file received")
        name = Path(upload).name
        visitor = request.session_hash or "anonymous"
        try:
            path, modality = session.resolve_upload(Path(upload), name, visitor)
            case = (
                session.analyse_ct(path, name, series.strip() or None, visitor)
                if modality == "ct"
                else session.analyse_xray(path, name, visitor)
            )
        except UploadError as e:
            return _error_outputs(str(e))
        except Exception as e:  # the page gets one line; the server log keeps the traceback
            log.exception("analysis of %s failed", name)
            return _error_outputs(f"{name}: analysis failed ({type(e).__name__}: {e})")
        return show(case, f"Analysed **{name}** ({'CT' if modality == 'ct' else 'X-ray'}).", None, window)

    def refine(case: dict | None, slice_index: float, window: str, polarity: str, evt: gr.SelectData) -> tuple:
        if case is None or case["modality"] != "ct":
            raise gr.Error("Upload a CT scan first; clicks refine its hemorrhage mask.")
        x, y = evt.index
        k = int(slice_index)
        voxel = display_to_voxel(int(x), int(y), k, case["view"], case["volume"].shape)
        case = {**case, "clicks": [*case["clicks"], [*voxel, polarity == "positive"]]}
        try:
            case = session.refine(case)
        except Exception as e:
            log.exception("refinement failed")
            raise gr.Error(f"refinement failed ({type(e).__name__}: {e})") from e
        return show(
            case, f"Re-segmented **{case['name']}** with {len(case['clicks'])} click(s).{STALE_REPORT}", k, window
        )

    def clear_clicks(case: dict | None, slice_index: float, window: str) -> tuple:
        if case is None or case["modality"] != "ct" or not case["clicks"]:
            raise gr.Error("There are no clicks to clear.")
        case = session.refine({**case, "clicks": []})
        return show(case, f"Automatic segmentation of **{case['name']}** restored.", int(slice_index), window)

    def update_report(case: dict | None, slice_index: float, window: str) -> tuple:
        if case is None or case["modality"] != "ct":
            raise gr.Error("Upload a CT scan first.")
        if not case["report_stale"]:
            raise gr.Error("The report already follows the mask shown.")
        try:
            case = session.segment_and_report(case)
        except Exception as e:
            log.exception("report update failed")
            raise gr.Error(f"report update failed ({type(e).__name__}: {e})") from e
        return show(case, f"Report of **{case['name']}** rewritten for the refined mask.", int(slice_index), window)

    def end_visit(request: gr.Request) -> None:  # the page was closed: its patient data goes
        session.end_visit(request.session_hash or "anonymous")

    # Gradio's own upload cache is swept on the same clock as the work folders.
    with gr.Blocks(title="Head CT hemorrhage report", delete_cache=(max(60, int(keep_s) // 4), int(keep_s))) as app:
        gr.Markdown(
            "## Head CT → hemorrhage mask → measurements → report\n"
            "Upload a head CT (NIfTI, NRRD, MHA, a DICOM file or a zipped DICOM series) or a chest X-ray "
            "(PNG/JPEG). Slices are shown anterior up, the patient's right on the left. "
            "Automated output for research use, not for diagnosis."
        )
        case_state = gr.State(None)
        with gr.Row():
            upload = gr.UploadButton("Upload scan", file_count="single", elem_id="upload")
            series_box = gr.Textbox(
                label="DICOM series (UID or part of its description; empty: automatic)", elem_id="series"
            )
            status = gr.Markdown("", elem_id="status")
        with gr.Row():
            with gr.Column(scale=3):
                viewer = gr.Image(
                    label="Axial slice (mask in red; click to refine)", interactive=False, elem_id="viewer"
                )
                slice_slider = gr.Slider(0, 1, step=1, value=0, label="Axial slice", visible=False, elem_id="slice")
                window = gr.Radio(
                    list(WINDOWS),
                    value="brain (40/80)",
                    label="Window (level/width HU)",
                    visible=False,
                    elem_id="window",
                )
                with gr.Row():
                    polarity = gr.Radio(["positive", "negative"], value="positive", label="Click adds")
                    clear = gr.Button("Clear clicks")
                    update = gr.Button("Update report", elem_id="update_report")
                clicks_md = gr.Markdown("", elem_id="clicks")
            with gr.Column(scale=2):
                measurements = gr.Markdown("", elem_id="measurements")
                report = gr.Textbox(label="Report", lines=10, interactive=False, elem_id="report")
                flags = gr.Markdown("", elem_id="flags")
                downloads = gr.File(
                    label="Downloads (mask, DICOM SEG and SR, report)",
                    file_count="multiple",
                    interactive=False,
                    elem_id="downloads",
                )
        outputs = [status, case_state, viewer, slice_slider, window, measurements, report, flags, downloads, clicks_md]
        upload.upload(analyse, [upload, window, series_box], outputs)
        slice_slider.change(render, [case_state, slice_slider, window], viewer, show_progress="hidden")
        window.change(render, [case_state, slice_slider, window], viewer, show_progress="hidden")
        viewer.select(refine, [case_state, slice_slider, window, polarity], outputs)
        clear.click(clear_clicks, [case_state, slice_slider, window], outputs)
        update.click(update_report, [case_state, slice_slider, window], outputs)
        app.unload(end_visit)
    return app.queue(default_concurrency_limit=1)
