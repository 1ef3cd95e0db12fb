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
