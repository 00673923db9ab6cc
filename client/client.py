"""Synchronous client: classify numpy batches, image files or folders through the littlebig service.

Everything about the service (input name, shape, dtype, max batch, class names, default threshold)
is read from the server's model metadata and config once, never hard-coded, so the same client
serves any exported pair.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from littlebig.data import IMAGE_SUFFIXES, read_image
from littlebig.decision import softmax

DEFAULT_URL = "localhost:8001"
START_HINT = "start it with `make serve` (or `littlebig serve`)"
RETRYABLE = ("StatusCode.UNAVAILABLE",)


class ClientError(Exception):
    """A one-line, user-facing error (bad input, server error, timeout)."""


class ServerUnavailable(ClientError):
    """The server cannot be reached."""


class InputError(ClientError):
    """The caller's input is wrong (a bad image file, a wrong shape or dtype): fix it, don't retry."""


@dataclass(frozen=True)
class Service:
    """What the server says about one model: enough to build valid requests and read the answers."""

    model: str
    input_name: str
    size: tuple[int, int, int]  # H, W, C
    dtype: str
    max_batch_size: int
    outputs: tuple[str, ...]
    class_names: tuple[str, ...] = ()
    threshold: float | None = None

    @property
    def is_cascade(self) -> bool:
        return "LABEL" in self.outputs

    @classmethod
    def from_server(cls, metadata: dict[str, Any], config: dict[str, Any]) -> Service:
        (inp,) = metadata["inputs"]
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        shape = [int(d) for d in inp["shape"]][1:]  # drop the batch dimension
        if len(shape) != 3:
            raise ClientError(f"model {metadata['name']} takes shape {inp['shape']}, expected [N, H, W, C]")
        return cls(
            model=metadata["name"],
            input_name=inp["name"],
            size=(shape[0], shape[1], shape[2]),
            dtype=inp["datatype"],
            max_batch_size=int(config.get("max_batch_size", 0)) or 1,
            outputs=tuple(o["name"] for o in metadata["outputs"]),
            class_names=tuple(json.loads(params["class_names"])) if params.get("class_names") else (),
            threshold=float(params["threshold"]) if params.get("threshold") else None,
        )

    def check_batch(self, images: np.ndarray) -> np.ndarray:
        """A uint8 [N, H, W, C] batch at the service size; a single image gains the batch axis."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.shape[1:] != self.size:
            raise InputError(f"images have shape {images.shape[1:]}, the service takes {self.size} (H, W, C)")
        if images.dtype != np.uint8:
            raise InputError(f"images must be uint8, got {images.dtype}")
        return np.ascontiguousarray(images)


@dataclass
class Classification:
    """Answers for a batch, in input order."""

    labels: np.ndarray
    probs: np.ndarray
    escalated: np.ndarray
    class_names: tuple[str, ...]
    degraded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    files: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [self.class_names[i] if i < len(self.class_names) else str(i) for i in self.labels]

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=-1) if len(self.probs) else np.zeros(0, np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def top_k(self, k: int) -> list[list[tuple[str, float]]]:
        order = np.argsort(-self.probs, axis=-1)[:, :k]
        return [
            [(self.class_names[j] if j < len(self.class_names) else str(j), float(p[j])) for j in row]
            for row, p in zip(order, self.probs)
        ]

    def records(self, top_k: int = 1) -> list[dict[str, Any]]:
        """One JSON-ready dict per image (file, label, name, confidence, escalated, top_k)."""
        out = []
        for i in range(len(self)):
            rec = {
                "label": int(self.labels[i]),
                "name": self.names[i],
                "confidence": float(self.confidence[i]),
                "escalated": bool(self.escalated[i]),
            }
            if self.files:
                rec = {"file": self.files[i], **rec}
            if len(self.degraded) and self.degraded[i]:
                rec["degraded"] = True
            if top_k > 1:
                rec["top_k"] = [{"name": n, "prob": p} for n, p in self.top_k(top_k)[i]]
            out.append(rec)
        return out

    @classmethod
    def concat(cls, parts: list[Classification], class_names: tuple[str, ...]) -> Classification:
        if not parts:
            return cls(
                np.zeros(0, np.int64),
                np.zeros((0, len(class_names)), np.float32),
                np.zeros(0, bool),
                class_names,
                np.zeros(0, bool),
            )
        return cls(
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.probs for p in parts]),
            np.concatenate([p.escalated for p in parts]),
            class_names,
            np.concatenate([p.degraded for p in parts]),
        )


def parse_response(service: Service, result: Any) -> Classification:
    """The cascade's LABEL/PROBS/ESCALATED, or a plain classifier's LOGITS read the same way."""
    if service.is_cascade:
        degraded = result.as_numpy("DEGRADED") if "DEGRADED" in service.outputs else None
        probs = result.as_numpy("PROBS")
        return Classification(
            result.as_numpy("LABEL").reshape(-1).astype(np.int64),
            probs,
            result.as_numpy("ESCALATED").reshape(-1).astype(bool),
            service.class_names,
            np.zeros(len(probs), bool) if degraded is None else degraded.reshape(-1).astype(bool),
        )
    probs = softmax(result.as_numpy("LOGITS"))
    return Classification(
        probs.argmax(-1).astype(np.int64),
        probs,
        np.zeros(len(probs), bool),
        service.class_names,
        np.zeros(len(probs), bool),
    )


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders walked recursively (sorted), images only; missing paths are errors."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    return files


def load_files(files: list[Path], size: tuple[int, int, int]) -> np.ndarray:
    """Decode and resize every file to the service size; the first bad one is a one-line error."""
    try:
        return np.stack([read_image(f, size) for f in files]) if files else np.zeros((0, *size), np.uint8)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def as_batch(images: np.ndarray | str | Path | Iterable[str | Path], service: Service) -> tuple[np.ndarray, list[str]]:
    """What either client sends: a checked uint8 batch at the service size, and the files it came from."""
    if isinstance(images, np.ndarray):
        return service.check_batch(images), []
    paths = expand_paths([images] if isinstance(images, (str, Path)) else images)
    return service.check_batch(load_files(paths, service.size)), [str(p) for p in paths]


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def describe_error(exc: Exception, url: str, timeout_s: float) -> ClientError:
    """A one-line ClientError for a tritonclient exception."""
    status = getattr(exc, "status", lambda: None)()
    message = (exc.message() if hasattr(exc, "message") else str(exc)) or str(exc)
    if status == "StatusCode.DEADLINE_EXCEEDED" or "Deadline Exceeded" in message:
        return ClientError(f"request to {url} timed out after {timeout_s:g} s")
    if status == "StatusCode.UNAVAILABLE" and ("connect" in message.lower() or "unavailable" == message.lower()):
        return ServerUnavailable(f"cannot reach the littlebig server at {url}: {START_HINT}")
    if status == "StatusCode.INVALID_ARGUMENT":
        return InputError(f"the server rejected the request: {message.splitlines()[0]}")
    return ClientError(f"server error ({status or 'unknown'}): {message.splitlines()[0] if message else exc}")


class _ClientBase:
    """What the sync and async clients share: where to go, and when a failed call may be retried."""

    def __init__(self, url: str, model: str, timeout_s: float, retries: int, backoff_s: float) -> None:
        import tritonclient.grpc as grpcclient

        self.url, self.model, self.timeout_s = url, model, timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self._grpc = grpcclient  # InferInput, shared by both transports
        self._service: Service | None = None

    def _retry_delay(self, exc: Exception, attempt: int) -> float:
        """Seconds to wait before retrying; only UNAVAILABLE is safe to retry, and only ``retries`` times.

        Anything else raises its one-line ClientError.
        """
        if exc.status() not in RETRYABLE or attempt >= self.retries:  # type: ignore[attr-defined]
            raise describe_error(exc, self.url, self.timeout_s) from None
        return self.backoff_s * 2**attempt


class LittleBigClient(_ClientBase):
    """Classify images with the littlebig service (or call little/big directly with ``model=``).

    >>> client = LittleBigClient("localhost:8001")
    >>> result = client.classify(["shirt.png", "photos/"], threshold=0.9)
    >>> result.names, result.escalated
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model: str = "littlebig",
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.2,
    ) -> None:
        import tritonclient.grpc as grpcclient

        super().__init__(url, model, timeout_s, retries, backoff_s)
        self._client = grpcclient.InferenceServerClient(url)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> LittleBigClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn, *args, **kwargs):
        from tritonclient.utils import InferenceServerException

        for attempt in itertools.count():
            try:
                return fn(*args, **kwargs)
            except InferenceServerException as exc:
                time.sleep(self._retry_delay(exc, attempt))

    @property
    def service(self) -> Service:
        if self._service is None:
            meta = self._call(self._client.get_model_metadata, self.model, as_json=True, client_timeout=self.timeout_s)
            config = self._call(self._client.get_model_config, self.model, as_json=True, client_timeout=self.timeout_s)[
                "config"
            ]
            self._service = Service.from_server(meta, config)
        return self._service

    def infer_batch(self, images: np.ndarray, threshold: float | str | None = None) -> Classification:
        """One request of at most max_batch_size rows."""
        service = self.service
        inp = self._grpc.InferInput(service.input_name, list(images.shape), service.dtype)
        inp.set_data_from_numpy(images)
        params = None if threshold is None else {"threshold": threshold}
        result = self._call(self._client.infer, service.model, [inp], parameters=params, client_timeout=self.timeout_s)
        return parse_response(service, result)

    def classify(
        self, images: np.ndarray | str | Path | Iterable[str | Path], threshold: float | str | None = None
    ) -> Classification:
        """Classify a uint8 batch [N, H, W, C], one image, image files, or folders of them."""
        batch, files = as_batch(images, self.service)
        parts = [self.infer_batch(batch[s], threshold) for s in chunks(len(batch), self.service.max_batch_size)]
        result = Classification.concat(parts, self.service.class_names)
        result.files = files
        return result

    def health(self) -> dict[str, str | None]:
        """A real inference through littlebig, little and big: {model: None if it answered, else the error}.

        Readiness alone misses a dead Python stub (Triton keeps reporting it ready).
        """
        report: dict[str, str | None] = {}
        for model in ("littlebig", "little", "big"):
            try:
                probe = LittleBigClient(self.url, model, timeout_s=self.timeout_s, retries=0)
                try:
                    size = probe.service.size
                    probe.infer_batch(np.zeros((1, *size), np.uint8), threshold=1.0 if model == "littlebig" else None)
                    report[model] = None
                finally:
                    probe.close()
            except ClientError as exc:
                report[model] = str(exc)
        return report
