"""Triton's own Python-backend QA (L0_backend_python: its lifecycle, shared-memory and cancellation tests),
mirrored on the served cascade.

- every malformed request (zero rows, one row over max_batch_size, wrong dtype, shape or rank, an oversize
  payload) is refused with INVALID_ARGUMENT and a message naming the problem, and the next good request
  is answered exactly as the offline reference (fast tier, the shared server);
- a client that cancels (gRPC cancel, asyncio cancel) costs the server nothing lasting, and big is never
  called for a request cancelled before its escalation (slow tier, a server whose big is slow);
- /dev/shm: the server's shared-memory regions after thousands of mixed requests (good, bad, timed out,
  cancelled) are as large as after the warm-up (slow tier; ``python -m tests.backend_qa shm`` runs 10,000);
- warm-up: little and big are warmed by Triton before the server reports ready, and the BLS model warms its
  in-process little; the first request's latency is measured against warm ones (``python -m tests.backend_qa
  warmup`` prints the figures).
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from littlebig.model_repository.generate import ServeOptions
from tests.backend_qa import shm_probe, warmup_latency
from tests.helpers import grpc_url, hang_big, infer, offline_reference, own_server, read_config, rows_of, scrape


def _raw(images: np.ndarray, datatype: str) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("IMAGE", list(images.shape), datatype)
    inp.set_data_from_numpy(images)
    return inp


def malformed(images: np.ndarray, max_batch: int) -> dict[str, tuple[grpcclient.InferInput, str]]:
    """name -> (the request's input, a word its error must contain)."""
    h, w, c = images.shape[1:]
    return {
        "zero rows": (_raw(images[:0], "UINT8"), "0"),
        "one row over max_batch_size": (_raw(images[: max_batch + 1], "UINT8"), f"batch-size must be <= {max_batch}"),
        "wrong dtype": (_raw(images[:2].astype(np.float32), "FP32"), "FP32"),
        "wrong shape": (_raw(np.zeros((2, h + 1, w, c), np.uint8), "UINT8"), "shape"),
        "wrong rank": (_raw(images[:2, ..., 0], "UINT8"), "shape"),
        "oversize payload": (_raw(np.zeros((2, 1024, 1024, c), np.uint8), "UINT8"), "shape"),
    }


def test_malformed_requests_are_named_and_the_next_good_one_is_right(
    grpc_client, repository, test_split, served_threshold
):
    data, logits = test_split
    max_batch = read_config(repository / "littlebig").max_batch_size
    rows = np.arange(max_batch)
    for name, (inp, word) in malformed(data.images, max_batch).items():
        with pytest.raises(InferenceServerException) as err:
            grpc_client.infer("littlebig", [inp])
        assert "INVALID_ARG" in str(err.value.status()), (name, err.value)
        assert word in err.value.message(), (name, err.value.message())
        result = infer(grpc_client, data.images[rows])  # a full max_batch_size request, right after
        ref = offline_reference(logits, rows, served_threshold)
        assert np.array_equal(result.as_numpy("LABEL").reshape(-1), ref["label"]), name
        assert np.array_equal(result.as_numpy("ESCALATED").reshape(-1), ref["escalated"]), name


@pytest.fixture(scope="module")
def slow_big(build_dir, tmp_path_factory):
    """One BLS instance, big sleeping 1 s per execution: a second escalating request waits its turn."""
    work = tmp_path_factory.mktemp("slow-big")
    with own_server(build_dir, work, ServeOptions(bls_instances=1, big_instances=1), hang_big(1.0)) as server:
        yield server


def _busy(url: str, images: np.ndarray) -> threading.Thread:
    """An escalating request that holds the only BLS instance in big for about a second."""
    thread = threading.Thread(target=infer, args=(url, images, 1.0), daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.parametrize("how", ["grpc cancel", "asyncio cancel"])
def test_a_cancelled_request_never_reaches_big_and_costs_nothing(slow_big, test_split, how):
    data, logits = test_split
    url = grpc_url(slow_big)
    big_before = rows_of(url, "big")
    holder = _busy(url, data.images[:2])
    threading.Event().wait(0.3)  # the holder is in big now
    if how == "grpc cancel":
        client = grpcclient.InferenceServerClient(url)
        outcome: list = []
        ctx = client.async_infer(
            "littlebig", [_raw(data.images[2:5], "UINT8")], lambda result, error: outcome.append(error),
            parameters={"threshold": 1.0},
        )
        ctx.cancel()
        threading.Event().wait(0.2)
        client.close()
        assert outcome and outcome[0] is not None and "CANCELLED" in str(outcome[0].status())
    else:
        import tritonclient.grpc.aio as aioclient

        async def cancel_one() -> bool:
            async with aioclient.InferenceServerClient(url) as client:
                task = asyncio.create_task(
                    client.infer("littlebig", [_raw(data.images[2:5], "UINT8")], parameters={"threshold": 1.0})
                )
                await asyncio.sleep(0.1)
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    return True
                return False

        assert asyncio.run(cancel_one())
    holder.join(10)
    threading.Event().wait(1.5)  # anything still queued for big has run by now
    assert rows_of(url, "big") - big_before == 2  # the holder's rows only: the cancelled request never got there
    seen = scrape(slow_big).total("littlebig_cancelled_requests_total")
    print(f"\n{how}: big ran only the holder's rows; cancellations the BLS model saw so far: {seen:.0f}")
    rows = np.arange(10, 20)  # the next request, answered by little (this big is a stand-in that sleeps)
    result = infer(url, data.images[rows], 0.0)
    assert np.array_equal(result.as_numpy("LABEL").reshape(-1), offline_reference(logits, rows, 0.0)["label"])


@pytest.mark.slow
def test_shared_memory_returns_to_its_warm_size_after_mixed_requests(build_dir, tmp_path):
    result = shm_probe(build_dir, tmp_path, requests=3000, warm=600)
    print(f"\n/dev/shm: {result['summary']}")
    assert result["failures"] == 0, result["examples"]
    assert result["after_bytes"] == result["warm_bytes"], result["summary"]
    assert result["kinds"]["cancelled"] > 0 and result["kinds"]["timed_out"] > 0


@pytest.mark.slow
def test_warmup_is_configured_and_the_first_request_is_right(build_dir, tmp_path):
    result = warmup_latency(build_dir, tmp_path, warm_requests=20)
    print(f"\nwarm-up: {result['summary']}")
    repo = tmp_path / "model_repository"
    for model in ("little", "big"):
        assert [w.batch_size for w in read_config(repo / model).model_warmup], model
    assert result["first_matches_offline"]
