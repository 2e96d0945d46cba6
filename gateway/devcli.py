"""Local-use verbs that start or go through the gateway: `turboflow dev`, `turboflow demo`, `turboflow submit`.

`dev` runs the whole stack with the gateway (gateway/devstack.py) and prints its URL, a dev API key and a curl line.
`demo` (= `make demo`) starts it, sends one T2V (JSON) and one I2V (multipart upload) through the gateway, prints
progress from their event streams, downloads and decodes both mp4s. `submit` goes through the gateway when one is
known (--gateway / TURBOFLOW_GATEWAY_URL / `turboflow dev`'s state file) with a progress bar fed by the stream;
`--via http|nats` keeps the raw broker paths (turboflow.eventing.cli.submit_via_broker).
Presigned URLs are credentials: nothing here prints one unless asked (--show-url, --json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from turboflow.engine.fields import add_arguments, options_from_args
from turboflow.errors import TurboflowError
from turboflow.eventing.cli import run_until_signal, submit_via_broker

from .client import GatewayClient, describe_event, is_terminal, public_view

DEFAULT_GATEWAY_PORT = 8000


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dev", help="run the gateway + NATS + S3 (moto) + both functions + the broker locally")
    p.add_argument("--gateway-port", type=int, default=DEFAULT_GATEWAY_PORT, help="gateway port (0: any free port)")
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
    p.add_argument("--data-dir", default=None, help="JetStream store, gateway database and logs (default: temp dir)")
    p.set_defaults(func=_dev)

    p = sub.add_parser("submit", help="send a T2V/I2V request (through the gateway when one is known); --wait")
    p.add_argument("kind", choices=("t2v", "i2v"))
    p.add_argument("prompt")
    p.add_argument("--image", help="I2V: local file (uploaded), s3:// URI or data: URI")
    add_arguments(p)  # the request options, from the one field table (engine/fields.py)
    p.add_argument("--id", default=None, help="request id (default: a new one)")
    p.add_argument("--gateway", default=None, help="gateway URL (default: $TURBOFLOW_GATEWAY_URL or `turboflow dev`)")
    p.add_argument("--api-key", default=None, help="gateway API key (default: $TURBOFLOW_API_KEY or `turboflow dev`)")
    p.add_argument("--idempotency-key", default=None, help="gateway: the Idempotency-Key header")
    p.add_argument("--webhook", default=None, help="gateway: URL that receives signed webhooks for this request")
    p.add_argument(
        "--via",
        choices=("http", "nats"),
        default=None,
        help="skip the gateway: a raw CloudEvent to the broker ingress (http) or JetStream (nats)",
    )
    p.add_argument("--tenant", default=None, help="with --via: the tenant extension (the gateway takes the key's)")
    p.add_argument("--broker", default=None, help="with --via http: broker ingress URL")
    p.add_argument("--nats", default=None, help="with --via (and --wait): NATS URL")
    p.add_argument("--wait", action="store_true", help="wait for the result and download the mp4")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default="out", help="download directory (with --wait)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (with the presigned URL)")
    p.add_argument("--show-url", action="store_true", help="also print the video's presigned URL (a credential)")
    p.set_defaults(func=_submit)

    p = sub.add_parser("demo", help="start the stack, run one T2V and one I2V through the gateway, save the mp4s")
    p.add_argument("--out", default="out")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument(
        "--keep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the stack running afterwards to try the API (default: when run from a terminal)",
    )
    p.set_defaults(func=_demo)


# ---- dev -----------------------------------------------------------------------------------------------------------
def curl_example(url: str, api_key: str) -> str:
    return (
        f"curl -s {url}/v1/videos -H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' "
        """-d '{"task": "t2v", "prompt": "a red fox in the snow", "num_frames": 5}'"""
    )


def quiet_migrations() -> None:
    """Alembic's INFO lines (the gateway's ledger migrates its SQLite file at start) say nothing to a user."""
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)


def _dev(args) -> int:
    from turboflow.eventing.devstack import DevConfig, default_state_file

    from .devstack import GatewayDevStack, settings_from_environment

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
    base = settings_from_environment()

    quiet_migrations()

    async def main(stop):
        dev = GatewayDevStack(cfg, gateway_port=args.gateway_port or None, settings=base)
        print("starting nats-server, S3, functions, broker, gateway ...", flush=True)
        async with dev:
            e = dev.endpoints()
            print(
                f"""
turboflow dev is running (Ctrl-C stops everything)
  gateway          {dev.url}   API /v1 (docs {dev.url}/docs), console {dev.url}/console
  API key          {dev.api_key}   (tenant {dev.tenant}; `turboflow keys create --tenant T` for more)
  broker ingress   POST {e["broker"]}    (CloudEvents, binary or structured)
  NATS             {e["nats"]}   stream {e["stream"]}, subjects {e["subjects"]}
                   completions: turboflow.events.io.turboflow.video.completed (failed: ...video.failed)
  S3               {e["s3_endpoint"]}   bucket {e["bucket"]}  (credentials turboflow-dev/turboflow-dev)
  upload -> I2V    put an image under {e["upload_prefix"]} with metadata `prompt` or a <key>.json sidecar
                   (the tenant is the key segment after {e["upload_prefix"].rsplit("<tenant>", 1)[0]})
  functions        t2v {e["functions"].get("t2v")}   i2v {e["functions"].get("i2v")}
  logs             {e["logs"]}
try: {curl_example(dev.url, dev.api_key)}
     turboflow submit t2v "a red fox running in the snow" --num-frames 5 --wait
     turboflow events tail
""",
                flush=True,
            )
            try:
                await dev.wait_ready(timeout=600)
                print("functions ready", flush=True)
            except TimeoutError as err:
                print(f"warning: {err}", file=sys.stderr)
            await stop.wait()
            print("stopping ...", flush=True)
        print("stopped", flush=True)
        return 0

    return run_until_signal(main)


# ---- submit --------------------------------------------------------------------------------------------------------
def gateway_endpoint(args) -> tuple[str | None, str | None]:
    """(gateway URL, API key): flags, then TURBOFLOW_GATEWAY_URL / TURBOFLOW_API_KEY, then `turboflow dev`'s state."""
    from turboflow.eventing.devstack import read_state
    from turboflow.settings import current

    state = read_state()
    url = args.gateway or os.environ.get("TURBOFLOW_GATEWAY_URL") or state.get("gateway")
    key = args.api_key or current().api_key or state.get("api_key")
    return url, key


def progress_bar(video: dict, width: int = 24) -> str:
    """`[#########...............] diffusion 3/8 ...`: the bar is the current stage's step/of."""
    p = video.get("progress") or {}
    step, of = p.get("step"), p.get("of")
    filled = int(width * step / of) if isinstance(step, int) and isinstance(of, int) and of > 0 else 0
    return f"[{'#' * min(filled, width)}{'.' * (width - min(filled, width))}]"


def _submit(args) -> int:
    from turboflow.eventing.cli import quiet_libraries

    quiet_libraries()  # httpx INFO lines would carry presigned URLs
    url, key = gateway_endpoint(args)
    if args.via or not url:
        args.via = args.via or "http"
        return submit_via_broker(args)
    if not key:
        raise TurboflowError(
            f"no API key for the gateway {url}: pass --api-key or set TURBOFLOW_API_KEY", code="unauthorized"
        )
    if args.tenant:
        raise TurboflowError(
            "--tenant: through the gateway the API key decides the tenant (use --via http for a raw event)",
            code="invalid_request",
            field="tenant",
        )
    if args.kind == "i2v" and not args.image:
        raise TurboflowError("i2v needs --image", code="missing_field", field="image")
    fields = {"prompt": args.prompt, "id": args.id, "webhook": args.webhook, **options_from_args(args)}
    tty = sys.stderr.isatty()

    def show(name: str, video: dict) -> None:
        line = describe_event(name, video)
        if tty and name == "progress":
            print(f"\r\033[K  {progress_bar(video)} {line}", end="", file=sys.stderr, flush=True)
        else:
            print(("\r\033[K" if tty else "") + f"  {line}", file=sys.stderr, flush=True)

    async def run() -> int:
        async with GatewayClient(url, key) as gw:
            video = await gw.create(args.kind, fields, image=args.image, idempotency_key=args.idempotency_key)
            if not args.wait:
                print(f"accepted: {video['id']} status={video['status']} ({video.get('urls', {}).get('get')})")
                return 0
            print(f"submitted {args.kind} {video['id']} through {url}", file=sys.stderr, flush=True)
            try:
                video = await asyncio.wait_for(gw.wait(video["id"], on_event=show), args.timeout)
            except TimeoutError:
                raise TurboflowError(
                    f"no result for {video['id']} after {args.timeout:.0f}s (it may still finish: "
                    f"GET {video.get('urls', {}).get('get')})",
                    code="timeout",
                    retryable=True,
                ) from None
            if args.json:
                print(json.dumps(video, indent=2))
            else:
                print(f"{video['id']} {describe_event(video['status'], video)}")
            if video["status"] != "completed":
                return 1
            path = await gw.download(video, args.out)
            output = video["output"]
            print(f"video: {output['uri']} -> {path} ({output['bytes']} bytes, sha256 ok)")
            if args.show_url:
                print(f"url: {output['url']} (expires {output.get('url_expires_at')})")
            return 0

    return asyncio.run(run())


# ---- demo ----------------------------------------------------------------------------------------------------------
DEMO_OPTIONS = {"resolution": "480p", "aspect_ratio": "4:3", "num_frames": 5, "num_steps": 4}


def demo_image() -> bytes:
    """A 320x240 PNG (two colour halves) for the I2V request."""
    import io

    from PIL import Image

    img = Image.new("RGB", (320, 240))
    img.paste((200, 80, 30), (0, 0, 160, 240))
    img.paste((30, 90, 200), (160, 0, 320, 240))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def result_view(video: dict) -> dict:
    """What the demo shows of a finished Video: how it ran and what it made (no presigned URL, no links)."""
    view = public_view(video)
    return {k: view.get(k) for k in ("id", "task", "status", "started", "output", "error") if view.get(k) is not None}


async def follow(gw: GatewayClient, label: str, video_id: str) -> dict:
    """The terminal Video of `video_id`, printing `label <event line>` for every stream event."""

    def show(name, video):
        print(f"  {label} {describe_event(name, video)}", flush=True)

    return await gw.wait(video_id, on_event=show)


def _demo(args) -> int:
    from turboflow.engine.video import probe_video
    from turboflow.eventing.devstack import DevConfig

    from .devstack import GatewayDevStack

    quiet_migrations()
    keep = args.keep if args.keep is not None else (sys.stdin.isatty() and sys.stdout.isatty())

    async def main(stop):
        print("starting the stack (gateway, nats-server, moto S3, t2v + i2v functions on tiny models, broker) ...")
        async with GatewayDevStack(DevConfig(device=args.device)) as dev:
            print(f"  gateway {dev.url}  API key {dev.api_key}", flush=True)
            await dev.wait_ready(timeout=args.timeout)
            async with GatewayClient(dev.url, dev.api_key) as gw:
                t2v = await gw.create("t2v", {"prompt": "a red fox running through snow, cinematic", **DEMO_OPTIONS})
                i2v = await gw.create(
                    "i2v", {"prompt": "the sun rises over the sea", **DEMO_OPTIONS}, image=demo_image(),
                    image_name="demo.png",
                )  # fmt: skip
                print(f"POST /v1/videos -> t2v {t2v['id']} ({t2v['status']}), i2v {i2v['id']} (multipart upload)")
                labels = {t2v["id"]: "t2v", i2v["id"]: "i2v"}
                results = await asyncio.wait_for(
                    asyncio.gather(*(follow(gw, label, vid) for vid, label in labels.items())), args.timeout
                )
                ok = True
                for video in results:
                    label = labels[video["id"]]
                    print(f"\n{label} {video['id']}: {video['status']}")
                    print(json.dumps(result_view(video), indent=2))
                    if not is_terminal(video) or video["status"] != "completed":
                        ok = False
                        continue
                    path = await gw.download(video, args.out)
                    info = probe_video(path)
                    print(f"  mp4: {path.resolve()} ({info.width}x{info.height}, {info.num_frames} frames decoded)")
                    ok = ok and info.num_frames == video["output"]["num_frames"]
            print("\nboth videos decoded" if ok else "\nFAILED", flush=True)
            if keep and not stop.is_set():
                print(
                    f"\nthe stack stays up to try the API (Ctrl-C stops it):\n  {curl_example(dev.url, dev.api_key)}\n"
                    f"  curl -N {dev.url}/v1/videos/<id>/events -H 'Authorization: Bearer {dev.api_key}'\n"
                    f"  console: {dev.url}/console",
                    flush=True,
                )
                await stop.wait()
        print("stack stopped", flush=True)
        return 0 if ok else 1

    try:
        return run_until_signal(main)
    except TimeoutError:
        raise TurboflowError(f"the demo did not finish within {args.timeout:.0f}s", code="timeout") from None
