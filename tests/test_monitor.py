"""littlebig monitor (littlebig/monitor.py): its figures against hand computations and shadow.loss_bound, the alert
flags at their exact thresholds, counter resets, the text frame, and the CLI against a tiny local metrics server.
No tritonserver: synthetic Prometheus expositions, parsed by the project's one parser."""

from __future__ import annotations

import http.server
import json
import math
import socket
import threading
import time
import types

import numpy as np
import pytest

from littlebig import monitor
from littlebig.cli import main
from littlebig.metrics_text import Metrics
from littlebig.monitor import MIN_DRIFT_ROWS, PSI_SHIFT, Z_DRIFT, Snapshot, figures, keep, render
from littlebig.shadow import MIN_SHADOW_ROWS, Z_ALERT, loss_bound

UPPERS = ("0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "0.95", "0.99", "0.999", "1.0")
#: val's share of each confidence bin (sums to 1, none in the first bin, as the real calibration).
REFERENCE = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.05, 0.1, 0.1, 0.2, 0.2, 0.2)
LABELS = 'model="littlebig",version="1"'


def exposition(
    rows: float = 0,
    escalated: float = 0,
    calibration_escalations: float = 0,
    bins: tuple[float, ...] | None = None,
    stages: dict[str, float] | None = None,
    confident: float = 0,
    shadow_rows: float = 0,
    disagreements: float = 0,
    dropped: dict[str, float] | None = None,
    thresholds: tuple[float, ...] = (0.888,),
    p: float = 0.42,
    n_val: float = 5000,
    reference: tuple[float, ...] | None = REFERENCE,
    shadow_rate: float | None = 0.05,
    eps: float = 0.01,
) -> str:
    """Triton's metrics text as the BLS model writes it (littlebig/metrics.py, METRICS): counters per
    model/version (and per bin/stage/reason), the threshold per BLS instance, calibration gauges. The shadow counts
    are split over two bins, as the model exports them per bin."""
    bins = bins if bins is not None else tuple(rows / len(UPPERS) for _ in UPPERS)
    out = []

    def family(name: str, kind: str, values: float | dict[str, float], label: str = "") -> None:
        """One metric family: a single sample, or one per ``label`` value."""
        out.append(f"# TYPE {name} {kind}")
        samples = values.items() if isinstance(values, dict) else [(None, values)]
        for key, value in samples:
            extra = "" if key is None else f',{label}="{key}"'
            out.append(f"{name}{{{LABELS}{extra}}} {float(value)!r}")

    family("littlebig_rows_total", "counter", rows)
    family("littlebig_escalated_rows_total", "counter", escalated)
    family("littlebig_stage_rows_total", "counter", stages or {}, "stage")
    family("littlebig_calibration_escalations_total", "counter", calibration_escalations)
    family("littlebig_little_confidence_rows_total", "counter", dict(zip(UPPERS, bins)), "upper")
    family("littlebig_confident_rows_total", "counter", confident)
    family("littlebig_shadow_rows_total", "counter", {"0.9": shadow_rows / 2, "0.95": shadow_rows / 2}, "upper")
    split = {"0.9": disagreements - disagreements // 2, "0.95": disagreements // 2}
    family("littlebig_shadow_disagreements_total", "counter", split, "upper")
    family("littlebig_shadow_dropped_rows_total", "counter", dropped or {}, "reason")
    for name in ("load_rows", "deadline_rows", "degraded_rows", "failed_requests"):
        family(f"littlebig_{name}_total", "counter", 0)
    family("littlebig_threshold", "gauge", {f"littlebig_0_{i}": t for i, t in enumerate(thresholds)}, "bls_instance")
    if shadow_rate is not None:
        family("littlebig_shadow_rate", "gauge", shadow_rate)
    family("littlebig_calibrated_eps", "gauge", eps)
    family("littlebig_calibrated_escalation_rate", "gauge", p)
    family("littlebig_calibration_rows", "gauge", n_val)
    if reference is not None:
        family("littlebig_calibrated_confidence_share", "gauge", dict(zip(UPPERS, reference)), "upper")
    return "\n".join(out) + "\n"


def snap(t: float, **kwargs) -> Snapshot:
    return Snapshot(t, Metrics.parse(exposition(**kwargs)))


def pair(seconds: float = 10.0, old: dict | None = None, **new) -> dict[str, object]:
    """figures() from a scrape at 0 (``old``, default empty counters) and one ``seconds`` later (``new``)."""
    return figures(snap(0.0, **(old or {})), snap(seconds, **new))


def hand_z(k: float, n: float, p: float, n_val: float) -> float:
    return (k / n - p) / math.sqrt(p * (1 - p) * (1 / n + 1 / n_val))


def hand_psi(bins: np.ndarray, reference: tuple[float, ...]) -> float:
    a = np.maximum(bins / bins.sum(), 0.001)
    e = np.maximum(np.array(reference), 0.001)
    return float(np.sum((a - e) * np.log(a / e)))


def test_traffic_rows_per_second_escalation_stages_and_thresholds():
    old = dict(rows=1000, escalated=400, stages={"little": 600, "big": 400})
    fig = pair(10.0, old, rows=3000, escalated=1100, stages={"little": 1900, "big": 1100}, thresholds=(0.888, 0.75))
    assert fig["rows"] == 2000 and fig["rows_per_s"] == pytest.approx(200.0)
    assert fig["escalated"] == 700 and fig["escalation_rate"] == pytest.approx(0.35)
    assert fig["stages"] == {"little": {"rows": 1300, "share": 0.65}, "big": {"rows": 700, "share": 0.35}}
    assert (fig["threshold_min"], fig["threshold_max"], fig["thresholds"]) == (0.75, 0.888, [0.888, 0.75])
    text = render(fig)
    assert "T in force 0.888 (instances: 0.888, 0.75)" in text and "200.0 rows/s" in text
    assert "escalated 35.0% (700 rows)" in text and "answered by little 65.0%, big 35.0%" in text
    same = render(pair(10.0, old, rows=3000, thresholds=(0.888, 0.888)))
    assert "T in force 0.888" in same and "instances" not in same


def test_drift_z_equals_the_rules_formula_and_flags_exactly_above_4_sd():
    p, n_val, n = 0.42, 5000, 500
    seen = set()
    for k in range(200, 300):
        fig = pair(rows=n, calibration_escalations=k, p=p, n_val=n_val)
        z = hand_z(k, n, p, n_val)
        assert fig["drift"]["rate"] == pytest.approx(k / n) and fig["drift"]["z"] == pytest.approx(z, rel=1e-12)
        assert fig["drift"]["alert"] == (abs(z) > Z_DRIFT)
        seen.add(fig["drift"]["alert"])
    assert seen == {True, False}  # the range crosses the threshold (k = 256 -> z 3.97, k = 257 -> z 4.06)
    assert pair(rows=n, calibration_escalations=257)["drift"]["alert"]
    assert "DRIFT (|z| > 4)" in render(pair(rows=n, calibration_escalations=257))
    assert not pair(rows=n - 1, calibration_escalations=257)["drift"]["alert"]  # z 4.06 but 499 rows
    assert "(alerts need 500 rows)" in render(pair(rows=n - 1, calibration_escalations=257))
    missing = pair(rows=n, calibration_escalations=257, p=-1)  # unset reference: -1
    assert math.isnan(missing["drift"]["z"]) and not missing["drift"]["alert"]
    assert "no calibration reference exported (escalation rate)" in render(missing)


def test_psi_equals_the_rules_formula_with_floors_and_flags_above_0_2():
    base = np.array(REFERENCE) * 1000
    fig = pair(rows=1000, bins=tuple(base))
    assert fig["psi"]["value"] == pytest.approx(hand_psi(base, REFERENCE), abs=1e-9)  # only the floored empty bin
    assert fig["psi"]["reference_share"] == dict(zip(UPPERS, REFERENCE))
    seen = set()
    for shifted in range(0, 1000, 25):  # rows moved from the top bins to (0.5, 0.6]
        bins = base.copy()
        bins[9:] -= shifted / 3
        bins[4] += shifted
        fig = pair(rows=bins.sum(), bins=tuple(bins))
        value = hand_psi(bins, REFERENCE)
        assert fig["psi"]["value"] == pytest.approx(value, rel=1e-9)
        assert fig["psi"]["live_share"]["0.6"] == pytest.approx(bins[4] / bins.sum())
        assert fig["psi"]["alert"] == (value > PSI_SHIFT)
        seen.add(fig["psi"]["alert"])
    assert seen == {True, False}
    bins = base.copy()
    bins[9:] -= 200
    bins[4] += 600
    few = bins * (MIN_DRIFT_ROWS - 1) / bins.sum()
    assert hand_psi(few, REFERENCE) > PSI_SHIFT and not pair(rows=few.sum(), bins=tuple(few))["psi"]["alert"]
    assert "SHIFT (PSI > 0.2)" in render(pair(rows=bins.sum(), bins=tuple(bins)))
    unset = pair(rows=1000, bins=tuple(base), reference=tuple(0.0 for _ in UPPERS))
    assert math.isnan(unset["psi"]["value"])
    assert "no calibration reference exported (confidence histogram)" in render(unset)


def test_shadow_loss_is_shadow_loss_bound_and_the_alert_is_the_rules_condition():
    rows, confident, shadow, eps = 100_000, 60_000, 1000, 0.01
    seen = set()
    for d in range(0, 80, 2):
        fig = pair(rows=rows, confident=confident, shadow_rows=shadow, disagreements=d, eps=eps)["shadow"]
        bound = loss_bound(rows, confident, shadow, d, Z_ALERT)
        assert (fig["estimate"], fig["lower"], fig["upper"]) == (bound["estimate"], bound["lower"], bound["upper"])
        assert fig["confident_share"] == 0.6 and fig["disagreement_rate"] == d / shadow
        assert fig["alert"] == (bound["lower"] > eps)
        seen.add(fig["alert"])
    assert seen == {True, False}
    # lower just above / just below eps, at exactly MIN_SHADOW_ROWS
    lower = loss_bound(rows, confident, MIN_SHADOW_ROWS, 40, Z_ALERT)["lower"]
    assert lower > 0
    common = dict(rows=rows, confident=confident, shadow_rows=MIN_SHADOW_ROWS, disagreements=40)
    assert pair(**common, eps=lower * (1 - 1e-9))["shadow"]["alert"]
    assert not pair(**common, eps=lower)["shadow"]["alert"]
    assert not pair(**common, eps=lower * (1 + 1e-9))["shadow"]["alert"]
    # 1,000 shadow rows against 999, the loss well above budget either way
    assert pair(rows=rows, confident=confident, shadow_rows=1000, disagreements=100, eps=eps)["shadow"]["alert"]
    few = pair(rows=rows, confident=confident, shadow_rows=999, disagreements=100, eps=eps)
    assert few["shadow"]["lower"] > eps and not few["shadow"]["alert"]
    text = render(pair(rows=rows, confident=confident, shadow_rows=1000, disagreements=100, eps=eps))
    assert "LOSS ABOVE BUDGET" in text and f"at z {Z_ALERT}" in text and "budget eps 1.00%" in text
    assert "(alerts need 1,000 shadow rows)" in render(few)


def test_shadow_off_drops_and_not_a_number():
    for rate in (0.0, None):
        fig = pair(rows=1000, confident=600, shadow_rate=rate)
        assert not fig["shadow"]["on"] and "shadow sampling off" in render(fig)
    fig = pair(rows=1000, confident=600, dropped={"load": 3, "busy": 1, "failed": 0})
    assert fig["shadow"]["on"] and fig["shadow"]["dropped"] == {"load": 3, "busy": 1, "failed": 0}
    assert math.isnan(fig["shadow"]["estimate"])  # no shadow rows yet
    text = render(fig)
    assert "dropped 4 (load 3, busy 1)" in text and "loss vs big n/a [n/a, n/a]" in text
    assert "shadow sampling off" not in text and "LOSS" not in text
    idle = pair(rows=0)
    assert math.isnan(idle["escalation_rate"]) and "escalated n/a (0 rows)" in render(idle)
    assert idle["littlebig"] and "NO littlebig" not in render(idle)
    empty = figures(Snapshot(0.0, Metrics(())), Snapshot(1.0, Metrics.parse("nv_up 1\n")))
    assert not empty["littlebig"] and "NO littlebig_* METRICS HERE" in render(empty)
    assert "T in force n/a\n" in render(empty)  # no "(instances: )" without a threshold


def test_a_counter_reset_starts_the_window_at_the_restart():
    before = snap(0.0, rows=5000, escalated=2000, confident=3000)
    after = snap(10.0, rows=300, escalated=100, confident=200)  # the server restarted: counters from 0
    fig = figures(before, after)
    assert (fig["rows"], fig["escalated"], fig["shadow"]["confident"]) == (300, 100, 200)
    assert monitor.counter_reset(before, after) and not monitor.counter_reset(after, before)
    kept = keep([snap(-10.0, rows=4000), before, after], window=1800)
    assert len(kept) == 2 and kept[0].time == 0.0 and kept[0].metrics.samples == () and kept[1] is after
    later = snap(20.0, rows=900, escalated=300)  # deltas since the restart, not against the pre-restart 5000
    fig = figures(kept[0], later)
    assert fig["rows"] == 900 and fig["rows_per_s"] == pytest.approx(45.0)


def test_the_window_keeps_scrapes_within_window_seconds_and_at_least_two():
    snaps = [snap(float(t), rows=100 * t) for t in range(0, 50, 10)]  # 0, 10, ..., 40
    kept = keep(snaps, window=25)
    assert [s.time for s in kept] == [20.0, 30.0, 40.0]
    assert figures(kept[0], kept[-1])["rows"] == 2000
    assert [s.time for s in keep(snaps, window=1)] == [30.0, 40.0]
    assert [s.time for s in keep(snaps[:1], window=1)] == [0.0]


class _Metrics(http.server.BaseHTTPRequestHandler):
    """Serves the server's ``texts`` in turn (the last one from then on); /garbage serves a web page."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.startswith("/garbage"):
            body = b"<html>not metrics</html>"
        else:
            texts = self.server.texts
            body = texts[min(self.server.hits, len(texts) - 1)].encode()
            self.server.hits += 1
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def metrics_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    server.texts = [
        exposition(
            rows=1000, escalated=400, calibration_escalations=400, confident=600, shadow_rows=20, disagreements=1
        ),
        exposition(
            rows=1500, escalated=600, calibration_escalations=610, confident=900, shadow_rows=35, disagreements=2,
            dropped={"busy": 2}, thresholds=(0.888, 0.75),
        ),
    ]
    server.hits = 0
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_cli_once_json_against_a_metrics_endpoint(metrics_server, capsys):
    url = f"http://127.0.0.1:{metrics_server.server_port}/metrics"
    start = time.monotonic()
    assert main(["monitor", "--metrics-url", url, "--once", "--json", "--interval", "0.2"]) == 0
    assert time.monotonic() - start >= 0.2 and metrics_server.hits == 2
    out = capsys.readouterr().out
    fig = json.loads(out)  # one JSON object, NaN written as null
    assert fig["url"] == url and fig["rows"] == 500 and fig["escalated"] == 200 and fig["escalation_rate"] == 0.4
    assert fig["seconds"] >= 0.2 and fig["rows_per_s"] == pytest.approx(500 / fig["seconds"])
    assert fig["thresholds"] == [0.888, 0.75]
    assert fig["shadow"]["rows"] == 15 and fig["shadow"]["dropped"] == {"busy": 2}
    bound = loss_bound(500, 300, 15, 1, Z_ALERT)
    assert fig["shadow"]["estimate"] == pytest.approx(bound["estimate"]) and fig["shadow"]["alert"] is False
    assert fig["drift"]["rate"] == pytest.approx(0.42) and fig["drift"]["z"] == pytest.approx(0.0, abs=1e-9)
    assert fig["psi"]["value"] is not None and fig["drift"]["alert"] is False
    assert fig["shadow"]["confident_share"] == 0.6 and "error" not in fig
    assert "NaN" not in out


def test_cli_once_text_frame(metrics_server, capsys):
    url = f"http://127.0.0.1:{metrics_server.server_port}"
    assert main(["monitor", "--metrics-url", url, "--once", "--interval", "0.05"]) == 0
    out = capsys.readouterr().out
    assert not out.startswith(monitor.CLEAR) and out.startswith(f"littlebig monitor  {url}")
    assert "T in force 0.888 (instances: 0.888, 0.75)" in out and "dropped 2 (busy 2)" in out


def test_loop_clears_a_terminal_between_frames_and_ctrl_c_exits_0(metrics_server, capsys, monkeypatch):
    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(monitor, "time", types.SimpleNamespace(sleep=interrupt, monotonic=time.monotonic,
                                                               strftime=time.strftime))
    monkeypatch.setattr(monitor.sys.stdout, "isatty", lambda: True)
    url = f"http://127.0.0.1:{metrics_server.server_port}/metrics"
    assert monitor.run(url, interval=5) == 0
    out = capsys.readouterr().out
    assert out.startswith(monitor.CLEAR + "littlebig monitor") and "window 0.0 s: 0 rows" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["refused", "not metrics"])
def test_an_unreadable_url_exits_2_naming_it(kind, metrics_server, capsys):
    if kind == "refused":
        url = f"http://127.0.0.1:{_free_port()}/metrics"
    else:
        url = f"http://127.0.0.1:{metrics_server.server_port}/garbage"
    assert main(["monitor", "--metrics-url", url, "--once", "--interval", "0.01"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("littlebig monitor: error: cannot read metrics from") and url in err


def test_bad_interval_is_a_usage_error(capsys):
    assert main(["monitor", "--metrics-url", "http://127.0.0.1:1/metrics", "--interval", "0"]) == 2
    assert "--interval" in capsys.readouterr().err
