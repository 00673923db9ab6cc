"""What ``make overload`` measured, per 5 s window and per phase: latency against the SLO, served accuracy against
the static cascade on the same rows, who answered and why, the T in force, and T's return after the load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.step_load import METRICS, Phase, server_times
from littlebig import decision
from littlebig.decision import cascade, confidence, escalate, softmax

DEFAULT_EPS = 0.005
TARGETS = {
    "p99_windows_ok_2x": 0.95,  # share of the 2x phase's windows whose p99 is within the SLO
    "accuracy_drop_2x": DEFAULT_EPS,  # static cascade's accuracy minus the served one, same rows (EPS)
    "t_recovery_s": 30.0,  # T back at the calibrated value after the load falls
    "accuracy_diff_1x": 0.001,  # |served - static| at 1x: "equal", within 0.1 point
}
REASONS = (*decision.REASONS, "error")  # "error": a request answered with an error, or never


def _pct(x: np.ndarray, q: float) -> float:
    """Percentile of latencies in ms; a request never answered counts as infinitely late."""
    if not len(x):
        return float("nan")
    return float(np.percentile(np.where(np.isnan(x), np.inf, x), q) * 1000)


class Requests:
    """The recorded requests joined with the offline reference: per request, who should have answered and what."""

    def __init__(self, req: dict[str, np.ndarray], ref: dict) -> None:
        self.req, self.ref = req, ref
        self.t0 = req["send"][0]
        self.t = req["send"] - self.t0
        self.ok = req["reason"] != "error"
        self.row = req["row"]
        self.known = self.row >= 0
        at = np.maximum(self.row, 0)
        self.truth = np.where(self.known, ref["labels"][at], -1)
        self.served_correct = self.ok & self.known & (req["label"] == self.truth)
        self.static_correct = self.known & (ref["static_label"][at] == self.truth)
        # What the served label must be, given who answered: big's where it escalated, little's otherwise.
        self.who = np.where(req["reason"] == "escalated", ref["big_label"][at], ref["little_label"][at])
        self.conf = ref["conf"][at]
        self.is_load = req["reason"] == "load"

    def consistency(self) -> dict[str, int]:
        ref, req = self.ref, self.req
        return {
            "unknown_images": int((~self.known).sum()),
            "label_mismatches": int((self.ok & self.known & (req["label"] != self.who)).sum()),
            # a "load" row is one the calibrated T escalates and T_min does not
            "load_rows_outside_band": int(
                (
                    self.is_load
                    & self.known
                    & ~(escalate(self.conf, ref["t_cal"]) & ~escalate(self.conf, ref["t_min"]))
                ).sum()
            ),
        }


def threshold_series(scrapes: list[dict], t0: float) -> list[dict]:
    """T over time (the gauges of every BLS instance, per scrape) and Triton's ms per request per interval."""
    series = []
    for s in scrapes:
        ts = list(s["threshold"].values())
        series.append(
            {
                "t": s["t"] - t0,
                "t_min": min(ts, default=float("nan")),
                "t_max": max(ts, default=float("nan")),
                **{k: s[k] for k in METRICS.values()},
            }
        )
    for x, prev, cur in zip(series[1:], scrapes, scrapes[1:]):
        x.update(server_times([prev, cur], prev["t"], cur["t"]))
    return series


def windows(r: Requests, series: list[dict], plan: list[Phase], slo_ms: float, window_s: float) -> list[dict]:
    """Per window of ``window_s``: requests, errors, p50/p99 against the SLO, REASON shares, T's range."""
    req, t, ok = r.req, r.t, r.ok
    total_s = plan[-1].stop_s
    out = []
    for a in np.arange(0.0, total_s - 1e-9, window_s):
        b = min(a + window_s, total_s)
        sel = (t >= a) & (t < b)
        phase = next((p.name for p in plan if p.start_s <= a and b <= p.stop_s + 1e-9), None)
        gauges = [x for x in series if a <= x["t"] < b]
        out.append(
            {
                "start_s": float(a),
                "stop_s": float(b),
                "phase": phase,
                "requests": int(sel.sum()),
                "errors": int((sel & ~ok).sum()),
                "p50_ms": _pct(req["latency"][sel], 50),
                "p99_ms": _pct(req["latency"][sel], 99),
                "within_slo": bool(_pct(req["latency"][sel], 99) <= slo_ms) if sel.any() else None,
                **{f"share_{x}": float((req["reason"][sel] == x).mean()) if sel.any() else 0.0 for x in REASONS},
                "t_min": min((x["t_min"] for x in gauges), default=float("nan")),
                "t_max": max((x["t_max"] for x in gauges), default=float("nan")),
            }
        )
    return out


def phase_summary(r: Requests, p: Phase, wins: list[dict], series: list[dict], scrapes: list[dict]) -> dict:
    """One phase: rates, errors, latency percentiles, windows within the SLO, accuracies, REASONs, T's lowest."""
    req, t, ok, known, row = r.req, r.t, r.ok, r.known, r.row
    little, big, static, truth = r.ref["little_label"], r.ref["big_label"], r.ref["static_label"], r.truth
    sel = (t >= p.start_s) & (t < p.stop_s)
    sel_ok = sel & ok & known
    n, n_ok = int(sel.sum()), int(sel_ok.sum())
    inside = [w for w in wins if w["phase"] == p.name and w["requests"]]
    served = float(r.served_correct[sel_ok].mean()) if n_ok else float("nan")
    static_same = float(r.static_correct[sel_ok].mean()) if n_ok else float("nan")
    return {
        "phase": p.name,
        "factor": p.factor,
        "start_s": p.start_s,
        "seconds": p.seconds,
        "offered_rate": n / p.seconds,
        "answered_rate": int((sel & ok).sum()) / p.seconds,
        "requests": n,
        "errors": int((sel & ~ok).sum()),
        "p50_ms": _pct(req["latency"][sel], 50),
        "p95_ms": _pct(req["latency"][sel], 95),
        "p99_ms": _pct(req["latency"][sel], 99),
        "max_ms": _pct(req["latency"][sel], 100),
        "windows": len(inside),
        "windows_within_slo": sum(bool(w["within_slo"]) for w in inside),
        "windows_ok_share": sum(bool(w["within_slo"]) for w in inside) / len(inside) if inside else float("nan"),
        # accuracy on the answered rows; "_all" counts an error as a wrong answer
        "accuracy_served": served,
        "accuracy_static": static_same,
        "accuracy_drop": static_same - served,
        "accuracy_served_all": float(r.served_correct[sel & known].mean()) if sel.any() else float("nan"),
        "accuracy_static_all": float(r.static_correct[sel & known].mean()) if sel.any() else float("nan"),
        "accuracy_big": float((big[row[sel_ok]] == truth[sel_ok]).mean()) if n_ok else float("nan"),
        "accuracy_little": float((little[row[sel_ok]] == truth[sel_ok]).mean()) if n_ok else float("nan"),
        "answers_differing_from_static": int((req["label"][sel_ok] != static[row[sel_ok]]).sum()),
        "reasons": {x: int((req["reason"][sel] == x).sum()) for x in REASONS},
        "share_little_for_load_or_deadline": float(np.isin(req["reason"][sel], ["load", "deadline"]).mean())
        if n
        else 0.0,
        "t_min_seen": min((x["t_min"] for x in series if p.start_s <= x["t"] < p.stop_s), default=float("nan")),
        "server_ms": server_times(scrapes, r.t0 + p.start_s, r.t0 + p.stop_s),
    }


def recovery(r: Requests, series: list[dict], last: Phase, t_cal: float) -> dict[str, Any]:
    """T back at the calibrated value: from the last phase's start, the first scrape after which every gauge of
    every later scrape reads the calibrated T; and the last row answered "load" (T lowered) in that phase."""
    tail = [x for x in series if last.start_s <= x["t"] <= last.stop_s]
    at_cal = [abs(x["t_min"] - t_cal) < 1e-9 and abs(x["t_max"] - t_cal) < 1e-9 for x in tail]
    back = next((x["t"] for i, x in enumerate(tail) if all(at_cal[i:])), None)
    first_back = next((x["t"] for x, ok_ in zip(tail, at_cal) if ok_), None)
    lowered_in_last = (r.t >= last.start_s) & r.is_load
    return {
        "t_lowered": bool(any(x["t_min"] < t_cal - 1e-9 for x in series)),
        # T back (every instance at the calibrated T) and staying back to the end of the last phase; first back
        "t_recovery_s": None if back is None else max(0.0, back - last.start_s),
        "t_first_back_s": None if first_back is None else max(0.0, first_back - last.start_s),
        # share of the last phase's scrapes, from the first return on, with every instance at the calibrated T
        "t_share_at_calibrated_after": (
            float(np.mean(at_cal[[x["t"] for x in tail].index(first_back) :])) if first_back is not None else 0.0
        ),
        "last_load_row_after_fall_s": float(r.t[lowered_in_last].max() - last.start_s)
        if lowered_in_last.any()
        else 0.0,
    }


def analyse(
    req: dict[str, np.ndarray], scrapes: list[dict], plan: list[Phase], ref: dict, slo_ms: float, window_s: float
) -> dict[str, Any]:
    """Per 5 s window and per phase: latency vs the SLO, served accuracy vs the static cascade, REASON shares, T."""
    r = Requests(req, ref)
    series = threshold_series(scrapes, r.t0)
    wins = windows(r, series, plan, slo_ms, window_s)
    back = recovery(r, series, plan[-1], ref["t_cal"])
    return {
        "requests": int(len(r.t)),
        "answered": int(r.ok.sum()),
        "errors": int((~r.ok).sum()),
        "send_span_s": float(r.t[-1]),
        "phases": [phase_summary(r, p, wins, series, scrapes) for p in plan],
        "windows": wins,
        "threshold_series": series,
        "t_lowered": back.pop("t_lowered"),
        **back,
        "counters": {k: scrapes[-1][k] - scrapes[0][k] for k in METRICS.values()},
        "reasons": {x: int((req["reason"] == x).sum()) for x in REASONS},
        "consistency": r.consistency(),
    }


def reference(build: Path, rows: int, t_cal: float, t_min: float) -> dict[str, Any]:
    """Offline answers on the first ``rows`` test images: little, big, and the static cascade at the calibrated T."""
    from littlebig.export.pipeline import reference_logits

    logits = reference_logits(build, "test")
    little, big = logits["little"][:rows], logits["big"][:rows]
    static = cascade(little, big, t_cal)
    return {
        "labels": logits["labels"][:rows].astype(np.int64),
        "little_label": little.argmax(-1),
        "big_label": big.argmax(-1),
        "static_label": static["label"].astype(np.int64),
        "conf": confidence(softmax(little)),
        "t_cal": t_cal,
        "t_min": t_min,
    }


def targets(on: dict, off: dict | None, slo_ms: float, eps: float) -> dict[str, Any]:
    """The issue's four targets, on the governed run (the static run beside them for comparison)."""
    by = {p["phase"]: p for p in on["phases"]}
    two, one = by.get("2x"), by.get("1x")
    out = {
        "p99_windows_ok_2x": {
            "measured": two["windows_ok_share"] if two else None,
            "target": f">= {TARGETS['p99_windows_ok_2x']:.0%} of windows with p99 <= {slo_ms:g} ms",
        },
        "accuracy_drop_2x": {
            "measured": two["accuracy_drop"] if two else None,
            "target": f"<= {eps} (static cascade minus served, same rows)",
        },
        "t_recovery_s": {"measured": on["t_recovery_s"], "target": f"<= {TARGETS['t_recovery_s']:.0f} s"},
        "accuracy_diff_1x": {
            "measured": one["accuracy_served"] - one["accuracy_static"] if one else None,
            "target": f"|served - static| <= {TARGETS['accuracy_diff_1x']} (equal within 0.1 point)",
        },
    }
    m = {k: v["measured"] for k, v in out.items()}
    out["p99_windows_ok_2x"]["met"] = m["p99_windows_ok_2x"] is not None and m["p99_windows_ok_2x"] >= 0.95
    out["accuracy_drop_2x"]["met"] = m["accuracy_drop_2x"] is not None and m["accuracy_drop_2x"] <= eps + 1e-12
    out["t_recovery_s"]["met"] = m["t_recovery_s"] is not None and m["t_recovery_s"] <= TARGETS["t_recovery_s"]
    out["accuracy_diff_1x"]["met"] = (
        m["accuracy_diff_1x"] is not None and abs(m["accuracy_diff_1x"]) <= TARGETS["accuracy_diff_1x"] + 1e-12
    )
    if off:
        two_off = {p["phase"]: p for p in off["phases"]}.get("2x")
        out["static_for_comparison_2x"] = {
            k: two_off[k] for k in ("windows_ok_share", "p99_ms", "accuracy_drop", "errors", "accuracy_served_all")
        }
    return out
