"""``make gpu-check`` on a machine without a GPU: the skip line, and the same check code on the CPU.

The gpu-standin repository is served on the embedded tritonserver with the stand-ins' device set to cpu:
the same stand-in model.py, BLS model, reference and answer check as on the GPU, minus CUDA (the
stand-ins then return LOGITS in CPU memory instead of GPU memory; the BLS model's GPU-memory path is
the lead's model.py, exercised on a GPU only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
ROWS = 240


def test_without_a_gpu_it_prints_one_line_and_exits_0(tmp_path):
    if gpu_check.cuda_device() is not None:
        pytest.skip("a CUDA device is present: make gpu-check runs for real")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--build", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "skipped: no CUDA device\n"), done.stderr
    assert not (tmp_path / "gpu-check.json").exists() and not (tmp_path / "gpu-check").exists()
    # through make too: the target needs neither `make setup` nor a registry, and echoes nothing else
    done = subprocess.run(
        ["make", "-s", "--no-print-directory", "gpu-check", f"BUILD={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "skipped: no CUDA device\n"), done.stderr


@pytest.fixture(scope="module")
def bundle(build_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-check")
    gpu_check.prepare(build_dir, out, device="cpu", instance_counts=(1,), rows=ROWS)
    return out


def test_bundle_holds_the_standin_repository(bundle):
    meta, images = gpu_check.read_bundle(bundle)
    assert images.shape[0] == ROWS == meta["rows"] and images.dtype == np.uint8
    repo = gpu_check.repo_dir(bundle, 1)
    for role in ("little", "big"):
        cfg = text_format.Parse((repo / role / "config.pbtxt").read_text(), mc.ModelConfig())
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        assert cfg.backend == "python" and params["device"] == "cpu" and "stand_in_for" in params
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU  # KIND_GPU with device cuda
        assert json.loads(params["buckets"]) == meta["buckets"][role]
        assert meta["buckets"][role][-1] == cfg.max_batch_size
        assert (repo / role / "1" / "model.safetensors").exists()
    summary = json.loads((repo / "littlebig-repository.json").read_text())
    assert summary["profile"] == "gpu-standin" and summary["threshold"] == meta["threshold"]


def test_standins_are_the_exported_models(bundle, build_dir):
    """The stand-ins (torch, from the checkpoints) give the ONNX export's logits: the same trained pair."""
    from littlebig.export.pipeline import reference_logits

    meta, images = gpu_check.read_bundle(bundle)
    ref = gpu_check.compute_reference(gpu_check.repo_dir(bundle, 1), images, "cpu", meta["buckets"], meta["threshold"])
    onnx = reference_logits(build_dir, "test")
    for role in ("little", "big"):
        for logits in ref.logits[role].values():
            assert np.abs(logits - onnx[role][:ROWS]).max() < 1e-3
    assert max(ref.bucket_spread().values()) < 1e-3


def test_compare_catches_a_wrong_answer(bundle):
    meta, images = gpu_check.read_bundle(bundle)
    ref = gpu_check.compute_reference(gpu_check.repo_dir(bundle, 1), images, "cpu", meta["buckets"], meta["threshold"])
    rows = np.arange(10)
    esc, label, probs = ref.candidates(rows)
    served = {"LABEL": label[0].reshape(-1, 1), "ESCALATED": esc[0].reshape(-1, 1), "PROBS": probs[0],
              "DEGRADED": np.zeros((10, 1), bool)}  # fmt: skip
    assert gpu_check.compare(ref, rows, served).all()
    wrong = {**served, "LABEL": served["LABEL"].copy()}
    wrong["LABEL"][3] = (wrong["LABEL"][3] + 1) % probs.shape[-1]
    assert list(np.flatnonzero(~gpu_check.compare(ref, rows, wrong))) == [3]
    flipped = {**served, "ESCALATED": ~served["ESCALATED"]}
    assert not gpu_check.compare(ref, rows, flipped).any()
    off = {**served, "PROBS": served["PROBS"] + 2 * gpu_check.PROBS_ATOL}
    assert not gpu_check.compare(ref, rows, off).any()
    degraded = {**served, "DEGRADED": np.ones((10, 1), bool)}
    assert not gpu_check.compare(ref, rows, degraded).any()


def test_standin_cascade_served_equals_the_reference(bundle, tmp_path, capsys):
    """The whole check (run_check), as a dry run on the CPU: real tritonserver, stand-ins with device cpu.

    Speed is left out here (--no-perf: perf_analyzer on 2 busy cores says nothing about a GPU); the
    perf_analyzer path is bench/perf.py's, tested in tests/test_bench.py.
    """
    rc = gpu_check.main(["--build", str(tmp_path), "--bundle", str(bundle), "--device", "cpu", "--no-perf"])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    result = report["answers"]
    assert rc == 0 and result["ok"], out + json.dumps(result, indent=1)
    sequential = len(gpu_check.BATCH_SIZES) * min(512, ROWS)  # each batch size over the first rows
    assert result["rows_checked"] == sequential + ROWS and result["rows_differing"] == 0
    assert set(result["cases"]) == {*(f"batch {b}" for b in gpu_check.BATCH_SIZES), "16 clients"}
    assert 0 < result["escalated_rows"] < result["rows_checked"]  # both paths of the cascade ran
    assert result["big_inference_count_delta"] == result["escalated_rows"]
    assert report["speed"] == "not measured: --no-perf" and "dry run" in report["gpu"]
    assert "answers: " in out and "passed" in out


def test_r_star():
    assert gpu_check.r_star(1000.0, 100.0, 0.0) == pytest.approx(1000.0)
    assert gpu_check.r_star(1000.0, 100.0, 1.0) == pytest.approx(1 / (1 / 1000 + 1 / 100))
    assert gpu_check.r_star(20_255, 486, 0.18) / 486 == pytest.approx(4.9, abs=0.05)  # FACTS.md's H100 row


def test_gpu_venv_maps_the_package_layout_ahead_of_the_bare_littlebig_folder(tmp_path):
    """The registry-free venv's finder (bench/gpu_venv.py): from the repo root, where a bare littlebig/ sits
    first on sys.path, ``littlebig.export`` must still resolve to export/ (no site, no editable install)."""
    from bench import gpu_venv

    dirs = gpu_venv.package_dirs()
    assert dirs["littlebig.export"] == str((ROOT / "export").resolve())
    assert set(dirs) == {"littlebig", "littlebig.export", "littlebig.client", "littlebig.model_repository"}
    (tmp_path / "_littlebig_layout.py").write_text(gpu_venv.FINDER.format(packages=dirs))
    code = (
        f"import sys; sys.path.insert(1, {str(tmp_path)!r}); import importlib.util\n"
        "assert importlib.util.find_spec('littlebig.export') is None  # the bare folder alone\n"
        "sys.modules.pop('littlebig', None); import _littlebig_layout\n"
        "find = importlib.util.find_spec\n"
        "print(find('littlebig.export').origin, find('littlebig.model_repository.torch_standin').origin)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    export, standin = done.stdout.split()
    assert export == str(ROOT / "export" / "__init__.py")
    assert standin == str(ROOT / "model_repository" / "torch_standin.py")
