"""API keys: each bound to one tenant, stored hashed (table `api_keys` in TURBOFLOW_GATEWAY_DATABASE_URL).

A key reads `tf_<key_id>_<secret>`: `key_id` (16 hex digits) finds the row, the secret is checked against the
stored sha256 with a constant-time comparison. The secret is shown once, when the key is created; the table never
holds it. A revoked key stays in the table (`revoked_at`) so `list` keeps its history and it can never be reused.

    store = KeyStore.open("sqlite:///gateway.db")
    key, token = store.create("acme", label="ci")   # token = "tf_<key_id>_<secret>", print it once
    store.verify(token)                              # -> ApiKey (tenant "acme") or None
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from turboflow.errors import ConfigError, InvalidRequestError
from turboflow.storage.keys import TENANT_RE

DEFAULT_DATABASE_URL = "sqlite:///~/.cache/turboflow/gateway.db"
KEY_PREFIX = "tf"
KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
TOKEN_RE = re.compile(r"tf_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
MAX_LABEL_CHARS = 200

metadata = sa.MetaData()
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(16), primary_key=True),
    sa.Column("tenant", sa.String(63), nullable=False, index=True),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("label", sa.String(MAX_LABEL_CHARS), nullable=False, default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
)


@dataclass(frozen=True)
class ApiKey:
    """A key's public facts (never its secret)."""

    key_id: str
    tenant: str
    label: str
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_dict(self) -> dict:
        return {
            "key_id": self.key_id,
            "tenant": self.tenant,
            "label": self.label,
            "created_at": _iso(self.created_at),
            "revoked_at": _iso(self.revoked_at) if self.revoked_at else None,
        }


def secret_hash(secret: str) -> str:
    """sha256 of the secret, hex. Secrets are 256 random bits, so a plain hash is enough (no password stretching)."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def parse_token(token: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed `tf_<key_id>_<secret>`, else None."""
    match = TOKEN_RE.fullmatch(token) if isinstance(token, str) else None
    return (match.group(1), match.group(2)) if match else None


def expand_database_url(url: str) -> str:
    """`sqlite:///~/x.db` with the home directory expanded and the parent directory created."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise ConfigError(
            f"gateway database URL {url!r} is not a database URL (sqlite:///PATH or postgresql+psycopg://...)",
            field="TURBOFLOW_GATEWAY_DATABASE_URL",
        ) from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        parsed = parsed.set(database=str(path))
    return parsed.render_as_string(hide_password=False)


class KeyStore:
    """Create, list, revoke and verify API keys in one SQL database (SQLite or PostgreSQL)."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine

    @classmethod
    def open(cls, url: str | None = None) -> KeyStore:
        """Connect and create the table when missing; a bad URL or an unreachable database is a ConfigError."""
        url = expand_database_url(url or DEFAULT_DATABASE_URL)
        try:
            kwargs = {}
            parsed = sa.engine.make_url(url)
            if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
                kwargs["poolclass"] = sa.pool.StaticPool  # one shared in-memory database, not one per connection
                kwargs["connect_args"] = {"check_same_thread": False}
            engine = sa.create_engine(url, **kwargs)
            metadata.create_all(engine)
        except (sa.exc.SQLAlchemyError, ImportError) as e:
            raise ConfigError(
                f"cannot open the gateway database: {type(e).__name__}: {str(e)[:200]}",
                field="TURBOFLOW_GATEWAY_DATABASE_URL",
            ) from None
        return cls(engine)

    def create(self, tenant: str, label: str = "") -> tuple[ApiKey, str]:
        """A new key for `tenant`: (its facts, the token `tf_<key_id>_<secret>` to hand out once)."""
        if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
            raise InvalidRequestError(
                f"tenant {str(tenant)[:80]!r} must be a DNS label (lowercase letters, digits, '-')",
                code="invalid_tenant",
                field="tenant",
            )
        if len(label) > MAX_LABEL_CHARS or not label.isprintable():
            raise InvalidRequestError(
                f"label must be at most {MAX_LABEL_CHARS} printable characters", code="invalid_label", field="label"
            )
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        key = ApiKey(key_id=key_id, tenant=tenant, label=label, created_at=datetime.now(UTC))
        with self.engine.begin() as conn:
            conn.execute(
                api_keys.insert().values(
                    key_id=key_id,
                    tenant=tenant,
                    secret_hash=secret_hash(secret),
                    label=label,
                    created_at=key.created_at,
                )
            )
        return key, f"{KEY_PREFIX}_{key_id}_{secret}"

    def list(self, tenant: str | None = None, *, include_revoked: bool = True) -> list[ApiKey]:
        """Keys (newest first), of one tenant when given."""
        query = sa.select(api_keys).order_by(api_keys.c.created_at.desc())
        if tenant is not None:
            query = query.where(api_keys.c.tenant == tenant)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [_key(row) for row in conn.execute(query)]

    def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke `key_id` (a `tf_...` token works too); the key, or None when there is no such key. Revoking
        twice keeps the first time."""
        parsed = parse_token(key_id)
        key_id = parsed[0] if parsed else key_id
        if not isinstance(key_id, str) or not KEY_ID_RE.fullmatch(key_id):
            return None
        with self.engine.begin() as conn:
            conn.execute(
                api_keys.update()
                .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)).first()
        return _key(row) if row else None

    def verify(self, token: str) -> ApiKey | None:
        """The active key `token` names, or None (malformed, unknown, wrong secret, revoked)."""
        parsed = parse_token(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)).first()
        expected = row.secret_hash if row is not None else "0" * 64
        matches = hmac.compare_digest(secret_hash(secret), expected)  # compared even when unknown: same timing
        if row is None or not matches or row.revoked_at is not None:
            return None
        return _key(row)

    def close(self) -> None:
        self.engine.dispose()


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; they were stored as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _key(row) -> ApiKey:
    return ApiKey(
        key_id=row.key_id,
        tenant=row.tenant,
        label=row.label or "",
        created_at=_utc(row.created_at),
        revoked_at=_utc(row.revoked_at),
    )


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
