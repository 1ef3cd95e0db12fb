"""Diagnosis-driven prompts: the report model names its findings before it writes about them.

A report model built with ``diagnosis_prompt`` has a classification head on the Q-Former output (mean
of the query tokens) that predicts the labeler's present/absent observations of the modality
(``blip.labeler.binary_observations``: hemorrhage, its subtypes, midline shift and mass effect for head
CT; the 14 CheXpert observations for chest X-rays). The positive ones become a sentence in front of
the prompt — ``[queries] "Diagnosis: hemorrhage, subdural, mass effect. Head CT report:" [report]`` —
which is PromptMRG's idea (Jin et al., AAAI 2024) with the labels spelled as words, so any causal LM
reads them without new tokens.

Why: the language-model loss spreads the image's signal over every report token, and a small LM fits
the training text's prior ("There is ...") before it learns to read the queries. Measured on synthetic
CT with a fixed segmentation-trained encoder, the Q-Former output of a stage-2 model separated
hemorrhage / no hemorrhage (linear probe 0.85 on held-out scans) while its greedy reports said
"hematoma" for every scan. The head's binary cross-entropy is a direct signal for that decision.

Training: the head is trained on labels read from each training report by ``blip.labeler`` (uncertain
counts as present, as in clinical efficacy; not mentioned as absent), and the LM reads the sentence made
from those reference labels (teacher forcing). Generation: the sentence is made from the head's own
prediction (probability >= 0.5), or from labels the caller passes (a radiologist's, another classifier's).
"""

from __future__ import annotations

from collections.abc import Sequence

from .labeler import binary_observations, is_positive, label_report

# Words for the observations in the sentence; others are written lower-case as named.
OBSERVATION_WORDS = {
    "IPH": "intraparenchymal", "IVH": "intraventricular", "SAH": "subarachnoid", "SDH": "subdural",
    "EDH": "epidural", "midline_shift": "midline shift", "mass_effect": "mass effect",
}
# What the sentence says when nothing is present.
NOTHING_PRESENT = {"ct": "no hemorrhage", "xray": "no finding"}


def reference_diagnosis(report: str, modality: str) -> list[float]:
    """1.0 / 0.0 per ``binary_observations(modality)``, read from ``report`` by the labeler."""
    labels = label_report(report, modality)
    return [float(is_positive(labels[name])) for name in binary_observations(modality)]


def diagnosis_sentence(present: Sequence[bool], modality: str) -> str:
    """"Diagnosis: <present observations>." in ``binary_observations`` order, or the modality's
    nothing-present words. X-ray's "No Finding" is implied by an empty list, so it is not spelled."""
    names = binary_observations(modality)
    if len(present) != len(names):
        raise ValueError(f"{len(present)} diagnosis labels for {modality}, expected {len(names)} ({', '.join(names)})")
    words = [OBSERVATION_WORDS.get(name, name.lower()) for name, on in zip(names, present)
             if on and name != "No Finding"]
    return f"Diagnosis: {', '.join(words) if words else NOTHING_PRESENT[modality]}."
