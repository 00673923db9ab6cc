"""The BLS model's control loop, apart from Triton: when to stop calling a model (``Breaker``), which T
is in force under load (``Governor``) and for accuracy (``Guard``), what a request asks for (``request_settings``:
its own threshold, its deadline, the health probe's mark), and the table of the BLS model's config parameters
(``BLS_PARAMETERS``), which the generator writes and the BLS model reads. Stdlib, numpy and the sibling
``decision`` and ``shadow`` only, so the tests exercise the same code the server runs: the generator installs this
file beside the BLS model.py, as it does ``decision.py``; both live in ``littlebig/`` so that tests and tools
import them as ``littlebig.control``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

try:  # in the served repository: the generator's copies beside model.py
    from decision import ALWAYS_BIG, check_threshold, escalate
    from shadow import wilson_cc
except ImportError:  # tests and tools
    from littlebig.decision import ALWAYS_BIG, check_threshold, escalate
    from littlebig.shadow import wilson_cc


#: How a parameter's string is written (by the generator) and read (by the BLS model), by kind.
PARAMETER_KINDS = {
    "float": (str, float),
    "int": (str, int),
    "str": (str, str),
    "bool": (lambda value: str(bool(value)).lower(), lambda text: text == "true"),
    "json": (json.dumps, json.loads),
}

#: The BLS model's config.pbtxt parameters and their kinds: the generator writes exactly these
#: (``encode_parameters``) and the BLS model reads them by name (``read_parameters``), so the two cannot disagree
#: on a name or a format. ``rule``, ``t_min``, ``max_accuracy_drop`` and ``class_names`` are for the config's
#: readers (operators, clients); the BLS model does not use them.
BLS_PARAMETERS = {
    "threshold": "float",
    "thresholds": "json",
    "rule": "str",
    "stage_models": "json",
    "stage_max_batch_sizes": "json",
    "bls_timeout_ms": "float",
    "on_big_failure": "str",
    "class_names": "json",
    "little_in_process": "bool",
    "intra_op_threads": "int",
    "inter_op_threads": "int",
    "slo_p99_ms": "float",
    "max_accuracy_drop": "float",
    "t_min": "float",
    "governor_thresholds": "json",
    "calibration_rows": "int",
    "calibrated_escalation_rate": "float",
    "calibrated_confidence_shares": "json",
    "calibrated_eps": "float",
    "shadow_rate": "float",
    "shadow_seed": "int",
    "shadow_log_dir": "str",
    "guard": "bool",
    "guard_eps": "float",
    "guard_alpha": "float",
}


def encode_parameters(values: dict[str, object]) -> dict[str, str]:
    """Every BLS parameter as its config string; ValueError where ``values`` misses one or has another."""
    if set(values) != set(BLS_PARAMETERS):
        missing, extra = sorted(set(BLS_PARAMETERS) - set(values)), sorted(set(values) - set(BLS_PARAMETERS))
        raise ValueError(f"BLS parameters: missing {missing}, unknown {extra}")
    return {name: PARAMETER_KINDS[BLS_PARAMETERS[name]][0](values[name]) for name in BLS_PARAMETERS}


def read_parameters(texts: dict[str, str]) -> dict[str, object]:
    """Every BLS parameter of a config, read by its kind (others are ignored). ValueError names the missing ones
    (a hand-edited or foreign config: the generator writes them all) or one whose text its kind cannot read."""
    missing = [name for name in BLS_PARAMETERS if name not in texts]
    if missing:
        raise ValueError(f"no parameter {', '.join(missing)}: generate the repository with `littlebig repo`")
    values = {}
    for name, kind in BLS_PARAMETERS.items():
        try:
            values[name] = PARAMETER_KINDS[kind][1](texts[name])
        except ValueError:
            raise ValueError(f"parameter {name!r} must be {kind}, got {texts[name]!r}") from None
    return values


def check_deadline(value: object) -> float:
    """A request's ``deadline_ms`` (a number or numeric string, > 0) in seconds; ValueError names the problem."""
    try:
        ms = float(value) if not isinstance(value, bool) else float("nan")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ms = float("nan")
    if not np.isfinite(ms) or ms <= 0:
        raise ValueError(f"deadline_ms must be a number of milliseconds > 0, got {value!r}")
    return ms / 1000


#: Request parameter that marks a health probe (model_repository/health.py sends it): its rows are answered
#: as any others but kept out of every traffic metric, so probes never look like drift.
PROBE_PARAMETER = "littlebig_probe"


class RequestSettings(NamedTuple):
    """One request's own settings: its ``threshold`` (``own``; None: the T in force), its ``deadline_ms`` in
    seconds (inf: none), whether it is a health probe's, and what is wrong with its parameters (None: nothing; else
    the request alone is answered INVALID_ARGUMENT with this message)."""

    own: float | None
    deadline_s: float
    probe: bool
    error: str | None = None


def request_settings(parameters: str | None) -> RequestSettings:
    """A request's settings from its parameters' JSON (``InferenceRequest.parameters()``); never raises."""
    try:
        params = json.loads(parameters or "{}")
    except ValueError as exc:
        return RequestSettings(None, math.inf, False, f"invalid request parameters: {exc}")
    if not isinstance(params, dict):
        return RequestSettings(None, math.inf, False, f"invalid request parameters: not a JSON object: {parameters}")
    value = params.get(PROBE_PARAMETER, False)
    probe = value is True or (isinstance(value, str) and value.lower() == "true")  # "true": perf_analyzer's strings
    try:
        own = check_threshold(params["threshold"]) if "threshold" in params else None
    except ValueError as exc:
        return RequestSettings(None, math.inf, probe, f"invalid 'threshold' parameter: {exc}")
    try:
        deadline = check_deadline(params["deadline_ms"]) if "deadline_ms" in params else math.inf
    except ValueError as exc:
        return RequestSettings(own, math.inf, probe, f"invalid 'deadline_ms' parameter: {exc}")
    return RequestSettings(own, deadline, probe)


class Breaker:
    """When littlebig stops sending work to one model, and when it starts again (per BLS instance).

    - Open while a call is past the timeout and still executing (``overdue``): nothing new is sent.
    - For big (``shed``): while the last finished call took longer than the timeout, escalated rows
      go straight to the failure policy, and once per ``probe_s`` one call is sent without waiting
      for it (a probe). A probe that finishes in time closes the breaker. No request ever waits on
      a probe, so a slow big costs no latency, and it gets at most one call per second.

    It also predicts what a call sent now would take (``predicted_latency_s``), for deadlines. (The
    governor reads its own signal, ``Governor.predicted_p99_s``, and only the age of a call in flight here.)
    """

    #: Weight of the newest call in the latency average; a result older than ``stale_s`` no longer counts.
    alpha, stale_s = 0.3, 2.0

    def __init__(self, role, timeout_s, shed, probe_s=1.0):
        self.role, self.timeout_s, self.shed, self.probe_s = role, timeout_s, shed, probe_s
        self.overdue = set()
        self.in_flight = {}  # call -> when it was sent
        self.last_latency_s = self.mean_latency_s = 0.0
        self.last_done = -float("inf")
        self.next_probe = 0.0

    def sent(self, future, when):
        self.in_flight[future] = when

    def finished(self, future):
        """Done callback of every call: remember its latency; an abandoned call's error is not news."""
        self.last_done = time.monotonic()
        self.last_latency_s = self.last_done - self.in_flight.pop(future, self.last_done)
        self.mean_latency_s += self.alpha * (self.last_latency_s - self.mean_latency_s)
        self.overdue.discard(future)
        if not future.cancelled():
            future.exception()

    def in_flight_s(self, now):
        """Age of the oldest call still in flight (0 if none)."""
        return now - min(self.in_flight.values(), default=now)

    def predicted_latency_s(self, now):
        """What a call sent now would wait (queue + compute): the recent average, or the age of the oldest
        call still in flight where that is longer (a growing queue shows there before any call returns)."""
        recent = self.mean_latency_s if now - self.last_done < self.stale_s else 0.0
        return max(recent, self.in_flight_s(now))

    def track(self, calls):
        self.overdue.update(c for c in calls if not c.done())

    def refusal(self, now):
        """Why no work goes to the model now, or None."""
        if self.overdue:
            return (
                f"{self.role} timed out: a call to it is still executing past the {self.timeout_s * 1000:.0f} ms "
                "timeout; no new work goes to it until it answers"
            )
        if self.shed and self.last_latency_s > self.timeout_s:
            return (
                f"{self.role} timed out: its last call took {self.last_latency_s * 1000:.0f} ms (timeout "
                f"{self.timeout_s * 1000:.0f} ms); rows go to the failure policy until a probe answers in time"
            )
        return None

    def probe_due(self, now):
        if not self.shed or self.overdue or now < self.next_probe:
            return False
        self.next_probe = now + self.probe_s
        return True


class Governor:
    """The T in force for rows without their own threshold: the calibrated T, lowered under load.

    ``levels`` runs from the calibrated T down to T_min, each step shedding about the same share of val rows
    from big; every level keeps val accuracy within ``max_accuracy_drop`` of the calibrated T's, so the cost
    of any load is bounded and known. The signal is a predicted p99 latency (``predicted_p99_s``): twice the
    slowest execute of this BLS instance in the last second (a request that arrives while one execute runs
    waits for it in littlebig's queue, then runs in the next), or twice the age of a big call still in flight
    when that is longer (a stalled big shows there before any execute ends). littlebig's queue time is not
    visible to a Python model; this bounds it. ``make overload`` measured that big's call latency alone misses
    the overload: at 2x, requests waited in littlebig's queue while big's calls stayed short.

    - Above ``high`` (by default the SLO itself): one step down, at most once per ``settle_s``.
    - Below ``low`` (0.6 x the SLO) for ``hold_s`` in a row: one step up toward the calibrated T, and one
      more for every further ``hold_s``.
    - In between: no change.
    The band between ``low`` and ``high`` and the slow way up (``hold_s`` >> ``settle_s``) are the
    hysteresis: T falls fast when the queue grows and climbs back one step at a time when it has drained,
    so it does not oscillate with every burst. Without an SLO there is one level: T never moves.

    The signal is seen only when a request arrives, so time without requests counts as calm: the calm clock
    starts at the last signal that was not calm, not at the first calm one. After a burst and a quiet spell
    of ``k * hold_s`` the first request is served ``k`` steps up (at the calibrated T after a long quiet),
    instead of at T_min until traffic has run calm for the whole climb.
    """

    def __init__(self, levels, slo_s, high=1.0, low=0.6, settle_s=0.5, hold_s=3.0, window_s=1.0):
        self.levels = list(levels) if slo_s else list(levels)[:1]
        self.high_s, self.low_s = high * slo_s, low * slo_s
        self.settle_s, self.hold_s, self.window_s = settle_s, hold_s, window_s
        self.level = 0
        self.changed = self.calm_since = self.last_loaded = -float("inf")
        self.executes = deque()  # (finished, seconds) of this instance's recent executes

    def executed(self, seconds, now):
        """Record one execute's wall time (its requests' time in the model)."""
        self.executes.append((now, seconds))

    def predicted_p99_s(self, now, big_in_flight_s=0.0):
        """2 x the slowest execute of the last ``window_s`` (or of a big call in flight); 0 when idle."""
        while self.executes and now - self.executes[0][0] > self.window_s:
            self.executes.popleft()
        return 2 * max(max((d for _, d in self.executes), default=0.0), big_in_flight_s)

    @property
    def threshold(self):
        return self.levels[self.level]

    @property
    def calibrated(self):
        return self.levels[0]

    def update(self, signal_s, now):
        """Move T for a predicted p99 latency of ``signal_s``; True when T changed."""
        if signal_s >= self.low_s:
            self.calm_since, self.last_loaded = -float("inf"), now
            if signal_s > self.high_s and self.level + 1 < len(self.levels) and now - self.changed >= self.settle_s:
                self.level, self.changed = self.level + 1, now
                return True
            return False
        if self.calm_since == -float("inf"):
            self.calm_since = self.last_loaded  # no request since then: that time was calm too
        if self.level == 0:
            return False
        steps = int((now - max(self.calm_since, self.changed)) // self.hold_s)
        if steps > 0:
            self.level, self.changed = max(0, self.level - steps), now
            return True
        return False


# --- the accuracy guard ----------------------------------------------------------------------------------------
#
# The accuracy guard: the served cascade raises its own T when shadow rows show it disagrees with big by more
# than eps, and lowers it again only on evidence.
#
# What it observes: the rows shadow sampling draws (a uniform R-share of traffic) whose big answer is known, each
# as (the answer-before-big's confidence, whether that answer differs from big's). An escalated row's big answer
# comes with the escalation; a confident row's from its shadow call. From the pair, the cascade's disagreement at
# *any* T is known for the row: ``~escalate(conf, T) & mismatch`` (the shared decision rule). An execute whose drawn
# rows are not all known (shadow work dropped or failed) gives no observation at all, so the dropped confident
# rows cannot bias the stream towards the escalated ones.
#
# The tests are anytime-valid: betting e-processes (Shafer and Vovk's game-theoretic testing; the betting form of
# Waudby-Smith and Ramdas, "Estimating means of bounded random variables by betting", JRSS B 86(1), 2024). Under
# the null, the wealth ``K_t = prod (1 + lambda_i (X_i - eps))`` with a bet ``lambda_i >= 0`` fixed before ``X_i``
# is seen is a nonnegative supermartingale, so by Ville's inequality P(K ever reaches 1/alpha) <= alpha however
# long the monitoring runs and however often it is looked at.
#
# - **Raise.** H0: the disagreement at the guard's T is <= eps. When K reaches 1/alpha the guard fires: T goes to
#   the smallest level whose Wilson upper bound (``shadow.wilson_cc``) on the last ``window`` observations is
#   within eps, or to ``ALWAYS_BIG`` (every row escalated) when too few rows back any level. The bet is the
#   predictable plug-in ``(m - eps) / (m (1 - m) + (m - eps)^2)`` (GRAPA's approximation), m the test's own
#   observations so far discounted with a half-life of ``BET_HALF_LIFE`` rows, clipped to [0, 0.5 / eps]: on
#   traffic within eps it bets nothing and its wealth stays put, so a later shift is seen as soon as it starts,
#   not after paying back a long clean run.
# - **Lower.** While T is raised, every level below it, down to the calibrated T, runs the mirror test, H0: the
#   disagreement at that level is >= eps, at alpha / (number of levels) (Bonferroni). T goes down to the lowest
#   level whose test rejects: only as fast as the evidence allows.
#
# Each change restarts every test on the observations that follow. With the governor: while the guard has not
# raised T, the governor's T (latency) is served; once raised, the guard's T wins (accuracy first).


#: Observations the raise picks its level on: the most recent ones, few enough to be mostly the traffic that made
#: the test fire (a longer window mixed with the rows before a shift picks too low a T), enough to certify a level
#: within eps = 1% with no disagreement among them.
WINDOW = 500
#: Pseudo-observations at eps in the bet's plug-in estimate: no bet until the stream itself leans.
PRIOR_ROWS = 20
#: Levels above the calibrated T: 1 - (1 - T_cal) x RATIO^k for k = 1..LEVELS, then ALWAYS_BIG.
LEVELS, RATIO = 12, 0.6
#: Half-life, in observations, of the rows the bet's estimate weighs: it follows a shift in a few hundred rows
#: instead of averaging it with every row since the test started.
BET_HALF_LIFE = 500
#: Largest bet, as a share of the one that could zero the wealth (1 / eps raising; 1 / (1 - eps) lowering).
MAX_BET = 0.5


def guard_levels(calibrated: float) -> list[float]:
    """The guard's T levels, calibrated first: geometric in 1 - T (confidence crowds near 1), then ALWAYS_BIG."""
    gap = 1.0 - calibrated
    levels = [calibrated] + [1.0 - gap * RATIO**k for k in range(1, LEVELS + 1)] + [ALWAYS_BIG]
    return sorted({round(t, 10) for t in levels if calibrated <= t <= ALWAYS_BIG})


def z_one_sided(alpha: float) -> float:
    """z with P(N(0, 1) > z) = alpha (bisection on erfc: no scipy inside the server)."""
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * math.erfc(mid / math.sqrt(2)) > alpha else (lo, mid)
    return (lo + hi) / 2


def grapa_bet(hits: float, rows: float, eps: float, direction: int) -> float:
    """The plug-in bet for ``direction`` +1 (the mean is above eps) or -1 (below), from ``hits`` of ``rows`` (the
    test's observations, discounted by ``BET_HALF_LIFE``), shrunk towards eps by ``PRIOR_ROWS``; 0 while the
    estimate leans the other way."""
    m = (hits + eps * PRIOR_ROWS) / (rows + PRIOR_ROWS)
    edge = direction * (m - eps)
    if edge <= 0:
        return 0.0
    cap = MAX_BET / (eps if direction > 0 else 1.0 - eps)
    return min(edge / (m * (1.0 - m) + edge * edge), cap)


@dataclass
class Test:
    """One betting test of the mean of a 0/1 stream against eps: log wealth, and the discounted hits and rows its
    bet is set from."""

    log_wealth: float = 0.0
    hits: float = 0.0
    rows: float = 0.0

    def update(self, x: np.ndarray, eps: float, direction: int) -> None:
        """One block of observations with one bet, set before the block is seen (rows of a block are independent
        draws, so the product of their factors keeps the supermartingale property)."""
        if not len(x):
            return
        bet = grapa_bet(self.hits, self.rows, eps, direction)
        if bet > 0:
            factors = 1.0 + bet * direction * (x.astype(np.float64) - eps)
            self.log_wealth += float(np.log(factors).sum())
        keep = 0.5 ** (len(x) / BET_HALF_LIFE)
        self.hits = self.hits * keep + float(x.sum())
        self.rows = self.rows * keep + len(x)


class Guard:
    """The guard of one BLS instance (module docstring). ``observe`` takes each execute's known drawn rows and
    says whether T changed; ``threshold`` is the guard's T; ``state``/``restore`` make it survive a restart."""

    def __init__(self, calibrated: float, eps: float, alpha: float, window: int = WINDOW) -> None:
        if not 0.0 < eps < 1.0:
            raise ValueError(f"guard eps must be in (0, 1), got {eps!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"guard alpha must be in (0, 1), got {alpha!r}")
        self.calibrated, self.eps, self.alpha = float(calibrated), float(eps), float(alpha)
        self.levels = guard_levels(self.calibrated)
        self.z = z_one_sided(alpha)
        self.threshold = self.calibrated
        self.recent: deque[tuple[float, bool]] = deque(maxlen=window)
        self.firings = 0
        self.lowerings = 0
        self.cannot_meet = False  # the last raise found no level within eps: every row goes to big
        self._restart()

    def _restart(self) -> None:
        self.raise_test = Test()
        self.lower_tests = {t: Test() for t in self.levels if t < self.threshold}

    @property
    def raised(self) -> bool:
        return self.threshold > self.calibrated

    @property
    def log_threshold(self) -> float:
        """Log wealth at which the raise test fires (log 1/alpha)."""
        return math.log(1.0 / self.alpha)

    def disagreement(self, conf: np.ndarray, mismatch: np.ndarray, threshold: float) -> np.ndarray:
        """Per row, whether the cascade at ``threshold`` would answer it differently from big."""
        return ~escalate(conf, threshold) & mismatch

    def observe(self, conf: np.ndarray, mismatch: np.ndarray) -> bool:
        """One execute's known drawn rows (confidence before big, answer differs from big's). True: T changed."""
        conf = np.asarray(conf, dtype=np.float64).reshape(-1)
        mismatch = np.asarray(mismatch, dtype=bool).reshape(-1)
        if not len(conf):
            return False
        self.recent.extend(zip(conf.tolist(), mismatch.tolist()))
        self.raise_test.update(self.disagreement(conf, mismatch, self.threshold), self.eps, +1)
        if self.threshold < ALWAYS_BIG and self.raise_test.log_wealth >= self.log_threshold:
            self.threshold = self._lowest_within_eps(self.threshold)
            self.firings += 1
            self._restart()
            return True
        if self.lower_tests:
            bar = math.log(len(self.lower_tests) / self.alpha)
            for t, test in self.lower_tests.items():
                test.update(self.disagreement(conf, mismatch, t), self.eps, -1)
            proven = [t for t, test in self.lower_tests.items() if test.log_wealth >= bar]
            if proven:
                self.threshold = min(proven)
                self.lowerings += 1
                self.cannot_meet = False
                self._restart()
                return True
        return False

    def _lowest_within_eps(self, above: float) -> float:
        """The smallest level above ``above`` whose Wilson upper bound on the recent rows is within eps."""
        conf = np.array([c for c, _ in self.recent])
        mismatch = np.array([m for _, m in self.recent], dtype=bool)
        for t in self.levels:
            if t <= above or t >= ALWAYS_BIG:
                continue
            hits = int(self.disagreement(conf, mismatch, t).sum())
            if wilson_cc(hits, len(conf), self.z)[1] <= self.eps:
                self.cannot_meet = False
                return t
        self.cannot_meet = True
        return ALWAYS_BIG

    def state(self) -> dict:
        """What a restart needs: the configuration it belongs to, T, the tests' wealth and the recent rows."""
        return {
            "calibrated": self.calibrated, "eps": self.eps, "alpha": self.alpha, "threshold": self.threshold,
            "firings": self.firings, "lowerings": self.lowerings, "cannot_meet": self.cannot_meet,
            "raise_test": vars(self.raise_test),
            "lower_tests": [[t, vars(test)] for t, test in self.lower_tests.items()],
            "recent": [list(r) for r in self.recent],
        }  # fmt: skip

    def restore(self, state: dict) -> bool:
        """Take a saved ``state`` if it belongs to this calibration (T, eps, alpha); False (fresh start) if not."""
        same = all(math.isclose(float(state.get(k, -1)), getattr(self, k)) for k in ("calibrated", "eps", "alpha"))
        if not same or float(state["threshold"]) not in self.levels:
            return False
        self.threshold = float(state["threshold"])
        self.firings, self.lowerings = int(state["firings"]), int(state["lowerings"])
        self.cannot_meet = bool(state["cannot_meet"])
        self.raise_test = Test(**state["raise_test"])
        self.lower_tests = {float(t): Test(**s) for t, s in state["lower_tests"]}
        self.recent.clear()
        self.recent.extend((float(c), bool(m)) for c, m in state["recent"])
        return True

    def save(self, path: str) -> None:
        """Write ``state()`` beside ``path`` and rename it into place: a crash leaves the old state or the new."""
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.state(), f)
        os.replace(tmp, path)

    def load(self, path: str) -> bool:
        """``restore`` from ``path``; False where there is none, it is unreadable, or it is another calibration's."""
        try:
            with open(path, encoding="utf-8") as f:
                return self.restore(json.load(f))
        except (OSError, ValueError, KeyError, TypeError):
            return False
