"""Knative Trigger YAML, read by the local broker exactly as the cluster applies it.

Supported: `spec.broker`, `spec.filters` (exact, prefix, suffix, all, any, not; `cesql` is refused loudly rather
than ignored), the legacy `spec.filter.attributes` (exact, used only when `filters` is absent, as in Knative),
`spec.subscriber` (`ref` resolved through a caller-given mapping, `uri` absolute or relative to the ref) and
`spec.delivery` (timeout, retry, backoffPolicy, backoffDelay, deadLetterSink).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import yaml

MANIFESTS_DIR = Path(__file__).resolve().parent / "manifests"

_ISO_DURATION = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)


class TriggerError(ValueError):
    """A Trigger the local broker cannot honour exactly (bad duration, unsupported filter, unresolvable ref)."""


def parse_duration(value: str | int | float | None) -> float | None:
    """Seconds in an ISO 8601 duration (`PT10M`, `PT0.5S`, `P1DT2H`), as Knative's delivery fields use."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    m = _ISO_DURATION.fullmatch(str(value).strip())
    if not m or str(value).strip() in ("P", "PT"):
        raise TriggerError(f"not an ISO 8601 duration: {value!r} (e.g. PT10M, PT0.5S)")
    parts = {k: float(v) for k, v in m.groupdict().items() if v}
    return parts.get("d", 0) * 86400 + parts.get("h", 0) * 3600 + parts.get("m", 0) * 60 + parts.get("s", 0)


@dataclass(frozen=True)
class Destination:
    """A Knative Destination: `ref` (apiVersion/kind/name/namespace) and/or `uri`."""

    ref: Mapping[str, str] | None = None
    uri: str | None = None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None, namespace: str) -> Destination | None:
        if not spec:
            return None
        ref = dict(spec["ref"]) if spec.get("ref") else None
        if ref is not None:
            ref.setdefault("namespace", namespace)
        if ref is None and not spec.get("uri"):
            raise TriggerError(f"destination needs ref or uri: {spec!r}")
        return cls(ref=ref, uri=spec.get("uri"))

    def key(self) -> str | None:
        """`kind/namespace/name` of the ref (the mapping key `resolve` looks up first)."""
        if not self.ref:
            return None
        return f"{self.ref.get('kind')}/{self.ref.get('namespace')}/{self.ref.get('name')}"

    def resolve(self, addresses: Mapping[str, str]) -> str:
        """The URL to POST to. `addresses` maps `kind/namespace/name` or just `name` to a base URL."""
        base = None
        if self.ref:
            base = addresses.get(self.key() or "") or addresses.get(str(self.ref.get("name")))
            if base is None:
                raise TriggerError(f"no local address for {self.key()}: pass one in the subscriber mapping")
        if self.uri:
            return urljoin(base, self.uri) if base else self.uri
        return base  # type: ignore[return-value]


@dataclass(frozen=True)
class Delivery:
    timeout: float | None = None  # seconds per attempt; None: the broker's default
    retry: int = 0
    backoff_policy: str = "exponential"
    backoff_delay: float = 0.2
    dead_letter: Destination | None = None

    def backoff(self, retry_number: int) -> float:
        """Delay before retry `retry_number` (1, 2, ...): backoffDelay*2^(n-1) exponential, backoffDelay*n linear."""
        if self.backoff_policy == "linear":
            return self.backoff_delay * retry_number
        return self.backoff_delay * (2 ** (retry_number - 1))

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None, namespace: str) -> Delivery:
        spec = spec or {}
        policy = str(spec.get("backoffPolicy", "exponential")).lower()
        if policy not in ("exponential", "linear"):
            raise TriggerError(f"backoffPolicy must be exponential or linear, got {policy!r}")
        delay = parse_duration(spec.get("backoffDelay"))
        return cls(
            timeout=parse_duration(spec.get("timeout")),
            retry=int(spec.get("retry", 0)),
            backoff_policy=policy,
            backoff_delay=0.2 if delay is None else delay,
            dead_letter=Destination.from_spec(spec.get("deadLetterSink"), namespace),
        )


def attribute_text(value: Any) -> str:
    """An attribute as the text filters compare (RFC 3339 with Z for times)."""
    if hasattr(value, "isoformat"):
        text = value.isoformat()
        return text.replace("+00:00", "Z")
    return "" if value is None else str(value)


def _check_filter(expr: Mapping[str, Any]) -> None:
    if not isinstance(expr, Mapping) or len(expr) != 1:
        raise TriggerError(f"a filter expression has exactly one dialect key, got {expr!r}")
    ((dialect, arg),) = expr.items()
    if dialect in ("exact", "prefix", "suffix"):
        if not isinstance(arg, Mapping) or not arg:
            raise TriggerError(f"{dialect} needs a non-empty attribute map")
    elif dialect in ("all", "any"):
        for sub in arg:
            _check_filter(sub)
    elif dialect == "not":
        _check_filter(arg)
    elif dialect == "cesql":
        raise TriggerError("cesql filters are not supported by the local broker; use exact/prefix/suffix/all/any/not")
    else:
        raise TriggerError(f"unknown filter dialect {dialect!r}")


def matches(expr: Mapping[str, Any], attrs: Mapping[str, Any]) -> bool:
    """One Knative filter expression against event attributes (a missing attribute never matches)."""
    ((dialect, arg),) = expr.items()
    if dialect in ("exact", "prefix", "suffix"):
        for name, want in arg.items():
            if name not in attrs or attrs[name] is None:
                return False
            have = attribute_text(attrs[name])
            ok = {"exact": have == str(want), "prefix": have.startswith(str(want)), "suffix": have.endswith(str(want))}[
                dialect
            ]
            if not ok:
                return False
        return True
    if dialect == "all":
        return all(matches(sub, attrs) for sub in arg)
    if dialect == "any":
        return any(matches(sub, attrs) for sub in arg)
    if dialect == "not":
        return not matches(arg, attrs)
    raise TriggerError(f"unsupported filter {dialect!r}")


@dataclass(frozen=True)
class Trigger:
    name: str
    namespace: str
    broker: str
    subscriber: Destination
    delivery: Delivery
    filters: tuple = ()  # Knative `filters` (ANDed)
    legacy_attributes: Mapping[str, str] = field(default_factory=dict)  # `filter.attributes`

    def matches(self, attrs: Mapping[str, Any]) -> bool:
        if self.filters:
            return all(matches(f, attrs) for f in self.filters)
        return all(
            v == "" or (k in attrs and attribute_text(attrs[k]) == str(v)) for k, v in self.legacy_attributes.items()
        )

    def with_delivery(self, **changes) -> Trigger:
        """A copy with some delivery fields replaced (tests and `turboflow dev` shorten timeouts this way)."""
        return replace(self, delivery=replace(self.delivery, **changes))

    @classmethod
    def from_manifest(cls, doc: Mapping[str, Any]) -> Trigger:
        meta, spec = doc.get("metadata") or {}, doc.get("spec") or {}
        namespace = meta.get("namespace", "default")
        broker = spec.get("broker") or (spec.get("brokerRef") or {}).get("name")
        if not broker:
            raise TriggerError(f"Trigger {meta.get('name')}: spec.broker is required")
        filters = tuple(spec.get("filters") or ())
        for f in filters:
            _check_filter(f)
        subscriber = Destination.from_spec(spec.get("subscriber"), namespace)
        if subscriber is None:
            raise TriggerError(f"Trigger {meta.get('name')}: spec.subscriber is required")
        return cls(
            name=meta["name"],
            namespace=namespace,
            broker=broker,
            subscriber=subscriber,
            delivery=Delivery.from_spec(spec.get("delivery"), namespace),
            filters=filters,
            legacy_attributes=dict((spec.get("filter") or {}).get("attributes") or {}),
        )


def load_manifests(paths: Iterable[str | Path] | None = None) -> list[dict]:
    """Every YAML document in `paths` (files or directories; default: eventing/manifests/)."""
    files: list[Path] = []
    for p in [MANIFESTS_DIR] if paths is None else [Path(x) for x in paths]:
        files.extend(sorted(p.glob("*.yaml")) if p.is_dir() else [p])
    docs = []
    for f in files:
        docs.extend(d for d in yaml.safe_load_all(f.read_text()) if d)
    return docs


def load_triggers(
    paths: Iterable[str | Path] | None = None, *, broker: str | None = None, namespace: str | None = None
) -> list[Trigger]:
    """The Triggers (apiVersion eventing.knative.dev/v1) in `paths`, optionally only those of one broker."""
    out = []
    for doc in load_manifests(paths):
        if doc.get("kind") == "Trigger" and doc.get("apiVersion") == "eventing.knative.dev/v1":
            t = Trigger.from_manifest(doc)
            if (broker is None or t.broker == broker) and (namespace is None or t.namespace == namespace):
                out.append(t)
    return out
