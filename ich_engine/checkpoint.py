"""Checkpoint I/O shared by segmentation and report generation.

Writes are atomic (temp file + ``os.replace``) so a crash or SIGKILL never leaves a half-written
checkpoint. Reads use torch's ``weights_only`` unpickler plus a short allow-list: official SAM-Med3D
training checkpoints hold an ``argparse.Namespace`` and numpy scalars, which plain
``weights_only=True`` refuses (the "loading errors with torch >= 2.6" its users report); anything
else (arbitrary classes, functions) is refused with the offending names, never executed.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import pickle
import socket
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError
from .errors import UserError
from .safe_unpickling import torch_safe_globals


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message names file and keys."""


SAFE_GLOBALS: list = torch_safe_globals(argparse.Namespace)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """Load a torch checkpoint without executing arbitrary code. ``mmap``: tensors stay on disk until
    read (zip checkpoints, torch's format since 1.6), for reading a checkpoint's small entries cheaply."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the checkpoint file is empty (0 bytes), e.g. a copy that did not finish")
    # Only add what is not registered yet: leaving the context removes what it added, and other
    # modules (the MONAI cache loader) register some of the same numpy globals process-wide.
    registered = set(torch.serialization.get_safe_globals())
    try:
        with torch.serialization.safe_globals([g for g in SAFE_GLOBALS if g not in registered]):
            return torch.load(
                path, map_location=map_location, weights_only=True, mmap=mmap and zipfile.is_zipfile(path)
            )
    except pickle.UnpicklingError as err:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # not a zip checkpoint: report the loader's own reason
            unsafe = []
        allowed = {f"{g[1]}" if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
        refused = [name for name in unsafe if name not in allowed]
        detail = f"it references {refused}, which are not on the allow-list" if refused else str(err).splitlines()[0]
        raise CheckpointError(f"refusing to load {path}: {detail}") from None
    except Exception as err:  # torch.load on a truncated or foreign file fails in many ways (struct.error...)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: {reason} (truncated or not a torch checkpoint?)"
        ) from None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Run ``write(tmp)`` on a hidden temp file in ``path``'s folder, then rename it over ``path``.

    Temp names end in ``.tmp`` (what a restarted run cleans up), or ``.tmp.nii[.gz]`` for NIfTI,
    whose writer picks the format from the name. A crash leaves the old file in place. The file
    gets the permissions the umask gives new files, as a plain ``open`` would.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.lower()
    suffix = ".tmp.nii.gz" if name.endswith(".nii.gz") else ".tmp.nii" if name.endswith(".nii") else ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates 0600; the result gets the mode any new file would (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        full = _disk_limit_error(err)
        if full is not None and full.filename is None:  # a write error names no file: say which one
            raise OSError(full.errno, full.strerror, str(path)) from err
        raise


def _disk_limit_error(err: BaseException) -> OSError | None:
    """The full disk (ENOSPC) or file size limit (EFBIG, ``ulimit -f``) behind ``err``: torch.save's
    writer reports a failed write as a RuntimeError whose context is the OSError."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EFBIG):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


@contextlib.contextmanager
def lock_output_dir(path: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold ``path/.lock`` for a run: a second run on the same folder is refused (ConfigError) with the
    first one's PID and start time, instead of both writing a mixture of outputs and records. A path
    that is a file, or a folder that cannot be written, is refused the same way, before any work.

    The lock is an ``flock`` on the open file, so it ends with the process however it ends (a
    SIGKILLed run leaves no stale lock); ``enabled=False`` (DDP ranks other than 0) does nothing.
    """
    if not enabled:
        yield
        return
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output_dir {folder}: is a file; a folder (new or existing) is expected")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".lock", "a+")
    except OSError as err:  # before any work: a run must not end unable to write what it computed
        raise ConfigError(f"--output_dir {folder}: cannot write into it ({err.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(
            f"--output_dir {folder}: in use by {holder}; wait for that run or choose another --output_dir"
        ) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(
            f"PID {os.getpid()} on {socket.gethostname()}, started {datetime.now().isoformat(timespec='seconds')}\n"
        )
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


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
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
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
