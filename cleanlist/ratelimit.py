"""Client-side rate limiter: a sliding log per endpoint that learns the API's real limits from its 429s.

The API does not publish its limits ("back off on 429"), so the configured limit is a guess:

* **Pacing.** A sliding log guarantees that no span of `window` seconds holds more than the endpoint's
  *allowance*, so a fixed-window server with that limit never sees one more in one of its windows. A
  slot counts from when it was taken; once its request is `release`d it counts from the answer instead
  (the server counted the request before it answered). The window is widened by a small margin for
  clocks that tick apart.
* **Holds.** A 429's Retry-After holds the endpoint for every thread, coroutine and — with a shared
  book — every process, until it has elapsed: nobody sends inside a window the client has read.
  After a 429 the endpoint is "cautious" until a request gets another answer: one request in flight.
* **Learning.** At a 429, what the server's window had served (counted back to where the window began,
  which Retry-After tells) becomes the endpoint's allowance, less a margin (`with_margin`). A 429 that
  came while *other* endpoints had been served in the same window is evidence of one window for the
  whole organization: the total served becomes a shared allowance ("*" scope) that every endpoint also
  draws on. Each hypothesis is kept while its 429s agree: per-endpoint counts that scatter while the
  totals agree mean the window is shared (the endpoint's own allowance is dropped), and totals that
  scatter mean it is not (the shared one is dropped).
* **Limits.** `N/SECONDS` is a hard ceiling that learning only lowers. `auto` (`auto/SECONDS`) starts
  from the documented 60 per minute and grows — one slot per clean answer while the endpoint is short of
  slots — until the first 429, then settles on what was learned. Until an endpoint has either been
  refused once or proven a full window clean, at most PROBE_IN_FLIGHT of its requests are in flight, so
  a wrong guess costs one 429, not a burst of them.
* **Books.** Slots, holds and learned limits live in a `SlotBook`: `MemoryBook` shares them between the
  threads and coroutines of one process; the store's book (cleanlist/store/ratebook.py) shares them
  between every process and machine that uses the same store, so runs of one organization together
  stay within its limit. Learned limits are kept in the store for the next run.

The clock and both ways of sleeping are injectable (real time by default), so tests run in virtual time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cleanlist.constants import (
    AUTO_RATE_CAP,
    PROBE_IN_FLIGHT,
    RATE_LEARN_TOLERANCE,
    RATE_WINDOW_MARGIN_CAP,
    RATE_WINDOW_MARGIN_FRACTION,
)
from cleanlist.errors import StoppedBeforeSending
from cleanlist.settings import RateLimit

Clock = Callable[[], float]
Sleep = Callable[[float], None]
AsyncSleep = Callable[[float], Awaitable[None]]

SHARED_SCOPE = "*"  # the organization-wide window, when the 429s say there is one
# Counting what a window served reaches this much further back than its start: the limiter and the book
# read their clocks a moment apart, and no slot is taken during the hold that precedes a window anyway.
_COUNT_SLACK = 0.05


def with_margin(served: int) -> int:
    """The allowance learned from a window that served `served` requests before its 429: 5 % less."""
    return max(1, served - served // 20)


def widened(seconds: float) -> float:
    return seconds + min(seconds * RATE_WINDOW_MARGIN_FRACTION, RATE_WINDOW_MARGIN_CAP)


# ------------------------------------------------------------------------------------------- books


class Ticket(Protocol):
    """The slots one request took (one per scope); only the book that issued it knows what is inside."""


@dataclass(frozen=True)
class Taken:
    """A book's answer to `take`: a ticket, or how long to wait (and whether for a Retry-After hold)."""

    ticket: Ticket | None
    wait: float = 0.0
    held: bool = False


class SlotBook(Protocol):
    """Where slots, holds and learned limits live. Durations are seconds on the book's own clock."""

    def take(self, endpoint: str, scopes: Sequence[tuple[str, int]], window: float) -> Taken:
        """Take a slot in every scope at once — or none, and say how long to wait before asking again."""
        ...

    def give_back(self, ticket: Ticket, *, ok: bool) -> None:
        """The request is over: its slots count from now; `ok` if it was served (not refused)."""
        ...

    def hold(self, scopes: Sequence[str], seconds: float) -> None: ...

    def held_for(self, scope: str) -> float: ...

    def served(self, endpoint: str, lookback: float) -> tuple[int, int]:
        """Requests served within the last `lookback` seconds: (of `endpoint`, of every endpoint)."""
        ...

    def used(self, scope: str, window: float) -> int:
        """Slots of `scope` counted in the current window (a hint; may be a moment old)."""
        ...

    def learned(self) -> dict[str, RateLimit]:
        """Limits learned so far (by anyone sharing the book), by scope; stale ones left out."""
        ...

    def learn(self, scope: str, limit: RateLimit | None) -> None:
        """Remember (or, with None, forget) what was learned of `scope`."""
        ...


@dataclass
class _Slot:
    endpoint: str
    taken: float
    stamp: float
    in_flight: bool = True
    ok: bool = False


@dataclass
class _MemoryTicket:
    slots: list[tuple[str, _Slot]] = field(default_factory=list)


class MemoryBook:
    """Slots of the threads and coroutines of this process."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._slots: dict[str, list[_Slot]] = {}
        self._held: dict[str, float] = {}
        self._learned: dict[str, RateLimit] = {}
        self._lock = threading.Lock()

    def _live(self, scope: str, now: float, window: float) -> list[_Slot]:
        slots = [s for s in self._slots.get(scope, []) if s.in_flight or s.stamp > now - window]
        self._slots[scope] = slots
        return slots

    def take(self, endpoint: str, scopes: Sequence[tuple[str, int]], window: float) -> Taken:
        with self._lock:
            now = self._clock()
            held = {scope for scope, _ in scopes} | {SHARED_SCOPE}  # a hold on "*" holds every endpoint
            wait = max(self._held.get(scope, 0.0) - now for scope in held)
            if wait > 0:
                return Taken(None, wait, held=True)
            for scope, allowance in scopes:
                live = self._live(scope, now, window)
                if len(live) >= allowance:
                    done = [s.stamp for s in live if not s.in_flight]
                    return Taken(None, max(min(done) + window - now, 0.001) if done else 0.01)
            ticket = _MemoryTicket()
            for scope, _ in scopes:
                slot = _Slot(endpoint, now, now)
                self._slots.setdefault(scope, []).append(slot)
                ticket.slots.append((scope, slot))
            return Taken(ticket)

    def give_back(self, ticket: Ticket, *, ok: bool) -> None:
        assert isinstance(ticket, _MemoryTicket)
        with self._lock:
            now = self._clock()
            for _, slot in ticket.slots:
                slot.stamp, slot.in_flight, slot.ok = now, False, ok

    def hold(self, scopes: Sequence[str], seconds: float) -> None:
        with self._lock:
            until = self._clock() + seconds
            for scope in scopes:
                self._held[scope] = max(self._held.get(scope, 0.0), until)

    def held_for(self, scope: str) -> float:
        with self._lock:
            return max(self._held.get(scope, 0.0) - self._clock(), 0.0)

    def served(self, endpoint: str, lookback: float) -> tuple[int, int]:
        with self._lock:
            since = self._clock() - lookback
            ok = [s for scope, slots in self._slots.items() if scope != SHARED_SCOPE for s in slots]
            ok = [s for s in ok if s.ok and s.taken >= since]
            return sum(1 for s in ok if s.endpoint == endpoint), len(ok)

    def used(self, scope: str, window: float) -> int:
        with self._lock:
            return len(self._live(scope, self._clock(), window))

    def learned(self) -> dict[str, RateLimit]:
        with self._lock:
            return dict(self._learned)

    def learn(self, scope: str, limit: RateLimit | None) -> None:
        with self._lock:
            if limit is None:
                self._learned.pop(scope, None)
            else:
                self._learned[scope] = limit


# ----------------------------------------------------------------------------------------- learning


def _agree(counts: Sequence[int]) -> bool:
    """Whether the counts served before several 429s tell one limit (within the tolerance; exactly,
    below ten)."""
    return max(counts) - min(counts) <= int(min(counts) * RATE_LEARN_TOLERANCE)


@dataclass
class _Refusal:
    endpoint: str
    served: int  # by the endpoint in the server's window before the 429
    total: int  # by every endpoint in that window
    window_start: float  # where the server's window began, as far as the 429 tells
    at: float


def _confirmed(refusals: Sequence[_Refusal], count: Callable[[_Refusal], int]) -> int | None:
    """The count the newest 429 agrees on with an earlier one from another server window, if any."""
    if len(refusals) < 2:
        return None
    newest = refusals[-1]
    for earlier in reversed(refusals[:-1]):
        if newest.window_start >= earlier.at and _agree([count(newest), count(earlier)]):
            return min(count(newest), count(earlier))
    return None


class EndpointLimiter:
    """One endpoint's share of a `RateLimiter`: acquire before a request, release with its outcome."""

    def __init__(
        self,
        limit: RateLimit,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        async_sleep: AsyncSleep = asyncio.sleep,
        parent: RateLimiter | None = None,
        name: str = "endpoint",
    ) -> None:
        self.name = name
        self.limit = limit
        self._parent = parent or RateLimiter(limit, clock=clock, sleep=sleep, async_sleep=async_sleep)
        self.window = widened(limit.seconds)
        self.allowance = limit.requests  # slots per window now: configured, grown (auto) or learned
        self.learned: int | None = None  # what its 429s taught, before the ceiling
        self.settled = False  # refused once (or learned by an earlier run): auto grows no more
        self.proven = False  # served a whole window at its allowance without a 429
        self.hold_ends = 0.0  # when the last Retry-After hold on it ended (the limiter's clock)
        self._in_flight = 0
        self._cautious = False
        self._short = False  # a request waited for a slot since the last clean answer (auto grows on it)
        self._tickets: list[Ticket] = []
        self._clean: deque[float] = deque()  # this process's clean answers in the last window
        self.paced = 0  # requests that had to wait for a slot (not for a Retry-After hold)

    def __repr__(self) -> str:
        return f"EndpointLimiter({self.name}: {self.allowance}/{self.limit.seconds:g})"

    @property
    def _probing(self) -> bool:
        """Probing an unknown limit: auto until it has found its edge; a configured limit once the API
        has refused it, until the 429s agree on the real one (or a full window went clean)."""
        if self.learned is not None or self.proven:
            return False
        return self.limit.auto or self.settled

    def _reserve(self, counted: list[bool]) -> float:
        """Take a slot now and return 0, or return how long to wait before asking again."""
        parent = self._parent
        with parent.lock:
            if self._cautious and self._in_flight > 0:
                return 0.01
            if self._probing and self._in_flight >= PROBE_IN_FLIGHT:
                return 0.01
            scopes = parent.scopes_for(self)
            self._in_flight += 1  # counted before asking the book, so no other thread slips past the caps
        taken = parent.book.take(self.name, scopes, self.window)
        with parent.lock:
            if taken.ticket is not None:
                self._tickets.append(taken.ticket)
                return 0.0
            self._in_flight -= 1
            if not taken.held:
                self._short = True
                if not counted:
                    counted.append(True)
                    self.paced += 1
            return taken.wait

    def release(self, *, rate_limited: bool, answered: bool = True, retry_after: float | None = None) -> None:
        """A slot taken with `acquire` is over: `rate_limited` if it got a 429, `answered` if any answer;
        `retry_after` is the 429's hint, if it gave one (the endpoint is held for it)."""
        parent = self._parent
        with parent.lock:
            ticket = self._tickets.pop(0) if self._tickets else None
            self._in_flight = max(self._in_flight - 1, 0)
        if rate_limited:
            parent.refused(self, ticket, retry_after)  # holds before the slot is given back
            return
        if ticket is not None:
            parent.book.give_back(ticket, ok=answered)
        if answered:
            parent.clean_answer(self)

    def acquire(self, stop: threading.Event | None = None) -> None:
        """Block the calling thread until a request may be sent.

        With `stop` (the run's stop request), the wait — for a slot or a Retry-After hold — ends as soon
        as it is set, with `StoppedBeforeSending` and no slot taken: the request never goes out.
        """
        counted: list[bool] = []
        while True:
            if stop is not None and stop.is_set():
                raise StoppedBeforeSending(self.name)
            delay = self._reserve(counted)
            if delay <= 0:
                return
            if stop is None:
                self._parent.sleep(delay)
            elif stop.wait(delay):
                raise StoppedBeforeSending(self.name)

    async def acquire_async(self, stop: threading.Event | None = None) -> None:
        """Wait, without blocking the event loop, until a request may be sent (`stop` as in `acquire`)."""
        counted: list[bool] = []
        while True:
            if stop is not None and stop.is_set():
                raise StoppedBeforeSending(self.name)
            delay = self._reserve(counted)
            if delay <= 0:
                return
            # An event cannot be awaited: a stop is noticed within a tenth of a second.
            await self._parent.async_sleep(delay if stop is None else min(delay, 0.1))

    def hold(self, seconds: float) -> None:
        """Let nobody send on this endpoint for `seconds` (a server's Retry-After)."""
        self._parent.hold(self, seconds)

    def usage(self) -> float:
        """Share of the budget spent within the last window (0 = idle, 1 = saturated or held)."""
        parent = self._parent
        if self.held_for > 0:
            return 1.0
        return max(
            parent.book.used(scope, self.window) / allowance for scope, allowance in parent.scopes_for(self)
        )

    @property
    def held_for(self) -> float:
        return max(self._parent.book.held_for(scope) for scope in (self.name, SHARED_SCOPE))


class RateLimiter:
    """The limiter of one API key: its endpoints, what their 429s taught, and the book of their slots."""

    def __init__(
        self,
        limit: RateLimit,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        async_sleep: AsyncSleep = asyncio.sleep,
        book: SlotBook | None = None,
    ) -> None:
        self.limit = limit
        self.clock = clock
        self.sleep = sleep  # how `acquire` waits
        self.async_sleep = async_sleep  # how `acquire_async` waits
        self.book: SlotBook = book or MemoryBook(clock)
        self.window = widened(limit.seconds)
        self.lock = threading.RLock()  # bookkeeping only: never held while sleeping or asking the book
        self._endpoints: dict[str, EndpointLimiter] = {}
        self._refusals: list[_Refusal] = []
        self.shared: int | None = None  # the organization-wide allowance, while the 429s say there is one
        self.per_endpoint = False  # 429s have shown a window per endpoint (a 429 then holds only its own)
        self._learned_seen = 0.0
        self._learned: dict[str, RateLimit] = {}

    def __repr__(self) -> str:
        return f"RateLimiter({self.limit})"

    @property
    def ceiling(self) -> int:
        return AUTO_RATE_CAP if self.limit.auto else self.limit.requests

    def endpoint(self, name: str) -> EndpointLimiter:
        with self.lock:
            if name not in self._endpoints:
                limiter = EndpointLimiter(self.limit, parent=self, name=name)
                self._endpoints[name] = limiter
                self._adopt(limiter, self._learned_now().get(name))
            return self._endpoints[name]

    def _adopt(self, limiter: EndpointLimiter, learned: RateLimit | None) -> None:
        """Start from what an earlier run (or another process) learned of this endpoint."""
        if learned is not None and learned.seconds == self.limit.seconds:
            limiter.learned = learned.requests
            limiter.allowance = min(self.ceiling, learned.requests)
            limiter.settled = True

    def _learned_now(self) -> dict[str, RateLimit]:
        """The book's learned limits, asked at most once a second."""
        now = self.clock()
        if now - self._learned_seen >= 1.0 or not self._learned_seen:
            self._learned_seen = now
            self._learned = self.book.learned()
            shared = self._learned.get(SHARED_SCOPE)
            if shared is not None and shared.seconds == self.limit.seconds:
                self.shared = min(self.shared or shared.requests, shared.requests)
        return self._learned

    def scopes_for(self, limiter: EndpointLimiter) -> list[tuple[str, int]]:
        """What one request of `limiter` must take a slot in: its endpoint, and the shared window."""
        with self.lock:
            learned = self._learned_now().get(limiter.name)
            if (
                learned is not None
                and learned.seconds == self.limit.seconds
                and learned.requests < limiter.allowance
            ):
                limiter.allowance = limiter.learned = learned.requests  # another process learned it
                limiter.settled = True
            scopes = [(limiter.name, limiter.allowance)]
            if self.shared is not None:
                scopes.append((SHARED_SCOPE, self.shared))
            return scopes

    def hold(self, limiter: EndpointLimiter, seconds: float, *, everyone: bool = False) -> None:
        """Hold `limiter`'s endpoint — and, with `everyone` or a shared window, every endpoint."""
        scopes = [limiter.name] + ([SHARED_SCOPE] if everyone or self.shared is not None else [])
        self.book.hold(scopes, seconds)
        now = self.clock()
        with self.lock:
            limiter._cautious = True
            limiter.hold_ends = max(limiter.hold_ends, now + seconds)
            if self.shared is not None:  # one window: it began anew for every endpoint (a hold only to be
                # safe says nothing of the other endpoints' windows)
                for other in self._endpoints.values():
                    other.hold_ends = max(other.hold_ends, now + seconds)

    # -- learning ---------------------------------------------------------------------------------
    def clean_answer(self, limiter: EndpointLimiter) -> None:
        """An answer that was not a 429: the endpoint is open; auto grows; a clean full window proves it."""
        if not (limiter.proven or self.limit.auto):
            # Counted here, not in the book: one more transaction per answer is too dear for a hint.
            now = self.clock()
            clean = limiter._clean
            clean.append(now)
            while clean and clean[0] <= now - limiter.window:
                clean.popleft()
            limiter.proven = len(clean) >= limiter.allowance
        full = self.limit.auto and self.book.used(limiter.name, limiter.window) >= limiter.allowance
        with self.lock:
            limiter._cautious = False
            if self.limit.auto and not limiter.settled and (limiter._short or full):
                # Short of slots and answered clean: one more slot (doubling per round trip, as TCP's
                # slow start does) until the first 429.
                limiter.allowance = min(limiter.allowance + 1, AUTO_RATE_CAP)
                limiter._short = False
                self._lift_unsettled(limiter.allowance)

    def _lift_unsettled(self, allowance: int) -> None:
        """auto: what one endpoint has been served clean, the others may start from. The documented limit
        is the same for every endpoint, and the status endpoint must keep up with the bulk one (each
        accepted workflow needs a status call), though it only presses its limit later."""
        for other in self._endpoints.values():
            if not other.settled and other.allowance < allowance:
                other.allowance = allowance

    def refused(self, limiter: EndpointLimiter, ticket: Ticket | None, retry_after: float | None) -> None:
        """A 429 on `limiter`: hold for its hint, and learn from what the server's window had served."""
        with self.lock:
            limiter._cautious = True
        began = self._window_began(limiter, retry_after)  # before this 429's own hold moves hold_ends
        if retry_after is not None:
            # Until 429s have shown that each endpoint has a window of its own, a Retry-After may be
            # the organization's: nobody sends inside it.
            self.hold(limiter, retry_after, everyone=not self.per_endpoint)
        if ticket is not None:
            self.book.give_back(ticket, ok=False)
        lookback = self.clock() - began + _COUNT_SLACK  # measured now: the book counts back from its now
        served, total = self.book.served(limiter.name, lookback)
        with self.lock:
            if served == 0:
                return  # nothing of ours was served: someone else spent the window; nothing to learn
            now = self.clock()
            refusal = _Refusal(limiter.name, served, total, window_start=began, at=now)
            if self.limit.auto and not limiter.settled:
                # auto found the edge by growing: back off to it at once and stop growing.
                limiter.allowance = min(limiter.allowance, with_margin(served))
                limiter.proven = True
                self._lift_unsettled(limiter.allowance)
            limiter.settled = True
            self._refusals = [*self._refusals[-19:], refusal]
            self._relearn(limiter, refusal)

    def _window_began(self, limiter: EndpointLimiter, retry_after: float | None) -> float:
        """When the server's window began (the limiter's clock), as well as this 429 and the last hold
        tell."""
        seconds = self.limit.seconds
        now = self.clock()
        if 0 < now - limiter.hold_ends < seconds:
            # A hold ended inside this window: the server's window cannot have begun before it did.
            return limiter.hold_ends
        if retry_after is None or not 0 < retry_after <= seconds:
            return now - seconds  # a sliding guess: may count some of the window before
        # Retry-After in whole seconds may be up to one second longer than the wait to the reset.
        rounded = float(retry_after).is_integer()
        return now - min(seconds, seconds - retry_after + (1.0 if rounded else 0.0))

    def _relearn(self, limiter: EndpointLimiter, newest: _Refusal) -> None:
        """Learn what two 429s of different server windows agree on. One 429 alone teaches nothing (it
        holds the endpoint and makes it cautious): a fault, or another client, can answer 429 once."""
        changed: dict[str, RateLimit | None] = {}
        own = [r for r in self._refusals if r.endpoint == limiter.name]
        confirmed = _confirmed(own, lambda r: r.served)
        if confirmed is not None and with_margin(confirmed) != limiter.learned:
            limiter.learned = with_margin(confirmed)
            limiter.allowance = min(self.ceiling, limiter.learned)
            changed[limiter.name] = RateLimit(limiter.learned, self.limit.seconds)
            self.per_endpoint = self.shared is None
        if newest.total > newest.served:  # others were served in the same window: evidence of sharing
            shared = _confirmed([r for r in self._refusals if r.total > r.served], lambda r: r.total)
            if shared is not None and with_margin(shared) != self.shared:
                self.shared = with_margin(shared)
                self.per_endpoint = False
                changed[SHARED_SCOPE] = RateLimit(self.shared, self.limit.seconds)
        if self.shared is not None and newest.total < self.shared - max(
            1, int(self.shared * RATE_LEARN_TOLERANCE)
        ):
            # Refused while the organization's window had room: the window is not (only) shared.
            self.shared = None
            changed[SHARED_SCOPE] = None
        for scope, limit in changed.items():
            self.book.learn(scope, limit)

    def learned_limits(self) -> dict[str, str]:
        """What this limiter now goes by where it differs from the configured limit, for the run report."""
        with self.lock:
            seconds = f"{self.limit.seconds:g}"
            shown = {
                name: f"{limiter.allowance}/{seconds}"
                for name, limiter in sorted(self._endpoints.items())
                if limiter.learned is not None
                or (self.limit.auto and limiter.allowance != self.limit.requests)
            }
            if self.shared is not None:
                shown["organization"] = f"{self.shared}/{seconds}"
            return shown


_shared: dict[tuple[str, str, RateLimit, str], RateLimiter] = {}
_shared_lock = threading.Lock()


def shared_limiter(
    base_url: str,
    organization: str,
    limit: RateLimit,
    *,
    book: str = "",
    make_book: Callable[[], SlotBook] | None = None,
) -> RateLimiter:
    """The process-wide limiter for one API host, key and book (`book` names it: the store's URL, or ""
    for this process's memory), so every client in the process shares it."""
    key = (base_url, organization, limit, book)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = RateLimiter(limit, book=make_book() if make_book else None)
        return _shared[key]
