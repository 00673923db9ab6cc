"""Mixed good/bad load against the served cascade, and the soak run behind ``make soak``.

``mixed_load`` is shared with tests/test_reliability.py: good batches of 1-64 real test images (each
checked against the offline reference) interleaved with requests Triton or the BLS model must refuse
with INVALID_ARGUMENT. ``python -m tests.soak`` starts its own server on free loopback ports, runs the
load for ``--minutes``, samples the resident memory of tritonserver and its stubs from /proc, and
writes the figures to ``<build>/soak.json``. Exit code 0 only when every criterion holds.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from littlebig.decision import cascade, confidence, softmax

BAD_KINDS = ("dtype", "shape", "channels", "oversize", "empty", "threshold")
BAD_THRESHOLDS = ("abc", -1, 2)
CLIENT_TIMEOUT_S = 60.0


@dataclass
class Item:
    """One request: ``rows`` of the test split (good) or a deliberately bad request (``kind``)."""

    kind: str
    images: np.ndarray
    datatype: str
    rows: np.ndarray | None = None
    threshold: object = None  # None: the served T


@dataclass
class Figures:
    """What a load run saw; the criteria are the ``*_lost``, ``*_differing`` and ``*_unclear`` counts."""

    requests: int = 0
    good: int = 0
    good_rows: int = 0
    good_ok: int = 0
    good_lost: int = 0  # an error, a timeout, or no answer
    good_differing: int = 0  # LABEL/ESCALATED unequal or PROBS off by > 1e-5 from the offline reference
    escalated_rows: int = 0
    bad: int = 0
    bad_invalid_argument: int = 0
    bad_unclear: int = 0  # answered, or refused with another status or an empty message
    timeouts: int = 0
    seconds: float = 0.0
    bad_by_kind: dict[str, int] = field(default_factory=dict)
    other_by_kind: dict[str, int] = field(default_factory=dict)  # requests ``mixed_load``'s ``other`` sent
    examples: list[str] = field(default_factory=list)  # the first few failures, for the report

    def failures(self) -> int:
        return self.good_lost + self.good_differing + self.bad_unclear

    def add(self, other: Figures) -> None:
        for k, v in asdict(other).items():
            if isinstance(v, (int, float)):
                setattr(self, k, getattr(self, k) + v)
        self.bad_by_kind = dict(Counter(self.bad_by_kind) + Counter(other.bad_by_kind))
        self.other_by_kind = dict(Counter(self.other_by_kind) + Counter(other.other_by_kind))
        self.examples = (self.examples + other.examples)[:10]


def spaced_thresholds(little_logits: np.ndarray, quantiles=(0.1, 0.3, 0.5, 0.7, 0.9)) -> list[float]:
    """Per-request T values at these quantiles of little's confidence, each in the middle of a gap.

    A T that sits between two rows' confidences, not on one, makes served-vs-offline comparisons exact:
    no row is a float32 rounding away from flipping its escalation.
    """
    conf = np.sort(confidence(softmax(little_logits)).astype(np.float64))
    out = []
    for q in quantiles:
        i = int(q * (len(conf) - 1))
        window = range(max(0, i - 50), min(len(conf) - 1, i + 50))
        j = max(window, key=lambda k: conf[k + 1] - conf[k])
        out.append(float((conf[j] + conf[j + 1]) / 2))
    return out


def make_items(images: np.ndarray, n: int, thresholds: list[float], seed: int, bad_share: float = 0.3) -> list[Item]:
    """``n`` requests, about ``bad_share`` of them bad, in a random order."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        size = int(rng.integers(1, 65))
        rows = rng.choice(len(images), size=size, replace=False)
        good = images[rows]
        if rng.random() >= bad_share:
            t = None if rng.random() < 0.2 else thresholds[int(rng.integers(len(thresholds)))]
            items.append(Item("good", good, "UINT8", rows=rows, threshold=t))
            continue
        kind = BAD_KINDS[int(rng.integers(len(BAD_KINDS)))]
        if kind == "dtype":
            items.append(Item(kind, good.astype(np.float32), "FP32"))
        elif kind == "shape":
            items.append(Item(kind, good[..., 0], "UINT8"))
        elif kind == "channels":
            items.append(Item(kind, np.repeat(good, 3, axis=-1), "UINT8"))
        elif kind == "oversize":
            big = rng.choice(len(images), size=int(rng.integers(65, 129)), replace=False)
            items.append(Item(kind, images[big], "UINT8"))
        elif kind == "empty":
            items.append(Item(kind, images[:0], "UINT8"))
        else:
            bad_t = BAD_THRESHOLDS[int(rng.integers(len(BAD_THRESHOLDS)))]
            items.append(Item(kind, good, "UINT8", threshold=bad_t))
    return items


def _send(client, item: Item):
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("IMAGE", list(item.images.shape), item.datatype)
    inp.set_data_from_numpy(item.images)
    params = None if item.threshold is None else {"threshold": item.threshold}
    return client.infer("littlebig", [inp], parameters=params, client_timeout=CLIENT_TIMEOUT_S)


def _judge(item: Item, result, error, logits: dict[str, np.ndarray], served_t: float) -> Figures:
    f = Figures(requests=1)
    if error is not None and "DEADLINE_EXCEEDED" in str(error.status()):
        f.timeouts = 1
    if item.kind == "good":
        f.good, f.good_rows = 1, len(item.rows)
        if error is not None:
            f.good_lost = 1
            f.examples.append(f"good request lost: {error.status()} {error.message()[:200]}")
            return f
        t = served_t if item.threshold is None else float(item.threshold)
        ref = cascade(logits["little"][item.rows], logits["big"][item.rows], t)
        label, esc = result.as_numpy("LABEL").reshape(-1), result.as_numpy("ESCALATED").reshape(-1)
        probs = result.as_numpy("PROBS")
        same = (
            np.array_equal(label, ref["label"])
            and np.array_equal(esc, ref["escalated"])
            and probs.shape == ref["probs"].shape
            and float(np.abs(probs - ref["probs"]).max()) <= 1e-5
            and not result.as_numpy("DEGRADED").any()
        )
        f.good_ok, f.good_differing = int(same), int(not same)
        f.escalated_rows = int(esc.sum())
        if not same:
            f.examples.append(f"good request differs from the reference at T={t} on rows {item.rows[:8]}...")
        return f
    f.bad, f.bad_by_kind = 1, {item.kind: 1}
    clear = error is not None and "INVALID_ARGUMENT" in str(error.status()) and bool(error.message())
    f.bad_invalid_argument, f.bad_unclear = int(clear), int(not clear)
    if not clear:
        what = "answered" if error is None else f"{error.status()} {error.message()[:200]}"
        f.examples.append(f"bad request ({item.kind}) not refused with INVALID_ARGUMENT: {what}")
    return f


def mixed_load(
    url: str,
    items: list[Item],
    logits: dict[str, np.ndarray],
    served_t: float,
    concurrency: int = 32,
    other: Callable[[Any, Item], None] | None = None,
) -> Figures:
    """Send ``items`` from ``concurrency`` clients (one gRPC channel each) and judge every answer. Items of a kind
    other than good and bad go to ``other(client, item)``, which sends them its own way; they are counted."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    local = threading.local()
    clients = []

    def one(item: Item) -> Figures:
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(url)
            clients.append(local.client)
        if other is not None and item.kind != "good" and item.kind not in BAD_KINDS:
            other(local.client, item)
            return Figures(requests=1, other_by_kind={item.kind: 1})
        try:
            return _judge(item, _send(local.client, item), None, logits, served_t)
        except InferenceServerException as exc:
            return _judge(item, None, exc, logits, served_t)

    began = time.monotonic()
    total = Figures()
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            for f in pool.map(one, items):
                total.add(f)
    finally:
        for c in clients:
            c.close()
    total.seconds = time.monotonic() - began
    return total


def soak(build: Path, minutes: float, warmup_minutes: float, concurrency: int, work: Path) -> dict:
    """Run mixed load for ``minutes`` on a fresh server; the figures and whether they pass."""
    from littlebig.data import load_split
    from littlebig.export.pipeline import read_export, reference_logits
    from littlebig.model_repository.generate import generate
    from littlebig.model_repository.server import Ports, TritonServer

    exported = read_export(build)
    data = load_split("test", exported["data_dir"], tuple(exported["service_size"]))
    logits = reference_logits(build, "test")
    summary = generate(build, work / "model_repository", "cpu")
    thresholds = spaced_thresholds(logits["little"])
    total, samples, round_no = Figures(), [], 0
    with TritonServer(work / "model_repository", Ports.free(), log_file=work / "tritonserver.log") as server:
        url = f"127.0.0.1:{server.ports.grpc}"
        began = time.monotonic()
        while time.monotonic() - began < minutes * 60:
            items = make_items(data.images, 400, thresholds, seed=round_no)
            total.add(mixed_load(url, items, logits, summary["threshold"], concurrency))
            samples.append((time.monotonic() - began, server.rss_bytes()))
            round_no += 1
            print(
                f"{samples[-1][0]:6.0f} s  requests {total.requests}  failures {total.failures()}  "
                f"RSS {samples[-1][1] / 2**20:.0f} MiB",
                flush=True,
            )
        ready = server.is_ready()
    after = [rss for t, rss in samples if t >= warmup_minutes * 60]
    baseline = after[0] if after else samples[-1][1]
    growth = (after[-1] - baseline) / baseline if after else 0.0
    result = {
        "minutes": minutes,
        "warmup_minutes": warmup_minutes,
        "concurrency": concurrency,
        "figures": asdict(total),
        "requests_per_s": total.requests / max(1e-9, samples[-1][0]),
        "rss_mib": [(round(t), round(rss / 2**20, 1)) for t, rss in samples],
        "rss_baseline_mib": baseline / 2**20,
        "rss_final_mib": samples[-1][1] / 2**20,
        "rss_peak_after_warmup_mib": max(after, default=baseline) / 2**20,
        "rss_growth": growth,
        "server_ready_at_end": ready,
    }
    result["ok"] = total.failures() == 0 and total.timeouts == 0 and growth < 0.05 and ready
    return result


def main(argv: list[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", type=Path, default=Path("build"))
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup-minutes", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=32)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="littlebig-soak-") as tmp:
        result = soak(args.build, args.minutes, args.warmup_minutes, args.concurrency, Path(tmp))
    out = args.build / "soak.json"
    out.write_text(json.dumps(result, indent=2))
    f = result["figures"]
    print(
        f"soak {args.minutes:g} min: {f['requests']} requests ({result['requests_per_s']:.1f}/s), "
        f"good {f['good']} (lost {f['good_lost']}, differing {f['good_differing']}), "
        f"bad {f['bad']} (unclear {f['bad_unclear']}), timeouts {f['timeouts']}; RSS "
        f"{result['rss_baseline_mib']:.0f} -> {result['rss_final_mib']:.0f} MiB after warm-up "
        f"({result['rss_growth']:+.1%}); {'PASS' if result['ok'] else 'FAIL'}; wrote {out}"
    )
    for line in f["examples"]:
        print(f"  {line}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
