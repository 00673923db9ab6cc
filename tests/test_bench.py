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


# ---------------------------------------------------------------- best against best (issue 12) -------------------
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
