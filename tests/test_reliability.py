"""Reliability on the real tritonserver: bad input under load, big's failure policy,
a killed stub, a hung model, supervision, restricted admin APIs, oversize requests.

Tests that break a server start their own on free loopback ports and stop it, checking that none of
its processes and shared-memory regions survive. Figures are printed (``pytest -s``) and recorded in
RELIABILITY.md. ``LITTLEBIG_LOAD_REQUESTS`` sets the mixed-load size (``make soak`` runs 10,000).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from littlebig.decision import softmax
from littlebig.model_repository.generate import ServeOptions, generate
from littlebig.model_repository.server import (
    ADMIN_HEADER,
    HealthProbe,
    Ports,
    Supervisor,
    children,
)
from tests.helpers import (
    CLIENT_TIMEOUT_S,
    alive,
    grpc_url,
    hung_server,
    infer,
    kill_stub,
    metric,
    offline_reference,
    own_server,
    timed,
    wait_for_answer,
)
from tests.soak import make_items, mixed_load, spaced_thresholds

LOAD_REQUESTS = int(os.environ.get("LITTLEBIG_LOAD_REQUESTS", "2000"))


# --- bad input mixed into load, on the session server -------------------------------------------------


@pytest.mark.slow
def test_bad_input_mixed_into_load_loses_no_good_answer(server, test_split, served_threshold):
    data, logits = test_split
    items = make_items(data.images, LOAD_REQUESTS, spaced_thresholds(logits["little"]), seed=7)
    failed_before = metric(server, "littlebig_failed_requests_total")
    f = mixed_load(grpc_url(server), items, logits, served_threshold, concurrency=32)
    print(
        f"\nmixed load: {f.requests} requests in {f.seconds:.1f} s ({f.requests / f.seconds:.1f}/s) at concurrency 32; "
        f"good {f.good} ({f.good_rows} rows, {f.escalated_rows} escalated): lost {f.good_lost}, differing "
        f"{f.good_differing}; bad {f.bad} {f.bad_by_kind}: INVALID_ARGUMENT {f.bad_invalid_argument}, "
        f"unclear {f.bad_unclear}; client timeouts {f.timeouts}"
    )
    assert f.examples == [], f.examples
    assert (f.good_lost, f.good_differing, f.bad_unclear, f.timeouts) == (0, 0, 0, 0)
    assert (
        f.good > 0
        and f.bad > 0
        and set(f.bad_by_kind)
        == {
            "dtype",
            "shape",
            "channels",
            "oversize",
            "empty",
            "threshold",
        }
    )
    # Only the threshold errors come from the BLS model; Triton refuses the rest before it runs.
    assert metric(server, "littlebig_failed_requests_total") - failed_before == f.bad_by_kind["threshold"]
    assert server.is_ready() and HealthProbe(server.url).check() == {}


# --- big's failure policy, with big's stub killed mid-load ----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["error", "little"])
def test_big_dies_mid_load_answers_follow_the_policy(policy, build_dir, tmp_path, test_split):
    data, logits = test_split
    t = spaced_thresholds(logits["little"], (0.5,))[0]  # about half the rows escalate
    rng = np.random.default_rng(3)
    batches = [rng.choice(len(data), size=int(rng.integers(1, 17)), replace=False) for _ in range(120)]
    # big_instances=1: the test kills the one big stub (a second instance would keep answering)
    with own_server(build_dir, tmp_path, ServeOptions(on_big_failure=policy, big_instances=1)) as server:
        url = grpc_url(server)
        degraded_before = metric(server, "littlebig_degraded_rows_total")

        def one(rows):
            began = time.monotonic()
            try:
                return rows, infer(url, data.images[rows], t), None, time.monotonic() - began
            except InferenceServerException as exc:
                return rows, None, exc, time.monotonic() - began

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, rows) for rows in batches]
            futures[40].result()  # some answered before the kill
            killed = kill_stub(server, "big")
            results = [f.result() for f in futures]

        counts = {"ok": 0, "degraded": 0, "error naming big": 0, "timeout": 0, "other": 0}
        degraded_rows = 0
        for rows, res, err, _ in results:
            ref = offline_reference(logits, rows, t)
            if err is not None:
                kind = "timeout" if "DEADLINE" in str(err.status()) else "other"
                if "UNAVAILABLE" in str(err.status()) and "big" in err.message() and ref["escalated"].any():
                    kind = "error naming big"
                counts[kind] += 1
                continue
            esc, deg = res.as_numpy("ESCALATED").reshape(-1), res.as_numpy("DEGRADED").reshape(-1)
            label, probs = res.as_numpy("LABEL").reshape(-1), res.as_numpy("PROBS")
            assert np.array_equal(esc, ref["escalated"])
            if not deg.any():
                assert np.array_equal(label, ref["label"]) and np.abs(probs - ref["probs"]).max() <= 1e-5
                counts["ok"] += 1
                continue
            # Degraded rows: escalated ones, answered with little's own result.
            assert policy == "little" and not (deg & ~esc).any()
            little = softmax(logits["little"][rows])
            assert np.abs(probs[deg] - little[deg]).max() <= 1e-5
            assert np.array_equal(label[deg], little[deg].argmax(-1))
            counts["degraded"] += 1
            degraded_rows += int(deg.sum())

        degraded_metric = metric(server, "littlebig_degraded_rows_total") - degraded_before
        # What a real-inference health check sees now: is_model_ready still says yes.
        health = HealthProbe(server.url).check()
        client = grpcclient.InferenceServerClient(url)
        ready = client.is_model_ready("big")
        client.close()
        slowest = max(r[3] for r in results)
        print(
            f"\npolicy {policy}: big stub {killed} killed after 41 of {len(batches)} requests: {counts}, "
            f"{degraded_rows} degraded rows; slowest answer {slowest:.2f} s; "
            f"is_model_ready(big)={ready}; health check failures: {sorted(health)}"
        )
        assert counts["timeout"] == 0 and counts["other"] == 0 and slowest < CLIENT_TIMEOUT_S
        assert counts["ok"] > 0
        if policy == "error":
            assert counts["degraded"] == 0 and counts["error naming big"] > 0
        else:
            assert counts["error naming big"] == 0 and counts["degraded"] > 0
            assert degraded_metric == degraded_rows
        assert ready  # Triton's own readiness does not notice ...
        assert "big" in health and "littlebig" in health and "little" not in health  # ... a real inference does


# --- supervision: a dead stub is restarted ---------------------------------------------------------------


@pytest.mark.slow
def test_supervisor_restarts_the_server_when_bigs_stub_dies(build_dir, tmp_path, test_split):
    data, logits = test_split
    images = data.images[:8]
    # big_instances=1: the test kills the one big stub (a second instance would keep the probe passing)
    with own_server(build_dir, tmp_path, ServeOptions(big_instances=1)) as server:
        url = grpc_url(server)
        supervisor = Supervisor(server, interval=1.0, failures=1).start()
        try:
            old = kill_stub(server, "big")
            recovery = wait_for_answer(url, images, 90)
        finally:
            supervisor.stop()
        res = infer(url, images, 1.0)
        expected = offline_reference(logits, np.arange(8), 1.0)
        assert np.array_equal(res.as_numpy("LABEL").reshape(-1), expected["label"])
        print(
            f"\nsupervisor: big stub {old} killed; restarts {supervisor.restarts}; server restart took "
            f"{supervisor.recoveries}; first clean all-big answer {recovery:.1f} s after the kill"
        )
        assert supervisor.restarts == 1 and server.stub_pid("big") not in (None, old)
        assert HealthProbe(server.url).check() == {}


@pytest.mark.slow
def test_littlebig_serve_supervises_and_stops_cleanly(build_dir, tmp_path, test_split):
    """The CLI path: ``littlebig serve --health-interval 1`` restarts after big's stub is killed."""
    data, _ = test_split
    repo = tmp_path / "model_repository"
    # big_instances=1: the test kills the one big stub (a second instance would keep the probe passing)
    generate(build_dir, repo, "cpu", ServeOptions(big_instances=1))
    ports = Ports.free()
    cmd = [
        str(Path(sys.executable).parent / "littlebig"),
        "serve",
        f"--repository={repo}",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        f"--log-file={tmp_path / 'tritonserver.log'}",
        "--health-interval=1",
        "--health-failures=1",
    ]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    seen: set[int] = set()
    try:
        url = f"127.0.0.1:{ports.grpc}"
        wait_for_answer(url, data.images[:4], 120)
        (triton,) = children(serve.pid)
        stubs = children(triton)
        seen |= {triton, *stubs}
        big = next(p for p, argv in stubs.items() if Path(argv[1]).parent.parent.name == "big")
        os.kill(big, signal.SIGKILL)
        recovery = wait_for_answer(url, data.images[:4], 90)
        (new_triton,) = children(serve.pid)
        seen |= {new_triton, *children(new_triton)}
        assert new_triton != triton
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    text = log.read_text()
    print(f"\nlittlebig serve: clean all-big answer {recovery:.1f} s after big's stub was killed")
    assert "restarting tritonserver (restart 1)" in text and "tritonserver is back" in text
    time.sleep(1)
    assert not [p for p in seen if alive(p)], "littlebig serve left tritonserver processes behind"


# --- a hung big --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hung(build_dir, tmp_path_factory):
    """big sleeps 20 s per execution; littlebig's BLS timeout is 1 s."""
    with hung_server(build_dir, tmp_path_factory.mktemp("hung"), bls_timeout_ms=1000) as s:
        yield s


@pytest.mark.slow
def test_a_hung_big_never_hangs_a_client_that_sets_a_deadline(hung, test_split):
    """The client's deadline (0.4 s) is shorter than the server's BLS timeout (1 s): the client's own path fires."""
    data, _ = test_split
    seconds, outcome = timed(grpc_url(hung), data.images[:2], 1.0, timeout=0.4)
    print(f"\nhung big, client deadline 0.4 s: {outcome} after {seconds:.2f} s")
    assert "DEADLINE_EXCEEDED" in outcome and seconds >= 0.4  # gRPC's deadline status: the client's own path


@pytest.mark.slow
def test_the_bls_timeout_bounds_a_hung_big(hung, test_split):
    data, _ = test_split
    url = grpc_url(hung)
    with ThreadPoolExecutor(2) as pool:  # occupy both BLS instances with escalated requests
        escalated = list(pool.map(lambda _: timed(url, data.images[:2], 1.0, timeout=6), range(2)))
    little_only = timed(url, data.images[:2], 0.0, timeout=6)
    print(f"\nhung big, BLS timeout 1 s: escalated {escalated}; little-only {little_only}")
    # Each was answered before the client's own 6 s deadline (else its outcome would be DEADLINE_EXCEEDED): the
    # escalated ones by the BLS timeout's failure policy, naming big; the little-only one as usual.
    for _, outcome in escalated:
        assert "UNAVAILABLE" in outcome and "big" in outcome, outcome
    assert little_only[1] == "answered", little_only


# --- safe defaults -------------------------------------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP listener on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:
                if len(addr) == 32 and addr.startswith("0000000000000000FFFF0000"):
                    addr = addr[24:]  # IPv4-mapped IPv6 (::ffff:a.b.c.d)
                found.add(".".join(str(b) for b in reversed(bytes.fromhex(addr))) if len(addr) == 8 else addr)
    return found


def test_admin_apis_need_the_key_and_inference_does_not(server, test_split):
    data, _ = test_split
    for port in (server.ports.http, server.ports.grpc, server.ports.metrics):
        assert listening_addresses(port) == {"127.0.0.1"}
    for method, path in (("GET", "/v2/logging"), ("POST", "/v2/repository/index"), ("GET", "/v2/trace/setting")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(server.url + path, method=method, data=b"{}"), timeout=5)
        assert refused.value.code == 403 and ADMIN_HEADER in refused.value.read().decode()
    unlocked = urllib.request.Request(server.url + "/v2/logging", headers=server.admin_headers())
    assert "log_info" in json.loads(urllib.request.urlopen(unlocked, timeout=5).read())

    client = grpcclient.InferenceServerClient(grpc_url(server))
    try:
        for call in (client.get_log_settings, lambda **kw: client.unload_model("big", **kw)):
            with pytest.raises(InferenceServerException, match="restricted"):
                call()
        assert "log_info" in client.get_log_settings(headers=server.admin_headers("grpc"), as_json=True)["settings"]
        # Model control is off: even with the key, nothing can be unloaded.
        with pytest.raises(InferenceServerException):
            client.unload_model("big", headers=server.admin_headers("grpc"))
        assert client.is_model_ready("big")
    finally:
        client.close()
    assert infer(grpc_url(server), data.images[:3], 1.0).as_numpy("LABEL").shape == (3, 1)
    assert HealthProbe(server.url).check() == {}


@pytest.mark.slow
def test_oversize_requests_under_supervision(build_dir, tmp_path, test_split):
    """Triton 2.51 has no request-size limit: gRPC reads a whole 64 MiB message before refusing it; an
    HTTP body of 4 MiB or more crashes tritonserver with SIGSEGV (upstream #5840, fixed by PR #8411 after
    2.51). The test asserts exactly that, and that the supervisor brings the server back: should a newer
    Triton stop crashing, it fails, and RELIABILITY.md's mitigation advice must be revisited."""
    data, _ = test_split
    with own_server(build_dir, tmp_path) as server:
        url = grpc_url(server)
        supervisor = Supervisor(server, interval=1.0, failures=1).start()
        try:
            rows = 64 * 2**20 // data.images[0].nbytes
            huge = np.zeros((rows, *data.images.shape[1:]), np.uint8)
            seconds, outcome = timed(url, huge, 0.5, timeout=60)
            assert "INVALID_ARGUMENT" in outcome and "batch-size" in outcome and server.is_ready()
            body = bytes(4 * 2**20)
            head = json.dumps(
                {
                    "inputs": [
                        {
                            "name": "IMAGE",
                            "shape": [len(body) // data.images[0].nbytes, *data.images.shape[1:]],
                            "datatype": "UINT8",
                            "parameters": {"binary_data_size": len(body)},
                        }
                    ]
                }
            ).encode()
            crashing = server.process  # the supervisor replaces it on a restart
            request = urllib.request.Request(
                server.url + "/v2/models/littlebig/infer",
                data=head + body,
                headers={"Inference-Header-Content-Length": str(len(head))},
            )
            try:
                urllib.request.urlopen(request, timeout=30)
                http_outcome = "answered"
            except urllib.error.HTTPError as exc:
                http_outcome = f"HTTP {exc.code}"
            except OSError as exc:
                http_outcome = f"connection lost ({type(exc).__name__})"
            recovery = wait_for_answer(url, data.images[:4], 90)
        finally:
            supervisor.stop()
        print(
            f"\noversize: 64 MiB gRPC request refused in {seconds:.1f} s ({outcome[:60]}); 4 MiB HTTP request: "
            f"{http_outcome}; tritonserver exit code {crashing.returncode}; restarts {supervisor.restarts}; "
            f"clean answer {recovery:.1f} s later"
        )
        assert http_outcome.startswith("connection lost"), http_outcome  # no HTTP answer: the server died
        assert crashing.returncode == -signal.SIGSEGV  # the upstream crash, not a clean refusal
        assert supervisor.restarts == 1 and server.process is not crashing and server.process.poll() is None


@pytest.mark.slow
def test_a_dead_stub_under_traffic_is_restarted_before_the_first_scheduled_probe(build_dir, tmp_path, test_split):
    """big's stub killed while the server stays up, with traffic, and no scheduled probe for a minute: the
    failing requests trigger a probe, which finds the stub dead ("is not healthy") and restarts at once (no
    shutdown grace). Before, only the scheduled probes saw a dead stub, so recovery waited for them."""
    data, _ = test_split
    with own_server(build_dir, tmp_path, ServeOptions(big_instances=1, on_big_failure="little")) as server:
        url = grpc_url(server)
        supervisor = Supervisor(server, interval=60.0).start()
        try:
            time.sleep(1.5)  # the supervisor's first reading of the failure counters
            old = kill_stub(server, "big")
            recovery = wait_for_answer(url, data.images[:8], 45)  # its DEGRADED answers are the failing traffic
        finally:
            supervisor.stop()
        print(f"\ndead stub under traffic: restarts {supervisor.restarts}, clean {recovery:.1f} s after the kill")
        assert supervisor.restarts == 1 and server.stub_pid("big") not in (None, old)
        # measured 7.7-9.0 s (stub declared dead ~1 s, a probe, ~3.5 s start); the schedule alone: >= 60 s
        assert recovery < 20.0
