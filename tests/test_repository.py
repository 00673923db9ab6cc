"""The repository generator: every config is Triton's ModelConfig, for both profiles."""

from __future__ import annotations

import ast
import json
import re
import shutil

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from littlebig.model_repository.generate import ServeOptions, generate
from tests.helpers import read_config


def check_cascade_contract(repo, service_size, classes):
    cfg = read_config(repo / "littlebig")
    assert cfg.backend == "python" and cfg.max_batch_size == 64
    (inp,) = cfg.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("IMAGE", mc.TYPE_UINT8, list(service_size))
    outs = {o.name: o for o in cfg.output}
    assert outs["LABEL"].data_type == mc.TYPE_INT64 and outs["ESCALATED"].data_type == mc.TYPE_BOOL
    assert outs["PROBS"].data_type == mc.TYPE_FP32 and list(outs["PROBS"].dims) == [classes]
    assert (repo / "littlebig" / outs["PROBS"].label_filename).read_text().splitlines().__len__() == classes
    assert 0.0 <= float(cfg.parameters["threshold"].string_value) <= 1.0
    assert {"stage_models", "stage_max_batch_sizes", "thresholds"} <= set(cfg.parameters)
    assert json.loads(cfg.parameters["stage_models"].string_value) == ["little", "big"]
    for f in ("model.py", "decision.py", "control.py", "metrics.py", "shadow.py"):  # the BLS model and its modules
        assert (repo / "littlebig" / "1" / f).exists()
    # Runs on a stock NGC image: the standard library, numpy, the backend utils and the decision rule at
    # module level; torch (the copy of a GPU tensor) and onnxruntime (little in process) only where used.
    tree = ast.parse((repo / "littlebig" / "1" / "model.py").read_text())
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    stdlib = {"asyncio", "json", "os", "time", "traceback", "concurrent", "typing"}
    assert top <= stdlib | {"numpy", "triton_python_backend_utils", "decision", "control", "metrics", "shadow"}, top
    anywhere = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    anywhere |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert anywhere - top <= {"torch", "onnxruntime"}, anywhere - top


@pytest.fixture(scope="module")
def exported(build_dir):
    return json.loads((build_dir / "export" / "export.json").read_text())


def test_cpu_profile(build_dir, exported, tmp_path):
    repo = tmp_path / "cpu"
    generate(build_dir, repo, "cpu", ServeOptions(little_instances=2, intra_op_threads=2))
    check_cascade_contract(repo, exported["service_size"], len(exported["class_names"]))
    for role in ("little", "big"):
        cfg = read_config(repo / role)
        assert cfg.backend == "python" and cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
        assert list(cfg.dynamic_batching.preferred_batch_size) and cfg.output[0].name == "LOGITS"
        assert cfg.parameters["intra_op_threads"].string_value == "2"
        assert (repo / role / "1" / "model.onnx").exists() and (repo / role / "1" / "model.py").exists()
    assert read_config(repo / "little").instance_group[0].count == 2
    assert read_config(repo / "big").max_batch_size == 32


def test_gpu_profile_uses_onnxruntime_then_tensorrt_plans(build_dir, exported, tmp_path):
    repo = tmp_path / "gpu"
    generate(build_dir, repo, "gpu", ServeOptions(trt_accelerator=True))
    check_cascade_contract(repo, exported["service_size"], len(exported["class_names"]))
    for role in ("little", "big"):
        cfg = read_config(repo / role)
        assert (cfg.platform, cfg.backend, cfg.default_model_filename) == (
            "onnxruntime_onnx",
            "onnxruntime",
            "model.onnx",
        )
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert not cfg.dynamic_batching.preferred_batch_size and cfg.max_batch_size >= 1  # tests/test_gpu_profile.py
        assert [i.name for i in cfg.input] == ["IMAGE"] and [o.name for o in cfg.output] == ["LOGITS"]
        assert list(cfg.input[0].dims) == exported["service_size"]
        accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP32"  # no FP16 calibration here
        assert (repo / role / "1" / "model.onnx").exists()
    # Where both plans were built, the gpu profile serves them with the TensorRT backend, at the T
    # calibrated on the plans' outputs. The generator only copies plan files, so placeholders stand in for
    # real plans (building one needs a GPU: tests/test_tensorrt.py).
    build = tmp_path / "build"
    shutil.copytree(build_dir / "export", build / "export")
    shutil.copy2(build_dir / "calibration.json", build / "calibration.json")
    (build / "export" / "big.plan").write_bytes(b"plan placeholder")
    generate(build, tmp_path / "gpu-one-plan", "gpu")  # one plan alone is not served
    assert read_config(tmp_path / "gpu-one-plan" / "big").platform == "onnxruntime_onnx"
    (build / "export" / "little.plan").write_bytes(b"little plan placeholder")
    with pytest.raises(FileNotFoundError, match="tensorrt.json"):
        generate(build, tmp_path / "gpu-plan", "gpu")
    plan_rules = {"paper": {"threshold": 0.61}, "bounded": {"threshold": 0.83}, "guaranteed": {"threshold": 0.97}}
    size = exported["service_size"]
    profiles = {role: {"profile": [[1, *size], [8, *size], [64, *size]]} for role in ("little", "big")}
    (build / "export" / "tensorrt.json").write_text(json.dumps({"calibration": {"rules": plan_rules}, **profiles}))
    with pytest.raises(FileNotFoundError, match="logits-plan-val.npz"):  # the governor's val figures need them
        generate(build, tmp_path / "gpu-plan", "gpu")
    # the plans' val logits (the ONNX ones stand in: no GPU here), cached after the plans as the plan build does
    with np.load(build / "export" / "logits-val.npz") as onnx_val:
        np.savez(build / "export" / "logits-plan-val.npz", **{k: onnx_val[k] for k in ("labels", "little", "big")})
    summary = generate(build, tmp_path / "gpu-plan", "gpu")
    assert summary["tensorrt_plans"] and summary["threshold"] == plan_rules[summary["rule"]]["threshold"]
    for role in ("little", "big"):
        cfg = read_config(tmp_path / "gpu-plan" / role)
        assert (cfg.platform, cfg.default_model_filename) == ("tensorrt_plan", "model.plan")
    assert (tmp_path / "gpu-plan" / "big" / "1" / "model.plan").read_bytes() == b"plan placeholder"
    onnx_rules = json.loads((build / "calibration.json").read_text())["rules"]
    cpu = generate(build, tmp_path / "cpu-plan", "cpu")  # the cpu profile serves the ONNX files and their T
    assert not cpu["tensorrt_plans"] and cpu["threshold"] == onnx_rules[cpu["rule"]]["threshold"]


def test_threshold_comes_from_calibration_unless_overridden(build_dir, tmp_path):
    calibration = json.loads((build_dir / "calibration.json").read_text())
    for rule, r in calibration["rules"].items():
        summary = generate(build_dir, tmp_path / rule, "cpu", ServeOptions(rule=rule))
        assert summary["threshold"] == r["threshold"]
        cfg = read_config(tmp_path / rule / "littlebig")
        assert float(cfg.parameters["threshold"].string_value) == r["threshold"]
    assert generate(build_dir, tmp_path / "o", "cpu", ServeOptions(threshold=0.25))["threshold"] == 0.25


@pytest.mark.parametrize(
    "profile,opts,message",
    [
        ("tpu", ServeOptions(), "unknown profile"),
        ("cpu", ServeOptions(on_big_failure="retry"), "on_big_failure"),
        ("cpu", ServeOptions(threshold=1.5), "threshold"),
        ("cpu", ServeOptions(rule="magic"), "not calibrated"),
        ("cpu", ServeOptions(big_max_batch_size=0), "max batch"),
    ],
)
def test_bad_options_are_rejected(build_dir, tmp_path, profile, opts, message):
    with pytest.raises(ValueError, match=message):
        generate(build_dir, tmp_path / "r", profile, opts)


def test_the_bls_parameters_are_one_table_written_and_read_by_the_same_kinds(repository, build_dir):
    """The generated config holds exactly the table's parameters, and each reads back (by its kind, as the BLS
    model reads it) to the value the generator was given; a text its kind cannot read, or a table entry the
    generator leaves out, is refused by name."""
    from littlebig.control import BLS_PARAMETERS, encode_parameters, read_parameters

    cfg = read_config(repository / "littlebig")
    texts = {k: v.string_value for k, v in cfg.parameters.items()}
    assert set(texts) == set(BLS_PARAMETERS)
    values = read_parameters(texts)
    calibration = json.loads((build_dir / "calibration.json").read_text())
    assert values["thresholds"] == [values["threshold"]] == [calibration["rules"][values["rule"]]["threshold"]]
    assert values["stage_models"] == ["little", "big"] and values["little_in_process"] is True
    assert values["guard"] is False and values["calibration_rows"] == calibration["rows"]
    assert values["calibrated_confidence_shares"] == calibration["confidence_shares"]
    assert read_parameters(encode_parameters(values)) == values  # written and read by the same table
    with pytest.raises(ValueError, match=r"no parameter guard, guard_alpha: generate the repository"):
        read_parameters({k: v for k, v in texts.items() if not k.startswith("guard")} | {"guard_eps": "0.1"})
    with pytest.raises(ValueError, match=r"parameter 'shadow_seed' must be int, got '1.5'"):
        read_parameters({**texts, "shadow_seed": "1.5"})
    with pytest.raises(ValueError, match=r"missing \['guard_alpha'\], unknown \['guard_beta'\]"):
        encode_parameters({**{k: v for k, v in values.items() if k != "guard_alpha"}, "guard_beta": 0.1})


def test_a_hand_edited_bls_parameter_fails_the_load_naming_it(build_dir, tmp_path):
    """On the real server: a littlebig config whose shadow_seed is not an int stops littlebig from loading, and
    the server log says which parameter and why; no process is left behind (``own_server``)."""
    from littlebig.model_repository.server import ServerError
    from tests.helpers import own_server

    def bad_seed(repo):
        config = repo / "littlebig" / "config.pbtxt"
        edited, n = re.subn(r'(key: "shadow_seed"\s*value \{\s*string_value: )"[^"]*"', r'\1"1.5"', config.read_text())
        assert n == 1
        config.write_text(edited)

    with pytest.raises(ServerError), own_server(build_dir, tmp_path, edit=bad_seed):
        pass
    log = (tmp_path / "tritonserver.log").read_text()
    assert "littlebig's config.pbtxt: parameter 'shadow_seed' must be int, got '1.5'" in log, log[-2000:]
