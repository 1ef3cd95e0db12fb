"""Caption metrics for generated reports: BLEU-1..4, METEOR, ROUGE-L and CIDEr, as papers report them.

The scores come from pycocoevalcap (the COCO caption evaluation code that R2Gen, R2GenGPT and most
report-generation papers call), computed at corpus level the way R2Gen's ``compute_scores`` does:
one reference and one hypothesis per report, BLEU with the ``closest`` reference-length option,
METEOR from the official 1.5 jar, ROUGE-L (beta 1.2) and CIDEr-D style CIDEr averaged over reports.

Tokenisation decides the numbers as much as the model does, so it is explicit and reported:

* ``"ptb"``: pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP 3.4.1, ``-lowerCase``), then its
  punctuation tokens are dropped. This is the COCO protocol. It needs Java.
* ``"simple"``: lower-case, every punctuation character becomes a space, split on whitespace. It is
  deterministic, needs no Java, and is close to R2Gen's cleaning (R2Gen lower-cases and deletes
  ``.,?;*!%^&_+():-[]{}``; it keeps ``.`` as a sentence token, which this does not). "x-ray" becomes
  "x ray" here but stays "x-ray" under PTB, so the two modes differ slightly on hyphenated words.

The default is ``"ptb"`` when ``java`` is on PATH, otherwise ``"simple"`` with a logged note.
METEOR always needs Java: without it, :func:`caption_metrics` raises unless ``meteor=False`` is
passed, in which case METEOR is reported as ``None`` (skipped), never as 0.

Per-sample scores are the scorers' own per-report values: BLEU per report uses pycocoevalcap's tiny
smoothing constants (so a report without any 4-gram match gets ~0, not an error); CIDEr per report
uses document frequencies from the whole reference corpus, so it is only meaningful next to the rest
of the corpus (a corpus of one report has CIDEr 0 because every n-gram has idf 0).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

logger = logging.getLogger(__name__)

BLEU_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4")
METRIC_KEYS = BLEU_KEYS + ("METEOR", "ROUGE_L", "CIDEr")
TOKENIZERS = ("ptb", "simple")

_PUNCTUATION = re.compile(r"[^\w\s]|_")


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (METEOR and the PTB tokenizer start one)."""
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """Lower-case, punctuation to spaces, whitespace-split and re-joined with single spaces."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def _ptb_tokenize(texts: list[str]) -> list[str]:
    """Tokenise with pycocoevalcap's PTBTokenizer, one output per input, order kept.

    Whitespace (including newlines and carriage returns) is collapsed first because the wrapper
    writes one caption per line and pairs output lines with inputs by position.
    """
    captions = {i: [{"caption": " ".join(text.split())}] for i, text in enumerate(texts)}
    tokenized = PTBTokenizer().tokenize(captions)
    missing = [i for i in range(len(texts)) if i not in tokenized]
    if missing:
        raise RuntimeError(f"PTBTokenizer returned no output for {len(missing)} texts (first index {missing[0]})")
    return [tokenized[i][0] for i in range(len(texts))]


def resolve_tokenize(tokenize: str | None) -> str:
    """``None`` → ``"ptb"`` if Java is available, else ``"simple"`` (logged); validate the rest."""
    if tokenize is None:
        if java_available():
            return "ptb"
        logger.warning(
            "java not found on PATH: tokenising with 'simple' instead of the PTB tokenizer; "
            "scores are not comparable with COCO/PTB-tokenised numbers"
        )
        return "simple"
    if tokenize not in TOKENIZERS:
        raise ValueError(f"tokenize must be one of {TOKENIZERS}, got {tokenize!r}")
    if tokenize == "ptb" and not java_available():
        raise RuntimeError(
            "tokenize='ptb' needs Java (pycocoevalcap's PTBTokenizer runs Stanford CoreNLP), "
            "but java is not on PATH; install a JRE or use tokenize='simple'"
        )
    return tokenize


def tokenize_texts(texts: list[str], tokenize: str) -> list[str]:
    """Tokenise with an already-resolved mode (see the module docstring for what each does)."""
    if tokenize == "ptb":
        return _ptb_tokenize(texts)
    return [simple_tokenize(t) for t in texts]


@contextmanager
def _meteor_scorer() -> Iterator[Meteor]:
    """A pycocoevalcap ``Meteor`` whose JVM subprocess is shut down on exit.

    ``Meteor`` starts ``java -jar meteor-1.5.jar`` in its constructor and only stops it in
    ``__del__``, which may run late or never; a caller scoring many batches would pile up JVMs.
    """
    scorer = Meteor()
    try:
        yield scorer
    finally:
        # compute_score keeps its lock when the JVM dies mid-way, and Meteor.__del__ would then block
        # forever acquiring it: release it before shutting the process down.
        if scorer.lock.locked():
            scorer.lock.release()
        process = scorer.meteor_p
        process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()


def caption_metrics(
    references: list[str], hypotheses: list[str], tokenize: str | None = None, meteor: bool = True
) -> dict:
    """Corpus-level and per-report caption metrics of ``hypotheses`` against ``references``.

    Args:
        references: one ground-truth report per sample (must be non-empty after tokenisation).
        hypotheses: one generated report per sample, same order; empty ones are allowed and score 0.
        tokenize: ``"ptb"``, ``"simple"`` or ``None`` for the default (see module docstring).
        meteor: ``False`` skips METEOR (reported as ``None``); ``True`` raises if Java is missing.

    Returns:
        ``{"corpus": {metric: float|None}, "per_sample": {metric: list[float]|None},
        "tokenize": str, "n": int, "n_empty_hypotheses": int}`` with metrics BLEU_1..4, METEOR,
        ROUGE_L, CIDEr. Corpus BLEU is the pooled n-gram BLEU (not the mean of per-report BLEU).
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses; need one of each per sample")
    if not references:
        raise ValueError("no samples: references and hypotheses are empty")
    if meteor and not java_available():
        raise RuntimeError(
            "METEOR needs Java (pycocoevalcap runs meteor-1.5.jar) but java is not on PATH; "
            "install a JRE or pass meteor=False to skip METEOR"
        )
    tokenize = resolve_tokenize(tokenize)
    refs = tokenize_texts(list(references), tokenize)
    hyps = tokenize_texts(list(hypotheses), tokenize)
    empty_refs = [i for i, r in enumerate(refs) if not r]
    if empty_refs:
        raise ValueError(
            f"{len(empty_refs)} references are empty after tokenisation (first at index "
            f"{empty_refs[0]}); scores against an empty reference are undefined"
        )

    gts = {i: [r] for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    corpus: dict[str, float | None] = {}
    per_sample: dict[str, list[float] | None] = {}

    bleu, bleu_per_sample = Bleu(4).compute_score(gts, res, verbose=0)
    for key, value, values in zip(BLEU_KEYS, bleu, bleu_per_sample):
        corpus[key], per_sample[key] = float(value), [float(v) for v in values]
    if meteor:
        with _meteor_scorer() as scorer:
            try:
                value, values = scorer.compute_score(gts, res)
            except (ValueError, OSError) as err:
                raise RuntimeError(
                    f"METEOR (java -jar meteor-1.5.jar, 2 GB heap) returned no score ({err}); "
                    "run the jar by hand to see the Java error, or pass meteor=False"
                ) from err
        corpus["METEOR"], per_sample["METEOR"] = float(value), [float(v) for v in values]
    else:
        corpus["METEOR"], per_sample["METEOR"] = None, None
    for key, scorer in (("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        value, values = scorer.compute_score(gts, res)
        corpus[key], per_sample[key] = float(value), [float(v) for v in values]

    return {
        "corpus": corpus,
        "per_sample": per_sample,
        "tokenize": tokenize,
        "n": len(refs),
        "n_empty_hypotheses": sum(not h for h in hyps),
    }
