"""Fine-tuning SAM-Med3D from Python: :class:`SegmentationTrainingConfig` and :func:`run_training`.

    from sam3d.training import SegmentationTrainingConfig, run_training
    config = SegmentationTrainingConfig.from_yaml("sam3d/configs/sam3d_demo.yaml", train_csv=..., val_csv=...,
                                                  mask_dir=..., output_dir="outputs/run")
    result = run_training(config)        # result["outputs"]["sam_encoder"], result["best_metric"], ...

``train.py`` (``sam3d.cli.train``) is the same with flags: each setting is the flag of its name.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from monai.data import DataLoader
from PIL import Image

from ich_engine.checkpoint import load_checkpoint
from ich_engine.config import ConfigError, input_path, require_file
from ich_engine.distributed import DistributedContext
from ich_engine.run import TrainingRun
from ich_engine.run import run_training as run_engine
from ich_engine.settings import TrainingConfig, add_flag_group, setting
from ich_engine.trainer import BEST_CHECKPOINT, LATEST_CHECKPOINT

from .data.dataset import build_segmentation_dataset, check_no_scan_in_both, read_manifest
from .data.preprocessing import Preprocessing, add_preprocessing_arguments, preprocessing_from_args
from .data.transforms import build_transforms
from .export import ENCODER_FILE, export_encoder
from .modeling import MODEL_CONFIGS, Sam3DConfig, build_sam3d, load_sam3d_weights, model_config
from .task import SegmentationTask

__all__ = ["SegmentationTrainingConfig", "run_training", "training_preprocessing"]

_BOOL = argparse.BooleanOptionalAction
# The preprocessing contract's settings that are flags (roi_size follows the model's img_size).
_CONTRACT_FLAGS = tuple(f.name for f in dataclasses.fields(Preprocessing) if f.name != "roi_size")


@dataclass(frozen=True)
class SegmentationTrainingConfig(TrainingConfig):
    """Every setting of a fine-tuning run (docs/cli.md, ``sam3d-train``); validated on construction."""

    output_dir: str = TrainingConfig.redefault("output_dir", "outputs/sam3d")
    train_csv: str | None = setting(None, "CSV with columns path,ich,patient_id (extra columns kept)", type=input_path)
    val_csv: str | None = setting(None, type=input_path)
    mask_dir: str | None = setting(
        None, "masks named after each volume's stem (049.pkl -> 049.nii.gz)", type=input_path
    )
    cache_dir: str | None = setting(None, "cache preprocessed volumes on disk here (MONAI PersistentDataset)")
    validate_data: str = setting(
        "full", "full: read every volume/mask once before training; paths: existence only", choices=["full", "paths"]
    )
    allow_patient_overlap: bool = setting(
        False,
        "let --train_csv and --val_csv share patients, or scans (found by content; leakage: validation "
        "then overstates)",
        action="store_true",
    )
    skip_invalid: bool = setting(False, "skip bad rows (listed in the run summary) instead of stopping", action=_BOOL)
    num_workers: int = TrainingConfig.redefault("num_workers", 2)
    # The contract settings given explicitly (flag, YAML or here); the others come from the model being
    # fine-tuned (--checkpoint, or the run being resumed), else Preprocessing's defaults.
    preprocessing: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model_type: str = setting("vit_b_ori", "registry name: vit_b_ori, tiny, small")
    img_size: int | None = setting(
        None, "input cube edge in voxels (default: the registry model's; SAM-Med3D's --img_size)", type=int
    )
    checkpoint: str | None = setting(None, "initial weights, e.g. the official sam_med3d_turbo.pth", type=input_path)
    freeze_encoder: bool = setting(False, action=_BOOL)
    use_gradient_checkpointing: bool = setting(False, action=_BOOL)
    visual_tokens: int = setting(256, "width of the exported visual-token projection", type=int)
    num_clicks: int = setting(11, "simulated click rounds per training batch", type=int)
    val_num_clicks: int = setting(5, type=int)
    automatic_round: bool = setting(
        True, "also train the prompt-free prediction of hemorrhage scans (automatic mode, no clicks)", action=_BOOL
    )
    epochs: int = TrainingConfig.redefault("epochs", 200)
    batch_size: int = TrainingConfig.redefault("batch_size", 2)
    lr: float = TrainingConfig.redefault("lr", 1e-4, help="encoder learning rate")
    weight_decay: float = TrainingConfig.redefault("weight_decay", 1e-4)
    patience: int = TrainingConfig.redefault("patience", 15)
    gradient_accumulation_steps: int = TrainingConfig.redefault("gradient_accumulation_steps", 4)
    scheduler_type: str = TrainingConfig.redefault("scheduler_type", "reduce_on_plateau")
    decoder_lr_ratio: float = setting(
        0.1, "prompt encoder and mask decoder learn at this x lr (SAM-Med3D: 0.1)", type=float
    )
    wandb_project: str = TrainingConfig.redefault("wandb_project", "sam3d-ich")
    # The resolved contract (explicit settings over the model's over the defaults): what the run uses.
    contract: Preprocessing = dataclasses.field(init=False, repr=False, compare=False)

    MONITOR: ClassVar[str] = "validation Dice"
    LOGGED_IMAGES: ClassVar[str] = "slice overlays"
    RESUME_MAY_CHANGE: ClassVar[frozenset[str]] = TrainingConfig.RESUME_MAY_CHANGE | {
        "cache_dir",
        "validate_data",
        "skip_invalid",
    }
    RESUME_RESTORED: ClassVar[frozenset[str]] = TrainingConfig.RESUME_RESTORED | {
        "decoder_lr_ratio",
        "model_type",
        "img_size",
    }

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        run = cls.add_run_group(parser)
        # The command's machine check, not a setting: from_flags leaves it out.
        run.add_argument("--test", action="store_true", help="system check with a tiny end-to-end run, then exit")
        add_flag_group(
            parser,
            cls,
            "data",
            (
                "train_csv",
                "val_csv",
                "mask_dir",
                "cache_dir",
                "validate_data",
                "allow_patient_overlap",
                "skip_invalid",
                "num_workers",
            ),
        )
        add_preprocessing_arguments(parser)
        add_flag_group(
            parser,
            cls,
            "model",
            (
                "model_type",
                "img_size",
                "checkpoint",
                "freeze_encoder",
                "use_gradient_checkpointing",
                "visual_tokens",
                "num_clicks",
                "val_num_clicks",
                "automatic_round",
            ),
        )
        add_flag_group(
            parser,
            cls,
            "optimisation (defaults are those of the original training script)",
            (*cls.OPTIMISATION_FLAGS, "decoder_lr_ratio"),
        )
        add_flag_group(parser, cls, "tracking", cls.TRACKING_FLAGS)

    @classmethod
    def from_flags(cls, flags: argparse.Namespace) -> Self:
        explicit = {name: getattr(flags, name) for name in _CONTRACT_FLAGS if getattr(flags, name, None) is not None}
        settings = {
            f.name: getattr(flags, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(flags, f.name)
        }
        return cls(**{**settings, "preprocessing": explicit})

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("train_csv", "val_csv", "mask_dir"):
            if not getattr(self, key):
                raise ConfigError(f"--{key} is required (or run `python train.py --test` to check the machine)")
        for key in ("train_csv", "val_csv"):
            require_file(key, getattr(self, key))
        if not Path(str(self.mask_dir)).is_dir():
            raise ConfigError(f"--mask_dir {self.mask_dir}: folder not found")
        if self.checkpoint:
            require_file("checkpoint", self.checkpoint)
        if self.num_clicks < 1 or self.val_num_clicks < 1:
            raise ConfigError("num_clicks and val_num_clicks must be >= 1")
        if self.model_type not in MODEL_CONFIGS:
            raise ConfigError(f"--model_type {self.model_type!r}: unknown; choose one of {sorted(MODEL_CONFIGS)}")
        unknown = sorted(set(self.preprocessing) - set(_CONTRACT_FLAGS))
        if unknown:
            raise ConfigError(f"preprocessing: unknown keys {unknown}; known: {list(_CONTRACT_FLAGS)}")
        try:
            contract = training_preprocessing(self._contract_sources(), self._architecture().img_size)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"preprocessing: {err}") from None
        object.__setattr__(self, "contract", contract)
        if self.img_size is not None:
            patch = model_config(self.model_type).patch_size
            if self.img_size < patch or self.img_size % patch:
                raise ConfigError(
                    f"--img_size {self.img_size} must be a positive multiple of {self.model_type}'s patch size {patch}"
                )
        if self.visual_tokens < 1:
            raise ConfigError(f"visual_tokens must be >= 1, got {self.visual_tokens}")

    def _contract_sources(self) -> argparse.Namespace:
        """What :func:`training_preprocessing` reads: the explicit settings and where the model comes from."""
        return argparse.Namespace(
            output_dir=self.output_dir, resume=self.resume, checkpoint=self.checkpoint, **self.preprocessing
        )

    def _architecture(self) -> Sam3DConfig:
        return model_config(self.model_type, **({"img_size": self.img_size} if self.img_size else {}))

    def model_config(self) -> Sam3DConfig:
        """The registry architecture, at ``img_size`` where given, with the contract's input channels."""
        config = self._architecture()
        config.in_chans = self.contract.num_input_channels
        return config

    def warnings(self) -> list[str]:
        warns = super().warnings()
        if self.resume and self.checkpoint:
            warns.append(f"--checkpoint is ignored with --resume ({LATEST_CHECKPOINT} holds the weights)")
        if self.freeze_encoder and self.use_gradient_checkpointing:
            warns.append("--use_gradient_checkpointing has no effect with --freeze_encoder")
        if self.log_images and not self.use_wandb:
            warns.append("--log_images needs --use_wandb; no images will be logged")
        return warns

    def to_dict(self) -> dict[str, Any]:
        """The settings by flag name, the contract's as resolved (a resume compares the values used,
        not which flags were left out)."""
        values = super().to_dict()
        del values["preprocessing"]
        contract = self.contract.to_dict()
        return {**values, **{name: contract[name] for name in _CONTRACT_FLAGS}}


def training_preprocessing(args: argparse.Namespace, roi_size: int) -> Preprocessing:
    """The run's contract: flags, else what the model being fine-tuned (``--checkpoint``, or the run
    being resumed) was trained with, else the defaults. Official checkpoints carry none."""
    source = Path(args.output_dir) / LATEST_CHECKPOINT if args.resume else args.checkpoint
    contract = None
    if source and Path(source).is_file():
        payload = load_checkpoint(source, mmap=True)  # only its preprocessing entry is read
        contract = payload.get("preprocessing") if isinstance(payload, dict) else None
    return preprocessing_from_args(args, roi_size, contract, str(source))


def run_training(config: SegmentationTrainingConfig) -> dict[str, Any]:
    """Fine-tune, then export the best encoder (``sam_encoder.pth``) and validation overlays. Returns
    the engine's result with ``outputs`` (file paths by name) and ``skipped_rows``."""
    return run_engine(config, _prepare)


def _prepare(config: SegmentationTrainingConfig, device: torch.device, ctx: DistributedContext) -> TrainingRun:
    architecture = config.model_config()
    preprocessing = config.contract
    output_dir = Path(config.output_dir)
    model = build_sam3d(architecture)
    if config.checkpoint and not config.resume:
        load_sam3d_weights(model, config.checkpoint)
    model.image_encoder.gradient_checkpointing = config.use_gradient_checkpointing
    if config.freeze_encoder:
        model.image_encoder.requires_grad_(False)

    train_csv, val_csv, mask_dir = str(config.train_csv), str(config.val_csv), str(config.mask_dir)
    train_rows, train_skipped = read_manifest(
        train_csv, mask_dir, validate=config.validate_data, skip_invalid=config.skip_invalid
    )
    val_rows, val_skipped = read_manifest(
        val_csv, mask_dir, validate=config.validate_data, skip_invalid=config.skip_invalid
    )
    shared = sorted({r.patient_id for r in train_rows} & {r.patient_id for r in val_rows})
    if shared and not config.allow_patient_overlap:
        raise ConfigError(
            f"--train_csv {train_csv} and --val_csv {val_csv} share {len(shared)} patient_id(s) "
            f"({', '.join(shared[:5])}{' ...' if len(shared) > 5 else ''}): validation would score scans of "
            "patients it trained on; split by patient, or pass --allow_patient_overlap"
        )
    check_no_scan_in_both(train_rows, val_rows, config.allow_patient_overlap)
    cache = lambda split: None if not config.cache_dir else str(Path(config.cache_dir) / split)
    train_ds = build_segmentation_dataset(train_rows, build_transforms(preprocessing, train=True), cache("train"))
    val_ds = build_segmentation_dataset(val_rows, build_transforms(preprocessing, train=False), cache("val"))

    task = SegmentationTask(
        config.num_clicks,
        config.val_num_clicks,
        preprocessing.target_spacing_mm,
        config.seed,
        config.use_mixed_precision,
        config.automatic_round,
    )
    encoder_params = [p for p in model.image_encoder.parameters() if p.requires_grad]
    decoder_params = list(model.prompt_encoder.parameters()) + list(model.mask_decoder.parameters())
    param_groups = [
        {
            "params": decoder_params,
            "lr": config.decoder_lr_ratio * config.lr,
            "weight_decay": config.weight_decay,
            "name": "decoder",
        }
    ]
    if encoder_params:
        param_groups.insert(
            0, {"params": encoder_params, "lr": config.lr, "weight_decay": config.weight_decay, "name": "encoder"}
        )
    skipped = [{"csv": train_csv, **s} for s in train_skipped] + [{"csv": val_csv, **s} for s in val_skipped]

    def export_best(result: dict[str, Any]) -> dict[str, str]:
        best = build_sam3d(architecture)
        load_sam3d_weights(best, output_dir / BEST_CHECKPOINT)
        export_encoder(
            best,
            output_dir / ENCODER_FILE,
            architecture,
            config.visual_tokens,
            preprocessing,
            source=str(output_dir / BEST_CHECKPOINT),
            seed=config.seed,
        )
        overlays = write_validation_overlays(task, best.to(device), val_ds, output_dir / "val_overlays", device)
        return {"sam_encoder": str(output_dir / ENCODER_FILE), "val_overlays": overlays}

    return TrainingRun(
        task,
        model,
        param_groups,
        train_ds,
        val_ds,
        record={"model_config": architecture.to_dict(), "preprocessing": preprocessing.to_dict()},
        checkpoint_extras={
            "model_type": config.model_type,
            "model_config": architecture.to_dict(),
            "preprocessing": preprocessing.to_dict(),
        },
        summary_extra={"data": {"train_cases": len(train_rows), "val_cases": len(val_rows)}, "skipped_rows": skipped},
        result_extra={"skipped_rows": skipped},
        export_best=export_best,
    )


def write_validation_overlays(task, model, val_ds, folder: Path, device, max_cases: int = 4) -> str:
    """PNG overlays (prediction red, truth green) of the best model on the first validation scans."""
    folder.mkdir(parents=True, exist_ok=True)
    images = task.visualize(model, DataLoader(val_ds, batch_size=1), device, max_cases=max_cases)
    for name, picture in images.items():
        Image.fromarray(picture).save(folder / f"{name.split('/')[-1]}.png")
    return str(folder)
