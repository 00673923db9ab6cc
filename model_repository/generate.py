"""One generator for every deployment profile of the littlebig model repository.

Every config.pbtxt is built as Triton's own ``ModelConfig`` protobuf, written with ``text_format``
and parsed back before it counts as written. Profiles (a registry) differ only in how little and big
are served: ``cpu`` runs the ONNX files in Python-backend onnxruntime models on the embedded Triton,
``gpu`` uses Triton's ``onnxruntime_onnx`` or ``tensorrt_plan`` backends on KIND_GPU instances (an NGC
image), and ``gpu-standin`` is a STAND-IN for those two backends: Python-backend models that run the
checkpoints with torch on a device (CUDA, or cpu in tests) and return LOGITS in that device's memory,
so the BLS path of a GPU server runs on the embedded Triton (``make gpu-check``). The ``littlebig`` BLS
model is the same in all three.

Sources each GPU setting rests on (Triton 24.10 = 2.51; read in the r24.10 branches):

* queue policy: server docs/user_guide/model_configuration.md "Queue Policy"; core
  ``PriorityQueue::PolicyQueue::Enqueue`` (scheduler_utils.cc) takes a request's own timeout only when
  ``allow_timeout_override`` is set and it is non-zero and *shorter* than ``default_timeout_microseconds``;
  python_backend README: ``InferenceRequest(timeout=...)`` is that request timeout, in microseconds.
* preferred_batch_size: model_configuration.md "Preferred batch sizes should not be used for most
  models ... An exception is TensorRT models that specify multiple optimization profiles".
* TensorRT plans: tensorrt_backend src/model_state.cc checks ``max_batch_size`` against the engine's
  profiles only inside ``AutoCompleteConfigHelper``, which ``--disable-auto-complete-config`` skips.
* onnxruntime: onnxruntime_backend src/onnxruntime.cc accepts the TensorRT accelerator parameters
  ``precision_mode``, ``max_workspace_size_bytes``, ``trt_engine_cache_enable``/``_path``/``_prefix``
  (r24.10 lines 520-535; any other key is refused, lines 677-683), ``trt_profile_min_shapes``/``_opt_shapes``/
  ``_max_shapes`` ("input:d1xd2...") and the model parameter ``cudnn_conv_algo_search`` (0 EXHAUSTIVE,
  the default, 1 HEURISTIC, 2 DEFAULT).
* TensorRT accelerator engine cache: Triton 24.10 runs onnxruntime 1.19.2
  (server r24.10 build.py line 76), whose TensorRT EP constructor (microsoft/onnxruntime,
  onnxruntime/core/providers/tensorrt/tensorrt_execution_provider.cc, ``TensorrtExecutionProvider::
  TensorrtExecutionProvider``: ``if (!cache_path_.empty() && !fs::is_directory(cache_path_)) { if
  (!fs::create_directory(cache_path_)) throw std::runtime_error("Failed to create directory " ...``; the
  same block in every version read, from the 1.16-era ones to those with ``trt_engine_cache_prefix``; the
  rel-1.19.2 line itself was not pinned: the repository was too large to fetch whole)
  creates only the last level of ``trt_engine_cache_path`` and throws when that fails: a missing parent
  fails the load, and two instances that both find no directory race (``create_directory`` returns false
  for the loser, which throws). So the path is one directory that exists before Triton starts (a volume
  in deploy/docker-compose.yml and deploy/k8s/deployment.yaml), shared by little and big, and the roles'
  engines are told apart by ``trt_engine_cache_prefix``.
* instance placement: model_configuration.md "Multiple Model Instances" (r24.10 lines 701-707): KIND_GPU without
  ``gpus`` places ``count`` instances on *each* visible GPU, so the gpu-standin instances are pinned to
  ``standin_gpus`` (GPU 0, where gpu-check's reference runs).
"""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from littlebig import decision
from littlebig.atomic import replacing_dir
from littlebig.control import encode_parameters
from littlebig.export.pipeline import (
    CALIBRATION_FILE,
    ROLES,
    SHADOW_CALIBRATION,
    SHADOW_RULE,
    Calibration,
    export_dir,
    read_calibration,
    read_export,
    read_tensorrt,
    stages_of,
)

SOURCES = Path(__file__).resolve().parent
BLS_NAME = decision.CASCADE
#: The littlebig modules the BLS model.py imports, installed beside it (numpy and the standard library only).
BLS_MODULES = ("control", "decision", "metrics", "shadow")
#: The encoded-image entry point (an ensemble: DECODE_NAME, then the BLS model) and its decoder.
ENCODED_NAME = "littlebig_encoded"
DECODE_NAME = "decode"
ENCODED_INPUT = "ENCODED"
#: cpu-side Pillow (default everywhere), or nvImageCodec on a GPU (gpu profile only; NOT RUN, see decode/model.py).
DECODERS = ("pillow", "nvimgcodec")
LABELS_FILE = "labels.txt"
#: What ``generate`` records in the repository's top folder: its profile, Ts, options (``prepare_repository``).
REPOSITORY_RECORD = "littlebig-repository.json"
ON_BIG_FAILURE = ("error", "little")
TRT_PRECISIONS = ("fp32", "fp16")


def parse_bool(text: str) -> bool:
    """A flag's true/false (also yes/no, 1/0); argparse reports anything else as an invalid value."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise ValueError(text)
    return value


#: How a deployment flag's text becomes its field's value, by the field's annotation.
FLAG_PARSERS: dict[str, Callable[[str], object]] = {"int": int, "float": float, "str": str, "bool": parse_bool}


def flag(help_text: str, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A field's metadata that makes it a deployment flag of ``littlebig repo|serve`` (``deployment_flags``)."""
    return {"flag": {"help": help_text, **({"choices": list(choices)} if choices else {})}}


@dataclass(frozen=True)
class ServeOptions:
    """What a deployment tunes; the defaults are the measured CPU settings (see BENCHMARKS.md).

    The one source of each option: its default, its check (``validate``), its Triton parameter name (the field
    name, in the generated configs) and, for the fields marked ``flag``, its command-line flag
    (``deployment_flags``)."""

    # littlebig and little
    max_batch_size: int = field(default=64, metadata=flag("littlebig's and little's max_batch_size"))
    big_max_batch_size: int = field(default=32, metadata=flag("big's max_batch_size (the BLS model chunks to it)"))
    # 100 us: make bench's best; 500 us batches no more rows and adds latency at concurrency 1, 0 us loses
    # throughput (BENCHMARKS.md, "Design alternatives")
    queue_delay_us: int = field(default=100, metadata=flag("dynamic batching max queue delay"))
    little_instances: int = field(default=1, metadata=flag("little's instance count"))
    # 2: make bench's best littlebig deployment; 1 loses 26-39% of the throughput (BENCHMARKS.md, the search table)
    big_instances: int = field(default=2, metadata=flag("big's instance count"))
    bls_instances: int = field(default=2, metadata=flag("littlebig's (BLS) instance count"))
    intra_op_threads: int = field(default=1, metadata=flag("onnxruntime threads per cpu-profile instance"))
    inter_op_threads: int = field(default=1, metadata=flag("onnxruntime inter-op threads per cpu-profile instance"))
    # a hung model holds a BLS instance this long, at most
    bls_timeout_ms: int = field(default=10000, metadata=flag("timeout of each BLS call to little/big"))
    on_big_failure: str = field(
        default="error",
        metadata=flag(
            "error (default): fail the affected requests; little: answer with little, DEGRADED", choices=ON_BIG_FAILURE
        ),
    )
    #: cpu profile: the BLS model runs little's ONNX itself (onnxruntime, intra/inter_op_threads) instead of a
    #: BLS call, saving one Python-backend hop per execute; little stays a Triton model for its own clients.
    #: None: yes on the cpu profile (make bench's best; calling the little model instead screens 0.75-0.86x,
    #: BENCHMARKS.md), no on the GPU profiles, where little runs on the GPU.
    little_in_process: bool | None = field(
        default=None,
        metadata=flag("true: littlebig runs little's ONNX itself (cpu default); false: through the little model"),
    )
    #: Load governor (the BLS model's ``Governor``): lower T under load to keep p99 latency under this SLO.
    #: None: off, the calibrated T is always served.
    slo_p99_ms: float | None = field(
        default=None,
        metadata=flag("load governor: lower T (not below T_min) while the predicted p99 passes it; off if absent"),
    )
    #: The governor's accuracy budget: it never goes below T_min, the lowest T whose val accuracy (and that of
    #: every T above it) is at most this far below the calibrated T's (export/calibrate.py threshold_floor).
    max_accuracy_drop: float = field(
        default=0.005, metadata=flag("load governor: T_min keeps val accuracy at most this far below the served T's")
    )
    # None: calibration's serve_rule
    rule: str | None = field(
        default=None, metadata=flag("calibrated rule whose T is served (default: calibration's serve_rule)")
    )
    #: Shadow sampling: a seeded share R of traffic rows is drawn; the drawn rows answered confidently
    #: also go to big after their response is built, and every drawn row is recorded (littlebig/shadow.py).
    #: 0: off. 0.01-0.05 is typical.
    shadow_rate: float = field(
        default=0.0,
        metadata=flag("shadow sampling: share R of rows drawn; confident ones also go to big, after the answer"),
    )
    shadow_seed: int = field(
        default=0, metadata=flag("shadow sampling: seed of the draw (with the BLS instance's name)")
    )
    #: Where each BLS instance writes its rotating shadow records. None: ``logs/`` beside the repository folder.
    shadow_log_dir: str | None = field(
        default=None,
        metadata=flag("shadow sampling: where the rotating records go (default: logs/ beside the repository)"),
    )
    #: The accuracy guard (littlebig/control.py ``Guard``): from the shadow rows, an anytime-valid test of "the cascade
    #: disagrees with big by more than guard_eps" raises T when it fires and lowers it only on evidence. Needs
    #: shadow sampling. Off: the served path is unchanged.
    guard: bool = field(
        default=False, metadata=flag("accuracy guard: raise T when shadow rows show disagreement with big > eps")
    )
    #: The guard's budget on the disagreement with big (an upper bound of the accuracy lost against it).
    #: None: calibration's eps.
    guard_eps: float | None = field(
        default=None, metadata=flag("accuracy guard: disagreement budget (default: calibration's eps)")
    )
    guard_alpha: float = field(
        default=0.05, metadata=flag("accuracy guard: level of its tests (chance of ever firing on traffic within eps)")
    )
    # overrides the calibrated T
    threshold: float | None = field(default=None, metadata=flag("serve this T instead of a calibrated one"))
    #: little/big queue policy: work queued longer than this is REJECTed instead of run. None: the BLS
    #: timeout. Must be >= it: Triton honours a request's own (the BLS call's) timeout only when shorter.
    queue_timeout_us: int | None = field(
        default=None, metadata=flag("little/big queue policy: reject work queued longer (default: the BLS timeout)")
    )
    use_plans: bool = True  # gpu: tensorrt_plan where a plan was built
    trt_accelerator: bool = False  # gpu: TensorRT execution accelerator on onnxruntime
    #: The accelerator's precision: fp16 only with a T calibrated on FP16 TensorRT outputs (fp16 plans'
    #: tensorrt.json); fp32 serves the ONNX-calibrated T.
    trt_precision: str = "fp32"
    #: Engine cache of the accelerator: a directory that exists and is writable in the container before Triton
    #: starts (the repository is read-only; onnxruntime creates only the last level of this path, racily):
    #: the ``trt-cache`` volume of deploy/docker-compose.yml and deploy/k8s/deployment.yaml. little and big
    #: share it; ``trt_engine_cache_prefix`` (the role) tells their engines apart.
    trt_cache_dir: str = "/trt-cache"
    #: onnxruntime's CUDA EP: 1 = HEURISTIC. The backend default, EXHAUSTIVE, benchmarks cuDNN algorithms
    #: for every new input shape, i.e. on every new batch size the dynamic batcher forms.
    cudnn_conv_algo_search: int = 1
    #: ``decode`` (the encoded entry point): files declaring more pixels are refused before decoding.
    max_image_pixels: int = field(
        default=50_000_000, metadata=flag("encoded entry point: refuse files declaring more pixels, before decoding")
    )
    #: ``decode``: threads decoding the rows of one execute, and Python instances. 4 x 1 was the best of five
    #: layouts at 600 px on 2 cores (+36% over 1 x 1; BENCHMARKS.md "Encoded images").
    decode_threads: int = field(
        default=4, metadata=flag("encoded entry point: threads decoding the rows of one execute")
    )
    decode_instances: int = field(default=1, metadata=flag("encoded entry point: decode model instances"))
    #: ``decode``'s library: pillow (every profile's default), or nvimgcodec (gpu profile, NOT RUN).
    decoder: str = field(
        default="pillow",
        metadata=flag("encoded entry point: pillow (default), or nvimgcodec (gpu profile; NOT RUN)", choices=DECODERS),
    )
    #: gpu-standin: the torch device of the stand-ins, and the batch buckets they pad to and warm up.
    standin_device: str = "cuda"
    standin_buckets: tuple[int, ...] = (1, 4, 16, 64)
    #: gpu-standin on CUDA: the GPUs the instances go on (KIND_GPU without ``gpus`` puts ``count`` on every GPU).
    standin_gpus: tuple[int, ...] = (0,)

    def validate(self, profile: str) -> ServeOptions:
        """Every option checked against its range and ``profile``, before anything is read or written; the
        result has the profile's defaults filled in. Errors name the option and its flag."""
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; known: {sorted(PROFILES)}")
        choices = {"on_big_failure": ON_BIG_FAILURE, "trt_precision": TRT_PRECISIONS, "decoder": DECODERS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{_flag(name)} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.big_max_batch_size < 1 or self.max_batch_size < 1:
            raise ValueError("max batch sizes must be >= 1 (--max-batch-size, --big-max-batch-size)")
        at_least = {
            "little_instances": 1, "big_instances": 1, "bls_instances": 1, "queue_delay_us": 0,
            "intra_op_threads": 0, "inter_op_threads": 0, "max_image_pixels": 1, "decode_threads": 1,
            "decode_instances": 1, "shadow_seed": 0,
        }  # fmt: skip
        for name, low in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{_flag(name)} must be an integer >= {low}, got {value!r}")
        check_queue_timeout(self)
        if not 0.0 <= self.shadow_rate <= 1.0:
            raise ValueError(f"{_flag('shadow_rate')} must be in [0, 1], got {self.shadow_rate!r}")
        if self.guard and self.shadow_rate <= 0:
            raise ValueError(f"{_flag('guard')} needs shadow sampling: give {_flag('shadow_rate')} > 0")
        if self.guard_eps is not None and not 0.0 < self.guard_eps < 1.0:
            raise ValueError(f"{_flag('guard_eps')} must be in (0, 1), got {self.guard_eps!r}")
        if not 0.0 < self.guard_alpha < 1.0:
            raise ValueError(f"{_flag('guard_alpha')} must be in (0, 1), got {self.guard_alpha!r}")
        if not 0.0 <= self.max_accuracy_drop < 1.0:
            raise ValueError(f"{_flag('max_accuracy_drop')} must be in [0, 1), got {self.max_accuracy_drop!r}")
        if self.slo_p99_ms is not None and not self.slo_p99_ms > 0:
            raise ValueError(
                f"{_flag('slo_p99_ms')} must be > 0 (or left out to turn the governor off), got {self.slo_p99_ms!r}"
            )
        if self.threshold is not None:
            try:
                decision.check_threshold(self.threshold)
            except ValueError as exc:
                raise ValueError(f"{_flag('threshold')}: {exc}") from None
        buckets = self.standin_buckets
        if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
            raise ValueError(f"standin_buckets must be positive integers, got {self.standin_buckets!r}")
        opts = self if self.little_in_process is not None else replace(self, little_in_process=profile == "cpu")
        if opts.little_in_process and profile != "cpu":
            raise ValueError("little_in_process runs little with onnxruntime on the CPU: cpu profile only")
        if opts.decoder != "pillow" and profile != "gpu":
            raise ValueError(f"decoder {opts.decoder} decodes on a GPU: gpu profile only (NOT RUN; decode/model.py)")
        return opts

    def queue_timeout(self) -> int:
        """little's and big's default queue timeout in microseconds."""
        return self.bls_timeout_ms * 1000 if self.queue_timeout_us is None else self.queue_timeout_us

    def role_max_batch(self, role: str) -> int:
        """little serves every row of a BLS execute (<= max_batch_size); big only chunks <= big_max_batch_size."""
        return self.max_batch_size if role == "little" else self.big_max_batch_size

    def role_instances(self, role: str) -> int:
        return self.little_instances if role == "little" else self.big_instances


def deployment_flags() -> dict[str, dict[str, Any]]:
    """ServeOptions field -> argparse keywords of its flag (type from the annotation, help, choices)."""
    out = {}
    for f in fields(ServeOptions):
        if "flag" in f.metadata:
            kind = str(f.type).split("|")[0].strip()
            out[f.name] = {"type": FLAG_PARSERS[kind], **f.metadata["flag"]}
    return out


def _flag(name: str) -> str:
    """An option as the API and the command line spell it: ``shadow_rate (--shadow-rate)``."""
    return f"{name} (--{name.replace('_', '-')})"


def _preferred(max_batch: int) -> list[int]:
    return [b for b in (4, 8, 16, 32, 64, 128) if b <= max_batch] or [max_batch]


def _tensor(cls, name: str, dtype: int, dims: list[int], **kw):
    return cls(name=name, data_type=dtype, dims=dims, **kw)


def queue_policy(opts: ServeOptions) -> mc.ModelQueuePolicy:
    """REJECT work queued past its timeout: a BLS call that gave up must not still be run.

    The BLS model passes its timeout as each call's request timeout; Triton uses it only when it is
    non-zero and shorter than the default (core scheduler_utils.cc, PolicyQueue::Enqueue), so the default
    must be at least the BLS timeout. The default also bounds direct clients of little and big.
    """
    return mc.ModelQueuePolicy(
        timeout_action=mc.ModelQueuePolicy.REJECT,
        default_timeout_microseconds=opts.queue_timeout(),
        allow_timeout_override=True,
    )


def classifier_config(
    role: str, exported: dict[str, Any], opts: ServeOptions, kind: int, preferred: bool
) -> mc.ModelConfig:
    """little or big: IMAGE uint8 [H, W, C] -> LOGITS fp32 [classes], dynamic batching with a queue policy.

    ``preferred``: preferred_batch_size (the cpu profile, as measured in BENCHMARKS.md). Triton's docs
    advise against it for most models, the exception being TensorRT models with several optimisation
    profiles; the GPU profiles have one profile per plan, so they leave it out.
    """
    h, w, c = exported["service_size"]
    max_batch = opts.role_max_batch(role)
    return mc.ModelConfig(
        name=role,
        max_batch_size=max_batch,
        input=[_tensor(mc.ModelInput, "IMAGE", mc.TYPE_UINT8, [h, w, c])],
        output=[_tensor(mc.ModelOutput, "LOGITS", mc.TYPE_FP32, [len(exported["class_names"])])],
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=_preferred(max_batch) if preferred else [],
            max_queue_delay_microseconds=opts.queue_delay_us,
            default_queue_policy=queue_policy(opts),
        ),
        instance_group=[mc.ModelInstanceGroup(count=opts.role_instances(role), kind=kind)],
    )


def warmup(exported: dict[str, Any], batch_sizes: list[int]) -> list[mc.ModelWarmup]:
    """One all-zero IMAGE warm-up per served batch size: engines, cuDNN plans and arenas exist before traffic."""
    h, w, c = exported["service_size"]
    image = mc.ModelWarmup.Input(data_type=mc.TYPE_UINT8, dims=[h, w, c], zero_data=True)
    return [mc.ModelWarmup(name=f"zeros_b{n}", batch_size=n, inputs={"IMAGE": image}) for n in batch_sizes]


def _params(values: dict[str, Any]) -> dict[str, mc.ModelParameter]:
    return {k: mc.ModelParameter(string_value=str(v)) for k, v in values.items()}


def bls_config(
    exported: dict[str, Any],
    thresholds: list[float],
    rule: str,
    opts: ServeOptions,
    governor: dict[str, Any],
    preferred: bool = True,
    eps: float = -1.0,
) -> mc.ModelConfig:
    """The cascade: IMAGE -> LABEL, PROBS (with class names), ESCALATED, DEGRADED, REASON, STAGE.

    ``thresholds``: T_1..T_{K-1}, one per transition between the K stages (one, T, for little and big).
    ``governor``: ``governor_settings`` (T_min, the T steps and the drift alerts' reference).
    ``eps``: calibration's accuracy-loss budget (the shadow loss alert's; -1: unknown, the alert stays blind).
    """
    reference = governor["reference"]
    stages = stages_of(exported)
    h, w, c = exported["service_size"]
    return mc.ModelConfig(
        name=BLS_NAME,
        backend="python",
        max_batch_size=opts.max_batch_size,
        input=[_tensor(mc.ModelInput, "IMAGE", mc.TYPE_UINT8, [h, w, c])],
        output=cascade_outputs(exported),
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=_preferred(opts.max_batch_size) if preferred else [],
            max_queue_delay_microseconds=opts.queue_delay_us,
        ),
        instance_group=[mc.ModelInstanceGroup(count=opts.bls_instances, kind=mc.ModelInstanceGroup.KIND_CPU)],
        parameters=_params(
            encode_parameters(
                {
                    "threshold": thresholds[-1],
                    "thresholds": thresholds,
                    "rule": rule,
                    "stage_models": list(stages),
                    "stage_max_batch_sizes": [opts.role_max_batch(s) for s in stages],
                    "bls_timeout_ms": opts.bls_timeout_ms,
                    "on_big_failure": opts.on_big_failure,
                    "class_names": exported["class_names"],
                    "little_in_process": opts.little_in_process,
                    "intra_op_threads": opts.intra_op_threads,
                    "inter_op_threads": opts.inter_op_threads,
                    "slo_p99_ms": opts.slo_p99_ms or 0,
                    "max_accuracy_drop": opts.max_accuracy_drop,
                    "t_min": governor["t_min"],
                    "governor_thresholds": governor["levels"],
                    "calibration_rows": reference["rows"],
                    "calibrated_escalation_rate": reference["escalation_rate"],
                    "calibrated_confidence_shares": reference["confidence_shares"],
                    "calibrated_eps": eps,
                    "shadow_rate": opts.shadow_rate,
                    "shadow_seed": opts.shadow_seed,
                    "shadow_log_dir": opts.shadow_log_dir or "",
                    "guard": opts.guard,
                    "guard_eps": opts.guard_eps if opts.guard_eps is not None else eps,
                    "guard_alpha": opts.guard_alpha,
                }
            )
        ),
    )


def cascade_outputs(exported: dict[str, Any]) -> list[mc.ModelOutput]:
    """littlebig's outputs; the encoded entry point answers with exactly these."""
    return [
        _tensor(mc.ModelOutput, "LABEL", mc.TYPE_INT64, [1]),
        _tensor(mc.ModelOutput, "PROBS", mc.TYPE_FP32, [len(exported["class_names"])], label_filename=LABELS_FILE),
        _tensor(mc.ModelOutput, "ESCALATED", mc.TYPE_BOOL, [1]),
        _tensor(mc.ModelOutput, "DEGRADED", mc.TYPE_BOOL, [1]),
        _tensor(mc.ModelOutput, "REASON", mc.TYPE_STRING, [1]),
        _tensor(mc.ModelOutput, "STAGE", mc.TYPE_STRING, [1]),
    ]


def decode_config(size: list[int], opts: ServeOptions, max_batch_size: int, kind: int) -> mc.ModelConfig:
    """``decode``: ENCODED BYTES [1] (one JPEG/PNG file per row) -> IMAGE uint8 [H, W, C] at the service size."""
    h, w, c = size
    return mc.ModelConfig(
        name=DECODE_NAME,
        backend="python",
        max_batch_size=max_batch_size,
        input=[_tensor(mc.ModelInput, ENCODED_INPUT, mc.TYPE_STRING, [1])],
        output=[_tensor(mc.ModelOutput, "IMAGE", mc.TYPE_UINT8, [h, w, c])],
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=opts.queue_delay_us),
        instance_group=[mc.ModelInstanceGroup(count=opts.decode_instances, kind=kind)],
        parameters=_params(
            {
                "max_image_pixels": opts.max_image_pixels,
                "decode_threads": opts.decode_threads,
                "decoder": opts.decoder,
                **(
                    {"not_run": "nvImageCodec decoder: written for GPU servers, never run"}
                    if opts.decoder == "nvimgcodec"
                    else {}
                ),
            }
        ),
    )


def ensemble_config(name: str, target: str, outputs: list[mc.ModelOutput], max_batch_size: int) -> mc.ModelConfig:
    """``name`` = ``decode`` then ``target`` (which takes IMAGE), answering with ``target``'s outputs.

    An ensemble, not an optional input of the BLS model: littlebig stays pixel-only, its contract unchanged, and a
    profile swaps the decoder without touching the cascade (README "Encoded images").
    """
    return mc.ModelConfig(
        name=name,
        platform="ensemble",
        max_batch_size=max_batch_size,
        input=[_tensor(mc.ModelInput, ENCODED_INPUT, mc.TYPE_STRING, [1])],
        output=outputs,
        ensemble_scheduling=mc.ModelEnsembling(
            step=[
                mc.ModelEnsembling.Step(
                    model_name=DECODE_NAME,
                    model_version=-1,
                    input_map={ENCODED_INPUT: ENCODED_INPUT},
                    output_map={"IMAGE": "decoded_image"},
                ),
                mc.ModelEnsembling.Step(
                    model_name=target,
                    model_version=-1,
                    input_map={"IMAGE": "decoded_image"},
                    output_map={o.name: o.name for o in outputs},
                ),
            ]
        ),
    )


def write_decoder(out: Path, size: list[int], opts: ServeOptions, max_batch_size: int, kind: int) -> Path:
    """The ``decode`` model: its config, model.py and the shared ``imaging.py`` (``fit_to_service``) beside it."""
    from littlebig import imaging

    model_dir = out / DECODE_NAME
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(SOURCES / "decode" / "model.py", model_dir / "1" / "model.py")
    shutil.copy2(Path(imaging.__file__), model_dir / "1" / "imaging.py")
    return write_config(decode_config(size, opts, max_batch_size, kind), model_dir)


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


def cpu_classifier(role: str, served: Served, build: Path, out: Path, opts: ServeOptions) -> None:
    """Python-backend onnxruntime model (the embedded Triton has no onnxruntime backend)."""
    exported = served.exported
    config = classifier_config(role, exported, opts, mc.ModelInstanceGroup.KIND_CPU, preferred=True)
    config.backend = "python"
    for key, value in _params(
        {"intra_op_threads": opts.intra_op_threads, "inter_op_threads": opts.inter_op_threads}
    ).items():
        config.parameters[key].CopyFrom(value)
    # Triton runs these before the model reports ready: onnxruntime's arenas exist before the first request.
    config.model_warmup.extend(warmup(exported, _warm_sizes(1, opts.role_max_batch(role))))
    model_dir = out / role
    _install_onnx(export_dir(build) / exported[role]["onnx"], model_dir)
    shutil.copy2(SOURCES / "onnx_classifier" / "model.py", model_dir / "1" / "model.py")
    write_config(config, model_dir)


def served_escalation_rate(build: Path, calibration: Calibration, opts: ServeOptions) -> float:
    """p of the served rule on val (big's typical batch follows from it)."""
    rate = calibration.rule(opts.rule if opts.rule in calibration.rules else None).escalation_rate
    if rate is None:
        raise ValueError(f"{build / CALIBRATION_FILE} records no escalation rate: rerun `littlebig calibrate`")
    return rate


def _warm_sizes(opt: int, max_batch: int) -> list[int]:
    return sorted({1, opt, max_batch})


def gpu_classifier(role: str, served: Served, build: Path, out: Path, opts: ServeOptions) -> None:
    """Triton's TensorRT backend where a plan exists, else its onnxruntime backend, on KIND_GPU."""
    from littlebig.export import tensorrt as lbtrt

    exported = served.exported
    config = classifier_config(role, exported, opts, mc.ModelInstanceGroup.KIND_GPU, preferred=False)
    model_dir = out / role
    max_batch = opts.role_max_batch(role)
    if serves_plans(build, opts):
        config.platform, config.default_model_filename = "tensorrt_plan", "model.plan"
        (model_dir / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy2(export_dir(build) / f"{role}.plan", model_dir / "1" / "model.plan")
        opt = lbtrt.plan_profiles(build)[role][1][0]  # generate() refused a max_batch_size above the profile
        config.model_warmup.extend(warmup(exported, _warm_sizes(min(opt, max_batch), max_batch)))
        write_config(config, model_dir)
        return
    config.platform, config.backend, config.default_model_filename = "onnxruntime_onnx", "onnxruntime", "model.onnx"
    # The CUDA EP (also the TensorRT accelerator's fallback for unsupported nodes): heuristic cuDNN
    # algorithm choice instead of an exhaustive benchmark for every new batch shape.
    config.parameters["cudnn_conv_algo_search"].CopyFrom(
        mc.ModelParameter(string_value=str(opts.cudnn_conv_algo_search))
    )
    p = served.escalation_rate
    opt = lbtrt.typical_batches(opts.max_batch_size, opts.big_max_batch_size, p)[role]
    if opts.trt_accelerator:
        # TensorRT needs a Cast right after the uint8 input: serve the Cast-first graph, proven identical.
        lbtrt.prepare_onnx(build, role, model_dir / "1" / "model.onnx")
        lo, mid, hi = lbtrt.profile_shapes(exported["service_size"], max_batch, opt)
        accel = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accel.parameters.update(
            {
                "precision_mode": opts.trt_precision.upper(),
                "max_workspace_size_bytes": str(lbtrt.WORKSPACE_BYTES),
                # one profile for every served batch: no engine rebuild per new batch size
                "trt_profile_min_shapes": lbtrt.shapes_option(lo),
                "trt_profile_opt_shapes": lbtrt.shapes_option(mid),
                "trt_profile_max_shapes": lbtrt.shapes_option(hi),
                # the repository is mounted read-only: engines go to a volume that exists before Triton
                # starts (onnxruntime would create only its last level, racing between instances); the
                # roles share it and are told apart by the prefix (module docstring)
                "trt_engine_cache_enable": "true",
                "trt_engine_cache_path": opts.trt_cache_dir.rstrip("/") or "/",
                "trt_engine_cache_prefix": role,
            }
        )
    else:
        _install_onnx(export_dir(build) / exported[role]["onnx"], model_dir)
    config.model_warmup.extend(warmup(exported, _warm_sizes(opt, max_batch)))
    write_config(config, model_dir)


def standin_buckets(opts: ServeOptions, role: str) -> list[int]:
    """The batch sizes a stand-in pads to: the configured buckets below the role's max, and the max."""
    max_batch = opts.role_max_batch(role)
    return sorted({b for b in opts.standin_buckets if 1 <= b < max_batch} | {max_batch})


def standin_classifier(role: str, served: Served, build: Path, out: Path, opts: ServeOptions) -> None:
    """STAND-IN for Triton's onnxruntime/TensorRT backends (not on PyPI): torch on the checkpoint, on a device.

    A Python-backend model on KIND_GPU (KIND_CPU when the device is cpu, for tests) whose LOGITS stay in
    the device's memory (``pb_utils.Tensor.from_dlpack``), as those backends leave them. It pads each batch
    to a bucket and warms every bucket up at load (torch eager plans cuDNN kernels per new shape).
    """
    exported = served.exported
    weights = Path(str(exported[role]["weights"]))
    if not weights.is_file():
        raise ValueError(f"gpu-standin serves littlebig checkpoints; {role}'s weights are {weights}, not a file")
    cuda = opts.standin_device.startswith("cuda")
    kind = mc.ModelInstanceGroup.KIND_GPU if cuda else mc.ModelInstanceGroup.KIND_CPU
    config = classifier_config(role, exported, opts, kind, preferred=False)
    if cuda:  # count instances on these GPUs only, not on every GPU of the host
        config.instance_group[0].gpus.extend(opts.standin_gpus)
    config.backend = "python"
    model_dir = out / role
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(weights, model_dir / "1" / "model.safetensors")
    shutil.copy2(SOURCES / "torch_classifier" / "model.py", model_dir / "1" / "model.py")
    for key, value in _params(
        {
            "device": "cuda" if cuda else opts.standin_device,  # KIND_GPU: the instance's own GPU
            "buckets": json.dumps(standin_buckets(opts, role)),
            "stand_in_for": "Triton's onnxruntime_onnx / tensorrt_plan backend (gpu profile)",
        }
    ).items():
        config.parameters[key].CopyFrom(value)
    write_config(config, model_dir)


#: profile -> how little and big are served; the BLS model is the same everywhere.
PROFILES: dict[str, Callable[[str, Served, Path, Path, ServeOptions], None]] = {
    "cpu": cpu_classifier,
    "gpu": gpu_classifier,
    "gpu-standin": standin_classifier,
}
#: Profiles that keep preferred_batch_size (measured so on the CPU); see classifier_config.
PREFERRED_BATCH_PROFILES = ("cpu",)


def check_queue_timeout(opts: ServeOptions) -> None:
    """The queue default must let the BLS timeout through (Triton takes a request timeout only if shorter)."""
    bls_us = opts.bls_timeout_ms * 1000
    if opts.bls_timeout_ms < 1 or opts.queue_timeout() < bls_us:
        raise ValueError(
            f"queue_timeout_us ({opts.queue_timeout()}) must be >= the BLS timeout ({bls_us} us, bls_timeout_ms "
            "> 0): Triton applies a request's timeout only when it is shorter than default_timeout_microseconds"
        )


def check_plan_profiles(build: Path, opts: ServeOptions) -> str | None:
    """Refuse a max_batch_size above a plan's profile; return the GPU product the plans were built on.

    With --disable-auto-complete-config (deploy/) the TensorRT backend never compares max_batch_size with
    the engine's profiles (it does so only while auto-completing), so the plan would load and then fail
    every batch larger than its profile at run time.
    """
    from littlebig.export.tensorrt import plan_profiles

    record = read_tensorrt(build) or {}
    for role, (_, _, hi) in plan_profiles(build).items():
        if opts.role_max_batch(role) > hi[0]:
            flag = "--max-batch-size" if role == "little" else "--big-max-batch-size"
            raise ValueError(
                f"{role}: max_batch_size {opts.role_max_batch(role)} exceeds its TensorRT plan's profile max "
                f"{hi[0]} (build/export/tensorrt.json); serve {flag} {hi[0]} or less, or rebuild the plans "
                "for the larger batch (`littlebig export --tensorrt`)"
            )
    return record.get("gpu", {}).get("product_label")


def check_fp16_calibration(build: Path) -> None:
    """An FP16 TensorRT accelerator needs a T calibrated on FP16 TensorRT outputs: the fp16 plans' tensorrt.json."""
    path = export_dir(build) / "tensorrt.json"
    precision = (read_tensorrt(build) or {}).get("precision")
    if precision != "fp16":
        raise ValueError(
            "trt_precision fp16 needs a threshold calibrated on FP16 TensorRT outputs, and "
            f"{path} {'holds ' + str(precision) + ' plans' if path.exists() else 'does not exist'}: build the "
            "fp16 plans (make tensorrt PRECISION=fp16, which calibrates on them) or serve trt_precision fp32"
        )


def serves_plans(build: Path, opts: ServeOptions) -> bool:
    """The gpu profile serves TensorRT plans only when both were built (and calibrated) together."""
    return opts.use_plans and all((export_dir(build) / f"{role}.plan").exists() for role in ROLES)


def served_thresholds(
    build: Path, opts: ServeOptions, plans: bool = False, calibration: Calibration | None = None
) -> tuple[list[float], str]:
    """T_1..T_{K-1} of the chosen rule (or the override, one value for every transition), validated by the
    shared rule. Two models: [T]. ``calibration``: the build's, where the caller has read it already.

    Served plans get the T calibrated on the plans' own val outputs (``littlebig export --tensorrt``):
    an FP16 plan's confidences differ from the FP32 ONNX ones the default calibration saw.
    """
    calibration = calibration or read_calibration(build)
    stages = len(calibration.stages)
    if plans:
        record = read_tensorrt(build)
        if record is None:
            raise FileNotFoundError(
                f"{export_dir(build) / 'tensorrt.json'} not found: plans without their calibration; rerun "
                "`littlebig export --tensorrt` or pass use_plans=False"
            )
        calibration = calibration.with_rules(record["calibration"]["rules"])
    rule = opts.rule or calibration.serve_rule
    if opts.threshold is not None:
        return [decision.check_threshold(opts.threshold)] * (stages - 1), "override"
    if rule == SHADOW_RULE:  # recalibrated on live shadow records (littlebig recalibrate --from-shadow)
        path = build / SHADOW_CALIBRATION
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `littlebig recalibrate --from-shadow DIR` first")
        calibration = calibration.with_rules({SHADOW_RULE: json.loads(path.read_text())})
    return [decision.check_threshold(t) for t in calibration.rule(rule).thresholds], rule


def served_threshold(build: Path, opts: ServeOptions, plans: bool = False) -> tuple[float, str]:
    """The served T in front of big (``served_thresholds``' last): the one the governor moves."""
    thresholds, rule = served_thresholds(build, opts, plans)
    return thresholds[-1], rule


def served_val_outputs(build: Path, tensorrt: bool):
    """The val outputs of the precision that is served: TensorRT's (plans, or the FP16 accelerator, whose T
    comes from the plans) from the plan build's cache ``logits-plan-val.npz``, else the ONNX ones."""
    from littlebig.export.calibrate import Outputs
    from littlebig.export.pipeline import outputs
    from littlebig.export.tensorrt import cached_plan_logits

    if not tensorrt:
        return outputs(build, "val")
    logits = cached_plan_logits(build, "val")
    return Outputs(logits["little"], logits["big"], logits["labels"])


def governor_settings(
    build: Path, thresholds: list[float], opts: ServeOptions, rule: str | None = None, tensorrt: bool = False
) -> dict[str, Any]:
    """T_min and the governor's T steps for ``opts.max_accuracy_drop``, and the drift alerts' reference
    (val's escalation rate at the served T and its confidence-bin shares), all from the val outputs of the
    precision that is served (``tensorrt``: the plans' val logits, whose T is served).

    With TensorRT outputs, a T_min that ``tensorrt.json`` recorded for ``rule`` at the same T and budget must
    be the one found here: a stale logits cache is refused rather than served.

    ``thresholds``: T_1..T_{K-1} (two models: [T]). A cascade of K > 2 models: the governor moves T_{K-1}, with
    the earlier ones fixed, so T_min and its steps come from that transition's view of val
    (``StageOutputs.last_transition``); the drift reference is little's confidence shares (little sees every
    row) and the share of rows reaching big.
    """
    from littlebig.export.calibrate import MAX_ACCURACY_DROP, drift_reference, governor_levels, threshold_floor

    if len(thresholds) > 1:
        return _stages_governor_settings(build, thresholds, opts, tensorrt)
    (threshold,) = thresholds
    val = served_val_outputs(build, tensorrt)
    floor = threshold_floor(val, threshold, opts.max_accuracy_drop)
    if tensorrt and rule is not None and opts.max_accuracy_drop == MAX_ACCURACY_DROP:
        recorded = read_tensorrt(build)["calibration"]["rules"].get(rule, {})
        if recorded.get("threshold") == threshold and "t_min" in recorded and recorded["t_min"] != floor:
            raise ValueError(
                f"T_min {floor!r} from {export_dir(build) / 'logits-plan-val.npz'} differs from the "
                f"{recorded['t_min']!r} tensorrt.json recorded for rule {rule!r}: the cached plan logits are not "
                "the plans' (rebuild them: make tensorrt)"
            )
    return {
        "t_min": floor,
        "levels": governor_levels(val, threshold, floor),
        "reference": drift_reference(val, threshold),
        "val_logits": "tensorrt" if tensorrt else "onnx",
    }


def _stages_governor_settings(
    build: Path, thresholds: list[float], opts: ServeOptions, tensorrt: bool
) -> dict[str, Any]:
    """``governor_settings`` of a cascade of K > 2 models (ONNX val outputs: plans serve two models only)."""
    from littlebig.export.calibrate import confidence_shares, governor_levels, threshold_floor
    from littlebig.export.pipeline import stage_outputs

    if tensorrt:
        raise ValueError("TensorRT serving covers two-model cascades only")
    val = stage_outputs(build, "val")
    view = val.last_transition(thresholds)
    floor = threshold_floor(view, thresholds[-1], opts.max_accuracy_drop)
    return {
        "t_min": floor,
        "levels": governor_levels(view, thresholds[-1], floor),
        "reference": {
            "rows": int(len(val.labels)),
            "escalation_rate": float(val.evaluate(thresholds)["escalation_rate"]),
            "confidence_shares": confidence_shares(val.pair()),
        },
        "val_logits": "onnx",
    }


def generate(build: Path, out: Path, profile: str = "cpu", opts: ServeOptions | None = None) -> dict[str, Any]:
    """Write the whole repository for ``profile`` into ``out`` and return a summary.

    Every option and input is checked before ``out`` is touched; the repository is written into a hidden
    sibling and swapped into place in one rename, so a refused, failed or killed run leaves the old one whole.
    A repository a running tritonserver serves is never rewritten under it (``check_not_served``).
    """
    opts = (opts or ServeOptions()).validate(profile)
    exported, calibration = read_export(build), read_calibration(build)  # read once: one calibration throughout
    stages = stages_of(exported)
    if len(stages) > 2 and profile != "cpu":
        raise ValueError(
            f"a cascade of {len(stages)} models is served on the cpu profile only (the GPU profiles' TensorRT plans, "
            "batch sizing and stand-ins are built for little and big); use --profile cpu, or export two models"
        )
    plans = profile == "gpu" and serves_plans(build, opts)
    extra_summary: dict[str, Any] = {}
    if plans:
        extra_summary["gpu_product"] = check_plan_profiles(build, opts)
    # T from the precision that is served: plans and an FP16 TensorRT accelerator take the T calibrated
    # on FP16 (or FP32) TensorRT outputs in tensorrt.json; the FP32 ONNX T is never served in FP16.
    fp16_accelerator = profile == "gpu" and not plans and opts.trt_accelerator and opts.trt_precision == "fp16"
    if fp16_accelerator:
        check_fp16_calibration(build)
    thresholds, rule = served_thresholds(build, opts, plans or fp16_accelerator, calibration)
    # T_min, the governor's steps and the drift reference from the same outputs as T: the precision served
    governor = governor_settings(build, thresholds, opts, rule, tensorrt=plans or fp16_accelerator)
    eps = -1.0 if calibration.eps is None else calibration.eps  # -1: unknown (the shadow loss alert stays blind)
    if opts.guard and opts.guard_eps is None and not 0.0 < eps < 1.0:
        raise ValueError(f"{_flag('guard')}: this calibration records no eps; give {_flag('guard_eps')}")
    # onnxruntime's batch profile on the gpu profile needs p: read (or refused) here, before anything is written
    rate = served_escalation_rate(build, calibration, opts) if profile == "gpu" and not plans else None
    served = Served(exported, thresholds, rule, governor, eps, plans, rate, extra_summary)
    check_not_served(out)
    with replacing_dir(out) as tmp:
        return _write_repository(build, tmp, profile, opts, served)


@dataclass(frozen=True)
class Served:
    """What ``generate`` read and checked before writing: the export, the served Ts and the governor's inputs."""

    exported: dict[str, Any]
    thresholds: list[float]
    rule: str
    governor: dict[str, Any]
    eps: float
    plans: bool
    #: p of the served rule on val, where the profile sizes big's batches by it (gpu with onnxruntime); else None.
    escalation_rate: float | None
    extra_summary: dict[str, Any]


def _write_repository(build: Path, out: Path, profile: str, opts: ServeOptions, served: Served) -> dict[str, Any]:
    """Every model of the repository into the empty folder ``out``."""
    exported, thresholds, rule, governor, eps = (
        served.exported, served.thresholds, served.rule, served.governor, served.eps
    )  # fmt: skip
    stages = stages_of(exported)
    for role in stages:
        PROFILES[profile](role, served, build, out, opts)
    bls_dir = out / BLS_NAME
    preferred = profile in PREFERRED_BATCH_PROFILES
    write_config(bls_config(exported, thresholds, rule, opts, governor, preferred, eps), bls_dir)
    (bls_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(SOURCES / "littlebig" / "model.py", bls_dir / "1" / "model.py")
    for module in BLS_MODULES:
        shutil.copy2(Path(importlib.import_module(f"littlebig.{module}").__file__), bls_dir / "1" / f"{module}.py")
    if opts.little_in_process:
        shutil.copy2(export_dir(build) / exported["little"]["onnx"], bls_dir / "1" / "little.onnx")
    (bls_dir / LABELS_FILE).write_text("\n".join(exported["class_names"]) + "\n")
    # The encoded entry point: decode (on the CPU unless the NOT RUN GPU decoder is asked for), then littlebig.
    decode_kind = mc.ModelInstanceGroup.KIND_GPU if opts.decoder == "nvimgcodec" else mc.ModelInstanceGroup.KIND_CPU
    write_decoder(out, exported["service_size"], opts, opts.max_batch_size, decode_kind)
    write_config(
        ensemble_config(ENCODED_NAME, BLS_NAME, cascade_outputs(exported), opts.max_batch_size), out / ENCODED_NAME
    )
    (out / ENCODED_NAME / "1").mkdir(exist_ok=True)  # an ensemble's version folder is empty
    (out / ENCODED_NAME / LABELS_FILE).write_text("\n".join(exported["class_names"]) + "\n")
    summary = {
        "profile": profile,
        "threshold": thresholds[-1],
        "thresholds": thresholds,
        "stages": list(stages),
        "rule": rule,
        "tensorrt_plans": served.plans,
        "models": [*stages, BLS_NAME, DECODE_NAME, ENCODED_NAME],
        "service_size": exported["service_size"],
        "class_names": exported["class_names"],
        "options": vars(opts),
        "queue_timeout_us": opts.queue_timeout(),
        "slo_p99_ms": opts.slo_p99_ms,
        "t_min": governor["t_min"],
        "governor_thresholds": governor["levels"],
        "drift_reference": governor["reference"],
        "calibrated_eps": eps,
        "val_logits": governor["val_logits"],
        **served.extra_summary,
    }
    (out / REPOSITORY_RECORD).write_text(json.dumps(summary, indent=2))
    return summary


def serving_processes(repo: Path) -> list[int]:
    """Pids of running tritonserver processes whose ``--model-repository`` is ``repo``."""
    import psutil

    target = repo.resolve()
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "cwd"]):
        argv = proc.info["cmdline"] or []
        if not argv or Path(argv[0]).name != "tritonserver":
            continue
        for arg in argv[1:]:
            if arg.startswith("--model-repository="):
                path = Path(arg.partition("=")[2])
                if not path.is_absolute() and proc.info["cwd"]:
                    path = Path(proc.info["cwd"]) / path
                if path.resolve() == target:
                    found.append(proc.pid)
    return found


def check_not_served(repo: Path) -> None:
    """Refuse to rewrite a repository under a running server: its loaded models would meet files of another
    build (the Python backend reads model.py and its ONNX at load, and Triton may poll the folder)."""
    pids = serving_processes(repo) if repo.exists() else []
    if pids:
        raise ValueError(
            f"{repo} is served by a running tritonserver (pid {', '.join(map(str, pids))}): stop that server first, "
            "or write the new repository to another folder (--out NEW_DIR) and start a server on it"
        )


def recorded_options(record: dict[str, Any]) -> dict[str, Any]:
    """The ServeOptions a generated repository's ``littlebig-repository.json`` records (fields this version knows)."""
    return {k: v for k, v in record.get("options", {}).items() if k in ServeOptions.__dataclass_fields__}


def prepare_repository(repo: Path, build: Path, flags: dict[str, object]) -> str:
    """Make ``repo`` serve every deployment flag given, or raise ValueError saying how; return what happened.

    A repository littlebig generated (it has ``littlebig-repository.json``) is regenerated from ``build``
    with its recorded options plus the flags; one made by hand cannot be rewritten safely, so flags
    given for it are refused rather than silently ignored.
    """
    ServeOptions(**flags).validate("cpu")  # a bad flag is refused before the repository is looked at
    record_path = repo / REPOSITORY_RECORD
    if not (repo / "littlebig" / "config.pbtxt").exists():
        generate(build, repo, "cpu", ServeOptions(**flags))
        return f"{repo} was missing: generated the cpu repository"
    how = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items())
    if not record_path.exists():
        if flags:
            raise ValueError(
                f"{repo} was not generated by littlebig (no {record_path.name}), so {how} cannot be applied to it: "
                f"serve it without deployment flags, or generate one with `littlebig repo --profile cpu --out "
                f"NEW_DIR {how}` and serve that"
            )
        return f"serving {repo} as it is (not generated by littlebig)"
    record = json.loads(record_path.read_text())
    if record.get("profile") != "cpu":
        raise ValueError(
            f"{repo} is a {record.get('profile')} repository; littlebig serve runs the embedded (cpu) Triton: "
            f"`littlebig repo --profile cpu --out NEW_DIR {how}` and serve that"
        )
    fields = ServeOptions.__dataclass_fields__
    current = recorded_options(record)
    if "rule" in flags and "threshold" not in flags:
        flags = {**flags, "threshold": None}  # a rule replaces an earlier threshold override
    changed = {k: v for k, v in flags.items() if current.get(k, fields[k].default) != v}
    if not changed:
        return f"serving {repo} ({record['rule']} T={record['threshold']:.6f})"
    summary = generate(build, repo, "cpu", ServeOptions(**{**current, **flags}))
    changes = ", ".join(f"{k}={v}" for k, v in changed.items())
    return f"regenerated {repo} from {build} with {changes} ({summary['rule']} T={summary['threshold']:.6f})"
