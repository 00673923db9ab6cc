"""`littlebig eval`: a labelled split through the served model, with accuracy, escalation, MACs and speed.

The figures are checked against the offline report (build/report.json) when the run is comparable:
the full test split at the served default threshold.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from littlebig.client.aio import AsyncLittleBigClient
from littlebig.client.client import Classification, chunks
from littlebig.data import Dataset, load_split
from littlebig.export.macs import macs_saved


def load_offline(build: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """export.json (MACs) and report.json (offline accuracy), where they exist."""

    def read(path: Path) -> dict[str, Any] | None:
        return json.loads(path.read_text()) if path.exists() else None

    return read(build / "export" / "export.json"), read(build / "report.json")


async def _classify_all(
    url: str,
    model: str,
    data: Dataset,
    batch_size: int,
    concurrency: int,
    threshold: float | str | None,
    timeout_s: float,
    progress: bool,
) -> tuple[Classification, float]:
    from tqdm import tqdm

    async with AsyncLittleBigClient(url, model, timeout_s=timeout_s, max_in_flight=concurrency) as client:
        service = await client.service()
        if data.images.shape[1:] != service.size:
            from littlebig.data import resize_images

            data = Dataset(resize_images(data.images, service.size), data.labels, data.class_names)
        size = min(batch_size, service.max_batch_size)
        spans = list(chunks(len(data), size))
        bar = tqdm(total=len(data), desc=f"eval {model}", unit="img", disable=not progress)
        await client.infer_batch(data.images[:1], threshold)  # warm-up, not timed

        async def one(span: slice) -> Classification:
            part = await client.infer_batch(data.images[span], threshold)
            bar.update(len(part))
            return part

        start = time.perf_counter()
        parts = await asyncio.gather(*(one(s) for s in spans))
        seconds = time.perf_counter() - start
        bar.close()
        return Classification.concat(list(parts), service.class_names), seconds


def evaluate(
    url: str,
    model: str = "littlebig",
    data_dir: str | None = None,
    split: str = "test",
    threshold: float | str | None = None,
    batch_size: int = 32,
    concurrency: int = 8,
    timeout_s: float = 60.0,
    build: Path = Path("build"),
    progress: bool = True,
    limit: int | None = None,
) -> dict[str, Any]:
    """Run the split through ``model`` and summarise it as a JSON-ready dict.

    A folder of class folders is split exactly as export recorded it (the same val/test rows, the train share
    a distilled little trained on left out, the model's class ids, the sample size where it is export's data).
    """
    exported, report = load_offline(build)
    recorded = exported is not None and data_dir is not None and _same_dir(exported.get("data_dir"), data_dir)
    data = _load(split, data_dir, url, model, timeout_s, exported if recorded else None)
    if limit:
        data = Dataset(data.images[:limit], data.labels[:limit], data.class_names)
    result, seconds = asyncio.run(
        _classify_all(url, model, data, batch_size, concurrency, threshold, timeout_s, progress)
    )
    summary: dict[str, Any] = {
        "model": model,
        "split": split,
        "images": len(data),
        "threshold": threshold,
        "accuracy": float((result.labels == data.labels).mean()),
        "escalation_rate": float(result.escalated.mean()),
        "degraded_rows": int(result.degraded.sum()),
        "images_per_s": len(data) / seconds,
        "seconds": seconds,
        "batch_size": batch_size,
        "concurrency": concurrency,
    }
    if exported and model == "littlebig":
        ml, mb = exported["little"]["macs"], exported["big"]["macs"]
        summary["macs_saved"] = macs_saved(ml, mb, summary["escalation_rate"])
    same_data = _same_dir((report or {}).get("data", {}).get("data_dir"), data_dir)  # the report's data
    comparable = report and split == "test" and threshold is None and limit is None and same_data
    if comparable and model == "littlebig":
        offline = report["rules"][report["serve_rule"]]
        summary["offline_accuracy"] = offline["test_acc"]
        summary["matches_offline"] = abs(summary["accuracy"] - offline["test_acc"]) < 0.5 / len(data) and abs(
            summary["escalation_rate"] - offline["escalation_rate"]
        ) < 0.5 / len(data)
    elif comparable and model in ("little", "big"):
        summary["offline_accuracy"] = report[model]["test_acc"]
        summary["matches_offline"] = abs(summary["accuracy"] - report[model]["test_acc"]) < 0.5 / len(data)
    return summary


def _same_dir(a: str | None, b: str | None) -> bool:
    return a == b or (a is not None and b is not None and Path(a).resolve() == Path(b).resolve())


def _load(
    split: str, data_dir: str | None, url: str, model: str, timeout_s: float, exported: dict[str, Any] | None
) -> Dataset:
    """The labelled split: Fashion-MNIST, a ``val/ test/`` folder, or a folder of class folders split as export's."""
    from littlebig.export.pipeline import exported_split

    if data_dir is None:
        return load_split(split, None)
    return exported_split({**(exported or {}), "data_dir": data_dir}, split, _service_size(url, model, timeout_s))


def _service_size(url: str, model: str, timeout_s: float) -> tuple[int, int, int]:
    from littlebig.client.client import LittleBigClient

    with LittleBigClient(url, model, timeout_s=timeout_s) as client:
        return client.service.size


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"{s['model']} on {s['split']} ({s['images']} images, batch {s['batch_size']}, {s['concurrency']} in flight)",
        f"  accuracy         {s['accuracy']:.4f}",
        f"  escalated        {s['escalation_rate']:.1%}",
    ]
    if "macs_saved" in s:
        lines.append(f"  MACs saved       {s['macs_saved']:.1%} (expected, vs big alone)")
    lines.append(f"  throughput       {s['images_per_s']:.0f} images/s")
    if "matches_offline" in s:
        verdict = "yes" if s["matches_offline"] else "NO"
        lines.append(f"  equals offline   {verdict} (offline accuracy {s['offline_accuracy']:.4f})")
    return "\n".join(lines)
