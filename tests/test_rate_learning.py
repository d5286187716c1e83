"""The limiter learns limits the API does not publish, from its 429s, and shares one budget per
organization through the store. Requests go to a fixed-window server (the sandbox's own limiter) in
virtual time, one at a time, so every count is exact and nothing sleeps."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cleanlist.ratelimit import SHARED_SCOPE, MemoryBook, RateLimiter, with_margin
from cleanlist.sandbox.ratelimit import FixedWindowLimiter
from cleanlist.settings import RateLimit
from cleanlist.store import EnrichmentStore
from tests.test_ratelimit import VirtualClock

WINDOW = 2.0


class Server:
    """A fixed-window API: per endpoint, or one window for the organization (`shared`)."""

    def __init__(self, limit: int, *, shared: bool = False) -> None:
        self.windows = FixedWindowLimiter(limit, WINDOW)
        self.shared = shared
        self.answers: list[tuple[str, float, int]] = []
        self.holds_broken = 0

    def answer(self, endpoint: str, now: float) -> float | None:
        wait = self.windows.admit("org", "*" if self.shared else endpoint, now)
        self.answers.append((endpoint, now, 429 if wait is not None else 200))
        return wait

    def share_429(self) -> float:
        return sum(1 for a in self.answers if a[2] == 429) / len(self.answers)


def send(limiter: RateLimiter, clock: VirtualClock, server: Server, endpoint: str) -> bool:
    gate = limiter.endpoint(endpoint)
    gate.acquire()
    wait = server.answer(endpoint, clock())
    clock.advance(0.02)
    gate.release(rate_limited=wait is not None, retry_after=wait)
    return wait is None


def virtual(limit: str, clock: VirtualClock, book: object = None) -> RateLimiter:
    return RateLimiter(
        RateLimit.parse(limit),
        clock=clock,
        sleep=clock.sleep,
        async_sleep=clock.async_sleep,
        book=book,  # type: ignore[arg-type]
    )


def served_per_window(server: Server, start: float, end: float) -> float:
    ok = [a for a in server.answers if a[2] == 200]
    return len(ok) / ((end - start) / WINDOW)


def test_a_limit_five_times_lower_than_configured_is_learned_with_few_429s() -> None:
    clock = VirtualClock(start=1000.3)
    server = Server(4)
    limiter = virtual("20/2", clock)
    for _ in range(60):
        send(limiter, clock, server, "enrich-bulk")
    bulk = limiter.endpoint("enrich-bulk")
    assert bulk.learned is not None and bulk.learned.requests == with_margin(4) == 4
    assert bulk.allowance == 4
    assert server.share_429() <= 0.10, server.answers
    # Once learned, 4 per window: the real ceiling, less the window margin.
    late = [a for a in server.answers if a[1] > clock.start + 10]
    assert all(a[2] == 200 for a in late)
    assert limiter.learned_limits() == {"enrich-bulk": "4/2s"}


def test_one_429_alone_teaches_nothing() -> None:
    clock = VirtualClock()
    limiter = virtual("60/60", clock)
    gate = limiter.endpoint("enrich-status")
    for _ in range(3):
        gate.acquire()
        gate.release(rate_limited=False)
    gate.acquire()
    gate.release(rate_limited=True, retry_after=1.0)  # a fault, or another client: not a window's edge
    assert gate.learned is None
    assert gate.allowance == 60
    assert gate.held_for == pytest.approx(1.0, abs=0.05)


def test_an_organization_wide_window_is_recognized_and_shared() -> None:
    clock = VirtualClock(start=1000.7)
    server = Server(20, shared=True)
    limiter = virtual("20/2", clock)
    # Bulk-heavy, then status-heavy: while the mix is steady, one endpoint's own count explains its 429s
    # as well as a shared window would (and is all the pacing needs); when the mix changes, both
    # endpoints meet the window's edge at the same total, and the window is recognized as shared.
    for i in range(360):
        bulk_heavy = i < 180
        send(limiter, clock, server, "enrich-bulk" if (i % 3 != 0) == bulk_heavy else "enrich-status")
    assert limiter.shared is not None and limiter.shared.requests == with_margin(20) == 19
    assert server.share_429() <= 0.10
    late = server.answers[-90:]
    assert all(a[2] == 200 for a in late)
    assert limiter.learned_limits()["organization"].startswith("19/2")


def test_auto_discovers_a_higher_limit_and_settles() -> None:
    clock = VirtualClock(start=1000.1)
    server = Server(20)
    limiter = virtual("auto/2", clock)
    assert limiter.endpoint("enrich-bulk").allowance == 2  # the documented 60 per minute, in 2 s
    for _ in range(320):
        send(limiter, clock, server, "enrich-bulk")
    bulk = limiter.endpoint("enrich-bulk")
    assert 18 <= bulk.allowance <= 20
    assert server.share_429() <= 0.05
    # 320 requests at 20 per 2 s take 32 s at best.
    assert clock.elapsed <= 32 / 0.8


def test_a_configured_limit_is_a_ceiling_learning_never_raises() -> None:
    clock = VirtualClock()
    server = Server(50)
    limiter = virtual("10/2", clock)
    for _ in range(40):
        send(limiter, clock, server, "enrich-bulk")
    assert server.share_429() == 0
    assert limiter.endpoint("enrich-bulk").allowance == 10


def test_runs_sharing_a_store_share_one_budget_and_what_was_learned(store_url: str) -> None:
    """Two limiters (two runs, or two machines) on one store never send more than N per window together,
    and a limit one of them learned is the other's too — and the next run's."""
    limit = RateLimit(3, 1.0)
    first, second = EnrichmentStore(store_url), EnrichmentStore(store_url)
    try:
        a = RateLimiter(limit, book=first.rate_book("host|org"))
        b = RateLimiter(limit, book=second.rate_book("host|org"))
        other_org = RateLimiter(limit, book=second.rate_book("host|other"))
        sent: list[float] = []
        import time

        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            for limiter in (a, b):
                gate = limiter.endpoint("enrich-bulk")
                gate.acquire()
                sent.append(time.monotonic())
                gate.release(rate_limited=False)
        other = other_org.endpoint("enrich-bulk")
        other.acquire()  # another organization's budget is untouched
        other.release(rate_limited=False)
        window = a.endpoint("enrich-bulk").window
        busiest = max(sum(1 for t in sent if s <= t < s + window) for s in sent)
        assert busiest <= 3, sent
        assert len(sent) >= 6  # about three a second between them, not three each

        a.book.learn("enrich-bulk", RateLimit(2, 1.0))
        a.book.learn(SHARED_SCOPE, RateLimit(5, 1.0))
        nxt = RateLimiter(limit, book=second.rate_book("host|org"))
        assert nxt.endpoint("enrich-bulk").allowance == 2
        assert nxt.shared == RateLimit(5, 1.0)
        assert nxt.learned_limits() == {"enrich-bulk": "2/1s", "organization": "5/1s"}
        b.endpoint("enrich-bulk").hold(0.5)
        assert a.endpoint("enrich-bulk").held_for > 0.3  # a Retry-After one process read holds the other
    finally:
        first.close()
        second.close()


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_learns_a_lower_limit_keeps_it_for_the_next_run_and_reports_it(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    """Against the sandbox over HTTP: a limit 4 per second behind a configured 20 per second."""
    from tests.flow_helpers import messy_export, read_csv, run_flow

    sandbox = make_sandbox(rate_limit=(4, 1.0), latency=0.05)
    api_env(sandbox, rate_limit="20/1")
    store = f"sqlite:///{tmp_path / 's.db'}"
    # 40 chunks, about 10 windows: a limit is learned when two windows' measurements agree, and with 5 the
    # chunk tasks' timing left it unlearned once in a full-suite run (the bulk 429s all in one window pair).
    first = messy_export(tmp_path / "first.csv", unique=10_000)
    state, summary = run_flow(source=str(first), output=str(tmp_path / "out.csv"), store=store)
    assert state.is_completed(), state.message
    assert summary["rate_limit"] == "20/1"
    # Its window is measured; whole-second Retry-Afters cannot tell it from the configured one. On a quiet
    # machine it is exactly 4/1s. A starved client (CI's loaded runner; this test beside a fault-schedule
    # batch at nice 19 learned 5/2.7s and 6/3s) fills windows partly and its measures span several: what
    # it learns is never faster than the server, and the next run pays no 429 for it (below). CI once
    # learned 7/1s, faster than the server: two windows counted as one, twice alike.
    learned = summary["rate_limits_learned"].get("enrich-bulk")
    assert learned is not None, summary["rate_limits_learned"]
    count, seconds = learned.removesuffix("s").split("/")
    assert int(count) / float(seconds) <= 4.0, learned
    assert len(read_csv(tmp_path / "out.csv")) == 10_000
    assert sandbox.counters()["contacts_accepted_more_than_once"] == 0

    sandbox.reset()
    second = messy_export(tmp_path / "second.csv", unique=2000, tag="b")
    state, summary = run_flow(source=str(second), output=str(tmp_path / "out2.csv"), store=store)
    assert state.is_completed(), state.message
    assert summary["rate_limits_learned"].get("enrich-bulk") == learned
    bulk = sandbox.counters()["requests"]["enrich-bulk"]
    assert bulk.get("429", 0) == 0, bulk  # the next run starts from what the first one learned


# -- a learned limit is a count in a measured window (issue 19, item 8) --------------------------------


def _fixed_window_run(
    count: int,
    window: float,
    config: str,
    *,
    windows: int = 20,
    hint: str = "seconds",
    stored: RateLimit | None = None,
) -> tuple[int, int, int, RateLimiter]:
    """One caller sending back to back (20 ms a request) to a fixed-window server of `count` per `window`
    for `windows` of its windows, in virtual time. Returns (served, refused, most the server and the
    configured ceiling allow in that span, the limiter)."""
    import math

    clock = VirtualClock(start=1000.37)  # not aligned with the server's windows
    server = FixedWindowLimiter(count, window)
    book = MemoryBook(clock)
    if stored is not None:  # what an earlier run left in the store
        book.learn("enrich-bulk", stored)
    limiter = virtual(config, clock, book)
    gate = limiter.endpoint("enrich-bulk")
    served = refused = 0
    end = clock.start + windows * window
    while True:
        gate.acquire()
        now = clock()
        if now >= end:
            gate.release(rate_limited=False, answered=False)
            break
        wait = server.admit("org", "enrich-bulk", now)
        clock.advance(0.02)
        if wait is None:
            served += 1
            gate.release(rate_limited=False)
            continue
        refused += 1
        retry_after: float | None = float(max(1, math.ceil(wait)))  # the sandbox's whole seconds
        if hint == "none":  # no Retry-After at all: the caller backs off a second, then asks again
            retry_after = None
            clock.advance(1.0)
        if hint == "date":  # an HTTP date: whole seconds of a wall clock, read on the client's clock
            epoch = 1.7e9 + 0.123
            retry_after = math.floor(now + epoch + wait) - (clock() + epoch)
            retry_after = retry_after if retry_after > 0 else None
        gate.release(rate_limited=True, retry_after=retry_after)
    configured = RateLimit.parse(config)
    span = end - clock.start
    most = count * math.ceil(span / window)
    if not configured.auto:
        most = min(most, configured.requests * math.ceil(span / configured.seconds))
    return served, refused, most, limiter


SERVERS = [(5, 1.0), (4, 3.0), (15, 10.0), (40, 60.0), (100, 120.0)]


@pytest.mark.parametrize("config", ["60/60", "auto"])
@pytest.mark.parametrize(("count", "window"), SERVERS, ids=[f"{c}per{w:g}s" for c, w in SERVERS])
def test_a_server_window_of_any_length_is_measured_not_assumed(
    count: int, window: float, config: str
) -> None:
    """Windows of 1 to 120 s behind the default 60/60 and behind auto: few 429s, near the ceiling, and
    the limit is learned with the server's window (the old limiter kept the configured 60 s)."""
    served, refused, most, limiter = _fixed_window_run(count, window, config)
    assert refused / (served + refused) <= 0.10, (served, refused)
    assert served >= 0.6 * most, (served, most)
    learned = limiter.endpoint("enrich-bulk").learned
    assert learned is not None
    assert learned.requests <= count
    assert window - 0.5 <= learned.seconds <= window + 1.2, learned  # whole-second hints: ±1 s at most


def test_two_windows_counted_as_one_do_not_outvote_a_window_counted_whole() -> None:
    """After a 429 the client is held to where the reset can be at the latest (a whole-second hint), so
    a slow client sends into the tail of one server window, fills the next, and counts both between two
    resets it saw: too many, never too few. On a loaded CI machine such tails came alike twice and
    "4 a second" was learned as 7 a second. The lowest count that two measures of different windows
    agree on is the limit, whichever measure came last."""
    from cleanlist.ratelimit import _confirmed, _Measure

    def measure(served: int, at: float) -> _Measure:
        return _Measure("enrich-bulk", served, served, lo=0.4, hi=2.6, since=at - 1.5, at=at)

    measures = [measure(4, 10.0), measure(7, 12.0), measure(4, 14.0), measure(7, 16.0)]
    assert _confirmed(measures, lambda m: m.served, 1.0, lowest=True) == RateLimit(4, 1.0)
    # Newest first (how organization-wide totals are still read): the last pair of tails would win.
    assert _confirmed(measures, lambda m: m.served, 1.0) == RateLimit(7, 1.0)
    # One low measure alone teaches nothing (a fault can answer 429 once): the agreed count stands.
    lone = [measure(7, 10.0), measure(2, 12.0), measure(7, 14.0)]
    assert _confirmed(lone, lambda m: m.served, 1.0, lowest=True) == RateLimit(7, 1.0)


@pytest.mark.parametrize(("count", "window"), [(15, 10.0), (40, 60.0)])
def test_a_window_is_measured_from_http_date_hints_too(count: int, window: float) -> None:
    served, refused, most, limiter = _fixed_window_run(count, window, "60/60", hint="date")
    assert refused / (served + refused) <= 0.10, (served, refused)
    assert served >= 0.6 * most
    learned = limiter.endpoint("enrich-bulk").learned
    assert learned is not None and window - 0.5 <= learned.seconds <= window + 1.2, learned


@pytest.mark.parametrize(("count", "window"), SERVERS, ids=[f"{c}per{w:g}s" for c, w in SERVERS])
def test_without_retry_after_the_window_is_measured_from_when_the_server_serves_again(
    count: int, window: float
) -> None:
    """No hint at all (the caller retries every second): the reset is bounded by the last 429 and the
    first answer after it. The window is still learned right, and once one is measured the endpoint
    holds until the window reopens instead of collecting a 429 a second."""
    served, refused, most, limiter = _fixed_window_run(count, window, "60/60", hint="none")
    # The first window, before anything is measured, costs a 429 per retry: up to 10 in a 10 s window.
    assert refused / (served + refused) <= 0.15, (served, refused)
    assert served >= 0.6 * most, (served, most)
    learned = limiter.endpoint("enrich-bulk").learned
    assert learned is not None and learned.requests <= count
    assert window - 0.5 <= learned.seconds <= window + 1.2, learned


def test_a_wrong_stored_limit_is_corrected_within_the_run() -> None:
    """`4/60` stored by an older release for a server allowing 4 per 3 s: the run starts from it, grows
    past it, measures the 3 s window and paces at it instead of 4 a minute."""
    served, refused, most, limiter = _fixed_window_run(4, 3.0, "60/60", windows=30, stored=RateLimit(4, 60.0))
    assert served >= 0.6 * most, (served, most)  # 4 a minute would be 8 in these 90 s
    assert refused / (served + refused) <= 0.10
    learned = limiter.book.learned()["enrich-bulk"]
    assert learned.requests == 4 and 3.0 <= learned.seconds <= 4.2, learned
    assert limiter.pacing_note().startswith("enrich-bulk 4/3")


def test_a_stored_limit_the_server_now_exceeds_is_raised() -> None:
    """A limit stored as 4 per 3 s, and the server now allows 12: the run grows past the stored one."""
    served, _refused, most, limiter = _fixed_window_run(
        12, 3.0, "60/60", windows=30, stored=RateLimit(4, 3.0)
    )
    assert served >= 0.6 * most, (served, most)
    assert limiter.book.learned()["enrich-bulk"].requests >= 10


@pytest.mark.usefixtures("prefect_harness")
def test_a_real_run_stores_a_three_second_window_and_goes_at_its_pace(
    tmp_path: Path, make_sandbox, api_env, capsys: pytest.CaptureFixture[str]
) -> None:
    """Over HTTP: the sandbox allows 4 bulk requests per 3 s; the client is left at the default 60/60.
    The learned limit is stored as 4 per ~3 s (not per 60 s), the report names it, and 24 chunks take
    about 24 / 4 windows, not 4 a minute. (16 chunks left room for only three windows of 429s, the first
    of which measures nothing: one CI run of 16 learned nothing at all.)"""
    from tests.flow_helpers import messy_export, read_csv, run_flow

    sandbox = make_sandbox(rate_limit=(4, 3.0), latency=0.05)
    api_env(sandbox, rate_limit="60/60")
    store_url = f"sqlite:///{tmp_path / 's.db'}"
    source = messy_export(tmp_path / "in.csv", unique=6000)  # 24 chunks
    state, summary = run_flow(source=str(source), output=str(tmp_path / "out.csv"), store=store_url)
    assert state.is_completed(), state.message
    assert len(read_csv(tmp_path / "out.csv")) == 6000
    log = [e for e in sandbox.requests_log() if e["endpoint"] == "enrich-bulk"]
    accepted = [e["t"] for e in log if e["status"] == 200]
    assert len(accepted) == 24
    # 24 at 4 per 3 s is 18 s at best (4 a minute would be 6 minutes).
    assert accepted[-1] - accepted[0] <= 45, accepted[-1] - accepted[0]
    store = EnrichmentStore(store_url)
    try:
        stored = {scope: limit for _org, scope, limit, _at in store.learned_rate_limits()}
    finally:
        store.close()
    # Never faster than the server, and per ~3 s: 4 on a quiet machine. Two suite runs (2026-12-07 and
    # 08, CPU-bound on 2 CPUs with three workers) stored 3 per 3 s: a window counted one short, a
    # pace cost the re-check probe (one above the limit after clean windows) wins back, never a 429.
    assert stored["enrich-bulk"].requests in (3, 4), stored
    assert 3.0 <= stored["enrich-bulk"].seconds <= 4.2, stored
    # The report shows it (and names it among the limits that paced the run when requests waited on it:
    # learned in the last windows of so short a run, none may have).
    # Shown as `limit_text` shows it (one decimal): a starved client measures the window up to ~4 s
    # (one CI run beside two other test workers: stored 3.x s, the limiter's last measure shown `4/4s`).
    shown = summary["rate_limits_learned"]["enrich-bulk"]
    assert _is_about_four_per_three_seconds(shown), summary

    # `cleanlist-enrich limits` lists it, and --clear forgets it.
    from cleanlist_prefect.deployments.cli import main

    capsys.readouterr()
    assert main(["limits", "--store", store_url]) == 0
    listed = capsys.readouterr().out
    listed_bulk = re.search(r"enrich-bulk (\S+)", listed)
    assert listed_bulk is not None and _is_about_four_per_three_seconds(listed_bulk[1]), listed
    assert main(["limits", "--store", store_url, "--clear"]) == 0
    assert main(["limits", "--store", store_url]) == 0
    assert "no learned rate limits" in capsys.readouterr().out


def _is_about_four_per_three_seconds(text: str) -> bool:
    """`4/3s` … `4/4.2s`: the sandbox's 4 per 3 s, measured by a client that may be slow to refill (or
    `3/…`: a window counted one short, see above)."""
    found = re.fullmatch(r"[34]/(\d+(?:\.\d+)?)s", text)
    return found is not None and 3.0 <= float(found[1]) <= 4.2


@pytest.mark.parametrize(
    ("config", "stored"),
    [("3/1", None), ("3/1", RateLimit(1, 1.0)), ("20/1", RateLimit(1, 1.0))],
    ids=["learned-in-the-run", "stored-by-another-run", "stored-far-below-the-ceiling"],
)
def test_a_one_second_window_stays_one_second_and_its_limit_stays_its_limit(
    config: str, stored: RateLimit | None
) -> None:
    """A server allowing 1 status call a second, a client told 3/1 (fault-schedule seed 2922321, two runs
    sharing a rate book). Two faults made every other request a 429: a re-check grew the allowance to 2
    and a 429 confirming the limit left it there; and a measure between two 429s far apart (the client
    paced below the limit between them, so the server reset unseen) was taken for one window, and
    "20 in 22 s" was learned for "1 a second"."""
    served, refused, most, limiter = _fixed_window_run(1, 1.0, config, windows=60, stored=stored)
    bulk = limiter.endpoint("enrich-bulk")
    assert bulk.learned == RateLimit(1, 1.0) and bulk.allowance == 1, (bulk.learned, bulk.allowance)
    assert limiter.book.learned()["enrich-bulk"] == RateLimit(1, 1.0)
    assert refused / (served + refused) <= 0.10, (served, refused)
    assert served >= 0.9 * most, (served, most)


def _two_runs_on_one_book(seed: int, *, windows: int = 40) -> tuple[int, list[RateLimit | None]]:
    """Two runs sharing one book (as two processes share a store's), taking turns at random, sending
    back to back to a server allowing 1 a second, each told 3/1. Returns (served, what each learned)."""
    import math
    import random

    rng = random.Random(seed)
    clock = VirtualClock(start=1000.37)
    server = FixedWindowLimiter(1, 1.0)
    book = MemoryBook(clock)
    runs = [virtual("3/1", clock, book), virtual("3/1", clock, book)]
    served = 0
    end = clock.start + windows
    while clock() < end:
        gate = runs[rng.randrange(2)].endpoint("enrich-status")
        gate.acquire()
        wait = server.admit("org", "enrich-status", clock())
        clock.advance(rng.uniform(0.01, 0.1))
        served += wait is None
        retry_after = None if wait is None else float(max(1, math.ceil(wait)))
        gate.release(rate_limited=wait is not None, retry_after=retry_after)
    return served, [run.endpoint("enrich-status").learned for run in runs]


def test_two_runs_sharing_a_book_measure_windows_from_the_resets_either_saw() -> None:
    """Each run measured a window from the last reset *it* had seen; the other's 429s in between made
    that span several server windows, taken for one: "1 a second" was learned as 2 per 2 s or 3 per 6 s
    (fault-schedule seed 2922321: the run, 3 times slower than the server allowed, overran its bound).
    A run now measures from the latest reset any run of the book saw (where its last hold ended). Some
    spans still hold a reset nobody saw (a window whose one request was served, none refused)."""
    seeds = range(30)
    results = [_two_runs_on_one_book(seed) for seed in seeds]
    learned = [limit for _, limits in results for limit in limits]
    right = sum(1 for limit in learned if limit == RateLimit(1, 1.0))
    assert right >= 0.8 * len(learned), [str(limit) for limit in learned]  # 39 of 60 before, 53 after
    served = sum(count for count, _ in results) / (len(seeds) * 40)
    assert served >= 0.95, served  # 0.90 before, 0.98 after
