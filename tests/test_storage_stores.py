"""One behavioural suite for every output store / image source (storage/stores.py): S3Store against a moto S3
server over HTTP and LocalDirectoryStore on a temporary directory. A new store joins by adding a fixture param."""

from __future__ import annotations

import inspect
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from turboflow.errors import InvalidRequestError
from turboflow.storage.local import LocalDirectoryStore
from turboflow.storage.s3 import S3Store
from turboflow.storage.stores import ImageSource, OutputStore

WHEN = datetime(2026, 3, 9, 23, 59, 59, tzinfo=UTC)
MAX_IMAGE_BYTES = 1000


@dataclass
class StoreUnderTest:
    """A store plus raw access to what it stores, bypassing the store (what a user or lifecycle rule would do)."""

    store: Any
    image_ref: Any  # key -> (bucket, key) as the event's image URI names it
    put_raw: Any  # (key, bytes) -> None
    get_raw: Any  # key -> bytes | None
    delete_raw: Any  # key -> None
    other_form: tuple  # an image reference in the other store's form


@pytest.fixture(params=["s3", "local"])
def sut(request, tmp_path) -> StoreUnderTest:
    if request.param == "s3":
        moto_s3, s3_client = request.getfixturevalue("moto_s3"), request.getfixturevalue("s3_client")
        bucket = f"tf-{uuid.uuid4().hex[:12]}"  # a fresh bucket per test: nothing leaks between tests
        s3_client.create_bucket(Bucket=bucket)
        store = S3Store.from_env(
            {
                "TURBOFLOW_BUCKET": bucket,
                "S3_ENDPOINT_URL": moto_s3,
                "TURBOFLOW_SHARED_IMAGE_PREFIXES": f"{bucket}/library/styles/",
                "TURBOFLOW_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
            }
        )

        def get_raw(key):
            try:
                return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
            except s3_client.exceptions.NoSuchKey:
                return None

        return StoreUnderTest(
            store,
            image_ref=lambda key: (bucket, key),
            put_raw=lambda key, body: s3_client.put_object(Bucket=bucket, Key=key, Body=body),
            get_raw=get_raw,
            delete_raw=lambda key: s3_client.delete_object(Bucket=bucket, Key=key),
            other_form=(None, str(tmp_path / "uploads/acme/a.png")),
        )
    root = tmp_path / "store"
    root.mkdir()
    store = LocalDirectoryStore(root, shared_image_prefixes=("library/styles/",), max_image_bytes=MAX_IMAGE_BYTES)

    def put_raw(key, body):
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(body)

    return StoreUnderTest(
        store,
        image_ref=lambda key: (None, f"{root}/{key}"),  # a string join: Path would fold "//" away
        put_raw=put_raw,
        get_raw=lambda key: (root / key).read_bytes() if (root / key).exists() else None,
        delete_raw=lambda key: (root / key).unlink(),
        other_form=("some-bucket", "uploads/acme/a.png"),
    )


def test_every_store_implements_both_protocols_with_their_signatures(sut):
    """isinstance checks names only; the parameters must match too, or the function's calls would break."""
    assert isinstance(sut.store, OutputStore) and isinstance(sut.store, ImageSource)
    for protocol in (OutputStore, ImageSource):
        for name, member in vars(protocol).items():
            if name.startswith("_") or not callable(member):
                continue
            expected = list(inspect.signature(member).parameters)[1:]  # without self
            assert list(inspect.signature(getattr(sut.store, name)).parameters) == expected, name


def test_key_layout_with_and_without_the_request_time(sut):
    store = sut.store
    assert store.video_key("acme", "req-1", WHEN) == "videos/acme/2026/03/09/req-1.mp4"
    other_zone = WHEN.astimezone(timezone(timedelta(hours=5)))  # same instant: same key
    assert store.video_key("acme", "req-1", other_zone) == "videos/acme/2026/03/09/req-1.mp4"
    assert store.video_key("acme", "req-1", WHEN, "promo/q1") == "videos/acme/promo/q1/2026/03/09/req-1.mp4"
    assert store.video_key("acme", "req-1", None) == "videos/acme/req-1.mp4"
    assert store.video_key("acme", "req-1", None, "promo/q1") == "videos/acme/promo/q1/req-1.mp4"


@pytest.mark.parametrize(
    "tenant,request_id,prefix,code",
    [
        ("../acme", "r", None, "invalid_tenant"),
        ("acme/x", "r", None, "invalid_tenant"),
        ("acme\n", "r", None, "invalid_tenant"),
        ("acme", "../../x", None, "invalid_request_id"),
        ("acme", "a/b", None, "invalid_request_id"),
        ("acme", "r\n", None, "invalid_request_id"),
        ("acme", "r", "../globex", "invalid_output_prefix"),
        ("acme", "r", "/abs", "invalid_output_prefix"),
        ("acme", "r", "a/b/c/d/e", "invalid_output_prefix"),
    ],
)
def test_keys_never_escape_the_tenant_prefix(sut, tenant, request_id, prefix, code):
    with pytest.raises(InvalidRequestError) as e:
        sut.store.video_key(tenant, request_id, WHEN, prefix)
    assert e.value.code == code


def _publish(sut, tmp_path, request_id: str, payload: bytes) -> tuple[str, dict]:
    store = sut.store
    key = store.video_key("acme", request_id, WHEN)
    path = tmp_path / f"{request_id}.mp4"
    path.write_bytes(payload)
    uploaded = store.put_video(path, key, {"request-id": request_id, "seed": 0})
    url, expires = store.presign(key)
    data = {"request_id": request_id, "video": {"key": key, "bytes": uploaded["bytes"], "url": url}}
    data["video"]["url_expires_at"] = expires
    return key, data


def test_the_sidecar_written_last_means_done_and_replays(sut, tmp_path):
    store = sut.store
    key = store.video_key("acme", "idem-1", WHEN)
    assert store.find_completion(key) is None
    path = tmp_path / "v.mp4"
    path.write_bytes(b"video-bytes")
    uploaded = store.put_video(path, key, {"seed": 1})
    assert uploaded["key"] == key and uploaded["bytes"] == 11
    assert store.find_completion(key) is None  # the video alone (a crash before the sidecar): not done
    url, expires = store.presign(key)
    data = {"request_id": "idem-1", "video": {"key": key, "bytes": 11, "url": url, "url_expires_at": expires}}
    store.put_completion(key, data)
    assert store.find_completion(key) == data  # a redelivery replays this
    assert sut.get_raw(key.removesuffix(".mp4") + ".json") is not None  # the sidecar sits next to the video


def test_the_same_request_published_twice_leaves_one_whole_video(sut, tmp_path):
    key, data = _publish(sut, tmp_path, "twice-1", b"first")
    _publish(sut, tmp_path, "twice-1", b"second")
    assert sut.get_raw(key) == b"second"
    sut.store.put_completion(key, {**data, "video": {**data["video"], "bytes": 6}})
    sut.store.put_completion(key, {**data, "video": {**data["video"], "bytes": 6}})
    assert sut.store.find_completion(key)["video"]["bytes"] == 6


def test_a_sidecar_without_its_video_or_not_matching_it_means_generate_again(sut, tmp_path):
    store = sut.store
    key, data = _publish(sut, tmp_path, "gone-1", b"12345")
    store.put_completion(key, data)
    assert store.find_completion(key) == data
    sut.put_raw(key, b"123")  # the video replaced by something else: sizes differ
    assert store.find_completion(key) is None
    sut.delete_raw(key)  # deleted by a lifecycle rule
    assert store.find_completion(key) is None
    sut.put_raw(key, b"12345")
    sut.put_raw(key.removesuffix(".mp4") + ".json", b"{not json")
    assert store.find_completion(key) is None


def test_the_url_serves_the_video_and_is_refreshed_only_near_expiry(sut, tmp_path):
    store = sut.store
    key, data = _publish(sut, tmp_path, "url-1", b"mp4-payload")
    with urllib.request.urlopen(data["video"]["url"], timeout=30) as r:  # http(s):// or file://
        assert r.read() == b"mp4-payload"
    assert store.refresh_url(data) is data
    later = datetime.now(UTC) + timedelta(days=0.9)  # 90 % of the default 1-day lifetime gone
    fresh = store.refresh_url(data, now=later)
    assert fresh["video"]["url_expires_at"] > data["video"]["url_expires_at"] and fresh["video"]["key"] == key
    assert store.uri(key).endswith(key) and store.uri(key).split("://")[0] in ("s3", "file")


def test_images_are_confined_to_the_tenant_and_shared_prefixes(sut):
    store = sut.store
    sut.put_raw("uploads/globex/private.png", b"g" * 10)
    sut.put_raw("uploads/acme/mine.png", b"m" * 10)
    sut.put_raw("library/styles/wave.png", b"w" * 10)
    sut.put_raw("uploads/acme/big.png", b"b" * (MAX_IMAGE_BYTES + 1))
    assert store.read_image(*sut.image_ref("uploads/acme/mine.png"), "acme") == b"m" * 10
    assert store.read_image(*sut.image_ref("library/styles/wave.png"), "acme") == b"w" * 10
    assert store.read_image(*sut.image_ref("library/styles/wave.png"), "globex") == b"w" * 10
    for key in (
        "uploads/globex/private.png",  # exists
        "uploads/globex/missing.png",  # does not: the same answer
        "uploads/acmex/x.png",
        "uploads/acme",
        "elsewhere/acme/x.png",
        "library/stylesx/wave.png",
        "videos/acme/2026/03/09/r.mp4",
    ):
        with pytest.raises(InvalidRequestError) as e:
            store.read_image(*sut.image_ref(key), "acme")
        assert e.value.code == "image_not_allowed", key
        assert "globex" not in e.value.message
    with pytest.raises(InvalidRequestError) as e:
        store.read_image(*sut.image_ref("uploads/acme/mine.png"), "Not A Tenant")
    assert e.value.code == "image_not_allowed"


@pytest.mark.parametrize(
    "key,code",
    [
        ("uploads/acme/missing.png", "image_not_found"),
        ("uploads/acme/big.png", "image_too_large"),
        ("uploads/acme/../globex/private.png", "invalid_image_reference"),
        ("uploads/acme//x.png", "invalid_image_reference"),
    ],
)
def test_own_image_errors_are_typed(sut, key, code):
    sut.put_raw("uploads/acme/big.png", b"b" * (MAX_IMAGE_BYTES + 1))
    with pytest.raises(InvalidRequestError) as e:
        sut.store.read_image(*sut.image_ref(key), "acme")
    assert e.value.code == code and e.value.field == "image"


def test_an_image_reference_of_the_other_form_is_refused(sut):
    with pytest.raises(InvalidRequestError) as e:
        sut.store.read_image(*sut.other_form, "acme")
    assert e.value.code == "invalid_image_reference"


def test_metadata_values_of_any_type_are_accepted(sut, tmp_path):
    path = tmp_path / "m.mp4"
    path.write_bytes(b"x")
    key = sut.store.video_key("acme", "meta-1", None)
    out = sut.store.put_video(path, key, {"model": "wan2.1 – 1.3B", "seed": 7, "none": None, "steps": 4})
    assert out["bytes"] == 1 and Path(path).exists()  # the source file is left in place
