"""`make bench` tooling: perf_analyzer installs and runs, and it really sends our real images.

perf_analyzer lives in its own venv (``make perf-analyzer``, which ``make bench`` runs); the tests that
need it skip, saying so, only when that venv is absent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.perf import PerfAnalyzer, read_input_data, write_input_data
from littlebig.data import load_fashion_mnist
from littlebig.decision import cascade
from tests.helpers import PERF_VENV, needs_perf


@needs_perf
def test_perf_analyzer_runs():
    assert PerfAnalyzer(PERF_VENV).version().startswith("Perf Analyzer Version 2.51")


def test_input_data_round_trips_real_images(tmp_path):
    images = load_fashion_mnist("test").images[:48]
    path = write_input_data(images, tmp_path / "input.json")
    entries = json.loads(path.read_text())["data"]
    assert len(entries) == 48  # one entry per batch-1 sample: `-b N` takes N consecutive ones
    assert entries[0]["IMAGE"]["shape"] == [28, 28, 1]
    back = read_input_data(path)
    assert back.dtype == np.uint8 and np.array_equal(back, images)


def test_input_data_rejects_non_images(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_input_data(np.zeros((2, 28, 28, 1), dtype=np.float32), tmp_path / "x.json")


@needs_perf
@pytest.mark.parametrize("batch", [1, 8])
def test_perf_analyzer_sends_exactly_our_images(server, build_dir, served_threshold, tmp_path, batch):
    """64 real rows, each sent once: littlebig sees 64 rows and big exactly the offline escalations."""
    import tritonclient.grpc as grpcclient

    from bench.search import server_stats
    from littlebig.data import load_split
    from littlebig.export.onnx_export import INPUT_NAME, OUTPUT_NAME, onnx_session
    from littlebig.export.pipeline import export_dir, read_export

    exported = read_export(build_dir)
    images = load_split("test", exported["data_dir"], tuple(exported["service_size"])).images[:64]
    logits = {
        role: onnx_session(export_dir(build_dir) / exported[role]["onnx"]).run([OUTPUT_NAME], {INPUT_NAME: images})[0]
        for role in ("little", "big")
    }
    expected_big = int(cascade(logits["little"], logits["big"], served_threshold)["escalated"].sum())
    data = write_input_data(images, tmp_path / "input.json")

    url = f"127.0.0.1:{server.ports.grpc}"
    client = grpcclient.InferenceServerClient(url)
    before = {m: server_stats(client, m) for m in ("big", "littlebig")}
    done = PerfAnalyzer(PERF_VENV).run(
        ["-m", "littlebig", "-u", url, "-i", "grpc", "-b", str(batch), f"--request-count={64 // batch}",
         f"--input-data={data}"]
    )  # fmt: skip
    after = {m: server_stats(client, m) for m in ("big", "littlebig")}
    client.close()
    assert done.returncode == 0, done.stdout[-2000:]
    rows = {m: after[m]["inference_count"] - before[m]["inference_count"] for m in before}
    assert rows == {"littlebig": 64, "big": expected_big}


# ---------------------------------------------------------------- best against best ------------------------------
def test_candidates_are_distinct_servable_deployments():
    from bench.search import BLS, grid, refinements
    from littlebig.model_repository.generate import ServeOptions

    cands = grid(vars(ServeOptions()))
    assert [len(cands[r]) for r in ("little", "big", BLS)] == [3, 3, 8]
    names = [c.name for v in cands.values() for c in v]
    assert len(set(names)) == len(names)
    leader = cands[BLS][0]
    refined = refinements(leader)
    for cand in refined:  # one change each around the leader, all different from it
        changed = {k for k, v in cand.opts().items() if leader.opts().get(k) != v}
        assert len(changed) == 1, cand.name
        ServeOptions(**cand.opts())  # every candidate is a deployment the generator takes
    assert len({c.name for c in refined}) == len(refined) and leader.name not in {c.name for c in refined}


def test_confirm_plan_fits_the_budget():
    from bench.search import confirm_plan

    assert confirm_plan(600, 12, 3, 1.0) == (2, 1500)  # room for two finalists, windows capped
    k, window = confirm_plan(100, 12, 3, 1.0)
    assert k == 1 and 400 <= window <= 1500  # too little time: one finalist per role
    assert confirm_plan(1, 12, 3, 1.0) == (1, 400)  # never below the floor


def _row(role, name, batch, conc, rate, avg_ms=1.0, rows=0, escalated=0):
    r = {"role": role, "model": name, "candidate": name, "batch": batch, "concurrency": conc, "throughput": rate,
         "avg_us": avg_ms * 1e3, "p50_us": avg_ms * 1e3, "options": {}, "server": {name: {"rows": rows}}}  # fmt: skip
    if role == "littlebig":
        r["escalated_rows"] = escalated
    return r


def test_summary_is_best_against_best():
    from bench.search import summarise

    rows = []
    for b, c in ((1, 1), (8, 1)):
        rows += [
            _row("little", "little__a", b, c, 1000.0, 2.0),
            _row("big", "big__a", b, c, 100.0, 10.0),
            _row("big", "big__b", b, c, 200.0, 5.0),  # big at its best is big__b
            _row("littlebig", "lb__x", b, c, 300.0, 6.0, rows=100, escalated=25),
            _row("composing", "lb__x__little", b, c, 900.0, 2.5),
            _row("composing", "lb__x__big", b, c, 150.0, 8.0),
        ]
    s = summarise(rows, (1, 8), (1,), 8)
    assert s["escalation"]["served"] == 0.25
    assert s["speedup_vs_big_best"] == 300.0 / 200.0
    assert s["winners"]["big"]["candidate"] == "big__b"
    # R* by hand: little 1000 img/s, big at its best 200 img/s, p 0.25: 1/1000 + 0.25/200 = 2.25 ms per image
    assert s["fraction_of_ideal"] == pytest.approx(300.0 * 2.25e-3)
    assert s["bound"] == pytest.approx(1 / 2.25e-3 / 200.0)
    # the overhead compares littlebig with exactly the little and big it calls
    assert abs(s["bls_overhead_mean_ms"] - (6.0 - (2.5 + 0.25 * 8.0))) < 1e-9


@pytest.mark.slow
@needs_perf
def test_bench_search_writes_the_fair_table(build_dir, tmp_path):
    """A tiny budget runs every path: screen, refinements skipped, one finalist per role, the JSON and its report."""
    from bench import report, run

    out = tmp_path / "bench.json"
    argv = ["--build", str(build_dir), "--out", str(out), "--budget-s", "1", "--batches", "1,2", "--concurrency",
            "1,2", "--screen-points", "2x2", "--screen-ms", "300", "--images", "32", "--offline-seconds", "0.05",
            "--finalists", "1"]  # fmt: skip
    assert run.main(argv) == 0
    r = json.loads(out.read_text())
    for key in ("speedup_vs_big_best", "fraction_of_ideal", "bound", "bls_overhead_mean_ms", "winners", "search"):
        assert key in r
    assert set(r["winners"]) == {"little", "big", "littlebig"}
    assert r["search"]["finalists_per_role"] == 1 and len(r["search"]["finalists"]) == 3
    assert any(x.get("skipped") for x in r["search"]["screen"])  # the budget stopped the screen
    assert 0 < r["escalation_rate"] < 1 and r["summary"]["escalation"]["served_rows"] > 0
    lb = next(e for e in r["breakdown"] if e["role"] == "littlebig")
    # little in process (the cpu default) is part of the BLS model's own time: no wait on the little model at all,
    # while the escalated rows wait on big
    assert lb["bls"]["in_little_ms"] == 0 and lb["bls"]["in_big_ms"] > 0 and lb["bls"]["own_ms"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert "### Where the time goes" in report.render(r)


@pytest.mark.parametrize("in_process", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_little_in_process_serves_the_same_answers(build_dir, tmp_path, in_process, request):
    """ServeOptions.little_in_process (the cpu default): littlebig runs little itself, or calls the little
    model, and answers exactly like the reference either way. The default is the session server's."""
    import contextlib

    import tritonclient.grpc as grpcclient

    from littlebig.data import load_split
    from littlebig.export.onnx_export import INPUT_NAME, OUTPUT_NAME, onnx_session
    from littlebig.export.pipeline import export_dir, read_export
    from littlebig.model_repository.generate import ServeOptions, generate
    from littlebig.model_repository.server import Ports, TritonServer

    if in_process:  # the cpu default: what the session server serves
        shared = request.getfixturevalue("server")
        repo, running = shared.repository, contextlib.nullcontext(shared)
        summary = json.loads((repo / "littlebig-repository.json").read_text())
    else:
        repo = tmp_path / "repo"
        summary = generate(build_dir, repo, "cpu", ServeOptions(little_in_process=in_process))
        running = TritonServer(repo, Ports.free(), log_file=tmp_path / "log.txt").start()
    assert (repo / "littlebig" / "1" / "little.onnx").exists() == in_process
    exported = read_export(build_dir)
    images = load_split("test", exported["data_dir"], tuple(exported["service_size"])).images[:96]
    logits = {
        role: onnx_session(export_dir(build_dir) / exported[role]["onnx"]).run([OUTPUT_NAME], {INPUT_NAME: images})[0]
        for role in ("little", "big")
    }
    expected = cascade(logits["little"], logits["big"], summary["threshold"])
    with running as server:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports.grpc}")
        before = client.get_inference_statistics("little", as_json=True)["model_stats"][0].get("inference_count", 0)
        labels, escalated = [], []
        for a in range(0, len(images), 32):
            x = grpcclient.InferInput("IMAGE", [32, *images.shape[1:]], "UINT8")
            x.set_data_from_numpy(images[a : a + 32])
            res = client.infer("littlebig", [x])
            labels.append(res.as_numpy("LABEL").ravel())
            escalated.append(res.as_numpy("ESCALATED").ravel())
        after = client.get_inference_statistics("little", as_json=True)["model_stats"][0].get("inference_count", 0)
        client.close()
    assert np.array_equal(np.concatenate(labels), expected["label"])
    assert np.array_equal(np.concatenate(escalated), expected["escalated"])
    assert int(after) - int(before) == (0 if in_process else len(images))  # BLS calls to the little model


# ---------------------------------------------------------------- cascades of any length --------------------------
def test_ideal_rate_of_k_stages_is_the_rows_time_back_to_back():
    """R* = 1 / sum_k(q_k / R_k), against the time each row spends in the stages it reaches, row by row."""
    from bench.rates import bound_stages, ideal, ideal_stages, reaching

    rates = [1000.0, 400.0, 100.0]  # little, middle, big, images/s each
    answering = np.array([0] * 60 + [1] * 30 + [2] * 10)  # the stage that answers each of 100 rows
    # a row answered at stage k ran every stage up to k: 1/R_0 + ... + 1/R_k seconds
    seconds = sum(sum(1.0 / rates[j] for j in range(k + 1)) for k in answering)
    answered = [float((answering == k).mean()) for k in range(3)]
    assert reaching(answered) == pytest.approx([1.0, 0.4, 0.1])
    assert ideal_stages(rates, reaching(answered)) == pytest.approx(len(answering) / seconds)
    assert ideal_stages(rates, [1.0, 0.4, 0.1]) == pytest.approx(1 / 0.003)  # 1 ms in each stage per image
    assert bound_stages(rates, [1.0, 0.4, 0.1]) == pytest.approx(1 / 0.003 / 100.0)
    # two stages are the pair's formula, with the escalation rate p as the share reaching big
    assert ideal_stages([1000.0, 100.0], [1.0, 0.25]) == pytest.approx(ideal(1000.0, 100.0, 0.25))
    with pytest.raises(ValueError):
        ideal_stages(rates, [1.0, 0.4])


def test_a_three_stage_candidate_serves_its_own_stage_models():
    import dataclasses
    from pathlib import Path

    from bench.search import BLS, bls_own, grid, refinements
    from littlebig.model_repository.generate import ServeOptions

    two = grid(vars(ServeOptions()))[BLS][0]
    three = dataclasses.replace(two, stages=("little", "middle", "big"), variant="three", build=Path("b3"))
    assert three.name != two.name and three.name.startswith("littlebig_three__")
    assert three.callees() == {s: f"{three.name}__{s}" for s in ("little", "middle", "big")}
    assert three.models() == [*three.composing(), three.name]
    for cand in refinements(three):  # refinements stay with the leader's cascade and build
        assert (cand.stages, cand.variant, cand.build) == (three.stages, "three", Path("b3"))
    # per execute: little in process (no wait on its model), then middle and big one after another
    stats = {
        three.name: {"executions": 10, "exec_total_ms": 100.0},
        three.callees()["little"]: {"request_total_ms": 0.0, "request_ms": 0.0, "requests": 0},
        three.callees()["middle"]: {"request_total_ms": 30.0, "request_ms": 3.0, "requests": 10},
        three.callees()["big"]: {"request_total_ms": 25.0, "request_ms": 5.0, "requests": 5},
    }
    own = bls_own(stats, three.name, three.callees())
    assert own == pytest.approx({"exec_ms": 10.0, "in_little_ms": 0.0, "in_middle_ms": 3.0, "in_big_ms": 2.5,
                                 "own_ms": 4.5})  # fmt: skip


def test_stages_summary_compares_best_against_best():
    """bench/stages.py's summary: each group's best per batch, three/two and each/big, R* from served shares."""
    from bench.stages import summarise

    def row(group, name, rate, reach=None, answered=None):
        r = {"group": group, "candidate": name, "batch": 8, "concurrency": 4, "throughput": rate, "options": {}}
        if reach:
            r["stage_reach_rows"], r["stage_rows"] = reach, answered
        return r

    rows = [
        row("little", "little__a", 1000.0),
        row("middle", "middle__a", 400.0),
        row("big", "big__a", 100.0),
        row("big", "big__b", 150.0),  # big at its best
        row("two", "lb2", 300.0, {"little": 100, "big": 20}, {"little": 80, "big": 20}),
        row("three", "lb3", 330.0, {"little": 100, "middle": 40, "big": 10}, {"little": 60, "middle": 30, "big": 10}),
    ]
    offline = {
        "two": {"stages": ["little", "big"], "macs": {"little": 1.0, "big": 10.0}, "val": {"expected_macs": 3.0},
                "images": {"expected_macs": 3.0}},
        "three": {"stages": ["little", "middle", "big"], "macs": {"little": 1.0, "middle": 4.0, "big": 10.0},
                  "val": {"expected_macs": 3.6}, "images": {"expected_macs": 3.6}},
    }  # fmt: skip
    s = summarise(rows, (8,), (4,), 8, offline)
    assert s["ratios"] == pytest.approx({"three_over_two": 1.1, "two_over_big": 2.0, "three_over_big": 2.2})
    assert s["winners"]["big"]["candidate"] == "big__b"
    three = s["per_batch"]["8"]["ideal"]["three"]
    assert three["reach"] == pytest.approx([1.0, 0.4, 0.1])
    assert three["ideal_throughput"] == pytest.approx(1 / (1 / 1000 + 0.4 / 400 + 0.1 / 150))
    assert s["per_batch"]["8"]["ideal"]["two"]["ideal_throughput"] == pytest.approx(1 / (1 / 1000 + 0.2 / 150))
    assert s["served_shares"]["lb3"]["answered"] == pytest.approx([0.6, 0.3, 0.1])
    assert s["expected_macs"]["three"]["served"] == pytest.approx(1.0 + 0.4 * 4.0 + 0.1 * 10.0)


def test_bench_ab_code_of_a_revision_is_its_model_and_the_modules_it_imports(tmp_path, monkeypatch):
    """``bench.ab --code REV`` serves REV's BLS folder: model.py and the littlebig modules it imports, directly or
    through each other, as they were at REV (a module added later is not asked of an earlier revision)."""
    import subprocess

    from bench.ab import bls_code

    def commit(files: dict[str, str]) -> str:
        for path, text in files.items():
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text(text)
        subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
        subprocess.run(["git", "commit", "-qm", "c"], cwd=tmp_path, check=True)
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout.strip()  # fmt: skip

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    for key, value in (("user.email", "t@example.com"), ("user.name", "t")):
        subprocess.run(["git", "config", key, value], cwd=tmp_path, check=True)
    model = "model_repository/littlebig/model.py"
    before = commit(
        {model: "import numpy\nfrom control import Breaker\n", "littlebig/control.py": "from decision import x\n",
         "littlebig/decision.py": "import numpy\n", "littlebig/cli.py": "import argparse\n"}
    )  # fmt: skip
    after = commit({model: "from control import Breaker\nfrom metrics import Metrics\n", "littlebig/metrics.py": ""})
    monkeypatch.chdir(tmp_path)
    assert set(bls_code(before)) == {"model.py", "control.py", "decision.py"}
    assert set(bls_code(after)) == {"model.py", "control.py", "decision.py", "metrics.py"}
    assert bls_code(before)["model.py"].startswith("import numpy")
