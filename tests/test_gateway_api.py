"""The gateway's front door over real HTTP (tests/gateway_harness.py: nats-server, moto S3, a recording broker
sink, hypercorn): create/get/list/cancel, validation, conflicts, limits, uploads, problem bodies, OpenAPI."""

from __future__ import annotations

import base64
import io
import json

import boto3
import httpx
import pytest
from gateway_harness import BUCKET, SIGNING_KEY, gateway_stack  # noqa: F401 (fixture)

from turboflow.eventing.contracts import lifecycle_event, parse_request
from turboflow.eventing.signing import verify_event
from turboflow.eventing.types import CANCELLED, COMPLETED, STARTED, T2V_REQUESTED
from turboflow.gateway import app as gateway_app
from turboflow.gateway.problems import ApiProblem
from turboflow.gateway.requests import check_webhook_url

PROBLEM = "application/problem+json"
T2V = {"task": "t2v", "prompt": "a red fox in the snow", "num_frames": 17, "seed": 7}


@pytest.fixture
def client(gateway_stack):  # noqa: F811
    """(httpx client, tenant) with a fresh tenant and key."""
    tenant = gateway_stack.tenant()
    with httpx.Client(base_url=gateway_stack.url, headers=gateway_stack.auth(gateway_stack.api_key(tenant))) as c:
        yield c, tenant


def png_bytes(size=(64, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def assert_problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["code"] == code, body
    assert body["type"].endswith("/" + code) and body["title"] and body["detail"]
    return body


def test_create_emits_the_request_event_and_stores_a_queued_record(gateway_stack, client):  # noqa: F811
    c, tenant = client
    r = c.post("/v1/videos", json=T2V)
    assert r.status_code == 201, r.text
    video = r.json()
    assert video["status"] == "queued" and video["task"] == "t2v" and video["queue_position"] >= 1
    assert video["input"] == {k: v for k, v in T2V.items() if k != "task"}
    assert video["urls"]["get"] == f"{gateway_stack.url}/v1/videos/{video['id']}"
    assert video["urls"]["stream"].endswith(f"/v1/videos/{video['id']}/events")

    [event] = gateway_stack.emitted_for(video["id"])
    attrs = event.get_attributes()
    assert attrs["type"] == T2V_REQUESTED and attrs["source"] == "/turboflow/gateway"
    assert attrs["tenant"] == tenant and attrs["time"] is not None
    # the function computes the same input hash from the event it receives
    record, _ = gateway_stack.run(gateway_stack.states.get(tenant, video["id"]))
    assert record.input_sha256 == parse_request(event).input_sha256

    assert c.get(video["urls"]["get"]).json()["id"] == video["id"]


def test_invalid_requests_list_every_field_and_emit_nothing(gateway_stack, client):  # noqa: F811
    c, _ = client
    before = len(gateway_stack.emitted)
    body = assert_problem(
        c.post("/v1/videos", json={"task": "t2v", "prompt": "", "num_steps": 9, "tenant": "other", "colour": 1}),
        422,
        "invalid_request",
    )
    assert {(e["field"], e["code"]) for e in body["errors"]} == {
        ("tenant", "tenant_not_allowed"),
        ("prompt", "invalid_prompt"),
        ("num_steps", "invalid_num_steps"),
        ("colour", "unknown_field"),
    }
    # engine rules run on the very event that would be emitted
    body = assert_problem(c.post("/v1/videos", json={**T2V, "num_frames": 18}), 422, "invalid_request")
    assert body["errors"][0]["code"] == "invalid_num_frames"
    assert_problem(c.post("/v1/videos", json={"prompt": "x"}), 422, "invalid_request")
    assert_problem(c.post("/v1/videos", json={**T2V, "id": "../etc"}), 422, "invalid_request")
    assert_problem(c.post("/v1/videos", json=[1, 2]), 422, "invalid_request")
    assert_problem(
        c.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_json"
    )
    assert_problem(
        c.post("/v1/videos", content=b"prompt=x", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"
    )
    assert len(gateway_stack.emitted) == before


def test_unknown_routes_methods_and_ids_are_problems(gateway_stack, client):  # noqa: F811
    c, _ = client
    assert_problem(c.get("/v1/nothing-here"), 404, "not_found")
    assert_problem(c.delete("/v1/videos"), 405, "method_not_allowed")
    assert_problem(c.get("/v1/videos/no-such-id"), 404, "not_found")
    assert_problem(c.get("/v1/videos", params={"limit": 0}), 422, "invalid_request")
    assert_problem(c.get("/v1/videos", params={"status": "nope"}), 422, "invalid_request")


def test_another_tenants_request_is_not_found(gateway_stack, client):  # noqa: F811
    c, _ = client
    video = c.post("/v1/videos", json=T2V).json()
    other = gateway_stack.auth(gateway_stack.api_key(gateway_stack.tenant()))
    assert_problem(httpx.get(video["urls"]["get"], headers=other), 404, "not_found")
    assert_problem(httpx.post(video["urls"]["cancel"], headers=other), 404, "not_found")
    listed = httpx.get(gateway_stack.url + "/v1/videos", headers=other).json()
    assert listed == {"data": [], "next_cursor": None}


def test_reused_id_replays_or_conflicts(gateway_stack, client):  # noqa: F811
    c, _ = client
    body = {**T2V, "id": "my-video.1"}
    first = c.post("/v1/videos", json=body)
    assert first.status_code == 201
    again = c.post("/v1/videos", json=body)
    assert again.status_code == 200 and again.json()["id"] == "my-video.1"
    assert_problem(c.post("/v1/videos", json={**body, "prompt": "something else"}), 409, "id_conflict")
    assert len(gateway_stack.emitted_for("my-video.1")) == 1


def test_idempotency_key_replays_or_conflicts(gateway_stack, client):  # noqa: F811
    c, _ = client
    headers = {"Idempotency-Key": "order-42"}
    first = c.post("/v1/videos", json=T2V, headers=headers)
    assert first.status_code == 201
    again = c.post("/v1/videos", json=T2V, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert_problem(c.post("/v1/videos", json={**T2V, "seed": 8}, headers=headers), 409, "idempotency_conflict")
    assert len(gateway_stack.emitted_for(first.json()["id"])) == 1


def test_tenant_limit_answers_429_with_retry_after(gateway_stack, client):  # noqa: F811
    c, _ = client
    limit = gateway_stack.settings.tenant_max_active
    ids = [c.post("/v1/videos", json=T2V).json()["id"] for _ in range(limit)]
    body = assert_problem(c.post("/v1/videos", json=T2V), 429, "too_many_requests")
    assert body["retry_after"] > 0 and int(c.post("/v1/videos", json=T2V).headers["retry-after"]) > 0
    assert c.post(f"/v1/videos/{ids[0]}/cancel").status_code == 202  # a finished one frees a slot
    assert c.post("/v1/videos", json=T2V).status_code == 201


def test_a_spent_monthly_budget_answers_429_quota_exceeded(gateway_stack, client):  # noqa: F811
    from datetime import UTC, datetime

    c, tenant = client
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    usage = {"gpu_seconds": 60.0, "cold_start": False, "model_load_seconds": 0.0, "device": "cuda:0"}
    fact = {
        "specversion": "1.0",
        "id": f"quota-{tenant}",
        "source": "/turboflow/functions/t2v",
        "type": "io.turboflow.video.completed",
        "time": now,
        "data": {"request_id": "q", "tenant": tenant, "kind": "t2v", "usage": usage, "completed_at": now},
    }
    gateway_stack.service.ledger.record(fact)
    service, before = gateway_stack.service, gateway_stack.service.settings
    service.settings = before.replace(tenant_monthly_gpu_seconds=((tenant, 60.0), ("*", 1e9)))
    try:
        body = assert_problem(c.post("/v1/videos", json=T2V), 429, "quota_exceeded")
        assert body["limit"] == "monthly_gpu_seconds" and body["resets_at"].endswith("-01T00:00:00Z")
        assert body["retry_after"] > 0 and "60.0 of 60.0" in body["detail"]
        service.settings = before.replace(tenant_monthly_gpu_seconds=((tenant, 61.0),))
        assert c.post("/v1/videos", json=T2V).status_code == 201  # under budget again
    finally:
        service.settings = before


def test_broker_refusal_is_503_and_a_retry_goes_through(gateway_stack, client):  # noqa: F811
    c, tenant = client
    headers = {"Idempotency-Key": f"retry-{tenant}"}
    gateway_stack.sink.status = 503
    try:
        refused = c.post("/v1/videos", json={**T2V, "id": "not-accepted"}, headers=headers)
        assert_problem(refused, 503, "broker_unavailable")
        assert_problem(c.get("/v1/videos/not-accepted"), 404, "not_found")  # never accepted: nothing to show
    finally:
        gateway_stack.sink.status = 202
    retried = c.post("/v1/videos", json={**T2V, "id": "not-accepted"}, headers=headers)
    assert retried.status_code == 201 and retried.json()["status"] == "queued"
    assert len(gateway_stack.emitted_for("not-accepted")) == 1  # the refused attempt was not recorded as sent


def test_cancel_queued_running_and_finished(gateway_stack, client):  # noqa: F811
    c, tenant = client
    queued = c.post("/v1/videos", json=T2V).json()
    r = c.post(queued["urls"]["cancel"])
    assert r.status_code == 202 and r.json()["status"] == "cancelled" and r.json()["cancel_requested"]
    [announced] = [e for e in gateway_stack.emitted_for(queued["id"]) if e.get_type() == CANCELLED]
    assert verify_event(announced, SIGNING_KEY)
    assert c.post(queued["urls"]["cancel"]).status_code == 200

    ctx = {"request_id": None, "tenant": tenant, "kind": "t2v", "request_source": "/turboflow/gateway"}
    running = c.post("/v1/videos", json=T2V).json()
    started = lifecycle_event(
        STARTED,
        {**ctx, "request_id": running["id"]},
        {
            "pod": "p",
            "cold_start": False,
            "model_load_seconds": 0,
            "queue_wait": 0.1,
            "started_at": "2026-01-01T00:00:00Z",
        },
        source="/turboflow/functions/t2v",
        signing_key=SIGNING_KEY,
    )
    gateway_stack.run(gateway_stack.states.apply_event(started))
    r = c.post(running["urls"]["cancel"])
    assert r.status_code == 202 and r.json()["status"] == "running" and r.json()["cancel_requested"] is True

    done = c.post("/v1/videos", json=T2V).json()
    gateway_stack.run(gateway_stack.states.apply_event(completed(ctx, done["id"], "videos/x/done.mp4")))
    assert_problem(c.post(done["urls"]["cancel"]), 409, "not_cancellable")


def completed(ctx: dict, request_id: str, key: str, body: bytes = b"mp4"):
    import hashlib

    data = {
        "model": "tiny",
        "video": {"uri": f"s3://{BUCKET}/{key}", "bucket": BUCKET, "key": key, "bytes": len(body),
                  "sha256": hashlib.sha256(body).hexdigest(), "content_type": "video/mp4",
                  "url": "https://stale.example/x", "url_expires_at": "2026-01-01T00:00:00Z"},
        "width": 640, "height": 480, "num_frames": 17, "fps": 16.0, "duration": 1.0625, "seed": 7, "num_steps": 4,
        "sigma_max": 80.0, "timings": {"total": 1.5}, "completed_at": "2026-01-01T00:01:00Z",
        "usage": {"gpu_seconds": 1.25, "cold_start": False, "model_load_seconds": 0.0, "device": "cpu"},
    }  # fmt: skip
    return lifecycle_event(
        COMPLETED, {**ctx, "request_id": request_id}, data, source="/turboflow/functions/t2v", signing_key=SIGNING_KEY
    )


def test_completed_video_has_a_fresh_presigned_url(gateway_stack, client):  # noqa: F811
    c, tenant = client
    video = c.post("/v1/videos", json=T2V).json()
    key = f"videos/{tenant}/{video['id']}.mp4"
    boto3.client("s3", endpoint_url=gateway_stack.settings.s3_endpoint_url, region_name="us-east-1").put_object(
        Bucket=BUCKET, Key=key, Body=b"not really an mp4"
    )
    ctx = {"tenant": tenant, "kind": "t2v", "request_source": "/turboflow/gateway"}
    gateway_stack.run(gateway_stack.states.apply_event(completed(ctx, video["id"], key, b"not really an mp4")))
    output = c.get(video["urls"]["get"]).json()["output"]
    assert output["uri"] == f"s3://{BUCKET}/{key}" and output["gpu_seconds"] == 1.25 and output["width"] == 640
    assert output["url"] != "https://stale.example/x"
    assert httpx.get(output["url"]).content == b"not really an mp4"


def test_list_pages_newest_first_with_an_opaque_cursor(gateway_stack, client):  # noqa: F811
    c, _ = client
    ids = []
    for n in range(5):
        ids.append(c.post("/v1/videos", json={**T2V, "id": f"page-{n}"}).json()["id"])
        c.post(f"/v1/videos/{ids[-1]}/cancel")  # stay under the tenant's limit
    seen, cursor = [], None
    while True:
        page = c.get("/v1/videos", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["data"]) <= 2
        seen += [v["id"] for v in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert [v["id"] for v in c.get("/v1/videos", params={"status": "cancelled"}).json()["data"]] == ids[::-1]
    assert c.get("/v1/videos", params={"status": "queued"}).json()["data"] == []
    assert_problem(c.get("/v1/videos", params={"cursor": "garbage!"}), 422, "invalid_cursor")


def test_i2v_images_from_the_tenants_prefix_inline_or_uploaded(gateway_stack, client):  # noqa: F811
    c, tenant = client
    i2v = {"task": "i2v", "prompt": "the cat turns", "num_frames": 17}
    body = assert_problem(
        c.post("/v1/videos", json={**i2v, "image": f"s3://{BUCKET}/uploads/someone-else/cat.png"}),
        422,
        "image_not_allowed",
    )
    assert body["errors"][0]["field"] == "image"
    assert_problem(
        c.post("/v1/videos", json={**i2v, "image": "s3://other-bucket/uploads/x/cat.png"}),
        422,
        "image_bucket_not_allowed",
    )
    own = c.post("/v1/videos", json={**i2v, "image": f"s3://{BUCKET}/uploads/{tenant}/cat.png"})
    assert own.status_code == 201, own.text
    inline = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    r = c.post("/v1/videos", json={**i2v, "image": inline})
    assert r.status_code == 201 and r.json()["input"]["image"].startswith("(inline image")
    too_big = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(600 << 10)).decode()
    assert_problem(c.post("/v1/videos", json={**i2v, "image": too_big}), 413, "payload_too_large")
    c.post(f"/v1/videos/{own.json()['id']}/cancel")
    c.post(f"/v1/videos/{r.json()['id']}/cancel")

    image = png_bytes()
    r = c.post("/v1/videos", data={"request": json.dumps(i2v)}, files={"image": ("cat.png", image, "image/png")})
    assert r.status_code == 201, r.text
    uri = r.json()["input"]["image"]
    assert uri.startswith(f"s3://{BUCKET}/uploads/{tenant}/gateway/") and uri.endswith(".png")
    s3 = boto3.client("s3", endpoint_url=gateway_stack.settings.s3_endpoint_url, region_name="us-east-1")
    stored = s3.get_object(Bucket=BUCKET, Key=uri.split("/", 3)[3])
    assert stored["Body"].read() == image and stored["Metadata"]["turboflow-request"] == r.json()["id"]
    [event] = gateway_stack.emitted_for(r.json()["id"])
    assert parse_request(event).image.uri == uri
    not_image = c.post(
        "/v1/videos", data={"request": json.dumps(i2v)}, files={"image": ("x.png", b"hello", "image/png")}
    )
    assert_problem(not_image, 422, "invalid_request")
    no_image = c.post("/v1/videos", files={"request": (None, json.dumps(i2v))})  # multipart without the image part
    assert_problem(no_image, 422, "invalid_request")


def test_webhook_urls_are_checked(gateway_stack, client):  # noqa: F811
    c, _ = client
    assert_problem(c.post("/v1/videos", json={**T2V, "webhook": "ftp://example.com/x"}), 422, "webhook_not_allowed")
    body = assert_problem(c.post("/v1/videos", json={**T2V, "webhook_events": ["completed"]}), 422, "invalid_request")
    assert body["errors"][0]["field"] == "webhook_events"
    r = c.post("/v1/videos", json={**T2V, "webhook": "http://127.0.0.1:9/hook", "webhook_events": ["completed"]})
    assert r.status_code == 201  # the harness allows private addresses (dev)
    assert r.json()["webhook"] == {"url": "http://127.0.0.1:9/hook", "events": ["completed"], "attempts": []}


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1/x", "http://10.1.2.3/x", "http://[::1]/x", "http://169.254.169.254/"]
)
async def test_private_webhook_addresses_are_refused_unless_allowed(url):
    with pytest.raises(ApiProblem) as refused:
        await check_webhook_url(url, allow_private=False)
    assert refused.value.code == "webhook_not_allowed"
    await check_webhook_url(url, allow_private=True)


def test_committed_openapi_document_is_current():
    expected = gateway_app.render_openapi()
    assert gateway_app.OPENAPI_PATH.exists(), "run: python -m turboflow.gateway.app --write-openapi"
    assert gateway_app.OPENAPI_PATH.read_text() == expected, "stale: python -m turboflow.gateway.app --write-openapi"
    document = json.loads(expected)
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    create = document["paths"]["/v1/videos"]["post"]
    assert PROBLEM in create["responses"]["422"]["content"]
    assert set(create["requestBody"]["content"]) == {"application/json", "multipart/form-data"}


def test_the_tenant_limit_holds_under_concurrent_submissions(gateway_stack, client):  # noqa: F811
    """Counted after the record exists: twenty parallel POSTs with room for three accept exactly three."""
    from concurrent.futures import ThreadPoolExecutor

    c, tenant = client
    limit = gateway_stack.settings.tenant_max_active
    key = c.headers["authorization"]

    def post(n: int) -> int:
        with httpx.Client(base_url=gateway_stack.url, headers={"authorization": key}, timeout=30) as own:
            return own.post("/v1/videos", json={**T2V, "seed": n}).status_code

    with ThreadPoolExecutor(max_workers=10) as pool:
        codes = list(pool.map(post, range(20)))
    assert codes.count(201) <= limit and set(codes) <= {201, 429}
    listed = c.get("/v1/videos?status=queued").json()["data"]
    assert len(listed) == codes.count(201)  # the refused ones left nothing behind


def test_a_lone_surrogate_is_invalid_json_not_a_500(client):
    c, _ = client
    body = b'{"task": "t2v", "prompt": "\\ud800"}'
    r = c.post("/v1/videos", content=body, headers={"content-type": "application/json"})
    assert_problem(r, 400, "invalid_json")


def test_a_multipart_upload_without_a_length_is_refused(client):
    c, _ = client
    boundary = "b0undary"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="request"\r\n\r\n{json.dumps(T2V)}\r\n--{boundary}--\r\n'
    ).encode()

    def chunks():  # a generator body: httpx sends it chunked, without Content-Length
        yield part

    r = c.post("/v1/videos", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert_problem(r, 411, "length_required")


def test_an_id_first_seen_from_a_producer_is_not_replayed_to_a_gateway_client(gateway_stack, client):  # noqa: F811
    """A record made from a broker event has no input hash: the same id through the gateway is a conflict, never
    someone else's request handed back as a replay."""
    c, tenant = client
    event = {
        "specversion": "1.0",
        "id": "squatted-1",
        "source": "/somewhere",
        "type": T2V_REQUESTED,
        "tenant": tenant,
        "datacontenttype": "application/json",
        "data": {"prompt": "not yours"},
    }
    internal = httpx.post(
        f"{gateway_stack.url}/internal/events",
        content=json.dumps(event),
        headers={"content-type": "application/cloudevents+json"},
    )
    assert internal.status_code in (200, 202)
    assert_problem(c.post("/v1/videos", json={**T2V, "id": "squatted-1"}), 409, "id_conflict")
    # and producers' requests do not count against the tenant's limit
    for n in range(gateway_stack.settings.tenant_max_active + 1):
        event = {**event, "id": f"producer-{n}"}
        httpx.post(
            f"{gateway_stack.url}/internal/events",
            content=json.dumps(event),
            headers={"content-type": "application/cloudevents+json"},
        )
    assert c.post("/v1/videos", json=T2V).status_code == 201
