"""The offline job, step by step, each writing its build output: export -> reference -> calibrate.

export.json is the contract between steps (and with the repository generator and the client):
service size, class names and, per role, model name, weights, params, MACs, data config, parity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from littlebig.data import load_split

ROLES = ("little", "big")
REFERENCE_BATCH = 256


def export_dir(build: Path) -> Path:
    return build / "export"


def read_export(build: Path) -> dict[str, Any]:
    path = export_dir(build) / "export.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `littlebig export` (or `make export`) first")
    return json.loads(path.read_text())


def parse_size(text: str) -> tuple[int, int, int]:
    """'28x28x1' -> (28, 28, 1): service size as H x W x C."""
    try:
        h, w, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"service size must look like HxWxC (e.g. 28x28x1), got {text!r}") from None
    return h, w, c


def export_pair(
    build: Path,
    weights: dict[str, str],
    names: dict[str, str | None],
    service_size: tuple[int, int, int] | None,
    data_dir: str | None,
) -> dict[str, Any]:
    """Load both models, export each with its preprocessing, check parity on real val images, count MACs."""
    from littlebig.export.macs import count_macs, count_params
    from littlebig.export.models import Preprocessed, data_config, load_classifier
    from littlebig.export.onnx_export import check_parity, export_onnx

    models, class_names = {}, {}
    for role in ROLES:
        models[role], class_names[role] = load_classifier(weights[role], names[role])
    if class_names["little"] != class_names["big"]:
        raise ValueError(
            f"little and big were trained on different classes: {class_names['little']} vs {class_names['big']}"
        )
    if service_size is None:  # default: the big model's own resolution
        c, h, w = data_config(models["big"])["input_size"]
        service_size = (h, w, c)
    images = load_split("val", data_dir, service_size).images
    out_dir = export_dir(build)
    record: dict[str, Any] = {
        "service_size": list(service_size),
        "class_names": class_names["big"],
        "data_dir": data_dir,
    }
    for role in tqdm(ROLES, desc="export"):
        model = models[role]
        net = Preprocessed(model, service_size)
        path = export_onnx(net, out_dir / f"{role}.onnx")
        cfg = data_config(model)
        record[role] = {
            "name": model.default_cfg.get("architecture", type(model).__name__),
            "weights": weights[role],
            "params": count_params(model),
            "macs": count_macs(model, tuple(cfg["input_size"])),
            "data_config": cfg,
            "onnx": path.name,
            "parity": check_parity(net, path, images).as_dict(),
        }
    (out_dir / "export.json").write_text(json.dumps(record, indent=2))
    return record


def run_onnx(path: Path, images: np.ndarray, desc: str, batch_size: int = REFERENCE_BATCH) -> np.ndarray:
    """Logits of one ONNX file on every image, in batches, with a progress bar."""
    from littlebig.export.onnx_export import INPUT_NAME, OUTPUT_NAME, onnx_session

    session = onnx_session(path)
    chunks = [
        session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + batch_size]})[0]
        for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch")
    ]
    return np.concatenate(chunks).astype(np.float32)


def reference_logits(build: Path, split: str) -> dict[str, np.ndarray]:
    """Both models' logits on a split, from the exported ONNX files (cached beside them)."""
    exported = read_export(build)
    cache = export_dir(build) / f"logits-{split}.npz"
    onnx_files = [export_dir(build) / exported[r]["onnx"] for r in ROLES]
    if cache.exists() and all(cache.stat().st_mtime >= f.stat().st_mtime for f in onnx_files):
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    data = load_split(split, exported["data_dir"], tuple(exported["service_size"]))
    result = {"labels": data.labels, "images_sha": np.frombuffer(_sha(data.images), dtype=np.uint8)}
    for role, path in zip(ROLES, onnx_files, strict=True):
        result[role] = run_onnx(path, data.images, f"{role} on {split}")
    np.savez(cache, **result)
    return result


def _sha(images: np.ndarray) -> bytes:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).digest()


def outputs(build: Path, split: str):
    from littlebig.export.calibrate import Outputs

    logits = reference_logits(build, split)
    return Outputs(logits["little"], logits["big"], logits["labels"])


def calibrate_step(build: Path, rules: tuple[str, ...], serve_rule: str) -> dict[str, Any]:
    """Thresholds from the val split only; ``serve_rule`` names the one the server uses by default."""
    from littlebig.export.calibrate import calibrate

    if serve_rule not in rules:
        raise ValueError(f"--serve-rule {serve_rule!r} must be one of the calibrated rules {list(rules)}")
    val = outputs(build, "val")
    record = {
        "split": "val",
        "rows": int(len(val.labels)),
        "serve_rule": serve_rule,
        "little_acc": float(val.little_correct.mean()),
        "big_acc": float(val.big_correct.mean()),
        "rules": calibrate(val, rules),
    }
    (build / "calibration.json").write_text(json.dumps(record, indent=2))
    return record


def read_calibration(build: Path) -> dict[str, Any]:
    path = build / "calibration.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `littlebig calibrate` (or `make calibrate`) first")
    return json.loads(path.read_text())
