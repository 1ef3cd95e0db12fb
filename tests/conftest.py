"""Shared test helpers: paths to ../shared fixtures and the fixture fill rule."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from blip.model import Blip2ReportConfig, LanguageModelConfig
from blip.qformer import QFormerBridgeConfig
from blip.vision import VisionTowerConfig
from sam3d.data.io import save_nifti
from sam3d.export import export_encoder
from sam3d.modeling.build import build_sam3d, model_config

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"


def fixture_fill(key: str, shape) -> torch.Tensor:
    """The fill rule of ../shared/fixtures/README.md: weights depend only on key and shape."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    t = torch.randn(tuple(shape), generator=g)
    if key.endswith("weight") and len(shape) == 1:
        return 1.0 + 0.1 * t
    return 0.05 * t


def load_fixture(name: str) -> dict:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def sam3d_fixture():
    return load_fixture("sam3d_parity.pt")


@pytest.fixture(scope="session")
def sam2d_fixture():
    return load_fixture("sam2d_parity.pt")


def write_tiny_segmentation_checkpoint(path: Path, spacing_mm: tuple[float, float, float]) -> Path:
    """An untrained SAM-Med3D `small` (32³ windows, seed 0) with its preprocessing at ``spacing_mm``."""
    from ich_engine.checkpoint import atomic_save

    torch.manual_seed(0)
    config = model_config("small", img_size=32)
    state = build_sam3d(config).state_dict()
    atomic_save(
        {
            "model_state_dict": state,
            "model_config": config.to_dict(),
            "preprocessing": {"target_spacing_mm": spacing_mm},
        },
        path,
    )
    return path


def make_tiny_models(folder: Path) -> tuple[Path, Path]:
    """An untrained tiny segmentation checkpoint and a saved tiny report model, for CLI/app tests.
    Returns (segmentation checkpoint, report-model folder); both use 3 mm preprocessing."""
    from blip.language_model import build_tiny_gpt2
    from blip.model import Blip2ReportConfig, Blip2ReportModel
    from blip.vision import VisionTowerConfig

    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_segmentation_checkpoint(folder / "seg.pth", (3.0, 3.0, 3.0))
    lm = build_tiny_gpt2(["subdural hematoma on the left."] * 4, folder / "lm", n_embd=32)
    encoder = model_config("tiny", encoder_depth=1, window_size=0, global_attn_indexes=())
    config = Blip2ReportConfig(
        ct_tower=VisionTowerConfig(
            "sam3d", encoder_config=encoder.to_dict(), preprocessing={"target_spacing_mm": (3.0, 3.0, 3.0)}
        ),
        bridge=QFormerBridgeConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        language_model=LanguageModelConfig(str(lm), "full"),
        num_query_tokens=4,
        condition_on_measurements=True,  # as the demo's
    )
    Blip2ReportModel(config).save_pretrained(folder / "report_model")
    return folder / "seg.pth", folder / "report_model"


# An analytic head in LPS mm for DICOM geometry tests: skull shell, brain with a smooth HU pattern (so a
# misplaced slice shows as an HU error) and an ellipsoid bleed in the patient's left hemisphere (LPS +x).
BLEED_CENTRE_LPS = (30.0, -10.0, 10.0)
BLEED_SEMI_AXES_MM = (18.0, 15.0, 22.0)
BLEED_HU = 75.0


def in_bleed(points_lps):
    import numpy as np

    p = (np.asarray(points_lps, dtype=float) - BLEED_CENTRE_LPS) / BLEED_SEMI_AXES_MM
    return (p**2).sum(axis=-1) < 1.0


def bleed_volume_ml() -> float:
    import math

    return 4.0 / 3.0 * math.pi * math.prod(BLEED_SEMI_AXES_MM) / 1000.0


def head_phantom_hu(points_lps):
    """HU at (N, 3) LPS positions."""
    import numpy as np

    x, y, z = np.asarray(points_lps, dtype=float).T
    r = np.sqrt((x / 75) ** 2 + (y / 90) ** 2 + (z / 70) ** 2)
    hu = np.full(len(x), -1000.0)
    hu[r < 1.0] = 1000.0
    brain = r < 0.92
    hu[brain] = (35 + 15 * np.sin(x / 9) * np.cos(y / 11) + 0.2 * z)[brain]
    hu[in_bleed(points_lps)] = BLEED_HU
    return hu


CT_REPORTS = {  # the two reports of the tiny report-model tests: a bleed, none
    True: "FINDINGS: Hyperdense hemorrhage in the right basal ganglia. IMPRESSION: Acute intracranial hemorrhage.",
    False: "FINDINGS: No hemorrhage or mass effect. IMPRESSION: Normal head CT.",
}
# The registry's "tiny" CT encoder without window attention: a 4^3 grid attended globally instead of
# padded to one 14^3 window, which keeps CPU tests fast.
TINY_CT = model_config("tiny", encoder_depth=2, window_size=0, global_attn_indexes=())
TINY_CT_PREPROCESSING = {
    "target_spacing_mm": (3.0, 3.0, 3.0),
    "roi_size": (64, 64, 64),
    "hu_clamp": (-1000.0, 1000.0),
    "normalization": "zscore",
}


def write_head_ct(path, bleed: bool, seed: int) -> None:
    """A 40x40x16 volume at 3x3x5 mm: air, a water-density 'brain' ball, a 60 HU spot when bleeding."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (40, 40, 16)), indexing="ij")
    volume = np.where(x**2 + y**2 + z**2 < 0.8, 30.0, -1000.0) + rng.normal(0, 5, (40, 40, 16))
    if bleed:
        volume[(x - 0.3) ** 2 + y**2 + z**2 < 0.05] = 60.0
    save_nifti(path, volume.astype(np.float32), np.diag([3.0, 3.0, 5.0, 1.0]))


@pytest.fixture(scope="module")
def ct_data(tmp_path_factory):
    """Six tiny CT volumes with report manifests (4 train, 2 val), an exported tiny encoder and the
    flags that point blip.training.train at them."""
    root = tmp_path_factory.mktemp("ct_reports")
    manifests = {}
    for split, bleeds in (("train", [True, False, True, False]), ("val", [True, False])):
        rows = []
        for index, bleed in enumerate(bleeds):
            image = root / f"{split}_{index}.nii.gz"
            write_head_ct(image, bleed, seed=len(rows) + (10 if split == "val" else 0))
            rows.append(
                {
                    "image": image.name,
                    "report": CT_REPORTS[bleed],
                    "modality": "ct",
                    "id": f"{split}{index}",
                    "volume_ml": 4.2 if bleed else 0.0,
                    "side": "right" if bleed else "none",
                }
            )
        manifests[split] = root / f"{split}.jsonl"
        manifests[split].write_text("".join(json.dumps(row) + "\n" for row in rows))
    torch.manual_seed(0)
    encoder = root / "sam_encoder.pth"
    export_encoder(build_sam3d(TINY_CT), encoder, TINY_CT, visual_tokens=16, preprocessing=TINY_CT_PREPROCESSING)
    # The report-training flags every tiny CT run starts with.
    flags = [
        "--config",
        "sam3d/configs/blip_tiny_ct.yaml",
        "--train_manifest",
        str(manifests["train"]),
        "--val_manifest",
        str(manifests["val"]),
        "--encoder",
        str(encoder),
    ]
    return {"root": root, "encoder": encoder, "flags": flags, **manifests}


TINY_REPORTS = [  # the two reports of the report-model unit tests
    "FINDINGS: Acute hemorrhage in the left frontal lobe with mild edema. IMPRESSION: Intraparenchymal hemorrhage.",
    "FINDINGS: No hemorrhage, mass effect or midline shift. IMPRESSION: Normal head CT.",
]
TINY_BRIDGE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def tiny_config(lm_folder, lm_mode="full", ct_checkpoint=None, freeze_ct=False, xray=True) -> Blip2ReportConfig:
    ct = VisionTowerConfig(
        "sam3d", checkpoint=ct_checkpoint, freeze=freeze_ct, encoder_config=None if ct_checkpoint else TINY_CT.to_dict()
    )
    return Blip2ReportConfig(
        ct_tower=ct,
        xray_tower=VisionTowerConfig("sam2d", "tiny") if xray else None,
        bridge=QFormerBridgeConfig(**TINY_BRIDGE),
        language_model=LanguageModelConfig(str(lm_folder), lm_mode),
        num_query_tokens=4,
    )


def ct_images(batch=2, seed=0):
    return torch.randn(batch, 1, 64, 64, 64, generator=torch.Generator().manual_seed(seed))


class VolumeDataset(Dataset):
    """Random 32^3 scans; even indices carry a cubic 'hemorrhage' that is bright in the image."""

    def __init__(self, n=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            label = torch.zeros(1, 32, 32, 32)
            if i % 2 == 0:
                label[0, 8:16, 10:18, 12:20] = 1
            image = torch.randn(1, 32, 32, 32, generator=g) * 0.3 + 2 * label
            self.items.append({"image": image, "label": label, "patient_id": f"P{i}"})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def dciodvfy_errors(path: str | Path) -> list[str]:
    """The "Error" lines of dicom3tools' validator for one DICOM file (its warnings are not counted).

    Outside CI a machine without dicom3tools skips the test, saying so; .ci/run installs it, so in
    CI a missing validator fails instead of passing unchecked.
    """
    import os
    import shutil
    import subprocess

    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (Debian package dicom3tools) is not installed; .ci/run installs it")
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
