"""Experiment tracking through Weights & Biases, shared by segmentation and report generation.

Online when an API key is configured, offline otherwise (runs sync later with ``wandb sync``), and
off when tracking is not requested or ``WANDB_MODE=disabled``. A resumed training continues the same
W&B run: the run id travels inside ``latest_model.pth``.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
        return any(auth.authenticators(host) for host in ("api.wandb.ai", "api.wandb.com"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(requested: bool) -> Literal["disabled", "offline", "online"]:
    """'disabled', 'offline' or 'online' for this machine."""
    if not requested or os.environ.get("WANDB_MODE") == "disabled":
        return "disabled"
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_api_key_configured():
        return "offline"
    return "online"


class Tracker:
    """Thin wrapper that is a no-op when tracking is off, so training code never branches on it."""

    def __init__(
        self,
        enabled: bool,
        project: str,
        entity: str | None,
        config: Mapping[str, Any],
        output_dir: str | os.PathLike,
        run_id: str | None = None,
        name: str | None = None,
    ) -> None:
        self.mode = wandb_mode(enabled)
        self.run = None
        if self.mode == "disabled":
            return
        import wandb  # seconds to import (9 s measured on 2 cores): only tracked runs pay it

        if self.mode == "offline":
            print("W&B: no API key configured, logging offline (sync later with `wandb sync`)")
        self.run = wandb.init(
            project=project,
            entity=entity,
            config=dict(config),
            dir=str(output_dir),
            id=run_id,
            resume="allow" if run_id else None,
            name=name,
            mode=self.mode,
        )

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        """images: name → RGB uint8 (H, W, 3)."""
        if self.run is None or not images:
            return
        import wandb  # as in __init__: only tracked runs import it

        self.run.log({name: wandb.Image(array) for name, array in images.items()}, step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(dict(values))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
