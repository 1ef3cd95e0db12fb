"""Rule-based findings labeler for chest X-ray and head CT reports, and the clinical-efficacy metric.

Report-generation papers score clinical correctness by labelling the reference and the generated
report with the same labeler and comparing the labels (R2GenGPT's "clinical efficacy", from the
CheXpert labeler). The CheXpert/CheXbert labelers need model weights or a Java NLP stack that cannot
be fetched here, so this module implements the CheXpert recipe with regular expressions:

1. mention extraction: per observation, phrases from CheXpert's mention lists (trimmed where a
   bare word such as "line" or "collapse" would fire on unrelated text);
2. negation and uncertainty detection, NegEx style: trigger phrases that act forward ("no",
   "possible") up to the end of the sentence or a scope terminator ("but", "however", "which", ...),
   or backward ("has resolved", "cannot be excluded") back to the start of the clause;
   double-negative uncertainty phrases ("cannot be excluded", "not ruled out") are found first and
   hidden from negation, so they stay uncertain, as CheXpert's pre-negation uncertainty rules do;
3. aggregation per observation over all mentions: positive beats uncertain beats negative
   (CheXpert's order), ``None`` when never mentioned. "No Finding" is 1 when no pathology (all
   observations except Support Devices) is positive or uncertain, else ``None``, as in CheXpert.

Labels: 1 positive, 0 negative, -1 uncertain, ``None`` not mentioned.

Head CT uses the same machinery for hemorrhage, its subtypes (IPH, IVH, SAH, SDH, EDH), midline
shift and mass effect; the side of the hemorrhage is read from the sentences with a positive or
uncertain hemorrhage mention.

Clinical efficacy (:func:`clinical_efficacy`) binarises labels with uncertain counted as positive
(``uncertain_as_positive=True``, the usual choice for CheXpert-based CE: a hedged finding is still a
finding a reader acts on); pass ``False`` to count only certain positives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1

CHEXPERT_OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
CT_SUBTYPES = ("IPH", "IVH", "SAH", "SDH", "EDH")
CT_FINDINGS = ("hemorrhage",) + CT_SUBTYPES + ("side", "midline_shift", "mass_effect")
CT_SIDES = ("left", "right", "bilateral", "none")
MODALITIES = ("xray", "ct")

# Uncertainty phrases that contain a negation word: matched before negation and masked from it.
_UNCERTAIN_DOUBLE_NEGATIVE = (
    r"can ?not be (?:entirely |completely )?(?:excluded|ruled out)|can ?not (?:exclude|rule out)"
    r"|(?:is|are|be) not (?:excluded|ruled out)|not (?:be )?(?:excluded|ruled out)"
)
# Phrases that contain "no"/"not" but do not negate what follows ("no change in cardiomegaly").
_PSEUDO_NEGATION = (
    r"no (?:significant |interval |substantial )?(?:change|increase|worsening)|not (?:significantly )?changed"
    r"|without (?:significant |interval )?change|not only|no longer (?:seen|visible|present)"
)
_NEGATION_FORWARD = (
    r"\bno\b|\bnot\b|\bwithout\b|negative for|free of|clear of|no evidence of|absence of|\babsent\b"
    r"|rather than|resolution of|resolved|\bnor\b|removal of|\bnone\b|\bunlikely\b"
)
_NEGATION_BACKWARD = (
    r"(?:has|have) resolved|\bresolved\b|(?:is|are) absent|(?:is|are) (?:no longer|not) (?:seen|identified|present|visualized|evident|appreciated)"
    r"|no longer (?:seen|visible|present)|not (?:seen|identified|present|visualized|evident|appreciated)"
    r"|(?:has|have) been removed|(?:is|are) negative|(?:is|are|were) excluded|ruled out|\bunlikely\b"
)
_UNCERTAIN_FORWARD = (
    r"\bmay\b|\bmight\b|\bpossible\b|\bpossibly\b|\bprobable\b|\bprobably\b|\blikely\b|\bsuggest\w*"
    r"|suspicious for|suspect\w*|concern(?:ing)? for|worrisome for|question(?:able)?|\bversus\b|\bvs\b"
    r"|borderline|could (?:represent|be|reflect)|\bequivocal\b|\bindeterminate\b|\bpresumed\b"
    r"|differential|compatible with|cannot distinguish"
)
_UNCERTAIN_BACKWARD = (
    r"(?:is|are) (?:possible|likely|suspected|questioned|not excluded)|\bversus\b|\bvs\b"
    r"|(?:could|may) be present"
)
# Words that end the scope of a forward trigger (and start a clause for a backward one).
_SCOPE_TERMINATOR = (
    r"\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bwhich\b|\bexcept\b|\baside from\b|\bapart from\b"
    r"|\bwith the exception\b|\bother than\b|\bwhereas\b|\bwhile\b|\bsecondary to\b|\bdue to\b"
    r"|\bthere (?:is|are)\b"
)

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")


def _compile(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE)


_RE_DOUBLE_NEG = _compile(_UNCERTAIN_DOUBLE_NEGATIVE)
_RE_PSEUDO = _compile(_PSEUDO_NEGATION)
_RE_NEG_FWD = _compile(_NEGATION_FORWARD)
_RE_NEG_BWD = _compile(_NEGATION_BACKWARD)
_RE_UNC_FWD = _compile(_UNCERTAIN_FORWARD)
_RE_UNC_BWD = _compile(_UNCERTAIN_BACKWARD)
_RE_TERMINATOR = _compile(_SCOPE_TERMINATOR)
_RE_NEGATED_INSIDE = _compile(r"\bnot\b|\bno\b")


@dataclass(frozen=True)
class Observation:
    """Phrases for one finding: ``mention`` is an abnormal finding (subject to negation/uncertainty);
    ``normal`` phrases state the finding is absent ("heart size is normal") and label it 0."""

    name: str
    mention: re.Pattern
    normal: re.Pattern | None = None


def _observation(name: str, mention: str, normal: str | None = None) -> Observation:
    return Observation(name, _compile(mention), _compile(normal) if normal else None)


_ENLARGED = r"(?:enlarged|enlargement|widened|widening|prominent|prominence|increased|large)"
CHEST_OBSERVATIONS = (
    _observation(
        "Enlarged Cardiomediastinum",
        rf"(?:cardio)?mediastin\w*(?: silhouette| contours?| structures)?(?: \w+){{0,3}}? {_ENLARGED}"
        rf"|{_ENLARGED}(?: \w+){{0,2}}? (?:cardio)?mediastin\w*|mediastinal (?:mass|lymphadenopathy)",
        r"(?:cardio)?mediastin\w*(?: silhouette| contours?)?(?: \w+){0,3}? (?:normal|within normal limits|unremarkable)"
        r"|normal (?:cardio)?mediastin\w*",
    ),
    _observation(
        "Cardiomegaly",
        rf"cardiomegaly|(?:heart|cardiac)(?: size| silhouette| shadow| contour)?(?: \w+){{0,3}}? {_ENLARGED}"
        rf"|{_ENLARGED}(?: \w+){{0,2}}? (?:heart|cardiac)|cardiac enlargement",
        r"(?:heart|cardiac)(?: size| silhouette| shadow| contour)?(?: \w+){0,3}? (?:normal|within normal limits|unremarkable)"
        r"|normal (?:heart|cardiac)(?: size)?",
    ),
    _observation(
        "Lung Opacity",
        r"opaci\w*|infiltrat\w*|air ?-?space (?:disease|process)|densit(?:y|ies)|interstitial (?:marking|pattern|prominence|disease|lung)\w*"
        r"|reticula\w*|ground[- ]glass|haziness|hazy|parenchymal scar\w*|peribronchial (?:thickening|cuffing)",
        r"lungs? (?:are |is |remain )?clear|clear lungs?",
    ),
    _observation(
        "Lung Lesion",
        r"\bmass(?:es)?\b|nodul\w*|\blesions?\b|\blump\b|cavitary|carcinoma|neoplasm|tumou?r|malignan\w*|metasta\w*",
    ),
    _observation(
        "Edema",
        r"(?<!soft tissue )edema|heart failure|\bchf\b|(?:vascular|pulmonary|venous) congestion|vascular prominence"
        r"|cephalization|kerley",
    ),
    _observation("Consolidation", r"consolidat\w*"),
    _observation("Pneumonia", r"pneumonia|infection|infectious|\bpneumonitis\b"),
    _observation(
        "Atelectasis", r"atelecta\w*|(?:lung|lobe|lobar|segmental) collapse|collapse of the (?:\w+ )?(?:lung|lobe)"
    ),
    _observation("Pneumothorax", r"pneumothora\w*|hydropneumothora\w*"),
    _observation(
        "Pleural Effusion",
        r"(?<!pericardial )effusions?|pleural fluid|hydrothorax|hydropneumothora\w*|blunt\w* (?:of )?(?:the )?(?:\w+ )?costophrenic"
        r"|costophrenic (?:angles? )?(?:are |is )?blunt\w*",
    ),
    _observation(
        "Pleural Other",
        r"pleural (?:thickening|plaques?|calcifications?|scar\w*)|pleuro-?parenchymal|pleural-parenchymal|fibrothorax"
        r"|apical (?:pleural )?(?:cap|thickening)",
    ),
    _observation("Fracture", r"fractur\w*"),
    _observation(
        "Support Devices",
        r"catheter|(?:picc|central|venous|arterial|swan|dialysis|port|midline|jugular|subclavian) (?:venous )?(?:line|catheter)s?"
        r"|(?:endotracheal|\bet\b|nasogastric|\bng\b|orogastric|\bog\b|feeding|chest|tracheostomy|enteric|gastric) tubes?"
        r"|pacemaker|\bpacer|defibrillator|\baicd\b|\bicd\b|port-?a-?cath|\bport\b|\bstents?\b|\bclips?\b|\bwires?\b|sutures?"
        r"|(?:surgical|orthopedic|fixation|spinal) hardware|\bleads?\b|\bdevices?\b|prosthe\w*|valve replacement|\bdrains?\b",
    ),
)

_HEMORRHAGE_NOUN = r"hemorrhag\w*|haemorrhag\w*|hematoma|haematoma|\bbleed\w*|\bblood\b|collections?"
CT_SUBTYPE_ADJECTIVES = {
    "IPH": r"intra-?parenchymal|intracerebral|\bparenchymal\b|\bcontusion",
    "IVH": r"intra-?ventricular",
    "SAH": r"sub-?arachnoid",
    "SDH": r"sub-?dural",
    "EDH": r"epi-?dural|extra-?dural",
}
CT_ABBREVIATIONS = {subtype: rf"\b{subtype.lower()}\b" for subtype in CT_SUBTYPES}
CT_OBSERVATIONS = (
    _observation("hemorrhage", rf"{_HEMORRHAGE_NOUN}|\bich\b|" + "|".join(CT_ABBREVIATIONS.values())),
    _observation(
        "midline_shift",
        r"midline shift|shift of (?:the )?midline|midline (?:structures )?(?:is |are )?shifted"
        r"|(?:leftward|rightward) (?:midline )?shift|subfalcine herniation",
    ),
    _observation("mass_effect", r"mass effect|effacement|effaced|herniation|compression of the (?:\w+ )?ventric\w*"),
)


def split_sentences(text: str) -> list[str]:
    """Lower-cased sentences; splits on ``.``/``!``/``?``/``;`` followed by whitespace and on newlines,
    so decimals ("1.5 cm") stay whole."""
    return [s.strip() for s in _SENTENCE_SPLIT.split(text.lower()) if s and s.strip()]


def _spans(pattern: re.Pattern, text: str) -> list[tuple[int, int]]:
    return [m.span() for m in pattern.finditer(text)]


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    """Blank out ``spans`` (same length) so later patterns cannot match inside them."""
    chars = list(text)
    for start, end in spans:
        chars[start:end] = " " * (end - start)
    return "".join(chars)


def _clause_bounds(sentence: str, position: int) -> tuple[int, int]:
    """Start and end of the clause around ``position``: bounded by scope terminators and the sentence."""
    start, end = 0, len(sentence)
    for t_start, t_end in _spans(_RE_TERMINATOR, sentence):
        if t_end <= position:
            start = max(start, t_end)
        elif t_start >= position:
            end = min(end, t_start)
    return start, end


def _in_scope(
    sentence: str, mention: tuple[int, int], forward: list[tuple[int, int]], backward: list[tuple[int, int]]
) -> bool:
    """Whether a forward trigger precedes the mention in its clause, or a backward trigger follows it
    in its clause (backward triggers stop at commas too: "effusion, pneumothorax has resolved" is rare,
    "enlarged heart, effusion resolved" is not)."""
    clause_start, clause_end = _clause_bounds(sentence, mention[0])
    if any(clause_start <= t_end <= mention[0] for _, t_end in forward):
        return True
    comma = sentence.find(",", mention[1], clause_end)
    backward_end = clause_end if comma < 0 else comma
    return any(mention[1] <= t_start < backward_end for t_start, _ in backward)


def _mention_states(sentence: str, pattern: re.Pattern) -> list[int]:
    """Label of every mention of ``pattern`` in one sentence."""
    mentions = _spans(pattern, sentence)
    if not mentions:
        return []
    double_negative = _spans(_RE_DOUBLE_NEG, sentence)
    hidden = _mask(sentence, double_negative + _spans(_RE_PSEUDO, sentence))
    negation_fwd, negation_bwd = _spans(_RE_NEG_FWD, hidden), _spans(_RE_NEG_BWD, hidden)
    uncertain_fwd = _spans(_RE_UNC_FWD, sentence) + double_negative
    uncertain_bwd = _spans(_RE_UNC_BWD, sentence) + double_negative
    states = []
    for start, end in mentions:
        if _RE_NEGATED_INSIDE.search(hidden[start:end]):
            states.append(NEGATIVE)
        elif _in_scope(hidden, (start, end), negation_fwd, negation_bwd):
            states.append(NEGATIVE)
        elif _in_scope(sentence, (start, end), uncertain_fwd, uncertain_bwd):
            states.append(UNCERTAIN)
        else:
            states.append(POSITIVE)
    return states


def _aggregate(states: list[int]) -> int | None:
    """CheXpert's report-level rule: any positive → 1, else any uncertain → -1, else 0; none → None."""
    for label in (POSITIVE, UNCERTAIN, NEGATIVE):
        if label in states:
            return label
    return None


def _label_observation(sentences: list[str], observation: Observation) -> int | None:
    states = [s for sentence in sentences for s in _mention_states(sentence, observation.mention)]
    if observation.normal is not None and any(observation.normal.search(s) for s in sentences):
        states.append(NEGATIVE)
    return _aggregate(states)


def label_chest_report(text: str) -> dict[str, int | None]:
    """CheXpert labels of one chest X-ray report: ``{observation: 1 | 0 | -1 | None}``.

    An empty report gets ``None`` everywhere: it states nothing, so it must not earn a true "No Finding"
    in clinical efficacy.
    """
    sentences = split_sentences(text)
    labels = {obs.name: _label_observation(sentences, obs) for obs in CHEST_OBSERVATIONS}
    if not sentences:
        return {"No Finding": None, **labels}
    pathology_found = any(labels[name] in (POSITIVE, UNCERTAIN) for name in labels if name != "Support Devices")
    return {"No Finding": None if pathology_found else POSITIVE, **labels}


_DIRECTION = re.compile(r"(?:to|toward|towards) the (?:left|right)|(?:left|right)ward")


def _ct_side(sentences: list[str]) -> str:
    """Side of the hemorrhage from sentences that mention it positively or uncertainly.

    Directions of a shift ("rightward", "to the left") are removed first: a left hematoma pushes the
    midline to the right.
    """
    sides: set[str] = set()
    for sentence in sentences:
        if any(state != NEGATIVE for state in _mention_states(sentence, CT_OBSERVATIONS[0].mention)):
            sentence = _DIRECTION.sub(" ", sentence)
            if re.search(r"\bbilateral\w*|\bboth\b", sentence):
                sides.update(("left", "right"))
            sides.update(side for side in ("left", "right") if re.search(rf"\b{side}\b", sentence))
    if sides == {"left", "right"}:
        return "bilateral"
    return sides.pop() if sides else "none"


def label_ct_report(text: str) -> dict:
    """Head-CT labels: hemorrhage and subtypes, midline shift, mass effect in {1, 0, -1, None}, and
    ``side`` in ``CT_SIDES`` ("none" when no hemorrhage is positive or uncertain).

    A subtype adjective ("subdural") counts only in a sentence that also names a hemorrhage
    ("hemorrhage", "hematoma", "blood", "collection"), so "subdural and epidural hematomas" labels both
    while "subdural space" labels nothing.
    """
    sentences = split_sentences(text)
    labels: dict = {obs.name: _label_observation(sentences, obs) for obs in CT_OBSERVATIONS}
    hemorrhage_noun = _compile(_HEMORRHAGE_NOUN)
    for subtype in CT_SUBTYPES:
        adjective, abbreviation = _compile(CT_SUBTYPE_ADJECTIVES[subtype]), _compile(CT_ABBREVIATIONS[subtype])
        states = []
        for sentence in sentences:
            states += _mention_states(sentence, abbreviation)
            if hemorrhage_noun.search(sentence):
                states += _mention_states(sentence, adjective)
        labels[subtype] = _aggregate(states)
    subtype_found = [labels[s] for s in CT_SUBTYPES if labels[s] in (POSITIVE, UNCERTAIN)]
    if subtype_found and labels["hemorrhage"] != POSITIVE:
        labels["hemorrhage"] = max(subtype_found)
    labels["side"] = _ct_side(sentences) if labels["hemorrhage"] in (POSITIVE, UNCERTAIN) else "none"
    return {name: labels[name] for name in CT_FINDINGS}


def label_report(text: str, modality: str) -> dict:
    """Dispatch on ``modality`` ("xray" or "ct")."""
    if modality == "xray":
        return label_chest_report(text)
    if modality == "ct":
        return label_ct_report(text)
    raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")


def binary_observations(modality: str) -> tuple[str, ...]:
    """Observations scored as present/absent in clinical efficacy (CT ``side`` is scored by accuracy)."""
    if modality == "xray":
        return CHEXPERT_OBSERVATIONS
    if modality == "ct":
        return tuple(name for name in CT_FINDINGS if name != "side")
    raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")


def is_positive(label: int | None, uncertain_as_positive: bool = True) -> bool:
    """Binarise one label for clinical efficacy."""
    return label == POSITIVE or (uncertain_as_positive and label == UNCERTAIN)


def precision_recall_f1(tp: int, fp: int, fn: int) -> dict:
    """Precision, recall, F1 with 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def clinical_efficacy(
    reference_texts: list[str], generated_texts: list[str], modality: str, uncertain_as_positive: bool = True
) -> dict:
    """Precision/recall/F1 of the generated reports' labels against the reference reports' labels
    (labels both with :func:`label_report`, then :func:`clinical_efficacy_from_labels`)."""
    if len(reference_texts) != len(generated_texts):
        raise ValueError(f"{len(reference_texts)} reference reports but {len(generated_texts)} generated reports")
    return clinical_efficacy_from_labels(
        [label_report(t, modality) for t in reference_texts],
        [label_report(t, modality) for t in generated_texts],
        modality,
        uncertain_as_positive,
    )


def clinical_efficacy_from_labels(
    references: list[dict], generated: list[dict], modality: str, uncertain_as_positive: bool = True
) -> dict:
    """Clinical efficacy of already-labelled reports (callers that also need the labels label once).

    Returns ``{"per_observation": {name: {precision, recall, f1, tp, fp, fn, n_reference_positive}},
    "micro": {...}, "macro": {precision, recall, f1}, "n": int, "uncertain_as_positive": bool}``;
    for CT also ``"side_accuracy"`` (exact agreement of ``side`` over all reports). Micro pools
    tp/fp/fn over observations; macro averages the per-observation values, counting an observation
    with no positives on either side as 0 (as scikit-learn does), so rare findings pull it down.
    """
    if len(references) != len(generated):
        raise ValueError(f"{len(references)} reference label sets but {len(generated)} generated label sets")
    if not references:
        raise ValueError("no reports to compare")
    per_observation = {}
    for name in binary_observations(modality):
        ref = [is_positive(r[name], uncertain_as_positive) for r in references]
        gen = [is_positive(g[name], uncertain_as_positive) for g in generated]
        tp = sum(r and g for r, g in zip(ref, gen))
        fp = sum(g and not r for r, g in zip(ref, gen))
        fn = sum(r and not g for r, g in zip(ref, gen))
        per_observation[name] = {**precision_recall_f1(tp, fp, fn), "n_reference_positive": sum(ref)}
    micro = precision_recall_f1(*(sum(o[k] for o in per_observation.values()) for k in ("tp", "fp", "fn")))
    macro = {
        k: sum(o[k] for o in per_observation.values()) / len(per_observation) for k in ("precision", "recall", "f1")
    }
    result = {
        "per_observation": per_observation,
        "micro": micro,
        "macro": macro,
        "n": len(references),
        "uncertain_as_positive": uncertain_as_positive,
    }
    if modality == "ct":
        result["side_accuracy"] = sum(r["side"] == g["side"] for r, g in zip(references, generated)) / len(references)
    return result
