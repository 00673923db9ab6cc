"""The calibration rules on synthetic data whose answer is known."""

import math
from fractions import Fraction

import numpy as np
import pytest

from littlebig.export.calibrate import (
    Outputs,
    binomial_cdf,
    calibrate,
    evaluate,
    ltt_grid,
    rule_bounded,
    rule_guaranteed,
    rule_paper,
    threshold_spread,
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


def mixed(n: int, seed: int) -> tuple[Outputs, np.ndarray, np.ndarray, np.ndarray]:
    """little right with probability conf; big right 92% of the time, independently: rows where both are
    wrong, or only big, or only little is right all occur, so harm and disagreement differ."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    conf = rng.uniform(0.5, 1.0, n)
    little_right, big_right = rng.random(n) < conf, rng.random(n) < 0.92
    out = Outputs(
        logits_for(conf, np.where(little_right, labels, 1 - labels)),
        logits_for(np.full(n, 0.9), np.where(big_right, labels, 1 - labels)),
        labels,
    )
    return out, conf, little_right, big_right


def exact_tail_above(k: int, n: int, eps: float, delta: float) -> bool:
    """P(Binomial(n, eps) <= k) > delta in rational arithmetic (no lgamma, no floats)."""
    e, d = Fraction(eps).limit_denominator(10**6), Fraction(delta).limit_denominator(10**6)
    return sum(Fraction(math.comb(n, i)) * e**i * (1 - e) ** (n - i) for i in range(k + 1)) > d


def test_bounded_rule_is_the_walk_on_harm_written_here():
    """The T equals an independent walk: harm counted from the rows' own right/wrong, exact rational tails."""
    out, conf, little_right, big_right = mixed(2000, seed=3)
    eps, delta = 0.02, 0.05
    chosen = 1.0
    for t in ltt_grid():
        kept = (conf >= t) & (t < 1.0)
        if exact_tail_above(int((kept & big_right & ~little_right).sum()), 2000, eps, delta):
            break
        chosen = float(t)
    assert rule_bounded(out, eps=eps, delta=delta) == pytest.approx(chosen, abs=1e-12)
    assert chosen < 1.0
    # Harm is a subset of disagreement: the same promise from the looser loss needs a T at least as high.
    assert rule_guaranteed(out, eps=eps, delta=delta) >= chosen


def test_bounded_rule_holds_its_promise_over_many_draws():
    """The true accuracy loss against big at the chosen T exceeds eps in at most delta of val draws."""
    eps, delta, trials, failures = 0.02, 0.1, 60, 0
    for trial in range(trials):
        out, *_ = mixed(600, seed=100 + trial)
        t = rule_bounded(out, eps=eps, delta=delta)
        # Loss vs big of keeping rows with conf >= t: P(kept) * E[P(little wrong) * P(big right) - P(little
        # right) * P(big wrong) | kept], conf uniform on [0.5, 1]: integral over [t, 1] of the density 2.
        lo = max(t, 0.5)
        harm = 0.92 * (1 - lo) ** 2  # int_lo^1 2 (1 - c) dc * 0.92
        gain = 0.08 * (1 - lo**2)  # int_lo^1 2 c dc * 0.08
        failures += harm - gain > eps
    assert failures / trials <= delta


def test_the_spread_of_t_shrinks_with_more_val_rows():
    """Bootstrap resampling moves T less on a larger val split; it is seeded, and reports its quantiles."""
    small, *_ = mixed(1000, seed=5)
    large, *_ = mixed(16000, seed=5)
    a, b = threshold_spread(small, "bounded", draws=60), threshold_spread(large, "bounded", draws=60)
    assert a == threshold_spread(small, "bounded", draws=60)  # seeded: the same figures twice
    for s in (a, b):
        q = s["threshold"]
        assert q["p5"] <= q["p50"] <= q["p95"] and q["width"] == pytest.approx(q["p95"] - q["p5"])
    assert b["threshold"]["width"] < a["threshold"]["width"]
    assert b["escalation_rate"]["width"] < a["escalation_rate"]["width"]


# --- the calibration record (export/pipeline.py: Calibration) --------------------------------------------------


def test_the_calibration_record_is_written_once_and_read_by_name(build_dir, tmp_path):
    """calibrate_step's typed record is what it writes: the file reads back equal, with its JSON keys in their
    order, and each rule's Ts, escalation rate and T_min are the ones its record holds."""
    import json
    import shutil

    from littlebig.export.pipeline import CALIBRATION_FILE, calibrate_step, read_calibration

    build = tmp_path / "build"
    shutil.copytree(build_dir / "export", build / "export", ignore=shutil.ignore_patterns("*.plan", "*-plan-*"))
    written = calibrate_step(build, ("paper", "guaranteed"), "guaranteed")
    raw = json.loads((build / CALIBRATION_FILE).read_text())
    assert read_calibration(build) == written and written.to_record() == raw
    assert list(raw) == [
        "split", "rows", "serve_rule", "little_acc", "big_acc", "stages", "stage_acc", "rules", "eps", "delta",
        "max_accuracy_drop", "confidence_bins", "confidence_shares",
    ]  # fmt: skip
    assert list(written.rules) == ["paper", "guaranteed"] and written.rule() is written.rules["guaranteed"]
    for name, rule in written.rules.items():
        record = raw["rules"][name]
        assert rule.thresholds == tuple(record["thresholds"]) and rule.threshold == rule.thresholds[-1]
        assert rule.escalation_rate == record["escalation_rate"] and rule.t_min == record["t_min"]
    assert written.rows == raw["rows"] > 0 and written.eps == raw["eps"]
    assert len(written.confidence_shares) == len(written.confidence_bins)
    with pytest.raises(ValueError, match=r"rule 'bounded' was not calibrated; calibrated: \['guaranteed', 'paper'\]"):
        written.rule("bounded")


def test_an_earlier_calibration_file_reads_with_its_defaults():
    """A two-model file from before cascades, eps and the drift reference were recorded, and a rule record with
    one T and no T_min (a shadow recalibration's shape), as ``with_rules`` takes them."""
    from littlebig.export.pipeline import Calibration

    rule = {"threshold": 0.9, "accuracy": 0.93, "escalation_rate": 0.2}
    old = Calibration.from_record(
        {"split": "val", "rows": 10, "serve_rule": "paper", "little_acc": 0.8, "big_acc": 0.9, "rules": {"paper": rule}}
    )
    assert old.stages == ("little", "big") and old.little_acc == 0.8 and old.rows == 10
    assert old.eps is None and old.delta is None and old.confidence_shares == ()
    assert old.rule().thresholds == (0.9,) and old.rule().t_min is None and old.rule().figures == rule
    shadow = old.with_rules({"shadow": {"threshold": 0.7, "thresholds": [0.7], "rows": 5, "escalation_rate": 0.1}})
    assert list(shadow.rules) == ["shadow"] and shadow.rule("shadow").threshold == 0.7 and old.rules["paper"]
    plans = old.with_rules({"paper": {"threshold": 0.61}})  # a tensorrt.json rule may hold only its T
    assert plans.rule().thresholds == (0.61,) and plans.rule().escalation_rate is None
    minimal = Calibration.from_record({"serve_rule": "paper", "rules": {"paper": {"threshold": 0.5}}})
    assert minimal.rows is None and minimal.to_record() == {
        "split": "val", "stages": ["little", "big"], "stage_acc": [], "serve_rule": "paper",
        "rules": {"paper": {"threshold": 0.5}}, "confidence_bins": [], "confidence_shares": [],
    }  # fmt: skip
