"""Train the BLIP-2 report model on the shared engine.

    sam3d-report-train --config sam3d/configs/blip_tiny_ct.yaml --train_manifest train.jsonl --val_manifest val.jsonl \\
        --encoder outputs/sam3d/sam_encoder.pth
    sam3d-report-train --config ... --resume                       # continue from output_dir/latest_model.pth

Manifests are ``blip.data.reports`` CSV/JSONL files (columns image, report, modality ...). Without
``--val_manifest`` both sets come from the ``split`` column of ``--train_manifest``. Without ``--lm`` a
tiny GPT-2 (tokenizer trained on the training reports) is built into ``output_dir/lm`` and reused on resume.

CT and X-ray in one run: a manifest may mix modalities. The model then gets both towers (the CT one
from ``--encoder`` / ``--ct_model_type``, the X-ray one from ``--xray_encoder`` / ``--xray_model_type``)
sharing one Q-Former and LM, each modality with its own prompt; every batch holds one modality, and
validation covers both (``val_loss`` over all studies, ``val_loss_ct`` / ``val_loss_xray`` per modality).
A tower loaded from a checkpoint (``--encoder``, ``--xray_encoder``) stays fixed and a randomly
initialised one trains, unless ``--freeze_vision`` / ``--no-freeze_vision`` (both towers) or
``--freeze_ct_tower`` / ``--freeze_xray_tower`` (or their ``--no-`` forms, per tower) say otherwise. The
fixed pretrained tower is BLIP-2's recipe: the report loss alone teaches a tower little before it has
taught the Q-Former to read it (what joint training from the first step did here:
docs/report_generation.md). ``--diagnosis_prompt`` adds a findings head on the tower's tokens whose
labels lead each prompt (``blip.diagnosis``).

BLIP-2's two stages: ``--stage 1`` trains the Q-Former alone with ITC, ITM and ITG (``blip.stage1``;
no language model runs) and writes the bridge to ``output_dir/qformer`` (``QFormerBridge.save_pretrained``
plus the stage-1 heads); ``--init_from <that folder>`` starts a run's bridge from it: stage 2 behind the
LM, or more stage 1 on other data (heads included). ``--stage 2`` without ``--init_from`` starts from a
fresh bridge.

Outputs in --output_dir: best_model.pth, latest_model.pth (engine checkpoints), report_model/
(``Blip2ReportModel.save_pretrained`` of the best model; stage 1: qformer/, the bridge and heads),
val_samples.json (generated reports of the
latest validation), attention/<id>_attention.png (Q-Former cross-attention over the image of the first
validation study of each modality), config.json, training_summary_<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

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

LM_FOLDER = "lm"
REPORT_MODEL_FOLDER = "report_model"
QFORMER_FOLDER = "qformer"
MANIFEST_HINT = (
    " (`make demo` or sam3d-make-synthetic write synthetic head-CT report manifests, "
    "reports_train.jsonl and reports_val.jsonl)"
)


def build_parser() -> argparse.ArgumentParser:
    p = CommandLineParser(description=__doc__)
    bool_flag = argparse.BooleanOptionalAction
    add_run_arguments(p, "outputs/blip")
    g = p.add_argument_group("data")
    g.add_argument(
        "--train_manifest",
        type=input_path,
        help="CSV/JSONL with columns image, report (or findings/impression), modality",
    )
    g.add_argument("--val_manifest", type=input_path, help="default: the rows of --train_manifest whose split is 'val'")
    g.add_argument("--num_workers", type=int, default=0)
    g.add_argument(
        "--cache_images",
        action=bool_flag,
        default=False,
        help="keep preprocessed images in memory after their first epoch (8 MB per 128^3 CT volume)",
    )
    g.add_argument(
        "--cache_tokens",
        action=bool_flag,
        default=False,
        help="keep a frozen tower's output per image in memory: the tower then runs once per image "
        "instead of once per epoch (blip.task.TowerTokenCache; 0.2-0.8 MB per CT study, 4 MB per vit_b X-ray)",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--encoder",
        type=input_path,
        help="CT tower: sam_encoder.pth exported by train.py (architecture and preprocessing inside)",
    )
    g.add_argument("--ct_model_type", default="small", help="CT tower registry name when no --encoder (random weights)")
    g.add_argument(
        "--xray_encoder", type=input_path, help="X-ray tower: segment-anything checkpoint, e.g. sam_vit_b_01ec64.pth"
    )
    g.add_argument("--xray_model_type", default="vit_b", help="X-ray tower: vit_b (sam_vit_b) or tiny")
    g.add_argument(
        "--freeze_vision",
        action=bool_flag,
        default=None,
        help="both vision towers fixed (or trained, --no-freeze_vision); default: a tower loaded from a "
        "checkpoint stays fixed, a random one trains",
    )
    g.add_argument(
        "--freeze_ct_tower", action=bool_flag, default=None, help="CT tower fixed or trained (default: --freeze_vision)"
    )
    g.add_argument(
        "--freeze_xray_tower",
        action=bool_flag,
        default=None,
        help="X-ray tower fixed or trained (default: --freeze_vision)",
    )
    g.add_argument(
        "--stage",
        type=int,
        choices=[1, 2],
        default=2,
        help="1: Q-Former pre-training (ITC, ITM, ITG); 2: report generation behind the LM",
    )
    g.add_argument(
        "--init_from",
        type=input_path,
        help="a stage-1 run's qformer folder (bridge + stage-1 heads) that starts this run",
    )
    g.add_argument("--num_query_tokens", type=int, default=32)
    g.add_argument(
        "--qformer_checkpoint",
        help="LAVIS BLIP-2 checkpoint that initialises the Q-Former bridge (blip.convert_lavis; "
        "parts whose widths differ from this model's restart, with a warning)",
    )
    g.add_argument(
        "--bridge",
        type=json.loads,
        default={},
        help='Q-Former overrides as JSON, e.g. {"hidden_size": 256, "num_hidden_layers": 4} (default BERT-base)',
    )
    g.add_argument(
        "--lm",
        type=input_path,
        help="local Hugging Face causal-LM folder; default: a tiny GPT-2 built in output_dir/lm",
    )
    g.add_argument("--lm_mode", choices=["frozen", "full", "lora"], default="frozen")
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=int, default=16)
    g.add_argument("--lm_vocab_size", type=int, default=1000, help="tiny GPT-2: tokenizer vocabulary bound")
    g.add_argument("--lm_layers", type=int, default=2, help="tiny GPT-2: layers")
    g.add_argument("--lm_width", type=int, default=128, help="tiny GPT-2: hidden size")
    g.add_argument("--prompt_ct", default="Head CT report:")
    g.add_argument("--prompt_xray", default="Chest X-ray report:")
    g.add_argument("--max_text_len", type=int, default=128, help="report tokens kept (end-of-text included)")
    g.add_argument(
        "--condition_on_measurements",
        action=bool_flag,
        default=False,
        help="CT prompts start with the study's measurement sentence (blip.conditioning), read from the "
        "manifest's volume_ml and side columns in training and from the segmentation in use",
    )
    g.add_argument(
        "--diagnosis_prompt",
        action=bool_flag,
        default=False,
        help="a head on the tower's tokens predicts the labeler's findings, and prompts start with them "
        "(blip.diagnosis): reference labels in training, the head's prediction in generation",
    )
    g.add_argument(
        "--diagnosis_loss_weight",
        type=float,
        default=1.0,
        help="weight of the diagnosis head's binary cross-entropy in the training loss",
    )
    g.add_argument(
        "--diagnosis_dropout",
        type=float,
        default=0.3,
        help="training: each present observation is left out of the study's diagnosis sentence with this "
        "probability (never all), so the LM also follows the partial lists the head writes",
    )
    g.add_argument(
        "--diagnosis_lr_ratio",
        type=float,
        default=10.0,
        help="the diagnosis heads learn at this x lr: a linear head on fixed features converges in as "
        "many steps as the report model needs only at a higher rate",
    )
    g.add_argument("--use_gradient_checkpointing", action=bool_flag, default=False)
    add_optimisation_arguments(
        p,
        "optimisation",
        epochs=30,
        batch_size=4,
        lr=1e-4,
        weight_decay=0.05,
        patience=10,
        gradient_accumulation_steps=1,
        scheduler_type="cosine",
        monitor="validation loss",
    )
    g = p.add_argument_group("generation (validation samples and the final sample)")
    g.add_argument("--num_val_samples", type=int, default=2, help="per modality")
    g.add_argument("--num_beams", type=int, default=3)
    g.add_argument("--max_new_tokens", type=int, default=100)
    g.add_argument("--repetition_penalty", type=float, default=2.0)
    g.add_argument("--no_repeat_ngram_size", type=int, default=2)
    add_tracking_arguments(p, "blip-reports", "Q-Former cross-attention overlays")
    return p


def check_config(args: argparse.Namespace) -> list[str]:
    """Configuration problems before any data is read; returns warnings."""
    warns = check_training_config(vars(args))
    if not args.train_manifest:
        raise ConfigError("--train_manifest is required")
    for key in ("train_manifest", "val_manifest", "encoder", "xray_encoder", "qformer_checkpoint"):
        value = getattr(args, key)
        if value:
            require_file(key, value, {"train_manifest": MANIFEST_HINT, "val_manifest": MANIFEST_HINT}.get(key, ""))
    if args.init_from and not (Path(args.init_from) / "config.json").is_file():
        raise ConfigError(f"--init_from {args.init_from}: not a qformer folder of a stage-1 run (no config.json)")
    if args.stage == 1 and args.init_from:
        from blip.stage1 import HEADS_NAME

        if not (Path(args.init_from) / HEADS_NAME).is_file():
            raise ConfigError(
                f"--init_from {args.init_from}: no {HEADS_NAME} to continue stage 1 from "
                "(a stage-1 run's qformer folder has it)"
            )
    if args.init_from and args.qformer_checkpoint:
        raise ConfigError("--init_from and --qformer_checkpoint both initialise the bridge: give one")
    check_bridge(args.bridge)
    if args.encoder:
        from sam3d.export import check_exported_encoder

        check_exported_encoder(args.encoder)
    if args.lm and not (Path(args.lm) / "config.json").is_file():
        raise ConfigError(f"--lm {args.lm}: not a Hugging Face model folder (no config.json)")
    if args.resume and not (Path(args.output_dir) / "latest_model.pth").is_file():
        raise ConfigError(f"--resume: {Path(args.output_dir) / 'latest_model.pth'} does not exist")
    if args.num_query_tokens < 1 or args.max_text_len < 2:
        raise ConfigError("num_query_tokens must be >= 1 and max_text_len >= 2")
    if not 0.0 <= args.diagnosis_dropout < 1.0:
        raise ConfigError(f"--diagnosis_dropout must be in [0, 1), got {args.diagnosis_dropout}")
    if args.diagnosis_lr_ratio <= 0:
        raise ConfigError(f"--diagnosis_lr_ratio must be > 0, got {args.diagnosis_lr_ratio}")
    if args.log_images and not args.use_wandb:
        warns.append("--log_images needs --use_wandb; the overlays are computed but not logged")
    if args.cache_tokens and not any(tower_freezing(args).values()):
        warns.append("--cache_tokens has no effect: every vision tower trains")
    if args.lm_mode == "frozen" and all(tower_freezing(args).values()):
        warns.append("--lm_mode frozen with frozen vision towers: only the Q-Former bridge trains (BLIP-2 stage 2)")
    return warns


def check_bridge(bridge: Any) -> None:
    """``bridge`` (the YAML key or --bridge JSON): Q-Former settings by their QFormerBridgeConfig names."""
    from blip.qformer import QFormerBridgeConfig

    if not isinstance(bridge, dict):
        raise ConfigError(f"bridge: expected a mapping of Q-Former settings, found {bridge!r}")
    unknown = QFormerBridgeConfig.unknown_keys(bridge)
    if unknown:
        raise ConfigError(
            f"bridge: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"known keys: {', '.join(QFormerBridgeConfig.known_keys())}"
        )


def tower_freezing(args: argparse.Namespace) -> dict[str, bool]:
    """modality → whether its tower stays fixed: the per-tower flag where given, else --freeze_vision,
    else fixed exactly when the tower is loaded from a checkpoint (pretrained)."""
    per_tower = {"ct": args.freeze_ct_tower, "xray": args.freeze_xray_tower}
    pretrained = {"ct": bool(args.encoder), "xray": bool(args.xray_encoder)}
    both = args.freeze_vision
    return {
        m: frozen if frozen is not None else both if both is not None else pretrained[m]
        for m, frozen in per_tower.items()
    }


def read_rows(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows) as ``{"image", "report", "modality", "id"}`` dicts, plus ``context`` (the
    measurement sentence) for CT rows with ``--condition_on_measurements`` and ``diagnosis`` (the
    labeler's reference labels) with ``--diagnosis_prompt``."""
    from blip.conditioning import context_from_row, volume_slot_text
    from blip.data.reports import read_report_manifest
    from blip.diagnosis import reference_diagnosis

    val_source = args.val_manifest or args.train_manifest
    if args.val_manifest:
        train, val = read_report_manifest(args.train_manifest), read_report_manifest(args.val_manifest)
    else:
        train = read_report_manifest(args.train_manifest, split="train")
        val = read_report_manifest(args.train_manifest, split="val")

    def as_row(record, source: str) -> dict:
        row = {"image": record.image, "report": record.report, "modality": record.modality, "id": record.id}
        if args.condition_on_measurements and record.modality == "ct":
            row["context"] = context_from_row(record.extra, f"{source}, line {record.source_row}")
            row["report"] = volume_slot_text(record.report, float(record.extra["volume_ml"]))
        if args.diagnosis_prompt:
            row["diagnosis"] = reference_diagnosis(record.report, record.modality)
        return row

    return [as_row(r, args.train_manifest) for r in train], [as_row(r, val_source) for r in val]


def build_model(args: argparse.Namespace, modalities: str | Collection[str], train_texts: list[str], ctx):
    """The report model with a tower for each of ``modalities`` (one name or several) from the flags.
    Without --lm the tiny GPT-2 (its tokenizer trained on ``train_texts``) is built once (rank 0; the
    other ranks wait) into output_dir/lm, where a resumed run finds it again."""
    from blip.language_model import build_tiny_gpt2
    from blip.model import Blip2ReportConfig, Blip2ReportModel, LanguageModelConfig
    from blip.qformer import QFormerBridgeConfig
    from blip.vision import VisionTowerConfig
    from sam3d.engine.distributed import barrier

    modalities = {modalities} if isinstance(modalities, str) else set(modalities)
    lm_path = args.lm
    if not lm_path:
        lm_path = str(Path(args.output_dir) / LM_FOLDER)
        if ctx.is_main and not (Path(lm_path) / "config.json").is_file():
            # Positions for the queries, the prompt with its measurement sentence (< 64 tokens) and the
            # longer of a training report and a generated one.
            positions = args.num_query_tokens + 64 + max(args.max_text_len, args.max_new_tokens)
            build_tiny_gpt2(
                train_texts,
                lm_path,
                vocab_size=args.lm_vocab_size,
                n_layer=args.lm_layers,
                n_embd=args.lm_width,
                n_positions=positions,
                seed=args.seed,
            )
        barrier(ctx)
    bridge = dict(args.bridge)
    if args.init_from:  # the bridge continues with the stage-1 shape, text path included
        saved = json.loads((Path(args.init_from) / "config.json").read_text())
        if saved.get("num_query_tokens") != args.num_query_tokens:
            raise ConfigError(
                f"--init_from {args.init_from} has {saved.get('num_query_tokens')} query tokens, "
                f"--num_query_tokens is {args.num_query_tokens}"
            )
        bridge = {k: v for k, v in saved.items() if k not in ("vision_width", "lm_hidden_size", "num_query_tokens")}
    elif args.stage == 1:
        from transformers import AutoTokenizer

        from blip.stage1 import SPECIAL_TEXT_TOKENS

        bridge["text_vocab_size"] = len(AutoTokenizer.from_pretrained(lm_path, local_files_only=True)) + len(
            SPECIAL_TEXT_TOKENS
        )
    frozen = tower_freezing(args)
    ct = VisionTowerConfig("sam3d", args.ct_model_type, args.encoder, frozen["ct"])
    xray = VisionTowerConfig("sam2d", args.xray_model_type, args.xray_encoder, frozen["xray"])
    config = Blip2ReportConfig(
        ct_tower=ct if "ct" in modalities else None,
        xray_tower=xray if "xray" in modalities else None,
        bridge=QFormerBridgeConfig.from_dict(bridge),
        language_model=LanguageModelConfig(lm_path, args.lm_mode, args.lora_r, args.lora_alpha),
        num_query_tokens=args.num_query_tokens,
        condition_on_measurements=args.condition_on_measurements,
        diagnosis_prompt=args.diagnosis_prompt,
    )
    model = Blip2ReportModel(
        config, prompts={"ct": args.prompt_ct, "xray": args.prompt_xray}, max_text_len=args.max_text_len
    )
    if args.qformer_checkpoint and not args.resume:  # a resumed run has its trained bridge in the checkpoint
        from blip.convert_lavis import load_lavis_into_bridge

        model.notes += load_lavis_into_bridge(model.bridge, args.qformer_checkpoint)
    if args.init_from and not args.resume:
        from blip.qformer import QFormerBridge

        model.bridge.load_state_dict(QFormerBridge.from_pretrained(args.init_from).state_dict())
        model.notes.append(f"bridge initialised from {args.init_from} (stage 1)")
    if args.use_gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def run_training(args: argparse.Namespace) -> dict[str, Any]:
    """Train, save the best model with ``save_pretrained`` and generate one sample per validation
    modality. Returns the engine's result plus ``outputs`` and ``samples``."""
    from sam3d.engine.checkpoint import lock_output_dir

    with lock_output_dir(args.output_dir, enabled=int(os.environ.get("RANK", "0")) == 0):
        return _run_training(args)


def _run_training(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from blip.data.dataset import ReportCollator, ReportDataset
    from blip.diagnosis import diagnosis_sentence
    from blip.model import write_attention_overlays
    from blip.task import ReportTask
    from sam3d.engine.checkpoint import extract_state_dict, load_checkpoint
    from sam3d.engine.distributed import cleanup, init_distributed, resolve_device, seed_everything
    from sam3d.engine.tracking import Tracker
    from sam3d.engine.trainer import BEST_CHECKPOINT, LATEST_CHECKPOINT, Trainer, TrainerConfig

    device = resolve_device(args.device)
    ctx = init_distributed(device)
    seed_everything(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train_rows, val_rows = read_rows(args)
    modalities = sorted({r["modality"] for r in train_rows})
    val_only = sorted({r["modality"] for r in val_rows} - set(modalities))
    if val_only:
        raise ConfigError(
            f"{args.val_manifest or args.train_manifest}: validation rows of modality {val_only}, "
            f"but the training rows of {args.train_manifest} are {modalities} (that tower would not train)"
        )
    # The tiny LM's tokenizer learns the measurement and diagnosis sentences' words too.
    texts = [r["report"] for r in train_rows] + sorted({r["context"] for r in train_rows if r.get("context")})
    texts += sorted({diagnosis_sentence(r["diagnosis"], r["modality"]) for r in train_rows if r.get("diagnosis")})
    model = build_model(args, modalities, texts, ctx)
    for note in model.notes:
        print(note)
    transforms = {m: model.processor.image_transform(m) for m in modalities}
    train_ds = ReportDataset(train_rows, transforms, args.train_manifest, args.cache_images)
    val_ds = ReportDataset(val_rows, transforms, args.val_manifest or args.train_manifest, args.cache_images)

    generation = {
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "repetition_penalty": args.repetition_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
    }
    report_model = model
    if args.stage == 1:
        from blip.stage1 import QFormerPretraining, QFormerPretrainingTask
        from blip.task import TowerTokenCache

        model = QFormerPretraining(report_model, token_cache=TowerTokenCache() if args.cache_tokens else None)
        if args.init_from and not args.resume:
            model.load_heads(args.init_from)
        # Each stage's task goes with its model: QFormerPretraining here, the report model in stage 2.
        task: QFormerPretrainingTask | ReportTask = QFormerPretrainingTask()
        # The LM and the projection into it take no part in stage 1.
        unused = {id(p) for p in report_model.language_model.parameters()}
        unused |= {id(p) for p in report_model.bridge.language_projection.parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in unused]
        param_groups = [{"params": trainable, "lr": args.lr, "weight_decay": args.weight_decay, "name": "qformer"}]
    else:
        task = ReportTask(
            args.num_val_samples,
            generation,
            output_dir / "val_samples.json",
            args.use_mixed_precision,
            args.cache_tokens,
            args.diagnosis_loss_weight,
            args.diagnosis_dropout,
        )
        heads = {id(p) for p in model.diagnosis_heads.parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in heads]
        param_groups = [{"params": trainable, "lr": args.lr, "weight_decay": args.weight_decay, "name": "report_model"}]
    if args.stage == 2 and heads:
        param_groups.append(
            {
                "params": list(model.diagnosis_heads.parameters()),
                "lr": args.diagnosis_lr_ratio * args.lr,
                "weight_decay": args.weight_decay,
                "name": "diagnosis_heads",
            }
        )
    trainer_cfg = TrainerConfig.from_flags(args, output_dir)
    run_config = {**vars(args), "report_model_config": report_model.config.to_dict()}
    if ctx.is_main:
        (output_dir / "config.json").write_text(json.dumps(run_config, indent=2, default=str) + "\n")
    tracker_factory = lambda run_id: Tracker(
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
        collate_fn=ReportCollator(report_model.processor),
        checkpoint_extras={"report_model_config": report_model.config.to_dict(), "stage": args.stage},
    )
    summary_extra = {
        "data": {"train_studies": len(train_rows), "val_studies": len(val_rows), "modalities": modalities},
        "trainable_parameters": sum(p.numel() for p in trainable),
    }
    try:
        result = trainer.fit(train_ds, val_ds, summary_extra)
        outputs = {"best_model": str(output_dir / BEST_CHECKPOINT), "latest_model": str(output_dir / LATEST_CHECKPOINT)}
        if ctx.is_main and (output_dir / BEST_CHECKPOINT).exists():
            best = output_dir / BEST_CHECKPOINT
            model.load_state_dict(extract_state_dict(load_checkpoint(best, map_location=device), best))
            if args.stage == 1:
                model.save_pretrained(output_dir / QFORMER_FOLDER)
                outputs["qformer"] = str(output_dir / QFORMER_FOLDER)
            else:
                report_model.save_pretrained(output_dir / REPORT_MODEL_FOLDER)
                outputs["report_model"] = str(output_dir / REPORT_MODEL_FOLDER)
        if ctx.is_main and (output_dir / BEST_CHECKPOINT).exists() and args.stage == 2:
            model.eval()
            result["samples"] = []
            for modality in val_ds.modalities:
                first = val_ds[val_ds.group_keys.index(modality)]
                image = first["image"][None].to(device)
                with torch.no_grad():
                    contexts = [first["context"]] if first["context"] else None
                    generated = model.generate(image, modality, contexts, **generation)[0]
                    diagnosis = (
                        diagnosis_sentence((model.diagnose(image, modality)[0] >= 0.5).tolist(), modality)
                        if args.diagnosis_prompt
                        else None
                    )
                attention = write_attention_overlays(model, image, modality, [first["id"]], output_dir / "attention")
                result["samples"].append(
                    {
                        "id": first["id"],
                        "modality": modality,
                        "reference": first["report"],
                        "context": first["context"],
                        "diagnosis": diagnosis,
                        "generated": generated,
                        "attention_overlay": str(attention[0]),
                    }
                )
        result["outputs"] = outputs
        return result
    finally:
        cleanup(ctx)


def main(argv: Sequence[str] | None = None) -> int:
    """Configuration errors end as one line (exit 2) through ``sam3d.engine.cli.run_main``, before any data is read."""
    parser = build_parser()
    args = parse_with_config(parser, argv)
    for message in check_config(args):
        print(f"WARNING: {message}", file=sys.stderr)
    args.resume_changes = check_resume(args)  # config.json records what this run changed
    for change in args.resume_changes:
        print(f"resuming with a changed flag: {change}", file=sys.stderr)
    result = run_training(args)
    if int(os.environ.get("RANK", "0")) == 0:
        from blip.data.reports import split_sections
        from sam3d.engine.trainer import print_outcome

        for sample in result.get("samples", []):
            findings, impression = split_sections(sample["generated"])
            context = f"  measurements given: {sample['context']}\n" if sample["context"] else ""
            context += f"  predicted: {sample['diagnosis']}\n" if sample["diagnosis"] else ""
            print(
                f"sample {sample['id']} ({sample['modality']})\n{context}  reference: {sample['reference']}\n"
                f"  generated: {sample['generated']}\n  findings: {findings}\n  impression: {impression}\n"
                f"  cross-attention: {sample['attention_overlay']}"
            )
        print_outcome(result, "val loss")
    return 0


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
