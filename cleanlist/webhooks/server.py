"""Serving the receiver: in a background thread for the length of a run, or in the foreground.

A connection has `HEADER_TIMEOUT_SECONDS` from its opening (or from the end of its last answer, when
kept alive) to deliver a whole request head; one that has not is closed. Without it uvicorn keeps a
half-sent request open for good (its keep-alive timer starts only after an answer and stops at the
first byte), and every such connection is a file descriptor the receiver never gets back. The body
has its own deadline (`app.BODY_TIMEOUT_SECONDS`).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import TracebackType
from typing import Self

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from cleanlist.errors import InputError
from cleanlist.store import EnrichmentStore
from cleanlist.webhooks.app import BODY_TIMEOUT_SECONDS, create_receiver_app

# Seconds a client has to send a request's head (request line and headers). The API's delivery sends
# it in one write; a few seconds is generous for any real sender, short for a slow or stuck one.
HEADER_TIMEOUT_SECONDS = 5.0


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
) -> uvicorn.Server:
    protocol = type("ReceiverProtocol", (_HeadDeadlineProtocol,), {"header_timeout": header_timeout})
    config = uvicorn.Config(
        create_receiver_app(store, body_timeout=body_timeout),
        http=protocol,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    return uvicorn.Server(config)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound and listening on host:port (0 = a free port); one InputError line if it cannot be."""
    return _bind(host, port)


def serve_forever(store: EnrichmentStore, sock: socket.socket) -> None:
    """Serve on a listening socket in this thread until interrupted (`cleanlist-enrich receiver`)."""
    _server(store).run(sockets=[sock])


class ReceiverServer:
    """A receiver on host:port (0 = a free port), served by uvicorn in a background thread."""

    def __init__(
        self,
        store: EnrichmentStore,
        host: str,
        port: int,
        *,
        startup_timeout: float = 10.0,
        header_timeout: float = HEADER_TIMEOUT_SECONDS,
        body_timeout: float = BODY_TIMEOUT_SECONDS,
    ) -> None:
        self._store = store
        self._timeouts = {"header_timeout": header_timeout, "body_timeout": body_timeout}
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
        return f"http://{host}:{self.port}"

    def start(self) -> Self:
        self._socket = _bind(self.host, self._port)
        self.port = int(self._socket.getsockname()[1])
        server = _server(self._store, **self._timeouts)
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
