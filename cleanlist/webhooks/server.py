"""Serving the receiver: in a background thread for the length of a run, or in the foreground.

A connection has `HEADER_TIMEOUT_SECONDS` from its opening (or from the end of its last answer, when
kept alive) to deliver a whole request head; one that has not is closed. Without it uvicorn keeps a
half-sent request open for good (its keep-alive timer starts only after an answer and stops at the
first byte), and every such connection is a file descriptor the receiver never gets back. The body
has its own deadline (`app.BODY_TIMEOUT_SECONDS`).

Connections are capped (`MAX_CONNECTIONS`: beyond it a request is answered 503 at once, which Cleanlist
retries), bodies in memory too (`app.MAX_BODIES_IN_FLIGHT`); deeply nested bodies are refused by the
JSON parser's depth limit (422). TLS is served directly with a certificate and key (`tls=(cert, key)`),
or by a reverse proxy in front (then give the proxy's public URL as `webhook_url`; an allow-list then
sees the proxy's address, so filter senders at the proxy).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from cleanlist.errors import InputError
from cleanlist.store import EnrichmentStore
from cleanlist.webhooks.app import BODY_TIMEOUT_SECONDS, create_receiver_app, parse_networks

# Seconds a client has to send a request's head (request line and headers). The API's delivery sends
# it in one write; a few seconds is generous for any real sender, short for a slow or stuck one.
HEADER_TIMEOUT_SECONDS = 5.0
# Open connections (and requests) at once; idle ones are closed after HEADER_TIMEOUT_SECONDS anyway.
MAX_CONNECTIONS = 2000


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) → (host, port); a bad value is one InputError line."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InputError(f"webhook_listen must be HOST:PORT (e.g. 0.0.0.0:8088), not {value!r}")
    return host, int(port)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen for webhooks on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class _HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is not complete in time."""

    header_timeout: float = HEADER_TIMEOUT_SECONDS
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()  # a kept-alive connection's next request gets the same time

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        if not self.transport.is_closing():
            self._head_deadline = self.loop.call_later(self.header_timeout, self._head_overdue)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_overdue(self) -> None:
        self._head_deadline = None
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # no answer: there is no request to answer


def _server(
    store: EnrichmentStore,
    *,
    header_timeout: float = HEADER_TIMEOUT_SECONDS,
    body_timeout: float = BODY_TIMEOUT_SECONDS,
    allow: Sequence[str] | None = None,
    tls: tuple[str, str] | None = None,
    max_connections: int = MAX_CONNECTIONS,
    store_timeout: float | None = None,
) -> uvicorn.Server:
    protocol = type("ReceiverProtocol", (_HeadDeadlineProtocol,), {"header_timeout": header_timeout})
    extra: dict[str, Any] = {} if store_timeout is None else {"store_timeout": store_timeout}
    app = create_receiver_app(store, body_timeout=body_timeout, allow=parse_networks(allow), **extra)
    cert, key = tls or (None, None)
    for name, path in (("certificate", cert), ("key", key)):
        if path is not None and not os.path.isfile(path):
            raise InputError(f"the webhook receiver's TLS {name} {path!r} is not a readable file")
    config = uvicorn.Config(
        app,
        http=protocol,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
        limit_concurrency=max_connections,
        ssl_certfile=cert,
        ssl_keyfile=key,
        proxy_headers=False,  # the allow-list judges the peer, never a header a sender can forge
        # Never uvicorn's default logging config: its dictConfig flushes and closes every handler of the
        # process under logging's lock — Prefect's API log handler among them, whose flush waits for a
        # worker thread that needs that lock: a run starting its receiver hung (chaos seed 7524608).
        log_config=None,
    )
    return uvicorn.Server(config)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound and listening on host:port (0 = a free port); one InputError line if it cannot be."""
    return _bind(host, port)


def serve_forever(
    store: EnrichmentStore,
    sock: socket.socket,
    *,
    allow: Sequence[str] | None = None,
    tls: tuple[str, str] | None = None,
) -> None:
    """Serve on a listening socket in this thread until interrupted (`cleanlist-enrich receiver`)."""
    _server(store, allow=allow, tls=tls).run(sockets=[sock])


class ReceiverServer:
    """A receiver on host:port (0 = a free port), served by uvicorn in a background thread."""

    def __init__(  # noqa: PLR0913 - keyword-only tunables
        self,
        store: EnrichmentStore,
        host: str,
        port: int,
        *,
        startup_timeout: float = 10.0,
        header_timeout: float = HEADER_TIMEOUT_SECONDS,
        body_timeout: float = BODY_TIMEOUT_SECONDS,
        allow: Sequence[str] | None = None,
        tls: tuple[str, str] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        store_timeout: float | None = None,
    ) -> None:
        self._store = store
        self._timeouts: dict[str, Any] = {"header_timeout": header_timeout, "body_timeout": body_timeout}
        self._tls = tls
        self._settings: dict[str, Any] = {
            "allow": allow,
            "tls": tls,
            "max_connections": max_connections,
            "store_timeout": store_timeout,
        }
        self.host = host
        self._port = port
        self._startup_timeout = startup_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port = port

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self._tls else 'http'}://{host}:{self.port}"

    def start(self) -> Self:
        self._socket = _bind(self.host, self._port)
        self.port = int(self._socket.getsockname()[1])
        try:
            server = _server(self._store, **self._timeouts, **self._settings)
        except BaseException:
            self._socket.close()
            raise
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self._socket]}, name="cleanlist-receiver", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise InputError(f"the webhook receiver on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        if self._socket is not None:
            self._socket.close()
        self._server, self._thread, self._socket = None, None, None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
