"""``make gpu-check``: the cascade served by the real tritonserver on an NVIDIA GPU, checked and timed.

Triton's onnxruntime and TensorRT backends are not installable from PyPI, so little and big are served
by the ``gpu-standin`` profile: Python-backend STAND-INS for those backends that run the project's own
checkpoints with torch on the instance's GPU (KIND_GPU) and return LOGITS in GPU memory, as those
backends do. The littlebig BLS model is the one every profile serves.

1. **Answers.** The offline reference is computed by the same stand-in code (``TorchStandIn``) on the
   same GPU, once per bucket size (a served batch runs padded to one of them). Every served row must
   have exactly the label and escalated flag of the reference in some bucket, and its probs within
   ``PROBS_ATOL`` of that reference; checked at several batch sizes one request at a time and from 16
   concurrent clients, with big's ``inference_count`` delta equal to the escalated rows.
2. **Speed.** perf_analyzer (tritonclient 2.51.0's binary) on real test images: little alone, big alone
   and littlebig, with 1 and 2 instances of little and big; each at its best instance count. Prints the
   fraction of R* = 1 / (1/R_little + p/R_big) that littlebig reaches (p: escalated fraction of the
   images sent).

Also fails when any little/big output reached the BLS model in GPU memory (the served metric
``littlebig_gpu_memory_outputs_total``): the answers alone cannot show it, since the BLS model copies such a
tensor through torch when torch is there, as it is here. The stand-ins are pinned to GPU 0 (``gpus: [0]``,
where the reference runs) and the report records how many GPUs the host has.

Writes ``BUILD/gpu-check.json``; exits 1 if any answer differs. Without a CUDA device it prints exactly
``skipped: no CUDA device`` and exits 0.

``prepare`` (any machine with ``make setup``: it needs the generator and the dataset) writes a bundle the
GPU machine needs nothing else for: the generated repositories (instances 1 and 2), the test images and
the served T. The check itself imports only numpy, torch(+timm, safetensors) and littlebig's sources, and
talks to the server over HTTP with urllib, so the GPU machine needs no tritonclient or gRPC.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import rates
from littlebig.decision import CASCADE, ROLES, confidence, escalate, softmax
from littlebig.metrics_text import fetch
from littlebig.model_repository.health import binary_infer_request, split_binary_response

SKIP_LINE = "skipped: no CUDA device"
#: Served PROBS may differ from the reference by this much (absolute): the same FP32 code on the same GPU,
#: differing only in the BLS model's own softmax and float32 transport.
PROBS_ATOL = 1e-4
BATCH_SIZES = (1, 7, 32, 64)
CLIENTS = 16
CLIENT_BATCH = 8
INSTANCE_COUNTS = (1, 2)
DATATYPES = {"UINT8": np.uint8, "INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_}
OUTPUTS = ("LABEL", "PROBS", "ESCALATED", "DEGRADED")
GPU_OUTPUTS_METRIC = "littlebig_gpu_memory_outputs_total"


def cuda_device() -> str | None:
    """The first CUDA device's name, or None when there is no nvidia-smi or torch sees no CUDA device."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


# --- the bundle: everything the GPU machine needs besides the code ---------------------------------


def repo_dir(bundle: Path, instances: int) -> Path:
    return bundle / f"repo-{instances}"


def prepare(
    build: Path,
    bundle: Path,
    device: str = "cuda",
    instance_counts: tuple[int, ...] = INSTANCE_COUNTS,
    rows: int | None = None,
) -> dict[str, Any]:
    """Generate the gpu-standin repositories and save the test images and the served T into ``bundle``."""
    from littlebig.data import load_split
    from littlebig.export.pipeline import read_export
    from littlebig.model_repository.generate import ServeOptions, generate, standin_buckets

    exported = read_export(build)
    data = load_split("test", exported["data_dir"], tuple(exported["service_size"]))
    images = data.images if rows is None else data.images[:rows]
    bundle.mkdir(parents=True, exist_ok=True)
    summary = {}
    for n in instance_counts:
        opts = ServeOptions(little_instances=n, big_instances=n, standin_device=device)
        summary = generate(build, repo_dir(bundle, n), "gpu-standin", opts)
    np.save(bundle / "images.npy", images)
    record = {
        "device": device,
        "instance_counts": list(instance_counts),
        "threshold": summary["threshold"],
        "rule": summary["rule"],
        "service_size": summary["service_size"],
        "buckets": {role: standin_buckets(opts, role) for role in ROLES},
        "gpus": list(opts.standin_gpus) if device == "cuda" else [],
        "max_batch_size": {role: opts.role_max_batch(role) for role in ROLES},
        "rows": int(len(images)),
    }
    (bundle / "bundle.json").write_text(json.dumps(record, indent=2))
    return record


def read_bundle(bundle: Path) -> tuple[dict[str, Any], np.ndarray]:
    path = bundle / "bundle.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `make gpu-check-bundle` where `make setup` was done")
    return json.loads(path.read_text()), np.load(bundle / "images.npy")


# --- the offline reference, by the serving code -------------------------------------------------


@dataclass
class Reference:
    """Per role, per bucket size: every row's logits as the stand-in computes them inside that bucket."""

    logits: dict[str, dict[int, np.ndarray]]
    threshold: float

    def candidates(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(escalated, label, probs) for every (little bucket, big bucket) pair: [K, n], [K, n], [K, n, C]."""
        esc, label, probs = [], [], []
        for lo in self.logits["little"].values():
            p_little = softmax(lo[rows])
            e = escalate(confidence(p_little), self.threshold)
            for hi in self.logits["big"].values():
                p = np.where(e[:, None], softmax(hi[rows]), p_little)
                esc.append(e)
                label.append(p.argmax(-1))
                probs.append(p)
        return np.stack(esc), np.stack(label), np.stack(probs)

    def escalated(self) -> np.ndarray:
        """Rows escalated in the largest little bucket (for p)."""
        lo = self.logits["little"][max(self.logits["little"])]
        return escalate(confidence(softmax(lo)), self.threshold)

    def bucket_spread(self) -> dict[str, float]:
        """Max abs logit difference between buckets, per role: how batch-invariant the stand-ins are."""
        out = {}
        for role, per in self.logits.items():
            arrays = list(per.values())
            out[role] = float(max((np.abs(a - arrays[0]).max() for a in arrays[1:]), default=0.0))
        return out


def compute_reference(repo: Path, images: np.ndarray, device: str, buckets: dict[str, list[int]], threshold: float):
    """The stand-ins of ``repo`` (its checkpoints), offline on ``device``, every row in every bucket."""
    from littlebig.model_repository.torch_standin import TorchStandIn

    logits = {}
    for role in ROLES:
        standin = TorchStandIn(repo / role / "1" / "model.safetensors", images.shape[1:], device, buckets[role])
        logits[role] = standin.reference(images)
    return Reference(logits, threshold)


def compare(reference: Reference, rows: np.ndarray, served: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean per row: the served answer equals the reference in some bucket (label, escalated exactly)."""
    esc, label, probs = reference.candidates(rows)
    got_esc = served["ESCALATED"].reshape(-1).astype(bool)
    got_label = served["LABEL"].reshape(-1)
    close = np.abs(probs - served["PROBS"][None]).max(-1) <= PROBS_ATOL
    match = (esc == got_esc[None]) & (label == got_label[None]) & close
    return match.any(0) & ~served["DEGRADED"].reshape(-1).astype(bool)


# --- a KServe v2 HTTP client with the binary-data extension (urllib only) -----------------------


class HttpClient:
    """Just enough of KServe v2 over HTTP: infer with binary tensors (health.py's builder), model statistics."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout

    def infer(self, model: str, images: np.ndarray, outputs: tuple[str, ...] = OUTPUTS) -> dict[str, np.ndarray]:
        raw = np.ascontiguousarray(images, dtype=np.uint8).tobytes()
        body, headers = binary_infer_request([("IMAGE", "UINT8", list(images.shape), raw)], outputs)
        request = urllib.request.Request(f"{self.url}/v2/models/{model}/infer", data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            length = response.headers.get("Inference-Header-Content-Length")
            meta, tensors = split_binary_response(response.read(), length)
        return {
            out["name"]: np.frombuffer(tensors[out["name"]], dtype=DATATYPES[out["datatype"]]).reshape(out["shape"])
            for out in meta["outputs"]
        }

    def metric_total(self, metrics_url: str, name: str) -> float | None:
        """Sum of a metric family's samples on Triton's metrics port; None when the family is not exported."""
        metrics = fetch(metrics_url, timeout=self.timeout)
        return metrics.total(name) if name in metrics else None

    def inference_count(self, model: str) -> int:
        """Rows the model has inferred (Triton's inference_count counts rows)."""
        with urllib.request.urlopen(f"{self.url}/v2/models/{model}/stats", timeout=self.timeout) as response:
            return int(json.loads(response.read())["model_stats"][0]["inference_count"])


def gpu_memory_outputs(count: float | None) -> dict[str, Any]:
    """The served count of little/big outputs that reached the BLS model in GPU memory: it must be 0."""
    return {
        "metric": GPU_OUTPUTS_METRIC,
        "count": count,
        "ok": count == 0,  # None: the served BLS model does not export it, so nothing proves the memory path
    }


def gpu_inventory() -> dict[str, Any]:
    """The GPUs this process sees (count, names) and CUDA_VISIBLE_DEVICES: instance counts hold on GPU 0 only."""
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names = [torch.cuda.get_device_name(i) for i in range(count)]
    except ImportError:
        count, names = 0, []
    return {"count": count, "names": names, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def check_answers(
    client: HttpClient,
    images: np.ndarray,
    reference: Reference,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    clients: int = CLIENTS,
    sequential_rows: int = 512,
) -> dict[str, Any]:
    """Served answers vs the reference: each batch size in turn, then every image from ``clients`` threads."""
    big_before = client.inference_count("big")
    jobs: list[tuple[str, np.ndarray]] = []
    head = min(sequential_rows, len(images))
    for size in batch_sizes:
        jobs += [(f"batch {size}", np.arange(a, min(a + size, head))) for a in range(0, head, size)]
    starts = range(0, len(images), CLIENT_BATCH)
    concurrent = [(f"{clients} clients", np.arange(a, min(a + CLIENT_BATCH, len(images)))) for a in starts]

    def run(job: tuple[str, np.ndarray]) -> tuple[str, np.ndarray, np.ndarray, int]:
        name, rows = job
        served = client.infer(CASCADE, images[rows])
        return name, rows, compare(reference, rows, served), int(served["ESCALATED"].sum())

    results = [run(j) for j in jobs]
    with ThreadPoolExecutor(clients) as pool:
        results += list(pool.map(run, concurrent))
    big_rows = client.inference_count("big") - big_before
    per_case: dict[str, dict[str, int]] = {}
    differing: list[int] = []
    escalated = 0
    for name, rows, ok, esc in results:
        case = per_case.setdefault(name, {"rows": 0, "differ": 0})
        case["rows"] += len(rows)
        case["differ"] += int((~ok).sum())
        differing += [int(r) for r in rows[~ok]]
        escalated += esc
    return {
        "rows_checked": int(sum(c["rows"] for c in per_case.values())),
        "cases": per_case,
        "rows_differing": len(differing),
        "first_differing_rows": sorted(set(differing))[:20],
        "escalated_rows": escalated,
        "big_inference_count_delta": big_rows,
        "big_rows_match": big_rows == escalated,
        "probs_atol": PROBS_ATOL,
        "bucket_spread_max_abs_logit": reference.bucket_spread(),
        "ok": not differing and big_rows == escalated,
    }


# --- speed: perf_analyzer ---------------------------------------------------------------------------


def perf_analyzer(path: str | None, work: Path):
    """perf_analyzer: ``path`` (a brought binary) or ``.venv-perf`` (make perf-analyzer); None if neither runs."""
    from bench.perf import PerfAnalyzer, PerfAnalyzerError

    pa = PerfAnalyzer() if path is None else PerfAnalyzer.brought_to(Path(path), work)
    try:
        pa.version()
    except (PerfAnalyzerError, OSError, subprocess.SubprocessError):
        return None
    return pa


def measure_speed(
    pa, grpc_url: str, input_data: Path, work: Path, batch: int, concurrency: int, interval_ms: int = 5000
) -> dict[str, Any]:
    """Throughput (images/s) of little, big and littlebig on one server (``work``: a fresh folder per server)."""
    from bench.perf import Window, measure

    work.mkdir(parents=True, exist_ok=False)  # perf_analyzer's CSVs: never read a previous server's
    window = Window(interval_ms=interval_ms, stability_pct=10, max_trials=10)
    out = {}
    for model in (*ROLES, CASCADE):
        composing = list(ROLES) if model == CASCADE else None
        point = measure(pa, grpc_url, model, batch, concurrency, input_data, work, window, composing)
        out[model] = point.as_dict()
    return out


# --- the check --------------------------------------------------------------------------------------


def run_check(args: argparse.Namespace, gpu: str) -> int:
    from bench.perf import write_input_data
    from littlebig.model_repository.server import Ports, TritonServer

    bundle, report_path = args.bundle, args.build / "gpu-check.json"
    if int(np.__version__.split(".")[0]) >= 2:  # the 2.51 Python backend builds zero-byte tensors with numpy 2
        print(f"numpy {np.__version__} here: the check needs numpy < 2 (make gpu-venv, deploy/README.md)")
        return 2
    if not (bundle / "bundle.json").exists():
        missing = [f for f in ("export/export.json", "calibration.json") if not (args.build / f).exists()]
        if missing:  # a fresh clone: say what to run instead of a FileNotFoundError from deep inside
            print(
                f"no bundle at {bundle}, and {args.build} has no {' or '.join(missing)} to prepare one from: run "
                "`make gpu-check-bundle` first (it exports and calibrates; deploy/README.md), or bring build/gpu-check/"
            )
            return 2
        prepare(args.build, bundle, device=args.device)
    meta, images = read_bundle(bundle)
    if meta["device"] != args.device:
        raise SystemExit(f"{bundle} was prepared for device {meta['device']}, not {args.device}: prepare it again")
    device = "cuda:0" if args.device == "cuda" else args.device
    t0 = time.monotonic()
    reference = compute_reference(repo_dir(bundle, 1), images, device, meta["buckets"], meta["threshold"])
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()  # the served stand-ins get the memory back
    report: dict[str, Any] = {
        "gpu": gpu,
        # the stand-ins run on meta["gpus"] only (KIND_GPU without gpus would put every count on each GPU)
        "gpus": {**gpu_inventory(), "standin_gpus": meta.get("gpus", [])},
        "stand_in": "little/big are Python-backend torch models on KIND_GPU (LOGITS in GPU memory), standing in "
        "for Triton's onnxruntime/TensorRT backends; littlebig is the served BLS model",
        "threshold": meta["threshold"],
        "rows": meta["rows"],
        "reference_seconds": round(time.monotonic() - t0, 1),
    }
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    pa = None if args.no_perf else perf_analyzer(args.perf_analyzer, work)
    perf_images = images[: args.perf_images]
    input_data = write_input_data(perf_images, work / "input.json")
    p = float(reference.escalated()[: len(perf_images)].mean())
    speed: dict[str, Any] = {}
    try:
        for n in meta["instance_counts"]:
            log = args.build / f"gpu-check-tritonserver-{n}.log"
            log.unlink(missing_ok=True)
            server = TritonServer(repo_dir(bundle, n), Ports.free(), log_file=log).start(timeout=300)
            try:
                client = HttpClient(server.url)
                if n == meta["instance_counts"][0]:
                    report["answers"] = check_answers(client, images, reference)
                    a = report["answers"]
                    metrics = f"http://127.0.0.1:{server.ports.metrics}"
                    a["gpu_memory_outputs"] = gpu_memory_outputs(client.metric_total(metrics, GPU_OUTPUTS_METRIC))
                    a["ok"] = a["ok"] and a["gpu_memory_outputs"]["ok"]
                    print(
                        f"answers: {a['rows_checked']} rows, {a['rows_differing']} differ; big rows "
                        f"{a['big_inference_count_delta']} = escalated {a['escalated_rows']}: {a['big_rows_match']}; "
                        f"outputs in GPU memory: {a['gpu_memory_outputs']['count']}"
                    )
                if pa is not None:
                    grpc = f"127.0.0.1:{server.ports.grpc}"
                    speed[n] = measure_speed(
                        pa, grpc, input_data, work / f"instances-{n}", args.batch, args.concurrency, args.interval_ms
                    )
            finally:
                server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if pa is None:
        report["speed"] = "not measured: " + ("--no-perf" if args.no_perf else "perf_analyzer did not run")
    else:
        models = (*ROLES, CASCADE)
        best = {m: max(speed.values(), key=lambda s, m=m: s[m]["throughput"])[m] for m in models}
        counts = {m: next(n for n, s in speed.items() if s[m] is best[m]) for m in best}
        ideal = rates.ideal(best["little"]["throughput"], best["big"]["throughput"], p)
        report["speed"] = {
            "batch": args.batch,
            "concurrency": args.concurrency,
            "p": p,
            "by_instances": speed,
            "best_instances": counts,
            "images_per_s": {m: best[m]["throughput"] for m in best},
            "r_star": ideal,
            "fraction_of_r_star": best[CASCADE]["throughput"] / ideal,
            "speedup_vs_big": best[CASCADE]["throughput"] / best["big"]["throughput"],
        }
        s = report["speed"]
        print(
            f"speed ({gpu}, batch {args.batch}, concurrency {args.concurrency}): little "
            f"{s['images_per_s']['little']:.0f}, big {s['images_per_s']['big']:.0f}, littlebig "
            f"{s['images_per_s'][CASCADE]:.0f} img/s (best of instances {list(speed)}); p = {p:.3f}, "
            f"R* = {ideal:.0f} img/s: littlebig reaches {s['fraction_of_r_star']:.1%} of R*, "
            f"{s['speedup_vs_big']:.2f}x big"
        )
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2, default=str))
    ok = report["answers"]["ok"]
    if not ok:
        a, gpu_outputs = report["answers"], report["answers"]["gpu_memory_outputs"]
        why = [] if not a["rows_differing"] and a["big_rows_match"] else ["served answers differ from the reference"]
        if not gpu_outputs["ok"]:
            why.append(f"{gpu_outputs['metric']} is {gpu_outputs['count']} (must be 0: CPU memory was asked for)")
        print(f"FAILED: {'; '.join(why)}; wrote {report_path}")
        return 1
    if pa is None and not args.no_perf:
        print(
            f"answers passed, speed NOT measured: perf_analyzer did not run (pass --perf-analyzer PATH to the "
            f"tritonclient 2.51.0 wheel's binary, or run `make perf-analyzer`); wrote {report_path}"
        )
        return 2
    print(f"passed: wrote {report_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", type=Path, default=Path("build"))
    parser.add_argument("--bundle", type=Path, default=None, help="default: BUILD/gpu-check")
    parser.add_argument("--prepare-only", action="store_true", help="write the bundle (no GPU needed) and stop")
    parser.add_argument(
        "--perf-analyzer", default=os.environ.get("PERF_ANALYZER") or None, help="a brought binary (default .venv-perf)"
    )
    parser.add_argument("--no-perf", action="store_true", help="check the answers only")
    parser.add_argument("--batch", type=int, default=16, help="perf_analyzer -b")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--perf-images", type=int, default=1024, help="test images perf_analyzer cycles through")
    parser.add_argument("--interval-ms", type=int, default=5000, help="perf_analyzer measurement window")
    parser.add_argument(
        "--device", default="cuda", help="cuda; cpu: a dry run of this check's code on the CPU (tests), no GPU check"
    )
    args = parser.parse_args(argv)
    args.bundle = args.bundle or args.build / "gpu-check"
    if args.prepare_only:
        record = prepare(args.build, args.bundle, device=args.device)
        print(f"wrote {args.bundle}: {record['rows']} images, T = {record['threshold']:.6f}")
        return 0
    if args.device != "cuda":
        return run_check(args, f"none: dry run on {args.device} (stand-ins on {args.device}, not a GPU measurement)")
    gpu = cuda_device()
    if gpu is None:
        print(SKIP_LINE)
        return 0
    return run_check(args, gpu)


if __name__ == "__main__":
    sys.exit(main())
