"""The key layout and the image confinement rule every output store shares (pure functions, no I/O).

One request -> one video and one completion sidecar:

    {store prefix}/{tenant}[/{output_prefix}]/{yyyy}/{mm}/{dd}/{request-id}.mp4   the video
    ... /{request-id}.json                                                          completion data, written last

The date is the request event's `time` (in UTC); a request without `time` has no date folders, so the key comes
from the request alone and a redelivery maps to the same key whenever it arrives. Every component is fully matched
(`re.fullmatch`: `$` with `re.match` would accept a trailing newline) against a strict character set, so a key
never leaves the tenant's prefix, in a bucket or under a directory.

I2V images: tenant T may read `{image_prefix}/T/...` or anything under a shared prefix; the rule is decided on the
key alone, before any store is asked, so a refusal reveals nothing about other tenants' objects.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from turboflow.storage.stores import InvalidKeyError, StorageConfigError

TENANT_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SEGMENT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
SHARED_PREFIX_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,254}")
MAX_KEY_CHARS = 1024  # S3's key limit, kept for every store so a key is portable between them
MAX_OUTPUT_PREFIX_SEGMENTS = 4


def full(pattern: re.Pattern, value: object) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def key_prefix(setting: str, value: str) -> str:
    """A configured key prefix of segments [a-z0-9][a-z0-9_-]*, without slashes at either end; a bad one is a
    StorageConfigError naming `setting`."""
    prefix = value.strip().strip("/")
    for seg in prefix.split("/"):
        if not full(SEGMENT_RE, seg):
            raise StorageConfigError(f"{setting} {prefix!r}: segment {seg!r} is not [a-z0-9][a-z0-9_-]*")
    return prefix


def shared_prefix(setting: str, value: str) -> str:
    """One shared image prefix `a/b/` (whole segments, no '.', '..' or empty ones), normalised to end in '/'."""
    segs = value.strip("/").split("/")
    if not value.strip("/") or not all(full(SHARED_PREFIX_SEGMENT_RE, seg) for seg in segs):
        raise StorageConfigError(f"{setting} entry {value!r} is not a whole prefix (no '.', '..' or empty segments)")
    return "/".join(segs) + "/"


def tenant_prefix(store_prefix: str, tenant: str) -> str:
    """`{store_prefix}/{tenant}/`, the tenant being a DNS label (InvalidKeyError `invalid_tenant` otherwise)."""
    if not full(TENANT_RE, tenant):
        raise InvalidKeyError(f"tenant {str(tenant)[:80]!r} is not a DNS label", code="invalid_tenant", field="tenant")
    return f"{store_prefix}/{tenant}/"


def video_key(
    store_prefix: str, tenant: str, request_id: str, when: datetime | None, output_prefix: str | None = None
) -> str:
    """`{store_prefix}/{tenant}[/{output_prefix}]/{yyyy}/{mm}/{dd}/{request-id}.mp4` for a request with a `time`
    (the date of that instant in UTC), without the date folders for one without; every part fully validated."""
    base = tenant_prefix(store_prefix, tenant)
    if not full(REQUEST_ID_RE, request_id) or ".." in request_id:
        raise InvalidKeyError(
            f"request id {str(request_id)[:140]!r} is not [A-Za-z0-9._-]{{1,128}}", code="invalid_request_id"
        )
    parts = []
    if output_prefix:
        segs = output_prefix.split("/")
        if len(segs) > MAX_OUTPUT_PREFIX_SEGMENTS or not all(full(SEGMENT_RE, s) for s in segs):
            raise InvalidKeyError(
                f"output_prefix {output_prefix[:200]!r} must be 1-4 segments [a-z0-9][a-z0-9_-]*",
                code="invalid_output_prefix",
                field="output_prefix",
            )
        parts.extend(segs)
    if when is not None:
        when = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
        parts += [f"{when.year:04d}", f"{when.month:02d}", f"{when.day:02d}"]
    parts.append(f"{request_id}.mp4")
    return base + "/".join(parts)


def sidecar_key(video_key: str) -> str:
    """The completion sidecar next to a video: `.../{request-id}.json`."""
    return video_key[: -len(".mp4")] + ".json" if video_key.endswith(".mp4") else video_key + ".json"


def is_plain_key(key: object) -> bool:
    """A relative key of non-empty segments, none '.' or '..', no NUL or backslash, at most 1024 characters:
    one that names the same object in a bucket and a file under a directory."""
    return (
        isinstance(key, str)
        and 0 < len(key) <= MAX_KEY_CHARS
        and "\0" not in key
        and "\\" not in key
        and not any(seg in ("", ".", "..") for seg in key.split("/"))
    )


def tenant_may_read(key: str, tenant: str, image_prefix: str, shared_prefixes: tuple[str, ...]) -> bool:
    """Whether `tenant` may read the image at `key`: its own `{image_prefix}/{tenant}/...` or a shared prefix.
    `key` must already be plain (is_plain_key), so a prefix match is a whole-segment match."""
    if not full(TENANT_RE, tenant):
        return False
    return key.startswith(f"{image_prefix}/{tenant}/") or any(key.startswith(p) for p in shared_prefixes)


def expires_at(now: datetime, lifetime_seconds: int) -> str:
    """RFC 3339 (UTC, whole seconds) of `now + lifetime_seconds`."""
    expires = (now + timedelta(seconds=lifetime_seconds)).replace(microsecond=0)
    return expires.isoformat().replace("+00:00", "Z")


def url_needs_refresh(video: dict, now: datetime, lifetime_seconds: int) -> bool:
    """True once a completion's URL has at most half of its lifetime left (or no readable expiry):
    `expires - now <= lifetime / 2`. A replay then hands out a URL that stays usable for a while."""
    try:
        expires = datetime.fromisoformat(str(video["url_expires_at"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return True
    return (expires - now).total_seconds() <= lifetime_seconds / 2
