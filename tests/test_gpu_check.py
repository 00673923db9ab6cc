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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    # read from the real server's metrics port: the family exists and no output arrived in GPU memory
    assert result["gpu_memory_outputs"] == {"metric": gpu_check.GPU_OUTPUTS_METRIC, "count": 0, "ok": True}
    import torch

    gpus = report["gpus"]  # how many GPUs the host has (instance counts hold on GPU 0 only)
    assert gpus["count"] == torch.cuda.device_count() and len(gpus["names"]) == gpus["count"]
    assert gpus["standin_gpus"] == [] and "cuda_visible_devices" in gpus  # device cpu: no GPU pinned


def test_a_cuda_bundle_pins_the_standins_to_gpu_0(build_dir, tmp_path):
    """KIND_GPU without gpus puts `count` instances on every GPU (Triton model_configuration.md, r24.10 lines
    701-707): on an 8-GPU host "1 and 2 instances" would be 8 and 16. The bundle pins them to GPU 0."""
    record = gpu_check.prepare(build_dir, tmp_path, device="cuda", instance_counts=(1, 2), rows=8)
    assert record["gpus"] == [0]
    for n in (1, 2):
        for role in ("little", "big"):
            text = (gpu_check.repo_dir(tmp_path, n) / role / "config.pbtxt").read_text()
            cfg = text_format.Parse(text, mc.ModelConfig())
            (group,) = cfg.instance_group
            assert group.kind == mc.ModelInstanceGroup.KIND_GPU and list(group.gpus) == [0] and group.count == n


def test_without_a_bundle_or_a_build_it_says_what_to_run(tmp_path, capsys):
    """A fresh clone on a GPU machine: `make gpu-check` found no bundle and no build, and died with a
    FileNotFoundError from read_export. Now it names `make gpu-check-bundle` and exits 2
    (run here through the CPU dry run, the same code path past the CUDA check)."""
    rc = gpu_check.main(["--build", str(tmp_path / "build"), "--device", "cpu", "--no-perf"])
    out = capsys.readouterr().out
    assert rc == 2 and "make gpu-check-bundle" in out and "export/export.json or calibration.json" in out
    assert not (tmp_path / "build").exists()


def test_the_documented_recipe_builds_the_bundle_before_the_check():
    """deploy/README.md's one-line recipe for a GPU machine with a registry names the targets in the order that
    works from a fresh clone (the bundle needs `make setup`; the check needs the bundle)."""
    readme = (ROOT / "deploy" / "README.md").read_text()
    (line,) = [x for x in readme.splitlines() if x.startswith("On a GPU machine with a registry") and "make setup" in x]
    recipe = line[line.index("make setup") :].split("`")[0].split()
    assert recipe == ["make", "setup", "perf-analyzer", "gpu-check-bundle", "&&", "make", "gpu-check"]
    makefiles = (ROOT / "Makefile").read_text() + (ROOT / "mk" / "gpu.mk").read_text()
    assert "\ngpu-check-bundle: setup\n" in makefiles and "\nperf-analyzer:" in (ROOT / "mk" / "bench.mk").read_text()


def test_r_star_is_the_rate_of_little_then_big_back_to_back():
    """R* against figures worked out by hand and rates measured on an H100, not against its own formula."""
    from bench import rates

    assert rates.ideal(1000.0, 100.0, 0.0) == pytest.approx(1000.0)  # nothing escalates: little's rate
    # 300 img/s little, 200 img/s big, half escalate: 1 image costs 1/300 + 0.5/200 = 7/1200 s -> 171.43 img/s
    assert rates.ideal(300.0, 200.0, 0.5) == pytest.approx(1200 / 7)
    assert rates.bound(300.0, 200.0, 0.5) == pytest.approx(1200 / 7 / 200)
    assert rates.ideal(20_255, 486, 0.18) / 486 == pytest.approx(4.9, abs=0.05)  # H100, timm fp16 + CUDA graphs
    assert rates.bls_overhead(6.0, 2.5, 8.0, 0.25) == pytest.approx(1.5)  # 6 ms in all, 2.5 + 2 of them waiting


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


# --- outputs in GPU memory are counted, and an unreadable output fails its chunk only ----------------------

NO_LOGITS_BIG = '''"""big that answers without its LOGITS output: the BLS model cannot read that chunk's logits."""
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[]) for _ in requests]
'''


def bls_module(tmp_path, build_dir, monkeypatch):
    """The served BLS model.py imported outside Triton (its repository folder: the modules installed beside it)."""
    import importlib.util

    from littlebig.model_repository.generate import generate
    from littlebig.model_repository.server import triton_home

    generate(build_dir, tmp_path / "repo", "cpu")
    monkeypatch.syspath_prepend(str(triton_home() / "backends" / "python"))  # triton_python_backend_utils.py
    folder = tmp_path / "repo" / "littlebig" / "1"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location("littlebig_bls_model", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class GpuTensor:
    """MOCK of a GPU tensor (no GPU here): what a KIND_GPU backend's LOGITS are when preferred_memory is ignored."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def is_cpu(self) -> bool:
        return False

    def name(self) -> str:
        return "LOGITS"

    def to_dlpack(self):
        import torch

        return torch.utils.dlpack.to_dlpack(torch.from_numpy(self.values))


def test_an_output_in_gpu_memory_is_counted_and_fails_cleanly_without_torch(tmp_path, build_dir, monkeypatch):
    model = bls_module(tmp_path, build_dir, monkeypatch)
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    seen = []
    got = model.as_numpy(GpuTensor(values), lambda: seen.append(1))
    assert np.array_equal(got, values) and seen == [1]  # copied through torch, but counted: gpu-check sees it
    monkeypatch.setitem(sys.modules, "torch.utils.dlpack", None)  # the NGC image: no torch
    with pytest.raises(RuntimeError, match="in GPU memory and torch is not installed"):
        model.as_numpy(GpuTensor(values), lambda: seen.append(1))
    assert seen == [1, 1]
    with pytest.raises(RuntimeError, match="no LOGITS"):
        model.as_numpy(None)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["little", "error"])
def test_unreadable_big_logits_fail_their_chunk_through_the_policy(build_dir, tmp_path, test_split, policy):
    """On the real server: big answers without LOGITS (as a GPU tensor with no torch to copy it would fail).
    The chunk fails alone, through on_big_failure: DEGRADED answers by little, or UNAVAILABLE naming big; never
    an INTERNAL error for the whole execute (the conversion must not raise out of _run)."""
    from tritonclient.utils import InferenceServerException

    from littlebig.model_repository.generate import ServeOptions
    from tests.helpers import infer, metric, own_server

    data, logits = test_split

    def edit(repo: Path) -> None:
        (repo / "big" / "1" / "model.py").write_text(NO_LOGITS_BIG)

    with own_server(build_dir, tmp_path, ServeOptions(on_big_failure=policy, big_instances=1), edit) as server:
        url = f"127.0.0.1:{server.ports.grpc}"
        confident = infer(url, data.images[:4], 0.0)  # T = 0: nothing escalates, big is never asked
        assert not confident.as_numpy("ESCALATED").any()
        if policy == "little":
            answer = infer(url, data.images[:4], 1.0)
            assert answer.as_numpy("DEGRADED").all()
            assert np.array_equal(answer.as_numpy("LABEL").reshape(-1), logits["little"][:4].argmax(-1))
            assert metric(server, "littlebig_degraded_rows_total") == 4
        else:
            with pytest.raises(InferenceServerException) as exc:
                infer(url, data.images[:4], 1.0)
            assert exc.value.status() == "StatusCode.UNAVAILABLE"
            assert "big failed: its LOGITS could not be read" in exc.value.message()
        assert metric(server, "littlebig_gpu_memory_outputs_total") == 0  # CPU tensors here: nothing counted


def test_the_check_fails_on_outputs_in_gpu_memory(server):
    """The served counter, summed over roles on the real metrics port: 0 passes; a count, or no such family (an
    older BLS model), fails."""
    metrics = f"http://127.0.0.1:{server.ports.metrics}"
    served = gpu_check.HttpClient(server.url).metric_total(metrics, gpu_check.GPU_OUTPUTS_METRIC)
    assert served == 0 and gpu_check.gpu_memory_outputs(served)["ok"]
    assert gpu_check.HttpClient(server.url).metric_total(metrics, "littlebig_no_such_family_total") is None
    assert not gpu_check.gpu_memory_outputs(3.0)["ok"] and not gpu_check.gpu_memory_outputs(None)["ok"]


def test_gpu_venv_reads_the_layout_on_python_3_10_too():
    """GPU images with Python 3.10 have no tomllib: the fallback reader must give what
    tomllib gives on pyproject.toml, be the one used when tomllib is missing, and refuse forms it cannot read."""
    import tomllib

    from bench import gpu_venv

    text = (ROOT / "pyproject.toml").read_text()
    full = tomllib.loads(text)["tool"]["setuptools"]
    assert gpu_venv.layout_without_tomllib(text) == {"packages": full["packages"], "package-dir": full["package-dir"]}
    code = (
        "import sys; sys.modules['tomllib'] = None  # as on Python 3.10\n"
        "from bench import gpu_venv\n"
        "assert gpu_venv.tomllib is None\n"
        "print(sorted(gpu_venv.package_dirs().items()))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(sorted(gpu_venv.package_dirs().items()))
    multi_line = text.replace('packages = ["littlebig", ', 'packages = [\n    "littlebig", ')
    assert multi_line != text and tomllib.loads(multi_line)["tool"]["setuptools"]["packages"] == full["packages"]
    with pytest.raises(ValueError, match="cannot read"):
        gpu_venv.layout_without_tomllib(multi_line)
