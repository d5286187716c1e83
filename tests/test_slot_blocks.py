"""Issue 20: a burst's slots in one book transaction, and a run's first burst leaving together.

The thread first in line at the limiter takes slots for the threads behind it (`SlotBook.take` with a
count); a stop leaves none of them taken for nobody; `EndpointLimiter.gather` holds the first request
until the burst it belongs to is in line. Real books: in memory, and the store's on SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from cleanlist.errors import StoppedBeforeSending
from cleanlist.ratelimit import MemoryBook, Pace, RateLimiter, SlotBook, Taken
from cleanlist.settings import RateLimit
from cleanlist.store import EnrichmentStore


def arrive_one_by_one(target: Callable[[], None], count: int, *, apart: float) -> None:
    """`count` threads of `target`, started `apart` seconds from each other (as a run's chunk tasks reach
    the limiter), all joined."""
    threads = [threading.Thread(target=target, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
        time.sleep(apart)
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads), "a caller is still blocked in the limiter"


@pytest.fixture(params=["memory", "store"])
def book_and_store(request: pytest.FixtureRequest, store_url: str) -> Iterator[SlotBook]:
    if request.param == "memory":
        yield MemoryBook()
        return
    with EnrichmentStore(store_url) as store:
        yield store.rate_book("organization-blocks")


def test_a_block_take_grants_what_the_window_has_left_and_no_more(book_and_store: SlotBook) -> None:
    book = book_and_store
    paces = [Pace("enrich-bulk", 5, 30.0), Pace("*", 4, 30.0)]
    first = book.take("enrich-bulk", paces, 3)
    assert first.ticket is not None and len(first.more) == 2
    # Four in the shared scope's window at most: one more now, though five are asked for.
    second = book.take("enrich-bulk", paces, 5)
    assert second.ticket is not None and second.more == ()
    refused = book.take("enrich-bulk", paces, 5)
    assert refused.ticket is None and refused.wait > 0
    # Each ticket holds its own slots: giving one back lets one more go after its window.
    for ticket in (first.ticket, *first.more, second.ticket):
        book.give_back(ticket, ok=True)
    assert book.used("enrich-bulk", 30.0) == 4


def test_a_stop_gives_back_the_slots_taken_for_threads_that_never_sent(tmp_path: Path) -> None:
    """The head of the line takes three slots; the run is asked to stop at that moment: the two threads
    behind it never send, and their slots go back to the book instead of counting as in flight."""
    stop = threading.Event()
    given_back: list[bool] = []

    class StoppingBook(MemoryBook):
        def take(self, endpoint: str, paces: Sequence[Pace], count: int = 1) -> Taken:
            taken = super().take(endpoint, paces, count)
            if count > 1:
                stop.set()
            return taken

        def give_back(self, ticket: object, *, ok: bool) -> None:  # type: ignore[override]
            given_back.append(ok)
            super().give_back(ticket, ok=ok)

    book = StoppingBook()
    limiter = RateLimiter(RateLimit(10, 30.0), book=book).endpoint("enrich-bulk")
    limiter.proven = True  # past probing: a burst may be in flight at once
    limiter.gather(3, timeout=10.0)
    outcomes: list[str] = []
    lock = threading.Lock()

    def caller() -> None:
        try:
            limiter.acquire(stop)
        except StoppedBeforeSending:
            with lock:
                outcomes.append("stopped")
            return
        with lock:
            outcomes.append("sent")

    arrive_one_by_one(caller, 3, apart=0.05)
    assert sorted(outcomes) == ["sent", "stopped", "stopped"]
    assert given_back == [False, False], "the slots taken for the stopped threads were not given back"
    assert book.used("enrich-bulk", 30.0) == 3  # given back unsent, they still count (as a request may)
    limiter.release(rate_limited=False)
    assert limiter._in_flight == 0


def test_the_first_burst_leaves_together_in_one_book_transaction() -> None:
    """Eight threads reach the limiter one by one, 30 ms apart (as a run's first chunk tasks do): with
    `gather(8)` the first waits for the others and all eight are granted by a single take."""
    takes: list[int] = []

    class CountingBook(MemoryBook):
        def take(self, endpoint: str, paces: Sequence[Pace], count: int = 1) -> Taken:
            taken = super().take(endpoint, paces, count)
            takes.append(0 if taken.ticket is None else 1 + len(taken.more))
            return taken

    limiter = RateLimiter(RateLimit(20, 30.0), book=CountingBook()).endpoint("enrich-bulk")
    limiter.proven = True
    limiter.gather(8, timeout=10.0)
    sent: list[float] = []
    lock = threading.Lock()

    def caller() -> None:
        limiter.acquire()
        with lock:
            sent.append(time.monotonic())

    arrive_one_by_one(caller, 8, apart=0.03)
    assert len(sent) == 8
    assert takes == [8], takes
    assert max(sent) - min(sent) < 0.15  # not 30 ms apart, as they arrived


def test_gathering_gives_up_after_its_timeout() -> None:
    limiter = RateLimiter(RateLimit(20, 30.0)).endpoint("enrich-bulk")
    limiter.proven = True
    limiter.gather(5, timeout=0.2)
    started = time.monotonic()
    limiter.acquire()  # alone: it waits for the four others no longer than the timeout
    assert 0.15 <= time.monotonic() - started < 2.0
    limiter.acquire()  # the gathering is over: no wait
    assert time.monotonic() - started < 2.0


def test_a_stop_while_the_first_request_gathers_its_burst_sends_nothing() -> None:
    """SIGTERM (the run's stop event) while the first request waits for the rest of its burst: it
    leaves at once, unsent, with no slot taken."""
    book = MemoryBook()
    limiter = RateLimiter(RateLimit(20, 30.0), book=book).endpoint("enrich-bulk")
    limiter.proven = True
    limiter.gather(8, timeout=30.0)
    stop = threading.Event()
    outcome: list[str] = []

    def caller() -> None:
        try:
            limiter.acquire(stop)
            outcome.append("sent")
        except StoppedBeforeSending:
            outcome.append("stopped")

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    stop.set()
    thread.join(timeout=5)
    assert outcome == ["stopped"]
    assert time.monotonic() - started < 1.0
    assert book.used("enrich-bulk", 30.0) == 0
    assert limiter._in_flight == 0
