"""The package stack is one way (docs/ARCHITECTURE.md): import-linter's contracts in pyproject.toml hold.

import-linter reads a package from disk. The repository maps its top-level folders onto `turboflow`
(`[tool.setuptools.package-dir]`), so each test lays the sources out as they are installed (copies of the .py
files) and lints that tree with the real `lint-imports`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def _installed_layout(target: Path) -> Path:
    config = tomllib.loads(PYPROJECT.read_text())
    package_dirs = config["tool"]["setuptools"]["package-dir"]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package, folder in sorted(package_dirs.items()):  # "turboflow" first, then its subpackages
        shutil.copytree(ROOT / folder, target / package.replace(".", "/"), ignore=ignore, dirs_exist_ok=True)
    shutil.copy(PYPROJECT, target / "pyproject.toml")
    return target


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--config", "pyproject.toml", "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_stack_is_one_way(tmp_path):
    result = _lint_imports(_installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_import_against_the_stack_is_caught(tmp_path):
    tree = _installed_layout(tmp_path)
    with (tree / "turboflow" / "engine" / "request.py").open("a") as module:
        module.write("\nfrom turboflow.eventing import types as _upward  # noqa: E402\n")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert "turboflow.engine.request -> turboflow.eventing.types" in result.stdout
