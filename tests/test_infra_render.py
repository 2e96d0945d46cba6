"""turboflow.manifests: the pure-Python kustomize subset. Unit semantics on small kustomizations, the CLI verb, and
(where kubectl is installed) byte-for-byte agreement with real kustomize on every infra/ kustomization."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from turboflow.manifests import ManifestError, build, json_patch, register, resource_id, strategic_merge, to_yaml

ROOT = Path(__file__).resolve().parents[1]
KUSTOMIZATIONS = [
    "base",
    "knative",
    "overlays/dev",
    "overlays/gpu",
    "model-cache",
    "model-cache/warm",
    "monitoring",
    "eventing-auth",
]


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        data if isinstance(data, str) else yaml.safe_dump_all(data) if isinstance(data, list) else yaml.safe_dump(data)
    )
    return path


def deployment(name="web", ns="apps", image="example/web:1"):
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "template": {
                "spec": {"containers": [{"name": "web", "image": image, "env": [{"name": "A", "value": "1"}]}]}
            }
        },
    }


def ksvc(name="fn", ns="apps"):
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "template": {
                "spec": {"containers": [{"name": "fn", "image": "example/fn:1", "env": [{"name": "A", "value": "1"}]}]}
            }
        },
    }


def kustomization(d: Path, **fields) -> None:
    write(
        d / "kustomization.yaml", {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **fields}
    )


def test_strategic_merge_semantics():
    base = {"a": {"b": 1, "c": 2}, "l": [1, 2], "objs": [{"name": "x", "v": 1}], "gone": 1}
    out = strategic_merge(base, {"a": {"c": 3, "d": 4}, "l": [3], "gone": None, "new": [{"name": "y"}]})
    assert out == {"a": {"b": 1, "c": 3, "d": 4}, "l": [3], "objs": [{"name": "x", "v": 1}], "new": [{"name": "y"}]}
    assert base["a"] == {"b": 1, "c": 2}  # inputs untouched
    # kustomize merges such a list by name for built-in kinds but replaces it for custom resources: refused
    with pytest.raises(ManifestError, match="JSON 6902"):
        strategic_merge(base, {"objs": [{"name": "x", "v": 2}]})
    with pytest.raises(ManifestError, match="directives"):
        strategic_merge(base, {"$patch": "delete"})


def test_json_patch_operations():
    doc = {"spec": {"list": [{"name": "a"}], "m": {"x/y": 1}}}
    out = json_patch(
        doc,
        [
            {"op": "test", "path": "/spec/list/0/name", "value": "a"},
            {"op": "add", "path": "/spec/list/-", "value": {"name": "b"}},
            {"op": "add", "path": "/spec/list/0", "value": {"name": "first"}},
            {"op": "replace", "path": "/spec/m/x~1y", "value": 2},
            {"op": "copy", "from": "/spec/m", "path": "/spec/m2"},
            {"op": "move", "from": "/spec/m2", "path": "/spec/m3"},
            {"op": "remove", "path": "/spec/list/1"},
        ],
    )
    assert out == {"spec": {"list": [{"name": "first"}, {"name": "b"}], "m": {"x/y": 2}, "m3": {"x/y": 2}}}
    assert doc == {"spec": {"list": [{"name": "a"}], "m": {"x/y": 1}}}
    with pytest.raises(ManifestError, match="test failed"):
        json_patch(doc, [{"op": "test", "path": "/spec/list/0/name", "value": "zzz"}])
    with pytest.raises(ManifestError, match="no key"):
        json_patch(doc, [{"op": "replace", "path": "/spec/missing", "value": 1}])
    with pytest.raises(ManifestError, match="no element"):
        json_patch(doc, [{"op": "remove", "path": "/spec/list/5"}])


def test_overlay_with_patches_labels_images_and_generator(tmp_path):
    base, overlay = tmp_path / "base", tmp_path / "overlay"
    write(base / "objs.yaml", [deployment(), ksvc()])
    kustomization(base, resources=["objs.yaml"], labels=[{"pairs": {"team": "video"}, "includeSelectors": False}])
    write(overlay / "files" / "a.txt", "hello\n")
    write(
        overlay / "smp.yaml",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "apps"},
            "spec": {"replicas": 3},
        },
    )
    write(
        overlay / "json.yaml",
        yaml.safe_dump(
            [{"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": "B", "value": "2"}}]
        ),
    )
    kustomization(
        overlay,
        resources=["../base"],
        patches=[
            {"path": "smp.yaml"},
            {"path": "json.yaml", "target": {"group": "serving.knative.dev", "kind": "Service", "name": "f."}},
        ],
        images=[
            {"name": "example/web", "newTag": "2"},
            {"name": "example/fn", "newName": "reg.io/fn", "digest": "sha256:abc"},
        ],
        configMapGenerator=[
            {
                "name": "cfg",
                "namespace": "apps",
                "files": ["a.txt=files/a.txt"],
                "literals": ["K=V"],
                "options": {"disableNameSuffixHash": True, "labels": {"x": "y"}},
            }
        ],
    )
    docs = {resource_id(d)[1]: d for d in build(overlay)}
    # legacy order ranks by kind name only (as kustomize does): a Knative Service sorts with core Services
    assert [d["kind"] for d in build(overlay)] == ["ConfigMap", "Service", "Deployment"]
    dep, svc, cm = docs["Deployment"], docs["Service"], docs["ConfigMap"]
    assert dep["spec"]["replicas"] == 3 and dep["spec"]["template"]["spec"]["containers"][0]["image"] == "example/web:2"
    assert svc["spec"]["template"]["spec"]["containers"][0]["env"] == [
        {"name": "A", "value": "1"},
        {"name": "B", "value": "2"},
    ]
    assert svc["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.io/fn@sha256:abc"
    assert cm["data"] == {"a.txt": "hello\n", "K": "V"} and cm["metadata"]["labels"] == {"x": "y"}
    assert dep["metadata"]["labels"] == {"team": "video"} and "team" not in cm["metadata"]["labels"]  # base only
    # the output round-trips as YAML
    assert list(yaml.safe_load_all(to_yaml(build(overlay)))) == build(overlay)


def test_kustomize_rules_are_enforced(tmp_path):
    outside = write(tmp_path / "outside.yaml", [deployment()])
    d = tmp_path / "k"
    kustomization(d, resources=["../outside.yaml"])
    with pytest.raises(ManifestError, match="not in or below"):
        build(d)
    kustomization(d, resources=["a.yaml", "b.yaml"])
    write(d / "a.yaml", [deployment()])
    write(d / "b.yaml", [deployment()])
    with pytest.raises(ManifestError, match="defined twice"):
        build(d)
    kustomization(d, resources=["a.yaml"], namePrefix="x-")
    with pytest.raises(ManifestError, match="not supported"):
        build(d)
    # a strategic-merge patch without a namespace means `default`, as in kustomize: it matches nothing here
    write(
        d / "p.yaml",
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 2}},
    )
    kustomization(d, resources=["a.yaml"], patches=[{"path": "p.yaml"}])
    with pytest.raises(ManifestError, match="matches no resource"):
        build(d)
    kustomization(d, resources=["a.yaml"], configMapGenerator=[{"name": "c", "literals": ["a=b"]}])
    with pytest.raises(ManifestError, match="disableNameSuffixHash"):
        build(d)
    write(d / "kustomization.yml", "resources: []\n")
    with pytest.raises(ManifestError, match="multiple kustomization files"):
        build(d)
    assert outside.is_file()


def test_cli_renders_an_overlay(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "gpu.yaml"
    args = parser.parse_args(["manifests", "render", str(ROOT / "infra/overlays/gpu"), "-o", str(out)])
    assert args.func(args) == 0
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert docs == build(ROOT / "infra/overlays/gpu")
    assert docs[0]["kind"] == "Namespace"
    args = parser.parse_args(["manifests", "render", str(ROOT / "infra/knative")])
    assert args.func(args) == 0
    assert "allow-zero-initial-scale" in capsys.readouterr().out


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with built-in kustomize) is not installed")
@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_agrees_with_real_kustomize(kdir):
    """The layout is genuinely kustomize-compatible: `kubectl kustomize` builds the same objects."""
    proc = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / "infra" / kdir)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    theirs = {resource_id(d): d for d in yaml.safe_load_all(proc.stdout) if d}
    ours = {resource_id(d): d for d in build(ROOT / "infra" / kdir)}
    assert set(theirs) == set(ours)
    for rid, doc in ours.items():
        assert doc == theirs[rid], rid
