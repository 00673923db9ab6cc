"""Make the venv ``make gpu-check`` runs in on a GPU machine that has no package registry.

That machine's python3 has torch (CUDA) and timm, but numpy 2, with which every tensor the 2.51 Python
backend builds from numpy has byte size 0 (measured on an H100). So: a venv made
``--without-pip``; numpy < 2 unpacked from a brought wheel (a wheel is a zip: unpacking it is its
install); a ``.pth`` to the system site-packages that hold torch (after the venv's own, so numpy 1.26
wins); nvidia-pytriton's ``pytriton/`` and ``nvidia_pytriton.libs/`` copied in (the tritonserver tree);
and littlebig's sources mapped as pyproject.toml lays them out (``littlebig.export`` = ``export/``...)
by a meta-path finder, as an editable install would do. Run it with the system python3 (stdlib only).

Python 3.10 is supported, as pyproject.toml's ``requires-python`` says: GPU images with 3.10
have no ``tomllib``, so the two setuptools tables this needs are then read by :func:`layout_without_tomllib`,
which accepts only the plain forms pyproject.toml uses and refuses anything else.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]

FINDER = '''"""littlebig's package layout (pyproject.toml's package-dir) for this venv: written by bench/gpu_venv.py."""
import importlib.abc
import importlib.util
import sys

PACKAGES = {packages!r}


class LittlebigLayout(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in PACKAGES:
            return None
        init = PACKAGES[name] + "/__init__.py"
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[PACKAGES[name]])


sys.meta_path.insert(0, LittlebigLayout())  # ahead of the working directory, which holds a bare littlebig/
'''


def layout_without_tomllib(text: str) -> dict:
    """``[tool.setuptools]`` ``packages`` and ``[tool.setuptools.package-dir]`` from pyproject.toml text, without
    tomllib (Python 3.10): single-line ``key = value`` entries whose values are basic strings or one-line arrays
    of them (the TOML forms that are also Python literals). ValueError on anything else in those two tables."""
    tables: dict[str, dict] = {}
    current = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        header = re.fullmatch(r"\[([^\[\]]+)\]", line)
        if header:
            current = header.group(1).strip()
            continue
        if current not in ("tool.setuptools", "tool.setuptools.package-dir"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip().strip('"'), value.strip()
        try:
            parsed = ast.literal_eval(value) if sep and not value.startswith("'") else None
        except (ValueError, SyntaxError):
            parsed = None
        if not (isinstance(parsed, str) or (isinstance(parsed, list) and all(isinstance(v, str) for v in parsed))):
            if current == "tool.setuptools" and key != "packages":
                continue  # other setuptools keys are not needed here
            raise ValueError(f"pyproject.toml line {number}: cannot read {raw.strip()!r} without tomllib")
        tables.setdefault(current, {})[key] = parsed
    setuptools = tables.get("tool.setuptools", {})
    if "packages" not in setuptools:
        raise ValueError("pyproject.toml: no [tool.setuptools] packages")
    return {**setuptools, "package-dir": tables.get("tool.setuptools.package-dir", {})}


def setuptools_layout(text: str) -> dict:
    """pyproject.toml's ``[tool.setuptools]`` table (tomllib where there is one: Python 3.11+)."""
    if tomllib is None:
        return layout_without_tomllib(text)
    return tomllib.loads(text)["tool"]["setuptools"]


def package_dirs(root: Path = ROOT) -> dict[str, str]:
    """littlebig's packages and their source folders, from pyproject.toml."""
    setuptools = setuptools_layout((root / "pyproject.toml").read_text())
    mapping = setuptools.get("package-dir", {})
    return {name: str((root / mapping.get(name, name.replace(".", "/"))).resolve()) for name in setuptools["packages"]}


def site_packages(venv: Path) -> Path:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return Path(out.stdout.strip())


def make_venv(venv: Path, numpy_wheel: Path, pytriton_site: Path, system_python: str = sys.executable) -> Path:
    """Create (or refresh) the venv; return its site-packages."""
    if not numpy_wheel.is_file() or not numpy_wheel.name.startswith("numpy-1."):
        raise SystemExit(f"--numpy-wheel must be a numpy 1.x wheel for this python, got {numpy_wheel}")
    for name in ("pytriton/tritonserver/bin/tritonserver", "nvidia_pytriton.libs"):
        if not (pytriton_site / name).exists():
            raise SystemExit(f"{pytriton_site / name} not found: --pytriton-site holds nvidia-pytriton's install")
    subprocess.run([system_python, "-m", "venv", "--without-pip", "--clear", str(venv)], check=True)
    site = site_packages(venv)
    with zipfile.ZipFile(numpy_wheel) as wheel:
        wheel.extractall(site)
    torch_site = subprocess.run(
        [system_python, "-c", "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (site / "littlebig-system-torch.pth").write_text(torch_site + "\n")
    for name in ("pytriton", "nvidia_pytriton.libs"):
        shutil.copytree(pytriton_site / name, site / name, symlinks=True, dirs_exist_ok=True)
    home = site / "pytriton" / "tritonserver"
    for exe in [home / "bin" / "tritonserver", *home.glob("python_backend_stubs/*/triton_python_backend_stub")]:
        exe.chmod(0o755)
    (site / "_littlebig_layout.py").write_text(FINDER.format(packages=package_dirs()))
    (site / "littlebig-layout.pth").write_text("import _littlebig_layout\n")
    return site


def check(venv: Path) -> str:
    """Import what the check and the stand-ins import, from a folder holding a bare littlebig/ (the repo root)."""
    code = (
        "import numpy, torch, timm, bench.gpu_check\n"
        "import littlebig.export.models, littlebig.model_repository.torch_standin\n"
        "assert int(numpy.__version__.split('.')[0]) < 2, numpy.__version__\n"
        "print(f'numpy {numpy.__version__}, torch {torch.__version__}, CUDA {torch.cuda.is_available()}')"
    )
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{venv} does not import what gpu-check needs:\n{done.stderr[-2000:]}")
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-gpu")
    parser.add_argument("--numpy-wheel", type=Path, required=True, help="numpy 1.26 wheel for this python")
    parser.add_argument("--pytriton-site", type=Path, required=True, help="folder with pytriton/ and its libs")
    args = parser.parse_args(argv)
    site = make_venv(args.venv, args.numpy_wheel, args.pytriton_site)
    print(f"{args.venv} ({sysconfig.get_python_version()}): {check(args.venv)}; packages in {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
