"""The cascade's rate formulas, written once: the ideal rate R*, its bound over big, the BLS model's own cost.

``make bench``, ``bench.ab`` and ``make gpu-check`` report against these; stdlib only, so the GPU check (no
package registry there) can import it.
"""

from __future__ import annotations


def ideal(r_little: float, r_big: float, p: float) -> float:
    """R* = 1 / (1/R_little + p/R_big): little on every image, big on the escalated fraction p, back to back."""
    return 1.0 / (1.0 / r_little + p / r_big)


def bound(r_little: float, r_big: float, p: float) -> float:
    """R*/R_big = 1 / (R_big/R_little + p): the best speed-up over big any cascade of this pair can serve."""
    return 1.0 / (r_big / r_little + p)


def bls_overhead(t_cascade: float, t_little: float, t_big: float, p: float) -> float:
    """The BLS model's own latency: the cascade's minus what it waits for (little on every row, big on p)."""
    return t_cascade - (t_little + p * t_big)
