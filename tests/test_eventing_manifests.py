"""eventing/manifests/*.yaml against the real Knative / eventing-natss CRD schemas (copied into tests/data), plus
the wiring between the objects (names, refs, delivery semantics)."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from crd_schemas import CRDS, crd_validators  # noqa: F401

from turboflow.eventing.triggers import MANIFESTS_DIR, load_manifests, parse_duration

GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$")


VALIDATORS = crd_validators()
DOCS = load_manifests()


def by_kind(kind):
    return [d for d in DOCS if d["kind"] == kind]


def test_crds_are_loaded():
    assert ("eventing.knative.dev/v1", "Trigger") in VALIDATORS
    assert ("messaging.knative.dev/v1alpha1", "NatsJetStreamChannel") in VALIDATORS
    assert ("serving.knative.dev/v1", "Service") in VALIDATORS


@pytest.mark.parametrize(
    "doc", [d for d in DOCS if d["kind"] != "ConfigMap"], ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_custom_resources_match_their_crd(doc):
    validator = VALIDATORS.get((doc["apiVersion"], doc["kind"]))
    assert validator is not None, f"no CRD for {doc['apiVersion']} {doc['kind']}"
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_a_typo_would_be_caught():
    trigger = copy.deepcopy(by_kind("Trigger")[0])
    trigger["spec"]["delivery"]["deadLetterSink"]["reff"] = {}
    assert list(VALIDATORS[("eventing.knative.dev/v1", "Trigger")].iter_errors(trigger))


def test_channel_template_is_a_valid_jetstream_channel():
    (cm,) = [d for d in by_kind("ConfigMap") if "channelTemplateSpec" in d.get("data", {})]
    template = yaml.safe_load(cm["data"]["channelTemplateSpec"])
    assert (template["apiVersion"], template["kind"]) == ("messaging.knative.dev/v1alpha1", "NatsJetStreamChannel")
    validator = VALIDATORS[("messaging.knative.dev/v1alpha1", "NatsJetStreamChannel")]
    errors = list(
        validator.iter_errors(
            {"apiVersion": template["apiVersion"], "kind": template["kind"], "metadata": {}, "spec": template["spec"]}
        )
    )
    assert not errors, [e.message for e in errors]
    stream = template["spec"]["stream"]["config"]
    assert stream["storage"] == "File" and stream["retention"] in ("Limits", "Interest", "Work")
    assert stream["discard"] in ("Old", "New") and stream["maxMsgSize"] <= 1 << 20
    for key in ("duplicateWindow", "maxAge"):
        assert GO_DURATION.match(stream[key]), key
    consumer = template["spec"]["consumerConfigTemplate"]
    assert GO_DURATION.match(consumer["ackWait"])
    assert consumer["deliverPolicy"] in ("All", "Last", "New", "ByStartSequence", "ByStartTime")
    (broker,) = by_kind("Broker")
    assert broker["metadata"]["annotations"]["eventing.knative.dev/broker.class"] == "MTChannelBasedBroker"
    assert broker["spec"]["config"] == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": cm["metadata"]["name"],
        "namespace": cm["metadata"]["namespace"],
    }


def go_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text))


def test_triggers_route_requests_with_long_timeouts_and_a_dead_letter_sink():
    triggers = {t["metadata"]["name"]: t for t in by_kind("Trigger")}
    (broker,) = by_kind("Broker")
    services = {d["metadata"]["name"] for d in by_kind("Service")}
    expected = {
        "turboflow-t2v": "io.turboflow.video.t2v.requested",
        "turboflow-i2v": "io.turboflow.video.i2v.requested",
    }
    # the third one feeds the gateway (its Service lives in infra/base; tests/test_infra_gateway.py checks it)
    assert set(triggers) == {*expected, "turboflow-gateway"}
    gateway = triggers["turboflow-gateway"]["spec"]
    assert gateway["broker"] == broker["metadata"]["name"]
    assert gateway["filters"] == [{"prefix": {"type": "io.turboflow.video."}}]
    assert gateway["delivery"]["deadLetterSink"] == triggers["turboflow-t2v"]["spec"]["delivery"]["deadLetterSink"]
    for name, etype in expected.items():
        spec = triggers[name]["spec"]
        assert spec["broker"] == broker["metadata"]["name"]
        assert spec["filters"] == [{"exact": {"type": etype}}]
        assert spec["subscriber"]["ref"]["name"] == name
        d = spec["delivery"]
        # longer than the slowest generation (cold start included); eventing-natss sets AckWait = timeout + 0.5s
        assert parse_duration(d["timeout"]) >= 600
        assert d["retry"] >= 3 and d["backoffPolicy"] == "exponential" and parse_duration(d["backoffDelay"]) > 0
        assert d["deadLetterSink"]["ref"]["name"] == "turboflow-deadletter" in services
    (cm,) = [d for d in by_kind("ConfigMap") if "channelTemplateSpec" in d.get("data", {})]
    stream = yaml.safe_load(cm["data"]["channelTemplateSpec"])["spec"]["stream"]["config"]
    # a redelivered request's reply must still fall inside the duplicate window: every attempt + every backoff wait
    for trigger in triggers.values():
        assert go_seconds(stream["duplicateWindow"]) >= whole_delivery_seconds(trigger["spec"]["delivery"])


def whole_delivery_seconds(delivery: dict) -> float:
    """The longest a request can spend in delivery: (retry + 1) attempts at the timeout plus the backoff waits
    (exponential: delay * 2^i for retry i; linear: delay * (i + 1))."""
    retry, delay = delivery["retry"], parse_duration(delivery["backoffDelay"])
    waits = [delay * (2**i if delivery["backoffPolicy"] == "exponential" else i + 1) for i in range(retry)]
    return (retry + 1) * parse_duration(delivery["timeout"]) + sum(waits)


def test_whole_delivery_arithmetic():
    delivery = {"retry": 7, "backoffPolicy": "exponential", "backoffDelay": "PT5S", "timeout": "PT10M"}
    assert whole_delivery_seconds(delivery) == 8 * 600 + 635
    assert whole_delivery_seconds({**delivery, "retry": 3, "backoffPolicy": "linear"}) == 4 * 600 + 30


def test_config_nats_and_sources():
    (cfg,) = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "config-nats"]
    assert cfg["metadata"]["namespace"] == "knative-eventing"
    assert yaml.safe_load(cfg["data"]["eventing-nats"])["url"].startswith("nats://")
    (src,) = by_kind("ContainerSource")
    container = src["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["turboflow"] and container["args"][0] == "s3source"
    assert "--subject" in container["args"] and "--stream" in container["args"]
    assert src["spec"]["sink"]["ref"]["kind"] == "Broker"
    bindings = {b["metadata"]["name"]: b["spec"]["subject"]["name"] for b in by_kind("SinkBinding")}
    assert bindings == {
        "turboflow-deadletter-sink": "turboflow-deadletter",
        "turboflow-t2v-sink": "turboflow-t2v",
        "turboflow-i2v-sink": "turboflow-i2v",
        "turboflow-gateway-sink": "turboflow-gateway",
    }


def test_manifests_ship_with_the_package():
    assert MANIFESTS_DIR.is_dir() and len(list(MANIFESTS_DIR.glob("*.yaml"))) >= 5


def _dead_lettered(event_type: str, subscriber_url: str):
    """A request as the broker sends it to the dead-letter sink after the retries to `subscriber_url` failed."""
    from cloudevents.core.v1.event import CloudEvent

    attributes = {
        "type": event_type,
        "source": "/turboflow/gateway",
        "id": "req-dead-1",
        "specversion": "1.0",
        "tenant": "default",
        "knativeerrorcode": "503",
        "knativeerrordest": subscriber_url,
    }
    return CloudEvent(attributes=attributes, data={"prompt": "a fox"})


def test_the_dead_letter_sink_fails_a_request_its_function_never_got():
    from turboflow.eventing.deadletter import failed_for

    failed = failed_for(_dead_lettered("io.turboflow.video.t2v.requested", "http://turboflow-t2v.turboflow.svc/"))
    assert failed is not None and failed.get_data()["code"] == "delivery_failed"


def test_a_request_that_only_missed_the_gateway_is_not_failed():
    """Trigger turboflow-gateway dead-letters into the same sink as the functions' Triggers (a Trigger without one
    inherits the Broker's, the same sink). A request the gateway could not take must not become `delivery_failed`:
    its function got it, and a `failed` would race the genuine `completed` (the first terminal event wins)."""
    from turboflow.eventing.deadletter import failed_for

    url = "http://turboflow-gateway.turboflow.svc.cluster.local/internal/events"
    assert failed_for(_dead_lettered("io.turboflow.video.t2v.requested", url)) is None
