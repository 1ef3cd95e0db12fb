"""One training run, the same skeleton for every workflow (nnU-Net's ``run_training``, with the workflow as a plug-in).

:func:`run_training` compares a resumed run with the one before it, locks the output folder, sets up
devices, DDP and seeds, asks the workflow for a :class:`TrainingRun` (model, data, task, parameter
groups), records ``config.json``, fits with :class:`~ich_engine.trainer.Trainer` and, on rank 0, lets
the workflow export from the best checkpoint. The workflows' own ``run_training(config)``
(``sam3d.training``, ``blip.training.train``) call it with their ``prepare`` function.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.data import Dataset

from .checkpoint import lock_output_dir
from .config import ConfigError
from .distributed import DistributedContext, cleanup, init_distributed, resolve_device, seed_everything
from .settings import TrainingConfig, check_resume
from .tracking import Tracker
from .trainer import BEST_CHECKPOINT, LATEST_CHECKPOINT, Trainer, TrainerConfig, TrainingTask

__all__ = ["TrainingRun", "is_main_process", "run_training"]

ConfigT = TypeVar("ConfigT", bound=TrainingConfig)


@dataclass
class TrainingRun:
    """What a workflow hands the engine to fit."""

    task: TrainingTask
    model: nn.Module
    param_groups: list[dict]
    train_dataset: Dataset
    val_dataset: Dataset
    record: Mapping[str, Any] = field(default_factory=dict)  # beside the settings in config.json and the tracker
    checkpoint_extras: Mapping[str, Any] = field(default_factory=dict)
    collate_fn: Callable | None = None
    summary_extra: Mapping[str, Any] = field(default_factory=dict)
    result_extra: Mapping[str, Any] = field(default_factory=dict)
    # Rank 0, when a best checkpoint exists: writes what is made from it, may add to the result, and
    # returns the output paths by name.
    export_best: Callable[[dict[str, Any]], Mapping[str, str]] | None = None


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a single process (before the process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def run_training(
    config: ConfigT, prepare: Callable[[ConfigT, torch.device, DistributedContext], TrainingRun]
) -> dict[str, Any]:
    """Train ``config``'s run. Returns the trainer's result (summary path, best metric and epoch,
    stop reason, history) with ``outputs`` (file paths by name) and the workflow's ``result_extra``."""
    if config.resume and not (Path(config.output_dir) / LATEST_CHECKPOINT).is_file():
        raise ConfigError(f"--resume: {Path(config.output_dir) / LATEST_CHECKPOINT} does not exist")
    resume_changes = check_resume(config)  # config.json records what this run changed
    for change in resume_changes:
        print(f"resuming with a changed flag: {change}", file=sys.stderr)
    with lock_output_dir(config.output_dir, enabled=is_main_process()):
        device = resolve_device(config.device)
        ctx = init_distributed(device)
        try:
            return _fit(config, prepare, device, ctx, resume_changes)
        finally:
            cleanup(ctx)


def _fit(
    config: ConfigT,
    prepare: Callable[[ConfigT, torch.device, DistributedContext], TrainingRun],
    device: torch.device,
    ctx: DistributedContext,
    resume_changes: list[str],
) -> dict[str, Any]:
    seed_everything(config.seed)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    run = prepare(config, device, ctx)
    record = {**config.to_dict(), "resume_changes": resume_changes, **run.record}
    if ctx.is_main:
        (output_dir / "config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    tracker_factory = lambda run_id: Tracker(
        config.use_wandb, config.wandb_project, config.wandb_entity, record, output_dir, run_id, name=output_dir.name
    )
    trainer = Trainer(
        TrainerConfig.from_settings(config),
        run.task,
        run.model,
        run.param_groups,
        device,
        ctx,
        tracker_factory,
        collate_fn=run.collate_fn,
        checkpoint_extras=run.checkpoint_extras,
    )
    result = trainer.fit(run.train_dataset, run.val_dataset, run.summary_extra)
    outputs = {"best_model": str(output_dir / BEST_CHECKPOINT), "latest_model": str(output_dir / LATEST_CHECKPOINT)}
    if ctx.is_main and run.export_best is not None and (output_dir / BEST_CHECKPOINT).exists():
        outputs.update(run.export_best(result))
    if ctx.is_main:
        outputs["training_curves"] = result["curves_path"]
    return {**result, **run.result_extra, "outputs": outputs}
