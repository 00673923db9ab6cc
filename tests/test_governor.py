"""The load governor (T under load, within the accuracy budget) and per-request deadlines.

The controller is unit-tested on the file the server runs (``littlebig/control.py``, stdlib + numpy, installed
beside the BLS model.py by the generator); the served
behaviour on the real tritonserver: answers equal the offline reference at the T in force, REASON says who
answered and why, the counters and the T gauge move exactly, and T climbs back once executes are fast again
(or no request came: quiet time counts as calm).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from littlebig import control
from littlebig.decision import CONFIDENCE_BINS, confidence, escalate, softmax
from littlebig.export.calibrate import Outputs, evaluate, governor_levels, sweep, threshold_floor
from tests.helpers import infer, metric_sums, offline_reference, reasons, rows_of, scrape

LEVELS = [0.99, 0.97, 0.9, 0.8]


def governor(**overrides) -> control.Governor:
    """A governor with every tuning parameter spelled out (the tests do not lean on the served defaults)."""
    settings = {"slo_s": 0.1, "high": 1.0, "low": 0.6, "settle_s": 0.5, "hold_s": 3.0, "window_s": 1.0}
    return control.Governor(LEVELS, **{**settings, **overrides})


def test_governor_steps_down_fast_and_up_slowly_within_its_levels():
    gov = governor()  # high 100 ms, low 60 ms, settle 0.5 s, hold 3 s
    assert gov.threshold == 0.99
    assert gov.update(0.11, now=0.0) and gov.threshold == 0.97
    assert not gov.update(0.11, now=0.3)  # settling: one step per 0.5 s
    assert gov.update(0.11, now=0.6) and gov.update(0.2, now=1.2) and gov.threshold == 0.8
    assert not gov.update(1.0, now=5.0) and gov.threshold == 0.8  # never below T_min
    assert not gov.update(0.08, now=6.0)  # in the band: no change, and the calm clock does not run
    assert not gov.update(0.01, now=7.0) and not gov.update(0.01, now=8.9)  # calm since 6.0 (no request between)
    assert gov.update(0.01, now=9.0) and gov.threshold == 0.9  # 3 s calm: one step up
    assert not gov.update(0.01, now=11.9) and gov.update(0.01, now=12.0) and gov.threshold == 0.97
    assert not gov.update(0.07, now=13.0)  # the band resets the calm clock
    assert not gov.update(0.01, now=13.5) and not gov.update(0.01, now=15.9)
    assert gov.update(0.01, now=16.0) and gov.threshold == gov.calibrated == 0.99
    assert not gov.update(0.0, now=100.0)  # nothing above the calibrated T


def test_quiet_time_counts_as_calm():
    """After a burst, time without requests is calm: the first request after k hold times is k steps up."""
    gov = governor(hold_s=2.0)
    for t in (0.0, 0.5, 1.0):
        gov.update(0.5, now=t)  # overload: down to T_min
    assert gov.threshold == 0.8
    assert gov.update(0.0, now=1.0 + 2 * 2.0 + 0.1) and gov.threshold == 0.97  # 4.1 s quiet: two steps
    gov.update(0.5, now=6.0)  # loaded again: one step down
    assert gov.threshold == 0.9
    assert gov.update(0.0, now=60.0) and gov.threshold == gov.calibrated  # a long quiet: back at the top at once
    gov.update(0.5, now=61.0)
    assert not gov.update(0.0, now=62.9) and gov.threshold == 0.97  # less than one hold time: no step yet


def test_predicted_p99_is_twice_the_slowest_recent_execute():
    gov = governor()
    assert gov.predicted_p99_s(now=0.0) == 0.0
    gov.executed(0.03, now=1.0)
    gov.executed(0.05, now=1.5)
    gov.executed(0.01, now=1.8)
    assert gov.predicted_p99_s(now=2.0) == pytest.approx(0.10)  # a request may wait one execute, then run one
    assert gov.predicted_p99_s(now=2.0, big_in_flight_s=0.2) == pytest.approx(0.4)  # a stalled big call
    assert gov.predicted_p99_s(now=2.7) == pytest.approx(0.02)  # the 50 ms execute left the 1 s window
    assert gov.predicted_p99_s(now=10.0) == 0.0  # idle


def test_without_an_slo_the_governor_never_moves():
    gov = governor(slo_s=0.0)
    assert [gov.update(s, now=t) for t, s in enumerate([10.0, 10.0, 0.0, 0.0])] == [False] * 4
    assert gov.threshold == 0.99 and gov.levels == [0.99]


def test_breaker_predicts_from_recent_calls_and_the_oldest_in_flight():
    class Call:
        def cancelled(self):
            return False

        def exception(self):
            return None

    breaker = control.Breaker("big", timeout_s=1.0, shed=True)
    now = time.monotonic()
    assert breaker.predicted_latency_s(now) == 0.0
    call = Call()
    breaker.sent(call, now - 0.2)
    assert breaker.predicted_latency_s(now) == pytest.approx(0.2)  # in flight for 0.2 s
    breaker.finished(call)
    assert breaker.mean_latency_s == pytest.approx(0.3 * 0.2, rel=0.05)
    assert breaker.predicted_latency_s(time.monotonic() + 3.0) == 0.0  # older than stale_s: no longer counts


@pytest.mark.parametrize("value", ["abc", 0, -1, "nan", "inf", True, None, ""])
def test_bad_deadlines_are_refused_with_the_parameter_named(value):
    with pytest.raises(ValueError, match="deadline_ms"):
        control.check_deadline(value)
    assert control.check_deadline("250") == control.check_deadline(250.0) == 0.25


def test_request_settings_name_each_bad_parameter_and_keep_the_probe_mark():
    """What a request asks of the cascade, read once per request; a bad parameter is that request's error alone."""
    from littlebig.model_repository import health

    assert health.PROBE_PARAMETER == control.PROBE_PARAMETER  # health.py stays stdlib-only: it spells the name
    read = control.request_settings
    assert read(None) == read("{}") == (None, math.inf, False, None)
    assert read('{"threshold": "0.25", "deadline_ms": 250}') == (0.25, 0.25, False, None)
    assert read('{"littlebig_probe": true}').probe and read('{"littlebig_probe": "True"}').probe
    assert not read('{"littlebig_probe": "no"}').probe and not read('{"littlebig_probe": 1}').probe
    bad = read('{"threshold": 2, "littlebig_probe": true}')
    assert bad.probe and bad.error.startswith("invalid 'threshold' parameter: threshold must be a number in [0, 1]")
    assert read('{"deadline_ms": -5}').error.startswith("invalid 'deadline_ms' parameter: deadline_ms must be")
    assert read("{not json").error.startswith("invalid request parameters:")
    assert read("[1]").error == "invalid request parameters: not a JSON object: [1]"


@pytest.fixture(scope="module")
def val(build_dir) -> Outputs:
    from littlebig.export.pipeline import outputs

    return outputs(build_dir, "val")


@pytest.mark.parametrize("rule", ["paper", "bounded", "guaranteed"])
@pytest.mark.parametrize("eps", [0.0, 0.002, 0.005, 0.02])
def test_t_min_is_the_lowest_t_whose_whole_range_keeps_the_budget(build_dir, val, rule, eps):
    """Brute force over every distinct val confidence: no lower T qualifies, and every T above it does."""
    t_cal = json.loads((build_dir / "calibration.json").read_text())["rules"][rule]["threshold"]
    floor = threshold_floor(val, t_cal, eps)
    budget = evaluate(val, t_cal)["accuracy"] - eps - 1e-12
    ts = np.unique(np.concatenate([val.conf, [0.0, t_cal]]))
    ts = ts[ts <= t_cal]
    ok = sweep(val, ts)["accuracy"] >= budget
    assert ok[ts >= floor].all()
    below = ts[ts < floor]
    assert len(below) == 0 or not ok[ts < floor][-1]  # the next T down breaks the budget
    levels = governor_levels(val, t_cal, floor)
    assert levels[0] == t_cal and levels[-1] == floor and levels == sorted(levels, reverse=True)
    if eps == 0.0:
        return
    rates = [float(escalate(val.conf, t).mean()) for t in levels]
    assert len(levels) == 5 and np.all(np.diff(rates) < 0)  # each step sheds rows from big


def test_calibration_records_t_min_and_the_drift_reference(build_dir, val):
    """What calibration.json records, checked by definition on val (not by the functions that wrote it): every T
    from t_min up to the rule's T keeps accuracy within the budget, the next T below does not; the confidence
    shares are val's rows per (lower, upper] bin."""
    calibration = json.loads((build_dir / "calibration.json").read_text())
    conf = val.conf.astype(np.float64)
    little_ok, big_ok = val.little_correct, val.big_correct

    def accuracy(t: float) -> float:  # big answers the rows below T (all of them at T = 1)
        return float(np.where((conf < t) | (t >= 1.0), big_ok, little_ok).mean())

    for rule in calibration["rules"].values():
        t_cal, t_min = rule["threshold"], rule["t_min"]
        budget = accuracy(t_cal) - calibration["max_accuracy_drop"] - 1e-12
        ts = np.unique(np.concatenate([[0.0], conf[conf <= t_cal], [t_cal]]))  # every T that changes a decision
        assert all(accuracy(t) >= budget for t in ts[ts >= t_min])
        assert t_min == ts.min() or accuracy(ts[ts < t_min].max()) < budget
    lowers = (-np.inf, *CONFIDENCE_BINS[:-1])
    shares = [((conf > lo) & (conf <= hi)).mean() for lo, hi in zip(lowers, CONFIDENCE_BINS)]
    np.testing.assert_allclose(calibration["confidence_shares"], shares, rtol=0, atol=1e-12)


# --- the real server -----------------------------------------------------------------------------------------


def test_a_past_deadline_answers_escalated_rows_with_little(server, grpc_client, test_split, served_threshold):
    """deadline_ms shorter than little takes: every row big would answer comes back from little, flagged."""
    data, logits = test_split
    rows = np.arange(4000, 4064)
    expected = offline_reference(logits, rows, served_threshold)
    would = expected["escalated"]
    assert would.any() and not would.all()
    names = ("littlebig_deadline_rows_total", "littlebig_escalated_rows_total")
    before, big_before = metric_sums(server, names), rows_of(grpc_client, "big")
    result = infer(grpc_client, data.images[rows], parameters={"deadline_ms": "0.001"})
    little_probs = softmax(logits["little"][rows])
    assert not result.as_numpy("ESCALATED").any() and rows_of(grpc_client, "big") == big_before
    np.testing.assert_array_equal(result.as_numpy("LABEL").reshape(-1), little_probs.argmax(-1))
    np.testing.assert_allclose(result.as_numpy("PROBS"), little_probs, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(reasons(result), np.where(would, "deadline", "confident"))
    after = metric_sums(server, names)
    assert after["littlebig_deadline_rows_total"] - before["littlebig_deadline_rows_total"] == would.sum()
    assert after["littlebig_escalated_rows_total"] == before["littlebig_escalated_rows_total"]
    # A generous deadline changes nothing: the answer is the offline cascade's.
    result = infer(grpc_client, data.images[rows], parameters={"deadline_ms": 60000})
    np.testing.assert_array_equal(result.as_numpy("LABEL").reshape(-1), expected["label"])
    np.testing.assert_array_equal(reasons(result), np.where(would, "escalated", "confident"))


@pytest.mark.parametrize("value", ["abc", 0, -5, "nan", ""])
def test_a_bad_deadline_is_invalid_argument_naming_it(grpc_client, test_split, value):
    data, _ = test_split
    with pytest.raises(InferenceServerException) as err:
        infer(grpc_client, data.images[:2], parameters={"deadline_ms": value})
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "deadline_ms" in err.value.message()


@pytest.fixture(scope="module")
def governed(build_dir, tmp_path_factory):
    """One BLS instance whose SLO (1 us) every execute breaches: the governor walks T down to T_min."""
    from littlebig.model_repository.generate import ServeOptions
    from tests.helpers import own_server

    opts = ServeOptions(bls_instances=1, slo_p99_ms=0.001)
    with own_server(build_dir, tmp_path_factory.mktemp("governed"), opts) as s:
        yield s


def threshold_gauge(server) -> float:
    (value,) = [s.value for s in scrape(server).select("littlebig_threshold")]
    return value


@pytest.mark.slow
def test_the_governor_lowers_t_to_t_min_and_answers_equal_the_reference_at_t_in_force(governed, test_split):
    data, logits = test_split
    summary = json.loads((governed.repository / "littlebig-repository.json").read_text())
    levels, t_cal = summary["governor_thresholds"], summary["threshold"]
    assert levels[0] == t_cal and levels[-1] == summary["t_min"] < t_cal
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{governed.ports.grpc}")
    try:
        assert threshold_gauge(governed) == t_cal
        before, seen, load_rows = metric_sums(governed, ("littlebig_load_rows_total",)), [], 0
        for k in range(2 * len(levels)):
            rows = np.arange(5000 + 64 * k, 5064 + 64 * k)
            result = infer(client, data.images[rows])
            why = reasons(result)
            conf = confidence(softmax(logits["little"][rows]))
            # the T in force is one of the levels: the answer is the offline cascade's at that T, and the rows
            # between it and the calibrated T are flagged "load"
            matches = [
                t
                for t in levels
                if np.array_equal(result.as_numpy("LABEL").reshape(-1), offline_reference(logits, rows, t)["label"])
                and np.array_equal(why == "escalated", escalate(conf, t))
                and np.array_equal(why == "load", escalate(conf, t_cal) & ~escalate(conf, t))
            ]
            assert matches, f"request {k}: no governor level explains the answer"
            seen.append(min(matches))
            load_rows += int((why == "load").sum())
            time.sleep(0.6)  # longer than the governor's settle time: one step down per request
        assert seen[-1] == levels[-1] and threshold_gauge(governed) == levels[-1]
        assert seen == sorted(seen, reverse=True) and len(set(seen)) == len(levels)
        after = metric_sums(governed, ("littlebig_load_rows_total",))
        assert after["littlebig_load_rows_total"] - before["littlebig_load_rows_total"] == load_rows > 0
        # A request's own threshold wins over the governor.
        rows = np.arange(6000, 6064)
        result = infer(client, data.images[rows], threshold=1)
        assert result.as_numpy("ESCALATED").all() and set(reasons(result)) == {"escalated"}
    finally:
        client.close()


def drive_to_t_min(governed, client, images: np.ndarray, levels: list[float]) -> None:
    """Every execute breaches the 1 us SLO: one request per settle time walks T down to T_min."""
    for _ in range(2 * len(levels)):
        if threshold_gauge(governed) == levels[-1]:
            return
        infer(client, images)
        time.sleep(0.6)
    assert threshold_gauge(governed) == levels[-1], "the governor did not reach T_min"


@pytest.mark.slow
def test_t_climbs_back_to_the_calibrated_value_once_the_load_is_gone(governed, test_split):
    """Once no execute ran for a second (the signal window), T climbs one step per hold time (3 s)."""
    data, logits = test_split
    summary = json.loads((governed.repository / "littlebig-repository.json").read_text())
    levels = summary["governor_thresholds"]
    conf = confidence(softmax(logits["little"]))
    confident = np.flatnonzero(conf >= levels[0])[:200]
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{governed.ports.grpc}")
    try:
        drive_to_t_min(governed, client, data.images[confident[:8]], levels)  # whatever the test before left
        start = time.monotonic()
        while threshold_gauge(governed) != levels[0] and time.monotonic() - start < 30:
            result = infer(client, data.images[confident[:8]])
            assert set(reasons(result)) == {"confident"}
            time.sleep(1.1)  # longer than the signal's window: each execute finds no recent one (calm)
        took = time.monotonic() - start
    finally:
        client.close()
    assert threshold_gauge(governed) == levels[0], "T did not return to the calibrated value within 30 s"
    # 3 s of calm per step, seen at the next request (every 1.1 s)
    assert took < (3 + 1.1) * (len(levels) - 1) + 2


@pytest.mark.slow
def test_after_a_quiet_spell_the_first_request_is_served_at_the_calibrated_t(governed, test_split):
    """No request for (steps x hold time) counts as calm: the first one after it is not served at T_min."""
    data, logits = test_split
    summary = json.loads((governed.repository / "littlebig-repository.json").read_text())
    levels, t_cal = summary["governor_thresholds"], summary["threshold"]
    rows = np.arange(7000, 7064)
    conf = confidence(softmax(logits["little"][rows]))
    assert (escalate(conf, t_cal) & ~escalate(conf, levels[-1])).any()  # rows T_min would answer with little
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{governed.ports.grpc}")
    try:
        drive_to_t_min(governed, client, data.images[rows[:8]], levels)
        time.sleep(3.0 * (len(levels) - 1) + 1.5)  # quiet: every step's hold time (3 s) and the signal window
        result = infer(client, data.images[rows])
    finally:
        client.close()
    # Served at the calibrated T: the offline cascade's answer, no row flagged "load"; the gauge agrees.
    np.testing.assert_array_equal(result.as_numpy("LABEL").reshape(-1), offline_reference(logits, rows, t_cal)["label"])
    np.testing.assert_array_equal(reasons(result) == "escalated", escalate(conf, t_cal))
    assert "load" not in set(reasons(result))
    assert threshold_gauge(governed) == t_cal


@pytest.mark.slow
def test_a_real_overload_steps_t_down_and_t_comes_back(build_dir, tmp_path, test_split):
    """The governor's real signal on a real server: 8 clients sending 64 rows that all escalate at the
    calibrated T overload 2 cores (each execute of 64 big rows takes well over 100 ms, so its predicted p99
    passes a 150 ms SLO); T must step down. Light traffic afterwards (8 confident rows, no big call, a few ms
    per execute) is far under 0.6 x SLO: T must climb back to the calibrated value."""
    from concurrent.futures import ThreadPoolExecutor

    from littlebig.model_repository.generate import ServeOptions
    from tests.helpers import own_server

    data, logits = test_split
    conf = confidence(softmax(logits["little"]))
    opts = ServeOptions(bls_instances=1, slo_p99_ms=150)
    with own_server(build_dir, tmp_path, opts) as server:
        summary = json.loads((server.repository / "littlebig-repository.json").read_text())
        levels, t_cal = summary["governor_thresholds"], summary["threshold"]
        # rows little answers at T_min but that escalate at the calibrated T: load lets T go down
        heavy = np.flatnonzero(escalate(conf, t_cal) & ~escalate(conf, levels[-1]))[:64]
        light = np.flatnonzero(~escalate(conf, t_cal))[:8]
        assert len(heavy) == 64
        url = f"127.0.0.1:{server.ports.grpc}"
        seen = [threshold_gauge(server)]
        stop = time.monotonic() + 8.0

        def client_loop() -> int:
            client, sent = grpcclient.InferenceServerClient(url), 0
            try:
                while time.monotonic() < stop:
                    infer(client, data.images[heavy])
                    sent += 1
            finally:
                client.close()
            return sent

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client_loop) for _ in range(8)]
            while time.monotonic() < stop:
                seen.append(threshold_gauge(server))
                time.sleep(0.25)
            sent = sum(f.result() for f in futures)
        assert seen[0] == t_cal and sent > 8
        assert min(seen) < t_cal, f"T never left the calibrated value under overload: {sorted(set(seen))}"
        client = grpcclient.InferenceServerClient(url)
        try:
            start = time.monotonic()
            while threshold_gauge(server) != t_cal and time.monotonic() - start < 30:
                infer(client, data.images[light])
                time.sleep(0.25)
            took = time.monotonic() - start
        finally:
            client.close()
        assert threshold_gauge(server) == t_cal, "T did not come back under light traffic within 30 s"
        assert took < 3.0 * (len(levels) - 1) + 5  # 3 s of calm per step
