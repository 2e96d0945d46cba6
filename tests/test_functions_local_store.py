"""A live function on the local-directory store (TURBOFLOW_STORE=local): no S3 anywhere.

The same request contract as with S3: a T2V request writes `<dir>/videos/<tenant>/<id>.mp4` + its `.json` sidecar,
a redelivery replays the completion, and an I2V request reads a `file://` image from the tenant's own upload prefix
under the store directory, never another tenant's.
"""

from __future__ import annotations

import io
import json

import pytest
from conftest import FAST
from function_harness import LiveFunction, reply_event, request_event
from PIL import Image

from turboflow.engine.video import probe_video
from turboflow.eventing.contracts import validator
from turboflow.eventing.types import COMPLETED, FAILED


def _png(seed: int = 0) -> bytes:
    img = Image.new("RGB", (48, 36), (40 * seed % 256, 120, 200))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("local-store")
    for tenant, seed in (("acme", 1), ("globex", 2)):
        (root / "uploads" / tenant).mkdir(parents=True)
        (root / "uploads" / tenant / "cat.png").write_bytes(_png(seed))
    return root


def _config(model_dir, store_dir):
    return {
        "MODEL_DIR": str(model_dir),
        "TURBOFLOW_DEVICE": "cpu",
        "TURBOFLOW_STORE": "local",
        "TURBOFLOW_LOCAL_STORE_DIR": str(store_dir),
    }


@pytest.fixture(scope="module")
def t2v(tiny_t2v_dir, store_dir):
    live = LiveFunction("t2v", _config(tiny_t2v_dir, store_dir))
    live.wait_ready()
    yield live
    live.close()


@pytest.fixture(scope="module")
def i2v(tiny_i2v_dir, store_dir):
    live = LiveFunction("i2v", _config(tiny_i2v_dir, store_dir))
    live.wait_ready()
    yield live
    live.close()


def _reply(response):
    assert response.status_code == 200, response.text
    return reply_event(response)


def test_t2v_writes_the_video_and_sidecar_under_the_directory_and_replays(t2v, store_dir):
    event = request_event("t2v", {"prompt": "a lighthouse at dusk", "seed": 3, **FAST}, event_id="local-t2v-1")
    reply, data = _reply(t2v.send(event))
    assert reply.get_type() == COMPLETED, data
    validator(COMPLETED).validate(data)
    # the SDK stamps `time` on the request, so the key has the request's date folders
    key = data["video"]["key"]
    assert key.startswith("videos/acme/") and key.endswith("/local-t2v-1.mp4")
    video = store_dir / key
    sidecar = video.with_suffix(".json")
    assert data["video"]["uri"] == video.as_uri() and data["video"]["bucket"] == ""
    assert json.loads(sidecar.read_text())["video"]["sha256"] == data["video"]["sha256"]
    assert probe_video(video).num_frames == 1
    again, replayed = _reply(t2v.send(event))  # redelivery: the same completion, nothing generated
    assert again.get_id() == reply.get_id() and replayed["video"] == data["video"]


def test_i2v_reads_a_file_image_from_the_tenants_prefix(i2v, store_dir):
    image = (store_dir / "uploads" / "acme" / "cat.png").as_uri()
    event = request_event("i2v", {"prompt": "the cat turns", "image": image, **FAST}, event_id="local-i2v-1")
    reply, data = _reply(i2v.send(event))
    assert reply.get_type() == COMPLETED, data
    assert (store_dir / data["video"]["key"]).is_file() and data["video"]["key"].startswith("videos/acme/")


@pytest.mark.parametrize(
    "image, code",
    [
        ("uploads/globex/cat.png", "image_not_allowed"),  # another tenant's upload, which exists
        ("uploads/globex/nothing.png", "image_not_allowed"),  # same code whether it exists or not
        ("uploads/acme/nothing.png", "image_not_found"),  # the tenant's own prefix
    ],
)
def test_i2v_file_images_are_confined_to_the_tenant(i2v, store_dir, image, code):
    event = request_event("i2v", {"prompt": "x", "image": (store_dir / image).as_uri(), **FAST})
    reply, data = _reply(i2v.send(event))
    assert reply.get_type() == FAILED and data["code"] == code, data
    assert data["retryable"] is False
    assert str(store_dir) not in data["message"]  # no internal paths in what the producer sees
