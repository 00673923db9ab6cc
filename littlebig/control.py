"""The BLS model's control loop, apart from Triton: when to stop calling a model (``Breaker``), which T
is in force under load (``Governor``), and a request's deadline. Stdlib and numpy only, so the tests
exercise the same code the server runs: the generator copies this file beside the BLS model.py, as it does
``decision.py``; both live in ``littlebig/`` so that tests and tools import them as ``littlebig.control``.
"""

import time
from collections import deque

import numpy as np


def check_deadline(value: object) -> float:
    """A request's ``deadline_ms`` (a number or numeric string, > 0) in seconds; ValueError names the problem."""
    try:
        ms = float(value) if not isinstance(value, bool) else float("nan")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ms = float("nan")
    if not np.isfinite(ms) or ms <= 0:
        raise ValueError(f"deadline_ms must be a number of milliseconds > 0, got {value!r}")
    return ms / 1000


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
