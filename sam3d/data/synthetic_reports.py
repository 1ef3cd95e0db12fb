"""Radiology reports for the synthetic head-CT phantoms, written from their ground truth only.

Why: report generation needs (image, report) pairs whose every statement is true of the image, so
that a model trained on the phantoms can be scored by a rule-based labeler against the generator's
labels. Each statement has several phrasings drawn from a seeded generator, so a model cannot pass
by memorising one sentence per label, yet the same case always gets the same report.

Rules that keep the labels recoverable by a sentence-level labeler:

- a positive report names the hemorrhage type in radiologists' words (intraparenchymal hematoma or
  hemorrhage, acute subdural hematoma, intraventricular hemorrhage) with its patient side and region
  in the SAME sentence, in both findings and impression, and never mentions another type;
- midline shift has its own sentence: its direction ("leftward") is away from the bleed, so it names
  the opposite side, which must not be read as the bleed's side;
- absent features are stated with "No"/"without" (no midline shift, no mass effect, no
  hydrocephalus); a negative study always has the impression "No acute intracranial hemorrhage.".

Sizes are the generator's measurements: volume (mL) from the mask, midline shift and subdural
thickness (mm) from the lesion model, all in the (possibly miniature) phantom's millimetres.
"""

from __future__ import annotations

import numpy as np

__all__ = ["REPORT_MANIFEST_LABELS", "report_corpus", "report_manifest_row", "write_ct_report"]

# Label columns of cases.json copied into each report-manifest row, so report metrics and the
# labeler can be checked against ground truth without re-reading cases.json.
REPORT_MANIFEST_LABELS = (
    "patient_id",
    "ich",
    "ich_type",
    "side",
    "region",
    "volume_ml",
    "midline_shift_mm",
    "mass_effect",
    "oedema",
    "hydrocephalus",
    "mask_path",
)

_TYPE_WORDS = {  # (adjectives, nouns): "acute subdural hematoma" is the term; IPH/IVH may omit "acute"
    "intraparenchymal": (("", "acute "), ("intraparenchymal hematoma", "intraparenchymal hemorrhage")),
    "subdural": (("acute ",), ("subdural hematoma",)),
    "intraventricular": (("", "acute "), ("intraventricular hemorrhage",)),
    "epidural": (("acute ",), ("epidural hematoma",)),
    "subarachnoid": (("", "acute "), ("subarachnoid hemorrhage",)),
}
_LOBES = ("frontal", "parietal", "temporal", "occipital")
_SIDES = {
    "intraparenchymal": ("left", "right"),
    "subdural": ("left", "right"),
    "intraventricular": ("left", "right", "bilateral"),
    "epidural": ("left", "right"),
    "subarachnoid": ("left", "right"),
}
_AWAY = {"left": "rightward ", "right": "leftward "}  # shift direction, away from the bleed

_NEGATIVE_FINDINGS = (
    (
        "There is no acute intracranial hemorrhage.",
        "No intracranial hemorrhage is identified.",
        "No intra-axial or extra-axial hemorrhage is seen.",
    ),
    (
        "The ventricles are normal in size.",
        "The ventricles and sulci are normal in size and configuration.",
        "The ventricular system is normal in size without hydrocephalus.",
    ),
    (
        "There is no mass effect or midline shift.",
        "No mass effect or midline shift.",
        "Midline structures are centered, with no mass effect or midline shift.",
    ),
    (
        "Gray-white matter differentiation is preserved.",
        "Grey-white differentiation is preserved.",
        "The gray-white matter junction is maintained.",
    ),
)
_NEGATIVE_IMPRESSION_TAIL = ("", "No mass effect or midline shift.", "Normal noncontrast CT of the head.")
_CALVARIUM = (
    "The calvarium is intact.",
    "No calvarial fracture is seen.",
    "The visualized osseous structures are unremarkable.",
)
_NO_MASS_EFFECT_NO_SHIFT = (
    "No significant mass effect or midline shift.",
    "There is no mass effect or midline shift.",
    "No mass effect; midline structures are centered without midline shift.",
)
_MASS_EFFECT_NO_SHIFT = (
    "There is local mass effect without midline shift.",
    "Mild local mass effect is present, without midline shift.",
)
_SHIFT = (
    "There is associated mass effect with {mm} mm of {direction}midline shift.",
    "Mass effect results in {mm} mm {direction}midline shift.",
    "Associated mass effect with effacement of the ipsilateral lateral ventricle and {mm} mm {direction}midline shift.",
    "Mass effect causes {direction}midline shift of {mm} mm.",
)
_SHIFT_IMPRESSION = ("Mass effect with {mm} mm {direction}midline shift.", "{mm} mm {direction}midline shift.")
_OEDEMA = (
    "There is surrounding perihematomal edema.",
    "A rim of low-attenuation perihematomal edema surrounds the hematoma.",
    "Mild surrounding edema is present.",
)
_NO_OEDEMA = ("No significant perihematomal edema.", "There is no appreciable surrounding edema.")
_HYDROCEPHALUS = (
    "The ventricles are enlarged, consistent with hydrocephalus.",
    "Ventricular enlargement is compatible with acute hydrocephalus.",
    "There is associated hydrocephalus with dilatation of the lateral and third ventricles.",
)
_NO_HYDROCEPHALUS = (
    "No hydrocephalus.",
    "There is no hydrocephalus.",
    "Ventricular size is not enlarged; no hydrocephalus.",
)
_GRAY_WHITE_ELSEWHERE = (
    "Gray-white matter differentiation is otherwise preserved.",
    "Grey-white differentiation is preserved elsewhere.",
    "",
)

_MAIN = {
    "intraparenchymal": (
        "There is {a_type} {preposition} the {location}, measuring approximately {volume} mL.",
        "A hyperdense {type} is seen {preposition} the {location}, with an estimated volume of approximately {volume} mL.",
        "{A_type} {preposition} the {location} measures approximately {volume} mL.",
    ),
    "subdural": (
        "There is {a_type} along the {location}, measuring up to {thickness} mm in thickness and approximately {volume} mL in volume.",
        "A crescentic hyperdense extra-axial collection along the {location} represents {a_type}, approximately {volume} mL, with a maximal thickness of {thickness} mm.",
        "{A_type} overlies the {location}, with a maximal thickness of {thickness} mm and an estimated volume of approximately {volume} mL.",
    ),
    "intraventricular": (
        "There is {type} layering {preposition} the {location}, approximately {volume} mL.",
        "Hyperdense blood is present {preposition} the {location}, consistent with {type}, approximately {volume} mL.",
        "{Type} is seen {preposition} the {location}, with an estimated volume of approximately {volume} mL.",
    ),
    "epidural": (
        "There is {a_type} along the {location}, a biconvex extra-axial collection of approximately {volume} mL.",
        "A lentiform hyperdense extra-axial collection along the {location} represents {a_type}, approximately {volume} mL.",
    ),
    "subarachnoid": (
        "There is {type} {preposition} the {location}, approximately {volume} mL.",
        "Hyperdense blood is seen {preposition} the {location}, consistent with {type}, approximately {volume} mL.",
    ),
}
_PREPOSITIONS = {
    "intraparenchymal": ("in", "within", "centered in"),
    "subdural": ("along",),
    "intraventricular": ("in", "within"),
    "epidural": ("along",),
    "subarachnoid": ("in", "within"),
}
_MAIN_IMPRESSION = (
    "{Type} {preposition} the {location}, approximately {volume} mL.",
    "{Adjective_location} {noun} (approximately {volume} mL).",
)


def _number(value: float, integer_from: float) -> str:
    """Millilitres or millimetres as a radiologist writes them: whole numbers from ``integer_from``
    up, one decimal below it (small miniature-phantom values would otherwise read as 0)."""
    if value >= integer_from:
        return f"{value:.0f}"
    return f"{value:.1f}".removesuffix(".0")


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _capitalise(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _location(ich_type: str, side: str, region: str, rng) -> tuple[str, str]:
    """(location after "the", its adjective form for "left frontal ...") on the patient's side."""
    if ich_type == "subdural":
        noun = str(rng.choice(("cerebral convexity", "convexity", "cerebral hemispheric convexity")))
        return f"{side} {noun}", f"{side} convexity"
    if ich_type == "intraventricular":
        if side == "bilateral":
            options = ("lateral ventricles bilaterally", "occipital horns of the lateral ventricles bilaterally")
        else:
            options = (f"{side} lateral ventricle", f"occipital horn of the {side} lateral ventricle")
        return str(rng.choice(options)), side
    if ich_type == "epidural":
        return f"{side} convexity", f"{side} convexity"
    if ich_type == "subarachnoid":
        where = "Sylvian fissure" if region == "sylvian fissure" else "convexity sulci"
        return f"{side} {where}", f"{side} {where}"
    if region in _LOBES:
        return f"{side} {region} lobe", f"{side} {region}"
    return f"{side} {region}", f"{side} {region}"


def _check(metadata: dict) -> None:
    missing = [
        k for k in ("ich_type", "side", "region", "volume_ml", "midline_shift_mm", "mass_effect") if k not in metadata
    ]
    if missing:
        raise ValueError(f"case {metadata.get('case_id', '?')}: metadata lacks {missing}, found {sorted(metadata)}")
    kind, side = metadata["ich_type"], metadata["side"]
    if kind != "none" and kind not in _TYPE_WORDS:
        raise ValueError(
            f"case {metadata.get('case_id', '?')}: unknown ich_type {kind!r}, expected 'none' or one of {tuple(_TYPE_WORDS)}"
        )
    if kind != "none" and side not in _SIDES[kind]:
        raise ValueError(
            f"case {metadata.get('case_id', '?')}: side {side!r} is not valid for {kind}, expected one of {_SIDES[kind]}"
        )
    if kind == "subdural" and not metadata.get("max_thickness_mm"):
        raise ValueError(f"case {metadata.get('case_id', '?')}: a subdural hematoma needs max_thickness_mm")


def write_ct_report(metadata: dict, rng: np.random.Generator) -> dict:
    """A findings + impression report for one phantom, from its ``cases.json`` metadata.

    ``metadata`` needs ``ich_type`` ('none' or a kind of ``ICH_TYPES``), ``side``, ``region``,
    ``volume_ml``, ``midline_shift_mm``, ``mass_effect``; ``oedema``, ``hydrocephalus`` and
    ``max_thickness_mm`` are used when present. ``rng`` picks the phrasings; the same metadata and
    generator state give the same text.

    Returns ``{'report', 'findings', 'impression'}``; ``report`` is
    ``"FINDINGS: <findings> IMPRESSION: <impression>"``, the canonical target format of
    ``blip.data.reports.join_sections`` (spelled out here because ``sam3d`` never imports ``blip``).
    Raises ValueError for missing keys, an unknown type or a side the type cannot have.
    """
    _check(metadata)

    def choose(options) -> str:
        return str(rng.choice(options))

    kind = metadata["ich_type"]
    if kind == "none":
        findings = [choose(options) for options in _NEGATIVE_FINDINGS] + [choose(_CALVARIUM)]
        impression = ["No acute intracranial hemorrhage.", choose(_NEGATIVE_IMPRESSION_TAIL)]
        return _assemble(findings, impression)

    side, region = metadata["side"], metadata["region"]
    adjectives, nouns = _TYPE_WORDS[kind]
    adjective, noun = choose(adjectives), choose(nouns)
    type_phrase = adjective + noun
    location, location_adjective = _location(kind, side, region, rng)
    words = {
        "type": type_phrase,
        "Type": _capitalise(type_phrase),
        "noun": noun,
        "a_type": _article(type_phrase),
        "A_type": _capitalise(_article(type_phrase)),
        "preposition": choose(_PREPOSITIONS[kind]),
        "location": location,
        "Adjective_location": _capitalise(adjective + location_adjective),
        "volume": _number(float(metadata["volume_ml"]), 10.0),
        "thickness": _number(float(metadata.get("max_thickness_mm") or 0.0), 10.0),
    }
    findings = [choose(_MAIN[kind]).format(**words)]
    impression = [choose(_MAIN_IMPRESSION).format(**words)]

    if kind == "intraparenchymal":
        findings.append(choose(_OEDEMA if metadata.get("oedema") else _NO_OEDEMA))
    shift_mm = float(metadata["midline_shift_mm"])
    if shift_mm > 0:
        shift = {"mm": _number(shift_mm, 10.0), "direction": _AWAY.get(side, "")}
        findings.append(choose(_SHIFT).format(**shift))
        impression.append(_capitalise(choose(_SHIFT_IMPRESSION).format(**shift)))
    elif metadata["mass_effect"]:
        findings.append(choose(_MASS_EFFECT_NO_SHIFT))
    else:
        findings.append(choose(_NO_MASS_EFFECT_NO_SHIFT))
    if metadata.get("hydrocephalus"):
        findings.append(choose(_HYDROCEPHALUS))
        impression.append("Associated hydrocephalus.")
    else:
        findings.append(choose(_NO_HYDROCEPHALUS))
    findings += [choose(_GRAY_WHITE_ELSEWHERE), choose(_CALVARIUM)]
    return _assemble(findings, impression)


def _assemble(findings: list[str], impression: list[str]) -> dict:
    findings_text = " ".join(s for s in findings if s)
    impression_text = " ".join(s for s in impression if s)
    return {
        "report": f"FINDINGS: {findings_text} IMPRESSION: {impression_text}",
        "findings": findings_text,
        "impression": impression_text,
    }


def report_manifest_row(case: dict) -> dict:
    """One JSONL row of a report manifest (the format ``blip.data.reports.read_report_manifest``
    reads) for a ``cases.json`` entry that has its report, ``path`` and ``split``.

    ``image`` stays relative to the dataset folder, where the manifests are written, so the folder
    can be moved as a whole.
    """
    row = {
        "image": case["path"],
        "report": case["report"],
        "findings": case["findings"],
        "impression": case["impression"],
        "modality": "ct",
        "split": case["split"],
        "id": case["case_id"],
    }
    row.update({key: case[key] for key in REPORT_MANIFEST_LABELS if key in case})
    return row


def report_corpus(cases: list[dict], variants: int, seed: int) -> list[dict]:
    """Text-only training data for a report language model: ``variants`` reports per case of
    ``cases`` (``cases.json`` entries), each with fresh phrasings and the case's sizes scaled by a
    random factor (volume 0.25-4x, shift and thickness 0.5-2x), so that a model learns to write any
    size it is given rather than the few it saw. Returns ``{'report', 'volume_ml', 'side', 'ich_type'}``
    rows; ``volume_ml`` is the report's own (0 for a negative study)."""
    rng = np.random.default_rng(seed)
    rows = []
    for case in cases:
        for _ in range(variants):
            metadata = dict(case)
            if case["ich_type"] != "none":
                metadata["volume_ml"] = round(max(0.5, float(case["volume_ml"]) * 4.0 ** rng.uniform(-1, 1)), 1)
                for key in ("midline_shift_mm", "max_thickness_mm"):
                    if metadata.get(key):
                        metadata[key] = round(float(case[key]) * 2.0 ** rng.uniform(-1, 1), 1)
            report = write_ct_report(metadata, rng)["report"]
            rows.append(
                {
                    "report": report,
                    "volume_ml": metadata["volume_ml"] if case["ich_type"] != "none" else 0.0,
                    "side": case["side"] if case["ich_type"] != "none" else "none",
                    "ich_type": case["ich_type"],
                }
            )
    return rows
