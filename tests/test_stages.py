"""Cascades of any length: the one decision rule for K stages and the joint calibration.

Expected values come from independent computations: a per-row walk in plain Python for the rule, the
two-model functions for K = 2, and a large synthetic population for the promise.
"""

import numpy as np
import pytest

from littlebig.decision import answering_stage, cascade_stages, confidence, softmax, stage_names
from littlebig.export.calibrate import (
    DELTA,
    EPS,
    OUTER_GRID,
    RULES,
    Outputs,
    StageOutputs,
    calibrate,
    calibrate_stages,
    joint_thresholds,
)


def test_stage_names():
    assert stage_names(2) == ("little", "big")
    assert stage_names(3) == ("little", "middle", "big")
    assert stage_names(4) == ("little", "middle1", "middle2", "big")
    with pytest.raises(ValueError, match="at least two"):
        stage_names(1)


def walk(confs_row: list[float], thresholds: list[float]) -> int:
    """One row through the cascade, by hand: stay at the first stage that is sure enough."""
    for k, (c, t) in enumerate(zip(confs_row, thresholds)):
        if not (c < t or t >= 1.0):
            return k
    return len(thresholds)


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_answering_stage_is_the_per_row_walk(stages):
    rng = np.random.default_rng(stages)
    n = 500
    confs = [rng.uniform(0.3, 1.0, n).astype(np.float32) for _ in range(stages - 1)]
    confs[0][:5] = 1.0  # exactly 1.0 still escalates at T = 1
    for thresholds in ([0.7] * (stages - 1), list(rng.uniform(0.4, 1.0, stages - 1)), [1.0] * (stages - 1)):
        got = answering_stage(confs, thresholds)
        expected = [walk([float(c[i]) for c in confs], thresholds) for i in range(n)]
        assert got.tolist() == expected


def test_answering_stage_broadcasts_a_grid_of_last_thresholds():
    rng = np.random.default_rng(1)
    confs = [rng.uniform(0, 1, 50), rng.uniform(0, 1, 50)]
    grid = np.array([0.2, 0.5, 0.9])
    got = answering_stage(confs, [0.6, grid[:, None]])
    assert got.shape == (3, 50)
    for row, t in zip(got, grid):
        assert row.tolist() == answering_stage(confs, [0.6, t]).tolist()


def test_three_stages_take_each_answer_from_the_stage_that_answers():
    little = np.array([[5.0, 0.0], [0.1, 0.0], [0.1, 0.0]])  # sure, unsure, unsure
    middle = np.array([[0.0, 0.0], [0.0, 6.0], [0.2, 0.0]])  # -, sure of 1, unsure
    big = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 7.0]])  # -, -, says 1
    out = cascade_stages([little, middle, big], [0.9, 0.9])
    assert out["stage"].tolist() == [0, 1, 2]
    assert out["label"].tolist() == [0, 1, 1]
    assert out["escalated"].tolist() == [False, False, True]
    assert np.array_equal(out["probs"][1], softmax(middle)[1]) and np.array_equal(out["probs"][2], softmax(big)[2])


def test_two_stages_are_the_two_model_cascade():
    rng = np.random.default_rng(2)
    little, big = rng.normal(size=(300, 5)) * 3, rng.normal(size=(300, 5)) * 3
    out = cascade_stages([little, big], 0.8)
    esc = confidence(softmax(little)) < 0.8
    assert np.array_equal(out["escalated"], esc)
    assert np.array_equal(out["probs"], np.where(esc[:, None], softmax(big), softmax(little)))


def two_class_logits(conf: np.ndarray, label: np.ndarray) -> np.ndarray:
    out = np.zeros((len(conf), 2), dtype=np.float32)
    out[np.arange(len(conf)), label] = np.log(conf / (1 - conf))
    return out


def population(n: int, seed: int) -> StageOutputs:
    """little right where its confidence >= 0.8, the middle right where its own >= 0.75 (and on 60% of the rest),
    big right on 97%: a middle stage that pays, and harm that grows as the thresholds fall."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    c_little, c_middle = rng.uniform(0.55, 0.995, n), rng.uniform(0.55, 0.995, n)
    little = np.where(c_little >= 0.8, labels, 1 - labels)
    middle = np.where((c_middle >= 0.75) | (rng.random(n) < 0.6), labels, 1 - labels)
    big = np.where(rng.random(n) < 0.97, labels, 1 - labels)
    big_logits = two_class_logits(np.full(n, 0.9), big)
    logits = (two_class_logits(c_little, little), two_class_logits(c_middle, middle), big_logits)
    return StageOutputs(logits, labels, (1.0, 10.0, 100.0))


def test_two_stages_calibrate_exactly_as_the_two_model_rules():
    full = population(3000, 0)
    pair = StageOutputs((full.logits[0], full.logits[2]), full.labels, (1.0, 100.0))
    joint, classic = calibrate_stages(pair), calibrate(Outputs(full.logits[0], full.logits[2], full.labels))
    for rule in RULES:
        assert joint[rule]["thresholds"] == [classic[rule]["threshold"]]
        for key, value in classic[rule].items():
            assert joint[rule][key] == value, (rule, key)


def test_joint_bounded_keeps_its_promise_and_uses_the_middle():
    """Over 30 val draws the accuracy lost against big, measured on 200,000 fresh rows, exceeds eps in at most
    delta of them (binomial slack: <= 4 of 30); and the least-MACs choice sends rows to the middle stage."""
    truth = population(200_000, 99)
    big_acc = float((truth.predictions[-1] == truth.labels).mean())
    violations, middle_shares = 0, []
    for seed in range(30):
        ts = joint_thresholds(population(2000, seed), "bounded")
        assert ts[0] in OUTER_GRID
        fig = truth.evaluate(ts)
        violations += big_acc - fig["accuracy"] > EPS
        middle_shares.append(fig["stage_shares"][1])
    assert violations <= 4, f"{violations} of 30 draws lost more than eps={EPS} (delta={DELTA})"
    assert np.median(middle_shares) > 0.05


def test_joint_paper_meets_big_on_val_with_least_macs():
    val = population(3000, 5)
    ts = joint_thresholds(val, "paper")
    fig = val.evaluate(ts)
    assert fig["accuracy"] >= float((val.predictions[-1] == val.labels).mean())
    # No outer point with its own least feasible last T costs fewer MACs (brute force over a coarse last grid).
    for t1 in OUTER_GRID:
        for t2 in np.linspace(0, 1, 101):
            other = val.evaluate([t1, t2])
            if other["accuracy"] >= float((val.predictions[-1] == val.labels).mean()):
                assert other["expected_macs"] >= fig["expected_macs"] - 1e-9


def test_last_transition_view_counts_rows_answered_earlier_as_never_escalating():
    val = population(1000, 3)
    view = val.last_transition([0.8, 0.9])
    before = val.stage([0.8, 0.0])
    assert np.isinf(view.conf[before == 0]).all()
    assert np.array_equal(view.conf[before == 1], val.confs[1][before == 1])
    for t in (0.6, 0.85, 0.95):
        assert np.array_equal(view.conf < t, val.stage([0.8, t]) == 2)
