"""A real HTTP proxy in front of the moto S3 server that makes chosen requests fail the way S3 does (503 SlowDown,
403 AccessDenied), so storage error handling is tested over the wire against boto3's own transfer code."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# (method, path) -> (status, S3 error code) to answer instead of forwarding, or None to forward
Fault = Callable[[str, str], "tuple[int, str] | None"]

_MESSAGES = {"SlowDown": "Please reduce your request rate.", "AccessDenied": "Access Denied"}


class S3FaultProxy:
    def __init__(self, upstream: str, fault: Fault | None = None):
        target = urlsplit(upstream)
        self.upstream_host, self.upstream_port = target.hostname, target.port
        self.fault: Fault | None = fault
        self.refused: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                answer = proxy.fault(self.command, self.path) if proxy.fault else None
                if answer is not None:
                    status, code = answer
                    proxy.refused.append((self.command, self.path))
                    payload = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{_MESSAGES.get(code, code)}</Message></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("content-type", "application/xml")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def refuse_video_writes(status: int, code: str, marker: str = "/videos/") -> Fault:
    """Fail every write (PUT, multipart POST) of an object whose path contains `marker`."""

    def fault(method: str, path: str):
        return (status, code) if method in ("PUT", "POST") and marker in path else None

    return fault
