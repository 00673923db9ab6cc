"""`make overload`: a step load on littlebig, 1x, 2x, then 1x of big alone's saturation rate, with the load
governor on and off.

What one run does, on the real embedded tritonserver and the real test images:
- serves the same pair twice, governor off (static T) and on (``slo_p99_ms``, ``max_accuracy_drop``), each
  on its own server on free loopback ports;
- measures big alone's saturation rate first (perf_analyzer on ``big``, batch 1, gRPC, concurrency high
  enough to saturate) and littlebig's unloaded p99 (batch 1, one request in flight);
- drives littlebig with an open-loop schedule (``--request-intervals``: the gaps between requests, in
  microseconds, for every phase; ``--async`` so a slow server does not slow the sender down), batch 1;
- perf_analyzer's ``--profile-export-file`` records every request: when it was sent, the image it carried,
  when its answer came and the answer itself (LABEL, ESCALATED, REASON). The image names the test row, so
  the served accuracy is measured per phase on every request, against the labels and against the offline
  static cascade on the very same rows (a paired comparison: only rows answered differently count);
- scrapes Triton's metrics port every second: ``littlebig_threshold`` (the T in force, one per BLS instance),
  ``littlebig_{rows,escalated_rows,load_rows,deadline_rows}_total``.

It writes BUILD/overload.json and BUILD/overload.png and prints a table. Targets (reported, not asserted):
at 2x, p99 <= SLO in >= 95% of the 5 s windows and accuracy within EPS of the static cascade; T back at the
calibrated value within 30 s after the load falls; at 1x, accuracy equal to the static cascade's.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.overload_analysis import DEFAULT_EPS, analyse, reference, targets
from bench.perf import PerfAnalyzer, Window, measure
from bench.step_load import Phase, phases, read_profile, schedule, step_load, write_intervals
from littlebig.decision import CASCADE as BLS
from littlebig.export.pipeline import ROLES

#: Default SLO on littlebig's p99 latency (ms), --slo-p99-ms: on the 2-core reference machine about 10x its unloaded
#: batch-1 p99 (17-21 ms) and above its p99 at 1x with the static T (87-146 ms per 5 s window), so that the static
#: cascade meets it at 1x and the governor has to act only above (RELIABILITY.md, "Overload").
DEFAULT_SLO_MS = 200.0


# ---------------------------------------------------------------- output -----------------------------------------
def print_table(result: dict) -> None:
    print(
        f"\nbig alone saturates at {result['saturation']['rate']:.0f} req/s (batch 1); littlebig unloaded p99 "
        f"{result['littlebig_unloaded']['p99_ms']:.1f} ms; SLO p99 {result['slo_p99_ms']:g} ms; EPS "
        f"{result['max_accuracy_drop']}; T calibrated {result['t_cal']:.4f}, T_min {result['t_min']:.4f}"
    )
    head = (
        f"{'run':<9}{'phase':<10}{'offered':>8}{'answered':>9}{'err':>6}{'p50 ms':>9}{'p99 ms':>10}{'win ok':>8}"
        f"{'acc':>8}{'static':>8}{'drop':>8}{'load':>7}{'dline':>7}{'esc':>7}{'T min':>8}"
    )
    print(head)
    for mode, run in result["runs"].items():
        for p in run["phases"]:
            n = max(p["requests"], 1)
            print(
                f"{mode:<9}{p['phase']:<10}{p['offered_rate']:>8.0f}{p['answered_rate']:>9.0f}{p['errors']:>6}"
                f"{p['p50_ms']:>9.1f}{p['p99_ms']:>10.1f}{p['windows_within_slo']:>4}/{p['windows']:<3}"
                f"{100 * p['accuracy_served']:>8.2f}{100 * p['accuracy_static']:>8.2f}{100 * p['accuracy_drop']:>8.2f}"
                f"{100 * p['reasons']['load'] / n:>6.1f}%{100 * p['reasons']['deadline'] / n:>6.1f}%"
                f"{100 * p['reasons']['escalated'] / n:>6.1f}%{p['t_min_seen']:>8.3f}"
            )
        for p in run["phases"]:
            ms = p["server_ms"]
            print(
                f"{mode:<9}{p['phase']:<10}Triton, mean ms per request: littlebig queue {ms['littlebig_queue_ms']:.1f} "
                f"of {ms['littlebig_request_ms']:.1f} in littlebig; big {ms['big_request_ms']:.1f} (queue "
                f"{ms['big_queue_ms']:.1f})"
            )
        rec, first = run["t_recovery_s"], run["t_first_back_s"]
        print(
            f"{mode:<9}T lowered: {run['t_lowered']}; after the load fell, T back at the calibrated value "
            f"{'never' if first is None else f'first after {first:.1f} s'}, "
            f"{'never for good' if rec is None else f'for good after {rec:.1f} s'} "
            f"({100 * run['t_share_at_calibrated_after']:.0f}% of the scrapes since); consistency {run['consistency']}"
        )
    print("\ntargets (governor on):")
    for name, v in result["targets"].items():
        if "met" in v:
            print(f"  {name:<20} {v['measured']!s:<24} {v['target']:<60} {'met' if v['met'] else 'NOT met'}")
    if "static_for_comparison_2x" in result["targets"]:
        print(f"  governor off at 2x: {result['targets']['static_for_comparison_2x']}")


def plot(result: dict, path: Path) -> None:
    """p99 per window vs the SLO (governor on and off), T over time, and who answered; phase boundaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    colors = {"on": "tab:green", "off": "tab:red"}
    fig, axes = plt.subplots(4, 1, figsize=(11, 13), sharex=True)
    ax = axes[0]
    for mode, run in runs.items():
        w = run["windows"]
        mid = [(x["start_s"] + x["stop_s"]) / 2 for x in w]
        p99 = [min(x["p99_ms"], 1e6) for x in w]
        ax.plot(
            mid,
            p99,
            marker="o",
            color=colors.get(mode),
            label=f"governor {mode}: p99 per {result['window_s']:g} s window",
        )
    ax.axhline(result["slo_p99_ms"], ls="--", c="k", label=f"SLO {result['slo_p99_ms']:g} ms")
    ax.set(yscale="log", ylabel="p99 latency (ms)")
    ax = axes[1]
    for mode, run in runs.items():
        s = run["threshold_series"]
        ts = [x["t"] for x in s]
        ax.fill_between(
            ts, [x["t_min"] for x in s], [x["t_max"] for x in s], step="post", alpha=0.3, color=colors.get(mode)
        )
        ax.step(
            ts,
            [x["t_min"] for x in s],
            where="post",
            color=colors.get(mode),
            label=f"governor {mode}: T in force (BLS instances)",
        )
    ax.axhline(result["t_cal"], ls="--", c="tab:blue", label=f"calibrated T {result['t_cal']:.4f}")
    ax.axhline(
        result["t_min"],
        ls=":",
        c="tab:purple",
        label=f"T_min {result['t_min']:.4f} (EPS {result['max_accuracy_drop']})",
    )
    ax.set(ylabel="T")
    ax = axes[2]
    for mode, run in runs.items():
        w = run["windows"]
        mid = [(x["start_s"] + x["stop_s"]) / 2 for x in w]
        ax.plot(
            mid,
            [100 * x["share_escalated"] for x in w],
            color=colors.get(mode),
            label=f"governor {mode}: escalated to big",
        )
        if mode == "on":
            ax.plot(mid, [100 * (x["share_load"] + x["share_deadline"]) for x in w], color=colors[mode], ls="--",
                    label="governor on: little because of load or deadline")  # fmt: skip
        if any(x["errors"] for x in w):
            ax.plot(
                mid,
                [100 * x["share_error"] for x in w],
                color=colors.get(mode),
                ls=":",
                label=f"governor {mode}: errors",
            )
    ax.set(ylabel="% of requests per window")
    ax = axes[3]
    for mode, run in runs.items():
        s = [x for x in run["threshold_series"] if "big_request_ms" in x]
        ts = [x["t"] for x in s]
        ax.plot(ts, [x["littlebig_request_ms"] for x in s], color=colors.get(mode), lw=2,
                label=f"governor {mode}: littlebig, whole request in the server")  # fmt: skip
        ax.plot(ts, [x["littlebig_queue_ms"] for x in s], color=colors.get(mode), ls="--",
                label=f"governor {mode}: littlebig's queue (its Python model cannot see it)")  # fmt: skip
        ax.plot(ts, [x["big_request_ms"] for x in s], color=colors.get(mode), ls=":",
                label=f"governor {mode}: big, queue + compute")  # fmt: skip
    ax.set(yscale="log", ylabel="mean ms per request (Triton, 1 s)", xlabel="seconds since the step load began")
    for ax in axes:
        for p in result["phases"]:
            ax.axvline(p["start_s"], c="gray", lw=0.8)
            ax.text(p["start_s"] + 0.5, 1.0, f"{p['name']} ({p['rate']:.0f}/s)", transform=ax.get_xaxis_transform(),
                    va="top", fontsize=8, color="gray")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center right")
        ax.set_xlim(-2, result["phases"][-1]["stop_s"] + 2)
    t = result["targets"]
    fig.suptitle(
        f"littlebig under a step load (1x, 2x, 1x big's saturation {result['saturation']['rate']:.0f} req/s, batch 1): "
        f"2x windows within SLO {t['p99_windows_ok_2x']['measured']:.0%} on vs "
        f"{t.get('static_for_comparison_2x', {}).get('windows_ok_share', float('nan')):.0%} off",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main -------------------------------------------
def warm(url: str, images: np.ndarray) -> None:
    import tritonclient.grpc as grpcclient

    from bench.common import warm_up

    client = grpcclient.InferenceServerClient(url)
    try:
        for model in (BLS, "big", "little"):
            warm_up(client, images, model, (1, 8))
    finally:
        client.close()


def run_mode(mode: str, args, opts, repo_root: Path, images, input_data, plan, times, ref, saturation=None) -> dict:
    """One server with ``opts``: (big's saturation, littlebig unloaded, when asked) and the step load."""
    from littlebig.model_repository.generate import generate
    from littlebig.model_repository.server import Ports, TritonServer

    work = repo_root / mode
    work.mkdir(parents=True, exist_ok=True)
    repo = work / "model_repository"
    summary = generate(args.build, repo, "cpu", opts)
    out: dict[str, Any] = {"options": {k: v for k, v in vars(opts).items() if not isinstance(v, tuple)}}
    server = TritonServer(repo, Ports.free(), log_file=work / "tritonserver.log")
    with server.start():
        url = f"127.0.0.1:{server.ports.grpc}"
        warm(url, images)
        if saturation is not None:
            saturation.update(measure_saturation(args, url, input_data, work))
            plan[:] = phases(args.phase_seconds, saturation["rate"])
            times[:] = list(schedule(plan, args.distribution, args.seed))
        intervals = write_intervals(np.asarray(times), work / "intervals.txt")
        scrapes, began, ended = step_load(
            PerfAnalyzer(args.perf_venv), url, f"http://127.0.0.1:{server.ports.metrics}/metrics", intervals,
            len(times), input_data, work / "profile.json", plan[-1].stop_s, f"governor {mode:<3}",
            [f"--request-parameter=deadline_ms:{args.deadline_ms}:int"] if args.deadline_ms else [],
        )  # fmt: skip
    rows_of = {}
    for i, img in enumerate(images):
        rows_of.setdefault(img.tobytes(), i)
    req = read_profile(work / "profile.json", rows_of)
    if not args.keep_profile:
        (work / "profile.json").unlink()
    np.savez_compressed(work / "requests.npz", **req)
    out.update(analyse(req, scrapes, plan, ref, args.slo_p99_ms, args.window_s))
    out["perf_analyzer_wall_s"] = round(ended - began, 1)
    out["send_lag_p99_ms"] = float(
        np.percentile((req["send"] - req["send"][0]) - np.asarray(times)[: len(req["send"])], 99) * 1000
    )  # how far behind the schedule perf_analyzer sent (it keeps pace when this is small)
    out["repository"] = {k: summary[k] for k in ("threshold", "rule", "slo_p99_ms", "t_min", "governor_thresholds")}
    return out


def measure_saturation(args, url: str, input_data: Path, work: Path) -> dict:
    """big alone's max throughput (requests/s, batch 1) over the concurrencies asked; littlebig's unloaded p99."""
    pa = PerfAnalyzer(args.perf_venv)
    window = Window(args.saturation_ms, stability_pct=25, max_trials=4)
    points = []
    for c in tqdm(args.saturation_concurrency, desc="big alone's saturation", unit="point"):
        points.append(measure(pa, url, "big", 1, c, input_data, work, window).as_dict())
    best = max(points, key=lambda p: p["throughput"])
    unloaded = measure(pa, url, BLS, 1, 1, input_data, work, window).as_dict()
    return {"rate": best["throughput"], "concurrency": best["concurrency"], "points": points, "unloaded": unloaded}


def source() -> dict[str, Any]:
    """Which code was served: the commit, the BLS model's files that differ from it, and their hashes."""
    import hashlib

    def git(*a: str) -> str:
        done = subprocess.run(["git", *a], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    bls = Path(__file__).resolve().parent.parent / "model_repository" / "littlebig"
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted": git("status", "--porcelain", "--", "model_repository", "littlebig", "export").splitlines(),
        "sha256": {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in sorted(bls.glob("*.py"))},
    }


def main(argv: list[str] | None = None) -> int:
    from bench.common import entry_parser, finish, load_test_images, snapshot
    from littlebig.cli import add_serve_options, given_serve_options
    from littlebig.model_repository.generate import ServeOptions, governor_settings, served_threshold

    ap = entry_parser("python -m bench.overload", __doc__, "JSON (default BUILD/overload.json; the PNG goes beside it)",
                      2000, "real test images the load cycles through")  # fmt: skip
    ap.add_argument("--phase-seconds", default="30,30,45", help="seconds of the 1x, 2x and 1x phases")
    ap.add_argument("--window-s", type=float, default=5.0, help="p99 window")
    ap.add_argument("--distribution", choices=["poisson", "constant"], default="poisson", help="request arrivals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--saturation-concurrency", default="16,32", help="concurrencies at which big alone is measured")
    ap.add_argument("--saturation-ms", type=int, default=3000, help="perf_analyzer window for the saturation")
    ap.add_argument("--rate", type=float, help="use this saturation rate (req/s) instead of measuring it")
    ap.add_argument("--modes", default="off,on", help="governor off (static T) and/or on, in this order")
    ap.add_argument("--deadline-ms", type=int, help="send every request with this deadline_ms parameter")
    ap.add_argument("--keep-profile", action="store_true", help="keep perf_analyzer's per-request export")
    ap.add_argument("--quick", action="store_true", help="a few seconds per phase, few images (the test)")
    add_serve_options(ap, build=False)  # --slo-p99-ms, --max-accuracy-drop and the deployment
    args = ap.parse_args(argv)
    if args.quick:
        args.phase_seconds, args.window_s, args.images, args.saturation_ms = "3,3,4", 1.0, min(args.images, 256), 500
        args.saturation_concurrency = "16"
    args.phase_seconds = [float(s) for s in args.phase_seconds.split(",")]
    args.saturation_concurrency = [int(c) for c in args.saturation_concurrency.split(",")]
    if len(args.phase_seconds) != 3:
        ap.error("--phase-seconds takes three durations: 1x, 2x, 1x")
    modes = args.modes.split(",")
    if not set(modes) <= {"on", "off"} or not modes:
        ap.error("--modes is a list of on/off")
    args.slo_p99_ms = args.slo_p99_ms or DEFAULT_SLO_MS
    args.max_accuracy_drop = args.max_accuracy_drop if args.max_accuracy_drop is not None else DEFAULT_EPS

    started = time.monotonic()
    served_source = source()  # before the repositories are generated from the working tree
    out = args.out or args.build / "overload.json"
    work = out.parent / f"{out.stem}-work"
    work.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in given_serve_options(args).items() if k not in ("slo_p99_ms", "max_accuracy_drop")}
    base["max_accuracy_drop"] = args.max_accuracy_drop
    pa = PerfAnalyzer(args.perf_venv)
    pa_version = pa.version()
    args.build = snapshot(args.build, work / "build")
    exported, images, input_data = load_test_images(args.build, work, args.images)
    t_cal, rule = served_threshold(args.build, ServeOptions(**base))
    t_min = governor_settings(args.build, [t_cal], ServeOptions(**base))["t_min"]
    ref = reference(args.build, len(images), t_cal, t_min)

    saturation: dict[str, Any] = {}
    plan: list[Phase] = []
    times: list[float] = []
    if args.rate:
        saturation = {"rate": args.rate, "given": True}
        plan[:] = phases(args.phase_seconds, args.rate)
        times[:] = list(schedule(plan, args.distribution, args.seed))
    runs = {}
    for i, mode in enumerate(modes):
        opts = ServeOptions(**base, slo_p99_ms=args.slo_p99_ms if mode == "on" else None)
        first = i == 0 and not args.rate
        runs[mode] = run_mode(
            mode, args, opts, work, images, input_data, plan, times, ref, saturation if first else None
        )
    result = {
        "slo_p99_ms": args.slo_p99_ms,
        "max_accuracy_drop": args.max_accuracy_drop,
        "t_cal": t_cal,
        "t_min": t_min,
        "rule": rule,
        "saturation": {k: v for k, v in saturation.items() if k != "unloaded"},
        "littlebig_unloaded": saturation.get("unloaded", {"p99_us": float("nan")}),
        "phases": [{**asdict(p), "stop_s": p.stop_s} for p in plan],
        "schedule": {"requests": len(times), "distribution": args.distribution, "seed": args.seed},
        "window_s": args.window_s,
        "deadline_ms": args.deadline_ms,
        "runs": runs,
        "targets": targets(runs["on"], runs.get("off"), args.slo_p99_ms, args.max_accuracy_drop)
        if "on" in runs
        else {},
        "images": {"split": "test", "count": len(images), "service_size": exported["service_size"]},
        "models": {role: exported[role]["name"] for role in ROLES},
        "perf_analyzer": {"version": pa_version, "protocol": "grpc", "mode": "async, --request-intervals"},
        "source": served_source,
    }
    result["littlebig_unloaded"]["p99_ms"] = result["littlebig_unloaded"]["p99_us"] / 1000
    return finish(result, out, "bench.overload", argv, started, print_table, plot if "on" in runs else None)


if __name__ == "__main__":
    sys.exit(main())
