"""A user's ImageNet folder, streamed: the loader (split, labels, bounded memory) and the whole
export -> calibrate -> report path on an ImageNet-layout folder of real images (Fashion-MNIST JPEGs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from littlebig.cli import main
from littlebig.data import read_image
from littlebig.export.models import create_classifier, load_classifier, save_checkpoint
from littlebig.imagenet import folder_split, index_folder, is_imagenet_folder, iter_batches, split_rows
from tests.imagenet_fixture import SYNSETS, make_imagenet_folder

ROOT = Path(__file__).resolve().parent.parent
CFG = {"interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_mode": "center"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, list[str], np.ndarray]:
    root = tmp_path_factory.mktemp("imagenet") / "val"
    files, labels = make_imagenet_folder(root, 300, width=40, height=32)
    return root, files, labels


def test_index_split_and_labels(folder):
    root, files, labels = folder
    assert is_imagenet_folder(root) and not is_imagenet_folder(root / SYNSETS[0]) and not is_imagenet_folder(None)
    index = index_folder(root)
    assert index.class_names == SYNSETS and len(index) == 300
    by_file = dict(zip(files, labels.tolist()))
    assert all(by_file[f] == lab for f, lab in zip(index.files, index.labels.tolist()))
    val, test = split_rows(300, "val"), split_rows(300, "test")
    assert len(val) == len(test) == 150 and not set(val) & set(test) and set(val) | set(test) == set(range(300))
    assert np.array_equal(split_rows(300, "val"), val)  # fixed seed
    quick = split_rows(300, "val", max_images=40), split_rows(300, "test", max_images=40)
    assert len(quick[0]) == len(quick[1]) == 20 and not set(quick[0]) & set(quick[1])
    # Mapped by name onto the model's class ids (timm's 1000 synsets): a subset of folders still scores right.
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    ids = [info.index_to_label_name(i) for i in range(1000)]
    mapped = folder_split(root, "test", class_ids=ids)
    assert [ids[i] for i in mapped.labels] == [f.split("/")[0] for f in mapped.files]
    with pytest.raises(ValueError, match="does not know"):
        index_folder(root, class_ids=["a", "b"])


def test_batches_decode_in_workers_equal_in_process(folder):
    root, _, _ = folder
    index = folder_split(root, "val")
    inline = list(iter_batches(index, (24, 24, 3), batch_size=32, workers=0))
    pooled = list(iter_batches(index, (24, 24, 3), batch_size=32, workers=2))
    assert [len(b) for b, _ in pooled] == [32] * 4 + [22]
    assert all(np.array_equal(a, b) and np.array_equal(la, lb) for (a, la), (b, lb) in zip(inline, pooled))
    # the reference is torchvision's eval framing (timm's for crop_pct 1): Resize(shorter side, bicubic) on the
    # PIL image, then CenterCrop; every file of the split, byte for byte
    from PIL import Image
    from torchvision import transforms

    frame = transforms.Compose(
        [transforms.Resize(24, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(24)]
    )
    for name in index.files:
        with Image.open(root / name) as img:
            expected = np.asarray(frame(img.convert("RGB")))
        assert np.array_equal(read_image(root / name, (24, 24, 3)), expected), name
    bad = root / SYNSETS[0] / "broken.JPEG"
    bad.write_bytes(b"not a jpeg")
    try:
        with pytest.raises(ValueError, match="broken.JPEG: not a readable image"):
            list(iter_batches(index_folder(root), (24, 24, 3), batch_size=64, workers=2))
    finally:
        bad.unlink()


def _peak(root: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tests.loader_memory", str(root), "64", "64", "2"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_loader_memory_does_not_grow_with_the_folder(tmp_path):
    """2,000 vs 20,000 images at 64x64x3: held whole, the larger would need 221 MB more."""
    small, large = tmp_path / "small", tmp_path / "large"
    make_imagenet_folder(small, 2000)
    make_imagenet_folder(large, 20000)
    a, b = _peak(small), _peak(large)
    assert (a["images"], b["images"]) == (2000, 20000)
    print(f"loader peak: 2,000 images {a}, 20,000 images {b}")
    # What may grow: the index (file names, labels: ~0.2 KB an image, ~4 MB here). The pixels may not.
    assert b["tracemalloc_peak"] - a["tracemalloc_peak"] < 8 * 2**20
    assert b["rss_growth_kib"] - a["rss_growth_kib"] < 24 * 1024
    assert b["rss_growth_kib"] < 64 * 1024


def _checkpoint(path: Path, name: str, size: int, crop_pct: float, seed: int, **kwargs) -> str:
    torch.manual_seed(seed)
    cfg = {**CFG, "input_size": (3, size, size), "crop_pct": crop_pct}
    model = create_classifier(name, num_classes=10, pretrained_cfg=cfg, model_kwargs=kwargs).eval()
    save_checkpoint(model, path, name=name, class_names=list(SYNSETS))
    return str(path)


@pytest.mark.slow
def test_export_calibrate_report_on_an_imagenet_folder(folder, tmp_path):
    """Random-weight timm models at two resolutions: little 32 (downscaled in its graph), big 48."""
    root, files, labels = folder
    little = _checkpoint(tmp_path / "little.safetensors", "resnet10t", 32, 0.875, 0)
    big = _checkpoint(tmp_path / "big.safetensors", "deit_tiny_patch16_224", 48, 1.0, 1, img_size=48)
    build = tmp_path / "build"
    common = ["--build", str(build), "--workers", "2"]
    assert main([
        "export", "--little", "resnet10t", "--big", "deit_tiny_patch16_224", "--little-weights", little,
        "--big-weights", big, "--data-dir", str(root), *common,
    ]) == 0
    exported = json.loads((build / "export" / "export.json").read_text())
    assert exported["service_size"] == [48, 48, 3] and exported["class_ids"] == list(SYNSETS)
    assert exported["little"]["resize"] == {"to": [36, 36], "antialias": True, "pil_resize": False}
    assert exported["big"]["resize"]["antialias"] is False  # 48 -> 48: no resize at all
    assert main(["calibrate", *common, "--device", "auto"]) == 0
    assert main(["report", *common]) == 0
    report = json.loads((build / "report.json").read_text())
    assert report["rows"] == {"val": 150, "test": 150}
    assert set(report["rules"]) == {"paper", "bounded", "guaranteed"} and report["serve_rule"] == "bounded"
    for r in report["rules"].values():  # the resampling spread of T is reported for every rule
        t = r["val_resampling"]["threshold"]
        assert t["p5"] <= t["p50"] <= t["p95"] and t["width"] == pytest.approx(t["p95"] - t["p5"])
    for rule in report["rules"].values():
        assert 0 <= rule["escalation_rate"] <= 1 and 0 <= rule["threshold"] <= 1
        assert rule["expected_macs"] == pytest.approx(
            report["little"]["macs"] + rule["escalation_rate"] * report["big"]["macs"]
        )
    # The cached logits are the ONNX files on the streamed test half, labelled by folder name.
    from littlebig.export.onnx_export import onnx_session

    cache = np.load(build / "export" / "logits-test.npz")
    index = folder_split(root, "test", class_ids=list(SYNSETS))
    assert np.array_equal(cache["labels"], index.labels)
    images = np.concatenate([b for b, _ in iter_batches(index, (48, 48, 3), workers=0)])
    for role in ("little", "big"):
        got = onnx_session(build / "export" / f"{role}.onnx").run(None, {"IMAGE": images})[0]
        assert np.abs(got - cache[role]).max() < 1e-5
    assert (build / "tradeoff.png").exists() and (build / "threshold-spread.png").exists()
    assert "## T over val resamples" in (build / "report.md").read_text()
    # A quick run on a sample: recorded, and the cached logits follow it.
    assert main(["calibrate", *common, "--max-images", "60"]) == 0
    assert json.loads((build / "calibration.json").read_text())["rows"] == 30
    assert main(["report", *common]) == 0
    quick = json.loads((build / "report.json").read_text())
    assert quick["rows"] == {"val": 30, "test": 30} and quick["data"] == {"data_dir": str(root), "max_images": 60}


@pytest.mark.slow
def test_pretrained_path_with_a_local_file_for_the_download(folder, tmp_path):
    """timm's pretrained=True path, its hub download replaced by a local file (pretrained_cfg file=...)."""
    torch.manual_seed(3)
    hub = create_classifier("resnet10t", num_classes=1000).eval()
    weights = tmp_path / "resnet10t.pth"
    torch.save(hub.state_dict(), weights)
    model, names = load_classifier(f"pretrained:{weights}", "resnet10t")
    assert len(names) == 1000 and names[0].startswith("tench")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), hub.state_dict().values()))
    assert model.pretrained_cfg["crop_pct"] == hub.pretrained_cfg["crop_pct"]  # timm's own data config
    with pytest.raises(FileNotFoundError):
        load_classifier(f"pretrained:{tmp_path / 'missing.pth'}", "resnet10t")
    root, _, _ = folder
    build = tmp_path / "build"
    assert main([
        "export", "--little", "resnet10t", "--big", "resnet10t", "--little-weights", f"pretrained:{weights}",
        "--big-weights", f"pretrained:{weights}", "--data-dir", str(root), "--service-size", "64x64x3",
        "--max-images", "40", "--build", str(build), "--workers", "1",
    ]) == 0
    exported = json.loads((build / "export" / "export.json").read_text())
    assert exported["little"]["resize"]["pil_resize"] and exported["little"]["resize"]["antialias"]
    assert exported["class_ids"][:10] == list(SYNSETS) and len(exported["class_ids"]) == 1000
    assert main(["calibrate", "--build", str(build), "--workers", "1"]) == 0
    logits = np.load(build / "export" / "logits-val.npz")
    assert logits["little"].shape == (20, 1000) and set(logits["labels"]) <= set(range(10))
