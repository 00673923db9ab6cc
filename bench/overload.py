"""`make overload`: a step load on littlebig, 1x, 2x, then 1x of big alone's saturation rate, with the load
governor on and off (GitHub issue 16, section 4).

What one run does, on the real embedded tritonserver and the real test images:
- serves the same pair twice, governor off (static T) and on (``slo_p99_ms``, ``max_accuracy_drop``), each
  on its own server on free loopback ports;
- measures big alone's saturation rate first (perf_analyzer on ``big``, batch 1, gRPC, concurrency high
  enough to saturate) and littlebig's unloaded p99 (batch 1, one request in flight);
- drives littlebig with an open-loop schedule (``--request-intervals``: the gaps between requests, in
  microseconds, for every phase; ``--async`` so a slow server does not slow the sender down), batch 1;
- perf_analyzer's ``--profile-export-file`` records every request: when it was sent, the image it carried,
  when its answer came and the answer itself (LABEL, ESCALATED, REASON). The image names the test row, so
  the served accuracy is measured per phase on every request, against the labels and against the offline
  static cascade on the very same rows (a paired comparison: only rows answered differently count);
- scrapes Triton's metrics port every second: ``littlebig_threshold`` (the T in force, one per BLS instance),
  ``littlebig_{rows,escalated_rows,load_rows,deadline_rows}_total``.

It writes BUILD/overload.json and BUILD/overload.png and prints a table. Targets (reported, not asserted):
at 2x, p99 <= SLO in >= 95% of the 5 s windows and accuracy within EPS of the static cascade; T back at the
calibrated value within 30 s after the load falls; at 1x, accuracy equal to the static cascade's.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.perf import PerfAnalyzer, PerfAnalyzerError, Window, measure
from littlebig.decision import cascade, confidence, escalate, softmax
from littlebig.export.pipeline import ROLES

BLS = "littlebig"
#: Default SLO on littlebig's p99 latency (ms), --slo-p99-ms: on the 2-core reference machine about 10x its unloaded
#: batch-1 p99 (17-21 ms) and above its p99 at 1x with the static T (87-146 ms per 5 s window), so that the static
#: cascade meets it at 1x and the governor has to act only above (RELIABILITY.md, "Overload").
DEFAULT_SLO_MS = 200.0
DEFAULT_EPS = 0.005
TARGETS = {
    "p99_windows_ok_2x": 0.95,  # share of the 2x phase's windows whose p99 is within the SLO
    "accuracy_drop_2x": DEFAULT_EPS,  # static cascade's accuracy minus the served one, same rows (EPS)
    "t_recovery_s": 30.0,  # T back at the calibrated value after the load falls
    "accuracy_diff_1x": 0.001,  # |served - static| at 1x: "equal", within 0.1 point
}
REASONS = ("confident", "escalated", "load", "deadline", "big_failed", "error")
METRICS = {
    "littlebig_rows_total": "rows",
    "littlebig_escalated_rows_total": "escalated",
    "littlebig_load_rows_total": "load",
    "littlebig_deadline_rows_total": "deadline",
}
#: Triton's own cumulative per-model counters (us, requests): where a request's time goes, per model. littlebig's
#: queue time is the part its Python BLS model cannot see.
TRITON = {
    "nv_inference_request_success": "success",
    "nv_inference_request_duration_us": "request_us",
    "nv_inference_queue_duration_us": "queue_us",
}


@dataclass(frozen=True)
class Phase:
    name: str
    factor: float  # of big alone's saturation rate
    seconds: float
    start_s: float = 0.0
    rate: float = 0.0  # requests/s

    @property
    def stop_s(self) -> float:
        return self.start_s + self.seconds


def phases(seconds: list[float], saturation: float) -> list[Phase]:
    """1x, 2x, 1x of ``saturation`` for ``seconds`` each, back to back."""
    out, start = [], 0.0
    for name, factor, s in zip(("1x", "2x", "1x after"), (1.0, 2.0, 1.0), seconds):
        out.append(Phase(name, factor, s, start, factor * saturation))
        start += s
    return out


def schedule(plan: list[Phase], distribution: str, seed: int = 0) -> np.ndarray:
    """Send times (s from the start) of every request: Poisson arrivals (or evenly spaced) at each phase's rate."""
    rng = np.random.default_rng(seed)
    times = []
    for p in plan:
        n = int(round(p.rate * p.seconds))
        if distribution == "poisson":
            t = np.cumsum(rng.exponential(1.0 / p.rate, size=int(n * 1.2) + 20))
            t = t[t < p.seconds]
        else:
            t = np.arange(n) / p.rate
        times.append(p.start_s + t)
    return np.concatenate(times)


def write_intervals(times: np.ndarray, path: Path) -> Path:
    """perf_analyzer's --request-intervals file: one gap (us) per line between successive requests."""
    at_us = np.maximum.accumulate(np.round(np.asarray(times) * 1e6).astype(np.int64))  # whole us, no drift
    gaps = np.maximum(np.diff(np.concatenate([[0], at_us])), 1)
    path.write_text("\n".join(map(str, gaps.tolist())) + "\n")
    return path


# ---------------------------------------------------------------- metrics ----------------------------------------
_LINE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition -> (name, labels, value) per sample."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and not line.startswith("#"):
            out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def scrape(url: str) -> dict[str, Any]:
    """One sample of the metrics port: T per BLS instance, littlebig's row counters, Triton's time counters."""
    now = time.time()
    with urllib.request.urlopen(url, timeout=2) as r:
        samples = parse_metrics(r.read().decode())
    out: dict[str, Any] = {"t": now, "threshold": {}, **dict.fromkeys(METRICS.values(), 0.0)}
    out.update({f"{m}_{k}": 0.0 for m in (BLS, "big") for k in TRITON.values()})
    for name, labels, value in samples:
        model = labels.get("model")
        if model not in (BLS, "big"):
            continue
        if name == "littlebig_threshold":
            out["threshold"][labels.get("bls_instance") or labels.get("instance", "")] = value
        elif name in METRICS:
            out[METRICS[name]] += value
        elif name in TRITON:
            out[f"{model}_{TRITON[name]}"] += value
    return out


def server_times(scrapes: list[dict], a: float, b: float) -> dict[str, float]:
    """Mean ms per request between the scrapes nearest to epoch times a and b: littlebig's queue (invisible to
    its governor), littlebig's whole request, and big's request (queue + compute, what the governor watches)."""
    first = min(scrapes, key=lambda s: abs(s["t"] - a))
    last = min(scrapes, key=lambda s: abs(s["t"] - b))
    out = {}
    for m in (BLS, "big"):
        n = last[f"{m}_success"] - first[f"{m}_success"]
        for k in ("queue_us", "request_us"):
            out[f"{m}_{k[:-3]}_ms"] = (last[f"{m}_{k}"] - first[f"{m}_{k}"]) / n / 1000 if n > 0 else float("nan")
    return out


# ---------------------------------------------------------------- perf_analyzer ----------------------------------
def step_load(
    pa: PerfAnalyzer,
    url: str,
    metrics_url: str,
    intervals: Path,
    requests: int,
    input_data: Path,
    export: Path,
    total_s: float,
    desc: str,
    extra: list[str] = (),
) -> tuple[list[dict], float, float]:
    """Run the schedule against littlebig, scraping the metrics every second; (scrapes, start, end) wall times."""
    args = [
        str(pa.binary), "-m", BLS, "-u", url, "-i", "grpc", "-b", "1", "--async",
        f"--request-intervals={intervals}", f"--request-count={requests}", f"--input-data={input_data}",
        f"--profile-export-file={export}", *extra,
    ]  # fmt: skip
    export.unlink(missing_ok=True)
    scrapes = [scrape(metrics_url)]
    log = export.with_suffix(".log")
    began = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=pa.environment(), stdout=out, stderr=subprocess.STDOUT)
        try:
            with tqdm(
                total=round(total_s), desc=desc, unit="s", bar_format="{l_bar}{bar}| {n:.0f}/{total} s {postfix}"
            ) as bar:
                while proc.poll() is None:
                    time.sleep(max(0.0, 1.0 - (time.time() - scrapes[-1]["t"])))
                    try:
                        scrapes.append(scrape(metrics_url))
                    except OSError:
                        continue
                    s, prev = scrapes[-1], scrapes[-2]
                    ts = list(s["threshold"].values())
                    bar.n = min(s["t"] - began, bar.total)
                    bar.set_postfix_str(
                        f"T {min(ts, default=float('nan')):.3f}  "
                        f"rows/s {(s['rows'] - prev['rows']) / (s['t'] - prev['t']):.0f}"
                        f"  load rows {s['load'] - scrapes[0]['load']:.0f}"
                    )
            proc.wait(timeout=max(60.0, total_s))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ended = time.time()
    scrapes.append(scrape(metrics_url))
    if proc.returncode != 0 or not export.exists():
        raise PerfAnalyzerError(f"perf_analyzer exited {proc.returncode} on the step load:\n{log.read_text()[-3000:]}")
    return scrapes, began, ended


def _scalar(value: Any) -> Any:
    while isinstance(value, list) and value:
        value = value[0]
    return value


def read_profile(path: Path, rows_of: dict[bytes, int]) -> dict[str, np.ndarray]:
    """perf_analyzer's profile export -> per request (sorted by send time): send (epoch s), latency (s), test row,
    served LABEL, REASON ("error" for a request answered with an error or never answered)."""
    experiments = json.loads(path.read_text())["experiments"]
    reqs = [r for e in experiments for r in e["requests"]]
    send = np.array([r["timestamp"] for r in reqs], dtype=np.float64) / 1e9
    done = np.array([r["response_timestamps"][-1] if r["response_timestamps"] else np.nan for r in reqs]) / 1e9
    rows = np.array([rows_of.get(bytes(r["request_inputs"]["IMAGE"]), -1) for r in reqs], dtype=np.int64)
    label = np.full(len(reqs), -1, dtype=np.int64)
    reason = np.full(len(reqs), "error", dtype=object)
    for i, r in enumerate(reqs):
        out = r["response_outputs"][-1] if r.get("response_outputs") else {}
        if "LABEL" in out:
            label[i] = int(_scalar(out["LABEL"]))
            why = _scalar(out.get("REASON"))
            if why is None:  # a server from before REASON: ESCALATED says who answered
                why = "escalated" if _scalar(out.get("ESCALATED")) else "confident"
            reason[i] = why.decode() if isinstance(why, bytes) else str(why)
    order = np.argsort(send, kind="stable")
    return {
        "send": send[order],
        "latency": (done - send)[order],
        "row": rows[order],
        "label": label[order],
        "reason": reason[order].astype(str),
    }


# ---------------------------------------------------------------- analysis ---------------------------------------
def _pct(x: np.ndarray, q: float) -> float:
    """Percentile of latencies in ms; a request never answered counts as infinitely late."""
    if not len(x):
        return float("nan")
    return float(np.percentile(np.where(np.isnan(x), np.inf, x), q) * 1000)


def analyse(
    req: dict[str, np.ndarray], scrapes: list[dict], plan: list[Phase], ref: dict, slo_ms: float, window_s: float
) -> dict[str, Any]:
    """Per 5 s window and per phase: latency vs the SLO, served accuracy vs the static cascade, REASON shares, T."""
    t0 = req["send"][0]
    t = req["send"] - t0
    ok = req["reason"] != "error"
    row = req["row"]
    known = row >= 0
    labels, little, big = ref["labels"], ref["little_label"], ref["big_label"]
    static = ref["static_label"]
    truth = np.where(known, labels[np.maximum(row, 0)], -1)
    served_correct = ok & known & (req["label"] == truth)
    static_correct = known & (static[np.maximum(row, 0)] == truth)
    # What the served label must be, given who answered: big's where it escalated, little's otherwise.
    who = np.where(req["reason"] == "escalated", big[np.maximum(row, 0)], little[np.maximum(row, 0)])
    conf = ref["conf"][np.maximum(row, 0)]
    is_load = req["reason"] == "load"
    consistency = {
        "unknown_images": int((~known).sum()),
        "label_mismatches": int((ok & known & (req["label"] != who)).sum()),
        # a "load" row is one the calibrated T escalates and T_min does not
        "load_rows_outside_band": int(
            (is_load & known & ~(escalate(conf, ref["t_cal"]) & ~escalate(conf, ref["t_min"]))).sum()
        ),
    }

    # T over time: the gauges of every BLS instance, per scrape
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
    # Triton's time counters per scrape interval (ms per request), for the plot and the diagnosis
    for x, prev, cur in zip(series[1:], scrapes, scrapes[1:]):
        x.update(server_times([prev, cur], prev["t"], cur["t"]))

    total_s = plan[-1].stop_s
    windows = []
    for a in np.arange(0.0, total_s - 1e-9, window_s):
        b = min(a + window_s, total_s)
        sel = (t >= a) & (t < b)
        phase = next((p.name for p in plan if p.start_s <= a and b <= p.stop_s + 1e-9), None)
        gauges = [x for x in series if a <= x["t"] < b]
        windows.append(
            {
                "start_s": float(a),
                "stop_s": float(b),
                "phase": phase,
                "requests": int(sel.sum()),
                "errors": int((sel & ~ok).sum()),
                "p50_ms": _pct(req["latency"][sel], 50),
                "p99_ms": _pct(req["latency"][sel], 99),
                "within_slo": bool(_pct(req["latency"][sel], 99) <= slo_ms) if sel.any() else None,
                **{f"share_{r}": float((req["reason"][sel] == r).mean()) if sel.any() else 0.0 for r in REASONS},
                "t_min": min((x["t_min"] for x in gauges), default=float("nan")),
                "t_max": max((x["t_max"] for x in gauges), default=float("nan")),
            }
        )

    per_phase = []
    for p in plan:
        sel = (t >= p.start_s) & (t < p.stop_s)
        sel_ok = sel & ok & known
        n, n_ok = int(sel.sum()), int(sel_ok.sum())
        inside = [w for w in windows if w["phase"] == p.name and w["requests"]]
        served = float(served_correct[sel_ok].mean()) if n_ok else float("nan")
        static_same = float(static_correct[sel_ok].mean()) if n_ok else float("nan")
        per_phase.append(
            {
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
                "windows_ok_share": sum(bool(w["within_slo"]) for w in inside) / len(inside)
                if inside
                else float("nan"),
                # accuracy on the answered rows; "_all" counts an error as a wrong answer
                "accuracy_served": served,
                "accuracy_static": static_same,
                "accuracy_drop": static_same - served,
                "accuracy_served_all": float(served_correct[sel & known].mean()) if sel.any() else float("nan"),
                "accuracy_static_all": float(static_correct[sel & known].mean()) if sel.any() else float("nan"),
                "accuracy_big": float((big[row[sel_ok]] == truth[sel_ok]).mean()) if n_ok else float("nan"),
                "accuracy_little": float((little[row[sel_ok]] == truth[sel_ok]).mean()) if n_ok else float("nan"),
                "answers_differing_from_static": int((req["label"][sel_ok] != static[row[sel_ok]]).sum()),
                "reasons": {r: int((req["reason"][sel] == r).sum()) for r in REASONS},
                "share_little_for_load_or_deadline": float(np.isin(req["reason"][sel], ["load", "deadline"]).mean())
                if n
                else 0.0,
                "t_min_seen": min((x["t_min"] for x in series if p.start_s <= x["t"] < p.stop_s), default=float("nan")),
                "server_ms": server_times(scrapes, t0 + p.start_s, t0 + p.stop_s),
            }
        )

    # T back at the calibrated value: from the last phase's start, the first scrape after which every gauge of
    # every later scrape reads the calibrated T; and the last row answered "load" (T lowered) in that phase.
    last = plan[-1]
    tail = [x for x in series if last.start_s <= x["t"] <= last.stop_s]
    at_cal = [abs(x["t_min"] - ref["t_cal"]) < 1e-9 and abs(x["t_max"] - ref["t_cal"]) < 1e-9 for x in tail]
    back = next((x["t"] for i, x in enumerate(tail) if all(at_cal[i:])), None)
    first_back = next((x["t"] for x, ok_ in zip(tail, at_cal) if ok_), None)
    lowered_in_last = (t >= last.start_s) & is_load
    counters = {k: scrapes[-1][k] - scrapes[0][k] for k in METRICS.values()}
    return {
        "requests": int(len(t)),
        "answered": int(ok.sum()),
        "errors": int((~ok).sum()),
        "send_span_s": float(t[-1]),
        "phases": per_phase,
        "windows": windows,
        "threshold_series": series,
        "t_lowered": bool(any(x["t_min"] < ref["t_cal"] - 1e-9 for x in series)),
        # T back (every instance at the calibrated T) and staying back to the end of the last phase; first back
        "t_recovery_s": None if back is None else max(0.0, back - last.start_s),
        "t_first_back_s": None if first_back is None else max(0.0, first_back - last.start_s),
        # share of the last phase's scrapes, from the first return on, with every instance at the calibrated T
        "t_share_at_calibrated_after": (
            float(np.mean(at_cal[[x["t"] for x in tail].index(first_back) :])) if first_back is not None else 0.0
        ),
        "last_load_row_after_fall_s": float(t[lowered_in_last].max() - last.start_s) if lowered_in_last.any() else 0.0,
        "counters": counters,
        "reasons": {r: int((req["reason"] == r).sum()) for r in REASONS},
        "consistency": consistency,
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


# ---------------------------------------------------------------- output -----------------------------------------
def print_table(result: dict) -> None:
    print(
        f"\nbig alone saturates at {result['saturation']['rate']:.0f} req/s (batch 1); littlebig unloaded p99 "
        f"{result['littlebig_unloaded']['p99_ms']:.1f} ms; SLO p99 {result['slo_p99_ms']:g} ms; EPS "
        f"{result['max_accuracy_drop']}; T calibrated {result['t_cal']:.4f}, T_min {result['t_min']:.4f}"
    )
    head = (
        f"{'run':<9}{'phase':<10}{'offered':>8}{'answered':>9}{'err':>6}{'p50 ms':>9}{'p99 ms':>10}{'win ok':>8}"
        f"{'acc':>8}{'static':>8}{'drop':>8}{'load':>7}{'dline':>7}{'esc':>7}{'T min':>8}"
    )
    print(head)
    for mode, run in result["runs"].items():
        for p in run["phases"]:
            n = max(p["requests"], 1)
            print(
                f"{mode:<9}{p['phase']:<10}{p['offered_rate']:>8.0f}{p['answered_rate']:>9.0f}{p['errors']:>6}"
                f"{p['p50_ms']:>9.1f}{p['p99_ms']:>10.1f}{p['windows_within_slo']:>4}/{p['windows']:<3}"
                f"{100 * p['accuracy_served']:>8.2f}{100 * p['accuracy_static']:>8.2f}{100 * p['accuracy_drop']:>8.2f}"
                f"{100 * p['reasons']['load'] / n:>6.1f}%{100 * p['reasons']['deadline'] / n:>6.1f}%"
                f"{100 * p['reasons']['escalated'] / n:>6.1f}%{p['t_min_seen']:>8.3f}"
            )
        for p in run["phases"]:
            ms = p["server_ms"]
            print(
                f"{mode:<9}{p['phase']:<10}Triton, mean ms per request: littlebig queue {ms['littlebig_queue_ms']:.1f} "
                f"of {ms['littlebig_request_ms']:.1f} in littlebig; big {ms['big_request_ms']:.1f} (queue "
                f"{ms['big_queue_ms']:.1f})"
            )
        rec, first = run["t_recovery_s"], run["t_first_back_s"]
        print(
            f"{mode:<9}T lowered: {run['t_lowered']}; after the load fell, T back at the calibrated value "
            f"{'never' if first is None else f'first after {first:.1f} s'}, "
            f"{'never for good' if rec is None else f'for good after {rec:.1f} s'} "
            f"({100 * run['t_share_at_calibrated_after']:.0f}% of the scrapes since); consistency {run['consistency']}"
        )
    print("\ntargets (governor on):")
    for name, v in result["targets"].items():
        if "met" in v:
            print(f"  {name:<20} {v['measured']!s:<24} {v['target']:<60} {'met' if v['met'] else 'NOT met'}")
    if "static_for_comparison_2x" in result["targets"]:
        print(f"  governor off at 2x: {result['targets']['static_for_comparison_2x']}")


def plot(result: dict, path: Path) -> None:
    """p99 per window vs the SLO (governor on and off), T over time, and who answered; phase boundaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    colors = {"on": "tab:green", "off": "tab:red"}
    fig, axes = plt.subplots(4, 1, figsize=(11, 13), sharex=True)
    ax = axes[0]
    for mode, run in runs.items():
        w = run["windows"]
        mid = [(x["start_s"] + x["stop_s"]) / 2 for x in w]
        p99 = [min(x["p99_ms"], 1e6) for x in w]
        ax.plot(
            mid,
            p99,
            marker="o",
            color=colors.get(mode),
            label=f"governor {mode}: p99 per {result['window_s']:g} s window",
        )
    ax.axhline(result["slo_p99_ms"], ls="--", c="k", label=f"SLO {result['slo_p99_ms']:g} ms")
    ax.set(yscale="log", ylabel="p99 latency (ms)")
    ax = axes[1]
    for mode, run in runs.items():
        s = run["threshold_series"]
        ts = [x["t"] for x in s]
        ax.fill_between(
            ts, [x["t_min"] for x in s], [x["t_max"] for x in s], step="post", alpha=0.3, color=colors.get(mode)
        )
        ax.step(
            ts,
            [x["t_min"] for x in s],
            where="post",
            color=colors.get(mode),
            label=f"governor {mode}: T in force (BLS instances)",
        )
    ax.axhline(result["t_cal"], ls="--", c="tab:blue", label=f"calibrated T {result['t_cal']:.4f}")
    ax.axhline(
        result["t_min"],
        ls=":",
        c="tab:purple",
        label=f"T_min {result['t_min']:.4f} (EPS {result['max_accuracy_drop']})",
    )
    ax.set(ylabel="T")
    ax = axes[2]
    for mode, run in runs.items():
        w = run["windows"]
        mid = [(x["start_s"] + x["stop_s"]) / 2 for x in w]
        ax.plot(
            mid,
            [100 * x["share_escalated"] for x in w],
            color=colors.get(mode),
            label=f"governor {mode}: escalated to big",
        )
        if mode == "on":
            ax.plot(mid, [100 * (x["share_load"] + x["share_deadline"]) for x in w], color=colors[mode], ls="--",
                    label="governor on: little because of load or deadline")  # fmt: skip
        if any(x["errors"] for x in w):
            ax.plot(
                mid,
                [100 * x["share_error"] for x in w],
                color=colors.get(mode),
                ls=":",
                label=f"governor {mode}: errors",
            )
    ax.set(ylabel="% of requests per window")
    ax = axes[3]
    for mode, run in runs.items():
        s = [x for x in run["threshold_series"] if "big_request_ms" in x]
        ts = [x["t"] for x in s]
        ax.plot(ts, [x["littlebig_request_ms"] for x in s], color=colors.get(mode), lw=2,
                label=f"governor {mode}: littlebig, whole request in the server")  # fmt: skip
        ax.plot(ts, [x["littlebig_queue_ms"] for x in s], color=colors.get(mode), ls="--",
                label=f"governor {mode}: littlebig's queue (its Python model cannot see it)")  # fmt: skip
        ax.plot(ts, [x["big_request_ms"] for x in s], color=colors.get(mode), ls=":",
                label=f"governor {mode}: big, queue + compute")  # fmt: skip
    ax.set(yscale="log", ylabel="mean ms per request (Triton, 1 s)", xlabel="seconds since the step load began")
    for ax in axes:
        for p in result["phases"]:
            ax.axvline(p["start_s"], c="gray", lw=0.8)
            ax.text(p["start_s"] + 0.5, 1.0, f"{p['name']} ({p['rate']:.0f}/s)", transform=ax.get_xaxis_transform(),
                    va="top", fontsize=8, color="gray")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center right")
        ax.set_xlim(-2, result["phases"][-1]["stop_s"] + 2)
    t = result["targets"]
    fig.suptitle(
        f"littlebig under a step load (1x, 2x, 1x big's saturation {result['saturation']['rate']:.0f} req/s, batch 1): "
        f"2x windows within SLO {t['p99_windows_ok_2x']['measured']:.0%} on vs "
        f"{t.get('static_for_comparison_2x', {}).get('windows_ok_share', float('nan')):.0%} off",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main -------------------------------------------
def warm(url: str, images: np.ndarray) -> None:
    import tritonclient.grpc as grpcclient

    from bench.run import warm_up

    client = grpcclient.InferenceServerClient(url)
    try:
        for model in (BLS, "big", "little"):
            warm_up(client, images, model, (1, 8))
    finally:
        client.close()


def run_mode(mode: str, args, opts, repo_root: Path, images, input_data, plan, times, ref, saturation=None) -> dict:
    """One server with ``opts``: (big's saturation, littlebig unloaded, when asked) and the step load."""
    from littlebig.model_repository.generate import generate
    from littlebig.model_repository.server import Ports, TritonServer

    work = repo_root / mode
    work.mkdir(parents=True, exist_ok=True)
    repo = work / "model_repository"
    summary = generate(args.build, repo, "cpu", opts)
    out: dict[str, Any] = {"options": {k: v for k, v in vars(opts).items() if not isinstance(v, tuple)}}
    server = TritonServer(repo, Ports.free(), log_file=work / "tritonserver.log")
    with server.start():
        url = f"127.0.0.1:{server.ports.grpc}"
        warm(url, images)
        if saturation is not None:
            saturation.update(measure_saturation(args, url, input_data, work))
            plan[:] = phases(args.phase_seconds, saturation["rate"])
            times[:] = list(schedule(plan, args.distribution, args.seed))
        intervals = write_intervals(np.asarray(times), work / "intervals.txt")
        scrapes, began, ended = step_load(
            PerfAnalyzer(args.perf_venv), url, f"http://127.0.0.1:{server.ports.metrics}/metrics", intervals,
            len(times), input_data, work / "profile.json", plan[-1].stop_s, f"governor {mode:<3}",
            [f"--request-parameter=deadline_ms:{args.deadline_ms}:int"] if args.deadline_ms else [],
        )  # fmt: skip
    rows_of = {}
    for i, img in enumerate(images):
        rows_of.setdefault(img.tobytes(), i)
    req = read_profile(work / "profile.json", rows_of)
    if not args.keep_profile:
        (work / "profile.json").unlink()
    np.savez_compressed(work / "requests.npz", **req)
    out.update(analyse(req, scrapes, plan, ref, args.slo_p99_ms, args.window_s))
    out["perf_analyzer_wall_s"] = round(ended - began, 1)
    out["send_lag_p99_ms"] = float(
        np.percentile((req["send"] - req["send"][0]) - np.asarray(times)[: len(req["send"])], 99) * 1000
    )  # how far behind the schedule perf_analyzer sent (it keeps pace when this is small)
    out["repository"] = {k: summary[k] for k in ("threshold", "rule", "slo_p99_ms", "t_min", "governor_thresholds")}
    return out


def measure_saturation(args, url: str, input_data: Path, work: Path) -> dict:
    """big alone's max throughput (requests/s, batch 1) over the concurrencies asked; littlebig's unloaded p99."""
    pa = PerfAnalyzer(args.perf_venv)
    window = Window(args.saturation_ms, stability_pct=25, max_trials=4)
    points = []
    for c in tqdm(args.saturation_concurrency, desc="big alone's saturation", unit="point"):
        points.append(measure(pa, url, "big", 1, c, input_data, work, window).as_dict())
    best = max(points, key=lambda p: p["throughput"])
    unloaded = measure(pa, url, BLS, 1, 1, input_data, work, window).as_dict()
    return {"rate": best["throughput"], "concurrency": best["concurrency"], "points": points, "unloaded": unloaded}


def source() -> dict[str, Any]:
    """Which code was served: the commit, the BLS model's files that differ from it, and their hashes."""
    import hashlib

    def git(*a: str) -> str:
        done = subprocess.run(["git", *a], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    bls = Path(__file__).resolve().parent.parent / "model_repository" / "littlebig"
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted": git("status", "--porcelain", "--", "model_repository", "littlebig", "export").splitlines(),
        "sha256": {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in sorted(bls.glob("*.py"))},
    }


def main(argv: list[str] | None = None) -> int:
    from bench.run import load_test_images, machine, snapshot
    from littlebig.cli import add_serve_options, given_serve_options
    from littlebig.model_repository.generate import ServeOptions, governor_settings, served_threshold

    ap = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, default=Path("build"))
    ap.add_argument("--perf-venv", type=Path, default=Path(".venv-perf"))
    ap.add_argument("--out", type=Path, help="JSON (default BUILD/overload.json; the PNG goes beside it)")
    ap.add_argument("--images", type=int, default=2000, help="real test images the load cycles through")
    ap.add_argument("--phase-seconds", default="30,30,45", help="seconds of the 1x, 2x and 1x phases")
    ap.add_argument("--window-s", type=float, default=5.0, help="p99 window")
    ap.add_argument("--distribution", choices=["poisson", "constant"], default="poisson", help="request arrivals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--saturation-concurrency", default="16,32", help="concurrencies at which big alone is measured")
    ap.add_argument("--saturation-ms", type=int, default=3000, help="perf_analyzer window for the saturation")
    ap.add_argument("--rate", type=float, help="use this saturation rate (req/s) instead of measuring it")
    ap.add_argument("--modes", default="off,on", help="governor off (static T) and/or on, in this order")
    ap.add_argument("--deadline-ms", type=int, help="send every request with this deadline_ms parameter")
    ap.add_argument("--keep-profile", action="store_true", help="keep perf_analyzer's per-request export")
    ap.add_argument("--quick", action="store_true", help="a few seconds per phase, few images (the test)")
    add_serve_options(ap, build=False)  # --slo-p99-ms, --max-accuracy-drop and the deployment
    args = ap.parse_args(argv)
    if args.quick:
        args.phase_seconds, args.window_s, args.images, args.saturation_ms = "3,3,4", 1.0, min(args.images, 256), 500
        args.saturation_concurrency = "16"
    args.phase_seconds = [float(s) for s in args.phase_seconds.split(",")]
    args.saturation_concurrency = [int(c) for c in args.saturation_concurrency.split(",")]
    if len(args.phase_seconds) != 3:
        ap.error("--phase-seconds takes three durations: 1x, 2x, 1x")
    modes = args.modes.split(",")
    if not set(modes) <= {"on", "off"} or not modes:
        ap.error("--modes is a list of on/off")
    args.slo_p99_ms = args.slo_p99_ms or DEFAULT_SLO_MS
    args.max_accuracy_drop = args.max_accuracy_drop if args.max_accuracy_drop is not None else DEFAULT_EPS

    started = time.monotonic()
    served_source = source()  # before the repositories are generated from the working tree
    out = args.out or args.build / "overload.json"
    work = out.parent / f"{out.stem}-work"
    work.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in given_serve_options(args).items() if k not in ("slo_p99_ms", "max_accuracy_drop")}
    base["max_accuracy_drop"] = args.max_accuracy_drop
    pa = PerfAnalyzer(args.perf_venv)
    pa_version = pa.version()
    args.build = snapshot(args.build, work / "build")
    exported, images, input_data = load_test_images(args.build, work, args.images)
    t_cal, rule = served_threshold(args.build, ServeOptions(**base))
    t_min = governor_settings(args.build, t_cal, ServeOptions(**base))["t_min"]
    ref = reference(args.build, len(images), t_cal, t_min)

    saturation: dict[str, Any] = {}
    plan: list[Phase] = []
    times: list[float] = []
    if args.rate:
        saturation = {"rate": args.rate, "given": True}
        plan[:] = phases(args.phase_seconds, args.rate)
        times[:] = list(schedule(plan, args.distribution, args.seed))
    runs = {}
    for i, mode in enumerate(modes):
        opts = ServeOptions(**base, slo_p99_ms=args.slo_p99_ms if mode == "on" else None)
        first = i == 0 and not args.rate
        runs[mode] = run_mode(
            mode, args, opts, work, images, input_data, plan, times, ref, saturation if first else None
        )
    result = {
        "slo_p99_ms": args.slo_p99_ms,
        "max_accuracy_drop": args.max_accuracy_drop,
        "t_cal": t_cal,
        "t_min": t_min,
        "rule": rule,
        "saturation": {k: v for k, v in saturation.items() if k != "unloaded"},
        "littlebig_unloaded": saturation.get("unloaded", {"p99_us": float("nan")}),
        "phases": [{**asdict(p), "stop_s": p.stop_s} for p in plan],
        "schedule": {"requests": len(times), "distribution": args.distribution, "seed": args.seed},
        "window_s": args.window_s,
        "deadline_ms": args.deadline_ms,
        "runs": runs,
        "targets": targets(runs["on"], runs.get("off"), args.slo_p99_ms, args.max_accuracy_drop)
        if "on" in runs
        else {},
        "images": {"split": "test", "count": len(images), "service_size": exported["service_size"]},
        "models": {role: exported[role]["name"] for role in ROLES},
        "perf_analyzer": {"version": pa_version, "protocol": "grpc", "mode": "async, --request-intervals"},
        "machine": machine(),
        "source": served_source,
        "command": " ".join(["python -m bench.overload", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    result["littlebig_unloaded"]["p99_ms"] = result["littlebig_unloaded"]["p99_us"] / 1000
    out.write_text(json.dumps(result, indent=2, default=float))
    if "on" in runs:
        plot(result, out.with_suffix(".png"))
    print_table(result)
    print(f"\nwrote {out} and {out.with_suffix('.png')} in {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
