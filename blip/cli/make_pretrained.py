#!/usr/bin/env python
"""Make the embedded default's pretrained stand-ins, the way users start from released weights:

- ``sam3d``: the stand-in for ``sam_med3d_turbo.pth``: the ``small`` SAM-Med3D trained from scratch by
  this project's ``train.py`` on synthetic head CTs of a seed no demo uses, saved in fp16 in the
  official checkpoint layout (``model_state_dict``) plus its config and preprocessing contract.
- ``lm``: the stand-in for a pretrained causal LM: a small GPT-2 with a word-level tokenizer, trained
  text-only on a large corpus of synthetic reports (they cost nothing to write), saved as a Hugging
  Face folder.
- ``qformer``: the stand-in for a released stage-1 Q-Former (BLIP-2's is pre-trained on image-text
  pairs): BLIP-2 stage 1 (``sam3d-report-train --stage 1``) on the pre-training phantoms and their reports,
  reading the ``sam3d`` stand-in's encoder, with the ``lm`` stand-in's tokenizer (run it after both).

All land in ``sam3d/pretrained/`` and are committed; ``make demo`` fine-tunes from them.

    sam3d-make-pretrained --part sam3d
    sam3d-make-pretrained --part lm
    sam3d-make-pretrained --part qformer
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from blip.training.train import ReportTrainingConfig
from blip.training.train import run_training as run_report_training
from ich_engine.checkpoint import atomic_write, load_checkpoint
from ich_engine.cli import console_main
from ich_engine.config import CommandLineParser
from sam3d import CONFIG_DIR, PRETRAINED_DIR
from sam3d.data.synthetic import make_synthetic_ich
from sam3d.training import SegmentationTrainingConfig
from sam3d.training import run_training as run_segmentation_training

SAM3D_WEIGHTS = "sam_med3d_small_ich.pth"
REPORT_LM = "report_lm"
QFORMER = "qformer"
PRETRAIN_SEED = 1000  # the demo's seeds are small integers: its scans are never these


def pretraining_data(work: Path, num_cases: int, seed: int) -> dict:
    """The pre-training phantoms (16 of them for validation), rendered once per (cases, seed)."""
    folder = work / f"data_{num_cases}_seed{seed}"
    if (folder / "cases.json").is_file():  # written last by make_synthetic_ich
        names = ("train_csv", "val_csv", "mask_dir", "cases_json")
        return dict(zip(names, (str(folder / n) for n in ("train.csv", "val.csv", "masks", "cases.json"))))
    return make_synthetic_ich(folder, num_cases=num_cases, seed=seed, val_fraction=16 / num_cases)


# Real anatomy (sam3d.data.template_phantom): half with 5 mm slices, half with 2 mm, 0.9 mm in plane
# (the model reads them at 2 mm); seeds of their own.
TEMPLATE_SLICES_MM = (5.0, 2.0)


def with_template_phantoms(work: Path, data: dict, template_cases: int, seed: int) -> dict:
    """The geometric pre-training phantoms' train.csv plus ``template_cases`` phantoms on the average
    real head, in one manifest with a 'mask' column (both sets name their scans case_000...)."""
    folder = work / f"mixed_{Path(data['train_csv']).parent.name}_template{template_cases}"
    train_csv = folder / "train.csv"
    if train_csv.is_file():
        return {**data, "train_csv": str(train_csv)}
    rows = []
    geometric = Path(data["train_csv"]).parent.resolve()  # the manifest lives elsewhere: absolute paths
    with open(data["train_csv"], newline="") as handle:
        for row in csv.DictReader(handle):
            mask = geometric / "masks" / Path(row["path"]).name
            rows.append((str(geometric / row["path"]), row["ich"], row["patient_id"], str(mask)))
    for number, slice_mm in enumerate(TEMPLATE_SLICES_MM):
        count = template_cases // len(TEMPLATE_SLICES_MM)
        part = (folder / f"template_{slice_mm:g}mm").resolve()
        make_synthetic_ich(
            part,
            num_cases=count,
            seed=seed + 1 + number,
            val_fraction=1 / count,
            spacing_mm=(0.9, 0.9, slice_mm),
            anatomy="template",
            progress=False,
        )
        for name in ("train.csv", "val.csv"):  # every template phantom trains; validation stays geometric
            with open(part / name, newline="") as handle:
                for row in csv.DictReader(handle):
                    patient = f"T{slice_mm:g}{row['patient_id']}"
                    rows.append(
                        (str(part / row["path"]), row["ich"], patient, str(part / "masks" / Path(row["path"]).name))
                    )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("path", "ich", "patient_id", "mask"))
    writer.writerows(rows)
    atomic_write(train_csv, lambda tmp: tmp.write_text(buffer.getvalue()))
    return {**data, "train_csv": str(train_csv)}


def make_sam3d(work: Path, num_cases: int, seed: int, epochs: int | None, out: Path, template_cases: int) -> Path:
    started = time.time()
    data = pretraining_data(work, num_cases, seed)
    if template_cases:
        data = with_template_phantoms(work, data, template_cases, seed)
    config = SegmentationTrainingConfig.from_yaml(
        CONFIG_DIR / "sam3d_small_pretrain.yaml",
        train_csv=data["train_csv"],
        val_csv=data["val_csv"],
        mask_dir=data["mask_dir"],
        output_dir=str(work / "sam3d"),
        cache_dir=str(work / "cache"),
        seed=seed,
        **({"epochs": epochs} if epochs is not None else {}),
    )
    result = run_segmentation_training(config)
    best = load_checkpoint(result["outputs"]["best_model"])
    payload = {
        "model_state_dict": {k: v.half() if v.is_floating_point() else v for k, v in best["model_state_dict"].items()},
        "model_type": best["model_type"],
        "model_config": best["model_config"],
        "preprocessing": best["preprocessing"],
        "recipe": {
            "command": "sam3d-make-pretrained --part sam3d",
            "num_cases": num_cases,
            "template_cases": template_cases,
            "template_slices_mm": list(TEMPLATE_SLICES_MM),
            "seed": seed,
            "epochs": config.epochs,
            "best_epoch": result["best_epoch"],
            "best_val_dice": round(float(result["best_metric"]), 4),
            "minutes": round((time.time() - started) / 60, 1),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / SAM3D_WEIGHTS, lambda tmp: torch.save(payload, tmp))
    print(json.dumps(payload["recipe"]))
    return out / SAM3D_WEIGHTS


def make_lm(work: Path, num_cases: int, seed: int, variants: int, epochs: int | None, out: Path) -> Path:
    """Reports for the metadata of the pre-training phantoms (no image is rendered for the extra
    variants): ``variants`` per case, the last 16 cases' for validation."""
    from blip.training.lm_pretraining import pretrain_report_lm
    from sam3d.data.synthetic_reports import report_corpus

    data = pretraining_data(work, num_cases, seed)
    cases = json.loads(Path(data["cases_json"]).read_text())
    train_rows = report_corpus([c for c in cases if c["split"] == "train"], variants, seed)
    val_rows = report_corpus([c for c in cases if c["split"] == "val"], 4, seed + 1)
    epochs = epochs or 4
    result = pretrain_report_lm(train_rows, val_rows, out / REPORT_LM, work / "lm", epochs=epochs, seed=seed)
    recipe = {
        "command": "sam3d-make-pretrained --part lm",
        "num_cases": num_cases,
        "seed": seed,
        "variants": variants,
        "epochs": epochs,
        "reports": len(train_rows),
        "best_epoch": result["best_epoch"],
        "best_val_loss": round(float(result["best_metric"]), 4),
    }
    (out / REPORT_LM / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(json.dumps(recipe))
    return out / REPORT_LM


def make_qformer(work: Path, num_cases: int, seed: int, epochs: int | None, out: Path) -> Path:
    from sam3d.export import export_encoder
    from sam3d.modeling import load_trained_sam3d

    data = pretraining_data(work, num_cases, seed)
    model, meta = load_trained_sam3d(out / SAM3D_WEIGHTS)
    encoder = work / "sam_encoder.pth"
    export_encoder(model.float(), encoder, model.config, preprocessing=meta["preprocessing"])
    folder = Path(data["cases_json"]).parent
    epochs = epochs or 40
    config = ReportTrainingConfig.from_yaml(
        CONFIG_DIR / "blip_tiny_ct.yaml",
        stage=1,
        epochs=epochs,
        lr=1e-3,
        train_manifest=str(folder / "reports_train.jsonl"),
        val_manifest=str(folder / "reports_val.jsonl"),
        encoder=str(encoder),
        lm=str(out / REPORT_LM),
        output_dir=str(work / "qformer"),
        seed=seed,
    )
    result = run_report_training(config)
    shutil.rmtree(out / QFORMER, ignore_errors=True)
    shutil.copytree(result["outputs"]["qformer"], out / QFORMER)
    best = result["history"][result["best_epoch"] - 1]
    recipe = {
        "command": "sam3d-make-pretrained --part qformer",
        "num_cases": num_cases,
        "seed": seed,
        "epochs": epochs,
        "best_epoch": result["best_epoch"],
        **{k: round(float(v), 4) for k, v in best.items() if k.startswith("val_")},
    }
    (out / QFORMER / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(json.dumps(recipe))
    return out / QFORMER


def main(argv=None) -> int:
    p = CommandLineParser(description=__doc__)
    p.add_argument("--part", choices=["sam3d", "lm", "qformer"], required=True)
    p.add_argument("--work_dir", default="outputs/pretrain", help="phantoms, training runs")
    p.add_argument("--output_dir", default=str(PRETRAINED_DIR), help="where the weights go (the package's by default)")
    p.add_argument("--num_cases", type=int, default=240)
    p.add_argument("--seed", type=int, default=PRETRAIN_SEED)
    p.add_argument(
        "--epochs", type=int, help="override the config's epochs (sam3d) or the defaults: 4 (lm), 40 (qformer)"
    )
    p.add_argument("--variants", type=int, default=25, help="lm: reports per pre-training case")
    p.add_argument(
        "--template_cases",
        type=int,
        default=0,
        help="sam3d: phantoms on the average real head CT added to the training set (0, the committed "
        "stand-in's recipe: geometric only)",
    )
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    work = Path(args.work_dir)
    if args.part == "sam3d":
        print(make_sam3d(work, args.num_cases, args.seed, args.epochs, Path(args.output_dir), args.template_cases))
    elif args.part == "lm":
        print(make_lm(work, args.num_cases, args.seed, args.variants, args.epochs, Path(args.output_dir)))
    else:
        print(make_qformer(work, args.num_cases, args.seed, args.epochs, Path(args.output_dir)))
    return 0


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
