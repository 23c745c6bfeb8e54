"""Caption metrics of the COCO caption evaluation (pycocoevalcap): BLEU-1..4, METEOR,
ROUGE-L, CIDEr(-D) and SPICE, on ``{image_id: [references]}`` and ``{image_id:
[hypothesis]}``, as the COCO server computes them: both sides go through the Stanford PTB
tokenizer (lower-cased, punctuation removed), then each scorer. Values are reported
x 100, as papers print them (Table 7: CIDEr 127.7, not 1.277).

Java: the PTB tokenizer, METEOR and SPICE are Java programs shipped inside pycocoevalcap
(``apt-get install -y default-jre-headless`` on a fresh machine).

SPICE also needs Stanford CoreNLP 3.6.0, which pycocoevalcap does not ship: its ``Spice()``
constructor downloads it from nlp.stanford.edu into the package when the jars are absent.
We never let it: without the jars SPICE is NaN, with one log line saying why (copy
``stanford-corenlp-3.6.0.jar`` and ``stanford-corenlp-3.6.0-models.jar`` to
``SPICE_LIB`` to enable it).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import pycocoevalcap.spice.spice as spice_module
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

log = logging.getLogger(__name__)

SPICE_LIB = Path(spice_module.__file__).parent / "lib"
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")


def spice_available() -> bool:
    """True when SPICE can run offline: its CoreNLP jars are in place (else ``Spice()``
    would download them)."""
    return all((SPICE_LIB / jar).is_file() for jar in SPICE_JARS)


def _check_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "caption metrics need Java (the PTB tokenizer and METEOR of "
            "pycocoevalcap): apt-get install -y default-jre-headless"
        )


def _ptb(captions: Mapping) -> dict:
    """{id: [str]} -> {id: [PTB-tokenised str]} (lower-cased, punctuation removed)."""
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def score_captions(
    references: Mapping, candidates: Mapping[str, Mapping], spice: bool = True
) -> dict[str, dict[str, float]]:
    """Score several hypothesis sets (``candidates``: name -> {image_id: [caption]}) against
    the same references, tokenising the references and starting METEOR once.
    Returns name -> {metric: value x 100}; SPICE NaN when unavailable or not asked for."""
    _check_java()
    if not references:
        raise ValueError("no references to score against")
    for name, hyps in candidates.items():
        if set(hyps) != set(references):
            raise ValueError(
                f"{name}: hypotheses and references cover different images "
                f"({len(hyps)} vs {len(references)} ids)"
            )
        bad = [k for k, v in hyps.items() if len(v) != 1]
        if bad:
            raise ValueError(
                f"{name}: each image needs exactly one hypothesis, image {bad[0]} "
                f"has {len(hyps[bad[0]])}"
            )
    run_spice = spice and spice_available()
    if spice and not run_spice:
        log.warning(
            "SPICE unavailable offline: Stanford CoreNLP 3.6.0 is not in %s (pycocoevalcap "
            "would download it; we do not); SPICE reported as NaN",
            SPICE_LIB,
        )
    gts = _ptb(references)
    meteor = Meteor()
    results = {}
    try:
        for name, hyps in candidates.items():
            res = _ptb(hyps)
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            scores = {f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}
            scores["METEOR"] = meteor.compute_score(gts, res)[0]
            scores["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
            scores["CIDEr"] = Cider().compute_score(gts, res)[0]
            scores["SPICE"] = (
                spice_module.Spice().compute_score(gts, res)[0] if run_spice else math.nan
            )
            results[name] = {k: 100.0 * float(v) for k, v in scores.items()}
    finally:
        del meteor  # its __del__ stops the Java process
    return results


def caption_metrics(
    references: Mapping, hypotheses: Mapping, spice: bool = True
) -> dict[str, float]:
    """{image_id: [reference, ...]} and {image_id: [hypothesis]} -> {metric: value x 100}
    (``METRICS``; SPICE NaN when unavailable offline)."""
    return score_captions(references, {"hypotheses": hypotheses}, spice)["hypotheses"]


def constant_caption(captions: Sequence[str]) -> str:
    """The trivial baseline's caption: the most frequent training caption (compared
    lower-cased and stripped; ties go to the first seen)."""
    if not captions:
        raise ValueError("no training captions to pick the constant caption from")
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for c in captions:
        key = " ".join(c.lower().split())
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, c.strip())
    return first[max(counts, key=counts.get)]  # dicts keep insertion order: first max wins
