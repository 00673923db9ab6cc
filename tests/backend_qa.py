"""Shared-memory leak probe and first-request latency of the served cascade (``make qa``).

``python -m tests.backend_qa shm`` starts a server on free loopback ports and sends mixed requests from 8
clients: good batches (each checked against the offline reference), bad ones Triton or the BLS model must
refuse (tests/soak.py's kinds), requests whose client deadline passes before the answer (1 ms), and requests
cancelled right after they were sent. It reports the allocated bytes of the server's Python-backend shared
memory regions in /dev/shm after a warm-up, at their peak, and after the load: a leak grows them with the
request count; a sound backend reuses what the warm-up allocated.

``python -m tests.backend_qa warmup`` times the first request after the server reports ready (through little
and big) against the median of the next ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tests.soak import Item, make_items, mixed_load, spaced_thresholds

EXTRA_KINDS = ("timed_out", "cancelled")


def _test_split(build: Path):
    from littlebig.data import load_split
    from littlebig.export.pipeline import read_export, reference_logits

    exported = read_export(build)
    return load_split("test", exported["data_dir"], tuple(exported["service_size"])), reference_logits(build, "test")


def shm_bytes(regions: set[str]) -> int:
    """Bytes of /dev/shm the regions' files hold (allocated blocks, not their nominal size)."""
    from littlebig.model_repository.server import SHM_DIR

    total = 0
    for name in regions:
        try:
            total += os.stat(SHM_DIR / name).st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def _items(images: np.ndarray, n: int, thresholds: list[float], seed: int) -> list[Item]:
    """tests/soak.py's good and bad requests, a tenth of the good ones turned into timed-out or cancelled ones."""
    rng = np.random.default_rng(seed + 1)
    items = make_items(images, n, thresholds, seed)
    for item in items:
        if item.kind == "good" and rng.random() < 0.2:
            item.kind = EXTRA_KINDS[int(rng.integers(2))]
    return items


def _send_other(client, item: Item) -> None:
    """A request whose client deadline passes (1 ms) before its answer, or one cancelled right after it is sent."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    inp = grpcclient.InferInput("IMAGE", list(item.images.shape), item.datatype)
    inp.set_data_from_numpy(item.images)
    if item.kind == "timed_out":
        try:
            client.infer("littlebig", [inp], client_timeout=0.001)
        except InferenceServerException:
            pass
    else:
        client.async_infer("littlebig", [inp], lambda result, error: None).cancel()


def shm_probe(
    build: Path, work: Path, requests: int = 10_000, warm: int = 1000, concurrency: int = 8
) -> dict[str, Any]:
    """/dev/shm use of a fresh server: after ``warm`` mixed requests, at its peak over ``requests`` more, and
    after them; every good answer checked, every bad one refused clearly."""
    from littlebig.model_repository.generate import generate
    from littlebig.model_repository.server import Ports, TritonServer

    data, logits = _test_split(build)
    summary = generate(build, work / "model_repository", "cpu")
    thresholds = spaced_thresholds(logits["little"])
    with TritonServer(work / "model_repository", Ports.free(), log_file=work / "tritonserver.log") as server:
        url = f"127.0.0.1:{server.ports.grpc}"
        regions = set(server._shm_regions)
        baseline = shm_bytes(regions)
        figures = mixed_load(
            url, _items(data.images, warm, thresholds, 0), logits, summary["threshold"], concurrency, _send_other
        )
        time.sleep(1.0)
        warm_bytes, peak, began = shm_bytes(regions), 0, time.monotonic()
        chunk = 500
        for start in range(0, requests, chunk):
            items = _items(data.images, min(chunk, requests - start), thresholds, 1 + start)
            figures.add(mixed_load(url, items, logits, summary["threshold"], concurrency, _send_other))
            peak = max(peak, shm_bytes(regions))
        seconds = time.monotonic() - began
        time.sleep(2.0)  # abandoned (timed-out, cancelled) requests finish on the server
        after = shm_bytes(regions)
        ready = server.is_ready()
    kinds = {name: figures.other_by_kind.get(name, 0) for name in EXTRA_KINDS}
    mib = 2**20
    return {
        "requests": requests + warm,
        "seconds": seconds,
        "regions": len(regions),
        "baseline_bytes": baseline,
        "warm_bytes": warm_bytes,
        "peak_bytes": peak,
        "after_bytes": after,
        "kinds": {**kinds, "good": figures.good, "bad": figures.bad},
        "failures": figures.failures(),
        "examples": figures.examples,
        "server_ready_at_end": ready,
        "summary": (
            f"{requests + warm} mixed requests ({figures.good} good, {figures.bad} bad, {kinds['timed_out']} timed "
            f"out, {kinds['cancelled']} cancelled; {figures.failures()} failures) over {len(regions)} regions: "
            f"{baseline / mib:.1f} MiB at start, {warm_bytes / mib:.1f} after {warm} warm-up requests, peak "
            f"{peak / mib:.1f}, {after / mib:.1f} after the load"
        ),
    }


def warmup_latency(build: Path, work: Path, warm_requests: int = 50) -> dict[str, Any]:
    """Seconds of the first escalating request after ready, and the median of the next ``warm_requests``."""
    from littlebig.decision import cascade
    from littlebig.model_repository.generate import generate
    from littlebig.model_repository.server import Ports, TritonServer
    from tests.helpers import infer

    data, logits = _test_split(build)
    generate(build, work / "model_repository", "cpu")
    rows = np.arange(1)
    with TritonServer(work / "model_repository", Ports.free(), log_file=work / "tritonserver.log") as server:
        url = f"127.0.0.1:{server.ports.grpc}"
        seconds = []
        for _ in range(warm_requests + 1):
            began = time.monotonic()
            result = infer(url, data.images[rows], 1.0)
            seconds.append(time.monotonic() - began)
            if len(seconds) == 1:
                ref = cascade(logits["little"][rows], logits["big"][rows], 1.0)
                first_ok = bool(np.array_equal(result.as_numpy("LABEL").reshape(-1), ref["label"]))
    first, warm = seconds[0], statistics.median(seconds[1:])
    return {
        "first_s": first,
        "warm_median_s": warm,
        "ratio": first / warm,
        "first_matches_offline": first_ok,
        "summary": f"first request {first * 1000:.1f} ms, warm median {warm * 1000:.1f} ms ({first / warm:.2f}x)",
    }


def main(argv: list[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=["shm", "warmup"])
    p.add_argument("--build", type=Path, default=Path("build"))
    p.add_argument("--requests", type=int, default=10_000, help="shm: mixed requests after the warm-up")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="littlebig-qa-") as tmp:
        if args.check == "shm":
            result = shm_probe(args.build, Path(tmp), requests=args.requests)
            ok = result["failures"] == 0 and result["after_bytes"] == result["warm_bytes"]
        else:
            result = warmup_latency(args.build, Path(tmp))
            ok = result["first_matches_offline"]
    print(json.dumps({k: v for k, v in result.items() if k != "summary"}, indent=1))
    print(f"{args.check}: {result['summary']}; {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
