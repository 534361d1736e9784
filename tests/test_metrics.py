"""Benchmark scorers on cases worked by hand from the published scorers' definitions (arithmetic in comments)."""

import pytest

from uhd_jax.infer import metrics as M


def test_levenshtein():
    assert M.levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert M.levenshtein("flaw", "lawn") == 2  # -f, +n
    assert M.levenshtein("", "abc") == 3 and M.levenshtein("abc", "") == 3 and M.levenshtein("", "") == 0


@pytest.mark.parametrize("pred,answers,want", [
    ("hello world", ["  Hello   World "], 1.0),  # both normalise to "hello world": distance 0
    ("abce", ["abcd"], 0.75),  # distance 1, length max(4, 4) = 4: NL .25, score 1 - .25
    ("abc", ["abcdef"], 0.5),  # distance 3, length 6: NL .5, 1 - .5 = .5 is not < .5, so kept
    ("ab", ["abcdef"], 0.0),  # distance 4, length 6: NL .667, 1 - .667 = .333 < .5 -> 0
    ("abce", ["xyz", "abcd"], 0.75),  # NL("xyz") = 4/4 = 1 (3 substitutions + 1 insertion), NL("abcd") = .25: min .25
    ("  abd  ", ["ABC"], 6 / 7),  # "abd" vs "abc": distance 1, but length = max(len("ABC"), len("  abd  ")) = 7
    ("", [""], 1.0),  # length 0: NL 0
])
def test_anls(pred, answers, want):
    assert M.anls(pred, answers) == pytest.approx(want)


@pytest.mark.parametrize("target,pred,want", [
    ("12", "12.5", True),  # |12.5 - 12| / 12 = .0417 <= .05
    ("12", "12.7", False),  # .7 / 12 = .0583 > .05
    ("20", "21", True),  # 1 / 20 = .05 exactly, <= .05
    ("45%", "0.44", True),  # target .45: |.44 - .45| / .45 = .0222
    ("45%", "45", False),  # target .45, prediction 45: relative change 99
    ("12", "12%", False),  # prediction .12 vs 12
    ("0", "0.0", False),  # target 0 is falsy: string comparison "0.0" vs "0"
    ("0", "0", True),  # same strings
    ("Yes", "yes", True),  # not numbers: case-insensitive exact match
    ("1,000", "1000", False),  # float("1,000") fails: string comparison
    ("Paris", "paris ", False),  # no stripping
])
def test_relaxed_correctness(target, pred, want):
    assert M.relaxed_correctness(target, pred) is want


def test_relaxed_accuracy_max_over_answers():
    assert M.relaxed_accuracy("30", ["10", "31"]) == 1.0  # 1/31 = .032 for the second answer
    assert M.relaxed_accuracy("30", ["10", "40"]) == 0.0  # 2.0 and .25


@pytest.mark.parametrize("pred,answers,want", [
    # all 10 agree: each leave-one-out subset holds 9 matches of "2" ("two" -> "2"): min(9/3, 1) = 1
    ("two", ["2"] * 10, 1.0),
    # "Yes." -> "yes" (period and case). Each of the 3 "yes" annotators leaves 2 yes: 2/3; each of the 7 "no" leaves
    # 3 yes: 1. Mean (3 * 2/3 + 7 * 1) / 10 = .9
    ("Yes.", ["yes"] * 3 + ["no"] * 7, 0.9),
    # 2 "red": their subsets hold 1 red (1/3), the other 8 hold 2 (2/3): (2/3 + 16/3) / 10 = .6
    ("red", ["red"] * 2 + ["blue"] * 8, 0.6),
    # "a cat" -> "cat" (article). The "cat" annotator's subset has none (0); the 9 others have 1 (1/3): 3/10
    ("a cat", ["cat"] + ["dog"] * 9, 0.3),
    ("dont", ["don't"] * 10, 1.0),  # contraction restored
    ("1,000", ["1000"] * 10, 1.0),  # a digit,digit comma: punctuation deleted, not spaced
    ("left-hand", ["left hand"] * 10, 1.0),  # "-" touching no space: replaced by a space
    ("3.5", ["3.5"] * 10, 1.0),  # a period before a digit stays
    # ground truths are not processed when all agree, the prediction always is: "t-shirt" -> "t shirt" != "t-shirt"
    ("t-shirt", ["t-shirt"] * 10, 0.0),
    # when they disagree the ground truths get punctuation processing ("t-shirt" -> "t shirt"): 4 matches among
    # "t shirt"-annotators' subsets = 3 -> 1, the 6 others' subsets hold 4 -> 1: mean 1
    ("t-shirt", ["t-shirt"] * 4 + ["shirt"] * 6, 1.0),
    ("Two\tdogs\n", ["2 dogs"] * 10, 1.0),  # tab / newline -> space, stripped, "two" -> "2"
])
def test_vqa_accuracy(pred, answers, want):
    assert M.vqa_accuracy(pred, answers) == pytest.approx(want)


def test_vqa_normalisation_pieces():
    assert M.vqa_process_punctuation("hi, there") == "hi there"  # ", " touches a space: deleted
    assert M.vqa_process_punctuation("a/b") == "a b"  # touches no space: a space
    assert M.vqa_process_punctuation("end.") == "end"
    assert M.vqa_process_digit_article("The Three Cats") == "3 cats"
    assert M.vqa_process_punctuation("." * 40) == "." * 8  # the original's sub(count=re.UNICODE=32)


@pytest.mark.parametrize("pred,answers,want", [
    ("The  Cat.", ["the cat"], 1.0),  # lowercase, whitespace collapsed, trailing period dropped
    ("cat", ["the cat"], 0.0),
    ("Paris", ["London", "paris"], 1.0),
])
def test_exact_match(pred, answers, want):
    assert M.exact_match(pred, answers) == want


@pytest.mark.parametrize("pred,answers,dataset,want", [
    ("The answer is HELLO world", ["hello"], "IIIT5K", 1.0),  # "hello" is in "the answer is hello world"
    ("hello\nworld", ["Hello World", "foo"], "docVQA", 1.0),  # newline -> space: "hello world"
    ("hello", ["hello world"], "docVQA", 0.0),  # the answer must be inside the prediction, not the reverse
    ("x^{2}", ["x ^ { 2 }"], "HME100k", 1.0),  # spaces removed from both: "x^{2}"
    ("x", ["X"], "HME100k", 0.0),  # HME100k is case-sensitive
    ("x", ["X"], "ct80", 1.0),  # the other datasets are not
])
def test_ocrbench(pred, answers, dataset, want):
    assert M.ocrbench(pred, answers, dataset) == want


def test_mean_and_registry():
    assert M.mean([1.0, 0.0, 0.5]) == 0.5
    assert set(M.METRICS) == {"anls", "relaxed_accuracy", "vqa_accuracy", "exact_match", "ocrbench"}
