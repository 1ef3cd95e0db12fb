"""Shared test helpers: paths to ../shared fixtures and the fixture fill rule."""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
sys.path.insert(0, str(REPO))


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
