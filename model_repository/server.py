"""Launch the real embedded tritonserver 2.51 that nvidia-pytriton ships (its binary, by path: none is on PATH).

The binary is not on PATH: it is found inside the installed ``pytriton`` package. The Python backend
needs the stub built for this interpreter copied into ``backends/python``; the stub imports numpy and
onnxruntime from this environment (its ``bin`` first on PATH) and links the libpython that matches.

Safe defaults: every endpoint binds to loopback, model control is off, and the state-changing APIs
(``RESTRICTED_APIS``) need an admin header on HTTP and gRPC. ``Supervisor`` restarts the server when a
real inference through little, big or littlebig fails: Triton never restarts a dead Python stub and
keeps reporting the model ready (RELIABILITY.md).

Nothing outlives its launcher: tritonserver gets SIGTERM from the kernel when the process that started it
dies, however it dies (``launch``), and ``StopSignals`` makes a launcher stop cleanly on any number of
SIGINT/SIGTERM/SIGHUP, from whoever sends them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from littlebig.metrics_text import fetch
from littlebig.model_repository.health import HealthProbe  # the one health check (health.py says why)

LOOPBACK = "127.0.0.1"
#: APIs that change server state or expose its internals; inference, health, metadata, model-config
#: and statistics stay open. Triton 2.51 syntax: ``--http-restricted-api=<apis>:<key>=<value>``.
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_HEADER = "admin-key"
#: Triton prefixes the restricted-protocol header on gRPC (its error message names the full key).
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
ADMIN_KEY_ENV = "LITTLEBIG_ADMIN_KEY"
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"
#: What tritonserver gets when its launcher dies: TERM is its clean shutdown (stubs and their shared memory
#: go too; Triton's own exit timeout bounds it).
DEATH_SIGNAL = signal.SIGTERM

log = logging.getLogger("littlebig.server")


class ServerError(RuntimeError):
    """tritonserver is missing, exited, or did not become ready."""


def triton_home() -> Path:
    """pytriton's bundled tritonserver tree (bin/, backends/, python_backend_stubs/)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed: pip install 'littlebig[serve]' (or make setup)")
    home = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (home / "bin" / "tritonserver").exists():
        raise ServerError(f"{home}/bin/tritonserver not found in the nvidia-pytriton install")
    return home


def ensure_python_stub(home: Path) -> Path:
    """Copy the stub for this Python into backends/python (in place, so its RPATH keeps working)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = home / "backends" / "python" / "triton_python_backend_stub"
    source = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not source.exists():
        raise ServerError(f"nvidia-pytriton ships no Python-backend stub for Python {version}")
    if not target.exists() or target.stat().st_size != source.stat().st_size:
        shutil.copy2(source, target)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class StopSignals:
    """A stop flag that SIGINT, SIGTERM and SIGHUP set: safe however many arrive, whenever they arrive.

    Why not ``threading.Event.set`` in the handler: a Python signal handler runs between any two
    bytecodes of the main thread, inside an earlier handler too. ``make`` forwards the TERM its process
    group just got, so the second TERM landed while the first handler held the Event's lock, and the main
    thread waited on itself forever. This handler takes no lock: it stores the signal number and writes a
    byte to a pipe that ``wait`` selects on. It quacks like the Event ``Supervisor.run`` takes.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)) -> None:
        self.signum: int | None = None
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:  # the pipe is full: a wake-up is pending anyway
            pass

    def wait(self, timeout: float | None = None) -> bool:
        """True once a signal came; else after ``timeout`` s, False. A signal wakes it at once."""
        if self.signum is None:
            select.select([self._read], [], [], timeout)
        return self.signum is not None


_launcher: ThreadPoolExecutor | None = None
_launcher_lock = threading.Lock()


def launch(command: list[str], **popen: object) -> subprocess.Popen:
    """``Popen(command)`` for a child that must not outlive this process (SIGKILL of it included).

    util-linux's ``setpriv --pdeathsig`` sets PR_SET_PDEATHSIG and execs the command: no Python runs in the
    forked child (a ``preexec_fn`` doing the same spun forever in a child of a process with gRPC threads).
    The kernel sends the signal when the *thread* that forked the child exits, so the fork runs on the main
    thread or on one launcher thread that lives as long as the process: a Supervisor restarting the server
    from its own thread would otherwise take the server down when it stops.
    """
    setpriv = shutil.which("setpriv")
    if setpriv:
        command = [setpriv, f"--pdeathsig={DEATH_SIGNAL.name}", "--", *command]
    else:
        log.warning("setpriv (util-linux) not found: %s will outlive a killed launcher", Path(command[0]).name)
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(command, **popen)
    global _launcher
    with _launcher_lock:
        if _launcher is None:
            _launcher = ThreadPoolExecutor(1, thread_name_prefix="littlebig-launcher")
    return _launcher.submit(subprocess.Popen, command, **popen).result()


@dataclass
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port())


def admin_key_from_env() -> str:
    """``$LITTLEBIG_ADMIN_KEY``, else a random key for this run (so the admin APIs are never open)."""
    return os.environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(24)


def children(pid: int) -> dict[int, list[str]]:
    """Direct child processes of ``pid`` (the Python-backend stubs of a tritonserver) and their argv."""
    import psutil

    found = {}
    try:
        kids = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return found
    for child in kids:
        try:
            found[child.pid] = child.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 once it is gone)."""
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.NoSuchProcess:
        return 0


@dataclass
class TritonServer:
    """One tritonserver process on a model repository; a context manager that always stops it."""

    repository: Path
    ports: Ports = field(default_factory=Ports)
    address: str = LOOPBACK
    log_file: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    admin_key: str = field(default_factory=admin_key_from_env, repr=False)
    restricted_apis: tuple[str, ...] = RESTRICTED_APIS
    _shm_regions: set[str] = field(default_factory=set, repr=False)

    def command(self) -> list[str]:
        home = triton_home()
        return [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--backend-directory={home / 'backends'}",
            "--model-control-mode=none",
            "--strict-readiness=true",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            f"--http-address={self.address}",
            f"--grpc-address={self.address}",
            f"--metrics-address={self.address}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            *self.restriction_args(),
            *self.extra_args,
        ]

    def restriction_args(self) -> list[str]:
        """The admin-key flags (the key is visible in /proc/<pid>/cmdline to local users of this host)."""
        if not self.restricted_apis:
            return []
        rule = f"{','.join(self.restricted_apis)}:{ADMIN_HEADER}={self.admin_key}"
        return [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]

    def admin_headers(self, protocol: str = "http") -> dict[str, str]:
        """Headers that unlock the restricted APIs: pass as ``headers=`` to tritonclient or urllib."""
        prefix = GRPC_HEADER_PREFIX if protocol == "grpc" else ""
        return {f"{prefix}{ADMIN_HEADER}": self.admin_key}

    def processes(self) -> dict[int, list[str]]:
        """tritonserver and its stub processes, pid -> argv (empty when not running)."""
        if self.process is None or self.process.poll() is not None:
            return {}
        found = children(self.process.pid)
        found[self.process.pid] = self.command()  # what runs (process.args starts with setpriv)
        return found

    def stub_pid(self, model: str) -> int | None:
        """pid of a model's (first) Python-backend stub: its argv names ``<repository>/<model>/``."""
        for pid, argv in sorted(children(self.process.pid).items()) if self.process else []:
            # argv[1] is <repository>/<model>/<version>/model.py
            if "triton_python_backend_stub" in argv[0] and len(argv) > 1 and Path(argv[1]).parent.parent.name == model:
                return pid
        return None

    def frozen_stubs(self) -> list[int]:
        """Stub processes that are stopped (SIGSTOP, a debugger): state T or t in /proc/<pid>/stat."""
        frozen = []
        for pid, argv in self.processes().items():
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if argv and "triton_python_backend_stub" in argv[0] and state in ("T", "t"):  # a zombie has no argv
                frozen.append(pid)
        return frozen

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its stubs."""
        return sum(rss_bytes(pid) for pid in self.processes())

    def _remember_shm(self) -> None:
        for argv in self.processes().values():
            self._shm_regions.update(a for a in argv if a.startswith(SHM_PREFIX))

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
        return env

    def start(self, timeout: float = 120.0) -> TritonServer:
        ensure_python_stub(triton_home())
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        # Own process group: stop() reaches the Python stubs too, even if tritonserver dies first; a
        # terminal's Ctrl-C reaches only the launcher, which stops it cleanly. launch(): it dies with us.
        self.process = launch(
            self.command(), env=self.environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        if log is not subprocess.DEVNULL:
            log.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.ports.http}"

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode}"
                    + (f"; see {self.log_file}" if self.log_file else "")
                )
            if self.is_ready():
                self._remember_shm()
                return
            time.sleep(0.2)
        raise ServerError(
            f"tritonserver not ready after {timeout:.0f} s" + (f"; see {self.log_file}" if self.log_file else "")
        )

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Triton's clean shutdown), then SIGKILL the whole process group if it lingers.

        A model whose stub died never unloads, so a clean shutdown then waits Triton's whole exit
        timeout (30 s); after a kill the stubs' shared-memory regions stay in /dev/shm: remove them.
        """
        if self.process is None:
            return
        self._remember_shm()
        pgid = self.process.pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None
        for name in self._shm_regions:
            (SHM_DIR / name).unlink(missing_ok=True)
        self._shm_regions.clear()

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class SupervisorGaveUp(RuntimeError):
    """The server kept failing after ``max_restarts`` restarts."""


@dataclass
class Supervisor:
    """Restart tritonserver when it exits or when ``failures`` probes in a row fail.

    Triton does not restart a dead Python stub, and a hung one holds every BLS instance that waits
    on it: a restart is the recovery for both. Restarts reuse the same ports and admin key.

    A probe runs every ``interval`` s; ``failures`` failed probes in a row restart the server. A probe also
    runs when traffic shows failures (every second the metrics port is read: a rise in Triton's failed
    requests of any model, or in the cascade's DEGRADED rows or failed requests, at most one probe per
    ``trigger_gap`` s). A probe that finds a Python stub dead (python_backend's "Stub process ... is not
    healthy", r24.10 src/python_be.cc:1060, src/stub_launcher.cc:773; Triton never restarts it) restarts
    the server at once, with no shutdown grace, unless a stub is frozen (``frozen_stubs``).

    Why: a big stub declared dead while the server stays up (one outcome of a stalled stub,
    RELIABILITY.md "Stalls") failed every escalation, but only the scheduled probes saw it (2 failures,
    10 s apart), and the restart then waited out the 5 s grace: 10-25 s late. A slow or stalled model is
    not proof of death: its failed probes count toward ``failures`` on the schedule only, as before.
    """

    #: Counters whose rise means requests are failing now.
    FAILURE_COUNTERS = (
        "nv_inference_request_failure",
        "littlebig_degraded_rows_total",
        "littlebig_failed_requests_total",
    )
    #: python_backend's message for a stub it has declared dead.
    DEAD_STUB = "is not healthy"

    server: TritonServer
    interval: float = 10.0
    trigger_gap: float = 2.0
    probe_timeout: float = 10.0
    failures: int = 2
    max_restarts: int = 10
    stop_grace: float = 5.0
    ready_timeout: float = 120.0
    restarts: int = 0
    recoveries: list[float] = field(default_factory=list)  # seconds from detection to ready, per restart
    _streak: int = 0
    _failures_seen: float | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def probe(self) -> HealthProbe:
        return HealthProbe(self.server.url, timeout=self.probe_timeout)

    def step(self, triggered: bool = False) -> bool:
        """One health check, restarting when it calls for it; True when the server answered.

        ``triggered``: run because traffic failed, not on the schedule; only a dead stub restarts then.
        """
        process = self.server.process
        if process is not None and process.poll() is not None:
            self._restart(f"tritonserver exited with code {process.returncode}")
            return False
        failed = self.probe().check()
        if not failed:
            self._streak = 0
            return True
        dead = {m: why for m, why in failed.items() if self.DEAD_STUB in why}
        # A frozen stub (SIGSTOP) is declared dead too, but while it is frozen the cascade serves by its failure
        # policy; restarting would fail everyone meanwhile. Its resume aborts the server (restart on exit) or
        # leaves it declared dead and running: then it is restarted here.
        if dead and not self.server.frozen_stubs():
            # its model can never unload, so a clean shutdown would only wait out the grace: kill at once
            self._restart(f"a Python stub is dead (Triton never restarts one): {dead}", grace=0.0)
            return False
        if triggered:
            log.warning("health check after failing traffic failed (not counted: no dead stub): %s", failed)
            return False
        self._streak += 1
        log.warning("health check failed (%d/%d): %s", self._streak, self.failures, failed)
        if self._streak >= self.failures:
            self._restart(f"health check failed {self._streak} times: {failed}")
        return False

    def _restart(self, why: str, grace: float | None = None) -> None:
        if self.restarts >= self.max_restarts:
            raise SupervisorGaveUp(f"giving up after {self.restarts} restarts; last failure: {why}")
        self.restarts += 1
        log.error("restarting tritonserver (restart %d): %s", self.restarts, why)
        began = time.monotonic()
        self.server.stop(timeout=self.stop_grace if grace is None else grace)
        try:
            self.server.start(timeout=self.ready_timeout)
        except ServerError as exc:
            log.error("restart %d failed: %s", self.restarts, exc)
            return
        self._streak = 0
        self.recoveries.append(time.monotonic() - began)
        log.warning("tritonserver is back after %.1f s (restart %d)", self.recoveries[-1], self.restarts)

    def failing_now(self) -> bool:
        """True when a failure counter rose since the last call (False the first time, or when unreadable)."""
        try:
            metrics = fetch(f"http://{self.server.address}:{self.server.ports.metrics}/metrics", timeout=2)
        except (OSError, ValueError):
            return False
        total = sum(metrics.total(name) for name in self.FAILURE_COUNTERS if name in metrics)
        rose = self._failures_seen is not None and total > self._failures_seen
        self._failures_seen = total
        return rose

    def run(self, stop: threading.Event | StopSignals) -> None:
        """Every second: the process and the failure counters; a probe every ``interval`` s, or when a failure
        counter rose (at most one per ``trigger_gap`` s); until ``stop`` is set."""
        now = time.monotonic()
        next_probe, next_trigger = now + self.interval, now
        while not stop.wait(min(1.0, self.interval)):
            process = self.server.process
            now = time.monotonic()
            if process is None or process.poll() is not None or now >= next_probe:
                self.step()
                next_probe = time.monotonic() + self.interval
            elif self.failing_now() and now >= next_trigger:
                self.step(triggered=True)
                next_trigger = time.monotonic() + self.trigger_gap
            else:
                continue
            self._failures_seen = None  # a restart resets Triton's counters: count from the next reading

    def start(self) -> Supervisor:
        """Supervise in a background thread (tests; ``littlebig serve`` calls ``run`` itself)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name="littlebig-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
