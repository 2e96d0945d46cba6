"""Units of the eventing package: Trigger filters and delivery, the dead-letter conversion, the S3 source."""

from __future__ import annotations

import io
import json
import uuid

import pytest
from cloudevents.core.v1.event import CloudEvent

from turboflow.eventing.deadletter import failed_for
from turboflow.eventing.s3source import (
    BucketNotifier,
    S3Source,
    S3SourceConfig,
    minio_record,
    records_of,
    request_id_for,
)
from turboflow.eventing.triggers import Delivery, Destination, Trigger, TriggerError, matches, parse_duration


@pytest.mark.parametrize("text,seconds", [("PT10M", 600), ("PT0.5S", 0.5), ("P1DT2H", 93600), ("PT1H30M5S", 5405)])
def test_iso_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["10m", "PT", "P", "PTX"])
def test_bad_durations(bad):
    with pytest.raises(TriggerError):
        parse_duration(bad)


ATTRS = {"type": "io.turboflow.video.t2v.requested", "source": "/a/b", "tenant": "acme", "id": "1"}


@pytest.mark.parametrize(
    "expr,want",
    [
        ({"exact": {"type": "io.turboflow.video.t2v.requested"}}, True),
        ({"exact": {"type": "io.turboflow.video.t2v.requested", "tenant": "other"}}, False),
        ({"prefix": {"type": "io.turboflow.video."}}, True),
        ({"suffix": {"type": ".requested"}}, True),
        ({"suffix": {"type": ".completed"}}, False),
        ({"exact": {"missing": ""}}, False),
        ({"all": [{"prefix": {"source": "/a"}}, {"exact": {"tenant": "acme"}}]}, True),
        ({"any": [{"exact": {"tenant": "x"}}, {"exact": {"tenant": "acme"}}]}, True),
        ({"not": {"exact": {"tenant": "acme"}}}, False),
    ],
)
def test_filter_dialects(expr, want):
    assert matches(expr, ATTRS) is want


def test_trigger_manifest_parsing_and_legacy_filter():
    doc = {
        "apiVersion": "eventing.knative.dev/v1",
        "kind": "Trigger",
        "metadata": {"name": "t", "namespace": "ns"},
        "spec": {
            "broker": "b",
            "filter": {"attributes": {"type": "x", "source": ""}},
            "subscriber": {"ref": {"kind": "Service", "name": "svc"}, "uri": "/path"},
            "delivery": {"retry": 2, "backoffPolicy": "linear", "backoffDelay": "PT1S"},
        },
    }
    t = Trigger.from_manifest(doc)
    assert t.matches({"type": "x", "source": "/anything"}) and not t.matches({"type": "y"})
    assert t.subscriber.resolve({"Service/ns/svc": "http://127.0.0.1:9/base/"}) == "http://127.0.0.1:9/path"
    assert [t.delivery.backoff(n) for n in (1, 2, 3)] == [1, 2, 3]
    with pytest.raises(TriggerError):
        t.subscriber.resolve({})
    doc["spec"]["filters"] = [{"cesql": "type = 'x'"}]
    with pytest.raises(TriggerError, match="cesql"):
        Trigger.from_manifest(doc)


def test_exponential_backoff():
    d = Delivery(retry=3, backoff_policy="exponential", backoff_delay=5)
    assert [d.backoff(n) for n in (1, 2, 3)] == [5, 10, 20]
    assert Destination(uri="http://x/").resolve({}) == "http://x/"


def _request(**attrs):
    base = {
        "type": "io.turboflow.video.i2v.requested",
        "source": "/p",
        "id": "req-1",
        "tenant": "acme",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    return CloudEvent(attributes={**base, **attrs}, data={"prompt": "x"})


def test_dead_letter_turns_an_undeliverable_request_into_failed():
    import base64

    ev = _request(
        knativeerrorcode="503",
        knativeerrordest="http://turboflow-i2v.turboflow.svc/",
        knativeerrordata=base64.b64encode(b'{"error": "device_busy", "message": "GPU busy"}').decode(),
    )
    failed = failed_for(ev)
    data = failed.get_data()
    assert failed.get_type() == "io.turboflow.video.failed" and failed.get_subject() == "req-1"
    assert data["code"] == "delivery_failed" and data["request_id"] == "req-1"
    assert data["retryable"] is True and data["cause"] == {"code": "device_busy", "status": 503, "retryable": True}
    assert "HTTP 503" in data["message"] and "GPU busy" in data["message"] and "turboflow-i2v" in data["message"]
    attrs = failed.get_attributes()
    assert attrs["tenant"] == "acme" and attrs["traceparent"].startswith("00-0af7")
    assert failed.get_id() == failed_for(ev).get_id() != "req-1"  # stable id: JetStream keeps one copy
    timeout = failed_for(_request(knativeerrordest="http://x/"))
    assert "timeout or connection failure" in timeout.get_data()["message"]
    assert timeout.get_data()["retryable"] is True and timeout.get_data()["cause"] == {"retryable": True}
    assert (
        failed_for(CloudEvent(attributes={"type": "io.turboflow.video.completed", "source": "/f", "id": "c"}, data={}))
        is None
    )


def test_dead_letter_carries_the_last_cause_and_is_signed():
    """An S3 outage outlasting the retries: the function said storage_unavailable/retryable, and so does the
    failed event; a terminal 4xx stays non-retryable. Failed events are valid against the schema and signed."""
    import base64

    from turboflow.eventing import signing
    from turboflow.eventing.contracts import validate_data

    key = signing.new_signing_key().encode()
    outage = b'{"error": "storage_unavailable", "message": "S3 is unreachable", "retryable": true}'
    failed = failed_for(
        _request(
            knativeerrorcode="503", knativeerrordest="http://f/", knativeerrordata=base64.b64encode(outage).decode()
        ),
        key,
    )
    data = failed.get_data()
    assert data["retryable"] is True and data["cause"] == {
        "code": "storage_unavailable",
        "status": 503,
        "retryable": True,
    }
    validate_data("io.turboflow.video.failed", data)
    assert signing.verify_event(failed, key) and not signing.verify_event(failed, b"x" * 32)
    terminal = b'{"error": "invalid_num_frames", "message": "not 4k+1", "retryable": false}'
    data = failed_for(
        _request(
            knativeerrorcode="400", knativeerrordest="http://f/", knativeerrordata=base64.b64encode(terminal).decode()
        ),
        key,
    ).get_data()
    assert data["retryable"] is False and data["cause"] == {
        "code": "invalid_num_frames",
        "status": 400,
        "retryable": False,
    }
    plain_4xx = failed_for(_request(knativeerrorcode="404", knativeerrordest="http://f/"), key).get_data()
    assert plain_4xx["retryable"] is False and plain_4xx["cause"] == {"status": 404, "retryable": False}


# ---- S3 source ---------------------------------------------------------------------------------------------
def png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def bucket(s3_client):
    name = f"src-{uuid.uuid4().hex[:10]}"
    s3_client.create_bucket(Bucket=name)
    return name


def note(s3, bucket, key):
    head = s3.head_object(Bucket=bucket, Key=key)
    return minio_record(bucket, key, head["ETag"].strip('"'), head["ContentLength"])


def test_records_parse_minio_and_aws_shapes():
    rec = minio_record("b", "uploads/a b+c.png", "etag", 3)
    assert rec["Key"] == "b/uploads/a b+c.png" and rec["Records"][0]["s3"]["object"]["key"] == "uploads%2Fa+b%2Bc.png"
    assert records_of(json.dumps(rec)) == rec["Records"]
    assert records_of({"Records": [{"eventName": "ObjectCreated:Put"}]}) == [{"eventName": "ObjectCreated:Put"}]
    with pytest.raises(ValueError):
        records_of(b"[1]")


def test_source_reads_metadata_and_sidecar(s3_client, bucket):
    src = S3Source(s3_client, S3SourceConfig(prefix="uploads/", buckets=(bucket,), tenant="default"))
    s3_client.put_object(
        Bucket=bucket,
        Key="uploads/studio/a.png",
        Body=png(),
        Metadata={
            "prompt": "a cat",
            "num-frames": "17",
            "ode": "true",
            "sla_topk": "0.2",
            "tenant": "studio",
            "unrelated": "x",
        },
    )
    (ev,) = src.events_for(note(s3_client, bucket, "uploads/studio/a.png")["Records"])
    attrs = ev.get_attributes()
    assert attrs["type"] == "io.turboflow.video.i2v.requested" and attrs["tenant"] == "studio"
    assert attrs["subject"] == "uploads/studio/a.png" and attrs["source"] == f"/turboflow/s3source/{bucket}"
    assert ev.get_data() == {
        "prompt": "a cat",
        "num_frames": 17,
        "ode": True,
        "sla_topk": 0.2,
        "image": f"s3://{bucket}/uploads/studio/a.png",
    }
    head = s3_client.head_object(Bucket=bucket, Key="uploads/studio/a.png")
    assert ev.get_id() == request_id_for(bucket, "uploads/studio/a.png", head["ETag"])  # stable per upload
    assert "time" not in attrs  # keyed by the request itself, never by when it was notified
    # the contract validates what the source produces
    from turboflow.eventing.contracts import parse_request

    assert parse_request(ev).request_id == ev.get_id()

    # sidecar wins over metadata; unknown sidecar fields are dropped
    s3_client.put_object(
        Bucket=bucket,
        Key="uploads/studio/a.png.json",
        Body=json.dumps({"prompt": "a dog", "seed": 5, "note": "x"}).encode(),
    )
    (ev2,) = src.events_for(note(s3_client, bucket, "uploads/studio/a.png.json")["Records"])
    assert ev2.get_data()["prompt"] == "a dog" and ev2.get_data()["seed"] == 5 and "note" not in ev2.get_data()
    assert ev2.get_id() == ev.get_id()  # same image upload -> same request (JetStream drops the repeat)


def test_source_tenant_is_the_key_prefix_never_metadata(s3_client, bucket, caplog):
    src = S3Source(s3_client, S3SourceConfig(prefix="uploads/", buckets=(bucket,), tenant="default"))
    cases = {
        "uploads/acme/meta.png": {"prompt": "x", "tenant": "victim"},  # metadata picks another tenant
        "uploads/acme/side.png": {"prompt": "x"},  # ... or the sidecar does
        "uploads/flat.png": {"prompt": "x"},  # directly under uploads/: no tenant
        "uploads/Not_A_Tenant/x.png": {"prompt": "x"},
        "uploads/acme/mine.png": {"prompt": "x", "tenant": "acme"},  # repeating the key's tenant is fine
        "uploads/acme/cli.png": {"prompt": "x", "turboflow-request": "r1"},
    }  # an image for a request
    for key, meta in cases.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=png(), Metadata=meta)
    s3_client.put_object(Bucket=bucket, Key="uploads/acme/side.png.json", Body=b'{"tenant": "victim"}')
    with caplog.at_level("WARNING", logger="turboflow.eventing.s3source"):
        events = src.events_for([note(s3_client, bucket, k)["Records"][0] for k in cases])
    assert [(e.get_subject(), e.get_attributes()["tenant"]) for e in events] == [("uploads/acme/mine.png", "acme")]
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "turboflow.eventing.s3source")
    assert "asks for tenant 'victim'" in text and "uploads/flat.png skipped" in text and "Not_A_Tenant" in text
    assert "cli.png" not in text
    # a source watching one tenant's folder takes its images, and the default tenant names that folder
    only = S3Source(s3_client, S3SourceConfig(prefix="uploads/acme/", buckets=(bucket,), tenant="acme"))
    (ev,) = only.events_for([note(s3_client, bucket, "uploads/acme/mine.png")["Records"][0]])
    assert ev.get_attributes()["tenant"] == "acme"
    other = S3Source(s3_client, S3SourceConfig(prefix="uploads/acme/", buckets=(bucket,), tenant="default"))
    assert other.events_for([note(s3_client, bucket, "uploads/acme/mine.png")["Records"][0]]) == []


def test_source_skips_what_is_not_a_request(s3_client, bucket):
    src = S3Source(s3_client, S3SourceConfig(prefix="uploads/", buckets=(bucket,)))
    s3_client.put_object(Bucket=bucket, Key="other/a.png", Body=png(), Metadata={"prompt": "x"})
    s3_client.put_object(Bucket=bucket, Key="uploads/t/readme.txt", Body=b"x", Metadata={"prompt": "x"})
    s3_client.put_object(Bucket=bucket, Key="uploads/t/noprompt.png", Body=png())
    s3_client.put_object(Bucket=bucket, Key="uploads/t/late.png.json", Body=b'{"prompt": "later"}')
    records = [
        note(s3_client, bucket, k)["Records"][0]
        for k in ("other/a.png", "uploads/t/readme.txt", "uploads/t/noprompt.png", "uploads/t/late.png.json")
    ]
    records.append({**records[0], "eventName": "s3:ObjectRemoved:Delete"})
    assert src.events_for(records) == []
    other = dict(records[2])
    other["s3"] = {**other["s3"], "bucket": {"name": "not-configured"}}
    assert src.events_for([other]) == []
    # the image arrives after its sidecar: its notification emits
    s3_client.put_object(Bucket=bucket, Key="uploads/t/late.png", Body=png())
    (ev,) = src.events_for(note(s3_client, bucket, "uploads/t/late.png")["Records"])
    assert ev.get_data()["prompt"] == "later"
    # a default prompt makes metadata-less uploads usable
    src2 = S3Source(s3_client, S3SourceConfig(prefix="uploads/", default_prompt="animate this"))
    (ev,) = src2.events_for([records[2]])
    assert ev.get_data()["prompt"] == "animate this"


async def test_dev_notifier_publishes_minio_records(s3_client, bucket):
    import asyncio

    import nats

    from turboflow.eventing.natsserver import NatsServer

    s3_client.put_object(Bucket=bucket, Key="uploads/old.png", Body=png())  # baseline: not notified
    with NatsServer() as server:
        notifier = BucketNotifier(
            s3_client, bucket, "uploads/", server.url, subject="minio.test", stream="MTEST", interval=0.1
        )
        nc = await nats.connect(server.url)
        got = []

        async def on_message(m):
            got.append(json.loads(m.data))

        await nc.subscribe("minio.test", cb=on_message)
        stop = asyncio.Event()
        task = asyncio.create_task(notifier.run(stop))
        await asyncio.sleep(0.5)
        s3_client.put_object(Bucket=bucket, Key="uploads/new one.png", Body=png())
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await task
        await nc.close()
    assert len(got) == 1
    (rec,) = records_of(got[0])
    assert rec["eventName"] == "s3:ObjectCreated:Put" and rec["s3"]["bucket"]["name"] == bucket
    assert rec["s3"]["object"]["key"] == "uploads%2Fnew+one.png"


@pytest.mark.parametrize("stream", [None, "MSRC"])
async def test_run_source_posts_requests_to_the_sink(s3_client, bucket, stream):
    """Core NATS (MinIO `jetstream off`) and JetStream (durable, acked after the sink accepted) modes."""
    import asyncio

    import nats
    from eventing_harness import Sink

    from turboflow.eventing.natsserver import NatsServer
    from turboflow.eventing.s3source import run_source

    s3_client.put_object(Bucket=bucket, Key="uploads/t/x.png", Body=png(), Metadata={"prompt": "a fox"})
    src = S3Source(s3_client, S3SourceConfig(prefix="uploads/"))
    with NatsServer() as server:
        async with Sink(lambda ev, n: (202 if n > 1 else 503, None)) as sink:  # first POST fails: retried
            stop = asyncio.Event()
            task = asyncio.create_task(
                run_source(server.url, src, sink.url, stop, subject="minio.x", stream=stream, durable="d")
            )
            await asyncio.sleep(0.5)
            nc = await nats.connect(server.url)
            payload = json.dumps(note(s3_client, bucket, "uploads/t/x.png")).encode()
            if stream:
                await nc.jetstream().publish("minio.x", payload)
            else:
                await nc.publish("minio.x", payload)
            await nc.flush()
            for _ in range(100):
                if len(sink.received) >= 2:
                    break
                await asyncio.sleep(0.05)
            stop.set()
            await task
            if stream:  # acked: nothing pending for the durable
                info = await nc.jetstream().consumer_info(stream, "d")
                assert info.num_ack_pending == 0 and info.num_pending == 0
            await nc.close()
    assert [e.get_data()["prompt"] for e in sink.received] == ["a fox", "a fox"]
