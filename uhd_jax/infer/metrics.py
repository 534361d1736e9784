"""Per-question scores of the benchmarks MiniCPM-V is evaluated on, as their published scorers compute them.

Each function scores one prediction against that question's ground-truth answers; a benchmark's number is the mean
over questions (`mean`, x100 for the usual percentage). The behaviours that look like bugs are kept on purpose,
because the published numbers were produced with them:

  anls             DocVQA / InfographicVQA (the RRC evaluation script): both strings lowercased, stripped and
                   whitespace-collapsed, NL = levenshtein / max(len(gt), len(pred)) where the lengths are those of
                   the *raw* strings (`len(answer.upper())`); score = 1 - min NL over the answers, 0 if below 0.5
                   (so NL exactly 0.5 scores 0.5).
  relaxed_accuracy ChartQA (pix2struct's `relaxed_correctness`, max over the answers): numbers within 5% relative
                   change of the target; "x%" parses as x / 100; a target of 0 parses as "not a number" (Python
                   truthiness) and falls to the string comparison; otherwise case-insensitive exact match. Strings
                   are not stripped ("12 %" or "12% " are not numbers).
  vqa_accuracy     VQA v2 (GT-Vision-Lab vqaEval.py): the prediction has newlines / tabs turned into spaces, is
                   stripped, then punctuation-processed and digit/article/contraction-normalised; the ground truths
                   are only punctuation-processed, and only when the annotators disagree; accuracy = mean over the
                   leave-one-annotator-out subsets of min(#matches / 3, 1). (The period regex's count argument is
                   `re.UNICODE` = 32 in the original, i.e. at most 32 periods are removed; kept.)
  exact_match      normalise_answer(pred) equals normalise_answer of any answer.
  ocrbench         OCRBench (Yuliang-Liu/MultimodalOCR, OCRBench/example.py): correct if any answer, lowercased,
                   stripped, newlines as spaces, is a substring of the prediction treated the same way; for the
                   HME100k dataset no lowercasing, and all spaces removed from both.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence


def _as_list(answers) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def mean(scores: Iterable[float]) -> float:
    s = [float(x) for x in scores]
    return sum(s) / len(s) if s else 0.0


# ------------------------------------------------------------------------------------------------------- ANLS
def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: Sequence[str] | str, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one question (DocVQA scorer)."""
    det = " ".join(prediction.strip().lower().split())
    values = []
    for answer in _as_list(answers):
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    result = 1.0 - min(values)
    return 0.0 if result < threshold else result


# ---------------------------------------------------------------------------------------------------- ChartQA
def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """pix2struct's ChartQA check of one prediction against one target."""
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str] | str, max_relative_change: float = 0.05) -> float:
    """ChartQA relaxed accuracy of one question: 1.0 if any answer accepts the prediction, else 0.0."""
    return float(max(relaxed_correctness(a, prediction, max_relative_change) for a in _as_list(answers)))


# ----------------------------------------------------------------------------------------------------- VQA v2
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead, so any "." not followed by a digit
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def vqa_process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: each mark is deleted where it touches a space (or the text has a digit,digit
    comma), else replaced by a space; then periods not followed by a digit are deleted (at most 32)."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)  # sic: re.UNICODE (32) lands in sub's `count`


def vqa_process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lowercase, number words to digits, articles dropped, contractions restored."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_normalize_prediction(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one question given its annotators' answers (10 in VQA v2 / TextVQA / VizWiz)."""
    answers = _as_list(answers)
    pred = vqa_normalize_prediction(prediction)
    if len(set(answers)) > 1:
        answers = [vqa_process_punctuation(a) for a in answers]
    accs = []
    for i in range(len(answers)):
        matches = sum(1 for j, a in enumerate(answers) if j != i and a == pred)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


# --------------------------------------------------------------------------------------------- exact match
def normalize_answer(text: str) -> str:
    """Lowercased, whitespace runs collapsed to one space, stripped, trailing periods removed."""
    return " ".join(text.lower().split()).rstrip(".").rstrip()


def exact_match(prediction: str, answers: Sequence[str] | str) -> float:
    p = normalize_answer(prediction)
    return float(any(normalize_answer(a) == p for a in _as_list(answers)))


# -------------------------------------------------------------------------------------------------- OCRBench
def ocrbench(prediction: str, answers: Sequence[str] | str, dataset_name: str | None = None) -> float:
    """OCRBench: 1.0 if any normalised answer is a substring of the normalised prediction. `dataset_name` is the
    sample's "dataset_name" field (HME100k is scored case-sensitively with all spaces removed)."""
    if dataset_name == "HME100k":
        norm = lambda s: s.strip().replace("\n", " ").replace(" ", "")  # noqa: E731
    else:
        norm = lambda s: s.lower().strip().replace("\n", " ")  # noqa: E731
    pred = norm(prediction)
    return float(any(norm(a) in pred for a in _as_list(answers)))


METRICS: dict[str, Callable[..., float]] = {
    "anls": anls, "relaxed_accuracy": relaxed_accuracy, "vqa_accuracy": vqa_accuracy, "exact_match": exact_match,
    "ocrbench": ocrbench,
}

__all__ = ["levenshtein", "anls", "relaxed_correctness", "relaxed_accuracy", "vqa_process_punctuation",
           "vqa_process_digit_article", "vqa_normalize_prediction", "vqa_accuracy", "normalize_answer",
           "exact_match", "ocrbench", "mean", "METRICS"]
