"""What only S3Store does, against a moto S3 server over HTTP: multipart uploads and object metadata, presigned
URLs on the endpoint, input-bucket allow-lists, S3 never asked for a refused image, S3 errors mapped to typed
errors, settings validation. The behaviour every store shares is in test_storage_stores.py."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime

import httpx
import pytest
from function_harness import free_port

from turboflow.errors import ConfigError, InvalidRequestError
from turboflow.storage.s3 import S3Config, S3Store
from turboflow.storage.stores import StorageConfigError, StorageUnavailableError

BUCKET, OTHER = "tf-store", "tf-store-inputs"
WHEN = datetime(2026, 3, 9, 23, 59, 59, tzinfo=UTC)


@pytest.fixture(scope="module")
def store(s3_client, moto_s3):
    for b in (BUCKET, OTHER):
        try:
            s3_client.create_bucket(Bucket=b)
        except s3_client.exceptions.BucketAlreadyOwnedByYou:
            pass
    return S3Store.from_env(
        {
            "TURBOFLOW_BUCKET": BUCKET,
            "S3_ENDPOINT_URL": moto_s3,
            "TURBOFLOW_INPUT_BUCKETS": OTHER,
            "TURBOFLOW_MULTIPART_THRESHOLD_BYTES": str(5 << 20),
            "TURBOFLOW_MULTIPART_CHUNK_BYTES": str(5 << 20),
            "TURBOFLOW_MAX_IMAGE_BYTES": "1000",
        }
    )


def test_upload_multipart_metadata_and_presigned_url(store, s3_client, tmp_path):
    path = tmp_path / "big.mp4"
    payload = os.urandom((5 << 20) + 12345)  # above the 5 MiB threshold: multipart
    path.write_bytes(payload)
    key = store.video_key("acme", "multi-1", WHEN)
    out = store.put_video(path, key, {"model": "m", "seed": 5, "steps": 4, "request-id": "multi-1"})
    assert out["bytes"] == len(payload) and out["etag"].endswith("-2")  # two parts
    head = s3_client.head_object(Bucket=BUCKET, Key=key)
    assert head["ContentType"] == "video/mp4"
    assert head["Metadata"] == {"model": "m", "seed": "5", "steps": "4", "request-id": "multi-1"}
    url, expires = store.presign(key)
    assert url.startswith(store.cfg.endpoint_url) and "X-Amz-Signature" in url
    assert datetime.fromisoformat(expires.replace("Z", "+00:00")) > datetime.now(UTC)
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200 and hashlib.sha256(r.content).digest() == hashlib.sha256(payload).digest()


def test_small_upload_is_single_part(store, tmp_path):
    path = tmp_path / "small.mp4"
    path.write_bytes(b"\0" * 1000)
    out = store.put_video(path, store.video_key("acme", "single-1", WHEN), {})
    assert "-" not in out["etag"]


def test_read_image_allow_list_and_caps(store, s3_client):
    s3_client.put_object(Bucket=OTHER, Key="uploads/acme/a.png", Body=b"x" * 10)
    s3_client.put_object(Bucket=OTHER, Key="uploads/acme/big.png", Body=b"x" * 2000)
    s3_client.put_object(Bucket=BUCKET, Key="uploads/acme/a.png", Body=b"x" * 10)
    assert store.read_image(OTHER, "uploads/acme/a.png", "acme") == b"x" * 10
    cases = [
        ((BUCKET, "uploads/acme/a.png"), "image_bucket_not_allowed"),  # inputs set: output bucket not implied
        (("some-other", "uploads/acme/a.png"), "image_bucket_not_allowed"),
        ((OTHER, "uploads/acme/missing.png"), "image_not_found"),
        ((OTHER, "uploads/acme/big.png"), "image_too_large"),
        ((OTHER, "uploads/acme/../a.png"), "invalid_image_reference"),
    ]
    for (bucket, key), code in cases:
        with pytest.raises(InvalidRequestError) as e:
            store.read_image(bucket, key, "acme")
        assert e.value.code == code, (bucket, key)


def test_input_buckets_default_to_the_output_bucket():
    cfg = S3Config.from_env({"TURBOFLOW_BUCKET": "out-bucket"})
    assert cfg.input_buckets == ("out-bucket",) and cfg.output_prefix == "videos"
    assert cfg.image_prefix == "uploads" and cfg.shared_image_prefixes == ()


def test_a_refused_image_never_reaches_s3(moto_s3, s3_client):
    """Another tenant's upload, existing or not, gets the same code and S3 is never asked (the proxy would see it)."""
    from s3_fault_proxy import S3FaultProxy

    for b in (BUCKET, OTHER):
        try:
            s3_client.create_bucket(Bucket=b)
        except s3_client.exceptions.BucketAlreadyOwnedByYou:
            pass
    s3_client.put_object(Bucket=OTHER, Key="uploads/globex/private.png", Body=b"g" * 10)
    s3_client.put_object(Bucket=OTHER, Key="library/styles/wave.png", Body=b"w" * 10)
    s3_client.put_object(Bucket=OTHER, Key="uploads/acme/mine.png", Body=b"m" * 10)
    proxy = S3FaultProxy(moto_s3)
    seen: list[tuple[str, str]] = []
    proxy.fault = lambda method, path: seen.append((method, path))
    try:
        store = S3Store.from_env(
            {
                "TURBOFLOW_BUCKET": BUCKET,
                "S3_ENDPOINT_URL": proxy.url,
                "TURBOFLOW_INPUT_BUCKETS": OTHER,
                "TURBOFLOW_SHARED_IMAGE_PREFIXES": f"{OTHER}/library/styles/",
            }
        )
        for key in (
            "uploads/globex/private.png",
            "uploads/globex/missing.png",
            "uploads/acmex/x.png",
            "uploads/acme",
            "elsewhere/acme/x.png",
            "library/stylesx/wave.png",
        ):
            with pytest.raises(InvalidRequestError) as e:
                store.read_image(OTHER, key, "acme")
            assert e.value.code == "image_not_allowed", key
            assert "globex" not in e.value.message
        assert seen == []  # refused without a single request to S3
        assert store.read_image(OTHER, "uploads/acme/mine.png", "acme") == b"m" * 10
        assert store.read_image(OTHER, "library/styles/wave.png", "acme") == b"w" * 10
        assert store.read_image(OTHER, "library/styles/wave.png", "globex") == b"w" * 10
        with pytest.raises(InvalidRequestError) as e:
            store.read_image(OTHER, "uploads/acme/missing.png", "acme")
        assert e.value.code == "image_not_found"
    finally:
        proxy.close()


@pytest.mark.parametrize(
    "env",
    [
        {"TURBOFLOW_IMAGE_PREFIX": "../up"},
        {"TURBOFLOW_SHARED_IMAGE_PREFIXES": "bkt"},
        {"TURBOFLOW_SHARED_IMAGE_PREFIXES": "Bad_Bucket/x/"},
        {"TURBOFLOW_SHARED_IMAGE_PREFIXES": "ok-bucket/a/../b/"},
        {"TURBOFLOW_INPUT_BUCKETS": "ok-bucket,Bad_Bucket"},
    ],
)
def test_bad_image_settings_are_configuration_errors(env):
    with pytest.raises(ConfigError, match=f"^{next(iter(env))}: "):
        S3Config.from_env({"TURBOFLOW_BUCKET": "ok-bucket", **env})


@pytest.mark.parametrize(
    "status,s3_code,error", [(503, "SlowDown", StorageUnavailableError), (403, "AccessDenied", StorageConfigError)]
)
def test_refused_upload_is_a_typed_retryable_error(moto_s3, s3_client, tmp_path, status, s3_code, error):
    """boto3's upload_file wraps the S3 answer in S3UploadFailedError: still a typed, retryable storage error
    whose message names no endpoint."""
    from s3_fault_proxy import S3FaultProxy, refuse_video_writes

    try:
        s3_client.create_bucket(Bucket=BUCKET)
    except s3_client.exceptions.BucketAlreadyOwnedByYou:
        pass
    proxy = S3FaultProxy(moto_s3, refuse_video_writes(status, s3_code))
    try:
        store = S3Store.from_env({"TURBOFLOW_BUCKET": BUCKET, "S3_ENDPOINT_URL": proxy.url})
        path = tmp_path / "v.mp4"
        path.write_bytes(b"\0" * 1000)
        with pytest.raises(error) as e:
            store.put_video(path, store.video_key("acme", f"refused-{status}", WHEN), {})
        assert e.value.retryable and proxy.refused
        assert proxy.url not in e.value.message and "127.0.0.1" not in e.value.message
    finally:
        proxy.close()


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"TURBOFLOW_BUCKET": "Bad_Bucket"},
        {"TURBOFLOW_BUCKET": "ok-bucket", "TURBOFLOW_OUTPUT_PREFIX": "../x"},
        {"TURBOFLOW_BUCKET": "ok-bucket", "TURBOFLOW_URL_EXPIRY_SECONDS": "9999999"},
    ],
)
def test_bad_configuration_is_typed(env):
    """A missing bucket is a storage misconfiguration; a bad value is settings' invalid_config naming it."""
    with pytest.raises((StorageConfigError, ConfigError)) as e:
        S3Config.from_env(env)
    assert "TURBOFLOW_" in e.value.message


def test_unreachable_endpoint_is_transient(moto_s3):
    store = S3Store.from_env({"TURBOFLOW_BUCKET": BUCKET, "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(StorageUnavailableError) as e:
        store.find_completion(store.video_key("acme", "r", WHEN))
    assert e.value.retryable and "127.0.0.1" not in e.value.message


def test_missing_bucket_is_a_configuration_error(moto_s3):
    store = S3Store.from_env({"TURBOFLOW_BUCKET": "no-such-bucket-here", "S3_ENDPOINT_URL": moto_s3})
    with pytest.raises(StorageConfigError):
        store.find_completion(store.video_key("acme", "r", WHEN))
