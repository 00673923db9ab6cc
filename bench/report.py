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


def headline(r: dict) -> str:
    s, t = r["summary"], r["targets"]
    b = s["headline_batch"]
    rows = [
        [
            "littlebig / big alone (img/s, best concurrency each)",
            f"{r['speedup_vs_big']:.2f}x",
            f">= {t['speedup_vs_big']:.0f}x",
        ],
        [
            "littlebig / ideal cascade R*",
            f"{100 * r['fraction_of_ideal']:.0f}%",
            f">= {100 * t['fraction_of_ideal']:.0f}%",
        ],
        ["BLS overhead, p50, c1 b1 (ms)", f"{r['bls_overhead_ms']:.2f}", f"<= {t['bls_overhead_ms']:.0f}"],
        ["BLS overhead on mean latencies, c1 b1 (ms)", f"{s['bls_overhead_mean_ms']:.2f}", "(companion)"],
    ]
    return f"Headline batch size: {b}.\n\n" + _table(["figure", "measured", "target"], rows)


def per_batch(r: dict) -> str:
    rows = []
    for batch, s in r["summary"]["per_batch"].items():
        best = s["best"]
        rows.append(
            [batch]
            + [f"{best[m]['throughput']:.0f} (c{best[m]['concurrency']})" for m in MODELS]
            + [f"{s['ideal_throughput']:.0f}", f"{s['speedup_vs_big']:.2f}x", f"{100 * s['fraction_of_ideal']:.0f}%"]
        )
    header = ["batch", "little img/s", "big img/s", "littlebig img/s", "R* img/s", "littlebig/big", "of R*"]
    return _table(header, rows)


def served(r: dict) -> str:
    rows = [
        [
            x["model"],
            x["batch"],
            x["concurrency"],
            f"{x['throughput']:.1f}",
            f"{x['p50_us'] / 1e3:.2f}",
            f"{x['p95_us'] / 1e3:.2f}",
            f"{x['p99_us'] / 1e3:.2f}",
            "yes" if x["stable"] else "no",
        ]
        for x in r["table"]
    ]
    return _table(["model", "batch", "concurrency", "img/s", "p50 ms", "p95 ms", "p99 ms", "stable"], rows)


def offline(r: dict) -> str:
    return _table(
        ["model", "batch", "img/s (onnxruntime alone)"],
        [[x["model"], x["batch"], f"{x['throughput']:.0f}"] for x in r["offline_floor"]],
    )


def server_side(r: dict) -> str:
    """Where littlebig's time goes at its best point per batch: queue vs compute_infer, per model."""
    rows = []
    for batch, s in r["summary"]["per_batch"].items():
        conc = s["best"]["littlebig"]["concurrency"]
        x = next(
            t for t in r["table"] if t["model"] == "littlebig" and t["batch"] == int(batch) and t["concurrency"] == conc
        )
        for m in MODELS:
            st = x["server"][m]
            rows.append(
                [
                    f"b{batch} c{conc}",
                    m,
                    st["rows"],
                    st["executions"],
                    f"{st['avg_batch']:.1f}",
                    f"{st['queue_ms']:.2f}",
                    f"{st['compute_infer_ms']:.2f}",
                ]
            )
    header = [
        "littlebig point",
        "model",
        "rows",
        "executions",
        "rows/execution",
        "queue ms/req",
        "compute_infer ms/req",
    ]
    return _table(header, rows)


def render(r: dict) -> str:
    esc = r["summary"]["escalation"]
    m = r["machine"]
    parts = [
        "### Targets\n\n" + headline(r),
        "### Best throughput per batch size\n\n" + per_batch(r),
        f"Escalation rate p at T = {r['threshold']:.4f} ({r['rule']}) on the {r['images']['count']} benchmark images: "
        f"{esc['offline']:.3f} offline (decision.cascade on the ONNX logits), {esc['served']:.3f} served "
        f"(big's inference_count delta / littlebig's, over {esc['served_rows']} rows).",
        "### Offline floor\n\n" + offline(r),
        "### Served (perf_analyzer, gRPC, real images)\n\n" + served(r),
        "### Server statistics at littlebig's best points\n\n" + server_side(r),
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, onnxruntime "
        f"{m['onnxruntime']}, Triton {m['triton']}, {r['perf_analyzer']['version']}. Date {r['date']}; "
        f"bench wall time {r['wall_seconds']:.0f} s. Serve options: `{json.dumps(r['serve_options'])}`.",
    ]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    path = Path(args[0] if args else "build/bench.json")
    sys.stdout.write(render(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
