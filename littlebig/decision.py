"""The one Little-Big decision rule: confidence, threshold, escalate.

Calibration, the offline reference and the served BLS model all import this file (the repository
generator copies it beside the BLS model.py), so it depends on numpy alone. Never copy its logic.
"""

from __future__ import annotations

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


def cascade(little_logits: np.ndarray, big_logits: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Offline cascade answer given both models' logits for every row (reference and calibration).

    The served model computes big only for escalated rows; for those rows the result is the same.
    """
    little_probs = softmax(little_logits)
    esc = escalate(confidence(little_probs), threshold)
    probs = np.where(esc[:, None], softmax(big_logits), little_probs)
    return {"label": probs.argmax(axis=-1).astype(np.int64), "probs": probs, "escalated": esc}
