"""Deciding, inside one transaction, which contacts a run may submit and which it must reuse or poll."""

# Race safety: new keys are claimed by INSERT … ON CONFLICT DO NOTHING, existing rows are locked with
# SELECT … FOR UPDATE before they are judged (SQLite: the caller's BEGIN IMMEDIATE serializes writers).
# Keys are handled in sorted order, so two claimers lock rows in the same order and cannot deadlock.

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import Connection, Row, Table, bindparam, delete, literal_column, null, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import ReturningInsert
from sqlalchemy.sql.elements import BindParameter

from cleanlist.store.bulk import db_time, execute_one
from cleanlist.store.codec import RESULT_FIELDS, batches, stored_result
from cleanlist.store.liveness import ProcessIdentity, RunLocks, lock_kind, run_is_alive
from cleanlist.store.records import ClaimOutcome, StoredResult
from cleanlist.store.schema import contacts, runs
from cleanlist.vocab import EnrichmentType, LedgerState, RunRecordState

# A row can vanish between our INSERT and our SELECT (another run released it); then we try again.
MAX_CLAIM_PASSES: Final = 5
# New claims go in as multi-row INSERTs of a power of two rows each (at most this many): a handful of
# statements, each compiled once, for any count of keys.
_CLAIM_BLOCK_MAX: Final = 256


def insert_of(dialect: str, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that knows ON CONFLICT on this backend."""
    if dialect == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def insert_for(conn: Connection, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that knows ON CONFLICT on this connection's backend."""
    return insert_of(conn.dialect.name, table)


@dataclass
class ClaimSplit:
    """A claim being decided: the four answers, gathered key by key."""

    claimed: set[str] = field(default_factory=set)
    fresh: dict[str, StoredResult] = field(default_factory=dict)
    in_flight: dict[str, tuple[str, str]] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)

    def outcome(self, keys: Sequence[str]) -> ClaimOutcome:
        """The decision, with lists in the caller's key order."""
        return ClaimOutcome(
            claimed=[key for key in keys if key in self.claimed],
            fresh={key: self.fresh[key] for key in keys if key in self.fresh},
            in_flight={key: self.in_flight[key] for key in keys if key in self.in_flight},
            held=[key for key in keys if key in self.held],
        )


@dataclass(frozen=True)
class Judge:
    """What a contact row is judged against: who asks, how fresh is fresh enough, who is alive."""

    run_id: str | None
    fresh_after: datetime | None
    now: datetime
    lease: timedelta
    this_process: ProcessIdentity
    locks: RunLocks  # tries another run's liveness lock (this store's kind of lock)


@functools.lru_cache(maxsize=32)
def _claim_block(dialect: str, size: int) -> ReturningInsert[Any]:
    """INSERT of `size` claim rows (keys `k0`…), those whose key has a row already left out, returning
    the keys it inserted."""
    shared: dict[str, BindParameter[Any]] = {
        "enrichment_type": bindparam("c_type"),
        "state": bindparam("c_state"),
        "run_id": bindparam("c_run"),
        "claimed_at": bindparam("c_at"),
    }
    return (
        insert_of(dialect, contacts)
        .values([{"contact_key": bindparam(f"k{i}"), **shared} for i in range(size)])
        .on_conflict_do_nothing(index_elements=[contacts.c.contact_key, contacts.c.enrichment_type])
        .returning(contacts.c.contact_key)
    )


def insert_claims(
    conn: Connection, run_id: str, keys: Sequence[str], enrichment_type: EnrichmentType, now: datetime
) -> set[str]:
    """Claim the keys nobody has a row for (in the given order); returns the ones this call inserted."""
    shared = {
        "c_type": str(enrichment_type),
        "c_state": str(LedgerState.CLAIMED),
        "c_run": run_id,
        "c_at": db_time(conn, now),
    }
    inserted: set[str] = set()
    start = 0
    while start < len(keys):
        size = min(1 << ((len(keys) - start).bit_length() - 1), _CLAIM_BLOCK_MAX)
        block = {f"k{i}": key for i, key in enumerate(keys[start : start + size])}
        statement = _claim_block(conn.dialect.name, size)
        inserted.update(execute_one(conn, statement, {**shared, **block}).scalars())
        start += size
    return inserted


def contact_rows(
    conn: Connection, keys: Sequence[str], enrichment_type: EnrichmentType, *, lock: bool
) -> dict[str, Row[Any]]:
    """The existing rows of `keys`, locked in key order when `lock` is set."""
    found: dict[str, Row[Any]] = {}
    for part in batches(sorted(keys)):
        stmt = (
            select(contacts)
            .where(contacts.c.enrichment_type == enrichment_type, contacts.c.contact_key.in_(part))
            .order_by(contacts.c.contact_key)
        )
        if lock:
            stmt = stmt.with_for_update()
        for row in conn.execute(stmt):
            found[row.contact_key] = row
    return found


def judge_rows(conn: Connection, rows: dict[str, Row[Any]], judge: Judge, split: ClaimSplit) -> list[str]:
    """File each row under fresh / in_flight / held; returns the keys the asking run may take."""
    holders = {
        row.run_id for row in rows.values() if row.state == LedgerState.CLAIMED and row.run_id != judge.run_id
    }
    alive = alive_runs(conn, holders, judge)
    takeable: list[str] = []
    for key, row in rows.items():
        fresh = (
            judge.fresh_after is not None
            and row.enriched_at is not None
            and row.enriched_at >= judge.fresh_after
        )
        if row.state == LedgerState.CLAIMED and judge.run_id is not None and row.run_id == judge.run_id:
            takeable.append(key)
        elif fresh:
            # A refresh claimed or in flight elsewhere does not make a result that is fresh enough
            # for this caller any less usable.
            split.fresh[key] = stored_result([getattr(row, name) for name in RESULT_FIELDS])
        elif row.state == LedgerState.ACCEPTED:
            split.in_flight[key] = (row.workflow_id, row.task_id)
        elif row.state == LedgerState.CLAIMED and row.run_id in alive:
            split.held.add(key)
        else:
            takeable.append(key)
    return takeable


def alive_runs(conn: Connection, run_ids: Collection[str | None], judge: Judge) -> set[str]:
    """The runs among `run_ids` that still own their claims (a run the store never saw is not alive)."""
    known = sorted(run_id for run_id in run_ids if run_id is not None)
    alive: set[str] = set()
    columns = (runs.c.run_id, runs.c.status, runs.c.heartbeat_at, runs.c.host, runs.c.boot_id, runs.c.pid)
    for part in batches(known):
        stmt = select(*columns, runs.c.proc_start, runs.c.liveness_lock).where(runs.c.run_id.in_(part))
        for row in conn.execute(stmt):
            lock_held, has_lock = None, lock_kind(row.liveness_lock) == judge.locks.kind
            if row.status == RunRecordState.RUNNING and has_lock:
                lock_held = judge.locks.held(conn, row.run_id, row.liveness_lock)
            if run_is_alive(
                status=row.status,
                heartbeat_at=row.heartbeat_at,
                owner=ProcessIdentity(row.host, row.boot_id, row.pid, row.proc_start),
                now=judge.now,
                lease=judge.lease,
                judge=judge.this_process,
                lock_held=lock_held,
                lock_unknown=has_lock and lock_held is None,
            ):
                alive.add(row.run_id)
    return alive


def take_over(
    conn: Connection, run_id: str, keys: Sequence[str], enrichment_type: EnrichmentType, now: datetime
) -> None:
    """Make `run_id` the holder of existing rows (already locked); a stored result stays in place."""
    for part in batches(sorted(keys)):
        conn.execute(
            update(contacts)
            .where(contacts.c.enrichment_type == enrichment_type, contacts.c.contact_key.in_(part))
            .values(state=LedgerState.CLAIMED, run_id=run_id, claimed_at=now, workflow_id=None, task_id=None)
        )


def release_claims(
    conn: Connection, run_id: str, keys: Sequence[str], enrichment_type: EnrichmentType
) -> None:
    """Give up this run's unsubmitted claims: back to the old result, or to no row at all."""
    for part in batches(sorted(keys)):
        mine = (
            contacts.c.enrichment_type == enrichment_type,
            contacts.c.contact_key.in_(part),
            contacts.c.state == LedgerState.CLAIMED,
            contacts.c.run_id == run_id,
        )
        conn.execute(delete(contacts).where(*mine, contacts.c.enriched_at.is_(None)))
        conn.execute(update(contacts).where(*mine).values(state=LedgerState.DONE))


def release_tasks(conn: Connection, workflow_id: str, keys: Sequence[str]) -> None:
    """Free some of a workflow's contacts (the API says it does not know their tasks): a later run may
    submit them again; the rest stay in flight."""
    for part in batches(sorted(keys)):
        waiting = (
            contacts.c.workflow_id == workflow_id,
            contacts.c.state == LedgerState.ACCEPTED,
            contacts.c.contact_key.in_(part),
        )
        conn.execute(delete(contacts).where(*waiting, contacts.c.enriched_at.is_(None)))
        conn.execute(
            update(contacts).where(*waiting).values(state=LedgerState.DONE, workflow_id=None, task_id=None)
        )


_WORKFLOW_WAITING: Final = (
    contacts.c.workflow_id == bindparam("p_workflow"),
    contacts.c.state == literal_column(f"'{LedgerState.ACCEPTED}'"),
)
# Run once per settled chunk: built once, run at driver speed.
_DROP_NEVER_RESULTED: Final = delete(contacts).where(*_WORKFLOW_WAITING, contacts.c.enriched_at.is_(None))
_FREE_REFRESHED: Final = (
    update(contacts)
    .where(*_WORKFLOW_WAITING)
    .values(state=literal_column(f"'{LedgerState.DONE}'"), workflow_id=null(), task_id=null())
)


def release_workflow(conn: Connection, workflow_id: str) -> None:
    """Free the contacts a closed workflow never resulted, so a later run may submit them again."""
    execute_one(conn, _DROP_NEVER_RESULTED, {"p_workflow": workflow_id})
    execute_one(conn, _FREE_REFRESHED, {"p_workflow": workflow_id})
