"""`make overload` end to end in its quick mode: a few seconds per phase on the real server, governor off and on.

No timing is asserted (2 shared cores): the test checks that the run writes its figures and plot, and that
they agree with each other, with the schedule, with the server's counters and with the offline cascade.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.overload_analysis import REASONS
from bench.step_load import Phase, phases, schedule, write_intervals
from littlebig.export.pipeline import reference_logits
from tests.helpers import PERF_VENV, needs_perf


def test_the_schedule_steps_1x_2x_1x(tmp_path):
    plan = phases([10, 10, 20], 100.0)
    assert [(p.name, p.rate, p.start_s) for p in plan] == [("1x", 100, 0), ("2x", 200, 10), ("1x after", 100, 20)]
    for distribution in ("constant", "poisson"):
        t = schedule(plan, distribution, seed=1)
        assert np.all(np.diff(t) >= 0) and t[-1] < plan[-1].stop_s
        counts = [((t >= p.start_s) & (t < p.stop_s)).sum() for p in plan]
        assert counts == pytest.approx([1000, 2000, 2000], rel=0.1)
        gaps = np.array(write_intervals(t, tmp_path / "iv.txt").read_text().split(), dtype=np.int64)
        assert len(gaps) == len(t) and gaps.min() >= 1
        assert np.cumsum(gaps)[-1] / 1e6 == pytest.approx(t[-1], abs=1e-3)


@pytest.mark.slow
@needs_perf
def test_quick_overload_run_writes_consistent_figures(build_dir, tmp_path):
    from bench.overload import main

    out = tmp_path / "overload.json"
    assert main(["--build", str(build_dir), "--perf-venv", str(PERF_VENV), "--quick", "--out", str(out)]) == 0
    png = out.with_suffix(".png")
    assert png.exists() and png.stat().st_size > 10_000
    r = json.loads(out.read_text())
    assert r["saturation"]["rate"] > 0 and r["littlebig_unloaded"]["p99_ms"] > 0
    assert [p["name"] for p in r["phases"]] == ["1x", "2x", "1x after"]
    assert r["phases"][1]["rate"] == pytest.approx(2 * r["phases"][0]["rate"])
    assert r["t_min"] <= r["t_cal"]
    assert set(r["runs"]) == {"off", "on"} and set(r["targets"]) >= {"p99_windows_ok_2x", "t_recovery_s"}
    plan = [Phase(p["name"], p["factor"], p["seconds"], p["start_s"], p["rate"]) for p in r["phases"]]
    for run in r["runs"].values():
        # every scheduled request was sent, recorded and put in one phase; answered + errors = sent
        assert run["requests"] == r["schedule"]["requests"] > 0
        assert sum(p["requests"] for p in run["phases"]) == run["requests"]
        assert run["answered"] + run["errors"] == run["requests"]
        assert sum(run["reasons"].values()) == run["requests"] and set(run["reasons"]) == set(REASONS)
        # the server's counters saw exactly the rows perf_analyzer got answers for, and the same "load" rows
        assert run["counters"]["rows"] == run["answered"]
        assert run["counters"]["load"] == run["reasons"]["load"]
        assert run["counters"]["deadline"] == run["reasons"]["deadline"] == 0  # no deadline_ms sent
        # each answer is little's or big's offline answer, as REASON says; "load" rows lie between T_min and T
        assert run["consistency"] == {"unknown_images": 0, "label_mismatches": 0, "load_rows_outside_band": 0}
        assert len(run["windows"]) == int(np.ceil(plan[-1].stop_s / r["window_s"]))
        assert sum(w["requests"] for w in run["windows"]) == run["requests"]
        assert all(w["p99_ms"] >= w["p50_ms"] > 0 for w in run["windows"] if w["requests"])
        series = run["threshold_series"]
        assert len(series) >= plan[-1].stop_s / 2 and all(s["t_min"] <= s["t_max"] for s in series)
    # the served accuracy per phase, recounted from the recorded requests against the test labels
    labels = reference_logits(build_dir, "test")["labels"]
    for mode, run in r["runs"].items():
        req = np.load(out.parent / f"{out.stem}-work" / mode / "requests.npz")
        t = req["send"] - req["send"][0]
        for p in run["phases"]:
            sel = (t >= p["start_s"]) & (t < p["start_s"] + p["seconds"]) & (req["reason"] != "error")
            rows, served = req["row"][sel], req["label"][sel]
            assert (rows >= 0).all() and p["accuracy_served"] == pytest.approx(np.mean(served == labels[rows]))
            assert p["accuracy_drop"] == pytest.approx(p["accuracy_static"] - p["accuracy_served"])
    # governor off: T never moves and no row is answered by little because of load
    off = r["runs"]["off"]
    assert off["reasons"]["load"] == 0 and not off["t_lowered"]
    assert all(s["t_min"] == pytest.approx(r["t_cal"]) == s["t_max"] for s in off["threshold_series"])
    assert off["repository"]["slo_p99_ms"] is None and r["runs"]["on"]["repository"]["slo_p99_ms"] == r["slo_p99_ms"]
    # without errors the static run answers exactly the offline static cascade
    for p in off["phases"]:
        if p["errors"] == 0:
            assert p["answers_differing_from_static"] == 0
