"""Training the BLIP-2 report model on the shared engine: :class:`ReportTrainingConfig` and :func:`run_training`.

    from blip.training import ReportTrainingConfig, run_training
    result = run_training(ReportTrainingConfig.from_yaml("sam3d/configs/blip_tiny_ct.yaml", train_manifest=...))

``sam3d-report-train`` (``blip.cli.train``) is the same with flags: each setting is the flag of its name.
Its ``--help`` says what a run does: mixed CT and X-ray manifests, tower freezing, BLIP-2's two stages
and the outputs in ``output_dir``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import AutoTokenizer

from blip.conditioning import context_from_row, volume_slot_text
from blip.convert_lavis import load_lavis_into_bridge
from blip.data.dataset import ReportCollator, ReportDataset
from blip.data.reports import read_report_manifest
from blip.diagnosis import diagnosis_sentence, reference_diagnosis
from blip.language_model import build_tiny_gpt2
from blip.model import (
    Blip2ReportConfig,
    Blip2ReportModel,
    LanguageModelConfig,
    generation_settings,
    write_attention_overlays,
)
from blip.qformer import QFormerBridge, QFormerBridgeConfig
from blip.training.stage1 import HEADS_NAME, SPECIAL_TEXT_TOKENS, QFormerPretraining, QFormerPretrainingTask
from blip.training.task import ReportTask, TowerTokenCache
from blip.vision import VisionTowerConfig
from ich_engine.checkpoint import extract_state_dict, load_checkpoint
from ich_engine.config import ConfigError, input_path, known_keys, require_file, unknown_keys
from ich_engine.distributed import DistributedContext, barrier
from ich_engine.run import TrainingRun
from ich_engine.run import run_training as run_engine
from ich_engine.settings import TrainingConfig, add_flag_group, setting
from ich_engine.trainer import BEST_CHECKPOINT
from sam3d.export import check_exported_encoder

__all__ = ["ReportTrainingConfig", "build_model", "read_rows", "run_training"]

LM_FOLDER = "lm"
REPORT_MODEL_FOLDER = "report_model"
QFORMER_FOLDER = "qformer"
MANIFEST_HINT = (
    " (`make demo` or sam3d-make-synthetic write synthetic head-CT report manifests, "
    "reports_train.jsonl and reports_val.jsonl)"
)
_BOOL = argparse.BooleanOptionalAction


@dataclass(frozen=True)
class ReportTrainingConfig(TrainingConfig):
    """Every setting of a report-model run (docs/cli.md, ``sam3d-report-train``); validated on construction."""

    output_dir: str = TrainingConfig.redefault("output_dir", "outputs/blip")
    train_manifest: str | None = setting(
        None, "CSV/JSONL with columns image, report (or findings/impression), modality", type=input_path
    )
    val_manifest: str | None = setting(
        None, "default: the rows of --train_manifest whose split is 'val'", type=input_path
    )
    cache_images: bool = setting(
        False, "keep preprocessed images in memory after their first epoch (8 MB per 128^3 CT volume)", action=_BOOL
    )
    cache_tokens: bool = setting(
        False,
        "keep a frozen tower's output per image in memory: the tower then runs once per image "
        "instead of once per epoch (blip.training.task.TowerTokenCache; 0.2-0.8 MB per CT study, 4 MB per vit_b X-ray)",
        action=_BOOL,
    )
    encoder: str | None = setting(
        None, "CT tower: sam_encoder.pth exported by train.py (architecture and preprocessing inside)", type=input_path
    )
    ct_model_type: str = setting("small", "CT tower registry name when no --encoder (random weights)")
    xray_encoder: str | None = setting(
        None, "X-ray tower: segment-anything checkpoint, e.g. sam_vit_b_01ec64.pth", type=input_path
    )
    xray_model_type: str = setting("vit_b", "X-ray tower: vit_b (sam_vit_b) or tiny")
    freeze_vision: bool | None = setting(
        None,
        "both vision towers fixed (or trained, --no-freeze_vision); default: a tower loaded from a "
        "checkpoint stays fixed, a random one trains",
        action=_BOOL,
    )
    freeze_ct_tower: bool | None = setting(None, "CT tower fixed or trained (default: --freeze_vision)", action=_BOOL)
    freeze_xray_tower: bool | None = setting(
        None, "X-ray tower fixed or trained (default: --freeze_vision)", action=_BOOL
    )
    stage: int = setting(
        2, "1: Q-Former pre-training (ITC, ITM, ITG); 2: report generation behind the LM", type=int, choices=[1, 2]
    )
    init_from: str | None = setting(
        None, "a stage-1 run's qformer folder (bridge + stage-1 heads) that starts this run", type=input_path
    )
    num_query_tokens: int = setting(32, type=int)
    qformer_checkpoint: str | None = setting(
        None,
        "LAVIS BLIP-2 checkpoint that initialises the Q-Former bridge (blip.convert_lavis; "
        "parts whose widths differ from this model's restart, with a warning)",
    )
    bridge: Mapping[str, Any] = setting(
        {},
        'Q-Former overrides as JSON, e.g. {"hidden_size": 256, "num_hidden_layers": 4} (default BERT-base)',
        type=json.loads,
    )
    lm: str | None = setting(
        None, "local Hugging Face causal-LM folder; default: a tiny GPT-2 built in output_dir/lm", type=input_path
    )
    lm_mode: str = setting("frozen", choices=["frozen", "full", "lora"])
    lora_r: int = setting(8, type=int)
    lora_alpha: int = setting(16, type=int)
    lm_vocab_size: int = setting(1000, "tiny GPT-2: tokenizer vocabulary bound", type=int)
    lm_layers: int = setting(2, "tiny GPT-2: layers", type=int)
    lm_width: int = setting(128, "tiny GPT-2: hidden size", type=int)
    prompt_ct: str = setting("Head CT report:")
    prompt_xray: str = setting("Chest X-ray report:")
    max_text_len: int = setting(128, "report tokens kept (end-of-text included)", type=int)
    condition_on_measurements: bool = setting(
        False,
        "CT prompts start with the study's measurement sentence (blip.conditioning), read from the "
        "manifest's volume_ml and side columns in training and from the segmentation in use",
        action=_BOOL,
    )
    diagnosis_prompt: bool = setting(
        False,
        "a head on the tower's tokens predicts the labeler's findings, and prompts start with them "
        "(blip.diagnosis): reference labels in training, the head's prediction in generation",
        action=_BOOL,
    )
    diagnosis_loss_weight: float = setting(
        1.0, "weight of the diagnosis head's binary cross-entropy in the training loss", type=float
    )
    diagnosis_dropout: float = setting(
        0.3,
        "training: each present observation is left out of the study's diagnosis sentence with this "
        "probability (never all), so the LM also follows the partial lists the head writes",
        type=float,
    )
    diagnosis_lr_ratio: float = setting(
        10.0,
        "the diagnosis heads learn at this x lr: a linear head on fixed features converges in as "
        "many steps as the report model needs only at a higher rate",
        type=float,
    )
    use_gradient_checkpointing: bool = setting(False, action=_BOOL)
    epochs: int = TrainingConfig.redefault("epochs", 30)
    batch_size: int = TrainingConfig.redefault("batch_size", 4)
    weight_decay: float = TrainingConfig.redefault("weight_decay", 0.05)
    patience: int = TrainingConfig.redefault("patience", 10)
    scheduler_type: str = TrainingConfig.redefault("scheduler_type", "cosine")
    num_val_samples: int = setting(2, "per modality", type=int)
    num_beams: int = setting(3, type=int)
    max_new_tokens: int = setting(100, type=int)
    repetition_penalty: float = setting(2.0, type=float)
    no_repeat_ngram_size: int = setting(2, type=int)
    wandb_project: str = TrainingConfig.redefault("wandb_project", "blip-reports")

    MONITOR: ClassVar[str] = "validation loss"
    LOGGED_IMAGES: ClassVar[str] = "Q-Former cross-attention overlays"
    RESUME_MAY_CHANGE: ClassVar[frozenset[str]] = TrainingConfig.RESUME_MAY_CHANGE | {"cache_images", "cache_tokens"}
    RESUME_RESTORED: ClassVar[frozenset[str]] = TrainingConfig.RESUME_RESTORED | {"diagnosis_lr_ratio"}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        cls.add_run_group(parser)
        add_flag_group(
            parser, cls, "data", ("train_manifest", "val_manifest", "num_workers", "cache_images", "cache_tokens")
        )
        add_flag_group(
            parser,
            cls,
            "model",
            (
                "encoder",
                "ct_model_type",
                "xray_encoder",
                "xray_model_type",
                "freeze_vision",
                "freeze_ct_tower",
                "freeze_xray_tower",
                "stage",
                "init_from",
                "num_query_tokens",
                "qformer_checkpoint",
                "bridge",
                "lm",
                "lm_mode",
                "lora_r",
                "lora_alpha",
                "lm_vocab_size",
                "lm_layers",
                "lm_width",
                "prompt_ct",
                "prompt_xray",
                "max_text_len",
                "condition_on_measurements",
                "diagnosis_prompt",
                "diagnosis_loss_weight",
                "diagnosis_dropout",
                "diagnosis_lr_ratio",
                "use_gradient_checkpointing",
            ),
        )
        add_flag_group(parser, cls, "optimisation", cls.OPTIMISATION_FLAGS)
        add_flag_group(
            parser,
            cls,
            "generation (validation samples and the final sample)",
            ("num_val_samples", "num_beams", "max_new_tokens", "repetition_penalty", "no_repeat_ngram_size"),
        )
        add_flag_group(parser, cls, "tracking", cls.TRACKING_FLAGS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.train_manifest:
            raise ConfigError("--train_manifest is required")
        for key in ("train_manifest", "val_manifest", "encoder", "xray_encoder", "qformer_checkpoint"):
            value = getattr(self, key)
            if value:
                require_file(key, value, {"train_manifest": MANIFEST_HINT, "val_manifest": MANIFEST_HINT}.get(key, ""))
        if self.init_from and not (Path(self.init_from) / "config.json").is_file():
            raise ConfigError(f"--init_from {self.init_from}: not a qformer folder of a stage-1 run (no config.json)")
        if self.stage == 1 and self.init_from and not (Path(self.init_from) / HEADS_NAME).is_file():
            raise ConfigError(
                f"--init_from {self.init_from}: no {HEADS_NAME} to continue stage 1 from "
                "(a stage-1 run's qformer folder has it)"
            )
        if self.init_from and self.qformer_checkpoint:
            raise ConfigError("--init_from and --qformer_checkpoint both initialise the bridge: give one")
        check_bridge(self.bridge)
        if self.encoder:
            check_exported_encoder(self.encoder)
        if self.lm and not (Path(self.lm) / "config.json").is_file():
            raise ConfigError(f"--lm {self.lm}: not a Hugging Face model folder (no config.json)")
        if self.num_query_tokens < 1 or self.max_text_len < 2:
            raise ConfigError("num_query_tokens must be >= 1 and max_text_len >= 2")
        if not 0.0 <= self.diagnosis_dropout < 1.0:
            raise ConfigError(f"--diagnosis_dropout must be in [0, 1), got {self.diagnosis_dropout}")
        if self.diagnosis_lr_ratio <= 0:
            raise ConfigError(f"--diagnosis_lr_ratio must be > 0, got {self.diagnosis_lr_ratio}")

    def warnings(self) -> list[str]:
        warns = super().warnings()
        if self.log_images and not self.use_wandb:
            warns.append("--log_images needs --use_wandb; the overlays are computed but not logged")
        if self.cache_tokens and not any(self.tower_freezing().values()):
            warns.append("--cache_tokens has no effect: every vision tower trains")
        if self.lm_mode == "frozen" and all(self.tower_freezing().values()):
            warns.append("--lm_mode frozen with frozen vision towers: only the Q-Former bridge trains (BLIP-2 stage 2)")
        return warns

    def tower_freezing(self) -> dict[str, bool]:
        """modality → whether its tower stays fixed: the per-tower setting where given, else
        ``freeze_vision``, else fixed exactly when the tower is loaded from a checkpoint (pretrained)."""
        per_tower = {"ct": self.freeze_ct_tower, "xray": self.freeze_xray_tower}
        pretrained = {"ct": bool(self.encoder), "xray": bool(self.xray_encoder)}
        both = self.freeze_vision
        return {
            m: frozen if frozen is not None else both if both is not None else pretrained[m]
            for m, frozen in per_tower.items()
        }


def check_bridge(bridge: Any) -> None:
    """``bridge`` (the YAML key or --bridge JSON): Q-Former settings by their QFormerBridgeConfig names."""
    if not isinstance(bridge, Mapping):
        raise ConfigError(f"bridge: expected a mapping of Q-Former settings, found {bridge!r}")
    unknown = unknown_keys(QFormerBridgeConfig, bridge)
    if unknown:
        raise ConfigError(
            f"bridge: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"known keys: {', '.join(known_keys(QFormerBridgeConfig))}"
        )


def read_rows(config: ReportTrainingConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows) as ``{"image", "report", "modality", "id"}`` dicts, plus ``context`` (the
    measurement sentence) for CT rows with ``condition_on_measurements`` and ``diagnosis`` (the
    labeler's reference labels) with ``diagnosis_prompt``."""
    train_manifest = str(config.train_manifest)
    val_source = config.val_manifest or train_manifest
    if config.val_manifest:
        train, val = read_report_manifest(train_manifest), read_report_manifest(config.val_manifest)
    else:
        train = read_report_manifest(train_manifest, split="train")
        val = read_report_manifest(train_manifest, split="val")

    def as_row(record, source: str) -> dict:
        row = {"image": record.image, "report": record.report, "modality": record.modality, "id": record.id}
        if config.condition_on_measurements and record.modality == "ct":
            row["context"] = context_from_row(record.extra, f"{source}, line {record.source_row}")
            row["report"] = volume_slot_text(record.report, float(record.extra["volume_ml"]))
        if config.diagnosis_prompt:
            row["diagnosis"] = reference_diagnosis(record.report, record.modality)
        return row

    return [as_row(r, train_manifest) for r in train], [as_row(r, val_source) for r in val]


def build_model(
    config: ReportTrainingConfig, modalities: str | Collection[str], train_texts: list[str], ctx: DistributedContext
) -> Blip2ReportModel:
    """The report model with a tower for each of ``modalities`` (one name or several). Without ``lm``
    the tiny GPT-2 (its tokenizer trained on ``train_texts``) is built once (rank 0; the other ranks
    wait) into output_dir/lm, where a resumed run finds it again."""
    modalities = {modalities} if isinstance(modalities, str) else set(modalities)
    lm_path = config.lm
    if not lm_path:
        lm_path = str(Path(config.output_dir) / LM_FOLDER)
        if ctx.is_main and not (Path(lm_path) / "config.json").is_file():
            # Positions for the queries, the prompt with its measurement sentence (< 64 tokens) and the
            # longer of a training report and a generated one.
            positions = config.num_query_tokens + 64 + max(config.max_text_len, config.max_new_tokens)
            build_tiny_gpt2(
                train_texts,
                lm_path,
                vocab_size=config.lm_vocab_size,
                n_layer=config.lm_layers,
                n_embd=config.lm_width,
                n_positions=positions,
                seed=config.seed,
            )
        barrier(ctx)
    bridge = dict(config.bridge)
    if config.init_from:  # the bridge continues with the stage-1 shape, text path included
        saved = json.loads((Path(config.init_from) / "config.json").read_text())
        if saved.get("num_query_tokens") != config.num_query_tokens:
            raise ConfigError(
                f"--init_from {config.init_from} has {saved.get('num_query_tokens')} query tokens, "
                f"--num_query_tokens is {config.num_query_tokens}"
            )
        bridge = {k: v for k, v in saved.items() if k not in ("vision_width", "lm_hidden_size", "num_query_tokens")}
    elif config.stage == 1:
        tokenizer = AutoTokenizer.from_pretrained(lm_path, local_files_only=True)
        bridge["text_vocab_size"] = len(tokenizer) + len(SPECIAL_TEXT_TOKENS)
    frozen = config.tower_freezing()
    ct = VisionTowerConfig("sam3d", config.ct_model_type, config.encoder, frozen["ct"])
    xray = VisionTowerConfig("sam2d", config.xray_model_type, config.xray_encoder, frozen["xray"])
    model_config = Blip2ReportConfig(
        ct_tower=ct if "ct" in modalities else None,
        xray_tower=xray if "xray" in modalities else None,
        bridge=QFormerBridgeConfig.from_dict(bridge),
        language_model=LanguageModelConfig(lm_path, config.lm_mode, config.lora_r, config.lora_alpha),
        num_query_tokens=config.num_query_tokens,
        condition_on_measurements=config.condition_on_measurements,
        diagnosis_prompt=config.diagnosis_prompt,
    )
    model = Blip2ReportModel(
        model_config, prompts={"ct": config.prompt_ct, "xray": config.prompt_xray}, max_text_len=config.max_text_len
    )
    if config.qformer_checkpoint and not config.resume:  # a resumed run has its trained bridge in the checkpoint
        model.notes += load_lavis_into_bridge(model.bridge, config.qformer_checkpoint)
    if config.init_from and not config.resume:
        model.bridge.load_state_dict(QFormerBridge.from_pretrained(config.init_from).state_dict())
        model.notes.append(f"bridge initialised from {config.init_from} (stage 1)")
    if config.use_gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def run_training(config: ReportTrainingConfig) -> dict[str, Any]:
    """Train, save the best model with ``save_pretrained`` (stage 1: the bridge and its heads) and, in
    stage 2, generate one sample per validation modality. Returns the engine's result plus ``outputs``
    and ``samples``."""
    return run_engine(config, _prepare)


def _prepare(config: ReportTrainingConfig, device: torch.device, ctx: DistributedContext) -> TrainingRun:
    output_dir = Path(config.output_dir)
    train_manifest = str(config.train_manifest)
    train_rows, val_rows = read_rows(config)
    modalities = sorted({r["modality"] for r in train_rows})
    val_only = sorted({r["modality"] for r in val_rows} - set(modalities))
    if val_only:
        raise ConfigError(
            f"{config.val_manifest or train_manifest}: validation rows of modality {val_only}, "
            f"but the training rows of {train_manifest} are {modalities} (that tower would not train)"
        )
    # The tiny LM's tokenizer learns the measurement and diagnosis sentences' words too.
    texts = [r["report"] for r in train_rows] + sorted({r["context"] for r in train_rows if r.get("context")})
    texts += sorted({diagnosis_sentence(r["diagnosis"], r["modality"]) for r in train_rows if r.get("diagnosis")})
    report_model = build_model(config, modalities, texts, ctx)
    for note in report_model.notes:
        print(note)
    transforms = {m: report_model.processor.image_transform(m) for m in modalities}
    train_ds = ReportDataset(train_rows, transforms, train_manifest, config.cache_images)
    val_ds = ReportDataset(val_rows, transforms, config.val_manifest or train_manifest, config.cache_images)

    # Each stage's task goes with its model: QFormerPretraining in stage 1, the report model in stage 2.
    model: QFormerPretraining | Blip2ReportModel
    task: QFormerPretrainingTask | ReportTask
    if config.stage == 1:
        model = QFormerPretraining(report_model, token_cache=TowerTokenCache() if config.cache_tokens else None)
        if config.init_from and not config.resume:
            model.load_heads(config.init_from)
        task = QFormerPretrainingTask()
        # The LM and the projection into it take no part in stage 1.
        unused = {id(p) for p in report_model.language_model.parameters()}
        unused |= {id(p) for p in report_model.bridge.language_projection.parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in unused]
        param_groups = [{"params": trainable, "lr": config.lr, "weight_decay": config.weight_decay, "name": "qformer"}]
    else:
        model = report_model
        task = ReportTask(
            config.num_val_samples,
            generation_settings(config),
            output_dir / "val_samples.json",
            config.use_mixed_precision,
            config.cache_tokens,
            config.diagnosis_loss_weight,
            config.diagnosis_dropout,
        )
        heads = list(model.diagnosis_heads.parameters())
        trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in {id(h) for h in heads}]
        param_groups = [
            {"params": trainable, "lr": config.lr, "weight_decay": config.weight_decay, "name": "report_model"}
        ]
        if heads:
            param_groups.append(
                {
                    "params": heads,
                    "lr": config.diagnosis_lr_ratio * config.lr,
                    "weight_decay": config.weight_decay,
                    "name": "diagnosis_heads",
                }
            )

    def export_best(result: dict[str, Any]) -> dict[str, str]:
        best = output_dir / BEST_CHECKPOINT
        model.load_state_dict(extract_state_dict(load_checkpoint(best, map_location=device), best))
        if isinstance(model, QFormerPretraining):
            model.save_pretrained(output_dir / QFORMER_FOLDER)
            return {"qformer": str(output_dir / QFORMER_FOLDER)}
        model.save_pretrained(output_dir / REPORT_MODEL_FOLDER)
        result["samples"] = generate_samples(model, val_ds, config, device)
        return {"report_model": str(output_dir / REPORT_MODEL_FOLDER)}

    return TrainingRun(
        task,
        model,
        param_groups,
        train_ds,
        val_ds,
        record={"report_model_config": report_model.config.to_dict()},
        checkpoint_extras={"report_model_config": report_model.config.to_dict(), "stage": config.stage},
        collate_fn=ReportCollator(report_model.processor),
        summary_extra={
            "data": {"train_studies": len(train_rows), "val_studies": len(val_rows), "modalities": modalities},
            "trainable_parameters": sum(p.numel() for p in trainable),
        },
        export_best=export_best,
    )


@torch.no_grad()
def generate_samples(
    model: Blip2ReportModel, val_ds: ReportDataset, config: ReportTrainingConfig, device: torch.device
) -> list[dict[str, Any]]:
    """One generated report (and Q-Former attention overlay) for the first validation study of each modality."""
    model.eval()
    samples = []
    for modality in val_ds.modalities:
        first = val_ds[val_ds.group_keys.index(modality)]
        image = first["image"][None].to(device)
        contexts = [first["context"]] if first["context"] else None
        generated = model.generate(image, modality, contexts, **generation_settings(config))[0]
        diagnosis = (
            diagnosis_sentence((model.diagnose(image, modality)[0] >= 0.5).tolist(), modality)
            if config.diagnosis_prompt
            else None
        )
        attention = write_attention_overlays(
            model, image, modality, [first["id"]], Path(config.output_dir) / "attention"
        )
        samples.append(
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
    return samples
