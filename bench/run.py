"""`make bench`: little, big and littlebig each at its best deployment, in one run, on real images.

Why each number is there:
- each model is served at the best deployment a time-budgeted search finds (``bench/search.py``): a speed-up
  over big on one core while the cascade uses two is no speed-up;
- little's and big's best rates and the served escalation rate p give the ideal cascade R* = 1/(1/R_little +
  p/R_big) and the bound R*/R_big = 1/(R_big/R_little + p) that no cascade of this pair can beat;
- littlebig / big-at-its-best is the speed-up; littlebig / R* how close the serving comes to the bound;
- Triton's per-model statistics (queue, compute, the BLS model's own time) say where the gap goes;
- the offline floor (onnxruntime alone) says what the server costs on top of compute.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench import search as S
from bench.common import concurrency_axis, finish, load_test_images, search_parser, snapshot, start_search, warm_up
from bench.perf import PerfAnalyzer, Window
from littlebig.decision import CASCADE, cascade
from littlebig.export.pipeline import ROLES, export_dir, read_export

BLS = CASCADE
MODELS = ("little", "big", BLS)
TARGETS = {"fraction_of_ideal": 0.90, "bls_overhead_mean_ms": 1.0}


# ---------------------------------------------------------------- offline ----------------------------------------
def offline_floor(build: Path, images: np.ndarray, batches: tuple[int, ...], seconds: float) -> list[dict]:
    """images/s of onnxruntime alone (default threads, no server) on the benchmark images."""
    from littlebig.export.onnx_export import INPUT_NAME, OUTPUT_NAME, onnx_session

    exported = read_export(build)
    rows = []
    for role in tqdm(ROLES, desc="offline floor"):
        session = onnx_session(export_dir(build) / exported[role]["onnx"])
        for batch in batches:
            chunks = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
            session.run([OUTPUT_NAME], {INPUT_NAME: chunks[0]})  # warm-up
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                session.run([OUTPUT_NAME], {INPUT_NAME: chunks[(done // batch) % len(chunks)]})
                done += batch
            elapsed = time.perf_counter() - start
            rows.append({"model": role, "batch": batch, "throughput": done / elapsed})
    return rows


def offline_escalation(build: Path, images: np.ndarray, threshold: float) -> float:
    """p: the fraction of the benchmark images the shared decision rule sends to big at the served T."""
    from littlebig.export.onnx_export import INPUT_NAME, OUTPUT_NAME, onnx_session

    exported = read_export(build)
    logits = {
        role: onnx_session(export_dir(build) / exported[role]["onnx"]).run([OUTPUT_NAME], {INPUT_NAME: images})[0]
        for role in ROLES
    }
    return float(cascade(logits["little"], logits["big"], threshold)["escalated"].mean())


# ---------------------------------------------------------------- output -----------------------------------------
def _opts(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def print_table(result: dict) -> None:
    s = result["summary"]
    print("\nsearch (screen, short windows): candidate, score img/s (geometric mean of the screen points)")
    for r in result["search"]["screen"]:
        print(f"  {r['candidate']:<58} {r.get('score', float('nan')):>8.0f}  {r.get('skipped', '')}")
    print(f"\nfair table: each role's best finalist at every point (p = {s['escalation']['served']:.3f} served)")
    print(f"{'batch':>5}{'conc':>5}{'little':>9}{'big':>9}{'littlebig':>10}{'R*':>9}{'lb/big':>8}{'of R*':>7}")
    for r in s["per_point"]:
        b = r["best"]
        print(
            f"{r['batch']:>5}{r['concurrency']:>5}{b['little']['throughput']:>9.0f}{b['big']['throughput']:>9.0f}"
            f"{b[BLS]['throughput']:>10.0f}{r['ideal_throughput']:>9.0f}{r['speedup_vs_big_best']:>7.2f}x"
            f"{100 * r['fraction_of_ideal']:>6.0f}%"
        )
    for batch, r in s["per_batch"].items():
        print(
            f"batch {batch}: littlebig {r['best'][BLS]['throughput']:.0f} img/s, big at its best "
            f"{r['best']['big']['throughput']:.0f}, little {r['best']['little']['throughput']:.0f}, R* "
            f"{r['ideal_throughput']:.0f}: {r['speedup_vs_big_best']:.2f}x big (bound R*/R_big {r['bound']:.2f}x), "
            f"{100 * r['fraction_of_ideal']:.0f}% of R* (target >= {100 * TARGETS['fraction_of_ideal']:.0f}%)"
        )
    for role, w in s["winners"].items():
        print(f"winner {role}: {_opts(w['options'])}")
    print(
        f"BLS overhead at c1 b1 on mean latencies: {s['bls_overhead_mean_ms']:.2f} ms (target <= "
        f"{TARGETS['bls_overhead_mean_ms']:.0f}); p50 version {s['bls_overhead_p50_ms']:.2f} ms"
    )
    print("\nwhere the time goes (Triton statistics, ms per request; littlebig per execute: in little / big / own)")
    for e in result["breakdown"]:
        for m, st in e["models"].items():
            print(
                f"  b{e['batch']} c{e['concurrency']} {m:<58} rows/exec {st['avg_batch']:5.1f}  queue "
                f"{st['queue_ms']:7.2f}  input {st['compute_input_ms']:5.2f}  infer {st['compute_infer_ms']:7.2f}  "
                f"output {st['compute_output_ms']:5.2f}"
            )
        if "bls" in e:
            x = e["bls"]
            print(
                f"    littlebig execute {x['exec_ms']:.2f} ms = little {x['in_little_ms']:.2f} + big "
                f"{x['in_big_ms']:.2f} + own {x['own_ms']:.2f}"
            )


def plot(result: dict, path: Path) -> None:
    """The search table: screen scores per candidate, then each finalist's throughput vs concurrency, R* dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, rows = result["summary"], result["search"]["confirm"]
    batches = [int(b) for b in s["per_batch"]]
    screen = [r for r in result["search"]["screen"] if "score" in r]
    fig = plt.figure(figsize=(6 * len(batches), 5 + 0.22 * len(screen)))
    grid = fig.add_gridspec(2, len(batches), height_ratios=[0.22 * len(screen) + 1, 5])
    ax = fig.add_subplot(grid[0, :])
    colors = {"little": "tab:blue", "big": "tab:orange", BLS: "tab:green"}
    ax.barh(range(len(screen)), [r["score"] for r in screen], color=[colors[r["role"]] for r in screen])
    ax.set_yticks(range(len(screen)), [r["candidate"] for r in screen], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="screen score (img/s, geometric mean of the screen points)", title="search: every candidate")
    ax.grid(alpha=0.3, axis="x")
    for col, batch in enumerate(batches):
        ax = fig.add_subplot(grid[1, col])
        for name in dict.fromkeys(r["candidate"] for r in rows if r["role"] != "composing"):
            mine = [r for r in rows if r["model"] == name and r["batch"] == batch]
            mine.sort(key=lambda r: r["concurrency"])
            role = mine[0]["role"]
            ax.plot([r["concurrency"] for r in mine], [r["throughput"] for r in mine], marker="o",
                    color=colors[role], alpha=0.9 if name in {w["candidate"] for w in s["winners"].values()} else 0.4,
                    label=name)  # fmt: skip
        pts = [r for r in s["per_point"] if r["batch"] == batch]
        ax.plot([r["concurrency"] for r in pts], [r["ideal_throughput"] for r in pts], ls="--", c="gray",
                label="R* from the best little and big")  # fmt: skip
        concurrency_axis(ax, batch, [r["concurrency"] for r in pts], 6)
    h = s["per_batch"][str(s["headline_batch"])]
    fig.suptitle(
        f"littlebig on Triton 2.51 (CPU), best against best: batch {s['headline_batch']} littlebig "
        f"{h['speedup_vs_big_best']:.2f}x big at its best, {100 * h['fraction_of_ideal']:.0f}% of R*, "
        f"bound {h['bound']:.2f}x (p = {h['p']:.2f})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main -------------------------------------------
def run_search(args, opts_base: dict, images: np.ndarray, input_data: Path, work: Path, pa: PerfAnalyzer) -> dict:
    """Screen every candidate, confirm the finalists over the sweep: the search table (bench/search.py)."""
    warm = lambda client, model, b: warm_up(client, images, model, b)  # noqa: E731
    with S.session(args, args.build, opts_base, input_data, work, pa, warm) as run:
        batches, concurrencies, points, budget = run.batches, run.concurrencies, run.points, run.budget
        search, defaults = run.search, run.defaults
        cands = S.grid(defaults)
        window = Window(args.screen_ms, stability_pct=1000, max_trials=3)  # screening: 3 windows, no retry
        total = sum(len(v) for v in cands.values()) + 6
        with tqdm(total=total, desc="screen", unit="candidate") as bar:
            screened = []
            # the grid's littlebig first, so its refinements get their share of the screen's budget
            for role in (BLS, "big", "little"):
                screened += S.screen(search, cands[role], points, window, budget, batches, bar)
            leader = S.ranked(screened, BLS)
            refine = S.refinements(search.installed[leader[0]["candidate"]]) if leader else []
            bar.total = len(screened) + len(refine)
            screened += S.screen(search, refine, points, window, budget, batches, bar, keep_first=False)
        per_finalist = len(batches) * len(concurrencies)
        k, window_ms = S.confirm_plan(max(budget.left(), 0), per_finalist, len(MODELS), search.overhead_s(),
                                      max_finalists=args.finalists)  # fmt: skip
        finalists = [search.installed[r["candidate"]] for role in MODELS for r in S.ranked(screened, role)[:k]]
        confirm_window = Window(window_ms)
        rows = S.confirm(search, finalists, batches, concurrencies, confirm_window)
    return {
        "defaults": {k: v for k, v in defaults.items() if k in S.ROLE_FIELDS[BLS]},
        "budget_s": args.budget_s,
        "screen_share": args.screen_share,
        "screen_points": [{"batch": b, "concurrency": c} for b, c in points],
        "screen_window": window.__dict__,
        "confirm_window": confirm_window.__dict__,
        "finalists_per_role": k,
        "finalists": [c.name for c in finalists],
        "seconds": round(budget.elapsed(), 1),
        "screen": screened,
        "confirm": rows,
        "repository_summary": search.summaries[finalists[-1].name] if finalists else {},
    }


def main(argv: list[str] | None = None) -> int:
    from littlebig.model_repository.generate import ServeOptions, served_threshold

    ap = search_parser("python -m bench.run", __doc__, "bench.json", "BENCH_BUDGET_S", 900)
    ap.add_argument("--offline-seconds", type=float, default=1.5)
    run = start_search(ap, argv)
    args, base = run.args, run.base

    args.build = snapshot(args.build, run.work / "build")
    exported, images, input_data = load_test_images(args.build, run.work, args.images)
    threshold, rule = served_threshold(args.build, ServeOptions(**base))
    p_offline = offline_escalation(args.build, images, threshold)
    offline = offline_floor(args.build, images, (1, 32), args.offline_seconds)

    found = run_search(args, base, images, input_data, run.work, run.pa)
    summary = S.summarise(found["confirm"], run.batches, run.concurrencies, run.headline)
    summary["escalation"]["offline"] = p_offline
    result = {
        "speedup_vs_big_best": summary["speedup_vs_big_best"],
        "fraction_of_ideal": summary["fraction_of_ideal"],
        "bound": summary["bound"],
        "bls_overhead_mean_ms": summary["bls_overhead_mean_ms"],
        "escalation_rate": summary["escalation"]["served"],
        "targets": TARGETS,
        "winners": summary["winners"],
        "summary": summary,
        "breakdown": S.breakdown(found["confirm"], summary),
        "search": found,
        "threshold": threshold,
        "rule": rule,
        "base_options": base,
        "images": {"split": "test", "count": len(images), "service_size": exported["service_size"]},
        "models": {role: exported[role]["name"] for role in ROLES},
        "export": {role: {k: exported[role].get(k) for k in ("name", "weights", "onnx")} for role in ROLES},
        "offline_floor": offline,
        "perf_analyzer": {"version": run.pa_version, "protocol": "grpc"},
    }
    return finish(result, run.out, "bench.run", argv, run.started, print_table, plot)


if __name__ == "__main__":
    sys.exit(main())
