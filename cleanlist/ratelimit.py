"""Client-side rate limiter: a sliding log per endpoint that learns the API's real limits from its 429s.

The API does not publish its limits ("back off on 429"), so the configured limit is a guess:

* **Pacing.** A sliding log guarantees that no span of a limit's window holds more than its count, so a
  fixed-window server with that limit never sees one more in one of its windows. A slot counts from when
  it was taken; once its request is `release`d it counts from the answer instead (the server counted the
  request before it answered). Windows are widened by a small margin for clocks that tick apart. An
  endpoint may be paced by two limits at once: the configured `N/SECONDS` (a ceiling) and a learned one
  (a count in a window of its own).
* **Holds.** A 429's Retry-After holds the endpoint for every thread, coroutine and — with a shared
  book — every process, until it has elapsed: nobody sends inside a window the client has read.
  After a 429 the endpoint is "cautious" until a request gets another answer: one request in flight.
* **Learning: a count in a measured window.** Each 429 bounds where the server's window resets: at the
  end of its Retry-After, or up to RATE_WINDOW_ROUNDING before (whole seconds rounded up, or an HTTP
  date's whole seconds), or, without a hint, between the 429 and the next answer served. Between two
  resets the client counts what the server served; the distance between them bounds the window, the
  count is its limit. Until that window is measured, a 429 only shortens the pacing window to its hint
  (so our own pacing cannot hide the server's window from the next measurement), and the endpoint keeps
  filling windows to their edge (one request at a time would skip windows and measure nothing). Two
  measures of different server windows that agree (counts within RATE_LEARN_TOLERANCE, bounds that
  overlap) make the learned limit: the count less 5 % (`with_margin`) in the likeliest window their
  bounds allow (`_likely_window`: the configured one if it fits, else a whole second). One 429 alone
  teaches nothing: a fault, or another client, can answer 429 once. Without a hint, once a window is
  measured the endpoint is held until it likely reopens. Totals served by every endpoint that agree
  across the 429s of two endpoints are evidence of one window for the whole organization: the total
  becomes a shared limit ("*" scope) that every endpoint also draws on (one endpoint's totals alone
  agree with a steady mix under windows per endpoint too); totals that scatter drop it.
* **Re-checking.** A learned limit from the book (an earlier run, another process) is a starting point:
  the endpoint paces by it for RATE_STORED_RECHECK_SECONDS, then grows from it — one slot per clean
  answer while short of slots — until this run's own 429s settle it, and a limit the server serves
  above is dropped. A limit settled in this run probes one request above itself after
  RATE_RECHECK_WINDOWS clean windows at its edge; served, it grows again. A 429 that confirms the limit
  brings the allowance back to it, and a measure spanning several windows of the learned limit at no
  more than its rate (the server reset unseen while the client paced below it) is no measure of a window.
* **Limits.** `N/SECONDS` is a hard ceiling that learning never lifts. `auto` (`auto/SECONDS`) starts
  from the documented 60 per minute and grows — one slot per clean answer while the endpoint is short of
  slots — until the first 429, then settles on what is measured. Until an endpoint has either been
  refused once or proven a full window clean, at most PROBE_IN_FLIGHT of its requests are in flight, so
  a wrong guess costs one 429, not a burst of them.
* **Books.** Slots, holds and learned limits live in a `SlotBook`: `MemoryBook` shares them between the
  threads and coroutines of one process; the store's book (cleanlist/store/ratebook.py) shares them
  between every process and machine that uses the same store, so runs of one organization together
  stay within its limit. Learned limits (count and window) are kept in the store for the next run.

The clock and both ways of sleeping are injectable (real time by default), so tests run in virtual time.
"""

from __future__ import annotations

import asyncio
import logging
import math
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
    RATE_RECHECK_WINDOWS,
    RATE_STORED_RECHECK_SECONDS,
    RATE_WINDOW_MARGIN_CAP,
    RATE_WINDOW_MARGIN_FRACTION,
    RATE_WINDOW_ROUNDING,
)
from cleanlist.errors import StoppedBeforeSending
from cleanlist.settings import RateLimit

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], None]
AsyncSleep = Callable[[float], Awaitable[None]]

SHARED_SCOPE = "*"  # the organization-wide window, when the 429s say there is one
# Counting what a window served reaches this much further back than its start: the limiter and the book
# read their clocks a moment apart, and no slot is taken during the hold that precedes a window anyway.
_COUNT_SLACK = 0.05
_KEEP_SERVED = 300.0  # seconds a memory book keeps answered slots at least, for measures
LINE_STOP_CHECK = 0.1  # seconds between looks at the stop request of a thread waiting in line


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
    more: tuple[Ticket, ...] = ()  # further tickets, when `take` was asked for several at once


@dataclass(frozen=True)
class Pace:
    """At most `allowance` slots of `scope` in any span of `window` seconds. One scope may have several
    (the configured ceiling and a learned limit, each in its own window); a request takes one slot per
    scope."""

    scope: str
    allowance: int
    window: float


class SlotBook(Protocol):
    """Where slots, holds and learned limits live. Durations are seconds on the book's own clock."""

    def take(self, endpoint: str, paces: Sequence[Pace], count: int = 1) -> Taken:
        """Take a slot in every scope at once — or none, and say how long to wait before asking again.
        With `count` > 1, up to `count` requests' slots (as many as the paces allow now) in one go."""
        ...

    def give_back(self, ticket: Ticket, *, ok: bool) -> None:
        """The request is over: its slots count from now; `ok` if it was served (not refused)."""
        ...

    def hold(self, scopes: Sequence[str], seconds: float) -> None: ...

    def held_for(self, scope: str) -> float: ...

    def hold_ended(self, scope: str) -> float | None:
        """Seconds since the scope's latest hold ended (negative while it lasts); None if never held.
        A hold ends at a reset of the server's window that some process of the book saw."""
        ...

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


def longest_windows(paces: Sequence[Pace]) -> dict[str, float]:
    """Per scope, the longest window any of its paces counts over (how long its slots matter)."""
    windows: dict[str, float] = {}
    for pace in paces:
        windows[pace.scope] = max(windows.get(pace.scope, 0.0), pace.window)
    return windows


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
        self._kept: dict[str, float] = {}  # per scope, the longest window its slots were counted over
        self._lock = threading.Lock()

    def _live(self, scope: str, now: float, window: float) -> list[_Slot]:
        self._kept[scope] = max(self._kept.get(scope, 0.0), window)
        # Kept a few windows past the longest: a measure counts what was served since the last reset.
        keep = max(3 * self._kept[scope], _KEEP_SERVED)
        slots = [s for s in self._slots.get(scope, []) if s.in_flight or s.stamp > now - keep]
        self._slots[scope] = slots
        return [s for s in slots if s.in_flight or s.stamp > now - window]

    def take(self, endpoint: str, paces: Sequence[Pace], count: int = 1) -> Taken:
        with self._lock:
            now = self._clock()
            held = {pace.scope for pace in paces} | {SHARED_SCOPE}  # a hold on "*" holds every endpoint
            wait = max(self._held.get(scope, 0.0) - now for scope in held)
            if wait > 0:
                return Taken(None, wait, held=True)
            for scope, keep in longest_windows(paces).items():
                self._kept[scope] = max(self._kept.get(scope, 0.0), keep)
            for pace in paces:
                live = self._live(pace.scope, now, pace.window)
                if len(live) >= pace.allowance:
                    done = sorted(s.stamp for s in live if not s.in_flight)
                    # The wait until enough of the window's slots have expired for one more.
                    excess = len(live) - pace.allowance
                    if len(done) > excess:
                        return Taken(None, max(done[excess] + pace.window - now, 0.001))
                    return Taken(None, 0.01)
                count = min(count, pace.allowance - len(live))
            tickets: list[Ticket] = []
            for _ in range(count):
                ticket = _MemoryTicket()
                for scope in longest_windows(paces):
                    slot = _Slot(endpoint, now, now)
                    self._slots.setdefault(scope, []).append(slot)
                    ticket.slots.append((scope, slot))
                tickets.append(ticket)
            return Taken(tickets[0], more=tuple(tickets[1:]))

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

    def hold_ended(self, scope: str) -> float | None:
        with self._lock:
            held = self._held.get(scope)
            return None if held is None else self._clock() - held

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


def _likely_window(lo: float, hi: float, configured: float | None) -> float:
    """The window length to pace by, of those the measures allow (`lo`..`hi`): the configured window if
    it is one of them (the measures cannot tell it wrong), else the whole second nearest their middle —
    rounded up from 0.3 s below it, since a window paced too short costs 429s — kept within the bounds.
    Servers count in whole seconds; a wrong guess costs 429s, whose measures narrow the bounds again."""
    lo = max(lo, 0.001)
    if configured is not None and lo <= configured <= hi:
        return configured
    return min(max(float(math.ceil((lo + hi) / 2 - 0.3)), lo), hi)


def limit_text(limit: RateLimit) -> str:
    """A learned limit as the report and `cleanlist-enrich limits` show it: `4/3s`, `95/120s`."""
    return f"{limit.requests}/{round(limit.seconds, 1):g}s"


@dataclass
class _Measure:
    """What the server served between two of its resets, as the client saw it."""

    endpoint: str
    served: int  # by the endpoint since the previous reset, before the 429
    total: int  # by every endpoint in that time
    lo: float  # the window (previous reset to this one) is at least this long...
    hi: float  # ...and at most this (a whole-second Retry-After hides up to a second of each reset)
    since: float  # the previous reset (the latest it can have been)
    at: float  # this reset (the latest it can be)


@dataclass
class _Pending:
    """A 429 without a hint: its measure is complete when the server serves again (its reset)."""

    refused_at: float
    served: int
    total: int
    since: float | None
    since_lo: float | None


def _confirmed(
    measures: Sequence[_Measure],
    count: Callable[[_Measure], int],
    configured: float | None,
    *,
    endpoints: int = 1,
    lowest: bool = False,
) -> RateLimit | None:
    """The limit the newest measure agrees on with earlier ones of other server windows: counts that
    agree, window bounds that overlap, 429s of at least `endpoints` endpoints. The smallest count (less
    the margin), in the likeliest window of the bounds they all allow.

    With `lowest`, the lowest count that any two measures agree on, whichever is newest. A measure can
    only count too many: the client resumes where the latest reset can be, so it may send into the tail
    of one server window and then fill the next before its 429 — two windows counted as one (whole-second
    hints cannot tell them apart). On a loaded machine such tails came twice alike and "4 a second" was
    learned as 7 a second (CI, 2026-12-07); a window counted whole is never above the limit."""
    if len(measures) < 2:
        return None
    best: RateLimit | None = None
    for at in range(len(measures) - 1, 0, -1) if lowest else [len(measures) - 1]:
        newest = measures[at]
        lo, hi, counts, names = newest.lo, newest.hi, [count(newest)], {newest.endpoint}
        for earlier in reversed(measures[:at]):
            if newest.since < earlier.at - _COUNT_SLACK:
                continue  # the same server window, measured by another request or endpoint: not a second one
            if _agree([count(newest), count(earlier)]) and earlier.lo <= hi and earlier.hi >= lo:
                lo, hi = max(lo, earlier.lo), min(hi, earlier.hi)
                counts.append(count(earlier))
                names.add(earlier.endpoint)
        if len(counts) < 2 or len(names) < endpoints:
            continue
        found = RateLimit(with_margin(min(counts)), _likely_window(lo, hi, configured))
        if best is None or found.requests < best.requests:
            best = found
    return best


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
        self.window = widened(limit.seconds)  # the pacing window: configured, a hint's, or learned
        self.allowance = limit.requests  # slots per window now: configured, grown (auto) or learned
        self.learned: RateLimit | None = None  # what its 429s taught (count in a measured window)
        self.settled = False  # refused in this run: growth stops (until a re-check probe is served)
        self.rechecking = False  # paced by a limit an earlier run learned: grows from it until refused
        self.measured = False  # this run's 429s have measured its window (two measures agreed)
        self.proven = False  # served a whole window at its allowance without a 429
        self.hold_ends = 0.0  # when the last Retry-After hold on it ended (the limiter's clock)
        self.reset_at: float | None = None  # where the server's window last reset, as its 429s told...
        self.reset_lo: float | None = None  # ...at the latest, and at the earliest
        self._recheck_at = 0.0  # a limit from the book is re-checked from then on (grows past itself)
        self._recheck_started = False
        self.paced_by_learned = 0  # requests that waited for a slot while a learned limit paced it
        self._pending: _Pending | None = None
        self._clean_since = 0.0  # when the current clean stretch began (re-check probes)
        self._recheck_windows = RATE_RECHECK_WINDOWS
        self._probe_above = False  # one request above the allowance is allowed (a re-check probe)
        self._probe_ticket: Ticket | None = None
        self._in_flight = 0
        self._cautious = False
        self._short = False  # a request waited for a slot since the last clean answer (auto grows on it)
        self._tickets: list[Ticket] = []
        self._clean: deque[float] = deque()  # this process's clean answers in the last window
        self.paced = 0  # requests that had to wait for a slot (not for a Retry-After hold)
        # Threads of this process wait in line (`acquire`): only the first asks the book, so a slot
        # that frees wakes one thread and costs one book transaction, not one per waiting thread.
        self._line = threading.Condition(threading.Lock())
        self._line_next = 0  # the number the next thread to arrive draws
        self._line_head = 0  # the number whose turn it is to ask the book
        self._line_left: set[int] = set()  # numbers that left the line before their turn came
        self._granted: deque[Ticket] = deque()  # slots taken for threads further back in line
        self._gather: tuple[int, float] | None = None  # (requests, until): the first waits for the rest

    def __repr__(self) -> str:
        return f"EndpointLimiter({self.name}: {self.allowance}/{self.window:g})"

    @property
    def _probing(self) -> bool:
        """Probing an unknown limit: auto until it has found its edge (or a full window went clean).
        Not after a 429: the window is measured between resets, so each window must be filled up to
        the server's edge until two measures agree (one request at a time skips windows and measures
        nothing); the hint's hold and one request in flight after each 429 keep the cost to about one
        429 a window until then. Nor while a limit from the book is re-checked: it grows one slot per
        clean answer, as gently."""
        if self.learned is not None or self.proven:
            return False
        return self.limit.auto and not self.settled

    def _reserve(self, counted: list[bool], want: int = 1) -> float:
        """Take a slot now and return 0, or return how long to wait before asking again. With `want` > 1
        (threads are waiting in line behind this one), the slots the book grants beyond the first are
        kept in `_granted` for them: one book transaction for a window's burst, not one per request."""
        parent = self._parent
        with parent.lock:
            if (held := self.hold_ends - parent.clock()) > 0:
                return held  # a hold of this process, perhaps not yet in the book (`RateLimiter.hold`)
            if self._cautious and self._in_flight > 0:
                return 0.01
            if self._probing and self._in_flight >= PROBE_IN_FLIGHT:
                return 0.01
            if self._cautious or self._probing or self._probe_above:
                want = 1  # one request at a time: each answer may change what the next may do
            paces = parent.paces_for(self)
            # Counted before asking the book, so no other thread slips past the caps.
            self._in_flight += want
        taken = parent.book.take(self.name, paces, want)
        with parent.lock:
            if taken.ticket is not None:
                self._tickets.append(taken.ticket)
                self._granted.extend(taken.more)
                self._in_flight -= want - 1 - len(taken.more)
                return 0.0
            self._in_flight -= want
            if not taken.held:
                self._short = True
                waiting_recheck = self.rechecking and not self._recheck_started
                parent.short_of_slots(self)
                if not counted:
                    counted.append(True)
                    self.paced += 1
                    if self.learned is not None:
                        self.paced_by_learned += 1
                if waiting_recheck:
                    # Ask again when the re-check of a limit from the book begins (it lets one more go).
                    return min(taken.wait, max(self._recheck_at - parent.clock(), 0.001))
            return taken.wait

    def _take_granted(self) -> bool:
        """Take a slot the thread ahead in line was granted for this one (True), if one is left."""
        with self._parent.lock:
            if not self._granted:
                return False
            self._tickets.append(self._granted.popleft())
            return True

    def _give_back_unclaimed(self) -> None:
        """Slots granted for threads that left the line unserved (a stop) go back to the book, unsent."""
        with self._line:
            if self._line_head != self._line_next:
                return  # someone is still in line: the slots are theirs
        self._take_back_granted()

    def _take_back_granted(self) -> None:
        """Slots granted but not yet taken go back to the book, unsent: a hold that began since they
        were granted (a 429's Retry-After) must keep the threads in line from sending on them."""
        with self._parent.lock:
            unclaimed, self._granted = list(self._granted), deque()
            self._in_flight = max(self._in_flight - len(unclaimed), 0)
        for ticket in unclaimed:
            self._parent.book.give_back(ticket, ok=False)

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
        number = self._wait_for_turn(stop)
        try:
            if stop is not None and stop.is_set():
                raise StoppedBeforeSending(self.name)
            if self._take_granted():
                return
            if self._gather is not None:
                self._gathered(stop)
            counted: list[bool] = []
            while True:
                if stop is not None and stop.is_set():
                    raise StoppedBeforeSending(self.name)
                with self._line:
                    in_line = self._in_line()
                delay = self._reserve(counted, max(1, min(in_line, self.allowance)))
                if delay <= 0:
                    return
                if stop is None:
                    self._parent.sleep(delay)
                elif stop.wait(delay):
                    raise StoppedBeforeSending(self.name)
        finally:
            with self._line:
                self._leave_line(number)
            if self._granted:
                self._give_back_unclaimed()

    def _wait_for_turn(self, stop: threading.Event | None) -> int:
        """Draw a number and wait until it is first in line (without asking the book; a stop is seen
        within LINE_STOP_CHECK seconds and raises StoppedBeforeSending); returns the number."""
        with self._line:
            number = self._line_next
            self._line_next += 1
            if self._gather is not None:
                self._line.notify_all()  # the head may be gathering a burst: one more is in line
            while self._line_head != number:
                if stop is not None and stop.is_set():
                    self._leave_line(number)
                    break
                self._line.wait(LINE_STOP_CHECK if stop is not None else None)
            else:
                return number
        if self._granted:
            self._give_back_unclaimed()
        raise StoppedBeforeSending(self.name)

    def gather(self, requests: int, timeout: float) -> None:
        """Let the next `requests` requests leave together: the first waits, at most `timeout` seconds,
        until that many are in line (then one book transaction grants their slots, as far as the limit
        allows). A run's first burst, whose tasks reach the limiter one by one as they start: sent one
        by one, each would pace its own lane of every later window (a slot counts from its answer)."""
        with self._line:
            self._gather = (requests, time.monotonic() + timeout) if requests > 1 else None

    def _gathered(self, stop: threading.Event | None) -> None:
        with self._line:
            while self._gather is not None:
                requests, until = self._gather
                left = until - time.monotonic()
                if self._in_line() >= requests or left <= 0 or (stop is not None and stop.is_set()):
                    self._gather = None
                    break
                self._line.wait(min(left, LINE_STOP_CHECK))

    def _in_line(self) -> int:
        """Threads in line now, the one whose turn it is included. Called with `_line` held."""
        return self._line_next - self._line_head - len(self._line_left)

    def _leave_line(self, number: int) -> None:
        """`number` leaves the line (served, or stopped while waiting); the next in line gets the turn.
        Called with `_line` held."""
        self._line_left.add(number)
        while self._line_head in self._line_left:
            self._line_left.discard(self._line_head)
            self._line_head += 1
        self._line.notify_all()

    def wait_out_hold(self, stop: threading.Event | None = None) -> None:
        """With a slot, right before sending: a hold that began after the slot was granted (the 429 of a
        request already on the wire came back meanwhile) is waited out first, the slot kept. A stop
        while waiting gives the slot back unsent and raises StoppedBeforeSending. Reads this process's
        own hold only (no book transaction): it narrows, to the send itself, the time in which a
        request granted before a 429 can still leave inside its Retry-After."""
        parent = self._parent
        while (left := self.hold_ends - parent.clock()) > 0:
            if stop is None:
                parent.sleep(left)
            elif stop.wait(left):
                self.release(rate_limited=False, answered=False)
                raise StoppedBeforeSending(self.name)

    async def wait_out_hold_async(self, stop: threading.Event | None = None) -> None:
        """`wait_out_hold` without blocking the event loop (a stop is noticed within a tenth of a second)."""
        parent = self._parent
        while (left := self.hold_ends - parent.clock()) > 0:
            if stop is not None and stop.is_set():
                self.release(rate_limited=False, answered=False)
                raise StoppedBeforeSending(self.name)
            await parent.async_sleep(left if stop is None else min(left, 0.1))

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
            parent.book.used(pace.scope, pace.window) / pace.allowance for pace in parent.paces_for(self)
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
        self._measures: list[_Measure] = []
        self.shared: RateLimit | None = None  # the organization-wide limit, while the 429s say there is one
        self.per_endpoint = False  # 429s have shown a window per endpoint (a 429 then holds only its own)
        self._learned_seen = 0.0
        self._learned: dict[str, RateLimit] = {}
        self.adopted: dict[str, RateLimit] = {}  # limits this limiter started from (an earlier run's)

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
        """Start from what an earlier run (or another process) learned of this endpoint: a starting
        point this run re-checks, whatever window it was measured in."""
        if learned is None:
            return
        limiter.learned = learned
        limiter.allowance = min(AUTO_RATE_CAP, learned.requests)
        limiter.window = widened(learned.seconds)
        limiter.rechecking = True
        # Not at once: a short run paces by what was measured (no 429 to pay); a longer one re-checks.
        limiter._recheck_at = self.clock() + RATE_STORED_RECHECK_SECONDS
        self.adopted[limiter.name] = learned
        logger.info(
            "rate limit: %s starts from %s, learned earlier; re-checked during this run",
            limiter.name,
            limit_text(learned),
        )

    def _learned_now(self) -> dict[str, RateLimit]:
        """The book's learned limits, asked at most once a second."""
        now = self.clock()
        if now - self._learned_seen >= 1.0 or not self._learned_seen:
            self._learned_seen = now
            self._learned = self.book.learned()
            shared = self._learned.get(SHARED_SCOPE)
            if shared is not None and (self.shared is None or shared.requests < self.shared.requests):
                self.shared = shared
        return self._learned

    def paces_for(self, limiter: EndpointLimiter) -> list[Pace]:
        """What one request of `limiter` must fit in: its own limit (learned, a hint's or configured),
        the configured ceiling, and the organization's shared window."""
        with self.lock:
            learned = self._learned_now().get(limiter.name)
            if (
                learned is not None
                and learned != limiter.learned
                and limiter.learned is not None
                and learned.requests / learned.seconds < limiter.learned.requests / limiter.learned.seconds
            ):
                # Another process learned a lower limit meanwhile.
                limiter.learned = learned
                limiter.allowance, limiter.window = learned.requests, widened(learned.seconds)
            allowance = limiter.allowance + (1 if limiter._probe_above else 0)
            paces = [Pace(limiter.name, allowance, limiter.window)]
            if not self.limit.auto and (limiter.window, allowance) != (self.window, self.limit.requests):
                paces.append(Pace(limiter.name, self.limit.requests, self.window))
            if self.shared is not None:
                paces.append(Pace(SHARED_SCOPE, self.shared.requests, widened(self.shared.seconds)))
            return paces

    def hold(self, limiter: EndpointLimiter, seconds: float, *, everyone: bool = False) -> None:
        """Hold `limiter`'s endpoint — and, with `everyone` or a shared window, every endpoint."""
        scopes = [limiter.name] + ([SHARED_SCOPE] if everyone or self.shared is not None else [])
        now = self.clock()
        # This process's own threads see the hold first (`_reserve`, `wait_out_hold`), before the book's
        # write transaction, which may wait its turn behind the store's other writers: meanwhile the
        # book still granted slots, and requests left 0.12-0.14 s after the 429 (benchmarks.ratelimits).
        with self.lock:
            limiter._cautious = True
            limiter.hold_ends = max(limiter.hold_ends, now + seconds)
            held = [limiter]
            if self.shared is not None:  # one window: it began anew for every endpoint (a hold only to be
                # safe says nothing of the other endpoints' windows)
                held = list(self._endpoints.values())
                for other in held:
                    other.hold_ends = max(other.hold_ends, now + seconds)
            if everyone:
                held = list(self._endpoints.values())
        self.book.hold(scopes, seconds)
        for one in held:
            one._take_back_granted()

    # -- learning ---------------------------------------------------------------------------------
    def short_of_slots(self, limiter: EndpointLimiter) -> None:
        """A request waited for a slot: after a long clean stretch at its edge, a settled limit lets one
        request above it go (the re-check probe)."""
        now = self.clock()
        if limiter.rechecking and not limiter._recheck_started and not limiter.settled:
            if now >= limiter._recheck_at:
                # The re-check of a limit from the book begins: one slot more, then one per clean answer.
                limiter._recheck_started = True
                limiter.allowance = min(limiter.allowance + 1, AUTO_RATE_CAP)
                self._outgrown(limiter)
            return
        if not limiter.settled or limiter.learned is None or limiter._probe_above:
            return
        if now - limiter._clean_since >= limiter._recheck_windows * limiter.window:
            limiter._probe_above = True

    def clean_answer(self, limiter: EndpointLimiter) -> None:
        """An answer that was not a 429: the endpoint is open; it grows while it is re-checking or auto;
        a clean full window proves it; a hint-less 429's measure completes (the server serves again)."""
        now = self.clock()
        if not (limiter.proven or self.limit.auto):
            # Counted here, not in the book: one more transaction per answer is too dear for a hint.
            clean = limiter._clean
            clean.append(now)
            while clean and clean[0] <= now - limiter.window:
                clean.popleft()
            limiter.proven = len(clean) >= limiter.allowance
        may_grow = (
            self.limit.auto or (limiter.rechecking and limiter._recheck_started)
        ) and not limiter.settled
        # Asked of the book only when it matters: one more store transaction per answer is dear.
        full = (may_grow or limiter._probe_above) and self.book.used(
            limiter.name, limiter.window
        ) >= limiter.allowance
        with self.lock:
            limiter._cautious = False
            pending, limiter._pending = limiter._pending, None
            if limiter._probe_above and full:
                # The re-check probe was served above the settled limit: the server allows more now, and
                # what its 429s measured before is out of date (the lowest count would win again).
                limiter._probe_above = False
                self._forget_measures(limiter)
                limiter.settled = False
                limiter.rechecking = limiter._recheck_started = True
                limiter._recheck_windows = RATE_RECHECK_WINDOWS
            rechecking = limiter.rechecking and limiter._recheck_started
            growing = (self.limit.auto or rechecking) and not limiter.settled
            if growing and (limiter._short or full):
                # Short of slots and answered clean: one more slot (doubling per round trip, as TCP's
                # slow start does) until a 429 settles it.
                limiter.allowance = min(limiter.allowance + 1, AUTO_RATE_CAP)
                limiter._short = False
                if self.limit.auto:
                    self._lift_unsettled(limiter.allowance)
                self._outgrown(limiter)
        if pending is not None:
            # Without a hint the reset lies between the 429 and this answer.
            self._measured(
                limiter,
                (pending.served, pending.total),
                pending.since,
                pending.since_lo,
                reset=now,
                reset_lo=pending.refused_at,
            )

    def _outgrown(self, limiter: EndpointLimiter) -> None:
        """A learned limit the server served above, grown past the configured ceiling: it no longer paces
        anything, so it is forgotten (the ceiling paces)."""
        if self.limit.auto or limiter.learned is None:
            return
        # Outgrown only when it allows at least the ceiling's count in every span of its own window (a
        # learned 4/3s is tighter than 60/60 though its rate is higher: it caps bursts).
        if limiter.allowance >= self.limit.requests * max(1, math.ceil(limiter.window / self.window - 0.01)):
            self._forget_measures(limiter)
            limiter.learned = None
            limiter.rechecking = False
            limiter.allowance, limiter.window = self.limit.requests, self.window
            self.book.learn(limiter.name, None)
            self._learned.pop(limiter.name, None)

    def _lift_unsettled(self, allowance: int) -> None:
        """auto: what one endpoint has been served clean, the others may start from. The documented limit
        is the same for every endpoint, and the status endpoint must keep up with the bulk one (each
        accepted workflow needs a status call), though it only presses its limit later."""
        for other in self._endpoints.values():
            if not other.settled and other.learned is None and other.allowance < allowance:
                other.allowance = allowance

    def refused(self, limiter: EndpointLimiter, ticket: Ticket | None, retry_after: float | None) -> None:
        """A 429 on `limiter`: hold for its hint, and measure what the server served since its last reset."""
        now = self.clock()
        if retry_after is not None:
            with self.lock:  # this process stops sending at once; the book hears of it below
                limiter._cautious = True
                limiter.hold_ends = max(limiter.hold_ends, now + retry_after)
        # The latest reset any process of the book saw (where its last hold ended), before this 429's
        # own hold: measured from an older reset of its own, a window spans resets the other runs saw
        # and is taken for one long window (two runs sharing a book learned "1 a second" as 3 per 6 s,
        # fault-schedule seed 2922321).
        ended = self.book.hold_ended(limiter.name)
        with self.lock:
            limiter._cautious = True
            since, since_lo = limiter.reset_at, limiter.reset_lo
            if ended is not None and ended >= 0 and (since is None or now - ended > since + _COUNT_SLACK):
                since = now - ended
                since_lo = since - RATE_WINDOW_ROUNDING  # another's hint: as coarse as a whole second
            if limiter._probe_above:
                # The re-check probe was refused: the limit stands; probe again twice as late.
                limiter._probe_above = False
                limiter._recheck_windows *= 2
            limiter._clean_since = now
            limiter.settled = True
            limiter.rechecking = False
            limiter._pending = None
        if retry_after is not None:
            # Until 429s have shown that each endpoint has a window of its own, a Retry-After may be
            # the organization's: nobody sends inside it.
            self.hold(limiter, retry_after, everyone=not self.per_endpoint)
        if ticket is not None:
            self.book.give_back(ticket, ok=False)
        served = total = 0
        if since is not None and since < now:
            # Measured now: the book counts back from its own now.
            served, total = self.book.served(limiter.name, self.clock() - since + _COUNT_SLACK)
        if retry_after is None:
            with self.lock:
                limiter._pending = _Pending(now, served, total, since, since_lo)
                guess = self._next_reset(limiter, since)
            if guess is not None and guess > now:
                # No hint: what was measured of the window tells when it reopens (its shortest length,
                # so the guess errs early); asking before that only collects 429s.
                self.hold(limiter, guess - now, everyone=not self.per_endpoint)
            return
        # A hint of a second or more is whole seconds rounded up (or an HTTP date's whole seconds): the
        # reset may be up to RATE_WINDOW_ROUNDING earlier than it says.
        rounding = RATE_WINDOW_ROUNDING if retry_after >= 1 else 0.0
        reset = now + retry_after
        self._measured(
            limiter,
            (served, total),
            since,
            since_lo,
            reset=reset,
            reset_lo=reset - rounding,
            hint=retry_after,
        )

    def _forget_measures(self, limiter: EndpointLimiter) -> None:
        """The server served `limiter` above what its measures told: they no longer describe it."""
        self._measures = [m for m in self._measures if m.endpoint != limiter.name]

    def _next_reset(self, limiter: EndpointLimiter, since: float | None) -> float | None:
        """When the server's window is likely to reset next, from its last reset and what was measured
        of its length (the learned window, or the shortest a measure allows); None if nothing was."""
        if since is None:
            return None
        if limiter.learned is not None:
            return since + limiter.learned.seconds
        own = [m.lo for m in self._measures if m.endpoint == limiter.name and m.lo > 0]
        return since + own[-1] if own else None

    def _measured(
        self,
        limiter: EndpointLimiter,
        counts: tuple[int, int],
        since: float | None,
        since_lo: float | None,
        *,
        reset: float,
        reset_lo: float,
        hint: float | None = None,
    ) -> None:
        """The server's window reset between `reset_lo` and `reset`; between the previous reset (`since_lo`
        to `since`) and its 429 it had served `counts` (this endpoint's, every endpoint's): a measure of
        its window, once there are two."""
        served, total = counts
        with self.lock:
            others = list(self._endpoints.values()) if not self.per_endpoint or self.shared else [limiter]
            for other in others:
                # One window for everyone until the 429s say otherwise; a later reset wins.
                if other is limiter or (other.reset_at or 0.0) < reset:
                    other.reset_at, other.reset_lo = reset, reset_lo
            if not limiter.measured:
                # Until the window is measured, our own pacing must not hide it: the window is at least
                # as long as the hint, and pacing over a longer one would skip the server's next window.
                wait = hint if hint is not None else reset - (since or reset)
                if wait > 0:
                    limiter.window = min(limiter.window, widened(max(wait, 0.001)))
            if since is None or served == 0:
                return  # the first 429 (no reset seen before it), or someone else spent the window
            if reset - since <= 0:
                return
            # Widened by half the tolerance each side: latency and clocks blur both resets a little.
            slack = (reset - (since_lo or since)) * RATE_LEARN_TOLERANCE / 2
            lo, hi = reset_lo - since - slack, reset - (since_lo or since) + slack
            learned = limiter.learned
            if (
                learned is not None
                and lo > 1.5 * learned.seconds
                and served <= learned.requests * math.ceil(hi / learned.seconds)
            ):
                # Several windows of the learned limit, served at most at its rate: since the last reset
                # the client saw, the server reset unseen (it paced below the limit between its 429s).
                # Not one window: taken for one, "1 a second" was learned as "20 per 22 s" (fault-
                # schedule seed 2922321). It confirms the learned limit, nothing more.
                limiter.allowance = min(limiter.allowance, learned.requests)
                return
            measure = _Measure(limiter.name, served, total, lo, hi, since=since, at=reset)
            self._measures = [*self._measures[-19:], measure]
            self._relearn(limiter, measure)

    def _relearn(self, limiter: EndpointLimiter, newest: _Measure) -> None:
        """Learn what two measures agree on (see the module docstring)."""
        changed: dict[str, RateLimit | None] = {}
        own = [m for m in self._measures if m.endpoint == limiter.name]
        configured = None if self.limit.auto else self.limit.seconds
        confirmed = _confirmed(own, lambda m: m.served, configured, lowest=True)
        # Confirmed again while a re-check had grown the allowance above it: back to it. Kept grown, one
        # request too many went into every window of a server at exactly that limit, a 429 per window
        # (fault-schedule seed 2922321).
        if confirmed is not None and (confirmed != limiter.learned or limiter.allowance > confirmed.requests):
            limiter.learned = confirmed
            limiter.allowance = min(AUTO_RATE_CAP, confirmed.requests)
            limiter.window = widened(confirmed.seconds)
            limiter.proven = limiter.measured = True
            changed[limiter.name] = confirmed
            self.per_endpoint = self.shared is None
            logger.info(
                "rate limit: the API allows %s about %s (measured from its 429s); pacing at that",
                limiter.name,
                limit_text(confirmed),
            )
        if newest.total > newest.served:  # others were served in the same window: evidence of sharing
            # Totals that agree across the 429s of two endpoints: with windows per endpoint, one refused
            # at its own count while the other was served steadily would make one endpoint's totals agree.
            shared = _confirmed(
                [m for m in self._measures if m.total > m.served], lambda m: m.total, configured, endpoints=2
            )
            if shared is not None and shared != self.shared:
                self.shared = shared
                self.per_endpoint = False
                changed[SHARED_SCOPE] = shared
        if self.shared is not None and newest.total < self.shared.requests - max(
            1, int(self.shared.requests * RATE_LEARN_TOLERANCE)
        ):
            # Refused while the organization's window had room: the window is not (only) shared.
            self.shared = None
            changed[SHARED_SCOPE] = None
        for scope, limit in changed.items():
            self.book.learn(scope, limit)
            # What this limiter read of the book a moment ago is stale now.
            if limit is None:
                self._learned.pop(scope, None)
            else:
                self._learned[scope] = limit

    def learned_limits(self) -> dict[str, str]:
        """The learned limits this limiter now goes by, for the run report: `{"enrich-bulk": "4/3s"}`."""
        with self.lock:
            shown = {
                name: limit_text(limiter.learned)
                for name, limiter in sorted(self._endpoints.items())
                if limiter.learned is not None
            }
            if self.limit.auto:
                for name, limiter in sorted(self._endpoints.items()):
                    if limiter.learned is None and limiter.allowance != self.limit.requests:
                        shown[name] = f"{limiter.allowance}/{limiter.window:.1f}s (auto)"
            if self.shared is not None:
                shown["organization"] = limit_text(self.shared)
            return shown

    def pacing_note(self) -> str:
        """One line naming the learned limits that made requests wait, or "" when none did:
        `enrich-bulk 4/3s (learned)`, `(learned earlier, re-checked)` for one this run started from."""
        with self.lock:
            notes = []
            for name, limiter in sorted(self._endpoints.items()):
                if limiter.learned is None or not limiter.paced_by_learned:
                    continue
                how = "learned earlier, re-checked" if limiter.rechecking else "learned"
                notes.append(f"{name} {limit_text(limiter.learned)} ({how})")
            if self.shared is not None:
                notes.append(f"organization {limit_text(self.shared)} (learned)")
            return "; ".join(notes)
