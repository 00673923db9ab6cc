"""``littlebig monitor``: the live state of a littlebig server on one terminal screen.

It reads the server's Prometheus metrics endpoint directly (Triton's metrics port, e.g.
http://127.0.0.1:8002/metrics): no Prometheus is needed, so a bare ``littlebig serve`` can be watched. Each frame
shows the same statistics as the recording rules and alerts of deploy/prometheus/littlebig.rules.yml, with the
same formulas and thresholds, but over the monitor's own window (the newest scrape against the oldest one kept
within ``--window`` seconds) instead of the rules' 10m / 30m:

- traffic: rows/s, the escalation rate, the share each stage answered, the T in force per BLS instance;
- drift: the escalation rate at the calibrated T against val's (z), and little's confidence histogram against
  val's (PSI);
- shadow sampling: the label-free accuracy loss against big and its one-sided bounds (``shadow.loss_bound``, the
  rules' exact formula), against calibration's budget eps.

Counters are cumulative since the server started, so every figure is a difference of two scrapes; a counter that
went down (a restarted server) starts the window again at the restart, as Prometheus' ``increase()`` does.
Stdlib and numpy only (plain text frames, no curses): it runs wherever the client does.
"""

from __future__ import annotations

import json
import math
import sys
import time
import urllib.error
from collections.abc import Sequence
from dataclasses import dataclass

from littlebig.metrics_text import Metrics, fetch
from littlebig.shadow import MIN_SHADOW_ROWS, Z_ALERT, loss_bound

# The alerts' thresholds, as deploy/prometheus/littlebig.rules.yml sets them (and says why there):
#: LittlebigEscalationRateDrift: |z| above this ...
Z_DRIFT = 4.0
#: LittlebigConfidenceShift: PSI above this ...
PSI_SHIFT = 0.2
#: ... each with at least this many rows in the window.
MIN_DRIFT_ROWS = 500
#: Both PSI shares are floored at this (an empty bin costs a bounded amount instead of ln 0).
PSI_FLOOR = 0.001
#: The calibrated bin shares are a reference only when they sum to one (unset gauges read 0).
PSI_REFERENCE_SUM = 0.99
#: Clears a terminal between frames (home, erase display).
CLEAR = "\x1b[H\x1b[2J"

NAN = math.nan


@dataclass(frozen=True)
class Snapshot:
    """One scrape: when (a monotonic clock, seconds) and what it read."""

    time: float
    metrics: Metrics


def _is_counter(metrics: Metrics, name: str) -> bool:
    kind = metrics.types.get(name)
    return kind == "counter" or (kind is None and name.endswith("_total"))


def _counters(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """littlebig's counter series: (name, sorted labels) -> value."""
    return {k: v for k, v in metrics.series("littlebig_").items() if _is_counter(metrics, k[0])}


def counter_reset(old: Snapshot, new: Snapshot) -> bool:
    """Whether any littlebig counter went down between two scrapes: the server (or a BLS instance) restarted."""
    before = _counters(old.metrics)
    return any(value < before.get(key, 0.0) for key, value in _counters(new.metrics).items())


def keep(snapshots: Sequence[Snapshot], window: float) -> list[Snapshot]:
    """The scrapes the next frame needs: the newest and those within ``window`` seconds of it (at least one older
    scrape, so there is always a difference to show). After a counter reset the window starts again at the reset:
    the older scrapes are replaced by an empty one (every counter 0) at the time of the last scrape before it."""
    snaps = list(snapshots)
    if len(snaps) >= 2 and counter_reset(snaps[-2], snaps[-1]):
        return [Snapshot(snaps[-2].time, Metrics(())), snaps[-1]]
    while len(snaps) > 2 and snaps[-1].time - snaps[0].time > window:
        snaps.pop(0)
    return snaps


def _increase(old: Metrics, new: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Per series of counter ``name``: new - old, or new where it went down (a reset) or was not there before."""
    before = old.series(name)
    out = {}
    for (series_name, labels), value in new.series(name).items():
        if series_name != name:
            continue
        prev = before.get((name, labels))
        out[labels] = value if prev is None or value < prev else value - prev
    return out


def increase(old: Snapshot, new: Snapshot, name: str) -> float:
    """Counter ``name``'s increase between two scrapes, summed over its series (``sum(increase(...))``)."""
    return sum(_increase(old.metrics, new.metrics, name).values())


def increase_by(old: Snapshot, new: Snapshot, name: str, label: str) -> dict[str, float]:
    """Counter ``name``'s increase per value of ``label`` (per bin, stage, reason), in the exposition's order."""
    out: dict[str, float] = {}
    for labels, value in _increase(old.metrics, new.metrics, name).items():
        key = dict(labels).get(label)
        if key is not None:
            out[key] = out.get(key, 0.0) + value
    return out


def _gauge_max(metrics: Metrics, name: str) -> float:
    """A calibration gauge: the same on every instance and replica, so the max (NaN when not exported)."""
    values = [s.value for s in metrics.select(name)]
    return max(values) if values else NAN


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else NAN


def drift_z(r: float, p: float, n: float, n_val: float) -> float:
    """The rules' z = (r - p) / sqrt(p (1 - p) (1/n + 1/n_val)); NaN without rows or without a reference
    (unset gauges read -1 or are absent)."""
    if not (n > 0 and n_val > 0 and 0 <= p <= 1) or math.isnan(r):
        return NAN
    sd = math.sqrt(p * (1 - p) * (1 / n + 1 / n_val))
    if sd == 0:
        return NAN if r == p else math.copysign(math.inf, r - p)
    return (r - p) / sd


def psi(live: dict[str, float], reference: dict[str, float]) -> float:
    """The rules' PSI = sum over bins (a - e) ln(a / e), a the live share of each bin, e the reference's, both
    floored at ``PSI_FLOOR``. NaN without live rows, or without a reference that sums to one."""
    total = sum(live.values())
    if total <= 0 or not sum(reference.values()) > PSI_REFERENCE_SUM:
        return NAN
    out = 0.0
    for upper in set(live) | set(reference):
        a = max(live.get(upper, 0.0) / total, PSI_FLOOR)
        e = max(reference.get(upper, 0.0), PSI_FLOOR)
        out += (a - e) * math.log(a / e)
    return out


def _by_upper(values: dict[str, float]) -> dict[str, float]:
    return dict(sorted(values.items(), key=lambda kv: float(kv[0])))


def figures(old: Snapshot, new: Snapshot) -> dict[str, object]:
    """Every figure of a frame, from two scrapes (counters: their increase; gauges: the newest scrape). Pure, so
    the tests (and ``--json``) see exactly what the screen shows. NaN where a figure is undefined."""
    m = new.metrics
    seconds = new.time - old.time
    rows = increase(old, new, "littlebig_rows_total")
    escalated = increase(old, new, "littlebig_escalated_rows_total")
    stage_rows = increase_by(old, new, "littlebig_stage_rows_total", "stage")
    thresholds = [s.value for s in m.select("littlebig_threshold")]

    calibration_escalations = increase(old, new, "littlebig_calibration_escalations_total")
    r = _ratio(calibration_escalations, rows)
    p = _gauge_max(m, "littlebig_calibrated_escalation_rate")
    n_val = _gauge_max(m, "littlebig_calibration_rows")
    z = drift_z(r, p, rows, n_val)

    live_bins = _by_upper(increase_by(old, new, "littlebig_little_confidence_rows_total", "upper"))
    reference = _by_upper({
        upper: max(s.value for s in m.select("littlebig_calibrated_confidence_share", upper=upper))
        for upper in m.by("littlebig_calibrated_confidence_share", "upper")
    })
    shift = psi(live_bins, reference)
    live_total = sum(live_bins.values())

    rate = _gauge_max(m, "littlebig_shadow_rate")
    eps = _gauge_max(m, "littlebig_calibrated_eps")
    confident = increase(old, new, "littlebig_confident_rows_total")
    shadow_rows = increase(old, new, "littlebig_shadow_rows_total")
    disagreements = increase(old, new, "littlebig_shadow_disagreements_total")
    loss = loss_bound(rows, confident, shadow_rows, disagreements, Z_ALERT)
    return {
        "littlebig": "littlebig_rows_total" in m,
        "seconds": seconds,
        "rows": rows,
        "rows_per_s": _ratio(rows, seconds),
        "escalated": escalated,
        "escalation_rate": _ratio(escalated, rows),
        "stages": {stage: {"rows": n, "share": _ratio(n, rows)} for stage, n in stage_rows.items()},
        "threshold_min": min(thresholds) if thresholds else NAN,
        "threshold_max": max(thresholds) if thresholds else NAN,
        "thresholds": thresholds,
        "load_share": _ratio(increase(old, new, "littlebig_load_rows_total"), rows),
        "deadline_share": _ratio(increase(old, new, "littlebig_deadline_rows_total"), rows),
        "degraded_rows": increase(old, new, "littlebig_degraded_rows_total"),
        "failed_requests": increase(old, new, "littlebig_failed_requests_total"),
        "drift": {
            "rate": r,
            "reference_rate": p,
            "reference_rows": n_val,
            "z": z,
            "alert": abs(z) > Z_DRIFT and rows >= MIN_DRIFT_ROWS,
        },
        "psi": {
            "value": shift,
            "live_share": {u: _ratio(n, live_total) for u, n in live_bins.items()},
            "reference_share": reference,
            "alert": shift > PSI_SHIFT and rows >= MIN_DRIFT_ROWS,
        },
        "shadow": {
            "on": rate > 0,
            "rate": rate,
            "confident": confident,
            "rows": shadow_rows,
            "disagreements": disagreements,
            "dropped": increase_by(old, new, "littlebig_shadow_dropped_rows_total", "reason"),
            "eps": eps,
            "confident_share": loss["share"],
            "disagreement_rate": loss["rate"],
            "estimate": loss["estimate"],
            "lower": loss["lower"],
            "upper": loss["upper"],
            # LittlebigAccuracyLossAboveBudget's condition, window aside.
            "alert": loss["lower"] > eps and shadow_rows >= MIN_SHADOW_ROWS and eps > 0,
        },
    }


def _num(x: float, fmt: str = ".4g") -> str:
    return "n/a" if math.isnan(x) else format(x, fmt)


def _pct(x: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}%}"


def _count(x: float) -> str:
    return f"{x:,.0f}"


def _verdict(alert: bool, value: float, count: float, needed: int, what: str, flag: str) -> str:
    """An alert's word on its line: the flag, ok, or why it cannot fire yet (too few rows in the window)."""
    if alert:
        return flag
    if math.isnan(value):
        return ""
    return "ok" if count >= needed else f"(alerts need {needed:,} {what})"


def render(fig: dict, title: str = "littlebig monitor") -> str:
    """One text frame of ``figures``: a line per concern, alerts in capitals at the end of their line."""
    drift, shift, shadow = fig["drift"], fig["psi"], fig["shadow"]
    rows = fig["rows"]
    seconds = fig["seconds"]
    span = f"{seconds:.1f}" if seconds < 10 else f"{seconds:,.0f}"
    lines = [title, f"window {span} s: {_count(rows)} rows, {_num(fig['rows_per_s'], ',.1f')} rows/s"]
    t = f"T in force {_num(fig['threshold_max'])}"
    if not fig["littlebig"]:
        lines.append("NO littlebig_* METRICS HERE: is this the metrics port (8002) of a server with littlebig loaded?")
    if len(set(fig["thresholds"])) > 1:
        t += " (instances: " + ", ".join(_num(x) for x in fig["thresholds"]) + ")"
    lines.append(f"escalated {_pct(fig['escalation_rate'])} ({_count(fig['escalated'])} rows)   {t}")
    if fig["stages"]:
        lines.append("answered by " + ", ".join(f"{s} {_pct(v['share'])}" for s, v in fig["stages"].items()))
    lines.append(
        f"little under load {_pct(fig['load_share'])}, past deadline {_pct(fig['deadline_share'])}; "
        f"degraded rows {_count(fig['degraded_rows'])}, failed requests {_count(fig['failed_requests'])}"
    )
    if math.isnan(drift["reference_rate"]) or drift["reference_rate"] < 0 or not drift["reference_rows"] > 0:
        lines.append("drift: no calibration reference exported (escalation rate)")
    else:
        verdict = _verdict(drift["alert"], drift["z"], rows, MIN_DRIFT_ROWS, "rows", f"DRIFT (|z| > {Z_DRIFT:g})")
        lines.append(
            f"drift: escalation rate at calibrated T {_pct(drift['rate'])} vs val {_pct(drift['reference_rate'])} "
            f"({_count(drift['reference_rows'])} rows): z {_num(drift['z'], '.2f')}   {verdict}".rstrip()
        )
    if not sum(shift["reference_share"].values()) > PSI_REFERENCE_SUM:
        lines.append("drift: no calibration reference exported (confidence histogram)")
    else:
        verdict = _verdict(shift["alert"], shift["value"], rows, MIN_DRIFT_ROWS, "rows", f"SHIFT (PSI > {PSI_SHIFT:g})")
        lines.append(f"drift: confidence PSI {_num(shift['value'], '.4f')}   {verdict}".rstrip())
    if not shadow["on"]:
        lines.append("shadow sampling off")
    else:
        dropped = sum(shadow["dropped"].values())
        reasons = ", ".join(f"{k} {_count(v)}" for k, v in shadow["dropped"].items() if v > 0)
        lines.append(
            f"shadow: R {_pct(shadow['rate'], 2)}, {_count(shadow['confident'])} confident rows "
            f"({_pct(shadow['confident_share'])}), {_count(shadow['rows'])} shadow rows, "
            f"{_count(shadow['disagreements'])} disagreements, dropped {_count(dropped)}"
            + (f" ({reasons})" if reasons else "")
        )
        eps = shadow["eps"]
        budget = f"budget eps {_pct(eps, 2)}" if eps > 0 else "no budget eps exported"
        verdict = _verdict(
            shadow["alert"], shadow["lower"], shadow["rows"], MIN_SHADOW_ROWS, "shadow rows", "LOSS ABOVE BUDGET"
        )
        lines.append(
            f"loss vs big {_pct(shadow['estimate'], 2)} [{_pct(shadow['lower'], 2)}, {_pct(shadow['upper'], 2)}] "
            f"at z {Z_ALERT}, {budget}   {verdict}".rstrip()
        )
    return "\n".join(lines)


def _jsonable(value: object) -> object:
    """NaN and infinities as null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def scrape(url: str, timeout: float = 10.0) -> Snapshot:
    """One scrape; ValueError naming the URL when it cannot be read or is not Prometheus text."""
    try:
        metrics = fetch(url, timeout=timeout)
    except (OSError, urllib.error.URLError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read metrics from {url}: {exc}") from exc
    return Snapshot(time.monotonic(), metrics)


def run(url: str, interval: float = 2.0, window: float = 1800.0, once: bool = False, as_json: bool = False) -> int:
    """Scrape every ``interval`` seconds and print a frame (JSON: one object per line); ``once``: one frame from
    two scrapes ``interval`` apart. ValueError when the first scrape fails; a later failure is shown on the frame
    and the monitor keeps trying (a restarting server). Ctrl-C exits 0."""
    if not interval > 0 or not window > 0:
        raise ValueError(f"--interval and --window must be positive, got {interval} and {window}")
    clear = not as_json and not once and sys.stdout.isatty()
    try:
        snaps, failure = [scrape(url)], ""
        if once:
            time.sleep(interval)
            snaps.append(scrape(url))
        while True:
            snaps = keep(snaps, window)
            fig = figures(snaps[0], snaps[-1])
            if as_json:
                print(json.dumps(_jsonable({"url": url, **fig, **({"error": failure} if failure else {})})), flush=True)
            else:
                frame = render(fig, f"littlebig monitor  {url}  {time.strftime('%H:%M:%S')}")
                frame += f"\nLAST SCRAPE FAILED: {failure}" if failure else ""
                print((CLEAR if clear else "") + frame, flush=True)
            if once:
                return 0
            time.sleep(interval)
            try:
                snaps.append(scrape(url))
                failure = ""
            except ValueError as exc:
                failure = f"{time.strftime('%H:%M:%S')} {exc} (retrying; figures as of the last good scrape)"
    except KeyboardInterrupt:
        return 0
