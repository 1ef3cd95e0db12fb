"""Typed training settings: one frozen dataclass per workflow, its flags and YAML keys generated from it.

A workflow's config (``sam3d.training.SegmentationTrainingConfig``, ``blip.training.train.ReportTrainingConfig``)
subclasses :class:`TrainingConfig`, the settings the engine itself reads (run, optimisation, tracking).
Every field made with :func:`setting` is also a command-line flag and a YAML key of the same name, like
``sam3d.data.preprocessing.Preprocessing``; the class is validated on construction (a ``ConfigError``
naming the setting), and ``to_dict`` is what the run's ``config.json`` holds, so a resumed run compares
like with like. Each workflow declares which of its settings a resume may change and which the
checkpoint restores (``RESUME_MAY_CHANGE``, ``RESUME_RESTORED``): the engine knows no workflow's names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

from .config import CommandLineParser, ConfigError, absolute_input_paths, check_training_config, parse_with_config

__all__ = ["TrainingConfig", "add_flag_group", "add_flags", "check_resume", "setting"]


def setting(default: Any = dataclasses.MISSING, help: str | None = None, **flag: Any) -> Any:
    """A config field that is also the flag ``--<field name>`` (``flag``: argparse's keywords for it:
    ``type``, ``choices``, ``action``, ``nargs``, ``metavar``). A mutable default (a dict) is copied per
    instance. ``help`` may name ``{monitor}`` and ``{logged_images}``, which the workflow class fills in."""
    metadata = {"help": help, "flag": flag}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def add_flag_group(
    parser: argparse.ArgumentParser, config_class: type[TrainingConfig], title: str, names: Sequence[str]
) -> argparse._ArgumentGroup:
    """The argument group ``title`` with one flag per named setting of ``config_class``, in that order."""
    group = parser.add_argument_group(title)
    add_flags(group, config_class, names)
    return group


def add_flags(group: argparse._ArgumentGroup, config_class: type[TrainingConfig], names: Sequence[str]) -> None:
    """One flag per named setting of ``config_class``, added to ``group`` in that order."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for name in names:
        meta = fields[name].metadata
        factory = fields[name].default_factory
        default = fields[name].default if factory is dataclasses.MISSING else factory()
        # argparse shows and returns lists; an empty tuple would read as a given empty value.
        default = list(default) if isinstance(default, tuple) else default
        help_text = meta["help"]
        if help_text:  # not str.format: help texts show JSON examples with braces
            help_text = help_text.replace("{monitor}", config_class.MONITOR)
            help_text = help_text.replace("{logged_images}", config_class.LOGGED_IMAGES)
        group.add_argument(f"--{name}", default=default, help=help_text, **meta["flag"])


@dataclass(frozen=True)
class TrainingConfig:
    """The engine's settings, shared by every workflow (each gives its own defaults with :meth:`redefault`)."""

    output_dir: str = setting("outputs")
    seed: int = setting(42, type=int)
    device: str = setting("auto", "auto, cpu, cuda, cuda:1 ...")
    resume: bool = setting(False, "continue from output_dir/latest_model.pth", action=argparse.BooleanOptionalAction)
    allow_changed: tuple[str, ...] = setting(
        (), "with --resume: flags whose value may differ from the run being resumed", nargs="+", metavar="FLAG"
    )
    epochs: int = setting(200, type=int)
    batch_size: int = setting(2, type=int)
    lr: float = setting(1e-4, type=float)
    weight_decay: float = setting(1e-4, type=float)
    patience: int = setting(15, "early stopping on {monitor}", type=int)
    use_mixed_precision: bool = setting(
        False, "bf16 autocast where supported, fp16 + grad scaler otherwise", action=argparse.BooleanOptionalAction
    )
    gradient_accumulation_steps: int = setting(1, type=int)
    max_grad_norm: float = setting(1.0, type=float)
    scheduler_type: str = setting("reduce_on_plateau", choices=["reduce_on_plateau", "cosine", "step"])
    max_steps_per_epoch: int | None = setting(None, "cap batches per epoch (smoke runs)", type=int)
    num_workers: int = setting(0, type=int)
    use_wandb: bool = setting(False, action=argparse.BooleanOptionalAction)
    wandb_project: str = setting("runs")
    wandb_entity: str | None = setting(None)
    log_images: bool = setting(
        False, "{logged_images} to W&B every --log_freq epochs", action=argparse.BooleanOptionalAction
    )
    log_freq: int = setting(5, type=int)

    # The engine's settings in each group of a command line, in their order there.
    RUN_FLAGS: ClassVar[tuple[str, ...]] = ("output_dir", "seed", "device", "resume", "allow_changed")
    OPTIMISATION_FLAGS: ClassVar[tuple[str, ...]] = (
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "patience",
        "use_mixed_precision",
        "gradient_accumulation_steps",
        "max_grad_norm",
        "scheduler_type",
        "max_steps_per_epoch",
    )
    TRACKING_FLAGS: ClassVar[tuple[str, ...]] = ("use_wandb", "wandb_project", "wandb_entity", "log_images", "log_freq")
    MONITOR: ClassVar[str] = "the validation metric"  # what early stopping watches, for --patience's help
    LOGGED_IMAGES: ClassVar[str] = "validation images"  # what --log_images sends
    # A resume may always change these: they say how long, where and how the run is watched, not what it learns.
    RESUME_MAY_CHANGE: ClassVar[frozenset[str]] = frozenset(
        {
            "resume",
            "allow_changed",
            "epochs",
            "patience",
            "output_dir",
            "device",
            "num_workers",
            "use_wandb",
            "wandb_project",
            "wandb_entity",
            "log_images",
            "log_freq",
            "max_steps_per_epoch",
        }
    )
    # The checkpoint restores these on resume (optimiser, scheduler, RNG): a new value would be recorded, not used.
    RESUME_RESTORED: ClassVar[frozenset[str]] = frozenset({"lr", "weight_decay", "scheduler_type", "seed"})

    @classmethod
    def redefault(cls, name: str, default: Any, help: str | None = None) -> Any:
        """The engine setting ``name`` with a workflow's default (and help text, where given)."""
        base = {f.name: f for f in dataclasses.fields(cls)}[name]
        return setting(default, base.metadata["help"] if help is None else help, **base.metadata["flag"])

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow_changed", tuple(self.allow_changed))
        check_training_config(self._values())

    def _values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated again (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def warnings(self) -> list[str]:
        """Settings that run but probably are not meant (errors were raised on construction)."""
        return check_training_config(self._values())

    # ---------------------------------------------------------------- flags and YAML
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Every setting as a flag, grouped as the workflow's ``--help`` shows them."""
        raise NotImplementedError(f"{cls.__name__} lays out its flags")

    @classmethod
    def add_run_group(cls, parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
        """The "run" group: ``--config`` (a YAML file of these settings) first, then the engine's run settings."""
        group = parser.add_argument_group("run")
        group.add_argument(
            "--config",
            help="YAML file of flag values; explicit flags override it. Relative input paths in it are found "
            "beside it first, then in the working directory",
        )
        add_flags(group, cls, cls.RUN_FLAGS)
        return group

    @classmethod
    def parser(cls, description: str | None = None) -> CommandLineParser:
        parser = CommandLineParser(description=description)
        cls.add_arguments(parser)
        return parser

    @classmethod
    def from_flags(cls, flags: argparse.Namespace) -> Self:
        """From a parsed command line (flags that are not settings, e.g. ``--config``, are left out)."""
        return cls(
            **{f.name: getattr(flags, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(flags, f.name)}
        )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> Self:
        """A YAML config (keys are the flag names, checked as flags are; relative input paths are found
        beside the file) with ``overrides`` on top: the Python equivalent of ``--config path --key value``."""
        parser = cls.parser()
        flags = vars(parse_with_config(parser, ["--config", str(path)]))
        unknown = sorted(set(overrides) - set(flags))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown settings {unknown}")
        return cls.from_flags(absolute_input_paths(parser, argparse.Namespace(**{**flags, **overrides})))

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values, keyed by flag name: what ``config.json`` records."""
        return json.loads(json.dumps(self._values(), default=str))


def _same_value(old: Any, new: Any) -> bool:
    """Equal, or two spellings of one existing file (``../data/train.csv`` and its absolute path)."""
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str) and old and new and os.path.exists(old) and os.path.exists(new):
        return os.path.samefile(old, new)
    return False


def check_resume(config: TrainingConfig) -> list[str]:
    """On ``resume``, the settings that differ from ``output_dir/config.json`` (the run being resumed).

    A difference is refused unless ``allow_changed`` names it, and refused always for what the
    checkpoint restores (the workflow's ``RESUME_RESTORED``). Returns "setting: old -> new" lines,
    which the new config.json records as ``resume_changes``.
    """
    saved_path = Path(config.output_dir) / "config.json"
    if not config.resume or not saved_path.is_file():
        return []
    saved = json.loads(saved_path.read_text())
    changed = {
        k: (saved[k], v)
        for k, v in config.to_dict().items()
        if k in saved and not _same_value(saved[k], v) and k not in config.RESUME_MAY_CHANGE
    }
    restored = sorted(k for k in changed if k in config.RESUME_RESTORED)
    if restored:
        raise ConfigError(
            f"--resume: {', '.join(f'--{k} {changed[k][0]!r} -> {changed[k][1]!r}' for k in restored)} "
            f"cannot change on resume (the checkpoint restores them); start a new --output_dir instead"
        )
    refused = sorted(k for k in changed if k not in set(config.allow_changed))
    if refused:
        raise ConfigError(
            f"--resume: {', '.join(f'--{k} {changed[k][0]!r} -> {changed[k][1]!r}' for k in refused)} "
            f"differ from the run being resumed ({saved_path}); pass --allow_changed "
            f"{' '.join(refused)} to resume with them, or start a new --output_dir"
        )
    return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items())]
