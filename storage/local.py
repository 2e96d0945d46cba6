"""LocalDirectoryStore: the OutputStore and ImageSource of storage/stores.py on a directory (a workstation's disk,
an NFS or other shared volume mounted into every function pod), for deployments without S3.

The key layout is S3's (storage/keys.py), with the directory as the bucket:

    <root>/<output_prefix>/<tenant>[/<output_prefix of the request>]/<yyyy>/<mm>/<dd>/<request-id>.mp4
    <root>/<output_prefix>/<tenant>/.../<request-id>.json       completion sidecar, written after the video
    <root>/<image_prefix>/<tenant>/...                           the tenant's I2V uploads

Every file is written to a temporary file in its final directory and renamed over the target (`os.replace`, atomic
on POSIX file systems, NFS included), so a reader sees the old object or the new one, never a part: two replicas
publishing the same request leave one whole video and one whole sidecar, and the sidecar (renamed last) still
means "done".

URLs: `uri(key)` is the file's `file://` URI. `presign(key)` returns `public_base_url + key` when the directory is
served over HTTP (e.g. nginx in front of the volume), else the `file://` URI. Neither expires: the `url_expires_at`
reported is nominal (now + url_expiry_seconds), kept so consumers treat every store alike, and a replay past half
of it hands out the same URL with a new nominal expiry.

I2V images are referenced as `file:///<absolute path under root>` (the form `uri()` gives), passed to read_image as
(bucket=None, key=<that path>). The tenant rule is S3's: `<image_prefix>/<tenant>/...` or a shared prefix, decided
on the path alone before the disk is touched (`image_not_allowed`); a symbolic link is followed only when its
target obeys the same rule inside the root. Object metadata (model, seed, ...) is not stored: a plain file has
none, and the sidecar records the same facts.

Confinement: every key is a plain relative key (keys.is_plain_key) under the root, and the real path of every file
opened or written must lie under the root, so neither a request nor a link planted in the volume reaches outside
it. The root itself is trusted (the operator's volume).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from turboflow.errors import InvalidRequestError, TurboflowError
from turboflow.storage import keys
from turboflow.storage.stores import InvalidKeyError, StorageConfigError, StorageUnavailableError

log = logging.getLogger(__name__)

DEFAULT_URL_EXPIRY_SECONDS = 86400
DEFAULT_MAX_IMAGE_BYTES = 20 << 20
_COPY_CHUNK = 4 << 20
_FILE_MODE = 0o644  # readable by a web server in front of the volume (mkstemp would create 0600)
# errors an operator fixes (permissions, a read-only or full volume) rather than a retry riding out
_MISCONFIGURED_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


class LocalDirectoryStore:
    """Videos, sidecars and I2V images in one directory tree (implements OutputStore and ImageSource)."""

    def __init__(
        self,
        root: str | os.PathLike,
        output_prefix: str = "videos",
        image_prefix: str = "uploads",
        shared_image_prefixes: tuple[str, ...] = (),
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        public_base_url: str | None = None,
        url_expiry_seconds: int = DEFAULT_URL_EXPIRY_SECONDS,
    ):
        """Raises StorageConfigError when `root` is not an existing writable directory (a missing mount must not
        silently become a local folder) or a prefix is not usable."""
        real = Path(os.path.realpath(root))
        if not real.is_dir():
            raise StorageConfigError(f"the local store directory {str(root)!r} does not exist or is not a directory")
        if not os.access(real, os.W_OK | os.X_OK):
            raise StorageConfigError(f"the local store directory {str(root)!r} is not writable by this process")
        if max_image_bytes < 1 or url_expiry_seconds < 1:
            raise StorageConfigError("max_image_bytes and url_expiry_seconds must be positive")
        self.root = Path(os.path.abspath(root))  # as configured: the paths in URIs and image references
        self._real_root = real  # links resolved: what confinement checks against
        self.output_prefix = keys.key_prefix("output prefix", output_prefix)
        self.image_prefix = keys.key_prefix("image prefix", image_prefix)
        self.shared_image_prefixes = tuple(keys.shared_prefix("shared image prefix", p) for p in shared_image_prefixes)
        self.max_image_bytes = max_image_bytes
        self.public_base_url = public_base_url.rstrip("/") + "/" if public_base_url else None
        self.url_expiry_seconds = url_expiry_seconds

    # ---- keys -------------------------------------------------------------------------------------------
    def video_key(self, tenant: str, request_id: str, when: datetime | None, output_prefix: str | None = None) -> str:
        return keys.video_key(self.output_prefix, tenant, request_id, when, output_prefix)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def _path(self, key: str) -> Path:
        """The file for `key`, lexically under the root (links are checked where files are opened)."""
        if not keys.is_plain_key(key):
            raise InvalidKeyError(f"key {str(key)[:200]!r} is not a plain relative key")
        return self.root.joinpath(*key.split("/"))

    def _inside(self, path: Path) -> bool:
        """Whether the real path (links resolved) of `path` lies under the root."""
        return Path(os.path.realpath(path)).is_relative_to(self._real_root)

    # ---- idempotency --------------------------------------------------------------------------------------
    def find_completion(self, video_key: str) -> dict | None:
        sidecar, video = self._path(keys.sidecar_key(video_key)), self._path(video_key)
        with _os_errors("reading the completion sidecar"):
            try:
                body = self._read_inside(sidecar, limit=None)
            except FileNotFoundError:
                return None
            try:
                data = json.loads(body)
            except ValueError:
                log.warning("sidecar for %s is not JSON; generating again", video_key)
                return None
            try:
                size = video.stat().st_size if self._inside(video) else -1
            except FileNotFoundError:
                log.warning("sidecar for %s exists but the video is gone; generating again", video_key)
                return None
        if not isinstance(data, dict) or size != int(data.get("video", {}).get("bytes", -2)):
            log.warning("video %s does not match its sidecar; generating again", video_key)
            return None
        return data

    def put_completion(self, video_key: str, data: dict) -> None:
        body = json.dumps(data, sort_keys=True).encode()
        with _os_errors("writing the completion sidecar"):
            self._write_atomically(self._path(keys.sidecar_key(video_key)), lambda out: out.write(body))

    # ---- publishing ---------------------------------------------------------------------------------------
    def put_video(self, path: str | os.PathLike, video_key: str, metadata: Mapping[str, object]) -> dict:
        """Copy the mp4 into place (atomically); `etag` is its sha256. `metadata` is not stored (see above)."""
        digest, size = hashlib.sha256(), 0

        def copy(out) -> None:
            nonlocal size
            with open(path, "rb") as src:
                while chunk := src.read(_COPY_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)

        with _os_errors("writing the video"):
            self._write_atomically(self._path(video_key), copy)
        return {"bucket": "", "key": video_key, "bytes": size, "etag": digest.hexdigest()}

    def presign(self, video_key: str, now: datetime | None = None) -> tuple[str, str]:
        now = now or datetime.now(UTC)
        path = self._path(video_key)
        url = self.public_base_url + quote(video_key) if self.public_base_url else path.as_uri()
        return url, keys.expires_at(now, self.url_expiry_seconds)

    def refresh_url(self, data: dict, now: datetime | None = None) -> dict:
        now = now or datetime.now(UTC)
        video = data.get("video", {})
        if not keys.url_needs_refresh(video, now, self.url_expiry_seconds):
            return data
        url, expires_at = self.presign(video["key"], now)
        return {**data, "video": {**video, "url": url, "url_expires_at": expires_at}}

    def _write_atomically(self, target: Path, write) -> None:
        """Write through `write(file)` into a temporary file next to `target`, flush it to disk, then rename it
        over `target`: readers and concurrent writers only ever see whole files."""
        self._make_directories(target.parent)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, _FILE_MODE)
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_directory(target.parent)  # the rename itself survives a crash

    def _make_directories(self, directory: Path) -> None:
        """Create `directory` one level at a time, checking each level stays under the root, so a link planted
        in the volume never makes the store create anything outside it."""
        current = self.root
        for part in directory.relative_to(self.root).parts:
            current = current / part
            with contextlib.suppress(FileExistsError):
                os.mkdir(current)
            if not self._inside(current):
                raise StorageConfigError("a directory of the local store links outside the store directory")

    def _read_inside(self, path: Path, limit: int | None) -> bytes:
        """The bytes of `path` (at most `limit`), refusing a file whose real path leaves the root; a link
        leading outside reads as missing (FileNotFoundError), so it reveals nothing of what lies there."""
        if not self._inside(path):
            raise FileNotFoundError(path)
        with open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit)

    # ---- I2V images ---------------------------------------------------------------------------------------
    def _image_key(self, bucket: str | None, path: str) -> str | None:
        """The root-relative key of a `file://` image path, or None when the path is not under the root."""
        if bucket is not None:
            raise InvalidRequestError(
                "this deployment reads images from file:// paths under its store directory, not s3:// URIs",
                code="invalid_image_reference",
                field="image",
            )
        if not isinstance(path, str) or not path.startswith("/") or not keys.is_plain_key(path[1:]):
            raise InvalidRequestError(
                "image path is not an absolute plain path (empty, '.' or '..' segments)",
                code="invalid_image_reference",
                field="image",
            )
        pure = PurePosixPath(path)
        return str(pure.relative_to(self.root)) if pure.is_relative_to(self.root) else None

    def read_image(self, bucket: str | None, key: str, tenant: str) -> bytes:
        relative = self._image_key(bucket, key)
        if relative is None or not keys.tenant_may_read(
            relative, tenant, self.image_prefix, self.shared_image_prefixes
        ):
            raise InvalidRequestError(
                f"image must be under {self.image_prefix}/{tenant}/ in the store directory (this tenant's uploads)"
                " or a shared prefix",
                code="image_not_allowed",
                field="image",
            )
        path = self._path(relative)
        with _os_errors("reading the image"):
            try:
                real = Path(os.path.realpath(path))
                # a link is followed only to where the tenant may read anyway
                if not real.is_relative_to(self._real_root) or not keys.tenant_may_read(
                    str(real.relative_to(self._real_root)), tenant, self.image_prefix, self.shared_image_prefixes
                ):
                    raise InvalidRequestError(
                        "image links outside this tenant's uploads and the shared prefixes",
                        code="image_not_allowed",
                        field="image",
                    )
                size = real.stat().st_size
                if not real.is_file():
                    raise FileNotFoundError(path)
                if size > self.max_image_bytes:
                    raise InvalidRequestError(
                        f"image {relative} has {size} bytes; the cap is {self.max_image_bytes}",
                        code="image_too_large",
                        field="image",
                    )
                with open(real, "rb") as f:
                    return f.read(self.max_image_bytes + 1)
            except (FileNotFoundError, NotADirectoryError) as e:
                raise InvalidRequestError(
                    f"image {relative} does not exist", code="image_not_found", field="image"
                ) from e


@contextlib.contextmanager
def _os_errors(what: str) -> Iterator[None]:
    """Turn OSError into typed storage errors; messages name the operation, never a path (they reach `failed`
    events). Permission, read-only and full-volume errors are configuration errors: a retry alone cannot help."""
    try:
        yield
    except TurboflowError:
        raise
    except OSError as e:
        log.debug("%s: %s: %s", what, type(e).__name__, e)
        reason = os.strerror(e.errno) if e.errno else type(e).__name__
        if e.errno in _MISCONFIGURED_ERRNOS:
            raise StorageConfigError(f"{what}: the store directory refused it ({reason})") from e
        raise StorageUnavailableError(f"{what}: the store directory is unavailable ({reason})") from e


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some file systems do not open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. EINVAL on file systems without directory fsync
    finally:
        os.close(fd)


__all__ = ["LocalDirectoryStore"]
