"""Machine check behind ``python train.py --test``: one line per check, non-zero exit on failure."""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

REQUIRED_PACKAGES = (
    "torch",
    "numpy",
    "monai",
    "einops",
    "nibabel",
    "SimpleITK",
    "scipy",
    "yaml",
    "psutil",
    "tqdm",
    "wandb",
    "PIL",
)


class CheckFailed(RuntimeError):
    pass


def _versions() -> str:
    # Imported by the checks themselves: a broken torch or psutil is a failed check line, not a crash.
    import torch

    cuda = torch.version.cuda if torch.cuda.is_available() else "not available"
    return f"Python {platform.python_version()}, torch {torch.__version__}, CUDA {cuda}"


def _gpu() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU (training runs on CPU)"
    parts = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        parts.append(f"cuda:{i} {props.name} {free / 1024**3:.1f}/{total / 1024**3:.1f} GiB free, AMP {bf16}")
    return "; ".join(parts)


def _ram() -> str:
    import psutil

    mem = psutil.virtual_memory()
    if mem.available < 4 * 1024**3:
        raise CheckFailed(f"only {mem.available / 1024**3:.1f} GiB RAM available (>= 4 GiB needed)")
    return f"{mem.available / 1024**3:.1f} GiB available of {mem.total / 1024**3:.1f} GiB, {os.cpu_count()} CPU cores"


def _disk(output_dir: Path) -> Callable[[], str]:
    def check() -> str:
        target = output_dir if output_dir.exists() else Path.cwd()
        free = shutil.disk_usage(target).free
        if free < 2 * 1024**3:
            raise CheckFailed(f"only {free / 1024**3:.1f} GiB free at {target} (>= 2 GiB needed)")
        return f"{free / 1024**3:.1f} GiB free at {target}"

    return check


def _packages() -> str:
    missing, found = [], []
    for name in REQUIRED_PACKAGES:
        try:
            module = importlib.import_module(name)
            found.append(f"{name} {getattr(module, '__version__', '')}".strip())
        except Exception as err:  # noqa: BLE001 - any import failure is the finding
            missing.append(f"{name} ({type(err).__name__}: {err})")
    if missing:
        raise CheckFailed("cannot import " + ", ".join(missing))
    return ", ".join(found)


def _writable(output_dir: Path) -> Callable[[], str]:
    def check() -> str:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write_test_") as handle:
            handle.write(b"ok")
        return f"{output_dir} is writable"

    return check


def run_checks(output_dir: str | os.PathLike, extra: Sequence[tuple[str, Callable[[], str]]] = ()) -> int:
    """Run every check, print one line each, return the number of failures."""
    output_dir = Path(output_dir)
    checks: list[tuple[str, Callable[[], str]]] = [
        ("versions", _versions),
        ("gpu", _gpu),
        ("ram", _ram),
        ("disk", _disk(output_dir)),
        ("packages", _packages),
        ("output dir", _writable(output_dir)),
        *extra,
    ]
    failures = 0
    for name, check in checks:
        started = time.time()
        try:
            detail = check()
            status = "OK  "
        except Exception as err:  # noqa: BLE001 - a check reports, it does not crash the others
            failures += 1
            status = "FAIL"
            detail = f"{type(err).__name__}: {err}"
            if not isinstance(err, CheckFailed):
                detail += "\n" + "".join(traceback.format_exception(err)[-3:])
        print(f"[{status}] {name}: {detail} ({time.time() - started:.1f}s)", flush=True)
    print(f"system check: {len(checks) - failures} passed, {failures} failed", flush=True)
    sys.stdout.flush()
    return failures
