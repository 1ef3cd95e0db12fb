#!/usr/bin/env python
"""Measure the rule-based chest labeler against the human MeSH labels of the IU X-ray reports.

    sam3d-labeler-agreement --reports ../shared/data/iu_xray/indiana_reports.csv \\
        --output outputs/labeler_agreement.json

The labeler reads findings + impression; the human reference is the report's ``MeSH`` field
(``;``-separated terms, each ``Heading/qualifier/...``). Which headings count as which CheXpert
observation is the table ``MESH_TO_OBSERVATION`` below (a term matches on its heading, and, where a
qualifier is given, only when that qualifier is among the term's qualifiers). Reports without
findings and impression are left out. The labeler counts as positive on 1 or -1 (uncertain as
positive, as in clinical efficacy); ``f1_certain_only`` counts only 1, because the human indexers
mostly leave hedged findings ("may represent pneumonia") unlabelled. Prints a Markdown table and
writes it as ``.md`` beside the JSON.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from blip.evaluation.labeler import is_positive, label_chest_report
from ich_engine.cli import console_main
from ich_engine.config import CommandLineParser

# observation -> (MeSH heading, required qualifier or None). Choices, and why:
# Edema includes Pulmonary Congestion (CheXpert's Edema mentions include vascular congestion);
# Lung Opacity is the opacity-type headings (Opacity, Infiltrate, Airspace Disease, Density);
# Lung Lesion is Nodule and Mass (Calcified Granuloma stays out: CheXpert does not label granulomas);
# Enlarged Cardiomediastinum is Mediastinum/enlarged or /prominent; Pleural Other is pleural Thickening
# or Cicatrix (scar); Support Devices are the device headings; No Finding is MeSH "normal".
MESH_TO_OBSERVATION: dict[str, list[tuple[str, str | None]]] = {
    "No Finding": [("normal", None)],
    "Enlarged Cardiomediastinum": [("Mediastinum", "enlarged"), ("Mediastinum", "prominent")],
    "Cardiomegaly": [("Cardiomegaly", None)],
    "Lung Opacity": [("Opacity", None), ("Infiltrate", None), ("Airspace Disease", None), ("Density", None)],
    "Lung Lesion": [("Nodule", None), ("Mass", None)],
    "Edema": [("Pulmonary Edema", None), ("Pulmonary Congestion", None)],
    "Consolidation": [("Consolidation", None)],
    "Pneumonia": [("Pneumonia", None)],
    "Atelectasis": [("Pulmonary Atelectasis", None)],
    "Pneumothorax": [("Pneumothorax", None), ("Hydropneumothorax", None), ("Hemopneumothorax", None)],
    "Pleural Effusion": [("Pleural Effusion", None), ("Hydropneumothorax", None)],
    "Pleural Other": [("Thickening", "pleura"), ("Cicatrix", "pleura")],
    "Fracture": [("Fractures, Bone", None)],
    "Support Devices": [
        ("Catheters, Indwelling", None),
        ("Implanted Medical Device", None),
        ("Medical Device", None),
        ("Tube, Inserted", None),
        ("Stents", None),
        ("Surgical Instruments", None),
    ],
}


def human_labels(mesh: str) -> dict[str, bool]:
    """Observation -> positive, from one report's MeSH field."""
    terms = [[part.strip().lower() for part in term.split("/")] for term in mesh.split(";") if term.strip()]
    return {
        obs: any(
            t[0] == heading.lower() and (qualifier is None or qualifier in t[1:])
            for t in terms
            for heading, qualifier in rules
        )
        for obs, rules in MESH_TO_OBSERVATION.items()
    }


def agreement(human: list[bool], labeler: list[bool]) -> dict:
    """Counts, precision/recall/F1 of the labeler vs human, raw agreement and Cohen's kappa."""
    n = len(human)
    tp = sum(h and x for h, x in zip(human, labeler))
    fp = sum(x and not h for h, x in zip(human, labeler))
    fn = sum(h and not x for h, x in zip(human, labeler))
    tn = n - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    observed = (tp + tn) / n
    expected = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / (n * n)
    kappa = (observed - expected) / (1 - expected) if expected < 1 else 1.0
    return {
        "n_human_positive": tp + fn,
        "n_labeler_positive": tp + fp,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "agreement": observed,
        "kappa": kappa,
    }


def measure(reports_csv: Path) -> dict:
    """Agreement per observation over the reports in ``reports_csv`` that have text."""
    with open(reports_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = {"MeSH", "findings", "impression"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{reports_csv}: missing columns {sorted(missing)}")
    human: dict[str, list[bool]] = {obs: [] for obs in MESH_TO_OBSERVATION}
    labeler: dict[str, list[bool]] = {obs: [] for obs in MESH_TO_OBSERVATION}
    certain: dict[str, list[bool]] = {obs: [] for obs in MESH_TO_OBSERVATION}  # uncertain mentions negative
    for row in rows:
        text = " ".join(part for part in (row["findings"], row["impression"]) if part)
        if not text.strip():
            continue
        truth, predicted = human_labels(row["MeSH"]), label_chest_report(text)
        for obs in MESH_TO_OBSERVATION:
            human[obs].append(truth[obs])
            labeler[obs].append(is_positive(predicted[obs]))
            certain[obs].append(is_positive(predicted[obs], uncertain_as_positive=False))
    n = len(human["No Finding"])
    return {
        "reports": n,
        "source": str(reports_csv),
        "observations": {
            obs: {**agreement(human[obs], labeler[obs]), "f1_certain_only": agreement(human[obs], certain[obs])["f1"]}
            for obs in MESH_TO_OBSERVATION
        },
    }


def markdown_table(result: dict) -> str:
    lines = [
        f"Rule-based labeler vs IU X-ray MeSH labels ({result['reports']} reports; uncertain counted positive)",
        "",
        "| observation | n human+ | n labeler+ | precision | recall | F1 | agreement | kappa | F1 certain only |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for obs, m in result["observations"].items():
        lines.append(
            f"| {obs} | {m['n_human_positive']} | {m['n_labeler_positive']} | {m['precision']:.3f} | "
            f"{m['recall']:.3f} | {m['f1']:.3f} | {m['agreement']:.3f} | {m['kappa']:.3f} | "
            f"{m['f1_certain_only']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = CommandLineParser(description=__doc__)
    p.add_argument("--reports", required=True, help="indiana_reports.csv")
    p.add_argument("--output", required=True, help="JSON path; the Markdown table goes beside it (.md)")
    args = p.parse_args(argv)
    result = measure(Path(args.reports))
    table = markdown_table(result)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2), encoding="utf-8")
    output.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
