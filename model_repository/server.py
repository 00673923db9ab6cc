"""Launch the real embedded tritonserver 2.51 that nvidia-pytriton ships (see ../shared/FACTS.md).

The binary is not on PATH: it is found inside the installed ``pytriton`` package. The Python backend
needs the stub built for this interpreter copied into ``backends/python``; the stub imports numpy and
onnxruntime from this environment (its ``bin`` first on PATH) and links the libpython that matches.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


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


@dataclass
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port())


@dataclass
class TritonServer:
    """One tritonserver process on a model repository; a context manager that always stops it."""

    repository: Path
    ports: Ports = field(default_factory=Ports)
    address: str = LOOPBACK
    log_file: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

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
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
        return env

    def start(self, timeout: float = 120.0) -> TritonServer:
        ensure_python_stub(triton_home())
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        # Own process group: stop() reaches the Python stubs too, even if tritonserver dies first.
        self.process = subprocess.Popen(
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
                return
            time.sleep(0.2)
        raise ServerError(
            f"tritonserver not ready after {timeout:.0f} s" + (f"; see {self.log_file}" if self.log_file else "")
        )

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Triton's clean shutdown), then SIGKILL the whole process group if it lingers."""
        if self.process is None:
            return
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

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
