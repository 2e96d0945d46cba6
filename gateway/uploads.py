"""I2V images uploaded with a request (multipart `image` part) -> the input bucket, where the I2V function may read
them for the uploading tenant.

Key: `{TURBOFLOW_IMAGE_PREFIX}/{tenant}/gateway/{sha256 of the bytes}.{ext}`. Content-addressed on purpose: the
request's `image` (an s3:// URI) then names the bytes, so the canonical input hash the function computes tells two
different uploads apart, and an Idempotency-Key retry of the same upload has the same input (a key derived from a
fresh request id would differ on every retry). The object carries metadata `turboflow-request: <id>`, so the S3
source does not start a request of its own for it. The type is read from the bytes (magic numbers), never from the
client's Content-Type.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

from turboflow.settings import Settings

from .problems import ApiProblem

REQUEST_METADATA = "turboflow-request"  # eventing/client.py REQUEST_METADATA: the S3 source skips these objects
# magic number -> (media type, extension)
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", ("image/png", "png")),
    (b"\xff\xd8\xff", ("image/jpeg", "jpg")),
    (b"GIF87a", ("image/gif", "gif")),
    (b"GIF89a", ("image/gif", "gif")),
    (b"BM", ("image/bmp", "bmp")),
)


@dataclass(frozen=True)
class UploadedImage:
    data: bytes
    media_type: str
    extension: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def key(self, image_prefix: str, tenant: str) -> str:
        return f"{image_prefix.strip('/')}/{tenant}/gateway/{self.sha256}.{self.extension}"


def sniff(data: bytes) -> tuple[str, str] | None:
    """(media type, extension) from the first bytes, or None for anything but PNG/JPEG/WebP/GIF/BMP."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", "webp"
    return next((kind for magic, kind in _SIGNATURES if data.startswith(magic)), None)


async def read_upload(upload, max_bytes: int) -> UploadedImage:
    """The uploaded file's bytes (a starlette UploadFile): 413 past `max_bytes`, 422 when not an image."""
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiProblem(
            "payload_too_large",
            f"the image is over the {max_bytes}-byte limit",
            errors=[{"field": "image", "code": "image_too_large", "message": f"at most {max_bytes} bytes"}],
        )
    kind = sniff(data)
    if kind is None:
        message = "the uploaded file is not a PNG, JPEG, WebP, GIF or BMP image"
        raise ApiProblem.invalid([{"field": "image", "code": "invalid_image", "message": message}])
    return UploadedImage(data, *kind)


def upload_bucket(settings: Settings) -> str | None:
    """Where uploads go: the first of TURBOFLOW_INPUT_BUCKETS, else TURBOFLOW_BUCKET (the functions' default)."""
    return settings.input_buckets[0] if settings.input_buckets else settings.bucket


def upload_uri(settings: Settings, tenant: str, image: UploadedImage) -> str:
    """The s3:// URI the upload will have (ApiProblem 503 when no bucket is configured)."""
    bucket = upload_bucket(settings)
    if not bucket:
        raise ApiProblem("storage_unavailable", "this gateway has no bucket for uploads (TURBOFLOW_BUCKET)")
    return f"s3://{bucket}/{image.key(settings.image_prefix, tenant)}"


async def store_upload(store, uri: str, image: UploadedImage, request_id: str) -> None:
    """Put the image at `uri` through the store's S3 client (same bytes -> same object: a retry is harmless)."""
    bucket, key = uri[len("s3://") :].split("/", 1)
    try:
        await asyncio.to_thread(
            store.client.put_object,
            Bucket=bucket,
            Key=key,
            Body=image.data,
            ContentType=image.media_type,
            Metadata={REQUEST_METADATA: request_id},
        )
    except Exception as e:  # boto raises many kinds; none may become a 500
        raise ApiProblem("storage_unavailable", f"the image could not be stored ({type(e).__name__})") from e
