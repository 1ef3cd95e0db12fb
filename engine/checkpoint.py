"""Checkpoint I/O shared by segmentation and report generation.

Writes are atomic (temp file + ``os.replace``) so a crash or SIGKILL never leaves a half-written
checkpoint. Reads use torch's ``weights_only`` unpickler plus a short allow-list: official SAM-Med3D
training checkpoints hold an ``argparse.Namespace`` and numpy scalars, which plain
``weights_only=True`` refuses (the "loading errors with torch >= 2.6" its users report); anything
else (arbitrary classes, functions) is refused with the offending names, never executed.
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message names file and keys."""


def _numpy_globals() -> list:
    """numpy pieces a pickled scalar/array needs, under the names numpy 1.x and 2.x write."""
    allowed: list = [np.dtype, np.ndarray]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(np._core.multiarray.scalar, f"{module}.scalar"),
                    (np._core.multiarray._reconstruct, f"{module}._reconstruct")]
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        dtype_class = getattr(np.dtypes, name)
        allowed.append((dtype_class, f"numpy.dtypes.{name}"))
    return allowed


SAFE_GLOBALS: list = [argparse.Namespace, *_numpy_globals()]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a torch checkpoint without executing arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    # Only add what is not registered yet: leaving the context removes what it added, and other
    # modules (the MONAI cache loader) register some of the same numpy globals process-wide.
    registered = set(torch.serialization.get_safe_globals())
    try:
        with torch.serialization.safe_globals([g for g in SAFE_GLOBALS if g not in registered]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # not a zip checkpoint: report the loader's own reason
            unsafe = []
        allowed = {f"{g[1]}" if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
        refused = [name for name in unsafe if name not in allowed]
        detail = f"it references {refused}, which are not on the allow-list" if refused else str(err).splitlines()[0]
        raise CheckpointError(f"refusing to load {path}: {detail}") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a hidden temp file in ``path``'s folder, then rename it over ``path``.

    Temp names end in ``.tmp`` (what a restarted run cleans up), or ``.tmp.nii[.gz]`` for NIfTI,
    whose writer picks the format from the name. A crash leaves the old file in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.lower()
    suffix = ".tmp.nii.gz" if name.endswith(".nii.gz") else ".tmp.nii" if name.endswith(".nii") else ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`, fsynced before the rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write)


def extract_state_dict(checkpoint: Any, path: str | os.PathLike = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint: under ``model_state_dict`` / ``state_dict`` / ``model``, or the
    bare state dict itself; a DDP ``module.`` prefix is removed."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path}: expected a dict, found {type(checkpoint).__name__}")
    for key in ("model_state_dict", "state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {sorted(checkpoint)[:10]})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def load_state_dict_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one message listing missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                more = f" ... (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{title} ({len(items)}): {items[:8]}{more}")
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)
