"""Publishing videos to S3 (any S3 API: AWS, MinIO, Ceph, moto) and reading I2V images from allowed buckets.

Layout (one request -> one video, one sidecar):

    {TURBOFLOW_OUTPUT_PREFIX}/{tenant}[/{output_prefix}]/{yyyy}/{mm}/{dd}/{request-id}.mp4   the video
    ... /{request-id}.json                                                                     completion data

The date is the request event's `time`; a request without `time` has no date folders
(`{prefix}/{tenant}[/{output_prefix}]/{request-id}.mp4`): the key comes from the request alone, so a redelivery maps
to the same key whenever it arrives. The sidecar is written last; its presence means "done": a redelivery reads it
back and replays the completion without generating again. Every key component is fully matched against a strict
character set, so keys never leave the tenant's prefix.

I2V images are confined to the requesting tenant: `s3://<bucket in TURBOFLOW_INPUT_BUCKETS>/
{TURBOFLOW_IMAGE_PREFIX}/{tenant}/...` (prefix default "uploads"), or a prefix listed in
TURBOFLOW_SHARED_IMAGE_PREFIXES (comma list of `bucket/prefix/`). Anything else is refused before S3 is asked, with
one code (`image_not_allowed`) whether or not the object exists.

Environment: S3_ENDPOINT_URL (unset: AWS), S3_PUBLIC_ENDPOINT_URL (host used in presigned URLs, default the
endpoint), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_REGION (standard boto3 chain),
TURBOFLOW_BUCKET (required), TURBOFLOW_OUTPUT_PREFIX (default "videos"), TURBOFLOW_INPUT_BUCKETS (comma list of
buckets I2V images may come from; default the output bucket), TURBOFLOW_IMAGE_PREFIX (default "uploads"),
TURBOFLOW_SHARED_IMAGE_PREFIXES (default none), TURBOFLOW_URL_EXPIRY_SECONDS (default 86400, at most
7 days), TURBOFLOW_MULTIPART_THRESHOLD_BYTES (default 64 MiB), TURBOFLOW_MAX_IMAGE_BYTES (default 20 MiB).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from turboflow.errors import InvalidRequestError, TurboflowError

log = logging.getLogger(__name__)

# used with fullmatch only: `$` with re.match would accept a trailing newline
TENANT_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SEGMENT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
SHARED_PREFIX_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,254}")
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4 limit
VIDEO_CONTENT_TYPE = "video/mp4"


class StorageUnavailableError(TurboflowError):
    """S3 cannot be reached or answers 5xx/throttles. Transient: the function answers 5xx so the broker retries."""

    code = "storage_unavailable"
    retryable = True


class StorageConfigError(TurboflowError):
    """The deployment's storage settings are wrong (no bucket, access denied, bucket missing). Retryable: fixing
    the configuration makes the same request succeed."""

    code = "storage_misconfigured"
    retryable = True


class InvalidKeyError(InvalidRequestError):
    code = "invalid_key"


def _full(pattern: re.Pattern, value: object) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def _key_prefix(name: str, value: str) -> str:
    """A validated key prefix of 1-4 segments [a-z0-9][a-z0-9_-]* (no slashes at either end)."""
    prefix = value.strip().strip("/")
    for seg in prefix.split("/"):
        if not _full(SEGMENT_RE, seg):
            raise StorageConfigError(f"{name} {prefix!r}: segment {seg!r} is not [a-z0-9][a-z0-9_-]*")
    return prefix


def _shared_prefixes(value: str) -> tuple[tuple[str, str], ...]:
    """TURBOFLOW_SHARED_IMAGE_PREFIXES: comma list of `bucket/prefix/` -> ((bucket, "prefix/"), ...)."""
    out = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        bucket, _, prefix = item.partition("/")
        segs = prefix.strip("/").split("/")
        if (
            not _full(BUCKET_RE, bucket)
            or not prefix.strip("/")
            or not all(_full(SHARED_PREFIX_SEGMENT_RE, seg) for seg in segs)
        ):
            raise StorageConfigError(
                f"TURBOFLOW_SHARED_IMAGE_PREFIXES entry {item!r} is not bucket/prefix/ "
                "(a whole prefix; no '.', '..' or empty segments)"
            )
        out.append((bucket, "/".join(segs) + "/"))
    return tuple(out)


@dataclass
class S3Config:
    bucket: str
    endpoint_url: str | None = None
    public_endpoint_url: str | None = None
    region: str | None = None
    output_prefix: str = "videos"
    input_buckets: tuple[str, ...] = ()
    image_prefix: str = "uploads"  # tenant T may read images under s3://<input bucket>/<image_prefix>/T/
    shared_image_prefixes: tuple[tuple[str, str], ...] = ()  # (bucket, "prefix/") every tenant may read
    url_expiry_seconds: int = 86400
    multipart_threshold: int = 64 << 20
    multipart_chunksize: int = 16 << 20
    max_image_bytes: int = 20 << 20
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Config:
        env = os.environ if env is None else env
        bucket = (env.get("TURBOFLOW_BUCKET") or "").strip()
        if not bucket:
            raise StorageConfigError("TURBOFLOW_BUCKET is not set: the function has nowhere to publish videos")
        if not _full(BUCKET_RE, bucket):
            raise StorageConfigError(f"TURBOFLOW_BUCKET {bucket!r} is not a valid bucket name")
        prefix = _key_prefix("TURBOFLOW_OUTPUT_PREFIX", env.get("TURBOFLOW_OUTPUT_PREFIX") or "videos")
        image_prefix = _key_prefix("TURBOFLOW_IMAGE_PREFIX", env.get("TURBOFLOW_IMAGE_PREFIX") or "uploads")
        shared = _shared_prefixes(env.get("TURBOFLOW_SHARED_IMAGE_PREFIXES") or "")
        inputs = tuple(b.strip() for b in (env.get("TURBOFLOW_INPUT_BUCKETS") or "").split(",") if b.strip())
        for name in inputs:
            if not _full(BUCKET_RE, name):
                raise StorageConfigError(f"TURBOFLOW_INPUT_BUCKETS: {name!r} is not a valid bucket name")
        expiry = int(env.get("TURBOFLOW_URL_EXPIRY_SECONDS") or 86400)
        if not 1 <= expiry <= MAX_PRESIGN_SECONDS:
            raise StorageConfigError(f"TURBOFLOW_URL_EXPIRY_SECONDS must be 1..{MAX_PRESIGN_SECONDS}, got {expiry}")
        return cls(
            bucket=bucket,
            endpoint_url=env.get("S3_ENDPOINT_URL") or None,
            public_endpoint_url=env.get("S3_PUBLIC_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            output_prefix=prefix,
            input_buckets=inputs or (bucket,),
            image_prefix=image_prefix,
            shared_image_prefixes=shared,
            url_expiry_seconds=expiry,
            multipart_threshold=int(env.get("TURBOFLOW_MULTIPART_THRESHOLD_BYTES") or 64 << 20),
            multipart_chunksize=int(env.get("TURBOFLOW_MULTIPART_CHUNK_BYTES") or 16 << 20),
            max_image_bytes=int(env.get("TURBOFLOW_MAX_IMAGE_BYTES") or 20 << 20),
        )


def _client(cfg: S3Config, endpoint_url: str | None):
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=cfg.region or "us-east-1", config=config
    )


def _client_error_of(e: BaseException):
    """The botocore ClientError behind `e` (itself, or what a boto3 transfer error wraps), else None."""
    from botocore.exceptions import ClientError

    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, ClientError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _transient(e: BaseException, what: str) -> TurboflowError:
    """Map a boto/botocore/boto3-transfer exception to a typed error (unavailable vs misconfigured).

    Messages are in user terms (what failed and S3's error code): endpoints, URLs and temp paths go to the debug
    log only, since these messages reach 503 bodies and, through the dead-letter sink, `failed` events."""
    log.debug("%s: %s: %s", what, type(e).__name__, e)
    client_error = _client_error_of(e)
    if client_error is not None:
        err = client_error.response.get("Error", {})
        status = int(client_error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(err.get("Code", ""))
        if code in ("AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "404"):
            return StorageConfigError(f"{what}: the object store refused it ({code}); check the storage settings")
        if status >= 500 or code in (
            "SlowDown",
            "ServiceUnavailable",
            "InternalError",
            "RequestTimeout",
            "Throttling",
            "ThrottlingException",
            "503",
        ):
            return StorageUnavailableError(f"{what}: the object store is unavailable or throttling ({code or status})")
        return StorageConfigError(f"{what}: the object store answered {status} {code}")
    return StorageUnavailableError(f"{what}: the object store is unreachable or the transfer failed")


def _is_not_found(e: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(e, ClientError):
        return False
    code = str(e.response.get("Error", {}).get("Code", ""))
    return code in ("NoSuchKey", "404", "NotFound")


def _boto_errors() -> tuple[type[BaseException], ...]:
    """Every exception family boto3 raises for a failed S3 call or transfer (S3UploadFailedError from upload_file,
    s3transfer's errors, botocore's)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import RetriesExceededError, S3UploadFailedError, TransferNotDoneError

    return (BotoCoreError, ClientError, Boto3Error, RetriesExceededError, S3UploadFailedError, TransferNotDoneError)


def _storage_errors(what: str):
    """Decorator turning botocore exceptions into typed storage errors."""

    def wrap(fn):
        def inner(*a, **kw):
            try:
                return fn(*a, **kw)
            except _boto_errors() as e:
                raise _transient(e, what) from e

        inner.__name__, inner.__doc__ = fn.__name__, fn.__doc__
        return inner

    return wrap


class S3Store:
    """Output keys, idempotent publishing, presigned URLs and allow-listed image reads for one bucket."""

    def __init__(self, cfg: S3Config, client=None, presign_client=None):
        self.cfg = cfg
        self.client = client or _client(cfg, cfg.endpoint_url)
        if presign_client is None and cfg.public_endpoint_url and cfg.public_endpoint_url != cfg.endpoint_url:
            presign_client = _client(cfg, cfg.public_endpoint_url)
        self.presign_client = presign_client or self.client

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Store:
        return cls(S3Config.from_env(env))

    # ---- keys -------------------------------------------------------------------------------------------
    def tenant_prefix(self, tenant: str) -> str:
        if not _full(TENANT_RE, tenant):
            raise InvalidKeyError(
                f"tenant {str(tenant)[:80]!r} is not a DNS label", code="invalid_tenant", field="tenant"
            )
        return f"{self.cfg.output_prefix}/{tenant}/"

    def video_key(self, tenant: str, request_id: str, when: datetime | None, output_prefix: str | None = None) -> str:
        """`{prefix}/{tenant}[/{output_prefix}]/{yyyy}/{mm}/{dd}/{request-id}.mp4` for a request with a `time`,
        `{prefix}/{tenant}[/{output_prefix}]/{request-id}.mp4` without one; every part fully validated."""
        base = self.tenant_prefix(tenant)
        if not _full(REQUEST_ID_RE, request_id) or ".." in request_id:
            raise InvalidKeyError(
                f"request id {str(request_id)[:140]!r} is not [A-Za-z0-9._-]{{1,128}}", code="invalid_request_id"
            )
        parts = []
        if output_prefix:
            segs = output_prefix.split("/")
            if len(segs) > 4 or not all(_full(SEGMENT_RE, s) for s in segs):
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
        key = base + "/".join(parts)
        assert key.startswith(base) and "/../" not in key and "//" not in key  # by construction
        return key

    @staticmethod
    def sidecar_key(video_key: str) -> str:
        return video_key[: -len(".mp4")] + ".json" if video_key.endswith(".mp4") else video_key + ".json"

    def uri(self, key: str) -> str:
        return f"s3://{self.cfg.bucket}/{key}"

    # ---- idempotency --------------------------------------------------------------------------------------
    @_storage_errors("reading the completion sidecar")
    def find_completion(self, video_key: str) -> dict | None:
        """The stored completion data for this key, when the video and its sidecar both exist; else None."""
        try:
            body = self.client.get_object(Bucket=self.cfg.bucket, Key=self.sidecar_key(video_key))["Body"].read()
        except Exception as e:
            if _is_not_found(e):
                return None
            raise
        try:
            data = json.loads(body)
        except ValueError:
            log.warning("sidecar for %s is not JSON; generating again", video_key)
            return None
        try:
            head = self.client.head_object(Bucket=self.cfg.bucket, Key=video_key)
        except Exception as e:
            if _is_not_found(e):
                log.warning("sidecar for %s exists but the video is gone; generating again", video_key)
                return None
            raise
        if int(head.get("ContentLength", -1)) != int(data.get("video", {}).get("bytes", -2)):
            log.warning("video %s does not match its sidecar; generating again", video_key)
            return None
        return data

    @_storage_errors("writing the completion sidecar")
    def put_completion(self, video_key: str, data: dict) -> None:
        self.client.put_object(
            Bucket=self.cfg.bucket,
            Key=self.sidecar_key(video_key),
            Body=json.dumps(data, sort_keys=True).encode(),
            ContentType="application/json",
        )

    # ---- publishing ---------------------------------------------------------------------------------------
    @_storage_errors("uploading the video")
    def put_video(self, path: str | os.PathLike, video_key: str, metadata: Mapping[str, object]) -> dict:
        """Upload (multipart above the threshold) with content-type video/mp4 and ASCII metadata."""
        from boto3.s3.transfer import TransferConfig

        meta = {str(k).lower(): _ascii(v) for k, v in metadata.items() if v is not None}
        transfer = TransferConfig(
            multipart_threshold=self.cfg.multipart_threshold,
            multipart_chunksize=max(self.cfg.multipart_chunksize, 5 << 20),
            use_threads=True,
            max_concurrency=4,
        )
        self.client.upload_file(
            str(path),
            self.cfg.bucket,
            video_key,
            Config=transfer,
            ExtraArgs={"ContentType": VIDEO_CONTENT_TYPE, "Metadata": meta},
        )
        head = self.client.head_object(Bucket=self.cfg.bucket, Key=video_key)
        return {
            "bucket": self.cfg.bucket,
            "key": video_key,
            "bytes": int(head["ContentLength"]),
            "etag": head.get("ETag", "").strip('"'),
        }

    @_storage_errors("signing the video URL")
    def presign(self, video_key: str, now: datetime | None = None) -> tuple[str, str]:
        """(presigned GET URL, its expiry as RFC 3339)."""
        now = now or datetime.now(UTC)
        url = self.presign_client.generate_presigned_url(
            "get_object", Params={"Bucket": self.cfg.bucket, "Key": video_key}, ExpiresIn=self.cfg.url_expiry_seconds
        )
        expires = (now + timedelta(seconds=self.cfg.url_expiry_seconds)).replace(microsecond=0)
        return url, expires.isoformat().replace("+00:00", "Z")

    def refresh_url(self, data: dict, now: datetime | None = None) -> dict:
        """Return `data` unchanged while its URL has more than half its lifetime left, else re-signed."""
        now = now or datetime.now(UTC)
        video = data.get("video", {})
        try:
            expires = datetime.fromisoformat(str(video["url_expires_at"]).replace("Z", "+00:00"))
        except (KeyError, ValueError):
            expires = now
        if (expires - now).total_seconds() > self.cfg.url_expiry_seconds / 2:
            return data
        url, expires_at = self.presign(video["key"], now)
        return {**data, "video": {**video, "url": url, "url_expires_at": expires_at}}

    # ---- I2V images ---------------------------------------------------------------------------------------
    def image_allowed(self, bucket: str, key: str, tenant: str) -> str | None:
        """None when `tenant` may read s3://bucket/key, else the code of the refusal (decided without S3)."""
        if not _full(TENANT_RE, tenant):
            return "image_not_allowed"
        if any(bucket == b and key.startswith(p) for b, p in self.cfg.shared_image_prefixes):
            return None
        if bucket not in self.cfg.input_buckets:
            return "image_bucket_not_allowed"
        if not key.startswith(f"{self.cfg.image_prefix}/{tenant}/"):
            return "image_not_allowed"
        return None

    def read_image(self, bucket: str, key: str, tenant: str) -> bytes:
        """Bytes of s3://bucket/key if `tenant` may read it (its own upload prefix in an input bucket, or a shared
        prefix) and the object is under the size cap. Refusals never touch S3, so they reveal nothing about other
        tenants' objects; `image_not_found` / `invalid_image` only ever concern the tenant's own keys."""
        if any(seg in ("", ".", "..") for seg in key.split("/")) or len(key) > 1024:
            raise InvalidRequestError(
                "image key is not a plain object key (empty, '.' or '..' segments)",
                code="invalid_image_reference",
                field="image",
            )
        refusal = self.image_allowed(bucket, key, tenant)
        if refusal == "image_bucket_not_allowed":
            raise InvalidRequestError(
                f"images may only be read from {', '.join(self.cfg.input_buckets)}; {bucket!r} is not allowed",
                code=refusal,
                field="image",
            )
        if refusal is not None:
            raise InvalidRequestError(
                f"image must be under s3://<input bucket>/{self.cfg.image_prefix}/{tenant}/ (this tenant's uploads)"
                " or a shared prefix",
                code=refusal,
                field="image",
            )
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
            size = int(head["ContentLength"])
            if size > self.cfg.max_image_bytes:
                raise InvalidRequestError(
                    f"image s3://{bucket}/{key} has {size} bytes; the cap is {self.cfg.max_image_bytes}",
                    code="image_too_large",
                    field="image",
                )
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read(self.cfg.max_image_bytes + 1)
        except _boto_errors() as e:
            if _is_not_found(e):
                raise InvalidRequestError(
                    f"image s3://{bucket}/{key} does not exist", code="image_not_found", field="image"
                ) from e
            raise _transient(e, "reading the image") from e

    # ---- listing (tests, ops) -------------------------------------------------------------------------------
    @_storage_errors("listing objects")
    def list_keys(self, prefix: str = "") -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.cfg.bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return keys

    @_storage_errors("checking the bucket")
    def check(self) -> None:
        """Raise unless the output bucket is reachable (readiness diagnostics)."""
        self.client.head_bucket(Bucket=self.cfg.bucket)


def _ascii(v: object) -> str:
    s = str(v)
    return s.encode("ascii", "backslashreplace").decode("ascii")[:256]
