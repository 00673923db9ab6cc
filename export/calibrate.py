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

Cascades of K > 2 models (``StageOutputs``, ``calibrate_stages``) choose T_1..T_{K-1} jointly. The objective is
the expected MACs on val (each row pays every stage it reaches); the constraint is the rule's, against the last
model. ``paper``: cascade val accuracy >= the last model's. ``bounded`` / ``guaranteed``: the family of hypotheses
is the product of a fixed, data-independent grid for T_1..T_{K-2} (``OUTER_GRID``) with the LTT grid for T_{K-1}.
With the earlier thresholds fixed, the risk only grows as T_{K-1} falls (it moves rows from big to the stage
before it, nothing else), so each outer point is a fixed-sequence walk, as for two models; the walks are
Bonferroni-corrected, each at delta / |outer points|, so that the family-wise error is at most delta and *any*
rejected point keeps the promise: the one with the least expected MACs is served. Two models: exactly the rules
above (one outer point, no correction).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from littlebig.decision import ALWAYS_BIG, answering_stage, confidence, confidence_bin_counts, escalate, softmax

EPS, DELTA = 0.005, 0.05
#: The load governor's default accuracy budget (``littlebig repo --max-accuracy-drop``) and its T steps.
MAX_ACCURACY_DROP, GOVERNOR_STEPS = 0.005, 4


@dataclass(frozen=True)
class Outputs:
    """Both models' logits on one split, with its labels."""

    little_logits: np.ndarray
    big_logits: np.ndarray
    labels: np.ndarray
    #: the confidence that decides escalation, where it is not little's own (``StageOutputs.last_transition``)
    little_conf: np.ndarray | None = None

    @property
    def conf(self) -> np.ndarray:
        return confidence(softmax(self.little_logits)) if self.little_conf is None else self.little_conf

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
        conf = None if self.little_conf is None else self.little_conf[rows]
        return Outputs(self.little_logits[rows], self.big_logits[rows], self.labels[rows], conf)


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
    """P(Binomial(n, p) <= k) (scipy's, exact to ~1e-12 where n is a few thousand)."""
    from scipy.stats import binom

    return float(binom.cdf(k, n, p))


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


# --- cascades of any length -------------------------------------------------------------------------------------

#: The data-independent values tried for each threshold before the last (T_1..T_{K-2}) of a K > 2 cascade:
#: the Bonferroni family's outer points. 1.0 sends every row on (the shorter cascade without that stage).
OUTER_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 1.0)


@dataclass(frozen=True)
class StageOutputs:
    """Every stage's logits on one split (cheapest first), its labels and each stage's MACs per image."""

    logits: tuple[np.ndarray, ...]
    labels: np.ndarray
    macs: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.logits) < 2 or len(self.macs) != len(self.logits):
            raise ValueError(f"{len(self.logits)} stages' logits with {len(self.macs)} MACs figures")

    @property
    def stages(self) -> int:
        return len(self.logits)

    @cached_property
    def confs(self) -> list[np.ndarray]:
        """Confidence of every stage but the last (the last never escalates)."""
        return [confidence(softmax(z)) for z in self.logits[:-1]]

    @cached_property
    def predictions(self) -> np.ndarray:
        return np.stack([z.argmax(-1) for z in self.logits])

    def pair(self) -> Outputs:
        """The two-model view (first and last stage): every two-model rule applies to it unchanged."""
        return Outputs(self.logits[0], self.logits[-1], self.labels)

    def resample(self, rows: np.ndarray) -> StageOutputs:
        return StageOutputs(tuple(z[rows] for z in self.logits), self.labels[rows], self.macs)

    def stage(self, thresholds: list) -> np.ndarray:
        """The stage answering each row (``decision.answering_stage``: the one rule)."""
        return answering_stage(self.confs, list(thresholds))

    def answer(self, stage: np.ndarray) -> np.ndarray:
        """The answering stage's prediction per row, for a stage array of any leading shape (a grid of T)."""
        predictions = self.predictions.reshape(self.stages, *(1,) * (stage.ndim - 1), -1)
        return np.take_along_axis(predictions, stage[None], 0)[0]

    def harm(self, stage: np.ndarray) -> np.ndarray:
        """Rows answered before the last stage, wrongly, where the last stage is right."""
        last_right = self.predictions[-1] == self.labels
        return (stage < self.stages - 1) & (self.answer(stage) != self.labels) & last_right

    def disagree(self, stage: np.ndarray) -> np.ndarray:
        """Rows answered before the last stage with another answer than the last stage's (label-free)."""
        return (stage < self.stages - 1) & (self.answer(stage) != self.predictions[-1])

    def expected_macs(self, stage: np.ndarray) -> np.ndarray:
        """Mean MACs per row: a row pays every stage up to the one that answers it (axis -1 averaged)."""
        return np.cumsum(self.macs)[stage].mean(-1)

    def evaluate(self, thresholds: list) -> dict[str, object]:
        stage = self.stage(thresholds)
        shares = np.bincount(stage, minlength=self.stages) / len(stage)
        return {
            "thresholds": [float(t) for t in thresholds],
            "threshold": float(thresholds[-1]),
            "accuracy": float((self.answer(stage) == self.labels).mean()),
            "escalation_rate": float(shares[-1]),
            "stage_shares": shares.tolist(),
            "expected_macs": float(self.expected_macs(stage)),
        }

    def last_transition(self, thresholds: list) -> Outputs:
        """The two-model view of the last threshold with the earlier ones fixed: "little" is the stage that would
        answer before the last, and its confidence that of the stage before the last where a row reaches it
        (rows answered earlier never escalate: +inf). The governor's floor and steps are computed on it."""
        outer = [*thresholds[:-1], 0.0]  # T_{K-1} = 0: nothing reaches the last stage
        before = self.stage(outer)
        reaches = before == self.stages - 2
        conf = np.where(reaches, self.confs[-1], np.inf).astype(np.float64)
        composite = np.take_along_axis(np.stack(self.logits[:-1]), before[None, :, None], 0)[0]
        return Outputs(composite, self.logits[-1], self.labels, conf)


def outer_points(stages: int) -> list[tuple[float, ...]]:
    return list(itertools.product(OUTER_GRID, repeat=stages - 2))


def _walk_last(out: StageOutputs, outer: tuple[float, ...], risk: str, eps: float, delta: float) -> float | None:
    """Fixed-sequence LTT on T_{K-1} with T_1..T_{K-2} = ``outer``: the lowest grid T before the first that is not
    rejected; None when even T_{K-1} = 1 (every row that reaches the last transition escalates) is not."""
    n, chosen, grid = len(out.labels), None, ltt_grid()
    for start in range(0, len(grid), 128):  # the risk of 128 grid points at once; the walk itself is sequential
        ts = grid[start : start + 128]
        losses = getattr(out, risk)(out.stage([*outer, ts[:, None]])).sum(-1)
        for t, loss in zip(ts, losses):
            if binomial_cdf(int(loss), n, eps) > delta:
                return chosen
            chosen = float(t)
    return chosen


def joint_thresholds(out: StageOutputs, rule: str, eps: float = EPS, delta: float = DELTA) -> list[float]:
    """T_1..T_{K-1} of ``rule`` (module docstring): the least expected MACs that keeps the rule's promise."""
    if out.stages == 2:
        return [RULES[rule](out.pair())]
    points = outer_points(out.stages)
    found: list[list[float]] = []
    target = float((out.predictions[-1] == out.labels).mean())  # paper: the last model's val accuracy
    ts = np.unique(np.concatenate([[0.0, ALWAYS_BIG], out.confs[-1].astype(np.float64)]))  # paper: every last T
    for outer in points:
        if rule == "paper":
            for chunk in range(0, len(ts), 256):
                grid = ts[chunk : chunk + 256, None]
                acc = (out.answer(out.stage([*outer, grid])) == out.labels).mean(-1)
                ok = np.flatnonzero(acc >= target - 1e-12)
                if len(ok):
                    found.append([*outer, float(grid[ok[0], 0])])
                    break
        else:
            risk = {"bounded": "harm", "guaranteed": "disagree"}[rule]
            last = _walk_last(out, outer, risk, eps, delta / len(points))
            if last is not None:
                found.append([*outer, last])
    if not found:  # never: (1, ..., 1) sends every row to the last stage (risk 0); kept for tiny val splits
        return [ALWAYS_BIG] * (out.stages - 1)
    return min(found, key=lambda ts: (out.expected_macs(out.stage(ts)), [-t for t in ts]))


def calibrate_stages(out: StageOutputs, rules: tuple[str, ...] = tuple(RULES)) -> dict[str, dict[str, object]]:
    """``calibrate`` for a cascade of any length: per rule, T_1..T_{K-1}, val figures per stage and T_min of the
    last threshold (the one the governor lowers). Two models: ``calibrate``'s figures, plus the per-stage keys."""
    unknown = set(rules) - set(RULES)
    if unknown:
        raise ValueError(f"unknown rule(s) {sorted(unknown)}; known: {sorted(RULES)}")
    record = {}
    for name in rules:
        thresholds = joint_thresholds(out, name)
        view = out.last_transition(thresholds)
        record[name] = {**out.evaluate(thresholds), "t_min": threshold_floor(view, thresholds[-1])}
    return record


def calibrate_from_shadow(
    conf: np.ndarray, at_risk: np.ndarray, eps: float = EPS, delta: float = DELTA
) -> dict[str, float]:
    """T from live shadow records (``littlebig.shadow``), with ``guaranteed``'s test and promise.

    The records are a uniform Bernoulli(R) draw of traffic rows, each with the confidence at the last transition
    and whether it is at risk: big disagrees with the answer before big, or big's answer is unknown (a dropped or
    failed shadow call, load, deadline: counted as a loss, so the test stays valid, only conservative). So the
    rows are i.i.d. draws of traffic and ``learn_then_test`` applies unchanged, with the same promise as on val:
    with probability >= 1 - delta, disagreement (>= the accuracy lost against big) <= eps on traffic like these
    rows. Live rows carry no labels, so harm (``bounded``) cannot be measured; disagreement bounds it.
    """
    threshold = learn_then_test(conf, at_risk, eps, delta)
    kept = ~escalate(conf, threshold)
    return {
        "threshold": threshold,
        "thresholds": [threshold],
        "rows": int(len(conf)),
        "escalation_rate": float(1.0 - kept.mean()) if len(conf) else 1.0,
        "disagreement": float((kept & at_risk).mean()) if len(conf) else 0.0,
    }
