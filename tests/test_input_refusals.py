"""What a command cannot do is one line naming the file and the limit (issue 26 E): a file over the
shell's size limit, a scan too large for the memory, a corrupt DICOM slice, and the web page's own
remedy for a series with gaps."""

from __future__ import annotations

import resource
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ich_engine.checkpoint import atomic_save
from ich_engine.cli import run_main
from sam3d.data.errors import SliceGapError, VolumeReadError
from sam3d.data.geometry import GeometryWarning
from sam3d.data.io import load_volume
from sam3d.data.synthetic_dicom import SeriesSpec, table_positions, write_ct_series
from sam3d.modeling import build_sam3d, model_config
from tests.conftest import head_phantom_hu


def test_a_checkpoint_over_the_file_size_limit_names_the_file(tmp_path):
    """``ulimit -f``: the write fails with EFBIG, which torch.save reports as a RuntimeError."""
    script = (
        "import sys, torch\n"
        "from ich_engine.checkpoint import atomic_save\n"
        "from ich_engine.cli import run_main\n"
        "sys.exit(run_main(lambda argv: atomic_save({'w': torch.zeros(100000)}, sys.argv[1]) or 0, []))\n"
    )
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "best_model.pth")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 1024, hard)),  # ulimit -f 100
    )
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        f"error: {tmp_path / 'best_model.pth'}: file too large for this shell's file size limit "
        "(ulimit -f: 102400 bytes); raise it (ulimit -f unlimited) and run again"
    ]
    assert not list(tmp_path.iterdir())  # no partial file


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = model_config("small", img_size=32)
    path = tmp_path_factory.mktemp("model") / "seg.pth"
    torch.manual_seed(0)
    atomic_save(
        {
            "model_state_dict": build_sam3d(config).state_dict(),
            "model_config": config.to_dict(),
            "preprocessing": {"target_spacing_mm": (3.0, 3.0, 3.0)},
        },
        path,
    )
    return path


def test_a_scan_too_large_for_the_memory_is_refused_before_it_is_segmented(checkpoint, tmp_path, capsys, monkeypatch):
    from sam3d.cli.predict import main as predict_main
    from sam3d.predict import segmenter

    scan = tmp_path / "big.nii.gz"
    nib.save(
        nib.Nifti1Image(np.full((64, 64, 40), -1000, np.int16) + np.eye(64, dtype=np.int16)[..., None], np.eye(4)), scan
    )

    class Memory:
        available = 10**6

    monkeypatch.setattr(segmenter.psutil, "virtual_memory", Memory)
    monkeypatch.setattr(segmenter.Sam3DInferer, "prepare", lambda *a: pytest.fail("preprocessing ran"))
    code = run_main(
        predict_main, ["--checkpoint", str(checkpoint), "--input", str(scan), "--output_dir", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert err[0] == (
        f"error: {scan}: 64x64x40 voxels need about 4 MB to segment (24 bytes a voxel), but 1 MB of memory "
        "is available; crop or downsample the scan, or free memory"
    )
    # Permissive for real head CTs: 512x512x1000 voxels fit in about 6 GB.
    assert 512 * 512 * 1000 * segmenter.SEGMENTATION_BYTES_PER_VOXEL < 6.5e9


def _series(folder: Path) -> list[Path]:
    positions, orientation = table_positions([5.0] * 9, 0.0, first_z_mm=-30.0, origin_xy_mm=(-96.0, -110.0))
    spec = SeriesSpec(positions, orientation, rows=48, columns=40, pixel_spacing=(4.8, 4.8))
    return write_ct_series(folder, spec, head_phantom_hu)


def test_a_corrupt_slice_is_named_as_unreadable_not_blamed_as_a_gap(tmp_path):
    paths = _series(tmp_path / "overwritten")
    paths[5].write_bytes(paths[5].read_bytes()[:50])  # what a broken copy leaves
    with pytest.raises(SliceGapError, match=r"IM0006\.dcm \(50 bytes, too short for a DICOM file\); pass --allow_gaps"):
        load_volume(tmp_path / "overwritten")
    (tmp_path / "overwritten" / "README.txt").write_text("not a slice")  # named unlike the slices: no complaint
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = load_volume(tmp_path / "overwritten", allow_gaps=True)
    notes = [str(w.message) for w in caught if issubclass(w.category, GeometryWarning)]
    assert any("1 file(s) named like its slices are not readable as DICOM: IM0006.dcm" in n for n in notes)
    assert not any("README" in n for n in volume.geometry.notes)

    paths = _series(tmp_path / "truncated")
    paths[3].write_bytes(paths[3].read_bytes()[:-2000])  # the header intact, the pixels cut short
    with pytest.raises(
        VolumeReadError, match=r"truncated/IM0004\.dcm: unreadable DICOM slice \(ValueError: The number"
    ):
        load_volume(tmp_path / "truncated")


def test_the_web_page_offers_its_own_remedy_for_a_series_with_gaps(tmp_path):
    from blip.app.web import ReportSession, UploadError

    paths = _series(tmp_path / "gap")
    paths[4].unlink()
    with pytest.raises(UploadError) as refused:
        ReportSession(None, tmp_path / "work").analyse_ct(tmp_path / "gap", "head.zip")  # type: ignore[arg-type]
    message = str(refused.value)
    assert message.startswith("head.zip: series ") and "missing slice(s)" in message
    assert "pass --allow_gaps" not in message and "upload the series with every slice" in message
