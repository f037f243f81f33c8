"""The pure scoring math of evaluate.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qlora_ray.evaluate import accuracy_and_weighted_f1, cosine_distances, match_label

LABELS = ["negative", "neutral", "positive"]


def test_similarity_is_one_minus_cosine():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [3.0, 0.0], [1.0, 0.0]])
    d = cosine_distances(a, b)
    assert d[0] == pytest.approx(0.0)  # same direction: identical
    assert d[1] == pytest.approx(2.0)  # opposite
    assert d[2] == pytest.approx(1.0)  # orthogonal
    assert d[3] == pytest.approx(1.0)  # an empty embedding is never "similar"


def test_earliest_label_in_the_text_wins():
    assert match_label("Positive, not negative", LABELS) == "positive"
    assert match_label("the answer: NEGATIVE.", LABELS) == "negative"
    assert match_label("neutral or positive", LABELS) == "neutral"
    assert match_label("no idea", LABELS) is None


def test_accuracy_and_weighted_f1_match_hand_computation():
    ref = ["positive", "positive", "negative", "neutral"]
    pred = ["positive", "negative", "negative", None]
    acc, f1 = accuracy_and_weighted_f1(pred, ref)
    assert acc == pytest.approx(0.5)
    # positive: P=1, R=.5 -> .667 (support 2); negative: P=.5, R=1 -> .667 (1); neutral: 0 (1)
    assert f1 == pytest.approx((2 * 2 / 3 + 2 / 3 + 0) / 4)


def test_perfect_and_empty():
    assert accuracy_and_weighted_f1(LABELS, LABELS) == (1.0, 1.0)
    acc, f1 = accuracy_and_weighted_f1([], [])
    assert math.isnan(acc) and math.isnan(f1)


def test_labels_match_as_whole_words_not_inside_other_words():
    # Issue 16 item 2: `find` matched "A" inside "Answer", "no" inside "know" and "neutral"
    # inside "non-neutral".
    assert match_label("Answer: B", ["A", "B", "C"]) == "B"
    assert match_label("I don't know", ["yes", "no"]) is None
    assert match_label("non-neutral, clearly negative", LABELS) == "negative"
    assert match_label("Negative!", LABELS) == "negative"  # still case-insensitive
    assert match_label("(positive)", LABELS) == "positive"
    assert match_label("neutral-ish but positive", LABELS) == "positive"
    assert match_label("Label: strong buy", ["strong", "strong buy"]) == "strong buy"  # longer wins at a tie
