"""Choose the threshold T on the val split only, with the shared decision rule.

Rules (a registry, each a function of val logits/labels):

* ``paper`` - the T that minimises expected MACs subject to cascade val accuracy >= big's val
  accuracy (Liu et al.). Expected MACs grow with T, so this is the smallest feasible T.
* ``guaranteed`` - Learn-then-Test (Angelopoulos et al., 2021) on the 0/1 loss
  ``L_i(T) = 1{conf_i >= T and little_i != big_i}``: the cascade can only lose accuracy against big on
  rows it keeps and where little disagrees with big, so ``acc(big) - acc(cascade) <= E[L(T)]``.
  For each T the null ``E[L(T)] > eps`` is tested with the exact binomial tail
  ``P(Binomial(n, eps) <= sum L_i)`` (valid and sharper than Hoeffding-Bentkus because L is 0/1),
  walking a fixed, data-independent grid from the most conservative T = 1 downwards and stopping at
  the first T whose p-value exceeds delta (fixed-sequence testing, no multiplicity correction needed).
  With probability >= 1 - delta the chosen T loses at most eps accuracy against big.
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


def rule_guaranteed(out: Outputs, eps: float = EPS, delta: float = DELTA) -> float:
    """Learn-then-Test fixed-sequence threshold: accuracy loss vs big <= eps w.p. >= 1 - delta."""
    n = len(out.labels)
    conf, disagree = out.conf, out.disagree
    chosen = 1.0
    for t in ltt_grid():
        losses = int((~escalate(conf, t) & disagree).sum())
        if binomial_cdf(losses, n, eps) > delta:
            break
        chosen = float(t)
    return chosen


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


RULES: dict[str, Callable[[Outputs], float]] = {"paper": rule_paper, "guaranteed": rule_guaranteed}


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
