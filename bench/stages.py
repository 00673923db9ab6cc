"""`make bench-stages`: big alone, the two-stage and the three-stage cascade, each at its best, in one run.

Whether three stages (little -> middle -> big) serve faster than two (little -> big) on this
machine is a finding, not a target. One tritonserver (explicit model control), one set of real test images, the
real perf_analyzer, and the deployment search of ``make bench`` (``bench/search.py``), run per group on one time
budget:

- groups ``big`` (big alone), ``two`` (the two-stage littlebig of ``--build``), ``three`` (the three-stage littlebig
  of ``--build-three``), and ``little`` and ``middle`` alone, whose best rates with big's give each cascade's ideal
  rate R* = 1 / sum_k(q_k / R_k) (q_k: the share of rows reaching stage k, served; ``bench/rates.py``);
- screen: each group's candidates of ``make bench``'s grid (``search.grid``: little and big 1x1, 2x1, 1x2 instances
  x threads; each cascade BLS 1-2 x big instances 1-2 x threads 1-2, then one change at a time around its leader:
  queue delay, max batch, big's chunk, BLS instances, little as a Triton model). The middle stage is deployed with
  big's settings (``ServeOptions``), so ``big_instances`` sets the instances of the middle and big alike, and
  middle alone is screened on big's grid. The screen's share of the budget is split between the groups in
  proportion to their candidates, a group's unused time passing to the next;
- confirm: the best ``k`` of each group over the whole batch x concurrency sweep, interleaved per point; each
  group's best per point and per batch size is its figure (best against best).

Rows per stage come from Triton's own counts (``inference_count`` of each stage's model; little sees every row)
and from the BLS model's ``littlebig_stage_rows_total`` on the metrics port (rows each stage answered); the offline
expected MACs from each build's ``calibration.json`` (val) and, on the benchmark images, from the shared rule.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench import search as S
from bench.common import concurrency_axis, finish, load_test_images, search_parser, snapshot, start_search, warm_up
from bench.perf import PerfAnalyzer, Window
from bench.rates import bound_stages, ideal_stages, reaching
from littlebig.decision import CASCADE, cascade_stages
from littlebig.export.pipeline import export_dir, read_calibration, read_export, stages_of

BLS = CASCADE
#: The groups the search screens, in this order (the cascades first), and the role each one's candidates play.
GROUPS = {"three": BLS, "two": BLS, "big": "big", "middle": "middle", "little": "little"}
#: The groups whose figures are compared (little and middle alone are measured for R* only).
COMPARED = ("big", "two", "three")
LABELS = {"big": "big alone", "two": "two-stage littlebig", "three": "three-stage littlebig",
          "little": "little alone", "middle": "middle alone"}  # fmt: skip
COLORS = {"big": "tab:orange", "two": "tab:green", "three": "tab:purple", "little": "tab:blue", "middle": "tab:brown"}


# ---------------------------------------------------------------- builds and offline figures ---------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shared_models(two: Path, three: Path) -> dict[str, bool]:
    """Whether the two builds serve the very same little and big (the same ONNX bytes): big alone and little alone
    are measured from the two-stage build and stand for both cascades."""
    a, b = read_export(two), read_export(three)
    return {role: sha256(export_dir(two) / a[role]["onnx"]) == sha256(export_dir(three) / b[role]["onnx"])
            for role in ("little", "big")}  # fmt: skip


def offline(build: Path, images: np.ndarray, thresholds: list[float], rule: str) -> dict:
    """One build's cascade on the benchmark images (the shared rule at the served T) and its calibration record."""
    from littlebig.export.onnx_export import INPUT_NAME, OUTPUT_NAME, onnx_session

    exported, calibration = read_export(build), read_calibration(build)
    stages = stages_of(exported)
    logits = [onnx_session(export_dir(build) / exported[s]["onnx"]).run([OUTPUT_NAME], {INPUT_NAME: images})[0]
              for s in stages]  # fmt: skip
    stage = cascade_stages(logits, thresholds)["stage"]
    answered = [float((stage == k).mean()) for k in range(len(stages))]
    macs = [float(exported[s]["macs"]) for s in stages]
    record = calibration.rules[rule].figures if rule in calibration.rules else {}
    val_answered = record.get("stage_shares")
    return {
        "stages": list(stages),
        "models": {s: exported[s]["name"] for s in stages},
        "macs": dict(zip(stages, macs, strict=True)),
        "thresholds": thresholds,
        "rule": rule,
        "images": {
            "answered": answered,
            "reach": reaching(answered),
            "expected_macs": float(np.dot(reaching(answered), macs)),
        },  # fmt: skip
        "val": {
            "answered": val_answered,
            "reach": reaching(val_answered) if val_answered else None,
            "expected_macs": record.get("expected_macs"),
            "accuracy": record.get("accuracy"),
            "rows": calibration.rows,
        },
    }


# ---------------------------------------------------------------- the search ---------------------------------------
def candidates(defaults: dict, two: Path, three: Path, three_stages: tuple[str, ...]) -> dict[str, list]:
    """Every group's first-stage candidates (``search.grid``), each bound to the build it serves."""
    g = S.grid(defaults)
    return {
        "three": [dataclasses.replace(c, stages=three_stages, variant="three", build=three) for c in g[BLS]],
        "two": [dataclasses.replace(c, variant="two", build=two) for c in g[BLS]],
        "big": [dataclasses.replace(c, build=two) for c in g["big"]],
        "middle": [dataclasses.replace(S.candidate("middle", **c.opts()), build=three) for c in g["big"]],
        "little": [dataclasses.replace(c, build=two) for c in g["little"]],
    }


def run_search(args, base: dict, images: np.ndarray, input_data: Path, work: Path, pa: PerfAnalyzer,
               two: Path, three: Path) -> dict:  # fmt: skip
    """Screen every group within its share of the budget, then confirm each group's best over the sweep."""
    warm = lambda client, model, b: warm_up(client, images, model, b)  # noqa: E731
    screened: dict[str, list[dict]] = {}
    slices: dict[str, float] = {}
    with S.session(args, two, base, input_data, work, pa, warm, metrics=True) as run:
        batches, concurrencies, points, budget = run.batches, run.concurrencies, run.points, run.budget
        search = run.search
        cands = candidates(run.defaults, two, three, tuple(stages_of(read_export(three))))
        refine_estimate = len(S.refinements(cands["two"][0]))
        counts = {g: len(c) + (refine_estimate if GROUPS[g] == BLS else 0) for g, c in cands.items()}
        window = Window(args.screen_ms, stability_pct=1000, max_trials=3)  # screening: 3 windows, no retry
        screen_s = args.screen_share * args.budget_s
        with tqdm(total=sum(counts.values()), desc="screen", unit="candidate") as bar:
            for i, group in enumerate(GROUPS):
                # this group's share of what is left of the screen, in proportion to its candidates
                left = max(screen_s - budget.elapsed(), 0.0)
                slices[group] = left * counts[group] / sum(counts[g] for g in list(GROUPS)[i:])
                mine = S.Budget(slices[group], 1.0)
                bar.set_description(f"screen {group}")
                found = S.screen(search, cands[group], points, window, mine, batches, bar)
                if GROUPS[group] == BLS:
                    leader = S.ranked(found, BLS)
                    more = S.refinements(search.installed[leader[0]["candidate"]]) if leader else []
                    bar.total += len(more) - refine_estimate
                    found += S.screen(search, more, points, window, mine, batches, bar, keep_first=False)
                screened[group] = found
        per_finalist = len(batches) * len(concurrencies)
        k, window_ms = S.confirm_plan(max(budget.left(), 0), per_finalist, len(GROUPS), search.overhead_s(),
                                      max_finalists=args.finalists)  # fmt: skip
        finalists = {g: [search.installed[r["candidate"]] for r in S.ranked(screened[g], GROUPS[g])[:k]]
                     for g in GROUPS}  # fmt: skip
        confirm_window = Window(window_ms)
        flat = [c for g in GROUPS for c in finalists[g]]
        rows = S.confirm(search, flat, batches, concurrencies, confirm_window, composing_points=False)
    group_of = {c.name: g for g in GROUPS for c in finalists[g]}
    for r in rows:
        r["group"] = group_of[r["candidate"]]
    for g, found in screened.items():
        for r in found:
            r["group"] = g
    return {
        "groups": dict(GROUPS),
        "budget_s": args.budget_s,
        "screen_share": args.screen_share,
        "screen_slices_s": {g: round(s, 1) for g, s in slices.items()},
        "screen_points": [{"batch": b, "concurrency": c} for b, c in points],
        "screen_window": window.__dict__,
        "confirm_window": confirm_window.__dict__,
        "finalists_per_group": k,
        "finalists": {g: [c.name for c in v] for g, v in finalists.items()},
        "seconds": round(budget.elapsed(), 1),
        "screen": [r for g in GROUPS for r in screened[g]],
        "confirm": rows,
    }


# ---------------------------------------------------------------- summary ------------------------------------------
def served_shares(rows: list[dict], candidate: str) -> dict:
    """A cascade candidate's served shares over all its points: rows reaching each stage (Triton's counts) and rows
    each stage answered (littlebig_stage_rows_total), with the counts behind them."""
    mine = [r for r in rows if r["candidate"] == candidate and r.get("stage_reach_rows")]
    stages = list(mine[0]["stage_reach_rows"]) if mine else []
    reach_rows = {s: sum(r["stage_reach_rows"][s] for r in mine) for s in stages}
    answered_rows = {s: sum(r.get("stage_rows", {}).get(s, 0.0) for r in mine) for s in stages}
    total = max(reach_rows.get("little", 0), 1)
    counted = max(sum(answered_rows.values()), 1)
    return {
        "rows": reach_rows.get("little", 0),
        "reach_rows": reach_rows,
        "reach": [reach_rows[s] / total for s in stages],
        "answered_rows": answered_rows,
        "answered": [answered_rows[s] / counted for s in stages],
        "escalation_rate": reach_rows[stages[-1]] / total if stages else float("nan"),
    }


def summarise(rows: list[dict], batches: tuple[int, ...], concurrencies: tuple[int, ...], headline: int,
              offline_figures: dict[str, dict]) -> dict:  # fmt: skip
    """Per point and per batch: each group's best, the ratios three/two and each/big, each cascade's R* and bound."""
    present = [g for g in GROUPS if any(r["group"] == g for r in rows)]

    def best(where: dict) -> dict[str, dict]:
        return {g: max((r for r in rows if r["group"] == g and all(r[k] == v for k, v in where.items())),
                       key=lambda r: r["throughput"]) for g in present}  # fmt: skip

    shares = {r["candidate"]: None for r in rows if r["group"] in ("two", "three")}
    shares = {name: served_shares(rows, name) for name in shares}

    def figures(b: dict[str, dict]) -> dict:
        rate = {g: b[g]["throughput"] for g in present}
        out = {
            "best": {
                g: {
                    "throughput": rate[g],
                    "concurrency": b[g]["concurrency"],
                    "candidate": b[g]["candidate"],
                    "options": b[g]["options"],
                }
                for g in present
            },  # fmt: skip
            "ratios": {
                "three_over_two": rate["three"] / rate["two"] if rate.get("two") else float("nan"),
                "two_over_big": rate["two"] / rate["big"] if rate.get("big") else float("nan"),
                "three_over_big": rate["three"] / rate["big"] if rate.get("big") else float("nan"),
            },
            "ideal": {},
        }
        for g in ("two", "three"):
            stages = offline_figures[g]["stages"]
            if g not in b or not all(s in rate for s in stages):
                continue
            reach = shares[b[g]["candidate"]]["reach"]
            rates = [rate[s] for s in stages]
            if not reach or min(rates) <= 0:  # a stage that could not be measured: no R*
                continue
            star = ideal_stages(rates, reach)
            out["ideal"][g] = {"reach": reach, "rates": dict(zip(stages, rates, strict=True)),
                               "ideal_throughput": star, "fraction_of_ideal": rate[g] / star,
                               "bound": bound_stages(rates, reach)}  # fmt: skip
        return out

    per_batch = {str(b): {"batch": b, **figures(best({"batch": b}))} for b in batches}
    per_point = [{"batch": b, "concurrency": c, **figures(best({"batch": b, "concurrency": c}))}
                 for b in batches for c in concurrencies]  # fmt: skip
    head = per_batch[str(headline)]
    macs = {"big": offline_figures["two"]["macs"]["big"]}
    for g in ("two", "three"):
        o = offline_figures[g]
        winner = head["best"].get(g, {}).get("candidate")
        served = shares.get(winner) if winner else None
        macs[g] = {
            "val": o["val"]["expected_macs"],
            "images": o["images"]["expected_macs"],
            "served": float(np.dot(served["reach"], [o["macs"][s] for s in o["stages"]])) if served else None,
        }
    return {
        "headline_batch": headline,
        "ratios": head["ratios"],
        "winners": {g: {"candidate": v["candidate"], "options": v["options"]} for g, v in head["best"].items()},
        "served_shares": shares,
        "expected_macs": macs,
        "per_batch": per_batch,
        "per_point": per_point,
    }


# ---------------------------------------------------------------- output -----------------------------------------
def _m(macs: float | None) -> str:
    return "-" if macs is None else f"{macs / 1e6:.2f} M"


def print_table(result: dict) -> None:
    s, off = result["summary"], result["offline"]
    print("\nsearch (screen, short windows): group, candidate, score img/s (geometric mean of the screen points)")
    for r in result["search"]["screen"]:
        print(f"  {r['group']:<7}{r['candidate']:<64} {r.get('score', float('nan')):>8.0f}  {r.get('skipped', '')}")
    print("\nfair table: each group's best finalist at every point (img/s)")
    print(f"{'batch':>5}{'conc':>5}{'big':>8}{'two':>8}{'three':>8}{'3/2':>7}{'2/big':>7}{'3/big':>7}"
          f"{'R* two':>8}{'R* three':>9}")  # fmt: skip
    for r in s["per_point"]:
        b, q, i = r["best"], r["ratios"], r["ideal"]
        print(
            f"{r['batch']:>5}{r['concurrency']:>5}"
            + "".join(f"{b[g]['throughput']:>8.0f}" if g in b else f"{'-':>8}" for g in COMPARED)
            + f"{q['three_over_two']:>6.2f}x{q['two_over_big']:>6.2f}x{q['three_over_big']:>6.2f}x"
            + f"{i.get('two', {}).get('ideal_throughput', float('nan')):>8.0f}"
            + f"{i.get('three', {}).get('ideal_throughput', float('nan')):>9.0f}"
        )
    print()
    for batch, r in s["per_batch"].items():
        b, q = r["best"], r["ratios"]
        line = ", ".join(f"{LABELS[g]} {b[g]['throughput']:.0f} img/s (c{b[g]['concurrency']})"
                         for g in COMPARED if g in b)  # fmt: skip
        print(f"batch {batch}: {line}")
        print(f"  three/two {q['three_over_two']:.2f}x, two/big {q['two_over_big']:.2f}x, "
              f"three/big {q['three_over_big']:.2f}x")  # fmt: skip
        for g, x in r["ideal"].items():
            print(f"  {g}-stage R* {x['ideal_throughput']:.0f} img/s (reach {', '.join(f'{v:.3f}' for v in x['reach'])}"
                  f"): served {100 * x['fraction_of_ideal']:.0f}% of it, bound R*/R_big {x['bound']:.2f}x")  # fmt: skip
    print(f"\nescalation and rows per stage (served: every point of the batch-{s['headline_batch']} winner)")
    for g in ("two", "three"):
        o = off[g]
        name = s["winners"].get(g, {}).get("candidate")
        sh = s["served_shares"].get(name) if name else None
        stages = o["stages"]
        ts = ", ".join(f"{t:.4f}" for t in o["thresholds"])
        print(f"  {LABELS[g]} ({' -> '.join(stages)}, rule {o['rule']}, T {ts})")
        if sh:
            print(
                "    rows reaching each stage (inference_count): "
                + ", ".join(f"{st} {sh['reach_rows'][st]:.0f} ({v:.3f})" for st, v in zip(stages, sh["reach"]))
            )
            print(
                "    rows answered by each stage (littlebig_stage_rows_total): "
                + ", ".join(f"{st} {sh['answered_rows'][st]:.0f} ({v:.3f})" for st, v in zip(stages, sh["answered"]))
            )
        print(
            "    reaching, offline on the benchmark images: "
            + ", ".join(f"{st} {v:.3f}" for st, v in zip(stages, o["images"]["reach"]))
        )
        if o["val"]["reach"]:
            val = ", ".join(f"{st} {v:.3f}" for st, v in zip(stages, o["val"]["reach"]))
            print(f"    reaching, val (calibration.json): {val}")
    m = s["expected_macs"]
    print(f"\nexpected MACs per image: big {_m(m['big'])}")
    for g in ("two", "three"):
        print(f"  {LABELS[g]}: {_m(m[g]['val'])} (val, calibration.json), {_m(m[g]['images'])} (benchmark images, "
              f"offline), {_m(m[g]['served'])} (served shares)")  # fmt: skip
    for g, w in s["winners"].items():
        print(f"winner {g}: {w['candidate']}")
    if not all(result["shared_models"].values()):
        print(f"NOTE: the builds do not share little and big byte for byte: {result['shared_models']}")


def plot(result: dict, path: Path) -> None:
    """Screen scores per candidate; each finalist's throughput against concurrency per batch, each cascade's R*
    dashed; the per-batch best of big, two and three as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, rows = result["summary"], result["search"]["confirm"]
    batches = [int(b) for b in s["per_batch"]]
    screen = [r for r in result["search"]["screen"] if "score" in r]
    cols = len(batches) + 1
    fig = plt.figure(figsize=(5.5 * cols, 5 + 0.2 * len(screen)), layout="constrained")  # room for long names
    grid = fig.add_gridspec(2, cols, height_ratios=[0.2 * len(screen) + 1, 5])
    ax = fig.add_subplot(grid[0, :])
    ax.barh(range(len(screen)), [r["score"] for r in screen], color=[COLORS[r["group"]] for r in screen])
    ax.set_yticks(range(len(screen)), [r["candidate"] for r in screen], fontsize=6)
    ax.invert_yaxis()
    ax.set(xlabel="screen score (img/s, geometric mean of the screen points)", title="search: every candidate")
    ax.grid(alpha=0.3, axis="x")
    winners = {w["candidate"] for w in s["winners"].values()}
    for col, batch in enumerate(batches):
        ax = fig.add_subplot(grid[1, col])
        for name in dict.fromkeys(r["candidate"] for r in rows):
            mine = sorted((r for r in rows if r["candidate"] == name and r["batch"] == batch),
                          key=lambda r: r["concurrency"])  # fmt: skip
            group = mine[0]["group"]
            ax.plot([r["concurrency"] for r in mine], [r["throughput"] for r in mine], marker="o", ms=3,
                    color=COLORS[group], alpha=0.95 if name in winners else 0.35, label=name)  # fmt: skip
        pts = [r for r in s["per_point"] if r["batch"] == batch]
        for g in ("two", "three"):
            star = [r["ideal"].get(g, {}).get("ideal_throughput", np.nan) for r in pts]
            ax.plot([r["concurrency"] for r in pts], star, ls="--", c=COLORS[g], lw=1,
                    label=f"R* {g}-stage (best stage rates)")  # fmt: skip
        concurrency_axis(ax, batch, [r["concurrency"] for r in pts], 5)
    ax = fig.add_subplot(grid[1, -1])
    width = 0.8 / len(COMPARED)
    for i, g in enumerate(COMPARED):
        vals = [s["per_batch"][str(b)]["best"].get(g, {}).get("throughput", 0.0) for b in batches]
        bars = ax.bar(np.arange(len(batches)) + (i - 1) * width, vals, width, color=COLORS[g], label=LABELS[g])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set(ylabel="images/s at each one's best", title="best against best")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    h, m = s["per_batch"][str(s["headline_batch"])], s["expected_macs"]
    fig.suptitle(
        f"three stages against two on Triton 2.51 (CPU), best against best, batch {s['headline_batch']}: three/two "
        f"{h['ratios']['three_over_two']:.2f}x, two/big {h['ratios']['two_over_big']:.2f}x, three/big "
        f"{h['ratios']['three_over_big']:.2f}x; expected MACs (val) big {_m(m['big'])}, two {_m(m['two']['val'])}, "
        f"three {_m(m['three']['val'])}",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main -------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from littlebig.model_repository.generate import ServeOptions, served_thresholds

    ap = search_parser("python -m bench.stages", __doc__, "bench-stages.json", "BENCH_STAGES_BUDGET_S", 1500)
    ap.add_argument("--build-three", type=Path, help="the three-stage build (default BUILD/three)")

    def check(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        args.build_three = args.build_three or args.build / "three"
        for b, want in ((args.build, 2), (args.build_three, 3)):
            got = len(stages_of(read_export(b)))
            if got != want:
                ap.error(f"{b} exports a cascade of {got} models: this bench compares 2 ({args.build}) with 3 "
                         f"({args.build_three})")  # fmt: skip

    run = start_search(ap, argv, check)
    args, base, work, build_three = run.args, run.base, run.work, run.args.build_three

    two, three = snapshot(args.build, work / "build-two"), snapshot(build_three, work / "build-three")
    if read_export(two)["service_size"] != read_export(three)["service_size"]:
        ap.error("the two builds serve different service sizes: the same images cannot go to both")
    shared = shared_models(two, three)
    exported, images, input_data = load_test_images(two, work, args.images)
    offline_figures = {}
    for g, b in (("two", two), ("three", three)):
        thresholds, rule = served_thresholds(b, ServeOptions(**base))
        offline_figures[g] = offline(b, images, thresholds, rule)

    found = run_search(args, base, images, input_data, work, run.pa, two, three)
    summary = summarise(found["confirm"], run.batches, run.concurrencies, run.headline, offline_figures)
    result = {
        "ratios": summary["ratios"],
        "headline_batch": run.headline,
        "summary": summary,
        "offline": offline_figures,
        "shared_models": shared,
        "search": found,
        "base_options": base,
        "builds": {"two": str(args.build), "three": str(build_three)},
        "images": {"split": "test", "count": len(images), "service_size": exported["service_size"]},
        "perf_analyzer": {"version": run.pa_version, "protocol": "grpc"},
    }
    return finish(result, run.out, "bench.stages", argv, run.started, print_table, plot)


if __name__ == "__main__":
    sys.exit(main())
