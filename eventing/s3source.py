"""S3-triggered image-to-video: bucket notifications -> `io.turboflow.video.i2v.requested`.

Production: MinIO publishes S3 bucket notifications (the AWS `Records[]` JSON) to a NATS subject (JetStream on);
`turboflow s3source` (a Knative ContainerSource, eventing/manifests/s3source.yaml) consumes that subject with a
durable JetStream consumer and POSTs one request per new image under the configured prefix to `K_SINK` (the
Broker). A notification is acked only after the Broker accepted the request.

Request contents
    tenant       the first key segment under the image prefix (TURBOFLOW_IMAGE_PREFIX, default `uploads`):
                 `uploads/<tenant>/cat.png` - the same place the I2V function confines a tenant's s3:// images to.
                 Metadata or a sidecar may repeat the tenant but not pick another one (the upload is skipped with a
                 warning: whoever can write under uploads/acme/ speaks for acme only). An image directly under the
                 watched prefix is accepted only when that prefix is `uploads/<default tenant>/` (--tenant);
                 otherwise, and for keys outside `uploads/<tenant>/`, it is skipped with a warning.
    image        `s3://<bucket>/<key>` of the uploaded object (the I2V function reads it; its bucket must be in
                 the function's TURBOFLOW_INPUT_BUCKETS).
    prompt and options  object user metadata (`x-amz-meta-prompt`, `x-amz-meta-num-frames`, ...; `-` or `_`) and/or
                 a sidecar JSON object at `<key>.json` (wins over metadata). Only request fields are taken
                 (prompt, resolution, aspect_ratio, num_frames, num_steps, seed, sigma_max, attention, sla_topk,
                 ode, boundary, adaptive_resolution, output_prefix, model). Without a prompt (and no
                 --default-prompt) the upload is skipped with a warning. Images carrying the metadata
                 `turboflow-request` were uploaded for a request that already exists (`turboflow submit --image`)
                 and are skipped quietly.
    id           `s3-` + uuid5(bucket/key@ETag): a repeated notification is the same request (JetStream drops
                 it; the function's idempotency makes one video). No `time` attribute is set: the request is keyed
                 by itself, never by when it was notified. To run again, upload the image again (new ETag) - or
                 under another key.
    order        upload the sidecar first, or after: the image's notification emits when a prompt is available;
                 otherwise the sidecar's notification emits once the image exists.

Development: moto S3 does not publish notifications. `BucketNotifier` is the stand-in for MinIO's notifier that
`turboflow dev` runs: it lists the prefix every `interval` seconds and publishes, for each new (key, ETag), the same
`Records[]` JSON MinIO would publish onto the same subject; the source consumes it exactly as in production.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote_plus, unquote_plus

from turboflow.engine.fields import FIELDS, WIRE_FIELDS

log = logging.getLogger(__name__)

NOTIFY_SUBJECT = "minio.turboflow.uploads"
NOTIFY_STREAM = "MINIO_EVENTS"
DURABLE = "turboflow-s3source"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
SIDECAR_SUFFIX = ".json"
_ID_NAMESPACE = uuid.UUID("0c9b3a56-5f0e-5b86-a3e2-73337363e7a1")
# what an image's metadata or sidecar may set: every request field but the image itself (engine/fields.py)
OPTION_FIELDS = tuple(name for name in WIRE_FIELDS if name != "image")


REQUEST_METADATA = "turboflow-request"  # set on images uploaded for an existing request: not a new request
_TENANT = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # contracts.TENANT_PATTERN


def _default_image_prefix() -> str:
    return (os.environ.get("TURBOFLOW_IMAGE_PREFIX") or "uploads").strip("/")


@dataclass
class S3SourceConfig:
    prefix: str = "uploads/"  # watched key prefix (under image_prefix)
    buckets: tuple[str, ...] = ()  # empty: any bucket in the notifications
    tenant: str | None = None  # the tenant of images directly under a watched prefix `uploads/<tenant>/`
    default_prompt: str | None = None
    source: str = "/turboflow/s3source"
    image_prefix: str = field(default_factory=_default_image_prefix)  # tenants' image areas: <image_prefix>/<t>/


def records_of(payload: bytes | str | dict) -> list[dict]:
    """The `Records` of an S3 notification (MinIO wraps them as {"EventName", "Key", "Records"}; AWS sends
    {"Records"})."""
    doc = json.loads(payload) if isinstance(payload, (bytes, str)) else payload
    if not isinstance(doc, dict):
        raise ValueError("S3 notification is not a JSON object")
    records = doc.get("Records") or []
    return [r for r in records if isinstance(r, dict)]


def _coerce(name: str, value: Any) -> Any:
    """Metadata values are strings: give them the field's type (a value that does not convert is left for the
    function's validation to refuse with the field's code)."""
    if not isinstance(value, str):
        return value
    kind = FIELDS[name].type if name in FIELDS else str
    text = value.strip()
    if kind is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
    if kind is int:
        try:
            return int(text)
        except ValueError:
            pass
    if kind is float:
        try:
            return float(text)
        except ValueError:
            pass
    return value


def request_id_for(bucket: str, key: str, etag: str | None) -> str:
    return "s3-" + str(uuid.uuid5(_ID_NAMESPACE, f"{bucket}/{key}@{(etag or '').strip(chr(34))}"))


class S3Source:
    """Turns notification records into I2V request events (boto3 calls; run it in a thread)."""

    def __init__(self, s3_client, config: S3SourceConfig | None = None):
        self.s3 = s3_client
        self.cfg = config or S3SourceConfig()

    def _wanted(self, bucket: str, key: str) -> bool:
        return (not self.cfg.buckets or bucket in self.cfg.buckets) and key.startswith(self.cfg.prefix)

    def tenant_for(self, key: str) -> tuple[str | None, str]:
        """(tenant, "") from the key's place under <image_prefix>/<tenant>/, or (None, why not)."""
        root = self.cfg.image_prefix.strip("/") + "/"
        tenant, sep, rest = key[len(root) :].partition("/") if key.startswith(root) else ("", "", "")
        if not sep or not rest:
            return None, f"it is not under {root}<tenant>/ (the only place the I2V function reads a tenant's images)"
        if not _TENANT.fullmatch(tenant):
            return None, f"{tenant[:64]!r} in {root}<tenant>/ is not a tenant name (a DNS label)"
        directly_under_prefix = "/" not in key[len(self.cfg.prefix) :]
        if directly_under_prefix and self.cfg.prefix != f"{root}{self.cfg.tenant}/":
            return None, (
                f"it is directly under the watched prefix {self.cfg.prefix}, which is not "
                f"{root}<default tenant>/: upload it under {self.cfg.prefix}<tenant>/"
            )
        return tenant, ""

    def _head(self, bucket: str, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.s3.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _sidecar(self, bucket: str, key: str) -> dict:
        from botocore.exceptions import ClientError

        try:
            body = self.s3.get_object(Bucket=bucket, Key=key + SIDECAR_SUFFIX)["Body"].read()
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return {}
            raise
        try:
            doc = json.loads(body)
        except ValueError:
            log.warning("s3source: %s/%s%s is not JSON: ignored", bucket, key, SIDECAR_SUFFIX)
            return {}
        return doc if isinstance(doc, dict) else {}

    def events_for(self, records: list[dict]) -> list:
        out, seen = [], set()
        for rec in records:
            name = str(rec.get("eventName", ""))
            if not (name.startswith("s3:ObjectCreated:") or name.startswith("ObjectCreated:")):
                continue
            s3 = rec.get("s3") or {}
            bucket = (s3.get("bucket") or {}).get("name")
            key = unquote_plus((s3.get("object") or {}).get("key") or "")
            if not bucket or not key or not self._wanted(bucket, key):
                continue
            image_key = key[: -len(SIDECAR_SUFFIX)] if key.endswith(SIDECAR_SUFFIX) else key
            if not image_key.lower().endswith(IMAGE_SUFFIXES) or (bucket, image_key) in seen:
                continue
            seen.add((bucket, image_key))
            event = self.request_for(bucket, image_key, sidecar_notified=key != image_key)
            if event is not None:
                out.append(event)
        return out

    def request_for(self, bucket: str, key: str, sidecar_notified: bool = False):
        from turboflow.eventing.nats_binding import ExactCloudEvent
        from turboflow.eventing.types import I2V_REQUESTED, TENANT_EXTENSION

        head = self._head(bucket, key)
        if head is None:
            if not sidecar_notified:
                log.warning("s3source: %s/%s is gone; skipped", bucket, key)
            return None  # a sidecar for an image not uploaded yet: the image's notification will emit
        metadata = {
            mkey.lower().removeprefix("x-amz-meta-"): value for mkey, value in (head.get("Metadata") or {}).items()
        }
        if REQUEST_METADATA in metadata:
            log.debug("s3source: %s/%s belongs to request %s; skipped", bucket, key, metadata[REQUEST_METADATA])
            return None
        tenant, why_not = self.tenant_for(key)
        if tenant is None:
            log.warning("s3source: %s/%s skipped: %s", bucket, key, why_not)
            return None
        options: dict[str, Any] = {}
        for mkey, value in metadata.items():
            name = mkey.replace("-", "_")
            if name in OPTION_FIELDS or name == "tenant":
                options[name] = _coerce(name, value)
        sidecar = self._sidecar(bucket, key)
        ignored = sorted(k for k in sidecar if k not in OPTION_FIELDS and k != "tenant")
        if ignored:
            log.warning("s3source: %s/%s%s: ignoring fields %s", bucket, key, SIDECAR_SUFFIX, ignored)
        options.update({k: v for k, v in sidecar.items() if k in OPTION_FIELDS or k == "tenant"})
        claimed = options.pop("tenant", None)
        if claimed not in (None, "", tenant):
            log.warning(
                "s3source: %s/%s skipped: metadata/sidecar asks for tenant %r, but the key is under "
                "tenant %r's prefix (a tenant is chosen by where the image is uploaded)",
                bucket,
                key,
                str(claimed)[:64],
                tenant,
            )
            return None
        if not options.get("prompt"):
            if self.cfg.default_prompt:
                options["prompt"] = self.cfg.default_prompt
            else:
                if not sidecar_notified:
                    log.warning(
                        "s3source: %s/%s has no prompt (metadata `prompt` or %s%s); waiting for a sidecar",
                        bucket,
                        key,
                        key,
                        SIDECAR_SUFFIX,
                    )
                return None
        etag = str(head.get("ETag", "")).strip('"')
        attrs = {
            "type": I2V_REQUESTED,
            "source": f"{self.cfg.source}/{bucket}",
            "id": request_id_for(bucket, key, etag),
            "subject": key,
            "datacontenttype": "application/json",
            TENANT_EXTENSION: tenant,
        }
        return ExactCloudEvent(attrs, {**options, "image": f"s3://{bucket}/{key}"})


# ---------------------------------------------------------------------------------------------------------------
# Running the source: NATS subject in, HTTP sink (K_SINK) out
# ---------------------------------------------------------------------------------------------------------------
class SinkRefused(RuntimeError):
    """The sink answered a terminal 4xx (e.g. 409: this upload's id was already sent with other content)."""


async def post_to_sink(client, sink: str, event, attempts: int = 8) -> None:
    """POST `event` (binary mode) to the sink, retrying 5xx/connection errors with backoff."""
    import httpx
    from cloudevents.core.bindings.http import to_binary_event

    msg = to_binary_event(event)
    delay = 0.2
    for attempt in range(attempts):
        try:
            r = await client.post(sink, headers=dict(msg.headers), content=msg.body, timeout=10)
            if r.status_code < 300:
                return
            if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                raise SinkRefused(f"sink refused {event.get_id()}: HTTP {r.status_code} {r.text[:200]}")
        except httpx.HTTPError as e:
            if attempt == attempts - 1:
                raise
            log.debug("s3source: sink %s: %s", sink, e)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5)
    raise RuntimeError(f"sink {sink} did not accept {event.get_id()}")


async def ensure_notify_stream(js, stream: str = NOTIFY_STREAM, subject: str = NOTIFY_SUBJECT) -> None:
    from nats.js.api import StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    try:
        await js.stream_info(stream)
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=stream,
                subjects=[subject],
                storage=StorageType.FILE,
                duplicate_window=3600.0,
                max_age=7 * 24 * 3600.0,
            )
        )


async def run_source(
    nats_url: str,
    source: S3Source,
    sink: str,
    stop: asyncio.Event,
    *,
    subject: str = NOTIFY_SUBJECT,
    stream: str | None = NOTIFY_STREAM,
    durable: str = DURABLE,
    emitted: Callable[[Any], Awaitable[None] | None] | None = None,
) -> None:
    """Consume notifications until `stop` is set. With `stream` (MinIO `jetstream on`): a durable pull consumer,
    a notification acked after its requests were accepted. Without: a core NATS subscription."""
    import httpx
    import nats
    from nats.errors import TimeoutError as NatsTimeout

    nc = await nats.connect(nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.25, name="turboflow-s3source")
    client = httpx.AsyncClient()

    async def process(payload: bytes) -> None:
        try:
            records = records_of(payload)
        except ValueError as e:
            log.warning("s3source: not an S3 notification (%s): ignored", e)
            return
        for event in await asyncio.to_thread(source.events_for, records):
            try:
                await post_to_sink(client, sink, event)
            except SinkRefused as e:  # terminal: retrying the notification cannot change the answer
                log.warning("s3source: %s: %s", event.get_subject(), e)
                continue
            log.info("s3source: %s -> request %s", event.get_subject(), event.get_id())
            if emitted is not None:
                result = emitted(event)
                if asyncio.iscoroutine(result):
                    await result

    try:
        if stream:
            from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

            js = nc.jetstream()
            await ensure_notify_stream(js, stream, subject)
            psub = await js.pull_subscribe(
                subject,
                durable=durable,
                stream=stream,
                config=ConsumerConfig(
                    durable_name=durable,
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_wait=120,
                    max_deliver=-1,
                ),
            )
            while not stop.is_set():
                try:
                    msgs = await psub.fetch(4, timeout=0.5)
                except (TimeoutError, NatsTimeout):
                    continue
                except Exception as e:  # NATS restarting
                    log.debug("s3source: fetch: %s", e)
                    await asyncio.sleep(0.25)
                    continue
                for msg in msgs:
                    try:
                        await process(msg.data)
                        await msg.ack()
                    except Exception as e:
                        log.warning("s3source: notification not processed (%s): retrying later", e)
                        await msg.nak(delay=2)
        else:
            queue: asyncio.Queue = asyncio.Queue()

            async def on_message(m):
                await queue.put(m.data)

            await nc.subscribe(subject, queue="turboflow-s3source", cb=on_message)
            while not stop.is_set():
                try:
                    payload = await asyncio.wait_for(queue.get(), 0.5)
                except TimeoutError:
                    continue
                try:
                    await process(payload)
                except Exception as e:
                    log.warning("s3source: notification lost (core NATS, no redelivery): %s", e)
    finally:
        await client.aclose()
        await nc.close()


# ---------------------------------------------------------------------------------------------------------------
# Development stand-in for MinIO's notifier
# ---------------------------------------------------------------------------------------------------------------
def minio_record(
    bucket: str,
    key: str,
    etag: str,
    size: int,
    content_type: str | None = None,
    metadata: dict | None = None,
    event_name: str = "s3:ObjectCreated:Put",
) -> dict:
    """One notification in MinIO's NATS format (key URL-encoded as MinIO does)."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return {
        "EventName": event_name,
        "Key": f"{bucket}/{key}",
        "Records": [
            {
                "eventVersion": "2.0",
                "eventSource": "minio:s3",
                "awsRegion": "",
                "eventTime": now,
                "eventName": event_name,
                "userIdentity": {"principalId": "turboflow-dev"},
                "requestParameters": {},
                "responseElements": {},
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "turboflow",
                    "bucket": {
                        "name": bucket,
                        "ownerIdentity": {"principalId": "turboflow-dev"},
                        "arn": f"arn:aws:s3:::{bucket}",
                    },
                    "object": {
                        "key": quote_plus(key, safe=""),
                        "size": size,
                        "eTag": etag,
                        "contentType": content_type or "application/octet-stream",
                        "userMetadata": {f"X-Amz-Meta-{k}": v for k, v in (metadata or {}).items()},
                        "sequencer": f"{int(datetime.now().timestamp() * 1e9):X}",
                    },
                },
                "source": {"host": "127.0.0.1", "port": "", "userAgent": "turboflow-dev-notifier"},
            }
        ],
    }


class BucketNotifier:
    """`turboflow dev`'s stand-in for MinIO bucket notifications (moto publishes none).

    Polls `list_objects_v2` under `prefix` every `interval` seconds; for every object that is new or changed
    (key, ETag) since the previous listing it publishes `minio_record(...)` to `subject` through JetStream
    (Nats-Msg-Id = bucket/key/ETag). Objects present at start are the baseline, as MinIO only notifies new writes.
    """

    def __init__(
        self,
        s3_client,
        bucket: str,
        prefix: str,
        nats_url: str,
        *,
        subject: str = NOTIFY_SUBJECT,
        stream: str = NOTIFY_STREAM,
        interval: float = 0.5,
    ):
        self.s3, self.bucket, self.prefix = s3_client, bucket, prefix
        self.nats_url, self.subject, self.stream, self.interval = nats_url, subject, stream, interval
        self.published = 0

    def _listing(self) -> dict[str, dict]:
        out = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = obj
        return out

    async def run(self, stop: asyncio.Event) -> None:
        import nats

        nc = await nats.connect(
            self.nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.25, name="turboflow-dev-s3-notifier"
        )
        js = nc.jetstream()
        try:
            await ensure_notify_stream(js, self.stream, self.subject)
            known = {k: o["ETag"] for k, o in (await asyncio.to_thread(self._listing)).items()}
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), self.interval)
                except TimeoutError:
                    pass
                try:
                    listing = await asyncio.to_thread(self._listing)
                except Exception as e:  # S3 briefly away
                    log.debug("dev notifier: listing failed: %s", e)
                    continue
                for key, obj in sorted(listing.items(), key=lambda kv: kv[1]["LastModified"]):
                    etag = obj["ETag"]
                    if known.get(key) == etag:
                        continue
                    record = minio_record(self.bucket, key, etag.strip('"'), obj.get("Size", 0))
                    await js.publish(
                        self.subject,
                        json.dumps(record).encode(),
                        headers={"Nats-Msg-Id": f"{self.bucket}/{key}/{etag.strip(chr(34))}"},
                    )
                    known[key] = etag
                    self.published += 1
        finally:
            await nc.close()
