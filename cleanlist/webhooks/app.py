"""The receiver as a FastAPI app: `POST /hooks/<token>`, a body size and time limit, and a health check."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from cleanlist.store import EnrichmentStore
from cleanlist.webhooks.delivery import DeliveryOutcome, apply_delivery

# 250 results of a full enrichment are well under 1 MiB; a body far beyond that is not a delivery.
MAX_DELIVERY_BYTES = 4 * 2**20
# Seconds to receive a whole body once the head arrived: a delivery is sent in one go, a body that
# trickles in (or stops half-way) would hold its connection for good. (The head's deadline is the
# server's, `server.HEADER_TIMEOUT_SECONDS`.)
BODY_TIMEOUT_SECONDS = 10.0


def create_receiver_app(
    store: EnrichmentStore,
    *,
    max_body_bytes: int = MAX_DELIVERY_BYTES,
    body_timeout: float = BODY_TIMEOUT_SECONDS,
) -> FastAPI:
    """The receiver of deliveries for every run registered in `store`."""
    app = FastAPI(title="cleanlist webhook receiver", docs_url=None, redoc_url=None, openapi_url=None)
    too_large = JSONResponse({"detail": f"body larger than {max_body_bytes} bytes"}, status_code=413)
    too_slow = JSONResponse({"detail": f"body not received within {body_timeout:g} s"}, status_code=408)

    @app.post("/hooks/{token}")
    async def receive(token: str, request: Request) -> JSONResponse:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            return too_large
        body = bytearray()
        try:
            async with asyncio.timeout(body_timeout):
                async for part in request.stream():
                    body += part
                    if len(body) > max_body_bytes:
                        return too_large
        except TimeoutError:
            # Answered, and the connection closed with it (uvicorn keeps none whose body was not read).
            return too_slow
        try:
            outcome: DeliveryOutcome = await run_in_threadpool(apply_delivery, store, token, bytes(body))
        except SQLAlchemyError:
            # Not recorded: a non-2xx makes the API try again (5 attempts), and polling stays the net.
            return JSONResponse({"detail": "the store is unavailable"}, status_code=503)
        return JSONResponse({"detail": outcome.detail}, status_code=outcome.status_code)

    @app.get("/healthz")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
