"""Webhook delivery: one `enrichment.completed` POST per workflow, retried with the documented backoff."""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime

import httpx

from cleanlist.sandbox.state import DeliveryAttempt, SandboxState, Workflow

MAX_ATTEMPTS = 5
# Waits before attempts 2..5; the doc lists a fifth step (16 s) that only a sixth attempt would use.
BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0)


class WebhookDispatcher:
    """Runs deliveries as tasks on the server's event loop; `close` cancels what is still pending."""

    def __init__(self, state: SandboxState) -> None:
        self._state = state
        self._client: httpx.AsyncClient | None = None
        # Strong references: the event loop keeps only weak ones to running tasks.
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(self, workflow: Workflow) -> None:
        """Start delivering `workflow`'s webhook when it completes. Must run on the event loop."""
        task = asyncio.get_running_loop().create_task(self._deliver(workflow))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel pending deliveries and close the HTTP client."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            config = self._state.config
            verify: ssl.SSLContext | bool = True
            if config.webhook_ca_file is not None:  # a test receiver's own certificate, besides the system's
                verify = ssl.create_default_context()
                verify.load_verify_locations(cafile=config.webhook_ca_file)
            self._client = httpx.AsyncClient(timeout=config.webhook_timeout, verify=verify)
        return self._client

    async def _deliver(self, workflow: Workflow) -> None:
        url = workflow.webhook_url
        if url is None or self._state.webhook_dropped(workflow):
            return
        delay = self._state.config.webhook_delay
        await asyncio.sleep(max(0.0, workflow.ready_at - self._state.clock()) + delay)
        payload = self._state.webhook_payload(workflow)
        scale = self._state.config.webhook_backoff_scale
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if not self._state.remembers(workflow):
                return  # forgotten (`/_sandbox/forget`): a restarted API has lost its pending deliveries
            delivered = await self._attempt(workflow, url, payload, attempt)
            if delivered or attempt == MAX_ATTEMPTS:
                return
            await asyncio.sleep(BACKOFF_SECONDS[attempt - 1] * scale)

    async def _attempt(self, workflow: Workflow, url: str, payload: dict[str, object], attempt: int) -> bool:
        code: int | None = None
        error: str | None = None
        injected = self._state.webhook_fault(workflow, attempt)
        try:
            if injected is not None:
                code, error = injected
            else:
                response = await self._http().post(url, json=payload)
                code = response.status_code
                if not 200 <= code < 300:
                    error = f"Receiver answered HTTP {code}"
        except httpx.TimeoutException:
            error = f"Receiver did not answer within {self._state.config.webhook_timeout:g} s"
        except Exception as exc:
            # The URL is user input: a bad scheme or host is a failed attempt, not a crashed sandbox.
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        delivered = error is None
        self._state.record_delivery(
            workflow,
            DeliveryAttempt(
                attempt=attempt,
                status="delivered" if delivered else "failed",
                response_code=code,
                error=error,
                delivered_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
            ),
        )
        return delivered
