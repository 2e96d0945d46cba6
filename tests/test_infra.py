"""infra/: every kustomization renders (`kubectl kustomize`, tests/kustomized.py), every object validates (Knative
kinds against the upstream CRD schemas copied in tests/data/knative-crds, core kinds against typed schemas below),
and the deployment policy holds: GPU only in the gpu overlay, concurrency 1, scale-to-zero settings backed by the
cluster config, ordered timeouts, probes, non-root, read-only model cache, consistent names and metrics."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from crd_schemas import CRDS, crd_validators  # noqa: F401
from jsonschema import Draft202012Validator
from kustomized import INFRA, KUSTOMIZATIONS, kustomized, resource_id

from turboflow.eventing.triggers import parse_duration as iso_seconds

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ["overlays/dev", "overlays/gpu", "overlays/gpu-2x"]
FUNCTIONS = {"turboflow-t2v": "t2v", "turboflow-i2v": "i2v"}
GATEWAY = "turboflow-gateway"
# COMMON.md's shared numbers
REVISION_TIMEOUT = {"turboflow-t2v": 600, "turboflow-i2v": 900}
MAX_REVISION_TIMEOUT = 1800
MODEL_DIRS = {"turboflow-t2v": "/models/wan2.1-t2v-1.3b-480p", "turboflow-i2v": "/models/wan2.2-i2v-a14b-720p"}
GPU_PRODUCTS = {"NVIDIA-H100-80GB-HBM3", "NVIDIA-H200", "NVIDIA-GeForce-RTX-5090"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {k: kustomized(k) for k in KUSTOMIZATIONS}


def kind(docs, k, group=None):
    return [d for d in docs if d["kind"] == k and (group is None or d["apiVersion"].startswith(group))]


def ksvc(docs, name):
    (svc,) = [d for d in kind(docs, "Service", "serving.knative.dev") if d["metadata"]["name"] == name]
    return svc


def container(svc) -> dict:
    (c,) = svc["spec"]["template"]["spec"]["containers"]
    return c


def env(c) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def go_seconds(text: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a Go duration: {text!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}[u] for n, u in parts)


def knative_config(rendered, namespace, name) -> dict:
    (cm,) = [
        d for d in rendered["knative"] if d["metadata"]["namespace"] == namespace and d["metadata"]["name"] == name
    ]
    return cm["data"]


# ---------------------------------------------------------------------------------------------------------------
# schemas
# ---------------------------------------------------------------------------------------------------------------
def _crd_validators() -> dict:
    return crd_validators(META)


# Typed schemas for the core kinds infra/ uses: the fields turboflow sets, nothing else (a typo fails).
STR = {"type": "string"}
STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$"}
DNS1123 = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
META = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {"name": DNS1123, "namespace": DNS1123, "labels": STRMAP, "annotations": STRMAP},
}


def obj(props, required=()):
    return {"type": "object", "additionalProperties": False, "properties": props, "required": list(required)}


PROBE = obj(
    {
        "httpGet": obj({"path": STR, "port": {"type": ["integer", "string"]}}, ["path"]),
        "periodSeconds": {"type": "integer", "minimum": 1},
        "timeoutSeconds": {"type": "integer", "minimum": 1},
        "failureThreshold": {"type": "integer", "minimum": 1},
        "initialDelaySeconds": {"type": "integer"},
    },
    ["httpGet"],
)
ENV = obj(
    {
        "name": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
        "value": STR,
        "valueFrom": obj(
            {"secretKeyRef": obj({"name": STR, "key": STR, "optional": {"type": "boolean"}}, ["name", "key"])}
        ),
    },
    ["name"],
)
SECURITY = obj(
    {
        "runAsNonRoot": {"type": "boolean"},
        "runAsUser": {"type": "integer"},
        "runAsGroup": {"type": "integer"},
        "allowPrivilegeEscalation": {"type": "boolean"},
        "readOnlyRootFilesystem": {"type": "boolean"},
        "capabilities": obj({"drop": {"type": "array", "items": STR}}),
        "seccompProfile": obj({"type": {"enum": ["RuntimeDefault", "Localhost"]}}, ["type"]),
    }
)
CONTAINER = obj(
    {
        "name": DNS1123,
        "image": STR,
        "command": {"type": "array", "items": STR},
        "args": {"type": "array", "items": STR},
        "ports": {
            "type": "array",
            "items": obj({"name": STR, "containerPort": {"type": "integer"}}, ["containerPort"]),
        },
        "env": {"type": "array", "items": ENV},
        "resources": obj(
            {
                "requests": {"type": "object", "additionalProperties": QUANTITY},
                "limits": {"type": "object", "additionalProperties": QUANTITY},
            }
        ),
        "volumeMounts": {
            "type": "array",
            "items": obj({"name": STR, "mountPath": STR, "readOnly": {"type": "boolean"}}, ["name", "mountPath"]),
        },
        "securityContext": SECURITY,
        "readinessProbe": PROBE,
        "livenessProbe": PROBE,
        "startupProbe": PROBE,
    },
    ["name", "image"],
)
MATCH_EXPRESSIONS = {
    "type": "array",
    "items": obj(
        {"key": STR, "operator": {"enum": ["In", "NotIn", "Exists"]}, "values": {"type": "array", "items": STR}},
        ["key", "operator"],
    ),
}
NODE_AFFINITY = obj(
    {
        "nodeAffinity": obj(
            {
                "requiredDuringSchedulingIgnoredDuringExecution": obj(
                    {"nodeSelectorTerms": {"type": "array", "items": obj({"matchExpressions": MATCH_EXPRESSIONS})}},
                    ["nodeSelectorTerms"],
                ),
                "preferredDuringSchedulingIgnoredDuringExecution": {
                    "type": "array",
                    "items": obj(
                        {
                            "weight": {"type": "integer", "minimum": 1, "maximum": 100},
                            "preference": obj({"matchExpressions": MATCH_EXPRESSIONS}),
                        },
                        ["weight", "preference"],
                    ),
                },
            }
        )
    }
)
POD_SPEC = obj(
    {
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never"]},
        "automountServiceAccountToken": {"type": "boolean"},
        "serviceAccountName": STR,
        "securityContext": obj(
            {
                "runAsNonRoot": {"type": "boolean"},
                "runAsUser": {"type": "integer"},
                "runAsGroup": {"type": "integer"},
                "fsGroup": {"type": "integer"},
                "seccompProfile": obj({"type": STR}, ["type"]),
            }
        ),
        "affinity": NODE_AFFINITY,
        "tolerations": {
            "type": "array",
            "items": obj({"key": STR, "operator": {"enum": ["Exists", "Equal"]}, "value": STR, "effect": STR}),
        },
        "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
        "volumes": {
            "type": "array",
            "items": obj(
                {
                    "name": STR,
                    "persistentVolumeClaim": obj({"claimName": STR, "readOnly": {"type": "boolean"}}, ["claimName"]),
                    # k8s also takes HugePages media, which no manifest here uses
                    "emptyDir": obj({"sizeLimit": QUANTITY, "medium": {"enum": ["", "Memory"]}}),
                },
                ["name"],
            ),
        },
    },
    ["containers"],
)
POD_TEMPLATE = obj({"metadata": obj({"labels": STRMAP, "annotations": STRMAP}), "spec": POD_SPEC}, ["spec"])


def core(api, spec_schema=None, extra=None):
    props = {"apiVersion": {"const": api}, "kind": STR, "metadata": META}
    if spec_schema is not None:
        props["spec"] = spec_schema
    props.update(extra or {})
    return Draft202012Validator(obj(props, ["apiVersion", "kind", "metadata"] + (["spec"] if spec_schema else [])))


CORE_VALIDATORS = {
    ("v1", "Namespace"): core("v1"),
    ("v1", "ServiceAccount"): core("v1", extra={"automountServiceAccountToken": {"type": "boolean"}}),
    ("v1", "ConfigMap"): core("v1", extra={"data": STRMAP}),
    ("v1", "PersistentVolumeClaim"): core(
        "v1",
        obj(
            {
                "accessModes": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]},
                },
                "storageClassName": STR,
                "resources": obj({"requests": obj({"storage": QUANTITY}, ["storage"])}),
            },
            ["accessModes", "resources"],
        ),
    ),
    ("batch/v1", "Job"): core(
        "batch/v1",
        obj(
            {
                "backoffLimit": {"type": "integer"},
                "activeDeadlineSeconds": {"type": "integer"},
                "template": POD_TEMPLATE,
            },
            ["template"],
        ),
    ),
    ("apps/v1", "DaemonSet"): core(
        "apps/v1",
        obj(
            {
                "selector": obj({"matchLabels": STRMAP}, ["matchLabels"]),
                "updateStrategy": obj({"type": STR}),
                "template": POD_TEMPLATE,
            },
            ["selector", "template"],
        ),
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): core(
        "monitoring.coreos.com/v1",
        obj(
            {
                "selector": obj(
                    {
                        "matchExpressions": {
                            "type": "array",
                            "items": obj(
                                {
                                    "key": STR,
                                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                    "values": {"type": "array", "items": STR},
                                },
                                ["key", "operator"],
                            ),
                        },
                        "matchLabels": STRMAP,
                    }
                ),
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": obj(
                        {
                            "port": STR,
                            "path": STR,
                            "interval": STR,
                            "scrapeTimeout": STR,
                            "relabelings": {
                                "type": "array",
                                "items": obj({"sourceLabels": {"type": "array", "items": STR}, "targetLabel": STR}),
                            },
                        }
                    ),
                },
            },
            ["selector", "podMetricsEndpoints"],
        ),
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): core(
        "monitoring.coreos.com/v1",
        obj(
            {
                "groups": {
                    "type": "array",
                    "items": obj(
                        {
                            "name": STR,
                            "interval": STR,
                            "rules": {
                                "type": "array",
                                "items": {
                                    "oneOf": [
                                        obj(
                                            {
                                                "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                                                "expr": STR,
                                            },
                                            ["record", "expr"],
                                        ),
                                        obj(
                                            {
                                                "alert": {"type": "string", "pattern": r"^[A-Za-z][A-Za-z0-9]*$"},
                                                "expr": STR,
                                                "for": STR,
                                                "labels": STRMAP,
                                                "annotations": STRMAP,
                                            },
                                            ["alert", "expr", "labels", "annotations"],
                                        ),
                                    ]
                                },
                            },
                        },
                        ["name", "rules"],
                    ),
                }
            },
            ["groups"],
        ),
    ),
}
CRD_VALIDATORS = _crd_validators()


def test_schemas_are_loaded_and_strict():
    for key in [
        ("serving.knative.dev/v1", "Service"),
        ("eventing.knative.dev/v1", "Broker"),
        ("eventing.knative.dev/v1", "Trigger"),
        ("sources.knative.dev/v1", "ContainerSource"),
        ("sources.knative.dev/v1", "SinkBinding"),
    ]:
        assert key in CRD_VALIDATORS, key
    svc = ksvc(kustomized("overlays/gpu"), "turboflow-t2v")
    typo = copy.deepcopy(svc)
    typo["spec"]["template"]["spec"]["containerConcurency"] = 1
    assert list(CRD_VALIDATORS[("serving.knative.dev/v1", "Service")].iter_errors(typo))
    probe = copy.deepcopy(svc)
    container(probe)["startupProbe"]["failureTreshold"] = 3
    assert list(CRD_VALIDATORS[("serving.knative.dev/v1", "Service")].iter_errors(probe))
    bad_quantity = copy.deepcopy(svc)
    container(bad_quantity)["resources"]["requests"]["memory"] = "24 GB"
    assert list(
        CORE_VALIDATORS[("v1", "PersistentVolumeClaim")].iter_errors(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "x"},
                "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "24 GB"}}},
            }
        )
    )


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_every_object_validates(rendered, kdir):
    docs = rendered[kdir]
    assert docs
    ids = [resource_id(d) for d in docs]
    assert len(ids) == len(set(ids))
    for d in docs:
        key = (d["apiVersion"], d["kind"])
        validator = CRD_VALIDATORS.get(key) or CORE_VALIDATORS.get(key)
        assert validator is not None, f"{kdir}: no schema for {key}"
        errors = sorted(validator.iter_errors(d), key=lambda e: list(e.path))
        assert not errors, (d["kind"], d["metadata"]["name"], [f"{list(e.path)}: {e.message}" for e in errors])
        # the Knative CRD leaves the PodSpec loosely typed in places: hold its containers to the typed schema too
        if d["kind"] == "Service" and d["apiVersion"] == "serving.knative.dev/v1":
            template = {k: v for k, v in d["spec"]["template"].items()}
            spec = {
                k: v
                for k, v in template["spec"].items()
                if k not in ("containerConcurrency", "timeoutSeconds", "enableServiceLinks")
            }
            errors = list(Draft202012Validator(POD_TEMPLATE).iter_errors({**template, "spec": spec}))
            assert not errors, (d["metadata"]["name"], [f"{list(e.path)}: {e.message}" for e in errors])


def test_overlays_contain_the_whole_system(rendered):
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        for expected in [
            ("Namespace", "turboflow"),
            ("PersistentVolumeClaim", "turboflow-models"),
            ("Service", "turboflow-t2v"),
            ("Service", "turboflow-i2v"),
            ("Service", "turboflow-deadletter"),
            ("Trigger", "turboflow-t2v"),
            ("Trigger", "turboflow-i2v"),
            ("Broker", "default"),
            ("ContainerSource", "turboflow-s3-uploads"),
        ]:
            assert expected in names, (overlay, expected)
        for d in docs:
            assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "turboflow"
            if d["kind"] != "Namespace" and d["metadata"]["name"] != "config-nats":
                assert d["metadata"]["namespace"] == "turboflow", d["metadata"]["name"]


def test_eventing_kustomization_lists_every_manifest():
    kfile = ROOT / "eventing/manifests/kustomization.yml"
    listed = set(yaml.safe_load(kfile.read_text())["resources"])
    assert listed == {p.name for p in (ROOT / "eventing/manifests").glob("*.yaml")}


# ---------------------------------------------------------------------------------------------------------------
# policy
# ---------------------------------------------------------------------------------------------------------------
def all_containers(docs):
    for d in docs:
        spec = d.get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        for c in pod.get("containers", []):
            yield d, pod, c


def test_gpu_overlay_requests_a_gpu_on_accelerator_nodes(rendered):
    docs = rendered["overlays/gpu"]
    for name in FUNCTIONS:
        svc = ksvc(docs, name)
        pod, c = svc["spec"]["template"]["spec"], container(svc)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert env(c)["TURBOFLOW_DEVICE"] == "cuda"
        (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        (expr,) = term["matchExpressions"]
        assert expr["key"] == "nvidia.com/gpu.product" and expr["operator"] == "In"
        assert set(expr["values"]) == GPU_PRODUCTS
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        # host memory and CPU are requested, and the memory limit bounds a leak
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert c["resources"]["limits"]["memory"]
    # only the two video functions take GPUs
    gpu_users = {
        d["metadata"]["name"]
        for d, _, c in all_containers(docs)
        if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
    }
    assert gpu_users == set(FUNCTIONS)
    (pvc,) = kind(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def _memory_gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Gi|Mi)", quantity).groups()
    return int(number) / (1024 if unit == "Mi" else 1)


def test_two_gpu_overlay_spreads_i2v_over_two_nvlink_gpus_with_shared_memory(rendered):
    one, two = rendered["overlays/gpu"], rendered["overlays/gpu-2x"]
    svc = ksvc(two, "turboflow-i2v")
    pod, c = svc["spec"]["template"]["spec"], container(svc)
    e = env(c)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2" and e["TURBOFLOW_GPUS"] == "2"
    assert e["TURBOFLOW_DEVICE"] == "cuda"  # cuda:0..1, one rank each (functions/slot.py parallel_devices)
    assert e["NCCL_NVLS_ENABLE"] == "0"  # NVLink multicast off
    assert float(e["TURBOFLOW_COLLECTIVE_TIMEOUT_SECONDS"]) < svc["spec"]["template"]["spec"]["timeoutSeconds"]
    # NCCL's shared memory: a memory-backed /dev/shm, bounded, inside the container's memory limit
    (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == shm["name"]]
    assert volume["emptyDir"]["medium"] == "Memory" and not shm.get("readOnly")
    limit = _memory_gib(c["resources"]["limits"]["memory"])
    assert _memory_gib(volume["emptyDir"]["sizeLimit"]) < limit - _memory_gib(c["resources"]["requests"]["memory"])
    # more host memory and a longer startup than one GPU's: two processes load the weights
    before = container(ksvc(one, "turboflow-i2v"))
    assert limit > _memory_gib(before["resources"]["limits"]["memory"])
    s, s1 = c["startupProbe"], before["startupProbe"]
    window = s["periodSeconds"] * s["failureThreshold"]
    assert window > s1["periodSeconds"] * s1["failureThreshold"]
    deadline = go_seconds(svc["spec"]["template"]["metadata"]["annotations"]["serving.knative.dev/progress-deadline"])
    assert deadline >= window + 600
    # NVLink GPUs only: Ulysses' all-to-alls over PCIe cost more than the second GPU saves
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (expr,) = term["matchExpressions"]
    assert expr["key"] == "nvidia.com/gpu.product" and set(expr["values"]) == {"NVIDIA-H100-80GB-HBM3", "NVIDIA-H200"}
    # everything else is the gpu overlay's: T2V as it was, the rest of the system untouched
    assert ksvc(two, "turboflow-t2v") == ksvc(one, "turboflow-t2v")
    i2v = resource_id(ksvc(one, "turboflow-i2v"))
    assert [d for d in two if resource_id(d) != i2v] == [d for d in one if resource_id(d) != i2v]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_function_runs_across_exactly_the_gpus_it_requests(rendered, overlay):
    for name in FUNCTIONS:
        c = container(ksvc(rendered[overlay], name))
        gpus = int(c["resources"].get("limits", {}).get("nvidia.com/gpu", "0"))
        assert int(env(c).get("TURBOFLOW_GPUS", "1")) == max(gpus, 1), (overlay, name)
        if gpus > 1:  # NCCL needs more than a container's default 64 MiB of shared memory
            assert "/dev/shm" in {m["mountPath"] for m in c["volumeMounts"]}


def test_dev_overlay_is_cpu_only_with_tiny_models(rendered):
    docs = rendered["overlays/dev"]
    text = json.dumps(docs)
    assert "nvidia.com/gpu" not in text
    (job,) = kind(docs, "Job")
    script = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "turboflow model tiny" in script and "turboflow model verify --checksums" in script
    for name, k in FUNCTIONS.items():
        svc = ksvc(docs, name)
        pod, c = svc["spec"]["template"]["spec"], container(svc)
        assert "affinity" not in pod and "tolerations" not in pod and "nodeSelector" not in pod
        e = env(c)
        assert e["TURBOFLOW_DEVICE"] == "cpu"
        assert e["MODEL_DIR"] == f"/models/tiny-{k}" and "/models/tiny-$kind" in script
        assert "nvidia.com/gpu" not in json.dumps(c["resources"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_functions_scale_to_zero_one_request_per_pod(rendered, overlay):
    autoscaler = knative_config(rendered, "knative-serving", "config-autoscaler")
    for name in FUNCTIONS:
        svc = ksvc(rendered[overlay], name)
        tmpl = svc["spec"]["template"]
        a = tmpl["metadata"]["annotations"]
        assert tmpl["spec"]["containerConcurrency"] == 1
        assert a["autoscaling.knative.dev/min-scale"] == "0"
        assert a["autoscaling.knative.dev/target"] == "1"
        # with the default 70 % utilization one request would ask for two GPUs
        assert a["autoscaling.knative.dev/target-utilization-percentage"] == "100"
        assert int(a["autoscaling.knative.dev/max-scale"]) >= 1
        assert go_seconds(a["autoscaling.knative.dev/scale-to-zero-pod-retention-period"]) >= 60
        if a.get("autoscaling.knative.dev/initial-scale") == "0":
            assert autoscaler["allow-zero-initial-scale"] == "true"
        assert autoscaler.get("enable-scale-to-zero", "true") == "true"
        assert svc["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_timeouts_are_ordered(rendered, overlay):
    """Trigger delivery timeout <= revision timeoutSeconds <= max-revision-timeout-seconds, and the JetStream ack
    wait outlasts the delivery timeout (else a running job is redelivered)."""
    docs = rendered[overlay]
    defaults = knative_config(rendered, "knative-serving", "config-defaults")
    max_timeout = int(defaults["max-revision-timeout-seconds"])
    assert max_timeout == MAX_REVISION_TIMEOUT
    assert int(defaults["revision-timeout-seconds"]) <= max_timeout
    triggers = {t["spec"]["subscriber"]["ref"]["name"]: t for t in kind(docs, "Trigger")}
    assert set(triggers) == {*FUNCTIONS, GATEWAY}
    # the gateway applies an event in milliseconds; its own delivery is checked in test_eventing_manifests.py
    triggers.pop(GATEWAY)
    for name in FUNCTIONS:
        svc = ksvc(docs, name)
        revision = svc["spec"]["template"]["spec"]["timeoutSeconds"]
        assert revision == REVISION_TIMEOUT[name]
        delivery = iso_seconds(triggers[name]["spec"]["delivery"]["timeout"])
        assert 0 < delivery <= revision <= max_timeout, (name, delivery, revision, max_timeout)
    (cm,) = [d for d in kind(docs, "ConfigMap") if "channelTemplateSpec" in d.get("data", {})]
    ack_wait = yaml.safe_load(cm["data"]["channelTemplateSpec"])["spec"]["consumerConfigTemplate"]["ackWait"]
    assert go_seconds(ack_wait) > max(iso_seconds(t["spec"]["delivery"]["timeout"]) for t in triggers.values())


def test_progress_deadline_covers_gpu_scale_up_and_startup(rendered):
    deployment = knative_config(rendered, "knative-serving", "config-deployment")
    cluster = go_seconds(deployment["progress-deadline"])
    for name in FUNCTIONS:
        svc = ksvc(rendered["overlays/gpu"], name)
        per_revision = go_seconds(
            svc["spec"]["template"]["metadata"]["annotations"]["serving.knative.dev/progress-deadline"]
        )
        startup = container(svc)["startupProbe"]
        window = startup["periodSeconds"] * startup["failureThreshold"]
        # a GPU node (5-10 min) plus the whole startup window must fit
        assert per_revision >= window + 600 and cluster >= 1200, (name, per_revision, window)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes(rendered, overlay):
    for name in FUNCTIONS:
        svc = ksvc(rendered[overlay], name)
        c = container(svc)
        port = c["ports"][0]["containerPort"]
        assert port == 8080 and c["ports"][0]["name"] in ("http1", "h2c")
        assert c["readinessProbe"]["httpGet"]["path"] == "/health/readiness"
        assert c["livenessProbe"]["httpGet"]["path"] == "/health/liveness"
        assert c["startupProbe"]["httpGet"]["path"] == "/health/readiness"
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["httpGet"].get("port", port) == port  # Knative only probes the serving port
        # no readiness periodSeconds: queue-proxy then probes aggressively and a cold pod gets traffic at once
        assert "periodSeconds" not in c["readinessProbe"]
        if overlay == "overlays/gpu":
            s = c["startupProbe"]
            assert s["periodSeconds"] * s["failureThreshold"] >= 600  # weight loading from network storage
        assert c["args"][:2] == ["serve", FUNCTIONS[name]] and "$(MODEL_DIR)" in c["args"]


def _owned(docs):
    """turboflow's own workloads (the eventing helper's sinks/sources are checked by their own tests)."""
    for d, pod, c in all_containers(docs):
        if d["kind"] in ("Job", "DaemonSet") or d["metadata"]["name"] in {*FUNCTIONS, GATEWAY}:
            yield d, pod, c


@pytest.mark.parametrize("kdir", ["overlays/dev", "overlays/gpu", "model-cache", "model-cache/warm"])
def test_workloads_run_non_root_without_privileges(rendered, kdir):
    seen = 0
    for d, pod, c in _owned(rendered[kdir]):
        seen += 1
        sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) > 0, d["metadata"]["name"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert c["securityContext"].get("readOnlyRootFilesystem") is True
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        # a read-only root filesystem needs a writable /tmp (HOME points there)
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]) and env(c).get("HOME") == "/tmp"
        assert pod.get("automountServiceAccountToken") is False or d["kind"] == "Service"
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert seen
    accounts = kind(rendered["base"], "ServiceAccount")
    assert {sa["metadata"]["name"] for sa in accounts} == {"turboflow-functions", "turboflow-gateway"}
    assert all(sa["automountServiceAccountToken"] is False for sa in accounts)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_cache_is_mounted_read_only_by_functions(rendered, overlay):
    docs = rendered[overlay]
    for name in FUNCTIONS:
        svc = ksvc(docs, name)
        pod, c = svc["spec"]["template"]["spec"], container(svc)
        vols = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in c["volumeMounts"] if "persistentVolumeClaim" in vols[m["name"]]]
        assert mount["mountPath"] == "/models" and mount["readOnly"] is True
        pvc = vols[mount["name"]]["persistentVolumeClaim"]
        assert pvc == {"claimName": "turboflow-models", "readOnly": True}
        model_dir = env(c)["MODEL_DIR"]
        assert model_dir.startswith("/models/")
        if overlay == "overlays/gpu":
            assert model_dir == MODEL_DIRS[name]
        assert svc["spec"]["template"]["spec"]["serviceAccountName"] == "turboflow-functions"
        e = env(c)
        assert e["TURBOFLOW_BUCKET"] and e["HF_HUB_OFFLINE"] == "1"
        assert e["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "turboflow-s3", "key": "accessKeyId"}}
        assert e["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "turboflow-s3", "key": "secretAccessKey"}}
    # the S3 source reads the same Secret keys
    (src,) = kind(docs, "ContainerSource")
    src_env = env(src["spec"]["template"]["spec"]["containers"][0])
    assert src_env["AWS_ACCESS_KEY_ID"] == env(container(ksvc(docs, "turboflow-t2v")))["AWS_ACCESS_KEY_ID"]


def test_pull_jobs_write_the_cache_and_verify_checksums(rendered):
    jobs = {j["metadata"]["name"]: j for j in kind(rendered["model-cache"], "Job")}
    assert set(jobs) == {"turboflow-pull-t2v", "turboflow-pull-i2v"}
    for name, job in jobs.items():
        k = name.rsplit("-", 1)[1]
        c = job["spec"]["template"]["spec"]["containers"][0]
        script = c["args"][0]
        e = env(c)
        assert e["MODEL_DIR"] == MODEL_DIRS[f"turboflow-{k}"]
        assert e["HF_HUB_OFFLINE"] == "0"  # the one place that downloads
        assert f'turboflow model pull "$MODEL_DIR" --kind {k}' in script
        assert script.rstrip().endswith('turboflow model verify --checksums "$MODEL_DIR"')
        assert "--tokenizer-repo" in script and "--force" in script
        assert script.count("--file ") == (3 if k == "t2v" else 4)
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/models"]
        assert not mount.get("readOnly")
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    (ds,) = kind(rendered["model-cache/warm"], "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["args"][:2] == ["model-cache", "warm"] and set(MODEL_DIRS.values()) <= set(c["args"])
    assert "limits" not in c["resources"]  # a memory limit would evict the pages it warms
    assert all(m.get("readOnly") for m in c["volumeMounts"] if m["mountPath"] == "/models")
    gpu_pod = ksvc(rendered["overlays/gpu"], "turboflow-t2v")["spec"]["template"]["spec"]
    assert pod["tolerations"] == gpu_pod["tolerations"]
    assert pod["affinity"] == {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": gpu_pod["affinity"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]
        }
    }
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_knative_feature_flags_cover_what_the_services_use(rendered):
    features = knative_config(rendered, "knative-serving", "config-features")
    needs = {
        "affinity": "kubernetes.podspec-affinity",
        "tolerations": "kubernetes.podspec-tolerations",
        "nodeSelector": "kubernetes.podspec-nodeselector",
        "securityContext": "kubernetes.podspec-securitycontext",
    }
    used = set()
    for overlay in OVERLAYS:
        for svc in kind(rendered[overlay], "Service", "serving.knative.dev"):
            pod = svc["spec"]["template"]["spec"]
            for field, flag in needs.items():
                if field in pod:
                    used.add(flag)
            for v in pod.get("volumes", []):
                if "persistentVolumeClaim" in v:
                    used.add("kubernetes.podspec-persistent-volume-claim")
                    mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] == v["name"]]
                    if not v["persistentVolumeClaim"].get("readOnly") or not all(m.get("readOnly") for m in mounts):
                        used.add("kubernetes.podspec-persistent-volume-write")
    assert {
        "kubernetes.podspec-affinity",
        "kubernetes.podspec-tolerations",
        "kubernetes.podspec-persistent-volume-claim",
    } <= used
    for flag in used:
        assert features.get(flag) == "enabled", flag
    assert "kubernetes.podspec-persistent-volume-write" not in used  # read-only is enough
    eventing = knative_config(rendered, "knative-eventing", "config-features")
    if any("timeout" in t["spec"].get("delivery", {}) for t in kind(rendered["overlays/gpu"], "Trigger")):
        assert eventing["delivery-timeout"] == "enabled"
    # every setting carries a comment saying why
    for f in (INFRA / "knative").glob("*-config-*.yaml"):
        data = yaml.safe_load(f.read_text())["data"]
        lines = f.read_text().splitlines()
        for key in data:
            (i,) = [n for n, line in enumerate(lines) if line.strip().startswith(f"{key}:")]
            assert lines[i - 1].strip().startswith("#"), (f.name, key)


def test_one_image_everywhere(rendered):
    for overlay in OVERLAYS:
        images = {c["image"] for _, _, c in all_containers(rendered[overlay])}
        images |= {
            c["image"]
            for s in kind(rendered[overlay], "ContainerSource")
            for c in s["spec"]["template"]["spec"]["containers"]
        }
        assert len(images) == 1 and images.pop().startswith("ghcr.io/turboflow/turboflow:")


def test_triggers_and_dead_letter_refs_resolve(rendered):
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        services = {s["metadata"]["name"] for s in kind(docs, "Service", "serving.knative.dev")}
        brokers = {b["metadata"]["name"] for b in kind(docs, "Broker")}
        for t in kind(docs, "Trigger"):
            assert t["spec"]["broker"] in brokers
            assert t["spec"]["subscriber"]["ref"]["name"] in services
            assert t["spec"]["delivery"]["deadLetterSink"]["ref"]["name"] in services


# ---------------------------------------------------------------------------------------------------------------
# monitoring
# ---------------------------------------------------------------------------------------------------------------
def _exported_metric_names() -> set[str]:
    """Every series name the functions' and the gateway's /metrics can expose."""
    from turboflow.functions import metrics
    from turboflow.gateway import metrics as gateway_metrics

    names = set()
    for registry in (metrics.REGISTRY, gateway_metrics.REGISTRY):
        for family in registry.collect():
            for sample_suffix in ("", "_total", "_bucket", "_count", "_sum", "_created"):
                names.add(family.name + sample_suffix)
    return names


def test_monitoring_matches_the_functions(rendered):
    docs = rendered["monitoring"]
    monitors = {m["metadata"]["name"]: m for m in kind(docs, "PodMonitor")}
    assert set(monitors) == {"turboflow-functions", "turboflow-gateway"}
    pm = monitors["turboflow-functions"]
    exprs = {e["key"]: set(e["values"]) for e in pm["spec"]["selector"]["matchExpressions"]}
    for overlay in OVERLAYS:
        for name in FUNCTIONS:
            labels = ksvc(rendered[overlay], name)["spec"]["template"]["metadata"]["labels"]
            assert all(labels.get(key) in values for key, values in exprs.items()), (name, labels)
    assert exprs["app.kubernetes.io/component"] == set(FUNCTIONS.values())
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["path"] == "/metrics" and ep["port"] == "user-port"
    # the gateway's monitor selects the gateway's pods, and only them
    selector = monitors["turboflow-gateway"]["spec"]["selector"]["matchLabels"]
    for overlay in OVERLAYS:
        for svc in kind(rendered[overlay], "Service", "serving.knative.dev"):
            labels = svc["spec"]["template"]["metadata"].get("labels", {})
            assert (selector.items() <= labels.items()) == (svc["metadata"]["name"] == GATEWAY), svc["metadata"]["name"]
    (gateway_ep,) = monitors["turboflow-gateway"]["spec"]["podMetricsEndpoints"]
    assert gateway_ep["path"] == "/metrics" and gateway_ep["port"] == "user-port"

    (rule,) = kind(docs, "PrometheusRule")
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    (cm,) = [d for d in kind(docs, "ConfigMap") if d["metadata"]["name"] == "turboflow-grafana-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["turboflow.json"])
    assert dashboard["uid"] == "turboflow" and len(dashboard["panels"]) >= 8
    exprs_all = [r["expr"] for r in rules] + [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exported = _exported_metric_names()
    external = {"DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_GPU_UTIL", "kube_pod_container_status_restarts_total"}
    for expr in exprs_all:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        unquoted = re.sub(r'"[^"]*"', '""', expr)
        for metric in re.findall(r"\b(turboflow[a-z_:0-9]*|DCGM_[A-Z_]+|kube_[a-z_]+)\b", unquoted):
            assert metric in exported or metric in recorded or metric in external, metric
    assert any("turboflow_requests_total" in e for e in exprs_all)
    assert any("turboflow_stage_seconds_bucket" in e for e in exprs_all)
    assert any("turboflow_queue_wait_seconds_bucket" in e for e in exprs_all)
    assert any("turboflow_gpu_memory_bytes" in e for e in exprs_all)
    assert "< 0.995" in alerts["TurboflowSuccessRateLow"]["expr"]
    assert "DCGM_FI_DEV_GPU_TEMP" in alerts["TurboflowGPUTemperatureHigh"]["expr"]
    assert "> 85" in alerts["TurboflowGPUTemperatureHigh"]["expr"]
    assert "histogram_quantile(0.95" in " ".join(r["expr"] for r in rules)
    assert {"TurboflowRequestSlowT2V", "TurboflowRequestSlowI2V", "TurboflowPodRestarting"} <= set(alerts)
    # the dashboard shipped in the repo is the one in the ConfigMap
    assert (INFRA / "monitoring/dashboards/turboflow.json").read_text() == cm["data"]["turboflow.json"]


# ---------------------------------------------------------------------------------------------------------------
# build: Containerfile and func.yaml
# ---------------------------------------------------------------------------------------------------------------
def test_containerfile(rendered):
    text = (INFRA / "Containerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.lstrip().startswith("#")]
    (arg,) = [ln for ln in lines if ln.startswith("ARG PYTHON_IMAGE=")]
    assert re.fullmatch(r"ARG PYTHON_IMAGE=python:3\.\d+-slim(-\w+)?", arg)
    assert "FROM ${PYTHON_IMAGE}" in lines
    # torch is installed once, exactly as pinned, checked to be a CUDA build, and held by a constraint after
    assert 'pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"' in text
    assert "torch.version.cuda" in text and "(12, 8)" in text
    assert 'echo "$TORCH_SPEC" > /tmp/torch-constraint.txt' in text
    assert "pip install -c /tmp/torch-constraint.txt" in text
    # every package directory of the distribution is copied
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pkg_dir in set(re.findall(r'^"turboflow(?:\.\w+)?" = "(\w+)"$', pyproject, re.M)):
        assert f"COPY {pkg_dir}/ {pkg_dir}/" in text, pkg_dir
    (user,) = [ln for ln in lines if ln.startswith("USER ")]
    uid = int(user.split()[1].split(":")[0])
    assert uid > 0
    for kdir in ("overlays/gpu", "model-cache"):
        for _, pod, c in _owned(rendered[kdir]):
            assert {**pod.get("securityContext", {}), **c.get("securityContext", {})}["runAsUser"] == uid
    assert 'ENTRYPOINT ["turboflow"]' in lines
    ignore = (INFRA / "Containerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


def torch_pins(makefile: str, containerfile: str) -> tuple[str, str]:
    """(the Makefile's TORCH_SPEC, the Containerfile's TORCH_SPEC build argument)."""
    (tested,) = re.findall(r"^TORCH_SPEC \?= (\S+)$", makefile, re.M)
    (shipped,) = re.findall(r"^ARG TORCH_SPEC=(\S+)$", containerfile, re.M)
    return tested, shipped


def test_image_ships_the_tested_torch():
    """One torch version: the one `make test` runs is the one the GPU image installs."""
    makefile, containerfile = (ROOT / "Makefile").read_text(), (INFRA / "Containerfile").read_text()
    tested, shipped = torch_pins(makefile, containerfile)
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+", tested)
    assert shipped == tested, f"Containerfile installs {shipped}, make test runs {tested}"
    # the check itself notices a drift (the state the review found: a base image's 2.8.0 against a 2.13.0 pin)
    drifted = containerfile.replace(f"ARG TORCH_SPEC={shipped}", "ARG TORCH_SPEC=torch==2.8.0")
    assert torch_pins(makefile, drifted)[1] != tested
    assert "pytorch/pytorch:" not in containerfile  # no base image bringing a torch of its own


FUNC_YAML_SCHEMA = obj(
    {
        "specVersion": STR,
        "name": DNS1123,
        "runtime": {"const": "python"},
        "namespace": STR,
        "registry": STR,
        "image": STR,
        "created": STR,
        "invoke": {"enum": ["http", "cloudevent"]},
        "run": obj(
            {
                "startTimeout": {"type": "integer", "minimum": 1},  # nanoseconds (func's schema: a Go Duration)
                "envs": {"type": "array", "items": obj({"name": STR, "value": STR}, ["name"])},
                "volumes": {
                    "type": "array",
                    "items": obj(
                        {"persistentVolumeClaim": obj({"claimName": STR, "readOnly": {"type": "boolean"}}), "path": STR}
                    ),
                },
            }
        ),
        "deploy": obj(
            {
                "namespace": STR,
                "healthEndpoints": obj({"liveness": STR, "readiness": STR}),
                "options": obj(
                    {
                        "scale": obj(
                            {
                                "min": {"type": "integer"},
                                "max": {"type": "integer"},
                                "metric": {"enum": ["concurrency", "rps"]},
                                "target": {"type": "number"},
                                "utilization": {"type": "number"},
                            }
                        ),
                        "resources": obj({"limits": obj({"concurrency": {"type": "integer"}})}),
                    }
                ),
            }
        ),
    },
    ["specVersion", "name", "runtime", "created"],
)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_func_yaml_mirrors_the_service(rendered, name):
    k = FUNCTIONS[name]
    path = ROOT / "functions" / k / "func.yaml"
    fy = yaml.safe_load(path.read_text())
    errors = list(Draft202012Validator(FUNC_YAML_SCHEMA).iter_errors(fy))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    assert (ROOT / "functions" / k / "function" / "func.py").is_file()  # func-python's function root layout
    svc = ksvc(rendered["overlays/gpu"], name)
    c, a = container(svc), svc["spec"]["template"]["metadata"]["annotations"]
    assert fy["name"] == name and fy["namespace"] == fy["deploy"]["namespace"] == svc["metadata"]["namespace"]
    assert fy["invoke"] == "cloudevent" and fy["image"] == c["image"]
    assert fy["deploy"]["healthEndpoints"] == {
        "liveness": c["livenessProbe"]["httpGet"]["path"],
        "readiness": c["readinessProbe"]["httpGet"]["path"],
    }
    scale = fy["deploy"]["options"]["scale"]
    assert scale["min"] == int(a["autoscaling.knative.dev/min-scale"])
    assert scale["max"] == int(a["autoscaling.knative.dev/max-scale"])
    assert scale["target"] == int(a["autoscaling.knative.dev/target"])
    assert scale["utilization"] == int(a["autoscaling.knative.dev/target-utilization-percentage"])
    assert (
        fy["deploy"]["options"]["resources"]["limits"]["concurrency"]
        == svc["spec"]["template"]["spec"]["containerConcurrency"]
    )
    assert {e["name"]: e["value"] for e in fy["run"]["envs"]}["MODEL_DIR"] == env(c)["MODEL_DIR"]
    (vol,) = fy["run"]["volumes"]
    assert vol == {"persistentVolumeClaim": {"claimName": "turboflow-models", "readOnly": True}, "path": "/models"}


def test_root_func_yaml_is_the_one_image_for_both_services(rendered):
    """The repository root is a function project too: the image both Services run, the task chosen by a setting."""
    fy = yaml.safe_load((ROOT / "func.yaml").read_text())
    errors = list(Draft202012Validator(FUNC_YAML_SCHEMA).iter_errors(fy))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    assert (ROOT / "function" / "func.py").is_file()  # the root's func-python package (new() picks the task)
    assert fy["name"] == "turboflow" and fy["invoke"] == "cloudevent"
    envs = {e["name"]: e["value"] for e in fy["run"]["envs"]}
    task = envs["TURBOFLOW_TASK"]
    for name in FUNCTIONS:
        svc = ksvc(rendered["overlays/gpu"], name)
        c = container(svc)
        assert fy["image"] == c["image"] and fy["namespace"] == svc["metadata"]["namespace"]
        assert fy["deploy"]["healthEndpoints"] == {
            "liveness": c["livenessProbe"]["httpGet"]["path"],
            "readiness": c["readinessProbe"]["httpGet"]["path"],
        }
    # `func run` at the root runs the task it names, with that Service's model, like the task's own func.yaml
    task_yaml = yaml.safe_load((ROOT / "functions" / task / "func.yaml").read_text())
    assert {e["name"]: e["value"] for e in task_yaml["run"]["envs"]}.items() <= envs.items()
    assert fy["run"]["volumes"] == task_yaml["run"]["volumes"]
    assert fy["run"]["startTimeout"] == task_yaml["run"]["startTimeout"]


def test_readme_walkthrough_applies_existing_kustomizations_in_order():
    text = (INFRA / "README.md").read_text()
    applied = re.findall(r"kubectl apply -k (infra/[\w/-]+)", text)
    for path in applied:
        assert (ROOT / path).is_dir() and path.removeprefix("infra/") in KUSTOMIZATIONS, path
    walkthrough = text[text.index("## From an empty cluster") : text.index("## Development cluster")]
    steps = [
        walkthrough.index(f"kubectl apply -k infra/{k}")
        for k in ("knative", "overlays/gpu", "model-cache\n", "model-cache/warm", "monitoring")
    ]
    assert steps == sorted(steps)
    # the secrets the manifests read are created before the deploy, with the keys they read
    assert walkthrough.index("create secret generic turboflow-s3") < steps[1]
    assert "accessKeyId=" in walkthrough and "secretAccessKey=" in walkthrough
    assert walkthrough.index("create secret generic turboflow-events") < steps[1]
    assert "--from-literal=signing-key=" in walkthrough
    assert "turboflowsig" in text and "verify_event" in text  # what a consumer checks before trusting an event


@pytest.mark.parametrize("kdir", ["overlays/dev", "overlays/gpu"])
def test_every_container_is_non_root_and_unprivileged(rendered, kdir):
    """Including the eventing containers (dead-letter sink, S3 source): nothing in the namespace runs as root."""
    names = set()
    for d, pod, c in all_containers(rendered[kdir]):
        sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) > 0, (d["metadata"]["name"], c["name"])
        assert sc.get("allowPrivilegeEscalation") is False and sc["capabilities"]["drop"] == ["ALL"]
        names.add(d["metadata"]["name"])
    assert {"turboflow-deadletter", "turboflow-s3-uploads"} <= names, names


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/gpu-2x", "overlays/dev"])
def test_function_settings_are_valid_engine_options(rendered, overlay):
    from turboflow.engine.options import LoadOptions
    from turboflow.settings import Settings

    for name in FUNCTIONS:
        settings = {k: v for k, v in env(container(ksvc(rendered[overlay], name))).items() if isinstance(v, str)}
        LoadOptions.from_settings(Settings.from_env(settings))  # ConfigError naming any value the pod would refuse
        # and every TURBOFLOW_* name is one the code reads (a misspelt switch would be silently ignored)
        assert {k for k in settings if k.startswith("TURBOFLOW_")} <= _settings_the_code_reads()
    if overlay == "overlays/gpu":
        gpu = {n: env(container(ksvc(rendered[overlay], n))) for n in FUNCTIONS}
        # both A14B experts resident in FP8 on the GPU; T2V serves the fine-tuned bf16 weights as shipped
        assert gpu["turboflow-i2v"]["TURBOFLOW_QUANT_LINEAR"] == "fp8"
        assert "TURBOFLOW_QUANT_LINEAR" not in gpu["turboflow-t2v"]


def _settings_the_code_reads() -> set[str]:
    root = Path(__file__).resolve().parent.parent
    names = set()
    for package in ("engine", "functions", "storage", "eventing", "turboflow"):
        for path in (root / package).rglob("*.py"):
            names |= set(re.findall(r"[\"'](TURBOFLOW_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


def test_settings_scan_finds_the_switches():
    names = _settings_the_code_reads()
    assert {"TURBOFLOW_QUANT_LINEAR", "TURBOFLOW_BUCKET", "TURBOFLOW_DEVICE", "TURBOFLOW_LOAD_RETRY_SECONDS"} <= names
    assert "TURBOFLOW_QUANT_LINEARS" not in names


# ---------------------------------------------------------------------------------------------------------------
# event authentication
# ---------------------------------------------------------------------------------------------------------------
SIGNING_KEY = {"secretKeyRef": {"name": "turboflow-events", "key": "signing-key"}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_event_emitter_gets_the_signing_key_from_the_secret(rendered, overlay):
    docs = rendered[overlay]
    emitters = {}
    for d in docs:
        if d["kind"] in ("Service", "ContainerSource") and d["apiVersion"].split("/")[0].endswith("knative.dev"):
            emitters[d["metadata"]["name"]] = container(d)
    # the functions and the dead-letter sink sign what they emit; the S3 source derives its request ids with it;
    # the gateway verifies the lifecycle events it applies and signs its own cancels
    assert set(emitters) == {*FUNCTIONS, GATEWAY, "turboflow-deadletter", "turboflow-s3-uploads"}
    for name, c in emitters.items():
        assert env(c).get("TURBOFLOW_EVENT_SIGNING_KEY") == SIGNING_KEY, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_is_public(rendered, overlay):
    """Clients reach the gateway; everything else is reached through the broker and gets no external route."""
    services = kind(rendered[overlay], "Service", "serving.knative.dev")
    assert {s["metadata"]["name"] for s in services} == {*FUNCTIONS, GATEWAY, "turboflow-deadletter"}
    for svc in services:
        visibility = svc["metadata"]["labels"].get("networking.knative.dev/visibility")
        if svc["metadata"]["name"] == GATEWAY:
            assert visibility is None
        else:
            assert visibility == "cluster-local", svc["metadata"]["name"]


def test_sender_identity_is_off_while_the_channel_cannot_carry_it(rendered):
    """eventing-natss's JetStream dispatcher sends no OIDC token; with authentication-oidc on, the MT broker's
    filter would refuse every delivery. The EventPolicies (infra/eventing-auth) name every sender, each limited to
    the types it emits."""
    flags = knative_config(rendered, "knative-eventing", "config-features")
    (cm,) = [d for d in kind(rendered["overlays/gpu"], "ConfigMap") if "channelTemplateSpec" in d.get("data", {})]
    channel = yaml.safe_load(cm["data"]["channelTemplateSpec"])["kind"]
    if channel == "NatsJetStreamChannel":
        assert flags["authentication-oidc"] == "disabled"
    policies = {p["metadata"]["name"]: p for p in kind(rendered["eventing-auth"], "EventPolicy")}
    senders = {}
    for policy in policies.values():
        assert policy["spec"]["to"] == [
            {"ref": {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker", "name": "default"}}
        ]
        for sender in policy["spec"]["from"]:
            key = sender.get("sub") or (sender["ref"]["kind"], sender["ref"]["name"])
            assert key not in senders, key  # the ingress applies the first policy naming a subject
            senders[key] = policy["metadata"]["name"]
    gpu = rendered["overlays/gpu"]
    # a Trigger's identity posts its subscriber's replies; the gateway's Trigger has none (202, no reply event)
    expected = {("Trigger", t["metadata"]["name"]) for t in kind(gpu, "Trigger") if t["metadata"]["name"] != GATEWAY}
    # every SinkBinding is an identity its Service posts with, and so is the S3 source
    expected |= {("SinkBinding", b["metadata"]["name"]) for b in kind(gpu, "SinkBinding")}
    expected |= {("ContainerSource", "turboflow-s3-uploads"), "system:serviceaccount:turboflow:turboflow-producer"}
    assert set(senders) == expected
    assert ("SinkBinding", "turboflow-gateway-sink") in expected
    producers = policies[senders["system:serviceaccount:turboflow:turboflow-producer"]]
    allowed = {f["exact"]["type"] for f in producers["spec"]["filters"][0]["any"]}
    assert allowed == {"io.turboflow.video.t2v.requested", "io.turboflow.video.i2v.requested"}
