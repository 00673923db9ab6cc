"""The drift alert rules (deploy/prometheus/): promtool checks them and runs their unit tests, and the
whole loop runs on the real server: replayed images -> littlebig's metrics -> the rules -> alerts or none.

promtool comes from Debian's prometheus package (apt-packages.txt; `make setup` installs it as root, CI does).
"""

from __future__ import annotations

import bisect
import json
import math
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import scrape

RULES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = RULES_DIR / "littlebig.rules.yml"
RULE_TESTS = RULES_DIR / "littlebig.rules.test.yml"
#: The alerts' documented thresholds (test_the_alerts_fire_exactly_past_their_documented_thresholds checks them).
Z_MAX, PSI_MAX, MIN_ROWS, SHARE_FLOOR = 4.0, 0.2, 500, 0.001
DRIFT_ALERTS = ("LittlebigEscalationRateDrift", "LittlebigConfidenceShift")
REPLAY_ROWS = 3000


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: it comes from Debian's prometheus package, listed in apt-packages.txt "
            "(`make setup` as root installs it; or `apt-get install prometheus`)"
        )
    return path


def run_promtool(*args: str | Path) -> str:
    proc = subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def rules() -> dict[str, dict]:
    """Every rule of the rules file by its record or alert name."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r.get("record") or r["alert"]: r for g in groups for r in g["rules"]}


def test_promtool_checks_the_rules():
    out = run_promtool("check", "rules", RULES)
    assert "SUCCESS" in out


def test_promtool_unit_tests_on_synthetic_series():
    """In-distribution noise fires nothing, a shifted rate or histogram fires its alert, too few rows fire
    nothing, a replica restart fires nothing, a missing reference says so (littlebig.rules.test.yml)."""
    out = run_promtool("test", "rules", RULE_TESTS)
    assert "SUCCESS" in out


#: Val's bin shares in the synthetic tests (littlebig.rules.test.yml), p and n_val: the reference of every case below.
VAL_SHARES = (0.0, 0.0, 0.005, 0.015, 0.035, 0.04, 0.045, 0.06, 0.065, 0.15, 0.24, 0.345)
P_VAL, N_VAL = 0.42, 5000


def z_of(rows: int, escalations: int) -> float:
    """The documented statistic, by hand: (r - p) / sqrt(p (1 - p) (1/n + 1/n_val))."""
    return (escalations / rows - P_VAL) / math.sqrt(P_VAL * (1 - P_VAL) * (1 / rows + 1 / N_VAL))


def psi_of(counts: list[int]) -> float:
    """The documented PSI, by hand: sum (a - e) ln(a / e) with both shares floored at SHARE_FLOOR."""
    total = sum(counts)
    pairs = [(max(c / total, SHARE_FLOOR), max(e, SHARE_FLOOR)) for c, e in zip(counts, VAL_SHARES, strict=True)]
    return sum((a - e) * math.log(a / e) for a, e in pairs)


def shifted_bins(rows: int, moved: int) -> list[int]:
    """Val-like bins of ``rows`` rows with ``moved`` of them taken from the top bin to the (0.5, 0.6] bin."""
    counts = [10 * round(rows * e / 10) for e in VAL_SHARES]  # whole rows per minute
    counts[-1] += rows - sum(counts) - moved
    counts[4] += moved
    return counts


LABELS = 'job="triton", pod="littlebig-0", model="littlebig", version="1"'


def holds(tmp_path: Path, series: list[tuple[str, str]], expr: str, at: str, interval: str = "1m") -> bool:
    """Whether PromQL ``expr`` gives a non-empty result at ``at`` on ``series`` (name, promtool values), with the
    rules file's recording rules evaluated by promtool."""
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": interval,
            "input_series": [{"series": name, "values": values} for name, values in series],
            "promql_expr_test": [{
                "expr": f"count({expr.strip()}) or vector(0)", "eval_time": at,
                "exp_samples": [{"labels": "{}", "value": 1}],
            }],
        }],
    }  # fmt: skip
    path = tmp_path / f"case-{len(list(tmp_path.glob('case-*')))}.yml"
    path.write_text(yaml.safe_dump(test))
    proc = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    return proc.returncode == 0


def fires(tmp_path: Path, alert: str, rows: int, escalations: int, bins: list[int]) -> bool:
    """Whether ``alert``'s expression (read from the rules file) holds at 15m for counters growing by ``rows``,
    ``escalations`` and ``bins`` every 10 minutes (promtool evaluates the recording rules it reads)."""
    from littlebig.decision import CONFIDENCE_BINS

    if rows % 10 or escalations % 10 or any(c % 10 for c in bins):
        raise ValueError("per-10m counts must be multiples of 10 (the series grow once a minute)")
    series = [(f"littlebig_rows_total{{{LABELS}}}", f"0+{rows // 10}x20"),
              (f"littlebig_calibration_escalations_total{{{LABELS}}}", f"0+{escalations // 10}x20"),
              (f"littlebig_calibrated_escalation_rate{{{LABELS}}}", f"{P_VAL}+0x20"),
              (f"littlebig_calibration_rows{{{LABELS}}}", f"{N_VAL}+0x20")]  # fmt: skip
    for edge, count, share in zip(CONFIDENCE_BINS, bins, VAL_SHARES, strict=True):
        series.append((f'littlebig_little_confidence_rows_total{{{LABELS}, upper="{edge!r}"}}', f"0+{count // 10}x20"))
        series.append((f'littlebig_calibrated_confidence_share{{{LABELS}, upper="{edge!r}"}}', f"{share}+0x20"))
    return holds(tmp_path, series, rules()[alert]["expr"], "15m")


def test_the_alerts_fire_exactly_past_their_documented_thresholds(tmp_path):
    """Each alert's expression, evaluated by promtool on series built to sit just either side of the documented
    threshold (z = 4, PSI = 0.2, at least 500 rows), computed here by hand from the documented formulas."""
    val_like = shifted_bins(20000, 0)
    # z: 20,000 rows per 10m; 9,030 escalations give z = 4.04, 9,020 give z = 3.97.
    assert z_of(20000, 9030) > Z_MAX > z_of(20000, 9020)
    assert fires(tmp_path, "LittlebigEscalationRateDrift", 20000, 9030, val_like)
    assert not fires(tmp_path, "LittlebigEscalationRateDrift", 20000, 9020, val_like)
    # rows: a huge z (r = 0.9) fires at 500 rows and not at 490.
    for rows, expected in ((500, True), (490, False)):
        assert fires(tmp_path, "LittlebigEscalationRateDrift", rows, round(0.09 * rows) * 10, shifted_bins(rows, 0)) \
            is expected, rows
    # PSI: move rows from the top bin to (0.5, 0.6] until PSI passes 0.2; one step (10 rows of 20,000) either side.
    moved = next(m for m in range(0, 20000, 10) if psi_of(shifted_bins(20000, m)) > PSI_MAX)
    above, below = shifted_bins(20000, moved), shifted_bins(20000, moved - 10)
    assert psi_of(above) > PSI_MAX > psi_of(below)
    assert fires(tmp_path, "LittlebigConfidenceShift", 20000, 8400, above)
    assert not fires(tmp_path, "LittlebigConfidenceShift", 20000, 8400, below)
    assert all(rules()[a].get("for") for a in DRIFT_ALERTS)


# --- the shadow loss bound ---------------------------------------------------------------------------------

def shadow_series(rows: int, confident: int, shadow: int, disagreements: int, eps: float) -> list[tuple[str, str]]:
    """Counters growing by the given counts every 30 minutes (a sample each 3m: whole rows), on two bins."""
    if any(c % 10 for c in (rows, confident, shadow, disagreements)):
        raise ValueError("per-30m counts must be multiples of 10 (the series grow every 3 minutes)")
    half = (shadow // 20, disagreements // 20)  # split over two bins: the rules sum them
    rest = (shadow // 10 - half[0], disagreements // 10 - half[1])
    series = [(f"littlebig_rows_total{{{LABELS}}}", f"0+{rows // 10}x20"),
              (f"littlebig_confident_rows_total{{{LABELS}}}", f"0+{confident // 10}x20"),
              (f"littlebig_calibrated_eps{{{LABELS}}}", f"{eps!r}+0x20")]  # fmt: skip
    for edge, (s, d) in (("0.99", half), ("1.0", rest)):
        series.append((f'littlebig_shadow_rows_total{{{LABELS}, upper="{edge}"}}', f"0+{s}x20"))
        series.append((f'littlebig_shadow_disagreements_total{{{LABELS}, upper="{edge}"}}', f"0+{d}x20"))
    return series


@pytest.mark.parametrize(
    "counts",
    [(30000, 24000, 1200, 0), (30000, 24000, 1200, 10), (30000, 24000, 1200, 120), (5000, 2500, 400, 400),
     (1000, 1000, 50, 20)],
)  # fmt: skip
def test_the_loss_bounds_promtool_computes_are_the_python_ones(tmp_path, counts):
    """The recording rules' estimate and Wilson bounds equal littlebig.shadow.loss_bound's on the same counters
    (to 1e-9), from no disagreement to all, evaluated by promtool."""
    from littlebig.shadow import Z_ALERT, loss_bound

    rows, confident, shadow, disagreements = counts
    expected = loss_bound(rows, confident, shadow, disagreements, Z_ALERT)
    series = shadow_series(*counts, eps=0.005)
    for key, record in (("estimate", "estimate30m"), ("lower", "lower30m"), ("upper", "upper30m")):
        value = expected[key]
        expr = f"abs(model:littlebig_accuracy_loss:{record} - {value!r}) < 1e-9"
        assert holds(tmp_path, series, expr, "45m", interval="3m"), (key, value)


def miss_probability(n: int, rate: float, side: str) -> float:
    """Exact probability, over Binomial(n, rate) disagreements, that the rules' Wilson bound misses the true rate:
    the lower bound above it, or the upper bound below it (export/calibrate.py's binomial tail)."""
    from littlebig.export.calibrate import binomial_cdf
    from littlebig.shadow import Z_ALERT, wilson_cc

    # both bounds grow with k: the first k whose lower bound is above the rate, and the first whose upper is not below
    index = 0 if side == "lower" else 1
    first = bisect.bisect_right(range(n + 1), rate, key=lambda k: wilson_cc(k, n, Z_ALERT)[index])
    if side == "lower":
        return 0.0 if first > n else 1.0 - binomial_cdf(first - 1, n, rate)
    first = bisect.bisect_left(range(n + 1), rate, key=lambda k: wilson_cc(k, n, Z_ALERT)[index])
    return 0.0 if first == 0 else binomial_cdf(first - 1, n, rate)


def test_the_wilson_bound_is_sound_where_the_alert_reads_it():
    """The rules' bound is a normal approximation (nominal miss 1e-4 each side). Its exact miss probability, for
    disagreement rates from 0.5% to 30% (the alert's budget rate eps / confident share is at least eps = 0.5%): at
    n >= 1,000 shadow rows, at most 7e-4 for the lower bound (a false page per look at a loss exactly at the
    budget) and at most 1e-4 for the upper one; at n = 400 the lower bound misses more than 1e-3 of the time, which
    is why the alert needs 1,000 rows."""
    from littlebig.shadow import MIN_SHADOW_ROWS

    rates = (0.005, 0.00625, 0.02, 0.05, 0.1, 0.3)
    assert MIN_SHADOW_ROWS == 1000
    for n in (MIN_SHADOW_ROWS, 3000):
        for rate in rates:
            assert miss_probability(n, rate, "lower") <= 7e-4, (n, rate)
            assert miss_probability(n, rate, "upper") <= 1e-4, (n, rate)
    assert max(miss_probability(400, rate, "lower") for rate in rates) > 1e-3


def test_the_loss_alert_fires_exactly_past_the_budget_with_enough_rows(tmp_path):
    """LittlebigAccuracyLossAboveBudget holds when the loss's lower bound is just above eps and not just below,
    and not at 990 shadow rows where 1,000 fire."""
    from littlebig.shadow import MIN_SHADOW_ROWS, Z_ALERT, loss_bound

    expr = rules()["LittlebigAccuracyLossAboveBudget"]["expr"]
    lower = loss_bound(30000, 24000, 1200, 60, Z_ALERT)["lower"]
    assert holds(tmp_path, shadow_series(30000, 24000, 1200, 60, eps=lower * (1 - 1e-6)), expr, "45m", "3m")
    assert not holds(tmp_path, shadow_series(30000, 24000, 1200, 60, eps=lower * (1 + 1e-6)), expr, "45m", "3m")
    assert f"increase30m >= {MIN_SHADOW_ROWS}" in expr
    for shadow, expected in ((1000, True), (990, False)):
        series = shadow_series(30000, 24000, shadow, 100, eps=0.005)
        assert holds(tmp_path, series, expr, "45m", "3m") is expected, shadow
    # no rows in the window: nothing (a NaN bound is not above anything)
    assert not holds(tmp_path, shadow_series(30000, 24000, 0, 0, eps=0.005), expr, "45m", "3m")


def test_rules_read_metrics_the_model_exports():
    """Every raw littlebig_* series the rules read is a metric family of the served BLS model, and the synthetic
    tests' bins are the served ones (the upper edge written as the BLS model labels it, repr of the edge)."""
    from littlebig.decision import CONFIDENCE_BINS
    from littlebig.metrics import METRICS

    read = set()
    for rule in rules().values():
        read |= set(re.findall(r"(?<![\w:])(littlebig_[a-z_]+)(?![\w:])", rule["expr"]))  # raw, not recorded
    exported = {name for name, *_ in METRICS.values()}
    assert read and read <= exported, sorted(read - exported)
    uppers = set(re.findall(r'upper="([^"]+)"', RULE_TESTS.read_text()))
    assert uppers == {repr(edge) for edge in CONFIDENCE_BINS}


# --- the whole loop on the real server ------------------------------------------------------------------------

def series_key(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


COUNTERS = ("littlebig_rows_total", "littlebig_calibration_escalations_total", "littlebig_little_confidence_rows_total")
GAUGES = ("littlebig_calibrated_escalation_rate", "littlebig_calibration_rows", "littlebig_calibrated_confidence_share")


def replay(server, images: np.ndarray, batch: int = 64, clients: int = 4) -> None:
    import tritonclient.grpc as grpcclient

    def send(start):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports.grpc}")
        try:
            chunk = images[start : start + batch]
            inp = grpcclient.InferInput("IMAGE", list(chunk.shape), "UINT8")
            inp.set_data_from_numpy(chunk)
            assert not client.infer("littlebig", [inp]).as_numpy("DEGRADED").any()
        finally:
            client.close()

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, range(0, len(images), batch)))


def observe(server, images: np.ndarray) -> dict:
    """Replay ``images`` and return the littlebig counters' deltas and the calibration gauges, per series."""
    before = {series_key(s.name, s.labels): s.value for s in scrape(server).samples if s.name in COUNTERS}
    replay(server, images)
    after = scrape(server).samples
    counters = {
        series_key(s.name, s.labels): s.value - before.get(series_key(s.name, s.labels), 0.0)
        for s in after
        if s.name in COUNTERS
    }
    gauges: dict[str, float] = {}
    for s in after:  # one sample per BLS instance process, identical labels: max, as the rules take it
        if s.name in GAUGES:
            key = series_key(s.name, s.labels)
            gauges[key] = max(s.value, gauges.get(key, -math.inf))
    return {"counters": counters, "gauges": gauges}


def drift_statistics(observed: dict) -> dict[str, float]:
    """r, z and PSI from the deltas and gauges, by the formulas the rules document (independently of PromQL)."""

    def total(name):
        return sum(v for k, v in observed["counters"].items() if k.startswith(name + "{"))

    def gauge(name):
        return max(v for k, v in observed["gauges"].items() if k.startswith(name + "{"))

    def per_bin(values, name):
        return {re.search(r'upper="([^"]+)"', k).group(1): v for k, v in values.items() if k.startswith(name + "{")}

    n, esc = total("littlebig_rows_total"), total("littlebig_calibration_escalations_total")
    p, n_val = gauge("littlebig_calibrated_escalation_rate"), gauge("littlebig_calibration_rows")
    live = per_bin(observed["counters"], "littlebig_little_confidence_rows_total")
    ref = per_bin(observed["gauges"], "littlebig_calibrated_confidence_share")
    assert set(live) == set(ref) and len(ref) == 12
    rows_in_bins = sum(live.values())
    psi = 0.0
    for upper, e in ref.items():
        a, e = max(live[upper] / rows_in_bins, SHARE_FLOOR), max(e, SHARE_FLOOR)
        psi += (a - e) * math.log(a / e)
    r = esc / n
    z = (r - p) / math.sqrt(p * (1 - p) * (1 / n + 1 / n_val))
    return {"n": n, "r": r, "p": p, "n_val": n_val, "z": z, "psi": psi}


def promtool_replay_test(observed: dict, stats: dict, fire: bool, tmp_path: Path) -> Path:
    """A promtool test file on the real rules: each counter grows linearly by its scraped delta every 10 minutes
    for 20 minutes (the replay, as a steady 10m window), gauges constant; the alerts must (not) fire at 20m,
    and the recorded z and PSI must equal ``stats``."""
    target = {"job": "triton", "instance": "replay:8002"}
    series = []
    for key, delta in observed["counters"].items():
        series.append(
            {
                "series": key[:-1] + ", " + ", ".join(f'{k}="{v}"' for k, v in target.items()) + "}",
                "values": f"0+{delta / 10!r}x20",
            }
        )
    for key, value in observed["gauges"].items():
        series.append(
            {
                "series": key[:-1] + ", " + ", ".join(f'{k}="{v}"' for k, v in target.items()) + "}",
                "values": f"{value!r}+0x20",
            }
        )
    by_name = rules()
    alerts = []
    for name in DRIFT_ALERTS:
        expected = []
        if fire:
            labels = {**by_name[name]["labels"], "model": "littlebig"}
            expected = [{"exp_labels": labels, "exp_annotations": by_name[name]["annotations"]}]
        alerts.append({"eval_time": "20m", "alertname": name, "exp_alerts": expected})
    alerts.append({"eval_time": "20m", "alertname": "LittlebigDriftReferenceMissing", "exp_alerts": []})
    exprs = [
        {
            "expr": f"count(abs(model:littlebig_calibration_escalation_rate:z10m - {stats['z']!r}) < 1e-6)",
            "eval_time": "20m",
            "exp_samples": [{"labels": "{}", "value": 1}],
        },
        {
            "expr": f"count(abs(model:littlebig_confidence_psi:10m - {stats['psi']!r}) < 1e-6)",
            "eval_time": "20m",
            "exp_samples": [{"labels": "{}", "value": 1}],
        },
    ]
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": alerts, "promql_expr_test": exprs}],
    }
    path = tmp_path / f"{'shifted' if fire else 'in-distribution'}.test.yml"
    path.write_text(json.dumps(test, indent=1))  # JSON is YAML
    return path


def test_replayed_traffic_fires_only_when_shifted(server, test_split, served_threshold, tmp_path):
    """The whole loop: 3,000 Fashion-MNIST test images replayed through the served cascade must not fire the
    drift alerts; the same images inverted (255 - x) must fire both. The scraped deltas and gauges go through
    the real rules file in promtool, which must also record the z and PSI computed here from the formulas."""
    from littlebig.decision import confidence, escalate, softmax

    data, logits = test_split
    images = data.images[:REPLAY_ROWS]
    measured = {}
    for name, stream, shifted in (("in-distribution", images, False), ("inverted", 255 - images, True)):
        observed = observe(server, stream)
        stats = measured[name] = drift_statistics(observed)
        assert stats["n"] == REPLAY_ROWS, f"{name}: the rows counter moved by {stats['n']}, not {REPLAY_ROWS}"
        if not shifted:  # the drift counter counts exactly the rows below the calibrated T
            conf = confidence(softmax(logits["little"][:REPLAY_ROWS]))
            assert stats["r"] * REPLAY_ROWS == pytest.approx(int(escalate(conf, served_threshold).sum()), abs=1e-6)
        # the stream means what the test says it means, by the documented formulas
        if shifted:
            assert abs(stats["z"]) > Z_MAX and stats["psi"] > PSI_MAX, stats
        else:
            assert abs(stats["z"]) < Z_MAX and stats["psi"] < PSI_MAX, stats
        run_promtool("test", "rules", promtool_replay_test(observed, stats, shifted, tmp_path))
    print("drift replay:", json.dumps({k: {s: round(v, 4) for s, v in st.items()} for k, st in measured.items()}))


def test_the_shift_experiment_runs_the_same_rules_with_durations_scaled(tmp_path):
    """``make shift`` gives Prometheus the rules file with only its durations divided (bench/shift.py): the scaled
    file still passes promtool, every PromQL expression is the same once durations are masked, and the alert's
    row minimum is untouched."""
    from bench.shift import scaled_rules

    text = RULES.read_text()
    scaled = scaled_rules(text, 20)
    path = tmp_path / "scaled.rules.yml"
    path.write_text(scaled)
    assert "SUCCESS" in run_promtool("check", "rules", path)
    durations = re.compile(r"(\[|for: |interval: )\d+[smh]")
    assert durations.sub(r"\1D", scaled) == durations.sub(r"\1D", text)
    assert "[90s]" in scaled and "[30s]" in scaled and "for: 30s" in scaled and "interval: 3s" in scaled
    assert "increase30m >= 1000" in scaled
