"""The Knative/eventing-natss CRDs (copied under tests/data/knative-crds, see SOURCE.md there) as JSON Schemas."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator

CRDS = Path(__file__).parent / "data" / "knative-crds"


def crd_to_json_schema(node):
    """An openAPIV3Schema as JSON Schema. Objects with `properties` and no x-kubernetes-preserve-unknown-fields
    reject unknown keys (the API server would prune them silently, which is how typos get lost), int-or-string
    becomes anyOf, x-kubernetes-* annotations and descriptions are dropped."""
    if isinstance(node, list):
        return [crd_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: crd_to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "description"
    }
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_validators(metadata_schema: dict | None = None) -> dict:
    """{(apiVersion, kind): validator} for every CRD version; `metadata_schema` types metadata (default: object)."""
    out = {}
    for f in sorted(CRDS.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                schema = crd_to_json_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                metadata = {"type": "object"}
                if metadata_schema is not None:
                    schema["$defs"] = {"meta": metadata_schema}
                    metadata = {"$ref": "#/$defs/meta"}
                schema.setdefault("properties", {}).update(
                    apiVersion={"type": "string"}, kind={"type": "string"}, metadata=metadata
                )
                out[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = Draft202012Validator(schema)
    return out
