"""`make shift`: does the shadow loss bound see a shift that keeps little confident and wrong,
and does recalibrating from the shadow records bring the served accuracy back to big's?

One run, on the real embedded tritonserver, a real Prometheus (Debian's ``prometheus``, the same package as promtool)
running deploy/prometheus/littlebig.rules.yml, and the real test images:

1. Offline first: little, big and the served cascade on the clean and the shifted test images (``SHIFTS``: contrast
   loss by default), to check the shift has the property the experiment needs (little confident and wrong more
   often; the cascade loses more than eps against big).
2. Serve with shadow sampling (``--shadow-rate``) and replay, paced, in order:
   ``clean`` (test images), ``shift`` (shifted images of test half A), then recalibrate from the records written
   during ``shift`` (``littlebig recalibrate``'s code), regenerate the repository with the new T, restart the
   server on the same ports and replay ``after`` (shifted images of half B: images the new T was not chosen on).
   Every stream row is drawn with replacement from its pool, so the records are i.i.d. draws of that traffic.
3. Every rules evaluation, query Prometheus: the drift z, the shadow loss estimate and its bounds, eps and which
   alerts fire. The client knows every label, so the accuracy actually served, and big's on the same rows, are
   measured per batch.

Time is scaled: this run cannot wait hours, so Prometheus runs the rules file with every duration divided by
``--time-scale`` (30m windows -> 90 s at 20; ``for: 10m`` -> 30 s; the 1m evaluation -> 3 s). The row minimums (500
rows, 1,000 shadow rows) are not scaled: the pace and the shadow rate are chosen so the windows hold them. Writes
BUILD/shift.{json,png}; RELIABILITY.md ("Shift") quotes them. About 10 minutes on the 2-core reference machine.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.common import save_figure, shade_phases, trailing_share
from littlebig.decision import CASCADE as BLS
from littlebig.model_repository.server import Ports, TritonServer, free_port

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "littlebig.rules.yml"
LOSS_ALERT, DRIFT_ALERT = "LittlebigAccuracyLossAboveBudget", "LittlebigEscalationRateDrift"
#: What Prometheus is asked every evaluation: name -> PromQL (recording rules of littlebig.rules.yml).
QUERIES = {
    "escalation_rate": "model:littlebig_calibration_escalation_rate:ratio10m",
    "z": "model:littlebig_calibration_escalation_rate:z10m",
    "loss": "model:littlebig_accuracy_loss:estimate30m",
    "loss_lower": "model:littlebig_accuracy_loss:lower30m",
    "loss_upper": "model:littlebig_accuracy_loss:upper30m",
    "shadow_rows": "model:littlebig_shadow_rows:increase30m",
    "eps": "model:littlebig_calibrated_eps:max",
}


def contrast(images: np.ndarray, factor: float) -> np.ndarray:
    """Contrast loss: every image pulled toward its own mean grey (factor 1: unchanged, 0: flat)."""
    x = images.astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return np.clip(mean + (x - mean) * factor, 0, 255).round().astype(np.uint8)


#: Shifts by name: images -> shifted images (``--shift``), with the strength ``--strength``.
SHIFTS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {"contrast": contrast}


def scaled_rules(text: str, scale: float) -> str:
    """The rules file with every duration divided by ``scale``: range windows, ``for:`` and group intervals."""

    def seconds(match: re.Match) -> str:
        value = int(match.group(2)) * {"s": 1, "m": 60, "h": 3600}[match.group(3)] / scale
        return f"{match.group(1)}{max(int(round(value)), 1)}s"

    return re.sub(r"(\[|for: |interval: )(\d+)([smh])", seconds, text)


def stream_logits(build: Path, images: np.ndarray, name: str) -> dict[str, np.ndarray]:
    """Little's and big's logits on ``images`` (the ONNX models the server serves)."""
    from littlebig.export.pipeline import export_dir, run_onnx

    return {role: run_onnx(export_dir(build) / f"{role}.onnx", images, f"{role} {name}") for role in ("little", "big")}


def shifted_logits(build: Path, shift: str, strength: float, images: np.ndarray) -> dict[str, np.ndarray]:
    """``stream_logits`` on the shifted test images, cached in ``build`` per shift and strength."""
    cache = build / f"shift-logits-{shift}-{strength:g}.npz"
    if not cache.exists():
        np.savez(cache, **stream_logits(build, images, "shifted"))
    return dict(np.load(cache))


def add_shift_arguments(ap: argparse.ArgumentParser) -> None:
    """The build and the shift, as ``make shift`` and ``make guard`` take them."""
    ap.add_argument("--build", type=Path, default=Path("build"))
    ap.add_argument("--shift", choices=sorted(SHIFTS), default="contrast")
    ap.add_argument("--strength", type=float, default=0.7, help="contrast factor (1: no shift)")


def offline(logits: dict[str, dict[str, np.ndarray]], labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """Little, big and the cascade at ``threshold`` on each stream: the shift's property, checked first."""
    from littlebig.decision import cascade, confidence, softmax

    out = {}
    for name, z in logits.items():
        little, big = z["little"].argmax(-1), z["big"].argmax(-1)
        answer = cascade(z["little"], z["big"], threshold)
        confident = ~answer["escalated"]
        out[name] = {
            "little_labels": little, "big_labels": big,
            "little_acc": float((little == labels).mean()), "big_acc": float((big == labels).mean()),
            "cascade_acc": float((answer["label"] == labels).mean()),
            "escalation_rate": float(answer["escalated"].mean()),
            "confident_wrong": float((confident & (little != labels)).mean()),
            "disagreement": float((confident & (little != big)).mean()),
            "mean_confidence": float(confidence(softmax(z["little"])).mean()),
        }  # fmt: skip
    return out


class Prometheus:
    """A real Prometheus scraping one Triton metrics port every second with the (time-scaled) rules."""

    def __init__(self, work: Path, metrics_port: int, scale: float) -> None:
        self.work, self.port = work, free_port()
        work.mkdir(parents=True, exist_ok=True)
        (work / "littlebig.rules.yml").write_text(scaled_rules(RULES.read_text(), scale))
        evaluation = max(int(round(60 / scale)), 1)
        (work / "prometheus.yml").write_text(
            f"global: {{scrape_interval: 1s, evaluation_interval: {evaluation}s}}\n"
            "rule_files: [littlebig.rules.yml]\n"
            f"scrape_configs: [{{job_name: triton, static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]}}]\n"
        )
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Prometheus:
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus not found: Debian's prometheus package (apt-packages.txt) has it")
        self.process = subprocess.Popen(
            [binary, f"--config.file={self.work / 'prometheus.yml'}", f"--storage.tsdb.path={self.work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(self.work / "prometheus.log", "w"),  # noqa: SIM115
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.3)
        self.__exit__()
        raise RuntimeError(f"prometheus did not become ready (log: {self.work / 'prometheus.log'})")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())["data"]["result"]

    def sample(self) -> dict[str, Any]:
        """Every ``QUERIES`` value (NaN when absent) and the littlebig alerts firing now."""
        row: dict[str, Any] = {}
        for key, expr in QUERIES.items():
            result = self.query(expr)
            row[key] = float(result[0]["value"][1]) if result else float("nan")
        firing = self.query('ALERTS{alertstate="firing"}')
        row["firing"] = sorted({r["metric"]["alertname"] for r in firing})
        return row


@dataclass
class Replay:
    """Paced replay of one stream; per batch: when, how many rows the cascade and big got right, how many the
    cascade answered differently from big, and how many it escalated."""

    url: str
    pace: float  # rows per second
    batch: int = 10
    batches: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _send(self, phase: str, images: np.ndarray, labels: np.ndarray, big: np.ndarray, t0: float) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        try:
            inp = grpcclient.InferInput("IMAGE", list(images.shape), "UINT8")
            inp.set_data_from_numpy(images)
            result = client.infer(BLS, [inp], client_timeout=60)
        finally:
            client.close()
        served = result.as_numpy("LABEL").reshape(-1)
        with self.lock:
            self.batches.append({
                "phase": phase, "t": time.time() - t0, "rows": len(labels),
                "served_correct": int((served == labels).sum()), "big_correct": int((big == labels).sum()),
                "disagree": int((served != big).sum()), "escalated": int(result.as_numpy("ESCALATED").sum()),
            })  # fmt: skip

    def run(self, phase: str, images: np.ndarray, labels: np.ndarray, big: np.ndarray, t0: float) -> None:
        """Send ``images`` in batches at ``pace`` rows/s (open loop: a slow answer does not slow the sender)."""
        start = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            futures = []
            for k, a in enumerate(tqdm(range(0, len(images), self.batch), desc=phase, unit="batch")):
                delay = start + k * self.batch / self.pace - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                rows = slice(a, a + self.batch)
                futures.append(pool.submit(self._send, phase, images[rows], labels[rows], big[rows], t0))
            for f in futures:
                f.result()


def watch(prometheus: Prometheus, every: float, t0: float, stop: threading.Event, out: list[dict]) -> None:
    while not stop.wait(every):
        try:
            out.append({"t": time.time() - t0, **prometheus.sample()})
        except OSError as exc:
            out.append({"t": time.time() - t0, "error": str(exc)})


def phase_summary(batches: list[dict], timeline: list[dict], phase: str, start: float, end: float) -> dict[str, Any]:
    rows = [b for b in batches if b["phase"] == phase]
    n = sum(b["rows"] for b in rows)
    seen = [r for r in timeline if start <= r["t"] <= end and "error" not in r]
    last = seen[-1] if seen else {}
    fired = {a: next((r["t"] - start for r in seen if a in r["firing"]), None) for a in (DRIFT_ALERT, LOSS_ALERT)}
    return {
        "rows": n,
        "served_acc": sum(b["served_correct"] for b in rows) / n,
        "big_acc": sum(b["big_correct"] for b in rows) / n,
        "escalation_rate": sum(b["escalated"] for b in rows) / n,
        "end": {k: last.get(k) for k in ("z", "loss", "loss_lower", "loss_upper", "shadow_rows", "eps")},
        "seconds_to_fire": fired,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = [r for r in result["timeline"] if "error" not in r]
    t = np.array([r["t"] for r in tl])
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True, gridspec_kw={"height_ratios": [3, 3, 3, 1]})
    ax = axes[0]
    ax.plot(t, [r["z"] for r in tl], label="drift z (escalation rate at the calibrated T vs val)")
    ax.axhline(4, color="grey", ls=":", label="|z| = 4")
    ax.set_ylabel("z")
    ax = axes[1]
    loss = np.array([[r["loss"], r["loss_lower"], r["loss_upper"]] for r in tl], dtype=float) * 100
    ax.plot(t, loss[:, 0], label="shadow loss estimate (30m window, scaled)")
    ax.fill_between(t, loss[:, 1], loss[:, 2], alpha=0.3, label="one-sided bounds (z = 3.719)")
    ax.axhline(result["eps"] * 100, color="red", ls="--", label="eps")
    ax.set_ylabel("loss vs big (points)")
    ax = axes[2]
    batches = sorted(result["batches"], key=lambda b: b["t"])
    bt = np.array([b["t"] for b in batches])
    for key, label in (("served_correct", "served (littlebig)"), ("big_correct", "big on the same rows")):
        k, acc = trailing_share([b[key] for b in batches], [b["rows"] for b in batches])
        ax.plot(bt[k - 1 :], acc * 100, label=label)
    ax.set_ylabel(f"accuracy, last {k} batches (%)")
    ax = axes[3]
    step = np.median(np.diff(t)) if len(t) > 1 else 1.0
    for y, (alert, color) in enumerate(((DRIFT_ALERT, "orange"), (LOSS_ALERT, "red"))):
        spans = [(r["t"] - step / 2, step) for r in tl if alert in r["firing"]]
        ax.broken_barh(spans, (y - 0.4, 0.8), color=color)
    ax.set_yticks([0, 1], ["drift alert", "loss alert"])
    ax.set_ylim(-0.6, 1.6)
    ax.set_xlabel("seconds")
    shade_phases(axes, result["phases"])
    for ax in axes[:3]:
        ax.legend(fontsize=7, loc="upper left")
    for name, (start, end) in result["phases"].items():
        axes[0].text((start + end) / 2, 1.02, name, transform=axes[0].get_xaxis_transform(), ha="center", fontsize=8)
    after = result["recalibrated"]["threshold"]
    save_figure(fig, path, f"{result['shift']} shift: clean -> shift -> recalibrated from the shadow records (T "
                f"{result['threshold']:.3f} -> {after:.3f}); Prometheus durations / {result['time_scale']:g}")


def main(argv: list[str] | None = None) -> int:
    from littlebig.data import load_split
    from littlebig.export.pipeline import SHADOW_RULE, read_export, reference_logits, shadow_calibration_step
    from littlebig.model_repository.generate import ServeOptions, generate, served_threshold

    ap = argparse.ArgumentParser(prog="python -m bench.shift", description=__doc__.split("\n\n")[0])
    add_shift_arguments(ap)
    ap.add_argument("--shadow-rate", type=float, default=0.4,
                    help="R: 0.4, so a 90 s window holds 1,000 shadow rows of the shifted stream")  # fmt: skip
    ap.add_argument("--pace", type=float, default=100.0, help="rows per second (big keeps up at 84%% escalated)")
    ap.add_argument("--phase-rows", type=int, default=15000, help="rows per phase (150 s at the default pace)")
    ap.add_argument("--time-scale", type=float, default=20.0, help="Prometheus durations divided by this")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    build, work = args.build, args.build / "shift-work"
    if work.exists():
        shutil.rmtree(work)
    exported = read_export(build)
    test = load_split("test", exported.get("data_dir"), tuple(exported["service_size"]))
    shifted = SHIFTS[args.shift](test.images, args.strength)
    threshold, rule = served_threshold(build, ServeOptions())
    clean = reference_logits(build, "test")  # cached by make calibrate / report
    logits = {
        "clean": {r: clean[r] for r in ("little", "big")},
        "shifted": shifted_logits(build, args.shift, args.strength, shifted),
    }
    check = offline(logits, test.labels, threshold)
    for name, r in check.items():
        print(f"offline {name:8s}: little {r['little_acc']:.4f}, big {r['big_acc']:.4f}, cascade {r['cascade_acc']:.4f}"
              f" (loss {r['big_acc'] - r['cascade_acc']:+.4f}); escalated {r['escalation_rate']:.1%}; confident and "
              f"wrong {r['confident_wrong']:.1%}; disagreement {r['disagreement']:.2%}")  # fmt: skip
    rng = np.random.default_rng(args.seed)
    half = len(test.labels) // 2
    pools = {"clean": np.arange(len(test.labels)), "shift": np.arange(half), "after": np.arange(half, len(test.labels))}
    streams = {name: rng.choice(pool, args.phase_rows) for name, pool in pools.items()}
    images = {"clean": test.images, "shift": shifted, "after": shifted}
    big = {"clean": check["clean"]["big_labels"], "shift": check["shifted"]["big_labels"],
           "after": check["shifted"]["big_labels"]}  # fmt: skip

    ports, repo, records = Ports.free(), work / "model_repository", work / "records"
    opts = ServeOptions(shadow_rate=args.shadow_rate, shadow_seed=args.seed, shadow_log_dir=str(records.resolve()))
    generate(build, repo, "cpu", opts)
    timeline: list[dict] = []
    replay = Replay(f"127.0.0.1:{ports.grpc}", args.pace)
    phases: dict[str, tuple[float, float]] = {}
    recalibrated: dict[str, Any] = {}
    t0 = time.time()
    stop = threading.Event()
    with Prometheus(work / "prometheus", ports.metrics, args.time_scale) as prometheus:
        watcher = threading.Thread(
            target=watch, args=(prometheus, 60 / args.time_scale, t0, stop, timeline), daemon=True
        )
        watcher.start()
        try:
            for name in ("clean", "shift", "after"):
                if name == "after":  # recalibrate on the records written during `shift`, serve the new T
                    recalibrated = shadow_calibration_step(build, records, since=t0 + phases["shift"][0])
                    print(f"recalibrated on {recalibrated['rows']} live rows {recalibrated['kinds']}: "
                          f"T {threshold:.4f} -> {recalibrated['threshold']:.4f}")  # fmt: skip
                    generate(build, repo, "cpu", replace(opts, rule=SHADOW_RULE))
                with TritonServer(repo, ports, log_file=work / f"tritonserver-{name}.log").start():
                    start = time.time() - t0
                    rows = streams[name]
                    replay.run(name, images[name][rows], test.labels[rows], big[name][rows], t0)
                    phases[name] = (start, time.time() - t0)
        finally:
            stop.set()
            watcher.join()
    summary = {name: phase_summary(replay.batches, timeline, name, *span) for name, span in phases.items()}
    result = {
        "shift": f"{args.shift} {args.strength}", "threshold": threshold, "rule": rule, "eps": check_eps(build),
        "shadow_rate": args.shadow_rate, "pace": args.pace, "time_scale": args.time_scale,
        "offline": {k: {m: v for m, v in r.items() if not m.endswith("_labels")} for k, r in check.items()},
        "recalibrated": {k: v for k, v in recalibrated.items() if k != "records_dir"},
        "phases": phases, "summary": summary, "timeline": timeline, "batches": replay.batches,
    }  # fmt: skip
    (build / "shift.json").write_text(json.dumps(result, indent=1))
    plot(result, build / "shift.png")
    print("\n| phase | rows | T | escalated | served acc | big acc (same rows) | loss vs big | shadow loss [bounds] "
          "| drift alert | loss alert |\n|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for name, s in summary.items():
        t = recalibrated["threshold"] if name == "after" else threshold
        e = {k: float("nan") if v is None else v for k, v in s["end"].items()}
        fired = {a: ("no" if v is None else f"after {v:.0f} s") for a, v in s["seconds_to_fire"].items()}
        print(f"| {name} | {s['rows']} | {t:.3f} | {s['escalation_rate']:.1%} | {s['served_acc']:.2%} | "
              f"{s['big_acc']:.2%} | {100 * (s['big_acc'] - s['served_acc']):+.2f} pts | "
              f"{100 * e['loss']:.2f}% [{100 * e['loss_lower']:.2f}, {100 * e['loss_upper']:.2f}] "
              f"(n {e['shadow_rows']:.0f}) "
              f"| {fired[DRIFT_ALERT]} | {fired[LOSS_ALERT]} |")  # fmt: skip
    print(f"wrote {build / 'shift.json'}, {build / 'shift.png'}")
    return 0


def check_eps(build: Path) -> float:
    from littlebig.export.pipeline import CALIBRATION_FILE, read_calibration

    eps = read_calibration(build).eps
    if eps is None:
        raise ValueError(f"{build / CALIBRATION_FILE} records no eps: rerun `littlebig calibrate`")
    return eps


if __name__ == "__main__":
    raise SystemExit(main())
