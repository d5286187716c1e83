"""The client-side limiter: never more than N sends in any window, about N per window, holds for everyone,
and no 429 from a sandbox with the same limit."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import pytest

from cleanlist.client import CleanlistClient
from cleanlist.constants import PROBE_IN_FLIGHT
from cleanlist.errors import StoppedBeforeSending
from cleanlist.ratelimit import EndpointLimiter, MemoryBook, Pace, RateLimiter, Taken
from cleanlist.sandbox import SandboxServer
from cleanlist.settings import RateLimit
from tests.sandbox_helpers import people


class VirtualClock:
    """Virtual time for the limiter, shared by threads and coroutines: waits cost no wall time.

    Reading the clock is free and remembered per thread (the limiter reads it once per reservation, so
    right after an `acquire` that asked the book, `last` is the exact moment the slot was taken).
    `sleep(d)` moves time to the sleeper's wake-up — its own last reading plus `d` — never backwards,
    then yields for real, so threads still interleave for real while every wait is exact. Any monotonic
    clock is a schedule the real world could produce, so what holds on this one holds on the real one.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.start = start
        self._now = start
        self._changed = threading.Condition()
        self._local = threading.local()
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        with self._changed:
            self._local.now = self._now
            return self._now

    @property
    def last(self) -> float:
        return float(self._local.now)

    @property
    def elapsed(self) -> float:
        with self._changed:
            return self._now - self.start

    def advance(self, seconds: float) -> None:
        """Let time pass without anybody sleeping (a request on the wire)."""
        with self._changed:
            self._now += seconds

    def _wake_after(self, seconds: float) -> None:
        wake = getattr(self._local, "now", self.start) + seconds
        with self._changed:
            self.sleeps.append(seconds)
            self._now = max(self._now, wake)
            self._changed.notify_all()

    def sleep(self, seconds: float) -> None:
        self._wake_after(seconds)
        time.sleep(0)

    async def async_sleep(self, seconds: float) -> None:
        self._wake_after(seconds)
        await asyncio.sleep(0)

    def wait_for_sleeps(self, count: int, timeout: float = 5.0) -> bool:
        """Block (for real) until callers have slept `count` times in all."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self.sleeps) >= count, timeout)


def virtual_limiter(limit: RateLimit, clock: VirtualClock) -> EndpointLimiter:
    return EndpointLimiter(limit, clock=clock, sleep=clock.sleep, async_sleep=clock.async_sleep)


def busiest_span(sends: Sequence[float], requests: int) -> float:
    """The shortest time covering requests + 1 consecutive sends (inf when there are too few)."""
    ordered = sorted(sends)
    spans = [ordered[i + requests] - ordered[i] for i in range(len(ordered) - requests)]
    return min(spans, default=float("inf"))


def send(limiter: EndpointLimiter, clock: VirtualClock, sends: list[float], lock: threading.Lock) -> None:
    """One request's worth of the limiter protocol: take a slot, note when, release it as answered."""
    limiter.acquire()
    with lock:
        # The clock now, not `clock.last`: a thread may send on a slot the thread ahead of it in line
        # took for it (one book transaction for a burst), without reading the clock itself.
        sends.append(clock())
    limiter.release(rate_limited=False)


async def send_async(limiter: EndpointLimiter, clock: VirtualClock, sends: list[float]) -> None:
    await limiter.acquire_async()
    sends.append(clock.last)
    limiter.release(rate_limited=False)


def run_threads(target: Callable[[], None], count: int, timeout: float = 10.0) -> None:
    """Run `count` daemon threads of `target` and fail (rather than hang the session) if any is stuck."""
    threads = [threading.Thread(target=target, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(timeout=max(deadline - time.monotonic(), 0.0))
    assert not any(thread.is_alive() for thread in threads), "a caller is still blocked in the limiter"


def test_sixteen_threads_never_exceed_n_per_window() -> None:
    limit = RateLimit(10, 0.5)
    clock = VirtualClock()
    limiter = virtual_limiter(limit, clock)
    sends: list[float] = []
    lock = threading.Lock()
    tickets = threading.Semaphore(4 * limit.requests)

    def caller() -> None:
        while tickets.acquire(blocking=False):
            send(limiter, clock, sends, lock)

    run_threads(caller, 16)

    assert len(sends) == 4 * limit.requests
    # No span as long as the window holds more than N sends (the limiter even keeps a small margin).
    assert busiest_span(sends, limit.requests) >= limiter.window - 1e-9
    # Throughput: the 4 windows' worth of sends go out in 3 waits of one window, not slower.
    assert 3 * limiter.window - 1e-9 <= clock.elapsed <= 3 * limiter.window + 0.01


def test_fifty_coroutines_never_exceed_n_per_window() -> None:
    limit = RateLimit(10, 0.4)
    clock = VirtualClock()
    limiter = virtual_limiter(limit, clock)
    sends: list[float] = []

    async def crowd() -> None:
        # 50 coroutines at once, one send each: 5 windows' worth.
        await asyncio.wait_for(asyncio.gather(*(send_async(limiter, clock, sends) for _ in range(50))), 10)

    asyncio.run(crowd())
    assert len(sends) == 50
    assert busiest_span(sends, limit.requests) >= limiter.window - 1e-9
    assert 4 * limiter.window - 1e-9 <= clock.elapsed <= 4 * limiter.window + 0.01


def test_threads_and_coroutines_draw_on_one_budget() -> None:
    limit = RateLimit(6, 0.4)
    clock = VirtualClock()
    limiter = virtual_limiter(limit, clock)
    sends: list[float] = []
    lock = threading.Lock()

    def thread_caller() -> None:
        for _ in range(3):
            send(limiter, clock, sends, lock)

    async def coroutines() -> None:
        async def one() -> None:
            await limiter.acquire_async()
            with lock:
                sends.append(clock.last)
            limiter.release(rate_limited=False)

        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(9))), timeout=10)

    threads = threading.Thread(target=lambda: run_threads(thread_caller, 3), daemon=True)
    threads.start()
    asyncio.run(coroutines())
    threads.join(timeout=10)
    assert len(sends) == 18
    assert busiest_span(sends, limit.requests) >= limiter.window - 1e-9
    # 18 sends at 6 per window: three windows' worth, so exactly two waits of one window.
    assert 2 * limiter.window - 1e-9 <= clock.elapsed <= 2 * limiter.window + 0.01


def test_a_hold_blocks_threads_and_coroutines_until_it_elapsed() -> None:
    clock = VirtualClock()
    limiter = virtual_limiter(RateLimit(100, 1.0), clock)
    held_from = clock()
    limiter.hold(0.5)
    limiter.hold(0.1)  # a shorter hold never shortens the one in force
    assert limiter.held_for == pytest.approx(0.5)
    released: list[float] = []
    lock = threading.Lock()

    def thread_caller() -> None:
        limiter.acquire()
        with lock:
            released.append(clock())
        limiter.release(rate_limited=False)

    async def coroutines() -> None:
        async def one() -> None:
            await limiter.acquire_async()
            released.append(clock.last)
            limiter.release(rate_limited=False)

        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(8))), timeout=10)

    threads = threading.Thread(target=lambda: run_threads(thread_caller, 8), daemon=True)
    threads.start()
    asyncio.run(coroutines())
    threads.join(timeout=10)
    assert len(released) == 16
    # Nobody went out before the hold elapsed, and everybody went out as soon as it had.
    assert min(released) - held_from >= 0.5 - 1e-9
    assert max(released) - held_from == pytest.approx(0.5)
    assert limiter.held_for == 0.0


def test_after_a_429_one_request_probes_at_a_time_until_another_answer() -> None:
    clock = VirtualClock()
    limiter = virtual_limiter(RateLimit(100, 1.0), clock)
    limiter.acquire()
    limiter.release(rate_limited=True)  # a 429 without Retry-After: no hold, but caution
    limiter.acquire()  # the probe
    assert clock.sleeps == []
    second_sent = threading.Event()

    def second() -> None:
        limiter.acquire()
        second_sent.set()
        limiter.release(rate_limited=False)

    waiter = threading.Thread(target=second, daemon=True)
    waiter.start()
    # The waiter asks again and again (20 times = 0.2 s of virtual time) and is refused each time.
    assert clock.wait_for_sleeps(20)
    assert not second_sent.is_set(), "a second request went out while the probe was in flight"
    limiter.release(rate_limited=False)  # the probe got through: the endpoint is open again
    assert second_sent.wait(2)
    waiter.join(timeout=2)
    waited = len(clock.sleeps)
    for _ in range(PROBE_IN_FLIGHT):
        limiter.acquire()  # no release: several in flight at once is fine again (as many as an endpoint
        # not yet proven may have)
    assert len(clock.sleeps) == waited


def test_each_endpoint_has_its_own_budget() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(RateLimit(2, 30.0), clock=clock, sleep=clock.sleep, async_sleep=clock.async_sleep)
    assert limiter.endpoint("enrich-bulk") is limiter.endpoint("enrich-bulk")
    for name in ("enrich-bulk", "enrich-bulk", "enrich-status", "enrich-status"):
        limiter.endpoint(name).acquire()
        limiter.endpoint(name).release(rate_limited=False)
    assert clock.sleeps == []  # the full bulk window kept nobody on the status endpoint waiting
    limiter.endpoint("enrich-bulk").acquire()  # the third bulk send waits out the bulk window
    assert clock.sleeps == [pytest.approx(limiter.endpoint("enrich-bulk").window)]
    limiter.endpoint("enrich-bulk").hold(10)
    assert limiter.endpoint("enrich-status").held_for == 0.0
    assert limiter.endpoint("enrich-bulk").held_for == pytest.approx(10.0)


def test_a_slot_counts_from_the_answer_of_its_request() -> None:
    limit = RateLimit(2, 1.0)
    clock = VirtualClock()
    limiter = virtual_limiter(limit, clock)
    limiter.proven = True  # past probing: several requests may be in flight at once
    limiter.acquire()
    limiter.acquire()
    clock.advance(0.4)  # both requests sat 0.4 s before the server counted and answered them
    limiter.release(rate_limited=False)
    limiter.release(rate_limited=False)
    assert limiter.usage() == 1.0
    sent_at = clock()
    limiter.acquire()
    # A window from the answers, not from the acquires: 0.4 s later than a plain sliding log would.
    assert clock.last - sent_at == pytest.approx(limiter.window)
    assert clock.sleeps == [pytest.approx(limiter.window)]


def test_window_margin_is_small_and_capped() -> None:
    assert EndpointLimiter(RateLimit(60, 60.0)).window == pytest.approx(60.12)
    assert EndpointLimiter(RateLimit(10, 1.0)).window == pytest.approx(1.002)
    assert EndpointLimiter(RateLimit(1, 3600.0)).window == pytest.approx(3601.0)


def test_a_steady_run_at_the_servers_own_limit_gets_no_429(
    make_sandbox: Callable[..., SandboxServer],
) -> None:
    sandbox = make_sandbox(rate_limit=(10, 1.0), latency=0.0)
    stop_at = time.monotonic() + 4.0
    with CleanlistClient(sandbox.api_key, base_url=sandbox.base_url, rate_limit="10/1") as client:
        workflow_id = client.enrich_bulk(people(1)).workflow_id
        errors: list[BaseException] = []

        def caller(index: int) -> None:
            # Two endpoints at once: each has its own window on both sides.
            while time.monotonic() < stop_at:
                try:
                    if index % 2:
                        client.credits_balance()
                    else:
                        client.enrich_status(workflow_id=workflow_id)
                except Exception as exc:
                    errors.append(exc)
                    return

        callers = iter(range(8))
        run_threads(lambda: caller(next(callers)), 8)
    assert errors == []
    requests = sandbox.counters()["requests"]
    for endpoint in ("credits-balance", "enrich-status"):
        assert set(requests[endpoint]) == {"200"}, requests
        # About 10 per second over ~4 s (the last callers may each add one after the deadline).
        assert 38 <= requests[endpoint]["200"] <= 55, requests


def test_requests_that_waited_for_a_slot_are_counted_once_and_holds_are_not() -> None:
    clock = VirtualClock()
    limiter = virtual_limiter(RateLimit(2, 0.2), clock)
    for _ in range(2):
        limiter.acquire()
        limiter.release(rate_limited=False)
    assert limiter.paced == 0
    limiter.acquire()  # the window is full: waits out the window, asking the limiter again after it
    limiter.release(rate_limited=False)
    assert limiter.paced == 1
    assert sum(clock.sleeps) == pytest.approx(limiter.window)
    clock.advance(0.25)  # every slot has expired
    limiter.hold(0.1)
    limiter.acquire()  # waits for the hold, not for a slot
    assert limiter.paced == 1
    assert clock.sleeps[-1] == pytest.approx(0.1)


def test_threads_waiting_for_a_slot_ask_the_book_one_at_a_time() -> None:
    """Issue 20: a freed slot wakes the first thread in line, not every waiting thread (each of which
    would run a write transaction on a store's book). Real clock, short window: eight threads wait at
    once, as a run's chunk tasks do."""
    limit = RateLimit(4, 0.2)
    takes: list[bool] = []

    class CountingBook(MemoryBook):
        def take(self, endpoint: str, paces: Sequence[Pace], count: int = 1) -> Taken:
            taken = super().take(endpoint, paces, count)
            takes.append(taken.ticket is not None)
            return taken

    limiter = RateLimiter(limit, book=CountingBook()).endpoint("enrich-bulk")
    sends: list[float] = []
    lock = threading.Lock()
    tickets = threading.Semaphore(4 * limit.requests)

    def caller() -> None:
        while tickets.acquire(blocking=False):
            limiter.acquire()
            with lock:
                sends.append(time.monotonic())
            limiter.release(rate_limited=False)

    run_threads(caller, 8)

    assert len(sends) == 4 * limit.requests
    assert busiest_span(sends, limit.requests) >= limiter.window - 0.01
    # The first in line learns how long to wait (a refused take or two per window), the others never
    # ask; before, every waiting thread asked again at each freed slot (dozens of refusals).
    assert takes.count(False) <= 2 * 4, takes
    # And the first in line takes slots for the threads behind it too: fewer grants than sends.
    assert takes.count(True) < len(sends), takes


def test_a_hold_takes_back_the_slots_granted_to_the_threads_behind_in_line() -> None:
    """A burst's slots are granted in one book transaction to the first in line, for the threads behind
    it. A 429 that comes back before they take them holds the endpoint: the threads in line must not send
    on slots granted before it (one request in five auto runs went inside a Retry-After this way)."""
    clock = VirtualClock()
    limiter = RateLimiter(RateLimit(10, 2.0), clock=clock, sleep=clock.sleep, async_sleep=clock.async_sleep)
    bulk = limiter.endpoint("enrich-bulk")
    assert bulk._reserve([], want=3) == 0.0  # the first in line takes one slot and is granted two more
    assert len(bulk._granted) == 2
    bulk.release(rate_limited=True, retry_after=5.0)  # its answer: 429, Retry-After 5
    assert not bulk._granted
    start = clock()
    bulk.acquire()  # the next in line waits out the hold instead of sending on a granted slot
    assert clock() - start >= 5.0 - 1e-9
    bulk.release(rate_limited=False)


def test_a_request_granted_before_a_hold_waits_it_out_before_it_is_sent() -> None:
    """A slot granted, then a 429 of a request already on the wire comes back and holds the endpoint:
    the request waits the hold out before it goes (the client calls `wait_out_hold` right before
    sending), and a stop while it waits gives its slot back unsent."""
    clock = VirtualClock()
    limiter = RateLimiter(RateLimit(10, 2.0), clock=clock, sleep=clock.sleep, async_sleep=clock.async_sleep)
    bulk = limiter.endpoint("enrich-bulk")
    bulk.acquire()
    granted = clock()
    bulk.hold(3.0)  # another request's 429, Retry-After 3
    bulk.wait_out_hold()
    assert clock() - granted >= 3.0 - 1e-9
    bulk.release(rate_limited=False)

    bulk.acquire()
    bulk.hold(3.0)
    stop = threading.Event()
    stop.set()
    with pytest.raises(StoppedBeforeSending):
        bulk.wait_out_hold(stop)
    assert bulk._in_flight == 0 and not bulk._tickets  # the slot went back to the book, unsent
