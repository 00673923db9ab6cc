"""The client's retry policy: retry only what never reached the server, with jitter, within
one deadline per call; never an answer the cascade gave, never a deadline the client set.

The refused-connection tests need no server (a free loopback port refuses); the others run on a real
tritonserver whose big sleeps 20 s per execution behind a 2 s BLS timeout.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from littlebig.client import AsyncLittleBigClient, ClientError, LittleBigClient, ServerUnavailable
from littlebig.client.client import CASCADE_ANSWERS, unreachable
from littlebig.model_repository.server import free_port
from tests.helpers import hung_server

IMAGE = np.zeros((1, 28, 28, 1), np.uint8)


def test_only_transport_failures_count_as_unreachable():
    refused = (
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9: "
        "Failed to connect to remote host: Connection refused"
    )
    assert unreachable(InferenceServerException(refused, status="StatusCode.UNAVAILABLE"))
    assert unreachable(InferenceServerException("Socket closed", status="StatusCode.UNAVAILABLE"))
    for answer in CASCADE_ANSWERS:  # the cascade's own UNAVAILABLE answers, as model.py words them
        assert not unreachable(InferenceServerException(f"{answer} Socket closed", status="StatusCode.UNAVAILABLE"))
    assert not unreachable(InferenceServerException("This API is restricted", status="StatusCode.UNAVAILABLE"))
    assert not unreachable(InferenceServerException(refused, status="StatusCode.DEADLINE_EXCEEDED"))
    assert not unreachable(InferenceServerException("bad threshold", status="StatusCode.INVALID_ARGUMENT"))


def within_schedule(waits: list[float], backoff_s: float, max_backoff_s: float) -> bool:
    """Full-jitter exponential backoff: the wait before retry n is in [0, min(max, backoff * 2**(n-1))]."""
    return all(0 <= w <= min(max_backoff_s, backoff_s * 2**n) for n, w in enumerate(waits))


def test_a_refused_connection_is_retried_then_reported():
    with LittleBigClient(f"127.0.0.1:{free_port()}", retries=3, backoff_s=0.05, timeout_s=10) as client:
        with pytest.raises(ServerUnavailable, match="make serve"):
            client.classify(IMAGE)
        assert client.last_attempts == 4  # the first try and 3 retries
        assert len(client.last_waits) == 3 and within_schedule(client.last_waits, 0.05, 5.0)


def test_the_deadline_bounds_all_retries_together():
    """Many retries allowed, 1.5 s per call: the call ends by its deadline, not by the retry count. No retry is
    started whose backoff would end past the deadline, so the waits add up to less than it."""
    for _ in range(2):
        with LittleBigClient(
            f"127.0.0.1:{free_port()}", retries=1000, backoff_s=0.2, max_backoff_s=0.4, timeout_s=1.5
        ) as client:
            with pytest.raises(ServerUnavailable):
                client.classify(IMAGE)
            assert 1 < client.last_attempts < 1000
            assert len(client.last_waits) == client.last_attempts - 1
            assert within_schedule(client.last_waits, 0.2, 0.4) and sum(client.last_waits) < 1.5


def test_the_backoff_has_jitter():
    client = LittleBigClient(f"127.0.0.1:{free_port()}", backoff_s=0.2, max_backoff_s=5.0)
    try:
        import tenacity

        policy = client._policy(tenacity.Retrying)
        state = tenacity.RetryCallState(policy, fn=None, args=(), kwargs={})
        state.attempt_number = 3
        waits = {policy.wait(state) for _ in range(50)}
    finally:
        client.close()
    assert len(waits) > 40 and all(0 <= w <= 0.2 * 2**3 for w in waits)


def test_the_async_client_shares_the_policy():
    async def main() -> tuple[int, list[float]]:
        async with AsyncLittleBigClient(f"127.0.0.1:{free_port()}", retries=2, backoff_s=0.05, timeout_s=5) as client:
            with pytest.raises(ServerUnavailable):
                await client.classify(IMAGE)
            return client.last_attempts, client.last_waits

    attempts, waits = asyncio.run(main())
    assert attempts == 3 and len(waits) == 2 and within_schedule(waits, 0.05, 5.0)


@pytest.fixture(scope="module")
def hung(build_dir, tmp_path_factory):
    """big sleeps 20 s per execution; littlebig's BLS timeout is 2 s."""
    with hung_server(build_dir, tmp_path_factory.mktemp("hung"), bls_timeout_ms=2000) as s:
        yield s


def requests_of(client: LittleBigClient, model: str) -> int:
    """Requests the server has received for ``model`` (answered or failed)."""
    stats = client._client.get_inference_statistics(model).model_stats[0].inference_stats
    return stats.success.count + stats.fail.count


@pytest.mark.slow
def test_the_clients_deadline_fires_before_the_servers(hung):
    """0.5 s client deadline < 2 s BLS timeout: the client's own deadline path, not the server's answer."""
    with LittleBigClient(f"127.0.0.1:{hung.ports.grpc}", timeout_s=10) as client:
        assert client.service.is_cascade
        before = requests_of(client, "littlebig")
        client.timeout_s = 0.5
        began = time.monotonic()
        with pytest.raises(ClientError, match="timed out after 0.5 s"):
            client.classify(IMAGE, threshold=1)
        elapsed = time.monotonic() - began
        assert client.last_attempts == 1  # a deadline is never retried
        # the server finishes the abandoned request on its own (its BLS timeout), once: nothing was resent
        client.timeout_s = 10
        while requests_of(client, "littlebig") == before and time.monotonic() - began < 10:
            time.sleep(0.1)
        assert requests_of(client, "littlebig") - before == 1
    assert elapsed >= 0.5  # the message above says it was the client's 0.5 s, not the server's 2 s answer


@pytest.mark.slow
def test_a_cascade_unavailable_answer_is_not_retried(hung):
    """big timed out -> UNAVAILABLE from the cascade: an answer, sent once however many retries are allowed."""
    with LittleBigClient(f"127.0.0.1:{hung.ports.grpc}", retries=3, backoff_s=0.05, timeout_s=30) as client:
        assert client.service.is_cascade
        before = requests_of(client, "littlebig")
        with pytest.raises(ClientError, match="big timed out") as err:
            client.classify(IMAGE, threshold=1)
        assert "UNAVAILABLE" in str(err.value) and not isinstance(err.value, ServerUnavailable)
        assert client.last_attempts == 1
        # The Python backend reports an execute's statistics after its responses are sent: the client can hold the
        # error before the count moves (seen once, on a loaded machine: 0 of 1). Wait for it, then: exactly one.
        began = time.monotonic()
        while requests_of(client, "littlebig") == before and time.monotonic() - began < 5:
            time.sleep(0.05)
        time.sleep(0.5)  # a retry would have been sent by now (backoff 0.05 s)
        assert requests_of(client, "littlebig") - before == 1
