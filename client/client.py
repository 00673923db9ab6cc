"""Synchronous client: classify numpy batches, image files or folders through the littlebig service.

Everything about the service (input name, shape, dtype, max batch, class names, default threshold)
is read from the server's model metadata and config once, never hard-coded, so the same client
serves any exported pair.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from littlebig.data import IMAGE_SUFFIXES, read_image
from littlebig.decision import softmax

DEFAULT_URL = "localhost:8001"
#: How files travel: ``encoded`` (their JPEG/PNG bytes, decoded by the server's ``<model>_encoded`` entry point,
#: where it has one) or ``pixels`` (decoded and resized here). Arrays are always sent as pixels.
SEND_MODES = ("encoded", "pixels")
ENCODED_SUFFIX = "_encoded"
ENCODED_INPUT = "ENCODED"
#: The decode model's per-row error ("row 3: truncated JPEG: ..."), turned back into the file's name.
BAD_ROW = re.compile(r"row (\d+): (.*?)(?=; row \d+: |$)")
START_HINT = "start it with `make serve` (or `littlebig serve`)"
#: How the served cascade words its own UNAVAILABLE answers (model_repository/littlebig/model.py): an
#: answer, never retried, even though its status is the transport's.
CASCADE_ANSWERS = ("big failed:", "big timed out", "little failed:", "little timed out")
#: gRPC core's details when no connection carried the call: the server never saw it, so a retry
#: cannot repeat work (connection refused, reset or closed before an answer, name resolution).
TRANSPORT_FAILURE = re.compile(
    r"failed to connect|connection refused|connect failed|socket closed|connection reset|broken pipe|"
    r"dns resolution failed|name resolution|no route to host|endpoint closing|goaway",
    re.IGNORECASE,
)


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


@dataclass(frozen=True)
class EncodedService:
    """The encoded entry point of a cascade (``littlebig_encoded``): one JPEG/PNG file per BYTES row."""

    model: str
    input_name: str
    max_batch_size: int

    @classmethod
    def from_server(cls, metadata: dict[str, Any], config: dict[str, Any]) -> EncodedService:
        (inp,) = metadata["inputs"]
        if inp["datatype"] != "BYTES":
            raise ClientError(f"model {metadata['name']} takes {inp['datatype']}, expected BYTES (encoded images)")
        return cls(metadata["name"], inp["name"], int(config.get("max_batch_size", 0)) or 1)


@dataclass
class Classification:
    """Answers for a batch, in input order."""

    labels: np.ndarray
    probs: np.ndarray
    escalated: np.ndarray
    class_names: tuple[str, ...]
    degraded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    #: REASON per row (confident, escalated, load, deadline, big_failed); empty from a server without it.
    reasons: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))
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
        """One JSON-ready dict per image (file, label, name, confidence, escalated, top_k); O(N)."""
        names, confidence = self.names, self.confidence  # each computed once, not once per row
        tops = self.top_k(top_k) if top_k > 1 else None
        degraded = self.degraded if len(self.degraded) else np.zeros(len(self), bool)
        out = []
        for i in range(len(self)):
            rec = {
                "label": int(self.labels[i]),
                "name": names[i],
                "confidence": float(confidence[i]),
                "escalated": bool(self.escalated[i]),
            }
            if self.files:
                rec = {"file": self.files[i], **rec}
            if degraded[i]:
                rec["degraded"] = True
            if len(self.reasons):
                rec["reason"] = str(self.reasons[i])
            if tops is not None:
                rec["top_k"] = [{"name": n, "prob": p} for n, p in tops[i]]
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
            np.concatenate([p.reasons for p in parts]),
        )


def parse_response(service: Service, result: Any) -> Classification:
    """The cascade's LABEL/PROBS/ESCALATED, or a plain classifier's LOGITS read the same way."""
    if service.is_cascade:
        degraded = result.as_numpy("DEGRADED") if "DEGRADED" in service.outputs else None
        reasons = result.as_numpy("REASON") if "REASON" in service.outputs else None
        probs = result.as_numpy("PROBS")
        return Classification(
            result.as_numpy("LABEL").reshape(-1).astype(np.int64),
            probs,
            result.as_numpy("ESCALATED").reshape(-1).astype(bool),
            service.class_names,
            np.zeros(len(probs), bool) if degraded is None else degraded.reshape(-1).astype(bool),
            np.zeros(0, str) if reasons is None else np.array([r.decode() for r in reasons.reshape(-1)]),
        )
    probs = softmax(result.as_numpy("LOGITS"))
    return Classification(
        probs.argmax(-1).astype(np.int64),
        probs,
        np.zeros(len(probs), bool),
        service.class_names,
        np.zeros(len(probs), bool),
    )


def request_parameters(threshold: float | str | None, deadline_ms: float | None) -> dict[str, Any] | None:
    """The cascade's per-request parameters; the server validates them (INVALID_ARGUMENT names the bad one)."""
    params = {"threshold": threshold, "deadline_ms": deadline_ms}
    return {k: v for k, v in params.items() if v is not None} or None


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


def file_list(images: np.ndarray | str | Path | Iterable[str | Path]) -> list[Path] | None:
    """The files a classify call names (folders walked), or None for an array (always sent as pixels)."""
    if isinstance(images, np.ndarray):
        return None
    return expand_paths([images] if isinstance(images, (str, Path)) else images)


def read_encoded(files: list[Path]) -> np.ndarray:
    """Each file's bytes as they are on disk: the BYTES [N, 1] rows of the encoded entry point."""
    rows = np.empty((len(files), 1), dtype=np.object_)
    for i, f in enumerate(files):
        try:
            rows[i, 0] = f.read_bytes()
        except OSError as exc:
            raise InputError(f"{f}: cannot read ({exc.strerror or exc})") from None
    return rows


def encoded_input(grpc: Any, service: EncodedService, rows: np.ndarray) -> Any:
    inp = grpc.InferInput(service.input_name, list(rows.shape), "BYTES")
    inp.set_data_from_numpy(rows)
    return inp


def name_bad_files(exc: ClientError, files: list[Path]) -> ClientError:
    """The server's "bad image: row i: why" as "FILE: not a readable image (why)", the pixel path's wording."""
    if not isinstance(exc, InputError) or "bad image:" not in str(exc):
        return exc
    named = [f"{files[int(i)]}: not a readable image ({why})" for i, why in BAD_ROW.findall(str(exc))]
    return InputError("; ".join(named)) if named else exc


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def unreachable(exc: Exception) -> bool:
    """True only when the call could not reach the server (the one failure the client retries).

    The cascade answers "big failed" / "big timed out" with UNAVAILABLE too: that is an answer (retrying
    it would hold another BLS instance for the whole timeout), so it is told apart by its wording.
    """
    status = getattr(exc, "status", lambda: None)()
    if status != "StatusCode.UNAVAILABLE":
        return False
    message = ((exc.message() if hasattr(exc, "message") else str(exc)) or "").strip()
    if message.startswith(CASCADE_ANSWERS):
        return False
    return bool(TRANSPORT_FAILURE.search(message)) or message.lower() == "unavailable"


def describe_error(exc: Exception, url: str, timeout_s: float) -> ClientError:
    """A one-line ClientError for a tritonclient exception."""
    status = getattr(exc, "status", lambda: None)()
    message = (exc.message() if hasattr(exc, "message") else str(exc)) or str(exc)
    if status == "StatusCode.DEADLINE_EXCEEDED" or "Deadline Exceeded" in message:
        return ClientError(f"request to {url} timed out after {timeout_s:g} s")
    if unreachable(exc):
        return ServerUnavailable(f"cannot reach the littlebig server at {url}: {START_HINT}")
    if status == "StatusCode.INVALID_ARGUMENT":
        return InputError(f"the server rejected the request: {message.splitlines()[0]}")
    return ClientError(f"server error ({status or 'unknown'}): {message.splitlines()[0] if message else exc}")


class _ClientBase:
    """What the sync and async clients share: where to go, and the retry policy of every call.

    One call (metadata, config or one inference) has an overall deadline of ``timeout_s``: each attempt's
    gRPC deadline is what is left of it. Only ``unreachable`` failures are retried, at most ``retries``
    times, after a full-jitter exponential backoff (uniform in [0, min(max_backoff_s, backoff_s * 2**n)])
    so that clients cut off together do not come back together; no retry starts that could not finish
    its backoff before the deadline. tenacity runs the policy (``Retrying`` / ``AsyncRetrying``).
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
        send: str = "encoded",
    ) -> None:
        import tritonclient.grpc as grpcclient

        if send not in SEND_MODES:
            raise ValueError(f"send must be one of {SEND_MODES}, got {send!r}")
        self.send = send
        self._encoded: EncodedService | None | bool = send == "encoded"  # True: not asked yet
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.last_attempts = 0  # attempts the last call made (1 = no retry)
        self.last_waits: list[float] = []  # the backoff before each of its retries, in seconds
        self._grpc = grpcclient  # InferInput, shared by both transports
        self._service: Service | None = None
        self._client = self._connect(url)

    def _connect(self, url: str) -> Any:
        """The transport's tritonclient InferenceServerClient (sync or asyncio)."""
        raise NotImplementedError

    def _policy(self, kind: type):
        """A tenacity Retrying (or AsyncRetrying) for one call, per the class docstring."""
        import tenacity

        return kind(
            retry=tenacity.retry_if_exception(unreachable),
            stop=tenacity.stop_after_attempt(self.retries + 1) | tenacity.stop_before_delay(self.timeout_s),
            wait=tenacity.wait_random_exponential(multiplier=self.backoff_s, max=self.max_backoff_s),
            before=self._count_attempt,
            before_sleep=self._record_wait,
            reraise=True,
        )

    def _count_attempt(self, state) -> None:
        self.last_attempts = state.attempt_number
        if state.attempt_number == 1:
            self.last_waits = []

    def _record_wait(self, state) -> None:
        self.last_waits.append(state.upcoming_sleep)

    def _left(self, deadline: float) -> float:
        """Seconds left for this attempt; a ClientError once the call's deadline has passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise ClientError(f"request to {self.url} timed out after {self.timeout_s:g} s")
        return left

    def _error(self, exc: Exception) -> ClientError:
        return describe_error(exc, self.url, self.timeout_s)


class LittleBigClient(_ClientBase):
    """Classify images with the littlebig service (or call little/big directly with ``model=``).

    >>> client = LittleBigClient("localhost:8001")
    >>> result = client.classify(["shirt.png", "photos/"], threshold=0.9)
    >>> result.names, result.escalated

    Files go as their encoded bytes to ``<model>_encoded`` where the server has it (``send="pixels"``: decoded
    and resized here, as arrays always are); either way the answers are the same.
    """

    def _connect(self, url: str) -> Any:
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(url)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> LittleBigClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, client_timeout=..., **kwargs)`` under the retry policy; failures as ClientError."""
        import tenacity
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + self.timeout_s
        try:
            return self._policy(tenacity.Retrying)(lambda: fn(*args, client_timeout=self._left(deadline), **kwargs))
        except InferenceServerException as exc:
            raise self._error(exc) from None

    def _describe(self, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """``model``'s metadata and config, as the ``from_server`` constructors take them."""
        meta = self._call(self._client.get_model_metadata, model, as_json=True)
        return meta, self._call(self._client.get_model_config, model, as_json=True)["config"]

    def _is_ready(self, model: str) -> bool:
        """Whether the server serves ``model`` (an unreachable server is an error, not a no)."""
        try:
            return self._call(self._client.is_model_ready, model)
        except ServerUnavailable:
            raise
        except ClientError:
            return False

    @property
    def service(self) -> Service:
        if self._service is None:
            self._service = Service.from_server(*self._describe(self.model))
        return self._service

    @property
    def encoded_service(self) -> EncodedService | None:
        """``<model>_encoded`` if files go encoded and the server has it (asked once), else None."""
        if self._encoded is True:
            name = self.model + ENCODED_SUFFIX
            self._encoded = EncodedService.from_server(*self._describe(name)) if self._is_ready(name) else None
        return self._encoded or None

    def infer_encoded(
        self, rows: np.ndarray, threshold: float | str | None = None, deadline_ms: float | None = None
    ) -> Classification:
        """One request of encoded files (BYTES [n, 1], n <= the entry point's max_batch_size)."""
        encoded = self.encoded_service
        if encoded is None:
            raise ClientError(f"{self.url} has no {self.model}{ENCODED_SUFFIX} entry point (or send='pixels')")
        params = request_parameters(threshold, deadline_ms)
        inp = encoded_input(self._grpc, encoded, rows)
        result = self._call(self._client.infer, encoded.model, [inp], parameters=params)
        return parse_response(self.service, result)

    def infer_batch(
        self, images: np.ndarray, threshold: float | str | None = None, deadline_ms: float | None = None
    ) -> Classification:
        """One request of at most max_batch_size rows; ``deadline_ms``: rows big cannot answer in time come
        back from little (REASON deadline)."""
        service = self.service
        inp = self._grpc.InferInput(service.input_name, list(images.shape), service.dtype)
        inp.set_data_from_numpy(images)
        params = request_parameters(threshold, deadline_ms)
        result = self._call(self._client.infer, service.model, [inp], parameters=params)
        return parse_response(service, result)

    def classify(
        self,
        images: np.ndarray | str | Path | Iterable[str | Path],
        threshold: float | str | None = None,
        deadline_ms: float | None = None,
    ) -> Classification:
        """Classify a uint8 batch [N, H, W, C], one image, image files, or folders of them."""
        files = file_list(images)
        encoded = None if files is None else self.encoded_service
        if encoded is not None:
            rows, parts = read_encoded(files), []
            for s in chunks(len(rows), encoded.max_batch_size):
                try:
                    parts.append(self.infer_encoded(rows[s], threshold, deadline_ms))
                except ClientError as exc:
                    raise name_bad_files(exc, files[s]) from None
        else:
            batch, _ = as_batch(images if files is None else files, self.service)
            parts = [
                self.infer_batch(batch[s], threshold, deadline_ms)
                for s in chunks(len(batch), self.service.max_batch_size)
            ]
        result = Classification.concat(parts, self.service.class_names)
        result.files = [str(f) for f in files or []]
        return result
