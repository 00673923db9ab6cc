"""`make bench`: offline floor, then little, big and littlebig served, in one run, on real images.

Why each number is there (GitHub issue 6):
- the offline floor (onnxruntime alone) says what the server costs on top of compute;
- little and big alone, measured in the same run, give the ideal cascade rate R* = 1/(1/R_little + p/R_big)
  for the escalation rate p of the benchmark images at the served threshold;
- littlebig against big alone is the speed-up the cascade is for; against R* it is the BLS efficiency;
- the server's per-model statistics (queue vs compute_infer) say where the gap to R* goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.perf import PerfAnalyzer, Point, Window, measure, write_input_data
from littlebig.data import load_split
from littlebig.decision import cascade
from littlebig.export.pipeline import ROLES, export_dir, read_export

BLS = "littlebig"
MODELS = ("little", "big", BLS)
STAT_KEYS = ("queue", "compute_input", "compute_infer", "compute_output", "success")


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


# ---------------------------------------------------------------- served -----------------------------------------
def server_stats(client, model: str) -> dict[str, int]:
    """Cumulative counters of one model: rows, executions, and ns/count per stage."""
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    out = {"inference_count": int(s.get("inference_count", 0)), "execution_count": int(s.get("execution_count", 0))}
    for key in STAT_KEYS:
        stage = s["inference_stats"].get(key, {})
        out[f"{key}_ns"] = int(stage.get("ns", 0))
        out[f"{key}_count"] = int(stage.get("count", 0))
    return out


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Rows, executions, and per-request average queue / compute_infer (ms) over one measured point."""
    d = {k: after[k] - before[k] for k in after}
    requests = max(d["success_count"], 1)
    return {
        "rows": d["inference_count"],
        "executions": d["execution_count"],
        "requests": d["success_count"],
        "avg_batch": d["inference_count"] / max(d["execution_count"], 1),
        "queue_ms": d["queue_ns"] / requests / 1e6,
        "compute_infer_ms": d["compute_infer_ns"] / requests / 1e6,
        "request_ms": d["success_ns"] / requests / 1e6,
    }


def warm_up(client, images: np.ndarray, batches: tuple[int, ...]) -> None:
    """A few requests per model and batch, so no measured window pays for first-call set-up."""
    import tritonclient.grpc as grpcclient

    for model in MODELS:
        for batch in batches:
            for start in range(0, 4 * batch, batch):
                tensor = grpcclient.InferInput("IMAGE", [batch, *images.shape[1:]], "UINT8")
                tensor.set_data_from_numpy(np.ascontiguousarray(images[start : start + batch]))
                client.infer(model, [tensor])


def sweep(
    pa: PerfAnalyzer,
    grpc_port: int,
    input_data: Path,
    work: Path,
    batches: tuple[int, ...],
    concurrencies: tuple[int, ...],
    window: Window,
) -> list[dict[str, Any]]:
    """perf_analyzer over gRPC for every model x batch x concurrency, with the server's stats deltas."""
    import tritonclient.grpc as grpcclient

    url = f"127.0.0.1:{grpc_port}"
    client = grpcclient.InferenceServerClient(url)
    rows: list[dict[str, Any]] = []
    # Interleaved: the three models of one (batch, concurrency) are measured back to back, so load from anything
    # else on the machine hits little, big and littlebig alike and the ratios stay fair.
    plan = [(m, b, c) for b in batches for c in concurrencies for m in MODELS]
    last_p99_ms: dict[tuple[str, int], float] = {}
    for model, batch, conc in tqdm(plan, desc="perf_analyzer", unit="point"):
        # Windows long enough to hold several requests even when latency is high (big, batch 8, c=32).
        prev = last_p99_ms.get((model, batch), 0.0)
        interval = int(min(max(window.interval_ms, 4 * 2 * prev), 6000))
        before = {m: server_stats(client, m) for m in MODELS}
        point: Point = measure(
            pa,
            url,
            model,
            batch,
            conc,
            input_data,
            work,
            dataclasses.replace(window, interval_ms=interval),
            composing=["little", "big"] if model == BLS else None,
        )
        after = {m: server_stats(client, m) for m in MODELS}
        last_p99_ms[(model, batch)] = point.p99_us / 1000
        rows.append({**point.as_dict(), "server": {m: stats_delta(before[m], after[m]) for m in MODELS}})
    client.close()
    return rows


# ---------------------------------------------------------------- summary ----------------------------------------
def best(rows: list[dict], model: str, batch: int) -> dict:
    return max((r for r in rows if r["model"] == model and r["batch"] == batch), key=lambda r: r["throughput"])


def point(rows: list[dict], model: str, batch: int, conc: int) -> dict:
    return next(r for r in rows if r["model"] == model and r["batch"] == batch and r["concurrency"] == conc)


def summarise(rows: list[dict], p: float, batches: tuple[int, ...]) -> dict[str, Any]:
    """Per batch: best throughput per model, speed-up vs big, R*, fraction of R*; BLS overhead at c1 b1."""
    per_batch = {}
    for batch in batches:
        lit, big, lb = (best(rows, m, batch) for m in MODELS)
        ideal = 1.0 / (1.0 / lit["throughput"] + p / big["throughput"])
        per_batch[str(batch)] = {
            "best": {
                m: {"throughput": r["throughput"], "concurrency": r["concurrency"]}
                for m, r in zip(MODELS, (lit, big, lb))
            },
            "ideal_throughput": ideal,
            "speedup_vs_big": lb["throughput"] / big["throughput"],
            "fraction_of_ideal": lb["throughput"] / ideal,
        }
    headline = max(per_batch, key=lambda b: per_batch[b]["best"][BLS]["throughput"])
    b1 = min(batches)
    c1 = min(r["concurrency"] for r in rows)
    p50 = {m: point(rows, m, b1, c1)["p50_us"] / 1000 for m in MODELS}
    mean = {m: point(rows, m, b1, c1)["avg_us"] / 1000 for m in MODELS}
    lb_rows = [r for r in rows if r["model"] == BLS]
    served_rows = sum(r["server"][BLS]["rows"] for r in lb_rows)
    return {
        "headline_batch": int(headline),
        "speedup_vs_big": per_batch[headline]["speedup_vs_big"],
        "fraction_of_ideal": per_batch[headline]["fraction_of_ideal"],
        "bls_overhead_ms": p50[BLS] - (p50["little"] + p * p50["big"]),
        # p50 of a mix of little-only and little+big requests sits on one of the two modes: the mean
        # version is the robust companion figure.
        "bls_overhead_mean_ms": mean[BLS] - (mean["little"] + p * mean["big"]),
        "bls_overhead_point": {"batch": b1, "concurrency": c1, "p50_ms": p50, "mean_ms": mean},
        "escalation": {
            "offline": p,
            "served": sum(r["server"]["big"]["rows"] for r in lb_rows) / max(served_rows, 1),
            "served_rows": served_rows,
        },
        "per_batch": per_batch,
    }


def print_table(offline: list[dict], rows: list[dict], summary: dict) -> None:
    print(
        "\noffline floor (onnxruntime alone): "
        + ", ".join(f"{r['model']} b{r['batch']} {r['throughput']:.0f} img/s" for r in offline)
    )
    print(f"\n{'model':<10}{'batch':>6}{'conc':>6}{'img/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}  stable")
    for r in rows:
        print(
            f"{r['model']:<10}{r['batch']:>6}{r['concurrency']:>6}{r['throughput']:>10.1f}"
            f"{r['p50_us'] / 1e3:>9.2f}{r['p95_us'] / 1e3:>9.2f}{r['p99_us'] / 1e3:>9.2f}"
            f"  {'yes' if r['stable'] else 'NO'}"
        )
    esc = summary["escalation"]
    print(f"\nescalation p: offline {esc['offline']:.3f}, served (big rows / littlebig rows) {esc['served']:.3f}")
    for batch, s in summary["per_batch"].items():
        print(
            f"batch {batch}: littlebig {s['best'][BLS]['throughput']:.0f} img/s, "
            f"big {s['best']['big']['throughput']:.0f}, "
            f"R* {s['ideal_throughput']:.0f}: {s['speedup_vs_big']:.2f}x big (target >= 3), "
            f"{100 * s['fraction_of_ideal']:.0f}% of R* (target >= 85%)"
        )
    print(
        f"BLS overhead at c1 b1: {summary['bls_overhead_ms']:.2f} ms p50 (target <= 1), "
        f"{summary['bls_overhead_mean_ms']:.2f} ms on mean latencies"
    )


def plot(rows: list[dict], summary: dict, batches: tuple[int, ...], path: Path) -> None:
    """Throughput and p50 latency vs concurrency, one column per batch size, R* as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(2, len(batches), figsize=(5.5 * len(batches), 8), squeeze=False)
    for col, batch in enumerate(batches):
        for model in MODELS:
            mine = sorted(
                (r for r in rows if r["model"] == model and r["batch"] == batch), key=lambda r: r["concurrency"]
            )
            conc = [r["concurrency"] for r in mine]
            axes[0][col].plot(conc, [r["throughput"] for r in mine], marker="o", label=model)
            axes[1][col].plot(conc, [r["p50_us"] / 1e3 for r in mine], marker="o", label=model)
        ideal = summary["per_batch"][str(batch)]["ideal_throughput"]
        axes[0][col].axhline(ideal, ls="--", c="gray", label="ideal cascade R*")
        axes[0][col].set(title=f"batch {batch}", ylabel="images/s")
        axes[1][col].set(ylabel="p50 latency (ms)", yscale="log")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["concurrency"] for r in rows}))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.set_xlabel("concurrency (requests in flight)")
            ax.grid(alpha=0.3)
            ax.legend()
    p = summary["escalation"]["offline"]
    fig.suptitle(f"littlebig on Triton 2.51 (CPU, Python backend): escalation p = {p:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main -------------------------------------------
def override_models(repo: Path, bls: Path | None, classifier: Path | None) -> dict[str, str]:
    """Swap a candidate model.py into the generated repository, to measure a change before proposing it."""
    done = {}
    for model, source in ((BLS, bls), ("little", classifier), ("big", classifier)):
        if source is not None:
            shutil.copy2(source, repo / model / "1" / "model.py")
            done[model] = str(source)
    return done


def machine() -> dict[str, Any]:
    """What BENCHMARKS.md must state: cores, memory, CPU model and versions."""
    import onnxruntime

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if ln.startswith("Model name")
        ),
        platform.processor(),
    )
    mem_kib = next(
        int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "triton": "2.51.0 (nvidia-pytriton 0.7.0)",
    }


def main(argv: list[str] | None = None) -> int:
    from littlebig.cli import add_serve_options, serve_options
    from littlebig.model_repository.generate import generate
    from littlebig.model_repository.server import Ports, TritonServer

    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, default=Path("build"))
    ap.add_argument("--perf-venv", type=Path, default=Path(".venv-perf"))
    ap.add_argument("--out", type=Path, help="bench JSON (default BUILD/bench.json; the PNG goes beside it)")
    ap.add_argument("--images", type=int, default=512, help="real Fashion-MNIST test images to send")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32")
    ap.add_argument("--interval-ms", type=int, default=1500, help="perf_analyzer measurement window (minimum)")
    ap.add_argument("--offline-seconds", type=float, default=1.5)
    ap.add_argument("--bls-model", type=Path, help="experiment: serve this file as littlebig's model.py")
    ap.add_argument("--classifier-model", type=Path, help="experiment: serve this file as little's and big's model.py")
    add_serve_options(ap, build=False)  # the same deployment flags, parsed in one place, as `littlebig serve`
    args = ap.parse_args(argv)

    started = time.monotonic()
    batches = tuple(int(b) for b in args.batches.split(","))
    concurrencies = tuple(int(c) for c in args.concurrency.split(","))
    out = args.out or args.build / "bench.json"
    work = out.parent / f"{out.stem}-work"
    work.mkdir(parents=True, exist_ok=True)
    opts = serve_options(args)
    pa = PerfAnalyzer(args.perf_venv)
    pa_version = pa.version()

    exported = read_export(args.build)
    data = load_split("test", exported["data_dir"], tuple(exported["service_size"]))
    images = data.images[: args.images]
    input_data = write_input_data(images, work / "input-data.json")
    repo = work / "model_repository"
    summary_repo = generate(args.build, repo, "cpu", opts)
    overrides = override_models(repo, args.bls_model, args.classifier_model)
    p = offline_escalation(args.build, images, summary_repo["threshold"])
    offline = offline_floor(args.build, images, (1, 32), args.offline_seconds)

    server = TritonServer(repo, Ports.free(), log_file=work / "tritonserver.log")
    with server.start():
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports.grpc}")
        warm_up(client, images, batches)
        client.close()
        rows = sweep(pa, server.ports.grpc, input_data, work, batches, concurrencies, Window(args.interval_ms))

    summary = summarise(rows, p, batches)
    result = {
        "speedup_vs_big": summary["speedup_vs_big"],
        "fraction_of_ideal": summary["fraction_of_ideal"],
        "bls_overhead_ms": summary["bls_overhead_ms"],
        "escalation_rate": p,
        "targets": {"speedup_vs_big": 3.0, "fraction_of_ideal": 0.85, "bls_overhead_ms": 1.0},
        "summary": summary,
        "threshold": summary_repo["threshold"],
        "rule": summary_repo["rule"],
        "serve_options": summary_repo["options"],
        "model_overrides": overrides,
        "images": {"split": "test", "count": len(images), "service_size": exported["service_size"]},
        "models": {role: exported[role]["name"] for role in ROLES},
        "offline_floor": offline,
        "table": rows,
        "perf_analyzer": {
            "version": pa_version,
            "protocol": "grpc",
            "window": dataclasses.asdict(Window(args.interval_ms)),
        },
        "machine": machine(),
        "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    out.write_text(json.dumps(result, indent=2))
    plot(rows, summary, batches, out.with_suffix(".png"))
    print_table(offline, rows, summary)
    print(f"\nwrote {out} and {out.with_suffix('.png')} in {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
