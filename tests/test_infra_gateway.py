"""The gateway in the cluster manifests: its Knative Service (CPU only, always warm, the settings the gateway reads),
the Trigger that brings every video event back to it, the SinkBindings that give each event sender K_SINK, the
example Secrets, and the README steps that create them. Rendered with real kustomize (tests/kustomized.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml
from kustomized import INFRA, KUSTOMIZATIONS, kustomized

from turboflow.errors import ConfigError
from turboflow.eventing.triggers import Trigger
from turboflow.eventing.types import LIFECYCLE_TYPES, REQUEST_TYPES
from turboflow.settings import VARIABLES, Settings

OVERLAYS = ["overlays/dev", "overlays/gpu"]
GATEWAY = "turboflow-gateway"
FUNCTIONS = ("turboflow-t2v", "turboflow-i2v")
# what each Secret the gateway reads must hold (the example file and the README name the same keys)
GATEWAY_SECRET_KEYS = {"database-url", "webhook-secret"}
SAMPLE_SECRETS = {
    ("turboflow-gateway", "database-url"): "postgresql+psycopg://turboflow:pw@postgres:5432/turboflow",
    ("turboflow-gateway", "webhook-secret"): "whsec_" + base64.b64encode(bytes(range(32))).decode(),
    ("turboflow-events", "signing-key"): "a-signing-key-of-32-bytes-length",
    ("turboflow-s3", "accessKeyId"): "minio",
    ("turboflow-s3", "secretAccessKey"): "minio123",
    ("turboflow-s3", "region"): "us-east-1",
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {k: kustomized(k) for k in KUSTOMIZATIONS}


def named(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def knative_services(docs: list[dict]) -> dict[str, dict]:
    return {
        d["metadata"]["name"]: d for d in docs if d["kind"] == "Service" and d["apiVersion"] == "serving.knative.dev/v1"
    }


def container(svc: dict) -> dict:
    (c,) = svc["spec"]["template"]["spec"]["containers"]
    return c


def env(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# ---------------------------------------------------------------------------------------------------------------
# the Service
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_is_cpu_only_and_always_warm(rendered, overlay):
    svc = knative_services(rendered[overlay])[GATEWAY]
    template, c = svc["spec"]["template"], container(svc)
    # the GPU overlay's patches target the functions only: no GPU, no accelerator affinity, no GPU toleration
    assert "nvidia.com/gpu" not in json.dumps(svc)
    assert not {"affinity", "tolerations", "nodeSelector"} & set(template["spec"])
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    annotations = template["metadata"]["annotations"]
    assert int(annotations["autoscaling.knative.dev/min-scale"]) >= 1  # the front door never cold-starts
    assert int(annotations["autoscaling.knative.dev/max-scale"]) > 1
    # SSE streams hold a request each: no per-pod limit of 1 as on the GPU functions
    assert template["spec"]["containerConcurrency"] != 1
    defaults = named(rendered["knative"], "ConfigMap", "config-defaults")["data"]
    assert template["spec"]["timeoutSeconds"] <= int(defaults["max-revision-timeout-seconds"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_serves_on_the_port_its_probes_and_metrics_use(rendered, overlay):
    c = container(knative_services(rendered[overlay])[GATEWAY])
    assert c["command"] == ["turboflow"] and c["args"][:2] == ["gateway", "serve"]
    (port,) = c["ports"]
    assert port == {"name": "http1", "containerPort": 8080}
    args = c["args"]
    assert args[args.index("--port") + 1] == str(port["containerPort"])
    assert args[args.index("--host") + 1] == "0.0.0.0"  # reachable by queue-proxy, not only on loopback
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/healthz"
        assert c[probe]["httpGet"].get("port", port["containerPort"]) == port["containerPort"]
    assert "periodSeconds" not in c["readinessProbe"]  # aggressive probing: ready the moment it answers
    (monitor,) = [m for m in kustomized("monitoring") if m["metadata"]["name"] == GATEWAY]
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "user-port"  # Knative's name for the user port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_environment_is_settings_the_gateway_reads(rendered, overlay):
    docs = rendered[overlay]
    services = knative_services(docs)
    gateway_env = env(container(services[GATEWAY]))
    # every variable is one turboflow/settings.py knows (a misspelt name would be silently ignored)
    assert set(gateway_env) <= {v.name for v in VARIABLES}
    # secrets come from Secrets, never from literal values in the manifests
    refs = {k: v["secretKeyRef"] for k, v in gateway_env.items() if isinstance(v, dict)}
    assert refs["TURBOFLOW_GATEWAY_DATABASE_URL"] == {"name": "turboflow-gateway", "key": "database-url"}
    assert refs["TURBOFLOW_WEBHOOK_SECRET"] == {"name": "turboflow-gateway", "key": "webhook-secret"}
    assert refs["TURBOFLOW_EVENT_SIGNING_KEY"] == {"name": "turboflow-events", "key": "signing-key"}
    # with those Secrets filled in, the values parse as the gateway's settings
    values = {k: v for k, v in gateway_env.items() if isinstance(v, str)}
    values |= {k: SAMPLE_SECRETS[(ref["name"], ref["key"])] for k, ref in refs.items()}
    settings = Settings.from_env(values)
    assert settings.webhook_secret and settings.gateway_database_url.startswith("postgresql")
    assert settings.webhook_allow_private is (overlay == "overlays/dev")  # SSRF guard on outside dev clusters
    # the request-state KV is in the NATS the broker's channel uses
    nats = yaml.safe_load(named(docs, "ConfigMap", "config-nats")["data"]["eventing-nats"])["url"]
    assert gateway_env["TURBOFLOW_NATS_URL"] == nats
    # it reads and presigns the functions' objects: same bucket, endpoint and credentials
    t2v = env(container(services["turboflow-t2v"]))
    for name in ("TURBOFLOW_BUCKET", "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        assert gateway_env[name] == t2v[name], name
    assert "K_SINK" not in gateway_env  # injected by its SinkBinding


def test_a_placeholder_secret_keeps_the_gateway_from_starting():
    """The example Secrets' placeholders are refused by the settings, so nobody runs on them by accident."""
    example = {
        (d["metadata"]["name"], key): value
        for d in yaml.safe_load_all((INFRA / "secrets/secrets.example.yaml").read_text())
        for key, value in d["stringData"].items()
    }
    for variable, secret in [
        ("TURBOFLOW_WEBHOOK_SECRET", ("turboflow-gateway", "webhook-secret")),
        ("TURBOFLOW_EVENT_SIGNING_KEY", ("turboflow-events", "signing-key")),
    ]:
        with pytest.raises(ConfigError, match=variable):
            Settings.from_env({variable: example[secret]})
        Settings.from_env({variable: SAMPLE_SECRETS[secret]})  # ... while a real-looking value is accepted


# ---------------------------------------------------------------------------------------------------------------
# secrets
# ---------------------------------------------------------------------------------------------------------------
def _secret_refs(docs: list[dict]) -> set[tuple[str, str]]:
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("secretKeyRef")
            if isinstance(ref, dict):
                refs.add((ref["name"], ref["key"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(docs)
    return refs


def test_example_secrets_hold_every_key_the_manifests_read_and_no_kustomization_ships_one(rendered):
    path = INFRA / "secrets/secrets.example.yaml"
    examples = list(yaml.safe_load_all(path.read_text()))
    provided = {(d["metadata"]["name"], key) for d in examples for key in d["stringData"]}
    read = set()
    for kdir, docs in rendered.items():
        assert not [d for d in docs if d["kind"] == "Secret"], kdir  # an apply -k must never overwrite real secrets
        read |= _secret_refs(docs)
    assert {("turboflow-gateway", k) for k in GATEWAY_SECRET_KEYS} <= read
    assert read == provided
    assert all(d["metadata"]["namespace"] == "turboflow" for d in examples)
    # placeholders only: every value that is a credential says so
    for d in examples:
        for key, value in d["stringData"].items():
            assert key == "region" or "REPLACE-ME" in value, (d["metadata"]["name"], key)
    assert not (path.parent / "kustomization.yaml").exists() and "secrets" not in KUSTOMIZATIONS


def test_readme_creates_the_gateway_secret_before_the_deploy():
    text = (INFRA / "README.md").read_text()
    walkthrough = text[text.index("## From an empty cluster") : text.index("## Development cluster")]
    deploy = walkthrough.index("kubectl apply -k infra/overlays/gpu")
    create = walkthrough.index("create secret generic turboflow-gateway")
    assert create < deploy
    for key in GATEWAY_SECRET_KEYS:
        assert f"--from-literal={key}=" in walkthrough[create:deploy], key
    # where /internal/events may be reached from, and what protects it, is written down
    assert "/internal/events" in text and "secrets/secrets.example.yaml" in text


# ---------------------------------------------------------------------------------------------------------------
# eventing wiring
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_that_emits_events_has_a_sinkbinding_to_the_broker(rendered, overlay):
    docs = rendered[overlay]
    services = knative_services(docs)
    brokers = {(b["metadata"]["namespace"], b["metadata"]["name"]) for b in docs if b["kind"] == "Broker"}
    bound = {}
    for binding in [d for d in docs if d["kind"] == "SinkBinding"]:
        subject, sink = binding["spec"]["subject"], binding["spec"]["sink"]["ref"]
        assert (subject["apiVersion"], subject["kind"]) == ("serving.knative.dev/v1", "Service")
        assert subject["name"] in services and subject["name"] not in bound, subject["name"]
        assert (sink["apiVersion"], sink["kind"]) == ("eventing.knative.dev/v1", "Broker")
        assert (sink.get("namespace", binding["metadata"]["namespace"]), sink["name"]) in brokers
        bound[subject["name"]] = binding["metadata"]["name"]
    # functions: started/progress/cancelled; gateway: requests and cancels; dead-letter sink: failed
    assert set(bound) == {*FUNCTIONS, GATEWAY, "turboflow-deadletter"}
    assert bound[GATEWAY] == "turboflow-gateway-sink"
    for name in bound:
        assert "K_SINK" not in env(container(services[name])), name  # the binding injects it


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_trigger_delivers_every_video_event_to_internal_events(rendered, overlay):
    docs = rendered[overlay]
    doc = named(docs, "Trigger", GATEWAY)
    subscriber = doc["spec"]["subscriber"]
    assert subscriber["ref"] == {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "name": GATEWAY,
        "namespace": "turboflow",
    }
    assert subscriber["uri"] == "/internal/events"  # relative: resolved against the Service's address
    trigger = Trigger.from_manifest(doc)
    for event_type in (*REQUEST_TYPES.values(), *LIFECYCLE_TYPES):
        assert trigger.matches({"type": event_type}), event_type
    for other in ("io.turboflow.videos", "io.turboflow.image.requested", "com.example.video.completed"):
        assert not trigger.matches({"type": other}), other
    # the local broker resolves ref + uri the way Knative does (base URL of the ref, then the path)
    assert trigger.subscriber.resolve({GATEWAY: "http://127.0.0.1:8470"}) == "http://127.0.0.1:8470/internal/events"
    assert (
        trigger.subscriber.resolve({f"Service/turboflow/{GATEWAY}": "http://gw.turboflow.svc.cluster.local/"})
        == "http://gw.turboflow.svc.cluster.local/internal/events"
    )
    # undeliverable events end at the cluster-local dead-letter sink, after a longer budget than the functions'
    dead_letter = knative_services(docs)[doc["spec"]["delivery"]["deadLetterSink"]["ref"]["name"]]
    assert dead_letter["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local"
    assert trigger.delivery.retry >= 7 and trigger.delivery.timeout <= 60


def test_dev_overlay_allows_private_webhooks_only_there(rendered):
    names = {
        overlay: env(container(knative_services(rendered[overlay])[GATEWAY])).get("TURBOFLOW_WEBHOOK_ALLOW_PRIVATE")
        for overlay in OVERLAYS
    }
    assert names == {"overlays/dev": "1", "overlays/gpu": None}


def test_gateway_image_is_built_with_the_gateway_package():
    containerfile = (Path(__file__).resolve().parents[1] / "infra" / "Containerfile").read_text()
    assert "COPY gateway/ gateway/" in containerfile and "turboflow.gateway" in containerfile


def test_the_paths_the_manifests_name_are_the_gateways_routes(rendered):
    """Trigger uri, probes and the PodMonitor path against the routers the gateway application mounts."""
    from turboflow.gateway.consumer import router as consumer
    from turboflow.gateway.metrics import metrics_router
    from turboflow.gateway.videos import health_router

    routes = {
        (method, route.path)
        for r in (consumer, metrics_router, health_router)
        for route in r.routes
        for method in route.methods
    }
    docs = rendered["overlays/gpu"]
    assert ("POST", named(docs, "Trigger", GATEWAY)["spec"]["subscriber"]["uri"]) in routes
    c = container(knative_services(docs)[GATEWAY])
    for probe in ("readinessProbe", "livenessProbe"):
        assert ("GET", c[probe]["httpGet"]["path"]) in routes
    (monitor,) = [m for m in rendered["monitoring"] if m["metadata"]["name"] == GATEWAY]
    assert ("GET", monitor["spec"]["podMetricsEndpoints"][0]["path"]) in routes
