"""Shared fixtures: the build, the real tritonserver on free loopback ports, the test split (helpers: tests/helpers.py).

The server is started once per test session on a cpu repository generated from ``build/`` (``make
test`` exports and calibrates first) and is always stopped, stubs included, when the session ends.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import start_server

BUILD = Path(os.environ.get("LITTLEBIG_BUILD", "build"))


@pytest.fixture(scope="session")
def build_dir() -> Path:
    for needed in ("export/export.json", "calibration.json"):
        if not (BUILD / needed).exists():
            pytest.fail(f"{BUILD / needed} is missing: run `make export calibrate` (make test does)")
    return BUILD


@pytest.fixture(scope="session")
def repository(build_dir, tmp_path_factory) -> Path:
    from littlebig.model_repository.generate import generate

    out = tmp_path_factory.mktemp("repo") / "model_repository"
    generate(build_dir, out, "cpu")
    return out


@pytest.fixture(scope="session")
def server(repository, tmp_path_factory):
    """One real tritonserver for the session (gRPC/HTTP/metrics on free loopback ports)."""
    srv = start_server(repository, tmp_path_factory.mktemp("server"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture()
def grpc_client(server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports.grpc}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def served_threshold(repository) -> float:
    import json

    return json.loads((repository / "littlebig-repository.json").read_text())["threshold"]


@pytest.fixture(scope="session")
def test_split(build_dir):
    """The test split at the service size, and both models' offline logits on it."""
    from littlebig.data import load_split
    from littlebig.export.pipeline import read_export, reference_logits

    exported = read_export(build_dir)
    data = load_split("test", exported["data_dir"], tuple(exported["service_size"]))
    logits = reference_logits(build_dir, "test")
    assert np.array_equal(logits["labels"], data.labels)
    return data, logits
