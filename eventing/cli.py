"""Eventing verbs: `turboflow dev`, `submit`, `events tail`, `demo`, `deadletter`, `s3source`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from turboflow.engine.fields import add_arguments, options_from_args

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dev", help="run NATS + S3 (moto) + both functions + the broker locally")
    p.add_argument("--port", type=int, default=8080, help="broker ingress port (0: any free port)")
    p.add_argument("--nats-port", type=int, default=4222, help="NATS port (0: any free port)")
    p.add_argument("--s3-endpoint", default=None, help="use this S3 (e.g. MinIO) instead of an embedded moto")
    p.add_argument("--bucket", default="turboflow")
    p.add_argument(
        "--upload-prefix",
        default="uploads/",
        help="images uploaded under <prefix><tenant>/ trigger I2V for that tenant",
    )
    p.add_argument("--t2v-model", default=None, help="model cache dir (default: a tiny model)")
    p.add_argument("--i2v-model", default=None, help="model cache dir (default: a tiny model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="JetStream store and logs (default: a temp dir)")
    p.set_defaults(func=_dev)

    p = sub.add_parser("submit", help="send a T2V/I2V request; --wait for the video")
    p.add_argument("kind", choices=("t2v", "i2v"))
    p.add_argument("prompt")
    p.add_argument("--image", help="I2V: local file (uploaded to the dev bucket or sent inline), s3:// or data: URI")
    add_arguments(p)  # the request options, from the one field table (engine/fields.py)
    p.add_argument("--tenant", default=None)
    p.add_argument("--id", default=None, help="request id (default: a new UUID)")
    p.add_argument("--broker", default=None, help="broker ingress URL (default: $TURBOFLOW_BROKER_URL or `dev`)")
    p.add_argument("--nats", default=None, help="NATS URL (default: $TURBOFLOW_NATS_URL or `dev`)")
    p.add_argument("--via", choices=("http", "nats"), default="http", help="HTTP ingress or direct NATS publish")
    p.add_argument("--wait", action="store_true", help="wait for the completion and download the mp4")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default="out", help="download directory (with --wait)")
    p.add_argument("--json", action="store_true", help="print the reply event as JSON (with the presigned URL)")
    p.add_argument("--show-url", action="store_true", help="also print the video's presigned URL (a credential)")
    p.set_defaults(func=_submit)

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

    p = sub.add_parser("demo", help="start the stack, run one T2V and one I2V request, save the mp4s under ./out")
    p.add_argument("--out", default="out")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=600)
    p.set_defaults(func=_demo)

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
def _quiet_libraries() -> None:
    """Per-request INFO lines of moto's werkzeug, httpx and hypercorn drown the stack's own output."""
    if logging.getLogger().level > logging.DEBUG:
        for name in ("werkzeug", "httpx", "hypercorn.error", "hypercorn.access", "botocore", "nats"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _run_until_signal(main) -> int:
    """asyncio.run(main(stop)) with SIGINT/SIGTERM setting `stop` (clean shutdown on Ctrl-C)."""
    _quiet_libraries()

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


def _dev(args) -> int:
    from .devstack import DevConfig, DevStack, default_state_file

    cfg = DevConfig(
        ingress_port=args.port or None,
        nats_port=args.nats_port or None,
        s3_endpoint=args.s3_endpoint,
        bucket=args.bucket,
        upload_prefix=args.upload_prefix,
        models={"t2v": args.t2v_model, "i2v": args.i2v_model},
        device=args.device,
        state_file=default_state_file(),
        log_dir=Path(args.data_dir) if args.data_dir else None,
    )

    async def main(stop):
        stack = DevStack(cfg)
        print("starting nats-server, S3, functions, broker ...", flush=True)
        async with stack:
            e = stack.endpoints()
            print(
                f"""
turboflow dev is running (Ctrl-C stops everything)
  broker ingress   POST {e["broker"]}    (CloudEvents, binary or structured)
  NATS             {e["nats"]}   stream {e["stream"]}, subjects {e["subjects"]}
                   completions: turboflow.events.io.turboflow.video.completed (failed: ...video.failed)
  S3               {e["s3_endpoint"]}   bucket {e["bucket"]}  (credentials turboflow-dev/turboflow-dev)
  upload -> I2V    put an image under {e["upload_prefix"]} with metadata `prompt` or a <key>.json sidecar
                   (the tenant is the key segment after {e["upload_prefix"].rsplit("<tenant>", 1)[0]})
  functions        t2v {e["functions"].get("t2v")}   i2v {e["functions"].get("i2v")}
  logs             {e["logs"]}
try: turboflow submit t2v "a red fox running in the snow" --num-frames 5 --wait
     turboflow events tail
""",
                flush=True,
            )
            try:
                await stack.wait_ready(timeout=600)
                print("functions ready", flush=True)
            except TimeoutError as err:
                print(f"warning: {err}", file=sys.stderr)
            await stop.wait()
            print("stopping ...", flush=True)
        print("stopped", flush=True)
        return 0

    return _run_until_signal(main)


def _endpoints(args) -> dict:
    from .devstack import default_state_file

    state = {}
    path = default_state_file()
    if path.exists():
        try:
            state = json.loads(path.read_text())
        except ValueError:
            state = {}
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


def _warn(message: str) -> None:
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


def _submit(args) -> int:
    from turboflow.errors import TurboflowError

    from .client import build_request, describe, download, event_data, image_reference, send, submit_and_wait
    from .types import COMPLETED

    _quiet_libraries()  # httpx/botocore INFO lines carry presigned URLs and credential sources
    ep = _endpoints(args)
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
        _warn("no signing key (TURBOFLOW_EVENT_SIGNING_KEY or `turboflow dev`): replies cannot be verified")
    reply = asyncio.run(
        submit_and_wait(
            event,
            nats_url=ep["nats"],
            broker_url=ep["broker"],
            via=args.via,
            timeout=args.timeout,
            tick=tick,
            signing_key=ep["signing_key"],
            warn=_warn,
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

    ep = _endpoints(args)
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

    return _run_until_signal(main)


def _demo(args) -> int:
    from turboflow.engine.video import probe_video

    from .client import IMAGE_PREFIX, REQUEST_METADATA, build_request, describe, download, event_data, submit_and_wait
    from .devstack import DevConfig, DevStack
    from .types import COMPLETED, DEFAULT_TENANT

    async def main(stop):
        import io

        from PIL import Image

        small = {"resolution": "480p", "aspect_ratio": "4:3", "num_frames": 5, "num_steps": 4}
        print("starting the stack (nats-server, moto S3, t2v + i2v functions on tiny models, broker) ...", flush=True)
        async with DevStack(DevConfig(device=args.device)) as stack:
            e = stack.endpoints()
            print(f"  broker {e['broker']}  NATS {e['nats']}  S3 {e['s3_endpoint']}/{e['bucket']}", flush=True)
            # a conditioning image for I2V, uploaded where the function may read it
            img = Image.new("RGB", (320, 240))
            img.paste((200, 80, 30), (0, 0, 160, 240))
            img.paste((30, 90, 200), (160, 0, 320, 240))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            image_key = f"{IMAGE_PREFIX}/{DEFAULT_TENANT}/demo.png"  # the default tenant's image area
            stack.s3_client().put_object(
                Bucket=e["bucket"],
                Key=image_key,
                Body=buf.getvalue(),
                ContentType="image/png",
                Metadata={REQUEST_METADATA: "demo"},
            )
            requests = [
                build_request("t2v", "a red fox running through snow, cinematic", options=small),
                build_request(
                    "i2v", "the sun rises over the sea", options=small, image=f"s3://{e['bucket']}/{image_key}"
                ),
            ]
            key = stack.signing_key.encode()
            replies = await asyncio.gather(
                *(
                    submit_and_wait(
                        r, nats_url=e["nats"], broker_url=e["broker"], timeout=args.timeout, signing_key=key, warn=_warn
                    )
                    for r in requests
                )
            )
            ok = True
            for req, reply in zip(requests, replies):
                data = event_data(reply)
                print(f"\n{req.get_type()} {req.get_id()}\n  -> {describe(reply)}")
                video = {k: v for k, v in (data.get("video") or {}).items() if k != "url"}
                shown = {**data, "video": video} if video else data  # a presigned URL is a credential: not shown
                print(
                    json.dumps(
                        {"type": reply.get_type(), "id": reply.get_id(), "subject": reply.get_subject(), "data": shown},
                        indent=2,
                    )
                )
                if reply.get_type() != COMPLETED:
                    ok = False
                    continue
                path = download(data, args.out, s3_client=stack.s3_client())
                info = probe_video(path)
                print(f"  mp4: {path.resolve()} ({info.width}x{info.height}, {info.num_frames} frames decoded)")
                ok = ok and info.num_frames == data["num_frames"]
        print("\nstack stopped;", "both videos decoded" if ok else "FAILED", flush=True)
        return 0 if ok else 1

    return _run_until_signal(main)


def _deadletter(args) -> int:
    from .asgi import serve_asgi
    from .deadletter import DeadLetterApp

    async def main(stop):
        await serve_asgi(DeadLetterApp(), args.host, args.port, stop)
        return 0

    return _run_until_signal(main)


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

    return _run_until_signal(main)
