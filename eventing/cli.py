"""Eventing verbs: `turboflow events tail`, `deadletter`, `s3source`; and the raw broker path of `turboflow submit`
(`--via http|nats`: a CloudEvent straight to the broker ingress or JetStream), which turboflow.gateway.devcli
calls. `dev`, `demo` and `submit` themselves live in gateway/devcli.py: they start or use the gateway."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from turboflow.engine.fields import options_from_args

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("events", help="watch the event stream")
    esub = p.add_subparsers(dest="events_cmd", metavar="tail")
    esub.required = True
    t = esub.add_parser("tail", help="print events as they are stored (JetStream stream TURBOFLOW_EVENTS)")
    t.add_argument("--nats", default=None)
    t.add_argument("--type", default=None, help="only this event type (e.g. io.turboflow.video.completed)")
    t.add_argument("--all", action="store_true", help="from the start of the stream, not just new events")
    t.add_argument("--json", action="store_true", help="one structured CloudEvent JSON per line")
    t.add_argument("-n", "--count", type=int, default=0, help="exit after this many events")
    t.set_defaults(func=_tail)

    p = sub.add_parser("deadletter", help="serve the dead-letter sink (undeliverable request -> failed event)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=_deadletter)

    p = sub.add_parser("s3source", help="S3 bucket notifications on NATS -> I2V requests to $K_SINK")
    p.add_argument("--nats-url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--subject", default="minio.turboflow.uploads")
    p.add_argument("--stream", default="MINIO_EVENTS", help="JetStream stream of the subject ('' : core NATS)")
    p.add_argument("--durable", default="turboflow-s3source")
    p.add_argument("--prefix", default="uploads/")
    p.add_argument("--bucket", action="append", default=[], help="only these buckets (repeatable)")
    p.add_argument("--tenant", default=os.environ.get("TURBOFLOW_S3SOURCE_TENANT"))
    p.add_argument("--default-prompt", default=None)
    p.add_argument("--sink", default=os.environ.get("K_SINK"), help="where to POST requests (default $K_SINK)")
    p.set_defaults(func=_s3source)


# ------------------------------------------------------------------------------------------------------------
def quiet_libraries() -> None:
    """Per-request INFO lines of moto's werkzeug, httpx and hypercorn drown the stack's own output."""
    if logging.getLogger().level > logging.DEBUG:
        for name in ("werkzeug", "httpx", "hypercorn.error", "hypercorn.access", "botocore", "nats"):
            logging.getLogger(name).setLevel(logging.WARNING)


def run_until_signal(main) -> int:
    """asyncio.run(main(stop)) with SIGINT/SIGTERM setting `stop` (clean shutdown on Ctrl-C)."""
    quiet_libraries()

    async def runner():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        return await main(stop)

    return int(asyncio.run(runner()) or 0)


def broker_endpoints(args) -> dict:
    """The broker, NATS, S3 and signing key to use: flags, then TURBOFLOW_* variables, then `turboflow dev`'s."""
    from .devstack import read_state

    state = read_state()
    return {
        "broker": getattr(args, "broker", None) or os.environ.get("TURBOFLOW_BROKER_URL") or state.get("broker"),
        "nats": getattr(args, "nats", None) or os.environ.get("TURBOFLOW_NATS_URL") or state.get("nats"),
        "s3_endpoint": state.get("s3_endpoint"),
        "bucket": state.get("bucket"),
        "signing_key": _signing_key(state),
    }


def _signing_key(state: dict) -> bytes | None:
    """The key replies are verified with: $TURBOFLOW_EVENT_SIGNING_KEY, else the running `turboflow dev`'s."""
    from . import signing

    key = signing.signing_key()
    if key is None and isinstance(state.get("signing_key"), str) and state["signing_key"]:
        key = state["signing_key"].encode("utf-8")
    return key


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _s3_client(endpoint: str | None, dev: bool = True):
    """boto3 S3 client; `dev` supplies the dev stack's credentials when none are configured."""
    import boto3
    from botocore.config import Config

    from .devstack import DEV_CREDENTIALS

    if dev:
        for k, v in DEV_CREDENTIALS.items():
            os.environ.setdefault(k, v)
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(s3={"addressing_style": "path"})
    )


def submit_via_broker(args) -> int:
    from turboflow.errors import TurboflowError

    from .client import build_request, describe, download, event_data, image_reference, send, submit_and_wait
    from .types import COMPLETED

    quiet_libraries()  # httpx/botocore INFO lines carry presigned URLs and credential sources
    ep = broker_endpoints(args)
    if args.via == "http" and not ep["broker"]:
        raise TurboflowError(
            "no broker: start `turboflow dev`, or pass --broker URL / set TURBOFLOW_BROKER_URL", code="no_broker"
        )
    if (args.wait or args.via == "nats") and not ep["nats"]:
        raise TurboflowError(
            "no NATS URL: start `turboflow dev`, or pass --nats URL / set TURBOFLOW_NATS_URL", code="no_nats"
        )
    if args.kind == "i2v" and not args.image:
        raise TurboflowError("i2v needs --image", code="missing_field", field="image")
    options = options_from_args(args)
    event = build_request(args.kind, args.prompt, options=options, tenant=args.tenant, request_id=args.id)
    if args.image:
        s3 = (
            _s3_client(ep["s3_endpoint"]) if ep["s3_endpoint"] and not args.image.startswith(("s3:", "data:")) else None
        )
        ref = image_reference(
            args.image,
            s3_client=s3,
            bucket=ep["bucket"],
            request_id=event.get_id(),
            tenant=args.tenant,
            image_prefix=os.environ.get("TURBOFLOW_IMAGE_PREFIX") or "uploads",
        )
        event = build_request(
            args.kind, args.prompt, options=options, tenant=args.tenant, request_id=event.get_id(), image=ref
        )
    tty = sys.stderr.isatty()

    def tick(elapsed):
        if tty:
            print(f"\r  waiting for {event.get_id()} ... {elapsed:5.0f}s", end="", file=sys.stderr, flush=True)

    if not args.wait:
        asyncio.run(send(event, broker_url=ep["broker"], nats_url=ep["nats"], via=args.via))
        print(f"accepted: {event.get_type()} id={event.get_id()}")
        return 0
    print(f"submitting {event.get_type()} id={event.get_id()} via {args.via}", file=sys.stderr)
    if ep["signing_key"] is None:
        warn("no signing key (TURBOFLOW_EVENT_SIGNING_KEY or `turboflow dev`): replies cannot be verified")
    reply = asyncio.run(
        submit_and_wait(
            event,
            nats_url=ep["nats"],
            broker_url=ep["broker"],
            via=args.via,
            timeout=args.timeout,
            tick=tick,
            signing_key=ep["signing_key"],
            warn=warn,
        )
    )
    if tty:
        print(file=sys.stderr)
    data = event_data(reply)
    if args.json:
        print(json.dumps({**{k: str(v) for k, v in reply.get_attributes().items()}, "data": data}, indent=2))
    else:
        print(describe(reply))
    if reply.get_type() != COMPLETED:
        return 1
    path = download(data, args.out, s3_client=_s3_client(ep["s3_endpoint"]) if ep["s3_endpoint"] else None)
    print(f"video: {data['video']['uri']} -> {path} ({data['video']['bytes']} bytes, sha256 ok)")
    if args.show_url:
        print(f"url: {data['video']['url']} (expires {data['video']['url_expires_at']})")
    return 0


def _tail(args) -> int:
    from . import signing
    from .client import describe, reply_subscription
    from .ingress import is_reply_type
    from .jetstream import SUBJECT_PREFIX, subject_for
    from .nats_binding import from_nats, to_nats

    ep = broker_endpoints(args)
    if not ep["nats"]:
        from turboflow.errors import TurboflowError

        raise TurboflowError("no NATS URL: start `turboflow dev` or pass --nats URL", code="no_nats")
    key = ep["signing_key"]

    def unverified(event) -> bool:
        return key is not None and is_reply_type(event.get_type()) and not signing.verify_event(event, key)

    subject = subject_for(args.type) if args.type else f"{SUBJECT_PREFIX}.>"

    async def main(stop):
        nc, sub = await reply_subscription(ep["nats"], subject=subject, since=None, new_only=not args.all)
        seen = 0
        try:
            while not stop.is_set():
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except Exception:
                    continue
                try:
                    event = from_nats(msg.headers, msg.data)
                except ValueError:
                    print(f"(not a CloudEvent on {msg.subject})", flush=True)
                    continue
                if args.json:
                    print(to_nats(event, "structured")[1].decode(), flush=True)
                else:  # a reply type without turboflow's signature is shown, but marked
                    print(("UNVERIFIED " if unverified(event) else "") + describe(event), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
        finally:
            await nc.close()
        return 0

    return run_until_signal(main)


def _deadletter(args) -> int:
    from .asgi import serve_asgi
    from .deadletter import DeadLetterApp

    async def main(stop):
        await serve_asgi(DeadLetterApp(), args.host, args.port, stop)
        return 0

    return run_until_signal(main)


def _s3source(args) -> int:
    from turboflow.errors import TurboflowError
    from turboflow.eventing.s3source import S3Source, S3SourceConfig, run_source

    if not args.sink:
        raise TurboflowError("no sink: set K_SINK (SinkBinding/ContainerSource do) or pass --sink", code="no_sink")
    s3 = _s3_client(os.environ.get("S3_ENDPOINT_URL"), dev=False)
    source = S3Source(
        s3,
        S3SourceConfig(
            prefix=args.prefix, buckets=tuple(args.bucket), tenant=args.tenant, default_prompt=args.default_prompt
        ),
    )

    async def main(stop):
        await run_source(
            args.nats_url,
            source,
            args.sink,
            stop,
            subject=args.subject,
            stream=args.stream or None,
            durable=args.durable,
        )
        return 0

    return run_until_signal(main)
