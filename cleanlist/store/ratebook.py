"""The rate limiter's book in the store: one budget per organization for every process that shares it.

Runs of one organization that use the same store — the nightly run, an ad-hoc run, every shard of a
backfill, on one machine (SQLite) or several (PostgreSQL) — take their slots from the same tables, so
together they never send more than the organization's limit, and a lone run gets all of it. A grant is
one short transaction: lock the scope rows (`FOR UPDATE` on PostgreSQL, the write lock on SQLite), check
the hold, count the live slots, insert one. Its statements are built once and run at driver speed
(`cleanlist/store/bulk.py::execute_one`): a take and its give-back cost ~0.7 ms of CPU, not ~1.9.

Time is the database's clock on PostgreSQL (machines' clocks may disagree; the server's is one clock)
and this machine's on SQLite (one machine). A slot records the run that took it: a slot left in flight by
a run proved dead (its liveness lock free, `cleanlist/store/liveness.py`) is closed by the next take —
it counts from then for its window, as its request may have reached the API — so a rerun after a kill -9
is not blocked by its predecessor's unanswered request; one whose run cannot be told (no run id, an older
version) stops counting after STALE_IN_FLIGHT seconds. Learned limits are kept per organization and
scope, and expire after LEARNED_RATE_TTL.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Select,
    Update,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.sql.elements import BindParameter

from cleanlist.constants import LEARNED_RATE_TTL
from cleanlist.ratelimit import SHARED_SCOPE, MemoryBook, Pace, Taken, Ticket, longest_windows
from cleanlist.settings import RateLimit
from cleanlist.store.bulk import execute_one
from cleanlist.store.schema import rate_scopes, rate_slots

logger = logging.getLogger(__name__)

T = TypeVar("T")
Transact = Callable[[Callable[[Connection], T]], T]
# Which of the given run ids are still alive, judged in the caller's transaction.
AliveRuns = Callable[[Connection, set[str]], set[str]]

# A slot still "in flight" after this long belongs to a process that died mid-request.
STALE_IN_FLIGHT = 300.0
_SWEEP_EVERY = 64  # takes between deletions of long-expired slots
_HELD_READING_SECONDS = 0.2


# The statements every take and give-back runs, built once (IN lists: one per count of values) and run at
# driver speed (`execute_one`): building, keying and setting up a Core statement cost more than SQLite's
# own work on these small rows.
_LIVE = and_(
    rate_slots.c.organization == bindparam("org"),
    rate_slots.c.scope == bindparam("scope"),
    or_(
        and_(rate_slots.c.in_flight.is_(True), rate_slots.c.stamp > bindparam("stale_before")),
        rate_slots.c.stamp > bindparam("since"),
    ),
)
_COUNT_LIVE = select(func.count()).select_from(rate_slots).where(_LIVE)
# When the window is full: the answered slot whose expiry frees one more (a rare path, run through Core).
_OLDEST_BLOCKING = (
    select(rate_slots.c.stamp)
    .where(_LIVE, rate_slots.c.in_flight.is_(False))
    .order_by(rate_slots.c.stamp)
    .offset(bindparam("skip"))
    .limit(1)
)
_NEW_SLOT = (
    insert(rate_slots)
    .values(
        organization=bindparam("v_org"),
        scope=bindparam("v_scope"),
        endpoint=bindparam("v_endpoint"),
        taken=bindparam("v_now"),
        stamp=bindparam("v_stamp"),
        in_flight=bindparam("v_in_flight"),
        ok=bindparam("v_ok"),
        run_id=bindparam("v_run_id"),
    )
    .returning(rate_slots.c.id)
)


def _names(prefix: str, count: int) -> list[BindParameter[Any]]:
    """Parameters `prefix0`… of an IN list of `count` values (see `_named`)."""
    return [bindparam(f"{prefix}{i}") for i in range(count)]


def _named(prefix: str, values: Sequence[object]) -> dict[str, object]:
    """The values of an IN list built by `_names`."""
    return {f"{prefix}{i}": value for i, value in enumerate(values)}


@functools.lru_cache(maxsize=32)
def _scope_rows(count: int, for_update: bool) -> Select[Any]:
    query = (
        select(rate_scopes.c.scope, rate_scopes.c.held_until)
        .where(rate_scopes.c.organization == bindparam("org"), rate_scopes.c.scope.in_(_names("s", count)))
        .order_by(rate_scopes.c.scope)
    )
    return query.with_for_update() if for_update else query


@functools.lru_cache(maxsize=32)
def _in_flight_owners(count: int) -> Select[Any]:
    return (
        select(rate_slots.c.run_id)
        .distinct()
        .where(
            rate_slots.c.organization == bindparam("org"),
            rate_slots.c.scope.in_(_names("s", count)),
            rate_slots.c.in_flight.is_(True),
            rate_slots.c.stamp > bindparam("stale_before"),
            rate_slots.c.run_id.is_not(None),
        )
    )


@functools.lru_cache(maxsize=32)
def _answered(count: int) -> Update:
    return (
        update(rate_slots)
        .where(rate_slots.c.id.in_(_names("i", count)))
        .values(stamp=bindparam("v_stamp"), in_flight=bindparam("v_in_flight"), ok=bindparam("v_ok"))
    )


@dataclass(frozen=True)
class _StoreTicket:
    ids: tuple[int, ...]


class StoreRateBook:
    """A `cleanlist.ratelimit.SlotBook` in the enrichment store's database."""

    def __init__(
        self,
        transact: Transact[Any],
        dialect: str,
        organization: str,
        *,
        run_id: str | None = None,
        alive_runs: AliveRuns | None = None,
        read: Transact[Any] | None = None,
    ) -> None:
        self._transact = transact
        # Read-only questions (`held_for`, `served`, `learned`) need no write lock: neither SQLite's
        # nor this process's turn, which the ledger's commits wait for too.
        self._read = read or transact
        self._dialect = dialect
        self.organization = organization
        self._run_id = run_id
        self._alive_runs = alive_runs
        # `_dead`, `_used` and `_held_seen` are written by every thread that takes a slot or reads a hold
        # (submit tasks, the poller): each read-modify-write holds `_fields` (never across a transaction).
        self._fields = threading.Lock()
        self._dead: set[str] = set()  # runs proved dead: they stay dead
        self._takes = itertools.count()
        self._used: dict[str, int] = {}  # live slots per scope at the last take: a hint for `used`
        self._held_seen: dict[str, tuple[float, float]] = {}  # scope -> (read at, seconds held then)

    def __repr__(self) -> str:
        return f"StoreRateBook({self._dialect})"

    def _now(self, conn: Connection) -> float:
        if self._dialect == "postgresql":
            return float(conn.execute(text("SELECT extract(epoch from clock_timestamp())")).scalar_one())
        return time.time()

    def _lock_scopes(self, conn: Connection, scopes: Sequence[str]) -> float:
        """Lock the scopes' rows (created on first use) in a fixed order; return the longest hold."""
        wanted = sorted(set(scopes))
        query = _scope_rows(len(wanted), self._dialect == "postgresql")
        params = {"org": self.organization, **_named("s", wanted)}
        rows = execute_one(conn, query, params).all()
        if len(rows) < len(wanted):
            dialect_insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
            conn.execute(
                dialect_insert(rate_scopes)
                .values([{"organization": self.organization, "scope": s, "held_until": 0.0} for s in wanted])
                .on_conflict_do_nothing()
            )
            rows = execute_one(conn, query, params).all()
        return max((float(row.held_until or 0.0) for row in rows), default=0.0)

    def _close_dead_in_flight(self, conn: Connection, scopes: Sequence[str], now: float) -> None:
        """Close the in-flight slots (in `scopes`, scope rows locked) of other runs proved dead: from now
        they count for their window like an answered request, instead of for STALE_IN_FLIGHT."""
        if self._alive_runs is None:
            return
        params = {"org": self.organization, "stale_before": now - STALE_IN_FLIGHT, **_named("s", scopes)}
        owners = set(execute_one(conn, _in_flight_owners(len(scopes)), params).scalars())
        owners.discard(self._run_id)
        with self._fields:
            unknown = owners - self._dead
        if unknown:
            found_dead = unknown - self._alive_runs(conn, unknown)
            with self._fields:
                self._dead |= found_dead
        with self._fields:
            dead = owners & self._dead
        if dead:
            conn.execute(
                update(rate_slots)
                .where(
                    rate_slots.c.organization == self.organization,
                    rate_slots.c.in_flight.is_(True),
                    rate_slots.c.run_id.in_(sorted(dead)),
                )
                .values(stamp=now, in_flight=False, ok=False)
            )

    def take(self, endpoint: str, paces: Sequence[Pace], count: int = 1) -> Taken:
        sweep = next(self._takes) % _SWEEP_EVERY == 0
        scopes = longest_windows(paces)

        def work(conn: Connection) -> Taken:
            now = self._now(conn)
            # A hold on "*" holds every endpoint.
            held_until = self._lock_scopes(conn, [*scopes, SHARED_SCOPE])
            if held_until > now:
                return Taken(None, held_until - now, held=True)
            self._close_dead_in_flight(conn, list(scopes), now)
            if sweep:
                old = now - 2 * max(max(scopes.values()), STALE_IN_FLIGHT)
                conn.execute(
                    delete(rate_slots).where(
                        rate_slots.c.organization == self.organization, rate_slots.c.stamp < old
                    )
                )
            granted = count
            for pace in paces:
                live_params = {
                    "org": self.organization,
                    "scope": pace.scope,
                    "stale_before": now - STALE_IN_FLIGHT,
                    "since": now - pace.window,
                }
                live_count = int(execute_one(conn, _COUNT_LIVE, live_params).scalar_one())
                if pace.window == scopes[pace.scope]:
                    with self._fields:
                        self._used[pace.scope] = live_count
                if live_count >= pace.allowance:
                    # The wait until enough of the window's slots have expired for one more.
                    skip = {**live_params, "skip": live_count - pace.allowance}
                    stamps = conn.execute(_OLDEST_BLOCKING, skip).scalar_one_or_none()
                    wait = float(stamps) + pace.window - now if stamps is not None else 0.01
                    return Taken(None, max(wait, 0.001))
                granted = min(granted, pace.allowance - live_count)
            slot = {
                "v_org": self.organization,
                "v_endpoint": endpoint,
                "v_now": now,
                "v_stamp": now,
                "v_in_flight": True,
                "v_ok": False,
                "v_run_id": self._run_id,
            }
            ids: list[list[int]] = [[] for _ in range(granted)]
            for scope in scopes:
                for ticket_ids in ids:
                    new = execute_one(conn, _NEW_SLOT, {**slot, "v_scope": scope}).scalar_one()
                    ticket_ids.append(int(new))
                with self._fields:
                    self._used[scope] = self._used.get(scope, 0) + granted
            tickets = [_StoreTicket(tuple(ticket_ids)) for ticket_ids in ids]
            return Taken(tickets[0], more=tuple(tickets[1:]))

        result: Taken = self._transact(work)
        return result

    def give_back(self, ticket: Ticket, *, ok: bool) -> None:
        assert isinstance(ticket, _StoreTicket)
        answered = time.monotonic()

        def work(conn: Connection) -> None:
            # The slot counts from the answer, not from when this transaction got the write lock (behind
            # other threads' commits): as safe (the server counted the request before it answered), and a
            # window's next burst is not pushed later by the store's own queue.
            stamp = self._now(conn) - (time.monotonic() - answered)
            values = {"v_stamp": stamp, "v_in_flight": False, "v_ok": ok, **_named("i", ticket.ids)}
            execute_one(conn, _answered(len(ticket.ids)), values)

        self._transact(work)

    def hold(self, scopes: Sequence[str], seconds: float) -> None:
        def work(conn: Connection) -> None:
            self._lock_scopes(conn, scopes)
            until = self._now(conn) + seconds
            conn.execute(
                update(rate_scopes)
                .where(
                    rate_scopes.c.organization == self.organization,
                    rate_scopes.c.scope.in_(list(scopes)),
                    rate_scopes.c.held_until < until,
                )
                .values(held_until=until)
            )

        self._transact(work)
        with self._fields:
            for scope in scopes:
                self._held_seen.pop(scope, None)

    def held_for(self, scope: str) -> float:
        # Asked often (the poller reads `usage` after every answer): a reading stays good for a moment.
        with self._fields:
            seen = self._held_seen.get(scope)
        if seen is not None and time.monotonic() - seen[0] < _HELD_READING_SECONDS:
            return max(seen[1] - (time.monotonic() - seen[0]), 0.0)

        def work(conn: Connection) -> float:
            return max(self._held_until(conn, scope) - self._now(conn), 0.0)

        result: float = self._read(work)
        with self._fields:
            self._held_seen[scope] = (time.monotonic(), result)
        return result

    def hold_ended(self, scope: str) -> float | None:
        def work(conn: Connection) -> float | None:
            held = self._held_until(conn, scope)
            return self._now(conn) - held if held else None

        result: float | None = self._read(work)
        return result

    def _held_until(self, conn: Connection, scope: str) -> float:
        """When the scope's latest hold ends on the book's clock (0 if it was never held)."""
        held = conn.execute(
            select(rate_scopes.c.held_until).where(
                rate_scopes.c.organization == self.organization, rate_scopes.c.scope == scope
            )
        ).scalar_one_or_none()
        return float(held or 0.0)

    def served(self, endpoint: str, lookback: float) -> tuple[int, int]:
        def work(conn: Connection) -> tuple[int, int]:
            since = self._now(conn) - lookback
            rows = conn.execute(
                select(rate_slots.c.endpoint, func.count())
                .where(
                    rate_slots.c.organization == self.organization,
                    rate_slots.c.scope != SHARED_SCOPE,
                    rate_slots.c.ok.is_(True),
                    rate_slots.c.taken >= since,
                )
                .group_by(rate_slots.c.endpoint)
            ).all()
            counts = {row[0]: int(row[1]) for row in rows}
            return counts.get(endpoint, 0), sum(counts.values())

        result: tuple[int, int] = self._read(work)
        return result

    def used(self, scope: str, window: float) -> int:
        with self._fields:
            return self._used.get(scope, 0)

    def learned(self) -> dict[str, RateLimit]:
        def work(conn: Connection) -> dict[str, RateLimit]:
            fresh = self._now(conn) - LEARNED_RATE_TTL
            rows = conn.execute(
                select(
                    rate_scopes.c.scope, rate_scopes.c.learned_requests, rate_scopes.c.learned_seconds
                ).where(
                    rate_scopes.c.organization == self.organization,
                    rate_scopes.c.learned_requests.is_not(None),
                    rate_scopes.c.learned_at > fresh,
                )
            ).all()
            return {row[0]: RateLimit(int(row[1]), float(row[2])) for row in rows}

        result: dict[str, RateLimit] = self._read(work)
        return result

    def learn(self, scope: str, limit: RateLimit | None) -> None:
        def work(conn: Connection) -> None:
            self._lock_scopes(conn, [scope])
            conn.execute(
                update(rate_scopes)
                .where(rate_scopes.c.organization == self.organization, rate_scopes.c.scope == scope)
                .values(
                    learned_requests=limit.requests if limit else None,
                    learned_seconds=limit.seconds if limit else None,
                    learned_at=self._now(conn),
                )
            )

        self._transact(work)


class FallbackRateBook:
    """The store's book while the store answers; this process's memory once it does not.

    A store that dies mid-run must end the run through the run's own store guard (one line, within its
    bound), not turn every request into an error: pacing goes on in memory meanwhile.
    """

    def __init__(self, store_book: StoreRateBook, memory: MemoryBook | None = None) -> None:
        self._store = store_book
        self._memory = memory or MemoryBook()
        self._failed = False
        self._failing = threading.Lock()  # one thread turns to memory (and says so once)

    def __repr__(self) -> str:
        return f"FallbackRateBook({'memory' if self._failed else self._store!r})"

    def _fail(self, exc: BaseException) -> None:
        with self._failing:
            if self._failed:
                return
            self._failed = True
            logger.warning(
                "rate book: the store failed (%s); pacing in memory from now on", type(exc).__name__
            )

    def take(self, endpoint: str, paces: Sequence[Pace], count: int = 1) -> Taken:
        if not self._failed:
            try:
                return self._store.take(endpoint, paces, count)
            except (DBAPIError, PoolTimeoutError) as exc:
                self._fail(exc)
        return self._memory.take(endpoint, paces, count)

    def give_back(self, ticket: Ticket, *, ok: bool) -> None:
        if isinstance(ticket, _StoreTicket):
            if self._failed:
                return
            try:
                self._store.give_back(ticket, ok=ok)
            except (DBAPIError, PoolTimeoutError) as exc:
                self._fail(exc)
            return
        self._memory.give_back(ticket, ok=ok)

    def hold(self, scopes: Sequence[str], seconds: float) -> None:
        self._memory.hold(scopes, seconds)
        if not self._failed:
            try:
                self._store.hold(scopes, seconds)
            except (DBAPIError, PoolTimeoutError) as exc:
                self._fail(exc)

    def held_for(self, scope: str) -> float:
        if not self._failed:
            try:
                return self._store.held_for(scope)
            except (DBAPIError, PoolTimeoutError) as exc:
                self._fail(exc)
        return self._memory.held_for(scope)

    def hold_ended(self, scope: str) -> float | None:
        if not self._failed:
            try:
                return self._store.hold_ended(scope)
            except (DBAPIError, PoolTimeoutError) as exc:
                self._fail(exc)
        return self._memory.hold_ended(scope)

    def served(self, endpoint: str, lookback: float) -> tuple[int, int]:
        if not self._failed:
            try:
                return self._store.served(endpoint, lookback)
            except (DBAPIError, PoolTimeoutError) as exc:
                self._fail(exc)
        return self._memory.served(endpoint, lookback)

    def used(self, scope: str, window: float) -> int:
        return self._memory.used(scope, window) if self._failed else self._store.used(scope, window)

    def learned(self) -> dict[str, RateLimit]:
        if not self._failed:
            try:
                return self._store.learned()
            except (DBAPIError, PoolTimeoutError) as exc:
                self._fail(exc)
        return self._memory.learned()

    def learn(self, scope: str, limit: RateLimit | None) -> None:
        self._memory.learn(scope, limit)
        if not self._failed:
            try:
                self._store.learn(scope, limit)
            except (DBAPIError, PoolTimeoutError) as exc:
                self._fail(exc)


def learned_rate_limits(transact: Transact[Any]) -> list[tuple[str, str, RateLimit, float]]:
    """Every learned limit in the store, expired ones included: (organization, scope, limit, learned at
    as epoch seconds), for `cleanlist-enrich limits`."""

    def work(conn: Connection) -> list[tuple[str, str, RateLimit, float]]:
        rows = conn.execute(
            select(
                rate_scopes.c.organization,
                rate_scopes.c.scope,
                rate_scopes.c.learned_requests,
                rate_scopes.c.learned_seconds,
                rate_scopes.c.learned_at,
            )
            .where(rate_scopes.c.learned_requests.is_not(None))
            .order_by(rate_scopes.c.organization, rate_scopes.c.scope)
        ).all()
        return [(r[0], r[1], RateLimit(int(r[2]), float(r[3])), float(r[4] or 0.0)) for r in rows]

    result: list[tuple[str, str, RateLimit, float]] = transact(work)
    return result


def forget_rate_limits(transact: Transact[Any]) -> int:
    """Clear every learned limit in the store (holds and slots stay); how many there were."""

    def work(conn: Connection) -> int:
        cleared = conn.execute(
            update(rate_scopes)
            .where(rate_scopes.c.learned_requests.is_not(None))
            .values(learned_requests=None, learned_seconds=None, learned_at=None)
        )
        return int(cleared.rowcount or 0)

    result: int = transact(work)
    return result
