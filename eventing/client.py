"""Producer/consumer helpers behind `turboflow submit` and `turboflow events tail` (usable from Python too)."""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from cloudevents.core.bindings.http import to_binary_event, to_structured_event

from . import signing
from .jetstream import DUPLICATE_WINDOW_S, STREAM, SUBJECT_PREFIX, publish_event
from .nats_binding import ExactCloudEvent, from_nats
from .types import COMPLETED, DEFAULT_TENANT, FAILED, REQUEST_TYPES, TENANT_EXTENSION

IMAGE_PREFIX = "uploads"  # the I2V functions read s3:// images only under uploads/<tenant>/ (TURBOFLOW_IMAGE_PREFIX)
REQUEST_METADATA = "turboflow-request"  # marks an image uploaded for an existing request: the S3 source skips it

REPLY_SUBJECTS = f"{SUBJECT_PREFIX}.io.turboflow.video.>"


def build_request(
    kind: str,
    prompt: str,
    *,
    options: dict | None = None,
    image: str | None = None,
    tenant: str | None = None,
    request_id: str | None = None,
    source: str = "/turboflow/cli",
) -> ExactCloudEvent:
    """A request event. No `time`: the request itself (not the moment it was sent) keys its output, so sending
    the same request id again is the same event (the broker answers 202, not 409)."""
    data = {"prompt": prompt, **{k: v for k, v in (options or {}).items() if v is not None}}
    if image is not None:
        data["image"] = image
    attrs = {
        "type": REQUEST_TYPES[kind],
        "source": source,
        "id": request_id or str(uuid.uuid4()),
        "datacontenttype": "application/json",
    }
    if tenant:
        attrs[TENANT_EXTENSION] = tenant
    return ExactCloudEvent(attrs, data)


def image_reference(
    path_or_uri: str,
    *,
    s3_client=None,
    bucket: str | None = None,
    request_id: str = "",
    tenant: str | None = None,
    image_prefix: str = IMAGE_PREFIX,
) -> str:
    """An `s3://` URI or data URI as given; a local file is uploaded to
    `s3://bucket/<image_prefix>/<tenant>/inputs/<id><ext>` (where the I2V function may read it for that tenant)
    when a bucket is known, else sent inline (base64 data URI)."""
    if path_or_uri.startswith(("s3://", "data:")):
        return path_or_uri
    path = Path(path_or_uri)
    raw = path.read_bytes()
    ctype = mimetypes.guess_type(path.name)[0] or "image/png"
    if s3_client is not None and bucket:
        key = (
            f"{image_prefix.strip('/')}/{tenant or DEFAULT_TENANT}/inputs/{request_id or uuid.uuid4()}"
            f"{path.suffix.lower()}"
        )
        s3_client.put_object(
            Bucket=bucket, Key=key, Body=raw, ContentType=ctype, Metadata={REQUEST_METADATA: request_id or "cli"}
        )
        return f"s3://{bucket}/{key}"
    return f"data:{ctype};base64,{base64.b64encode(raw).decode()}"


async def send(
    event, *, broker_url: str | None = None, nats_url: str | None = None, via: str = "http", mode: str = "binary"
) -> None:
    """Hand a request to the broker: HTTP ingress (202 expected) or direct NATS publish (PubAck)."""
    if via == "nats":
        import nats

        nc = await nats.connect(nats_url)
        try:
            await publish_event(nc.jetstream(), event, mode=mode)
        finally:
            await nc.close()
        return
    msg = to_binary_event(event) if mode == "binary" else to_structured_event(event)
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(broker_url, headers=dict(msg.headers), content=msg.body)
    if r.status_code != 202:
        raise RuntimeError(f"broker answered {r.status_code}: {r.text[:300]}")


async def reply_subscription(
    nats_url: str, *, since: float = DUPLICATE_WINDOW_S, subject: str = REPLY_SUBJECTS, new_only: bool = False
):
    """(nc, sub): an ordered JetStream consumer over the reply subjects, starting `since` seconds ago (a
    completion that JetStream de-duplicated on a resubmission is found too)."""
    import nats
    from nats.js.api import ConsumerConfig, DeliverPolicy

    nc = await nats.connect(nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.25)
    js = nc.jetstream()
    if new_only:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    elif since is None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    else:
        start = (datetime.now(UTC) - timedelta(seconds=since)).isoformat().replace("+00:00", "Z")
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start)
    sub = await js.subscribe(subject, stream=STREAM, ordered_consumer=True, config=config)
    return nc, sub


def reply_problem(event, request_id: str, tenant: str | None, signing_key: bytes | None) -> str | None:
    """Why `event` is not the reply to (request_id, tenant) that a caller may act on; None when it is. Checks the
    subject AND the tenant, the signature when a key is known, and a completion's data against its schema."""
    from .contracts import validate_data

    if event.get_type() not in (COMPLETED, FAILED) or event.get_subject() != request_id:
        return "not a reply to this request"
    reply_tenant = event.get_attributes().get(TENANT_EXTENSION) or DEFAULT_TENANT
    if reply_tenant != (tenant or DEFAULT_TENANT):
        return f"reply for tenant {str(reply_tenant)[:64]!r}, not {tenant or DEFAULT_TENANT!r}"
    if signing_key is not None and not signing.verify_event(event, signing_key):
        return f"no valid {signing.SIGNATURE_EXTENSION} signature (forged, or signed with another key)"
    try:
        data = event_data(event)
        validate_data(event.get_type(), data)
    except Exception as e:  # not JSON, not an object, schema violation: never act on it
        return f"malformed {event.get_type()} data ({type(e).__name__}: {str(e)[:120]})"
    return None


async def wait_for_reply(
    sub,
    request_id: str,
    timeout: float,
    tick: Callable[[float], None] | None = None,
    *,
    tenant: str | None = None,
    signing_key: bytes | None = None,
    warn: Callable[[str], None] | None = None,
):
    """The first completed/failed event for `request_id` (subject) and `tenant` that verifies (see reply_problem);
    replies that name this request but fail a check are reported through `warn` and skipped."""
    started = time.monotonic()
    while True:
        left = timeout - (time.monotonic() - started)
        if left <= 0:
            raise TimeoutError(f"no completion for {request_id} within {timeout:g}s")
        try:
            msg = await sub.next_msg(timeout=min(1.0, left))
        except Exception:  # nats TimeoutError: nothing new this second
            if tick:
                tick(time.monotonic() - started)
            continue
        try:
            event = from_nats(msg.headers, msg.data)
        except ValueError:
            continue
        if event.get_type() not in (COMPLETED, FAILED) or event.get_subject() != request_id:
            continue
        problem = reply_problem(event, request_id, tenant, signing_key)
        if problem is None:
            return event
        if warn:
            warn(f"ignoring {event.get_type()} {str(event.get_id())[:64]} for {request_id}: {problem}")


async def submit_and_wait(
    event,
    *,
    nats_url: str,
    broker_url: str | None = None,
    via: str = "http",
    timeout: float = 900,
    tick: Callable[[float], None] | None = None,
    signing_key: bytes | None = None,
    warn: Callable[[str], None] | None = None,
):
    nc, sub = await reply_subscription(nats_url)
    try:
        await send(event, broker_url=broker_url, nats_url=nats_url, via=via)
        return await wait_for_reply(
            sub,
            event.get_id(),
            timeout,
            tick,
            tenant=event.get_attributes().get(TENANT_EXTENSION),
            signing_key=signing_key,
            warn=warn,
        )
    finally:
        await nc.close()


def event_data(event) -> dict:
    data = event.get_data()
    if isinstance(data, (bytes, str)):
        data = json.loads(data)
    return data or {}


def download(data: dict, out_dir: str | Path, *, s3_client=None) -> Path:
    """Fetch a completion's video (presigned URL; the S3 API when the URL fails and a client is given) into
    out_dir/<request-id>.mp4 and check its sha256."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{data['request_id']}.mp4"
    video = data["video"]
    try:
        with httpx.stream("GET", video["url"], timeout=120) as r:
            r.raise_for_status()
            with open(target, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
    except httpx.HTTPError:
        if s3_client is None:
            raise
        s3_client.download_file(video["bucket"], video["key"], str(target))
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != video["sha256"]:
        raise RuntimeError(f"{target}: sha256 {digest} != completion's {video['sha256']}")
    return target


def describe(event) -> str:
    """One line for a turboflow event."""
    try:
        data = event_data(event)
    except ValueError:  # not JSON: show the attributes only
        data = {}
    t = event.get_type()
    head = f"{event.get_time().isoformat(timespec='seconds') if event.get_time() else '-'} {t} id={event.get_id()}"
    if event.get_subject():
        head += f" subject={event.get_subject()}"
    if t == COMPLETED and isinstance(data, dict) and "video" in data:
        try:
            usage = data.get("usage") or {}
            return (
                f"{head} {data['width']}x{data['height']}x{data['num_frames']} seed={data['seed']} "
                f"{data['video']['uri']} gpu_s={float(usage.get('gpu_seconds', 0)):.2f}"
            )
        except (KeyError, TypeError, ValueError):
            return f"{head} (malformed completion data)"
    if t == FAILED and isinstance(data, dict):
        return f"{head} code={data.get('code')} retryable={data.get('retryable')}: {data.get('message')}"
    if isinstance(data, dict) and "prompt" in data:
        return f"{head} prompt={str(data['prompt'])[:60]!r}"
    return head
