"""littlebig's one health check: ``littlebig health``, the Supervisor, compose and Kubernetes all run this file.

Why one Python file and not a shell script: the NGC Triton image the deploy files run
(``nvcr.io/nvidia/tritonserver:24.10-py3``) ships ``python3`` (its Python backend, which runs the littlebig
BLS model, needs it), and this file uses the standard library only and imports nothing from littlebig.
So compose mounts it as it is, ``make deploy-configmap`` copies it verbatim into the Kubernetes ConfigMap,
the Supervisor and the CLI import it, and there is no second implementation to drift.

Two checks, over Triton's HTTP/KServe v2 endpoint:

* ``live`` (cheap: never queues behind inference): ``/v2/health/live`` answers. With ``--state FILE`` it
  also fails once the last successful ``ready`` check recorded in FILE is older than ``--max-unready``
  seconds: a dead or hung stub (Triton keeps such a model "ready" and never restarts it) gets the
  container restarted after a sustained failure, while a burst of load that slows the real inference
  for a while only takes it out of rotation.
* ``ready`` (the real thing): one zero image through little, big and littlebig. littlebig is asked with
  threshold 1, so the image goes through big; an answer marked DEGRADED is a failure of big. The request
  carries the parameter ``littlebig_probe: true``, so the cascade keeps the probe out of its traffic
  metrics (two pods probing every 10 s would otherwise add 120 identical all-zero rows per 10 minutes to
  the drift alerts' counters).

Usage (exit 0 healthy, 1 unhealthy, 2 bad usage)::

    python3 health.py ready --url http://127.0.0.1:8000 --state /tmp/littlebig-health
    python3 health.py live --url http://127.0.0.1:8000 --state /tmp/littlebig-health --max-unready 120
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

MODELS = ("little", "big", "littlebig")
CASCADE = "littlebig"
#: The request parameter marking a probe; the littlebig BLS model (``littlebig.control.PROBE_PARAMETER``, read by
#: ``request_settings``) leaves such requests out of every ``littlebig_*`` traffic counter.
PROBE_PARAMETER = "littlebig_probe"


def base_url(url: str) -> str:
    """``host:port`` or ``http://host:port`` -> ``http://host:port`` (no trailing slash)."""
    url = url.rstrip("/")
    return url if "://" in url else f"http://{url}"


def binary_infer_request(
    inputs: list[tuple[str, str, list[int], bytes]],
    outputs: tuple[str, ...] = (),
    parameters: dict | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 infer request with the binary tensor extension: (body, headers) for POST .../infer.

    ``inputs``: (name, datatype, shape, raw bytes) each; ``outputs`` asked for as binary. The one builder of such
    requests (the GPU check imports it), kept here because this file must stay stdlib-only and self-contained.
    """
    header: dict = {
        "inputs": [
            {"name": name, "shape": list(shape), "datatype": datatype, "parameters": {"binary_data_size": len(raw)}}
            for name, datatype, shape, raw in inputs
        ]
    }
    if outputs:
        header["outputs"] = [{"name": o, "parameters": {"binary_data": True}} for o in outputs]
    if parameters:
        header["parameters"] = parameters
    head = json.dumps(header).encode()
    body = head + b"".join(raw for *_, raw in inputs)
    return body, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}


def split_binary_response(body: bytes, header_length: str | None) -> tuple[dict, dict[str, bytes]]:
    """An infer answer with the binary extension -> (its JSON header, output name -> raw bytes)."""
    length = int(header_length) if header_length is not None else len(body)
    meta, offset, raw = json.loads(body[:length]), length, {}
    for out in meta.get("outputs", []):
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            raw[out["name"]] = body[offset : offset + size]
            offset += size
    return meta, raw


@dataclass
class HealthProbe:
    """A real inference through each model over HTTP (KServe v2, binary tensor extension; no numpy).

    ``is_model_ready`` stays true after a Python stub dies, so only an answer proves health. The cascade
    is probed with threshold 1 (every row goes to big) and must not answer DEGRADED.
    """

    url: str
    models: tuple[str, ...] = MODELS
    cascade: str = CASCADE
    timeout: float = 10.0
    _inputs: dict[str, tuple[str, str, list[int]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.url = base_url(self.url)

    def _request(self, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
        req = urllib.request.Request(f"{self.url}{path}", data=body, headers=headers or {})
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return r.read()

    def _input(self, model: str) -> tuple[str, str, list[int]]:
        if model not in self._inputs:
            meta = json.loads(self._request(f"/v2/models/{model}"))
            first = meta["inputs"][0]
            self._inputs[model] = (first["name"], first["datatype"], [1, *first["shape"][1:]])
        return self._inputs[model]

    def infer(self, model: str) -> dict:
        """One zero image through ``model``; the parsed JSON answer (HTTPError/URLError on failure)."""
        name, datatype, shape = self._input(model)
        if datatype != "UINT8":
            raise ValueError(f"{model}: the probe sends UINT8 images, the model takes {datatype}")
        parameters = {"threshold": 1.0, PROBE_PARAMETER: True} if model == self.cascade else None
        body, headers = binary_infer_request([(name, datatype, shape, bytes(math.prod(shape)))], parameters=parameters)
        return json.loads(self._request(f"/v2/models/{model}/infer", body, headers))

    def report(self) -> dict[str, str | None]:
        """model -> None when it answered, else why it failed (every model is tried)."""
        out: dict[str, str | None] = {}
        for model in self.models:
            try:
                answer = self.infer(model)
            except urllib.error.HTTPError as exc:
                out[model] = f"HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}"
                continue
            except (OSError, ValueError, KeyError, IndexError) as exc:  # refused, reset, timed out, bad JSON
                out[model] = f"no answer from {self.url} ({type(exc).__name__}: {exc})"
                continue
            outputs = {o["name"]: o for o in answer.get("outputs", [])}
            if "DEGRADED" in outputs and any(outputs["DEGRADED"].get("data", [])):
                out[model] = "answered DEGRADED: big failed behind the cascade"
            else:
                out[model] = None
        return out

    def check(self) -> dict[str, str]:
        """model -> why it failed; empty when every model answered."""
        return {m: why for m, why in self.report().items() if why is not None}

    def live(self) -> str | None:
        """None when ``/v2/health/live`` answers 200, else why not (cheap: no inference)."""
        try:
            self._request("/v2/health/live")
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code} from /v2/health/live"
        except OSError as exc:
            return f"no answer from {self.url} ({type(exc).__name__}: {exc})"
        return None


def record_ready(state: Path, healthy: bool, now: float | None = None) -> None:
    """Keep in ``state`` the time of the last healthy ``ready`` check (or of the first failure, if none)."""
    now = time.time() if now is None else now
    if healthy or not state.exists():
        state.write_text(f"{now}\n")


def unready_for(state: Path, now: float | None = None) -> float:
    """Seconds since the last healthy ``ready`` check recorded in ``state`` (0 when none has run yet)."""
    now = time.time() if now is None else now
    try:
        return max(0.0, now - float(state.read_text().strip()))
    except (OSError, ValueError):
        return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="health.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("check", choices=["live", "ready"])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="Triton's HTTP address")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP call")
    parser.add_argument("--models", default=",".join(MODELS), help="ready: the models to infer through")
    parser.add_argument("--state", type=Path, default=None, help="file recording the last healthy ready check")
    parser.add_argument(
        "--max-unready", type=float, default=120.0, help="live: fail once ready has failed for this long (with --state)"
    )
    args = parser.parse_args(argv)
    probe = HealthProbe(args.url, tuple(m for m in args.models.split(",") if m), timeout=args.timeout)
    if args.check == "live":
        why = probe.live()
        if why is None and args.state is not None and unready_for(args.state) > args.max_unready:
            why = f"no healthy ready check for {unready_for(args.state):.0f} s (> {args.max_unready:g} s)"
        print(f"live: {'ok' if why is None else 'FAILED: ' + why}", file=sys.stdout if why is None else sys.stderr)
        return 0 if why is None else 1
    report = probe.report()
    healthy = all(why is None for why in report.values())
    if args.state is not None:
        record_ready(args.state, healthy)
    for model, why in report.items():
        print(f"{model:10s} {'ok' if why is None else 'FAILED: ' + why}", file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
