#!/usr/bin/env python
"""Score generated reports against references: caption metrics and clinical efficacy.

    sam3d-report-evaluate --input outputs/blip/test_generations.jsonl \\
        --output_dir outputs/blip/eval --modality xray

Input: CSV or JSONL with columns ``id``, ``reference``, ``generated`` and optionally ``modality``
(``ct`` / ``xray``; rows without it take ``--modality``). Both texts are prepared the same way before
scoring: section headers (``FINDINGS:``/``IMPRESSION:``) are dropped by joining the two sections,
then ``blip.data.normalize_for_metrics`` cleans and lower-cases and removes the de-identification
placeholder, so neither headers nor redactions earn n-gram credit.

Writes to --output_dir:

- ``per_sample.csv``: id, modality, per-report BLEU_4, METEOR (empty when skipped), ROUGE_L, CIDEr,
  the reference and generated labels (JSON), and ``label_agreement``: the share of the modality's
  observations on which the two reports agree (positive = 1 or uncertain, as in clinical efficacy).
- ``summary.json``: n, tokenisation used, corpus BLEU-1..4, METEOR, ROUGE-L, CIDEr (over all rows),
  and clinical efficacy per modality (micro/macro P/R/F1, per observation; CT adds side accuracy).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from blip.data import normalize_for_metrics, split_sections
from blip.data.reports import ReportManifestError, table_rows
from blip.evaluation.labeler import (
    MODALITIES,
    binary_observations,
    clinical_efficacy_from_labels,
    is_positive,
    label_report,
)
from blip.evaluation.metrics import TOKENIZERS, caption_metrics
from ich_engine.cli import console_main
from ich_engine.config import CommandLineParser

REQUIRED_COLUMNS = ("id", "reference", "generated")
PER_SAMPLE_METRICS = ("BLEU_4", "METEOR", "ROUGE_L", "CIDEr")


def prepare_text(text: str) -> str:
    """Report text as scored: sections joined without headers, normalised for metrics."""
    return normalize_for_metrics(" ".join(part for part in split_sections(text) if part))


def read_generations(path: Path, default_modality: str | None) -> list[dict]:
    """Rows ``{id, modality, reference, generated}``; errors name the file, the line and the column."""
    samples = []
    for line, row in table_rows(path):
        missing = [c for c in REQUIRED_COLUMNS if c not in row or row[c] is None]
        if missing:
            raise ReportManifestError(
                f"{path}, line {line}: missing column(s) {missing}; "
                f"expected {list(REQUIRED_COLUMNS)}, found {sorted(row)}"
            )
        modality = str(row.get("modality") or default_modality or "").strip().lower()
        if modality not in MODALITIES:
            raise ReportManifestError(
                f"{path}, line {line}: modality must be one of {MODALITIES} "
                f"(column 'modality' or --modality), found {modality!r}"
            )
        reference = prepare_text(str(row["reference"]))
        if not reference:
            raise ReportManifestError(f"{path}, line {line}: empty reference for id {row['id']!r}")
        samples.append(
            {
                "id": str(row["id"]),
                "modality": modality,
                "reference": reference,
                "generated": prepare_text(str(row["generated"])),
            }
        )
    if not samples:
        raise ReportManifestError(f"{path}: no rows")
    return samples


def label_agreement(reference: dict, generated: dict, modality: str) -> float:
    """Share of binary observations with the same present/absent call in both reports."""
    names = binary_observations(modality)
    return sum(is_positive(reference[n]) == is_positive(generated[n]) for n in names) / len(names)


def evaluate(samples: list[dict], tokenize: str | None, meteor: bool) -> tuple[list[dict], dict]:
    """Per-sample rows and the summary for prepared samples."""
    scores = caption_metrics(
        [s["reference"] for s in samples], [s["generated"] for s in samples], tokenize=tokenize, meteor=meteor
    )
    per_sample: list[dict] = []
    by_modality: dict[str, tuple[list[dict], list[dict]]] = {}  # modality -> (reference, generated) labels
    for i, sample in enumerate(samples):
        modality = sample["modality"]
        reference_labels = label_report(sample["reference"], modality)
        generated_labels = label_report(sample["generated"], modality)
        group = by_modality.setdefault(modality, ([], []))
        group[0].append(reference_labels)
        group[1].append(generated_labels)
        per_sample.append(
            {
                "id": sample["id"],
                "modality": modality,
                **{
                    k: (scores["per_sample"][k][i] if scores["per_sample"][k] is not None else "")
                    for k in PER_SAMPLE_METRICS
                },
                "reference_labels": json.dumps(reference_labels),
                "generated_labels": json.dumps(generated_labels),
                "label_agreement": label_agreement(reference_labels, generated_labels, modality),
            }
        )
    summary = {
        "n": scores["n"],
        "n_empty_generated": scores["n_empty_hypotheses"],
        "tokenize": scores["tokenize"],
        "text_preparation": "sections joined without headers, blip.data.normalize_for_metrics",
        "caption_metrics": scores["corpus"],
        "clinical_efficacy": {
            m: clinical_efficacy_from_labels(refs, gens, m) for m, (refs, gens) in by_modality.items()
        },
    }
    return per_sample, summary


def main(argv=None) -> int:
    p = CommandLineParser(description=__doc__)
    p.add_argument("--input", required=True, help="CSV or JSONL with id, reference, generated[, modality]")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--modality", choices=MODALITIES, default=None, help="for rows without a modality column")
    p.add_argument(
        "--tokenize",
        choices=TOKENIZERS,
        default=None,
        help="default: ptb when Java is available, else simple (see blip.evaluation.metrics)",
    )
    p.add_argument("--no_meteor", action="store_true", help="skip METEOR (it needs Java and ~20 s to start)")
    args = p.parse_args(argv)

    if not Path(args.input).is_file():
        p.error(f"--input {args.input}: file not found")
    samples = read_generations(Path(args.input), args.modality)  # a bad row: one line through run_main
    per_sample, summary = evaluate(samples, args.tokenize, meteor=not args.no_meteor)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "per_sample.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(per_sample[0]))
        writer.writeheader()
        writer.writerows(per_sample)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    corpus = summary["caption_metrics"]
    print(
        f"n={summary['n']} tokenize={summary['tokenize']} "
        + " ".join(f"{k}={v:.4f}" for k, v in corpus.items() if v is not None)
    )
    for modality, ce in summary["clinical_efficacy"].items():
        print(f"clinical efficacy ({modality}): micro F1={ce['micro']['f1']:.4f} macro F1={ce['macro']['f1']:.4f}")
    return 0


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
