"""Nothing is lost: a refused, failed or killed command leaves its previous output byte-for-byte whole.

Each command that writes a build output is run with bad flags or bad inputs against an existing output, which
is hashed before and after; ``kill -9`` lands in the middle of ``littlebig repo`` and ``littlebig export`` and
the output is then exactly the old or exactly the new one; a repository a running server serves is never
rewritten under it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from littlebig import atomic
from littlebig.cli import main

LITTLEBIG = [sys.executable, "-m", "littlebig.cli"]


def tree_digest(path: Path) -> str:
    """One hash of every file's relative path and bytes under ``path`` (or of the file itself)."""
    sha = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        sha.update(str(f.relative_to(path.parent if path.is_file() else path)).encode() + b"\0")
        sha.update(f.read_bytes())
    return sha.hexdigest()


def hidden_siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


@pytest.fixture()
def build(build_dir, tmp_path) -> Path:
    """A private copy of the build (export, calibration) that commands may rewrite."""
    dest = tmp_path / "build"
    (dest / "export").mkdir(parents=True)
    for f in (build_dir / "export").iterdir():
        if f.suffix in (".onnx", ".json", ".npz"):
            shutil.copy2(f, dest / "export" / f.name)
    shutil.copy2(build_dir / "calibration.json", dest / "calibration.json")
    return dest


# --- littlebig/atomic.py ----------------------------------------------------------------------------------


def test_a_failed_folder_write_leaves_the_old_folder_and_no_partial(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic.replacing_dir(out) as tmp:
        (tmp / "a").write_text("new, half")
        raise RuntimeError("stopped halfway")
    assert (out / "a").read_text() == "old" and hidden_siblings(out) == []
    with atomic.replacing_dir(out) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and hidden_siblings(out) == []


def test_a_dead_writers_leftovers_are_cleaned_and_a_set_aside_folder_comes_back(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    aside = tmp_path / f".out.{dead.pid}.replaced"  # a writer without renameat2 killed between its two renames
    aside.mkdir()
    (aside / "a").write_text("old")
    (tmp_path / f".out.{dead.pid}.partial").mkdir()
    atomic.recover(out)
    assert (out / "a").read_text() == "old" and hidden_siblings(out) == []
    atomic.write_json(tmp_path / "r.json", {"k": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"k": 1} and hidden_siblings(tmp_path / "r.json") == []


# --- refused commands change nothing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--shadow-rate", "2"], "--shadow-rate"),
        (["--bls-instances", "0"], "--bls-instances"),
        (["--threshold", "1.5"], "--threshold"),
        (["--queue-timeout-us", "5"], "queue_timeout_us"),
        (["--slo-p99-ms", "-1"], "--slo-p99-ms"),
        (["--max-accuracy-drop", "2"], "--max-accuracy-drop"),
        (["--rule", "magic"], "not calibrated"),
    ],
)
def test_repo_and_serve_with_a_bad_flag_leave_the_repository_whole(build, tmp_path, capsys, flags, named):
    repo = tmp_path / "model_repository"
    assert main(["repo", "--build", str(build), "--out", str(repo)]) == 0
    before = tree_digest(repo)
    for command in (["repo", "--out", str(repo)], ["serve", "--repository", str(repo), "--health-interval", "0"]):
        capsys.readouterr()
        assert main([*command, "--build", str(build), *flags]) == 2
        assert named in capsys.readouterr().err
        assert tree_digest(repo) == before and hidden_siblings(repo) == []


def test_export_refused_leaves_the_export_whole(build, capsys):
    before = tree_digest(build / "export")
    bad = [
        (["--models", "resnet18"], "two or more"),
        (["--big-weights", str(build / "missing.safetensors")], "missing.safetensors"),
        (["--big", "resnet50", "--big-weights", "checkpoints/big.safetensors"], "resnet50"),
        (["--service-size", "28x28"], "HxWxC"),
    ]
    for flags, named in bad:
        capsys.readouterr()
        assert main(["export", "--build", str(build), *flags]) == 2
        assert named in capsys.readouterr().err
        assert tree_digest(build / "export") == before and hidden_siblings(build / "export") == []


def test_calibrate_and_report_refused_leave_their_outputs_whole(build, tmp_path, capsys):
    (build / "report.json").write_text('{"earlier": true}')
    outputs = [build / "export", build / "calibration.json", build / "report.json"]
    before = [tree_digest(p) for p in outputs]
    missing = str(tmp_path / "no-such-folder")
    for argv, named in [
        (["calibrate", "--rules", "paper", "--serve-rule", "bounded"], "--serve-rule"),
        (["calibrate", "--data-dir", missing], "no-such-folder"),
        (["report", "--data-dir", missing], "no-such-folder"),
        (["calibrate", "--max-images", "1"], "--max-images"),
    ]:
        capsys.readouterr()
        assert main([*argv, "--build", str(build)]) == 2, argv
        assert named in capsys.readouterr().err
        assert [tree_digest(p) for p in outputs] == before, argv


def test_recalibrate_refused_writes_nothing(build, tmp_path, capsys):
    not_generated = tmp_path / "by-hand"
    not_generated.mkdir()
    assert main(["recalibrate", "--from-shadow", str(tmp_path), "--build", str(build),
                 "--repository", str(not_generated)]) == 2  # fmt: skip
    assert "littlebig-repository.json not found" in capsys.readouterr().err
    assert not (build / "calibration-shadow.json").exists()


# --- a running server's repository ---------------------------------------------------------------------------


def test_a_served_repository_is_never_rewritten_under_its_server(server, repository, build_dir, capsys):
    before = tree_digest(repository)
    assert main(["repo", "--build", str(build_dir), "--out", str(repository), "--bls-instances", "1"]) == 2
    assert f"pid {server.process.pid}" in capsys.readouterr().err
    assert tree_digest(repository) == before


# --- kill -9 mid-write ---------------------------------------------------------------------------------------


def _kill_during(argv: list[str], delays: list[float], out: Path, is_old, is_new) -> list[str]:
    """Start ``argv`` once per delay and SIGKILL it after that long; each time the output must be exactly the old
    one or a whole new one. Returns which it was, per kill."""
    seen = []
    for delay in delays:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = "old" if is_old() else "new" if is_new() else None
        assert state, f"killed after {delay:.2f} s: {out} is neither the old nor the new output"
        seen.append(state)
    return seen


def _timed_run(argv: list[str]) -> float:
    began = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - began


def test_a_failure_halfway_through_repo_leaves_the_old_repository(build, tmp_path, monkeypatch):
    """The third config written raises (as a full disk would): the old repository stays, no scratch is left."""
    from littlebig.model_repository import generate as generator

    repo = tmp_path / "model_repository"
    generator.generate(build, repo, "cpu")
    before = tree_digest(repo)
    written = []
    real = generator.write_config

    def failing(config, model_dir):
        written.append(model_dir)
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        return real(config, model_dir)

    monkeypatch.setattr(generator, "write_config", failing)
    with pytest.raises(OSError, match="No space"):
        generator.generate(build, repo, "cpu", generator.ServeOptions(bls_instances=1))
    assert len(written) == 3 and tree_digest(repo) == before and hidden_siblings(repo) == []


@pytest.mark.slow
def test_kill_9_during_repo_leaves_the_old_or_the_new_repository(build, tmp_path):
    repo = tmp_path / "model_repository"
    old = [*LITTLEBIG, "repo", "--build", str(build), "--out", str(repo)]
    new = [*old, "--bls-instances", "1"]
    _timed_run(new)
    new_digest = tree_digest(repo)
    seconds = _timed_run(old)
    old_digest = tree_digest(repo)
    assert old_digest != new_digest
    # Kills spread over the whole run (imports, reads, the writes at its end) and past it.
    delays = [seconds * f for f in (0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.2, 1.5)]
    seen = _kill_during(
        new, delays, repo, lambda: tree_digest(repo) == old_digest, lambda: tree_digest(repo) == new_digest
    )
    assert all(n.endswith(".partial") for n in hidden_siblings(repo))  # at most a dead writer's scratch
    assert main(["repo", "--build", str(build), "--out", str(repo)]) == 0  # the next run cleans it
    assert hidden_siblings(repo) == [] and tree_digest(repo) == old_digest
    print(f"\n{len(delays)} kills: {seen.count('old')} left the old repository, {seen.count('new')} the new")


@pytest.mark.slow
def test_kill_9_during_export_leaves_the_old_or_the_new_export(build, tmp_path):
    """The new export (other data: --max-images) is recognised by its record and whole ONNX files."""
    export = build / "export"
    pristine = tmp_path / "pristine"
    shutil.copytree(export, pristine)
    old_digest = tree_digest(export)
    argv = [*LITTLEBIG, "export", "--build", str(build), "--max-images", "64"]
    seconds = _timed_run(argv)

    def is_new() -> bool:
        import onnx

        record = json.loads((export / "export.json").read_text())
        files = sorted(p.name for p in export.iterdir())
        if record.get("max_images") != 64 or files != sorted(["export.json", *(f"{s}.onnx" for s in record["stages"])]):
            return False
        for stage in record["stages"]:
            onnx.checker.check_model(str(export / f"{stage}.onnx"))
        return True

    assert is_new()
    shutil.rmtree(export)
    shutil.copytree(pristine, export)
    delays = [seconds * f for f in (0.3, 0.5, 0.7, 0.85, 1.0)]
    seen = _kill_during(argv, delays, export, lambda: tree_digest(export) == old_digest, is_new)
    print(f"\n{len(seen)} kills during export: {seen.count('old')} left the old export, {seen.count('new')} the new")
