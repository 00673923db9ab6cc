"""Alternating A/B of littlebig deployments on one server: throughput under load and the c1 b1 BLS overhead.

Usage: python -m bench.ab --build build --variant '{"big_instances": 2}' --variant '{"big_instances": 2,
"little_in_process": true}' --rounds 3

Each round measures every variant in turn (load, screen points, composing little/big at c1 b1, unload), so
background load hits them alike; the medians over rounds are printed and written to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from tqdm import tqdm

from bench import search as S
from bench.common import load_test_images, parse_points, snapshot, warm_up
from bench.perf import PerfAnalyzer, Window
from bench.rates import bls_overhead


def main(argv: list[str] | None = None) -> int:
    import tritonclient.grpc as grpcclient

    from littlebig.model_repository.server import Ports, TritonServer

    ap = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, default=Path("build"))
    ap.add_argument("--perf-venv", type=Path, default=Path(".venv-perf"))
    ap.add_argument("--variant", action="append", required=True, help="littlebig ServeOptions fields, JSON")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--points", default="8x16,1x16,1x1")
    ap.add_argument("--window-ms", type=int, default=1000)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("build/bench-ab.json"))
    args = ap.parse_args(argv)

    work = args.out.parent / f"{args.out.stem}-work"
    work.mkdir(parents=True, exist_ok=True)
    build = snapshot(args.build, work / "build")
    _, images, input_data = load_test_images(build, work, args.images)
    cands = [S.candidate(S.BLS, "ab", **json.loads(v)) for v in args.variant]
    points = parse_points(args.points)
    repo, scratch = work / "model_repository", work / "generated"
    for d in (repo, scratch):
        if d.exists():
            import shutil

            shutil.rmtree(d)
        d.mkdir(parents=True)
    window = Window(args.window_ms)
    rows = []
    server = TritonServer(repo, Ports.free(), log_file=work / "tritonserver.log",
                          extra_args=["--model-control-mode=explicit"], restricted_apis=())  # fmt: skip
    with server.start():
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports.grpc}")
        search = S.Search(
            build=build, repo=repo, scratch=scratch, pa=PerfAnalyzer(args.perf_venv), client=client, server=server,
            url=f"127.0.0.1:{server.ports.grpc}", input_data=input_data, work=work,
            warm=lambda model, b: warm_up(client, images, model, b),
        )  # fmt: skip
        plan = [(r, c) for r in range(args.rounds) for c in cands]
        for rnd, cand in tqdm(plan, desc="A/B", unit="variant"):
            search.load(cand, (1, 8))
            for b, c in points:
                rows.append({"round": rnd, **search.point(cand, b, c, window)})
            for model in cand.composing():
                rows.append({"round": rnd, **search.point(cand, 1, 1, window, model=model)})
            search.unload(cand)
        client.close()

    result = {"variants": [c.opts() for c in cands], "points": args.points, "rows": rows, "summary": []}
    for cand in cands:
        mine = [r for r in rows if r["candidate"] == cand.name]
        little, big = cand.composing()
        esc = sum(r["escalated_rows"] for r in mine if r["role"] == S.BLS)
        p = esc / max(sum(r["server"][cand.name]["rows"] for r in mine if r["role"] == S.BLS), 1)
        med = {}
        for b, c in points:
            at = [r for r in mine if r["model"] == cand.name and r["batch"] == b and r["concurrency"] == c]
            med[f"b{b}c{c}_img_s"] = statistics.median(r["throughput"] for r in at)
            med[f"b{b}c{c}_mean_ms"] = statistics.median(r["avg_us"] / 1e3 for r in at)

        def mean_ms(model, mine=mine):
            return statistics.median(r["avg_us"] / 1e3 for r in mine if r["model"] == model)

        b1c1 = med.get("b1c1_mean_ms", float("nan"))
        med["bls_overhead_mean_ms"] = bls_overhead(b1c1, mean_ms(little), mean_ms(big), p)
        med["p"] = p
        result["summary"].append({"variant": cand.opts(), **med})
        print(json.dumps({"variant": cand.opts(), **{k: round(v, 3) for k, v in med.items()}}))
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
