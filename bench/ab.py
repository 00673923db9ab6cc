"""Alternating A/B of littlebig deployments on one server: throughput under load and the c1 b1 BLS overhead.

Usage: python -m bench.ab --build build --variant '{"big_instances": 2}' --variant '{"big_instances": 2,
"little_in_process": true}' --rounds 3

Each round measures every variant in turn (load, screen points, composing little/big at c1 b1, unload), so
background load hits them alike; the medians over rounds are printed and written to --out.

``--code REV`` adds the first variant once more with the BLS model's code (model.py and the modules installed
beside it) of git revision REV: the served cascade before and after a code change, side by side in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
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
    ap.add_argument("--code", action="append", default=[], metavar="REV",
                    help="also the first variant with the BLS code of git revision REV")  # fmt: skip
    args = ap.parse_args(argv)
    revs = {rev: bls_code(rev) for rev in args.code}  # read first: a bad REV fails before any work

    work = args.out.parent / f"{args.out.stem}-work"
    work.mkdir(parents=True, exist_ok=True)
    build = snapshot(args.build, work / "build")
    _, images, input_data = load_test_images(build, work, args.images)
    cands = [S.candidate(S.BLS, "ab", **json.loads(v)) for v in args.variant]
    at_rev = {rev: dataclasses.replace(cands[0], variant=f"at_{rev}") for rev in revs}
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
        for rev, cand in at_rev.items():  # installed by hand, so load() finds it and keeps REV's code
            search.summaries[cand.name] = S.install(build, repo, cand, scratch)
            search.installed[cand.name] = cand
            for name, text in revs[rev].items():
                (repo / cand.name / "1" / name).write_text(text)
        cands += list(at_rev.values())
        plan = [(r, c) for r in range(args.rounds) for c in cands]
        for rnd, cand in tqdm(plan, desc="A/B", unit="variant"):
            search.load(cand, (1, 8))
            for b, c in points:
                rows.append({"round": rnd, **search.point(cand, b, c, window)})
            for model in cand.composing():
                rows.append({"round": rnd, **search.point(cand, 1, 1, window, model=model)})
            search.unload(cand)
        client.close()

    result = {"variants": [c.opts() for c in cands], "code": {c.name: rev for rev, c in at_rev.items()},
              "points": args.points, "rows": rows, "summary": []}  # fmt: skip
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
            # the BLS model's own time per execute (exec less the waits on its stages: bench.search.bls_own)
            med[f"b{b}c{c}_bls_own_ms"] = statistics.median(r["bls"]["own_ms"] for r in at)

        def mean_ms(model, mine=mine):
            return statistics.median(r["avg_us"] / 1e3 for r in mine if r["model"] == model)

        b1c1 = med.get("b1c1_mean_ms", float("nan"))
        med["bls_overhead_mean_ms"] = bls_overhead(b1c1, mean_ms(little), mean_ms(big), p)
        med["p"] = p
        code = next((rev for rev, c in at_rev.items() if c is cand), "working tree")
        result["summary"].append({"variant": cand.opts(), "code": code, **med})
        print(json.dumps({"variant": cand.opts(), "code": code, **{k: round(v, 3) for k, v in med.items()}}))
    args.out.write_text(json.dumps(result, indent=2))
    return 0


def bls_code(rev: str) -> dict[str, str]:
    """The files of the BLS model's folder at git revision ``rev``: its model.py and the littlebig modules it imports,
    directly or through each other (the ones the generator of that revision installed beside it)."""
    import ast

    def show(path: str) -> str:
        try:
            return subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout
        except subprocess.CalledProcessError as exc:
            raise SystemExit(f"bench.ab: --code {rev}: {exc.stderr.strip()}") from None

    def imported(source: str) -> set[str]:
        nodes = list(ast.walk(ast.parse(source)))
        names = {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
        return names | {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module and not n.level}

    listed = subprocess.run(["git", "ls-tree", "--name-only", rev, "littlebig/"], capture_output=True, text=True)
    modules = {Path(p).stem for p in listed.stdout.split() if p.endswith(".py")}
    files, todo = {}, [("model.py", "model_repository/littlebig/model.py")]
    while todo:
        name, path = todo.pop()
        files[name] = show(path)
        todo += [(f"{m}.py", f"littlebig/{m}.py") for m in imported(files[name]) & modules if f"{m}.py" not in files]
    return files


if __name__ == "__main__":
    sys.exit(main())
