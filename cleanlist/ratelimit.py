"""Client-side rate limiter: at most N requests per window per endpoint, shared by the whole process.

A sliding log guarantees that no span of `window` seconds holds more than N requests, so a fixed-window
server with the same limit never sees N+1 in one of its windows. A slot counts from when it was taken;
once its request is `release`d it counts from then instead: the server counted the request before it
answered, so a slot timed by the answer stays ahead of the server's count however long the request sat
between `acquire` and the wire (a busy process — many threads, one GIL — can delay a send by a good
share of a short window). The window is also widened by a small margin for clocks that tick apart.
A 429 with Retry-After `hold`s the endpoint for every thread and coroutine until it has elapsed.
After a 429 the endpoint is "cautious" until a request gets any other answer: only one request may be
in flight, so a storm of 429s is probed one request at a time instead of by every waiting thread at once.
Callers `release` each slot with the outcome of its request.
Threads block in `acquire`; coroutines await `acquire_async`; both draw on the same log under one lock,
which is only held for bookkeeping, never while sleeping.
The clock and both ways of sleeping are injectable (real time by default), so tests can run the limiter
in virtual time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable

from cleanlist.constants import RATE_WINDOW_MARGIN_CAP, RATE_WINDOW_MARGIN_FRACTION
from cleanlist.settings import RateLimit

Clock = Callable[[], float]
Sleep = Callable[[float], None]
AsyncSleep = Callable[[float], Awaitable[None]]


class EndpointLimiter:
    """The budget of one endpoint: `requests` sends per `seconds`, plus any Retry-After hold."""

    def __init__(
        self,
        limit: RateLimit,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        async_sleep: AsyncSleep = asyncio.sleep,
    ) -> None:
        self.limit = limit
        self.window = limit.seconds + min(limit.seconds * RATE_WINDOW_MARGIN_FRACTION, RATE_WINDOW_MARGIN_CAP)
        self._clock = clock
        self._sleep = sleep  # how `acquire` waits
        self._async_sleep = async_sleep  # how `acquire_async` waits
        self._sent: deque[float] = deque()  # when slots were taken, for requests not released yet
        self._answered: deque[float] = deque()  # when released requests were over
        self._held_until = 0.0
        self._in_flight = 0
        self._cautious = False
        self._lock = threading.Lock()
        self.paced = 0  # requests that had to wait for a slot (not for a Retry-After hold)

    def __repr__(self) -> str:
        return f"EndpointLimiter({self.limit})"

    def _reserve(self, counted: list[bool]) -> float:
        """Take a slot now and return 0, or return how long to wait before asking again."""
        with self._lock:
            now = self._clock()
            if now < self._held_until:
                return self._held_until - now
            if self._cautious and self._in_flight > 0:
                return 0.01
            self._expire(now)
            if len(self._sent) + len(self._answered) < self.limit.requests:
                self._sent.append(now)
                self._in_flight += 1
                return 0.0
            if not counted:
                counted.append(True)
                self.paced += 1
            oldest = min(log[0] for log in (self._sent, self._answered) if log)
            return max(oldest + self.window - now, 0.001)

    def _expire(self, now: float) -> None:
        for log in (self._sent, self._answered):
            while log and log[0] <= now - self.window:
                log.popleft()

    def release(self, *, rate_limited: bool, answered: bool = True) -> None:
        """A slot taken with `acquire` is over: `rate_limited` if it got a 429, `answered` if any answer."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            # Re-time one slot by this answer. Slots are interchangeable, so the oldest stamp is moved,
            # unless stamps of requests still in flight have already expired (a request slower than the
            # window): then this one's has too, most likely.
            if self._sent and len(self._sent) >= self._in_flight:
                self._sent.popleft()
            self._answered.append(now)
            self._in_flight = max(self._in_flight - 1, 0)
            if rate_limited:
                self._cautious = True
            elif answered:
                self._cautious = False

    def acquire(self) -> None:
        """Block the calling thread until a request may be sent."""
        counted: list[bool] = []
        while (delay := self._reserve(counted)) > 0:
            self._sleep(delay)

    async def acquire_async(self) -> None:
        """Wait, without blocking the event loop, until a request may be sent."""
        counted: list[bool] = []
        while (delay := self._reserve(counted)) > 0:
            await self._async_sleep(delay)

    def hold(self, seconds: float) -> None:
        """Let nobody send on this endpoint for `seconds` (a server's Retry-After)."""
        with self._lock:
            self._held_until = max(self._held_until, self._clock() + seconds)
            self._cautious = True

    def usage(self) -> float:
        """Share of the budget spent within the last window (0 = idle, 1 = saturated or held)."""
        with self._lock:
            now = self._clock()
            if now < self._held_until:
                return 1.0
            self._expire(now)
            return (len(self._sent) + len(self._answered)) / self.limit.requests

    @property
    def held_for(self) -> float:
        with self._lock:
            return max(self._held_until - self._clock(), 0.0)


class RateLimiter:
    """One EndpointLimiter per endpoint, all sized by the same limit (and on the same clock)."""

    def __init__(
        self,
        limit: RateLimit,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        async_sleep: AsyncSleep = asyncio.sleep,
    ) -> None:
        self.limit = limit
        self._clock = clock
        self._sleep = sleep
        self._async_sleep = async_sleep
        self._endpoints: dict[str, EndpointLimiter] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RateLimiter({self.limit})"

    def endpoint(self, name: str) -> EndpointLimiter:
        with self._lock:
            if name not in self._endpoints:
                self._endpoints[name] = EndpointLimiter(
                    self.limit, clock=self._clock, sleep=self._sleep, async_sleep=self._async_sleep
                )
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
