"""The client library and CLI against the real server: answers equal the offline reference."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from littlebig.client import AsyncLittleBigClient, ClientError, InputError, LittleBigClient, ServerUnavailable
from littlebig.data import read_image
from littlebig.decision import cascade
from tests.helpers import offline_reference

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def client(server):
    with LittleBigClient(f"127.0.0.1:{server.ports.grpc}") as c:
        yield c


def reference_for_pixels(build_dir, images: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Offline reference for arbitrary pixels: the exported ONNX files and the shared rule."""
    from littlebig.export.pipeline import export_dir, run_onnx

    logits = {r: run_onnx(export_dir(build_dir) / f"{r}.onnx", images, r) for r in ("little", "big")}
    return cascade(logits["little"], logits["big"], threshold)


def assert_same(result, expected):
    assert np.array_equal(result.labels, expected["label"])
    assert np.array_equal(result.escalated, expected["escalated"])
    np.testing.assert_allclose(result.probs, expected["probs"], atol=1e-5, rtol=0)


def test_service_is_read_from_the_server(client, build_dir, served_threshold):
    exported = json.loads((build_dir / "export" / "export.json").read_text())
    s = client.service
    assert s.size == tuple(exported["service_size"]) and s.dtype == "UINT8" and s.input_name == "IMAGE"
    assert list(s.class_names) == exported["class_names"] and s.threshold == served_threshold
    assert s.max_batch_size == 64 and s.is_cascade


def test_numpy_batch_larger_than_max_batch_is_split(client, test_split, served_threshold):
    data, logits = test_split
    rows = np.arange(300, 450)  # 150 rows > max_batch_size 64
    result = client.classify(data.images[rows])
    assert_same(result, offline_reference(logits, rows, served_threshold))
    assert result.names[0] == data.class_names[result.labels[0]]
    single = client.classify(data.images[rows[0]])  # one [H, W, C] image
    assert single.labels.tolist() == result.labels[:1].tolist()


def test_deadline_and_reason_reach_the_client(client, test_split, served_threshold):
    """A past deadline: the rows big would answer come back from little, each record saying why."""
    data, logits = test_split
    rows = np.arange(700, 764)
    expected = offline_reference(logits, rows, served_threshold)
    result = client.classify(data.images[rows], deadline_ms=0.001)
    assert not result.escalated.any()
    assert result.reasons.tolist() == np.where(expected["escalated"], "deadline", "confident").tolist()
    assert [r["reason"] for r in result.records()] == result.reasons.tolist()
    on_time = client.classify(data.images[rows], deadline_ms=60_000)
    assert_same(on_time, expected)
    with pytest.raises(InputError, match="deadline_ms"):
        client.classify(data.images[:2], deadline_ms=-1)


def test_files_folder_and_per_request_threshold(client, test_split, build_dir, tmp_path):
    data, _ = test_split
    for i in range(12):
        sub = tmp_path / "imgs" / ("png" if i < 8 else "jpg")
        sub.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(data.images[i, :, :, 0])
        img.save(sub / f"{i:02d}.png") if i < 8 else img.convert("RGB").resize((56, 56)).save(sub / f"{i:02d}.jpg")
    files = sorted((tmp_path / "imgs").rglob("*.*"))
    pixels = np.stack([read_image(f, client.service.size) for f in files])
    for threshold in (None, 0.99):
        result = client.classify(tmp_path / "imgs", threshold=threshold)
        t = client.service.threshold if threshold is None else threshold
        assert result.files == [str(f) for f in files]
        assert_same(result, reference_for_pixels(build_dir, pixels, t))
    # PNGs are lossless: their answers equal the test images' own reference
    png = client.classify(sorted((tmp_path / "imgs" / "png").glob("*.png")))
    assert_same(png, reference_for_pixels(build_dir, data.images[:8], client.service.threshold))


def test_bad_inputs_are_one_line_errors(client, tmp_path, test_split):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError, match=r"corrupt.png: not a readable image"):
        client.classify([corrupt])
    with pytest.raises(InputError, match="no such file"):
        client.classify([tmp_path / "missing.png"])
    with pytest.raises(InputError, match="the service takes"):
        client.classify(np.zeros((2, 32, 32, 1), np.uint8))
    with pytest.raises(InputError, match="uint8"):
        client.classify(np.zeros((2, 28, 28, 1), np.float32))
    with pytest.raises(InputError, match=r"threshold must be a number in \[0, 1\]"):
        client.classify(test_split[0].images[:2], threshold="abc")


def test_server_not_running_says_how_to_start_it():
    from littlebig.model_repository.server import free_port

    with LittleBigClient(f"127.0.0.1:{free_port()}", retries=1, backoff_s=0.01) as c:
        with pytest.raises(ServerUnavailable, match="make serve"):
            c.classify(np.zeros((1, 28, 28, 1), np.uint8))


def test_records_are_linear_in_the_rows(monkeypatch):
    """records() builds names, confidences and top-k once for the batch, not once per row (counted, no clock: a
    per-row rebuild is quadratic and would make 100,000 rows take hours)."""
    from littlebig.client import Classification

    rng = np.random.default_rng(0)
    n = 100_000
    probs = rng.dirichlet(np.ones(10), size=n).astype(np.float32)
    result = Classification(probs.argmax(-1), probs, rng.random(n) < 0.3, tuple("abcdefghij"), rng.random(n) < 0.1)
    calls = {"names": 0, "confidence": 0, "top_k": 0}
    for prop in ("names", "confidence"):
        original = getattr(Classification, prop)

        def counted(self, original=original, prop=prop):
            calls[prop] += 1
            return original.fget(self)

        monkeypatch.setattr(Classification, prop, property(counted))
    top_k = Classification.top_k

    def counted_top_k(self, k):
        calls["top_k"] += 1
        return top_k(self, k)

    monkeypatch.setattr(Classification, "top_k", counted_top_k)
    records = result.records(top_k=3)
    assert calls == {"names": 1, "confidence": 1, "top_k": 1} and len(records) == n
    i = 12345
    assert records[i]["name"] == "abcdefghij"[probs[i].argmax()] and records[i]["confidence"] == float(probs[i].max())
    assert records[i]["escalated"] == bool(result.escalated[i])
    assert records[i].get("degraded", False) == result.degraded[i]
    assert [t["name"] for t in records[i]["top_k"]] == ["abcdefghij"[j] for j in np.argsort(-probs[i])[:3]]


def test_timeout_is_reported(server, test_split):
    with LittleBigClient(f"127.0.0.1:{server.ports.grpc}", timeout_s=5) as c:
        assert c.service.is_cascade  # metadata first, then a request that cannot finish in 1 microsecond
        c.timeout_s = 1e-6
        with pytest.raises(ClientError, match="timed out"):
            c.classify(test_split[0].images[:64], threshold=1)


def test_async_client_with_64_requests_in_flight(server, test_split, served_threshold):
    data, logits = test_split
    spans = [np.arange(s, s + n) for s, n in zip(range(0, 64 * 40, 40), [1, 5, 17, 40] * 16)]

    async def main():
        async with AsyncLittleBigClient(f"127.0.0.1:{server.ports.grpc}", max_in_flight=64) as c:
            return await asyncio.gather(*(c.classify(data.images[r]) for r in spans))

    results = asyncio.run(main())
    assert len(results) == 64
    for rows, result in zip(spans, results):
        assert_same(result, offline_reference(logits, rows, served_threshold))


def run_cli(*args, env=None, venv_bin=None):
    """The installed console script, run outside the source tree so only the installed package is seen."""
    exe = Path(venv_bin or Path(sys.executable).parent) / "littlebig"
    env = {**os.environ, **(env or {})}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, cwd="/", env=env)


def test_cli_classify_eval_health(server, test_split, tmp_path, served_threshold, build_dir):
    data, logits = test_split
    url = f"127.0.0.1:{server.ports.grpc}"
    for i in range(3):
        Image.fromarray(data.images[i, :, :, 0]).save(tmp_path / f"{i}.png")
    out = run_cli("classify", str(tmp_path), "--json", "--top-k", "3", "--url", url)
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)
    expected = offline_reference(logits, np.arange(3), served_threshold)
    assert [r["label"] for r in records] == expected["label"].tolist()
    assert [r["escalated"] for r in records] == expected["escalated"].tolist()
    assert len(records[0]["top_k"]) == 3 and records[0]["top_k"][0]["name"] == records[0]["name"]
    table = run_cli("classify", str(tmp_path / "0.png"), "--url", url)
    assert table.returncode == 0 and "escalated" in table.stdout.splitlines()[0]
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    bad = run_cli("classify", str(tmp_path / "bad.jpg"), "--url", url)
    assert bad.returncode == 2 and "bad.jpg: not a readable image" in bad.stderr and len(bad.stderr.splitlines()) == 1
    ev = run_cli("eval", "--limit", "500", "--json", "--url", url, "--build", str(build_dir.resolve()))
    assert ev.returncode == 0, ev.stderr
    summary = json.loads(ev.stdout)
    ref = offline_reference(logits, np.arange(500), served_threshold)
    assert summary["accuracy"] == pytest.approx((ref["label"] == data.labels[:500]).mean(), abs=1e-12)
    assert summary["escalation_rate"] == pytest.approx(ref["escalated"].mean(), abs=1e-12)
    assert summary["images_per_s"] > 0 and 0 < summary["macs_saved"] < 1
    health = run_cli("health", "--http-url", f"127.0.0.1:{server.ports.http}")
    assert health.returncode == 0 and health.stdout.split() == ["little", "ok", "big", "ok", "littlebig", "ok"]
    assert run_cli("health", "--live", "--http-url", f"127.0.0.1:{server.ports.http}").returncode == 0
    from littlebig.model_repository.server import free_port

    for live in ([], ["--live"]):
        dead = run_cli("health", *live, "--http-url", f"127.0.0.1:{free_port()}", "--timeout", "2")
        assert dead.returncode == 1 and "make serve" in dead.stdout
    for cmd in ("classify", "eval", "health", "export", "calibrate", "repo", "serve", "train", "report", "demo"):
        helped = run_cli(cmd, "--help")
        assert helped.returncode == 0 and "example" in helped.stdout, cmd


@pytest.mark.slow
def test_client_extra_alone_classifies_without_torch(server, tmp_path, test_split, served_threshold):
    """pip install '.[client]' into a clean venv: tritonclient, numpy, Pillow only, and it works."""
    env_dir = tmp_path / "client-venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    install = subprocess.run(
        [py, "-m", "pip", "install", "-q", f"{ROOT}[client]"], capture_output=True, text=True, timeout=600
    )
    assert install.returncode == 0, install.stderr[-2000:]
    probe = subprocess.run(
        [
            py,
            "-c",
            "import importlib.util as u; print(u.find_spec('torch') is None,"
            " u.find_spec('onnxruntime') is None, u.find_spec('timm') is None)",
        ],
        capture_output=True,
        text=True,
    )
    assert probe.stdout.split() == ["True", "True", "True"]
    data, logits = test_split
    Image.fromarray(data.images[7, :, :, 0]).save(tmp_path / "seven.png")
    out = run_cli(
        "classify",
        str(tmp_path / "seven.png"),
        "--json",
        "--url",
        f"127.0.0.1:{server.ports.grpc}",
        venv_bin=env_dir / "bin",
    )
    assert out.returncode == 0, out.stderr
    assert (
        json.loads(out.stdout)[0]["label"] == offline_reference(logits, np.arange(7, 8), served_threshold)["label"][0]
    )
