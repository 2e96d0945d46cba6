"""Generate `eventing/schemas/*.json` and `docs/events.asyncapi.yaml` from the contract (eventing/event_schemas.py).

python -m turboflow.eventing.asyncapi --write    # regenerate (commit the result)
python -m turboflow.eventing.asyncapi --check    # exit 1 when the committed files are stale (tests do this)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import yaml

from .event_schemas import ERROR_CODES, SCHEMA_FILES, SCHEMAS, TENANT_PATTERN, TRACEPARENT_EXTENSION
from .types import (
    CANCELLED,
    COMPLETED,
    DEFAULT_TENANT,
    FAILED,
    I2V_REQUESTED,
    POD_READY,
    POD_STOPPED,
    PROGRESS,
    STARTED,
    T2V_REQUESTED,
    TENANT_EXTENSION,
)

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
ASYNCAPI_PATH = Path("docs") / "events.asyncapi.yaml"
SCHEMAS_PATH = Path("eventing") / "schemas"

_NAMES = {
    T2V_REQUESTED: "t2vRequested",
    I2V_REQUESTED: "i2vRequested",
    COMPLETED: "videoCompleted",
    FAILED: "videoFailed",
    STARTED: "videoStarted",
    PROGRESS: "videoProgress",
    CANCELLED: "videoCancelled",
    POD_READY: "podReady",
    POD_STOPPED: "podStopped",
}
_SUMMARIES = {
    T2V_REQUESTED: "Generate a video from a text prompt (Wan2.1 T2V, rCM few-step sampling).",
    I2V_REQUESTED: "Generate a video from an image and a prompt (Wan2.2 I2V A14B, two experts).",
    COMPLETED: "A video was generated and published to S3 (reply to a request).",
    FAILED: "A request cannot be served (reply to a request, or emitted after retries ran out).",
    STARTED: "A function took the request onto its device (sent to the function's K_SINK).",
    PROGRESS: "A running request's stage and step (sent to the function's K_SINK, at most ~2 per second).",
    CANCELLED: "The request was cancelled (reply to a request, or from the gateway for a queued request).",
    POD_READY: "A function's model is loaded: the pod's cold start (sent to the function's K_SINK once).",
    POD_STOPPED: "A function stops: its warm idle and busy seconds (sent to the function's K_SINK).",
}


def schema_json(event_type: str) -> str:
    return json.dumps(SCHEMAS[event_type], indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def _headers(event_type: str, reply: bool) -> dict:
    """CloudEvents context attributes as AsyncAPI message headers (binary mode `ce-` headers)."""
    props = {
        "ce-specversion": {"const": "1.0"},
        "ce-type": {"const": event_type},
        "ce-source": {
            "type": "string",
            "description": "URI-reference of the producer"
            + (
                "; the function's source (TURBOFLOW_EVENT_SOURCE, default /turboflow/functions/<kind>)" if reply else ""
            ),
        },
        "ce-id": (
            {
                "type": "string",
                "description": "derived from the request's (source, id, type[, source, "
                "code]) with the deployment's signing key (HMAC; uuid5 without a key): a redelivered request "
                "gets the same reply id, so JetStream de-duplicates it, and nobody without the key can predict "
                "it",
            }
            if reply
            else {
                "type": "string",
                "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                "description": "The request id (required). Names the output object: a reused id with a "
                "different input fails with `id_conflict`; the same input replays.",
            }
        ),
        "ce-time": {
            "type": "string",
            "format": "date-time",
            "description": (
                "completion time"
                if reply
                else "Request time; its UTC date names the output folder. Without it the key has "
                "no date folders (`.../<tenant>[/<output_prefix>]/<request-id>.mp4`)."
            ),
        },
        f"ce-{TENANT_EXTENSION}": {
            "type": "string",
            "pattern": TENANT_PATTERN,
            "description": f"Tenant (extension); default {DEFAULT_TENANT!r}",
        },
        f"ce-{TRACEPARENT_EXTENSION}": {
            "type": "string",
            "description": "W3C trace context (distributed tracing extension); copied from request to reply",
        },
        "content-type": {"const": "application/json"},
    }
    if reply:
        pod = event_type in (POD_READY, POD_STOPPED)
        props["ce-subject"] = {"type": "string", "description": "The pod" if pod else "The request id"}
        props["ce-turboflowsig"] = {
            "type": "string",
            "description": "HMAC-SHA256 signature (eventing/signing.py) "
            "with the deployment's TURBOFLOW_EVENT_SIGNING_KEY; present when one is set",
        }
        props["ce-dataschema"] = {"type": "string", "format": "uri"}
    required = ["ce-specversion", "ce-type", "ce-source", "ce-id"] + (["ce-subject"] if reply else [])
    return {"type": "object", "required": required, "properties": props}


def _payload(event_type: str) -> dict:
    schema = copy.deepcopy(SCHEMAS[event_type])
    schema.pop("$schema", None)
    return schema


def build_asyncapi() -> dict:
    codes = "\n".join(f"- `{code}`" + (f": {text}" if text else "") for code, text in ERROR_CODES.items())
    description = f"""\
CloudEvents exchanged by turboflow's video functions through a Knative Broker.

A Trigger delivers `{T2V_REQUESTED}` / `{I2V_REQUESTED}` to the function over HTTP (binary or structured
mode). The HTTP response is the reply event, which the broker publishes:

- **200 + `{COMPLETED}`**: the video is in S3. A redelivered request (same CloudEvent source, id and input) is
  answered from the stored result with an equal event, without generating again; the same id with a different
  input (another source, prompt, image...) gets `{FAILED}` with `id_conflict`.
- **200 + `{FAILED}`** (`retryable: false`): invalid input of any kind, unknown model, out of memory.
  Never retried by the broker.
- **503** (JSON body `{{error, message, retryable: true}}`, no event, `Retry-After`): model still loading
  (`not_ready`), device busy (`device_busy`), S3 unreachable (`storage_unavailable`) or misconfigured
  (`storage_misconfigured`). The broker retries with backoff; a dead-letter sink may emit `{FAILED}` once retries
  run out.
- **400** (JSON `{{error: invalid_cloudevent, message}}`): the body is not a valid CloudEvent (no `id` or
  `specversion`, header values that are not UTF-8, JSON nested too deeply).

While a request runs the function also sends, to its `K_SINK` (the Broker, through a SinkBinding),
`{STARTED}` when it takes the request onto the device and `{PROGRESS}` (stage, step, elapsed, eta; at most about
two per second). Each pod also reports itself: `{POD_READY}` once its model is loaded (load seconds, ready time:
the cold start, billed by docs/billing.md's rule) and `{POD_STOPPED}` when it stops (warm idle and busy seconds,
requests served); their subject is the pod, their id derived from the pod, its process start and the type.
A cancelled request (the gateway's cancel, seen in the request-state bucket) is answered with
**200 + `{CANCELLED}`** (terminal; nothing uploaded).

Authenticity: with `TURBOFLOW_EVENT_SIGNING_KEY` set, replies carry the `turboflowsig` extension (HMAC-SHA256, see
eventing/signing.py) and their ids are derived with the key.

Output objects: `s3://$TURBOFLOW_BUCKET/$TURBOFLOW_OUTPUT_PREFIX/<tenant>[/<output_prefix>]/<yyyy>/<mm>/<dd>/<request-id>.mp4`
when the request has a `time` (its UTC date), `.../<tenant>[/<output_prefix>]/<request-id>.mp4` without one
(content-type video/mp4, metadata request-id, tenant, model, seed, steps, kind, sha256) plus `<request-id>.json`,
the completion data with the request's `input_sha256`.

I2V images: `s3://<bucket in TURBOFLOW_INPUT_BUCKETS>/<TURBOFLOW_IMAGE_PREFIX>/<tenant>/...` (the requesting tenant's
uploads) or a prefix listed in TURBOFLOW_SHARED_IMAGE_PREFIXES; anything else is `image_not_allowed`, whether or not
the object exists.

Usage: `usage.gpu_seconds` is the wall time the request held the device; the first request a pod completes also
carries the model load (`cold_start: true`).

Failure codes (`data.code` of `{FAILED}`):

{codes}
"""
    channels, operations, messages, schemas = {}, {}, {}, {}
    for event_type, name in _NAMES.items():
        reply = event_type in (COMPLETED, FAILED, STARTED, PROGRESS, CANCELLED, POD_READY, POD_STOPPED)
        schemas[name] = _payload(event_type)
        messages[name] = {
            "name": event_type,
            "title": SCHEMAS[event_type]["title"],
            "summary": _SUMMARIES[event_type],
            "contentType": "application/json",
            "headers": _headers(event_type, reply),
            "payload": {"$ref": f"#/components/schemas/{name}"},
            "bindings": {"http": {"bindingVersion": "0.3.0"}},
        }
        channels[name] = {
            "address": event_type,
            "title": event_type,
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
        }
    for kind, event_type in (("t2v", T2V_REQUESTED), ("i2v", I2V_REQUESTED)):
        name = _NAMES[event_type]
        operations[f"generate{kind.upper()}"] = {
            "action": "receive",
            "title": f"{kind.upper()} function",
            "summary": f"The {kind} function consumes {event_type} and replies completed or failed.",
            "channel": {"$ref": f"#/channels/{name}"},
            "messages": [{"$ref": f"#/channels/{name}/messages/{name}"}],
            "reply": {
                "channel": {"$ref": "#/channels/videoCompleted"},
                "messages": [{"$ref": "#/channels/videoCompleted/messages/videoCompleted"}],
            },
        }
    for event_type in (COMPLETED, FAILED, STARTED, PROGRESS, CANCELLED, POD_READY, POD_STOPPED):
        name = _NAMES[event_type]
        lifecycle = event_type in (STARTED, PROGRESS, POD_READY, POD_STOPPED)
        operations[f"publish{name[0].upper()}{name[1:]}"] = {
            "action": "send",
            "title": f"publish {event_type}",
            "summary": (
                "Sent by the functions to their K_SINK (the Broker) when the pod turns ready and when it stops."
                if event_type in (POD_READY, POD_STOPPED)
                else "Sent by the functions to their K_SINK (the Broker) while a request runs."
            )
            if lifecycle
            else "Replies of both functions, re-published by the broker for downstream consumers.",
            "channel": {"$ref": f"#/channels/{name}"},
            "messages": [{"$ref": f"#/channels/{name}/messages/{name}"}],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "turboflow video events",
            "version": "1.0.0",
            "description": description,
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, value: str):
    style = "|" if "\n" in value else None  # multi-line text as readable literal blocks
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def asyncapi_yaml() -> str:
    header = "# GENERATED by `python -m turboflow.eventing.asyncapi --write` from eventing/contracts.py. Do not edit.\n"
    return header + yaml.dump(build_asyncapi(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


def expected_files() -> dict[Path, str]:
    files = {SCHEMAS_PATH / fname: schema_json(etype) for etype, fname in SCHEMA_FILES.items()}
    files[ASYNCAPI_PATH] = asyncapi_yaml()
    return files


def stale_files(root: Path = REPO_ROOT) -> list[str]:
    out = []
    for rel, text in expected_files().items():
        path = root / rel
        if not path.is_file() or path.read_text() != text:
            out.append(str(rel))
    return out


def write(root: Path = REPO_ROOT) -> list[str]:
    written = []
    for rel, text in expected_files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            written.append(str(rel))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true")
    group.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.write:
        for rel in write(args.root):
            print(f"wrote {rel}")
        return 0
    stale = stale_files(args.root)
    for rel in stale:
        print(f"stale: {rel} (run python -m turboflow.eventing.asyncapi --write)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
