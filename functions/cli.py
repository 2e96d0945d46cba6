"""`turboflow serve t2v|i2v --port P --model DIR`: the function's ASGI app under hypercorn, as in the cluster."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the T2V or I2V function (CloudEvents over HTTP) locally")
    p.add_argument("kind", choices=("t2v", "i2v"))
    p.add_argument("--model", required=True, help="model cache directory (MODEL_DIR)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--bucket", default=None, help="output bucket (default: $TURBOFLOW_BUCKET)")
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: $S3_ENDPOINT_URL)")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    env = {"MODEL_DIR": str(args.model)}
    if args.device:
        env["TURBOFLOW_DEVICE"] = args.device
    if args.bucket:
        env["TURBOFLOW_BUCKET"] = args.bucket
    if args.s3_endpoint:
        env["S3_ENDPOINT_URL"] = args.s3_endpoint
    os.environ.update(env)  # func-python passes os.environ to start(cfg)
    asyncio.run(serve(args.kind, args.host, args.port))
    return 0


async def serve(kind: str, host: str, port: int, shutdown: asyncio.Event | None = None, app=None) -> None:
    import hypercorn.asyncio
    import hypercorn.config

    from .app import create_app

    app = app or create_app(kind)
    cfg = hypercorn.config.Config()
    cfg.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    cfg.graceful_timeout = 5
    stop = shutdown or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    log.info(
        "serving %s function on http://%s:%d (POST CloudEvents to /, health at /health/*, /metrics)", kind, host, port
    )
    await hypercorn.asyncio.serve(app, cfg, shutdown_trigger=stop.wait)
