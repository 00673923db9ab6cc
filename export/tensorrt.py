"""TensorRT plans for little and big, checked against onnxruntime and calibrated on their own outputs.

Why each step exists:

* **uint8 input.** TensorRT 10 accepts a UINT8 network input but only a Cast/Identity layer may consume
  it (uint8 -> float32/float16). Our exported graphs start ``IMAGE -> Transpose -> Cast``, so the
  parser would hand a uint8 tensor to a Shuffle layer. :func:`cast_input_first` rewrites the ONNX so the
  Cast comes first (``IMAGE -> Cast -> Transpose``); uint8 -> float is exact and a transpose does not
  care about dtype, so the rewritten graph gives bit-identical logits (checked in onnxruntime before
  any plan is built). The plan's input stays ``IMAGE`` UINT8 [N, H, W, C] and its output ``LOGITS``
  FP32 [N, classes]: the gpu profile's config.pbtxt (which declares those) serves it unchanged.
* **One profile per plan, batch 1..that model's max.** Triton's dynamic batcher sends any batch from 1
  to the config's max_batch_size: little up to ``max_batch_size``, big up to ``big_max_batch_size`` (the
  BLS model never sends it more). ``opt`` is the typical batch (:func:`typical_batches`), not the max:
  TensorRT tunes its kernels for ``opt``. Each plan's profile is recorded in ``tensorrt.json`` and the
  repository generator refuses a ``max_batch_size`` above it: with ``--disable-auto-complete-config``
  the TensorRT backend never compares the two (tensorrt_backend r24.10 src/model_state.cc checks them
  only in ``AutoCompleteConfigHelper``), so such a plan would load and fail at run time.
* **Parity and calibration on plan outputs.** FP16 changes logits (and can flip argmaxes), so T must be
  chosen on the logits of the precision that is served: :func:`plan_logits` runs a plan on any images
  and :func:`calibrate_on_plans` chooses T on the val split's plan logits with the same rules.
* **Version and GPU.** A plan only loads in the TensorRT it was built with, on the GPU architecture it
  was built on: Triton 24.10 (2.51) ships TensorRT 10.5, so build with ``tensorrt-cu12==10.5.*`` (or
  inside ``nvcr.io/nvidia/tensorrt:24.10-py3``) on the GPU model that serves. ``tensorrt.json`` records
  that GPU as the ``nvidia.com/gpu.product`` node label (GPU feature discovery's form of the device
  name), which deploy/k8s/deployment.yaml must select. We do not build hardware-compatible plans
  (``HardwareCompatibilityLevel.AMPERE_PLUS``): TensorRT's docs say it disables cuDNN/cuBLAS tactics,
  limits shared memory and fusions and can lower performance, Ampere and later only, and the parity
  and calibration measured on the build GPU would no longer be about the GPU that serves.

``tensorrt`` and CUDA (through torch's CUDA build) are imported inside functions only: without a GPU
every entry point says so clearly and :func:`run_tensorrt_cli` exits 1.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from littlebig.atomic import replacing_file, write_bytes, write_json
from littlebig.export.pipeline import ROLES, export_dir, read_export, read_tensorrt

INPUT_NAME, OUTPUT_NAME = "IMAGE", "LOGITS"
PRECISIONS = ("fp16", "fp32")
#: The TensorRT inside nvcr.io/nvidia/tritonserver:24.10-py3 (Triton 2.51): plans must be built with it.
SERVING_TENSORRT = "10.5"
DEFAULT_MAX_BATCH = 64  # generate.ServeOptions: littlebig/little 64
DEFAULT_BIG_MAX_BATCH = 32  # generate.ServeOptions: big 32 (the BLS model never sends big more)
WORKSPACE_BYTES = 1 << 30
#: (max abs logit difference, min argmax agreement) a plan must meet against onnxruntime on val.
PARITY_LIMITS = {"fp32": (1e-3, 0.999), "fp16": (0.25, 0.99)}
#: Ops that only move or reshape data: a uint8 input may pass through them before its first Cast.
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten"})
NEEDS_GPU = "littlebig export --tensorrt needs a GPU"


class TensorRTUnavailable(RuntimeError):
    """No CUDA device, or no TensorRT Python package: plans cannot be built or run here."""


class PlanParityError(RuntimeError):
    """A plan disagrees with onnxruntime beyond the precision's limits: never serve it."""


@dataclass(frozen=True)
class PlanParity:
    max_abs: float
    argmax_agreement: float
    rows: int
    batch_invariance_max_abs: float  # the same max-batch rows run at batch 1 vs in one batch of the profile's max


def check_args(precision: str, max_batch_size: int) -> None:
    """Reject bad usage before anything touches a GPU (the CLI turns ValueError into exit 2)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max batch size must be an integer >= 1, got {max_batch_size!r}")


def typical_batches(little_max: int, big_max: int, escalation_rate: float) -> dict[str, int]:
    """The batch each model typically sees (a profile's ``opt``), not its maximum.

    little: half its max_batch_size (a default, not a measurement: dynamic batches are full only at
    saturation); big: the escalated rows of such a batch, ``ceil(p * little)``, within 1..big_max.
    """
    if not 0.0 <= escalation_rate <= 1.0:
        raise ValueError(f"escalation rate must be in [0, 1], got {escalation_rate!r}")
    little = max(1, little_max // 2)
    return {"little": little, "big": min(big_max, max(1, math.ceil(escalation_rate * little)))}


def profile_shapes(
    service_size: Sequence[int], max_batch_size: int, opt_batch_size: int | None = None
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) IMAGE shapes: batch 1..max_batch_size, tuned for ``opt_batch_size`` (default max // 2)."""
    check_args("fp32", max_batch_size)
    opt = max(1, max_batch_size // 2) if opt_batch_size is None else opt_batch_size
    if isinstance(opt, bool) or not isinstance(opt, int) or not 1 <= opt <= max_batch_size:
        raise ValueError(f"opt batch size must be an integer in 1..{max_batch_size}, got {opt!r}")
    h, w, c = (int(v) for v in service_size)
    if min(h, w, c) < 1:
        raise ValueError(f"service size must be positive, got {list(service_size)}")
    return (1, h, w, c), (opt, h, w, c), (max_batch_size, h, w, c)


def shapes_option(shape: Sequence[int], input_name: str = INPUT_NAME) -> str:
    """onnxruntime TensorRT EP's ``trt_profile_*_shapes`` syntax: ``IMAGE:1x28x28x1``."""
    return f"{input_name}:{'x'.join(str(int(d)) for d in shape)}"


def gpu_product_label(device_name: str) -> str:
    """The ``nvidia.com/gpu.product`` label GPU feature discovery gives a device (spaces become dashes)."""
    return "-".join(device_name.strip().split())


def plan_profiles(build: Path) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Each role's (min, opt, max) IMAGE shape as ``tensorrt.json`` recorded it when the plans were built."""
    path = export_dir(build) / "tensorrt.json"
    record = read_tensorrt(build)
    if record is None:
        raise FileNotFoundError(f"{path} not found: rerun `littlebig export --tensorrt`")
    profiles = {}
    for role in ROLES:
        profile = record.get(role, {}).get("profile") or record.get("profile")
        if not profile:
            raise ValueError(f"{path} records no optimisation profile for {role}: rebuild the plans")
        profiles[role] = tuple(tuple(int(d) for d in shape) for shape in profile)
    return profiles


def cast_input_first(model: Any, input_name: str = INPUT_NAME) -> tuple[Any, bool]:
    """Move the uint8 input's first Cast ahead of the layout ops before it; (model, changed).

    Only ``input -> layout ops (single consumer each) -> Cast(to=float)`` chains are rewritten;
    anything else is left as it is (and TensorRT's parser will say if it cannot take it).
    """
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    if input_name not in inputs or inputs[input_name].type.tensor_type.elem_type != TensorProto.UINT8:
        return model, False
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    chain, tensor = [], input_name
    while len(consumers.get(tensor, [])) == 1 and consumers[tensor][0].op_type in LAYOUT_OPS:
        node = consumers[tensor][0]
        if node.input[0] != tensor:  # e.g. Reshape's shape operand: not a data path
            return model, False
        chain.append(node)
        tensor = node.output[0]
    nxt = consumers.get(tensor, [])
    if not chain or len(nxt) != 1 or nxt[0].op_type != "Cast":
        return model, False
    cast = nxt[0]
    to = next(helper.get_attribute_value(a) for a in cast.attribute if a.name == "to")
    if to not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        return model, False
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    g = rewritten.graph
    first_cast_out = f"{input_name}__as_float"
    for node in g.node:  # the chain now reads the float tensor
        for i, name in enumerate(node.input):
            if name == input_name:
                node.input[i] = first_cast_out
    # the old Cast becomes an Identity on the (already float) tensor, keeping every name downstream
    old = next(n for n in g.node if list(n.output) == list(cast.output))
    identity = helper.make_node("Identity", [old.input[0]], list(old.output), name=(old.name or "cast") + "__identity")
    index = list(g.node).index(old)
    g.node.remove(old)
    g.node.insert(index, identity)
    g.node.insert(0, helper.make_node("Cast", [input_name], [first_cast_out], to=to, name=f"{input_name}__cast"))
    # intermediate value_info entries still say uint8 for the chain's outputs: drop them
    stale = {o for n in chain for o in n.output}
    kept = [v for v in g.value_info if v.name not in stale]
    del g.value_info[:]
    g.value_info.extend(kept)
    onnx.checker.check_model(rewritten, full_check=True)
    return rewritten, True


def prepare_onnx(build: Path, role: str, dst: Path | None = None) -> Path:
    """Write the Cast-first graph (default ``ROLE.trt.onnx`` beside the export); prove it matches the original.

    The gpu profile's onnxruntime TensorRT accelerator serves this file too: the accelerator hands the
    graph to the same TensorRT parser, which needs a Cast right after a uint8 input.
    """
    import onnx

    exported = read_export(build)
    src = export_dir(build) / exported[role]["onnx"]
    model, changed = cast_input_first(onnx.load(str(src)))
    dst = dst or export_dir(build) / f"{role}.trt.onnx"
    with replacing_file(dst) as tmp:
        onnx.save(model, str(tmp))
    if changed:
        _check_same_as_onnx(src, dst, tuple(exported["service_size"]))
    return dst


def _check_same_as_onnx(original: Path, rewritten: Path, service_size: tuple[int, ...]) -> None:
    """The rewrite must not change a single logit (uint8 -> float is exact, transposes move values)."""
    from littlebig.export.onnx_export import onnx_session

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, *service_size), dtype=np.uint8)
    a = onnx_session(original).run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    b = onnx_session(rewritten).run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    if not np.array_equal(a, b):
        raise RuntimeError(f"{rewritten} differs from {original} (max abs {np.abs(a - b).max():.2e})")


def unavailable_reason() -> str | None:
    """Why plans cannot be built or run here (None: a CUDA device and TensorRT >= 10 are present)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (pip install 'littlebig[export]'); it provides the CUDA buffers"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    try:
        import tensorrt as trt
    except ImportError:
        return f"the tensorrt Python package is not installed (pip install 'tensorrt-cu12=={SERVING_TENSORRT}.*')"
    if int(trt.__version__.split(".")[0]) < 10:
        return f"TensorRT {trt.__version__} is too old: need 10.x (the serving image has {SERVING_TENSORRT})"
    return None


def require_tensorrt() -> None:
    reason = unavailable_reason()
    if reason:
        raise TensorRTUnavailable(f"{NEEDS_GPU}: {reason}")


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    service_size: Sequence[int],
    precision: str,
    max_batch: int,
    opt_batch: int | None = None,
) -> Path:
    """Parse the ONNX, build one engine (FP16 or FP32) with a batch 1..max_batch profile, serialise it."""
    check_args(precision, max_batch)
    require_tensorrt()
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch always
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16" and not getattr(builder, "platform_has_fast_fp16", True):  # deprecated in TensorRT 10
        raise RuntimeError("this GPU has no fast FP16: build with --precision fp32")
    set_precision_flags(config, precision, trt.BuilderFlag)
    profile = builder.create_optimization_profile()
    lo, opt, hi = profile_shapes(service_size, max_batch, opt_batch)
    profile.set_shape(INPUT_NAME, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {plan_path} (see its log above)")
    write_bytes(plan_path, bytes(serialized))
    _check_io(_engine(plan_path))
    return plan_path


def set_precision_flags(config: Any, precision: str, flags: Any) -> None:
    """FP16: the FP16 flag (TF32 stays on, as TensorRT sets it). FP32: clear TF32 as well.

    TensorRT's builder config starts with ``BuilderFlag.TF32`` set ("TF32 ... is enabled by default",
    TensorRT 10 API docs, ``BuilderFlag.TF32``), so on Ampere and later an "fp32" plan would run its
    convolutions and matrix products with 10-bit mantissas and likely miss fp32's parity limit (1e-3 max abs
    logit difference vs onnxruntime). ``flags`` is ``tensorrt.BuilderFlag``.
    """
    if precision == "fp16":
        config.set_flag(flags.FP16)
    elif precision == "fp32":
        config.clear_flag(flags.TF32)
    else:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _engine(plan: Path):
    import tensorrt as trt

    engine = trt.Runtime(_logger()).deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise RuntimeError(f"{plan} does not deserialise: built with another TensorRT or GPU?")
    return engine


def _check_io(engine) -> None:
    """The plan must match the gpu profile's config.pbtxt: IMAGE uint8 in, LOGITS float32 out."""
    import tensorrt as trt

    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    if names != {INPUT_NAME, OUTPUT_NAME}:
        raise RuntimeError(f"plan I/O tensors are {sorted(names)}, expected {INPUT_NAME} and {OUTPUT_NAME}")
    dtypes = (engine.get_tensor_dtype(INPUT_NAME), engine.get_tensor_dtype(OUTPUT_NAME))
    if dtypes != (trt.uint8, trt.float32):
        raise RuntimeError(f"plan I/O dtypes are {dtypes}, expected (uint8, float32) as config.pbtxt declares")


def plan_path(build: Path, role: str) -> Path:
    """Where the gpu profile of the repository generator looks for a role's plan."""
    return export_dir(build) / f"{role}.plan"


def _run_engine(engine, images: np.ndarray, batch_size: int) -> np.ndarray:
    import torch

    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    chunks = []
    with torch.cuda.stream(stream):
        for i in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to("cuda", non_blocking=False)
            context.set_input_shape(INPUT_NAME, tuple(batch.shape))
            out = torch.empty(tuple(context.get_tensor_shape(OUTPUT_NAME)), dtype=torch.float32, device="cuda")
            context.set_tensor_address(INPUT_NAME, batch.data_ptr())
            context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            stream.synchronize()
            chunks.append(out.cpu().numpy())
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, 0), np.float32)


def plan_max_batch(engine) -> int:
    """The largest batch the plan's (single) profile accepts."""
    return int(engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0])


def plan_logits(build: Path, role: str, images: np.ndarray) -> np.ndarray:
    """``role``'s plan on ``images`` (uint8 [N, H, W, C]) in batches of its profile's max: float32 logits."""
    require_tensorrt()
    plan = plan_path(build, role)
    if not plan.exists():
        raise FileNotFoundError(f"{plan} not found: run `littlebig export --tensorrt` first")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    engine = _engine(plan)
    return _run_engine(engine, images, plan_max_batch(engine))


def cached_plan_logits(build: Path, split: str) -> dict[str, np.ndarray]:
    """The plans' logits on a split as the plan build cached them (no GPU needed to read them).

    FileNotFoundError when there is no cache, or one older than a plan (it would not be the plans' logits).
    """
    cache = export_dir(build) / f"logits-plan-{split}.npz"
    plans = [plan_path(build, r) for r in ROLES]
    if not cache.exists() or not all(p.exists() and cache.stat().st_mtime >= p.stat().st_mtime for p in plans):
        raise FileNotFoundError(
            f"{cache} is missing or older than the plans: rebuild them (`make tensorrt`), which caches their logits"
        )
    with np.load(cache) as z:
        return {k: z[k] for k in z.files}


def plan_split_logits(build: Path, split: str) -> dict[str, np.ndarray]:
    """Both plans' logits on a split (cached beside the plans, like the ONNX reference logits)."""
    from littlebig.data import load_split

    try:
        return cached_plan_logits(build, split)
    except FileNotFoundError:
        pass
    exported = read_export(build)
    cache = export_dir(build) / f"logits-plan-{split}.npz"
    data = load_split(split, exported["data_dir"], tuple(exported["service_size"]))
    result = {"labels": data.labels, **{role: plan_logits(build, role, data.images) for role in ROLES}}
    with replacing_file(cache) as tmp, open(tmp, "wb") as f:
        np.savez(f, **result)
    return result


def compare(reference: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max abs logit difference, argmax agreement) of two logit arrays of the same rows."""
    if reference.shape != got.shape:
        raise ValueError(f"logit shapes differ: {reference.shape} vs {got.shape}")
    if len(reference) == 0:
        raise ValueError("no rows to compare")
    return float(np.abs(reference - got).max()), float((reference.argmax(-1) == got.argmax(-1)).mean())


def batch_invariance(run: Any, images: np.ndarray, max_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(batch-1 logits, max-batch logits) of the same ``max_batch`` rows: ``run(images, batch_size)``.

    The rows are the first ``max_batch`` images, repeated when there are fewer, so the batched run really is
    one batch of the profile's max, not a fixed 8 rows (batch 1 vs batch 8 would leave larger batches' kernels
    unchecked).
    """
    if len(images) == 0:
        raise ValueError("no images for the batch invariance check")
    rows = np.resize(np.arange(len(images)), max_batch)  # 0..n-1 repeated up to max_batch rows
    sample = np.ascontiguousarray(images[rows])
    return run(sample, 1), run(sample, max_batch)


def check_plan_parity(
    reference: np.ndarray, plan: np.ndarray, precision: str, batch1: np.ndarray, batched: np.ndarray
) -> PlanParity:
    """Plan vs onnxruntime on the same rows; raise PlanParityError past the precision's limits.

    ``batch1`` / ``batched``: the same rows at batch 1 and in one batch of the plan's max (:func:`batch_invariance`).
    """
    max_abs, agreement = compare(reference, plan)
    invariance, _ = compare(batched, batch1)
    parity = PlanParity(max_abs, agreement, len(reference), invariance)
    limit_abs, limit_agree = PARITY_LIMITS[precision]
    if max_abs > limit_abs or agreement < limit_agree or invariance > limit_abs:
        raise PlanParityError(
            f"{precision} plan differs from onnxruntime: max abs {max_abs:.2e} (limit {limit_abs:.0e}), "
            f"argmax agreement {agreement:.4f} (limit {limit_agree}), batch-1 vs batch-{len(batched)} {invariance:.2e}"
        )
    return parity


def calibrate_on_plans(build: Path, rules: tuple[str, ...] | None = None) -> dict[str, Any]:
    """T per rule chosen on the plans' val logits; both Ts (ONNX-calibrated and plan-calibrated) on plan outputs.

    Shows whether the ONNX threshold keeps its accuracy on the served precision, and gives the T to
    serve when it does not.
    """
    from littlebig.export.calibrate import Outputs, calibrate, evaluate
    from littlebig.export.pipeline import CALIBRATION_FILE, read_calibration

    splits = {s: plan_split_logits(build, s) for s in ("val", "test")}
    outs = {s: Outputs(z["little"], z["big"], z["labels"]) for s, z in splits.items()}
    onnx_rules = read_calibration(build).rules if (build / CALIBRATION_FILE).exists() else {}
    rules = rules or tuple(onnx_rules) or ("paper", "guaranteed")
    record: dict[str, Any] = {
        "split": "val",
        "rows": int(len(outs["val"].labels)),
        "little_acc": float(outs["val"].little_correct.mean()),
        "big_acc": float(outs["val"].big_correct.mean()),
        "rules": calibrate(outs["val"], rules),
        "on_plan_logits": {},  # per rule and T (plan-calibrated, ONNX-calibrated): val and test figures
    }
    for rule, r in record["rules"].items():
        ts = {"plan_threshold": r["threshold"]}
        if rule in onnx_rules:
            ts["onnx_threshold"] = onnx_rules[rule].threshold
        record["on_plan_logits"][rule] = {k: {s: evaluate(o, t) for s, o in outs.items()} for k, t in ts.items()}
    return record


def plan_batches(build: Path, max_batch_size: int, big_max_batch_size: int | None) -> dict[str, tuple[int, int]]:
    """Each role's (opt, max) plan batch: little up to max_batch_size, big up to big_max_batch_size."""
    from littlebig.export.pipeline import read_calibration

    big_max = min(max_batch_size, DEFAULT_BIG_MAX_BATCH) if big_max_batch_size is None else big_max_batch_size
    check_args("fp32", big_max)
    maxima = {"little": max_batch_size, "big": big_max}
    try:  # p of the served rule sets big's typical batch; without a calibration or its rate, every row escalates
        recorded = read_calibration(build).rule().escalation_rate
    except (FileNotFoundError, KeyError, ValueError):
        recorded = None
    p = 1.0 if recorded is None else recorded
    typical = typical_batches(maxima["little"], maxima["big"], p)
    return {role: (typical[role], maxima[role]) for role in ROLES}


def build_plans(
    build: Path, precision: str, max_batch_size: int, big_max_batch_size: int | None = None
) -> dict[str, Any]:
    """Both plans, their parity against onnxruntime on the whole val split, and calibration on them."""
    import tensorrt as trt
    import torch

    from littlebig.data import load_split
    from littlebig.export.pipeline import reference_logits

    exported = read_export(build)
    size = tuple(exported["service_size"])
    batches = plan_batches(build, max_batch_size, big_max_batch_size)
    device = torch.cuda.get_device_name(0)
    record: dict[str, Any] = {
        "precision": precision,
        "max_batch_size": batches["little"][1],
        "big_max_batch_size": batches["big"][1],
        "tensorrt": trt.__version__,
        "serving_tensorrt": SERVING_TENSORRT,
        # plans run only on this GPU model: deploy/k8s/deployment.yaml selects nodes by this label
        "gpu": {
            "name": device,
            "product_label": gpu_product_label(device),
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        },
    }
    for role in ROLES:
        opt, hi = batches[role]
        build_plan(prepare_onnx(build, role), plan_path(build, role), size, precision, hi, opt)
    reference, plans = reference_logits(build, "val"), plan_split_logits(build, "val")
    val_images = load_split("val", exported["data_dir"], size).images
    for role in ROLES:
        opt, hi = batches[role]
        engine = _engine(plan_path(build, role))
        batch1, batched = batch_invariance(
            lambda images, batch, engine=engine: _run_engine(engine, images, batch), val_images[:hi], hi
        )
        parity = check_plan_parity(reference[role], plans[role], precision, batch1, batched)
        size_bytes = plan_path(build, role).stat().st_size
        record[role] = {
            "plan": plan_path(build, role).name,
            "bytes": size_bytes,
            "profile": [list(s) for s in profile_shapes(size, hi, opt)],
            "parity": asdict(parity),
        }
    record["calibration"] = calibrate_on_plans(build)
    write_json(export_dir(build) / "tensorrt.json", record)
    return record


def run_tensorrt_cli(
    build: Path,
    precision: str = "fp16",
    max_batch_size: int = DEFAULT_MAX_BATCH,
    big_max_batch_size: int | None = None,
) -> int:
    """``littlebig export --tensorrt``: 0 built and checked, 1 no GPU / build or parity failed, 2 bad usage.

    little's plan covers batch 1..max_batch_size, big's 1..big_max_batch_size (default: the smaller of
    max_batch_size and ServeOptions' 32), the batches each is actually sent.
    """
    try:
        check_args(precision, max_batch_size)
        if big_max_batch_size is not None:
            check_args(precision, big_max_batch_size)
        exported = read_export(build)
        for role in ROLES:
            onnx_file = export_dir(build) / exported[role]["onnx"]
            if not onnx_file.exists():
                raise FileNotFoundError(f"{onnx_file} not found: run `littlebig export` first")
    except (ValueError, FileNotFoundError) as exc:
        print(f"littlebig export --tensorrt: error: {exc}", file=sys.stderr)
        return 2
    reason = unavailable_reason()
    if reason:
        print(
            f"{NEEDS_GPU}: {reason}. Build the plans on the GPU model that will serve them, with TensorRT "
            f"{SERVING_TENSORRT} (the one in nvcr.io/nvidia/tritonserver:24.10-py3); the gpu profile serves the "
            "ONNX files with onnxruntime where no plan exists.",
            file=sys.stderr,
        )
        return 1
    try:
        record = build_plans(build, precision, max_batch_size, big_max_batch_size)
    except (PlanParityError, RuntimeError) as exc:
        print(f"littlebig export --tensorrt: {exc}", file=sys.stderr)
        return 1
    if not record["tensorrt"].startswith(SERVING_TENSORRT + "."):
        print(
            f"warning: built with TensorRT {record['tensorrt']}; Triton 24.10 loads only {SERVING_TENSORRT}.x plans",
            file=sys.stderr,
        )
    for role in ROLES:
        p, (_, opt, hi) = record[role]["parity"], record[role]["profile"]
        print(
            f"{role:6s} {precision} plan {record[role]['bytes'] / 1e6:7.2f} MB, batch 1..{hi[0]} (opt {opt[0]}): "
            f"vs onnxruntime on {p['rows']} val rows max abs {p['max_abs']:.1e}, "
            f"argmax agreement {p['argmax_agreement']:.2%}"
        )
    for rule, r in record["calibration"]["rules"].items():
        line = f"{rule:10s} T on plan val logits {r['threshold']:.6f}: val acc {r['accuracy']:.4f}"
        onnx_t = record["calibration"]["on_plan_logits"][rule].get("onnx_threshold")
        if onnx_t:
            val, test = onnx_t["val"]["accuracy"], onnx_t["test"]["accuracy"]
            line += f"; the ONNX-calibrated T on plan logits: val acc {val:.4f}, test {test:.4f}"
        print(line)
    print(f"wrote {plan_path(build, 'little')}, {plan_path(build, 'big')} and {export_dir(build) / 'tensorrt.json'}")
    print(
        f"the plans run only on {record['gpu']['name']}: select nodes with nvidia.com/gpu.product="
        f"{record['gpu']['product_label']} (deploy/k8s/deployment.yaml)"
    )
    return 0
