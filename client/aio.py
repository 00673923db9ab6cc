"""asyncio client (tritonclient.grpc.aio): many requests in flight from one event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from littlebig.client.client import (
    DEFAULT_URL,
    Classification,
    Service,
    _ClientBase,
    as_batch,
    chunks,
    parse_response,
    request_parameters,
)


class AsyncLittleBigClient(_ClientBase):
    """The async twin of LittleBigClient; ``max_in_flight`` bounds concurrent requests.

    >>> async with AsyncLittleBigClient("localhost:8001") as client:
    ...     result = await client.classify(images)
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model: str = "littlebig",
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        max_in_flight: int = 64,
    ) -> None:
        import tritonclient.grpc.aio as aioclient

        super().__init__(url, model, timeout_s, retries, backoff_s, max_backoff_s)
        self._client = aioclient.InferenceServerClient(url)
        self._slots = asyncio.Semaphore(max_in_flight)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> AsyncLittleBigClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``await fn(...)`` under the shared retry policy (tenacity's AsyncRetrying); failures as ClientError."""
        import tenacity
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + self.timeout_s

        async def attempt() -> Any:
            return await fn(*args, client_timeout=self._left(deadline), **kwargs)

        try:
            return await self._policy(tenacity.AsyncRetrying)(attempt)
        except InferenceServerException as exc:
            raise self._error(exc) from None

    async def service(self) -> Service:
        if self._service is None:
            meta = await self._call(self._client.get_model_metadata, self.model, as_json=True)
            config = await self._call(self._client.get_model_config, self.model, as_json=True)
            self._service = Service.from_server(meta, config["config"])
        return self._service

    async def infer_batch(
        self, images: np.ndarray, threshold: float | str | None = None, deadline_ms: float | None = None
    ) -> Classification:
        service = await self.service()
        inp = self._grpc.InferInput(service.input_name, list(images.shape), service.dtype)
        inp.set_data_from_numpy(images)
        params = request_parameters(threshold, deadline_ms)
        async with self._slots:
            result = await self._call(self._client.infer, service.model, [inp], parameters=params)
        return parse_response(service, result)

    async def classify(
        self,
        images: np.ndarray | str | Path | Iterable[str | Path],
        threshold: float | str | None = None,
        deadline_ms: float | None = None,
    ) -> Classification:
        """Like LittleBigClient.classify, with every max_batch_size chunk in flight at once."""
        service = await self.service()
        # Pillow decodes and resizes files in a worker thread: the event loop keeps serving other requests.
        batch, files = await asyncio.to_thread(as_batch, images, service)
        parts = await asyncio.gather(
            *(self.infer_batch(batch[s], threshold, deadline_ms) for s in chunks(len(batch), service.max_batch_size))
        )
        result = Classification.concat(list(parts), service.class_names)
        result.files = files
        return result
