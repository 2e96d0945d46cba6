"""Request state: one record per request in a NATS JetStream key-value bucket, moved forward only by events.

The gateway writes it (its consumer of lifecycle events, its cancel endpoint); the functions read it to see a
cancel. Nothing here knows HTTP.

Keys of the bucket `turboflow_requests` (history 1, entries expire after the retention period):

    req.<tenant>.<idkey>      the RequestRecord, JSON
    active.<tenant>.<idkey>   present while the request is unfinished: {"task", "status", "created_at"}
                              (per-tenant limits and queue positions read these few keys, not every record)
    idem.<tenant>.<digest>    an Idempotency-Key's claim: {"id", "input_sha256"}; digest = sha256(key)[:40]

`idkey` is the request id with "." written as "=2E": ids may hold dots (even "a..b"), KV key tokens may not be
empty, and "=" never occurs in an id, so the mapping is one-to-one.

Transitions (`apply`, pure): a record only moves forward,

    queued (0)  <  running (1)  <  completed | failed | cancelled (2, terminal; the first one wins)

and progress only forward by (stage order, step). Applying the same event twice changes nothing, and events that
arrive out of order (completed before started, progress before started) end in the same record. A record is
created by whichever event about it comes first, so requests that bypass the gateway (S3 uploads, producers on the
broker) get a record too.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from turboflow.errors import TurboflowError

from .event_schemas import REQUEST_ID_PATTERN, TENANT_PATTERN, full_match
from .types import (
    CANCELLED,
    COMPLETED,
    FAILED,
    GATEWAY_SOURCE,
    PROGRESS,
    PROGRESS_STAGES,
    REQUEST_TYPES,
    STARTED,
    TENANT_EXTENSION,
)

log = logging.getLogger(__name__)

BUCKET = "turboflow_requests"
QUEUED, RUNNING = "queued", "running"
TERMINAL_STATUSES = ("completed", "failed", "cancelled")
STATUSES = (QUEUED, RUNNING, *TERMINAL_STATUSES)
_RANK = {QUEUED: 0, RUNNING: 1, **dict.fromkeys(TERMINAL_STATUSES, 2)}
_STAGE_ORDER = {stage: index for index, stage in enumerate(PROGRESS_STAGES)}
_TERMINAL_BY_TYPE = {COMPLETED: "completed", FAILED: "failed", CANCELLED: "cancelled"}
_KIND_BY_REQUEST_TYPE = {event_type: kind for kind, event_type in REQUEST_TYPES.items()}
MAX_WEBHOOK_ATTEMPTS_KEPT = 20
# a watch's server-side consumer is removed this long after its watcher stops (nats-py's default is 5 minutes: every
# listing, SSE stream and cancel watch would leave one behind that long)
WATCH_INACTIVE_S = 2.0


class StateUnavailableError(TurboflowError):
    """The request-state bucket cannot be reached (NATS down or not configured)."""

    code = "state_unavailable"
    retryable = True


# ---- keys -----------------------------------------------------------------------------------------------------
def id_key(request_id: str) -> str:
    """The KV token for a request id: "." -> "=2E" (one-to-one: ids never contain "=")."""
    return request_id.replace(".", "=2E")


def request_id_of(token: str) -> str:
    return token.replace("=2E", ".")


def record_key(tenant: str, request_id: str) -> str:
    return f"req.{tenant}.{id_key(request_id)}"


def active_key(tenant: str, request_id: str) -> str:
    return f"active.{tenant}.{id_key(request_id)}"


def idempotency_key(tenant: str, key: str) -> str:
    return f"idem.{tenant}.{hashlib.sha256(key.encode('utf-8')).hexdigest()[:40]}"


def valid_ids(tenant: object, request_id: object) -> bool:
    """Whether (tenant, request id) can name a record: a DNS-label tenant and a contract request id."""
    return full_match(TENANT_PATTERN, tenant) and full_match(REQUEST_ID_PATTERN, request_id)


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _rfc3339(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        value = value if value.tzinfo else value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return str(value)


# ---- the record -----------------------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    id: str
    tenant: str
    task: str | None
    status: str = QUEUED
    created_at: str = ""
    updated_at: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    input_sha256: str | None = None
    request: dict | None = None  # the submitted fields; an inline image is replaced by a note
    source: str | None = None  # the request event's source
    cancel_requested: bool = False
    started: dict | None = None  # pod, cold_start, queue_wait, model_load_seconds
    progress: dict | None = None  # stage, step, of, elapsed, eta, at
    result: dict | None = None  # the completed event's data (without the presigned URL)
    error: dict | None = None  # code, message, field, retryable
    cancelled: dict | None = None  # while, gpu_seconds, cancelled_at
    webhook: dict | None = None  # url, events, attempts (shown only to the record's tenant)
    events: list[str] = field(default_factory=list)  # lifecycle names applied, in order; progress once
    # False while the gateway has stored the record but not yet handed the request to the broker: a retry of the
    # same submission sends it again (the broker de-duplicates), a refused one is discarded. Any event about the
    # request proves the broker has it.
    accepted: bool = True
    base_url: str | None = None  # the gateway URL the client used (links in webhooks)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> RequestRecord:
        data = json.loads(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def copy(self) -> RequestRecord:
        return copy.deepcopy(self)


def submitted_fields(data: Any) -> dict | None:
    """A request's data as kept in its record: an inline (data:) image is replaced by a short note."""
    if not isinstance(data, dict):
        return None
    kept = dict(data)
    image = kept.get("image")
    if isinstance(image, str) and image.startswith("data:"):
        kept["image"] = f"(inline image, {len(image)} characters)"
    return kept


# ---- transitions (pure) ---------------------------------------------------------------------------------------
def identify(event) -> tuple[str, str] | None:
    """(tenant, request id) an event is about: a request's own id; a reply's data.request_id or subject."""
    event_type = event.get_type()
    data = event.get_data() if isinstance(event.get_data(), dict) else {}
    tenant = _attribute(event, TENANT_EXTENSION) or data.get("tenant")
    if event_type in _KIND_BY_REQUEST_TYPE:
        request_id = event.get_id()
    else:
        request_id = data.get("request_id") or event.get_subject()
    return (tenant, request_id) if valid_ids(tenant, request_id) else None


def _attribute(event, name: str):
    try:
        return event.get_extension(name)
    except (AttributeError, KeyError):
        return (event.get_attributes() or {}).get(name)


def _event_time(event) -> str:
    return _rfc3339(event.get_time()) or now_rfc3339()


def _new_record(event, tenant: str, request_id: str, when: str) -> RequestRecord:
    event_type = event.get_type()
    data = event.get_data() if isinstance(event.get_data(), dict) else {}
    task = _KIND_BY_REQUEST_TYPE.get(event_type) or data.get("kind")
    return RequestRecord(
        id=request_id,
        tenant=tenant,
        task=task if task in REQUEST_TYPES else None,
        status=QUEUED,
        created_at=when,
        updated_at=when,
        request=submitted_fields(data) if event_type in _KIND_BY_REQUEST_TYPE else None,
        source=event.get_source() if event_type in _KIND_BY_REQUEST_TYPE else None,
        events=["queued"],
    )


def apply(record: RequestRecord | None, event) -> tuple[RequestRecord | None, list[str]]:
    """The record after `event`, and the lifecycle names this produced (queued, started, progress, completed,
    failed, cancelled); (None, []) when the event changes nothing or names no valid request.

    `record` is not modified. Rules: see the module docstring (monotone; the first terminal event wins)."""
    ids = identify(event)
    if ids is None:
        return None, []
    tenant, request_id = ids
    event_type = event.get_type()
    when = _event_time(event)
    data = event.get_data() if isinstance(event.get_data(), dict) else {}
    changes: list[str] = []
    if record is None:
        record, changes = _new_record(event, tenant, request_id, when), ["queued"]
        if event_type in _KIND_BY_REQUEST_TYPE:
            return record, changes
    else:
        if event_type in _KIND_BY_REQUEST_TYPE:
            return None, []  # a request never changes an existing record (redelivery, or someone else's id)
        record = record.copy()
    original = None if changes else record.copy()
    if _other_input(record, data):
        return None, []  # about another request that reused this id (it gets `id_conflict` from the function)
    record.accepted = True
    if record.terminal:
        if _supersedes_provisional_cancel(record, event):
            return _settle_provisional_cancel(record, event, data, when)
        return None, []
    if record.task is None and data.get("kind") in REQUEST_TYPES:
        record.task = data["kind"]

    if event_type in (STARTED, PROGRESS):
        if record.status == QUEUED:
            record.status, record.started_at = RUNNING, data.get("started_at") or when
            changes.append("started")
        if event_type == STARTED and record.started is None:
            record.started = {
                k: data[k] for k in ("pod", "cold_start", "queue_wait", "model_load_seconds") if k in data
            }
            record.started_at = data.get("started_at") or record.started_at
        if event_type == PROGRESS and _advances(record.progress, data):
            record.progress = {
                **{k: data.get(k) for k in ("stage", "step", "of", "elapsed", "eta")},
                "at": when,
            }
            changes.append("progress")
    elif event_type in _TERMINAL_BY_TYPE:
        status = _TERMINAL_BY_TYPE[event_type]
        record.status, record.finished_at = status, when
        if event_type == COMPLETED:
            result = copy.deepcopy(data)
            result.get("video", {}).pop("url", None)  # presigned: stale soon, and a credential; re-signed on read
            result.get("video", {}).pop("url_expires_at", None)
            record.result = result
            record.finished_at = data.get("completed_at") or when
            record.input_sha256 = record.input_sha256 or data.get("input_sha256")
        elif event_type == FAILED:
            record.error = {k: data[k] for k in ("code", "message", "field", "retryable") if k in data}
        else:
            record.cancelled = {k: data[k] for k in ("while", "gpu_seconds", "cancelled_at") if k in data}
            record.cancel_requested = True
            record.finished_at = data.get("cancelled_at") or when
        changes.append(status)
    else:
        return (record, changes) if changes or record != original else (None, [])
    if not changes:  # e.g. `started` after a progress event: nothing to announce, details still worth keeping
        return (record, []) if record != original else (None, [])
    record.updated_at = when
    record.events = record.events + [c for c in changes if c not in ("queued", "progress") or c not in record.events]
    return record, changes


def _other_input(record: RequestRecord, data: dict) -> bool:
    """An event whose input hash differs from the record's is about another request with the same id."""
    theirs = data.get("input_sha256")
    return bool(theirs and record.input_sha256 and theirs != record.input_sha256)


def _supersedes_provisional_cancel(record: RequestRecord, event) -> bool:
    """The gateway cancels a queued request at once, but only the function knows whether it had in fact started:
    its own terminal event (completed, or cancelled while running) replaces that provisional cancel."""
    provisional = record.status == "cancelled" and (record.cancelled or {}).get("by") == "gateway"
    return provisional and event.get_type() in (COMPLETED, CANCELLED) and event.get_source() != GATEWAY_SOURCE


def _settle_provisional_cancel(record: RequestRecord, event, data: dict, when: str):
    if event.get_type() == COMPLETED:  # it ran to the end before it saw the cancel: the video exists and is paid
        record.status, record.cancelled = "completed", None
        record.result = copy.deepcopy(data)
        record.result.get("video", {}).pop("url", None)
        record.result.get("video", {}).pop("url_expires_at", None)
        record.finished_at, record.updated_at = data.get("completed_at") or when, when
        record.events = [e for e in record.events if e != "cancelled"] + ["completed"]
        return record, ["completed"]
    record.cancelled = {k: data[k] for k in ("while", "gpu_seconds", "cancelled_at") if k in data}
    record.updated_at = when
    return record, []  # still cancelled (announced already); now with the device time it really used


def _advances(current: dict | None, data: dict) -> bool:
    """Whether progress `data` is past `current`: ordered by (stage in PROGRESS_STAGES order, step)."""
    stage, step = data.get("stage"), data.get("step")
    if stage not in _STAGE_ORDER or not isinstance(step, int):
        return False
    if current is None:
        return True
    return (_STAGE_ORDER[stage], step) > (_STAGE_ORDER.get(current.get("stage"), -1), current.get("step") or 0)


def request_cancel_transition(record: RequestRecord, when: str | None = None) -> tuple[RequestRecord | None, list]:
    """A cancel asked for `record`: queued -> cancelled now (no device time); running -> cancel_requested (the
    function stops at its next step); finished or already asked -> no change."""
    if record.terminal or record.cancel_requested:
        return None, []
    when = when or now_rfc3339()
    new = record.copy()
    new.cancel_requested, new.updated_at = True, when
    if new.status == QUEUED:
        new.status, new.finished_at = "cancelled", when
        new.cancelled = {"while": "queued", "gpu_seconds": 0.0, "cancelled_at": when, "by": "gateway"}
        new.events = new.events + ["cancelled"]
        return new, ["cancelled"]
    return new, []


# ---- the store ------------------------------------------------------------------------------------------------
def _unavailable(error: BaseException) -> StateUnavailableError:
    return StateUnavailableError(f"the request-state store is unavailable: {type(error).__name__}: {error}")


class RequestStates:
    """The bucket, through one NATS connection. Every method raises StateUnavailableError when NATS fails."""

    def __init__(self, nc, kv):
        self._nc, self._kv = nc, kv

    @classmethod
    async def connect(
        cls,
        nats_url: str,
        *,
        retention_seconds: float = 30 * 86400.0,
        bucket: str = BUCKET,
        name: str = "turboflow",
        timeout: float = 10.0,
    ) -> RequestStates:
        """Connect and open the bucket, creating it (history 1, entries kept `retention_seconds`) if missing."""
        import nats
        from nats.js.api import KeyValueConfig
        from nats.js.errors import BucketNotFoundError

        async def quiet(error: Exception) -> None:  # nats-py logs a traceback per failed attempt by default
            log.debug("request-state NATS: %s", error)

        # reconnects forever once connected (a NATS restart must not end the process), but the first connection
        # is bounded: an unreachable server is StateUnavailableError within `timeout`, not a hang
        try:
            nc = await asyncio.wait_for(
                nats.connect(nats_url, name=name, connect_timeout=2, max_reconnect_attempts=-1, error_cb=quiet),
                timeout,
            )
        except Exception as e:  # noqa: BLE001 - nats raises a zoo of errors on connect
            raise _unavailable(e) from e
        try:
            js = nc.jetstream()
            try:
                kv = await js.key_value(bucket)
            except BucketNotFoundError:
                try:
                    kv = await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, ttl=retention_seconds))
                except Exception:  # created meanwhile by another process (maybe with another retention)
                    kv = await js.key_value(bucket)
        except Exception as e:
            await nc.close()
            raise _unavailable(e) from e
        return cls(nc, kv)

    async def close(self) -> None:
        await self._nc.close()

    # -- records
    async def get(self, tenant: str, request_id: str) -> tuple[RequestRecord, int] | None:
        """The record and its revision, or None (unknown id, or an id that cannot name a record)."""
        from nats.js.errors import KeyNotFoundError

        if not valid_ids(tenant, request_id):
            return None
        try:
            entry = await self._kv.get(record_key(tenant, request_id))
        except KeyNotFoundError:
            return None
        except Exception as e:
            raise _unavailable(e) from e
        if not entry.value:
            return None
        return RequestRecord.from_json(entry.value), entry.revision

    async def create(self, record: RequestRecord) -> bool:
        """Store a new record; False when one with this (tenant, id) exists already."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            await self._kv.create(record_key(record.tenant, record.id), record.to_json())
        except KeyWrongLastSequenceError:
            return False
        except Exception as e:
            raise _unavailable(e) from e
        await self._sync_active(record)
        return True

    async def update(
        self, tenant: str, request_id: str, change: Callable[[RequestRecord], RequestRecord | None]
    ) -> RequestRecord | None:
        """Compare-and-set: `change(copy of the record)` returns the new record (or None: leave it); retried when
        another writer got there first. Returns the stored record, or None when there is none."""
        record, _ = await self._cas(tenant, request_id, lambda rec: (change(rec.copy()), []))
        return record

    async def apply_event(self, event) -> tuple[RequestRecord | None, list[str]]:
        """Apply `event` (see `apply`) to its record, creating the record when it is the first news of the
        request. Returns (the record now, the lifecycle names this application produced)."""
        ids = identify(event)
        if ids is None:
            return None, []
        tenant, request_id = ids
        for _ in range(100):
            current = await self.get(tenant, request_id)
            if current is None:
                record, changes = apply(None, event)
                if record is None:
                    return None, []
                if await self.create(record):
                    return record, changes
                continue  # created meanwhile: apply to that one
            return await self._cas(tenant, request_id, lambda rec: apply(rec, event), current)
        raise StateUnavailableError(f"request {request_id}: too many concurrent updates")

    async def discard(self, tenant: str, request_id: str) -> bool:
        """Forget a request the broker never accepted (`accepted` still False): its record and `active` entry go,
        so the same id (or Idempotency-Key) can be submitted again. Compare-and-delete: a record that an event or a
        retried submission has marked accepted meanwhile stays. True when it was removed."""
        from nats.js.errors import KeyWrongLastSequenceError

        current = await self.get(tenant, request_id)
        if current is None or current[0].accepted:
            return False
        try:
            await self._kv.delete(record_key(tenant, request_id), last=current[1])
        except KeyWrongLastSequenceError:
            return False
        except Exception as e:
            raise _unavailable(e) from e
        try:
            await self._kv.delete(active_key(tenant, request_id))
        except Exception as e:
            raise _unavailable(e) from e
        return True

    async def request_cancel(self, tenant: str, request_id: str) -> tuple[RequestRecord | None, list[str]]:
        """Ask to cancel: see `request_cancel_transition`. Returns (the record now, ["cancelled"] or [])."""
        return await self._cas(tenant, request_id, lambda rec: request_cancel_transition(rec))

    async def _cas(self, tenant, request_id, transition, current=None) -> tuple[RequestRecord | None, list[str]]:
        from nats.js.errors import KeyWrongLastSequenceError

        for _ in range(100):
            current = current or await self.get(tenant, request_id)
            if current is None:
                return None, []
            record, revision = current
            new, changes = transition(record)
            if new is None:
                return record, []
            try:
                await self._kv.update(record_key(tenant, request_id), new.to_json(), last=revision)
            except KeyWrongLastSequenceError:
                current = None
                continue
            except Exception as e:
                raise _unavailable(e) from e
            if new.status != record.status or new.terminal:
                await self._sync_active(new)
            return new, changes
        raise StateUnavailableError(f"request {request_id}: too many concurrent updates")

    async def _sync_active(self, record: RequestRecord) -> None:
        """Keep `active.<tenant>.<id>` in step with the record (present iff unfinished)."""
        key = active_key(record.tenant, record.id)
        try:
            if record.terminal:
                await self._kv.delete(key)
            else:
                value = {
                    "task": record.task,
                    "status": record.status,
                    "created_at": record.created_at,
                    "source": record.source,
                }
                await self._kv.put(key, json.dumps(value).encode())
        except Exception as e:
            raise _unavailable(e) from e

    # -- listing
    async def _values(self, pattern: str) -> dict[str, bytes]:
        """key -> value of every live key matching `pattern` (NATS subject wildcards)."""
        try:
            watcher = await self._kv.watch(pattern, ignore_deletes=True, inactive_threshold=WATCH_INACTIVE_S)
        except Exception as e:
            raise _unavailable(e) from e
        found: dict[str, bytes] = {}
        try:
            while True:
                entry = await watcher.updates(timeout=10)
                if entry is None:  # the initial values are all delivered
                    return found
                if entry.value:
                    found[entry.key] = entry.value
        except Exception as e:
            raise _unavailable(e) from e
        finally:
            try:
                await watcher.stop()
            except Exception:  # noqa: BLE001 - the connection may be gone; nothing to clean up then
                pass

    async def list(self, tenant: str, status: str | None = None) -> list[RequestRecord]:
        """The tenant's records (optionally of one status), newest first (created_at, then id)."""
        records = [RequestRecord.from_json(v) for v in (await self._values(f"req.{tenant}.>")).values()]
        if status is not None:
            records = [r for r in records if r.status == status]
        return sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)

    async def count_active(self, tenant: str, source: str | None = None) -> int:
        """Unfinished requests of `tenant` (only those sent by `source`, when given: the gateway limits what it
        accepted, not what producers on the broker sent). An `active` key whose record is finished or gone (a
        writer died between the two writes) is removed here, so it never counts against the tenant for long."""
        count = 0
        for key, raw in (await self._values(f"active.{tenant}.>")).items():
            if source is not None and json.loads(raw).get("source") != source:
                continue
            request_id = request_id_of(key.split(".", 2)[2])
            current = await self.get(tenant, request_id)
            if current is None or current[0].terminal:
                try:
                    await self._kv.delete(key)
                except Exception as e:
                    raise _unavailable(e) from e
                continue
            count += 1
        return count

    async def queue_position(self, record: RequestRecord) -> int | None:
        """1 + the queued requests of the same task (any tenant) accepted before `record`; None unless queued.

        Order is (created_at, tenant, id): a total order every gateway replica computes alike."""
        return (await self.queue_positions([record]))[0]

    async def queue_positions(self, records: list[RequestRecord]) -> list[int | None]:
        """`queue_position` of each record, from one scan of the `active` index (a listing's page at once)."""
        if not any(r.status == QUEUED for r in records):
            return [None] * len(records)
        queued: dict[str | None, list[tuple]] = {}
        for key, raw in (await self._values("active.>")).items():
            _, tenant, token = key.split(".", 2)
            value = json.loads(raw)
            if value.get("status") == QUEUED:
                order = (value.get("created_at") or "", tenant, request_id_of(token))
                queued.setdefault(value.get("task"), []).append(order)
        positions: list[int | None] = []
        for record in records:
            if record.status != QUEUED:
                positions.append(None)
                continue
            mine = (record.created_at, record.tenant, record.id)
            positions.append(1 + sum(order < mine for order in queued.get(record.task, ())))
        return positions

    async def watch(self, tenant: str, request_id: str) -> AsyncIterator[RequestRecord]:
        """The record now (when there is one), then each new version, until the caller stops iterating."""
        if not valid_ids(tenant, request_id):
            return
        try:
            watcher = await self._kv.watch(
                record_key(tenant, request_id), ignore_deletes=True, inactive_threshold=WATCH_INACTIVE_S
            )
        except Exception as e:
            raise _unavailable(e) from e
        try:
            while True:
                entry = await watcher.updates(timeout=None)
                if entry is not None and entry.value:
                    yield RequestRecord.from_json(entry.value)
        finally:
            try:
                await watcher.stop()
            except Exception:  # noqa: BLE001
                pass

    # -- idempotency keys
    async def claim_idempotency(self, tenant: str, key: str, request_id: str, input_sha256: str) -> tuple[str, str]:
        """Bind an Idempotency-Key to (request id, input hash) unless it is bound already; returns the binding
        in force (ours, or the earlier one: compare it to decide between a replay and a conflict)."""
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        name = idempotency_key(tenant, key)
        value = json.dumps({"id": request_id, "input_sha256": input_sha256}).encode()
        for _ in range(10):
            try:
                await self._kv.create(name, value)
                return request_id, input_sha256
            except KeyWrongLastSequenceError:
                pass
            except Exception as e:
                raise _unavailable(e) from e
            try:
                entry = await self._kv.get(name)
            except KeyNotFoundError:
                continue  # expired between the two calls
            except Exception as e:
                raise _unavailable(e) from e
            stored = json.loads(entry.value)
            return stored["id"], stored["input_sha256"]
        raise StateUnavailableError("could not claim the idempotency key")
