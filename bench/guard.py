"""`make guard`: the accuracy guard closing the loop on a shift, with no operator.

One run on the real embedded tritonserver and the real test images, the guard off and then on, each on a fresh
server with shadow sampling: three paced phases, ``clean`` (test images) -> ``shift`` (the contrast shift of
``make shift``) -> ``back`` (test images again). The client knows big's offline answer for every image, so the
disagreement with big actually served is measured on every row, not only on the sampled ones. T, the guard's T,
its test's log wealth and its firings are read from the metrics port every half second.

Then a long clean run with the guard on counts its false firings (its level bounds the chance of any).

Writes BUILD/guard.{json,png}; BENCHMARKS.md ("Accuracy guard") quotes them. About 12 minutes on the 2-core
reference machine at the defaults.
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import save_figure, shade_phases, trailing_share
from bench.shift import SHIFTS, Replay, add_shift_arguments, shifted_logits
from littlebig.metrics_text import fetch

#: What the timeline reads from the metrics port: key -> metric (summed over its samples).
GAUGES = {
    "t_served": "littlebig_threshold",
    "guard_t": "littlebig_guard_threshold",
    "log_evalue": "littlebig_guard_log_evalue",
    "firings": "littlebig_guard_firings_total",
    "lowerings": "littlebig_guard_lowerings_total",
    "binding": "littlebig_guard_binding",
}
PHASES = ("clean", "shift", "back")


def watch(metrics_url: str, t0: float, stop: threading.Event, out: list[dict[str, Any]]) -> None:
    while not stop.wait(0.5):
        try:
            m = fetch(metrics_url)
        except OSError:
            continue
        out.append({"t": time.time() - t0, **{k: m.total(name) for k, name in GAUGES.items() if name in m}})


def run(build: Path, work: Path, guard: bool, streams: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
        args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """One fresh server (guard on or off), every phase (images, labels, big's offline answers) replayed in turn
    (``bench.shift.Replay``: per batch, the served disagreement with big and the escalations); its batches,
    timeline and phase spans."""
    from littlebig.model_repository.generate import ServeOptions, generate
    from littlebig.model_repository.server import Ports, TritonServer

    name = "on" if guard else "off"
    ports, repo = Ports.free(), work / name / "model_repository"
    opts = ServeOptions(
        shadow_rate=args.shadow_rate, shadow_seed=args.seed, shadow_log_dir=str((work / name / "records").resolve()),
        guard=guard, guard_eps=args.eps, guard_alpha=args.alpha, bls_instances=1,
    )  # fmt: skip
    generate(build, repo, "cpu", opts)
    timeline: list[dict[str, Any]] = []
    phases: dict[str, tuple[float, float]] = {}
    stop = threading.Event()
    replay = Replay(f"127.0.0.1:{ports.grpc}", args.pace)
    with TritonServer(repo, ports, log_file=work / f"tritonserver-{name}.log").start():
        t0 = time.time()
        watcher = threading.Thread(
            target=watch, args=(f"http://127.0.0.1:{ports.metrics}", t0, stop, timeline), daemon=True
        )
        watcher.start()
        try:
            for phase, (images, labels, big) in streams.items():
                start = time.time() - t0
                replay.run(phase, images, labels, big, t0)
                time.sleep(1.0)  # the last shadow calls land
                phases[phase] = (start, time.time() - t0)
        finally:
            stop.set()
            watcher.join()
    batches = sorted(replay.batches, key=lambda b: b["t"])
    return {"guard": guard, "batches": batches, "timeline": timeline, "phases": phases}


def summary(result: dict[str, Any], eps: float) -> dict[str, Any]:
    """Per phase: served disagreement with big, escalation rate, T at the end; time to detect; when the served
    disagreement (over the last 50 batches) is back within eps for good."""
    out: dict[str, Any] = {}
    for phase, (start, end) in result["phases"].items():
        rows = [b for b in result["batches"] if b["phase"] == phase]
        n = sum(b["rows"] for b in rows)
        seen = [r for r in result["timeline"] if start <= r["t"] <= end]
        firing = next((r["t"] - start for r in seen if r.get("firings", 0) > (seen[0].get("firings", 0))), None)
        d = np.array([b["disagree"] for b in rows], dtype=float)
        k = np.array([b["rows"] for b in rows], dtype=float)
        window, rolling = trailing_share(d, k)
        over = np.flatnonzero(rolling > eps)
        within_from = None
        if len(rolling) and (not len(over) or over[-1] < len(rolling) - 1):
            i = 0 if not len(over) else over[-1] + 1
            within_from = rows[i + window - 1]["t"] - start
        out[phase] = {
            "rows": n, "disagreement": float(d.sum() / n), "escalation_rate": sum(b["escalated"] for b in rows) / n,
            "t_end": seen[-1].get("t_served") if seen else None,
            "guard_t_end": seen[-1].get("guard_t") if seen else None,
            "seconds_to_fire": firing, "within_eps_from_s": within_from,
            "disagreement_last_half": float(d[len(d) // 2 :].sum() / k[len(k) // 2 :].sum()),
        }  # fmt: skip
    return out


def plot(results: dict[str, dict[str, Any]], eps: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for name, result in results.items():
        b = result["batches"]
        t = np.array([x["t"] for x in b])
        for ax, key in ((axes[0], "disagree"), (axes[2], "escalated")):
            window, share = trailing_share([x[key] for x in b], [x["rows"] for x in b])
            ax.plot(t[window - 1 :], 100 * share, label=f"guard {name}")
        tl = result["timeline"]
        axes[1].step([r["t"] for r in tl], [r["t_served"] for r in tl], where="post", label=f"T in force, guard {name}")
    axes[0].axhline(100 * eps, color="red", ls="--", label="eps")
    axes[0].set_ylabel(f"served disagreement with big,\nlast {window} batches (%)")
    axes[1].set_ylabel("T")
    axes[2].set_ylabel(f"escalated, last {window} batches (%)")
    axes[2].set_xlabel("seconds")
    shade_phases(axes, next(iter(results.values()))["phases"])
    for ax in axes:
        ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, path, "Accuracy guard: clean -> contrast shift -> clean, guard off and on (every row compared "
                "with big)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from littlebig.data import load_split
    from littlebig.export.pipeline import read_export, reference_logits

    ap = argparse.ArgumentParser(prog="python -m bench.guard", description=__doc__.split("\n\n")[0])
    add_shift_arguments(ap)
    ap.add_argument("--eps", type=float, default=0.01, help="the guard's disagreement budget")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--shadow-rate", type=float, default=0.4)
    ap.add_argument("--pace", type=float, default=100.0, help="rows per second")
    ap.add_argument("--phase-rows", type=int, default=8000)
    ap.add_argument("--clean-rows", type=int, default=30000, help="the long clean run (guard on): false firings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="JSON (default BUILD/guard.json; the PNG and the work folder beside it)")
    args = ap.parse_args(argv)
    build, out_json = args.build, args.out or args.build / "guard.json"
    work = out_json.parent / f"{out_json.stem}-work"
    if work.exists():  # a guard resumes from its saved state: every run here starts from the calibrated T
        shutil.rmtree(work)
    exported = read_export(build)
    test = load_split("test", exported.get("data_dir"), tuple(exported["service_size"]))
    shifted = SHIFTS[args.shift](test.images, args.strength)
    clean_big = reference_logits(build, "test")["big"].argmax(-1)
    shifted_big = shifted_logits(build, args.shift, args.strength, shifted)["big"].argmax(-1)
    rng = np.random.default_rng(args.seed)
    draw = {phase: rng.choice(len(test.labels), args.phase_rows) for phase in PHASES}
    images = {"clean": test.images, "shift": shifted, "back": test.images}
    big = {"clean": clean_big, "shift": shifted_big, "back": clean_big}
    streams = {phase: (images[phase][r], test.labels[r], big[phase][r]) for phase, r in draw.items()}
    results = {name: run(build, work, name == "on", streams, args) for name in ("off", "on")}
    long_rows = rng.choice(len(test.labels), args.clean_rows)
    long_stream = (test.images[long_rows], test.labels[long_rows], clean_big[long_rows])
    long = run(build, work / "long", True, {"clean": long_stream}, args)
    out = {
        "eps": args.eps, "alpha": args.alpha, "shadow_rate": args.shadow_rate, "pace": args.pace,
        "shift": f"{args.shift} {args.strength}", "phase_rows": args.phase_rows,
        "summary": {name: summary(r, args.eps) for name, r in results.items()},
        "long_clean": {"rows": args.clean_rows, "firings": max((r.get("firings", 0) for r in long["timeline"]),
                                                               default=0), **summary(long, args.eps)["clean"]},
        "runs": results,
    }  # fmt: skip
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(out, indent=1))
    plot(results, args.eps, out_json.with_suffix(".png"))
    print(f"\neps {args.eps}, alpha {args.alpha}, shadow rate {args.shadow_rate}, {args.pace:g} rows/s, "
          f"{args.phase_rows} rows per phase")  # fmt: skip
    print("| guard | phase | served disagreement with big | last half | escalated | T at end | fired after | "
          "within eps (last 50 batches) from |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for name, phases in out["summary"].items():
        for phase, s in phases.items():
            fired = "-" if s["seconds_to_fire"] is None else f"{s['seconds_to_fire']:.1f} s"
            within = "never" if s["within_eps_from_s"] is None else f"{s['within_eps_from_s']:.1f} s"
            print(f"| {name} | {phase} | {s['disagreement']:.2%} | {s['disagreement_last_half']:.2%} | "
                  f"{s['escalation_rate']:.1%} | {s['t_end']:.4f} | {fired} | {within} |")  # fmt: skip
    lc = out["long_clean"]
    print(f"long clean run, guard on: {lc['rows']} rows, {lc['firings']:.0f} firings, served disagreement "
          f"{lc['disagreement']:.2%}, T at end {lc['t_end']:.4f}")
    print(f"wrote {out_json}, {out_json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
