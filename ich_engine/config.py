"""Configuration: YAML files give defaults, command-line flags override them, checks run up front.

A YAML config is a flat mapping whose keys are the command-line flag names (``lr: 1.0e-4``), so a
config file and a command line say the same thing the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key (and file) at fault."""

    exit_code = 2


class CommandLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are a :class:`ConfigError` (one line through ``ich_engine.cli.run_main``,
    exit 2) instead of the usage block, and whose help uses the module docstring as written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def known_keys(config_class: type) -> list[str]:
    """The field names of a dataclass config, sorted."""
    return sorted(f.name for f in dataclasses.fields(config_class))


def unknown_keys(config_class: type, values: Mapping[str, Any]) -> list[str]:
    """The keys of ``values`` that are no field of the dataclass ``config_class``, sorted."""
    return sorted(set(values) - set(known_keys(config_class)))


def from_known_keys(config_class: type[T], values: Mapping[str, Any], **fields: Any) -> T:
    """``config_class(**values, **fields)``; a key it does not know is a ValueError naming it and the known ones."""
    unknown = unknown_keys(config_class, values)
    if unknown:
        raise ValueError(
            f"unknown {config_class.__name__} keys {unknown}; expected a subset of {known_keys(config_class)}"
        )
    return config_class(**values, **fields)


def input_path(value: str) -> str:
    """``type=`` of a flag naming a file or folder the run reads (a checkpoint, a CSV, a mask folder).

    On the command line it is taken as typed, relative to the working directory. In a ``--config``
    YAML a relative one is resolved against the config file's folder when it exists there (so a
    shipped config names the package's own files, and a user's config travels with its data), else
    against the working directory, as on the command line. Outputs (``--output_dir``) always follow
    the working directory.
    """
    return value


def require_file(flag: str, value: str, hint: str = "") -> None:
    """ConfigError naming ``--flag`` when ``value`` is not an existing file (a folder is named as one)."""
    path = Path(value)
    if path.is_dir():
        raise ConfigError(f"--{flag} {value}: is a folder; a file is expected{hint}")
    if not path.is_file():
        raise ConfigError(f"--{flag} {value}: file not found{hint}")


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
    # A key is a flag's name without the dashes; an older alias (--target_spacing) names its flag too.
    actions = {action.dest: action for action in parser._actions}
    for action in parser._actions:
        for option in action.option_strings:
            actions.setdefault(option.lstrip("-"), action)
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {unknown}; every key must be a flag name of this command")
    dests: dict[str, str] = {}
    for key in values:
        dest = actions[key].dest
        if dest in dests:
            raise ConfigError(f"--config {path}: keys '{dests[dest]}' and '{key}' set the same flag --{dest}")
        dests[dest] = key
    return {actions[key].dest: _yaml_value(path, key, value, actions[key]) for key, value in values.items()}


def _yaml_value(path: Path, key: str, value: Any, action: argparse.Action) -> Any:
    """A YAML value checked as the flag's parser would check it on the command line: list or single
    value (``nargs``), the flag's ``type``, its ``choices``; flags without a type keep YAML's value."""
    where = f"--config {path}: key '{key}'"
    if value is None:
        return value
    if action.type is input_path and isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        beside = path.parent / value
        return str(beside.resolve()) if beside.exists() else value
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} expects true or false, found {value!r}")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if many:
        if not isinstance(value, list):
            raise ConfigError(
                f"{where} expects a list"
                + (f" of {action.nargs} values" if isinstance(action.nargs, int) else "")
                + f", found {value!r}"
            )
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise ConfigError(f"{where} expects {action.nargs} values, found {len(value)}: {value!r}")
        if action.nargs == "+" and not value:
            raise ConfigError(f"{where} expects at least one value, found an empty list")
        items = value
    else:
        if isinstance(value, (list, dict)) and action.type not in (None, json.loads):
            raise ConfigError(f"{where} expects a single value, found {value!r}")
        items = [value]
    converted = []
    for item in items:
        # json.loads flags (e.g. --hu_windows) take YAML's structure as it is.
        if action.type not in (None, json.loads) and not isinstance(item, bool):
            try:
                if not callable(action.type):  # a type registered by name: only argparse's registry resolves it
                    raise TypeError(action.type)
                item = action.type(item)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{where} expects {getattr(action.type, '__name__', 'a value')} values, found {item!r}"
                ) from None
        elif isinstance(item, bool) and action.type in (int, float):
            raise ConfigError(f"{where} expects a number, found {item!r}")
        if action.choices is not None and item not in action.choices:
            raise ConfigError(f"{where} must be one of {list(action.choices)}, found {item!r}")
        converted.append(item)
    return converted if many else converted[0]


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; when ``--config`` is given its values become defaults that explicit flags override."""
    first, _ = parser.parse_known_args(argv)
    if getattr(first, "config", None):
        parser.set_defaults(**load_yaml_config(first.config, parser))
    return absolute_input_paths(parser, parser.parse_args(argv))


def absolute_input_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with every :func:`input_path` flag's value made absolute, so config.json says which
    files ran and a resume from another folder compares the same files."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.type is input_path and isinstance(value, str) and value:
            setattr(args, action.dest, os.path.abspath(os.path.expanduser(value)))
    return args


def check_training_config(cfg: Mapping[str, Any]) -> list[str]:
    """Errors raise ConfigError; returns warnings for settings that run but probably are not meant."""
    positive = ("epochs", "batch_size", "gradient_accumulation_steps", "patience", "log_freq")
    for key in positive:
        if key in cfg and (not isinstance(cfg[key], int) or cfg[key] < 1):
            raise ConfigError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if cfg.get("lr", 1.0) <= 0:
        raise ConfigError(f"lr must be > 0, got {cfg['lr']}")
    if cfg.get("max_steps_per_epoch") is not None and cfg["max_steps_per_epoch"] < 1:
        raise ConfigError(
            f"max_steps_per_epoch must be >= 1 (or left out for whole epochs), got {cfg['max_steps_per_epoch']}"
        )
    if "device" in cfg:
        from .distributed import resolve_device  # distributed imports ConfigError from here

        resolve_device(cfg["device"])  # --device cuda on a machine without CUDA fails here, not after loading data
    for key in ("weight_decay", "max_grad_norm", "num_workers"):
        if key in cfg and cfg[key] is not None and cfg[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {cfg[key]}")
    warnings = []
    if cfg.get("patience", 0) >= cfg.get("epochs", 1):
        warnings.append(f"patience ({cfg['patience']}) >= epochs ({cfg['epochs']}): early stopping can never trigger")
    if cfg.get("lr", 0) > 1e-2:
        warnings.append(f"lr {cfg['lr']} is unusually high for fine-tuning a ViT (typical: 1e-5 .. 1e-4)")
    workers = cfg.get("num_workers", 0)
    cpus = os.cpu_count() or 1
    if workers > cpus:
        warnings.append(f"num_workers ({workers}) exceeds the {cpus} CPU cores of this machine")
    if cfg.get("max_grad_norm") == 0:
        warnings.append("max_grad_norm 0 disables gradient clipping")
    return warnings
