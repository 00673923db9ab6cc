"""TensorRT plans: what needs no GPU runs here for real (usage errors, the clear 'needs a GPU' exit, the
profile shapes, the Cast-first ONNX rewrite checked in onnxruntime, the parity rule); building and
running plans is skipped without CUDA and TensorRT.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from littlebig.export import tensorrt as lbtrt

ROOT = Path(__file__).resolve().parents[1]
NO_TRT = lbtrt.unavailable_reason()
needs_trt = pytest.mark.skipif(NO_TRT is not None, reason=f"needs CUDA and TensorRT ({NO_TRT})")


def _find_build() -> Path | None:
    """build/ (or $LITTLEBIG_BUILD) when exported and calibrated, else the random-weight dev build."""
    default = Path(os.environ.get("LITTLEBIG_BUILD", ROOT / "build"))
    for candidate in (default, Path("/tmp/lb/build")):
        if (candidate / "export" / "export.json").exists() and (candidate / "calibration.json").exists():
            return candidate
    return None


@pytest.fixture()
def build(tmp_path) -> Path:
    """A private copy of the export + calibration (plans and rewritten ONNX files are written into it)."""
    source = _find_build()
    if source is None:
        pytest.skip("no build with export.json and calibration.json: run `make calibrate`")
    dst = tmp_path / "build"
    (dst / "export").mkdir(parents=True)
    shutil.copy2(source / "calibration.json", dst / "calibration.json")
    for f in (source / "export").iterdir():
        if f.suffix in (".json", ".onnx", ".data") or f.name.startswith("logits-"):
            shutil.copy2(f, dst / "export" / f.name)
    return dst


@pytest.mark.skipif(NO_TRT is None, reason="CUDA and TensorRT are present: the plans are built instead")
def test_cli_without_a_gpu_says_so_and_fails(build, capsys):
    assert lbtrt.run_tensorrt_cli(build, "fp16", 64) == 1
    err = capsys.readouterr().err
    assert "needs a GPU" in err and NO_TRT in err and lbtrt.SERVING_TENSORRT in err
    assert not lbtrt.plan_path(build, "little").exists()
    with pytest.raises(lbtrt.TensorRTUnavailable, match="needs a GPU"):
        lbtrt.plan_logits(build, "little", np.zeros((1, 28, 28, 1), np.uint8))


@pytest.mark.parametrize(("precision", "max_batch"), [("int8", 64), ("FP16", 64), ("fp16", 0), ("fp32", -3)])
def test_cli_rejects_bad_usage_before_touching_a_gpu(build, capsys, precision, max_batch):
    assert lbtrt.run_tensorrt_cli(build, precision, max_batch) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_needs_an_export(tmp_path, capsys):
    assert lbtrt.run_tensorrt_cli(tmp_path / "nothing", "fp16", 64) == 2
    assert "littlebig export" in capsys.readouterr().err


def test_cli_needs_the_onnx_files(build, capsys):
    (build / "export" / "big.onnx").unlink()
    assert lbtrt.run_tensorrt_cli(build, "fp32", 8) == 2
    assert "big.onnx not found" in capsys.readouterr().err


def test_profile_covers_batch_one_to_max():
    lo, opt, hi = lbtrt.profile_shapes([28, 28, 1], 64)
    assert lo == (1, 28, 28, 1) and hi == (64, 28, 28, 1) and lo[0] <= opt[0] <= hi[0]
    assert lbtrt.profile_shapes((224, 160, 3), 1) == ((1, 224, 160, 3),) * 3
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max batch size"):
            lbtrt.profile_shapes((28, 28, 1), bad)
    with pytest.raises(ValueError, match="service size"):
        lbtrt.profile_shapes((28, 0, 1), 8)


def test_the_default_profile_covers_the_generated_max_batch_sizes():
    from littlebig.model_repository.generate import ServeOptions

    opts = ServeOptions()
    assert lbtrt.DEFAULT_MAX_BATCH >= max(opts.max_batch_size, opts.big_max_batch_size)


def test_cast_first_rewrite_gives_identical_logits(build):
    from littlebig.data import load_split
    from littlebig.export.onnx_export import onnx_session
    from littlebig.export.pipeline import read_export

    exported = read_export(build)
    images = load_split("val", exported["data_dir"], tuple(exported["service_size"])).images[:64]
    for role in ("little", "big"):
        path = lbtrt.prepare_onnx(build, role)
        graph = onnx.load(str(path)).graph
        (consumer,) = [n for n in graph.node if lbtrt.INPUT_NAME in n.input]
        assert consumer.op_type == "Cast"  # TensorRT: only a Cast may consume a uint8 network input
        assert graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
        original = onnx_session(build / "export" / f"{role}.onnx").run(None, {"IMAGE": images})[0]
        rewritten = onnx_session(path).run(None, {"IMAGE": images})[0]
        assert np.array_equal(original, rewritten)


def _tiny(first_op: str, dtype: int = TensorProto.UINT8) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("IMAGE", dtype, ["n", 2, 2, 1])
    y = helper.make_tensor_value_info("LOGITS", TensorProto.FLOAT, ["n", 1, 2, 2])
    if first_op == "Cast":
        nodes = [
            helper.make_node("Cast", ["IMAGE"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Transpose", ["f"], ["LOGITS"], perm=[0, 3, 1, 2]),
        ]
    else:
        nodes = [
            helper.make_node("Transpose", ["IMAGE"], ["t"], perm=[0, 3, 1, 2]),
            helper.make_node("Cast", ["t"], ["LOGITS"], to=TensorProto.FLOAT),
        ]
    graph = helper.make_graph(nodes, "tiny", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_cast_first_rewrite_leaves_other_graphs_alone():
    model, changed = lbtrt.cast_input_first(_tiny("Cast"))
    assert not changed
    model, changed = lbtrt.cast_input_first(_tiny("Transpose", TensorProto.FLOAT))
    assert not changed
    model, changed = lbtrt.cast_input_first(_tiny("Transpose"))
    assert changed and model.graph.node[0].op_type == "Cast"
    import onnxruntime as ort

    images = np.arange(8, dtype=np.uint8).reshape(2, 2, 2, 1)
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"IMAGE": images})[0]
    assert np.array_equal(got, images.transpose(0, 3, 1, 2).astype(np.float32))


def test_parity_rule_fails_a_plan_that_disagrees():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(200, 10)).astype(np.float32)
    few = reference[:8]
    parity = lbtrt.check_plan_parity(reference, reference + 1e-4, "fp16", few, few)
    assert parity.argmax_agreement == 1.0 and parity.max_abs == pytest.approx(1e-4, rel=1e-2)
    with pytest.raises(lbtrt.PlanParityError, match="max abs"):
        lbtrt.check_plan_parity(reference, reference + 1e-2, "fp32", few, few)
    flipped = reference.copy()
    flipped[:10] = -flipped[:10]  # argmax changes on 5% of rows: past fp16's 99%
    with pytest.raises(lbtrt.PlanParityError, match="argmax agreement"):
        lbtrt.check_plan_parity(reference, flipped, "fp16", few, few)
    with pytest.raises(lbtrt.PlanParityError, match="batch-1"):
        lbtrt.check_plan_parity(reference, reference, "fp32", few, few + 1.0)
    with pytest.raises(ValueError, match="shapes"):
        lbtrt.compare(reference, reference[:5])


class RecordingBuilderConfig:
    """MOCK of TensorRT's IBuilderConfig (it needs CUDA and TensorRT, absent here): records the flag calls,
    starting, as TensorRT's does, with TF32 set."""

    def __init__(self) -> None:
        self.flags = {"TF32"}

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.flags.discard(flag)


class Flags:  # stands in for tensorrt.BuilderFlag
    FP16, TF32 = "FP16", "TF32"


def test_fp32_plans_clear_tf32_and_fp16_plans_keep_it():
    """TF32 is on by default in TensorRT's builder config; an fp32 plan with it would run its convolutions with
    10-bit mantissas and likely miss fp32's 1e-3 parity limit on Ampere and later."""
    fp32, fp16 = RecordingBuilderConfig(), RecordingBuilderConfig()
    lbtrt.set_precision_flags(fp32, "fp32", Flags)
    lbtrt.set_precision_flags(fp16, "fp16", Flags)
    assert fp32.flags == set() and fp16.flags == {"TF32", "FP16"}
    with pytest.raises(ValueError, match="precision"):
        lbtrt.set_precision_flags(RecordingBuilderConfig(), "int8", Flags)


@needs_trt
def test_tensorrt_builder_config_starts_with_tf32_and_fp32_clears_it():
    import tensorrt as trt

    config = trt.Builder(trt.Logger(trt.Logger.WARNING)).create_builder_config()
    assert config.get_flag(trt.BuilderFlag.TF32)  # the default the fp32 build must undo
    lbtrt.set_precision_flags(config, "fp32", trt.BuilderFlag)
    assert not config.get_flag(trt.BuilderFlag.TF32) and not config.get_flag(trt.BuilderFlag.FP16)


def test_batch_invariance_compares_batch_one_with_one_batch_of_the_max(build):
    """The check runs the same rows at batch 1 and as one batch of the plan's max (it used to be 8 rows, so
    "max batch" was batch 8). Run here with onnxruntime on the exported big model in place of an engine."""
    from littlebig.data import load_split
    from littlebig.export.onnx_export import onnx_session
    from littlebig.export.pipeline import read_export

    exported = read_export(build)
    images = load_split("val", exported["data_dir"], tuple(exported["service_size"])).images[:8]
    session = onnx_session(build / "export" / "big.onnx")
    batches: list[int] = []

    def run(rows: np.ndarray, batch: int) -> np.ndarray:
        out = []
        for i in range(0, len(rows), batch):
            batches.append(len(rows[i : i + batch]))
            out.append(session.run(["LOGITS"], {"IMAGE": rows[i : i + batch]})[0])
        return np.concatenate(out)

    batch1, batched = lbtrt.batch_invariance(run, images, 32)  # fewer images than the max: rows repeat
    assert batches == [1] * 32 + [32] and batch1.shape == batched.shape == (32, batch1.shape[1])
    assert np.array_equal(batched[8:16], batched[:8])  # the 8 images, again
    parity = lbtrt.check_plan_parity(batched, batched, "fp32", batch1, batched)
    assert parity.batch_invariance_max_abs < 1e-4
    with pytest.raises(ValueError, match="no images"):
        lbtrt.batch_invariance(run, images[:0], 32)


def _binomial_cdf_above(k: int, n: int, eps: Fraction, delta: Fraction) -> bool:
    """P(Binomial(n, eps) <= k) > delta, in exact rational arithmetic (no floats, no lgamma)."""
    q = 1 - eps
    cdf = sum(Fraction(math.comb(n, i)) * eps**i * q ** (n - i) for i in range(k + 1))
    return cdf > delta


def test_calibration_on_plan_logits_matches_an_independent_search(build, monkeypatch):
    """With onnxruntime's logits standing in for a plan's, the plan calibration's Ts and figures equal a
    brute-force search written here (a loop over every T; exact binomial tails), not calibrate() again."""
    from littlebig.decision import confidence, escalate, softmax
    from littlebig.export.calibrate import DELTA, EPS, ltt_grid
    from littlebig.export.pipeline import reference_logits

    monkeypatch.setattr(lbtrt, "plan_split_logits", reference_logits)
    record = lbtrt.calibrate_on_plans(build)
    val = reference_logits(build, "val")
    labels, little, big = val["labels"], val["little"].argmax(-1), val["big"].argmax(-1)
    conf = confidence(softmax(val["little"]))

    def figures(t: float) -> tuple[float, float]:
        esc = escalate(conf, t)
        return float(np.where(esc, big == labels, little == labels).mean()), float(esc.mean())

    # paper: the smallest T (every distinct confidence, 0 and 1 tried) whose accuracy reaches big's
    big_acc = float((big == labels).mean())
    paper = min(t for t in {0.0, 1.0, *map(float, conf)} if figures(t)[0] >= big_acc - 1e-12)
    got = record["rules"]["paper"]
    assert got["threshold"] == paper and (got["accuracy"], got["escalation_rate"]) == figures(paper)
    # guaranteed: the last grid T, walking down from 1, before the first whose exact tail exceeds delta
    n, eps, delta = len(labels), Fraction(EPS).limit_denominator(10**6), Fraction(DELTA).limit_denominator(10**6)
    chosen = 1.0
    for t in ltt_grid():
        if _binomial_cdf_above(int((~escalate(conf, t) & (little != big)).sum()), n, eps, delta):
            break
        chosen = float(t)
    assert record["rules"]["guaranteed"]["threshold"] == chosen < 1.0
    assert record["big_acc"] == big_acc
    # the per-rule figures on each split are the rule's T evaluated here
    test = reference_logits(build, "test")
    conf_test = confidence(softmax(test["little"]))
    esc = escalate(conf_test, paper)
    acc = np.where(esc, test["big"].argmax(-1) == test["labels"], test["little"].argmax(-1) == test["labels"]).mean()
    assert record["on_plan_logits"]["paper"]["plan_threshold"]["test"]["accuracy"] == pytest.approx(acc, abs=1e-12)


@needs_trt
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plans_build_match_onnxruntime_and_are_served_by_the_gpu_profile(build, tmp_path, precision):
    from littlebig.export.pipeline import reference_logits
    from littlebig.model_repository.generate import generate

    assert lbtrt.run_tensorrt_cli(build, precision, 64) == 0
    record = json.loads((build / "export" / "tensorrt.json").read_text())
    limit_abs, limit_agree = lbtrt.PARITY_LIMITS[precision]
    for role in ("little", "big"):
        parity = record[role]["parity"]
        assert parity["max_abs"] <= limit_abs and parity["argmax_agreement"] >= limit_agree
    # one profile per plan: little 1..64, big 1..32 (ServeOptions' big_max_batch_size), opt below max
    for role, hi in (("little", 64), ("big", 32)):
        lo, opt, top = record[role]["profile"]
        assert lo[0] == 1 and top[0] == hi and 1 <= opt[0] < hi
    assert record["gpu"]["product_label"] == lbtrt.gpu_product_label(record["gpu"]["name"])
    # plan_logits on arbitrary rows agrees with onnxruntime on the same rows
    reference = reference_logits(build, "val")
    from littlebig.data import load_split
    from littlebig.export.pipeline import read_export

    exported = read_export(build)
    images = load_split("val", exported["data_dir"], tuple(exported["service_size"])).images[:100]
    got = lbtrt.plan_logits(build, "big", images)
    assert got.shape == reference["big"][:100].shape
    assert (got.argmax(-1) == reference["big"][:100].argmax(-1)).mean() >= limit_agree
    # calibration on plan outputs: a T per rule, and the ONNX T evaluated on plan logits
    calibration = record["calibration"]
    assert set(calibration["rules"]) == {"paper", "guaranteed"}
    assert "onnx_threshold" in calibration["on_plan_logits"]["paper"]
    summary = generate(build, tmp_path / "repo", "gpu")
    config = (tmp_path / "repo" / "big" / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config and (tmp_path / "repo" / "big" / "1" / "model.plan").exists()
    assert summary["profile"] == "gpu"
