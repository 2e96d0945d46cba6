"""Build hooks that make a function root (functions/t2v, functions/i2v) a complete Knative func Python project.

func's Python builder (knative/func pkg/oci/python_builder.go) runs `pip install . --target lib` in the scaffolding
it writes to `<function root>/.func/build`, whose pyproject depends on `function @ {root:uri}/f` (`f` links to the
function root). pip insists that this distribution is named `function`, so a function root cannot simply depend on
the `turboflow` project (and the repository root, itself a function project, is named `function` too). Instead the
function root's wheel carries the project: these hooks read the repository's pyproject.toml, the one definition of
the project's packages and dependencies, so nothing is written twice.

    metadata hook  dependencies and console scripts = the repository's [project] ones
    build hook     force-includes every listed package (setuptools package-dir mapping) as `turboflow/...`,
                   the .py files plus the declared package data, never caches or func's own .func/ directories
                   (the function root's own `function` package ships as the top-level `function` only)
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface
from hatchling.metadata.plugin.interface import MetadataHookInterface

REPOSITORY = Path(__file__).resolve().parents[2]


def repository_project() -> dict:
    return tomllib.loads((REPOSITORY / "pyproject.toml").read_text())


def package_sources(project: dict, repository: Path = REPOSITORY) -> dict[str, str]:
    """{absolute source file: path inside the wheel} for every package the repository's pyproject lists.

    A package `a.b.c` lives in `package-dir[a.b] / c` for the longest listed prefix `a.b` (setuptools' rule); it
    ships the `*.py` directly in that directory plus its declared package-data globs (subpackages are listed on
    their own), which leaves out caches, tests and func's `.func/` build directories.
    """
    setuptools = project["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools.get("package-dir", {})
    package_data: dict[str, list[str]] = setuptools.get("package-data", {})
    sources: dict[str, str] = {}
    for package in setuptools["packages"]:
        parts = package.split(".")
        if parts[0] == "function":
            continue  # the repository root's own func entry: a function root brings its own `function` package
        directory = repository / Path(*parts)
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in package_dir:
                directory = repository / package_dir[prefix] / Path(*parts[cut:])
                break
        for pattern in ["*.py", *package_data.get(package, [])]:
            for path in sorted(directory.glob(pattern)):
                if path.is_file():
                    sources[str(path)] = "/".join([*parts, path.relative_to(directory).as_posix()])
    return sources


class FunctionRootMetadata(MetadataHookInterface):
    def update(self, metadata: dict) -> None:
        project = repository_project()["project"]
        metadata["dependencies"] = list(project["dependencies"])
        metadata["scripts"] = dict(project.get("scripts", {}))


class FunctionRootBuild(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        # The function root's own files (its `function` package) ship once, as `function`: hatchling would drop
        # them from the normal selection if they were force-included under turboflow/ as well.
        own = Path(self.root).resolve()
        sources = package_sources(repository_project())
        build_data["force_include"].update({s: t for s, t in sources.items() if not Path(s).is_relative_to(own)})


def get_metadata_hook():
    return FunctionRootMetadata


def get_build_hook():
    return FunctionRootBuild


if __name__ == "__main__":  # `python infra/func/hatch_build.py`: what a function root's wheel carries
    for source, target in package_sources(repository_project()).items():
        print(f"{os.path.relpath(source, REPOSITORY)} -> {target}")
