"""Configuration: YAML files give defaults, command-line flags override them, checks run up front.

A YAML config is a flat mapping whose keys are the command-line flag names (``lr: 1.0e-4``), so a
config file and a command line say the same thing the same way.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key (and file) at fault."""

    exit_code = 2


class CommandLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are a :class:`ConfigError` (one line through ``sam3d.engine.cli.run_main``,
    exit 2) instead of the usage block, and whose help uses the module docstring as written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


# The flags every workflow on the engine shares (segmentation: train.py; reports: blip/train.py), so
# both commands spell run, optimisation and tracking settings alike; each passes its own defaults.


def add_run_arguments(parser: argparse.ArgumentParser, output_dir: str) -> argparse._ArgumentGroup:
    """The "run" group (--config, --output_dir, --seed, --device, --resume); returned for additions."""
    g = parser.add_argument_group("run")
    g.add_argument(
        "--config",
        help="YAML file of flag values; explicit flags override it. Relative input paths in it are found "
        "beside it first, then in the working directory",
    )
    g.add_argument("--output_dir", default=output_dir)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="continue from output_dir/latest_model.pth",
    )
    g.add_argument(
        "--allow_changed",
        nargs="+",
        default=[],
        metavar="FLAG",
        help="with --resume: flags whose value may differ from the run being resumed",
    )
    return g


def add_optimisation_arguments(
    parser: argparse.ArgumentParser,
    title: str,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    patience: int,
    gradient_accumulation_steps: int,
    scheduler_type: str,
    monitor: str,
    lr_help: str | None = None,
) -> argparse._ArgumentGroup:
    """The engine's optimisation flags with a workflow's defaults; ``monitor`` names what early
    stopping watches. Returned for additions."""
    g = parser.add_argument_group(title)
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch_size", type=int, default=batch_size)
    g.add_argument("--lr", type=float, default=lr, help=lr_help)
    g.add_argument("--weight_decay", type=float, default=weight_decay)
    g.add_argument("--patience", type=int, default=patience, help=f"early stopping on {monitor}")
    g.add_argument(
        "--use_mixed_precision",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="bf16 autocast where supported, fp16 + grad scaler otherwise",
    )
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
    g.add_argument(
        "--log_images",
        action=argparse.BooleanOptionalAction,
        default=False,
        help=f"{images} to W&B every --log_freq epochs",
    )
    g.add_argument("--log_freq", type=int, default=5)
    return g


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
    args = parser.parse_args(argv)
    # Input paths are recorded absolute, so config.json says which files ran and a resume from
    # another folder compares the same files.
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.type is input_path and isinstance(value, str) and value:
            setattr(args, action.dest, os.path.abspath(os.path.expanduser(value)))
    return args


# Resuming may always change these: they say how long, where and how the run is watched, not what it learns.
RESUME_MAY_CHANGE = frozenset(
    {
        "resume",
        "allow_changed",
        "resume_changes",
        "config",
        "test",
        "epochs",
        "patience",
        "output_dir",
        "device",
        "num_workers",
        "cache_dir",
        "validate_data",
        "skip_invalid",
        "use_wandb",
        "wandb_project",
        "wandb_entity",
        "log_images",
        "log_freq",
        "max_steps_per_epoch",
        "cache_images",
        "cache_tokens",
    }
)
# Restored from the checkpoint on resume, so a new value would be recorded but not used.
RESUME_RESTORED = frozenset(
    {
        "lr",
        "weight_decay",
        "decoder_lr_ratio",
        "diagnosis_lr_ratio",
        "scheduler_type",
        "scheduler_gamma",
        "scheduler_patience",
        "min_lr",
        "seed",
        "model_type",
        "img_size",
    }
)


def _same_value(old: Any, new: Any) -> bool:
    """Equal, or two spellings of one existing file (``../data/train.csv`` and its absolute path)."""
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str) and old and new and os.path.exists(old) and os.path.exists(new):
        return os.path.samefile(old, new)
    return False


def check_resume(args: argparse.Namespace) -> list[str]:
    """On --resume, the flags that differ from ``output_dir/config.json`` (the run being resumed).

    A difference is refused unless --allow_changed names it, and refused always for what the
    checkpoint restores (optimiser, scheduler, seed, architecture). Returns "flag: old -> new" lines,
    which the new config.json records as ``resume_changes``.
    """
    saved_path = Path(args.output_dir) / "config.json"
    if not args.resume or not saved_path.is_file():
        return []
    saved = json.loads(saved_path.read_text())
    current = json.loads(json.dumps(vars(args), default=str))
    changed = {
        k: (saved[k], v)
        for k, v in current.items()
        if k in saved and not _same_value(saved[k], v) and k not in RESUME_MAY_CHANGE
    }
    restored = sorted(k for k in changed if k in RESUME_RESTORED)
    if restored:
        raise ConfigError(
            f"--resume: {', '.join(f'--{k} {changed[k][0]!r} -> {changed[k][1]!r}' for k in restored)} "
            f"cannot change on resume (the checkpoint restores them); start a new --output_dir instead"
        )
    refused = sorted(k for k in changed if k not in set(args.allow_changed))
    if refused:
        raise ConfigError(
            f"--resume: {', '.join(f'--{k} {changed[k][0]!r} -> {changed[k][1]!r}' for k in refused)} "
            f"differ from the run being resumed ({saved_path}); pass --allow_changed "
            f"{' '.join(refused)} to resume with them, or start a new --output_dir"
        )
    return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items())]


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
        from .distributed import resolve_device

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
