"""Prediction on a prepared scan: clicks answered from cached embeddings, work bounded by the prediction,
stages timed; each shortcut equal to the full computation it replaces."""

import json
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ich_engine.stage_timing import StageTimes, stage
from sam3d.cli import bench
from sam3d.data.io import Volume
from sam3d.data.synthetic import synthesize_case
from sam3d.predict import (
    MIN_COMPONENT_HU,
    MIN_COMPONENT_ML,
    MIN_VOXEL_HU,
    Click,
    HemorrhageSegmenter,
    hyperdense_gate,
    hyperdense_options,
    intracranial_mask,
    postprocess_mask,
    to_input_grid,
)
from sam3d.predict.inference import input_box
from tests.conftest import write_tiny_segmentation_checkpoint


@pytest.fixture(scope="module")
def scan_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    c = synthesize_case(2, seed=0, spacing_mm=(1.2, 1.2, 4.0), ich_type="intraparenchymal", head_scale=0.6)
    nib.save(nib.Nifti1Image(c.image_hu, c.affine), root / "scan.nii.gz")
    write_tiny_segmentation_checkpoint(root / "model.pth", (2.0, 2.0, 2.0))
    return c, root


def test_a_new_click_on_a_prepared_scan_costs_no_encoder_and_equals_a_fresh_prediction(scan_and_model):
    c, root = scan_and_model
    # An untrained model marks no blood: the hyperdense gate is off so its mask stays to compare.
    segmenter = HemorrhageSegmenter(root / "model.pth", min_component_ml=0, **hyperdense_options(False))
    centre = np.argwhere(c.mask).mean(0).round().astype(int)
    first = [Click(tuple(float(v) for v in centre))]
    second = [*first, Click(tuple(float(v) for v in centre + [2, 1, 0]), positive=False)]
    prepared = segmenter.prepare(root / "scan.nii.gz")
    with StageTimes() as times:
        segmenter.predict(prepared, first, threshold=0.5)
    assert times.calls["encoder"] == 1 and len(prepared.model_input.embeddings) == 1
    with StageTimes() as times:
        cached = segmenter.predict(prepared, second, threshold=0.5)
    assert "encoder" not in times.calls and "read" not in times.calls and "resample to model grid" not in times.calls
    assert times.calls["decoder"] >= 2
    fresh = segmenter.predict(root / "scan.nii.gz", second, threshold=0.5)
    assert cached.mask.any() and np.array_equal(cached.mask, fresh.mask)
    assert cached.measurements == fresh.measurements and cached.postprocessing == fresh.postprocessing


def test_mapping_back_only_the_windows_box_equals_mapping_the_whole_grid():
    rng = np.random.default_rng(0)
    # A sheared, rotated input grid (gantry tilt) and a model grid of 2 mm, as the inferer has them.
    tilt = np.deg2rad(15)
    affine = np.array(
        [
            [0.5, 0.0, 0.0, -60.0],
            [0.0, 0.5 * np.cos(tilt), 0.0, -70.0],
            [0.0, 0.5 * np.sin(tilt), 3.0, -40.0],
            [0, 0, 0, 1],
        ]
    )
    volume = Volume(np.zeros((240, 260, 40), np.float32), affine, (0.5, 0.5, 3.0), "sheared")
    model_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    model_affine[:3, 3] = [-62.0, -72.0, -42.0]
    values = np.zeros((64, 72, 70), np.float32)
    start, stop = np.array([10, 20, 15]), np.array([42, 52, 47])
    values[10:42, 20:52, 15:47] = rng.random((32, 32, 32), dtype=np.float32)
    box = input_box(start, stop, model_affine, volume)
    assert all(b.stop - b.start < n for b, n in zip(box, volume.array.shape))  # the box is a part of the scan
    whole = to_input_grid(values, model_affine, volume)
    assert whole.any() and np.array_equal(to_input_grid(values, model_affine, volume, box=box), whole)


def _whole_scan_postprocessing(mask, volume):
    """The default steps, each on the whole scan: intracranial space, hyperdense gate, small components."""
    mask = mask & intracranial_mask(volume)
    mask, _ = hyperdense_gate(mask, volume, np.zeros_like(mask), MIN_COMPONENT_HU, MIN_VOXEL_HU)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    sizes_ml = np.bincount(labels.ravel(), minlength=count + 1)[1:] * volume.voxel_volume_ml
    return mask & ~np.isin(labels, np.flatnonzero(sizes_ml < MIN_COMPONENT_ML) + 1)


def test_postprocessing_in_the_predictions_box_equals_the_steps_on_the_whole_scan():
    c = synthesize_case(1, seed=0, spacing_mm=(0.9, 0.9, 2.0), ich_type="subdural", head_scale=0.6)
    volume = Volume(c.image_hu.astype(np.float32), c.affine, c.spacing_mm, "", True)
    coarse = ndimage.binary_dilation(c.mask > 0, iterations=2)  # the decoder's coarse edge over brain
    blobs = np.zeros_like(coarse)
    blobs[40:46, 60:64, 10:13] = True  # brain: dropped by the gate
    blobs[0:5, 50:60, 8:12] = True  # scalp and air: outside the skull
    blobs[70:72, 70:72, 12] = True  # a speck
    mask = coarse | blobs
    kept, _ = postprocess_mask(mask, volume)
    reference = _whole_scan_postprocessing(mask, volume)
    assert kept.any() and np.array_equal(kept.astype(bool), reference)
    empty, record = postprocess_mask(np.zeros_like(mask), volume)
    assert not empty.any() and empty.shape == mask.shape and record["volume_after_ml"] == 0


def test_stage_times_add_up_repeated_stages_and_cost_nothing_outside_a_benchmark():
    with stage("outside"):  # no StageTimes active: nothing is recorded anywhere
        pass
    with StageTimes() as times:
        for _ in range(3):
            with stage("encoder"):
                time.sleep(0.01)
        with stage("writing"):
            block = np.ones(20_000_000, np.uint8)  # 20 MB held while the stage runs
            time.sleep(0.05)
            del block
    assert times.calls == {"encoder": 3, "writing": 1}
    assert times.seconds["encoder"] >= 0.03 and times.seconds["writing"] >= 0.05
    assert times.peak_gb["writing"] > 0.01 and [r["stage"] for r in times.table()] == ["encoder", "writing"]


def test_bench_predict_prints_each_stage_and_two_clicks(scan_and_model, tmp_path, capsys):
    c, root = scan_and_model
    out = tmp_path / "bench.json"
    assert (
        bench.main(
            ["--predict", str(root / "scan.nii.gz"), "--checkpoint", str(root / "model.pth"), "--json", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for name in ("read", "resample to model grid", "encoder", "decoder", "post-processing", "measurement", "overlays"):
        assert f"\n{name} " in printed
    record = json.loads(out.read_text())
    assert record["shape"] == list(c.image_hu.shape)
    assert any(r["stage"] == "encoder" for r in record["automatic"])
    assert not any(r["stage"] == "encoder" for r in record["second_click"]["stages"])  # answered from the cache


@pytest.mark.slow
def test_a_real_size_scan_goes_through_every_stage_and_a_second_click_from_the_cache(tmp_path, capsys):
    """512 x 512 x 134 voxels of 0.45 x 0.45 x 1.08 mm, as a thin-slice head CT, with the shipped stand-in."""
    from sam3d import PRETRAINED_DIR

    c = synthesize_case(0, seed=4, spacing_mm=(0.45, 0.45, 1.08), ich_type="subdural", fov_mm=(230.4, 230.4, 144.7))
    assert c.image_hu.shape == (512, 512, 134)
    nib.save(nib.Nifti1Image(c.image_hu, c.affine), tmp_path / "thin.nii.gz")
    out = tmp_path / "bench.json"
    checkpoint = str(PRETRAINED_DIR / "sam_med3d_small_ich.pth")
    assert bench.main(["--predict", str(tmp_path / "thin.nii.gz"), "--checkpoint", checkpoint, "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    stages = {r["stage"]: r for r in record["automatic"]}
    expected = {"read", "resample to model grid", "encoder", "decoder", "resample to scan grid", "post-processing"}
    assert expected | {"measurement", "NIfTI writing", "overlays"} <= set(stages)
    assert stages["encoder"]["calls"] > 1  # sliding windows over the whole head
    assert "encoder" not in {r["stage"] for r in record["second_click"]["stages"]}
    assert all(r["peak_gb"] > 0 for r in record["automatic"])
