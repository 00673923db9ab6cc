"""Best against best: search each model's deployment space within a time budget.

Every candidate is a ``ServeOptions`` the generator offers. It is generated as usual and installed in one
explicit-model-control repository under its own name (a littlebig candidate gets its own copies of little
and big, named after it), so candidates load and unload on one server and finalists are served side by side.

1. Screen: each candidate on a few points with short perf_analyzer windows, one at a time. The littlebig
   space is searched in two stages: a small grid that matters on 2 cores (BLS, big instances, threads), then
   single changes (queue delay, max batch, big's chunk size, BLS instances) around the grid's leader.
2. Confirm: the top candidates of each role, all loaded together, over the whole batch x concurrency sweep,
   interleaved so background load hits every model alike. Each role's best is picked per point.

The screen stops taking candidates when its share of the budget is spent; the confirmation fits its window
length and finalist count to what is left. Both are recorded in the search table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tqdm import tqdm

from bench.perf import PerfAnalyzer, PerfAnalyzerError, Window, measure
from bench.rates import bls_overhead, bound, ideal
from littlebig.decision import CASCADE
from littlebig.decision import ROLES as PAIR

BLS = CASCADE
ROLES = (*PAIR, BLS)
STAT_KEYS = ("success", "queue", "compute_input", "compute_infer", "compute_output")
#: Which ServeOptions fields each role's own deployment depends on (the rest do not change it).
ROLE_FIELDS = {
    "little": ("little_instances", "intra_op_threads", "max_batch_size", "queue_delay_us"),
    "big": ("big_instances", "intra_op_threads", "big_max_batch_size", "queue_delay_us"),
    # a cascade's middle stage is deployed with big's settings (ServeOptions.role_max_batch / role_instances)
    "middle": ("big_instances", "intra_op_threads", "big_max_batch_size", "queue_delay_us"),
    BLS: (
        "bls_instances",
        "little_instances",
        "big_instances",
        "intra_op_threads",
        "max_batch_size",
        "big_max_batch_size",
        "queue_delay_us",
        "little_in_process",
    ),
}
#: Options a littlebig candidate may also set that watch the answers rather than deploy the models (an A/B of
#: shadow sampling or the accuracy guard): appended after ROLE_FIELDS, so no search name changes.
WATCH_FIELDS = ("shadow_rate", "guard", "guard_eps")
SHORT = {
    "bls_instances": "bls",
    "little_instances": "li",
    "big_instances": "bi",
    "intra_op_threads": "t",
    "max_batch_size": "mb",
    "big_max_batch_size": "bmb",
    "queue_delay_us": "q",
    "little_in_process": "lip",
    "shadow_rate": "sr",
    "guard": "g",
    "guard_eps": "ge",
}


@dataclass(frozen=True)
class Candidate:
    """One deployment of one role: the ServeOptions fields it sets (the rest are the defaults).

    A littlebig candidate serves a cascade of ``stages`` (little, [middle...,] big), each its own copy. ``build``
    (None: the search's) and ``variant`` let one search hold cascades of several builds (``bench/stages.py``: the
    two-stage and the three-stage one): ``variant`` tells their names apart.
    """

    role: str
    options: tuple[tuple[str, Any], ...]
    stage: str = "grid"
    stages: tuple[str, ...] = PAIR
    variant: str = ""
    build: Path | None = None

    @property
    def name(self) -> str:
        """The served model name: role (and variant) and settings, e.g. ``big__bi2_t1``, ``littlebig_three__bls2``."""
        role = f"{self.role}_{self.variant}" if self.variant else self.role
        return f"{role}__" + "_".join(f"{SHORT.get(k, k)}{v}" for k, v in self.options)

    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    def composing(self) -> tuple[str, ...] | None:
        """A littlebig candidate's own stage models, cheapest first (little, [middle...,] big)."""
        return tuple(f"{self.name}__{s}" for s in self.stages) if self.role == BLS else None

    def callees(self) -> dict[str, str]:
        """A littlebig candidate's stage -> its own model of that stage."""
        return dict(zip(self.stages, self.composing() or (), strict=True))

    def models(self) -> list[str]:
        """Every model this candidate serves, composing ones first (load order)."""
        return [*(self.composing() or ()), self.name]


def candidate(role: str, stage: str = "grid", **options: Any) -> Candidate:
    """A candidate with its options in ROLE_FIELDS order (so equal settings give equal names)."""
    allowed = ROLE_FIELDS[role] + (WATCH_FIELDS if role == BLS else ())
    unknown = set(options) - set(allowed)
    if unknown:
        raise ValueError(f"{role} candidates do not depend on {sorted(unknown)}")
    return Candidate(role, tuple((k, options[k]) for k in allowed if k in options), stage)


def grid(defaults: dict[str, Any]) -> dict[str, list[Candidate]]:
    """The first-stage candidates: the settings known to matter on 2 cores, cheapest first.

    little and big alone: 1 instance x 1 thread, 2 instances x 1 thread, 1 instance x 2 threads.
    littlebig: BLS 1-2 x big instances 1-2 x onnxruntime threads 1-2, little on 1 instance.
    """
    base = {k: defaults[k] for k in ("max_batch_size", "big_max_batch_size", "queue_delay_us")}
    out: dict[str, list[Candidate]] = {}
    for role, inst in (("little", "little_instances"), ("big", "big_instances")):
        keep = {k: v for k, v in base.items() if k in ROLE_FIELDS[role]}
        out[role] = [candidate(role, **{inst: i, "intra_op_threads": t}, **keep) for i, t in ((1, 1), (2, 1), (1, 2))]
    out[BLS] = [
        candidate(BLS, bls_instances=b, little_instances=1, big_instances=g, intra_op_threads=t, **base)
        for t in (1, 2)
        for g in (1, 2)
        for b in (2, 1)
    ]
    return out


def refinements(leader: Candidate) -> list[Candidate]:
    """Second stage: one change at a time around the littlebig grid's leader (batching, chunking, BLS)."""
    o = leader.opts()
    changes = [
        {"queue_delay_us": 500},
        {"queue_delay_us": 0},
        {"max_batch_size": 2 * o["max_batch_size"]},
        {"big_max_batch_size": 2 * o["big_max_batch_size"]},
        {"big_max_batch_size": max(1, o["big_max_batch_size"] // 2)},
        {"bls_instances": o["bls_instances"] + 1},
        # little as its own Triton model (one Python-backend hop more per execute) against the default, in process
        {"little_in_process": not o.get("little_in_process", True)},
    ]
    return [
        dataclasses.replace(
            candidate(BLS, "refine", **{**o, **c}), stages=leader.stages, variant=leader.variant, build=leader.build
        )  # fmt: skip
        for c in changes
        if any(o.get(k) != v for k, v in c.items())
    ]


# ---------------------------------------------------------------- repository ---------------------------------------
def _rename(src: Path, dst: Path, name: str, params: dict[str, str] | None = None) -> None:
    """Copy a generated model directory under another name (config name and, for the BLS, its callees)."""
    from tritonclient.grpc import model_config_pb2 as mc

    from littlebig.model_repository.generate import write_config

    shutil.copytree(src, dst)
    config = text_format.Parse((dst / "config.pbtxt").read_text(), mc.ModelConfig())
    config.name = name
    for key, value in (params or {}).items():
        config.parameters[key].string_value = value
    write_config(config, dst)


def install(build: Path, repo: Path, cand: Candidate, scratch: Path, base: dict | None = None) -> dict[str, Any]:
    """Generate ``cand``'s deployment (over ``base`` options; from ``cand.build`` where it names one) and install
    its models in ``repo``; its summary. A littlebig candidate's BLS model calls its own stage models
    (``stage_models``, what model.py reads)."""
    from littlebig.model_repository.generate import ServeOptions, generate

    gen = scratch / cand.name
    summary = generate(cand.build or build, gen, "cpu", ServeOptions(**{**(base or {}), **cand.opts()}))
    if cand.role != BLS:
        _rename(gen / cand.role, repo / cand.name, cand.name)
    else:
        if tuple(summary.get("stages", PAIR)) != cand.stages:
            raise ValueError(f"{cand.name}: the build serves the stages {summary.get('stages')}, not {cand.stages}")
        callees = cand.callees()
        for stage, model in callees.items():
            _rename(gen / stage, repo / model, model)
        params = {"stage_models": json.dumps(list(callees.values()))}
        _rename(gen / BLS, repo / cand.name, cand.name, params)
    shutil.rmtree(gen)
    return summary


# ---------------------------------------------------------------- statistics ---------------------------------------
def server_stats(client, model: str) -> dict[str, int]:
    """Cumulative counters of one model: rows, executions, ns/count per stage, and execution time (batch_stats)."""
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    out = {"inference_count": int(s.get("inference_count", 0)), "execution_count": int(s.get("execution_count", 0))}
    for key in STAT_KEYS:
        stage = s["inference_stats"].get(key, {})
        out[f"{key}_ns"] = int(stage.get("ns", 0))
        out[f"{key}_count"] = int(stage.get("count", 0))
    # Per execution (not per request): the time of every execute, whatever batch it ran.
    stages = ("compute_input", "compute_infer", "compute_output")
    out["exec_ns"] = sum(int(b.get(k, {}).get("ns", 0)) for b in s.get("batch_stats", []) for k in stages)
    return out


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """One model over one point: rows, executions, requests, ms per request per stage, ms per execution."""
    d = {k: after[k] - before[k] for k in after}
    requests = max(d["success_count"], 1)
    executions = max(d["execution_count"], 1)
    out = {
        "rows": d["inference_count"],
        "executions": d["execution_count"],
        "requests": d["success_count"],
        "avg_batch": d["inference_count"] / executions,
        "request_ms": d["success_ns"] / requests / 1e6,
        "exec_ms": d["exec_ns"] / executions / 1e6,
        "request_total_ms": d["success_ns"] / 1e6,
        "exec_total_ms": d["exec_ns"] / 1e6,
    }
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        out[f"{key}_ms"] = d[f"{key}_ns"] / requests / 1e6
    return out


def bls_own(stats: dict[str, dict[str, float]], bls: str, callees: dict[str, str]) -> dict[str, float]:
    """Per littlebig execute: its time, the part spent waiting on each stage's model, and its own rest.

    ``callees``: stage -> model, cheapest first (little, [middle...,] big). The wait on a model is its request time
    as Triton sees it (``success``: queue + compute). little gets one request per execute. A later stage's chunks
    of one execute are sent together and run in parallel, so the wait on it is one chunk's request time times the
    share of executes that sent it anything (at most one chunk per execute is counted); the stages run one after
    another, so their waits add. The rest is the BLS model's own work: parsing, the rule, merging, responses,
    metrics, and the IPC of its calls and of its own execute; with little in process (the cpu default), little's
    own onnxruntime run too (the wait on the little model is then 0). Keys: ``exec_ms``, ``in_<stage>_ms`` each,
    ``own_ms`` (two stages: ``in_little_ms`` and ``in_big_ms``).
    """
    n = max(stats[bls]["executions"], 1)
    exec_ms = stats[bls]["exec_total_ms"] / n
    waits = {}
    for i, (stage, model) in enumerate(callees.items()):
        if i == 0:
            waits[stage] = stats[model]["request_total_ms"] / n
        else:
            waits[stage] = stats[model]["request_ms"] * min(1.0, stats[model]["requests"] / n)
    return {"exec_ms": exec_ms, **{f"in_{s}_ms": w for s, w in waits.items()}, "own_ms": exec_ms - sum(waits.values())}


def stage_rows(metrics, model: str) -> dict[str, float]:
    """``littlebig_stage_rows_total`` of one BLS model, per stage (rows each stage answered), from a scrape of the
    metrics port (``littlebig.metrics_text.Metrics``)."""
    return metrics.by("littlebig_stage_rows_total", "stage", model=model)


# ---------------------------------------------------------------- budget -------------------------------------------
@dataclass
class Budget:
    """The search's time budget, split between the screen and the confirmation."""

    total_s: float
    screen_share: float = 0.4
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def screen_left(self) -> float:
        return self.screen_share * self.total_s - self.elapsed()

    def left(self) -> float:
        return self.total_s - self.elapsed()


def confirm_plan(
    seconds: float,
    points_per_finalist: int,
    roles: int,
    overhead_s: float,
    trials: int = 3,
    max_finalists: int = 2,
    window_ms: tuple[int, int] = (400, 1500),
) -> tuple[int, int]:
    """(finalists per role, window ms) that fit ``seconds``: the most finalists whose windows reach 600 ms."""
    for k in range(max_finalists, 0, -1):
        points = k * roles * points_per_finalist
        window = (seconds / points - overhead_s) / trials * 1000
        if window >= 600 or k == 1:
            return k, int(min(max(window, window_ms[0]), window_ms[1]))
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- the search ---------------------------------------
@dataclass
class Search:
    """One server in explicit model-control mode; candidates are installed, loaded and measured on it."""

    build: Path
    repo: Path
    scratch: Path
    pa: PerfAnalyzer
    client: Any
    server: Any
    url: str
    input_data: Path
    work: Path
    warm: Any  # callable(model, batches): a few requests so no window pays for first-call set-up
    base: dict[str, Any] = field(default_factory=dict)  # ServeOptions every candidate starts from
    metrics_url: str | None = None  # where set: each littlebig point also records littlebig_stage_rows_total
    installed: dict[str, Candidate] = field(default_factory=dict)
    summaries: dict[str, dict] = field(default_factory=dict)
    point_seconds: list[tuple[float, float]] = field(default_factory=list)  # (wall s, window s) per point
    last_p99_ms: dict[tuple[str, int, int], float] = field(default_factory=dict)  # (role, batch, conc) -> p99

    def load(self, cand: Candidate, batches: tuple[int, ...]) -> None:
        if cand.name not in self.installed:
            self.summaries[cand.name] = install(self.build, self.repo, cand, self.scratch, self.base)
            self.installed[cand.name] = cand
        for model in cand.models():
            self.client.load_model(model)
        self.warm(cand.name, batches)

    def unload(self, cand: Candidate, timeout: float = 20.0) -> None:
        for model in cand.models():
            try:
                self.client.unload_model(model)
            except Exception:  # never loaded (its load failed): nothing to unload
                pass
        deadline = time.monotonic() + timeout  # its stubs must be gone before the next one is measured
        while time.monotonic() < deadline and self._stubs(cand.models()):
            time.sleep(0.1)

    def _stubs(self, models: list[str]) -> bool:
        """Whether any Python-backend stub of these models is still running (argv[1]: <repo>/<model>/1/model.py)."""
        from littlebig.model_repository.server import children

        names = set(models)
        procs = children(self.server.process.pid).values() if self.server.process else []
        return any(
            len(a) > 1 and "python_backend_stub" in a[0] and Path(a[1]).parent.parent.name in names for a in procs
        )

    def point(self, cand: Candidate, batch: int, conc: int, window: Window, model: str | None = None) -> dict:
        """perf_analyzer on one candidate (or one of its composing models) with the server's stats deltas."""
        from littlebig.metrics_text import fetch

        target = model or cand.name
        watched = cand.models() if model is None else [target]
        cascade = cand.role == BLS and model is None
        scrape = cascade and self.metrics_url is not None
        before = {m: server_stats(self.client, m) for m in watched}
        answered_before = stage_rows(fetch(self.metrics_url), cand.name) if scrape else {}
        t0 = time.monotonic()
        composing = list(cand.composing()) if cascade else None
        # perf_analyzer fails on a model never called: little in process (the cpu default) is never called
        if composing and cand.opts().get("little_in_process", True):
            composing = composing[1:]
        p = measure(self.pa, self.url, target, batch, conc, self.input_data, self.work, window, composing=composing)
        self.point_seconds.append((time.monotonic() - t0, window.interval_ms / 1000))
        after = {m: server_stats(self.client, m) for m in watched}
        stats = {m: stats_delta(before[m], after[m]) for m in watched}
        row = {**p.as_dict(), "model": target, "role": cand.role if model is None else "composing",
               "candidate": cand.name, "options": cand.opts(), "server": stats,
               "wall_s": round(self.point_seconds[-1][0], 2)}  # fmt: skip
        if cascade:
            callees = cand.callees()
            row["bls"] = bls_own(stats, cand.name, callees)
            row["escalated_rows"] = stats[callees["big"]]["rows"]
            # rows that reached each stage: little sees every row (in process or not), a later stage what it ran
            row["stage_reach_rows"] = {s: stats[cand.name if i == 0 else m]["rows"]
                                       for i, (s, m) in enumerate(callees.items())}  # fmt: skip
            if scrape:
                answered = stage_rows(fetch(self.metrics_url), cand.name)
                row["stage_rows"] = {s: answered.get(s, 0.0) - answered_before.get(s, 0.0) for s in cand.stages}
        return row

    def failed_point(self, cand: Candidate, batch: int, conc: int, model: str | None, exc: Exception) -> dict:
        """A point perf_analyzer could not measure: 0 img/s, NaN latencies, and why."""
        nan = float("nan")
        target = model or cand.name
        row = {"model": target, "batch": batch, "concurrency": conc, "throughput": 0.0, "stable": False,
               **dict.fromkeys(("p50_us", "p90_us", "p95_us", "p99_us", "avg_us"), nan),
               "role": cand.role if model is None else "composing", "candidate": cand.name, "options": cand.opts(),
               "server": {}, "failed": str(exc)[-500:]}  # fmt: skip
        if cand.role == BLS and model is None:
            keys = ("exec_ms", *(f"in_{s}_ms" for s in cand.stages), "own_ms")
            row["bls"] = dict.fromkeys(keys, nan)
            row["escalated_rows"] = 0
            row["stage_reach_rows"] = dict.fromkeys(cand.stages, 0)
        return row

    def overhead_s(self) -> float:
        """perf_analyzer's fixed cost per point beyond its 3 windows, as measured so far (1.5 s before any)."""
        if not self.point_seconds:
            return 1.5
        return max(0.3, sum(w - 3 * i for w, i in self.point_seconds) / len(self.point_seconds))


def screen_score(rows: list[dict]) -> float:
    """Geometric mean of a candidate's screened throughputs under load (concurrency > 1 where screened).

    Concurrency-1 points are screened for latency (the c1 b1 mean of every alternative), not ranked on.
    """
    loaded = [r for r in rows if r["concurrency"] > 1] or rows
    return math.exp(sum(math.log(max(r["throughput"], 1e-9)) for r in loaded) / len(loaded)) if loaded else 0.0


def screen(
    search: Search,
    cands: list[Candidate],
    points: list[tuple[int, int]],
    window: Window,
    budget: Budget,
    batches: tuple[int, ...],
    bar: tqdm,
    keep_first: bool = True,
) -> list[dict]:
    """Each candidate alone on the screen points; stops taking candidates when the screen's budget is spent
    (``keep_first``: candidates run until one has measured, so every role has a finalist)."""
    results = []
    for cand in cands:
        if budget.screen_left() <= 0 and (any("score" in r for r in results) or not keep_first):
            results.append({"candidate": cand.name, "role": cand.role, "stage": cand.stage,
                            "options": cand.opts(), "skipped": "screen budget spent"})  # fmt: skip
            bar.update(1)
            continue
        try:
            search.load(cand, batches)
            rows = []
            for b, c in points:  # a window holds a few requests even where latency is high (big, b8 c16)
                prev = search.last_p99_ms.get((cand.role, b, c), 0.0)
                w = dataclasses.replace(window, interval_ms=int(min(max(window.interval_ms, 2 * prev), 4000)))
                rows.append(search.point(cand, b, c, w))
                search.last_p99_ms[(cand.role, b, c)] = rows[-1]["p99_us"] / 1000
        except Exception as exc:  # a candidate that cannot serve is a result, not the end of the search
            why = f"failed: {type(exc).__name__}: {exc}"[:500]
            results.append({"candidate": cand.name, "role": cand.role, "stage": cand.stage,
                            "options": cand.opts(), "skipped": why})  # fmt: skip
            bar.update(1)
            continue
        finally:
            search.unload(cand)
        results.append({"candidate": cand.name, "role": cand.role, "stage": cand.stage, "options": cand.opts(),
                        "score": screen_score(rows), "points": rows})  # fmt: skip
        bar.update(1)
        bar.set_postfix_str(f"{cand.name} {screen_score(rows):.0f} img/s")
    return results


def ranked(results: list[dict], role: str) -> list[dict]:
    return sorted((r for r in results if r["role"] == role and "score" in r), key=lambda r: -r["score"])


def confirm(
    search: Search,
    finalists: list[Candidate],
    batches: tuple[int, ...],
    concurrencies: tuple[int, ...],
    window: Window,
    composing_points: bool = True,
) -> list[dict]:
    """Every finalist over the whole sweep, interleaved per (batch, concurrency); with ``composing_points``,
    littlebig's composing models at concurrency 1, batch 1 too (the BLS overhead compares against exactly the
    models it calls)."""
    for cand in finalists:
        search.load(cand, batches)
    rows: list[dict] = []
    last_p99_ms: dict[tuple[str, int], float] = {}
    plan = [(b, c, cand) for b in batches for c in concurrencies for cand in finalists]
    b1, c1 = min(batches), min(concurrencies)
    extra = [(b1, c1, cand, m) for cand in finalists if cand.role == BLS and composing_points for m in cand.composing()]
    for item in tqdm([*plan, *extra], desc="confirm", unit="point"):
        b, c, cand = item[:3]
        model = item[3] if len(item) > 3 else None
        key = (model or cand.name, b)
        # windows long enough to hold several requests even where latency is high (big, batch 8, c32)
        interval = int(min(max(window.interval_ms, 2 * last_p99_ms.get(key, 0.0)), 6000))
        try:
            row = search.point(cand, b, c, dataclasses.replace(window, interval_ms=interval), model=model)
        except PerfAnalyzerError as exc:  # one failed point is recorded (0 img/s), not the end of the run
            row = search.failed_point(cand, b, c, model, exc)
        last_p99_ms[key] = row["p99_us"] / 1000
        rows.append(row)
    for cand in finalists:
        search.unload(cand)
    return rows


# ---------------------------------------------------------------- summary ------------------------------------------
def best_of(rows: list[dict], role: str, **where: int) -> dict:
    mine = [r for r in rows if r["role"] == role and all(r[k] == v for k, v in where.items())]
    return max(mine, key=lambda r: r["throughput"])


def served_p(rows: list[dict], cand_name: str) -> tuple[float, int]:
    """p from the server's own counts: big's rows over littlebig's, over every point of one littlebig candidate."""
    mine = [r for r in rows if r["role"] == BLS and r["candidate"] == cand_name]
    rows_in = sum(r["server"][cand_name]["rows"] for r in mine if r["server"])
    return sum(r["escalated_rows"] for r in mine) / max(rows_in, 1), rows_in


def summarise(rows: list[dict], batches: tuple[int, ...], concurrencies: tuple[int, ...], headline: int) -> dict:
    """Per point and per batch: each role's best, R*, littlebig / big-best, littlebig / R*, the bound."""
    lb_names = {r["candidate"] for r in rows if r["role"] == BLS}
    p_by = {n: served_p(rows, n) for n in lb_names}
    per_point = []
    for b in batches:
        for c in concurrencies:
            best = {role: best_of(rows, role, batch=b, concurrency=c) for role in ROLES}
            p = p_by[best[BLS]["candidate"]][0]
            r = {role: best[role]["throughput"] for role in ROLES}
            star = ideal(r["little"], r["big"], p)
            per_point.append({
                "batch": b, "concurrency": c, "p": p, "ideal_throughput": star,
                "best": {role: {"throughput": r[role], "candidate": best[role]["candidate"]} for role in ROLES},
                "speedup_vs_big_best": r[BLS] / r["big"], "fraction_of_ideal": r[BLS] / star,
                "bound": bound(r["little"], r["big"], p),
            })  # fmt: skip
    per_batch = {}
    for b in batches:
        best = {role: best_of(rows, role, batch=b) for role in ROLES}
        p = p_by[best[BLS]["candidate"]][0]
        r = {role: best[role]["throughput"] for role in ROLES}
        star = ideal(r["little"], r["big"], p)
        per_batch[str(b)] = {
            "best": {
                role: {"throughput": r[role], "concurrency": best[role]["concurrency"],
                       "candidate": best[role]["candidate"], "options": best[role]["options"]}
                for role in ROLES
            },
            "p": p, "ideal_throughput": star, "speedup_vs_big_best": r[BLS] / r["big"],
            "fraction_of_ideal": r[BLS] / star, "bound": bound(r["little"], r["big"], p),
        }  # fmt: skip
    head = per_batch[str(headline)]
    winner = head["best"][BLS]["candidate"]
    # BLS overhead at c1 b1 on mean latencies: the winning littlebig and exactly the little and big it calls.
    b1, c1 = min(batches), min(concurrencies)
    little, big = f"{winner}__little", f"{winner}__big"
    at = {r["model"]: r for r in rows if r["batch"] == b1 and r["concurrency"] == c1}
    p_win, rows_win = p_by[winner]
    named = {BLS: winner, "little": little, "big": big}
    mean = {role: at[m]["avg_us"] / 1e3 for role, m in named.items()}
    p50 = {role: at[m]["p50_us"] / 1e3 for role, m in named.items()}
    return {
        "headline_batch": headline,
        "speedup_vs_big_best": head["speedup_vs_big_best"],
        "fraction_of_ideal": head["fraction_of_ideal"],
        "bound": head["bound"],
        "winners": {
            role: {"candidate": head["best"][role]["candidate"], "options": head["best"][role]["options"]}
            for role in ROLES
        },  # fmt: skip
        "escalation": {"served": p_win, "served_rows": rows_win, "by_candidate": {n: v[0] for n, v in p_by.items()}},
        "bls_overhead_mean_ms": bls_overhead(mean[BLS], mean["little"], mean["big"], p_win),
        "bls_overhead_p50_ms": bls_overhead(p50[BLS], p50["little"], p50["big"], p_win),
        "bls_overhead_point": {"batch": b1, "concurrency": c1, "candidate": winner, "mean_ms": mean, "p50_ms": p50},
        "per_batch": per_batch,
        "per_point": per_point,
    }


def breakdown(rows: list[dict], summary: dict) -> list[dict]:
    """Where the time goes, from Triton's statistics, at each role's best point per batch and at c1 b1."""
    out = []
    b1, c1 = min(int(b) for b in summary["per_batch"]), min(r["concurrency"] for r in rows)
    points = [(int(b), s["best"][role]["concurrency"], s["best"][role]["candidate"], role)
              for b, s in summary["per_batch"].items() for role in ROLES]  # fmt: skip
    winner = summary["winners"][BLS]["candidate"]
    points.append((b1, c1, winner, BLS))
    seen = set()
    for b, c, name, role in points:
        if (b, c, name) in seen:
            continue
        seen.add((b, c, name))
        row = next(r for r in rows if r["model"] == name and r["batch"] == b and r["concurrency"] == c)
        models = [name] if role != BLS else [name, f"{name}__little", f"{name}__big"]
        entry = {"batch": b, "concurrency": c, "candidate": name, "role": role, "throughput": row["throughput"],
                 "models": {m: row["server"][m] for m in models}}  # fmt: skip
        if role == BLS:
            entry["bls"] = row["bls"]
        out.append(entry)
    return out


@dataclass
class Session:
    """One search run: the sweep's settings from the entry point's arguments, and the Search over a fresh
    repository on one explicit-model-control server (``session``)."""

    batches: tuple[int, ...]
    concurrencies: tuple[int, ...]
    points: list[tuple[int, int]]
    budget: Budget
    defaults: dict[str, Any]
    search: Search


@contextlib.contextmanager
def session(
    args, build: Path, base: dict, input_data: Path, work: Path, pa: PerfAnalyzer,
    warm: Callable[[Any, str, tuple[int, ...]], None], metrics: bool = False,
) -> Iterator[Session]:
    """``args``: the entry point's --batches, --concurrency, --screen-points, --budget-s and --screen-share;
    ``warm(client, model, batches)`` warms a model up; ``metrics``: the Search scrapes the metrics port too."""
    import tritonclient.grpc as grpcclient

    from bench.common import parse_points
    from littlebig.model_repository.generate import ServeOptions
    from littlebig.model_repository.server import Ports, TritonServer

    repo, scratch = work / "model_repository", work / "generated"
    for d in (repo, scratch):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    # explicit model control: candidates load and unload on one server, one at a time while screening
    server = TritonServer(repo, Ports.free(), log_file=work / "tritonserver.log",
                          extra_args=["--model-control-mode=explicit"], restricted_apis=())  # fmt: skip
    with server.start():
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports.grpc}")
        try:
            search = Search(
                build=build, repo=repo, scratch=scratch, pa=pa, client=client, server=server,
                url=f"127.0.0.1:{server.ports.grpc}", input_data=input_data, work=work,
                warm=lambda model, b: warm(client, model, b), base=base,
                **({"metrics_url": f"http://127.0.0.1:{server.ports.metrics}/metrics"} if metrics else {}),
            )  # fmt: skip
            yield Session(
                batches=tuple(int(b) for b in args.batches.split(",")),
                concurrencies=tuple(int(c) for c in args.concurrency.split(",")),
                points=parse_points(args.screen_points),
                budget=Budget(args.budget_s, args.screen_share),
                defaults={**vars(ServeOptions()), **base},
                search=search,
            )
        finally:
            client.close()
