"""Telling turboflow's own events from forgeries: an HMAC signature extension and unguessable reply ids.

Anyone who can reach a broker ingress can post an `io.turboflow.video.completed`. Two things make that harmless:

* Every event turboflow emits (replies, dead-letter failures) carries the extension attribute
  ``turboflowsig = "v1=" + base64url(HMAC-SHA256(key, canonical))`` where ``canonical`` is the UTF-8 text

      id \\n source \\n type \\n subject \\n tenant \\n sha256-hex(canonical JSON of data)

  (absent attributes are empty strings; canonical JSON = keys sorted, no whitespace, UTF-8, i.e. what
  ``json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` prints). The key is the
  deployment secret ``TURBOFLOW_EVENT_SIGNING_KEY`` (a Secret in the cluster; ``turboflow dev`` makes one per run).
  A consumer that acts on a completion checks the signature with the same key (``verify_event``); the local broker
  refuses reply types posted to its ingress without a valid one.
* Reply ids are derived with the same key (``derive_id``), so nobody without it can pre-empt the genuine reply in
  JetStream's duplicate window by publishing an event with the id it will have.

Without a key (a deployment that never set one) events go unsigned and ids fall back to a uuid5 over a public
namespace: still deterministic, no longer unguessable. `turboflow dev` and the manifests always set one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

from turboflow.settings import Settings, current

SIGNATURE_EXTENSION = "turboflowsig"
SIGNING_KEY_VARIABLE = "TURBOFLOW_EVENT_SIGNING_KEY"
_VERSION = "v1="
_PUBLIC_NAMESPACE = uuid.UUID("6f1c6d4e-2b0a-5c1e-9d7a-7475726266c6")  # the id namespace before signing keys


def signing_key(settings: Settings | None = None) -> bytes | None:
    """The deployment's signing key (TURBOFLOW_EVENT_SIGNING_KEY, checked by turboflow/settings.py), or None when it
    is not set. Without `settings`, this process's settings (`turboflow.settings.current()`)."""
    return (settings or current()).event_signing_key


def new_signing_key() -> str:
    """A fresh random key (for `turboflow dev`, tests, or `openssl rand`-style provisioning)."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _attributes(event) -> dict:
    try:
        return dict(event.get_attributes())
    except AttributeError:  # a plain dict of attributes
        return dict(event)


def _data(event) -> Any:
    try:
        return event.get_data()
    except AttributeError:
        return event.get("data")


def _canonical(attributes: Mapping[str, Any], data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray)):
        try:
            data = json.loads(data)
        except ValueError:
            data = base64.b64encode(bytes(data)).decode()
    digest = hashlib.sha256(canonical_json(data)).hexdigest()
    fields = [attributes.get(name) for name in ("id", "source", "type", "subject", "tenant")]
    return "\n".join("" if value is None else str(value) for value in fields + [digest]).encode("utf-8")


def signature(key: bytes, attributes: Mapping[str, Any], data: Any) -> str:
    """The `turboflowsig` value for an event with these attributes and data."""
    mac = hmac.new(key, _canonical(attributes, data), hashlib.sha256).digest()
    return _VERSION + base64.urlsafe_b64encode(mac).decode().rstrip("=")


def sign_attributes(key: bytes | None, attributes: dict, data: Any) -> dict:
    """`attributes` plus the signature extension (unchanged when there is no key)."""
    if key is None:
        return attributes
    unsigned = {k: v for k, v in attributes.items() if k != SIGNATURE_EXTENSION}
    return {**unsigned, SIGNATURE_EXTENSION: signature(key, unsigned, data)}


def verify_event(event, key: bytes) -> bool:
    """True when `event` (a CloudEvent or a dict with a `data` key) carries a valid signature made with `key`."""
    attributes = _attributes(event)
    claimed = attributes.get(SIGNATURE_EXTENSION)
    if not isinstance(claimed, str) or not claimed.startswith(_VERSION):
        return False
    attributes.pop("data", None)
    return hmac.compare_digest(claimed, signature(key, attributes, _data(event)))


def derive_id(key: bytes | None, *parts: str) -> str:
    """A deterministic event id for `parts` that nobody without `key` can predict (uuid form)."""
    text = "/".join(parts)
    if key is None:
        return str(uuid.uuid5(_PUBLIC_NAMESPACE, text))
    digest = hmac.new(key, b"turboflow-id/" + text.encode("utf-8"), hashlib.sha256).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))
