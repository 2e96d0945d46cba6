"""Knative KPA scaling settings, read from `infra/` at run time so the simulator follows the manifests.

The settings of one revision are upstream's defaults (knative/serving pkg/autoscaler/config/config.go,
`defaultConfig`), overridden by the `config-autoscaler` ConfigMap (infra/knative/serving-config-autoscaler.yaml),
overridden by the revision's `autoscaling.knative.dev/*` annotations (infra/base/<kind>.yaml as patched by an overlay,
default `gpu`). Only the annotation, containerConcurrency and timeoutSeconds parts of the overlay patches are applied:
nothing else changes scaling.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import ConfigError

ANNOTATION_PREFIX = "autoscaling.knative.dev/"
# The Knative Service (infra/base/<file>) that serves each task.
SERVICE_FOR_KIND = {"t2v": "turboflow-t2v", "i2v": "turboflow-i2v"}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@dataclass(frozen=True)
class ScalingConfig:
    """What the KPA of one revision works with. Defaults = upstream's config.go `defaultConfig` (Knative 1.x)."""

    target: float = 100.0  # per-pod concurrency target, before utilization
    target_utilization_pct: float = 70.0
    container_concurrency: int = 0  # 0 = unlimited; the simulator supports 1 only (one GPU, one video)
    min_scale: int = 0
    max_scale: int = 0  # 0 = unbounded (applyBounds in kpa/scaler.go)
    initial_scale: int = 1
    stable_window_s: float = 60.0
    panic_window_pct: float = 10.0
    panic_threshold_pct: float = 200.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    scale_to_zero_grace_s: float = 30.0
    retention_s: float = 0.0  # scale-to-zero-pod-retention-period
    scale_down_delay_s: float = 0.0
    target_burst_capacity: float = 211.0  # -1: the activator always stays in the request path
    enable_scale_to_zero: bool = True
    timeout_s: float = 300.0  # revision timeoutSeconds (config-defaults revision-timeout-seconds)

    @property
    def target_value(self) -> float:
        """Concurrency per pod the autoscaler aims for (DeciderSpec.TargetValue; TargetMin 0.01 upstream)."""
        return max(0.01, self.target * self.target_utilization_pct / 100.0)

    @property
    def panic_window_s(self) -> float:
        return self.stable_window_s * self.panic_window_pct / 100.0

    def validate(self) -> ScalingConfig:
        if self.container_concurrency != 1:
            raise ConfigError(
                f"the simulator models containerConcurrency 1 (one video per GPU pod); "
                f"the revision has {self.container_concurrency}"
            )
        if self.min_scale < 0 or self.max_scale < 0 or self.initial_scale < 0:
            raise ConfigError("min-scale, max-scale and initial-scale must be >= 0")
        if self.max_scale and self.min_scale > self.max_scale:
            raise ConfigError(f"min-scale {self.min_scale} is above max-scale {self.max_scale}")
        if self.stable_window_s < 6 or self.stable_window_s > 3600:
            raise ConfigError(f"stable window {self.stable_window_s:g} s is outside Knative's 6 s .. 1 h")
        if not 1 <= self.panic_window_pct <= 100:
            raise ConfigError(f"panic-window-percentage {self.panic_window_pct:g} is outside 1..100")
        if self.panic_threshold_pct < 110:
            raise ConfigError(f"panic-threshold-percentage {self.panic_threshold_pct:g} is below Knative's 110")
        if self.max_scale_up_rate <= 1 or self.max_scale_down_rate <= 1:
            raise ConfigError("max-scale-up-rate and max-scale-down-rate must be > 1")
        if min(self.retention_s, self.scale_to_zero_grace_s, self.scale_down_delay_s, self.timeout_s) < 0:
            raise ConfigError("durations must be >= 0")
        return self


# `--set` / `--sweep` keys -> (ScalingConfig field, parser). Durations accept Go syntax (10m, 30s) or seconds.
def parse_duration(text: str) -> float:
    """Seconds from a Go duration ("10m", "1h30m", "1800s", "0") or a plain number of seconds."""
    text = str(text).strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if value < 0 or value != value or value == float("inf"):
            raise ConfigError(f"duration {text!r} must be a finite number of seconds >= 0")
        return value
    if not text or not re.fullmatch(r"(?:\d+(?:\.\d+)?(?:h|ms|m|s))+", text):
        raise ConfigError(f"duration {text!r} is not a number of seconds or a Go duration such as 10m, 30s, 1h30m")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))


def _non_negative_int(text: str) -> int:
    if not re.fullmatch(r"\d+", str(text).strip()):
        raise ConfigError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{text!r} is not a finite number")
    return value


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value not in ("true", "false"):
        raise ConfigError(f"{text!r} is not true or false")
    return value == "true"


SETTINGS = {
    "target": ("target", _float),
    "target-utilization": ("target_utilization_pct", _float),
    "min-scale": ("min_scale", _non_negative_int),
    "max-scale": ("max_scale", _non_negative_int),
    "initial-scale": ("initial_scale", _non_negative_int),
    "stable-window": ("stable_window_s", parse_duration),
    "panic-window-pct": ("panic_window_pct", _float),
    "panic-threshold-pct": ("panic_threshold_pct", _float),
    "grace": ("scale_to_zero_grace_s", parse_duration),
    "retention": ("retention_s", parse_duration),
    "scale-down-delay": ("scale_down_delay_s", parse_duration),
    "target-burst-capacity": ("target_burst_capacity", _float),
    "scale-to-zero": ("enable_scale_to_zero", _bool),
    "timeout": ("timeout_s", parse_duration),
}

# config-autoscaler ConfigMap keys (config.go NewConfigFromMap) and revision annotations, -> ScalingConfig field.
_CONFIGMAP_KEYS = {
    "container-concurrency-target-percentage": ("target_utilization_pct", _float),
    "container-concurrency-target-default": ("target", _float),
    "stable-window": ("stable_window_s", parse_duration),
    "panic-window-percentage": ("panic_window_pct", _float),
    "panic-threshold-percentage": ("panic_threshold_pct", _float),
    "max-scale-up-rate": ("max_scale_up_rate", _float),
    "max-scale-down-rate": ("max_scale_down_rate", _float),
    "scale-to-zero-grace-period": ("scale_to_zero_grace_s", parse_duration),
    "scale-to-zero-pod-retention-period": ("retention_s", parse_duration),
    "scale-down-delay": ("scale_down_delay_s", parse_duration),
    "target-burst-capacity": ("target_burst_capacity", _float),
    "enable-scale-to-zero": ("enable_scale_to_zero", _bool),
    "initial-scale": ("initial_scale", _non_negative_int),
    "min-scale": ("min_scale", _non_negative_int),
    "max-scale": ("max_scale", _non_negative_int),
}
_ANNOTATION_KEYS = {
    "target": ("target", _float),
    "target-utilization-percentage": ("target_utilization_pct", _float),
    "min-scale": ("min_scale", _non_negative_int),
    "max-scale": ("max_scale", _non_negative_int),
    "initial-scale": ("initial_scale", _non_negative_int),
    "window": ("stable_window_s", parse_duration),
    "panic-window-percentage": ("panic_window_pct", _float),
    "panic-threshold-percentage": ("panic_threshold_pct", _float),
    "scale-to-zero-pod-retention-period": ("retention_s", parse_duration),
    "scale-down-delay": ("scale_down_delay_s", parse_duration),
    "target-burst-capacity": ("target_burst_capacity", _float),
}


def with_settings(config: ScalingConfig, settings: dict[str, str]) -> ScalingConfig:
    """`config` with `--set`/`--sweep` values (keys of SETTINGS) applied."""
    changes = {}
    for key, text in settings.items():
        if key not in SETTINGS:
            raise ConfigError(f"unknown setting {key!r}; known: {', '.join(sorted(SETTINGS))}")
        field, parse = SETTINGS[key]
        try:
            changes[field] = parse(text)
        except ConfigError as e:
            raise ConfigError(f"{key}: {e.message}") from None
    return dataclasses.replace(config, **changes).validate()


def _apply(changes: dict, mapping: dict, data: dict, where: str) -> None:
    for key, value in data.items():
        if key in mapping:
            field, parse = mapping[key]
            try:
                changes[field] = parse(value)
            except ConfigError as e:
                raise ConfigError(f"{where}: {key}: {e.message}") from None


def _load_yaml_documents(path: Path) -> list:
    try:
        return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def _kustomize_services(directory: Path, seen: frozenset = frozenset()) -> list[dict]:
    """Knative Services a kustomization renders, with its (and its bases') annotation patches applied."""
    directory = directory.resolve()
    if directory in seen:
        raise ConfigError(f"kustomization cycle at {directory}")
    kustomization = directory / "kustomization.yaml"
    if not kustomization.is_file():
        kustomization = directory / "kustomization.yml"
    if not kustomization.is_file():
        raise ConfigError(f"{directory} has no kustomization.yaml")
    spec = _load_yaml_documents(kustomization)[0]
    services: list[dict] = []
    for resource in spec.get("resources", []):
        path = directory / resource
        if path.is_dir():
            services += _kustomize_services(path, seen | {directory})
        elif path.is_file():
            services += [
                doc
                for doc in _load_yaml_documents(path)
                if isinstance(doc, dict)
                and doc.get("kind") == "Service"
                and str(doc.get("apiVersion", "")).startswith("serving.knative.dev/")
            ]
    for patch in spec.get("patches", []):
        _apply_patch(services, directory / patch["path"], patch.get("target") or {})
    return services


def _apply_patch(services: list[dict], path: Path, target: dict) -> None:
    """The scaling-relevant part of one kustomize patch: annotations, containerConcurrency, timeoutSeconds."""
    documents = _load_yaml_documents(path)
    body = documents[0] if documents else None
    for service in services:
        name = service["metadata"]["name"]
        if target.get("kind", "Service") != "Service":
            continue
        if isinstance(body, dict):  # strategic merge: the patch names its object unless a target picks them
            if body.get("kind") != "Service":
                continue
            pattern = target.get("name", body.get("metadata", {}).get("name", ""))
            if not re.fullmatch(pattern, name):
                continue
            template = body.get("spec", {}).get("template", {})
            annotations = template.get("metadata", {}).get("annotations") or {}
            _template(service)["metadata"].setdefault("annotations", {}).update(annotations)
            for field in ("containerConcurrency", "timeoutSeconds"):
                if field in template.get("spec", {}):
                    _template(service)["spec"][field] = template["spec"][field]
        elif isinstance(body, list):  # JSON 6902 against the target
            if "name" not in target or not re.fullmatch(target["name"], name):
                continue
            for op in body:
                _apply_json6902(service, op)


def _template(service: dict) -> dict:
    template = service.setdefault("spec", {}).setdefault("template", {})
    template.setdefault("metadata", {})
    template.setdefault("spec", {})
    return template


def _apply_json6902(service: dict, op: dict) -> None:
    path = str(op.get("path", ""))
    annotations_path = "/spec/template/metadata/annotations/"
    template = _template(service)
    if path.startswith(annotations_path):
        key = path[len(annotations_path) :].replace("~1", "/").replace("~0", "~")
        annotations = template["metadata"].setdefault("annotations", {})
        if op.get("op") in ("add", "replace"):
            annotations[key] = op.get("value")
        elif op.get("op") == "remove":
            annotations.pop(key, None)
    elif path in ("/spec/template/spec/containerConcurrency", "/spec/template/spec/timeoutSeconds"):
        if op.get("op") in ("add", "replace"):
            template["spec"][path.rsplit("/", 1)[1]] = op.get("value")


def load_scaling_config(infra: Path, kind: str, overlay: str = "gpu") -> ScalingConfig:
    """The KPA settings of the `kind` ("t2v"/"i2v") function as `infra/overlays/<overlay>` deploys it."""
    infra = Path(infra)
    changes: dict = {}
    configmap_path = infra / "knative" / "serving-config-autoscaler.yaml"
    if configmap_path.is_file():
        for doc in _load_yaml_documents(configmap_path):
            if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
                _apply(changes, _CONFIGMAP_KEYS, doc.get("data") or {}, str(configmap_path))
    overlay_dir = infra / "overlays" / overlay
    if not overlay_dir.is_dir():
        raise ConfigError(f"no overlay {overlay!r} under {infra / 'overlays'}")
    wanted = SERVICE_FOR_KIND[kind]
    services = [s for s in _kustomize_services(overlay_dir) if s.get("metadata", {}).get("name") == wanted]
    if not services:
        raise ConfigError(f"overlay {overlay!r} renders no Knative Service {wanted}")
    template = _template(services[0])
    annotations = template["metadata"].get("annotations") or {}
    scaling = {k[len(ANNOTATION_PREFIX) :]: v for k, v in annotations.items() if k.startswith(ANNOTATION_PREFIX)}
    _apply(changes, _ANNOTATION_KEYS, scaling, f"{wanted} annotations")
    spec = template["spec"]
    changes["container_concurrency"] = int(spec.get("containerConcurrency", 0))
    if "timeoutSeconds" in spec:
        changes["timeout_s"] = float(spec["timeoutSeconds"])
    if "target" not in changes and changes["container_concurrency"] > 0:
        # resources/decider.go: with containerConcurrency set and no target, the target is containerConcurrency
        changes["target"] = float(changes["container_concurrency"])
    return dataclasses.replace(ScalingConfig(), **changes).validate()
