"""The BLS model's metrics table and counting (littlebig/metrics.py) outside the server.

``FakeFamily`` is a MOCK of the Python backend's ``pb_utils.MetricFamily``, which exists only inside Triton's stub
process; the real families are read off the metrics port by the server tests (test_serving, test_alert_rules).
"""

from __future__ import annotations

import pytest

from littlebig.decision import CONFIDENCE_BINS
from littlebig.metrics import METRICS, Metrics
from littlebig.shadow import DROP_REASONS


class FakeMetric:
    def __init__(self, labels: dict[str, str]) -> None:
        self.labels, self.value, self.calls = labels, 0.0, 0

    def increment(self, n: int) -> None:
        self.value, self.calls = self.value + n, self.calls + 1

    def set(self, v: float) -> None:
        self.value, self.calls = v, self.calls + 1


class FakeFamily:
    COUNTER, GAUGE = "COUNTER", "GAUGE"
    made: list[FakeFamily] = []

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.kind, self.metrics = name, kind, []
        FakeFamily.made.append(self)

    def Metric(self, labels: dict[str, str]) -> FakeMetric:  # noqa: N802 - pb_utils' name
        self.metrics.append(FakeMetric(labels))
        return self.metrics[-1]


def build(guard: bool) -> Metrics:
    FakeFamily.made = []
    return Metrics(FakeFamily, {"model": "littlebig", "version": "1"}, ["little", "big"], "littlebig_0", guard)


@pytest.mark.parametrize("guard", [False, True])
def test_every_family_of_the_table_is_registered_with_its_labels(guard):
    metrics = build(guard)
    expected = {k for k in METRICS if guard or not k.startswith("guard_")}
    assert set(metrics.families) == expected and len(FakeFamily.made) == len(expected)
    assert {f.name for f in FakeFamily.made} == {METRICS[k][0] for k in expected}
    assert all(f.kind == METRICS[k][1].upper() for k, f in metrics.families.items())
    assert [m.labels["upper"] for m in metrics["confidence"]] == [repr(e) for e in CONFIDENCE_BINS]
    assert [m.labels["stage"] for m in metrics["stage_rows"]] == ["little", "big"]
    assert [m.labels["reason"] for m in metrics["shadow_dropped"]] == list(DROP_REASONS)
    assert metrics["threshold"][0].labels == {"model": "littlebig", "version": "1", "bls_instance": "littlebig_0"}
    assert metrics["rows"][0].labels == {"model": "littlebig", "version": "1"}


def test_counts_are_added_and_zero_counts_are_not_sent():
    metrics = build(False)
    metrics.count({"rows": 5, "escalated": 0})
    metrics.count({"rows": 3})
    metrics.count_each("stage_rows", [4, 0])
    assert (metrics["rows"][0].value, metrics["rows"][0].calls) == (8, 2)
    assert metrics["escalated"][0].calls == 0  # each call is an IPC round trip: none for nothing
    assert [(m.value, m.calls) for m in metrics["stage_rows"]] == [(4, 1), (0, 0)]
    with pytest.raises(ValueError):  # one count per stage, no more and no fewer
        metrics.count_each("stage_rows", [1, 2, 3])


def test_a_gauge_takes_one_value_per_metric_and_says_so_otherwise():
    metrics = build(False)
    shares = [1 / len(CONFIDENCE_BINS)] * len(CONFIDENCE_BINS)
    metrics.set("calibrated_confidence_share", *shares)
    assert [m.value for m in metrics["calibrated_confidence_share"]] == shares
    metrics.set("calibrated_eps", 0.01)
    assert metrics["calibrated_eps"][0].value == 0.01
    with pytest.raises(ValueError, match="littlebig_calibrated_confidence_share: 2 values for its"):
        metrics.set("calibrated_confidence_share", 0.5, 0.5)
