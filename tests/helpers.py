"""What several test files share: requests, counters, scrapes, configs and the servers they start.

Test modules import from here, never from each other or from conftest.py (which holds only fixtures), so a
helper has one definition and a test file can change without breaking another.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from littlebig.decision import cascade
from littlebig.metrics_text import Metrics, fetch
from littlebig.model_repository.generate import ServeOptions, generate
from littlebig.model_repository.server import SHM_DIR, Ports, TritonServer

CLIENT_TIMEOUT_S = 30.0
PERF_VENV = Path(os.environ.get("LITTLEBIG_PERF_VENV", ".venv-perf"))
needs_perf = pytest.mark.skipif(
    not (PERF_VENV / "bin" / "perf_analyzer").exists(),
    reason=f"{PERF_VENV}/bin/perf_analyzer is absent: run `make perf-analyzer` (make bench does)",
)


def offline_reference(logits: dict[str, np.ndarray], rows: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """What the served cascade must answer for ``rows`` at ``threshold``: the shared rule, offline."""
    return cascade(logits["little"][rows], logits["big"][rows], threshold)


def read_config(path: Path) -> mc.ModelConfig:
    """A generated model's config.pbtxt (``path`` is the model's folder)."""
    return text_format.Parse((path / "config.pbtxt").read_text(), mc.ModelConfig())


# --- requests --------------------------------------------------------------------------------------------


def grpc_url(server: TritonServer) -> str:
    return f"127.0.0.1:{server.ports.grpc}"


@contextlib.contextmanager
def _client(target: grpcclient.InferenceServerClient | str) -> Iterator[grpcclient.InferenceServerClient]:
    """``target`` itself, or a client on the ``host:port`` it names, closed after."""
    if not isinstance(target, str):
        yield target
        return
    client = grpcclient.InferenceServerClient(target)
    try:
        yield client
    finally:
        client.close()


def infer(
    target: grpcclient.InferenceServerClient | str,
    images: np.ndarray,
    threshold=None,
    model: str = "littlebig",
    outputs=None,
    parameters: dict | None = None,
    timeout: float | None = CLIENT_TIMEOUT_S,
):
    """One gRPC request of uint8 images to ``model`` (a client, or a gRPC ``host:port``); ``parameters``: other
    request parameters (e.g. deadline_ms) beside ``threshold``."""
    inp = grpcclient.InferInput("IMAGE", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    params = {**(parameters or {}), **({} if threshold is None else {"threshold": threshold})}
    with _client(target) as client:
        return client.infer(model, [inp], parameters=params or None, outputs=outputs, client_timeout=timeout)


def reasons(result) -> np.ndarray:
    """The REASON output as strings, one per row."""
    return np.array([r.decode() for r in result.as_numpy("REASON").reshape(-1)])


def rows_of(target: grpcclient.InferenceServerClient | str, model: str) -> int:
    """Rows this model has inferred so far (Triton counts rows in inference_count)."""
    with _client(target) as client:
        return client.get_inference_statistics(model).model_stats[0].inference_count


def timed(url: str, images: np.ndarray, threshold: float, timeout: float) -> tuple[float, str]:
    """Seconds one request took, and "answered" or its error status and message."""
    began = time.monotonic()
    try:
        infer(url, images, threshold, timeout=timeout)
        outcome = "answered"
    except InferenceServerException as exc:
        outcome = f"{exc.status()}: {exc.message()[:120]}"
    return time.monotonic() - began, outcome


def wait_for_answer(url: str, images: np.ndarray, limit: float) -> float:
    """Seconds until an all-big request (threshold 1) through littlebig answers cleanly."""
    began = time.monotonic()
    while time.monotonic() - began < limit:
        try:
            res = infer(url, images, 1.0, timeout=5)
            if not res.as_numpy("DEGRADED").any():
                return time.monotonic() - began
        except InferenceServerException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no clean answer within {limit} s")


# --- the metrics port ------------------------------------------------------------------------------------


def scrape(server: TritonServer) -> Metrics:
    """Everything on the server's metrics port, parsed (littlebig.metrics_text)."""
    return fetch(f"http://127.0.0.1:{server.ports.metrics}")


def metric(server: TritonServer, name: str) -> float:
    """Sum of one metric's samples on the metrics port."""
    return scrape(server).total(name)


def metric_sums(server: TritonServer, names: tuple[str, ...]) -> dict[str, float]:
    """Each metric's samples summed, from one scrape."""
    metrics = scrape(server)
    return {name: metrics.total(name) for name in names}


# --- servers of their own --------------------------------------------------------------------------------


def start_server(repository: Path, log_dir: Path) -> TritonServer:
    return TritonServer(repository, Ports.free(), log_file=log_dir / "tritonserver.log").start()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes; its parent reaps it.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


@contextlib.contextmanager
def own_server(
    build: Path, work: Path, opts: ServeOptions | None = None, edit: Callable[[Path], None] | None = None
) -> Iterator[TritonServer]:
    """A fresh server on its own repository; on exit none of its processes or /dev/shm regions remain."""
    repo = work / "model_repository"
    generate(build, repo, "cpu", opts or ServeOptions())
    if edit is not None:
        edit(repo)
    server = TritonServer(repo, Ports.free(), log_file=work / "tritonserver.log").start()
    pids, regions = set(server.processes()), set(server._shm_regions)
    try:
        yield server
    finally:
        server.stop(timeout=5)  # a dead stub's model never unloads: do not wait Triton's 30 s exit timeout
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "tritonserver or a stub outlived its server"
    assert not [r for r in regions if (SHM_DIR / r).exists()], "shared-memory regions left in /dev/shm"


def kill_stub(server: TritonServer, model: str) -> int:
    pid = server.stub_pid(model)
    assert pid is not None, f"no stub process for {model}"
    os.kill(pid, signal.SIGKILL)
    return pid


HANG_MODEL = '''"""big that sleeps: what does the BLS timeout cover?"""
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.sleep_s = float(config["parameters"]["hang_s"]["string_value"])
        self.classes = config["output"][0]["dims"][0]

    def execute(self, requests):
        time.sleep(self.sleep_s)
        rows = [pb_utils.get_input_tensor_by_name(r, "IMAGE").as_numpy().shape[0] for r in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor("LOGITS", np.zeros((n, self.classes), np.float32))])
                for n in rows]
'''


def hang_big(seconds: float) -> Callable[[Path], None]:
    """A repository edit: big sleeps ``seconds`` per execution."""

    def edit(repo: Path) -> None:
        (repo / "big" / "1" / "model.py").write_text(HANG_MODEL)
        config = repo / "big" / "config.pbtxt"
        config.write_text(
            config.read_text() + f'\nparameters {{ key: "hang_s" value {{ string_value: "{seconds}" }} }}\n'
        )

    return edit


def hung_server(build: Path, work: Path, bls_timeout_ms: int) -> contextlib.AbstractContextManager[TritonServer]:
    """A server whose big sleeps 20 s per execution, far beyond littlebig's BLS timeout."""
    return own_server(build, work, ServeOptions(bls_timeout_ms=bls_timeout_ms), hang_big(20))
