"""Shadow sampling on the real tritonserver.

- Every shadow record and counter equals the offline reference: a record's answer and big's are the offline
  little's and big's for that image, shadow rows are exactly the confident ones (at the served T or a request's
  own), escalated rows carry the big answer they got anyway; the per-bin counters are the records'; the monitor
  reads the same figures; health probes are never drawn.
- A shadow call never delays a response: with a big that sleeps 2 s per call, a confident request is answered in
  milliseconds while its shadow call is still running, and shadow work beyond the in-flight cap is dropped (busy).
- ``littlebig recalibrate --from-shadow`` on the records the server wrote gives calibration's exact test on them
  and regenerates the repository with the new T and the same deployment options.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from littlebig.decision import CONFIDENCE_BINS, confidence, softmax
from littlebig.model_repository.generate import ServeOptions
from littlebig.shadow import Z_ALERT, loss_bound, read_records
from tests.helpers import hang_big, infer, own_server, read_config, scrape

pytestmark = pytest.mark.slow
RATE = 0.5
BATCHES = (64, 1, 7, 32, 50, 3, 64, 16, 60, 13, 64, 40)
OWN_T = 0.95  # every third request carries its own threshold


def shadow_counts(server) -> dict[str, float]:
    m = scrape(server)
    names = ("rows", "confident_rows", "shadow_rows", "shadow_disagreements", "shadow_dropped_rows")
    return {name: m.total(f"littlebig_{name}_total") for name in names}


def settled(server, records: Path, limit: float = 30.0, quiet: float = 3.0) -> dict[str, float]:
    """The counters once every shadow call has answered: unchanged for ``quiet`` seconds (a call to big takes tens
    of milliseconds here), and the shadow rows counted all recorded."""
    deadline = time.monotonic() + limit
    last, since = None, time.monotonic()
    while True:
        counts = shadow_counts(server)
        written = (read_records(str(records))["kind"] == "shadow").sum() if list(records.glob("shadow-*")) else 0
        if counts != last:
            last, since = counts, time.monotonic()
        elif counts["shadow_rows"] == written and time.monotonic() - since >= quiet:
            return counts
        assert time.monotonic() < deadline, f"shadow calls still unanswered after {limit} s: {counts}, {written}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def shadow_server(build_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("shadow")
    opts = ServeOptions(shadow_rate=RATE, shadow_seed=3, shadow_log_dir=str(work / "records"))
    with own_server(build_dir, work, opts) as server:
        yield server, work / "records"


def test_every_shadow_record_and_counter_equals_the_offline_reference(shadow_server, test_split, served_threshold):
    server, records_dir = shadow_server
    data, logits = test_split
    little, big = logits["little"].argmax(-1), logits["big"].argmax(-1)
    conf = confidence(softmax(logits["little"]))
    start, thresholds = 0, []
    for i, n in enumerate(BATCHES):
        own = OWN_T if i % 3 == 2 else None
        infer(f"127.0.0.1:{server.ports.grpc}", data.images[start : start + n], threshold=own)
        thresholds.append(np.full(n, served_threshold if own is None else own))
        start += n
    rows = np.arange(start)
    t = np.concatenate(thresholds)
    confident = conf[rows] >= t
    counts = settled(server, records_dir)
    assert counts["rows"] == start
    assert counts["confident_rows"] == confident.sum()

    records = read_records(str(records_dir))
    assert abs(len(records["kind"]) / start - RATE) < 5 * np.sqrt(RATE * (1 - RATE) / start)  # the draw's rate
    # each record is one row: its little confidence and label identify it; big's label must be big's
    by_key = {(float(np.float32(conf[r])), int(little[r])): r for r in rows}
    matched = [by_key[(float(c), int(a))] for c, a in zip(records["conf"], records["answer"])]
    assert len(set(matched)) == len(matched)  # no row recorded twice
    for kind, row, big_answer in zip(records["kind"], matched, records["big"]):
        if kind == "shadow":
            assert confident[row] and big_answer == big[row], (row, kind)
        elif kind == "escalated":
            assert not confident[row] and big_answer == big[row], (row, kind)
        else:
            assert kind == "unknown" and big_answer == -1
    assert (records["kind"] == "unknown").sum() == counts["shadow_dropped_rows"]
    shadow = records["kind"] == "shadow"
    assert counts["shadow_rows"] == shadow.sum() > 0
    disagree = records["answer"][shadow] != records["big"][shadow]
    assert counts["shadow_disagreements"] == disagree.sum()
    # per little-confidence bin, as the drift histogram bins
    m = scrape(server)
    bins = np.searchsorted(CONFIDENCE_BINS, records["conf"][shadow])
    for k, edge in enumerate(CONFIDENCE_BINS):
        assert m.total("littlebig_shadow_rows_total", upper=repr(edge)) == (bins == k).sum(), edge
        assert m.total("littlebig_shadow_disagreements_total", upper=repr(edge)) == disagree[bins == k].sum(), edge

    # the monitor reads the same figures from the server (its whole life as the window)
    from littlebig.metrics_text import Metrics
    from littlebig.monitor import Snapshot, figures

    fig = figures(Snapshot(0.0, Metrics(())), Snapshot(1.0, m))
    expected = loss_bound(counts["rows"], counts["confident_rows"], counts["shadow_rows"],
                          counts["shadow_disagreements"], Z_ALERT)  # fmt: skip
    assert fig["shadow"]["on"] and fig["shadow"]["rate"] == RATE
    for key in ("estimate", "lower", "upper"):
        assert fig["shadow"][key] == pytest.approx(expected[key], abs=1e-12)

    # health probes are answered but never drawn nor counted
    infer(f"127.0.0.1:{server.ports.grpc}", data.images[:64], parameters={"littlebig_probe": True})
    time.sleep(1.0)
    assert shadow_counts(server) == counts
    assert len(read_records(str(records_dir))["kind"]) == len(records["kind"])


def test_recalibration_from_the_served_records_regenerates_the_repository(
    shadow_server, build_dir, tmp_path, test_split
):
    from littlebig.cli import main
    from littlebig.export.calibrate import learn_then_test
    from littlebig.model_repository.generate import generate

    _, records_dir = shadow_server
    build = tmp_path / "build"
    build.mkdir()
    (build / "calibration.json").write_text((build_dir / "calibration.json").read_text())
    (build / "export").symlink_to((build_dir / "export").resolve())
    repo = tmp_path / "model_repository"
    generate(build, repo, "cpu", ServeOptions(shadow_rate=0.05, big_instances=1))
    assert main(["recalibrate", "--from-shadow", str(records_dir), "--build", str(build),
                 "--repository", str(repo)]) == 0  # fmt: skip
    records = read_records(str(records_dir))
    at_risk = (records["kind"] == "unknown") | (records["answer"] != records["big"])
    expected = learn_then_test(records["conf"], at_risk)
    written = json.loads((build / "calibration-shadow.json").read_text())
    assert written["threshold"] == expected and written["rows"] == len(at_risk)
    params = read_config(repo / "littlebig").parameters
    assert json.loads(params["thresholds"].string_value) == [expected]
    assert params["rule"].string_value == "shadow"
    assert params["shadow_rate"].string_value == "0.05"  # the repository's own options are kept
    assert read_config(repo / "big").instance_group[0].count == 1


def test_a_shadow_call_never_delays_the_response(build_dir, tmp_path, test_split, served_threshold):
    """big sleeps 2 s per call; every row little answers confidently is drawn (R = 1). Each confident request is
    answered long before its shadow call ends, and its shadow rows are counted only after the answer."""
    data, logits = test_split
    sure = np.flatnonzero(confidence(softmax(logits["little"])) > max(served_threshold, 0.99))[:64]
    opts = ServeOptions(shadow_rate=1.0, shadow_log_dir=str(tmp_path / "records"), bls_timeout_ms=20000)
    with own_server(build_dir, tmp_path, opts, hang_big(2.0)) as server:
        url = f"127.0.0.1:{server.ports.grpc}"
        infer(url, data.images[sure[:2]])  # warm (its shadow call runs 2 s in the background)
        time.sleep(2.5)
        before = shadow_counts(server)
        seconds = []
        for k in range(12):  # 6 per BLS instance: more than SHADOW_MAX_CALLS (4) in flight, the rest is dropped
            began = time.monotonic()
            result = infer(url, data.images[sure[5 * k : 5 * k + 5]])
            seconds.append(time.monotonic() - began)
            assert not result.as_numpy("ESCALATED").any()
        answered = shadow_counts(server)
        assert max(seconds) < 1.0, seconds  # a shadow call takes 2 s; no answer waited for one
        assert answered["shadow_rows"] == before["shadow_rows"]  # none had finished when the answers came
        deadline = time.monotonic() + 30
        while shadow_counts(server)["shadow_rows"] + shadow_counts(server)["shadow_dropped_rows"] < before[
            "shadow_rows"
        ] + before["shadow_dropped_rows"] + 60:
            assert time.monotonic() < deadline, shadow_counts(server)
            time.sleep(0.5)
        after = shadow_counts(server)
        m = scrape(server)
        assert after["shadow_rows"] > before["shadow_rows"]  # the shadow calls did run, after the answers
        assert m.total("littlebig_shadow_dropped_rows_total", reason="busy") > 0
        print(f"\nconfident requests answered in {1000 * np.median(seconds):.0f} ms (max {1000 * max(seconds):.0f})"
              f" while each shadow call took 2 s; shadow rows {after['shadow_rows'] - before['shadow_rows']:.0f}, "
              f"dropped busy {m.total('littlebig_shadow_dropped_rows_total', reason='busy'):.0f}")  # fmt: skip
