"""The cascade on the real tritonserver: every served answer equals the offline reference."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from littlebig.decision import CONFIDENCE_BINS, confidence, softmax
from tests.helpers import infer, metric_sums, offline_reference, reasons, rows_of, scrape

BATCH_SIZES = (1, 7, 64, 3, 32, 16, 50, 2, 8, 64, 5, 24)


def batches(n: int) -> list[np.ndarray]:
    out, start, i = [], 0, 0
    while start < n:
        size = BATCH_SIZES[i % len(BATCH_SIZES)]
        out.append(np.arange(start, min(start + size, n)))
        start, i = start + size, i + 1
    return out


def assert_matches_reference(result, expected, rows):
    label, esc = result.as_numpy("LABEL").reshape(-1), result.as_numpy("ESCALATED").reshape(-1)
    assert np.array_equal(label, expected["label"]), f"LABEL differs on rows {rows[label != expected['label']]}"
    assert np.array_equal(esc, expected["escalated"]), f"ESCALATED differs on rows {rows[esc != expected['escalated']]}"
    np.testing.assert_allclose(result.as_numpy("PROBS"), expected["probs"], atol=1e-5, rtol=0)
    assert not result.as_numpy("DEGRADED").any()
    np.testing.assert_array_equal(reasons(result), np.where(expected["escalated"], "escalated", "confident"))


def test_whole_test_split_from_16_concurrent_clients(server, grpc_client, test_split, served_threshold):
    data, logits = test_split
    work = batches(len(data))
    big_before = rows_of(grpc_client, "big")

    def run(rows):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports.grpc}")
        try:
            return rows, infer(client, data.images[rows])
        finally:
            client.close()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, work))
    escalated = 0
    for rows, result in results:
        expected = offline_reference(logits, rows, served_threshold)
        assert_matches_reference(result, expected, rows)
        escalated += int(expected["escalated"].sum())
    assert sum(len(r) for r, _ in results) == len(data)  # no row lost
    # big saw exactly the escalated rows: none twice, none missed
    assert rows_of(grpc_client, "big") - big_before == escalated
    assert 0 < escalated < len(data)


@pytest.mark.parametrize("threshold,all_big", [(0, False), ("0", False), (1, True), ("1.0", True), (1.0, True)])
def test_threshold_zero_sends_nothing_and_one_sends_everything(grpc_client, test_split, threshold, all_big):
    data, logits = test_split
    rows = np.arange(200, 264)
    before = rows_of(grpc_client, "big")
    result = infer(grpc_client, data.images[rows], threshold)
    assert rows_of(grpc_client, "big") - before == (len(rows) if all_big else 0)
    assert result.as_numpy("ESCALATED").all() == all_big and result.as_numpy("ESCALATED").any() == all_big
    assert_matches_reference(result, offline_reference(logits, rows, float(threshold)), rows)


def test_escalations_beyond_big_max_batch_are_chunked(grpc_client, repository, test_split):
    data, logits = test_split
    big_max = json.loads((repository / "littlebig-repository.json").read_text())["options"]["big_max_batch_size"]
    rows = np.arange(1000, 1064)
    assert len(rows) > big_max
    stats = grpc_client.get_inference_statistics("big").model_stats[0]
    result = infer(grpc_client, data.images[rows], threshold=1)
    after = grpc_client.get_inference_statistics("big").model_stats[0]
    assert after.inference_count - stats.inference_count == len(rows)
    assert after.inference_stats.success.count - stats.inference_stats.success.count >= -(-len(rows) // big_max)
    np.testing.assert_allclose(result.as_numpy("PROBS"), softmax(logits["big"][rows]), atol=1e-5, rtol=0)


def test_little_and_big_are_callable_directly(grpc_client, test_split):
    data, logits = test_split
    rows = np.arange(5000, 5010)
    for model in ("little", "big"):
        out = infer(grpc_client, data.images[rows], model=model).as_numpy("LOGITS")
        np.testing.assert_allclose(out, logits[model][rows], atol=1e-4, rtol=0)


def test_classification_extension_gives_top_k_with_names(grpc_client, test_split, build_dir):
    data, _ = test_split
    names = json.loads((build_dir / "export" / "export.json").read_text())["class_names"]
    out = infer(grpc_client, data.images[:4], outputs=[grpcclient.InferRequestedOutput("PROBS", class_count=3)])
    top = out.as_numpy("PROBS")
    assert top.shape == (4, 3)
    score, index, name = top[0, 0].decode().split(":", 2)
    assert names[int(index)] == name and 0 < float(score) <= 1


BAD_INPUTS = [
    ("wrong dtype", lambda imgs: imgs.astype(np.float32), "FP32", "data-type"),
    ("wrong shape", lambda imgs: imgs[:, :, :27], "UINT8", "shape"),
    ("wrong channels", lambda imgs: np.repeat(imgs, 3, axis=-1), "UINT8", "shape"),
    ("batch over max", lambda imgs: np.concatenate([imgs] * 17)[:65], "UINT8", "batch"),
    ("empty batch", lambda imgs: imgs[:0], "UINT8", ""),
]


@pytest.mark.parametrize("case,transform,dtype,words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_clear_error_and_the_server_keeps_serving(
    grpc_client, test_split, served_threshold, case, transform, dtype, words
):
    data, logits = test_split
    bad = np.ascontiguousarray(transform(data.images[:4]))
    inp = grpcclient.InferInput("IMAGE", list(bad.shape), dtype)
    inp.set_data_from_numpy(bad)
    with pytest.raises(InferenceServerException) as err:
        grpc_client.infer("littlebig", [inp])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value
    assert words.lower() in err.value.message().lower()
    rows = np.arange(8)
    assert_matches_reference(
        infer(grpc_client, data.images[rows]), offline_reference(logits, rows, served_threshold), rows
    )


def test_missing_input_is_a_clear_error(grpc_client):
    inp = grpcclient.InferInput("PIXELS", [1, 28, 28, 1], "UINT8")
    inp.set_data_from_numpy(np.zeros((1, 28, 28, 1), np.uint8))
    with pytest.raises(InferenceServerException, match="IMAGE|PIXELS") as err:
        grpc_client.infer("littlebig", [inp])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"


BATCHING_DELAY_US = 1_500_000


@pytest.fixture(scope="module")
def batching_server(build_dir, tmp_path_factory):
    """One BLS instance whose dynamic batcher waits 1.5 s: requests sent together share one execute."""
    from littlebig.model_repository.generate import ServeOptions
    from tests.helpers import own_server

    def slow_batcher(repo):
        config = repo / "littlebig" / "config.pbtxt"
        text, n = re.subn(r"max_queue_delay_microseconds: \d+", f"max_queue_delay_microseconds: {BATCHING_DELAY_US}",
                          config.read_text())  # fmt: skip
        assert n == 1
        config.write_text(text)

    with own_server(build_dir, tmp_path_factory.mktemp("batching"), ServeOptions(bls_instances=1), slow_batcher) as s:
        yield s


@pytest.mark.slow
def test_bad_threshold_fails_that_request_only_in_a_shared_execute(batching_server, test_split, served_threshold):
    """A bad and a good request in the *same* execute (checked with execution_count): only the bad one fails."""
    data, logits = test_split
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{batching_server.ports.grpc}")
    rows = np.arange(3)
    good_in = grpcclient.InferInput("IMAGE", [len(rows), *data.images.shape[1:]], "UINT8")
    good_in.set_data_from_numpy(data.images[rows])
    try:
        for threshold in ("abc", -1, 2, "nan", ""):
            errors, answers = [], []

            def done(result, error, errors=errors, answers=answers):
                (errors if error else answers).append(error or result)

            before = client.get_inference_statistics("littlebig").model_stats[0]
            client.async_infer("littlebig", [good_in], done, parameters={"threshold": threshold})
            client.async_infer("littlebig", [good_in], done)
            deadline = time.monotonic() + 30
            while len(errors) + len(answers) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            after = client.get_inference_statistics("littlebig").model_stats[0]
            assert after.execution_count - before.execution_count == 1, threshold  # one execute held both
            assert after.inference_count - before.inference_count == 2 * len(rows)
            assert len(errors) == 1 and len(answers) == 1, (threshold, errors)
            assert errors[0].status() == "StatusCode.INVALID_ARGUMENT"
            assert "threshold" in errors[0].message() and "[0, 1]" in errors[0].message()
            assert_matches_reference(answers[0], offline_reference(logits, rows, served_threshold), rows)
    finally:
        client.close()


def test_metric_values_equal_the_rows_served(server, grpc_client, test_split, served_threshold):
    """The counters the autoscaler scales on move by exactly the rows served and the rows big inferred."""
    data, logits = test_split
    names = ("littlebig_rows_total", "littlebig_escalated_rows_total")
    work = [r + 2000 for r in batches(300)]
    before, big_before = metric_sums(server, names), rows_of(grpc_client, "big")
    escalated = 0
    for rows in work:
        escalated += int(infer(grpc_client, data.images[rows]).as_numpy("ESCALATED").sum())
    after, big_rows = metric_sums(server, names), rows_of(grpc_client, "big") - big_before
    expected = int(offline_reference(logits, np.arange(2000, 2300), served_threshold)["escalated"].sum())
    assert after["littlebig_rows_total"] - before["littlebig_rows_total"] == 300
    assert after["littlebig_escalated_rows_total"] - before["littlebig_escalated_rows_total"] == big_rows
    assert big_rows == escalated == expected > 0


def test_kserve_v2_rest_and_metrics(server, test_split, served_threshold):
    data, logits = test_split
    body = {
        "inputs": [
            {
                "name": "IMAGE",
                "shape": [2, 28, 28, 1],
                "datatype": "UINT8",
                "data": data.images[:2].reshape(-1).tolist(),
            }
        ],
        "parameters": {"threshold": 0.0},
    }
    req = urllib.request.Request(
        f"{server.url}/v2/models/littlebig/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        out = {o["name"]: o for o in json.loads(r.read())["outputs"]}
    assert out["LABEL"]["data"] == logits["little"][:2].argmax(-1).tolist()
    assert out["ESCALATED"]["data"] == [False, False]
    body["parameters"] = {"threshold": "abc"}
    req = urllib.request.Request(req.full_url, data=json.dumps(body).encode())
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400 and b"threshold" in err.value.read()
    metrics = scrape(server)
    for name in (
        "littlebig_rows_total",
        "littlebig_escalated_rows_total",
        "littlebig_failed_requests_total",
        "littlebig_little_confidence_rows_total",
    ):
        assert name in metrics, name
    assert metrics.total("littlebig_failed_requests_total") >= 1


def test_confidence_bins_count_exactly_the_rows_served(server, grpc_client, test_split, served_threshold):
    """The per-execute confidence bins (the drift signal) equal little's offline confidences, bin by bin."""
    data, logits = test_split
    rows = np.arange(300, 600)
    name = "littlebig_little_confidence_rows_total"
    before = scrape(server).by(name, "upper")
    for chunk in np.array_split(rows, 7):
        inp = grpcclient.InferInput("IMAGE", list(data.images[chunk].shape), "UINT8")
        inp.set_data_from_numpy(data.images[chunk])
        grpc_client.infer("littlebig", [inp])
    after = scrape(server).by(name, "upper")
    delta = {upper: after[upper] - before.get(upper, 0.0) for upper in after}
    # binned here by explicit (lower, upper] comparisons, not by confidence_bin_counts' searchsorted
    conf = confidence(softmax(logits["little"][rows]))
    lowers = (-np.inf, *CONFIDENCE_BINS[:-1])
    expected = {repr(hi): float(((conf > lo) & (conf <= hi)).sum()) for lo, hi in zip(lowers, CONFIDENCE_BINS)}
    assert delta == expected and sum(expected.values()) == len(rows)
