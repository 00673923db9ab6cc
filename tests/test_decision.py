"""The one decision rule: confidence, threshold, escalate."""

import numpy as np
import pytest

from littlebig.decision import cascade, check_threshold, confidence, escalate, softmax


def test_softmax_is_stable_and_normalised():
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    assert np.allclose(p, [[1.0, 0.0], [0.5, 0.5]]) and p.dtype == np.float32


def test_threshold_edges():
    conf = np.array([0.0, 0.3, 0.5, 0.99999, 1.0], dtype=np.float32)
    assert not escalate(conf, 0.0).any()  # T = 0: nothing goes to big
    assert escalate(conf, 1.0).all()  # T = 1: everything, even confidence exactly 1.0
    assert escalate(conf, 0.5).tolist() == [True, True, False, False, False]  # strictly below T


def test_confidence_rounding_to_one_still_escalates_at_t1():
    probs = softmax(np.array([[80.0, 0.0, 0.0]]))
    assert confidence(probs)[0] == 1.0 and escalate(confidence(probs), 1.0)[0]


@pytest.mark.parametrize("good", [0, 1, 0.25, "0.5", " 0.75 ", np.float32(0.1)])
def test_check_threshold_accepts_numbers_and_numeric_strings(good):
    assert check_threshold(good) == pytest.approx(float(good))


@pytest.mark.parametrize("bad", ["abc", -1, 2, "nan", float("inf"), None, True, [0.5], ""])
def test_check_threshold_rejects_with_a_clear_message(bad):
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\]"):
        check_threshold(bad)


def test_cascade_takes_big_only_where_escalated():
    little = np.array([[5.0, 0.0], [0.1, 0.0]])  # confident -> 0, unsure -> 0
    big = np.array([[0.0, 5.0], [0.0, 5.0]])  # big says 1 for both
    out = cascade(little, big, threshold=0.9)
    assert out["escalated"].tolist() == [False, True]
    assert out["label"].tolist() == [0, 1]
    assert np.allclose(out["probs"][1], softmax(big)[1])
