"""Issue 4's serving figures: escalation served vs offline, big rows vs escalated rows, batch-1 p50.

    .venv/bin/python -m bench.serving_figures [--build build]

Starts the embedded tritonserver on free ports on ``BUILD/model_repository`` (``make repo``), sends the
whole test split through littlebig in batches of 64, then a few hundred sequential batch-1 requests
to little, littlebig and big.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from littlebig.data import load_fashion_mnist
from littlebig.decision import cascade
from littlebig.export.pipeline import reference_logits
from littlebig.model_repository.server import Ports, TritonServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", type=Path, default=Path("build"))
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    repo = args.build / "model_repository"
    data, logits = load_fashion_mnist("test"), reference_logits(args.build, "test")
    threshold = json.loads((repo / "littlebig-repository.json").read_text())["threshold"]
    offline = cascade(logits["little"], logits["big"], threshold)["escalated"]
    with TritonServer(repo, Ports.free(), log_file=args.build / "serving-figures.log") as server:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports.grpc}")

        def infer(model: str, images: np.ndarray):
            inp = grpcclient.InferInput("IMAGE", list(images.shape), "UINT8")
            inp.set_data_from_numpy(images)
            return client.infer(model, [inp])

        def big_rows() -> int:
            return client.get_inference_statistics("big").model_stats[0].inference_count

        before = big_rows()
        served = np.concatenate(
            [
                infer("littlebig", data.images[a : a + 64]).as_numpy("ESCALATED").reshape(-1)
                for a in range(0, len(data), 64)
            ]
        )
        print(
            f"escalation served {served.mean():.4f} ({served.sum()} rows), offline {offline.mean():.4f} "
            f"({offline.sum()} rows), identical flags: {np.array_equal(served, offline)}; "
            f"big inferred {big_rows() - before} rows"
        )
        for model in ("little", "littlebig", "big"):
            latencies = []
            for k in range(args.requests):
                start = time.perf_counter()
                infer(model, data.images[k : k + 1])
                latencies.append(time.perf_counter() - start)
            ms = np.array(latencies[20:]) * 1000  # first 20 are warm-up
            print(
                f"{model:9s} batch 1, sequential: p50 {np.percentile(ms, 50):.2f} ms, "
                f"p95 {np.percentile(ms, 95):.2f} ms ({len(ms)} requests)"
            )
        client.close()


if __name__ == "__main__":
    main()
