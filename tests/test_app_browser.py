"""The web app in a real browser: upload a CT, read the measured volume and the report off the page,
then upload a corrupt file and see the error message (Debian Chromium driven by Playwright)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from blip.app.web import UploadError, build_app, display_to_voxel, extract_zip, window_overlay
from sam3d.data.synthetic import synthesize_case
from sam3d.predict import HemorrhageSegmenter, hyperdense_options
from tests.conftest import REPO, make_tiny_models

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium's own connections are refused by the closed network.
# Playwright starts each browser on a new empty profile (it refuses --user-data-dir in launch()).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([0.9, 0.9, 5.0, 1.0]),
        np.diag([-0.9, -0.9, 5.0, 1.0]),
        np.array([[0, 0, 5.0, 0], [0.9, 0, 0, 0], [0, -0.9, 0, 0], [0, 0, 0, 1]]),
    ],
    ids=["RAS", "LPS", "slices-first"],
)
def test_display_to_voxel_inverts_the_viewer_orientation(affine):
    """A click on a pixel must land on the voxel drawn there, whatever the storage order is."""
    from sam3d.visualize import SliceView

    view = SliceView.from_affine(affine)
    shape = [5, 7, 3]
    shape.insert(view.axis, shape.pop(2))  # the slice axis holds 3 slices
    volume = np.zeros(shape, dtype=np.float32)
    voxel = [1, 2]
    voxel.insert(view.axis, 1)
    volume[tuple(voxel)] = 1000.0
    picture = window_overlay(view.picture(volume, 1), view.picture(np.zeros(shape), 1), 40.0, 80.0, view)
    bright = np.argwhere((picture[..., 0] == 255) & (picture[..., 2] == 255))  # white, not the yellow letters
    y, x = bright[len(bright) // 2]
    assert display_to_voxel(int(x), int(y), 1, view, tuple(shape)) == tuple(voxel)


def test_zip_with_path_traversal_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../outside.dcm", b"x")
    with pytest.raises(UploadError, match="outside the archive"):
        extract_zip(archive, tmp_path / "unpacked")
    assert not (tmp_path / "outside.dcm").exists()


@contextlib.contextmanager
def served_app(tiny_models, segmenter_options: dict | None = None):
    """The app on a free local port with Debian's Chromium to drive it: yields (browser, url)."""
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} missing in CI: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    seg_checkpoint, report_model = tiny_models
    app = build_app(
        seg_checkpoint,
        report_model,
        "cpu",
        generation={"max_new_tokens": 8, "num_beams": 1},
        segmenter_options=segmenter_options,
    )
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                yield browser, f"http://127.0.0.1:{port}/"
            finally:
                browser.close()
    finally:
        app.close()


def upload(page, path: Path) -> None:
    """As a user does: click the upload button and pick the file in the chooser."""
    with page.expect_file_chooser() as chooser:
        page.locator("#upload").click()
    chooser.value.set_files(str(path))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("app_models"))


def test_zipped_study_is_read_with_series_choice_and_gives_a_seg(tiny_models, tmp_path):
    """A zip as PACS exports it: series in sub-folders, files without extensions, a localizer beside the
    axial series. The axial one is read, the localizer named, and the downloads hold a DICOM SEG."""
    from blip.app.grounded import ScanReporter
    from blip.app.web import ReportSession
    from sam3d.data.synthetic_dicom import SeriesSpec, table_positions, write_ct_series
    from tests.conftest import head_phantom_hu

    positions, orientation = table_positions([5.0] * 11, 12.0, origin_xy_mm=(-96.0, -110.0))
    axial = SeriesSpec(
        positions,
        orientation,
        rows=72,
        columns=64,
        pixel_spacing=(3.0, 3.0),
        gantry_tilt_deg=12.0,
        description="HEAD 5mm",
    )
    scout = SeriesSpec(
        np.array([[0.0, -120.0, 100.0]]),
        (0, 1, 0, 0, 0, -1),
        description="SCOUT",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    write_ct_series(tmp_path / "study" / "S2", axial, head_phantom_hu, extension="")
    write_ct_series(tmp_path / "study" / "S1", scout, head_phantom_hu, extension="")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "study").rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(tmp_path))
    seg_checkpoint, report_model = tiny_models
    reporter = ScanReporter(seg_checkpoint, report_model, "cpu", generation={"max_new_tokens": 8, "num_beams": 1})
    session = ReportSession(reporter, tmp_path / "work")
    (tmp_path / "work").mkdir()
    path, modality = session.resolve_upload(archive, archive.name)
    case = session.analyse_ct(path, archive.name)
    geometry = case["scan"].geometry
    assert geometry.series["description"] == "HEAD 5mm" and geometry.tilt_deg == pytest.approx(12.0, abs=0.05)
    assert any("SCOUT" in note and "localizer" in note for note in geometry.notes)
    assert any(d.endswith("_seg.dcm") for d in case["downloads"]) and any(
        d.endswith("_sr.dcm") for d in case["downloads"]
    )
    with pytest.raises(UploadError, match="study.zip: no series matches series 'bone'"):
        session.analyse_ct(session.resolve_upload(archive, archive.name)[0], archive.name, "bone")


def test_a_click_resegments_from_the_cached_embedding_and_leaves_the_report_until_asked(tiny_models, tmp_path):
    from blip.app.grounded import ScanReporter
    from blip.app.web import ReportSession
    from ich_engine.stage_timing import StageTimes

    c = synthesize_case(1, seed=0, spacing_mm=(3.0, 3.0, 5.0), ich_type="subdural", head_scale=0.5)
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(c.image_hu, c.affine), scan)
    seg_checkpoint, report_model = tiny_models
    reporter = ScanReporter(
        seg_checkpoint,
        report_model,
        "cpu",
        generation={"max_new_tokens": 8, "num_beams": 1},
        segmenter_options={"min_component_ml": 0, **hyperdense_options(False)},
    )
    session = ReportSession(reporter, tmp_path / "work")
    (tmp_path / "work").mkdir()
    automatic = session.analyse_ct(scan, scan.name)
    centre = [int(v) for v in np.argwhere(c.mask).mean(0)]
    first = session.refine({**automatic, "clicks": [[*centre, True]]})
    with StageTimes() as times:
        second = session.refine({**first, "clicks": [*first["clicks"], [centre[0] + 1, centre[1], centre[2], False]]})
    assert "encoder" not in times.calls and "report LM" not in times.calls  # decoder and post-processing only
    assert second["report_stale"] and second["report"] == automatic["report"]
    assert second["downloads"] == automatic["downloads"]  # nothing rewritten yet
    assert not np.array_equal(second["mask"], automatic["mask"])
    written = session.segment_and_report(second)
    assert not written["report_stale"] and np.array_equal(written["mask"], second["mask"])
    assert written["downloads"] != automatic["downloads"] and all(Path(d).exists() for d in written["downloads"])
    cleared = session.refine({**written, "clicks": []})
    assert np.array_equal(cleared["mask"], automatic["mask"]) and cleared["downloads"] == automatic["downloads"]


def test_upload_ct_then_corrupt_file_in_browser(tiny_models, tmp_path):
    from playwright.sync_api import expect

    seg_checkpoint, _ = tiny_models
    case = synthesize_case(1, seed=0, spacing_mm=(3.0, 3.0, 5.0), ich_type="subdural", head_scale=0.5)
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(case.image_hu, case.affine), scan)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    expected_ml = HemorrhageSegmenter(seg_checkpoint).predict(scan).measurements.total_volume_ml

    with served_app(tiny_models) as (browser, url):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, timeout=TIMEOUT_MS)
        upload(page, scan)
        expect(page.locator("#status")).to_contain_text("Analysed", timeout=TIMEOUT_MS)

        volume_cell = page.locator("#measurements tr", has_text="Total hemorrhage volume").locator("td").nth(1)
        shown = float(re.search(r"[\d.]+", volume_cell.inner_text()).group())
        assert shown == pytest.approx(expected_ml, abs=0.005)
        expect(page.locator("#measurements")).to_contain_text("Scan geometry: nifti (sform)")
        report_text = page.locator("#report textarea").input_value()
        assert report_text.strip() and report_text.startswith("FINDINGS:")
        expect(page.locator("#viewer img")).to_be_visible()
        # Gradio maps a click to pixels through the loaded image's natural size; a click on an image
        # still loading is dropped (seen once on a loaded host: no status change in 60 s).
        page.wait_for_function(
            "() => { const img = document.querySelector('#viewer img');"
            " return img !== null && img.complete && img.naturalWidth > 0; }",
            timeout=TIMEOUT_MS,
        )
        page.locator("#viewer img").click()  # a refinement click in the middle of the slice
        expect(page.locator("#status")).to_contain_text("with 1 click(s)", timeout=TIMEOUT_MS)
        expect(page.locator("#status")).to_contain_text("Update report")  # the click did not rewrite the report
        expect(page.locator("#clicks")).to_contain_text("+(")
        page.locator("#update_report").click()
        expect(page.locator("#status")).to_contain_text("rewritten for the refined mask", timeout=TIMEOUT_MS)
        if os.environ.get("APP_SCREENSHOT"):
            (REPO / "outputs").mkdir(exist_ok=True)
            page.screenshot(path=str(REPO / "outputs" / "app_screenshot.png"), full_page=True)

        upload(page, corrupt)
        expect(page.locator("#status")).to_contain_text("Error", timeout=TIMEOUT_MS)
        expect(page.locator("#status")).to_contain_text("corrupt.nii.gz: cannot read")
        assert "Traceback" not in page.content()


def test_a_visitors_files_go_when_the_page_closes_or_sits_idle(tiny_models, tmp_path):
    from blip.app.grounded import ScanReporter
    from blip.app.web import ReportSession

    seg_checkpoint, report_model = tiny_models
    session = ReportSession(ScanReporter(seg_checkpoint, report_model, "cpu"), tmp_path, keep_s=600)
    a, b = session._new_dir("visitor-a"), session._new_dir("visitor-b")
    (a / "scan_mask.nii.gz").write_bytes(b"patient data")
    session.end_visit("visitor-a")
    assert not (tmp_path / "visitor-a").exists() and b.exists()
    old = time.time() - 3600
    os.utime(tmp_path / "visitor-b", (old, old))
    session._new_dir("visitor-c")  # any new work sweeps folders idle for longer than keep_s
    assert not (tmp_path / "visitor-b").exists() and (tmp_path / "visitor-c").exists()


def test_four_visitors_at_once_each_get_their_own_result(tiny_models, tmp_path):
    """Four browser sessions upload four different scans at the same moment: requests queue, and every
    page shows its own scan's volume and name, never another's."""
    from playwright.sync_api import expect

    seg_checkpoint, _ = tiny_models
    # The tiny random model marks no hyperdense blood: without the gate its masks differ per scan.
    segmenter = HemorrhageSegmenter(seg_checkpoint, **hyperdense_options(False))
    scans, expected = [], []
    for index, kind in enumerate(["subdural", "intraparenchymal", "intraventricular", "none"]):
        case = synthesize_case(index + 2, seed=3, spacing_mm=(3.0, 3.0, 5.0), ich_type=kind, head_scale=0.5)
        path = tmp_path / f"visitor{index}.nii.gz"
        nib.save(nib.Nifti1Image(case.image_hu, case.affine), path)
        scans.append(path)
        expected.append(segmenter.predict(path).measurements.total_volume_ml)
    assert len(set(expected)) == len(expected)  # four different answers, so a mix-up shows

    with served_app(tiny_models, hyperdense_options(False)) as (browser, url):
        pages = []
        for _ in scans:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.goto(url, timeout=TIMEOUT_MS)
            pages.append(page)
        for page, scan in zip(pages, scans):  # all four in flight before any result is read
            upload(page, scan)
        for page, scan, volume_ml in zip(pages, scans, expected):
            expect(page.locator("#status")).to_contain_text(f"Analysed {scan.name}", timeout=4 * TIMEOUT_MS)
            cell = page.locator("#measurements tr", has_text="Total hemorrhage volume").locator("td").nth(1)
            assert float(re.search(r"[\d.]+", cell.inner_text()).group()) == pytest.approx(volume_ml, abs=0.005)
            assert "Error" not in page.locator("#status").inner_text()


def test_the_measurements_table_shows_abc2_and_each_components_location():
    from blip.app.web import measurements_markdown
    from sam3d.data.io import Volume
    from sam3d.predict import measure

    c = synthesize_case(1, seed=0, spacing_mm=(1.5, 1.5, 4.0), ich_type="subdural", head_scale=0.5)
    m = measure(c.mask, Volume(c.image_hu.astype(np.float32), c.affine, c.spacing_mm, "", True))
    table = measurements_markdown(m)
    assert f"{m.total_volume_ml:.2f} mL (ABC/2 {m.abc2_ml:.2f} mL)" in table
    rows = [line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == m.num_components and all(c.location in rows[i] for i, c in enumerate(m.components))


def test_a_tie_between_series_asks_for_the_pages_series_box_not_a_flag(tmp_path):
    from blip.app.web import find_dicom_series
    from sam3d.data.synthetic_dicom import SeriesSpec, table_positions, write_ct_series
    from tests.conftest import head_phantom_hu

    positions, orientation = table_positions([5.0] * 5)
    for number, kernel in ((2, "HEAD soft"), (3, "HEAD bone")):
        spec = SeriesSpec(positions, orientation, description=kernel, series_number=number)
        write_ct_series(tmp_path / "study" / f"S{number}", spec, head_phantom_hu, extension="")
    with pytest.raises(UploadError, match="equally good candidates .*choose one in the DICOM series box") as err:
        find_dicom_series(tmp_path / "study", "study.zip", None)
    assert "--series_uid" not in str(err.value) and str(tmp_path) not in str(err.value)
