"""The store seams: what a video function needs from where videos go (OutputStore) and where I2V images come from
(ImageSource), and the typed errors every implementation raises.

Two implementations: `storage/s3.py` (S3Store: any S3 API) and `storage/local.py` (LocalDirectoryStore: a directory
on a workstation or an NFS volume). Both share the key layout and the image rule of `storage/keys.py`, so a request
maps to the same key in either. A third store (GCS, Azure Blob, ...) implements these two Protocols and passes
tests/test_storage_stores.py; nothing above storage/ changes.

Errors, by code (all TurboflowError subclasses; messages are in user terms and name no endpoint or server path,
because they reach 503 bodies and, through the dead-letter sink, `failed` events):

- `storage_unavailable` (StorageUnavailableError, retryable): the store cannot be reached or is overloaded.
- `storage_misconfigured` (StorageConfigError, retryable): the deployment's storage settings are wrong (no bucket,
  access denied, missing directory); fixing them makes the same request succeed.
- `invalid_tenant` / `invalid_request_id` / `invalid_output_prefix` (InvalidKeyError): a key component from the
  request is not usable.
- image reads: `invalid_image_reference`, `image_bucket_not_allowed`, `image_not_allowed`, `image_not_found`,
  `image_too_large` (InvalidRequestError).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime
from typing import Protocol, runtime_checkable

from turboflow.errors import InvalidRequestError, TurboflowError


class StorageUnavailableError(TurboflowError):
    """The store cannot be reached or answers 5xx/throttles. Transient: the function answers 5xx so the broker
    retries."""

    code = "storage_unavailable"
    retryable = True


class StorageConfigError(TurboflowError):
    """The deployment's storage settings are wrong (no bucket, access denied, bucket or directory missing).
    Retryable: fixing the configuration makes the same request succeed."""

    code = "storage_misconfigured"
    retryable = True


class InvalidKeyError(InvalidRequestError):
    """A key component taken from the request (tenant, request id, output prefix) is not usable."""

    code = "invalid_key"


@runtime_checkable
class OutputStore(Protocol):
    """Where finished videos and their completion sidecars go.

    Idempotency: one request maps to one key (`video_key`), the video is written before its sidecar, and the
    sidecar's presence (with a video of the recorded size) means "done". A redelivery finds the completion and
    replays it instead of generating again; a crash between the two writes leaves a video without a sidecar,
    which counts as not done. Each write replaces the whole object, never a part of it, so two replicas
    publishing the same request leave one complete video and one complete sidecar.
    """

    def video_key(self, tenant: str, request_id: str, when: datetime | None, output_prefix: str | None = None) -> str:
        """The video's key (storage/keys.py layout). InvalidKeyError for an unusable tenant, id or prefix."""
        ...

    def find_completion(self, video_key: str) -> dict | None:
        """The completion data stored for this key when both the sidecar and a video of the size it records
        exist; None otherwise (not done yet, or to be generated again)."""
        ...

    def put_video(self, path: str | os.PathLike, video_key: str, metadata: Mapping[str, object]) -> dict:
        """Publish the mp4 at `path` under `video_key`, replacing any earlier object whole. Returns
        `{"bucket": ..., "key": ..., "bytes": ..., "etag": ...}` ("bucket" is "" where the store has none)."""
        ...

    def put_completion(self, video_key: str, data: dict) -> None:
        """Write the completion sidecar; called last, after put_video, so its presence means "done"."""
        ...

    def presign(self, video_key: str, now: datetime | None = None) -> tuple[str, str]:
        """(URL a consumer can GET the video from, its expiry as RFC 3339 UTC)."""
        ...

    def refresh_url(self, data: dict, now: datetime | None = None) -> dict:
        """`data` itself while its URL has more than half its lifetime left, else a copy with a new URL."""
        ...

    def uri(self, key: str) -> str:
        """The durable name of the object (`s3://bucket/key`, `file:///...`), for events and logs."""
        ...


@runtime_checkable
class ImageSource(Protocol):
    """Where I2V conditioning images are read from, confined to the requesting tenant."""

    def read_image(self, bucket: str | None, key: str, tenant: str) -> bytes:
        """The bytes of the referenced image when `tenant` may read it (its own `{image_prefix}/{tenant}/...` or
        a shared prefix) and it is under the size cap. The reference is what the event's `image` URI names:
        (bucket, key) for `s3://bucket/key`, (None, absolute path) for `file:///path`; a store given the other
        form answers `invalid_image_reference`. Refusals (`image_not_allowed`, `image_bucket_not_allowed`) are
        decided before the store is touched, so they reveal nothing about other tenants' objects;
        `image_not_found` and `image_too_large` only ever concern the tenant's own (or shared) images."""
        ...


__all__ = ["OutputStore", "ImageSource", "StorageUnavailableError", "StorageConfigError", "InvalidKeyError"]
