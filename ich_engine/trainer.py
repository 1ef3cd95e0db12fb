"""The one training engine: segmentation and report generation both run through :class:`Trainer`.

A task object supplies what differs (how a batch becomes a loss, how validation scores a model);
the engine owns the rest: devices and DDP, mixed precision, gradient accumulation and clipping,
schedulers, early stopping, atomic best/latest checkpoints, exact resume, W&B and the run summary.

Exact resume: every epoch re-seeds all RNGs (and the data pipeline's random transforms) from
``(seed, epoch)``, and ``latest_model.pth`` is written atomically at the end of each epoch with model,
optimizer, scheduler, scaler and bookkeeping. A run killed at any moment (even SIGKILL) and resumed
therefore finishes with the same weights as an uninterrupted run with the same seed.

Grouped batches: a dataset with a ``group_keys`` attribute (one key per item, e.g. the modality of
each report study) is batched by :class:`ich_engine.samplers.GroupedBatchSampler`, so no batch mixes
groups; other datasets (segmentation) use a ``DistributedSampler`` and ``batch_size``.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from .checkpoint import CheckpointError, atomic_save, atomic_write, load_checkpoint
from .distributed import (
    DistributedContext,
    all_reduce_mean,
    barrier,
    broadcast_object,
    rng_state,
    seed_everything,
    set_rng_state,
)
from .plots import plot_training_curves
from .samplers import GroupedBatchSampler
from .tracking import Tracker

BEST_CHECKPOINT = "best_model.pth"
LATEST_CHECKPOINT = "latest_model.pth"


# The model a task works on (a task takes the model class it was written for, e.g. Sam3D).
ModelT = TypeVar("ModelT", bound=nn.Module)
ModelT_contra = TypeVar("ModelT_contra", bound=nn.Module, contravariant=True)


class TrainingTask(Protocol[ModelT_contra]):
    """What a workflow plugs into the engine; the trainer hands it the model it was given."""

    monitor: str  # validation metric that selects the best model and drives early stopping
    monitor_mode: str  # "max" or "min"

    def training_module(self, model: ModelT_contra) -> nn.Module:
        """The module whose forward(batch) returns (loss, logs); DDP wraps this one."""

    def validate(self, model: ModelT_contra, loader: Iterable, device: torch.device) -> dict[str, float]:
        """Metrics on the validation set; must contain ``monitor``."""

    def visualize(self, model: ModelT_contra, loader: Iterable, device: torch.device) -> dict[str, np.ndarray]:
        """Named RGB uint8 images for the tracker (may be empty)."""


@dataclass
class TrainerConfig:
    output_dir: str = "outputs"
    epochs: int = 200
    batch_size: int = 2
    gradient_accumulation_steps: int = 4
    max_grad_norm: float = 1.0
    use_mixed_precision: bool = False
    scheduler_type: str = "reduce_on_plateau"
    scheduler_patience: int = 5
    scheduler_step_size: int = 50
    scheduler_gamma: float = 0.5
    min_lr: float = 1e-7
    patience: int = 15
    seed: int = 42
    num_workers: int = 0
    log_freq: int = 1
    log_images: bool = False
    resume: bool = False
    max_steps_per_epoch: int | None = None  # cap for smoke runs (system check, tests)
    extra: dict = field(default_factory=dict)  # workflow settings recorded in checkpoints/summary

    # The settings every workflow's config carries (ich_engine.settings.TrainingConfig, same names).
    SHARED = (
        "epochs",
        "batch_size",
        "gradient_accumulation_steps",
        "max_grad_norm",
        "use_mixed_precision",
        "scheduler_type",
        "patience",
        "seed",
        "num_workers",
        "log_freq",
        "log_images",
        "resume",
        "max_steps_per_epoch",
    )

    @classmethod
    def from_settings(cls, settings: Any) -> TrainerConfig:
        """The engine's loop settings from a workflow's config (an ``ich_engine.settings.TrainingConfig``)."""
        return cls(output_dir=settings.output_dir, **{name: getattr(settings, name) for name in cls.SHARED})


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (CPUs, Ampere+ GPUs), fp16 with a grad scaler otherwise."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig, monitor_mode: str):
    if cfg.scheduler_type == "reduce_on_plateau":
        if monitor_mode not in ("min", "max"):
            raise ValueError(f"monitor_mode must be 'min' or 'max', got {monitor_mode!r}")
        mode: Literal["min", "max"] = "max" if monitor_mode == "max" else "min"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=cfg.scheduler_gamma, patience=cfg.scheduler_patience, min_lr=cfg.min_lr
        )
    if cfg.scheduler_type == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1), eta_min=cfg.min_lr)
    if cfg.scheduler_type == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.scheduler_step_size, gamma=cfg.scheduler_gamma)
    raise ValueError(f"scheduler_type must be reduce_on_plateau, cosine or step, got '{cfg.scheduler_type}'")


def peak_ram_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _set_transform_seed(dataset: Dataset, seed: int) -> None:
    """Re-seed MONAI random transforms (their RNG lives in the transform, not in numpy's global)."""
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed % 2**32)


class Trainer(Generic[ModelT]):
    def __init__(
        self,
        cfg: TrainerConfig,
        task: TrainingTask[ModelT],
        model: ModelT,
        param_groups: list[dict],
        device: torch.device,
        ctx: DistributedContext = DistributedContext(),
        tracker_factory: Callable[[str | None], Tracker] | None = None,
        collate_fn: Callable | None = None,
        checkpoint_extras: Mapping[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.task = task
        self.model = model.to(device)
        self.device = device
        self.ctx = ctx
        self.output_dir = Path(cfg.output_dir)
        self.collate_fn = collate_fn
        self.checkpoint_extras = dict(checkpoint_extras or {})
        self.tracker_factory = tracker_factory
        self.optimizer = torch.optim.AdamW(param_groups)
        self.scheduler = build_scheduler(self.optimizer, cfg, task.monitor_mode)
        self.amp_dtype = autocast_dtype(device)
        self.use_amp = cfg.use_mixed_precision
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.use_amp and self.amp_dtype == torch.float16)
        module = task.training_module(self.model)
        if ctx.enabled:
            # Negative-only batches skip the click embeddings, so some parameters get no gradient.
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
            )
        self.train_module = module
        self.state: dict[str, Any] = {
            "epoch": 0,
            "best_metric": None,
            "best_epoch": None,
            "epochs_without_improvement": 0,
            "history": [],
            "started": datetime.now().strftime("%Y%m%d_%H%M%S"),
            "wandb_run_id": None,
        }

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint(self) -> dict[str, Any]:
        history = self.state["history"]
        return {
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scheduler_state_dict": self.scheduler.state_dict(),
            "scaler_state_dict": self.scaler.state_dict(),
            "epoch": self.state["epoch"],
            "losses": [h["train_loss"] for h in history],
            # Per-epoch metric lists under the names a task's model family expects (SAM-Med3D: "dices").
            **{key: [h.get(column) for h in history] for key, column in self._history_keys().items()},
            "best_metric": self.state["best_metric"],
            "best_epoch": self.state["best_epoch"],
            "epochs_without_improvement": self.state["epochs_without_improvement"],
            "history": history,
            "started": self.state["started"],
            "wandb_run_id": self.state["wandb_run_id"],
            "rng_state": rng_state(),
            "args": {**asdict(self.cfg)},
            **self.checkpoint_extras,
        }

    def _history_keys(self) -> Mapping[str, str]:
        """Checkpoint key -> history column, from the task's optional ``checkpoint_history``."""
        return getattr(self.task, "checkpoint_history", {})

    def _remove_stale_temp_files(self) -> None:
        """A SIGKILL during a write leaves a hidden temp file behind; the real files are intact."""
        for pattern in (f".{BEST_CHECKPOINT}.*.tmp", f".{LATEST_CHECKPOINT}.*.tmp", ".training_summary_*.tmp"):
            for stale in self.output_dir.glob(pattern):
                stale.unlink(missing_ok=True)

    def _resume(self) -> None:
        path = self.output_dir / LATEST_CHECKPOINT
        if not path.exists():
            raise CheckpointError(f"--resume: no {LATEST_CHECKPOINT} in {self.output_dir} to continue from")
        ckpt = load_checkpoint(path, map_location=self.device)
        self.model.load_state_dict(ckpt["model_state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        self.scheduler.load_state_dict(ckpt["scheduler_state_dict"])
        self.scaler.load_state_dict(ckpt["scaler_state_dict"])
        for key in (
            "epoch",
            "best_metric",
            "best_epoch",
            "epochs_without_improvement",
            "history",
            "started",
            "wandb_run_id",
        ):
            self.state[key] = ckpt[key]
        set_rng_state(ckpt["rng_state"])
        if self.ctx.is_main:
            print(
                f"Resumed from {path} at epoch {self.state['epoch']} (best {self.task.monitor} "
                f"{self.state['best_metric']} at epoch {self.state['best_epoch']})"
            )

    # ---------------------------------------------------------------- loop
    def _loader(self, dataset: Dataset, shuffle: bool, ctx: DistributedContext) -> DataLoader:
        # MONAI seeds its workers per epoch; imported here so a task that never loads data (none yet) or
        # the LM pre-training does not pay MONAI's import (tens of seconds measured on 2 busy cores).
        from monai.data import DataLoader as MonaiDataLoader

        group_keys = getattr(dataset, "group_keys", None)
        batching: dict[str, object]
        if group_keys is not None:
            batching = {
                "batch_sampler": GroupedBatchSampler(
                    group_keys, self.cfg.batch_size, shuffle, self.cfg.seed, ctx.world_size, ctx.rank
                )
            }
        else:
            batching = {
                "batch_size": self.cfg.batch_size,
                "sampler": DistributedSampler(
                    dataset,
                    num_replicas=ctx.world_size,
                    rank=ctx.rank,
                    shuffle=shuffle,
                    seed=self.cfg.seed,
                    drop_last=False,
                ),
            }
        return MonaiDataLoader(
            dataset,
            **batching,
            num_workers=self.cfg.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.device.type == "cuda",
        )

    def _train_epoch(self, loader: DataLoader, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        self.train_module.train()
        accum = max(1, cfg.gradient_accumulation_steps)
        steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}  # a log key may be absent from some batches (e.g. no negatives)
        seen = 0
        self.optimizer.zero_grad(set_to_none=True)
        # Closed on an error too, so the error's line does not start after the bar.
        with tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not self.ctx.is_main,
            leave=False,
            dynamic_ncols=True,
        ) as bar:
            for step, batch in enumerate(loader):
                if step >= steps:
                    break
                boundary = (step + 1) % accum == 0 or step + 1 == steps
                module = self.train_module  # DDP when distributed: it syncs gradients only on accumulation boundaries
                sync: contextlib.AbstractContextManager[object]
                if isinstance(module, nn.parallel.DistributedDataParallel) and not boundary:
                    sync = module.no_sync()
                else:
                    sync = contextlib.nullcontext()
                with sync:
                    with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                        loss, logs = self.train_module(batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"non-finite training loss {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                            "lower --lr, or check the inputs of this batch"
                        )
                    self.scaler.scale(loss / accum).backward()
                if boundary:
                    self.scaler.unscale_(self.optimizer)
                    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                seen += 1
                logs = {"loss": loss.item(), **logs}
                for key, value in logs.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
                    counts[key] = counts.get(key, 0) + 1
                bar.set_postfix(loss=f"{totals['loss'] / seen:.4f}")
                bar.update(1)
        means = {f"train_{k}": v / counts[k] for k, v in totals.items()}
        # Only the loss is on every rank for sure; the other logs are rank 0's view.
        means["train_loss"] = all_reduce_mean(means["train_loss"], self.ctx, self.device)
        return means

    def _improved(self, value: float) -> bool:
        best = self.state["best_metric"]
        if best is None or (isinstance(value, float) and math.isnan(value)):
            return best is None and not (isinstance(value, float) and math.isnan(value))
        return value > best if self.task.monitor_mode == "max" else value < best

    def fit(self, train_dataset: Dataset, val_dataset: Dataset, summary_extra: Mapping[str, Any] | None = None) -> dict:
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.ctx.is_main:
            self._remove_stale_temp_files()
        if cfg.resume:
            self._resume()
        tracker = Tracker(False, "", None, {}, self.output_dir)
        if self.ctx.is_main and self.tracker_factory is not None:
            tracker = self.tracker_factory(self.state["wandb_run_id"])
            self.state["wandb_run_id"] = tracker.run_id
        summary_path = self.output_dir / f"training_summary_{self.state['started']}.json"
        train_loader = self._loader(train_dataset, shuffle=True, ctx=self.ctx)
        val_loader = self._loader(val_dataset, shuffle=False, ctx=DistributedContext())
        stop_reason = "completed all epochs"
        if self.state["epoch"] >= cfg.epochs:
            stop_reason = f"already trained {self.state['epoch']} epochs (--epochs {cfg.epochs})"
        where = "before the first epoch"
        try:
            for epoch in range(self.state["epoch"], cfg.epochs):
                where = f"during epoch {epoch + 1}"
                started = time.time()
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                epoch_seed = cfg.seed + 1000 * epoch + self.ctx.rank
                seed_everything(epoch_seed)
                _set_transform_seed(train_dataset, epoch_seed)
                grouped = isinstance(train_loader.batch_sampler, GroupedBatchSampler)
                sampler = train_loader.batch_sampler if grouped else train_loader.sampler
                assert isinstance(sampler, (GroupedBatchSampler, DistributedSampler))  # as _loader builds them
                sampler.set_epoch(epoch)
                record: dict[str, Any] = {"epoch": epoch + 1, **self._train_epoch(train_loader, epoch)}
                metrics = None
                if self.ctx.is_main:
                    metrics = self.task.validate(self.model, val_loader, self.device)
                    if self.task.monitor not in metrics:
                        raise KeyError(f"validation did not return the monitored metric '{self.task.monitor}'")
                metrics = broadcast_object(metrics, self.ctx)
                record.update(metrics)
                value = metrics[self.task.monitor]
                if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.scheduler.step(value)
                else:
                    self.scheduler.step()
                record["lr"] = [group["lr"] for group in self.optimizer.param_groups][0]
                record["time_s"] = round(time.time() - started, 2)
                record["ram_peak_gb"] = round(peak_ram_gb(), 3)
                if self.device.type == "cuda":
                    record["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 1024**3, 3)
                self.state["history"].append(record)
                self.state["epoch"] = epoch + 1
                where = f"after epoch {epoch + 1}, saving its checkpoint"
                improved = self._improved(value)
                if improved:
                    self.state["best_metric"] = value
                    self.state["best_epoch"] = epoch + 1
                    self.state["epochs_without_improvement"] = 0
                else:
                    self.state["epochs_without_improvement"] += 1
                stop = self.state["epochs_without_improvement"] >= cfg.patience
                if self.ctx.is_main:
                    checkpoint = self._checkpoint()
                    if improved:
                        atomic_save(checkpoint, self.output_dir / BEST_CHECKPOINT)
                    atomic_save(checkpoint, self.output_dir / LATEST_CHECKPOINT)
                    tracker.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=epoch + 1)
                    if cfg.log_images and (epoch + 1) % max(cfg.log_freq, 1) == 0:
                        tracker.log_images(self.task.visualize(self.model, val_loader, self.device), step=epoch + 1)
                    self._print_epoch(record, improved)
                    self._write_summary(summary_path, "running", summary_extra)
                barrier(self.ctx)
                if stop:
                    stop_reason = (
                        f"early stopping: {self.task.monitor} did not improve for {cfg.patience} epochs "
                        f"(best {self.state['best_metric']:.4f} at epoch {self.state['best_epoch']})"
                    )
                    break
        except KeyboardInterrupt:
            stop_reason = f"interrupted {where}; resume with --resume"
            raise
        except BaseException as err:  # the summary must not say "completed" for a run that crashed
            stop_reason = (
                f"failed {where} ({type(err).__name__}: {err}); the last "
                f"finished epoch is {self.state['epoch']}, resume with --resume"
            )
            raise
        finally:
            if self.ctx.is_main:
                self._write_summary(summary_path, stop_reason, summary_extra)
                if self.state["history"]:
                    plot_training_curves(summary_path, self.output_dir / "training_curves.png")
                tracker.summary(
                    {"best_" + self.task.monitor: self.state["best_metric"], "best_epoch": self.state["best_epoch"]}
                )
                tracker.finish()
        return {
            "summary_path": str(summary_path),
            "curves_path": str(self.output_dir / "training_curves.png"),
            "best_metric": self.state["best_metric"],
            "best_epoch": self.state["best_epoch"],
            "stop_reason": stop_reason,
            "history": self.state["history"],
        }

    def _print_epoch(self, record: Mapping[str, Any], improved: bool) -> None:
        shown = ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in record.items()
            if k != "epoch" and isinstance(v, (int, float))
        )
        print(f"epoch {record['epoch']}/{self.cfg.epochs}: {shown}{'  *best*' if improved else ''}", flush=True)

    def _write_summary(self, path: Path, stop_reason: str, extra: Mapping[str, Any] | None) -> None:
        payload = {
            "started": self.state["started"],
            "updated": datetime.now().isoformat(timespec="seconds"),
            "monitor": self.task.monitor,
            "best_epoch": self.state["best_epoch"],
            "best_metric": self.state["best_metric"],
            "epochs_trained": self.state["epoch"],
            "stop_reason": stop_reason,
            "config": asdict(self.cfg),
            "epochs": self.state["history"],
            **dict(extra or {}),
        }
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, default=str)))


def print_outcome(result: Mapping[str, Any], metric: str) -> None:
    """The end of a run on the console: why it stopped, the best epoch and where the outputs are."""
    print(f"stopped: {result['stop_reason']}")
    if result.get("best_metric") is not None:
        print(f"best {metric} {result['best_metric']:.4f} at epoch {result['best_epoch']}")
    for name, path in result.get("outputs", {}).items():
        print(f"{name}: {path}")
    print(f"summary: {result['summary_path']}")
