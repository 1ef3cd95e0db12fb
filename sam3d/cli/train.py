#!/usr/bin/env python
"""Fine-tune SAM-Med3D to segment intracranial hemorrhage on brain CT.

    python train.py --test                                   # check this machine (< 3 min on CPU)
    python train.py --train_csv train.csv --val_csv val.csv --mask_dir masks/ --checkpoint sam_med3d_turbo.pth
    python train.py --config sam3d/configs/sam3d_vit_b_ori.yaml --resume
    torchrun --nproc_per_node 2 train.py --config ...        # DDP (NCCL on GPUs, gloo on CPUs)

Outputs in --output_dir: best_model.pth, latest_model.pth, sam_encoder.pth, config.json,
training_summary_<timestamp>.json. The CSV format: docs/training.md; every flag: docs/cli.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sam3d.data.preprocessing import (
    Preprocessing,
    add_preprocessing_arguments,
    preprocessing_from_args,
    set_preprocessing_flags,
)
from sam3d.engine.checkpoint import load_checkpoint
from sam3d.engine.cli import console_main
from sam3d.engine.config import (
    CommandLineParser,
    ConfigError,
    add_optimisation_arguments,
    add_run_arguments,
    add_tracking_arguments,
    check_resume,
    check_training_config,
    input_path,
    parse_with_config,
    require_file,
)
from sam3d.engine.trainer import BEST_CHECKPOINT, LATEST_CHECKPOINT
from sam3d.export import ENCODER_FILE

FULL_DEFAULTS_NOTE = "defaults are those of the original training script"


def build_parser() -> argparse.ArgumentParser:
    p = CommandLineParser(description=__doc__)
    bool_flag = argparse.BooleanOptionalAction
    g = add_run_arguments(p, "outputs/sam3d")
    g.add_argument("--test", action="store_true", help="system check with a tiny end-to-end run, then exit")
    g = p.add_argument_group("data")
    g.add_argument("--train_csv", type=input_path, help="CSV with columns path,ich,patient_id (extra columns kept)")
    g.add_argument("--val_csv", type=input_path)
    g.add_argument("--mask_dir", type=input_path, help="masks named after each volume's stem (049.pkl -> 049.nii.gz)")
    g.add_argument("--cache_dir", help="cache preprocessed volumes on disk here (MONAI PersistentDataset)")
    g.add_argument(
        "--validate_data",
        choices=["full", "paths"],
        default="full",
        help="full: read every volume/mask once before training; paths: existence only",
    )
    g.add_argument(
        "--allow_patient_overlap",
        action="store_true",
        help="let --train_csv and --val_csv share patients, or scans (found by content; leakage: validation "
        "then overstates)",
    )
    g.add_argument(
        "--skip_invalid",
        action=bool_flag,
        default=False,
        help="skip bad rows (listed in the run summary) instead of stopping",
    )
    g.add_argument("--num_workers", type=int, default=2)
    add_preprocessing_arguments(p)
    g = p.add_argument_group("model")
    g.add_argument("--model_type", default="vit_b_ori", help="registry name: vit_b_ori, tiny, small")
    g.add_argument(
        "--img_size", type=int, help="input cube edge in voxels (default: the registry model's; SAM-Med3D's --img_size)"
    )
    g.add_argument("--checkpoint", type=input_path, help="initial weights, e.g. the official sam_med3d_turbo.pth")
    g.add_argument("--freeze_encoder", action=bool_flag, default=False)
    g.add_argument("--use_gradient_checkpointing", action=bool_flag, default=False)
    g.add_argument("--visual_tokens", type=int, default=256, help="width of the exported visual-token projection")
    g.add_argument("--num_clicks", type=int, default=11, help="simulated click rounds per training batch")
    g.add_argument("--val_num_clicks", type=int, default=5)
    g.add_argument(
        "--automatic_round",
        action=bool_flag,
        default=True,
        help="also train the prompt-free prediction of hemorrhage scans (automatic mode, no clicks)",
    )
    g = add_optimisation_arguments(
        p,
        "optimisation (" + FULL_DEFAULTS_NOTE + ")",
        epochs=200,
        batch_size=2,
        lr=1e-4,
        weight_decay=1e-4,
        patience=15,
        gradient_accumulation_steps=4,
        scheduler_type="reduce_on_plateau",
        monitor="validation Dice",
        lr_help="encoder learning rate",
    )
    g.add_argument(
        "--decoder_lr_ratio",
        type=float,
        default=0.1,
        help="prompt encoder and mask decoder learn at this x lr (SAM-Med3D: 0.1)",
    )
    add_tracking_arguments(p, "sam3d-ich", "slice overlays")
    return p


def check_config(args: argparse.Namespace) -> list[str]:
    """All configuration problems before any data is read; returns warnings."""
    cfg = vars(args)
    warns = check_training_config(cfg)
    for key in ("train_csv", "val_csv", "mask_dir"):
        if not cfg.get(key):
            raise ConfigError(f"--{key} is required (or run `python train.py --test` to check the machine)")
    for key in ("train_csv", "val_csv"):
        require_file(key, cfg[key])
    if not Path(cfg["mask_dir"]).is_dir():
        raise ConfigError(f"--mask_dir {cfg['mask_dir']}: folder not found")
    if cfg["checkpoint"]:
        require_file("checkpoint", cfg["checkpoint"])
    if cfg["resume"] and not (Path(cfg["output_dir"]) / LATEST_CHECKPOINT).is_file():
        raise ConfigError(f"--resume: {Path(cfg['output_dir']) / LATEST_CHECKPOINT} does not exist")
    if cfg["num_clicks"] < 1 or cfg["val_num_clicks"] < 1:
        raise ConfigError("num_clicks and val_num_clicks must be >= 1")
    from sam3d.modeling import MODEL_CONFIGS, model_config

    if cfg["model_type"] not in MODEL_CONFIGS:
        raise ConfigError(f"--model_type {cfg['model_type']!r}: unknown; choose one of {sorted(MODEL_CONFIGS)}")
    try:
        contract = training_preprocessing(args, cfg["img_size"] or model_config(cfg["model_type"]).img_size)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"preprocessing: {err}") from None
    set_preprocessing_flags(args, contract)
    if cfg["img_size"] is not None:
        patch = model_config(cfg["model_type"]).patch_size
        if cfg["img_size"] < patch or cfg["img_size"] % patch:
            raise ConfigError(
                f"--img_size {cfg['img_size']} must be a positive multiple of {cfg['model_type']}'s patch size {patch}"
            )
    if cfg["visual_tokens"] < 1:
        raise ConfigError(f"visual_tokens must be >= 1, got {cfg['visual_tokens']}")
    if cfg["resume"] and cfg["checkpoint"]:
        warns.append(f"--checkpoint is ignored with --resume ({LATEST_CHECKPOINT} holds the weights)")
    if cfg["freeze_encoder"] and cfg["use_gradient_checkpointing"]:
        warns.append("--use_gradient_checkpointing has no effect with --freeze_encoder")
    if cfg["log_images"] and not cfg["use_wandb"]:
        warns.append("--log_images needs --use_wandb; no images will be logged")
    return warns


def training_preprocessing(args: argparse.Namespace, roi_size: int) -> Preprocessing:
    """The run's contract: flags, else what the model being fine-tuned (``--checkpoint``, or the run
    being resumed) was trained with, else the defaults. Official checkpoints carry none."""
    source = Path(args.output_dir) / LATEST_CHECKPOINT if args.resume else args.checkpoint
    contract = None
    if source and Path(source).is_file():
        payload = load_checkpoint(source, mmap=True)  # only its preprocessing entry is read
        contract = payload.get("preprocessing") if isinstance(payload, dict) else None
    return preprocessing_from_args(args, roi_size, contract, str(source))


def run_training(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune, then export the best encoder. Returns the engine's result plus output paths."""
    from sam3d.engine.checkpoint import lock_output_dir

    with lock_output_dir(args.output_dir, enabled=int(os.environ.get("RANK", "0")) == 0):
        return _run_training(args)


def _run_training(args: argparse.Namespace) -> dict[str, Any]:
    from sam3d.data.dataset import build_segmentation_dataset, check_no_scan_in_both, read_manifest
    from sam3d.data.transforms import build_transforms
    from sam3d.engine.distributed import cleanup, init_distributed, resolve_device, seed_everything
    from sam3d.engine.tracking import Tracker
    from sam3d.engine.trainer import Trainer, TrainerConfig
    from sam3d.export import export_encoder
    from sam3d.modeling import build_sam3d, load_sam3d_weights, model_config
    from sam3d.task import SegmentationTask

    device = resolve_device(args.device)
    ctx = init_distributed(device)
    seed_everything(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    config = model_config(args.model_type, **({"img_size": args.img_size} if args.img_size else {}))
    preprocessing = training_preprocessing(args, config.img_size)
    set_preprocessing_flags(args, preprocessing)
    config.in_chans = preprocessing.num_input_channels
    model = build_sam3d(config)
    if args.checkpoint and not args.resume:
        load_sam3d_weights(model, args.checkpoint)
    model.image_encoder.gradient_checkpointing = args.use_gradient_checkpointing
    if args.freeze_encoder:
        model.image_encoder.requires_grad_(False)

    train_rows, train_skipped = read_manifest(
        args.train_csv, args.mask_dir, validate=args.validate_data, skip_invalid=args.skip_invalid
    )
    val_rows, val_skipped = read_manifest(
        args.val_csv, args.mask_dir, validate=args.validate_data, skip_invalid=args.skip_invalid
    )
    shared = sorted({r.patient_id for r in train_rows} & {r.patient_id for r in val_rows})
    if shared and not args.allow_patient_overlap:
        raise ConfigError(
            f"--train_csv {args.train_csv} and --val_csv {args.val_csv} share {len(shared)} patient_id(s) "
            f"({', '.join(shared[:5])}{' ...' if len(shared) > 5 else ''}): validation would score scans of "
            "patients it trained on; split by patient, or pass --allow_patient_overlap"
        )
    check_no_scan_in_both(train_rows, val_rows, args.allow_patient_overlap)
    cache = lambda split: None if not args.cache_dir else str(Path(args.cache_dir) / split)  # noqa: E731
    train_ds = build_segmentation_dataset(train_rows, build_transforms(preprocessing, train=True), cache("train"))
    val_ds = build_segmentation_dataset(val_rows, build_transforms(preprocessing, train=False), cache("val"))

    if ctx.is_main:
        (output_dir / "config.json").write_text(
            json.dumps(
                {**vars(args), "model_config": config.to_dict(), "preprocessing": preprocessing.to_dict()},
                indent=2,
                default=str,
            )
        )
    task = SegmentationTask(
        args.num_clicks,
        args.val_num_clicks,
        preprocessing.target_spacing_mm,
        args.seed,
        args.use_mixed_precision,
        args.automatic_round,
    )
    encoder_params = [p for p in model.image_encoder.parameters() if p.requires_grad]
    decoder_params = list(model.prompt_encoder.parameters()) + list(model.mask_decoder.parameters())
    param_groups = [
        {
            "params": decoder_params,
            "lr": args.decoder_lr_ratio * args.lr,
            "weight_decay": args.weight_decay,
            "name": "decoder",
        }
    ]
    if encoder_params:
        param_groups.insert(
            0, {"params": encoder_params, "lr": args.lr, "weight_decay": args.weight_decay, "name": "encoder"}
        )
    trainer_cfg = TrainerConfig.from_flags(args, output_dir)
    run_config = {**vars(args), "model_config": config.to_dict()}
    tracker_factory = lambda run_id: Tracker(  # noqa: E731
        args.use_wandb, args.wandb_project, args.wandb_entity, run_config, output_dir, run_id, name=output_dir.name
    )
    trainer = Trainer(
        trainer_cfg,
        task,
        model,
        param_groups,
        device,
        ctx,
        tracker_factory,
        checkpoint_extras={
            "model_type": args.model_type,
            "model_config": config.to_dict(),
            "preprocessing": preprocessing.to_dict(),
        },
    )
    skipped = [{"csv": args.train_csv, **s} for s in train_skipped] + [{"csv": args.val_csv, **s} for s in val_skipped]
    summary_extra = {"data": {"train_cases": len(train_rows), "val_cases": len(val_rows)}, "skipped_rows": skipped}
    try:
        result = trainer.fit(train_ds, val_ds, summary_extra)
        outputs = {"best_model": str(output_dir / BEST_CHECKPOINT), "latest_model": str(output_dir / LATEST_CHECKPOINT)}
        if ctx.is_main and (output_dir / BEST_CHECKPOINT).exists():
            best = build_sam3d(config)
            load_sam3d_weights(best, output_dir / BEST_CHECKPOINT)
            export_encoder(
                best,
                output_dir / ENCODER_FILE,
                config,
                args.visual_tokens,
                preprocessing,
                source=str(output_dir / BEST_CHECKPOINT),
                seed=args.seed,
            )
            outputs["sam_encoder"] = str(output_dir / ENCODER_FILE)
            outputs["val_overlays"] = write_validation_overlays(
                task, best.to(device), val_ds, output_dir / "val_overlays", device
            )
        if ctx.is_main:
            outputs["training_curves"] = result["curves_path"]
        result["outputs"] = outputs
        result["skipped_rows"] = skipped
        return result
    finally:
        cleanup(ctx)


def write_validation_overlays(task, model, val_ds, folder: Path, device, max_cases: int = 4) -> str:
    """PNG overlays (prediction red, truth green) of the best model on the first validation scans."""
    from monai.data import DataLoader
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = task.visualize(model, DataLoader(val_ds, batch_size=1), device, max_cases=max_cases)
    for name, picture in images.items():
        Image.fromarray(picture).save(folder / f"{name.split('/')[-1]}.png")
    return str(folder)


def system_check_run(output_dir: Path) -> str:
    """Tiny end-to-end run on generated data: forward, backward, AMP, accumulation, checkpoint save,
    reload, resume, export. W&B disabled."""
    import torch

    from sam3d.data.synthetic import make_synthetic_ich
    from sam3d.engine.checkpoint import load_checkpoint
    from sam3d.export import load_exported_encoder

    os.environ["WANDB_MODE"] = "disabled"
    work = Path(tempfile.mkdtemp(prefix="system_check_", dir=output_dir))
    data = make_synthetic_ich(
        work / "data",
        num_cases=4,
        seed=0,
        val_fraction=0.25,
        spacing_mm=(3.0, 3.0, 5.0),
        positive_fraction=0.75,
        head_scale=0.5,
        progress=False,
    )
    argv = [
        "--train_csv",
        str(data["train_csv"]),
        "--val_csv",
        str(data["val_csv"]),
        "--mask_dir",
        str(data["mask_dir"]),
        "--output_dir",
        str(work / "run"),
        "--model_type",
        "small",
        "--epochs",
        "1",
        "--batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--use_mixed_precision",
        "--num_workers",
        "0",
        "--num_clicks",
        "2",
        "--val_num_clicks",
        "2",
        "--target_spacing",
        "3",
        "3",
        "3",
        "--patience",
        "1",
        "--device",
        "auto",
    ]
    args = build_parser().parse_args(argv)
    first = run_training(args)
    checkpoint = load_checkpoint(work / "run" / LATEST_CHECKPOINT)
    if checkpoint["epoch"] != 1 or not torch.isfinite(torch.tensor(first["history"][-1]["train_loss"])):
        raise RuntimeError(f"unexpected checkpoint after one epoch: epoch={checkpoint['epoch']}")
    resumed = run_training(build_parser().parse_args(argv + ["--epochs", "2", "--resume"]))
    encoder, projector, meta = load_exported_encoder(work / "run" / ENCODER_FILE)
    with torch.no_grad():
        tokens = projector(encoder(torch.zeros(1, 1, encoder.img_size, encoder.img_size, encoder.img_size)))
    return (
        f"2 epochs (1 + resumed 1), val Dice {resumed['history'][-1]['val_dice']:.3f}, "
        f"export {tuple(tokens.shape)} tokens, outputs in {work}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Configuration errors end as one line (exit 2) through ``sam3d.engine.cli.run_main``, before any data is read."""
    parser = build_parser()
    args = parse_with_config(parser, argv)
    if args.test:
        from sam3d.engine.system_check import run_checks

        output_dir = Path(args.output_dir)
        return 1 if run_checks(output_dir, [("end-to-end tiny training", lambda: system_check_run(output_dir))]) else 0
    for message in check_config(args):
        print(f"WARNING: {message}", file=sys.stderr)
    args.resume_changes = check_resume(args)  # config.json records what this run changed
    for change in args.resume_changes:
        print(f"resuming with a changed flag: {change}", file=sys.stderr)
    result = run_training(args)
    if int(os.environ.get("RANK", "0")) == 0:
        from sam3d.engine.trainer import print_outcome

        print_outcome(result, "val Dice")
    return 0


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
