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
    ENCODED_SUFFIX,
    Classification,
    ClientError,
    EncodedService,
    ServerUnavailable,
    Service,
    _ClientBase,
    as_batch,
    chunks,
    encoded_input,
    file_list,
    name_bad_files,
    parse_response,
    read_encoded,
    request_parameters,
)


class AsyncLittleBigClient(_ClientBase):
    """The async twin of LittleBigClient; ``max_in_flight`` bounds concurrent requests.

    >>> async with AsyncLittleBigClient("localhost:8001") as client:
    ...     result = await client.classify(images)
    """

    def __init__(self, url: str = DEFAULT_URL, model: str = "littlebig", *, max_in_flight: int = 64, **options: Any):
        """``options``: LittleBigClient's (timeout_s, retries, backoff_s, max_backoff_s, send)."""
        super().__init__(url, model, **options)
        self._slots = asyncio.Semaphore(max_in_flight)

    def _connect(self, url: str) -> Any:
        import tritonclient.grpc.aio as aioclient

        return aioclient.InferenceServerClient(url)

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

    async def _describe(self, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """``model``'s metadata and config, as the ``from_server`` constructors take them."""
        meta = await self._call(self._client.get_model_metadata, model, as_json=True)
        return meta, (await self._call(self._client.get_model_config, model, as_json=True))["config"]

    async def _is_ready(self, model: str) -> bool:
        """Whether the server serves ``model`` (an unreachable server is an error, not a no)."""
        try:
            return await self._call(self._client.is_model_ready, model)
        except ServerUnavailable:
            raise
        except ClientError:
            return False

    async def service(self) -> Service:
        if self._service is None:
            self._service = Service.from_server(*await self._describe(self.model))
        return self._service

    async def encoded_service(self) -> EncodedService | None:
        """``<model>_encoded`` if files go encoded and the server has it (asked once), else None."""
        if self._encoded is True:
            name = self.model + ENCODED_SUFFIX
            ready = await self._is_ready(name)
            self._encoded = EncodedService.from_server(*await self._describe(name)) if ready else None
        return self._encoded or None

    async def infer_encoded(
        self, rows: np.ndarray, files: list[Path], threshold: float | str | None, deadline_ms: float | None
    ) -> Classification:
        """One request of encoded files (BYTES [n, 1]); a bad file's error names it."""
        service, encoded = await self.service(), await self.encoded_service()
        if encoded is None:
            raise ClientError(f"{self.url} has no {self.model}{ENCODED_SUFFIX} entry point (or send='pixels')")
        inp = encoded_input(self._grpc, encoded, rows)
        try:
            async with self._slots:
                result = await self._call(
                    self._client.infer, encoded.model, [inp], parameters=request_parameters(threshold, deadline_ms)
                )
        except ClientError as exc:
            raise name_bad_files(exc, files) from None
        return parse_response(service, result)

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
        files = await asyncio.to_thread(file_list, images)
        encoded = None if files is None else await self.encoded_service()
        if encoded is not None:
            rows = await asyncio.to_thread(read_encoded, files)
            calls = [
                self.infer_encoded(rows[s], files[s], threshold, deadline_ms)
                for s in chunks(len(rows), encoded.max_batch_size)
            ]
        else:
            # Pillow decodes and resizes files in a worker thread: the event loop keeps serving other requests.
            batch, _ = await asyncio.to_thread(as_batch, images if files is None else files, service)
            calls = [
                self.infer_batch(batch[s], threshold, deadline_ms) for s in chunks(len(batch), service.max_batch_size)
            ]
        parts = await asyncio.gather(*calls)
        result = Classification.concat(list(parts), service.class_names)
        result.files = [str(f) for f in files or []]
        return result
