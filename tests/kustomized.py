"""infra/ kustomizations as the tests see them: rendered by `kubectl kustomize` (turboflow.manifests.render), once
per directory per test session, and handed out as fresh copies so a test may mutate what it gets."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import yaml

from turboflow.manifests import render

INFRA = Path(__file__).resolve().parents[1] / "infra"
# every kustomization under infra/ (tests/test_infra_render.py checks the list is complete)
KUSTOMIZATIONS = (
    "base",
    "knative",
    "overlays/dev",
    "overlays/gpu",
    "overlays/gpu-2x",
    "model-cache",
    "model-cache/warm",
    "image-prepull",
    "monitoring",
    "eventing-auth",
)


@functools.cache
def _parsed(directory: Path) -> tuple[dict, ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where available: the overlays parse often
    return tuple(doc for doc in yaml.load_all(render(directory), Loader=loader) if doc is not None)


def kustomized(directory: str | Path) -> list[dict]:
    """The resources of the kustomization in `directory` (relative paths are under infra/), in kustomize's order."""
    path = Path(directory)
    return copy.deepcopy(list(_parsed((path if path.is_absolute() else INFRA / path).resolve())))


def resource_id(doc: dict) -> tuple[str, str, str, str]:
    """(group, kind, namespace, name): kustomize's identity of a resource (the API version does not count)."""
    api = str(doc.get("apiVersion", ""))
    group = api.split("/", 1)[0] if "/" in api else ""
    meta = doc.get("metadata") or {}
    return group, doc.get("kind", ""), meta.get("namespace") or "", meta.get("name", "")
