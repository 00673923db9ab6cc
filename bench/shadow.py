"""`make bench-shadow`: what shadow sampling costs littlebig at its best deployment.

Shadow sampling (``ServeOptions.shadow_rate`` R, ``littlebig/shadow.py``) sends a seeded share R of the rows the
cascade answered confidently to big as well, after their responses are built and never awaited. It cannot delay an
answer directly, but big's extra work shares the same 2 cores: this bench measures what that costs, in one run on
one machine, at R = 0 (off), 0.01 and 0.05:

- the deployment is the best littlebig one ``make bench`` found, read from the newest committed record
  ``bench/results/bench-YYYY-MM-DD-HHMM.json`` (its littlebig winner's options and base options, its headline batch
  and the concurrency at which that winner was best at that batch): rerunning the search would take 15 minutes for
  a deployment that only changes when ``make bench`` runs again, and the ratios to R = 0 are taken within this run;
- each rate is its own repository (generated with the same options but ``shadow_rate``) on its own server, started
  for each measurement and stopped before the next starts, so no idle server shares the cores;
- the rates are interleaved over the rounds (R0, R1, R2, R0, R1, R2, ...) so drift in the machine's speed does not
  favour one; each measurement is the real perf_analyzer on the same real test images (``--input-data``), after a
  warm-up window, over 3 windows of ``--seconds`` / 3 each;
- around each measurement the metrics port gives the rows the cascade answered, the confident and escalated rows,
  the shadow rows big answered and those dropped by reason (``littlebig_shadow_*``), and big's own row count
  (Triton's ``nv_inference_count``): big's extra rows = shadow rows answered + failed (the calls made), as a share
  of all rows and of the escalated rows big ran anyway.

Budget: on the 2-core reference machine a measurement costs about 15 s beside its measured seconds (server start
~3 s with the whole cpu repository, warm-up requests and a 3 x 1 s warm-up window, perf_analyzer's overhead, the
settle, the stop): measured in the smoke run (``--rounds 1 --seconds 5``: 19 s a measurement, 64 s in all). The
default 2 rounds x 3 rates x 30 s (3 windows of 10 s) so take about 6 x 45 s, some 5 minutes with the set-up
(snapshot, images, 3 repositories); ``--seconds`` and ``--rounds`` scale it.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.common import entry_parser, finish, load_test_images, snapshot, warm_up, work_dir
from bench.perf import PerfAnalyzer, Window, measure
from littlebig.decision import CASCADE

BLS = CASCADE
RATES = (0.0, 0.01, 0.05)
#: ``make bench`` records (``bench-2026-11-30-0640.json``), not those of bench-stages, bench-shadow, bench-ab, ...
BENCH_RECORD = re.compile(r"^bench-\d{4}-\d{2}-\d{2}-\d{4}\.json$")
#: Seconds after perf_analyzer ends before the metrics are read: shadow calls still in flight finish (4 per BLS
#: instance at most, each one chunk of big).
SETTLE_S = 1.0
#: The warm-up window before each measurement: a fresh server's first seconds at full concurrency are not measured.
WARM_WINDOW = Window(1000, stability_pct=1000, max_trials=3)
#: The cascade's counters read around each measurement (the metrics port, model ``littlebig``).
COUNTERS = {
    "rows": "littlebig_rows_total",
    "confident": "littlebig_confident_rows_total",
    "escalated": "littlebig_escalated_rows_total",
    "shadow": "littlebig_shadow_rows_total",
    "disagreements": "littlebig_shadow_disagreements_total",
}
DROPPED = "littlebig_shadow_dropped_rows_total"


# ---------------------------------------------------------------- the deployment -------------------------------
def newest_record(results: Path) -> Path:
    """The newest ``make bench`` record in ``results`` (names carry the UTC date, so the last name is the newest)."""
    found = sorted(p for p in results.glob("bench-*.json") if BENCH_RECORD.match(p.name))
    if not found:
        raise FileNotFoundError(f"no make bench record (bench-YYYY-MM-DD-HHMM.json) in {results}: run `make bench`")
    return found[-1]


def best_deployment(record_path: Path) -> dict[str, Any]:
    """littlebig's winner in a ``make bench`` record: its ServeOptions (base options under the winner's), and the
    headline batch with the concurrency at which it was best at that batch (how bench.run/bench.stages pick it)."""
    record = json.loads(record_path.read_text())
    summary = record["summary"]
    batch = int(summary["headline_batch"])
    best = summary["per_batch"][str(batch)]["best"][BLS]
    return {
        "record": str(record_path),
        "record_date": record.get("date"),
        "candidate": best["candidate"],
        "options": {**record.get("base_options", {}), **best["options"]},
        "batch": batch,
        "concurrency": int(best["concurrency"]),
        "record_throughput": float(best["throughput"]),
        "record_threshold": record.get("threshold"),
        "record_rule": record.get("rule"),
    }


def repositories(build: Path, work: Path, options: dict[str, Any], rates: tuple[float, ...]) -> dict[float, dict]:
    """One folder per rate holding its generated repository (its shadow records go to ``logs/`` beside it)."""
    from littlebig.model_repository.generate import ServeOptions, generate

    out = {}
    for rate in rates:
        folder = work / f"r{rate:g}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        summary = generate(build, folder / "model_repository", "cpu", ServeOptions(**options, shadow_rate=rate))
        out[rate] = {"folder": folder, "threshold": summary["threshold"], "rule": summary["rule"]}
    return out


# ---------------------------------------------------------------- one measurement ------------------------------
def counters(metrics_url: str) -> dict[str, float]:
    """The cascade's cumulative counters, the shadow drops per reason, and big's rows as Triton counts them."""
    from littlebig.metrics_text import fetch
    from littlebig.shadow import DROP_REASONS

    m = fetch(metrics_url)
    out = {key: m.total(name, model=BLS) for key, name in COUNTERS.items()}
    dropped = m.by(DROPPED, "reason", model=BLS)
    out.update({f"dropped_{why}": dropped.get(why, 0.0) for why in DROP_REASONS})
    out["big_rows_triton"] = m.total("nv_inference_count", model="big")
    return out


def derived(d: dict[str, float]) -> dict[str, float]:
    """What the counts mean: big's extra rows (shadow calls made) and their shares; the drawn share of confident
    rows (about R, a check of the sampler); big's extra rows by Triton's own count (cross-check)."""
    dropped = sum(v for k, v in d.items() if k.startswith("dropped_"))
    extra = d["shadow"] + d["dropped_failed"]
    return {
        "dropped": dropped,
        "extra_big_rows": extra,
        "extra_of_rows": extra / d["rows"] if d["rows"] else float("nan"),
        "extra_of_escalated": extra / d["escalated"] if d["escalated"] else float("nan"),
        "drawn_of_confident": (d["shadow"] + dropped) / d["confident"] if d["confident"] else float("nan"),
        "big_extra_rows_triton": d["big_rows_triton"] - d["escalated"],
    }


def records_bytes(folder: Path) -> int:
    """Bytes of shadow records the rate's BLS instances have written so far (``logs/`` beside its repository)."""
    return sum(p.stat().st_size for p in (folder / "logs").glob("*") if p.is_file())


def measure_rate(
    rate: float, folder: Path, images: np.ndarray, input_data: Path, pa: PerfAnalyzer, batch: int, conc: int,
    window: Window,
) -> dict[str, Any]:  # fmt: skip
    """One server for one rate: start, warm up, measure one point with the counters' deltas around it, stop."""
    import tritonclient.grpc as grpcclient

    from littlebig.model_repository.server import Ports, TritonServer

    t0 = time.monotonic()
    server = TritonServer(folder / "model_repository", Ports.free(), log_file=folder / "tritonserver.log")
    with server.start():
        started_s = time.monotonic() - t0
        url = f"127.0.0.1:{server.ports.grpc}"
        metrics_url = f"http://127.0.0.1:{server.ports.metrics}/metrics"
        client = grpcclient.InferenceServerClient(url)
        try:
            warm_up(client, images, BLS, (batch,))
        finally:
            client.close()
        warm = measure(pa, url, BLS, batch, conc, input_data, folder, WARM_WINDOW)
        before = counters(metrics_url)
        t1 = time.monotonic()
        point = measure(pa, url, BLS, batch, conc, input_data, folder, window)
        measured_s = time.monotonic() - t1
        time.sleep(SETTLE_S)
        after = counters(metrics_url)
    counts = {k: after[k] - before[k] for k in after}
    return {
        "rate": rate,
        **point.as_dict(),
        "p50_ms": point.p50_us / 1e3,
        "p99_ms": point.p99_us / 1e3,
        "counts": counts,
        **derived(counts),
        "warm_up_throughput": warm.throughput,
        "server_start_s": round(started_s, 1),
        "perf_analyzer_s": round(measured_s, 1),
        "wall_s": round(time.monotonic() - t0, 1),
    }


def run_rounds(
    plan: list[tuple[int, float]], repos: dict[float, dict], images: np.ndarray, input_data: Path, pa: PerfAnalyzer,
    batch: int, conc: int, window: Window,
) -> list[dict]:  # fmt: skip
    """The interleaved plan (round, rate), one server at a time."""
    rows = []
    for rnd, rate in tqdm(plan, desc="shadow rates", unit="server"):
        row = measure_rate(rate, repos[rate]["folder"], images, input_data, pa, batch, conc, window)
        rows.append({"round": rnd, **row})
        tqdm.write(f"  round {rnd + 1} R={rate:g}: {row['throughput']:.0f} img/s, p99 {row['p99_ms']:.1f} ms, "
                   f"extra big rows {row['extra_big_rows']:.0f} of {row['counts']['rows']:.0f}")  # fmt: skip
    return rows


# ---------------------------------------------------------------- summary ---------------------------------------
def summarise(rows: list[dict], rates: tuple[float, ...]) -> list[dict]:
    """Per rate: mean throughput and latencies over the rounds and their ratio to the first rate (R = 0), the
    paired ratio per round (same round, so same drift), and the counts summed over the rounds."""
    base = rates[0]
    out = []
    for rate in rates:
        mine = [r for r in rows if r["rate"] == rate]
        mean = {k: float(np.mean([r[k] for r in mine])) for k in ("throughput", "p50_ms", "p99_ms")}
        counts = {k: sum(r["counts"][k] for r in mine) for k in mine[0]["counts"]}
        out.append({"rate": rate, **mean, "rounds": [{k: r[k] for k in ("round", *mean)} for r in mine],
                    "counts": counts, **derived(counts)})  # fmt: skip
    ref = out[rates.index(base)]
    for s in out:
        s["ratio"] = {k: s[k] / ref[k] for k in ("throughput", "p50_ms", "p99_ms")}
        paired = [(r, next(b for b in ref["rounds"] if b["round"] == r["round"])) for r in s["rounds"]]
        s["paired_ratio"] = {k: [r[k] / b[k] for r, b in paired] for k in ("throughput", "p50_ms", "p99_ms")}
    return out


# ---------------------------------------------------------------- output ----------------------------------------
def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.2f}%"  # NaN: nothing to share


def print_table(result: dict) -> None:
    d, s = result["deployment"], result["summary"]
    print(f"\nshadow sampling at littlebig's best deployment ({d['candidate']}, from {Path(d['record']).name}); "
          f"batch {d['batch']}, concurrency {d['concurrency']}, {result['rounds']} round(s) x "
          f"{result['seconds']:g} s, T {result['served']['threshold']:.4f} ({result['served']['rule']})")  # fmt: skip
    print(f"{'R':>6}{'img/s':>8}{'x R0':>7}{'p50 ms':>8}{'x R0':>7}{'p99 ms':>8}{'x R0':>7}{'rows':>9}{'escal.':>8}"
          f"{'shadow':>8}{'dropped':>8}{'extra/rows':>11}{'extra/esc':>10}{'drawn/conf':>11}")  # fmt: skip
    for r in s:
        c, x = r["counts"], r["ratio"]
        print(f"{r['rate']:>6g}{r['throughput']:>8.0f}{x['throughput']:>7.3f}{r['p50_ms']:>8.1f}{x['p50_ms']:>7.3f}"
              f"{r['p99_ms']:>8.1f}{x['p99_ms']:>7.3f}{c['rows']:>9.0f}{c['escalated']:>8.0f}{c['shadow']:>8.0f}"
              f"{r['dropped']:>8.0f}{_pct(r['extra_of_rows']):>11}{_pct(r['extra_of_escalated']):>10}"
              f"{_pct(r['drawn_of_confident']):>11}")  # fmt: skip
    print("dropped by reason, and big's extra rows by Triton's count (big's rows - escalated):")
    for r in s:
        c = r["counts"]
        why = ", ".join(f"{k.removeprefix('dropped_')} {v:.0f}" for k, v in c.items() if k.startswith("dropped_"))
        print(f"  R={r['rate']:g}: {why}; Triton {r['big_extra_rows_triton']:.0f}")
    print("per round (img/s, p99 ms; paired ratio to R0 in the same round):")
    for r in s:
        per = "; ".join(
            f"round {q['round'] + 1} {q['throughput']:.0f}, {q['p99_ms']:.1f} ms ({t:.3f}x, {p:.3f}x)"
            for q, t, p in zip(r["rounds"], r["paired_ratio"]["throughput"], r["paired_ratio"]["p99_ms"])
        )
        print(f"  R={r['rate']:g}: {per}")
    served, rec = result["served"], d["record_threshold"]
    if rec is not None and abs(served["threshold"] - rec) > 1e-9:
        print(f"NOTE: T served now {served['threshold']:.4f} ({served['rule']}) differs from the record's {rec} "
              f"({d['record_rule']}): the escalation rate, and so the throughput, is not the record's")  # fmt: skip


def plot(result: dict, path: Path) -> None:
    """Throughput and p99 per rate: bars of the mean over the rounds, each round a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, d = result["summary"], result["deployment"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    x = np.arange(len(s))
    for ax, key, label in ((axes[0], "throughput", "images/s"), (axes[1], "p99_ms", "p99 latency (ms)")):
        colors = plt.cm.viridis(np.linspace(0.35, 0.85, len(s)))
        bars = ax.bar(x, [r[key] for r in s], 0.6, color=colors, alpha=0.8, label="mean over rounds")
        ax.bar_label(bars, labels=[f"{r[key]:.0f}\n{r['ratio'][key]:.3f}x R0" for r in s], label_type="center",
                     fontsize=8)  # fmt: skip
        for i, r in enumerate(s):
            for q in r["rounds"]:
                ax.plot(i + 0.12 * (q["round"] - (result["rounds"] - 1) / 2), q[key], "o", color="black", ms=4)
        ax.plot([], [], "o", color="black", ms=4, label="each round")
        ax.set_xticks(x, [f"R = {r['rate']:g}" for r in s])
        ax.set(ylabel=label, title=label.split(" (")[0] + " per shadow rate")
        ax.margins(y=0.25)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="upper right", ncols=2)
    fig.suptitle(f"shadow sampling cost, littlebig {d['candidate']}, batch {d['batch']} concurrency "
                 f"{d['concurrency']} ({result['rounds']} rounds, interleaved)", fontsize=9)  # fmt: skip
    fig.savefig(path, dpi=110)
    plt.close(fig)


def copy_record(out: Path, dest: Path) -> list[Path]:
    """Copy the JSON and PNG to ``dest/bench-shadow-<UTC stamp of the run>.{json,png}``, as the committed records
    are named."""
    date = datetime.fromisoformat(json.loads(out.read_text())["date"])
    stem = f"bench-shadow-{date.strftime('%Y-%m-%d-%H%M')}"
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for src in (out, out.with_suffix(".png")):
        if src.exists():
            copied.append(Path(shutil.copy2(src, dest / f"{stem}{src.suffix}")))
    return copied


# ---------------------------------------------------------------- main ------------------------------------------
def stop_on_term() -> None:
    """SIGTERM unwinds like Ctrl-C (the server's context manager stops it, perf_analyzer is killed); a second
    TERM, which ``make`` may forward, is ignored so cleanup is never interrupted."""

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    from bench.overload import source

    ap = entry_parser("python -m bench.shadow", __doc__,
                      "bench JSON (default BUILD/bench-shadow.json; the PNG goes beside it)",
                      512, "real test images to send")  # fmt: skip
    ap.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES), help="shadow rates, the first the base")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over the rates, interleaved")
    ap.add_argument("--seconds", type=float, default=30.0, help="measured seconds per rate and round (3 windows)")
    ap.add_argument("--record", type=Path, help="the make bench record (default: the newest in bench/results)")
    ap.add_argument("--results", type=Path, default=Path("bench/results"), help="where the make bench records are")
    ap.add_argument("--batch", type=int, help="batch size (default: the record's headline batch)")
    ap.add_argument("--concurrency", type=int, help="requests in flight (default: the winner's best at that batch)")
    ap.add_argument("--options", default="{}", help="ServeOptions fields over the record's, JSON (e.g. a rule)")
    ap.add_argument("--copy-to", type=Path, help="also copy the JSON and PNG here as bench-shadow-<stamp>.*")
    args = ap.parse_args(argv)
    rates = tuple(float(r) for r in args.rates.split(","))
    extra = json.loads(args.options)
    if "shadow_rate" in extra or len(set(rates)) != len(rates) or args.rounds < 1:
        ap.error("--options may not set shadow_rate; --rates must be distinct; --rounds >= 1")

    stop_on_term()
    started = time.monotonic()
    served_source = source()  # before the repositories are generated from the working tree
    deployment = best_deployment(args.record or newest_record(args.results))
    deployment["options"].update(extra)
    batch = args.batch or deployment["batch"]
    conc = args.concurrency or deployment["concurrency"]
    deployment.update(batch=batch, concurrency=conc)
    out = args.out or args.build / "bench-shadow.json"
    work = work_dir(out)
    pa = PerfAnalyzer(args.perf_venv)
    pa_version = pa.version()

    build = snapshot(args.build, work / "build")
    exported, images, input_data = load_test_images(build, work, args.images)
    repos = repositories(build, work, deployment["options"], rates)
    window = Window(max(int(args.seconds * 1000 / 3), 500), stability_pct=1000, max_trials=3)
    plan = [(rnd, rate) for rnd in range(args.rounds) for rate in rates]
    rows = run_rounds(plan, repos, images, input_data, pa, batch, conc, window)

    result = {
        "rates": list(rates),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "window": window.__dict__,
        "deployment": deployment,
        "served": {k: repos[rates[0]][k] for k in ("threshold", "rule")},
        "summary": summarise(rows, rates),
        "rows": rows,
        "shadow_records_bytes": {f"{r:g}": records_bytes(repos[r]["folder"]) for r in rates},
        "images": {"split": "test", "count": len(images), "service_size": exported["service_size"]},
        "perf_analyzer": {"version": pa_version, "protocol": "grpc"},
        "source": served_source,
    }
    code = finish(result, out, "bench.shadow", argv, started, print_table, plot)
    if args.copy_to is not None:
        print("copied to " + ", ".join(str(p) for p in copy_record(out, args.copy_to)))
    return code


if __name__ == "__main__":
    sys.exit(main())
