"""perf_analyzer from its own venv, fed real images, one measured point per call.

perf_analyzer's default random input is generated once and reused for every request, so a cascade
would escalate every request the same way. ``--input-data`` takes a JSON file with one entry per
batch-1 sample (``-b N`` sends N consecutive entries), so the benchmark images are written there.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import numpy as np

INPUT_NAME = "IMAGE"
#: Columns of perf_analyzer's ``-f`` CSV (latencies in microseconds) that the bench keeps.
CSV_COLUMNS = {
    "Inferences/Second": "throughput",
    "p50 latency": "p50_us",
    "p90 latency": "p90_us",
    "p95 latency": "p95_us",
    "p99 latency": "p99_us",
    "Avg latency": "avg_us",
    "Server Queue": "server_queue_us",
    "Server Compute Infer": "server_compute_infer_us",
}


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer is missing, could not run, or gave no result."""


def write_input_data(images: np.ndarray, path: Path) -> Path:
    """perf_analyzer's --input-data JSON: one {"content", "shape"} entry per uint8 HWC image."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 [N, H, W, C] images, got {images.dtype} {images.shape}")
    shape = list(images.shape[1:])
    data = [{INPUT_NAME: {"content": img.reshape(-1).tolist(), "shape": shape}} for img in images]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": data}, separators=(",", ":")))
    return path


def read_input_data(path: Path) -> np.ndarray:
    """The images a --input-data JSON holds, back as uint8 [N, H, W, C] (for the round-trip test)."""
    entries = json.loads(Path(path).read_text())["data"]
    return np.stack(
        [np.asarray(e[INPUT_NAME]["content"], dtype=np.uint8).reshape(e[INPUT_NAME]["shape"]) for e in entries]
    )


@dataclass(frozen=True)
class PerfAnalyzer:
    """The one way perf_analyzer is found and run: the binary of a venv made by ``make perf-analyzer``
    (tritonclient 2.51.0's), or a binary brought to a machine without one (``brought``, see :meth:`brought_to`)."""

    venv: Path = Path(".venv-perf")
    brought: Path | None = None
    libs: Path | None = None  # a folder holding the brought binary's libcudart.so.12 and libb64.so.0d

    @classmethod
    def brought_to(cls, binary: Path, work: Path) -> PerfAnalyzer:
        """A brought binary, given libcudart.so.12 and libb64.so.0d from pytriton's own copies (verified
        on a GPU machine), linked under those names in ``work/perf-libs``."""
        from littlebig.model_repository.server import triton_home

        libs = triton_home().parent.parent / "nvidia_pytriton.libs"
        links = work / "perf-libs"
        links.mkdir(parents=True, exist_ok=True)
        for pattern, name in (("libcudart-*.so.12*", "libcudart.so.12"), ("libb64-*.so.0d", "libb64.so.0d")):
            found = sorted(libs.glob(pattern))
            if found and not (links / name).exists():
                (links / name).symlink_to(found[0])
        return cls(brought=Path(binary), libs=links)

    @property
    def binary(self) -> Path:
        return self.brought if self.brought is not None else self.venv / "bin" / "perf_analyzer"

    def environment(self) -> dict[str, str]:
        """Its CUDA runtime stub (loaded even for CPU-only use): the venv's nvidia wheel, or the brought libs."""
        if self.brought is not None:
            libs = [self.libs] if self.libs is not None else []
        else:
            libs = sorted(self.venv.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
            if not self.binary.exists() or not libs:
                raise PerfAnalyzerError(f"{self.binary} or its CUDA runtime is missing: run `make perf-analyzer`")
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (*map(str, libs[:1]), env.get("LD_LIBRARY_PATH")) if p)
        return env

    def run(self, args: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run to completion, output captured."""
        return subprocess.run(
            [str(self.binary), *args], env=self.environment(), capture_output=True, text=True, timeout=timeout
        )

    def start(self, args: list[str], log: IO[str]) -> subprocess.Popen:
        """Start in the background (a long step load the caller watches), output to ``log``."""
        return subprocess.Popen([str(self.binary), *args], env=self.environment(), stdout=log, stderr=subprocess.STDOUT)

    def version(self) -> str:
        done = self.run(["--version"], timeout=30)
        if done.returncode != 0:
            raise PerfAnalyzerError(f"perf_analyzer --version exited {done.returncode}: {done.stderr.strip()}")
        return (done.stdout + done.stderr).strip()  # 2.51 prints its version on stderr


@dataclass(frozen=True)
class Window:
    """How long each point is measured: short windows so the whole sweep fits in minutes on 2 cores."""

    interval_ms: int = 1500
    stability_pct: int = 25
    max_trials: int = 4


@dataclass(frozen=True)
class Point:
    """One measured point: model, batch, concurrency, throughput (images/s) and latencies (us)."""

    model: str
    batch: int
    concurrency: int
    throughput: float
    p50_us: float
    p90_us: float
    p95_us: float
    p99_us: float
    avg_us: float
    server_queue_us: float
    server_compute_infer_us: float
    stable: bool

    def as_dict(self) -> dict:
        return asdict(self)


def parse_csv(text: str) -> dict[str, float]:
    """The first data row of perf_analyzer's -f CSV, renamed to CSV_COLUMNS' keys."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise PerfAnalyzerError("perf_analyzer wrote an empty CSV")
    return {key: float(rows[0][col]) for col, key in CSV_COLUMNS.items() if rows[0].get(col) not in (None, "")}


def measure(
    pa: PerfAnalyzer,
    url: str,
    model: str,
    batch: int,
    concurrency: int,
    input_data: Path,
    work: Path,
    window: Window = Window(),
    composing: list[str] | None = None,
) -> Point:
    """One gRPC point; an unstable point is measured again with a loose stability bound and flagged."""
    csv_path = work / f"{model}-b{batch}-c{concurrency}.csv"
    base = [
        "-m", model, "-u", url, "-i", "grpc", "-b", str(batch),
        # An explicit end lifts the default 16-thread cap: sync mode needs one thread per request in flight.
        f"--concurrency-range={concurrency}:{concurrency}:1", f"--input-data={input_data}",
        f"--measurement-interval={window.interval_ms}", f"--max-trials={window.max_trials}",
        "-f", str(csv_path),
    ]  # fmt: skip
    if composing:
        base.append(f"--bls-composing-models={','.join(composing)}")
    stable = True
    csv_path.unlink(missing_ok=True)
    done = pa.run([*base, f"--stability-percentage={window.stability_pct}"])
    if done.returncode != 0 or not csv_path.exists():
        # perf_analyzer aborts when 3 windows in a row disagree, or when a short window records no request
        # ("No valid requests recorded"): loosen the bound, double the window, and say so
        stable = False
        base[base.index(f"--measurement-interval={window.interval_ms}")] = (
            f"--measurement-interval={2 * window.interval_ms}"
        )
        done = pa.run([*base, "--stability-percentage=100000"])  # on a starved CPU latency can swing 10x
    if done.returncode != 0 or not csv_path.exists():
        raise PerfAnalyzerError(
            f"perf_analyzer on {model} b{batch} c{concurrency} failed:\n{done.stdout[-2000:]}\n{done.stderr[-1000:]}"
        )
    values = parse_csv(csv_path.read_text())
    avg = re.search(r"Avg latency: (\d+) usec", done.stdout)  # the CSV of 2.51 has no average column
    if avg and "avg_us" not in values:
        values["avg_us"] = float(avg.group(1))
    return Point(
        model=model,
        batch=batch,
        concurrency=concurrency,
        stable=stable,
        **{k: values.get(k, float("nan")) for k in CSV_COLUMNS.values()},
    )
