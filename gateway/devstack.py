"""`turboflow dev` with the front door: the eventing DevStack (nats-server, S3, both functions, broker, dead-letter
sink, S3 source) plus the gateway, wired as in the cluster.

    gateway   http://HOST:PORT   /v1 API, /console, /internal/events (the Trigger `turboflow-gateway` delivers every
              io.turboflow.video.* event there through the dev dispatcher), request state in the stack's NATS KV,
              request events POSTed to the broker ingress (K_SINK), keys + usage in <log dir>/gateway.db
    functions K_SINK = the ingress (started/progress/cancelled), TURBOFLOW_NATS_URL = the stack's NATS (cancels)

The gateway's port is bound before the stack starts, so the dispatcher knows the Trigger's subscriber from the
first event. A dev API key for tenant `default` is created at start and put, with the gateway's URL, in the 0600
state file (`gateway`, `api_key`) where `turboflow submit` finds them. The eventing package knows nothing of this
module: composition happens here, one layer up.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
from pathlib import Path

from turboflow.eventing.asgi import serve_asgi
from turboflow.eventing.devstack import DevConfig, DevStack
from turboflow.eventing.natsserver import bind_listener
from turboflow.settings import Settings

GATEWAY_SERVICE = "turboflow-gateway"  # the Trigger subscriber's Service name (eventing/manifests/triggers.yaml)
DEV_TENANT = "default"


def dev_webhook_secret() -> str:
    """A fresh Standard Webhooks secret for one dev run: `whsec_` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def gateway_settings(stack: DevStack, url: str, database: Path, base: Settings | None = None) -> Settings:
    """The gateway's settings inside a dev stack: the stack's NATS, ingress, bucket and signing key; a SQLite
    database in the stack's log directory; private webhook targets allowed (receivers on this machine)."""
    base = base or Settings()
    return base.replace(
        nats_url=stack.nats.url,
        sink_url=stack.ingress_url,
        s3_endpoint_url=stack.s3_endpoint,
        bucket=stack.cfg.bucket,
        input_buckets=(stack.cfg.bucket,),
        event_signing_key=stack.signing_key.encode(),
        gateway_database_url=f"sqlite:///{database}",
        gateway_public_url=url,
        webhook_secret=base.webhook_secret or dev_webhook_secret(),
        webhook_allow_private=True,
    )


def create_api_key(service, tenant: str, label: str) -> str:
    """A new API key for `tenant` in the gateway's key store: the `tf_<key_id>_<secret>` token."""
    _, token = service.keys.create(tenant, label=label)
    return token


class GatewayDevStack:
    """DevStack + the gateway on one event loop; `async with GatewayDevStack(DevConfig(...)) as dev:` gives
    `dev.url`, `dev.api_key`, `dev.stack` (the DevStack) and `dev.service` (the GatewayService)."""

    def __init__(
        self,
        config: DevConfig | None = None,
        *,
        gateway_port: int | None = None,
        tenant: str = DEV_TENANT,
        settings: Settings | None = None,
    ):
        self.cfg = config or DevConfig()
        self.gateway_port = gateway_port
        self.tenant = tenant
        self.base_settings = settings
        self.stack: DevStack | None = None
        self.service = None
        self.url = ""
        self.api_key = ""
        self._listener = None
        self._stop = asyncio.Event()
        self._serve: asyncio.Task | None = None

    async def start(self) -> GatewayDevStack:
        from .app import build_gateway

        c = self.cfg
        self._listener = bind_listener("gateway", c.host, self.gateway_port or 0)  # fail fast, before the stack
        self.url = f"http://{c.host}:{self._listener.getsockname()[1]}"
        c.subscribers = {**c.subscribers, GATEWAY_SERVICE: f"{self.url}/"}
        self.stack = DevStack(c)
        await self.stack.start()
        settings = gateway_settings(self.stack, self.url, c.log_dir / "gateway.db", self.base_settings)
        self.service = build_gateway(settings)
        await self.service.start()
        self.api_key = await asyncio.to_thread(create_api_key, self.service, self.tenant, "turboflow dev")
        listener, self._listener = self._listener, None
        port = listener.getsockname()[1]
        self._serve = asyncio.create_task(serve_asgi(self.service.app, c.host, port, self._stop, sock=listener))
        await _wait_healthy(self.url)
        self.stack.write_state(gateway=self.url, api_key=self.api_key)
        return self

    def endpoints(self) -> dict:
        return {**self.stack.endpoints(), "gateway": self.url}

    async def wait_ready(self, timeout: float = 180) -> None:
        await self.stack.wait_ready(timeout=timeout)

    async def stop(self) -> None:
        # the gateway first: it holds NATS connections the stack's nats-server would leave reconnecting
        self._stop.set()
        if self._serve is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._serve), 10)
            except (TimeoutError, Exception):
                self._serve.cancel()
                await asyncio.gather(self._serve, return_exceptions=True)
        if self.service is not None:
            await self.service.stop()
        if self._listener is not None:
            self._listener.close()
        if self.stack is not None:
            await self.stack.stop()

    async def __aenter__(self) -> GatewayDevStack:
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(self, *exc) -> None:
        await self.stop()


async def _wait_healthy(url: str, timeout: float = 30) -> None:
    import httpx

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(f"{url}/healthz", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"the gateway at {url} is not healthy after {timeout}s")
            await asyncio.sleep(0.1)


def settings_from_environment() -> Settings:
    """The operator's own settings (TURBOFLOW_TENANT_MAX_ACTIVE, TURBOFLOW_WEBHOOK_SECRET, ...) as the base of the
    dev gateway's; the stack's endpoints replace the rest."""
    return Settings.from_env(os.environ)
