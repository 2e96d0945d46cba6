"""S3Store: the OutputStore and ImageSource of storage/stores.py on any S3 API (AWS, MinIO, Ceph, moto).

Keys follow storage/keys.py under TURBOFLOW_OUTPUT_PREFIX in TURBOFLOW_BUCKET; `uri()` is `s3://bucket/key` and
`presign()` a SigV4 presigned GET URL (host S3_PUBLIC_ENDPOINT_URL when set) valid TURBOFLOW_URL_EXPIRY_SECONDS.
Videos above the multipart threshold are uploaded in parts; an upload replaces the object whole.

I2V images are confined to the requesting tenant: `s3://<bucket in TURBOFLOW_INPUT_BUCKETS>/
{TURBOFLOW_IMAGE_PREFIX}/{tenant}/...` (prefix default "uploads"), or a prefix listed in
TURBOFLOW_SHARED_IMAGE_PREFIXES (comma list of `bucket/prefix/`). Anything else is refused before S3 is asked, with
one code (`image_not_allowed`) whether or not the object exists.

Configuration: `S3Config.from_settings` takes the S3 fields of turboflow/settings.py's `Settings` (every variable,
its default and its check are in that table; docs/functions.md lists them). Credentials come from boto3's chain.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from turboflow.errors import InvalidRequestError, TurboflowError
from turboflow.settings import Settings
from turboflow.storage import keys
from turboflow.storage.stores import StorageConfigError, StorageUnavailableError

log = logging.getLogger(__name__)

VIDEO_CONTENT_TYPE = "video/mp4"


@dataclass(frozen=True)
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

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Config:
        """The S3 part of the process's settings (turboflow/settings.py has checked every value)."""
        if not settings.bucket:
            raise StorageConfigError("TURBOFLOW_BUCKET is not set: the function has nowhere to publish videos")
        return cls(
            bucket=settings.bucket,
            endpoint_url=settings.s3_endpoint_url,
            public_endpoint_url=settings.s3_public_endpoint_url,
            region=settings.aws_region or settings.aws_default_region,
            output_prefix=settings.output_prefix,
            input_buckets=settings.input_buckets or (settings.bucket,),
            image_prefix=settings.image_prefix,
            shared_image_prefixes=settings.shared_image_prefixes,
            url_expiry_seconds=settings.url_expiry_seconds,
            multipart_threshold=settings.multipart_threshold_bytes,
            multipart_chunksize=settings.multipart_chunk_bytes,
            max_image_bytes=settings.max_image_bytes,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> S3Config:
        """`from_settings(Settings.from_env(env))`: for tests and tools that hold a plain mapping."""
        return cls.from_settings(Settings.from_env(env))


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
        @functools.wraps(fn)  # keeps the signature: the store Protocols are checked against it
        def inner(*a, **kw):
            try:
                return fn(*a, **kw)
            except _boto_errors() as e:
                raise _transient(e, what) from e

        return inner

    return wrap


class S3Store:
    """Output keys, idempotent publishing, presigned URLs and allow-listed image reads for one bucket
    (implements OutputStore and ImageSource of storage/stores.py)."""

    def __init__(self, cfg: S3Config, client=None, presign_client=None):
        self.cfg = cfg
        self.client = client or _client(cfg, cfg.endpoint_url)
        if presign_client is None and cfg.public_endpoint_url and cfg.public_endpoint_url != cfg.endpoint_url:
            presign_client = _client(cfg, cfg.public_endpoint_url)
        self.presign_client = presign_client or self.client

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        return cls(S3Config.from_settings(settings))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> S3Store:
        return cls(S3Config.from_env(env))

    # ---- keys -------------------------------------------------------------------------------------------
    def video_key(self, tenant: str, request_id: str, when: datetime | None, output_prefix: str | None = None) -> str:
        return keys.video_key(self.cfg.output_prefix, tenant, request_id, when, output_prefix)

    def uri(self, key: str) -> str:
        return f"s3://{self.cfg.bucket}/{key}"

    # ---- idempotency --------------------------------------------------------------------------------------
    @_storage_errors("reading the completion sidecar")
    def find_completion(self, video_key: str) -> dict | None:
        try:
            body = self.client.get_object(Bucket=self.cfg.bucket, Key=keys.sidecar_key(video_key))["Body"].read()
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
            Key=keys.sidecar_key(video_key),
            Body=json.dumps(data, sort_keys=True).encode(),
            ContentType="application/json",
        )

    # ---- publishing ---------------------------------------------------------------------------------------
    @_storage_errors("uploading the video")
    def put_video(self, path: str | os.PathLike, video_key: str, metadata: Mapping[str, object]) -> dict:
        """Upload (multipart above the threshold) with content-type video/mp4 and the metadata as ASCII
        user metadata (`x-amz-meta-*`)."""
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
        """(SigV4 presigned GET URL, its expiry): signing is local, S3 is not asked."""
        now = now or datetime.now(UTC)
        url = self.presign_client.generate_presigned_url(
            "get_object", Params={"Bucket": self.cfg.bucket, "Key": video_key}, ExpiresIn=self.cfg.url_expiry_seconds
        )
        return url, keys.expires_at(now, self.cfg.url_expiry_seconds)

    def refresh_url(self, data: dict, now: datetime | None = None) -> dict:
        now = now or datetime.now(UTC)
        video = data.get("video", {})
        if not keys.url_needs_refresh(video, now, self.cfg.url_expiry_seconds):
            return data
        url, expires_at = self.presign(video["key"], now)
        return {**data, "video": {**video, "url": url, "url_expires_at": expires_at}}

    # ---- I2V images ---------------------------------------------------------------------------------------
    def _image_refusal(self, bucket: str, key: str, tenant: str) -> str | None:
        """None when `tenant` may read s3://bucket/key, else the code of the refusal (decided without S3)."""
        if not keys.full(keys.TENANT_RE, tenant):
            return "image_not_allowed"
        if any(bucket == b and key.startswith(p) for b, p in self.cfg.shared_image_prefixes):
            return None
        if bucket not in self.cfg.input_buckets:
            return "image_bucket_not_allowed"
        if not keys.tenant_may_read(key, tenant, self.cfg.image_prefix, ()):
            return "image_not_allowed"
        return None

    def read_image(self, bucket: str | None, key: str, tenant: str) -> bytes:
        if bucket is None:
            raise InvalidRequestError(
                "this deployment reads images from s3://bucket/key URIs, not local files",
                code="invalid_image_reference",
                field="image",
            )
        if not keys.is_plain_key(key):
            raise InvalidRequestError(
                "image key is not a plain object key (empty, '.' or '..' segments)",
                code="invalid_image_reference",
                field="image",
            )
        refusal = self._image_refusal(bucket, key, tenant)
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


def _ascii(v: object) -> str:
    s = str(v)
    return s.encode("ascii", "backslashreplace").decode("ascii")[:256]
