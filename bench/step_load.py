"""The open-loop step load of ``make overload``: the schedule, perf_analyzer sending it, the metrics port read every
second while it runs, and perf_analyzer's per-request record read back."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.perf import PerfAnalyzer, PerfAnalyzerError
from littlebig.decision import CASCADE as BLS
from littlebig.metrics_text import fetch

#: littlebig's row counters, as ``scrape`` names them.
METRICS = {
    "littlebig_rows_total": "rows",
    "littlebig_escalated_rows_total": "escalated",
    "littlebig_load_rows_total": "load",
    "littlebig_deadline_rows_total": "deadline",
}
#: Triton's own cumulative per-model counters (us, requests): where a request's time goes, per model. littlebig's
#: queue time is the part its Python BLS model cannot see.
TRITON = {
    "nv_inference_request_success": "success",
    "nv_inference_request_duration_us": "request_us",
    "nv_inference_queue_duration_us": "queue_us",
}


@dataclass(frozen=True)
class Phase:
    name: str
    factor: float  # of big alone's saturation rate
    seconds: float
    start_s: float = 0.0
    rate: float = 0.0  # requests/s

    @property
    def stop_s(self) -> float:
        return self.start_s + self.seconds


def phases(seconds: list[float], saturation: float) -> list[Phase]:
    """1x, 2x, 1x of ``saturation`` for ``seconds`` each, back to back."""
    out, start = [], 0.0
    for name, factor, s in zip(("1x", "2x", "1x after"), (1.0, 2.0, 1.0), seconds):
        out.append(Phase(name, factor, s, start, factor * saturation))
        start += s
    return out


def schedule(plan: list[Phase], distribution: str, seed: int = 0) -> np.ndarray:
    """Send times (s from the start) of every request: Poisson arrivals (or evenly spaced) at each phase's rate."""
    rng = np.random.default_rng(seed)
    times = []
    for p in plan:
        n = int(round(p.rate * p.seconds))
        if distribution == "poisson":
            t = np.cumsum(rng.exponential(1.0 / p.rate, size=int(n * 1.2) + 20))
            t = t[t < p.seconds]
        else:
            t = np.arange(n) / p.rate
        times.append(p.start_s + t)
    return np.concatenate(times)


def write_intervals(times: np.ndarray, path: Path) -> Path:
    """perf_analyzer's --request-intervals file: one gap (us) per line between successive requests."""
    at_us = np.maximum.accumulate(np.round(np.asarray(times) * 1e6).astype(np.int64))  # whole us, no drift
    gaps = np.maximum(np.diff(np.concatenate([[0], at_us])), 1)
    path.write_text("\n".join(map(str, gaps.tolist())) + "\n")
    return path


# ---------------------------------------------------------------- metrics ----------------------------------------
def scrape(url: str) -> dict[str, Any]:
    """One sample of the metrics port: T per BLS instance, littlebig's row counters, Triton's time counters."""
    now = time.time()
    samples = fetch(url, timeout=2).samples
    out: dict[str, Any] = {"t": now, "threshold": {}, **dict.fromkeys(METRICS.values(), 0.0)}
    out.update({f"{m}_{k}": 0.0 for m in (BLS, "big") for k in TRITON.values()})
    for sample in samples:
        name, labels, value = sample.name, sample.labels, sample.value
        model = labels.get("model")
        if model not in (BLS, "big"):
            continue
        if name == "littlebig_threshold":
            out["threshold"][labels.get("bls_instance") or labels.get("instance", "")] = value
        elif name in METRICS:
            out[METRICS[name]] += value
        elif name in TRITON:
            out[f"{model}_{TRITON[name]}"] += value
    return out


def server_times(scrapes: list[dict], a: float, b: float) -> dict[str, float]:
    """Mean ms per request between the scrapes nearest to epoch times a and b: littlebig's queue (invisible to
    its governor), littlebig's whole request, and big's request (queue + compute, what the governor watches)."""
    first = min(scrapes, key=lambda s: abs(s["t"] - a))
    last = min(scrapes, key=lambda s: abs(s["t"] - b))
    out = {}
    for m in (BLS, "big"):
        n = last[f"{m}_success"] - first[f"{m}_success"]
        for k in ("queue_us", "request_us"):
            out[f"{m}_{k[:-3]}_ms"] = (last[f"{m}_{k}"] - first[f"{m}_{k}"]) / n / 1000 if n > 0 else float("nan")
    return out


# ---------------------------------------------------------------- perf_analyzer ----------------------------------
def step_load(
    pa: PerfAnalyzer,
    url: str,
    metrics_url: str,
    intervals: Path,
    requests: int,
    input_data: Path,
    export: Path,
    total_s: float,
    desc: str,
    extra: list[str] = (),
) -> tuple[list[dict], float, float]:
    """Run the schedule against littlebig, scraping the metrics every second; (scrapes, start, end) wall times."""
    args = [
        "-m", BLS, "-u", url, "-i", "grpc", "-b", "1", "--async",
        f"--request-intervals={intervals}", f"--request-count={requests}", f"--input-data={input_data}",
        f"--profile-export-file={export}", *extra,
    ]  # fmt: skip
    export.unlink(missing_ok=True)
    scrapes = [scrape(metrics_url)]
    log = export.with_suffix(".log")
    began = time.time()
    with open(log, "w") as out:
        proc = pa.start(args, out)
        try:
            with tqdm(
                total=round(total_s), desc=desc, unit="s", bar_format="{l_bar}{bar}| {n:.0f}/{total} s {postfix}"
            ) as bar:
                while proc.poll() is None:
                    time.sleep(max(0.0, 1.0 - (time.time() - scrapes[-1]["t"])))
                    try:
                        scrapes.append(scrape(metrics_url))
                    except OSError:
                        continue
                    s, prev = scrapes[-1], scrapes[-2]
                    ts = list(s["threshold"].values())
                    bar.n = min(s["t"] - began, bar.total)
                    bar.set_postfix_str(
                        f"T {min(ts, default=float('nan')):.3f}  "
                        f"rows/s {(s['rows'] - prev['rows']) / (s['t'] - prev['t']):.0f}"
                        f"  load rows {s['load'] - scrapes[0]['load']:.0f}"
                    )
            proc.wait(timeout=max(60.0, total_s))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ended = time.time()
    scrapes.append(scrape(metrics_url))
    if proc.returncode != 0 or not export.exists():
        raise PerfAnalyzerError(f"perf_analyzer exited {proc.returncode} on the step load:\n{log.read_text()[-3000:]}")
    return scrapes, began, ended


def _scalar(value: Any) -> Any:
    while isinstance(value, list) and value:
        value = value[0]
    return value


def read_profile(path: Path, rows_of: dict[bytes, int]) -> dict[str, np.ndarray]:
    """perf_analyzer's profile export -> per request (sorted by send time): send (epoch s), latency (s), test row,
    served LABEL, REASON ("error" for a request answered with an error or never answered)."""
    experiments = json.loads(path.read_text())["experiments"]
    reqs = [r for e in experiments for r in e["requests"]]
    send = np.array([r["timestamp"] for r in reqs], dtype=np.float64) / 1e9
    done = np.array([r["response_timestamps"][-1] if r["response_timestamps"] else np.nan for r in reqs]) / 1e9
    rows = np.array([rows_of.get(bytes(r["request_inputs"]["IMAGE"]), -1) for r in reqs], dtype=np.int64)
    label = np.full(len(reqs), -1, dtype=np.int64)
    reason = np.full(len(reqs), "error", dtype=object)
    for i, r in enumerate(reqs):
        out = r["response_outputs"][-1] if r.get("response_outputs") else {}
        if "LABEL" in out:
            label[i] = int(_scalar(out["LABEL"]))
            why = _scalar(out.get("REASON"))
            if why is None:  # a server from before REASON: ESCALATED says who answered
                why = "escalated" if _scalar(out.get("ESCALATED")) else "confident"
            reason[i] = why.decode() if isinstance(why, bytes) else str(why)
    order = np.argsort(send, kind="stable")
    return {
        "send": send[order],
        "latency": (done - send)[order],
        "row": rows[order],
        "label": label[order],
        "reason": reason[order].astype(str),
    }
