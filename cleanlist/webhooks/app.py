"""The receiver as a FastAPI app: `POST /hooks/<token>`, a body size and time limit, and a health check."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from cleanlist.errors import InputError
from cleanlist.store import EnrichmentStore
from cleanlist.webhooks.delivery import DeliveryOutcome, apply_delivery, known_token

T = TypeVar("T")

# 250 results of a full enrichment are well under 1 MiB; a body far beyond that is not a delivery.
MAX_DELIVERY_BYTES = 4 * 2**20
# Seconds to receive a whole body once the head arrived: a delivery is sent in one go, a body that
# trickles in (or stops half-way) would hold its connection for good. (The head's deadline is the
# server's, `server.HEADER_TIMEOUT_SECONDS`.)
BODY_TIMEOUT_SECONDS = 10.0


# Bodies read at once: each may hold up to `max_body_bytes`, so this bounds the receiver's memory under a
# flood of large bodies (16 × 4 MiB, plus their parsing one at a time per store thread). A request that
# waits longer than `BUSY_WAIT_SECONDS` for its turn is answered 503: Cleanlist retries a 5xx.
MAX_BODIES_IN_FLIGHT = 16
BUSY_WAIT_SECONDS = 3.0
# Seconds the store has to record a delivery before the receiver answers 503 (Cleanlist waits 10 s for an
# answer, then retries; a late write is then found "already recorded" on the retry, never twice).
STORE_TIMEOUT_SECONDS = 5.0


def parse_networks(values: Sequence[str] | None) -> tuple[IPv4Network | IPv6Network, ...]:
    """`--webhook-allow` CIDRs (a bare address is one host); a bad one is one InputError line."""
    networks = []
    for value in values or ():
        for part in value.replace(",", " ").split():
            try:
                networks.append(ip_network(part, strict=False))
            except ValueError:
                raise InputError(f"webhook_allow: {part!r} is not an address or CIDR network") from None
    return tuple(networks)


def _allowed(host: str | None, networks: tuple[IPv4Network | IPv6Network, ...]) -> bool:
    if not networks:
        return True
    try:
        address = ip_address(host or "")
    except ValueError:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


class _Receiver:
    """The handling of one POST: checks before the body, the body read in turn, the store's answer."""

    def __init__(
        self,
        store: EnrichmentStore,
        *,
        max_body_bytes: int,
        body_timeout: float,
        allow: tuple[IPv4Network | IPv6Network, ...],
        max_bodies: int,
        busy_wait: float,
        store_timeout: float,
    ) -> None:
        self.store = store
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.allow = allow
        self.busy_wait = busy_wait
        self.store_timeout = store_timeout
        self.bodies = asyncio.Semaphore(max_bodies)
        self.too_large = _answer(413, f"body larger than {max_body_bytes} bytes")
        self.too_slow = _answer(408, f"body not received within {body_timeout:g} s")

    async def receive(self, token: str, request: Request) -> JSONResponse:
        refused = await self._refused_before_body(token, request)
        if refused is not None:
            return refused
        try:
            async with asyncio.timeout(self.busy_wait):
                await self.bodies.acquire()
        except TimeoutError:
            return _answer(503, "busy: deliver again")
        try:
            return await self._read_and_record(token, request)
        finally:
            self.bodies.release()

    async def _in_store(self, work: Callable[[], T]) -> T:
        async with asyncio.timeout(self.store_timeout):
            return await run_in_threadpool(work)

    async def _refused_before_body(self, token: str, request: Request) -> JSONResponse | None:
        if not _allowed(request.client.host if request.client else None, self.allow):
            return _answer(403, "sender not allowed")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return self.too_large
        try:
            known = await self._in_store(lambda: known_token(self.store, token))
        except (SQLAlchemyError, TimeoutError):
            return _answer(503, "the store is unavailable")
        return None if known else _answer(404, "unknown receiver URL")

    async def _read_and_record(self, token: str, request: Request) -> JSONResponse:
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout):
                async for part in request.stream():
                    body += part
                    if len(body) > self.max_body_bytes:
                        return self.too_large
        except TimeoutError:
            # Answered, and the connection closed with it (uvicorn keeps none whose body was not read).
            return self.too_slow
        try:
            outcome: DeliveryOutcome = await self._in_store(
                lambda: apply_delivery(self.store, token, bytes(body))
            )
        except (SQLAlchemyError, TimeoutError):
            # Not recorded: a 5xx makes the API try again (5 attempts), and polling stays the net.
            return _answer(503, "the store is unavailable")
        return _answer(outcome.status_code, outcome.detail)


def _answer(status_code: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code)


def create_receiver_app(
    store: EnrichmentStore,
    *,
    max_body_bytes: int = MAX_DELIVERY_BYTES,
    body_timeout: float = BODY_TIMEOUT_SECONDS,
    allow: tuple[IPv4Network | IPv6Network, ...] = (),
    max_bodies: int = MAX_BODIES_IN_FLIGHT,
    busy_wait: float = BUSY_WAIT_SECONDS,
    store_timeout: float = STORE_TIMEOUT_SECONDS,
) -> FastAPI:
    """The receiver of deliveries for every run registered in `store`.

    A delivery is acknowledged (2xx) only once it is in the store; when it cannot be stored (the store
    fails or is slower than `store_timeout`), or the receiver is too busy to read it in time, the answer
    is 503 so that Cleanlist delivers it again. A sender outside `allow` (when given) gets 403 and an
    unknown token 404, both before the body is read.
    """
    app = FastAPI(title="cleanlist webhook receiver", docs_url=None, redoc_url=None, openapi_url=None)
    receiver = _Receiver(
        store,
        max_body_bytes=max_body_bytes,
        body_timeout=body_timeout,
        allow=allow,
        max_bodies=max_bodies,
        busy_wait=busy_wait,
        store_timeout=store_timeout,
    )

    @app.post("/hooks/{token}")
    async def receive(token: str, request: Request) -> JSONResponse:
        return await receiver.receive(token, request)

    @app.get("/healthz")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
