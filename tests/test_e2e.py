"""End to end: `turboflow dev`'s stack (real nats-server, moto S3 over HTTP, both functions as separate
`turboflow serve` processes on tiny models, the broker driven by eventing/manifests/triggers.yaml, dead-letter sink,
S3 source). Completions are read by a plain nats-py subscriber. Faults: SIGKILL of a function mid-generation,
nats-server killed and restarted, duplicate submissions; exactly one object and one completion per request."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import uuid

import httpx
import pytest
import pytest_asyncio
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from eventing_harness import Collector, data_of

from turboflow.eventing.client import build_request, download, reply_subscription
from turboflow.eventing.devstack import DevConfig, DevStack
from turboflow.eventing.jetstream import publish_event
from turboflow.eventing.nats_binding import from_nats
from turboflow.eventing.s3source import request_id_for
from turboflow.eventing.types import COMPLETED, FAILED

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(240)]
SMALL = {"resolution": "480p", "aspect_ratio": "4:3", "num_frames": 1, "num_steps": 2}


def png(color=(200, 60, 30), size=(96, 64)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_t2v_dir, tiny_i2v_dir, moto_s3, tmp_path_factory):
    cfg = DevConfig(
        s3_endpoint=moto_s3,
        bucket=f"e2e-{uuid.uuid4().hex[:8]}",
        models={"t2v": tiny_t2v_dir, "i2v": tiny_i2v_dir},
        delivery={"timeout": 60.0, "retry": 3, "backoff_delay": 0.2},
        log_dir=tmp_path_factory.mktemp("dev"),
        notify_interval=0.2,
    )
    async with DevStack(cfg) as s:
        await s.wait_ready(timeout=120)
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def completions(stack):
    async with Collector(stack.nats.url, "turboflow.events.io.turboflow.video.*") as c:
        yield c


def is_reply_to(request_id):
    return lambda e: e.get_type() in (COMPLETED, FAILED) and e.get_subject() == request_id


async def replies_in_stream(nats_url, ids, *, timeout, settle=0.0) -> dict[str, list]:
    """Every completed/failed event for `ids` in the whole stream (a fresh consumer from its start), read until
    each id has one, then `settle` seconds more so a late duplicate would show."""
    nc, sub = await reply_subscription(nats_url, since=None)
    got: dict[str, list] = {}
    loop = asyncio.get_running_loop()
    deadline, settled = loop.time() + timeout, None
    try:
        while loop.time() < (settled or deadline):
            if settled is None and ids <= set(got):
                settled = loop.time() + settle
            try:
                msg = await sub.next_msg(timeout=0.5)
            except Exception:  # nothing new right now
                continue
            ev = from_nats(msg.headers, msg.data)
            if ev.get_subject() in ids and ev.get_type() in (COMPLETED, FAILED):
                got.setdefault(ev.get_subject(), []).append(ev)
    finally:
        await nc.close()
    return got


async def http_post(stack, event, mode="binary"):
    msg = to_binary_event(event) if mode == "binary" else to_structured_event(event)
    async with httpx.AsyncClient() as client:
        r = await client.post(stack.ingress_url, headers=dict(msg.headers), content=msg.body)
    assert r.status_code == 202, r.text


async def check_video(stack, reply, tmp_path, kind):
    from turboflow.engine.video import probe_video

    assert reply.get_type() == COMPLETED, data_of(reply)
    data = data_of(reply)
    assert data["kind"] == kind
    path = await asyncio.to_thread(download, data, tmp_path)
    info = probe_video(path)
    assert (info.width, info.height, info.num_frames) == (data["width"], data["height"], data["num_frames"])
    return data


async def test_t2v_and_i2v_via_http_ingress(stack, completions, tmp_path):
    s3 = stack.s3_client()
    s3.put_object(
        Bucket=stack.cfg.bucket, Key="uploads/default/red.png", Body=png(), Metadata={"turboflow-request": "e2e"}
    )  # an input, not an upload-triggered request
    t2v = build_request("t2v", "a red fox running in the snow", options=SMALL, tenant="acme")
    i2v = build_request("i2v", "the sun rises", options=SMALL, image=f"s3://{stack.cfg.bucket}/uploads/default/red.png")
    await http_post(stack, t2v, "binary")
    await http_post(stack, i2v, "structured")
    (a,) = await completions.wait_for(is_reply_to(t2v.get_id()), timeout=90)
    (b,) = await completions.wait_for(is_reply_to(i2v.get_id()), timeout=90)
    data = await check_video(stack, a, tmp_path, "t2v")
    assert data["tenant"] == "acme" and a.get_attributes()["tenant"] == "acme"
    assert a.get_id() != t2v.get_id()  # completions have their own ids
    await check_video(stack, b, tmp_path, "i2v")


async def test_t2v_and_i2v_via_nats(stack, completions, tmp_path):
    import nats

    inline = "data:image/png;base64," + base64.b64encode(png((20, 160, 90))).decode()
    t2v = build_request("t2v", "a boat on a river at night", options=SMALL)
    i2v = build_request("i2v", "a forest in the rain", options=SMALL, image=inline)
    nc = await nats.connect(stack.nats.url)
    js = nc.jetstream()
    await publish_event(js, t2v, mode="binary")
    await publish_event(js, i2v, mode="structured")
    await nc.close()
    (a,) = await completions.wait_for(is_reply_to(t2v.get_id()), timeout=90)
    (b,) = await completions.wait_for(is_reply_to(i2v.get_id()), timeout=90)
    await check_video(stack, a, tmp_path, "t2v")
    await check_video(stack, b, tmp_path, "i2v")


async def test_invalid_request_gets_failed_reply_not_retried(stack, completions):
    bad = build_request("t2v", "x", options={"num_frames": 80})
    await http_post(stack, bad)
    (reply,) = await completions.wait_for(is_reply_to(bad.get_id()), timeout=60)
    assert reply.get_type() == FAILED and data_of(reply)["code"] == "invalid_num_frames"


async def test_s3_upload_triggers_i2v(stack, completions, tmp_path):
    s3 = stack.s3_client()
    bucket = stack.cfg.bucket
    # 1) prompt and options in object metadata
    put = s3.put_object(
        Bucket=bucket,
        Key="uploads/studio/cat+1.png",
        Body=png((250, 200, 10)),
        ContentType="image/png",
        Metadata={
            "prompt": "a cat in the sun",
            "num-frames": "1",
            "num_steps": "2",
            "aspect-ratio": "4:3",
            "tenant": "studio",
        },
    )
    rid = request_id_for(bucket, "uploads/studio/cat+1.png", put["ETag"])  # MinIO sends the key URL-encoded (%2B)
    # 2) a sidecar JSON written before the image
    s3.put_object(
        Bucket=bucket,
        Key="uploads/default/dog.jpg.json",
        Body=json.dumps({"prompt": "a dog on a beach", **SMALL, "comment": "ignored"}).encode(),
    )
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 200)).save(buf, format="JPEG")
    put2 = s3.put_object(Bucket=bucket, Key="uploads/default/dog.jpg", Body=buf.getvalue(), ContentType="image/jpeg")
    rid2 = request_id_for(bucket, "uploads/default/dog.jpg", put2["ETag"])
    # 3) not under the prefix / not an image: nothing happens
    s3.put_object(Bucket=bucket, Key="elsewhere/x.png", Body=png(), Metadata={"prompt": "no"})
    s3.put_object(Bucket=bucket, Key="uploads/default/notes.txt", Body=b"hello", Metadata={"prompt": "no"})
    s3.put_object(
        Bucket=bucket, Key="uploads/studio/steal.png", Body=png(), Metadata={"prompt": "no", "tenant": "victim"}
    )
    # 4) a key the contract cannot reference (whitespace): the uploader gets a failed event, not silence
    put3 = s3.put_object(Bucket=bucket, Key="uploads/default/with space.png", Body=png(), Metadata={"prompt": "x"})
    rid3 = request_id_for(bucket, "uploads/default/with space.png", put3["ETag"])

    (a,) = await completions.wait_for(is_reply_to(rid), timeout=90)
    (b,) = await completions.wait_for(is_reply_to(rid2), timeout=90)
    data = await check_video(stack, a, tmp_path, "i2v")
    assert data["tenant"] == "studio" and data["num_frames"] == 1
    await check_video(stack, b, tmp_path, "i2v")
    (c,) = await completions.wait_for(is_reply_to(rid3), timeout=60)
    assert c.get_type() == FAILED and data_of(c)["code"] == "invalid_image_reference"
    await asyncio.sleep(1.0)
    requests = [
        e for e in completions.events if e.get_type() == COMPLETED and e.get_source() == "/turboflow/functions/i2v"
    ]
    assert len([e for e in requests if e.get_subject() in (rid, rid2)]) == 2


async def test_function_sigkilled_mid_generation_is_redelivered(stack, completions, tmp_path):
    fn = stack.functions["t2v"]
    restarts = fn.restarts
    # 5 frames: seconds of generating on the CPU, the window in which the kill lands
    req = build_request("t2v", "a robot walking in the city", options={**SMALL, "num_frames": 5})
    await http_post(stack, req)
    async with httpx.AsyncClient() as client:  # wait until the function is generating it
        for _ in range(200):
            text = (await client.get(fn.url + "metrics")).text
            if any(
                line.startswith("turboflow_inflight_requests") and not line.rstrip().endswith(" 0.0")
                for line in text.splitlines()
            ):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the function never started generating")
    old_pid = fn.pid
    os.kill(old_pid, signal.SIGKILL)
    (reply,) = await completions.wait_for(is_reply_to(req.get_id()), timeout=180)
    await check_video(stack, reply, tmp_path, "t2v")
    assert fn.restarts == restarts + 1 and fn.pid != old_pid
    await asyncio.sleep(0.5)
    assert len([e for e in completions.events if is_reply_to(req.get_id())(e)]) == 1


async def test_ten_requests_sent_twice_give_one_object_and_one_completion_each(stack):
    reqs = [
        build_request("t2v", f"a bird flying over the sea number {i}", options=SMALL, tenant="bulk") for i in range(10)
    ]
    for i, r in enumerate(reqs):  # every request submitted twice, half over HTTP, half straight to NATS
        await http_post(stack, r)
        if i % 2:
            await http_post(stack, r, "structured")
        else:
            import nats

            nc = await nats.connect(stack.nats.url)
            await publish_event(nc.jetstream(), r)
            await nc.close()
    ids = {r.get_id() for r in reqs}
    got = await replies_in_stream(stack.nats.url, ids, timeout=180, settle=2.0)
    assert set(got) == ids
    assert all(len(v) == 1 and v[0].get_type() == COMPLETED for v in got.values()), {
        k: [e.get_type() for e in v] for k, v in got.items() if len(v) != 1
    }
    s3 = stack.s3_client()
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.cfg.bucket, Prefix="videos/bulk/")
        for o in page.get("Contents", [])
        if o["Key"].endswith(".mp4")
    ]
    assert sorted(k.rsplit("/", 1)[1][:-4] for k in keys) == sorted(ids)


async def test_nats_server_killed_and_restarted_loses_no_accepted_request(stack, tmp_path):
    reqs = [build_request("t2v", f"a snowy mountain {i}", options=SMALL) for i in range(3)]
    for r in reqs:
        await http_post(stack, r)  # 202 = stored in JetStream's file store
    stack.nats.stop(kill=True)  # SIGKILL while requests are queued / being delivered
    stack.nats.start()  # same port and store
    more = build_request("t2v", "after the restart", options=SMALL)
    for _ in range(100):  # the ingress answers 503 until it has reconnected
        msg = to_binary_event(more)
        async with httpx.AsyncClient() as client:
            r = await client.post(stack.ingress_url, headers=dict(msg.headers), content=msg.body)
        if r.status_code == 202:
            break
        assert r.status_code == 503
        await asyncio.sleep(0.1)
    ids = {r.get_id() for r in reqs + [more]}
    got = await replies_in_stream(stack.nats.url, ids, timeout=150)
    assert set(got) == ids and all(v[0].get_type() == COMPLETED for v in got.values())


async def test_submit_cli_waits_and_downloads(stack, tmp_path, monkeypatch):
    from turboflow.cli import main

    monkeypatch.setenv("TURBOFLOW_DEV_STATE", str(tmp_path / "none.json"))
    monkeypatch.setenv("TURBOFLOW_BROKER_URL", stack.ingress_url)
    monkeypatch.setenv("TURBOFLOW_NATS_URL", stack.nats.url)
    out = tmp_path / "out"
    rid = str(uuid.uuid4())
    argv = [
        "submit",
        "t2v",
        "a golden sun over the sea",
        "--num-frames",
        "1",
        "--num-steps",
        "2",
        "--aspect-ratio",
        "4:3",
        "--id",
        rid,
        "--wait",
        "--out",
        str(out),
        "--timeout",
        "120",
    ]
    code = await asyncio.to_thread(main, argv)
    assert code == 0 and (out / f"{rid}.mp4").stat().st_size > 0
    # resubmitting the same id: the completion was de-duplicated in the stream, yet submit still finds it
    code = await asyncio.to_thread(main, argv[:-2] + ["--via", "nats", "--timeout", "60"])
    assert code == 0
