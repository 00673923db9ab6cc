"""`make serve` stops on SIGTERM every time, and a killed launcher never leaves its tritonserver behind.

Done as a process manager does it: `make serve` in a process group of its own on free ports, wait for
``/v2/health/ready``, signal the whole group. make forwards the TERM it gets to `littlebig serve`, so the
launcher gets two TERMs at once: before the fix its handler deadlocked on itself in about 1 run of 3.
The fast tier runs one trial; `make test-all` runs ten in a row.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from littlebig.model_repository.server import SHM_DIR, SHM_PREFIX, Ports, children

ROOT = Path(__file__).resolve().parent.parent
TRIALS = 10


def make_serve(build_dir: Path, ports: Ports, log: Path) -> subprocess.Popen:
    """`make serve` (this venv, this build) in its own session and process group, output to ``log``."""
    env = {
        **os.environ,
        "HTTP_PORT": str(ports.http),
        "GRPC_PORT": str(ports.grpc),
        "METRICS_PORT": str(ports.metrics),
    }
    args = ["make", "--no-print-directory", "serve", f"VENV={sys.prefix}", f"BUILD={build_dir.resolve()}"]
    with open(log, "w") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(make: subprocess.Popen, ports: Ports, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert make.poll() is None, f"make serve exited with {make.returncode}:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout} s:\n{log.read_text()}")


def served_processes(ports: Ports) -> dict[int, list[str]]:
    """The tritonserver on these ports and its Python-backend stubs, pid -> argv, found in /proc."""
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        try:
            argv = [a.decode() for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except (OSError, ValueError):
            continue
        if argv and argv[0].endswith("/tritonserver") and f"--http-port={ports.http}" in argv:
            found[int(entry.name)] = argv
            found.update(children(int(entry.name)))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie or a recycled pid of another program counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def shm_regions(served: dict[int, list[str]]) -> list[Path]:
    """The stubs' shared-memory files (a clean Triton shutdown removes them)."""
    return [SHM_DIR / a for argv in served.values() for a in argv if a.startswith(SHM_PREFIX)]


def assert_all_gone(served: dict[int, list[str]], ports: Ports, timeout: float) -> float:
    """Wait for every process, listening port and shared-memory region to go; the seconds it took."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if not any(alive(p) for p in served) and not any(listening(p) for p in vars(ports).values()):
            break
        time.sleep(0.1)
    left = {p: argv[0] for p, argv in served.items() if alive(p)}
    held = [p for p in vars(ports).values() if listening(p)]
    assert not left and not held, f"after {timeout} s still running: {left}; ports still listening: {held}"
    assert not [f for f in shm_regions(served) if f.exists()], "shared memory left in /dev/shm"
    return time.monotonic() - began


def clean_up(make: subprocess.Popen, served: dict[int, list[str]]) -> None:
    """After a failure: nothing of this test may stay behind for the next one."""
    if make.poll() is None:
        os.killpg(make.pid, signal.SIGKILL)
        make.wait()
    for pid in served:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    for region in shm_regions(served):
        region.unlink(missing_ok=True)


@pytest.mark.parametrize("trial", [0, *(pytest.param(t, marks=pytest.mark.slow) for t in range(1, TRIALS))])
def test_sigterm_to_make_serves_group_stops_everything(build_dir, tmp_path, trial):
    ports, log = Ports.free(), tmp_path / "serve.log"
    make, served = make_serve(build_dir, ports, log), {}
    try:
        wait_ready(make, ports, log)
        served = served_processes(ports)
        assert sum("triton_python_backend_stub" in argv[0] for argv in served.values()) >= 3, served
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(timeout=25)  # the bound; a clean stop takes ~4-6 s
        out = log.read_text()
        assert "stopping tritonserver" in out, out
        assert_all_gone(served, ports, timeout=5)
    finally:
        clean_up(make, served)


def test_a_killed_launcher_takes_its_tritonserver_with_it(build_dir, tmp_path):
    """SIGKILL of make serve's whole group: tritonserver (in its own session) gets TERM from the kernel."""
    ports, log = Ports.free(), tmp_path / "serve.log"
    make, served = make_serve(build_dir, ports, log), {}
    try:
        wait_ready(make, ports, log)
        served = served_processes(ports)
        assert served, "no tritonserver found for these ports"
        os.killpg(make.pid, signal.SIGKILL)
        make.wait(timeout=10)
        assert_all_gone(served, ports, timeout=20)
    finally:
        clean_up(make, served)
