"""`make demo`: the whole job through the real server, after export, calibration and the offline report.

Starts the embedded tritonserver on free loopback ports, runs the test split through littlebig, little
and big with the gRPC client, prints the summary table, writes build/demo.json and stops the server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from littlebig.atomic import write_json

MODELS = ("little", "big", "littlebig")


def run_demo(build: Path, batch_size: int = 32, concurrency: int = 8) -> dict[str, Any]:
    from littlebig.client.evaluate import evaluate
    from littlebig.export.macs import macs_saved
    from littlebig.export.report import format_table
    from littlebig.model_repository.generate import generate
    from littlebig.model_repository.server import Ports, TritonServer

    repo = build / "model_repository"
    if not (repo / "littlebig" / "config.pbtxt").exists():
        generate(build, repo, "cpu")
    report = json.loads((build / "report.json").read_text())
    start = time.perf_counter()
    with TritonServer(repo, Ports.free(), log_file=build / "demo-tritonserver.log") as server:
        print(f"tritonserver ready on 127.0.0.1 (gRPC {server.ports.grpc}) in {time.perf_counter() - start:.1f} s")
        url = f"127.0.0.1:{server.ports.grpc}"
        served = {m: evaluate(url, m, batch_size=batch_size, concurrency=concurrency, build=build) for m in MODELS}
    rule = report["serve_rule"]
    offline = {
        "little": report["little"]["test_acc"],
        "big": report["big"]["test_acc"],
        "littlebig": report["rules"][rule]["test_acc"],
    }
    rows = [("model", "served acc", "offline acc", "escalated", "MACs saved", "images/s", "equals offline")]
    for m in MODELS:
        s = served[m]
        little_alone = macs_saved(report["little"]["macs"], report["big"]["macs"], escalation_rate=0.0)
        saved = s.get("macs_saved", 0.0 if m == "big" else little_alone)
        label = f"littlebig ({rule}, T={report['rules'][rule]['threshold']:.4f})" if m == "littlebig" else m
        rows.append(
            (
                label,
                f"{s['accuracy']:.4f}",
                f"{offline[m]:.4f}",
                f"{s['escalation_rate']:.1%}" if m == "littlebig" else "-",
                f"{saved:.1%}",
                f"{s['images_per_s']:.0f}",
                "yes" if s.get("matches_offline") else "NO",
            )
        )
    speedup = served["littlebig"]["images_per_s"] / served["big"]["images_per_s"]
    print(format_table(rows))
    print(
        f"served littlebig vs big alone: {speedup:.2f}x images/s (batch {batch_size}, {concurrency} in flight); "
        f"trade-off plot: {build / 'tradeoff.png'}"
    )
    result = {
        "served": served,
        "offline": offline,
        "speedup_vs_big": speedup,
        "ok": all(served[m].get("matches_offline", False) for m in MODELS),
    }
    write_json(build / "demo.json", result)
    return result
