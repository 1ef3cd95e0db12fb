"""sam3d.data.transforms: geometry survives loading, reorientation, resampling and cropping."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from sam3d.data.io import VolumeReadError, save_nifti
from sam3d.data.preprocessing import Preprocessing
from sam3d.data.transforms import (
    BrainWindowd,
    ClampHUd,
    CropAroundLesiond,
    LoadVolumed,
    ZNormalizeForegroundd,
    build_inference_transforms,
    build_transforms,
)


def _head_ct(shape, head, rng, hu=40.0):
    """Air (-1000 HU) with a noisy soft-tissue block ``head`` (slices) of about ``hu`` HU."""
    image = np.full(shape, -1000.0, np.float32)
    image[head] = hu + rng.normal(0, 10, size=image[head].shape)
    return image


def _write_case(folder, shape=(40, 40, 20), affine=None, lesion=(slice(10, 16), slice(20, 26), slice(8, 12))):
    """Scan + mask NIfTI pair; returns (image path, mask path, the voxel->RAS affine)."""
    affine = np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine
    rng = np.random.default_rng(0)
    image = _head_ct(shape, tuple(slice(2, s - 2) for s in shape), rng)
    mask = np.zeros(shape, np.uint8)
    mask[lesion] = 1
    image[lesion] = 70.0  # fresh blood is brighter than brain
    save_nifti(folder / "scan.nii", image, affine)
    save_nifti(folder / "mask.nii", mask, affine)
    return str(folder / "scan.nii"), str(folder / "mask.nii"), affine


def _world_centroid(label: MetaTensor) -> np.ndarray:
    """RAS mm position of the centroid of label > 0.5, using the tensor's own affine."""
    voxels = torch.nonzero(label[0] > 0.5).double().mean(0).numpy()
    return (label.affine.numpy() @ np.append(voxels, 1.0))[:3]


def _bbox_centre(mask: torch.Tensor) -> np.ndarray:
    idx = torch.nonzero(mask).numpy()
    return (idx.min(0) + idx.max(0)) / 2


def _split_before(pipeline: Compose, cls) -> tuple[Compose, Compose]:
    """A built pipeline cut in two just before its first ``cls`` transform."""
    stop = next(i for i, t in enumerate(pipeline.transforms) if isinstance(t, cls))
    return Compose(pipeline.transforms[:stop]), Compose(pipeline.transforms[stop:])


def test_load_volumed_makes_channel_first_meta_tensors(tmp_path):
    image_path, mask_path, affine = _write_case(tmp_path)
    out = LoadVolumed()({"image": image_path, "label": mask_path, "ich": 1})
    for key in ("image", "label"):
        assert isinstance(out[key], MetaTensor)
        assert out[key].shape == (1, 40, 40, 20) and out[key].dtype == torch.float32
        np.testing.assert_allclose(out[key].affine.numpy(), affine)
    assert out["image"].meta["filename_or_obj"] == image_path
    assert out["image"].meta["spacing_mm"] == pytest.approx((1.5, 1.5, 3.0))
    assert out["label"].sum() == 6 * 6 * 4 and out["ich"] == 1

    negative = LoadVolumed()({"image": image_path, "label": None})
    assert negative["label"].shape == (1, 40, 40, 20) and negative["label"].sum() == 0
    np.testing.assert_allclose(negative["label"].affine.numpy(), affine)
    assert "label" not in LoadVolumed()({"image": image_path})  # inference: no label key, none made


def test_load_volumed_bare_array_scan_takes_the_mask_geometry(tmp_path):
    _, mask_path, affine = _write_case(tmp_path, affine=np.diag([0.5, 0.6, 4.0, 1.0]))
    np.save(tmp_path / "scan.npy", np.zeros((40, 40, 20), np.float32))
    out = LoadVolumed()({"image": str(tmp_path / "scan.npy"), "label": mask_path})
    np.testing.assert_allclose(out["image"].affine.numpy(), affine)

    np.save(tmp_path / "small.npy", np.zeros((40, 40, 19), np.float32))
    with pytest.raises(VolumeReadError, match="shape mismatch"):
        LoadVolumed()({"image": str(tmp_path / "small.npy"), "label": mask_path})


def test_anisotropic_lps_scan_reaches_1p5mm_ras_with_lesion_in_place(tmp_path):
    # 0.5 x 0.5 x 5 mm, stored with L->R and P->A axes flipped (LPS-like), as many scanners write it.
    affine = np.diag([-0.5, -0.5, 5.0, 1.0])
    affine[:3, 3] = (75.0, 75.0, -70.0)
    lesion = (slice(200, 220), slice(90, 110), slice(20, 23))
    image_path, mask_path, _ = _write_case(tmp_path, shape=(300, 300, 30), affine=affine, lesion=lesion)
    lesion_world = (affine @ np.array([209.5, 99.5, 21.0, 1.0]))[:3]
    item = {"image": image_path, "label": mask_path}
    pipeline = build_transforms({"roi_size": (64, 64, 64)}, train=False)
    resample, crop_and_normalise = _split_before(pipeline, CropAroundLesiond)

    resampled = resample(item)
    for key in ("image", "label"):
        assert np.all(np.abs(np.array(resampled[key].shape[1:]) - 100) <= 2), resampled[key].shape
        np.testing.assert_allclose(np.diag(resampled[key].affine.numpy())[:3], (1.5, 1.5, 1.5), atol=1e-6)
    np.testing.assert_allclose(_world_centroid(resampled["label"]), lesion_world, atol=1.5)

    out = crop_and_normalise(resampled)
    assert out["image"].shape == out["label"].shape == (1, 64, 64, 64)
    np.testing.assert_allclose(_world_centroid(out["label"]), lesion_world, atol=1.5)
    assert abs(float(out["label"].sum()) * 1.5**3 - 10 * 10 * 15) < 0.2 * 1500  # volume in mm^3 kept


def _meta(array, affine=None):
    """(X, Y, Z) array -> (1, X, Y, Z) MetaTensor, as LoadVolumed makes them."""
    return MetaTensor(
        torch.as_tensor(array[None], dtype=torch.float32),
        affine=torch.as_tensor(np.eye(4) if affine is None else affine),
    )


def test_crop_puts_lesion_centre_within_jitter_of_output_centre():
    rng = np.random.default_rng(0)
    image = _head_ct((80, 70, 60), (slice(0, 80), slice(5, 65), slice(5, 55)), rng)
    label = np.zeros(image.shape, np.float32)
    label[4:11, 30:41, 50:59] = 1  # bbox centre (7, 35, 54): near two borders, so padding is needed
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = (-60.0, -50.0, -40.0)
    data = {"image": _meta(image, affine), "label": _meta(label, affine)}
    lesion_world = (affine @ np.array([7.0, 35.0, 54.0, 1.0]))[:3]

    jitter = 4
    crop = CropAroundLesiond(roi_size=(32, 32, 32), jitter_voxels=jitter)
    crop.set_random_state(0)
    centres = []
    for _ in range(8):
        out = crop(data)
        assert out["image"].shape == out["label"].shape == (1, 32, 32, 32)
        centre = _bbox_centre(out["label"][0] > 0.5)
        assert np.all(np.abs(centre - 15.5) <= jitter + 0.5), centre
        centres.append(tuple(centre))
        lesion_out = np.linalg.inv(out["label"].affine.numpy()) @ np.append(lesion_world, 1.0)
        np.testing.assert_allclose(lesion_out[:3], centre, atol=1e-6)  # affine follows crop + pad
        # x = 7 + jitter lies < 16 voxels from the border, so output slice x = 0 is outside the scan:
        # padded with the image's minimum (air) and label 0.
        assert torch.all(out["image"][0, 0] == float(image.min())) and torch.all(out["label"][0, 0] == 0)
    assert len(set(centres)) > 1  # the jitter is random

    exact = CropAroundLesiond(roi_size=(32, 32, 32))(data)
    np.testing.assert_allclose(_bbox_centre(exact["label"][0] > 0.5), (15.5, 15.5, 15.5), atol=0.5)
    assert float(exact["image"][0, 0, 0, 0]) == pytest.approx(float(image.min()))


def test_crop_of_negative_centres_on_head_and_pads_small_volumes():
    rng = np.random.default_rng(1)
    head = (slice(40, 55), slice(10, 21), slice(5, 22))  # smaller than the crop, off-centre in the scan
    image = _head_ct((90, 80, 60), head, rng)
    data = {"image": _meta(image), "label": _meta(np.zeros(image.shape, np.float32))}
    out = CropAroundLesiond(roi_size=(24, 24, 24))(data)
    assert out["label"].sum() == 0
    head_centre = _bbox_centre(out["image"][0] > -500)
    np.testing.assert_allclose(head_centre, (11.5, 11.5, 11.5), atol=0.5)

    inference = CropAroundLesiond(roi_size=(24, 24, 24))({"image": data["image"]})  # no label at all
    torch.testing.assert_close(inference["image"].as_tensor(), out["image"].as_tensor())

    small = {"image": _meta(image[:20, :20, :20]), "label": _meta(np.zeros((20, 20, 20), np.float32))}
    assert CropAroundLesiond(roi_size=(32, 32, 32))(small)["image"].shape == (1, 32, 32, 32)


def _crop_centre_in_input(out: MetaTensor, input_affine: np.ndarray) -> np.ndarray:
    """Input-voxel position of a crop's middle voxel, found through the affines."""
    middle = np.append((np.array(out.shape[1:]) - 1) / 2, 1.0)
    return (np.linalg.inv(input_affine) @ out.affine.numpy() @ middle)[:3]


def test_random_head_crops_reach_the_head_edges_and_repeat_for_a_seed():
    rng = np.random.default_rng(3)
    head = (slice(10, 70), slice(8, 62), slice(6, 50))  # bbox 10..69, 8..61, 6..49; middle (39.5, 34.5, 27.5)
    image = _head_ct((80, 70, 56), head, rng)
    data = {"image": _meta(image), "label": _meta(np.zeros(image.shape, np.float32))}

    def centres(prob, seed, n=30):
        crop = CropAroundLesiond(roi_size=(24, 24, 24), negative_random_prob=prob)
        crop.set_random_state(seed)
        return np.array([_crop_centre_in_input(crop(data)["image"], np.eye(4)) for _ in range(n)])

    fixed = centres(0.0, 0)
    np.testing.assert_allclose(fixed, np.tile([39.5, 34.5, 27.5], (30, 1)), atol=0.5)  # head-centred, as before
    spread = centres(1.0, 0)
    assert np.all(spread >= np.array([10, 8, 6]) - 0.5) and np.all(spread <= np.array([69, 61, 49]) + 0.5)
    assert np.any(np.abs(spread - [39.5, 34.5, 27.5]).max(1) > 20)  # some crops sit at the skull/scalp/air edge
    np.testing.assert_array_equal(spread, centres(1.0, 0))  # a seed fixes the sequence
    assert not np.array_equal(spread, centres(1.0, 1))
    half = centres(0.5, 0, n=60)
    assert 10 < np.sum(np.abs(half - [39.5, 34.5, 27.5]).max(1) > 0.5) < 50

    lesion = np.zeros(image.shape, np.float32)
    lesion[30:34, 30:34, 20:24] = 1
    positive = {"image": data["image"], "label": _meta(lesion)}
    crop = CropAroundLesiond(roi_size=(24, 24, 24), negative_random_prob=1.0, positive_random_prob=0.0)
    assert crop(positive)["label"].sum() == lesion.sum()  # the negatives' share does not move lesion crops


def test_random_head_crops_only_in_training(tmp_path):
    image_path, _, _ = _write_case(tmp_path)
    cfg = {"roi_size": (32, 32, 32), "negative_random_crop_prob": 1.0}
    train_crop = next(t for t in build_transforms(cfg, train=True).transforms if isinstance(t, CropAroundLesiond))
    assert (
        train_crop.negative_random_prob == 1.0
        and train_crop.positive_random_prob == Preprocessing().positive_random_crop_prob
    )
    validation = build_transforms(cfg, train=False)
    assert next(t for t in validation.transforms if isinstance(t, CropAroundLesiond)).negative_random_prob == 0.0
    first, second = (validation({"image": image_path, "label": None})["image"] for _ in range(2))
    torch.testing.assert_close(first.as_tensor(), second.as_tensor())
    with pytest.raises(ValueError, match="positive_random_crop_prob"):
        build_transforms({"positive_random_crop_prob": 1.5}, train=True)


def test_clamp_hu():
    out = ClampHUd("image", -100, 200)({"image": torch.tensor([[-3000.0, 0.0, 5000.0]])})
    assert out["image"].tolist() == [[-100.0, 0.0, 200.0]]


def test_znormalize_uses_foreground_statistics():
    rng = np.random.default_rng(2)
    x = rng.normal(20, 30, size=(1, 20, 20, 20)).astype(np.float32)
    x[:, :10] = -1000  # air must not influence the statistics
    was_foreground = x > 0
    out = ZNormalizeForegroundd("image")({"image": _meta(x[0])})["image"].numpy()
    assert out[was_foreground].mean() == pytest.approx(0.0, abs=1e-4)
    assert out[was_foreground].std() == pytest.approx(1.0, abs=1e-4)
    fg = x[was_foreground]
    np.testing.assert_allclose(out[0, 0, 0, 0], (-1000 - fg.mean()) / fg.std(), rtol=1e-4)  # air too

    all_negative = ZNormalizeForegroundd("image")({"image": torch.as_tensor(-x - 2000)})["image"]
    assert float(all_negative.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(all_negative.std(correction=0)) == pytest.approx(1.0, abs=1e-4)
    constant = ZNormalizeForegroundd("image")({"image": torch.full((1, 4, 4, 4), 40.0)})["image"]
    assert torch.all(constant == 0)


def test_brain_window_one_channel_per_window():
    hu = torch.tensor([-50.0, 0.0, 40.0, 80.0, 500.0]).reshape(1, 5, 1, 1)
    out = BrainWindowd("image", windows=[(40, 80), (80, 200)])({"image": hu})["image"]
    assert out.shape == (2, 5, 1, 1)
    assert out[0].flatten().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert out[1].flatten().tolist() == pytest.approx([0.0, 0.1, 0.3, 0.5, 1.0])
    assert Preprocessing(normalization="brain_window", hu_windows=[[40, 80], [80, 200]]).num_input_channels == 2
    assert Preprocessing().num_input_channels == 1


@pytest.mark.parametrize("normalization", ["zscore", "brain_window"])
def test_training_pipeline_outputs_and_reproducibility(tmp_path, normalization):
    image_path, mask_path, _ = _write_case(tmp_path)
    cfg = {"roi_size": (32, 32, 32), "normalization": normalization, "hu_windows": [[40, 80], [60, 160]]}
    outputs = []
    for seed in (0, 0, 1):
        pipeline = build_transforms(cfg, train=True)
        pipeline.set_random_state(seed)
        outputs.append(pipeline({"image": image_path, "label": mask_path}))
    out = outputs[0]
    assert out["image"].dtype == out["label"].dtype == torch.float32
    assert out["image"].shape == (Preprocessing.coerce(cfg).num_input_channels, 32, 32, 32)
    assert out["label"].shape == (1, 32, 32, 32)
    assert set(out["label"].unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(outputs[1]["image"].as_tensor(), out["image"].as_tensor())  # same seed
    assert not torch.equal(outputs[2]["image"].as_tensor(), out["image"].as_tensor())  # other seed

    negative = build_transforms(cfg, train=True)({"image": image_path, "label": None})
    assert negative["label"].shape == (1, 32, 32, 32) and negative["label"].sum() == 0


def test_bad_config_fails_before_reading_data():
    with pytest.raises(ValueError, match="normalization"):
        build_transforms({"normalization": "minmax"}, train=True)
    with pytest.raises(ValueError, match="roi_size"):
        build_transforms({"roi_size": (32, 32)}, train=False)
    with pytest.raises(ValueError, match="hu_clamp"):
        build_transforms({"hu_clamp": (100, -100)}, train=False)


def test_inference_pipeline_keeps_the_whole_scan(tmp_path):
    image_path, _, _ = _write_case(tmp_path, shape=(40, 40, 20), affine=np.diag([0.75, 0.75, 3.0, 1.0]))
    out = build_inference_transforms({})({"image": image_path})
    assert "label" not in out
    assert out["image"].dtype == torch.float32
    assert out["image"].shape[0] == 1 and np.all(np.abs(np.array(out["image"].shape[1:]) - (20, 20, 39)) <= 1)
    assert [op["class"] for op in out["image"].applied_operations] == ["Orientation", "SpatialResample"]
