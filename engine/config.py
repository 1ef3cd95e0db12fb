"""Configuration: YAML files give defaults, command-line flags override them, checks run up front.

A YAML config is a flat mapping whose keys are the command-line flag names (``lr: 1.0e-4``), so a
config file and a command line say the same thing the same way.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key (and file) at fault."""


# The flags every workflow on the engine shares (segmentation: train.py; reports: blip/train.py), so
# both commands spell run, optimisation and tracking settings alike; each passes its own defaults.


def add_run_arguments(parser: argparse.ArgumentParser, output_dir: str) -> argparse._ArgumentGroup:
    """The "run" group (--config, --output_dir, --seed, --device, --resume); returned for additions."""
    g = parser.add_argument_group("run")
    g.add_argument("--config", help="YAML file of flag values; explicit flags override it")
    g.add_argument("--output_dir", default=output_dir)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue from output_dir/latest_model.pth")
    return g


def add_optimisation_arguments(
    parser: argparse.ArgumentParser, title: str, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
    patience: int, gradient_accumulation_steps: int, scheduler_type: str, monitor: str, lr_help: str | None = None,
) -> argparse._ArgumentGroup:
    """The engine's optimisation flags with a workflow's defaults; ``monitor`` names what early
    stopping watches. Returned for additions."""
    g = parser.add_argument_group(title)
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch_size", type=int, default=batch_size)
    g.add_argument("--lr", type=float, default=lr, help=lr_help)
    g.add_argument("--weight_decay", type=float, default=weight_decay)
    g.add_argument("--patience", type=int, default=patience, help=f"early stopping on {monitor}")
    g.add_argument("--use_mixed_precision", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast where supported, fp16 + grad scaler otherwise")
    g.add_argument("--gradient_accumulation_steps", type=int, default=gradient_accumulation_steps)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--scheduler_type", choices=["reduce_on_plateau", "cosine", "step"], default=scheduler_type)
    g.add_argument("--max_steps_per_epoch", type=int, default=None, help="cap batches per epoch (smoke runs)")
    return g


def add_tracking_arguments(parser: argparse.ArgumentParser, project: str, images: str) -> argparse._ArgumentGroup:
    """The W&B flags; ``images`` says what --log_images sends."""
    g = parser.add_argument_group("tracking")
    g.add_argument("--use_wandb", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--wandb_project", default=project)
    g.add_argument("--wandb_entity", default=None)
    g.add_argument("--log_images", action=argparse.BooleanOptionalAction, default=False,
                   help=f"{images} to W&B every --log_freq epochs")
    g.add_argument("--log_freq", type=int, default=5)
    return g


def load_yaml_config(path: str | os.PathLike, parser: argparse.ArgumentParser) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values, found {type(values).__name__}")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {unknown}; every key must be a flag name of this command")
    return values


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; when ``--config`` is given its values become defaults that explicit flags override."""
    first, _ = parser.parse_known_args(argv)
    if getattr(first, "config", None):
        parser.set_defaults(**load_yaml_config(first.config, parser))
    return parser.parse_args(argv)


def check_training_config(cfg: Mapping[str, Any]) -> list[str]:
    """Errors raise ConfigError; returns warnings for settings that run but probably are not meant."""
    positive = ("epochs", "batch_size", "gradient_accumulation_steps", "patience", "log_freq")
    for key in positive:
        if key in cfg and (not isinstance(cfg[key], int) or cfg[key] < 1):
            raise ConfigError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if cfg.get("lr", 1.0) <= 0:
        raise ConfigError(f"lr must be > 0, got {cfg['lr']}")
    for key in ("weight_decay", "max_grad_norm", "num_workers"):
        if key in cfg and cfg[key] is not None and cfg[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {cfg[key]}")
    warnings = []
    if cfg.get("patience", 0) >= cfg.get("epochs", 1):
        warnings.append(
            f"patience ({cfg['patience']}) >= epochs ({cfg['epochs']}): early stopping can never trigger"
        )
    if cfg.get("lr", 0) > 1e-2:
        warnings.append(f"lr {cfg['lr']} is unusually high for fine-tuning a ViT (typical: 1e-5 .. 1e-4)")
    workers = cfg.get("num_workers", 0)
    cpus = os.cpu_count() or 1
    if workers > cpus:
        warnings.append(f"num_workers ({workers}) exceeds the {cpus} CPU cores of this machine")
    if cfg.get("max_grad_norm") == 0:
        warnings.append("max_grad_norm 0 disables gradient clipping")
    return warnings
