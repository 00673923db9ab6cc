"""The one Little-Big decision rule: confidence, threshold, escalate.

Calibration, the offline reference and the served BLS model all import this file (the repository
generator copies it beside the BLS model.py), so it depends on numpy alone. Never copy its logic.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: The served cascade (the BLS model) and the two models it calls: the names the generator, the bench, the GPU
#: check and the tests use (health.py, which must stay self-contained, spells them out and a test compares).
CASCADE = "littlebig"
ROLES = ("little", "big")
#: Why a row was answered as it was: the served REASON output (model.py), in the order of its codes.
REASONS = ("confident", "escalated", "load", "deadline", "big_failed")
#: T at or above this always escalates, so T = 1 means "always big" even where little's float32
#: confidence rounds to exactly 1.0. T = 0 never escalates (no confidence is below 0).
ALWAYS_BIG = 1.0
#: Upper edges of little's confidence bins, (lower, upper]: the served histogram metric and calibration's
#: reference shares (the drift alerts compare the two), so both bin with ``confidence_bin_counts``.
CONFIDENCE_BINS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def confidence(probs: np.ndarray) -> np.ndarray:
    """Little's confidence: its top softmax probability."""
    return np.asarray(probs, dtype=np.float32).max(axis=-1)


def escalate(conf: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """Rows whose confidence is below T go to big; T >= 1 sends every row."""
    t = np.asarray(threshold, dtype=np.float64)
    return (np.asarray(conf, dtype=np.float64) < t) | (t >= ALWAYS_BIG)


def confidence_bin_counts(conf: np.ndarray) -> np.ndarray:
    """Rows per ``CONFIDENCE_BINS`` bin (lower, upper]."""
    return np.bincount(np.searchsorted(CONFIDENCE_BINS, conf), minlength=len(CONFIDENCE_BINS))


def check_threshold(value: object) -> float:
    """Parse a threshold given as a number or numeric string; ValueError names the problem."""
    if isinstance(value, bool):
        raise ValueError(f"threshold must be a number in [0, 1], got boolean {value!r}")
    try:
        t = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in [0, 1], got {value!r}") from None
    if not np.isfinite(t) or not 0.0 <= t <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {value!r}")
    return t


def stage_names(count: int) -> tuple[str, ...]:
    """The stages of a cascade of ``count`` models, cheapest first: little, middle (middle1, middle2, ...), big.

    These are also the served models' names; two stages are exactly ``ROLES``.
    """
    if count < 2:
        raise ValueError(f"a cascade has at least two models, got {count}")
    middles = ["middle"] if count == 3 else [f"middle{i}" for i in range(1, count - 1)]
    return ("little", *middles, "big")


def thresholds_for(thresholds: float | list[float] | tuple[float, ...], stages: int) -> list:
    """One T per transition (stage k -> k + 1): a list of ``stages - 1`` values, or one number for every stage."""
    if not isinstance(thresholds, (list, tuple)):
        return [thresholds] * (stages - 1)
    if len(thresholds) != stages - 1:
        raise ValueError(f"a cascade of {stages} models takes {stages - 1} thresholds, got {len(thresholds)}")
    return list(thresholds)


def answering_stage(confs: list[np.ndarray], thresholds: list) -> np.ndarray:
    """Per row, the stage that answers: the first stage k whose confidence is not below T_{k+1} (``escalate``),
    else the last. ``confs[k]`` is stage k's confidence (k < K - 1; the last stage's is never needed);
    ``thresholds[k]`` is T_{k+1}: a number, one per row, or any shape that broadcasts (a grid of T for curves)."""
    if len(thresholds) != len(confs):
        raise ValueError(f"{len(confs) + 1} stages need {len(confs)} thresholds, got {len(thresholds)}")
    shape = np.broadcast_shapes(*(np.shape(c) for c in confs), *(np.shape(t) for t in thresholds))
    stage = np.full(shape, len(confs), dtype=np.int64)
    for k in reversed(range(len(confs))):
        stage[np.broadcast_to(~escalate(confs[k], thresholds[k]), shape)] = k
    return stage


def cascade_stages(logits: list[np.ndarray], thresholds: float | list) -> dict[str, np.ndarray]:
    """Offline answer of a cascade of any length given every stage's logits for every row (the reference and
    calibration). ``escalated``: the last stage answered. The served model runs stage k only on the rows every
    earlier stage escalated; for those rows the result is the same."""
    probs = [softmax(z) for z in logits]
    stage = answering_stage([confidence(p) for p in probs[:-1]], thresholds_for(thresholds, len(logits)))
    answer = np.choose(stage[:, None], probs)
    return {
        "label": answer.argmax(axis=-1).astype(np.int64), "probs": answer.astype(np.float32),
        "escalated": stage == len(logits) - 1, "stage": stage,
    }


def cascade(little_logits: np.ndarray, big_logits: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """The two-model cascade (``cascade_stages`` of little and big)."""
    return cascade_stages([little_logits, big_logits], [threshold])


class Route(NamedTuple):
    """One served transition (stage k -> k + 1) for the rows still deciding, as masks over those rows."""

    goes_on: np.ndarray  # escalated, with time left for the next stage: sent to it
    late: np.ndarray  # escalated, but the next stage cannot answer before the row's deadline: answered here
    load: np.ndarray  # kept here only because the T in force (the governor's) is below the calibrated one
    below_calibrated: np.ndarray  # escalated at the calibrated T: what val would have escalated


def route(
    conf: np.ndarray,
    own: np.ndarray,
    in_force: float,
    calibrated: float,
    time_left_s: np.ndarray | float = np.inf,
    latency_s: float = 0.0,
) -> Route:
    """Where each row goes at one transition of the served cascade: ``escalate`` at the row's own threshold
    (``own``; NaN where the request gave none: the T in force), then escalated rows whose deadline is nearer than
    the next stage's predicted latency stay here. With ``in_force == calibrated``, no own thresholds and no
    deadlines, ``goes_on`` is exactly ``escalate(conf, calibrated)``: the offline rule (``answering_stage``)."""
    conf, own = np.asarray(conf), np.asarray(own, dtype=np.float64)
    governed = np.isnan(own)
    escalated = escalate(conf, np.where(governed, in_force, own))
    below_calibrated = escalate(conf, calibrated)
    late = escalated & (np.asarray(time_left_s) < latency_s)
    return Route(escalated & ~late, late, ~escalated & governed & below_calibrated, below_calibrated)


#: ``REASONS``' codes: the served REASON output holds ``REASONS[code]`` per row.
CONFIDENT, ESCALATED, LOAD, DEADLINE, BIG_FAILED = range(len(REASONS))


class CascadeRows:
    """One execute's rows through the served cascade, stage by stage (numpy only: tested without a server).

    The BLS model calls the models; this holds what their answers make of each row: the probabilities of the last
    stage that answered it (``probs``, ``stage``), why it was answered there (``reason``: codes of ``REASONS``),
    whether it was sent to the last stage (``escalated``) and whether the stage before answered because that one
    failed (``degraded``). Per stage k: ``route`` picks the rows that go on (the function ``route``, at T_k), the caller
    runs stage k on them, and ``merge`` takes its answers; stage 0 (little) is merged first, on every row.
    """

    def __init__(self, rows: int, classes: int, stages: int) -> None:
        self.last = stages - 1
        self.probs = np.zeros((rows, classes), dtype=np.float32)
        self.stage = np.zeros(rows, dtype=np.int64)
        self.reason = np.full(rows, CONFIDENT, dtype=np.uint8)
        self.escalated = np.zeros(rows, dtype=bool)
        self.degraded = np.zeros(rows, dtype=bool)
        #: Escalated at the calibrated T in front of the last stage, whatever T was in force: the drift signal.
        self.below_calibrated = np.zeros(rows, dtype=bool)
        self.active = np.arange(rows)  # the rows the last merged stage answered: the ones still deciding

    def route(
        self, k: int, own: np.ndarray, in_force: float, calibrated: float, time_left_s: np.ndarray, latency_s: float
    ) -> np.ndarray:
        """The active rows that go on to stage k (``own``, ``time_left_s``: per row of the execute); the ones kept
        for load (in front of the last stage only) or for their deadline get that reason."""
        active = self.active
        step = route(confidence(self.probs[active]), own[active], in_force, calibrated, time_left_s[active], latency_s)
        if k == self.last:  # the drift signal and the governor's rows are about the transition in front of big
            self.below_calibrated[active] = step.below_calibrated
            self.reason[active[step.load]] = LOAD
        self.reason[active[step.late]] = DEADLINE
        return active[step.goes_on]

    def merge(
        self, k: int, going: np.ndarray, chunks: list[tuple[int, int, np.ndarray | None, str | None]], fall_back: bool
    ) -> list[tuple[np.ndarray, str]]:
        """Stage k's answers for the rows ``going``, as chunks (start, stop, logits or None, error or None) over
        them. A failed chunk's rows keep the stage before's answer where ``fall_back`` (never for stage 0: nothing
        answered them yet); otherwise they are returned with the error, for their requests to fail."""
        answered = np.zeros(len(going), dtype=bool)
        failures = []
        for a, b, logits, err in chunks:
            if err is None:
                self.probs[going[a:b]] = softmax(logits)
                answered[a:b] = True
            elif fall_back and k > 0:
                self.degraded[going[a:b]] = True
            else:
                failures.append((going[a:b], err))
        if k == self.last:
            self.escalated[going] = True
        self.active = going[answered]
        self.stage[self.active] = k
        return failures

    def finish(self) -> np.ndarray:
        """After the last stage: the final reasons, and each row's label."""
        self.reason[self.escalated] = ESCALATED
        self.reason[self.degraded] = BIG_FAILED
        return self.probs.argmax(axis=-1).astype(np.int64)
