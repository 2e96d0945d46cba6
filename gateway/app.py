"""The gateway application: `GatewayService` holds what the routes share (settings, request states, keys, ledger,
object store, event emitter, webhook worker) and `app`, the FastAPI application serving them.

    service = build_gateway(Settings.from_env(os.environ))
    await serve_asgi(service.app, host, port, stop)      # the app's lifespan starts and stops the service

Routes reach the service through the `get_service` dependency and the caller's tenant through
`auth.current_tenant`. The OpenAPI document is generated from the app and committed:
`python -m turboflow.gateway.app --write-openapi` (docs/gateway.openapi.json; a test fails when it is stale).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request

from turboflow import __version__
from turboflow.errors import ConfigError
from turboflow.settings import Settings

from . import problems
from .emit import EventEmitter
from .keys import DEFAULT_DATABASE_URL, KeyStore, expand_database_url

log = logging.getLogger(__name__)

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "docs" / "gateway.openapi.json"
SOURCE = "/turboflow/gateway"  # the `source` of every event the gateway emits
DESCRIPTION = """\
turboflow's front door: submit text-to-video and image-to-video requests, follow their progress (status, a
Server-Sent Events stream, signed webhooks), cancel them, and read the tenant's usage.

Every call needs `Authorization: Bearer tf_<key_id>_<secret>`; the key decides the tenant. Errors are
`application/problem+json` (RFC 9457) with a stable `code`; a 422 lists every field at fault in `errors`.
"""
TAGS = [
    {"name": "videos", "description": "Create, read, list and cancel video requests."},
    {"name": "events", "description": "Follow a request as it changes (Server-Sent Events)."},
    {"name": "usage", "description": "The tenant's GPU time."},
    {"name": "operations", "description": "Health and metrics."},
]
# Routers other modules contribute; each is included when its module exists (modules written in parallel).
OPTIONAL_ROUTERS = (
    ("turboflow.gateway.stream", "router"),
    ("turboflow.gateway.usage", "router"),
    ("turboflow.gateway.consumer", "router"),
    ("turboflow.gateway.metrics", "metrics_router"),
    ("turboflow.gateway.console", "router"),
)

ChangeHook = Callable[[object, list], Awaitable[None]]


class GatewayService:
    """What the gateway's routes share. `start()` connects everything (idempotent), `stop()` lets go of it."""

    def __init__(
        self,
        settings: Settings,
        *,
        database_url: str | None = None,
        store=None,
        emitter: EventEmitter | None = None,
    ):
        self.settings = settings
        self.database_url = database_url or settings.gateway_database_url or DEFAULT_DATABASE_URL
        self.states = None  # RequestStates, connected by start()
        self.keys: KeyStore | None = None
        self.ledger = None
        self._store = store
        self.emitter = emitter or EventEmitter(settings.sink_url)
        self.webhooks = None
        # async callables (record, changes) told about state changes the gateway makes itself (a cancel while
        # queued); the lifecycle consumer tells them about the changes events make. The webhook worker adds one.
        self.change_hooks: list[ChangeHook] = []
        self._started = False
        self._lock = asyncio.Lock()
        self.app = create_app(self)

    @property
    def store(self):
        """The S3 store for uploads and presigned output URLs (None without TURBOFLOW_BUCKET)."""
        if self._store is None and self.settings.bucket:
            from turboflow.storage.s3 import S3Store

            self._store = S3Store.from_settings(self.settings)
        return self._store

    async def start(self) -> None:
        async with self._lock:
            if self._started:
                return
            from turboflow.billing.ledger import open_ledger
            from turboflow.eventing.requeststate import RequestStates

            if not self.settings.nats_url:
                raise ConfigError("TURBOFLOW_NATS_URL is not set: the gateway keeps request state in NATS")
            url = expand_database_url(self.database_url)
            self.keys = await asyncio.to_thread(KeyStore.open, url)
            self.ledger = await asyncio.to_thread(open_ledger, url)
            self.states = await RequestStates.connect(
                self.settings.nats_url, retention_seconds=self.settings.request_retention_seconds
            )
            await self.emitter.start()
            self.webhooks = _optional_webhook_worker(self)
            if self.webhooks is not None:
                started = self.webhooks.start()
                if inspect.isawaitable(started):
                    await started
            self._started = True

    async def stop(self) -> None:
        async with self._lock:
            if not self._started:
                return
            self._started = False
            if self.webhooks is not None:
                stopped = self.webhooks.stop()
                if inspect.isawaitable(stopped):
                    await stopped
            await self.emitter.stop()
            if self.states is not None:
                await self.states.close()
            if self.ledger is not None:
                self.ledger.close()
            if self.keys is not None:
                self.keys.close()

    async def changed(self, record, changes: list[str]) -> None:
        """Tell the change hooks (webhooks) about `changes` the gateway made to `record` itself."""
        if not changes:
            return
        for hook in list(self.change_hooks):
            try:
                await hook(record, changes)
            except Exception:  # a hook's failure never fails the request that caused the change
                log.exception("change hook %r failed for %s", hook, getattr(record, "id", "?"))

    def public_url(self, request: Request) -> str:
        """The base URL for links in responses: TURBOFLOW_GATEWAY_PUBLIC_URL, else the request's own."""
        return (self.settings.gateway_public_url or str(request.base_url)).rstrip("/")


def _optional_webhook_worker(service: GatewayService):
    try:
        from .webhooks import WebhookWorker
    except ModuleNotFoundError as e:
        if e.name == "turboflow.gateway.webhooks":
            return None
        raise
    return WebhookWorker(service)


def get_service(request: Request) -> GatewayService:
    """FastAPI dependency: the service of the app serving the request."""
    return request.app.state.service


def create_app(service: GatewayService) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="turboflow gateway",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        responses=problems.responses(401, 422),
    )
    app.state.service = service
    problems.install(app)
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = problems.problem_media_types(default_openapi())
        return app.openapi_schema

    app.openapi = openapi

    from . import videos

    app.include_router(videos.router)
    app.include_router(videos.health_router)
    for module_name, attribute in OPTIONAL_ROUTERS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # not written yet
                continue
            raise
        app.include_router(getattr(module, attribute))
    return app


def build_gateway(settings: Settings, **kwargs) -> GatewayService:
    return GatewayService(settings, **kwargs)


def openapi_document() -> dict:
    """The OpenAPI document of a gateway built from default settings (nothing is connected)."""
    return build_gateway(Settings()).app.openapi()


def render_openapi() -> str:
    return json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m turboflow.gateway.app", description=__doc__.split("\n")[0])
    parser.add_argument("--write-openapi", action="store_true", help=f"write {OPENAPI_PATH.name}")
    parser.add_argument("--check-openapi", action="store_true", help="exit 1 when the committed document is stale")
    args = parser.parse_args(argv)
    text = render_openapi()
    if args.write_openapi:
        OPENAPI_PATH.write_text(text)
        print(f"wrote {OPENAPI_PATH}")
    elif args.check_openapi:
        stale = not OPENAPI_PATH.exists() or OPENAPI_PATH.read_text() != text
        print(f"{OPENAPI_PATH} is {'stale' if stale else 'current'}")
        return 1 if stale else 0
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
