"""The cascade's rate formulas, written once: the ideal rate R*, its bound over big, the BLS model's own cost.

``make bench``, ``make bench-stages`` (cascades of any length), ``bench.ab`` and ``make gpu-check`` report against
these; stdlib only, so the GPU check (no package registry there) can import it.
"""

from __future__ import annotations

from collections.abc import Sequence


def ideal(r_little: float, r_big: float, p: float) -> float:
    """R* = 1 / (1/R_little + p/R_big): little on every image, big on the escalated fraction p, back to back
    (``ideal_stages`` of two stages)."""
    return ideal_stages((r_little, r_big), (1.0, p))


def bound(r_little: float, r_big: float, p: float) -> float:
    """R*/R_big = 1 / (R_big/R_little + p): the best speed-up over big any cascade of this pair can serve
    (``bound_stages`` of two stages)."""
    return bound_stages((r_little, r_big), (1.0, p))


def reaching(answered: Sequence[float]) -> list[float]:
    """Shares of rows that reach each stage (q_1 = every row) from the shares each stage answers (calibration's
    ``stage_shares``): q_k = sum of the shares answered at stage k or later."""
    return [float(sum(answered[k:])) for k in range(len(answered))]


def ideal_stages(rates: Sequence[float], reach: Sequence[float]) -> float:
    """R* of a cascade of K stages = 1 / sum_k(q_k / R_k): every stage k runs, back to back, on the share q_k of the
    rows that reach it (q_1 = 1 for little; two stages: ``ideal`` with q = (1, p)). ``rates``: each stage's own
    served rate R_k, cheapest first."""
    if len(rates) != len(reach) or not rates:
        raise ValueError(f"one share reaching each stage: {len(rates)} rates, {len(reach)} shares")
    return 1.0 / sum(q / r for q, r in zip(reach, rates, strict=True))


def bound_stages(rates: Sequence[float], reach: Sequence[float]) -> float:
    """R*/R_big of a cascade of K stages (big is the last): the best speed-up over big it can serve."""
    return ideal_stages(rates, reach) / rates[-1]


def bls_overhead(t_cascade: float, t_little: float, t_big: float, p: float) -> float:
    """The BLS model's own latency: the cascade's minus what it waits for (little on every row, big on p)."""
    return t_cascade - (t_little + p * t_big)
