"""Official VQA answer normalisation and accuracy, against hand-worked cases."""
import itertools

import pytest

from pipeline.data.answers import answer_scores, majority_answer, normalize_answer, vqa_accuracy


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),
    ("the dog.", "dog"),
    ("Yes!", "yes"),
    ("isnt", "isn't"),
    ("1,000", "1000"),          # digit-comma-digit: punctuation is removed, not spaced
    ("black/white", "black white"),
    ("a man's hat", "man's hat"),
    ("2.5", "2.5"),             # a period before a digit stays
    ("  red\n", "red"),
    ("none", "0"),
    ("An apple", "apple"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def _brute_force_accuracy(pred, humans):
    """The definition, literally: mean over the 10 subsets of 9 of min(#matches / 3, 1)."""
    scores = [min(sum(h == pred for h in subset) / 3, 1)
              for subset in itertools.combinations(humans, len(humans) - 1)]
    return sum(scores) / len(scores)


@pytest.mark.parametrize("count, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_hand_worked(count, expected):
    humans = ["red"] * count + ["blue"] * (10 - count)
    assert vqa_accuracy("red", humans) == pytest.approx(expected)
    assert vqa_accuracy("red", humans) == pytest.approx(_brute_force_accuracy("red", humans))


def test_vqa_accuracy_normalises_prediction_when_humans_disagree():
    humans = ["2"] * 7 + ["3"] * 3
    assert vqa_accuracy("Two.", humans) == pytest.approx(1.0)
    assert vqa_accuracy("three", humans) == pytest.approx(0.9)


def test_vqa_accuracy_keeps_official_quirk_for_unanimous_humans():
    # vqaEval.py normalises the prediction only when the humans disagree.
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy(" 2 ", ["2"] * 10) == 1.0


def test_vqa_accuracy_rejects_empty():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_answer_scores_equal_official_accuracy():
    humans = ["red"] * 5 + ["Red."] + ["blue"] * 2 + ["green", "two"]
    scores = answer_scores(humans)
    assert set(scores) == {"red", "blue", "green", "2"}
    normalised = [normalize_answer(h) for h in humans]
    for answer, score in scores.items():
        assert score == pytest.approx(_brute_force_accuracy(answer, normalised))
    assert scores["red"] == 1.0 and scores["green"] == pytest.approx(0.3)


def test_majority_answer():
    assert majority_answer(["Two", "2", "3"]) == "2"
    with pytest.raises(ValueError):
        majority_answer([])
