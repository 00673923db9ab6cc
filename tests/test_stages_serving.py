"""A cascade of three models (little -> middle -> big) on the real tritonserver.

Every served answer (LABEL, PROBS, ESCALATED, STAGE, REASON) equals the offline reference of the one decision rule
(``decision.cascade_stages``) at the served thresholds and at a request's own threshold; the per-stage counters and
the models' row counts agree with it; a past deadline leaves rows with the stage before. The build is a
``--max-images 2000`` sample (1,000 val, 1,000 test images) of the committed checkpoints, exported here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from littlebig.decision import cascade_stages, stage_names
from littlebig.model_repository.generate import ServeOptions
from tests.helpers import infer, own_server, reasons, rows_of, scrape

pytestmark = pytest.mark.slow
CHECKPOINTS = Path("checkpoints")
BATCHES = (64, 1, 7, 32, 50, 3, 64, 16)


@pytest.fixture(scope="module")
def three_stage_build(tmp_path_factory) -> Path:
    from littlebig.export.models import RECIPES, default_checkpoint
    from littlebig.export.pipeline import calibrate_step, export_models, reference_logits

    stages = stage_names(3)
    if not default_checkpoint("middle").exists():
        pytest.fail(f"{default_checkpoint('middle')} is missing: it is committed (checkpoints/README.md)")
    build = tmp_path_factory.mktemp("three")
    export_models(
        build, {s: str(default_checkpoint(s)) for s in stages}, {s: RECIPES[s].model for s in stages}, (28, 28, 1),
        None, max_images=2000,
    )
    for split in ("val", "test"):
        reference_logits(build, split)
    calibrate_step(build, ("paper", "bounded", "guaranteed"), "bounded")
    return build


@pytest.fixture(scope="module")
def three_stage_server(three_stage_build, tmp_path_factory):
    with own_server(three_stage_build, tmp_path_factory.mktemp("three-server"), ServeOptions(rule="paper")) as srv:
        yield srv


def chunks(n: int) -> list[np.ndarray]:
    out, start, i = [], 0, 0
    while start < n:
        out.append(np.arange(start, min(start + BATCHES[i % len(BATCHES)], n)))
        start, i = start + BATCHES[i % len(BATCHES)], i + 1
    return out


def served_answers(url: str, images: np.ndarray, threshold=None, parameters=None) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {"label": [], "probs": [], "escalated": [], "stage": [], "reason": []}
    for rows in chunks(len(images)):
        res = infer(url, images[rows], threshold, parameters=parameters)
        assert not res.as_numpy("DEGRADED").any()
        parts["label"].append(res.as_numpy("LABEL").reshape(-1))
        parts["probs"].append(res.as_numpy("PROBS"))
        parts["escalated"].append(res.as_numpy("ESCALATED").reshape(-1))
        parts["stage"].append(np.array([s.decode() for s in res.as_numpy("STAGE").reshape(-1)]))
        parts["reason"].append(reasons(res))
    return {k: np.concatenate(v) for k, v in parts.items()}


def assert_equal_to_offline(served: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    names = np.array(stage_names(3))
    assert np.array_equal(served["stage"], names[expected["stage"]]), "STAGE differs"
    assert np.array_equal(served["label"], expected["label"]), "LABEL differs"
    assert np.array_equal(served["escalated"], expected["escalated"]), "ESCALATED differs"
    np.testing.assert_allclose(served["probs"], expected["probs"], atol=1e-5, rtol=0)
    assert np.array_equal(served["reason"], np.where(expected["escalated"], "escalated", "confident"))


def test_every_answer_equals_the_offline_three_stage_cascade(three_stage_build, three_stage_server):
    from littlebig.data import load_split
    from littlebig.export.pipeline import read_export, reference_logits

    exported = read_export(three_stage_build)
    data = load_split("test", None, (28, 28, 1))
    keep = np.sort(np.random.default_rng(0).permutation(len(data.labels))[:1000])  # export's --max-images sample
    images = data.images[keep]
    logits = reference_logits(three_stage_build, "test")
    assert np.array_equal(logits["labels"], data.labels[keep]) and exported["stages"] == list(stage_names(3))
    summary = json.loads((Path(three_stage_server.repository) / "littlebig-repository.json").read_text())
    thresholds = summary["thresholds"]
    assert len(thresholds) == 2 and summary["stages"] == list(stage_names(3))
    url = f"127.0.0.1:{three_stage_server.ports.grpc}"
    stack = [logits[s] for s in stage_names(3)]
    middle_before, big_before = rows_of(url, "middle"), rows_of(url, "big")
    counted_before = scrape(three_stage_server).by("littlebig_stage_rows_total", "stage")

    # The served thresholds (rule paper on this val sample), then one own threshold for both transitions.
    for own in (None, 0.9):
        expected = cascade_stages(stack, thresholds if own is None else own)
        assert_equal_to_offline(served_answers(url, images, own), expected)
    at_own = cascade_stages(stack, 0.9)["stage"]
    assert all((at_own == k).any() for k in range(3)), "the 0.9 run must exercise every stage"

    both = np.concatenate([cascade_stages(stack, thresholds)["stage"], at_own])
    assert rows_of(url, "middle") - middle_before == int((both >= 1).sum())  # middle sees only rows little escalated
    assert rows_of(url, "big") - big_before == int((both == 2).sum())  # big only rows the middle escalated
    counted = scrape(three_stage_server).by("littlebig_stage_rows_total", "stage")
    for k, name in enumerate(stage_names(3)):
        assert counted.get(name, 0) - counted_before.get(name, 0) == int((both == k).sum()), name


def test_a_past_deadline_keeps_rows_with_the_stage_before(three_stage_build, three_stage_server):
    from littlebig.data import load_split
    from littlebig.export.pipeline import reference_logits

    data = load_split("test", None, (28, 28, 1))
    keep = np.sort(np.random.default_rng(0).permutation(len(data.labels))[:1000])[:64]
    logits = reference_logits(three_stage_build, "test")
    url = f"127.0.0.1:{three_stage_server.ports.grpc}"
    middle_before = rows_of(url, "middle")
    res = infer(url, data.images[keep], 0.9, parameters={"deadline_ms": 0.001})
    would_go = cascade_stages([logits["little"][:64], logits["big"][:64]], 0.9)["escalated"]  # little's decision
    assert would_go.any()
    assert np.array_equal(res.as_numpy("LABEL").reshape(-1), logits["little"][:64].argmax(1))  # little answers all
    assert np.array_equal(reasons(res), np.where(would_go, "deadline", "confident"))
    assert {s.decode() for s in res.as_numpy("STAGE").reshape(-1)} == {"little"}
    assert rows_of(url, "middle") == middle_before


def test_the_two_model_cascade_names_its_answering_stage(server, grpc_client, test_split, served_threshold):
    data, logits = test_split
    rows = np.arange(64)  # littlebig's max_batch_size
    res = infer(grpc_client, data.images[rows])
    esc = res.as_numpy("ESCALATED").reshape(-1)
    stage = np.array([s.decode() for s in res.as_numpy("STAGE").reshape(-1)])
    assert esc.any() and (~esc).any()
    assert np.array_equal(stage, np.where(esc, "big", "little"))
