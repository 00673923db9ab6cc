"""Hypothesis-driven requests against the running cascade: any shape, datatype, input name and
threshold parameter either gets a well-formed answer or a clear INVALID_ARGUMENT, and no stub dies.

Bounded: ``LITTLEBIG_FUZZ_EXAMPLES`` examples (default 150), no per-example deadline (the server is
shared with the CPU-heavy models). Afterwards every model must still answer a real inference and keep
the same stub processes.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from littlebig.decision import check_threshold
from littlebig.model_repository.server import HealthProbe

EXAMPLES = int(os.environ.get("LITTLEBIG_FUZZ_EXAMPLES", "150"))
MAX_ELEMENTS = 400_000
DTYPES = {
    "UINT8": np.uint8,
    "INT8": np.int8,
    "UINT16": np.uint16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BOOL": np.bool_,
    "BYTES": np.object_,
}
SERVICE = (28, 28, 1)  # Fashion-MNIST's service size; the test reads the real one from the model

thresholds = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=1.0),
    st.integers(-3, 3),
    st.booleans(),
    st.text(max_size=8),
    st.sampled_from(["0.5", "1", "0", "abc", "-1", "2", "1e-3", " 0.25 ", "nan", "inf"]),
)
shapes = st.one_of(
    st.integers(1, 64).map(lambda n: [n, *SERVICE]),  # valid
    st.integers(65, 200).map(lambda n: [n, *SERVICE]),  # over max_batch_size
    st.lists(st.integers(0, 70), min_size=0, max_size=5),  # anything
    st.tuples(st.integers(0, 8), st.integers(1, 40), st.integers(1, 40), st.integers(1, 4)).map(list),
).filter(lambda s: int(np.prod(s, dtype=np.int64)) <= MAX_ELEMENTS)


def mostly(valid, other: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` three times in four, so that about a quarter of the requests are fully valid."""
    return st.one_of(st.just(valid), st.just(valid), st.just(valid), other)


requests = st.fixed_dictionaries(
    {
        "shape": st.one_of(st.integers(1, 64).map(lambda n: [n, *SERVICE]), shapes),
        "dtype": mostly("UINT8", st.sampled_from(sorted(DTYPES))),
        "name": mostly("IMAGE", st.sampled_from(["image", "INPUT__0", "X", ""])),
        "params": st.one_of(
            st.none(),
            st.fixed_dictionaries({"threshold": thresholds}),
            st.fixed_dictionaries({"threshold": st.floats(0.0, 1.0)}),
            st.dictionaries(st.sampled_from(["x_a", "x_b", "threshold_"]), st.integers(-5, 5), max_size=2),
        ),
        "claimed_shape": mostly(None, st.lists(st.integers(1, 70), min_size=1, max_size=4)),
        "seed": st.integers(0, 2**32 - 1),
    }
)


def payload(shape: list[int], dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "BYTES":
        return np.array(
            [b"x" * int(k) for k in rng.integers(0, 4, size=int(np.prod(shape)))], dtype=np.object_
        ).reshape(shape)
    return rng.integers(0, 256, size=shape).astype(DTYPES[dtype])


def should_answer(req: dict) -> bool:
    """The request a correct server must answer (everything else: INVALID_ARGUMENT)."""
    shape = req["claimed_shape"] or req["shape"]
    if req["name"] != "IMAGE" or req["dtype"] != "UINT8" or req["claimed_shape"] not in (None, req["shape"]):
        return False
    if len(shape) != 4 or tuple(shape[1:]) != SERVICE or not 1 <= shape[0] <= 64:
        return False
    if req["params"] and "threshold" in req["params"]:
        try:
            check_threshold(req["params"]["threshold"])
        except ValueError:
            return False
    return True


def test_fuzzed_requests_get_an_answer_or_a_clear_error(server):
    url = f"127.0.0.1:{server.ports.grpc}"
    client = grpcclient.InferenceServerClient(url)
    meta = client.get_model_metadata("littlebig", as_json=True)
    assert tuple(int(d) for d in meta["inputs"][0]["shape"][1:]) == SERVICE, "the fuzz strategies assume 28x28x1"
    stubs = {m: server.stub_pid(m) for m in ("little", "big", "littlebig")}
    outcomes: Counter[str] = Counter()
    problems: list[str] = []

    @settings(
        max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
    )
    @given(req=requests)
    def check(req: dict) -> None:
        data = payload(req["shape"], req["dtype"], req["seed"])
        inp = grpcclient.InferInput(req["name"], list(req["shape"]), req["dtype"])
        inp.set_data_from_numpy(data)
        if req["claimed_shape"] is not None:
            inp.set_shape(req["claimed_shape"])  # a header that lies about the payload
        expected = should_answer(req)
        try:
            res = client.infer("littlebig", [inp], parameters=req["params"], client_timeout=60)
        except InferenceServerException as exc:
            status = str(exc.status())
            outcomes[status] += 1
            if expected or "INVALID_ARGUMENT" not in status or not exc.message():
                problems.append(f"{req} -> {status} {exc.message()[:200]}")
            assert not expected and "INVALID_ARGUMENT" in status and exc.message()
            return
        outcomes["answered"] += 1
        n = req["shape"][0]
        probs, label = res.as_numpy("PROBS"), res.as_numpy("LABEL").reshape(-1)
        ok = (
            expected
            and probs.shape[0] == n
            and label.shape == (n,)
            and np.allclose(probs.sum(-1), 1, atol=1e-4)
            and np.array_equal(label, probs.argmax(-1))
            and not res.as_numpy("DEGRADED").any()
        )
        if not ok:
            problems.append(f"{req} -> answered (expected an error: {not expected})")
        assert ok

    try:
        check()
    finally:
        client.close()
        print(f"\nfuzz: {sum(outcomes.values())} requests: {dict(outcomes)}; problems: {problems[:5]}")
    assert problems == []
    assert {m: server.stub_pid(m) for m in stubs} == stubs, "a stub process died or was replaced"
    assert server.is_ready() and HealthProbe(server.url).check() == {}
