"""The admission rules Knative Serving's and Eventing's webhooks enforce, for the fields turboflow's manifests use.

The CRD schemas (tests/crd_schemas.py) only type the objects; the webhooks then default and validate them with Go
code the schemas cannot express (a readiness probe's timeoutSeconds is refused when periodSeconds is 0, a PVC
needs a feature flag, a delivery timeout must be an ISO-8601 period, ...). This module re-implements those rules in
Python so `make test` rejects what `kubectl apply` would be refused by the webhook. Every rule has a stable id (the
keys of RULES) and a comment naming the upstream file and function it mirrors, read at:

  knative/serving      98e5ef90aa70 (2026-08-21)
  knative/eventing     8cf4c4b67303 (2026-06-17)
  knative/pkg, knative/networking (same era)

Feature-gated rules take the flag values from ClusterConfig, built from the rendered infra/knative ConfigMaps
(ClusterConfig.from_docs), with upstream defaults for every key we do not set.

Deliberately not mirrored: update-only rules (immutable fields, creator/lastModifier annotations, template name
changes), traffic blocks (our Services have none), CESQL expression parsing, label-selector parsing, CA-cert PEM
parsing, the queue-proxy resource annotations, warnings (they never block an apply) and Knative kinds turboflow
does not ship (any such kind is reported as `admission.unsupported-kind` rather than passed silently).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

# rule id -> the upstream code it mirrors
RULES: dict[str, str] = {
    "admission.unsupported-kind": "(this module) a Knative kind with no rules here is never passed silently",
    # ---- knative/serving ----------------------------------------------------------------------------------------
    "serving.metadata.name": "knative/pkg apis/metadata_validation.go ValidateObjectMetadata (DNS-1035 label)",
    "serving.metadata.autoscaling-on-service": "serving pkg/apis/serving/metadata_validation.go "
    "ValidateHasNoAutoscalingAnnotation",
    "serving.metadata.rollout-duration": "serving pkg/apis/serving/metadata_validation.go "
    "ValidateRolloutDurationAnnotation",
    "serving.template.networking-annotation": "knative/networking pkg/apis/networking/metadata_validation.go "
    "ValidateAnnotations",
    "serving.template.progress-deadline": "serving pkg/apis/serving/v1/revision_validation.go "
    "validateProgressDeadlineAnnotation",
    "serving.autoscaling.class": "serving pkg/apis/autoscaling/annotation_validation.go validateClass",
    "serving.autoscaling.min-max-scale": "serving pkg/apis/autoscaling/annotation_validation.go validateMinMaxScale, "
    "getIntGE0, validateMaxScaleWithinLimit",
    "serving.autoscaling.activation-scale": "serving pkg/apis/autoscaling/annotation_validation.go "
    "validateMinMaxScale (activation-scale)",
    "serving.autoscaling.target": "serving pkg/apis/autoscaling/annotation_validation.go validateFloats (target)",
    "serving.autoscaling.target-utilization": "serving pkg/apis/autoscaling/annotation_validation.go validateFloats "
    "(target-utilization-percentage)",
    "serving.autoscaling.target-burst-capacity": "serving pkg/apis/autoscaling/annotation_validation.go "
    "validateFloats (target-burst-capacity)",
    "serving.autoscaling.panic": "serving pkg/apis/autoscaling/annotation_validation.go validateFloats (panic-*)",
    "serving.autoscaling.window": "serving pkg/apis/autoscaling/annotation_validation.go validateWindow",
    "serving.autoscaling.retention-period": "serving pkg/apis/autoscaling/annotation_validation.go "
    "validateLastPodRetention",
    "serving.autoscaling.scale-down-delay": "serving pkg/apis/autoscaling/annotation_validation.go "
    "validateScaleDownDelay",
    "serving.autoscaling.metric": "serving pkg/apis/autoscaling/annotation_validation.go validateMetric",
    "serving.autoscaling.initial-scale": "serving pkg/apis/autoscaling/annotation_validation.go validateInitialScale",
    "serving.revision.timeout-seconds": "serving pkg/apis/serving/v1/revision_validation.go validateTimeoutSeconds",
    "serving.revision.container-concurrency": "serving pkg/apis/serving/metadata_validation.go "
    "ValidateContainerConcurrency",
    "serving.podspec.field": "serving pkg/apis/serving/fieldmask.go PodSpecMask (+ config/features.go flags)",
    "serving.podspec.service-account-name": "serving pkg/apis/serving/k8s_validation.go ValidatePodSpec "
    "(DNS-1123 subdomain)",
    "serving.podspec.security-context": "serving pkg/apis/serving/k8s_validation.go ValidatePodSecurityContext, "
    "fieldmask.go PodSecurityContextMask",
    "serving.podspec.init-containers": "serving pkg/apis/serving/k8s_validation.go validateInitContainers, "
    "validateInitContainer",
    "serving.containers.count": "serving pkg/apis/serving/k8s_validation.go ValidatePodSpec, validateContainers "
    "(multi-container flag, duplicate names)",
    "serving.containers.ports": "serving pkg/apis/serving/k8s_validation.go validateContainersPorts, "
    "validateContainerPorts, validateContainerPortBasic",
    "serving.container.field": "serving pkg/apis/serving/fieldmask.go ContainerMask, ResourceRequirementsMask, "
    "ContainerPortMask",
    "serving.container.name": "serving pkg/apis/serving/k8s_validation.go validate (reservedContainerNames)",
    "serving.container.image": "serving pkg/apis/serving/k8s_validation.go validate (name.ParseReference)",
    "serving.container.termination-message-policy": "serving pkg/apis/serving/k8s_validation.go validate",
    "serving.container.env": "serving pkg/apis/serving/k8s_validation.go validateEnvVar, validateEnvValueFrom, "
    "validateEnvFrom (fieldmask.go EnvVarMask, EnvVarSourceMask)",
    "serving.container.security-context": "serving pkg/apis/serving/k8s_validation.go validateSecurityContext, "
    "fieldmask.go SecurityContextMask, CapabilitiesMask",
    "serving.volumes.name": "serving pkg/apis/serving/k8s_validation.go ValidateVolumes, validateVolume (name)",
    "serving.volumes.unmounted": "serving pkg/apis/serving/k8s_validation.go ValidateVolumes (not mounted)",
    "serving.volumes.source": "serving pkg/apis/serving/k8s_validation.go validateVolume (one source; flags "
    "for emptyDir/PVC/hostPath/CSI/ephemeral/image), validatePersistentVolumeClaims, "
    "validateEmptyDirFields",
    "serving.volume-mounts": "serving pkg/apis/serving/k8s_validation.go validateVolumeMounts",
    "serving.probe.handler": "serving pkg/apis/serving/k8s_validation.go validateProbe (one handler, fieldmask "
    "ProbeMask/HTTPGetActionMask, user-container probe port)",
    "serving.probe.readiness-period-zero": "serving pkg/apis/serving/k8s_validation.go validateReadinessProbe "
    "(periodSeconds 0: no timeoutSeconds/failureThreshold)",
    "serving.probe.readiness-bounds": "serving pkg/apis/serving/k8s_validation.go validateReadinessProbe (bounds)",
    # ---- knative/eventing ---------------------------------------------------------------------------------------
    "eventing.broker.class": "eventing pkg/apis/eventing/v1/broker_validation.go Broker.Validate (class annotation)",
    "eventing.broker.config": "eventing pkg/apis/eventing/v1/broker_validation.go BrokerSpec.Validate -> "
    "knative/pkg apis/duck/v1/knative_reference.go KReference.Validate",
    "eventing.delivery.retry": "eventing pkg/apis/duck/v1/delivery_types.go DeliverySpec.Validate (retry >= 0)",
    "eventing.delivery.timeout": "eventing pkg/apis/duck/v1/delivery_types.go DeliverySpec.Validate (timeout: "
    "delivery-timeout flag, non-zero ISO-8601 period)",
    "eventing.delivery.backoff-policy": "eventing pkg/apis/duck/v1/delivery_types.go DeliverySpec.Validate",
    "eventing.delivery.backoff-delay": "eventing pkg/apis/duck/v1/delivery_types.go DeliverySpec.Validate "
    "(ISO-8601 period)",
    "eventing.delivery.format": "eventing pkg/apis/duck/v1/delivery_types.go DeliverySpec.Validate (format)",
    "eventing.delivery.retry-after-max": "eventing pkg/apis/duck/v1/delivery_types.go DeliverySpec.Validate "
    "(delivery-retryafter flag)",
    "eventing.destination": "knative/pkg apis/duck/v1/destination.go ValidateDestination, knative_reference.go "
    "KReference.Validate",
    "eventing.trigger.broker": "eventing pkg/apis/eventing/v1/trigger_validation.go TriggerSpec.Validate "
    "(broker / brokerRef, cross-namespace-event-links)",
    "eventing.trigger.filter-attributes": "eventing pkg/apis/eventing/v1/trigger_validation.go ValidateAttributesNames",
    "eventing.trigger.filters-dialect": "eventing pkg/apis/eventing/v1/trigger_validation.go "
    "ValidateSubscriptionAPIFilter, ValidateOneOf",
    "eventing.trigger.annotations": "eventing pkg/apis/eventing/v1/trigger_validation.go "
    "validateDependencyAnnotation, validateInjectionAnnotation",
    "eventing.source.containers": "eventing pkg/apis/sources/v1/container_validation.go "
    "ContainerSourceSpec.Validate, isValidContainer",
    "eventing.source.ce-overrides": "knative/pkg apis/duck/v1/source_types.go CloudEventOverrides.Validate",
    "eventing.sinkbinding.subject": "eventing pkg/apis/sources/v1/sinkbinding_validation.go; knative/pkg "
    "tracker/interface.go Reference.Validate",
    "eventing.sinkbinding.sink": "eventing pkg/apis/sources/v1/sinkbinding_validation.go SinkBindingSpec.Validate "
    "(Sink.Validate on a non-pointer Destination: a sink is required) -> knative/pkg apis/duck/v1/destination.go "
    "ValidateDestination",
    "eventing.eventpolicy.oidc-flag": "eventing pkg/apis/eventing/v1alpha1/eventpolicy_validation.go "
    "EventPolicy.Validate (authentication-oidc must be enabled)",
    "eventing.eventpolicy.from": "eventing pkg/apis/eventing/v1alpha1/eventpolicy_validation.go "
    "EventPolicySpec.Validate (from), validateSub, EventPolicyFromReference.Validate",
    "eventing.eventpolicy.to": "eventing pkg/apis/eventing/v1alpha1/eventpolicy_validation.go "
    "EventPolicySpec.Validate (to), EventPolicyToReference.Validate",
}


@dataclass(frozen=True)
class Violation:
    rule: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.path}: {self.message}"


# ---------------------------------------------------------------------------------------------------------------
# cluster configuration (feature flags and limits), upstream defaults + our infra/knative ConfigMaps
# ---------------------------------------------------------------------------------------------------------------
# serving pkg/apis/config/features.go defaultFeaturesConfig (keys as in the config-features ConfigMap)
SERVING_FEATURE_DEFAULTS = {
    "multi-container": "Enabled",
    "multi-container-probing": "Disabled",
    "secure-pod-defaults": "Disabled",
    "kubernetes.containerspec-addcapabilities": "Disabled",
    "kubernetes.podspec-affinity": "Disabled",
    "kubernetes.podspec-dnsconfig": "Disabled",
    "kubernetes.podspec-dnspolicy": "Disabled",
    "kubernetes.podspec-volumes-emptydir": "Enabled",
    "kubernetes.podspec-fieldref": "Disabled",
    "kubernetes.podspec-hostaliases": "Disabled",
    "kubernetes.podspec-hostipc": "Disabled",
    "kubernetes.podspec-hostnetwork": "Disabled",
    "kubernetes.podspec-hostpid": "Disabled",
    "kubernetes.podspec-volumes-hostpath": "Disabled",
    "kubernetes.podspec-volumes-csi": "Disabled",
    "kubernetes.podspec-init-containers": "Disabled",
    "kubernetes.podspec-volumes-mount-propagation": "Disabled",
    "kubernetes.podspec-nodeselector": "Disabled",
    "kubernetes.podspec-persistent-volume-claim": "Disabled",
    "kubernetes.podspec-persistent-volume-write": "Disabled",
    "kubernetes.podspec-priorityclassname": "Disabled",
    "kubernetes.podspec-runtimeclassname": "Disabled",
    "kubernetes.podspec-schedulername": "Disabled",
    "kubernetes.podspec-securitycontext": "Disabled",
    "kubernetes.podspec-shareprocessnamespace": "Disabled",
    "kubernetes.podspec-tolerations": "Disabled",
    "kubernetes.podspec-topologyspreadconstraints": "Disabled",
    "kubernetes.podspec-volumes-ephemeral": "Disabled",
    "kubernetes.podspec-volumes-image": "Disabled",
}
# eventing pkg/apis/feature/features.go newDefaults
EVENTING_FEATURE_DEFAULTS = {
    "kreference-group": "disabled",
    "delivery-retryafter": "disabled",
    "delivery-timeout": "enabled",
    "authentication-oidc": "disabled",
    "cross-namespace-event-links": "disabled",
}
# serving pkg/autoscaler/config/config.go defaultConfig and pkg/apis/config/defaults.go defaultDefaultsConfig
AUTOSCALER_DEFAULTS = {
    "allow-zero-initial-scale": "false",
    "max-scale-limit": "0",
    "pod-autoscaler-class": "kpa.autoscaling.knative.dev",
}
SERVING_DEFAULTS = {
    "max-revision-timeout-seconds": "600",
    "revision-timeout-seconds": "300",
    "container-concurrency-max-limit": "1000",
    "allow-container-concurrency-zero": "true",
}


@dataclass(frozen=True)
class ClusterConfig:
    serving_features: dict = field(default_factory=dict)
    eventing_features: dict = field(default_factory=dict)
    autoscaler: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)

    @classmethod
    def from_docs(cls, docs: Iterable[dict]) -> ClusterConfig:
        """From rendered ConfigMaps (infra/knative): the keys they set, upstream defaults for the rest."""
        maps = {
            (d["metadata"].get("namespace"), d["metadata"]["name"]): d.get("data", {})
            for d in docs
            if d.get("kind") == "ConfigMap"
        }
        return cls(
            serving_features=dict(maps.get(("knative-serving", "config-features"), {})),
            eventing_features=dict(maps.get(("knative-eventing", "config-features"), {})),
            autoscaler=dict(maps.get(("knative-serving", "config-autoscaler"), {})),
            defaults=dict(maps.get(("knative-serving", "config-defaults"), {})),
        )

    def with_eventing(self, **flags: str) -> ClusterConfig:
        return ClusterConfig(self.serving_features, {**self.eventing_features, **flags}, self.autoscaler, self.defaults)

    def serving_flag(self, key: str) -> str:
        """Enabled | Allowed | Disabled, parsed case-insensitively (serving config/features.go asFlag)."""
        raw = self.serving_features.get(key)
        if raw is not None:
            for flag in ("Enabled", "Allowed", "Disabled", "AllowRootBounded"):
                if raw.strip().lower() == flag.lower():
                    return flag
        return SERVING_FEATURE_DEFAULTS.get(key, "Disabled")

    def serving_enabled(self, key: str) -> bool:
        return self.serving_flag(key) == "Enabled"

    def serving_not_disabled(self, key: str) -> bool:
        # the field masks keep a field for Enabled *and* Allowed (fieldmask.go: `!= config.Disabled`)
        return self.serving_flag(key) != "Disabled"

    def eventing_enabled(self, key: str) -> bool:
        raw = self.eventing_features.get(key, EVENTING_FEATURE_DEFAULTS.get(key, "disabled"))
        return raw.strip().lower() == "enabled"

    def autoscaler_value(self, key: str) -> str:
        return self.autoscaler.get(key, AUTOSCALER_DEFAULTS[key]).strip()

    def default_value(self, key: str) -> str:
        return self.defaults.get(key, SERVING_DEFAULTS[key]).strip()


# ---------------------------------------------------------------------------------------------------------------
# value parsers (Go/Kubernetes semantics)
# ---------------------------------------------------------------------------------------------------------------
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
GO_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# rickb777/date/period.Parse: ISO-8601 period, optional sign, fractions allowed, at least one component
ISO_PERIOD = re.compile(
    r"[-+]?P(?!$)(?:\d+(?:[.,]\d+)?Y)?(?:\d+(?:[.,]\d+)?M)?(?:\d+(?:[.,]\d+)?W)?"
    r"(?:\d+(?:[.,]\d+)?D)?(?:T(?=\d)(?:\d+(?:[.,]\d+)?H)?(?:\d+(?:[.,]\d+)?M)?"
    r"(?:\d+(?:[.,]\d+)?S)?)?"
)
# go-containerregistry name.ParseReference with WeakValidation: [registry/]repo[:tag][@digest], lowercase repo
IMAGE_REFERENCE = re.compile(
    r"(?:(?:[a-zA-Z0-9-]+\.)*[a-zA-Z0-9-]+(?::\d+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?(?:@sha256:[a-f0-9]{64})?"
)
C_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ATTRIBUTE_NAME = re.compile(r"[a-z][a-z0-9]*")  # eventing trigger_validation.go validAttributeName
MAX_INT32 = 2**31 - 1


def is_dns1035_label(text: Any) -> bool:
    return isinstance(text, str) and len(text) <= 63 and DNS1035_LABEL.fullmatch(text) is not None


def is_dns1123_label(text: Any) -> bool:
    return isinstance(text, str) and len(text) <= 63 and DNS1123_LABEL.fullmatch(text) is not None


def is_dns1123_subdomain(text: Any) -> bool:
    return isinstance(text, str) and len(text) <= 253 and DNS1123_SUBDOMAIN.fullmatch(text) is not None


def go_duration_seconds(text: Any) -> float | None:
    """time.ParseDuration: seconds, or None when `text` is not a Go duration."""
    if not isinstance(text, str):
        return None
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
    if body == "0":
        return 0.0
    parts = GO_DURATION_PART.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body:
        return None
    return sign * sum(float(n) * GO_UNIT_SECONDS[u] for n, u in parts)


def is_iso_period(text: Any) -> bool:
    return isinstance(text, str) and ISO_PERIOD.fullmatch(text) is not None


def iso_period_is_zero(text: str) -> bool:
    return not any(float(n.replace(",", ".")) for n in re.findall(r"\d+(?:[.,]\d+)?", text))


def parse_go_int(value: Any) -> int | None:
    """strconv.ParseInt(v, 10, 32) / Atoi on an annotation string."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+", value):
        return int(value)
    return None


def parse_go_float(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def is_set(value: Any) -> bool:
    """apis.CheckDisallowedFields only reports fields with a non-zero value."""
    return value not in (None, False, 0, "", [], {})


# ---------------------------------------------------------------------------------------------------------------
# the checker
# ---------------------------------------------------------------------------------------------------------------
class Admission:
    """Defaults then validates one object as the webhooks would; `violations` collects what they would refuse."""

    def __init__(self, config: ClusterConfig):
        self.config = config
        self.violations: list[Violation] = []

    def fail(self, rule: str, path: str, message: str) -> None:
        assert rule in RULES, f"unregistered rule {rule}"
        self.violations.append(Violation(rule, path, message))

    def disallow_unknown(self, rule: str, obj: Any, allowed: Iterable[str], path: str) -> None:
        if not isinstance(obj, dict):
            return
        for key in sorted(set(obj) - set(allowed)):
            if is_set(obj[key]):
                self.fail(rule, f"{path}.{key}", "must not set the field(s)")


Handler = Callable[[Admission, dict], None]
HANDLERS: dict[tuple[str, str], Handler] = {}


def handles(api_version: str, kind: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[(api_version, kind)] = fn
        return fn

    return register


def admit(doc: dict, config: ClusterConfig) -> list[Violation]:
    """What the Knative webhooks would refuse in `doc` (empty: admitted; non-Knative kinds are not theirs)."""
    checker = Admission(config)
    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    handler = HANDLERS.get((api, kind))
    if handler is not None:
        handler(checker, json.loads(json.dumps(doc)))  # a private copy: defaulting mutates it
    elif api.split("/")[0].endswith("knative.dev"):
        checker.fail("admission.unsupported-kind", kind, f"no admission rules for {api} {kind} in this module")
    return checker.violations


def admit_all(docs: Iterable[dict], config: ClusterConfig) -> list[Violation]:
    out = []
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        out += [Violation(v.rule, f"{name} {v.path}", v.message) for v in admit(doc, config)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# knative/serving: Service
# ---------------------------------------------------------------------------------------------------------------
AUTOSCALING = "autoscaling.knative.dev/"
KPA, HPA = "kpa.autoscaling.knative.dev", "hpa.autoscaling.knative.dev"
WINDOW_MIN, WINDOW_MAX = 6.0, 3600.0  # serving pkg/apis/autoscaling/register.go
# serving pkg/apis/autoscaling/register.go: each annotation also answers to its older camelCase key
ANNOTATION_ALIASES = {
    "class": ["class"],
    "min-scale": ["min-scale", "minScale"],
    "max-scale": ["max-scale", "maxScale"],
    "initial-scale": ["initial-scale", "initialScale"],
    "activation-scale": ["activation-scale"],
    "metric": ["metric"],
    "target": ["target"],
    "target-utilization-percentage": ["target-utilization-percentage", "targetUtilizationPercentage"],
    "target-burst-capacity": ["target-burst-capacity", "targetBurstCapacity"],
    "panic-window-percentage": ["panic-window-percentage", "panicWindowPercentage"],
    "panic-threshold-percentage": ["panic-threshold-percentage", "panicThresholdPercentage"],
    "window": ["window"],
    "scale-down-delay": ["scale-down-delay", "scaleDownDelay"],
    "scale-to-zero-pod-retention-period": ["scale-to-zero-pod-retention-period"],
}
# knative/networking pkg/apis/networking/metadata_validation.go allowedAnnotations
NETWORKING_ANNOTATIONS = {
    "networking.knative.dev/ingress.class",
    "networking.knative.dev/certificate.class",
    "networking.knative.dev/disableAutoTLS",
    "networking.knative.dev/disableExternalDomainTLS",
    "networking.knative.dev/http-option",
    "networking.knative.dev/ingress-class",
    "networking.knative.dev/certificate-class",
    "networking.knative.dev/disable-auto-tls",
    "networking.knative.dev/http-protocol",
}
REVISION_SPEC_FIELDS = {"containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds", "idleTimeoutSeconds"}
POD_SPEC_ALWAYS = {"serviceAccountName", "containers", "volumes", "imagePullSecrets", "enableServiceLinks"}
POD_SPEC_GATED = {  # fieldmask.go PodSpecMask: field -> the config-features key that lets it through
    "affinity": "kubernetes.podspec-affinity",
    "topologySpreadConstraints": "kubernetes.podspec-topologyspreadconstraints",
    "hostAliases": "kubernetes.podspec-hostaliases",
    "nodeSelector": "kubernetes.podspec-nodeselector",
    "runtimeClassName": "kubernetes.podspec-runtimeclassname",
    "tolerations": "kubernetes.podspec-tolerations",
    "shareProcessNamespace": "kubernetes.podspec-shareprocessnamespace",
    "priorityClassName": "kubernetes.podspec-priorityclassname",
    "schedulerName": "kubernetes.podspec-schedulername",
    "initContainers": "kubernetes.podspec-init-containers",
    "dnsPolicy": "kubernetes.podspec-dnspolicy",
    "dnsConfig": "kubernetes.podspec-dnsconfig",
    "hostIPC": "kubernetes.podspec-hostipc",
    "hostPID": "kubernetes.podspec-hostpid",
    "hostNetwork": "kubernetes.podspec-hostnetwork",
}
CONTAINER_FIELDS = {
    "name",
    "args",
    "command",
    "env",
    "workingDir",
    "envFrom",
    "image",
    "imagePullPolicy",
    "livenessProbe",
    "ports",
    "readinessProbe",
    "resources",
    "securityContext",
    "startupProbe",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "volumeMounts",
}
PROBE_FIELDS = {
    "httpGet",
    "tcpSocket",
    "exec",
    "grpc",
    "initialDelaySeconds",
    "timeoutSeconds",
    "periodSeconds",
    "successThreshold",
    "failureThreshold",
    "terminationGracePeriodSeconds",
}
PROBE_HANDLER_FIELDS = {
    "httpGet": {"host", "path", "scheme", "httpHeaders", "port"},
    "tcpSocket": {"host", "port"},
    "exec": {"command"},
    "grpc": {"port", "service"},
}
RESERVED_CONTAINER_NAMES = {"queue-proxy"}
RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
# networking.BackendHTTPPort, BackendHTTP2Port, QueueAdminPort, AutoscalingQueueMetricsPort, UserQueueMetricsPort,
# runtime.ProfilingDefaultPort
RESERVED_PORTS = {8012, 8013, 8022, 9090, 9091, 8008}
RESERVED_MOUNT_PATHS = {"/", "/dev", "/dev/log"}
VOLUME_SOURCE_FLAGS = {  # validateVolume / VolumeSourceMask
    "emptyDir": ("kubernetes.podspec-volumes-emptydir", "EmptyDir volume"),
    "persistentVolumeClaim": ("kubernetes.podspec-persistent-volume-claim", "Persistent volume claim"),
    "hostPath": ("kubernetes.podspec-volumes-hostpath", "HostPath volume"),
    "csi": ("kubernetes.podspec-volumes-csi", "CSI volume"),
    "ephemeral": ("kubernetes.podspec-volumes-ephemeral", "Ephemeral volume"),
    "image": ("kubernetes.podspec-volumes-image", "Image volume"),
}
UNGATED_VOLUME_SOURCES = {"secret", "configMap", "projected"}


def annotation(annotations: dict, name: str) -> tuple[str, str] | None:
    """kmap.KeyPriority.Get: the first of the annotation's keys that is present, with its value."""
    for alias in ANNOTATION_ALIASES[name]:
        key = AUTOSCALING + alias
        if key in annotations:
            return key, annotations[key]
    return None


@handles("serving.knative.dev/v1", "Service")
def _service(a: Admission, svc: dict) -> None:
    meta = svc.get("metadata", {})
    _object_name(a, meta, "metadata")
    annotations = meta.get("annotations") or {}
    # metadata_validation.go ValidateHasNoAutoscalingAnnotation: they only work on the revision template
    for key in sorted(annotations):
        if key.startswith("autoscaling.knative.dev"):
            a.fail(
                "serving.metadata.autoscaling-on-service",
                f"metadata.annotations.{key}",
                'autoscaling annotations must be put under "spec.template.metadata.annotations" to work',
            )
    _duration_annotation(
        a,
        annotations,
        "serving.knative.dev/rollout-duration",
        "serving.metadata.rollout-duration",
        "metadata.annotations",
    )
    template = (svc.get("spec") or {}).get("template") or {}
    _set_revision_defaults(a.config, template.setdefault("spec", {}))
    _revision_template(a, template, "spec.template")


def _object_name(a: Admission, meta: dict, path: str) -> None:
    name, generate = meta.get("name", ""), meta.get("generateName", "")
    if not name and not generate:
        a.fail("serving.metadata.name", f"{path}.name", "name or generateName is required")
    elif name and not is_dns1035_label(name):
        a.fail("serving.metadata.name", f"{path}.name", f"not a DNS 1035 label: {name!r}")


def _duration_annotation(a: Admission, annotations: dict, key: str, rule: str, path: str) -> None:
    # revision_validation.go validateProgressDeadlineAnnotation / ValidateRolloutDurationAnnotation
    value = annotations.get(key)
    if not value:
        return
    seconds = go_duration_seconds(value)
    if seconds is None:
        a.fail(rule, f"{path}.{key}", f"invalid value: {value}")
    elif seconds != round(seconds):
        a.fail(rule, f"{path}.{key}", f"{value} is not at second precision")
    elif seconds < 0:
        a.fail(rule, f"{path}.{key}", f"{value} must be positive")


def _set_revision_defaults(config: ClusterConfig, spec: dict) -> None:
    """revision_defaults.go RevisionSpec.SetDefaults: what the webhook fills in before it validates."""
    if not spec.get("timeoutSeconds"):
        spec["timeoutSeconds"] = int(config.default_value("revision-timeout-seconds"))
    containers = spec.get("containers") or []
    writable = {
        v.get("name")
        for v in spec.get("volumes") or []
        if any(k in v for k in ("emptyDir", "persistentVolumeClaim", "ephemeral"))
    }
    for c in containers:
        if not isinstance(c, dict):
            continue
        if len(containers) == 1 or c.get("ports"):
            probe = c.get("readinessProbe") or {}
            c["readinessProbe"] = probe
            if not any(h in probe for h in PROBE_HANDLER_FIELDS):
                probe["tcpSocket"] = {}
        probe = c.get("readinessProbe")
        if isinstance(probe, dict):
            probe["successThreshold"] = probe.get("successThreshold") or 1
            if probe.get("periodSeconds"):
                probe["failureThreshold"] = probe.get("failureThreshold") or 3
                probe["timeoutSeconds"] = probe.get("timeoutSeconds") or 1
        for m in c.get("volumeMounts") or []:
            if m.get("name") not in writable:
                m["readOnly"] = True


def _revision_template(a: Admission, template: dict, path: str) -> None:
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    _autoscaling_annotations(a, annotations, f"{path}.metadata.annotations")
    for key in sorted(annotations):  # networking ValidateAnnotations
        if key.startswith("networking.knative.dev") and key not in NETWORKING_ANNOTATIONS:
            a.fail(
                "serving.template.networking-annotation",
                f"{path}.metadata.annotations.{key}",
                "invalid key name (networking annotations on a revision template)",
            )
    _duration_annotation(
        a,
        annotations,
        "serving.knative.dev/progress-deadline",
        "serving.template.progress-deadline",
        f"{path}.metadata.annotations",
    )
    spec = template.get("spec") or {}
    _revision_spec(a, spec, f"{path}.spec")


# ---- autoscaling annotations (pkg/apis/autoscaling/annotation_validation.go) ------------------------------------
def _autoscaling_annotations(a: Admission, anns: dict, path: str) -> None:
    _class(a, anns, path)
    _min_max_scale(a, anns, path)
    _floats(a, anns, path)
    _window(a, anns, path)
    _retention(a, anns, path)
    _scale_down_delay(a, anns, path)
    _metric(a, anns, path)
    _initial_scale(a, anns, path)


def _class(a: Admission, anns: dict, path: str) -> None:
    found = annotation(anns, "class")
    if found and found[1].endswith(".knative.dev") and found[1] not in (KPA, HPA):
        a.fail("serving.autoscaling.class", f"{path}.{found[0]}", f"invalid value: {found[1]}")


def _int_ge0(a: Admission, anns: dict, name: str, path: str) -> int:
    found = annotation(anns, name)
    if not found:
        return 0
    value = parse_go_int(found[1])
    if value is None or value < 0 or value > MAX_INT32:
        a.fail("serving.autoscaling.min-max-scale", f"{path}.{found[0]}", f"expected 0 <= {found[1]} <= {MAX_INT32}")
        return 0
    return value


def _min_max_scale(a: Admission, anns: dict, path: str) -> None:
    low, high = _int_ge0(a, anns, "min-scale", path), _int_ge0(a, anns, "max-scale", path)
    if high and high < low:
        a.fail("serving.autoscaling.min-max-scale", path, f"max-scale={high} is less than min-scale={low}")
    limit = int(a.config.autoscaler_value("max-scale-limit"))
    found = annotation(anns, "max-scale")
    if found and limit:
        if high > limit or high == 0:
            a.fail(
                "serving.autoscaling.min-max-scale",
                f"{path}.{found[0]}",
                f"max-scale={high} must be within 1..max-scale-limit {limit}",
            )
    activation = annotation(anns, "activation-scale")
    if activation:
        value = parse_go_int(activation[1])
        key = f"{path}.{activation[0]}"
        if value is None:
            a.fail("serving.autoscaling.activation-scale", key, f"invalid value: {activation[1]}")
        elif low > value:
            a.fail("serving.autoscaling.activation-scale", key, f"min-scale={low} is greater than activation-scale")
        elif high and high < value:
            a.fail("serving.autoscaling.activation-scale", key, f"max-scale={high} is less than activation-scale")
        elif value < 2:
            a.fail("serving.autoscaling.activation-scale", key, f"activation-scale={value} must be greater than 1")


def _floats(a: Admission, anns: dict, path: str) -> None:
    checks = [  # (annotation, rule, valid?)
        ("target", "serving.autoscaling.target", lambda v: v >= 0.01),
        ("target-utilization-percentage", "serving.autoscaling.target-utilization", lambda v: 1 <= v <= 100),
        ("target-burst-capacity", "serving.autoscaling.target-burst-capacity", lambda v: v >= 0 or v == -1),
        ("panic-window-percentage", "serving.autoscaling.panic", lambda v: 1 <= v <= 100),
        ("panic-threshold-percentage", "serving.autoscaling.panic", lambda v: 110 <= v <= 1000),
    ]
    for name, rule, valid in checks:
        found = annotation(anns, name)
        if found:
            value = parse_go_float(found[1])
            if value is None or not valid(value):
                a.fail(rule, f"{path}.{found[0]}", f"invalid value: {found[1]}")


def _window(a: Admission, anns: dict, path: str) -> None:
    found = annotation(anns, "window")
    if found:
        seconds = go_duration_seconds(found[1])
        if seconds is None or not WINDOW_MIN <= seconds <= WINDOW_MAX or seconds != int(seconds):
            a.fail(
                "serving.autoscaling.window",
                f"{path}.{found[0]}",
                f"{found[1]}: a Go duration between 6s and 1h at second precision",
            )


def _retention(a: Admission, anns: dict, path: str) -> None:
    found = annotation(anns, "scale-to-zero-pod-retention-period")
    if found:
        seconds = go_duration_seconds(found[1])
        if seconds is None or not 0 <= seconds <= WINDOW_MAX:
            a.fail(
                "serving.autoscaling.retention-period",
                f"{path}.{found[0]}",
                f"{found[1]}: a Go duration between 0s and 1h",
            )


def _scale_down_delay(a: Admission, anns: dict, path: str) -> None:
    found = annotation(anns, "scale-down-delay")
    if found:
        seconds = go_duration_seconds(found[1])
        if seconds is None or not 0 <= seconds <= WINDOW_MAX or seconds != round(seconds):
            a.fail(
                "serving.autoscaling.scale-down-delay",
                f"{path}.{found[0]}",
                f"{found[1]}: a Go duration between 0s and 1h at second precision",
            )


def _metric(a: Admission, anns: dict, path: str) -> None:
    found = annotation(anns, "metric")
    if not found:
        return
    klass = (annotation(anns, "class") or (None, a.config.autoscaler_value("pod-autoscaler-class")))[1]
    metric = found[1]
    if (klass == KPA and metric not in ("concurrency", "rps")) or (klass == HPA and metric == ""):
        a.fail("serving.autoscaling.metric", f"{path}.{found[0]}", f"invalid value: {metric} (class {klass})")


def _initial_scale(a: Admission, anns: dict, path: str) -> None:
    found = annotation(anns, "initial-scale")
    if not found:
        return
    value = parse_go_int(found[1])
    if value is None or value < 0:
        a.fail("serving.autoscaling.initial-scale", f"{path}.{found[0]}", f"invalid value: {found[1]}")
    elif value == 0 and a.config.autoscaler_value("allow-zero-initial-scale").lower() != "true":
        a.fail(
            "serving.autoscaling.initial-scale",
            f"{path}.{found[0]}",
            "initial-scale=0 not allowed by cluster (config-autoscaler allow-zero-initial-scale)",
        )


# ---- revision spec ------------------------------------------------------------------------------------------------
def _revision_spec(a: Admission, spec: dict, path: str) -> None:
    timeout = spec.get("timeoutSeconds")
    maximum = int(a.config.default_value("max-revision-timeout-seconds"))
    if timeout and not (isinstance(timeout, int) and 0 <= timeout <= maximum):
        a.fail("serving.revision.timeout-seconds", f"{path}.timeoutSeconds", f"expected 0 <= {timeout} <= {maximum}")
    if "containerConcurrency" in spec:
        value = spec["containerConcurrency"]
        low = 0 if a.config.default_value("allow-container-concurrency-zero").lower() == "true" else 1
        high = int(a.config.default_value("container-concurrency-max-limit"))
        if not (isinstance(value, int) and low <= value <= high):
            a.fail(
                "serving.revision.container-concurrency",
                f"{path}.containerConcurrency",
                f"expected {low} <= {value} <= {high}",
            )
    _pod_spec(a, spec, path)


def _pod_spec(a: Admission, spec: dict, path: str) -> None:
    allowed = set(POD_SPEC_ALWAYS) | REVISION_SPEC_FIELDS
    allowed |= {f for f, flag in POD_SPEC_GATED.items() if a.config.serving_not_disabled(flag)}
    if a.config.serving_not_disabled("kubernetes.podspec-securitycontext") or a.config.serving_not_disabled(
        "secure-pod-defaults"
    ):
        allowed.add("securityContext")
    if spec.get("automountServiceAccountToken") is False:
        allowed.add("automountServiceAccountToken")
    a.disallow_unknown("serving.podspec.field", spec, allowed, path)
    _pod_security_context(a, spec.get("securityContext"), f"{path}.securityContext")
    containers = spec.get("containers") or []
    init_containers = spec.get("initContainers") or []
    mounted = {m.get("name") for c in containers + init_containers for m in c.get("volumeMounts") or []}
    volumes = _volumes(a, spec.get("volumes") or [], mounted, f"{path}.volumes")
    _init_containers(a, init_containers, containers, volumes, path)
    port = _serving_port(a, containers, path)
    if not containers:
        a.fail("serving.containers.count", f"{path}.containers", "missing field(s)")
    elif len(containers) > 1 and not a.config.serving_enabled("multi-container"):
        a.fail(
            "serving.containers.count",
            f"{path}.containers",
            f"multi-container is off, but found {len(containers)} containers",
        )
    else:
        names = [c.get("name") for c in containers]
        for i, c in enumerate(containers):
            cpath = f"{path}.containers[{i}]"
            if len(containers) > 1 and names.index(c.get("name")) != i:
                a.fail("serving.containers.count", f"{cpath}.name", f"duplicate container name {c.get('name')!r}")
            if len(containers) == 1 or c.get("ports"):
                _user_container(a, c, volumes, port, cpath)
            else:
                _sidecar_container(a, c, volumes, cpath)
    name = spec.get("serviceAccountName")
    if name and not is_dns1123_subdomain(name):
        a.fail("serving.podspec.service-account-name", f"{path}.serviceAccountName", f"invalid value: {name}")


def _pod_security_context(a: Admission, sc: Any, path: str) -> None:
    if not isinstance(sc, dict):
        return
    allowed: set[str] = set()
    if a.config.serving_flag("secure-pod-defaults") in ("Enabled", "AllowRootBounded") and (
        sc.get("seccompProfile") or {}
    ).get("type") in ("RuntimeDefault", "Unconfined"):
        allowed.add("seccompProfile")
    if a.config.serving_not_disabled("kubernetes.podspec-securitycontext"):
        allowed |= {"runAsUser", "runAsGroup", "runAsNonRoot", "fsGroup", "supplementalGroups", "seccompProfile"}
    rule = "serving.podspec.security-context"
    a.disallow_unknown(rule, sc, allowed, path)
    for key in ("runAsUser", "runAsGroup", "fsGroup"):
        if key in sc and not 0 <= sc[key] <= MAX_INT32:
            a.fail(rule, f"{path}.{key}", f"expected 0 <= {sc[key]} <= {MAX_INT32}")
    for i, gid in enumerate(sc.get("supplementalGroups") or []):
        if not 0 <= gid <= MAX_INT32:
            a.fail(rule, f"{path}.supplementalGroups[{i}]", f"expected 0 <= {gid} <= {MAX_INT32}")


def _volumes(a: Admission, volumes: list, mounted: set, path: str) -> dict:
    seen: dict[str, dict] = {}
    for i, v in enumerate(volumes):
        vpath, name = f"{path}[{i}]", v.get("name", "")
        if name in seen:
            a.fail("serving.volumes.name", f"{vpath}.name", f"duplicate volume name {name!r}")
        if not name or not is_dns1123_label(name):
            a.fail("serving.volumes.name", f"{vpath}.name", f"invalid value: {name!r}")
        if name not in mounted:
            a.fail("serving.volumes.unmounted", f"{vpath}.name", f"volume with name {name!r} not mounted")
        _volume_source(a, v, vpath)
        seen[name] = v
    return seen


def _volume_source(a: Admission, volume: dict, path: str) -> None:
    rule = "serving.volumes.source"
    sources = [k for k in volume if k != "name"]
    for source in sources:
        if source in VOLUME_SOURCE_FLAGS:
            flag, what = VOLUME_SOURCE_FLAGS[source]
            if not a.config.serving_enabled(flag):
                a.fail(rule, f"{path}.{source}", f"{what} support is disabled ({flag}), but found {volume.get('name')}")
        elif source not in UNGATED_VOLUME_SOURCES:
            a.fail(rule, f"{path}.{source}", "must not set the field(s)")
    if not sources:
        a.fail(rule, path, "expected exactly one volume source, got none")
    elif len(sources) > 1:
        a.fail(rule, path, f"expected exactly one volume source, got {sources}")
    pvc = volume.get("persistentVolumeClaim")
    if (
        isinstance(pvc, dict)
        and not pvc.get("readOnly")
        and not a.config.serving_enabled("kubernetes.podspec-persistent-volume-write")
    ):
        a.fail(
            rule,
            f"{path}.persistentVolumeClaim",
            f"Persistent volume write support is disabled, but found persistent volume claim "
            f"{pvc.get('claimName')} that is not read-only",
        )
    empty = volume.get("emptyDir")
    if isinstance(empty, dict) and empty.get("medium") not in (None, "", "Memory"):
        a.fail(rule, f"{path}.emptyDir.medium", f"invalid value: {empty['medium']}")


def _init_containers(a: Admission, init: list, containers: list, volumes: dict, path: str) -> None:
    if not init:
        return
    rule = "serving.podspec.init-containers"
    if not a.config.serving_enabled("kubernetes.podspec-init-containers"):
        a.fail(
            rule,
            f"{path}.initContainers",
            f"pod spec support for init-containers is off, but found {len(init)} init containers",
        )
        return
    names = {c.get("name") for c in containers}
    for i, c in enumerate(init):
        cpath = f"{path}.initContainers[{i}]"
        if c.get("name") in names:
            a.fail(rule, f"{cpath}.name", f"duplicate container name {c.get('name')!r}")
        for key in ("livenessProbe", "readinessProbe", "startupProbe", "lifecycle"):
            if key in c:
                a.fail(rule, f"{cpath}.{key}", "field not allowed in an init container")
        _container(a, c, volumes, cpath, init=True)


def _serving_port(a: Admission, containers: list, path: str) -> dict:
    """validateContainersPorts: one port across all containers; defaults name `http`, port 8080."""
    ports = [p for c in containers for p in c.get("ports") or []]
    port: dict = {}
    for c in containers:
        if c.get("ports"):
            port = dict(c["ports"][0])
    port["name"] = port.get("name") or "http"
    if not ports and len(containers) > 1:
        a.fail("serving.containers.ports", f"{path}.containers[*].ports", "missing field(s)")
    if len(ports) > 1:
        a.fail(
            "serving.containers.ports",
            f"{path}.containers[*].ports",
            "more than one container port is set (only a single port is allowed across all containers)",
        )
    return port


def _user_container(a: Admission, c: dict, volumes: dict, port: dict, path: str) -> None:
    _probe(a, c.get("livenessProbe"), port, f"{path}.livenessProbe")
    _readiness_probe(a, c.get("readinessProbe"), port, f"{path}.readinessProbe")
    _probe(a, c.get("startupProbe"), port, f"{path}.startupProbe")
    _container(a, c, volumes, path)


def _sidecar_container(a: Admission, c: dict, volumes: dict, path: str) -> None:
    # validateSidecarContainer: without multi-container-probing a sidecar's probes may only be empty
    for key in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = c.get(key)
        if not a.config.serving_enabled("multi-container-probing"):
            if probe:
                a.fail("serving.probe.handler", f"{path}.{key}", "must not set the field(s) (multi-container-probing)")
        elif key == "readinessProbe":
            _readiness_probe(a, probe, None, f"{path}.{key}")
        else:
            _probe(a, probe, None, f"{path}.{key}")
    _container(a, c, volumes, path)


def _container(a: Admission, c: dict, volumes: dict, path: str, init: bool = False) -> None:
    """k8s_validation.go validate: the checks shared by user, sidecar and init containers."""
    a.disallow_unknown("serving.container.field", c, CONTAINER_FIELDS, path)
    if c.get("name") in RESERVED_CONTAINER_NAMES:
        a.fail("serving.container.name", f"{path}.name", f"{c['name']!r} is a reserved container name")
    _env(a, c.get("env") or [], f"{path}.env", reserved=RESERVED_ENV - ({"PORT"} if init else set()))
    _env_from(a, c.get("envFrom") or [], f"{path}.envFrom")
    image = c.get("image")
    if not image:
        a.fail("serving.container.image", f"{path}.image", "missing field(s)")
    elif not IMAGE_REFERENCE.fullmatch(image):
        a.fail("serving.container.image", f"{path}.image", f"Failed to parse image reference {image!r}")
    _container_ports(a, c.get("ports") or [], f"{path}.ports", init)
    a.disallow_unknown("serving.container.field", c.get("resources"), {"limits", "requests"}, f"{path}.resources")
    _security_context(a, c.get("securityContext"), f"{path}.securityContext")
    if c.get("terminationMessagePolicy") not in (None, "", "File", "FallbackToLogsOnError"):
        a.fail(
            "serving.container.termination-message-policy",
            f"{path}.terminationMessagePolicy",
            f"invalid value: {c['terminationMessagePolicy']}",
        )
    _volume_mounts(a, c.get("volumeMounts") or [], volumes, f"{path}.volumeMounts")


def _env(a: Admission, env: list, path: str, reserved: set) -> None:
    rule = "serving.container.env"
    source_fields = {"configMapKeyRef", "secretKeyRef"}
    if a.config.serving_not_disabled("kubernetes.podspec-fieldref"):
        source_fields |= {"fieldRef", "resourceFieldRef"}
    for i, e in enumerate(env):
        epath = f"{path}[{i}]"
        a.disallow_unknown(rule, e, {"name", "value", "valueFrom"}, epath)
        if not e.get("name"):
            a.fail(rule, f"{epath}.name", "missing field(s)")
        elif e["name"] in reserved:
            a.fail(rule, f"{epath}.name", f"{e['name']!r} is a reserved environment variable")
        a.disallow_unknown(rule, e.get("valueFrom"), source_fields, f"{epath}.valueFrom")


def _env_from(a: Admission, env_from: list, path: str) -> None:
    for i, source in enumerate(env_from):
        refs = [k for k in ("configMapRef", "secretRef") if source.get(k) is not None]
        a.disallow_unknown("serving.container.env", source, {"prefix", "configMapRef", "secretRef"}, f"{path}[{i}]")
        if len(refs) != 1:
            a.fail("serving.container.env", f"{path}[{i}]", f"expected exactly one of configMapRef, secretRef: {refs}")


def _container_ports(a: Admission, ports: list, path: str, init: bool) -> None:
    rule = "serving.containers.ports"
    for i, p in enumerate(ports if init else ports[:1]):
        ppath = f"{path}[{i}]"
        a.disallow_unknown("serving.container.field", p, {"containerPort", "name", "protocol"}, ppath)
        number = p.get("containerPort", 0)
        if number in RESERVED_PORTS:
            a.fail(rule, f"{ppath}.containerPort", f"{number} is a reserved port, please use a different value")
        if not 0 <= number <= 65535:
            a.fail(rule, f"{ppath}.containerPort", f"expected 0 <= {number} <= 65535")
        if not init:
            if p.get("protocol") not in (None, "", "TCP"):
                a.fail(rule, f"{ppath}.protocol", f"invalid value: {p['protocol']}")
            if p.get("name", "") not in ("", "h2c", "http1"):
                a.fail(rule, f"{ppath}.name", f"Port name {p['name']} is not allowed (empty, 'h2c' or 'http1')")


def _security_context(a: Admission, sc: Any, path: str) -> None:
    if not isinstance(sc, dict):
        return
    rule = "serving.container.security-context"
    allowed = {
        "capabilities",
        "readOnlyRootFilesystem",
        "runAsUser",
        "runAsGroup",
        "runAsNonRoot",
        "allowPrivilegeEscalation",
        "seccompProfile",
    }
    if sc.get("privileged") is False:
        allowed.add("privileged")
    a.disallow_unknown(rule, sc, allowed, path)
    caps = sc.get("capabilities")
    if isinstance(caps, dict):
        cap_fields = {"drop"}
        if a.config.serving_enabled("kubernetes.containerspec-addcapabilities") or (
            a.config.serving_flag("secure-pod-defaults") in ("Enabled", "AllowRootBounded")
            and caps.get("add") == ["NET_BIND_SERVICE"]
        ):
            cap_fields.add("add")
        a.disallow_unknown(rule, caps, cap_fields, f"{path}.capabilities")
    for key in ("runAsUser", "runAsGroup"):
        if key in sc and not 0 <= sc[key] <= MAX_INT32:
            a.fail(rule, f"{path}.{key}", f"expected 0 <= {sc[key]} <= {MAX_INT32}")


def _volume_mounts(a: Admission, mounts: list, volumes: dict, path: str) -> None:
    rule = "serving.volume-mounts"
    mount_fields = {"name", "readOnly", "mountPath", "subPath"}
    if a.config.serving_not_disabled("kubernetes.podspec-volumes-mount-propagation"):
        mount_fields.add("mountPropagation")
    seen_paths: set[str] = set()
    for i, m in enumerate(mounts):
        mpath = f"{path}[{i}]"
        a.disallow_unknown(rule, m, mount_fields, mpath)
        volume = volumes.get(m.get("name"))
        if volume is None:
            a.fail(rule, f"{mpath}.name", "volumeMount has no matching volume")
            volume = {}
        target = m.get("mountPath", "")
        clean = posixpath.normpath(target) if target else ""
        if not target:
            a.fail(rule, f"{mpath}.mountPath", "missing field(s)")
        elif clean in RESERVED_MOUNT_PATHS:
            a.fail(rule, f"{mpath}.mountPath", f"mountPath {clean!r} is a reserved path")
        elif not target.startswith("/"):
            a.fail(rule, f"{mpath}.mountPath", f"invalid value: {target}")
        elif clean in seen_paths:
            a.fail(rule, f"{mpath}.mountPath", f"{target!r} must be unique")
        seen_paths.add(clean)
        writable_source = any(k in volume for k in ("emptyDir", "persistentVolumeClaim", "ephemeral"))
        if not writable_source and not m.get("readOnly"):
            a.fail(rule, f"{mpath}.readOnly", "volume mount should be readOnly for this type of volume")
        if (volume.get("persistentVolumeClaim") or {}).get("readOnly") and not m.get("readOnly"):
            a.fail(rule, f"{mpath}.readOnly", "volume is readOnly but volume mount is not")
        if m.get("mountPropagation") not in (None, "None", "HostToContainer"):
            a.fail(rule, f"{mpath}.mountPropagation", "mount propagation should be set to None or HostToContainer")


def _probe(a: Admission, probe: Any, port: dict | None, path: str) -> None:
    """validateProbe: the probe's own fields, exactly one handler, and the user container's probe port."""
    if probe is None:
        return
    rule = "serving.probe.handler"
    a.disallow_unknown(rule, probe, PROBE_FIELDS, path)
    handlers = [h for h in PROBE_HANDLER_FIELDS if probe.get(h) is not None]
    for h in handlers:
        a.disallow_unknown(rule, probe[h], PROBE_HANDLER_FIELDS[h], f"{path}.{h}")
    for h in ("httpGet", "tcpSocket"):
        target = probe.get(h)
        if not isinstance(target, dict):
            continue
        probe_port = target.get("port")
        if port is not None:  # user container: a named port must be the serving port's name
            if isinstance(probe_port, str) and probe_port and probe_port != port.get("name"):
                a.fail(rule, f"{path}.{h}.port", f"Probe port must match container port ({probe_port})")
        elif not probe_port:
            a.fail(rule, f"{path}.{h}.port", "Probe port must be specified")
    if not handlers:
        a.fail(rule, path, "expected exactly one, got neither: httpGet, tcpSocket, exec, grpc")
    elif len(handlers) > 1:
        a.fail(rule, path, f"expected exactly one, got both: {handlers}")


def _readiness_probe(a: Admission, probe: Any, port: dict | None, path: str) -> None:
    if probe is None:
        return
    _probe(a, probe, port, path)
    bounds = "serving.probe.readiness-bounds"
    for key, low in (("periodSeconds", 0), ("initialDelaySeconds", 0), ("successThreshold", 1)):
        if probe.get(key, low if key != "successThreshold" else 0) < low:
            a.fail(bounds, f"{path}.{key}", f"expected {low} <= {probe.get(key, 0)} <= {MAX_INT32}")
    if not probe.get("periodSeconds"):
        # periodSeconds 0 is Knative's aggressive readiness probing: these two have no meaning there
        for key in ("failureThreshold", "timeoutSeconds"):
            if probe.get(key):
                a.fail(
                    "serving.probe.readiness-period-zero",
                    f"{path}.{key}",
                    f"{key} is disallowed when periodSeconds is zero",
                )
    else:
        for key in ("timeoutSeconds", "failureThreshold"):
            if probe.get(key, 0) < 1:
                a.fail(bounds, f"{path}.{key}", f"expected 1 <= {probe.get(key, 0)} <= {MAX_INT32}")


# ---------------------------------------------------------------------------------------------------------------
# knative/eventing
# ---------------------------------------------------------------------------------------------------------------
@handles("eventing.knative.dev/v1", "Broker")
def _broker(a: Admission, broker: dict) -> None:
    meta = broker.get("metadata", {})
    if not (meta.get("annotations") or {}).get("eventing.knative.dev/broker.class"):
        a.fail("eventing.broker.class", "metadata.annotations.eventing.knative.dev/broker.class", "missing field(s)")
    spec = broker.get("spec") or {}
    if spec.get("config") is not None:
        _kreference(a, spec["config"], "spec.config", "eventing.broker.config")
    _delivery(a, spec.get("delivery"), "spec.delivery")


def _kreference(a: Admission, ref: Any, path: str, rule: str) -> None:
    """knative/pkg apis/duck/v1/knative_reference.go KReference.Validate (kreference-group off: no `group`)."""
    if not isinstance(ref, dict):
        a.fail(rule, path, "missing field(s): name, apiVersion, kind")
        return
    for key in ("name", "kind"):
        if not ref.get(key):
            a.fail(rule, f"{path}.{key}", "missing field(s)")
    if a.config.eventing_enabled("kreference-group"):
        if not ref.get("apiVersion") and not ref.get("group"):
            a.fail(rule, f"{path}.apiVersion", "missing field(s): apiVersion or group")
    else:
        if ref.get("group"):
            a.fail(rule, f"{path}.group", "must not set the field(s) (kreference-group is disabled)")
        if not ref.get("apiVersion"):
            a.fail(rule, f"{path}.apiVersion", "missing field(s)")


def _destination(a: Admission, dest: Any, path: str) -> None:
    """knative/pkg apis/duck/v1/destination.go ValidateDestination."""
    rule = "eventing.destination"
    if dest is None:
        return
    ref, uri = dest.get("ref"), dest.get("uri")
    absolute = isinstance(uri, str) and re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/]", uri) is not None
    if ref is None and uri is None:
        a.fail(rule, path, "expected at least one, got none: ref, uri")
    elif ref is not None and uri is not None and absolute:
        a.fail(rule, path, "Absolute URI is not allowed when Ref is present")
    elif ref is None and not absolute:
        a.fail(rule, f"{path}.uri", "Relative URI is not allowed when Ref is absent")
    elif ref is not None and uri is None:
        _kreference(a, ref, f"{path}.ref", rule)


def _delivery(a: Admission, delivery: Any, path: str) -> None:
    """eventing pkg/apis/duck/v1/delivery_types.go DeliverySpec.Validate."""
    if not isinstance(delivery, dict):
        return
    _destination(a, delivery.get("deadLetterSink"), f"{path}.deadLetterSink")
    retry = delivery.get("retry")
    if retry is not None and retry < 0:
        a.fail("eventing.delivery.retry", f"{path}.retry", f"invalid value: {retry}")
    if "timeout" in delivery:
        timeout = delivery["timeout"]
        if not a.config.eventing_enabled("delivery-timeout"):
            a.fail("eventing.delivery.timeout", f"{path}.timeout", "must not set the field(s) (delivery-timeout)")
        elif not is_iso_period(timeout) or iso_period_is_zero(timeout):
            a.fail("eventing.delivery.timeout", f"{path}.timeout", f"invalid value: {timeout}")
    policy = delivery.get("backoffPolicy")
    if policy is not None and policy not in ("exponential", "linear"):
        a.fail("eventing.delivery.backoff-policy", f"{path}.backoffPolicy", f"invalid value: {policy}")
    if "backoffDelay" in delivery and not is_iso_period(delivery["backoffDelay"]):
        a.fail("eventing.delivery.backoff-delay", f"{path}.backoffDelay", f"invalid value: {delivery['backoffDelay']}")
    if delivery.get("format") is not None and delivery["format"] not in ("json", "binary"):
        a.fail("eventing.delivery.format", f"{path}.format", f"invalid value: {delivery['format']}")
    if "retryAfterMax" in delivery:
        value = delivery["retryAfterMax"]
        if not a.config.eventing_enabled("delivery-retryafter"):
            a.fail(
                "eventing.delivery.retry-after-max",
                f"{path}.retryAfterMax",
                "must not set the field(s) (delivery-retryafter)",
            )
        elif not is_iso_period(value) or value.startswith("-"):
            a.fail("eventing.delivery.retry-after-max", f"{path}.retryAfterMax", f"invalid value: {value}")


@handles("eventing.knative.dev/v1", "Trigger")
def _trigger(a: Admission, trigger: dict) -> None:
    spec = trigger.get("spec") or {}
    broker, broker_ref = spec.get("broker", ""), spec.get("brokerRef")
    if not broker and broker_ref is None:
        a.fail("eventing.trigger.broker", "spec.broker", "missing field(s)")
    elif broker and broker_ref is not None:
        a.fail("eventing.trigger.broker", "spec", "expected exactly one, got both: broker, brokerRef")
    if (
        isinstance(broker_ref, dict)
        and broker_ref.get("namespace")
        and not a.config.eventing_enabled("cross-namespace-event-links")
    ):
        a.fail(
            "eventing.trigger.broker",
            "spec.brokerRef.namespace",
            "must not set the field(s) (cross-namespace-event-links is disabled)",
        )
    _attribute_names(a, ((spec.get("filter") or {}).get("attributes")), "spec.filter.attributes")
    _filters(a, spec.get("filters"), "spec.filters")
    _destination(a, spec.get("subscriber"), "spec.subscriber")
    _delivery(a, spec.get("delivery"), "spec.delivery")
    _trigger_annotations(a, trigger)


def _attribute_names(a: Admission, attrs: Any, path: str) -> None:
    for name in sorted(attrs or {}):
        if not ATTRIBUTE_NAME.fullmatch(name):
            a.fail(
                "eventing.trigger.filter-attributes",
                f"{path}.{name}",
                "Attribute name must start with a letter and can only contain lowercase alphanumeric",
            )


def _filters(a: Admission, filters: Any, path: str) -> None:
    """ValidateSubscriptionAPIFiltersList / ValidateSubscriptionAPIFilter (CESQL syntax itself is not parsed)."""
    for i, f in enumerate(filters or []):
        _filter(a, f, f"{path}[{i}]")


def _filter(a: Admission, f: Any, path: str) -> None:
    if not isinstance(f, dict):
        return
    dialects = [k for k in ("exact", "prefix", "suffix", "all", "any", "not", "cesql") if f.get(k)]
    if len(dialects) > 1:
        a.fail(
            "eventing.trigger.filters-dialect",
            path,
            f"multiple dialects found, filters can have only one dialect set: {dialects}",
        )
    for key in ("exact", "prefix", "suffix"):
        _attribute_names(a, f.get(key), f"{path}.{key}")
    for key in ("all", "any"):
        _filters(a, f.get(key), f"{path}.{key}")
    _filter(a, f.get("not"), f"{path}.not")


def _trigger_annotations(a: Admission, trigger: dict) -> None:
    annotations = (trigger.get("metadata") or {}).get("annotations") or {}
    rule = "eventing.trigger.annotations"
    dependency = annotations.get("knative.dev/dependency")
    if dependency is not None:
        try:
            ref = json.loads(dependency)
        except ValueError:
            a.fail(rule, "metadata.annotations[knative.dev/dependency]", "not a corev1.ObjectReference")
        else:
            missing = [k for k in ("kind", "name", "apiVersion") if not ref.get(k)]
            if missing:
                a.fail(rule, "metadata.annotations[knative.dev/dependency]", f"missing field(s): {missing}")
    injection = annotations.get("eventing.knative.dev/injection")
    if injection is not None and (
        injection not in ("enabled", "disabled") or (trigger.get("spec") or {}).get("broker") != "default"
    ):
        a.fail(
            rule,
            "metadata.annotations[eventing.knative.dev/injection]",
            'must be "enabled" or "disabled", and only on a Trigger of the broker "default"',
        )


@handles("sources.knative.dev/v1", "ContainerSource")
def _container_source(a: Admission, source: dict) -> None:
    spec = source.get("spec") or {}
    _destination(a, spec.get("sink"), "spec.sink")
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    if not containers:
        a.fail("eventing.source.containers", "spec.template.spec.containers", "missing field(s)")
    for i, c in enumerate(containers):
        for key in ("name", "image"):
            if not c.get(key):
                a.fail("eventing.source.containers", f"spec.template.spec.containers[{i}].{key}", "missing field(s)")
    _ce_overrides(a, spec.get("ceOverrides"), "spec.ceOverrides")


def _ce_overrides(a: Admission, overrides: Any, path: str) -> None:
    for key in sorted(((overrides or {}).get("extensions")) or {}):
        if not re.fullmatch(r"[A-Za-z0-9]+", key):
            a.fail("eventing.source.ce-overrides", f"{path}.extensions.{key}", "keys are expected to be alphanumeric")


@handles("sources.knative.dev/v1", "SinkBinding")
def _sink_binding(a: Admission, binding: dict) -> None:
    namespace = (binding.get("metadata") or {}).get("namespace", "")
    spec = binding.get("spec") or {}
    subject = dict(spec.get("subject") or {})
    subject.setdefault("namespace", namespace)  # sinkbinding_defaults.go
    rule, path = "eventing.sinkbinding.subject", "spec.subject"
    if not subject.get("apiVersion"):
        a.fail(rule, f"{path}.apiVersion", "missing field(s)")
    if not subject.get("kind"):
        a.fail(rule, f"{path}.kind", "missing field(s)")
    elif not C_IDENTIFIER.fullmatch(subject["kind"]):
        a.fail(rule, f"{path}.kind", f"invalid value: {subject['kind']}")
    if not is_dns1123_label(subject.get("namespace")):
        a.fail(rule, f"{path}.namespace", f"invalid value: {subject.get('namespace')!r}")
    elif subject["namespace"] != namespace:
        a.fail(rule, f"{path}.namespace", f"must be the SinkBinding's namespace {namespace!r}")
    has_name, has_selector = bool(subject.get("name")), subject.get("selector") is not None
    if has_name == has_selector:
        a.fail(rule, path, "expected exactly one of: name, selector")
    elif has_name and not is_dns1123_label(subject["name"]):
        a.fail(rule, f"{path}.name", f"invalid value: {subject['name']}")
    sink = spec.get("sink")
    if not sink:  # SourceSpec.Sink is a struct, not a pointer: an absent sink is validated as an empty Destination
        a.fail("eventing.sinkbinding.sink", "spec.sink", "expected at least one, got none: ref, uri")
    _destination(a, sink, "spec.sink")
    _ce_overrides(a, spec.get("ceOverrides"), "spec.ceOverrides")


@handles("eventing.knative.dev/v1alpha1", "EventPolicy")
def _event_policy(a: Admission, policy: dict) -> None:
    if not a.config.eventing_enabled("authentication-oidc"):
        a.fail("eventing.eventpolicy.oidc-flag", "", "oidc-authentication feature not enabled")
    spec = policy.get("spec") or {}
    for i, sender in enumerate(spec.get("from") or []):
        path, ref, sub = f"spec.from[{i}]", sender.get("ref"), sender.get("sub")
        if ref is None and not sub:
            a.fail("eventing.eventpolicy.from", path, "expected exactly one, got neither: ref, sub")
        if ref is not None and sub is not None:
            a.fail("eventing.eventpolicy.from", path, "expected exactly one, got both: ref, sub")
        if isinstance(ref, dict):
            for key in ("kind", "apiVersion", "name"):
                if not ref.get(key):
                    a.fail("eventing.eventpolicy.from", f"{path}.ref.{key}", "missing field(s)")
        if isinstance(sub, str) and len(sub) > 1 and "*" in sub[:-1]:
            a.fail("eventing.eventpolicy.from", f"{path}.sub", f"'*' is only allowed as suffix: {sub}")
    for i, target in enumerate(spec.get("to") or []):
        path, ref, selector = f"spec.to[{i}]", target.get("ref"), target.get("selector")
        if (ref is None) == (selector is None):
            a.fail("eventing.eventpolicy.to", path, "expected exactly one of: ref, selector")
        if isinstance(ref, dict):
            for key in ("kind", "apiVersion", "name"):
                if not ref.get(key):
                    a.fail("eventing.eventpolicy.to", f"{path}.ref.{key}", "missing field(s)")
    _filters(a, spec.get("filters"), "spec.filters")
