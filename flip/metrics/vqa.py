"""VQA accuracy as the official VQA evaluation computes it, and the soft training targets.

Source: the official evaluation code, GT-Vision-Lab/VQA
``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at its latest commit a013f00 ("Fixed
processing answers bug"; BSD-2-Clause, Aishwarya Agrawal). Its tables (contractions,
number words, articles, punctuation, the two regular expressions) are reproduced below
entry for entry; the procedure is re-written here:

* an answer is cleaned: newlines and tabs become spaces, outer white space is stripped;
* ``process_punctuation``: every listed punctuation mark is deleted when it touches a
  space anywhere in the text or when the text holds a digit-comma-digit ("1,000"), and
  replaced by a space otherwise; then every period not followed by a digit is deleted;
* ``process_digit_article``: lower-cased, split on white space, number words become digits
  ("two" -> "2", "none" -> "0"), articles (a, an, the) are dropped, missing apostrophes are
  restored ("dont" -> "don't");
* the accuracy of a predicted answer for a question with n human answers (10 in VQAv2) is
  the mean over the n leave-one-out subsets of min(#subset answers equal to it / 3, 1).

Two quirks of the official code are kept because they change scores:
* the normalisation is applied (to the prediction and to the human answers) only when the
  human answers are not all identical: against a unanimous "yes", "yes." scores 0;
* ``periodStrip.sub("", text, re.UNICODE)`` passes ``re.UNICODE`` (32) as the *count*
  argument, so at most 32 periods are deleted.

Soft targets (``answer_scores``): the training target of an answer is the accuracy the
official metric would give it, i.e. the leave-one-out average above with every answer
normalised: 0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / >= 4 of 10 humans. It is the table of
ViLT's ``write_vqa.get_score`` (dandelin/ViLT, whose data METER uses; METER is the setup
the FLIP paper follows for VQA) and of hengyuan-hu/bottom-up-attention-vqa
``tools/compute_softscore.py``;
``min(n / 3, 1)``, the same without the averaging (1/3, 2/3, 1), found in some
re-implementations, is not used here.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torchmetrics import Metric

CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {  # the official ``manualMap``
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# "(?!<=\d)" is a look-ahead (the official code's typo for a look-behind) that never
# fails before a ".": in effect, every period not followed by a digit.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
ANSWER_TYPES = ("yes/no", "number", "other")  # VQAv2's ``answer_type`` values


def clean(answer: str) -> str:
    """Newlines and tabs to spaces, outer white space stripped (applied to every answer)."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    out = text
    digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=re.UNICODE)  # the official call's count (32)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The official normalisation of one answer: clean, punctuation, digits and articles."""
    return process_digit_article(process_punctuation(clean(answer)))


def leave_one_out_score(matches: int, total: int) -> float:
    """Mean over the ``total`` subsets that leave one human answer out of
    min(#answers in the subset that match / 3, 1), when ``matches`` of them match."""
    if total <= 0 or not 0 <= matches <= total:
        raise ValueError(f"need 0 <= matches <= total and total > 0, got {matches}, {total}")
    # the ``matches`` subsets without a matching answer keep matches - 1 of them
    left_out_match = matches * min(1.0, (matches - 1) / 3) if matches else 0.0
    return (left_out_match + (total - matches) * min(1.0, matches / 3)) / total


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official accuracy of ``prediction`` for one question's human ``answers``."""
    if not answers:
        raise ValueError("a question needs at least one human answer to be scored")
    answers = [clean(a) for a in answers]
    prediction = clean(prediction)
    if len(set(answers)) > 1:  # official: normalise only when the humans disagree
        answers = [normalize_answer(a) for a in answers]
        prediction = normalize_answer(prediction)
    return leave_one_out_score(sum(a == prediction for a in answers), len(answers))


def answer_scores(answers: Sequence[str]) -> dict[str, float]:
    """Soft target of every distinct (normalised) answer of one question: the accuracy the
    official metric gives it, e.g. {"2": 0.9, "3": 0.6, "4": 0.3} for 3/2/1 of 10 humans."""
    counts = Counter(normalize_answer(a) for a in answers)
    return {a: leave_one_out_score(n, len(answers)) for a, n in counts.items()}


def answer_vocabulary(answers: Iterable[str], size: int) -> list[str]:
    """The ``size`` most frequent normalised answers (VQAv2: each question's
    ``multiple_choice_answer``), most frequent first; ties in alphabetical order."""
    if size < 1:
        raise ValueError(f"the answer vocabulary needs size >= 1, got {size}")
    counts = Counter(normalize_answer(a) for a in answers)
    counts.pop("", None)  # an answer of punctuation only is no class
    return sorted(counts, key=lambda a: (-counts[a], a))[:size]


class VQAAccuracy(Metric):
    """Mean official VQA accuracy, overall and per answer type, summed over processes.

    ``update(predictions, answers, answer_types)``: one predicted string, the list of human
    answers and the answer type ("yes/no", "number" or "other") per question.
    ``compute()``: {"all": ..., "yes/no": ..., "number": ..., "other": ...} as fractions;
    a type without questions is NaN.
    """

    full_state_update = False

    def __init__(self, answer_types: Sequence[str] = ANSWER_TYPES):
        super().__init__()
        self.answer_types = tuple(answer_types)
        self.add_state(
            "score",
            default=torch.zeros(len(self.answer_types) + 1, dtype=torch.float64),
            dist_reduce_fx="sum",
        )
        self.add_state(
            "count",
            default=torch.zeros(len(self.answer_types) + 1, dtype=torch.float64),
            dist_reduce_fx="sum",
        )

    def update(
        self,
        predictions: Sequence[str],
        answers: Sequence[Sequence[str]],
        answer_types: Sequence[str],
    ) -> None:
        if not len(predictions) == len(answers) == len(answer_types):
            raise ValueError(
                f"{len(predictions)} predictions, {len(answers)} answer lists and "
                f"{len(answer_types)} answer types: one of each per question"
            )
        for prediction, human, kind in zip(predictions, answers, answer_types):
            if kind not in self.answer_types:
                raise ValueError(f"answer type {kind!r} is none of {self.answer_types}")
            acc = vqa_accuracy(prediction, human)
            for slot in (0, 1 + self.answer_types.index(kind)):
                self.score[slot] += acc
                self.count[slot] += 1

    def compute(self) -> dict[str, torch.Tensor]:
        mean = self.score / self.count  # 0 / 0 -> NaN for a type without questions
        return dict(zip(("all", *self.answer_types), mean.float()))
