"""The API's front door for one schedule: forwards every request to the sandbox, holds bulk answers back.

The CLI talks to this proxy (its CLEANLIST_BASE_URL), the proxy to the sandbox. It forwards a bulk request
the moment its body has arrived, so the API accepts (and charges) it, then holds the answer for a drawn
delay, as a slow network would: this is what makes "a signal while requests are on the wire" a moment a
schedule can hit, not a millisecond. It logs every bulk request (start, end, the API's status) for
invariant 2, and tells the harness when bulk requests are on the wire.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from benchmarks.chaos.invariants import BulkRequest
from benchmarks.procs import free_port

HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


class ApiProxy:
    """A reverse proxy in a thread of the harness (its clock is the harness's `time.monotonic()`)."""

    def __init__(self, upstream: str, *, bulk_delay: tuple[float, float], seed: int) -> None:
        self.upstream = upstream
        self.bulk_delay = bulk_delay
        self._rng = random.Random(f"{seed}:proxy")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.bulk: list[BulkRequest] = []
        self.requests_seen = 0
        self.bulk_on_wire = 0
        self.first_request_at: float | None = None
        self.first_402_at: float | None = None  # the API said "out of credits" (a credit pause starts)
        self._lock = threading.Lock()
        self._client: httpx.AsyncClient | None = None
        app = Starlette(
            routes=[Route("/{path:path}", self._forward, methods=["GET", "POST", "PUT", "DELETE"])]
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"proxy-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the API proxy did not start")
            time.sleep(0.02)

    async def _forward(self, request: Request) -> Response:
        started = time.monotonic()
        is_bulk = request.method == "POST" and request.url.path.endswith("/enrich/bulk")
        with self._lock:
            self.requests_seen += 1
            if self.first_request_at is None:
                self.first_request_at = started
            if is_bulk:
                self.bulk_on_wire += 1
        status: int | None = None
        try:
            body = await request.body()
            if self._client is None:
                self._client = httpx.AsyncClient(timeout=120.0)
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
            url = self.upstream + request.url.path + (f"?{request.url.query}" if request.url.query else "")
            answer = await self._client.request(request.method, url, content=body, headers=headers)
            status = answer.status_code
            if status == 402 or (status == 400 and b"credit" in answer.content.lower()):
                with self._lock:
                    if self.first_402_at is None:
                        self.first_402_at = time.monotonic()
            if is_bulk:
                low, high = self.bulk_delay
                await asyncio.sleep(self._rng.uniform(low, high))
            out_headers = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS}
            return Response(answer.content, status_code=answer.status_code, headers=out_headers)
        except httpx.HTTPError:
            return Response(b'{"detail": "proxy: upstream failed"}', status_code=502)
        except ClientDisconnect:  # a killed run went away mid-body: nobody is left to answer
            return Response(b"", status_code=499)
        finally:
            if is_bulk:
                with self._lock:
                    self.bulk_on_wire -= 1
                    self.bulk.append(BulkRequest(started, time.monotonic(), status))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self.requests_seen, "bulk_on_wire": self.bulk_on_wire, "bulk": len(self.bulk)}

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
