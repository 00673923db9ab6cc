"""Every GPU-profile setting of the generator, checked on the generated configs.

Nothing here needs a GPU: the configs are parsed back as Triton's ModelConfig and their fields checked;
TensorRT plans are placeholders (the generator only copies them) with the tensorrt.json that
``littlebig export --tensorrt`` writes. Which Triton source or doc each setting rests on is cited in
model_repository/generate.py's docstring.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from littlebig.decision import ROLES
from littlebig.export import tensorrt as lbtrt
from littlebig.model_repository.generate import PROFILES, ServeOptions, generate
from tests.helpers import read_config

ROOT = Path(__file__).resolve().parents[1]
TRT_CACHE_VOLUME = "/trt-cache"  # where deploy/docker-compose.yml and deploy/k8s/deployment.yaml mount it


@pytest.fixture()
def build(build_dir, tmp_path) -> Path:
    """A private copy of the export and calibration (plans and tensorrt.json are added to it)."""
    dst = tmp_path / "build"
    (dst / "export").mkdir(parents=True)
    shutil.copy2(build_dir / "calibration.json", dst / "calibration.json")
    for f in (build_dir / "export").iterdir():
        if f.suffix in (".json", ".onnx", ".data") or (f.name.startswith("logits-") and "plan" not in f.name):
            shutil.copy2(f, dst / "export" / f.name)
    return dst


def fake_plan_logits(build: Path, split: str) -> dict[str, np.ndarray]:
    """What FP16 plans might give on a split: ONNX's logits, little's flattened (less confident), both jittered.

    Different enough that every figure derived from val (T, T_min, governor steps, drift reference) moves."""
    from littlebig.export.pipeline import reference_logits

    onnx_logits = reference_logits(build, split)
    rng = np.random.default_rng(21)
    return {
        "labels": onnx_logits["labels"],
        "little": (0.7 * onnx_logits["little"] + rng.normal(0, 0.05, onnx_logits["little"].shape)).astype(np.float32),
        "big": (onnx_logits["big"] + rng.normal(0, 0.05, onnx_logits["big"].shape)).astype(np.float32),
    }


def add_plans(build: Path, precision: str = "fp16", little_max: int = 64, big_max: int = 32) -> dict:
    """Placeholder plans and what a plan build leaves beside them: tensorrt.json (per-role profiles, GPU, and the
    calibration on the plans' val logits, every rule calibration.json has) and the cached plan logits."""
    from littlebig.export.calibrate import Outputs, calibrate

    size = json.loads((build / "export" / "export.json").read_text())["service_size"]
    gpu = {"name": "NVIDIA H100 80GB HBM3", "product_label": "NVIDIA-H100-80GB-HBM3"}
    record = {"precision": precision, "gpu": gpu}
    for role, hi in (("little", little_max), ("big", big_max)):
        (build / "export" / f"{role}.plan").write_bytes(b"plan placeholder")
        record[role] = {"profile": [list(s) for s in lbtrt.profile_shapes(size, hi, max(1, hi // 4))]}
    val = fake_plan_logits(build, "val")
    np.savez(build / "export" / "logits-plan-val.npz", **val)  # written after the plans: the cache is fresh
    rules = tuple(json.loads((build / "calibration.json").read_text())["rules"])
    record["calibration"] = {"rules": calibrate(Outputs(val["little"], val["big"], val["labels"]), rules)}
    (build / "export" / "tensorrt.json").write_text(json.dumps(record))
    return record


def test_serve_options_extra_is_gone():
    assert "extra" not in {f.name for f in dataclasses.fields(ServeOptions)}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_little_and_big_drop_expired_work_on_every_profile(build, tmp_path, profile):
    opts = ServeOptions(standin_device="cpu")
    summary = generate(build, tmp_path / "r", profile, opts)
    bls = read_config(tmp_path / "r" / "littlebig")
    bls_timeout_us = int(bls.parameters["bls_timeout_ms"].string_value) * 1000
    for role in ROLES:
        policy = read_config(tmp_path / "r" / role).dynamic_batching.default_queue_policy
        assert policy.timeout_action == mc.ModelQueuePolicy.REJECT
        assert policy.allow_timeout_override
        # the BLS call's timeout (its request timeout) must be allowed through: Triton takes it only if shorter
        assert policy.default_timeout_microseconds == opts.bls_timeout_ms * 1000 == bls_timeout_us > 0
    assert summary["queue_timeout_us"] == bls_timeout_us
    r = generate(build, tmp_path / "r2", profile, ServeOptions(bls_timeout_ms=2500, standin_device="cpu"))
    assert r["queue_timeout_us"] == 2_500_000
    policy = read_config(tmp_path / "r2" / "big").dynamic_batching.default_queue_policy
    assert policy.default_timeout_microseconds == 2_500_000


def test_a_queue_timeout_shorter_than_the_bls_timeout_is_refused(build, tmp_path):
    with pytest.raises(ValueError, match=r"queue_timeout_us \(5000\) must be >= the BLS timeout \(10000000 us"):
        generate(build, tmp_path / "r", "cpu", ServeOptions(queue_timeout_us=5000))
    generate(build, tmp_path / "r", "cpu", ServeOptions(queue_timeout_us=20_000_000))
    policy = read_config(tmp_path / "r" / "little").dynamic_batching.default_queue_policy
    assert policy.default_timeout_microseconds == 20_000_000


def test_gpu_onnxruntime_no_preferred_batch_heuristic_cudnn_and_warmup(build, tmp_path):
    generate(build, tmp_path / "gpu", "gpu")
    p = json.loads((build / "calibration.json").read_text())
    p = p["rules"][p["serve_rule"]]["escalation_rate"]
    typical = lbtrt.typical_batches(64, 32, p)
    for role, max_batch in (("little", 64), ("big", 32)):
        cfg = read_config(tmp_path / "gpu" / role)
        assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == max_batch
        assert list(cfg.dynamic_batching.preferred_batch_size) == []  # Triton: not for most models
        assert cfg.parameters["cudnn_conv_algo_search"].string_value == "1"  # HEURISTIC
        assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator
        warm = sorted(w.batch_size for w in cfg.model_warmup)
        assert warm == sorted({1, typical[role], max_batch})
        for w in cfg.model_warmup:
            assert w.inputs["IMAGE"].zero_data and w.inputs["IMAGE"].data_type == mc.TYPE_UINT8
    assert typical["big"] < 32 and typical["little"] < 64  # opt is the typical batch, not the max
    # the BLS model on a GPU profile: no preferred sizes either; the cpu profile keeps its measured ones
    assert not read_config(tmp_path / "gpu" / "littlebig").dynamic_batching.preferred_batch_size
    generate(build, tmp_path / "cpu", "cpu")
    assert read_config(tmp_path / "cpu" / "little").dynamic_batching.preferred_batch_size


def test_trt_accelerator_profiles_cache_warmup_and_cast_first_graph(build, tmp_path):
    from littlebig.export.onnx_export import onnx_session

    generate(build, tmp_path / "r", "gpu", ServeOptions(trt_accelerator=True, big_max_batch_size=24))
    size = json.loads((build / "export" / "export.json").read_text())["service_size"]
    dims = "x".join(map(str, size))
    for role, max_batch in (("little", 64), ("big", 24)):
        cfg = read_config(tmp_path / "r" / role)
        (accel,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        params = dict(accel.parameters)
        assert accel.name == "tensorrt" and params["precision_mode"] == "FP32"
        assert params["trt_profile_min_shapes"] == f"IMAGE:1x{dims}"
        assert params["trt_profile_max_shapes"] == f"IMAGE:{max_batch}x{dims}"  # big: never more than it is sent
        opt = int(params["trt_profile_opt_shapes"].split(":")[1].split("x")[0])
        assert 1 <= opt < max_batch
        assert params["trt_engine_cache_enable"] == "true"
        # one directory that exists before Triton starts (the deploy files' volume; onnxruntime 1.19 would create
        # only its last level, and two instances would race on it), the roles told apart by the prefix
        assert params["trt_engine_cache_path"] == ServeOptions().trt_cache_dir == TRT_CACHE_VOLUME
        assert params["trt_engine_cache_prefix"] == role
        assert sorted(w.batch_size for w in cfg.model_warmup) == sorted({1, opt, max_batch})
        # the served graph is the Cast-first one, and gives the original's logits exactly
        served = tmp_path / "r" / role / "1" / "model.onnx"
        graph = onnx.load(str(served)).graph
        assert graph.node[0].op_type == "Cast" and graph.node[0].input[0] == "IMAGE"
        images = np.random.default_rng(1).integers(0, 256, size=(3, *size), dtype=np.uint8)
        original = onnx_session(build / "export" / f"{role}.onnx").run(["LOGITS"], {"IMAGE": images})[0]
        assert np.array_equal(onnx_session(served).run(["LOGITS"], {"IMAGE": images})[0], original)


def test_the_engine_cache_directory_is_a_volume_in_both_deploy_files():
    """The accelerator's cache path exists before Triton starts: a volume at TRT_CACHE_VOLUME in compose and k8s."""
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    volumes = compose["services"]["triton"]["volumes"]
    (cache,) = [v for v in volumes if v.split(":")[1] == TRT_CACHE_VOLUME]
    assert cache.split(":")[0] in compose["volumes"]  # a named volume: engines survive a container restart
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text()) if d]
    (pod,) = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == TRT_CACHE_VOLUME]
    assert not mount.get("readOnly") and "emptyDir" in {v["name"]: v for v in pod["volumes"]}[mount["name"]]


def test_plans_take_t_min_governor_steps_and_drift_reference_from_their_own_val_logits(build, tmp_path):
    """Served plans (and the FP16 accelerator) get T from the plans' val logits, and so must
    T_min, the governor's steps and the drift alerts' reference, not the FP32 ONNX val logits."""
    from littlebig.decision import confidence, escalate, softmax
    from littlebig.export.calibrate import Outputs, governor_levels, threshold_floor
    from littlebig.export.pipeline import outputs

    record = add_plans(build)
    plan = fake_plan_logits(build, "val")
    plan_val = Outputs(plan["little"], plan["big"], plan["labels"])
    onnx_val = outputs(build, "val")
    for name, opts in (("plans", ServeOptions()), ("fp16 accelerator", fp16_accelerator())):
        summary = generate(build, tmp_path / name, "gpu", opts)
        t = summary["threshold"]
        assert summary["tensorrt_plans"] == (name == "plans") and summary["val_logits"] == "tensorrt"
        assert t == record["calibration"]["rules"][summary["rule"]]["threshold"]
        recorded = record["calibration"]["rules"][summary["rule"]]
        assert summary["t_min"] == threshold_floor(plan_val, t) == recorded["t_min"]
        assert summary["t_min"] != threshold_floor(onnx_val, t)  # the ONNX figures differ: the test can tell
        assert summary["governor_thresholds"] == governor_levels(plan_val, t, summary["t_min"])
        reference = summary["drift_reference"]
        conf = confidence(softmax(plan["little"]))
        assert reference["rows"] == len(plan["labels"])
        assert reference["escalation_rate"] == float(escalate(conf, t).mean())
        assert reference["escalation_rate"] != float(escalate(confidence(softmax(onnx_val.little_logits)), t).mean())
        params = read_config(tmp_path / name / "littlebig").parameters  # what the BLS model is given
        assert float(params["t_min"].string_value) == summary["t_min"]
        assert float(params["calibrated_escalation_rate"].string_value) == reference["escalation_rate"]
    # FP32 onnxruntime (no plans served) keeps the ONNX val logits for all of it
    onnx = generate(build, tmp_path / "onnx", "gpu", ServeOptions(use_plans=False))
    assert onnx["val_logits"] == "onnx" and onnx["t_min"] == threshold_floor(onnx_val, onnx["threshold"])


def test_a_stale_plan_logits_cache_is_refused(build, tmp_path):
    record = add_plans(build)
    rule = json.loads((build / "calibration.json").read_text())["serve_rule"]
    record["calibration"]["rules"][rule]["t_min"] = 0.123  # what other logits would have given
    (build / "export" / "tensorrt.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="T_min .* differs from the 0.123 tensorrt.json recorded"):
        generate(build, tmp_path / "r", "gpu")
    add_plans(build)
    (build / "export" / "logits-plan-val.npz").unlink()
    with pytest.raises(FileNotFoundError, match="logits-plan-val.npz is missing or older than the plans"):
        generate(build, tmp_path / "r", "gpu")


def fp16_accelerator() -> ServeOptions:
    return ServeOptions(trt_accelerator=True, trt_precision="fp16", use_plans=False)


def test_fp16_accelerator_serves_only_a_t_calibrated_on_fp16_outputs(build, tmp_path):
    fp16 = ServeOptions(trt_accelerator=True, trt_precision="fp16", use_plans=False)
    with pytest.raises(ValueError, match="needs a threshold calibrated on FP16 TensorRT outputs.*does not exist"):
        generate(build, tmp_path / "r", "gpu", fp16)
    add_plans(build, precision="fp32")
    with pytest.raises(ValueError, match="holds fp32 plans"):
        generate(build, tmp_path / "r", "gpu", fp16)
    record = add_plans(build, precision="fp16")
    summary = generate(build, tmp_path / "r", "gpu", fp16)
    assert not summary["tensorrt_plans"]
    assert summary["threshold"] == record["calibration"]["rules"][summary["rule"]]["threshold"]
    (accel,) = read_config(tmp_path / "r" / "big").optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.parameters["precision_mode"] == "FP16"
    # FP32 mode keeps the ONNX (FP32) calibration
    onnx_t = json.loads((build / "calibration.json").read_text())["rules"]
    fp32 = generate(build, tmp_path / "r32", "gpu", ServeOptions(trt_accelerator=True, use_plans=False))
    assert fp32["threshold"] == onnx_t[fp32["rule"]]["threshold"]
    with pytest.raises(ValueError, match="trt_precision"):
        generate(build, tmp_path / "r", "gpu", ServeOptions(trt_precision="int8"))


def test_generator_refuses_a_batch_above_a_plan_profile(build, tmp_path):
    add_plans(build, little_max=64, big_max=32)
    summary = generate(build, tmp_path / "ok", "gpu")
    assert summary["tensorrt_plans"] and summary["gpu_product"] == "NVIDIA-H100-80GB-HBM3"
    for role, max_batch in (("little", 64), ("big", 32)):
        cfg = read_config(tmp_path / "ok" / role)
        assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == max_batch
        assert not cfg.dynamic_batching.preferred_batch_size  # one profile per plan
        assert sorted(w.batch_size for w in cfg.model_warmup) == sorted({1, max_batch // 4, max_batch})
    with pytest.raises(ValueError, match=r"little: max_batch_size 128 exceeds its TensorRT plan's profile max 64"):
        generate(build, tmp_path / "r", "gpu", ServeOptions(max_batch_size=128))
    with pytest.raises(ValueError, match=r"big: max_batch_size 64 exceeds .* max 32.*--big-max-batch-size 32"):
        generate(build, tmp_path / "r", "gpu", ServeOptions(big_max_batch_size=64))
    assert not (tmp_path / "r").exists()  # refused before anything was written
    generate(build, tmp_path / "small", "gpu", ServeOptions(max_batch_size=16, big_max_batch_size=8))
    # an older tensorrt.json without per-role profiles is refused, not guessed
    record = json.loads((build / "export" / "tensorrt.json").read_text())
    for role in ROLES:
        record[role].pop("profile")
    (build / "export" / "tensorrt.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="records no optimisation profile"):
        generate(build, tmp_path / "r", "gpu")


def test_plan_profiles_cover_what_each_model_is_sent():
    assert lbtrt.typical_batches(64, 32, 0.33) == {"little": 32, "big": 11}
    assert lbtrt.typical_batches(1, 1, 1.0) == {"little": 1, "big": 1}
    assert lbtrt.typical_batches(64, 8, 1.0)["big"] == 8
    with pytest.raises(ValueError, match="escalation rate"):
        lbtrt.typical_batches(64, 32, 1.5)
    lo, opt, hi = lbtrt.profile_shapes((28, 28, 1), 32, 11)
    assert (lo[0], opt[0], hi[0]) == (1, 11, 32)
    with pytest.raises(ValueError, match="opt batch size"):
        lbtrt.profile_shapes((28, 28, 1), 32, 33)
    assert lbtrt.shapes_option((1, 28, 28, 1)) == "IMAGE:1x28x28x1"
    assert lbtrt.gpu_product_label("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"


def test_plan_batches_give_big_its_own_smaller_profile(build):
    batches = lbtrt.plan_batches(build, 64, None)
    assert batches["little"][1] == 64 and batches["big"][1] == ServeOptions().big_max_batch_size == 32
    assert batches["big"][0] < batches["big"][1] and batches["little"][0] < 64
    assert lbtrt.plan_batches(build, 16, None)["big"][1] == 16
    assert lbtrt.plan_batches(build, 64, 48)["big"][1] == 48


def test_deployment_selects_the_gpu_product_the_plans_were_built_on():
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text()) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    selector = deployment["spec"]["template"]["spec"]["nodeSelector"]
    assert selector.get("nvidia.com/gpu.product"), "plans run only on the GPU model they were built on"
    built = ROOT / "build" / "export" / "tensorrt.json"
    if built.exists():  # plans were built here: the manifest must select their GPU
        assert selector["nvidia.com/gpu.product"] == json.loads(built.read_text())["gpu"]["product_label"]


def without_queue_policy(edit):
    """``edit``, then big's config without its queue policy (what an older generator wrote)."""

    def both(repo: Path) -> None:
        edit(repo)
        config = read_config(repo / "big")
        config.dynamic_batching.ClearField("default_queue_policy")
        extra = (repo / "big" / "config.pbtxt").read_text().split("parameters {")[-1]  # hang_big's parameter
        (repo / "big" / "config.pbtxt").write_text(text_format.MessageToString(config))
        assert "hang_s" in extra and "hang_s" in (repo / "big" / "config.pbtxt").read_text()

    return both


@pytest.mark.slow
@pytest.mark.parametrize("policy", [True, False], ids=["queue-policy", "without-it"])
def test_queued_work_of_a_timed_out_bls_call_is_dropped_not_run(build_dir, tmp_path, policy):
    """On the real server (cpu profile): big busy for 3 s; a second escalated request's call to big waits in
    big's queue past the BLS timeout (1 s). The queue policy REJECTs it, so big executes once; without the
    policy (the control) big still runs the abandoned work afterwards, twice in all."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as grpcclient

    from littlebig.data import load_split
    from littlebig.export.pipeline import read_export
    from tests.helpers import hang_big, infer, own_server

    exported = read_export(build_dir)
    images = load_split("test", exported["data_dir"], tuple(exported["service_size"])).images[:1]
    edit = hang_big(3) if policy else without_queue_policy(hang_big(3))
    # big_instances=1: B must queue behind A on the one big instance (a second would run it at once)
    with own_server(build_dir, tmp_path, ServeOptions(bls_timeout_ms=1000, big_instances=1), edit) as server:
        url = f"127.0.0.1:{server.ports.grpc}"
        client = grpcclient.InferenceServerClient(url)
        # big's model warm-up ran at load and counts in its statistics: count only what the requests cost
        warm = client.get_inference_statistics("big").model_stats[0].execution_count

        def escalated(delay: float) -> str:
            time.sleep(delay)
            try:
                infer(url, images, 1.0, timeout=10)
                return "answered"
            except Exception as exc:  # noqa: BLE001 - the outcome is the message
                return str(exc)

        start = time.monotonic()
        with ThreadPoolExecutor(2) as pool:  # A runs on big; B arrives while A runs, so it queues
            outcomes = list(pool.map(escalated, (0.0, 0.5)))
        assert all("big" in o and "UNAVAILABLE" in o for o in outcomes), outcomes
        time.sleep(max(0.0, 7.5 - (time.monotonic() - start)))  # long after A's 3 s, and a second run's
        ran = client.get_inference_statistics("big").model_stats[0].execution_count - warm
        client.close()
    assert ran == (1 if policy else 2), f"big ran {ran} times"
