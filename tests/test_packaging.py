"""The repo layout maps onto turboflow.* subpackages; a package missing from pyproject would be missing from the
container image (non-editable install) while every editable test still passed."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {
    "turboflow": "turboflow",
    "engine": "turboflow.engine",
    "storage": "turboflow.storage",
    "eventing": "turboflow.eventing",
    "functions": "turboflow.functions",
    "billing": "turboflow.billing",
    "gateway": "turboflow.gateway",
}


def test_every_package_directory_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert config["package-dir"] == {name: top for top, name in MAPPED.items()}
    found = set()
    for top, name in MAPPED.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *rel.parts]))
    found.add("function")  # the repository root's func-python package (func.yaml), not mapped
    assert (ROOT / "function" / "__init__.py").is_file()
    assert found - listed == set(), "add these to [tool.setuptools] packages"
    assert listed - found == set(), "listed but no __init__.py"


def test_the_version_is_the_projects():
    from turboflow import __version__

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == __version__


def test_cli_entry_point_resolves():
    from turboflow.cli import build_parser

    parser = build_parser()
    assert parser.prog == "turboflow"
