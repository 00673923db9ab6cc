"""Faults of big under concurrent load, on the real tritonserver: a stalled big stub
(SIGSTOP, then SIGCONT) and a big slower than the BLS timeout.

Each test starts its own server and load, prints its figures (``pytest -s``; RELIABILITY.md quotes
them) and asserts the contract: escalated rows are answered in time by the failure policy, little-only
requests stay fast, and after a stall the server answers normally again within 10 s.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from littlebig.model_repository.generate import ServeOptions
from littlebig.model_repository.server import Supervisor
from tests.helpers import grpc_url, hang_big, infer, own_server, rows_of, timed, wait_for_answer
from tests.soak import spaced_thresholds

pytestmark = pytest.mark.slow  # each test starts its own server and loads it for 10-20 s

CLIENTS = 8
BATCH = 4


@dataclass
class Answer:
    sent: float
    seconds: float
    escalated: int = 0
    degraded: int = 0
    error: str = ""


@dataclass
class Load:
    """``CLIENTS`` threads sending ``BATCH`` real images at ``threshold``, plus one little-only client."""

    url: str
    images: np.ndarray
    threshold: float
    answers: list[Answer] = field(default_factory=list)
    little_only: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _client(self, seed: int, threshold: float, out: list[Answer]) -> None:
        rng = np.random.default_rng(seed)
        client = grpcclient.InferenceServerClient(self.url)
        try:
            while not self.stop.is_set():
                rows = self.images[rng.integers(0, len(self.images), BATCH)]
                inp = grpcclient.InferInput("IMAGE", list(rows.shape), "UINT8")
                inp.set_data_from_numpy(rows)
                began = time.monotonic()
                try:
                    res = client.infer("littlebig", [inp], parameters={"threshold": threshold}, client_timeout=15)
                    out.append(
                        Answer(
                            began,
                            time.monotonic() - began,
                            int(res.as_numpy("ESCALATED").sum()),
                            int(res.as_numpy("DEGRADED").sum()),
                        )
                    )
                except InferenceServerException as exc:
                    out.append(Answer(began, time.monotonic() - began, error=f"{exc.status()}: {exc.message()}"))
                    time.sleep(0.05)  # a dead server refuses at once: don't spin
        finally:
            client.close()

    def __enter__(self) -> Load:
        self.threads = [
            threading.Thread(target=self._client, args=(k, self.threshold, self.answers)) for k in range(CLIENTS)
        ] + [threading.Thread(target=self._client, args=(99, 0.0, self.little_only))]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def window(answers: list[Answer], start: float, stop: float) -> list[Answer]:
    return [a for a in answers if start <= a.sent < stop]


def p95(answers: list[Answer]) -> float:
    return float(np.percentile([a.seconds for a in answers], 95))


def test_a_stalled_big_answers_by_policy_and_the_server_answers_again_after(build_dir, tmp_path, test_split):
    """big's stub frozen 6 s mid-load (SIGSTOP), then resumed: the 2.51 Python backend may abort the
    server on resume (RELIABILITY.md, "Stalls": an upstream bug); the supervisor, with its production
    settings, is the last line of defence. The contract holds either way."""
    data, logits = test_split
    t = spaced_thresholds(logits["little"], (0.5,))[0]  # about half the rows escalate
    # big_instances=1: the test stops the one big stub (a second instance would keep answering)
    opts = ServeOptions(on_big_failure="little", bls_timeout_ms=1000, big_instances=1)
    with own_server(build_dir, tmp_path, opts) as server:
        supervisor = Supervisor(server).start()  # production settings: probe every 10 s, restart on exit
        try:
            with Load(grpc_url(server), data.images, t) as load:
                time.sleep(3)
                big = server.stub_pid("big")
                stopped = time.monotonic()
                os.kill(big, signal.SIGSTOP)
                time.sleep(6)
                os.kill(big, signal.SIGCONT)
                resumed = time.monotonic()
                recovery = wait_for_answer(grpc_url(server), data.images[:BATCH], 10)  # all rows to big, clean
                time.sleep(2)
            restarts = supervisor.restarts
        finally:
            supervisor.stop()
    stall = window(load.answers, stopped + 1.5, resumed)  # after the in-flight call's own timeout
    stall_little = window(load.little_only, stopped + 1.5, resumed)
    before = window(load.answers, 0, stopped)
    escalating = [a for a in stall if a.escalated]
    print(
        f"\nstall 6 s: before {len(before)} answers (p95 {p95(before) * 1000:.0f} ms); during: {len(stall)} answers, "
        f"{sum(a.degraded for a in stall)} rows DEGRADED, {sum(bool(a.error) for a in stall)} errors, escalating "
        f"p95 {p95(escalating) * 1000:.0f} ms max {max(a.seconds for a in escalating) * 1000:.0f} ms; little-only "
        f"p95 {p95(stall_little) * 1000:.0f} ms; after resume: server restarts {restarts}, clean all-big answer "
        f"{recovery:.1f} s after SIGCONT"
    )
    assert before and not any(a.error for a in before)
    # During the stall: escalated rows answered by policy (DEGRADED), in time; nothing fails.
    assert escalating and not any(a.error for a in stall) and all(a.degraded == a.escalated for a in escalating)
    assert max(a.seconds for a in escalating) < 3.0
    assert stall_little and p95(stall_little) < 0.5 and not any(a.error for a in stall_little)
    assert recovery < 10.0


def test_a_big_slower_than_the_timeout_costs_no_capacity_on_abandoned_work(build_dir, tmp_path, test_split):
    """big takes 1.5 s per batch, the BLS timeout is 0.5 s, every row escalates (T = 1), 8 clients."""
    data, _ = test_split
    opts = ServeOptions(on_big_failure="little", bls_timeout_ms=500)
    with own_server(build_dir, tmp_path, opts, hang_big(1.5)) as server:
        rows_before = rows_of(grpc_url(server), "big")
        with Load(grpc_url(server), data.images, 1.0) as load:
            time.sleep(8)
        time.sleep(3)  # let the last overdue call finish
        big_rows = rows_of(grpc_url(server), "big") - rows_before
    answers, little_only = load.answers[CLIENTS:], load.little_only  # skip each client's first (warm-up)
    escalated = sum(a.escalated for a in answers)
    answered_by_big = sum(a.escalated - a.degraded for a in answers)
    print(
        f"\nslow big (1.5 s > 0.5 s timeout), {CLIENTS} clients x {BATCH} rows, T=1: {len(answers)} answers, "
        f"{sum(bool(a.error) for a in answers)} errors, p95 {p95(answers) * 1000:.0f} ms, max "
        f"{max(a.seconds for a in answers) * 1000:.0f} ms; {escalated} rows escalated, big executed {big_rows} "
        f"rows ({big_rows / max(escalated, 1):.1%}), {answered_by_big} answered by big; little-only p95 "
        f"{p95(little_only) * 1000:.0f} ms"
    )
    # No error at all: big's failure never reaches a client under this policy, and little runs inside the BLS
    # model (the cpu default), so no call to little can time out. The rare "little timed out" of earlier runs
    # came from little as a Triton model: the first BLS calls to it after the load, in the first ~0.6 s of the
    # burst, took over the 0.5 s timeout (RELIABILITY.md, "Stalls and slow models").
    errors = [a.error for a in answers + little_only if a.error]
    assert answers and not errors, errors[:3]
    assert max(a.seconds for a in answers) < 1.5  # at most one wait for the timeout, plus queueing
    # Once big is known to be slow, nobody waits on it: escalated rows and little-only ones answer fast.
    assert p95(answers) < 0.25 and p95(little_only) < 0.25
    # Work nobody waits for is neither queued up nor run: big ran a small fraction of the escalated rows.
    assert big_rows <= 0.25 * escalated


WRONG_WIDTH_LITTLE = '''"""little that answers with one class too many: a bug the cascade did not expect."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.classes = json.loads(args["model_config"])["output"][0]["dims"][0]

    def execute(self, requests):
        rows = [pb_utils.get_input_tensor_by_name(r, "IMAGE").as_numpy().shape[0] for r in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor("LOGITS", np.zeros((n, self.classes + 1), np.float32))])
                for n in rows]
'''


def test_an_unexpected_exception_costs_its_requests_an_error_not_the_batch(build_dir, tmp_path, test_split):
    """An exception the BLS code did not foresee: each request gets its own INTERNAL error naming it,
    the traceback is in the server log, and the server keeps serving."""
    data, _ = test_split

    def edit(repo):
        (repo / "little" / "1" / "model.py").write_text(WRONG_WIDTH_LITTLE)

    # little as a Triton model: the BLS model must call the broken one (in process it would run the good ONNX)
    with own_server(build_dir, tmp_path, ServeOptions(little_in_process=False), edit) as server:
        url = grpc_url(server)
        errors = []
        with ThreadPoolExecutor(4) as pool:
            for outcome in pool.map(lambda k: timed(url, data.images[k : k + 3], 0.5, timeout=10), range(8)):
                errors.append(outcome[1])
        direct = infer(url, data.images[:2], model="little").as_numpy("LOGITS")
        log = (tmp_path / "tritonserver.log").read_text()
    print(f"\nunexpected exception: {errors[0]}")
    assert all(e.startswith("StatusCode.INTERNAL") and "littlebig internal error (ValueError" in e for e in errors)
    assert "Traceback (most recent call last)" in log and "unexpected error in execute" in log
    assert direct.shape == (2, 11)  # the server itself kept serving
