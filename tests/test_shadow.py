"""Shadow sampling's parts apart from the server: the seeded draw, the rotating records, and
recalibration from them (its promise checked on synthetic traffic whose truth is known)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from littlebig.export.calibrate import calibrate_from_shadow, learn_then_test
from littlebig.shadow import RECORD_FILE, RecordWriter, Sampler, loss_bound, read_records, wilson_cc


def test_the_draw_is_seeded_per_instance_and_at_its_rate():
    a, b = Sampler(0.05, 7, "littlebig_0_0"), Sampler(0.05, 7, "littlebig_0_0")
    draws = [a.select(1000) for _ in range(20)]
    assert all(np.array_equal(d, b.select(1000)) for d in draws)  # same seed and instance: the same draw
    assert not np.array_equal(Sampler(0.05, 7, "littlebig_0_1").select(20000), np.concatenate(draws))
    share = np.concatenate(draws).mean()
    assert abs(share - 0.05) < 5 * np.sqrt(0.05 * 0.95 / 20000)
    assert not Sampler(0.0, 0).select(100).any()
    with pytest.raises(ValueError, match="shadow rate"):
        Sampler(1.5, 0)


def test_records_round_trip_and_rotate_within_their_bound(tmp_path, monkeypatch):
    import littlebig.shadow as shadow

    monkeypatch.setattr(shadow, "RECORD_MAX_BYTES", 4000)
    writer = RecordWriter(str(tmp_path), "littlebig_0_0")
    conf = np.linspace(0.5, 1.0, 200, dtype=np.float32)
    answer, big = np.arange(200) % 10, (np.arange(200) + (np.arange(200) % 7 == 0)) % 10
    writer.write("shadow", conf, answer, big, 1.5)
    writer.close()
    files = sorted(tmp_path.glob(RECORD_FILE.format(instance="littlebig_0_0") + "*"))
    assert 1 < len(files) <= 1 + shadow.RECORD_BACKUPS  # rotated, and old files dropped beyond the backups
    assert all(f.stat().st_size <= 4000 for f in files)
    records = read_records(str(tmp_path))
    kept = len(records["conf"])
    assert 0 < kept <= 200 and set(records["kind"]) == {"shadow"}
    # what is kept is the newest rows, exactly as written
    assert np.array_equal(np.sort(records["conf"]), conf[200 - kept :])
    order = np.argsort(records["conf"])
    assert np.array_equal(records["answer"][order], answer[200 - kept :])
    assert np.array_equal(records["big"][order], big[200 - kept :])
    json.loads(files[0].read_text().splitlines()[0])  # JSON lines


def test_no_records_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shadow records"):
        read_records(str(tmp_path))


def test_the_bound_is_the_confident_share_times_wilson():
    lower, upper = wilson_cc(12, 1000, 3.719)
    bound = loss_bound(5000, 4000, 1000, 12, 3.719)
    assert bound["estimate"] == pytest.approx(0.8 * 0.012)
    assert (bound["lower"], bound["upper"]) == pytest.approx((0.8 * lower, 0.8 * upper))
    assert 0 < lower < 0.012 < upper
    assert wilson_cc(0, 1000, 3.719)[0] == 0.0
    assert np.isnan(loss_bound(0, 0, 0, 0, 3.719)["estimate"])


def test_recalibration_is_calibrations_exact_test_and_counts_unknown_rows_as_losses():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 4000)
    disagree = rng.random(4000) < 0.2 * (1 - conf)
    result = calibrate_from_shadow(conf, disagree)
    assert result["threshold"] == learn_then_test(conf, disagree)
    unknown = rng.random(4000) < 0.01
    worse = calibrate_from_shadow(conf, disagree | unknown)
    assert worse["threshold"] >= result["threshold"]  # unknown rows can only make T more careful
    assert result["escalation_rate"] == pytest.approx(float((conf < result["threshold"]).mean()))


def test_recalibration_keeps_its_promise_on_live_traffic():
    """Traffic with a known disagreement curve; the records are a uniform R-draw of it (escalated rows with big's
    answer, confident ones with the shadow's, 2% unknown). Over 40 draws of records, the T chosen keeps the true
    disagreement of the traffic <= eps in at least 1 - delta of them (here: all but at most 4)."""
    eps, delta, rate = 0.005, 0.05, 0.05

    def true_disagreement(t: float) -> float:  # conf ~ U(0.3, 1), P(disagree | conf) = 0.1 (1 - conf)
        c = np.clip(t, 0.3, 1.0)
        return 0.1 * (1 - c) ** 2 / 2 / 0.7

    broken = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        rows = 100_000
        conf = rng.uniform(0.3, 1.0, rows)
        disagree = rng.random(rows) < 0.1 * (1 - conf)
        drawn = rng.random(rows) < rate
        unknown = rng.random(rows) < 0.02
        t = calibrate_from_shadow(conf[drawn], (disagree | unknown)[drawn], eps, delta)["threshold"]
        broken += true_disagreement(t) > eps
    assert broken <= 4
    # and the rule is not trivially careful: T = 1 would keep the promise but send everything to big
    assert t < 0.95


def test_seen_feeds_the_guard_once_when_every_call_is_back_and_never_when_voided():
    """The guard's observation of one execute: all its drawn rows once its shadow calls are all back, or none."""
    from littlebig.shadow import Seen

    fed = []
    seen = Seen(lambda conf, mismatch: fed.append((conf.tolist(), mismatch.tolist())), [np.array([0.9])],
                [np.array([False])])  # fmt: skip
    seen.pending = 2
    seen.add(np.array([0.99, 0.97]), np.array([True, False]))
    seen.close()
    seen.done()
    assert fed == []  # one call still out
    seen.done()
    assert fed == [([0.9, 0.99, 0.97], [False, True, False])]
    seen.done()
    seen.close()
    assert len(fed) == 1  # fed once
    voided = Seen(lambda *a: fed.append(a), [np.array([0.5])], [np.array([True])])
    voided.void()
    voided.close()
    assert len(fed) == 1  # a row whose big answer is unknown: the execute tells the guard nothing


def test_shadow_plan_drops_first_and_says_why():
    """Shadow work never competes with traffic: all of it is dropped under load or with big's breaker open; then
    rows too close to their deadline; then every chunk beyond the room for calls. Every drawn row is either in a
    call or dropped with its reason, once."""
    from littlebig.shadow import DROP_REASONS, plan_shadow

    rows = np.arange(10, 20)
    left = np.full(10, 5.0)
    assert plan_shadow(rows, left, 0.1, 4, 4, True, False) == ([], {"load": rows})
    assert plan_shadow(rows, left, 0.1, 4, 4, False, True) == ([], {"breaker": rows})
    left[[1, 6]] = 0.05  # 50 ms left, big answers in 100 ms
    chunks, dropped = plan_shadow(rows, left, 0.1, 3, 2, False, False)
    assert [c.tolist() for c in chunks] == [[10, 12, 13], [14, 15, 17]]
    assert dropped["deadline"].tolist() == [11, 16] and dropped["busy"].tolist() == [18, 19]
    assert set(dropped) <= set(DROP_REASONS)
    placed = np.concatenate([*chunks, *dropped.values()])
    assert sorted(placed.tolist()) == rows.tolist()
    chunks, dropped = plan_shadow(rows, left, 0.1, 3, 0, False, False)
    assert chunks == [] and len(dropped["busy"]) == 8


class Counter:
    """Stands in for a Triton metric (pb_utils exists only inside the server): counts what is added."""

    def __init__(self) -> None:
        self.value = 0

    def increment(self, n: int) -> None:
        self.value += n


def test_shadow_traffic_counts_records_and_feeds_the_guard_when_big_answers(tmp_path):
    """The BLS instance's shadow work outside the server: calls are plain futures, big's answers come back out of
    order; each answer is counted in its confidence bin, a failed call is dropped as failed, and every drawn row
    ends up in the (real) record files exactly once."""
    from concurrent.futures import Future

    from littlebig.decision import CONFIDENCE_BINS
    from littlebig.shadow import DROP_REASONS, Seen, ShadowTraffic

    metrics = {"shadow_dropped": [Counter() for _ in DROP_REASONS],
               "shadow_rows": [Counter() for _ in CONFIDENCE_BINS],
               "shadow_disagreements": [Counter() for _ in CONFIDENCE_BINS]}  # fmt: skip
    sent = []

    def send(images):
        sent.append((images, Future()))
        return sent[-1][1]

    writer = RecordWriter(str(tmp_path), "i0")
    shadow = ShadowTraffic(writer, metrics, send, lambda logits: logits, max_batch=2, max_calls=2)
    held = np.array([[0.97, 0.03], [0.02, 0.98], [0.96, 0.04], [0.99, 0.01], [0.95, 0.05]], dtype=np.float32)
    images = np.arange(5).reshape(5, 1)
    fed = []
    seen = Seen(lambda conf, mismatch: fed.append(mismatch.tolist()), [], [])
    shadow.start(images, np.arange(5), held, held.max(-1), np.full(5, 9.0), 0.1, False, False, seen)
    assert [img.ravel().tolist() for img, _ in sent] == [[0, 1], [2, 3]] and len(shadow.in_flight) == 2
    assert metrics["shadow_dropped"][DROP_REASONS.index("busy")].value == 1  # row 4: no room for a third call
    assert fed == []  # a drop voids the guard's observation of this execute: it is never fed
    sent[1][1].set_result(np.array([[0.0, 1.0], [1.0, 0.0]]))  # big: row 2 -> 1 (disagrees), row 3 -> 0
    sent[0][1].set_exception(RuntimeError("big is down"))
    assert not shadow.in_flight
    assert sum(c.value for c in metrics["shadow_rows"]) == 2
    assert sum(c.value for c in metrics["shadow_disagreements"]) == 1
    assert metrics["shadow_dropped"][DROP_REASONS.index("failed")].value == 2
    writer.close()
    records = read_records(str(tmp_path))
    assert sorted(records["kind"].tolist()) == ["shadow", "shadow", "unknown", "unknown", "unknown"]
    assert sorted(records["big"].tolist()) == [-1, -1, -1, 0, 1]
    fed_only = Seen(lambda conf, mismatch: fed.append(mismatch.tolist()), [], [])
    shadow.start(images, np.arange(2), held, held.max(-1), np.full(2, 9.0), 0.1, False, False, fed_only)
    sent[2][1].set_result(np.array([[1.0, 0.0], [1.0, 0.0]]))  # row 0 agrees, row 1 (answered 1) disagrees
    assert fed == [[False, True]]
