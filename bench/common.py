"""What the bench entry points share (``make bench``, ``bench.ab``, ``make overload``): a private copy of the pair,
the real test images and their perf_analyzer input, warm-up requests, and the machine a result was measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bench.perf import PerfAnalyzer, write_input_data
from littlebig.export.pipeline import export_dir, exported_split, read_export, stages_of


def snapshot(build: Path, dest: Path) -> Path:
    """A private copy of the cascade's models (the pair, or every stage), its calibration and its cached val/test
    logits: every candidate serves the same files even if build/ moves, and the generator's val figures (governor,
    drift reference) come from the cache instead of a new pass over val."""
    import shutil

    exported = read_export(build)
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "export").mkdir(parents=True)
    names = ["export.json", *(exported[role]["onnx"] for role in stages_of(exported))]
    names += [n for n in ("logits-val.npz", "logits-test.npz") if (export_dir(build) / n).exists()]
    for name in names:  # copy2 keeps mtimes: the logits caches stay newer than the ONNX files
        shutil.copy2(export_dir(build) / name, dest / "export" / name)
    shutil.copy2(build / "calibration.json", dest / "calibration.json")
    return dest


def load_test_images(build: Path, work: Path, count: int) -> tuple[dict[str, Any], np.ndarray, Path]:
    """The pair's export record, the first ``count`` real test images, and perf_analyzer's --input-data of them."""
    exported = read_export(build)
    images = exported_split(exported, "test").images[:count]
    return exported, images, write_input_data(images, work / "input-data.json")


def warm_up(client, images: np.ndarray, model: str, batches: tuple[int, ...]) -> None:
    """A few requests per batch size, so no measured window pays for first-call set-up."""
    import tritonclient.grpc as grpcclient

    for batch in batches:
        for start in range(0, 4 * batch, batch):
            tensor = grpcclient.InferInput("IMAGE", [batch, *images.shape[1:]], "UINT8")
            tensor.set_data_from_numpy(np.ascontiguousarray(images[start : start + batch]))
            client.infer(model, [tensor])


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


def parse_points(text: str) -> list[tuple[int, int]]:
    """``8x16,1x16`` -> [(batch 8, concurrency 16), (batch 1, concurrency 16)]."""
    return [(int(b), int(c)) for b, c in (p.split("x") for p in text.split(","))]


def entry_parser(prog: str, doc: str, out_help: str, images: int, images_help: str) -> argparse.ArgumentParser:
    """The arguments every bench entry point takes: the build, perf_analyzer's venv, the output, the image count."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    ap.add_argument("--build", type=Path, default=Path("build"))
    ap.add_argument("--perf-venv", type=Path, default=Path(".venv-perf"))
    ap.add_argument("--out", type=Path, help=out_help)
    ap.add_argument("--images", type=int, default=images, help=images_help)
    return ap


def finish(
    result: dict[str, Any],
    out: Path,
    entry: str,
    argv: list[str] | None,
    started: float,
    print_table: Callable[[dict[str, Any]], None],
    plot: Callable[[dict[str, Any], Path], None] | None,
) -> int:
    """Stamp a bench record with where it came from (the machine, the command that reruns it, the date, its wall
    time), write its JSON and PNG (``plot``, where there is one) and print its table."""
    result.update({
        "machine": machine(),
        "command": " ".join([f"python -m {entry}", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.monotonic() - started, 1),
    })  # fmt: skip
    out.write_text(json.dumps(result, indent=2, default=float))
    if plot is not None:
        plot(result, out.with_suffix(".png"))
    print_table(result)
    written = f"{out} and {out.with_suffix('.png')}" if plot is not None else str(out)
    print(f"\nwrote {written} in {result['wall_seconds']:.0f} s")
    return 0


def add_search_arguments(ap: argparse.ArgumentParser, budget_env: str, budget_s: float) -> None:
    """The deployment search's arguments (bench/search.py ``session``), shared by ``make bench`` and
    ``make bench-stages``; the budget defaults to ``$budget_env`` or ``budget_s``."""
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32")
    ap.add_argument("--headline-batch", type=int, help="batch of the headline figures (default: the largest)")
    ap.add_argument(
        "--budget-s", type=float, default=float(os.environ.get(budget_env, budget_s)),
        help=f"time budget of the search, screen + confirm (default ${budget_env} or {budget_s:g})",
    )
    ap.add_argument("--screen-share", type=float, default=0.4, help="share of the budget for the screen")
    ap.add_argument("--screen-points", default="8x16,1x16,1x1", help="BATCHxCONCURRENCY points every candidate runs")
    ap.add_argument("--screen-ms", type=int, default=500, help="perf_analyzer window while screening")
    ap.add_argument("--finalists", type=int, default=2, help="most finalists per role confirmed over the sweep")


def search_parser(prog: str, doc: str, out_name: str, budget_env: str, budget_s: float) -> argparse.ArgumentParser:
    """The arguments of a deployment-search entry point (``make bench``, ``make bench-stages``): the build, the
    search's batches, concurrencies and budget, and the deployment flags every candidate starts from (``--rule``)."""
    from littlebig.cli import add_serve_options

    ap = entry_parser(prog, doc, f"bench JSON (default BUILD/{out_name}; the PNG goes beside it)", 512,
                      "real test images to send")  # fmt: skip
    add_search_arguments(ap, budget_env, budget_s)
    add_serve_options(ap, build=False)
    ap.set_defaults(out_name=out_name)  # --out's default, BUILD/out_name, once --build is known
    return ap


@dataclass(frozen=True)
class SearchStart:
    """A deployment-search entry point's parsed arguments and what follows from them."""

    args: argparse.Namespace
    started: float  # time.monotonic() at the start: the record's wall time
    batches: tuple[int, ...]
    concurrencies: tuple[int, ...]
    headline: int
    out: Path
    work: Path
    base: dict[str, Any]  # the deployment flags given: the base of every candidate
    pa: PerfAnalyzer
    pa_version: str


def start_search(
    ap: argparse.ArgumentParser,
    argv: list[str] | None,
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None,
) -> SearchStart:
    """Parse and check the arguments of a ``search_parser`` (``check``: the entry point's own, before anything is
    written), then make the work folder beside the output and find perf_analyzer."""
    from littlebig.cli import given_serve_options

    args = ap.parse_args(argv)
    started = time.monotonic()
    batches = tuple(int(b) for b in args.batches.split(","))
    headline = headline_batch(ap, args, batches)
    if check is not None:
        check(ap, args)
    out = args.out or args.build / args.out_name
    pa = PerfAnalyzer(args.perf_venv)
    return SearchStart(
        args, started, batches, tuple(int(c) for c in args.concurrency.split(",")), headline, out, work_dir(out),
        given_serve_options(args), pa, pa.version(),
    )  # fmt: skip


def headline_batch(ap: argparse.ArgumentParser, args: argparse.Namespace, batches: tuple[int, ...]) -> int:
    """The batch of the headline figures: --headline-batch, which must be one of --batches, or the largest."""
    headline = args.headline_batch or max(batches)
    if headline not in batches:
        ap.error(f"--headline-batch {headline} is not among --batches {args.batches}")
    return headline


def work_dir(out: Path) -> Path:
    """Where an entry point writing ``out`` keeps its repositories, logs and perf_analyzer files."""
    work = out.parent / f"{out.stem}-work"
    work.mkdir(parents=True, exist_ok=True)
    return work


#: The background of each phase of a timeline plot (bench.shift, bench.guard): clean, shifted, clean again.
PHASE_COLORS = {"clean": "green", "shift": "red", "after": "blue", "back": "blue"}


def shade_phases(axes: Any, phases: dict[str, tuple[float, float]]) -> None:
    """Shade each phase's span of seconds on every axis of a timeline plot."""
    for ax in axes:
        for phase, (start, end) in phases.items():
            ax.axvspan(start, end, alpha=0.08, color=PHASE_COLORS[phase])


def save_figure(fig: Any, path: Path, title: str, fontsize: float = 10) -> None:
    """Title, tighten and write a bench figure (PNG, 110 dpi)."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def concurrency_axis(ax: Any, batch: int, concurrencies: list[int], legend_fontsize: float) -> None:
    """A throughput-against-concurrency panel of a deployment search: log2 concurrency ticks, grid, legend."""
    from matplotlib.ticker import ScalarFormatter

    ax.set(title=f"batch {batch}", ylabel="images/s", xlabel="concurrency (requests in flight)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(concurrencies)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_fontsize)


def trailing_share(hits: Any, rows: Any, window: int = 50) -> tuple[int, np.ndarray]:
    """sum(hits) / sum(rows) over each run of ``window`` consecutive batches (a run shorter than the window uses
    all its batches: numpy's "valid" convolution would otherwise swap its arguments), with the window used; the
    i-th share ends at batch i + window - 1."""
    hits, rows = np.asarray(hits, dtype=float), np.asarray(rows, dtype=float)
    window = max(1, min(window, len(rows)))
    if not len(rows):
        return window, np.zeros(0)
    ones = np.ones(window)
    return window, np.convolve(hits, ones, "valid") / np.convolve(rows, ones, "valid")
