"""`make bench` tooling: perf_analyzer installs and runs, and it really sends our real images.

perf_analyzer lives in its own venv (``make perf-analyzer``, which ``make bench`` runs); the tests that
need it skip, saying so, only when that venv is absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bench.perf import PerfAnalyzer, read_input_data, write_input_data
from littlebig.data import load_fashion_mnist
from littlebig.decision import cascade

PERF_VENV = Path(os.environ.get("LITTLEBIG_PERF_VENV", ".venv-perf"))
needs_perf = pytest.mark.skipif(
    not (PERF_VENV / "bin" / "perf_analyzer").exists(),
    reason=f"{PERF_VENV}/bin/perf_analyzer is absent: run `make perf-analyzer` (make bench does)",
)


@needs_perf
def test_perf_analyzer_runs():
    assert PerfAnalyzer(PERF_VENV).version().startswith("Perf Analyzer Version 2.51")


def test_input_data_round_trips_real_images(tmp_path):
    images = load_fashion_mnist("test").images[:48]
    path = write_input_data(images, tmp_path / "input.json")
    entries = json.loads(path.read_text())["data"]
    assert len(entries) == 48  # one entry per batch-1 sample: `-b N` takes N consecutive ones
    assert entries[0]["IMAGE"]["shape"] == [28, 28, 1]
    back = read_input_data(path)
    assert back.dtype == np.uint8 and np.array_equal(back, images)


def test_input_data_rejects_non_images(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_input_data(np.zeros((2, 28, 28, 1), dtype=np.float32), tmp_path / "x.json")


@needs_perf
@pytest.mark.parametrize("batch", [1, 8])
def test_perf_analyzer_sends_exactly_our_images(server, build_dir, served_threshold, tmp_path, batch):
    """64 real rows, each sent once: littlebig sees 64 rows and big exactly the offline escalations."""
    import tritonclient.grpc as grpcclient

    from bench.run import server_stats
    from littlebig.data import load_split
    from littlebig.export.onnx_export import INPUT_NAME, OUTPUT_NAME, onnx_session
    from littlebig.export.pipeline import export_dir, read_export

    exported = read_export(build_dir)
    images = load_split("test", exported["data_dir"], tuple(exported["service_size"])).images[:64]
    logits = {
        role: onnx_session(export_dir(build_dir) / exported[role]["onnx"]).run([OUTPUT_NAME], {INPUT_NAME: images})[0]
        for role in ("little", "big")
    }
    expected_big = int(cascade(logits["little"], logits["big"], served_threshold)["escalated"].sum())
    data = write_input_data(images, tmp_path / "input.json")

    url = f"127.0.0.1:{server.ports.grpc}"
    client = grpcclient.InferenceServerClient(url)
    before = {m: server_stats(client, m) for m in ("big", "littlebig")}
    done = PerfAnalyzer(PERF_VENV).run(
        ["-m", "littlebig", "-u", url, "-i", "grpc", "-b", str(batch), f"--request-count={64 // batch}",
         f"--input-data={data}"]
    )  # fmt: skip
    after = {m: server_stats(client, m) for m in ("big", "littlebig")}
    client.close()
    assert done.returncode == 0, done.stdout[-2000:]
    rows = {m: after[m]["inference_count"] - before[m]["inference_count"] for m in before}
    assert rows == {"littlebig": 64, "big": expected_big}
