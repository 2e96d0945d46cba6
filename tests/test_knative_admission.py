"""Every rendered kustomization passes the Knative webhooks' admission rules (tests/knative_admission.py) under the
feature flags infra/knative sets, and each rule refuses a mutated copy of a real rendered manifest that breaks it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from knative_admission import RULES, ClusterConfig, admit, admit_all, go_duration_seconds, is_iso_period
from kustomized import kustomized

from turboflow.eventing.triggers import load_manifests

# infra/knative is the cluster configuration the others are admitted under (OURS), not workload
KUSTOMIZATIONS = [
    "base",
    "overlays/dev",
    "overlays/gpu",
    "model-cache",
    "model-cache/warm",
    "monitoring",
    "eventing-auth",
]
RENDERED = {k: kustomized(k) for k in KUSTOMIZATIONS}
OURS = ClusterConfig.from_docs(kustomized("knative"))
# infra/eventing-auth is applied only after authentication-oidc is turned on (its kustomization says how)
WITH_OIDC = OURS.with_eventing(**{"authentication-oidc": "enabled"})
CONFIG_FOR = {k: (WITH_OIDC if k == "eventing-auth" else OURS) for k in KUSTOMIZATIONS}
HANDLED_KINDS = {"Service", "Broker", "Trigger", "ContainerSource", "SinkBinding"}


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_rendered_kustomization_is_admitted(kdir):
    violations = admit_all(RENDERED[kdir], CONFIG_FOR[kdir])
    assert not violations, "\n".join(map(str, violations))


def test_eventing_manifests_are_admitted():
    docs = load_manifests()
    assert {d["kind"] for d in docs} >= HANDLED_KINDS
    violations = admit_all(docs, OURS)
    assert not violations, "\n".join(map(str, violations))


def test_the_overlays_hold_the_kinds_the_rules_cover():
    for overlay in ("overlays/gpu", "overlays/dev"):
        assert {d["kind"] for d in RENDERED[overlay]} >= HANDLED_KINDS, overlay
    assert {d["kind"] for d in RENDERED["eventing-auth"]} == {"EventPolicy", "ServiceAccount"}


def test_without_infra_knative_the_webhook_refuses_what_the_readme_says():
    """Upstream defaults (no infra/knative applied): the errors infra/README.md's troubleshooting table lists."""
    rules = {v.rule for v in admit_all(RENDERED["overlays/gpu"], ClusterConfig())}
    assert {
        "serving.autoscaling.initial-scale",
        "serving.revision.timeout-seconds",
        "serving.podspec.field",
        "serving.volumes.source",
    } <= rules
    assert "eventing.eventpolicy.oidc-flag" in {v.rule for v in admit_all(RENDERED["eventing-auth"], OURS)}


def test_the_reviewed_readiness_probe_is_refused_with_the_webhooks_message():
    svc = copy.deepcopy(_find("overlays/gpu", "Service", "turboflow-i2v"))
    _container(svc)["readinessProbe"]["timeoutSeconds"] = 5
    (violation,) = admit(svc, OURS)
    assert violation.path == "spec.template.spec.containers[0].readinessProbe.timeoutSeconds"
    assert violation.message == "timeoutSeconds is disallowed when periodSeconds is zero"


def test_value_parsers():
    assert go_duration_seconds("1h30m") == 5400 and go_duration_seconds("1800s") == 1800
    assert go_duration_seconds("10 m") is None and go_duration_seconds("PT10M") is None
    assert is_iso_period("PT10M") and is_iso_period("PT0.5S") and is_iso_period("P1DT2H")
    assert (
        not is_iso_period("10m") and not is_iso_period("P") and not is_iso_period("PT") and not is_iso_period("PT10M\n")
    )


# ---------------------------------------------------------------------------------------------------------------
# one refused mutation per rule
# ---------------------------------------------------------------------------------------------------------------
def _find(kdir: str, kind: str, name: str) -> dict:
    (doc,) = [d for d in RENDERED[kdir] if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _pod(d: dict) -> dict:
    return d["spec"]["template"]["spec"]


def _container(d: dict) -> dict:
    return _pod(d)["containers"][0]


def _annotations(d: dict) -> dict:
    return d["spec"]["template"]["metadata"]["annotations"]


def _set(path_getter: Callable[[dict], dict], **values) -> Callable[[dict], None]:
    return lambda d: path_getter(d).update(values)


def _annotate(key: str, value: str) -> Callable[[dict], None]:
    return lambda d: _annotations(d).__setitem__(key, value)


def _volume(d: dict, name: str) -> dict:
    (v,) = [v for v in _pod(d)["volumes"] if v["name"] == name]
    return v


def _mount(d: dict, name: str) -> dict:
    (m,) = [m for m in _container(d)["volumeMounts"] if m["name"] == name]
    return m


def _rename_volume(d: dict) -> None:
    _volume(d, "tmp")["name"] = _mount(d, "tmp")["name"] = "Tmp_dir"


def _trigger_delivery(d: dict) -> dict:
    return d["spec"]["delivery"]


@dataclass(frozen=True)
class Case:
    rule: str
    target: tuple[str, str, str]  # kustomization, kind, name
    mutate: Callable[[dict], None]
    config: ClusterConfig = OURS


T2V = ("overlays/gpu", "Service", "turboflow-t2v")
DEV_I2V = ("overlays/dev", "Service", "turboflow-i2v")
DEADLETTER = ("overlays/gpu", "Service", "turboflow-deadletter")
BROKER = ("overlays/gpu", "Broker", "default")
TRIGGER = ("overlays/gpu", "Trigger", "turboflow-t2v")
SOURCE = ("overlays/gpu", "ContainerSource", "turboflow-s3-uploads")
BINDING = ("overlays/gpu", "SinkBinding", "turboflow-deadletter-sink")
GATEWAY_BINDING = ("overlays/gpu", "SinkBinding", "turboflow-gateway-sink")
GATEWAY_TRIGGER = ("overlays/gpu", "Trigger", "turboflow-gateway")
GATEWAY = ("overlays/gpu", "Service", "turboflow-gateway")
PRODUCERS = ("eventing-auth", "EventPolicy", "turboflow-producers")
AUTO = "autoscaling.knative.dev/"

CASES = [
    Case("admission.unsupported-kind", T2V, _set(lambda d: d, kind="Configuration")),
    Case("serving.metadata.name", T2V, _set(lambda d: d["metadata"], name="Turboflow_T2V")),
    Case(
        "serving.metadata.autoscaling-on-service",
        T2V,
        _set(lambda d: d["metadata"], annotations={AUTO + "min-scale": "0"}),
    ),
    Case(
        "serving.metadata.rollout-duration",
        T2V,
        _set(lambda d: d["metadata"], annotations={"serving.knative.dev/rollout-duration": "1.5s"}),
    ),
    # the visibility *label* set as a template annotation: refused
    Case(
        "serving.template.networking-annotation",
        DEADLETTER,
        _annotate("networking.knative.dev/visibility", "cluster-local"),
    ),
    Case("serving.template.progress-deadline", T2V, _annotate("serving.knative.dev/progress-deadline", "30 min")),
    Case("serving.autoscaling.class", T2V, _annotate(AUTO + "class", "gpu.autoscaling.knative.dev")),
    Case("serving.autoscaling.min-max-scale", T2V, _annotate(AUTO + "min-scale", "5")),
    Case("serving.autoscaling.activation-scale", T2V, _annotate(AUTO + "activation-scale", "1")),
    Case("serving.autoscaling.target", T2V, _annotate(AUTO + "target", "0")),
    Case("serving.autoscaling.target-utilization", T2V, _annotate(AUTO + "target-utilization-percentage", "120")),
    Case("serving.autoscaling.target-burst-capacity", T2V, _annotate(AUTO + "target-burst-capacity", "-2")),
    Case("serving.autoscaling.panic", T2V, _annotate(AUTO + "panic-threshold-percentage", "100")),
    Case("serving.autoscaling.window", T2V, _annotate(AUTO + "window", "5s")),
    Case("serving.autoscaling.retention-period", T2V, _annotate(AUTO + "scale-to-zero-pod-retention-period", "2h")),
    Case("serving.autoscaling.scale-down-delay", T2V, _annotate(AUTO + "scale-down-delay", "1.5s")),
    Case("serving.autoscaling.metric", T2V, _annotate(AUTO + "metric", "cpu")),
    Case(
        "serving.autoscaling.initial-scale",
        T2V,
        lambda d: None,
        ClusterConfig(OURS.serving_features, OURS.eventing_features, {}, OURS.defaults),
    ),
    Case("serving.revision.timeout-seconds", T2V, _set(_pod, timeoutSeconds=3600)),
    Case("serving.revision.container-concurrency", T2V, _set(_pod, containerConcurrency=1001)),
    Case("serving.podspec.field", DEV_I2V, _set(_pod, hostNetwork=True)),
    Case("serving.podspec.service-account-name", T2V, _set(_pod, serviceAccountName="Turboflow_Functions")),
    Case(
        "serving.podspec.security-context",
        T2V,
        _set(_pod, securityContext={"sysctls": [{"name": "net.core.somaxconn", "value": "1024"}]}),
    ),
    Case(
        "serving.podspec.init-containers",
        T2V,
        _set(_pod, initContainers=[{"name": "warm", "image": "ghcr.io/turboflow/turboflow:0.1.0"}]),
    ),
    Case(
        "serving.containers.count",
        T2V,
        lambda d: _pod(d)["containers"].append({"name": "function", "image": "ghcr.io/turboflow/turboflow:0.1.0"}),
    ),
    Case("serving.containers.ports", T2V, lambda d: _container(d)["ports"][0].update(name="http")),
    Case(
        "serving.container.field", T2V, _set(_container, lifecycle={"preStop": {"exec": {"command": ["sleep", "5"]}}})
    ),
    Case("serving.container.name", T2V, _set(_container, name="queue-proxy")),
    Case("serving.container.image", T2V, _set(_container, image="ghcr.io/turboflow/TurboFlow:0.1.0")),
    Case("serving.container.termination-message-policy", T2V, _set(_container, terminationMessagePolicy="Always")),
    Case("serving.container.env", DEADLETTER, lambda d: _container(d)["env"].append({"name": "PORT", "value": "9"})),
    Case("serving.container.security-context", T2V, lambda d: _container(d)["securityContext"].update(privileged=True)),
    Case("serving.volumes.name", T2V, _rename_volume),
    Case("serving.volumes.unmounted", T2V, lambda d: _pod(d)["volumes"].append({"name": "spare", "emptyDir": {}})),
    # a writable model cache needs kubernetes.podspec-persistent-volume-write, which infra/knative leaves off
    Case("serving.volumes.source", T2V, lambda d: _volume(d, "models")["persistentVolumeClaim"].update(readOnly=False)),
    Case("serving.volume-mounts", T2V, lambda d: _mount(d, "models").update(readOnly=False)),
    Case("serving.probe.handler", T2V, lambda d: _container(d)["livenessProbe"].update(tcpSocket={})),
    Case(
        "serving.probe.readiness-period-zero", T2V, lambda d: _container(d)["readinessProbe"].update(timeoutSeconds=5)
    ),
    Case(
        "serving.probe.readiness-bounds", T2V, lambda d: _container(d)["readinessProbe"].update(initialDelaySeconds=-1)
    ),
    Case("eventing.broker.class", BROKER, lambda d: d["metadata"]["annotations"].clear()),
    Case("eventing.broker.config", BROKER, lambda d: d["spec"]["config"].pop("kind")),
    Case("eventing.delivery.retry", TRIGGER, _set(_trigger_delivery, retry=-1)),
    # a Go duration where Knative wants ISO-8601
    Case("eventing.delivery.timeout", TRIGGER, _set(_trigger_delivery, timeout="10m")),
    Case("eventing.delivery.backoff-policy", TRIGGER, _set(_trigger_delivery, backoffPolicy="Exponential")),
    Case("eventing.delivery.backoff-delay", BROKER, lambda d: d["spec"]["delivery"].update(backoffDelay="5s")),
    Case("eventing.delivery.format", TRIGGER, _set(_trigger_delivery, format="xml")),
    Case("eventing.delivery.retry-after-max", TRIGGER, _set(_trigger_delivery, retryAfterMax="PT1M")),
    Case("eventing.destination", TRIGGER, lambda d: d["spec"]["subscriber"]["ref"].pop("apiVersion")),
    Case("eventing.trigger.broker", TRIGGER, lambda d: d["spec"].update(brokerRef={"name": "default"})),
    Case(
        "eventing.trigger.filter-attributes",
        TRIGGER,
        lambda d: d["spec"].update(filters=[{"exact": {"Type": "io.turboflow.video.t2v.requested"}}]),
    ),
    Case(
        "eventing.trigger.filters-dialect",
        TRIGGER,
        lambda d: d["spec"]["filters"][0].update(prefix={"source": "/turboflow"}),
    ),
    Case(
        "eventing.trigger.annotations",
        TRIGGER,
        lambda d: d["metadata"].update(annotations={"eventing.knative.dev/injection": "true"}),
    ),
    Case("eventing.source.containers", SOURCE, lambda d: _container(d).pop("image")),
    Case(
        "eventing.source.ce-overrides",
        SOURCE,
        lambda d: d["spec"].update(ceOverrides={"extensions": {"tenant-id": "default"}}),
    ),
    Case("eventing.sinkbinding.subject", BINDING, lambda d: d["spec"]["subject"].update(namespace="default")),
    # a subject needs exactly one of name and selector
    Case(
        "eventing.sinkbinding.subject",
        GATEWAY_BINDING,
        lambda d: d["spec"]["subject"].update(selector={"matchLabels": {"app.kubernetes.io/component": "gateway"}}),
    ),
    Case("eventing.sinkbinding.sink", GATEWAY_BINDING, lambda d: d["spec"].pop("sink")),
    # ref + uri: the uri must be relative to the ref (the gateway's path), never a second absolute address
    Case(
        "eventing.destination",
        GATEWAY_TRIGGER,
        lambda d: d["spec"]["subscriber"].update(uri="http://turboflow-gateway.example.com/internal/events"),
    ),
    # a relative uri needs the ref it is relative to
    Case("eventing.destination", GATEWAY_BINDING, lambda d: d["spec"].update(sink={"uri": "/turboflow/default"})),
    # the gateway's readiness probe is aggressive too: no timeoutSeconds
    Case(
        "serving.probe.readiness-period-zero",
        GATEWAY,
        lambda d: _container(d)["readinessProbe"].update(timeoutSeconds=1),
    ),
    Case("eventing.eventpolicy.oidc-flag", PRODUCERS, lambda d: None),
    Case(
        "eventing.eventpolicy.from",
        PRODUCERS,
        lambda d: d["spec"]["from"][0].update(sub="system:*:turboflow"),
        WITH_OIDC,
    ),
    Case(
        "eventing.eventpolicy.to",
        PRODUCERS,
        lambda d: d["spec"]["to"][0].update(selector={"matchLabels": {}}),
        WITH_OIDC,
    ),
]


def test_every_rule_has_a_refused_mutation():
    assert sorted({c.rule for c in CASES}) == sorted(RULES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.rule)
def test_rule_refuses_its_mutation(case):
    original = _find(*case.target)
    assert not admit(original, CONFIG_FOR[case.target[0]])  # the unmutated manifest is admitted ...
    doc = copy.deepcopy(original)
    case.mutate(doc)
    rules = {v.rule for v in admit(doc, case.config)}
    assert case.rule in rules, (case.rule, [str(v) for v in admit(doc, case.config)])  # ... the mutation is not
