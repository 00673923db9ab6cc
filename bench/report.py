"""Markdown tables from a bench.json, so BENCHMARKS.md quotes one run's figures without retyping them.

Usage: python -m bench.report build/bench.json > tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MODELS = ("little", "big", "littlebig")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|:---|" + "|".join("---:" for _ in header[1:]) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _opts(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def headline(r: dict) -> str:
    s, t = r["summary"], r["targets"]
    b = s["headline_batch"]
    h = s["per_batch"][str(b)]
    rows = [
        ["littlebig / big at its best (img/s, each at its best deployment and concurrency)",
         f"{r['speedup_vs_big_best']:.2f}x", f"report with the bound: {r['bound']:.2f}x"],
        ["bound R*/R_big = 1 / (R_big/R_little + p)", f"{r['bound']:.2f}x", f"p = {h['p']:.3f} served"],
        ["littlebig / R* (fair: R* from little's and big's best)", f"{100 * r['fraction_of_ideal']:.0f}%",
         f">= {100 * t['fraction_of_ideal']:.0f}%"],
        ["BLS overhead on mean latencies, c1 b1 (ms)", f"{r['bls_overhead_mean_ms']:.2f}",
         f"<= {t['bls_overhead_mean_ms']:.0f}"],
        ["BLS overhead on p50 latencies, c1 b1 (ms)", f"{s['bls_overhead_p50_ms']:.2f}", "(reads ~0: not the target)"],
    ]  # fmt: skip
    return f"Headline batch size: {b}.\n\n" + _table(["figure", "measured", "target"], rows)


def per_batch(r: dict) -> str:
    rows = []
    for batch, s in r["summary"]["per_batch"].items():
        best = s["best"]
        rows.append(
            [batch]
            + [f"{best[m]['throughput']:.0f} (c{best[m]['concurrency']})" for m in MODELS]
            + [f"{s['ideal_throughput']:.0f}", f"{s['speedup_vs_big_best']:.2f}x", f"{s['bound']:.2f}x",
               f"{100 * s['fraction_of_ideal']:.0f}%"]
        )  # fmt: skip
    header = ["batch", "little img/s", "big img/s", "littlebig img/s", "R* img/s", "littlebig/big", "bound", "of R*"]
    return _table(header, rows)


def winners(r: dict) -> str:
    rows = [[role, f"`{w['candidate']}`", _opts(w["options"])] for role, w in r["winners"].items()]
    return _table(["role", "served as", "ServeOptions"], rows)


def fair_points(r: dict) -> str:
    """Each role's best finalist at every (batch, concurrency) of the sweep."""
    rows = []
    for x in r["summary"]["per_point"]:
        b = x["best"]
        rows.append(
            [x["batch"], x["concurrency"]]
            + [f"{b[m]['throughput']:.0f}" for m in MODELS]
            + [
                f"{x['ideal_throughput']:.0f}",
                f"{x['speedup_vs_big_best']:.2f}x",
                f"{100 * x['fraction_of_ideal']:.0f}%",
            ]
        )
    header = ["batch", "concurrency", "little", "big", "littlebig", "R*", "littlebig/big", "of R*"]
    return _table(header, rows)


def screen(r: dict) -> str:
    pts = ", ".join(f"b{p['batch']} c{p['concurrency']}" for p in r["search"]["screen_points"])
    rows = []
    for x in r["search"]["screen"]:
        if "score" not in x:
            rows.append([x["role"], x["stage"], _opts(x["options"]), "-", x.get("skipped", "").splitlines()[0][:160]])
            continue
        per = " / ".join(f"{p['throughput']:.0f}" for p in x["points"])
        rows.append([x["role"], x["stage"], _opts(x["options"]), f"{x['score']:.0f}", per])
    return f"Screen points: {pts}.\n\n" + _table(["role", "stage", "options", "score img/s", "per point"], rows)


def alternatives(r: dict) -> str:
    """Every screened littlebig deployment against the default one (same screen, same windows): after/before."""
    defaults = r["search"].get("defaults", {})
    lb = [x for x in r["search"]["screen"] if x["role"] == "littlebig" and "score" in x]
    base = next((x for x in lb if all(defaults.get(k) == v for k, v in x["options"].items())), None)
    if base is None:
        return "(the default deployment was not screened)"
    rows = []
    for x in lb:
        changed = {k: v for k, v in x["options"].items() if defaults.get(k) != v}
        cells = [", ".join(f"{k}={v}" for k, v in changed.items()) or "**default (before)**", x["stage"]]
        for p, q in zip(x["points"], base["points"]):
            if p["concurrency"] == 1:
                cells.append(f"{p['avg_us'] / 1e3:.2f} ms ({p['avg_us'] / q['avg_us']:.2f}x)")
            else:
                cells.append(f"{p['throughput']:.0f} ({p['throughput'] / q['throughput']:.2f}x)")
        rows.append(cells)
    head = [
        f"b{p['batch']} c{p['concurrency']} " + ("mean latency" if p["concurrency"] == 1 else "img/s")
        for p in base["points"]
    ]
    return _table(["change from the default", "stage", *head], rows)


def confirm(r: dict) -> str:
    rows = [
        [x["model"], x["batch"], x["concurrency"], f"{x['throughput']:.1f}", f"{x['avg_us'] / 1e3:.2f}",
         f"{x['p50_us'] / 1e3:.2f}", f"{x['p99_us'] / 1e3:.2f}", "yes" if x["stable"] else "no"]
        for x in r["search"]["confirm"]
    ]  # fmt: skip
    return _table(["model", "batch", "conc", "img/s", "mean ms", "p50 ms", "p99 ms", "stable"], rows)


def breakdown(r: dict) -> str:
    """Queue vs compute per model and the BLS model's own time, from Triton's statistics."""
    rows, bls = [], []
    for e in r["breakdown"]:
        for m, st in e["models"].items():
            rows.append(
                [f"b{e['batch']} c{e['concurrency']}", f"`{m}`", f"{st['avg_batch']:.1f}", f"{st['queue_ms']:.2f}",
                 f"{st['compute_input_ms']:.2f}", f"{st['compute_infer_ms']:.2f}", f"{st['compute_output_ms']:.2f}"]
            )  # fmt: skip
        if "bls" in e:
            x = e["bls"]
            bls.append(
                [f"b{e['batch']} c{e['concurrency']}", f"{x['exec_ms']:.2f}", f"{x['in_little_ms']:.2f}",
                 f"{x['in_big_ms']:.2f}", f"{x['own_ms']:.2f}", f"{100 * x['own_ms'] / max(x['exec_ms'], 1e-9):.0f}%"]
            )  # fmt: skip
    header = ["point", "model", "rows/exec", "queue", "compute_input", "compute_infer", "compute_output"]
    return (
        "Per request, ms (Triton's per-request averages; a request's compute is that of the batch it ran in):\n\n"
        + _table(header, rows)
        + "\n\nPer littlebig execute, ms: its time = waiting on little + waiting on big + its own:\n\n"
        + _table(["point", "execute", "in little", "in big", "own", "own share"], bls)
    )


def offline(r: dict) -> str:
    return _table(
        ["model", "batch", "img/s (onnxruntime alone)"],
        [[x["model"], x["batch"], f"{x['throughput']:.0f}"] for x in r["offline_floor"]],
    )


def render(r: dict) -> str:
    esc = r["summary"]["escalation"]
    m = r["machine"]
    s = r["search"]
    parts = [
        "### Targets\n\n" + headline(r),
        "### Best against best, per batch size\n\n" + per_batch(r),
        "### Winning deployments (headline batch)\n\n" + winners(r),
        f"Escalation rate p at T = {r['threshold']:.4f} ({r['rule']}): {esc['served']:.3f} served (big's rows / "
        f"littlebig's, server counts, over {esc['served_rows']} rows of the winner), {esc['offline']:.3f} offline on "
        f"the {r['images']['count']} benchmark images.",
        "### Fair table: each role's best finalist at every point\n\n" + fair_points(r),
        "### Where the time goes\n\n" + breakdown(r),
        f"### Search table\n\nBudget {s['budget_s']:.0f} s (screen share {100 * s['screen_share']:.0f}%), used "
        f"{s['seconds']:.0f} s. Screen windows {s['screen_window']['interval_ms']} ms; confirmation: "
        f"{s['finalists_per_role']} finalist(s) per role, windows >= {s['confirm_window']['interval_ms']} ms.\n\n"
        + screen(r),
        "### Design alternatives (screen): after / before\n\n" + alternatives(r),
        "### Confirmation (every finalist, every point)\n\n" + confirm(r),
        "### Offline floor\n\n" + offline(r),
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, onnxruntime "
        f"{m['onnxruntime']}, Triton {m['triton']}, {r['perf_analyzer']['version']}. Date {r['date']}; "
        f"bench wall time {r['wall_seconds']:.0f} s. Models: {r['models']['little']} -> {r['models']['big']}. "
        f"Command: `{r['command']}`.",
    ]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    path = Path(args[0] if args else "build/bench.json")
    sys.stdout.write(render(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
