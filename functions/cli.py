"""`turboflow serve t2v|i2v --port P --model DIR`: the function's ASGI app under hypercorn, as in the cluster.

The settings are built here, once, from the environment plus the flags: a bad value stops the command before it
serves anything (`error[invalid_config]: TURBOFLOW_MAX_QUEUE: ...`, exit status 2) instead of a pod that runs
and never becomes ready.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from turboflow.settings import TASKS, Settings, prepare_process_environment

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the T2V or I2V function (CloudEvents over HTTP) locally")
    p.add_argument("kind", choices=TASKS)
    p.add_argument("--model", required=True, help="model cache directory (MODEL_DIR)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--bucket", default=None, help="output bucket (default: $TURBOFLOW_BUCKET)")
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: $S3_ENDPOINT_URL)")
    p.set_defaults(func=_serve)


def settings_for(args, env) -> Settings:
    """The process's settings: the environment, the flags over it. ConfigError names every bad variable."""
    flags = {
        "MODEL_DIR": str(args.model),
        "TURBOFLOW_DEVICE": args.device,
        "TURBOFLOW_BUCKET": args.bucket,
        "S3_ENDPOINT_URL": args.s3_endpoint,
    }
    settings = Settings.from_env({**env, **{k: v for k, v in flags.items() if v}})
    from turboflow.engine.options import LoadOptions

    LoadOptions.from_settings(settings)  # the engine's own checks (warm-up sizes), before serving
    return settings


def _serve(args) -> int:
    prepare_process_environment()
    settings = settings_for(args, os.environ)
    asyncio.run(serve(args.kind, args.host, args.port, settings=settings))
    return 0


async def serve(kind: str, host: str, port: int, shutdown: asyncio.Event | None = None, app=None, settings=None):
    from .app import create_app, run

    app = app or create_app(kind, settings=settings)
    log.info(
        "serving %s function on http://%s:%d (POST CloudEvents to /, health at /health/*, /metrics)", kind, host, port
    )
    await run(app, [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"], shutdown)
