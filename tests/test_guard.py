"""The accuracy guard (littlebig/control.py ``Guard``): its statistics on synthetic streams of known disagreement,
and on the real server: T raised under a shifted stream, every answer equal to the offline cascade at the T in
force, the state surviving a restart.

The synthetic streams are seeded, so every figure here is exact for those seeds: the false-firing share is the
level's bound checked on 200 fixed streams, not a sampled estimate that could land either side of it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from littlebig.control import Guard, guard_levels, z_one_sided
from littlebig.decision import ALWAYS_BIG, escalate
from littlebig.model_repository.generate import ServeOptions

CALIBRATED, EPS, ALPHA = 0.888, 0.01, 0.05


def stream(p_low: float, p_high: float, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Confidences uniform on [0.5, 1); a row disagrees with big with probability ``p_low`` below confidence
    0.97 and ``p_high`` above: the cascade's disagreement at T is P(conf >= T and mismatch)."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.5, 1.0, rows)
    mismatch = rng.random(rows) < np.where(conf < 0.97, p_low, p_high)
    return conf, mismatch


def disagreement(p_low: float, p_high: float, t: float) -> float:
    """The exact disagreement of ``stream``'s cascade at T."""
    if t >= ALWAYS_BIG:
        return 0.0
    low = max(0.0, 0.97 - max(t, 0.5)) / 0.5
    high = (1.0 - max(t, 0.97)) / 0.5
    return p_low * low + p_high * high


def feed(guard: Guard, conf: np.ndarray, mismatch: np.ndarray, block: int = 8) -> list[tuple[int, float]]:
    """Feed in execute-sized blocks; every change of T as (rows seen, new T)."""
    changes = []
    for a in range(0, len(conf), block):
        if guard.observe(conf[a : a + block], mismatch[a : a + block]):
            changes.append((a + block, guard.threshold))
    return changes


def test_levels_and_z():
    levels = guard_levels(CALIBRATED)
    assert levels[0] == CALIBRATED and levels[-1] == ALWAYS_BIG and levels == sorted(set(levels))
    assert math.isclose(z_one_sided(0.05), 1.6448536, abs_tol=1e-6)
    assert math.isclose(z_one_sided(1e-4), 3.7190165, abs_tol=1e-6)


@pytest.mark.parametrize("share", [0.2, 1.0], ids=["within-eps", "at-eps"])
def test_false_firings_are_within_the_level(share):
    """Traffic exactly at eps (the null's boundary) and well within it: over 200 seeded streams of 20,000 rows,
    the share that ever fires is at most alpha (Ville's inequality bounds it for any length)."""
    p = share * EPS / disagreement(1, 1, CALIBRATED)
    fired = 0
    for seed in range(200):
        guard = Guard(CALIBRATED, EPS, ALPHA)
        feed(guard, *stream(p, p, 20_000, seed))
        fired += guard.firings > 0
    assert fired / 200 <= ALPHA, fired


def test_a_shift_is_detected_and_t_lands_within_eps():
    """Disagreement 5 x eps at the calibrated T, all of it above confidence 0.97: every seed fires within 1,000
    rows, and T lands where the stream's true disagreement is within eps."""
    for seed in range(20):
        guard = Guard(CALIBRATED, EPS, ALPHA)
        p_high = 5 * EPS / disagreement(0, 1, CALIBRATED)
        changes = feed(guard, *stream(0.0, p_high, 3000, seed))
        assert changes and changes[0][0] <= 1000, changes
        assert disagreement(0.0, p_high, guard.threshold) <= EPS, (guard.threshold, changes)
        assert guard.threshold < ALWAYS_BIG and not guard.cannot_meet


def test_too_few_rows_send_every_row_to_big():
    """A shift seen on so few rows that no level's bound is within eps: escalate everything, and say so."""
    guard = Guard(CALIBRATED, EPS, ALPHA)
    conf, mismatch = np.full(400, 0.999), np.ones(400, dtype=bool)  # every confident row wrong
    feed(guard, conf, mismatch)
    assert guard.firings >= 1 and guard.threshold == ALWAYS_BIG and guard.cannot_meet


def test_t_comes_back_down_only_on_evidence():
    """Shift, then clean (disagreement 0.2 x eps at the calibrated T): T returns to the calibrated T, and each step
    down comes no sooner after the previous change than the lowering test could reject: log(levels below /
    alpha) / log(1 + 0.5 eps / (1 - eps)) rows, the largest bet's growth on rows that all agree."""
    guard = Guard(CALIBRATED, EPS, ALPHA)
    shifted = stream(0.0, 0.5, 2000, 1)
    p = 0.2 * EPS / disagreement(1, 1, CALIBRATED)
    clean = stream(p, p, 40_000, 2)
    changes = feed(guard, *(np.concatenate(pair) for pair in zip(shifted, clean)))
    assert changes[0][1] > CALIBRATED and changes[0][0] <= 2000, changes  # raised during the shift
    assert guard.threshold == CALIBRATED and not guard.raised, changes
    previous_rows, previous_t = changes[0]
    for rows, t in changes[1:]:
        if t < previous_t:
            below = sum(level < previous_t for level in guard.levels)
            assert rows - previous_rows >= math.log(below / ALPHA) / math.log1p(0.5 * EPS / (1 - EPS)), changes
        previous_rows, previous_t = rows, t


def test_state_survives_a_restart_and_refuses_another_calibration(tmp_path):
    guard = Guard(CALIBRATED, EPS, ALPHA)
    feed(guard, *stream(0.0, 0.5, 2000, 3))
    path = str(tmp_path / "guard.json")
    guard.save(path)
    again = Guard(CALIBRATED, EPS, ALPHA)
    assert again.load(path) and again.threshold == guard.threshold and again.state() == guard.state()
    assert not Guard(0.9, EPS, ALPHA).load(path)  # another calibration's T: start fresh
    assert not Guard(CALIBRATED, 0.02, ALPHA).load(path)
    (tmp_path / "broken.json").write_text("{not json")
    assert not Guard(CALIBRATED, EPS, ALPHA).load(str(tmp_path / "broken.json"))


def test_the_guard_uses_the_shared_decision_rule():
    """Its disagreement at T is the cascade's: confident (not escalated by the shared rule) and different."""
    conf, mismatch = stream(0.3, 0.3, 500, 4)
    guard = Guard(CALIBRATED, EPS, ALPHA)
    for t in guard.levels:
        assert np.array_equal(guard.disagreement(conf, mismatch, t), ~escalate(conf, t) & mismatch)


@pytest.mark.parametrize("eps, alpha", [(0.0, 0.05), (1.0, 0.05), (0.01, 0.0), (0.01, 1.0)])
def test_bad_settings_are_refused(eps, alpha):
    with pytest.raises(ValueError, match="guard"):
        Guard(CALIBRATED, eps, alpha)


# --- the real server ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_on_the_server_the_guard_raises_t_on_a_shift_and_every_answer_is_the_cascade_at_the_t_in_force(
    build_dir, tmp_path, test_split, served_threshold
):
    """A contrast-shifted stream (little confident and wrong far more often) through one BLS instance with the
    guard on: T rises above the calibrated one; each answer equals the offline cascade at the T in force when it
    was served (read from littlebig_threshold just before and just after the request, as the guard moves T between
    executes); after a restart the guard resumes at the T it had reached."""
    from bench.shift import contrast, stream_logits
    from littlebig.decision import cascade
    from tests.helpers import infer, metric, own_server

    data, _ = test_split
    images = contrast(data.images[:2000], 0.7)
    logits = stream_logits(build_dir, images, "shifted")
    records = tmp_path / "records"
    opts = ServeOptions(
        shadow_rate=1.0, shadow_seed=1, shadow_log_dir=str(records), guard=True, guard_eps=EPS, bls_instances=1
    )
    levels = guard_levels(served_threshold)
    with own_server(build_dir, tmp_path, opts) as server:
        url = f"127.0.0.1:{server.ports.grpc}"
        assert metric(server, "littlebig_guard_threshold") == pytest.approx(served_threshold)
        in_force = []
        for a in range(0, len(images), 10):
            rows = slice(a, a + 10)
            before = metric(server, "littlebig_threshold")
            result = infer(url, images[rows])
            after = metric(server, "littlebig_threshold")
            label, escalated = result.as_numpy("LABEL").reshape(-1), result.as_numpy("ESCALATED").reshape(-1)
            matches = [
                t for t in {before, after}
                if np.array_equal(label, (ref := cascade(logits["little"][rows], logits["big"][rows], t))["label"])
                and np.array_equal(escalated, ref["escalated"])
            ]  # fmt: skip
            assert matches, (a, before, after)
            assert all(any(math.isclose(t, level) for level in levels) for t in (before, after))
            in_force.append(max(matches))
        raised = metric(server, "littlebig_guard_threshold")
        assert metric(server, "littlebig_guard_firings_total") >= 1 and raised > served_threshold
        assert metric(server, "littlebig_guard_binding") == 1
        assert max(in_force) > served_threshold
    assert list(records.glob("guard-*.json"))
    with own_server(build_dir, tmp_path / "again", opts) as server:
        assert metric(server, "littlebig_guard_threshold") == pytest.approx(raised)
        assert metric(server, "littlebig_threshold") == pytest.approx(raised)


def test_guard_flags_are_checked_before_anything_is_written(build_dir, tmp_path):
    from littlebig.model_repository.generate import generate

    out = tmp_path / "repo"
    with pytest.raises(ValueError, match=r"guard \(--guard\) needs shadow sampling"):
        generate(build_dir, out, "cpu", ServeOptions(guard=True))
    with pytest.raises(ValueError, match=r"guard_eps \(--guard-eps\) must be in \(0, 1\)"):
        generate(build_dir, out, "cpu", ServeOptions(guard=True, shadow_rate=0.1, guard_eps=2.0))
    with pytest.raises(ValueError, match=r"guard_alpha \(--guard-alpha\)"):
        generate(build_dir, out, "cpu", ServeOptions(guard=True, shadow_rate=0.1, guard_alpha=0.0))
    assert not out.exists()


@pytest.mark.slow
def test_quick_make_guard_run_writes_consistent_figures(build_dir, tmp_path):
    """``make guard`` at a small size (bench/guard.py: guard off and on through clean -> shift -> clean, then a
    clean run): every phase's rows are all replayed and compared with big; guard off, T never moves; guard on, T
    is never below the calibrated one; the record and its plot are written where --out says, not in the build."""
    import json

    from bench.guard import PHASES, main

    out = tmp_path / "guard.json"
    args = ["--build", str(build_dir), "--phase-rows", "300", "--clean-rows", "400", "--pace", "400", "--out", str(out)]
    assert main(args) == 0
    png = out.with_suffix(".png")
    assert png.exists() and png.stat().st_size > 10_000
    r = json.loads(out.read_text())
    assert set(r["summary"]) == {"off", "on"} and r["long_clean"]["rows"] == 400
    calibrated = None
    for name, phases in r["summary"].items():
        assert list(phases) == list(PHASES)
        for s in phases.values():
            assert s["rows"] == 300 and 0.0 <= s["disagreement"] <= 1.0 and 0.0 <= s["escalation_rate"] <= 1.0
        served = [t["t_served"] for t in r["runs"][name]["timeline"] if "t_served" in t]
        assert served, "the metrics port was never read"
        if name == "off":
            calibrated = served[0]
            assert set(served) == {calibrated}
        else:
            assert min(served) >= calibrated
    assert not (build_dir / "guard.json").exists() or (build_dir / "guard.json").stat().st_mtime < out.stat().st_mtime
