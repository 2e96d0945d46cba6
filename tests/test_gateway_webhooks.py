"""Signed webhooks (gateway/webhooks.py) delivered to a real local HTTP receiver through the JetStream outbox;
signatures checked with the `standardwebhooks` library."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from gateway_event_side import EventSideGateway, completed_event, free_socket, new_webhook_secret, started_event
from standardwebhooks import Webhook

from turboflow.eventing.asgi import lifespan, read_body, respond, serve_asgi
from turboflow.eventing.natsserver import NatsServer, free_port
from turboflow.gateway.webhooks import backoff_seconds, is_public_address, job_msg_id, refused_destination

TERMINAL = ["completed", "failed", "cancelled"]


class Receiver:
    """An HTTP server recording every POST (path, headers, body); `fail[path]` = how many first tries answer 500."""

    def __init__(self):
        self.received: list[tuple[str, dict, bytes]] = []
        self.fail: dict[str, int] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        body = await read_body(receive)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.received.append((scope["path"], headers, body))
        if self.fail.get(scope["path"], 0) > 0:
            self.fail[scope["path"]] -= 1
            return await respond(send, 500, b"not now")
        await respond(send, 204, b"")

    def at(self, path: str) -> list[tuple[dict, bytes]]:
        return [(h, b) for p, h, b in self.received if p == path]


@pytest.fixture(scope="module")
def nats_url():
    with NatsServer() as server:
        yield server.url


@pytest.fixture
async def receiver():
    app, stop, sock = Receiver(), asyncio.Event(), free_socket()
    app.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = asyncio.create_task(serve_asgi(app, "127.0.0.1", 0, stop, sock=sock))
    yield app
    stop.set()
    await server


@pytest.fixture
async def gateway(nats_url, tmp_path):
    secret = new_webhook_secret()
    options = {"backoff_initial": 0.2, "backoff_max": 0.4, "max_attempts": 3, "timeout": 2.0}
    async with EventSideGateway(nats_url, tmp_path / "gateway.db", webhook_secret=secret, **options) as gw:
        gw.secret = secret
        yield gw


def new_id() -> str:
    return "w-" + uuid.uuid4().hex[:12]


async def eventually(condition, timeout: float = 20.0):
    """Wait until condition() is truthy (a deadline, not a timing assertion)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_webhooks_are_signed_standard_webhooks(gateway, receiver):
    request_id = new_id()
    url = receiver.url + "/hook"
    await gateway.create("acme", request_id, webhook={"url": url, "events": ["started", *TERMINAL], "attempts": []})
    await gateway.post_event(started_event("acme", request_id))
    await gateway.post_event(completed_event("acme", request_id))
    await eventually(lambda: len(receiver.at("/hook")) == 2)

    payloads = [Webhook(gateway.secret).verify(body, headers) for headers, body in receiver.at("/hook")]
    assert sorted(p["type"] for p in payloads) == ["video.completed", "video.started"]
    done = next(p for p in payloads if p["type"] == "video.completed")
    assert (done["data"]["id"], done["data"]["status"]) == (request_id, "completed")
    assert done["timestamp"].endswith("Z")
    headers, body = receiver.at("/hook")[0]
    with pytest.raises(Exception):  # noqa: B017 - any verification error: another secret does not verify
        Webhook(new_webhook_secret()).verify(body, headers)
    assert headers["webhook-id"].startswith("msg_") and request_id not in headers["webhook-id"]

    record = await gateway.wait_for("acme", request_id, lambda r: len(r.webhook["attempts"]) == 2)
    assert sorted(a["event"] for a in record.webhook["attempts"]) == ["completed", "started"]
    assert all(a["ok"] and a["status"] == 204 and a["error"] is None for a in record.webhook["attempts"])


async def test_a_failing_receiver_is_retried_and_every_attempt_recorded(gateway, receiver):
    request_id = new_id()
    receiver.fail["/flaky"] = 2
    await gateway.create("acme", request_id, webhook={"url": receiver.url + "/flaky", "events": TERMINAL})
    await gateway.post_event(completed_event("acme", request_id))
    record = await gateway.wait_for("acme", request_id, lambda r: len(r.webhook.get("attempts") or []) == 3)

    attempts = record.webhook["attempts"]
    assert [(a["attempt"], a["ok"], a["status"]) for a in attempts] == [
        (1, False, 500),
        (2, False, 500),
        (3, True, 204),
    ]
    assert attempts[0]["error"] == "HTTP 500"
    deliveries = receiver.at("/flaky")
    assert len({headers["webhook-id"] for headers, _ in deliveries}) == 1  # one message, tried three times
    assert len({body for _, body in deliveries}) == 1
    for headers, body in deliveries:
        Webhook(gateway.secret).verify(body, headers)


async def test_redelivered_events_do_not_send_twice(gateway, receiver):
    request_id = new_id()
    await gateway.create("acme", request_id, webhook={"url": receiver.url + "/once", "events": TERMINAL})
    event = completed_event("acme", request_id)
    for _ in range(3):
        await gateway.post_event(event)
    await eventually(lambda: len(receiver.at("/once")) >= 1)
    # a gateway-side hook for the same change (as a cancel would tell) is dropped by the outbox too
    record, _ = await gateway.states.get("acme", request_id)
    assert await gateway.webhooks.enqueue(record, ["completed"]) == 0
    await gateway.wait_for("acme", request_id, lambda r: len(r.webhook.get("attempts") or []) >= 1)
    await asyncio.sleep(1.0)  # room for a duplicate to show up, were one queued
    assert len(receiver.at("/once")) == 1


async def test_an_unreachable_receiver_fails_without_blocking_others(gateway, receiver):
    down, up = new_id(), new_id()
    dead_url = f"http://127.0.0.1:{free_port()}/nobody"
    await gateway.create("acme", down, webhook={"url": dead_url, "events": TERMINAL})
    await gateway.create("acme", up, webhook={"url": receiver.url + "/alive", "events": TERMINAL})
    await gateway.post_event(completed_event("acme", down))
    await gateway.post_event(completed_event("acme", up))
    await eventually(lambda: len(receiver.at("/alive")) == 1)

    record = await gateway.wait_for("acme", down, lambda r: len(r.webhook.get("attempts") or []) == 3)
    attempts = record.webhook["attempts"]
    assert not any(a["ok"] for a in attempts) and all(a["status"] is None for a in attempts)
    assert "ConnectError" in attempts[0]["error"] and "gave up after 3 tries" in attempts[-1]["error"]


async def test_private_destinations_are_refused_unless_allowed(gateway, receiver):
    gateway.webhooks._allow_private = False
    request_id = new_id()
    await gateway.create("acme", request_id, webhook={"url": receiver.url + "/private", "events": TERMINAL})
    await gateway.post_event(completed_event("acme", request_id))
    record = await gateway.wait_for("acme", request_id, lambda r: bool(r.webhook.get("attempts")))
    (attempt,) = record.webhook["attempts"]
    assert not attempt["ok"] and "non-public address" in attempt["error"]
    assert receiver.at("/private") == []


async def test_unsubscribed_events_and_requests_without_webhooks_send_nothing(gateway, receiver):
    quiet, none = new_id(), new_id()
    await gateway.create("acme", quiet, webhook={"url": receiver.url + "/quiet", "events": ["failed"]})
    await gateway.create("acme", none)
    for request_id in (quiet, none):
        await gateway.post_event(started_event("acme", request_id))
        await gateway.post_event(completed_event("acme", request_id))
    record = (await gateway.states.get("acme", quiet))[0]
    assert record.status == "completed" and record.webhook.get("attempts") in (None, [])
    assert await gateway.webhooks.enqueue(record, ["completed"]) == 0
    assert receiver.at("/quiet") == []


def test_backoff_doubles_up_to_the_cap():
    assert [backoff_seconds(n) for n in range(1, 10)] == [5, 10, 20, 40, 80, 160, 320, 600, 600]
    assert backoff_seconds(3, initial=0.2, maximum=0.5) == 0.5


def test_address_rules():
    public = ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]
    private = ["127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "fe80::1", "::ffff:10.0.0.1",
               "0.0.0.0", "100.64.0.1",
               # IPv4 inside IPv6: NAT64 of the metadata address, 6to4 of loopback, v4-compatible loopback
               "64:ff9b::a9fe:a9fe", "2002:7f00:1::", "::127.0.0.1"]  # fmt: skip
    assert all(is_public_address(a) for a in public)
    assert not any(is_public_address(a) for a in private)
    assert job_msg_id("acme", "r.1", "completed") == "acme/r.1/completed/0"


def test_deliveries_connect_to_the_address_that_was_checked():
    """No second lookup between the check and the connection (DNS rebinding): the URL names the checked address,
    the Host header and the TLS server name stay the original host's."""
    from turboflow.gateway.webhooks import pinned_request

    url, headers, extensions = pinned_request("https://hooks.example.com:8443/in?x=1", "93.184.216.34")
    assert url == "https://93.184.216.34:8443/in?x=1"
    assert headers == {"host": "hooks.example.com:8443"} and extensions == {"sni_hostname": "hooks.example.com"}
    assert pinned_request("http://hooks.example.com/in", "2606:2800:220:1::1")[0] == "http://[2606:2800:220:1::1]/in"
    assert pinned_request("http://127.0.0.1:9/in", None) == ("http://127.0.0.1:9/in", {}, {})  # private allowed


async def test_refused_destination_resolves_names():
    assert await refused_destination("http://localhost:9/x", allow_private=False) is not None
    assert await refused_destination("http://localhost:9/x", allow_private=True) is None
    assert "http(s)" in await refused_destination("ftp://example.com/x", allow_private=True)
