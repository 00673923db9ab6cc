"""One generator for every deployment profile of the littlebig model repository.

Every config.pbtxt is built as Triton's own ``ModelConfig`` protobuf, written with ``text_format``
and parsed back before it counts as written. Profiles (a registry) differ only in how little and big
are served: ``cpu`` runs the ONNX files in Python-backend onnxruntime models on the embedded Triton,
``gpu`` uses Triton's ``onnxruntime_onnx`` or ``tensorrt_plan`` backends on KIND_GPU instances (an NGC
image). The ``littlebig`` BLS model is the same in both.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from littlebig import decision
from littlebig.export.pipeline import ROLES, export_dir, read_calibration, read_export

SOURCES = Path(__file__).resolve().parent
BLS_NAME = "littlebig"
LABELS_FILE = "labels.txt"
ON_BIG_FAILURE = ("error", "little")


@dataclass(frozen=True)
class ServeOptions:
    """What a deployment tunes; the defaults are the measured CPU settings (see BENCHMARKS.md)."""

    max_batch_size: int = 64  # littlebig and little
    big_max_batch_size: int = 32
    queue_delay_us: int = 100  # 500 -> 100: same throughput, -7.5% latency at concurrency 1 (BENCHMARKS.md)
    little_instances: int = 1
    big_instances: int = 1
    bls_instances: int = 2
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    bls_timeout_ms: int = 10000  # a hung model holds a BLS instance this long, at most
    on_big_failure: str = "error"
    rule: str | None = None  # None: calibration's serve_rule
    threshold: float | None = None  # overrides the calibrated T
    use_plans: bool = True  # gpu: tensorrt_plan where a plan was built
    trt_accelerator: bool = False  # gpu: TensorRT execution accelerator on onnxruntime
    extra: dict[str, str] = field(default_factory=dict)


def _preferred(max_batch: int) -> list[int]:
    return [b for b in (4, 8, 16, 32, 64, 128) if b <= max_batch] or [max_batch]


def _tensor(cls, name: str, dtype: int, dims: list[int], **kw):
    return cls(name=name, data_type=dtype, dims=dims, **kw)


def classifier_config(
    role: str, exported: dict[str, Any], max_batch: int, instances: int, queue_delay_us: int, kind: int
) -> mc.ModelConfig:
    """little or big: IMAGE uint8 [H, W, C] -> LOGITS fp32 [classes], dynamic batching."""
    h, w, c = exported["service_size"]
    return mc.ModelConfig(
        name=role,
        max_batch_size=max_batch,
        input=[_tensor(mc.ModelInput, "IMAGE", mc.TYPE_UINT8, [h, w, c])],
        output=[_tensor(mc.ModelOutput, "LOGITS", mc.TYPE_FP32, [len(exported["class_names"])])],
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=_preferred(max_batch), max_queue_delay_microseconds=queue_delay_us
        ),
        instance_group=[mc.ModelInstanceGroup(count=instances, kind=kind)],
    )


def _params(values: dict[str, Any]) -> dict[str, mc.ModelParameter]:
    return {k: mc.ModelParameter(string_value=str(v)) for k, v in values.items()}


def bls_config(exported: dict[str, Any], threshold: float, rule: str, opts: ServeOptions) -> mc.ModelConfig:
    """The cascade: IMAGE -> LABEL, PROBS (with class names), ESCALATED, DEGRADED."""
    h, w, c = exported["service_size"]
    return mc.ModelConfig(
        name=BLS_NAME,
        backend="python",
        max_batch_size=opts.max_batch_size,
        input=[_tensor(mc.ModelInput, "IMAGE", mc.TYPE_UINT8, [h, w, c])],
        output=[
            _tensor(mc.ModelOutput, "LABEL", mc.TYPE_INT64, [1]),
            _tensor(mc.ModelOutput, "PROBS", mc.TYPE_FP32, [len(exported["class_names"])], label_filename=LABELS_FILE),
            _tensor(mc.ModelOutput, "ESCALATED", mc.TYPE_BOOL, [1]),
            _tensor(mc.ModelOutput, "DEGRADED", mc.TYPE_BOOL, [1]),
        ],
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=_preferred(opts.max_batch_size), max_queue_delay_microseconds=opts.queue_delay_us
        ),
        instance_group=[mc.ModelInstanceGroup(count=opts.bls_instances, kind=mc.ModelInstanceGroup.KIND_CPU)],
        parameters=_params(
            {
                "threshold": repr(threshold),
                "rule": rule,
                "little_model": "little",
                "big_model": "big",
                "little_max_batch_size": opts.max_batch_size,
                "big_max_batch_size": opts.big_max_batch_size,
                "bls_timeout_ms": opts.bls_timeout_ms,
                "on_big_failure": opts.on_big_failure,
                "class_names": json.dumps(exported["class_names"]),
                **opts.extra,
            }
        ),
    )


def write_config(config: mc.ModelConfig, model_dir: Path) -> Path:
    """Write config.pbtxt and prove it parses back to the same message."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.pbtxt"
    path.write_text(text_format.MessageToString(config))
    parsed = text_format.Parse(path.read_text(), mc.ModelConfig())
    if parsed != config:
        raise RuntimeError(f"{path} does not parse back to the config that was written")
    return path


def _install_onnx(src: Path, model_dir: Path) -> None:
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, model_dir / "1" / "model.onnx")


def cpu_classifier(role: str, exported: dict[str, Any], build: Path, out: Path, opts: ServeOptions) -> None:
    """Python-backend onnxruntime model (the embedded Triton has no onnxruntime backend)."""
    max_batch = opts.max_batch_size if role == "little" else opts.big_max_batch_size
    instances = opts.little_instances if role == "little" else opts.big_instances
    config = classifier_config(
        role, exported, max_batch, instances, opts.queue_delay_us, mc.ModelInstanceGroup.KIND_CPU
    )
    config.backend = "python"
    for key, value in _params(
        {"intra_op_threads": opts.intra_op_threads, "inter_op_threads": opts.inter_op_threads}
    ).items():
        config.parameters[key].CopyFrom(value)
    model_dir = out / role
    _install_onnx(export_dir(build) / exported[role]["onnx"], model_dir)
    shutil.copy2(SOURCES / "onnx_classifier" / "model.py", model_dir / "1" / "model.py")
    write_config(config, model_dir)


def gpu_classifier(role: str, exported: dict[str, Any], build: Path, out: Path, opts: ServeOptions) -> None:
    """Triton's TensorRT backend where a plan exists, else its onnxruntime backend, on KIND_GPU."""
    max_batch = opts.max_batch_size if role == "little" else opts.big_max_batch_size
    instances = opts.little_instances if role == "little" else opts.big_instances
    config = classifier_config(
        role, exported, max_batch, instances, opts.queue_delay_us, mc.ModelInstanceGroup.KIND_GPU
    )
    model_dir = out / role
    plan = export_dir(build) / f"{role}.plan"
    if serves_plans(build, opts):
        config.platform, config.default_model_filename = "tensorrt_plan", "model.plan"
        (model_dir / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy2(plan, model_dir / "1" / "model.plan")
    else:
        config.platform, config.backend, config.default_model_filename = "onnxruntime_onnx", "onnxruntime", "model.onnx"
        _install_onnx(export_dir(build) / exported[role]["onnx"], model_dir)
        if opts.trt_accelerator:
            accel = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            accel.parameters.update({"precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30)})
    write_config(config, model_dir)


PROFILES: dict[str, Callable[[str, dict[str, Any], Path, Path, ServeOptions], None]] = {
    "cpu": cpu_classifier,
    "gpu": gpu_classifier,
}


def serves_plans(build: Path, opts: ServeOptions) -> bool:
    """The gpu profile serves TensorRT plans only when both were built (and calibrated) together."""
    return opts.use_plans and all((export_dir(build) / f"{role}.plan").exists() for role in ROLES)


def served_threshold(build: Path, opts: ServeOptions, plans: bool = False) -> tuple[float, str]:
    """The calibrated T of the chosen rule (or the override), validated by the shared rule.

    Served plans get the T calibrated on the plans' own val outputs (``littlebig export --tensorrt``):
    an FP16 plan's confidences differ from the FP32 ONNX ones the default calibration saw.
    """
    calibration = read_calibration(build)
    if plans:
        trt = export_dir(build) / "tensorrt.json"
        if not trt.exists():
            raise FileNotFoundError(
                f"{trt} not found: plans without their calibration; rerun `littlebig export "
                "--tensorrt` or pass use_plans=False"
            )
        calibration = {**calibration, "rules": json.loads(trt.read_text())["calibration"]["rules"]}
    rule = opts.rule or calibration["serve_rule"]
    if opts.threshold is not None:
        return decision.check_threshold(opts.threshold), "override"
    if rule not in calibration["rules"]:
        raise ValueError(f"rule {rule!r} was not calibrated; calibrated: {sorted(calibration['rules'])}")
    return decision.check_threshold(calibration["rules"][rule]["threshold"]), rule


def generate(build: Path, out: Path, profile: str = "cpu", opts: ServeOptions | None = None) -> dict[str, Any]:
    """Write the whole repository for ``profile`` into ``out`` (replacing it) and return a summary."""
    opts = opts or ServeOptions()
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {sorted(PROFILES)}")
    if opts.on_big_failure not in ON_BIG_FAILURE:
        raise ValueError(f"on_big_failure must be one of {ON_BIG_FAILURE}, got {opts.on_big_failure!r}")
    if opts.big_max_batch_size < 1 or opts.max_batch_size < 1:
        raise ValueError("max batch sizes must be >= 1")
    exported = read_export(build)
    plans = profile == "gpu" and serves_plans(build, opts)
    threshold, rule = served_threshold(build, opts, plans)
    if out.exists():
        shutil.rmtree(out)
    for role in ROLES:
        PROFILES[profile](role, exported, build, out, opts)
    bls_dir = out / BLS_NAME
    write_config(bls_config(exported, threshold, rule, opts), bls_dir)
    (bls_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(SOURCES / "littlebig" / "model.py", bls_dir / "1" / "model.py")
    shutil.copy2(Path(decision.__file__), bls_dir / "1" / "decision.py")
    (bls_dir / LABELS_FILE).write_text("\n".join(exported["class_names"]) + "\n")
    summary = {
        "profile": profile,
        "threshold": threshold,
        "rule": rule,
        "tensorrt_plans": plans,
        "models": [*ROLES, BLS_NAME],
        "service_size": exported["service_size"],
        "class_names": exported["class_names"],
        "options": {k: v for k, v in vars(opts).items() if k != "extra"},
    }
    (out / "littlebig-repository.json").write_text(json.dumps(summary, indent=2))
    return summary
