"""The one decision rule: confidence, threshold, escalate."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from littlebig.decision import (
    REASONS,
    CascadeRows,
    answering_stage,
    cascade,
    cascade_stages,
    check_threshold,
    confidence,
    escalate,
    route,
    softmax,
)


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


unit = st.floats(0.0, 1.0, width=32)


@settings(max_examples=300, deadline=None)
@given(conf=arrays(np.float32, st.integers(0, 40), elements=unit), t=unit)
def test_served_route_without_load_or_deadlines_is_the_offline_rule(conf, t):
    """The BLS's transition at the calibrated T, no request thresholds, no deadlines: exactly the rows the offline
    reference escalates (answering_stage), none late, none kept for load."""
    step = route(conf, np.full(len(conf), np.nan), t, t)
    assert np.array_equal(step.goes_on, answering_stage([conf], [t]) == 1)
    assert not step.late.any() and not step.load.any()
    assert np.array_equal(step.below_calibrated, step.goes_on)


@settings(max_examples=300, deadline=None)
@given(
    conf=arrays(np.float32, 30, elements=unit),
    own=arrays(np.float64, 30, elements=st.one_of(st.just(np.nan), st.floats(0.0, 1.0))),
    in_force=unit, calibrated=unit,
    left=arrays(np.float64, 30, elements=st.floats(0.0, 2.0)), latency=st.floats(0.0, 2.0),
)  # fmt: skip
def test_served_route_under_load_deadlines_and_own_thresholds(conf, own, in_force, calibrated, left, latency):
    """Each row goes on, stays late, or stays; an own threshold wins over the T in force; only escalated rows are
    late, exactly those whose time left is under the latency; load marks governed rows the lowered T kept."""
    step = route(conf, own, in_force, calibrated, left, latency)
    governed = np.isnan(own)
    escalated = escalate(conf, np.where(governed, in_force, own))
    assert np.array_equal(step.goes_on | step.late, escalated) and not (step.goes_on & step.late).any()
    assert np.array_equal(step.late, escalated & (left < latency))
    assert np.array_equal(step.load, governed & ~escalate(conf, in_force) & escalate(conf, calibrated))
    assert not (step.load & (step.goes_on | step.late)).any()
    assert np.array_equal(step.below_calibrated, escalate(conf, calibrated))


def test_served_route_examples():
    conf = np.array([0.5, 0.7, 0.95, 0.6, 0.6], dtype=np.float32)
    own = np.array([np.nan, np.nan, np.nan, 0.9, np.nan])
    left = np.array([9.0, 9.0, 9.0, 9.0, 0.01])
    step = route(conf, own, in_force=0.65, calibrated=0.8, time_left_s=left, latency_s=0.05)
    assert step.goes_on.tolist() == [True, False, False, True, False]  # 0.6 < own 0.9 goes on despite the load T
    assert step.load.tolist() == [False, True, False, False, False]  # 0.7: escalated at 0.8, kept at 0.65
    assert step.late.tolist() == [False, False, False, False, True]  # escalated, 10 ms left, 50 ms to answer


def serve_rows(logits, thresholds, chunk, own=None, in_force=None, time_left=None, latency=0.0, fail=None, fall=False):
    """The served cascade's bookkeeping (``CascadeRows``) driven as the BLS model drives it, with every stage's
    logits known beforehand: stage k answers the rows sent to it in chunks of ``chunk`` (``fail``: the stage whose
    every chunk fails). Returns the rows' state, their labels and the rows whose requests would fail."""
    rows, stages = len(logits[0]), len(logits)
    own = np.full(rows, np.nan) if own is None else own
    time_left = np.full(rows, np.inf) if time_left is None else time_left
    state = CascadeRows(rows, logits[0].shape[1], stages)

    def answers(k, going):
        spans = [(a, min(a + chunk, len(going))) for a in range(0, len(going), chunk)]
        if k == fail:
            return [(a, b, None, f"stage {k} failed") for a, b in spans]
        return [(a, b, logits[k][going[a:b]], None) for a, b in spans]

    failed = [r for r, _ in state.merge(0, state.active, answers(0, state.active), fall_back=False)]
    for k in range(1, stages):
        t = in_force if (in_force is not None and k == stages - 1) else thresholds[k - 1]
        going = state.route(k, own, t, thresholds[k - 1], time_left, latency)
        failed += [r for r, _ in state.merge(k, going, answers(k, going), fall)]
    return state, state.finish(), (np.concatenate(failed) if failed else np.zeros(0, dtype=np.int64))


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**31), rows=st.integers(1, 40), stages=st.integers(2, 4), chunk=st.integers(1, 9),
    data=st.data(),
)  # fmt: skip
def test_served_rows_without_load_or_deadlines_are_the_offline_cascade(seed, rows, stages, chunk, data):
    """Stage by stage on only the escalated rows, in chunks, the served bookkeeping gives each row the offline
    cascade's label, probabilities and answering stage (``cascade_stages``)."""
    rng = np.random.default_rng(seed)
    logits = [rng.normal(0, 3, (rows, 5)).astype(np.float32) for _ in range(stages)]
    thresholds = data.draw(st.lists(unit, min_size=stages - 1, max_size=stages - 1))
    state, labels, failed = serve_rows(logits, thresholds, chunk)
    offline = cascade_stages(logits, thresholds)
    assert not len(failed)
    np.testing.assert_array_equal(labels, offline["label"])
    np.testing.assert_array_equal(state.probs, offline["probs"])
    np.testing.assert_array_equal(state.stage, offline["stage"])
    np.testing.assert_array_equal(state.escalated, offline["escalated"])
    expected = np.where(offline["escalated"], REASONS.index("escalated"), REASONS.index("confident"))
    np.testing.assert_array_equal(state.reason, expected)


def test_served_rows_load_deadline_and_failure_reasons():
    """Two stages, little's confidence known per row: the governor's lower T keeps rows under the calibrated one
    (load), a near deadline keeps an escalated row (deadline), and a failing big either leaves little's answer
    (degraded, big_failed) or fails the rows' requests."""
    little = np.log(np.array([[0.95, 0.05], [0.7, 0.3], [0.55, 0.45], [0.52, 0.48]], dtype=np.float32))
    big = np.array([[0.0, 5.0]] * 4, dtype=np.float32)
    left = np.array([np.inf, np.inf, np.inf, 0.01])
    state, labels, failed = serve_rows([little, big], [0.9], 2, in_force=0.6, time_left=left, latency=0.05)
    names = [REASONS[c] for c in state.reason]
    assert names == ["confident", "load", "escalated", "deadline"] and labels.tolist() == [0, 0, 1, 0]
    assert state.below_calibrated.tolist() == [False, True, True, True] and state.escalated.tolist() == [0, 0, 1, 0]
    state, labels, failed = serve_rows([little, big], [0.9], 1, fail=1, fall=True)
    assert [REASONS[c] for c in state.reason] == ["confident", "big_failed", "big_failed", "big_failed"]
    assert labels.tolist() == [0, 0, 0, 0] and state.degraded.tolist() == [0, 1, 1, 1] and not len(failed)
    state, labels, failed = serve_rows([little, big], [0.9], 2, fail=1, fall=False)
    assert sorted(failed.tolist()) == [1, 2, 3] and not state.degraded.any()
    state, labels, failed = serve_rows([little, big], [0.9], 3, fail=0, fall=True)  # little has nothing to fall to
    assert sorted(failed.tolist()) == [0, 1, 2, 3]
