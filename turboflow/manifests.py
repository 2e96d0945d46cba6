"""`turboflow manifests render DIR`: build a kustomization (the subset infra/ uses) without a kustomize binary.

infra/ is laid out for real kustomize (`kubectl apply -k infra/overlays/gpu`). This module renders the same
directories in pure Python so tests and machines without kubectl can see exactly what would be applied.
Supported, with kustomize's semantics:

* `resources`: YAML files and directories holding a kustomization (`kustomization.yaml`, `kustomization.yml`
  or `Kustomization`), recursively. Files must lie inside the kustomization's directory tree (kustomize's
  default load restrictor); directories may be anywhere.
* `labels`: `pairs` added to `metadata.labels` of every resource (`includeSelectors` / `includeTemplates`
  must be false: selectors of running workloads are immutable, and kustomize only knows template paths for
  built-in kinds).
* `commonAnnotations`.
* `patches`: `path` or inline `patch`; a YAML list is a JSON 6902 patch (needs `target`), a mapping is a
  strategic-merge patch (maps merge, `null` deletes a key, lists are replaced; a list of maps
  may be set only where the target has none: see `strategic_merge`). A strategic-merge patch
  without `target` applies to the resource with its own kind, name and namespace (an unset namespace means
  `default`, as in kustomize). `target` fields are exact (name is an anchored regular expression), unset
  ones match anything.
* `images`: `name` -> `newName` / `newTag` / `digest` in every `containers` / `initContainers` list.
* `configMapGenerator` with `disableNameSuffixHash: true` (in `options` or `generatorOptions`): `files`
  (`key=path` or `path`) and `literals`, plus `options.labels` / `options.annotations`.

Anything else in a kustomization is an error (never silently ignored). Output order follows kustomize's legacy
ordering (Namespace, ServiceAccount, ... ConfigMap, Secret, Service, PVC, Deployment ... webhooks last).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import yaml

from turboflow.errors import TurboflowError

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "labels",
    "commonAnnotations",
    "patches",
    "images",
    "configMapGenerator",
    "generatorOptions",
}
_ORDER_FIRST = (
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
)
_ORDER_LAST = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")


class ManifestError(TurboflowError):
    """A kustomization this renderer cannot build exactly as kustomize would (or that kustomize would reject)."""

    code = "manifest_error"


# ---------------------------------------------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------------------------------------------
def _group_version(doc: dict) -> tuple[str, str]:
    api = str(doc.get("apiVersion", ""))
    return tuple(api.split("/", 1)) if "/" in api else ("", api)  # type: ignore[return-value]


def resource_id(doc: dict) -> tuple[str, str, str, str]:
    """(group, kind, namespace, name): kustomize's identity of a resource (the version does not count)."""
    meta = doc.get("metadata") or {}
    return _group_version(doc)[0], doc.get("kind", ""), meta.get("namespace") or "", meta.get("name", "")


def _ns_equal(a: str | None, b: str | None) -> bool:
    return (a or "default") == (b or "default")


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------
def find_kustomization(directory: Path) -> Path:
    found = [directory / n for n in KUSTOMIZATION_FILES if (directory / n).is_file()]
    if not found:
        raise ManifestError(f"{directory}: no kustomization file ({', '.join(KUSTOMIZATION_FILES)})")
    if len(found) > 1:
        raise ManifestError(f"{directory}: found multiple kustomization files: {[p.name for p in found]}")
    return found[0]


def _inside(root: Path, path: Path, what: str) -> Path:
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise ManifestError(
            f"{what} {path} is not in or below {root} (kustomize's load restrictor rejects it; "
            f"reference a directory with its own kustomization instead)"
        )
    return resolved


def _load_docs(path: Path) -> list[dict]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: invalid YAML: {e}") from e
    for d in docs:
        if (
            not isinstance(d, dict)
            or not d.get("kind")
            or not d.get("apiVersion")
            or not (d.get("metadata") or {}).get("name")
        ):
            raise ManifestError(f"{path}: every document needs apiVersion, kind and metadata.name")
        if d["kind"].endswith("List") and "items" in d:
            raise ManifestError(f"{path}: List documents are not supported")
    return docs


# ---------------------------------------------------------------------------------------------------------------
# patches
# ---------------------------------------------------------------------------------------------------------------
def strategic_merge(target, patch, _path: str = ""):
    """Merge `patch` into `target` (plain YAML data): maps merge, `null` deletes a key, lists are replaced.

    kustomize merges lists of maps by a merge key only where it knows the kind's schema (built-in kinds), and
    replaces them for custom resources such as Knative Services, so patching `containers` with a strategic-merge
    patch silently drops every field of the container the patch does not repeat. To keep this renderer exact for
    every kind, a list of maps may only be *set* where the target has none; to change list elements, use a
    JSON 6902 patch."""
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return copy.deepcopy(patch)
    if "$patch" in patch or any(k.startswith("$") for k in patch):
        raise ManifestError("strategic-merge directives ($patch, $setElementOrder, ...) are not supported")
    out = copy.deepcopy(target)
    for key, value in patch.items():
        where = f"{_path}/{key}"
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = strategic_merge(out[key], value, where)
        else:
            if isinstance(value, list) and any(isinstance(x, dict) for x in value) and out.get(key):
                raise ManifestError(
                    f"strategic-merge patch at {where} would replace an existing list of objects "
                    f"(kustomize merges it by key for built-in kinds, replaces it for custom "
                    f"resources): use a JSON 6902 patch"
                )
            out[key] = copy.deepcopy(value)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ManifestError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc, parts: list[str], path: str):
    node = doc
    for p in parts:
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ManifestError(f"JSON patch path {path}: no element {p!r}")
            node = node[int(p)]
        elif isinstance(node, dict):
            if p not in node:
                raise ManifestError(f"JSON patch path {path}: no key {p!r}")
            node = node[p]
        else:
            raise ManifestError(f"JSON patch path {path}: {p!r} is below a scalar")
    return node


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 (add, remove, replace, test, copy, move) on a copy of `doc`."""
    out = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path")
        if kind not in ("add", "remove", "replace", "test", "copy", "move") or path is None:
            raise ManifestError(f"invalid JSON patch operation: {op}")
        parts = _pointer(path)
        if kind == "test":
            if _walk(out, parts, path) != op.get("value"):
                raise ManifestError(f"JSON patch test failed at {path}")
            continue
        if kind in ("copy", "move"):
            value = copy.deepcopy(_walk(out, _pointer(op["from"]), op["from"]))
            if kind == "move":
                out = json_patch(out, [{"op": "remove", "path": op["from"]}])
            out = json_patch(out, [{"op": "add", "path": path, "value": value}])
            continue
        if not parts:
            raise ManifestError("JSON patch on the document root is not supported")
        parent, last = _walk(out, parts[:-1], path), parts[-1]
        if isinstance(parent, list):
            if kind == "add":
                i = len(parent) if last == "-" else int(last) if last.isdigit() else -1
                if not 0 <= i <= len(parent):
                    raise ManifestError(f"JSON patch path {path}: bad index {last!r}")
                parent.insert(i, copy.deepcopy(op["value"]))
                continue
            if not last.isdigit() or int(last) >= len(parent):
                raise ManifestError(f"JSON patch path {path}: no element {last!r}")
            if kind == "remove":
                del parent[int(last)]
            else:
                parent[int(last)] = copy.deepcopy(op["value"])
        elif isinstance(parent, dict):
            if kind in ("remove", "replace") and last not in parent:
                raise ManifestError(f"JSON patch {kind} {path}: no key {last!r}")
            if kind == "remove":
                del parent[last]
            else:
                parent[last] = copy.deepcopy(op["value"])
        else:
            raise ManifestError(f"JSON patch path {path}: parent is a scalar")
    return out


def _matches(doc: dict, target: dict) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise ManifestError(f"patch target fields {sorted(unknown)} are not supported")
    group, version = _group_version(doc)
    meta = doc.get("metadata") or {}
    checks = {"group": group, "version": version, "kind": doc.get("kind", ""), "namespace": meta.get("namespace", "")}
    for key, have in checks.items():
        if key in target and target[key] != have:
            return False
    return "name" not in target or re.fullmatch(target["name"], meta.get("name", "")) is not None


def _apply_patch(docs: list[dict], entry: dict, base: Path, root: Path) -> list[dict]:
    unknown = set(entry) - {"path", "patch", "target", "options"}
    if unknown or ("path" in entry) == ("patch" in entry) or entry.get("options"):
        raise ManifestError(f"{base}: a patch needs exactly one of path/patch (no options): {entry}")
    text = _inside(root, base / entry["path"], "patch").read_text() if "path" in entry else entry["patch"]
    body = yaml.safe_load(text)
    target = entry.get("target")
    if isinstance(body, list):
        if not target:
            raise ManifestError(f"{base}: a JSON 6902 patch needs a target")
        hits = [i for i, d in enumerate(docs) if _matches(d, target)]
        if not hits:
            raise ManifestError(f"{base}: patch target {target} matches no resource")
        for i in hits:
            docs[i] = json_patch(docs[i], body)
        return docs
    if not isinstance(body, dict):
        raise ManifestError(f"{base}: a patch must be a mapping (strategic merge) or a list (JSON 6902)")
    if target:
        hits = [i for i, d in enumerate(docs) if _matches(d, target)]
    else:
        meta = body.get("metadata") or {}
        hits = [
            i
            for i, d in enumerate(docs)
            if d.get("kind") == body.get("kind")
            and d["metadata"].get("name") == meta.get("name")
            and _group_version(d)[0] == _group_version(body)[0]
            and _ns_equal(d["metadata"].get("namespace"), meta.get("namespace"))
        ]
    if not hits:
        raise ManifestError(
            f"{base}: strategic-merge patch for {body.get('kind')}/"
            f"{(body.get('metadata') or {}).get('name')} matches no resource"
        )
    if target:  # the target picks the resources; the patch's own identity is not merged into them
        body = copy.deepcopy(body)
        for key in ("apiVersion", "kind"):
            body.pop(key, None)
        for key in ("name", "namespace"):
            (body.get("metadata") or {}).pop(key, None)
    for i in hits:
        docs[i] = strategic_merge(docs[i], body)
    return docs


# ---------------------------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------------------------
def _split_image(image: str) -> tuple[str, str, str]:
    """name, ':tag' or '', '@digest' or ''."""
    digest = ""
    if "@" in image:
        image, digest = image.split("@", 1)
        digest = "@" + digest
    tag = ""
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        image, tag = image[:colon], image[colon:]
    return image, tag, digest


def _set_images(node, images: list[dict]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and isinstance(c.get("image"), str):
                        c["image"] = _new_image(c["image"], images)
            _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def _new_image(image: str, images: list[dict]) -> str:
    name, tag, digest = _split_image(image)
    for rule in images:
        if rule["name"] != name:
            continue
        name = rule.get("newName", name)
        if "digest" in rule:
            return f"{name}@{rule['digest']}"
        if "newTag" in rule:
            tag, digest = ":" + str(rule["newTag"]), ""
        return name + tag + digest
    return image


def _generate_configmaps(spec: dict, base: Path, root: Path) -> list[dict]:
    out = []
    default_no_hash = (spec.get("generatorOptions") or {}).get("disableNameSuffixHash", False)
    for gen in spec.get("configMapGenerator") or []:
        unknown = set(gen) - {"name", "namespace", "files", "literals", "options", "behavior"}
        if unknown or gen.get("behavior", "create") != "create":
            raise ManifestError(f"{base}: configMapGenerator fields {sorted(unknown)} / behavior are not supported")
        options = gen.get("options") or {}
        if not options.get("disableNameSuffixHash", default_no_hash):
            raise ManifestError(
                f"{base}: configMapGenerator {gen.get('name')}: only disableNameSuffixHash: true "
                f"is supported (this renderer does not compute kustomize's name hash)"
            )
        data: dict[str, str] = {}
        for item in gen.get("files") or []:
            key, _, rel = item.partition("=") if "=" in item else (Path(item).name, "", item)
            data[key] = _inside(root, base / rel, "file").read_text()
        for item in gen.get("literals") or []:
            key, _, value = item.partition("=")
            data[key] = value
        meta = {"name": gen["name"]}
        if gen.get("namespace"):
            meta["namespace"] = gen["namespace"]
        if options.get("labels"):
            meta["labels"] = dict(options["labels"])
        if options.get("annotations"):
            meta["annotations"] = dict(options["annotations"])
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return out


# ---------------------------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------------------------
def build(directory: str | Path, _stack: tuple = ()) -> list[dict]:
    """Every resource of the kustomization in `directory`, transformed, in kustomize's legacy order."""
    base = Path(directory).resolve()
    if base in _stack:
        raise ManifestError(f"kustomization cycle through {base}")
    kfile = find_kustomization(base)
    spec = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(spec) - _SUPPORTED
    if unknown:
        raise ManifestError(f"{kfile}: fields {sorted(unknown)} are not supported by this renderer")
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise ManifestError(f"{kfile}: kind must be Kustomization")

    docs: list[dict] = []
    for res in spec.get("resources") or []:
        path = base / res
        if path.is_dir():
            docs.extend(build(path, _stack + (base,)))
        elif path.is_file():
            docs.extend(_load_docs(_inside(base, path, "resource")))
        else:
            raise ManifestError(f"{kfile}: resource {res} does not exist")
    docs.extend(_generate_configmaps(spec, base, base))

    seen: dict[tuple, int] = {}
    for i, d in enumerate(docs):
        rid = resource_id(d)
        if rid in seen:
            raise ManifestError(f"{kfile}: resource {'/'.join(x for x in rid if x)} is defined twice")
        seen[rid] = i

    for entry in spec.get("patches") or []:
        docs = _apply_patch(docs, entry, base, base)
    for group in spec.get("labels") or []:
        if group.get("includeSelectors") or group.get("includeTemplates"):
            raise ManifestError(f"{kfile}: labels with includeSelectors/includeTemplates are not supported")
        for d in docs:
            d["metadata"].setdefault("labels", {}).update({k: str(v) for k, v in group.get("pairs", {}).items()})
    if spec.get("commonAnnotations"):
        for d in docs:
            d["metadata"].setdefault("annotations", {}).update(
                {k: str(v) for k, v in spec["commonAnnotations"].items()}
            )
    if spec.get("images"):
        for d in docs:
            _set_images(d, spec["images"])
    return sort_resources(docs)


def sort_resources(docs: list[dict]) -> list[dict]:
    def key(d):
        kind = d.get("kind", "")
        if kind in _ORDER_FIRST:
            rank = _ORDER_FIRST.index(kind)
        elif kind in _ORDER_LAST:
            rank = len(_ORDER_FIRST) + 1 + _ORDER_LAST.index(kind)
        else:
            rank = len(_ORDER_FIRST)
        group, version = _group_version(d)
        meta = d.get("metadata") or {}
        return rank, group, version, kind, meta.get("namespace", ""), meta.get("name", "")

    return sorted(docs, key=key)


def to_yaml(docs: list[dict]) -> str:
    return "---\n".join(yaml.safe_dump(d, sort_keys=False, default_flow_style=False, width=120) for d in docs)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("manifests", help="render infra/ kustomizations without a kustomize binary")
    msub = p.add_subparsers(dest="manifests_command", metavar="ACTION")
    msub.required = True
    r = msub.add_parser("render", help="print the resources `kubectl apply -k DIR` would apply")
    r.add_argument("dir", help="a kustomization directory, e.g. infra/overlays/gpu")
    r.add_argument("-o", "--out", help="write to this file instead of stdout")
    r.set_defaults(func=_render)


def _render(args) -> int:
    text = to_yaml(build(args.dir))
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


__all__ = ["build", "to_yaml", "strategic_merge", "json_patch", "resource_id", "register", "ManifestError"]
