"""The usage ledger: an append-only table of raw CloudEvents in a real database (SQLite file or PostgreSQL).

One row per event, keyed by its CloudEvents identity (source, id) under a UNIQUE constraint: `record` inserts with
`ON CONFLICT DO NOTHING`, so a redelivered event is stored once on both databases, and rows are independent of one
another, so the order events arrive in does not matter. The event's `data` is kept whole (JSON): charges are not
stored but computed by `attribution` at report time, so a rule change re-runs over the whole history.

    ledger = open_ledger("sqlite:///usage.db")     # or postgresql+psycopg://user@host/db; migrates to head
    ledger.record(cloudevent_as_dict)              # True if stored now, False if it was already there
    ledger.facts(tenant="acme", start=..., end=...)

The schema is owned by Alembic (`billing/migrations`); `open_ledger` upgrades it programmatically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.dialects import postgresql, sqlite

from turboflow.eventing.types import (
    CANCELLED,
    COMPLETED,
    FAILED,
    POD_READY,
    POD_STOPPED,
    STARTED,
    TENANT_EXTENSION,
)

from .errors import InvalidUsageEventError, LedgerUnavailableError

# Types the ledger stores: what requests used (terminal events, started) and what pods cost (pod.ready: the model
# load; pod.stopped: warm idle time), all as raw facts.
RECORDED_TYPES = (COMPLETED, FAILED, STARTED, CANCELLED, POD_READY, POD_STOPPED)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
LEDGER_URL_VARIABLE = "TURBOFLOW_LEDGER_URL"

metadata = sa.MetaData()
# Mirrors migrations/versions/0001_usage_facts.py (the migration creates it; this is for queries).
usage_facts = sa.Table(
    "usage_facts",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("source", sa.String(1024), nullable=False),
    sa.Column("event_id", sa.String(255), nullable=False),
    sa.Column("type", sa.String(255), nullable=False),
    sa.Column("tenant", sa.String(63)),
    sa.Column("model", sa.String(255)),
    sa.Column("occurred_at", sa.DateTime(), nullable=False),  # naive UTC on both databases
    sa.Column("recorded_at", sa.DateTime(), nullable=False),
    sa.Column("data", sa.JSON(), nullable=False),
    sa.UniqueConstraint("source", "event_id", name="uq_usage_facts_source_event_id"),
)


@dataclass(frozen=True)
class Fact:
    """One stored event: its identity, when it happened (UTC), and its data as received."""

    source: str
    event_id: str
    type: str
    tenant: str | None
    model: str | None
    occurred_at: datetime
    data: dict[str, Any]


def default_ledger_url() -> str:
    """`TURBOFLOW_LEDGER_URL`, else a SQLite file under ~/.cache/turboflow."""
    url = os.environ.get(LEDGER_URL_VARIABLE, "").strip()
    if url:
        return url
    return f"sqlite:///{Path('~/.cache/turboflow/ledger.db').expanduser()}"


def open_ledger(url: str | None = None) -> Ledger:
    """Connect to `url` (a SQLAlchemy URL) and migrate the schema to head; LedgerUnavailableError if either fails."""
    url = url or default_ledger_url()
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise LedgerUnavailableError(
            f"ledger URL {url!r} is not a database URL (sqlite:///PATH or postgresql+psycopg://USER@HOST/DB)"
        ) from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise LedgerUnavailableError(f"ledger URL {url!r}: only sqlite and postgresql are supported")
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = sa.create_engine(parsed)
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except (sa.exc.SQLAlchemyError, ImportError) as e:
        raise LedgerUnavailableError(f"cannot open the ledger at {parsed.render_as_string()}: {e}") from None
    return Ledger(engine)


class Ledger:
    def __init__(self, engine: sa.Engine):
        self.engine = engine

    def record(self, event: Mapping[str, Any]) -> bool:
        """Store one structured-mode CloudEvent (a dict); True if new, False if (source, id) was already stored."""
        row = fact_row(event)
        insert = (postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert)(usage_facts)
        statement = (
            insert.values(**row)
            .on_conflict_do_nothing(index_elements=["source", "event_id"])
            .returning(usage_facts.c.id)  # a row comes back only when one was inserted (rowcount is not portable)
        )
        with self.engine.begin() as connection:
            return connection.execute(statement).first() is not None

    def facts(
        self,
        *,
        tenant: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        types: tuple[str, ...] | None = None,
    ):
        """Stored facts with start <= occurred_at < end (naive UTC), of `types` if given, oldest first."""
        query = sa.select(usage_facts).order_by(usage_facts.c.occurred_at, usage_facts.c.id)
        if types is not None:
            query = query.where(usage_facts.c.type.in_(types))
        if tenant is not None:
            query = query.where(usage_facts.c.tenant == tenant)
        if start is not None:
            query = query.where(usage_facts.c.occurred_at >= start)
        if end is not None:
            query = query.where(usage_facts.c.occurred_at < end)
        with self.engine.connect() as connection:
            return [
                Fact(r.source, r.event_id, r.type, r.tenant, r.model, r.occurred_at, dict(r.data))
                for r in connection.execute(query)
            ]

    def count(self) -> int:
        with self.engine.connect() as connection:
            return connection.execute(sa.select(sa.func.count()).select_from(usage_facts)).scalar_one()

    def close(self) -> None:
        self.engine.dispose()


def fact_of(event: Mapping[str, Any]) -> Fact:
    """The Fact one CloudEvent would be stored as (without storing it): charges of a single event, live."""
    row = fact_row(event)
    return Fact(**{name: row[name] for name in Fact.__dataclass_fields__})


def fact_row(event: Mapping[str, Any]) -> dict[str, Any]:
    """The row for one CloudEvent; InvalidUsageEventError names what makes it unusable."""
    if not isinstance(event, Mapping):
        raise InvalidUsageEventError("a usage event must be a JSON object (a structured-mode CloudEvent)")
    for attribute in ("id", "source", "type"):
        if not isinstance(event.get(attribute), str) or not event[attribute].strip():
            raise InvalidUsageEventError(f"the CloudEvent has no {attribute!r} attribute", field=attribute)
    if event["type"] not in RECORDED_TYPES:
        raise InvalidUsageEventError(
            f"event type {event['type']!r} is not recorded; known: {', '.join(RECORDED_TYPES)}", field="type"
        )
    data = event.get("data")
    if not isinstance(data, dict):
        raise InvalidUsageEventError(f"event {event['id']!r}: data is not a JSON object", field="data")
    if event["type"] == COMPLETED:
        usage = data.get("usage")
        if not isinstance(usage, dict) or not _is_number(usage.get("gpu_seconds")):
            raise InvalidUsageEventError(f"completed event {event['id']!r} has no usage.gpu_seconds", field="usage")
    tenant = data.get("tenant") or event.get(TENANT_EXTENSION)
    occurred = (
        data.get("completed_at")
        or data.get("cancelled_at")
        or (data.get("ready_at") if event["type"] == POD_READY else None)
        or (data.get("stopped_at") if event["type"] == POD_STOPPED else None)
        or event.get("time")
    )
    return {
        "source": event["source"],
        "event_id": event["id"],
        "type": event["type"],
        "tenant": str(tenant) if tenant else None,
        "model": str(data["model"]) if data.get("model") else None,  # pod events: the model the pod serves
        "occurred_at": _utc(occurred, event["id"]) if occurred else _utc_now(),
        "recorded_at": _utc_now(),
        "data": data,
    }


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _utc(text: Any, event_id: str) -> datetime:
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError:
        raise InvalidUsageEventError(f"event {event_id!r}: time {text!r} is not RFC 3339", field="time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(tzinfo=None)


def _utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)
