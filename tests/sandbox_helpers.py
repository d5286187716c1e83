"""Helpers for the sandbox and client tests: contact lists, an authenticated client, a scriptable webhook
receiver, raw sockets that misbehave on the wire."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from cleanlist.sandbox import SandboxServer

ContactDict = dict[str, Any]


def people(count: int, tag: str = "p") -> list[ContactDict]:
    """`count` distinct name + domain contacts; the same tag always yields the same people."""
    return [
        {"first_name": f"Ann{tag}{i}", "last_name": f"Lee{tag}{i}", "company_domain": f"{tag}{i}.example"}
        for i in range(count)
    ]


def api(sandbox: SandboxServer, key: str | None = None, **headers: str) -> httpx.Client:
    """A plain httpx client on the public API, authenticated with `key` (the main key by default)."""
    auth = {"Authorization": f"Bearer {key or sandbox.api_key}"}
    return httpx.Client(base_url=sandbox.public_url, headers={**auth, **headers}, timeout=10.0)


def bulk(client: httpx.Client, contacts: list[ContactDict], **fields: Any) -> httpx.Response:
    """POST /enrich/bulk with `contacts` and any other body fields."""
    return client.post("/enrich/bulk", json={"contacts": contacts, **fields})


def wait_for_completion(client: httpx.Client, workflow_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """Poll the status endpoint until the workflow is completed."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get("/enrich/status", params={"workflow_id": workflow_id}).json()
        if body["status"] == "completed" or time.monotonic() > deadline:
            return body
        time.sleep(0.02)


def window_with_room(clock: Callable[[], float], window: float, room: float = 0.3) -> float:
    """Wait, if needed, until the current fixed window has `room` seconds left; return when it resets."""
    now = clock()
    resets_at = (math.floor(now / window) + 1) * window
    if resets_at - now < room:
        time.sleep(resets_at - now + 0.01)
        resets_at += window
    return resets_at


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that answers POSTs from a script of (status, delay) steps."""

    def __init__(self, script: list[tuple[int, float]]) -> None:
        self.script = list(script)
        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                status, delay = receiver.script.pop(0) if receiver.script else (200, 0.0)
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sandbox gave up waiting and closed the connection

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    @contextmanager
    def running(self) -> Iterator[WebhookReceiver]:
        """Serve in a background thread for the duration of the block."""
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join(timeout=5)


class RawServer:
    """A TCP server on 127.0.0.1 that reads a request, then sends `reply` bytes (None: never answers).

    For what neither the sandbox nor MockTransport can fake: a peer that accepts and goes silent (a read
    timeout), or an HTTP answer cut short on the wire.
    """

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self.base_url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._open.append(conn)
            conn.settimeout(2.0)
            with suppress(OSError):
                conn.recv(65536)
                if self.reply is not None:
                    conn.sendall(self.reply)
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._open:
            conn.close()
        self._sock.close()


def refused_url() -> str:
    """A loopback URL whose port nobody listens on (so connecting is refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
