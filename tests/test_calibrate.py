"""Both calibration rules on synthetic data whose answer is known."""

import math

import numpy as np
import pytest

from littlebig.export.calibrate import (
    Outputs,
    binomial_cdf,
    calibrate,
    evaluate,
    rule_guaranteed,
    rule_paper,
)


def logits_for(conf: np.ndarray, label: np.ndarray, classes: int = 2) -> np.ndarray:
    """Two-class logits whose softmax top probability is ``conf`` on class ``label``."""
    margin = np.log(conf / (1 - conf))
    out = np.zeros((len(conf), classes), dtype=np.float32)
    out[np.arange(len(conf)), label] = margin
    return out


def synthetic(n=4000, knee=0.8, seed=0):
    """little is right exactly where its confidence is >= knee; big is always right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    conf = rng.uniform(0.55, 0.99, n)
    little_pred = np.where(conf >= knee, labels, 1 - labels)
    return Outputs(logits_for(conf, little_pred), logits_for(np.full(n, 0.9), labels), labels), conf


def test_paper_rule_finds_the_knee():
    out, conf = synthetic()
    t = rule_paper(out)
    # The least-MACs T with accuracy >= big (100%) is the smallest confidence at or above the knee.
    assert t == pytest.approx(conf[conf >= 0.8].min(), abs=1e-6)
    assert evaluate(out, t)["accuracy"] == 1.0
    # Any lower candidate keeps the most confident wrong row.
    assert evaluate(out, out.conf[conf < 0.8].max())["accuracy"] < 1.0


def test_paper_rule_falls_back_to_all_big_when_little_never_helps():
    out, _ = synthetic(knee=1.1)  # little always wrong
    assert rule_paper(out) == pytest.approx(out.conf.max(), abs=1e-6) or rule_paper(out) == 1.0
    assert evaluate(out, rule_paper(out))["accuracy"] == 1.0


def test_binomial_cdf_matches_exact_sum():
    n, p = 30, 0.2
    for k in (0, 3, 6, 29, 30):
        exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        assert binomial_cdf(k, n, p) == pytest.approx(min(exact, 1.0), rel=1e-9)


def test_guaranteed_rule_is_conservative_and_valid():
    out, conf = synthetic(n=5000)
    t = rule_guaranteed(out, eps=0.005, delta=0.05)
    # It may keep only rows where (empirically) few disagree: the knee or a little below it.
    kept_disagree = ((conf >= t) & out.disagree).mean()
    assert kept_disagree <= 0.005
    assert 0.75 <= t <= 0.81
    # A looser eps can only lower T (fewer escalations).
    assert rule_guaranteed(out, eps=0.05) <= t


def test_guaranteed_rule_holds_its_promise_over_many_draws():
    """Over many val draws, the fraction where the true loss exceeds eps stays under delta."""
    eps, delta, failures = 0.02, 0.1, 0
    rng = np.random.default_rng(1)
    for _trial in range(60):
        n = 600
        labels = rng.integers(0, 2, n)
        conf = rng.uniform(0.5, 1.0, n)
        wrong = rng.random(n) < (1 - conf) * 0.6  # little disagrees more when unsure
        out = Outputs(
            logits_for(conf, np.where(wrong, 1 - labels, labels)), logits_for(np.full(n, 0.9), labels), labels
        )
        t = rule_guaranteed(out, eps=eps, delta=delta)
        # true risk of keeping rows >= t: integral of (1-c)*0.6 over [t, 1] / 0.5
        true_risk = 0.6 * ((1 - t) ** 2 / 2) / 0.5
        failures += true_risk > eps
    assert failures / 60 <= delta


def test_calibrate_rejects_unknown_rules():
    out, _ = synthetic(n=100)
    with pytest.raises(ValueError, match="unknown rule"):
        calibrate(out, ("paper", "magic"))


def test_paired_difference_ci_is_the_paired_bootstrap():
    """The multinomial shortcut against a literal resampling of images, and its verdicts."""
    from littlebig.export.report import paired_difference_ci, verdict

    rng = np.random.default_rng(1)
    n = 4000
    big = rng.random(n) < 0.92
    cascade = big.copy()
    flip = rng.choice(n, 60, replace=False)  # 60 discordant images, 30 each way: no difference
    cascade[flip[:30]] = ~cascade[flip[:30]] & big[flip[:30]]
    cascade[flip[30:]] = True
    ci = paired_difference_ci(cascade, big)
    idx = rng.integers(0, n, size=(3000, n))  # the literal paired bootstrap
    literal = np.quantile(cascade[idx].mean(1) - big[idx].mean(1), [0.025, 0.975])
    assert np.abs(ci - literal).max() < 0.0006  # same distribution, Monte-Carlo noise only
    assert ci[0] <= cascade.mean() - big.mean() <= ci[1]
    assert verdict(paired_difference_ci(big, big)).startswith("no loss shown")
    worse = big.copy()
    worse[np.flatnonzero(big)[:80]] = False  # 2 points lost
    lo, hi = paired_difference_ci(worse, big)
    assert hi < 0 and verdict((lo, hi)).startswith("loss")
    assert paired_difference_ci(np.stack([worse, big]), np.stack([big, big])).shape == (2, 2)
