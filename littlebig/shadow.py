"""Shadow sampling: how much accuracy the cascade is losing now, measured against big on live rows.

The cascade can lose accuracy against big only on rows an earlier stage answers and big would answer
differently (README, "Calibration"). The BLS model sends a seeded random share R of the rows it answered
confidently to big as well, after their responses are built (``Sampler``), and counts per confidence bin how
often big disagrees. The label-free loss at the T in force is then

    loss = (confident rows / rows) x (disagreements / shadow rows)

an upper bound of the accuracy lost against big (disagreeing where both are wrong, or where only big is, costs
nothing). Its confidence bounds (``wilson_cc``) are the ones the Prometheus rules compute
(deploy/prometheus/littlebig.rules.yml), and the monitor shows.

Every traffic row is drawn with the same probability R, whatever happens to it next, and the draw is written
to a rotating record file (``RecordWriter``): a confident row with big's shadow answer, an escalated row with the
answer big gave anyway, a row whose big answer is unknown (dropped shadow work, load, deadline, failure) as
``unknown``. So the records are a uniform R-sample of traffic, and ``recalibrate --from-shadow`` can run the
calibration's exact test on them, counting an unknown row as a loss (conservative, never biased in its favour).

This file is installed beside the BLS model.py (as ``decision.py``, ``control.py`` and ``metrics.py`` are): stdlib and
numpy only.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import time
from collections.abc import Callable
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

import numpy as np

try:  # in the served repository: the generator's copy beside model.py
    from decision import CONFIDENCE_BINS, confidence
except ImportError:  # tests and tools
    from littlebig.decision import CONFIDENCE_BINS, confidence

#: z of the alert's one-sided bound: P(N(0, 1) > 3.719) = 1e-4 (deploy/prometheus/littlebig.rules.yml says why).
Z_ALERT = 3.719
#: Shadow rows the loss alert needs in its window (why: littlebig.rules.yml).
MIN_SHADOW_ROWS = 1000
#: Why a sampled row's shadow call was not made (or failed): the ``reason`` label of the drop counter.
DROP_REASONS = ("load", "breaker", "deadline", "busy", "failed")
#: What a record holds about big: its answer from a shadow call (``shadow``), from the escalation itself
#: (``escalated``), or nothing (``unknown``: the shadow call was dropped or failed, or big never answered the row).
RECORD_KINDS = ("shadow", "escalated", "unknown")
#: Record files: one per BLS instance, rotated at this size, this many old files kept (bounded on disk).
RECORD_FILE, RECORD_MAX_BYTES, RECORD_BACKUPS = "shadow-{instance}.jsonl", 16 * 2**20, 4


class Sampler:
    """A seeded Bernoulli(R) draw per row (one generator per BLS instance: ``seed`` and the instance name)."""

    def __init__(self, rate: float, seed: int, instance: str = "") -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"shadow rate must be in [0, 1], got {rate!r}")
        self.rate = rate
        self.rng = np.random.default_rng([seed, *instance.encode()])

    def select(self, rows: int) -> np.ndarray:
        """Which of ``rows`` rows are drawn (all False, and no draw, at R = 0)."""
        if self.rate == 0.0:
            return np.zeros(rows, dtype=bool)
        return self.rng.random(rows) < self.rate


def wilson_cc(k: float, n: float, z: float) -> tuple[float, float]:
    """Wilson's score interval with continuity correction for k successes in n: (lower, upper), each one-sided at
    ``z``. The Prometheus rules compute exactly this; tests compare the two with promtool, and with the exact
    Clopper-Pearson bounds in the alert's regime. Lower is 0 when k = 0; (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    lower = (2 * n * p + z * z - 1 - z * math.sqrt(max(z * z - 2 - 1 / n + 4 * p * (n * (1 - p) + 1), 0.0))) / (
        2 * (n + z * z)
    )
    upper = (2 * n * p + z * z + 1 + z * math.sqrt(max(z * z + 2 - 1 / n + 4 * p * (n * (1 - p) - 1), 0.0))) / (
        2 * (n + z * z)
    )
    return (0.0 if k <= 0 else min(max(lower, 0.0), 1.0)), min(max(upper, 0.0), 1.0)


def loss_bound(rows: float, confident: float, shadow_rows: float, disagreements: float, z: float) -> dict[str, float]:
    """The label-free loss against big (module docstring) and its one-sided bounds at ``z``: the confident share
    is measured on every row (its error is negligible beside the shadow sample's) and scales the disagreement
    rate's Wilson bounds. NaN where there are no rows or no shadow rows yet."""
    if rows <= 0 or shadow_rows <= 0:
        return {"share": math.nan, "rate": math.nan, "estimate": math.nan, "lower": math.nan, "upper": math.nan}
    share = confident / rows
    lower, upper = wilson_cc(disagreements, shadow_rows, z)
    rate = disagreements / shadow_rows
    return {"share": share, "rate": rate, "estimate": share * rate, "lower": share * lower, "upper": share * upper}


class RecordWriter:
    """The instance's shadow records: JSON lines, rotated at ``RECORD_MAX_BYTES`` (``RECORD_BACKUPS`` kept).

    Thread-safe (a logging handler), so the shadow calls' completion callbacks write too."""

    def __init__(self, directory: str, instance: str) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, RECORD_FILE.format(instance=instance.replace(os.sep, "_") or "0"))
        self.logger = logging.getLogger(f"littlebig.shadow.{path}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        if not self.logger.handlers:
            handler = RotatingFileHandler(path, maxBytes=RECORD_MAX_BYTES, backupCount=RECORD_BACKUPS)
            handler.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(handler)
        self.path = path

    def write(self, kind: str, conf: np.ndarray, answer: np.ndarray, big: np.ndarray, when: float) -> None:
        """One line per row: little's (the answering stage's) confidence and label, big's label (-1: unknown)."""
        for c, a, b in zip(conf.tolist(), answer.tolist(), big.tolist()):
            self.logger.info(json.dumps({"t": round(when, 3), "kind": kind, "conf": c, "answer": a, "big": b}))

    def close(self) -> None:
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)


def read_records(directory: str) -> dict[str, np.ndarray]:
    """Every record of every instance's files (rotated ones too) in ``directory``, as columns."""
    paths = sorted(glob.glob(os.path.join(directory, RECORD_FILE.format(instance="*") + "*")))
    if not paths:
        raise FileNotFoundError(f"no shadow records ({RECORD_FILE.format(instance='*')}) in {directory}")
    lines = [line for path in paths for line in Path(path).read_text(encoding="utf-8").splitlines()]
    rows = [json.loads(line) for line in lines if line.strip()]
    if not rows:
        raise ValueError(f"the shadow record files in {directory} are empty: serve with --shadow-rate > 0 first")
    return {
        "t": np.array([r["t"] for r in rows], dtype=np.float64),
        "kind": np.array([r["kind"] for r in rows]),
        "conf": np.array([r["conf"] for r in rows], dtype=np.float32),
        "answer": np.array([r["answer"] for r in rows], dtype=np.int64),
        "big": np.array([r["big"] for r in rows], dtype=np.int64),
    }


def plan_shadow(
    rows: np.ndarray,
    time_left_s: np.ndarray,
    latency_s: float,
    max_batch: int,
    room: int,
    under_load: bool,
    breaker_open: bool,
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Which drawn confident ``rows`` go to big as shadow calls, and which are dropped and why (``DROP_REASONS``).

    Shadow work is dropped first: all of it under the governor's load levels or while big's breaker is open; the
    rows whose time left (``time_left_s``, per row) is under big's predicted latency; then every chunk of at most
    ``max_batch`` rows beyond ``room`` calls (``busy``). Returns (the calls' row chunks, reason -> rows dropped)."""
    if under_load:
        return [], {"load": rows}
    if breaker_open:
        return [], {"breaker": rows}
    tight = np.asarray(time_left_s) < latency_s
    kept = rows[~tight]
    chunks = [kept[a : a + max_batch] for a in range(0, len(kept), max_batch)]
    return chunks[:room], {"deadline": rows[tight], "busy": np.concatenate([rows[:0], *chunks[room:]])}


class ShadowTraffic:
    """One BLS instance's shadow work: drawn rows' records, and drawn confident rows sent to big without waiting,
    counted per confidence bin and recorded when big answers.

    ``send(images)`` starts one call to big and returns its future (``add_done_callback``, ``cancelled``,
    ``exception``, ``result``); ``read(result)`` is big's logits (raising when they cannot be read); ``metrics``
    holds the served metrics ``shadow_dropped`` (one per ``DROP_REASONS``), ``shadow_rows`` and
    ``shadow_disagreements`` (one per ``CONFIDENCE_BINS``), each with ``increment(n)``."""

    def __init__(
        self, records: RecordWriter, metrics: dict[str, list[Any]], send: Callable[[np.ndarray], Any],
        read: Callable[[Any], np.ndarray], max_batch: int, max_calls: int,
    ) -> None:  # fmt: skip
        self.records, self.metrics, self.send, self.read = records, metrics, send, read
        self.max_batch, self.max_calls = max_batch, max_calls
        self.in_flight: set[Any] = set()

    def record(self, kind: str, held: np.ndarray, big: np.ndarray) -> None:
        """Records of drawn rows: the answer before big (confidence, label) and big's label (-1 unknown)."""
        if len(held):
            self.records.write(kind, confidence(held), held.argmax(axis=-1), np.asarray(big), time.time())

    def drop(self, why: str, held: np.ndarray) -> None:
        """Drawn rows whose big answer will not be known: counted by reason, recorded as unknown."""
        if len(held):
            self.metrics["shadow_dropped"][DROP_REASONS.index(why)].increment(len(held))
            self.record("unknown", held, np.full(len(held), -1))

    def start(
        self, images: np.ndarray, rows: np.ndarray, held: np.ndarray, little_conf: np.ndarray,
        time_left_s: np.ndarray, latency_s: float, under_load: bool, breaker_open: bool, seen: Seen | None = None,
    ) -> None:  # fmt: skip
        """Send the drawn confident ``rows`` to big as ``plan_shadow`` says (``time_left_s``: per row of ``rows``),
        never waiting; the rest are dropped. ``seen`` (the guard's observation of the execute) gets each answer,
        and any drop voids it."""
        room = max(self.max_calls - len(self.in_flight), 0)
        chunks, dropped = plan_shadow(rows, time_left_s, latency_s, self.max_batch, room, under_load, breaker_open)
        for chunk in chunks:
            call = self.send(images[chunk])
            self.in_flight.add(call)
            bins = np.searchsorted(CONFIDENCE_BINS, little_conf[chunk])
            if seen is not None:
                seen.pending += 1
            call.add_done_callback(lambda done, held=held[chunk], bins=bins: self._done(done, held, bins, seen))
        for why, dropped_rows in dropped.items():
            self.drop(why, held[dropped_rows])
            if seen is not None and len(dropped_rows):
                seen.void()
        if seen is not None:
            seen.close()

    def _done(self, call: Any, held: np.ndarray, bins: np.ndarray, seen: Seen | None) -> None:
        """A shadow call's completion (on the stub's event loop, after the response went): count and record."""
        self.in_flight.discard(call)
        try:
            if call.cancelled():
                raise RuntimeError("cancelled")
            if call.exception() is not None:
                raise RuntimeError(str(call.exception()))
            big = self.read(call.result()).argmax(axis=-1)
        except Exception:
            self.drop("failed", held)
            if seen is not None:
                seen.void()
                seen.done()
            return
        disagree = big != held.argmax(axis=-1)
        if seen is not None:
            seen.add(confidence(held), disagree)
            seen.done()
        per_bin = {
            "shadow_rows": np.bincount(bins, minlength=len(CONFIDENCE_BINS)),
            "shadow_disagreements": np.bincount(bins, weights=disagree, minlength=len(CONFIDENCE_BINS)),
        }
        for key, counts in per_bin.items():
            for metric, count in zip(self.metrics[key], counts):
                if count:
                    metric.increment(int(count))
        self.record("shadow", held, big)


class Seen:
    """One execute's drawn rows for the guard: fed to it once every shadow call of the execute is back, or never
    if any drawn row's big answer stays unknown (``void``)."""

    def __init__(self, feed: Callable[[np.ndarray, np.ndarray], None], conf: list, mismatch: list) -> None:
        self.feed, self.conf, self.mismatch = feed, list(conf), list(mismatch)
        self.pending, self.closed, self.voided = 0, False, False

    def add(self, conf, mismatch):
        self.conf.append(conf)
        self.mismatch.append(mismatch)

    def void(self):
        self.voided = True

    def done(self):
        self.pending -= 1
        self._maybe_feed()

    def close(self):
        """No more calls will be added."""
        self.closed = True
        self._maybe_feed()

    def _maybe_feed(self):
        if self.closed and self.pending == 0 and not self.voided:
            self.voided = True  # fed once
            self.feed(np.concatenate(self.conf), np.concatenate(self.mismatch))
