"""Choose the threshold T on the val split only, with the shared decision rule.

Rules (a registry, each a function of val logits/labels); ``SERVE_RULE`` is the one served by default.

* ``paper`` - the T that minimises expected MACs subject to cascade val accuracy >= big's val
  accuracy (Liu et al.). Expected MACs grow with T, so this is the smallest feasible T. It promises
  nothing beyond val: when little is close to big, val noise decides where the curve first touches big's.
* ``bounded`` (served by default) - Learn-then-Test (Angelopoulos et al., 2021) on the *harm*
  ``H_i(T) = 1{conf_i >= T and little_i wrong and big_i right}``. Per row, the cascade's answer differs
  from big's correctness only where it keeps little's answer, so
  ``acc(big) - acc(cascade) = E[H(T)] - E[G(T)] <= E[H(T)]`` with ``G`` the rows little gets right and
  big wrong. For each T of a fixed, data-independent grid, walked from T = 1 down, the null
  ``E[H(T)] > eps`` is tested with the exact binomial tail ``P(Binomial(n, eps) <= sum H_i)`` (H is
  0/1 and i.i.d. over val rows, so the p-value is exact and valid; sharper than Hoeffding-Bentkus); the
  walk stops at the first T not rejected at level delta. ``E[H(T)]`` only grows as T falls, so this
  fixed-sequence test needs no multiplicity correction and loses nothing to it. **Promise:** with
  probability >= 1 - delta over the draw of val, the served T loses at most eps accuracy against big
  (on traffic drawn like val).
* ``guaranteed`` - the same test on the *disagreement* ``L_i(T) = 1{conf_i >= T and little_i != big_i}``,
  which also bounds the loss (``H <= L``) and needs no labels (big's answer is its own reference, as in
  shadow traffic), but is looser: it also counts rows where both are wrong, or only big is. Same promise,
  a higher T.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from littlebig.decision import confidence, confidence_bin_counts, escalate, softmax

EPS, DELTA = 0.005, 0.05
#: The load governor's default accuracy budget (``littlebig repo --max-accuracy-drop``) and its T steps.
MAX_ACCURACY_DROP, GOVERNOR_STEPS = 0.005, 4


@dataclass(frozen=True)
class Outputs:
    """Both models' logits on one split, with its labels."""

    little_logits: np.ndarray
    big_logits: np.ndarray
    labels: np.ndarray

    @property
    def conf(self) -> np.ndarray:
        return confidence(softmax(self.little_logits))

    @property
    def little_correct(self) -> np.ndarray:
        return self.little_logits.argmax(-1) == self.labels

    @property
    def big_correct(self) -> np.ndarray:
        return self.big_logits.argmax(-1) == self.labels

    @property
    def disagree(self) -> np.ndarray:
        return self.little_logits.argmax(-1) != self.big_logits.argmax(-1)

    @property
    def harm(self) -> np.ndarray:
        """Rows where keeping little's answer costs accuracy against big: little wrong, big right."""
        return self.big_correct & ~self.little_correct

    def resample(self, rows: np.ndarray) -> Outputs:
        """The same split restricted to (or resampled at) ``rows``."""
        return Outputs(self.little_logits[rows], self.big_logits[rows], self.labels[rows])


def evaluate(out: Outputs, threshold: float) -> dict[str, float]:
    """Cascade accuracy and escalation rate at one T (the decision rule decides each row)."""
    esc = escalate(out.conf, threshold)
    correct = np.where(esc, out.big_correct, out.little_correct)
    return {"threshold": float(threshold), "accuracy": float(correct.mean()), "escalation_rate": float(esc.mean())}


def sweep(out: Outputs, thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and escalation rate for many thresholds at once (for curves)."""
    esc = escalate(out.conf[None, :], np.asarray(thresholds)[:, None])
    correct = np.where(esc, out.big_correct[None, :], out.little_correct[None, :])
    return {
        "threshold": np.asarray(thresholds, dtype=np.float64),
        "accuracy": correct.mean(1),
        "escalation_rate": esc.mean(1),
    }


def candidate_thresholds(conf: np.ndarray) -> np.ndarray:
    """Every T that changes a decision on these rows: 0, each distinct confidence, and 1 (all big)."""
    return np.unique(np.concatenate([[0.0, 1.0], conf.astype(np.float64)]))


def rule_paper(out: Outputs) -> float:
    """Smallest T (least big MACs) whose cascade val accuracy is at least big's."""
    target = out.big_correct.mean()
    curve = sweep(out, candidate_thresholds(out.conf))
    feasible = curve["threshold"][curve["accuracy"] >= target - 1e-12]
    return float(feasible.min())


def ltt_grid() -> np.ndarray:
    """The fixed, data-independent test sequence, from T = 1 (always big) down to 0."""
    fine = 1.0 - np.logspace(-6, -1, 101)
    return np.unique(np.concatenate([np.linspace(0.0, 1.0, 1001), fine]))[::-1]


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (n is a few thousand)."""
    if k >= n:
        return 1.0
    i = np.arange(k + 1)
    log_pmf = (
        math.lgamma(n + 1)
        - np.array([math.lgamma(j + 1) + math.lgamma(n - j + 1) for j in i])
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
    )
    top = log_pmf.max()
    return float(min(1.0, math.exp(top) * np.exp(log_pmf - top).sum()))


def learn_then_test(conf: np.ndarray, at_risk: np.ndarray, eps: float = EPS, delta: float = DELTA) -> float:
    """Fixed-sequence Learn-then-Test: the lowest grid T, walking down from 1, before the first T at which
    ``E[1{conf >= T and at_risk}] > eps`` cannot be rejected at level delta (exact binomial tail)."""
    n = len(conf)
    chosen = 1.0
    for t in ltt_grid():
        losses = int((~escalate(conf, t) & at_risk).sum())
        if binomial_cdf(losses, n, eps) > delta:
            break
        chosen = float(t)
    return chosen


def rule_bounded(out: Outputs, eps: float = EPS, delta: float = DELTA) -> float:
    """Learn-then-Test on harm (little wrong, big right): accuracy loss vs big <= eps w.p. >= 1 - delta."""
    return learn_then_test(out.conf, out.harm, eps, delta)


def rule_guaranteed(out: Outputs, eps: float = EPS, delta: float = DELTA) -> float:
    """Learn-then-Test on disagreement (label-free, looser): accuracy loss vs big <= eps w.p. >= 1 - delta."""
    return learn_then_test(out.conf, out.disagree, eps, delta)


def threshold_floor(out: Outputs, threshold: float, max_drop: float = MAX_ACCURACY_DROP) -> float:
    """T_min: the lowest T such that *every* T in [T_min, threshold] keeps val accuracy >= acc(threshold) - max_drop.

    Contiguous on purpose: the load governor walks T down in steps, and each step must stay within the
    budget, not just the last one. Exact: every T that changes a decision is tried (in chunks, so an
    ImageNet-sized val split needs no n x n matrix).
    """
    if not 0.0 <= max_drop < 1.0:
        raise ValueError(f"max accuracy drop must be in [0, 1), got {max_drop!r}")
    ts = candidate_thresholds(out.conf)
    ts = np.unique(np.concatenate([ts[ts <= threshold], [threshold]]))
    accuracy = np.concatenate([sweep(out, ts[i : i + 256])["accuracy"] for i in range(0, len(ts), 256)])
    floor = evaluate(out, threshold)["accuracy"] - max_drop
    below = np.flatnonzero(accuracy < floor - 1e-12)
    return float(ts[below[-1] + 1] if len(below) else ts[0])


def governor_levels(out: Outputs, threshold: float, floor: float, steps: int = GOVERNOR_STEPS) -> list[float]:
    """The governor's T steps from the calibrated T down to T_min, each shedding about the same share of
    val rows from big (T is the quantile of little's val confidence at an evenly stepped escalation rate)."""
    conf = out.conf.astype(np.float64)
    top, bottom = float(escalate(conf, threshold).mean()), float(escalate(conf, floor).mean())
    inner = [float(np.quantile(conf, top - k * (top - bottom) / steps, method="lower")) for k in range(1, steps)]
    levels = [threshold, *(min(max(t, floor), threshold) for t in inner), floor]
    return sorted(set(levels), reverse=True)


def confidence_shares(out: Outputs) -> list[float]:
    """Share of val rows in each ``CONFIDENCE_BINS`` bin (the served histogram's reference)."""
    return (confidence_bin_counts(out.conf) / len(out.labels)).tolist()


def drift_reference(out: Outputs, threshold: float) -> dict[str, object]:
    """What serving traffic looks like if it looks like val: the drift alerts' reference at the served T."""
    return {
        "rows": int(len(out.labels)),
        "escalation_rate": evaluate(out, threshold)["escalation_rate"],
        "confidence_shares": confidence_shares(out),
    }


RULES: dict[str, Callable[[Outputs], float]] = {
    "paper": rule_paper,
    "bounded": rule_bounded,
    "guaranteed": rule_guaranteed,
}
#: The rule whose T is served unless another is named: it states its promise and is the least sensitive
#: to val noise of the three (``threshold_spread``; README, "Calibration").
SERVE_RULE = "bounded"
#: Rules that promise "accuracy loss against big <= EPS with probability >= 1 - DELTA".
PROMISING_RULES = ("bounded", "guaranteed")
SPREAD_DRAWS = 200


def threshold_spread(out: Outputs, rule: str, draws: int = SPREAD_DRAWS, seed: int = 0) -> dict[str, object]:
    """How much ``rule``'s T moves when val is resampled: the rule rerun on ``draws`` bootstrap resamples
    of the rows, each resampled T then applied to the whole split (so the spread of the escalation rate is
    what a different val draw would have served here). Quantiles p5 / p50 / p95 and the p5-p95 width."""
    rng = np.random.default_rng(seed)
    n = len(out.labels)
    ts = np.array([RULES[rule](out.resample(rng.integers(0, n, n))) for _ in range(draws)])
    esc = escalate(out.conf[None, :], ts[:, None]).mean(1)

    def quantiles(values: np.ndarray) -> dict[str, float]:
        p5, p50, p95 = np.quantile(values, [0.05, 0.5, 0.95])
        return {"p5": float(p5), "p50": float(p50), "p95": float(p95), "width": float(p95 - p5)}

    return {"draws": draws, "seed": seed, "threshold": quantiles(ts), "escalation_rate": quantiles(esc)}


def calibrate(out: Outputs, rules: tuple[str, ...] = tuple(RULES)) -> dict[str, dict[str, float]]:
    """Threshold, val figures and the governor's T_min (at ``MAX_ACCURACY_DROP``) for each rule."""
    unknown = set(rules) - set(RULES)
    if unknown:
        raise ValueError(f"unknown rule(s) {sorted(unknown)}; known: {sorted(RULES)}")
    record = {}
    for name in rules:
        threshold = RULES[name](out)
        record[name] = {**evaluate(out, threshold), "t_min": threshold_floor(out, threshold)}
    return record
