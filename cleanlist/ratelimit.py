"""Client-side rate limiter: at most N requests per window per endpoint, shared by the whole process.

A sliding log of send times guarantees that no span of `window` seconds holds more than N sends, so a
fixed-window server with the same limit never sees N+1 in one of its windows (the window is widened by
a small margin for arrival jitter). A 429 with Retry-After `hold`s the endpoint for every thread and
coroutine until it has elapsed. Threads block in `acquire`; coroutines await `acquire_async`; both draw
on the same log under one lock, which is only held for bookkeeping, never while sleeping.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable

from cleanlist.constants import RATE_WINDOW_MARGIN_CAP, RATE_WINDOW_MARGIN_FRACTION
from cleanlist.settings import RateLimit


class EndpointLimiter:
    """The budget of one endpoint: `requests` sends per `seconds`, plus any Retry-After hold."""

    def __init__(self, limit: RateLimit, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = limit.seconds + min(limit.seconds * RATE_WINDOW_MARGIN_FRACTION, RATE_WINDOW_MARGIN_CAP)
        self._clock = clock
        self._sent: deque[float] = deque()
        self._held_until = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EndpointLimiter({self.limit})"

    def _reserve(self) -> float:
        """Take a slot now and return 0, or return how long to wait before asking again."""
        with self._lock:
            now = self._clock()
            if now < self._held_until:
                return self._held_until - now
            while self._sent and self._sent[0] <= now - self.window:
                self._sent.popleft()
            if len(self._sent) < self.limit.requests:
                self._sent.append(now)
                return 0.0
            return max(self._sent[0] + self.window - now, 0.001)

    def acquire(self) -> None:
        """Block the calling thread until a request may be sent."""
        while (delay := self._reserve()) > 0:
            time.sleep(delay)

    async def acquire_async(self) -> None:
        """Wait, without blocking the event loop, until a request may be sent."""
        while (delay := self._reserve()) > 0:
            await asyncio.sleep(delay)

    def hold(self, seconds: float) -> None:
        """Let nobody send on this endpoint for `seconds` (a server's Retry-After)."""
        with self._lock:
            self._held_until = max(self._held_until, self._clock() + seconds)

    @property
    def held_for(self) -> float:
        with self._lock:
            return max(self._held_until - self._clock(), 0.0)


class RateLimiter:
    """One EndpointLimiter per endpoint, all sized by the same limit."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._endpoints: dict[str, EndpointLimiter] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RateLimiter({self.limit})"

    def endpoint(self, name: str) -> EndpointLimiter:
        with self._lock:
            if name not in self._endpoints:
                self._endpoints[name] = EndpointLimiter(self.limit)
            return self._endpoints[name]


_shared: dict[tuple[str, str, RateLimit], RateLimiter] = {}
_shared_lock = threading.Lock()


def shared_limiter(base_url: str, organization: str, limit: RateLimit) -> RateLimiter:
    """The process-wide limiter for one API host and key, so every client in the process shares it."""
    key = (base_url, organization, limit)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = RateLimiter(limit)
        return _shared[key]
