"""The offline job, step by step, each writing its build output: export -> reference -> calibrate.

export.json is the contract between steps (and with the repository generator and the client):
service size, class names, the data (folder, --max-images) and, per role, model name, weights, params,
MACs, data config, parity. The data is Fashion-MNIST, a ``val/ test/`` image folder, or an ImageNet-style
folder (``littlebig.imagenet``: streamed in batches decoded by worker processes, split in halves).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from littlebig.atomic import replacing_dir, replacing_file, write_json
from littlebig.data import load_split
from littlebig.decision import ROLES, stage_names

REFERENCE_BATCH = 256
#: What ``littlebig calibrate`` writes into the build folder (``Calibration``).
CALIBRATION_FILE = "calibration.json"
PARITY_IMAGES = 64


def export_dir(build: Path) -> Path:
    return build / "export"


def read_export(build: Path) -> dict[str, Any]:
    path = export_dir(build) / "export.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `littlebig export` (or `make export`) first")
    return json.loads(path.read_text())


def stages_of(exported: dict[str, Any]) -> tuple[str, ...]:
    """The cascade's stages, cheapest first (an export.json from before cascades of any length: little, big)."""
    return tuple(exported.get("stages", ROLES))


def parse_size(text: str) -> tuple[int, int, int]:
    """'28x28x1' -> (28, 28, 1): service size as H x W x C."""
    try:
        h, w, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"service size must look like HxWxC (e.g. 28x28x1), got {text!r}") from None
    return h, w, c


def default_batch_size(service_size: tuple[int, int, int]) -> int:
    """Rows per onnxruntime call: 256 for small images, fewer for large ones (about 4 Mpixel a batch)."""
    h, w, _ = service_size
    return int(max(8, min(REFERENCE_BATCH, 2**22 // (h * w))))


def split_batches(
    split: str,
    data_dir: str | None,
    size: tuple[int, int, int],
    *,
    max_images: int | None = None,
    class_ids: list[str] | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    desc: str | None = None,
    train_split: dict[str, Any] | None = None,
) -> tuple[int, Iterator[tuple[np.ndarray, np.ndarray]]]:
    """(rows, batches of (uint8 images, labels)) of a split at the service size.

    An ImageNet-style folder is streamed (bounded memory, worker processes); Fashion-MNIST and the
    ``val/ test/`` layout are small and decoded whole, as before. ``max_images`` keeps a seeded sample of
    that many images in all, half per split. ``train_split`` (export.json's): the folder's train share, which
    val and test leave out.
    """
    from littlebig.imagenet import DEFAULT_WORKERS, TrainSplit, folder_split, is_imagenet_folder, iter_batches

    batch_size = batch_size or default_batch_size(size)
    if is_imagenet_folder(data_dir):
        index = folder_split(data_dir, split, max_images, class_ids, TrainSplit.of(train_split))
        workers = DEFAULT_WORKERS if workers is None else workers
        return len(index), iter_batches(index, size, batch_size, workers, desc)
    data = load_split(split, data_dir, size)
    images, labels = data.images, data.labels
    if max_images is not None:
        keep = np.sort(np.random.default_rng(0).permutation(len(labels))[: max(1, max_images // 2)])
        images, labels = images[keep], labels[keep]

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in tqdm(range(0, len(labels), batch_size), desc=desc, unit="batch", disable=desc is None):
            yield np.ascontiguousarray(images[i : i + batch_size]), labels[i : i + batch_size]

    return len(labels), batches()


def exported_split(exported: dict[str, Any], split: str, size: tuple[int, int, int] | None = None):
    """A split of export.json's data at the service size (``data.Dataset``), the rows calibration and the report
    see: a folder of class folders split as recorded (its train share left out, the model's class ids, the
    sample size); Fashion-MNIST or a ``val/ test/`` folder as ``data.load_split`` reads them."""
    from littlebig.imagenet import TrainSplit, is_imagenet_folder, load_folder_split

    size = tuple(size or exported["service_size"])
    data_dir = exported["data_dir"]
    if not is_imagenet_folder(data_dir):
        return load_split(split, data_dir, size)
    train_split = TrainSplit.of(exported.get("train_split"))
    return load_folder_split(data_dir, split, size, exported.get("class_ids"), train_split, exported.get("max_images"))


def class_ids_of(weights: str, class_names: list[str]) -> list[str]:
    """The ids an ImageNet-style folder's sub-folders are matched to: timm's synsets for its own
    ImageNet-1k weights, the class names a littlebig checkpoint was trained on otherwise."""
    if weights.startswith("pretrained") and len(class_names) == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_label_name(i) for i in range(1000)]
    return list(class_names)


def folder_classes(data_dir: str | None) -> tuple[str, ...]:
    """The class names the data gives: a user's folder's sorted class folders (torchvision's ImageFolder
    order), Fashion-MNIST's own names."""
    from littlebig.data import FASHION_MNIST_CLASSES, is_fashion_mnist_dir
    from littlebig.imagenet import index_folder, is_imagenet_folder

    if data_dir is None or is_fashion_mnist_dir(data_dir):
        return FASHION_MNIST_CLASSES
    if is_imagenet_folder(data_dir):
        return index_folder(data_dir).class_names
    root = Path(data_dir) / "val"
    if not root.is_dir():
        raise ValueError(f"{data_dir}: not Fashion-MNIST, a val/ test/ folder or a folder of class folders")
    return tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))


def name_classes(role: str, loaded: Any, data_dir: str | None) -> list[str]:
    """A model's class names: its checkpoint's, else the data folder's, whose class count must be the head's."""
    if loaded.class_names is not None:
        return list(loaded.class_names)
    classes = loaded.model.num_classes
    names = folder_classes(data_dir)
    if len(names) != classes:
        raise ValueError(
            f"{role}'s weights carry no class names and its head has {classes} classes, but "
            f"{data_dir or 'Fashion-MNIST'} has {len(names)} classes: give --data-dir the folder it was trained on"
        )
    return list(names)


def export_models(
    build: Path,
    weights: dict[str, str],
    names: dict[str, str | None],
    service_size: tuple[int, int, int] | None,
    data_dir: str | None,
    max_images: int | None = None,
    workers: int | None = None,
    data_configs: dict[str, dict[str, Any]] | None = None,
    use_ema: bool = False,
) -> dict[str, Any]:
    """Load every model of the cascade (``weights``' keys: its stages, cheapest first, ``decision.stage_names``),
    export each with its preprocessing, check parity on real val images, count MACs.

    Weights are any form ``models.load_model`` reads; ``data_configs``: per stage, a data config overlay (a
    flag's); ``use_ema``: timm checkpoints' EMA weights. Every model, its classes and the data are checked
    before anything is written. timm's own weights (``pretrained``) get timm's PIL resize for every resize
    (``pil_resize``), which is what they were evaluated with; littlebig's checkpoints keep the graph they were
    trained with, with the antialiased resize only where the service size makes it downscale.
    """
    from littlebig.export.macs import count_macs, count_params
    from littlebig.export.models import Preprocessed, data_config, default_service_size, load_model
    from littlebig.export.onnx_export import check_parity, export_onnx
    from littlebig.imagenet import is_imagenet_folder

    stages = tuple(weights)
    if stages != stage_names(len(stages)):
        raise ValueError(f"a cascade of {len(stages)} models has the stages {stage_names(len(stages))}, got {stages}")
    unknown = sorted(set(data_configs or {}) - set(stages))
    if unknown:
        raise ValueError(f"data configs for {unknown}, which are not stages of this cascade {list(stages)}")
    loaded, models, class_names = {}, {}, {}
    for role in stages:
        loaded[role] = load_model(
            weights[role], names[role], data_config_overrides=(data_configs or {}).get(role), use_ema=use_ema
        )
        models[role] = loaded[role].model
    for role in stages:
        class_names[role] = name_classes(role, loaded[role], data_dir)
    splits = {role: m.train_split for role, m in loaded.items() if m.train_split is not None}
    if len({json.dumps(v, sort_keys=True) for v in splits.values()}) > 1:
        raise ValueError(f"the checkpoints were trained on different splits of the folder: {splits}")
    train_split = next(iter(splits.values()), None) if is_imagenet_folder(data_dir) else None
    for role in stages[:-1]:
        if class_names[role] != class_names["big"]:
            raise ValueError(
                f"{role} and big were trained on different classes: {class_names[role]} vs {class_names['big']}"
            )
    if service_size is None:  # default: big's floor(size / crop_pct), where big's graph then only crops
        service_size = default_service_size(data_config(models["big"]))
    class_ids = class_ids_of(weights["big"], class_names["big"])
    _, batches = split_batches(
        "val", data_dir, service_size, max_images=max_images, class_ids=class_ids,
        batch_size=PARITY_IMAGES, workers=min(workers or 2, 2), train_split=train_split,
    )
    images = next(iter(batches))[0]
    batches.close()
    record: dict[str, Any] = {
        "service_size": list(service_size),
        "class_names": class_names["big"],
        "class_ids": class_ids,
        "data_dir": data_dir,
        "max_images": max_images,
        "stages": list(stages),
        "train_split": train_split,  # the folder's share a checkpoint was trained on: val and test leave it out
    }
    # Built whole in a sibling folder and swapped in: a failed parity check or a kill leaves the old export
    # (and the logits and plans computed from it) as it was.
    with replacing_dir(export_dir(build)) as out_dir:
        for role in tqdm(stages, desc="export"):
            model = models[role]
            pil_resize = weights[role].startswith("pretrained")
            net = Preprocessed(model, service_size, pil_resize=pil_resize)
            path = export_onnx(net, out_dir / f"{role}.onnx")
            cfg = data_config(model)
            record[role] = {
                "name": model.default_cfg.get("architecture", type(model).__name__),
                "weights": weights[role],
                "params": count_params(model),
                "macs": count_macs(model, tuple(cfg["input_size"])),
                "data_config": cfg,
                "checkpoint": {"form": loaded[role].form, "state": loaded[role].state_key,
                               "data_config_from": loaded[role].config_source,
                               "data_config_flag": (data_configs or {}).get(role)},
                "class_names_from": "checkpoint" if loaded[role].class_names is not None else "folder",
                "resize": {"to": list(net.resize_to), "antialias": net.antialias, "pil_resize": pil_resize},
                "onnx": path.name,
                "parity": check_parity(net, path, images, (1, len(images))).as_dict(),
            }
        write_json(out_dir / "export.json", record)
    return record


def with_data(exported: dict[str, Any], data_dir: str | None, max_images: int | None) -> dict[str, Any]:
    """``exported`` pointed at other data (its data fields replaced; the record itself is not changed)."""
    if max_images is not None and max_images < 2:
        raise ValueError(f"--max-images must be at least 2 (one per split), got {max_images}")
    changed = {**exported, "class_ids": exported.get("class_ids", exported["class_names"])}  # names its data
    if data_dir is not None:
        changed["data_dir"] = data_dir
    if max_images is not None:
        changed["max_images"] = max_images
    return changed


def set_data(
    build: Path, data_dir: str | None, max_images: int | None, split: str, **logits: Any
) -> dict[str, np.ndarray]:
    """Point later steps (calibrate, report) at other data: the logits pass of ``split`` runs on it first, and
    export.json's data fields are rewritten only once it succeeded (a folder that cannot be read changes nothing)."""
    exported = with_data(read_export(build), data_dir, max_images)
    result = reference_logits(build, split, exported=exported, **logits)
    write_json(export_dir(build) / "export.json", exported)
    return result


def run_onnx(path: Path, images: np.ndarray, desc: str, batch_size: int = REFERENCE_BATCH) -> np.ndarray:
    """Logits of one ONNX file on every image, in batches, with a progress bar."""
    from littlebig.export.onnx_export import INPUT_NAME, OUTPUT_NAME, onnx_session

    session = onnx_session(path)
    chunks = [
        session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + batch_size]})[0]
        for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch")
    ]
    return np.concatenate(chunks).astype(np.float32)


def _source(exported: dict[str, Any]) -> str:
    """What the cached logits were computed on: a change of data or sample size recomputes them."""
    source = {k: exported.get(k) for k in ("data_dir", "max_images", "service_size", "class_ids")}
    if exported.get("train_split") is not None:  # only then: the caches of builds without one stay valid
        source["train_split"] = exported["train_split"]
    return json.dumps(source, sort_keys=True)


def reference_logits(
    build: Path,
    split: str,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    exported: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Every stage's logits on a split, from the exported ONNX files (cached beside them).

    One pass over the data feeds every model, batch by batch, so an ImageNet folder is decoded once
    and never held whole; ``device`` auto runs onnxruntime's CUDA provider where it is installed. ``exported``:
    the export record to run (default: export.json's).
    """
    from littlebig.export.onnx_export import INPUT_NAME, OUTPUT_NAME, onnx_session

    exported = exported or read_export(build)
    cache = export_dir(build) / f"logits-{split}.npz"
    stages = stages_of(exported)
    onnx_files = [export_dir(build) / exported[r]["onnx"] for r in stages]
    source = _source(exported)
    if cache.exists() and all(cache.stat().st_mtime >= f.stat().st_mtime for f in onnx_files):
        with np.load(cache) as z:
            # A cache from before data sources were recorded is valid for an export.json from then too.
            legacy = "source" not in z.files and "class_ids" not in exported
            if legacy or ("source" in z.files and str(z["source"]) == source):
                return {k: z[k] for k in z.files if k != "source"}
    size = tuple(exported["service_size"])
    rows, batches = split_batches(
        split, exported["data_dir"], size, max_images=exported.get("max_images"),
        class_ids=exported.get("class_ids"), batch_size=batch_size, workers=workers,
        desc=f"{'+'.join(stages)} on {split}", train_split=exported.get("train_split"),
    )
    sessions = {role: onnx_session(path, device=device) for role, path in zip(stages, onnx_files, strict=True)}
    chunks: dict[str, list[np.ndarray]] = {"labels": [], **{r: [] for r in stages}}
    sha = hashlib.sha256()
    for images, labels in batches:
        sha.update(np.ascontiguousarray(images).tobytes())
        chunks["labels"].append(labels)
        for role, session in sessions.items():
            chunks[role].append(session.run([OUTPUT_NAME], {INPUT_NAME: images})[0].astype(np.float32))
    result = {k: np.concatenate(v) for k, v in chunks.items()}
    if len(result["labels"]) != rows:
        raise RuntimeError(f"{split}: expected {rows} images, got {len(result['labels'])}")
    result["images_sha"] = np.frombuffer(sha.digest(), dtype=np.uint8)
    with replacing_file(cache) as partial, open(partial, "wb") as f:  # a concurrent reader never sees half
        np.savez(f, source=np.asarray(source), **result)
    return result


def outputs(build: Path, split: str):
    """little's and big's outputs (the first and last stage)."""
    return stage_outputs(build, split).pair()


def stage_outputs(build: Path, split: str):
    """Every stage's outputs with its MACs (``calibrate.StageOutputs``)."""
    from littlebig.export.calibrate import StageOutputs

    exported = read_export(build)
    stages = stages_of(exported)
    logits = reference_logits(build, split)
    return StageOutputs(tuple(logits[r] for r in stages), logits["labels"], tuple(exported[r]["macs"] for r in stages))


def check_serve_rule(rules: tuple[str, ...], serve_rule: str) -> None:
    if serve_rule not in rules:
        raise ValueError(f"--serve-rule {serve_rule!r} must be one of the calibrated rules {list(rules)}")


@dataclass(frozen=True)
class RuleCalibration:
    """One rule's calibration: the Ts it serves (one in front of each later stage) and what they gave on val.

    ``figures`` is the rule's record as written (its Ts, accuracy, stage shares, expected MACs and the rule's own
    figures); the named figures below are read from it, so the record stays their one source.
    """

    figures: dict[str, Any]

    def __post_init__(self) -> None:
        _ = (self.thresholds, self.escalation_rate, self.t_min)  # a record whose figures cannot be read: refused now

    @property
    def thresholds(self) -> tuple[float, ...]:
        return tuple(float(t) for t in self.figures.get("thresholds", [self.figures["threshold"]]))

    @property
    def threshold(self) -> float:
        """T in front of the last stage: the one the governor and the guard move."""
        return self.thresholds[-1]

    @property
    def escalation_rate(self) -> float | None:
        """The share of val rows that reach the last stage (big): it sizes big's typical batch (None where a record
        holds only its Ts, as a hand-written or older tensorrt.json may)."""
        return _optional_float(self.figures.get("escalation_rate"))

    @property
    def t_min(self) -> float | None:
        """The lowest T in front of the last stage the load governor may serve (None where not recorded)."""
        return _optional_float(self.figures.get("t_min"))


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class Calibration:
    """``calibration.json`` read by name: what ``littlebig calibrate`` chose and measured on the val split.

    Written once (``calibrate_step``) and read through ``read_calibration``; the file keeps its JSON keys. Only
    the served rule and the rules are required: an earlier or hand-written file (two models, before eps or the
    drift reference were recorded) reads with the defaults below, and what needs a missing figure says so.
    """

    serve_rule: str
    rules: dict[str, RuleCalibration]
    split: str = "val"
    rows: int | None = None
    little_acc: float | None = None
    big_acc: float | None = None
    stages: tuple[str, ...] = ROLES
    stage_acc: tuple[float, ...] = ()
    #: The bounded and guaranteed rules' promise: accuracy loss vs big <= eps with probability >= 1 - delta.
    eps: float | None = None
    delta: float | None = None
    #: The governor's default budget: how far below big's val accuracy a lowered T may go.
    max_accuracy_drop: float | None = None
    #: The drift reference: little's val confidence shares per bin (the served shares are compared with them).
    confidence_bins: tuple[float, ...] = ()
    confidence_shares: tuple[float, ...] = ()

    #: calibration.json's keys in the order it has always written them.
    KEYS = (
        "split", "rows", "serve_rule", "little_acc", "big_acc", "stages", "stage_acc", "rules", "eps", "delta",
        "max_accuracy_drop", "confidence_bins", "confidence_shares",
    )  # fmt: skip

    def rule(self, name: str | None = None) -> RuleCalibration:
        """The named rule's calibration (None: the served rule's); ValueError naming the calibrated ones."""
        name = name or self.serve_rule
        if name not in self.rules:
            raise ValueError(f"rule {name!r} was not calibrated; calibrated: {sorted(self.rules)}")
        return self.rules[name]

    def with_rules(self, rules: dict[str, dict[str, Any]]) -> Calibration:
        """The same calibration with other rule records: those of the TensorRT plans, or of live shadow rows."""
        return replace(self, rules={k: RuleCalibration(r) for k, r in rules.items()})

    def to_record(self) -> dict[str, Any]:
        """The JSON form, in the file's key order; a figure that was not recorded stays out."""
        record = {k: getattr(self, k) for k in self.KEYS}
        record["rules"] = {k: r.figures for k, r in self.rules.items()}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in record.items() if v is not None}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Calibration:
        known = {k: record[k] for k in cls.KEYS if k in record and k not in ("serve_rule", "rules")}
        numbers = {"rows": int, "little_acc": float, "big_acc": float}
        typed = {k: tuple(v) if isinstance(v, list) else numbers.get(k, lambda x: x)(v) for k, v in known.items()}
        rules = {k: RuleCalibration(r) for k, r in record["rules"].items()}
        return cls(serve_rule=record["serve_rule"], rules=rules, **typed)


def calibrate_step(build: Path, rules: tuple[str, ...], serve_rule: str) -> Calibration:
    """Thresholds from the val split only; ``serve_rule`` names the one the server uses by default."""
    from littlebig.decision import CONFIDENCE_BINS
    from littlebig.export.calibrate import DELTA, EPS, MAX_ACCURACY_DROP, calibrate_stages, confidence_shares

    check_serve_rule(rules, serve_rule)
    staged = stage_outputs(build, "val")
    val = staged.pair()
    calibration = Calibration(
        split="val",
        rows=int(len(val.labels)),
        serve_rule=serve_rule,
        little_acc=float(val.little_correct.mean()),
        big_acc=float(val.big_correct.mean()),
        stages=stages_of(read_export(build)),
        stage_acc=tuple(float((p == staged.labels).mean()) for p in staged.predictions),
        rules={k: RuleCalibration(r) for k, r in calibrate_stages(staged, rules).items()},
        eps=EPS,
        delta=DELTA,
        max_accuracy_drop=MAX_ACCURACY_DROP,
        confidence_bins=tuple(CONFIDENCE_BINS),
        confidence_shares=tuple(confidence_shares(val)),
    )
    write_json(build / CALIBRATION_FILE, calibration.to_record())
    return calibration


#: The rule name of a T recalibrated from live shadow records (``littlebig recalibrate --from-shadow``), and its file.
SHADOW_RULE, SHADOW_CALIBRATION = "shadow", "calibration-shadow.json"


def shadow_calibration_step(build: Path, records_dir: Path, since: float | None = None) -> dict[str, Any]:
    """T from the shadow records in ``records_dir`` (those at or after ``since``, Unix seconds), written to
    ``build/calibration-shadow.json``; ``littlebig repo --rule shadow`` serves it. Two-stage cascades only."""
    import numpy as np

    from littlebig.export.calibrate import calibrate_from_shadow
    from littlebig.shadow import read_records

    calibration = read_calibration(build)
    if len(calibration.stages) != 2:
        raise ValueError(
            "recalibration from shadow records covers two-model cascades: a record holds the answer before big, "
            "not every stage's, so the earlier thresholds of a longer cascade cannot be re-tested"
        )
    records = read_records(str(records_dir))
    keep = records["t"] >= (since if since is not None else -np.inf)
    if not keep.any():
        raise ValueError(f"no shadow record in {records_dir} at or after {since}")
    kind = records["kind"][keep]
    unknown = kind == "unknown"
    at_risk = unknown | (records["answer"][keep] != records["big"][keep])
    if calibration.eps is None or calibration.delta is None:
        raise ValueError(f"{build / CALIBRATION_FILE} records no eps and delta: rerun `littlebig calibrate`")
    result = calibrate_from_shadow(records["conf"][keep], at_risk, calibration.eps, calibration.delta)
    record = {
        **result,
        "rule": SHADOW_RULE,
        "promise": "guaranteed (disagreement with big, counting unknown rows as losses) on live rows",
        "eps": calibration.eps,
        "delta": calibration.delta,
        "records_dir": str(records_dir),
        "since": since,
        "first": float(records["t"][keep].min()),
        "last": float(records["t"][keep].max()),
        "kinds": {k: int((kind == k).sum()) for k in ("shadow", "escalated", "unknown")},
        "calibrated_threshold": calibration.rule().threshold,
        "calibrated_rule": calibration.serve_rule,
    }
    write_json(build / SHADOW_CALIBRATION, record)
    return record


def read_tensorrt(build: Path) -> dict[str, Any] | None:
    """``tensorrt.json``, what ``littlebig export --tensorrt`` recorded with the plans (their profiles, precision,
    GPU and calibration on the plans' own outputs); None where no plans were built."""
    path = export_dir(build) / "tensorrt.json"
    return json.loads(path.read_text()) if path.exists() else None


def read_calibration(build: Path) -> Calibration:
    """``calibration.json``, typed; FileNotFoundError saying how to make it."""
    path = build / CALIBRATION_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `littlebig calibrate` (or `make calibrate`) first")
    return Calibration.from_record(json.loads(path.read_text()))
