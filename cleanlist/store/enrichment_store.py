"""The enrichment store: durable claims, ledger and results, so reruns resume and never pay twice."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timedelta
from typing import Final, Literal, Self, TypeVar, get_args

from sqlalchemy import Connection, null, select, update
from sqlalchemy.exc import DBAPIError

from cleanlist.dburl import hide_passwords
from cleanlist.settings import RateLimit
from cleanlist.store.claims import (
    MAX_CLAIM_PASSES,
    ClaimSplit,
    Judge,
    alive_runs,
    contact_rows,
    insert_claims,
    insert_for,
    judge_rows,
    release_claims,
    release_tasks,
    take_over,
)
from cleanlist.store.codec import (
    RESULT_FIELDS,
    batches,
    dump_json,
    require_aware,
    run_record,
    stored_result,
    unique,
    utc_now,
    workflow_record,
)
from cleanlist.store.database import TRANSACTION_OPTION, ensure_schema, open_engine, resolve_url
from cleanlist.store.economics import (
    RefreshDue,
    RunEconomics,
    economics_of,
    read_refresh_due,
    read_runs,
)
from cleanlist.store.ledger import (
    check_state,
    close_if_closed,
    credits_of_run,
    open_workflow_rows,
    set_state,
    write_accepted,
    write_results,
)
from cleanlist.store.liveness import (
    HEARTBEAT_SECONDS,
    LEASE_SECONDS,
    AdvisoryRunLocks,
    FileRunLocks,
    ProcessIdentity,
    RunHeartbeat,
    RunLocks,
    lock_directory,
)
from cleanlist.store.marks import read_mark, write_mark
from cleanlist.store.ratebook import FallbackRateBook, StoreRateBook, forget_rate_limits, learned_rate_limits
from cleanlist.store.records import ClaimOutcome, ContactResult, RunRecord, StoredResult, WorkflowRecord
from cleanlist.store.schema import contacts, runs, workflows
from cleanlist.store.webhooks import delivered_payloads, insert_delivery, insert_token, run_of_token
from cleanlist.vocab import EnrichmentType, LedgerState, RunRecordState, Watermark

T = TypeVar("T")
TransactionKind = Literal["read", "write", "durable"]
_TRANSACTION_KINDS: Final[tuple[TransactionKind, ...]] = get_args(TransactionKind)

# PostgreSQL may abort one of two transactions that lock the same rows in different orders (40P01)
# or fail a serializable one (40001); the whole transaction is safe to run again.
_RETRYABLE_SQLSTATES: Final = frozenset({"40P01", "40001"})
_MAX_ATTEMPTS: Final = 5


# The columns `results` reads: those of a result (`codec.stored_result`), with or without the API's
# objects (read as NULL). Not every column: each time column read is a conversion per row.
_RESULT_COLUMNS: Final = tuple(contacts.c[name] for name in RESULT_FIELDS[:-1])  # `raw` apart
_WITH_RAW: Final = (*_RESULT_COLUMNS, contacts.c.raw)
_WITHOUT_RAW: Final = (*_RESULT_COLUMNS, null().label("raw"))


class EnrichmentStore:
    """Durable enrichment state on SQLite or PostgreSQL, safe to share between threads and processes."""

    url_display: str
    """The store's URL with any password hidden."""

    def __init__(self, url: str | None = None, *, lease_seconds: float = LEASE_SECONDS) -> None:
        if lease_seconds < 0:
            raise ValueError(f"lease_seconds must be >= 0, got {lease_seconds}")
        resolved = resolve_url(url)
        self.url_display = resolved.render_as_string(hide_password=True)
        self._lease = timedelta(seconds=lease_seconds)
        self._process = ProcessIdentity.current()
        self._engine = open_engine(resolved)
        # Each run this store starts holds a lock the OS or the server releases when this process dies
        # (cleanlist/store/liveness.py): the proof other runs, anywhere, read to tell it is alive.
        self._locks: RunLocks = (
            FileRunLocks(lock_directory(resolved.database or ""))
            if resolved.get_backend_name() == "sqlite"
            else AdvisoryRunLocks(self._engine)
        )
        # SQLite lets one writer in at a time and makes the others poll with growing sleeps, so one busy
        # thread can starve the rest; queueing this process's writers on a lock hands the turn over.
        self._write_turn: AbstractContextManager[object] = (
            threading.Lock() if resolved.get_backend_name() == "sqlite" else nullcontext()
        )
        self._engines = {
            kind: self._engine.execution_options(**{TRANSACTION_OPTION: kind}) for kind in _TRANSACTION_KINDS
        }
        try:
            ensure_schema(self._engines["write"])
        except BaseException:
            self._engine.dispose()
            raise

    def __repr__(self) -> str:
        return f"EnrichmentStore({self.url_display!r})"

    def rate_book(self, organization: str, run_id: str | None = None) -> FallbackRateBook:
        """The rate limiter's book for one organization (an API key's fingerprint), shared through this
        store by every process and machine that uses it (in memory once the store fails).

        With `run_id` (a run recorded with `start_run` before its first request), the slots it takes name
        it, and the slots other runs left in flight are closed as soon as those runs are proved dead."""

        def alive(conn: Connection, run_ids: set[str]) -> set[str]:
            judge = Judge(None, None, utc_now(), self._lease, self._process, self._locks)
            return alive_runs(conn, run_ids, judge)

        book = StoreRateBook(
            self._transact,
            self._engine.dialect.name,
            organization,
            run_id=run_id,
            alive_runs=alive,
            read=lambda work: self._transact(work, "read"),
        )
        return FallbackRateBook(book)

    def learned_rate_limits(self) -> list[tuple[str, str, RateLimit, float]]:
        """Every learned rate limit kept here: (organization, scope, limit, learned at, epoch seconds)."""
        return learned_rate_limits(self._transact)

    def forget_rate_limits(self) -> int:
        """Clear the learned rate limits kept here (the next runs start from their configuration)."""
        return forget_rate_limits(self._transact)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the runs' liveness locks (their runs count as dead from now on, if not finished) and
        close every pooled connection."""
        try:
            self._locks.close()
        finally:
            self._engine.dispose()

    # Runs

    def start_run(self, run_id: str, params: Mapping[str, object], flow_run_id: str | None = None) -> None:
        """Register (or restart) a run as running in this process on this host, holding its liveness lock
        until `finish_run` or `close` (liveness.AlreadyRunning if a live process holds it).

        URLs among the parameters are stored with their passwords hidden.
        """
        now = utc_now()
        shown = {key: hide_passwords(v) if isinstance(v, str) else v for key, v in params.items()}
        values = {
            "run_id": run_id,
            "flow_run_id": flow_run_id,
            "host": self._process.host,
            "pid": self._process.pid,
            "boot_id": self._process.boot_id,
            "proc_start": self._process.started,
            "liveness_lock": "",  # below: once the lock is held
            "status": RunRecordState.RUNNING,
            "params": dump_json(shown),
            "counts": None,
            "source": None,
            "enrichment_type": None,
            "submitted": None,
            "emails_found": None,
            "phones_found": None,
            "credits_spent": None,
            **economics_of(shown, None),
            "started_at": now,
            "heartbeat_at": now,
            "finished_at": None,
        }

        def work(conn: Connection) -> None:
            stmt = insert_for(conn, runs).values(values)
            refreshed = {name: stmt.excluded[name] for name in values if name != "run_id"}
            conn.execute(stmt.on_conflict_do_update(index_elements=[runs.c.run_id], set_=refreshed))

        # The lock first: a row naming a lock nobody holds would be judged dead at once.
        self._locks.acquire(run_id)
        values["liveness_lock"] = self._locks.tag
        try:
            self._transact(work)
        except BaseException:
            self._locks.release(run_id)
            raise

    def heartbeat(self, run_id: str) -> None:
        """Renew the run's lease on its claims (and its liveness lock, if a dropped connection lost it)."""
        try:
            self._locks.check()
        finally:
            self._transact(lambda conn: self._touch_run(conn, run_id, utc_now(), self._locks.tag))

    def keep_alive(self, run_id: str, interval: float = HEARTBEAT_SECONDS) -> RunHeartbeat:
        """Renew the (started) run's heartbeat every `interval` seconds from a daemon thread, until the
        returned heartbeat is stopped (before the store is closed)."""
        return RunHeartbeat(lambda: self.heartbeat(run_id), interval).start()

    def alive_runs(self, run_ids: Collection[str]) -> set[str]:
        """The runs among `run_ids` that are provably alive (cleanlist/store/liveness.py); the rest are
        dead: finished, silent past the lease, gone from this machine, or never seen by this store."""
        judge = Judge(None, None, utc_now(), self._lease, self._process, self._locks)
        return self._transact(lambda conn: alive_runs(conn, run_ids, judge), "read")

    def finish_run(self, run_id: str, status: str, counts: Mapping[str, object]) -> None:
        """Record how the run ended; any status but 'running' frees its claims for other runs."""
        now = utc_now()

        def work(conn: Connection) -> None:
            done = conn.execute(
                update(runs)
                .where(runs.c.run_id == run_id)
                .values(
                    status=status,
                    counts=dump_json(dict(counts)),
                    finished_at=now,
                    heartbeat_at=now,
                    **economics_of(None, counts),
                )
            )
            if done.rowcount == 0:
                raise ValueError(f"run {run_id!r} was never started in this store")

        # Durable: on SQLite it also flushes the run's earlier commits (its ledger rows written without
        # an fsync of their own while its journal held them), before the journal forgets the run.
        self._transact(work, "durable")
        self._locks.release(run_id)  # after the status: never a running row whose lock is free

    def run_economics(self, since: datetime | None = None, source: str | None = None) -> list[RunEconomics]:
        """Finished runs started since `since` (all: None), oldest first; `source`: only its runs (the
        source as shown, or its file name)."""
        require_aware(since, "since")
        return self._transact(lambda conn: read_runs(conn, since, source), "read")

    def refresh_due(self, refresh_days: float, horizon_days: int = 7) -> RefreshDue:
        """Stored results already older than `refresh_days`, and those that will be within `horizon_days`."""
        return self._transact(
            lambda conn: read_refresh_due(conn, utc_now(), refresh_days, horizon_days), "read"
        )

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run's record, if the store has it."""

        def work(conn: Connection) -> RunRecord | None:
            row = conn.execute(select(runs).where(runs.c.run_id == run_id)).one_or_none()
            return None if row is None else run_record(row)

        return self._transact(work, "read")

    # Claims

    def peek(
        self, keys: Sequence[str], enrichment_type: EnrichmentType, fresh_after: datetime | None
    ) -> ClaimOutcome:
        """How `claim` would split the keys for a new run, without claiming anything."""
        require_aware(fresh_after, "fresh_after")
        wanted = unique(keys)
        judge = Judge(None, fresh_after, utc_now(), self._lease, self._process, self._locks)

        def work(conn: Connection) -> ClaimOutcome:
            split = ClaimSplit()
            rows = contact_rows(conn, wanted, enrichment_type, lock=False)
            split.claimed.update(judge_rows(conn, rows, judge, split))
            split.claimed.update(key for key in wanted if key not in rows)
            return split.outcome(wanted)

        return self._transact(work, "read")

    def claim(
        self, run_id: str, keys: Sequence[str], enrichment_type: EnrichmentType, fresh_after: datetime | None
    ) -> ClaimOutcome:
        """Take the keys this run may submit, in one transaction; fresh_after None refreshes everything."""
        require_aware(fresh_after, "fresh_after")
        wanted = unique(keys)
        now = utc_now()
        judge = Judge(run_id, fresh_after, now, self._lease, self._process, self._locks)

        def work(conn: Connection) -> ClaimOutcome:
            self._touch_run(conn, run_id, now)
            split = ClaimSplit()
            pending = sorted(wanted)
            for _ in range(MAX_CLAIM_PASSES):
                inserted = insert_claims(conn, run_id, pending, enrichment_type, now)
                existing = [key for key in pending if key not in inserted]
                rows = contact_rows(conn, existing, enrichment_type, lock=True)
                takeable = judge_rows(conn, rows, judge, split)
                take_over(conn, run_id, takeable, enrichment_type, now)
                split.claimed.update(inserted)
                split.claimed.update(takeable)
                pending = [key for key in existing if key not in rows]
                if not pending:
                    return split.outcome(wanted)
            raise RuntimeError(f"{len(pending)} contact rows kept vanishing while being claimed; try again")

        return self._transact(work)

    def release(self, run_id: str, keys: Sequence[str], enrichment_type: EnrichmentType) -> None:
        """Give back claims this run will not submit; accepted contacts are never released."""
        wanted = unique(keys)
        self._transact(lambda conn: release_claims(conn, run_id, wanted, enrichment_type))

    # Ledger

    def record_accepted(  # noqa: PLR0913 - keyword-only: the fields of one ledger row
        self,
        run_id: str,
        *,
        workflow_id: str,
        chunk_key: str,
        enrichment_type: EnrichmentType,
        keys: Sequence[str],
        task_ids: Sequence[str],
        worst_case_credits: float,
        submitted_at: datetime | None = None,
        durable: bool = True,
    ) -> None:
        """Write an accepted submission to the ledger and put its contacts in flight (idempotent).

        `durable=False` when the caller already made the acceptance durable elsewhere (the run's
        fsync'd acceptance journal): the commit then survives a killed process but not a power cut."""
        if len(keys) != len(task_ids):
            raise ValueError(f"workflow {workflow_id}: {len(keys)} contact keys but {len(task_ids)} task ids")
        if len(set(keys)) != len(keys):
            raise ValueError(f"workflow {workflow_id}: the same contact key appears twice")
        require_aware(submitted_at, "submitted_at")
        at = submitted_at or utc_now()

        def work(conn: Connection) -> None:
            # The run row first, as claim() does: one lock order keeps the two from deadlocking. No error
            # for a run the store never saw: that is no reason to lose the record of spent money.
            conn.execute(update(runs).where(runs.c.run_id == run_id).values(heartbeat_at=utc_now()))
            write_accepted(
                conn,
                run_id=run_id,
                workflow_id=workflow_id,
                chunk_key=chunk_key,
                enrichment_type=enrichment_type,
                keys=keys,
                task_ids=task_ids,
                worst_case_credits=worst_case_credits,
                at=at,
            )

        self._transact(work, "durable" if durable else "write")

    def record_results(
        self,
        workflow_id: str,
        results: Sequence[ContactResult],
        *,
        state: str,
        credits_charged: float | None,
        completed_at: datetime | None = None,
    ) -> None:
        """Store a workflow's results (all or some so far) and its state; closing frees what it left."""
        check_state(state)
        require_aware(completed_at, "completed_at")
        at = completed_at or utc_now()

        def work(conn: Connection) -> None:
            enrichment_type = set_state(conn, workflow_id, state, at, credits_charged)
            write_results(conn, workflow_id, enrichment_type, results, at)
            close_if_closed(conn, workflow_id, state)

        self._transact(work)

    def owed(self, workflow_id: str) -> dict[str, str]:
        """Contact key → task id of the workflow's contacts still waiting for their answer."""

        def work(conn: Connection) -> dict[str, str]:
            rows = conn.execute(
                select(contacts.c.contact_key, contacts.c.task_id).where(
                    contacts.c.workflow_id == workflow_id, contacts.c.state == LedgerState.ACCEPTED
                )
            )
            return {row.contact_key: row.task_id or "" for row in rows}

        return self._transact(work, "read")

    def forget_tasks(self, workflow_id: str, keys: Sequence[str]) -> None:
        """The API does not know these contacts' tasks: free them for a later submission."""

        def work(conn: Connection) -> None:
            release_tasks(conn, workflow_id, keys)

        self._transact(work)

    def mark_workflow(self, workflow_id: str, state: str) -> None:
        """Set a workflow's state: closing (not_found, failed…) frees unresulted contacts, timed_out not."""
        check_state(state)
        now = utc_now()

        def work(conn: Connection) -> None:
            set_state(conn, workflow_id, state, now)
            close_if_closed(conn, workflow_id, state)

        self._transact(work)

    def open_workflows(self, enrichment_type: EnrichmentType | None = None) -> list[WorkflowRecord]:
        """Workflows of any run still owing results (accepted or timed_out), oldest first: poll these."""
        rows = self._transact(lambda conn: open_workflow_rows(conn, enrichment_type), "read")
        return [workflow_record(row) for row in rows]

    def workflow(self, workflow_id: str) -> WorkflowRecord | None:
        """One ledger entry, if present."""

        def work(conn: Connection) -> WorkflowRecord | None:
            row = conn.execute(select(workflows).where(workflows.c.workflow_id == workflow_id)).one_or_none()
            return None if row is None else workflow_record(row)

        return self._transact(work, "read")

    def run_credits(self, run_id: str) -> tuple[float, float]:
        """(worst case reserved by the run's workflows with no known charge yet, credits charged so far)."""
        return self._transact(lambda conn: credits_of_run(conn, run_id), "read")

    # Results

    def results(
        self, keys: Sequence[str], enrichment_type: EnrichmentType, *, raw: bool = True
    ) -> dict[str, StoredResult]:
        """Stored results of these keys, including old ones of contacts being refreshed. `raw=False`
        leaves out the API's own objects (`raw` is then empty): the writer never reads them, and
        decoding them was most of the cost of reading a result back."""
        wanted = unique(keys)
        columns = _WITH_RAW if raw else _WITHOUT_RAW

        def work(conn: Connection) -> dict[str, StoredResult]:
            found: dict[str, StoredResult] = {}
            for part in batches(wanted):
                stmt = select(*columns).where(
                    contacts.c.enrichment_type == enrichment_type,
                    contacts.c.contact_key.in_(part),
                    contacts.c.enriched_at.is_not(None),
                )
                for row in conn.execute(stmt):
                    found[row[0]] = stored_result(row)
            return {key: found[key] for key in wanted if key in found}

        return self._transact(work, "read")

    # Webhooks (cleanlist/store/webhooks.py)

    def register_webhook_token(self, run_id: str, digest: str) -> None:
        """Deliveries to the receiver URL with this token's digest belong to `run_id`."""
        self._transact(lambda conn: insert_token(conn, digest, run_id, utc_now()), "durable")

    def webhook_token_run(self, digest: str) -> str | None:
        """The run a receiver token belongs to, if any."""
        return self._transact(lambda conn: run_of_token(conn, digest), "read")

    def record_delivery(
        self, workflow_id: str, run_id: str, status: str, truncated: int, payload: str
    ) -> bool:
        """Keep a workflow's delivered payload (JSON) once; True if it was not delivered before."""
        now = utc_now()
        return self._transact(
            lambda conn: insert_delivery(
                conn,
                workflow_id=workflow_id,
                run_id=run_id,
                status=status,
                results_truncated=truncated,
                payload=payload,
                at=now,
            )
        )

    def delivered(self, workflow_ids: Sequence[str]) -> dict[str, str]:
        """Workflow id → delivered payload (JSON), for those of `workflow_ids` a receiver has accepted."""
        return self._transact(lambda conn: delivered_payloads(conn, workflow_ids), "read")

    # Plumbing

    # Incremental sources

    def source_mark(self, source_id: str) -> Watermark | None:
        """The high-water mark of a source's cursor, as of its last completed run (None before one)."""
        return self._transact(lambda conn: read_mark(conn, source_id), "read")

    def advance_source_mark(
        self, source_id: str, *, source: str, cursor_column: str, mark: Watermark, run_id: str
    ) -> None:
        """Record the mark a completed run reached (call only once the run has completed)."""
        row = {"source_id": source_id, "source": source, "cursor_column": cursor_column, "run_id": run_id}
        self._transact(lambda conn: write_mark(conn, mark=mark, **row))

    def _touch_run(self, conn: Connection, run_id: str, now: datetime, lock: str | None = None) -> None:
        # A beat also names the lock as it is held now (PostgreSQL: retaken after a server restart).
        values = {"heartbeat_at": now} if lock is None else {"heartbeat_at": now, "liveness_lock": lock}
        touched = conn.execute(update(runs).where(runs.c.run_id == run_id).values(values))
        if touched.rowcount == 0:
            raise ValueError(f"run {run_id!r} was never started in this store; call start_run first")

    def _transact(self, work: Callable[[Connection], T], kind: TransactionKind = "write") -> T:
        engine = self._engines[kind]
        turn = nullcontext() if kind == "read" else self._write_turn
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                with turn, engine.begin() as conn:
                    return work(conn)
            except DBAPIError as exc:
                if (
                    attempt == _MAX_ATTEMPTS
                    or getattr(exc.orig, "sqlstate", None) not in _RETRYABLE_SQLSTATES
                ):
                    raise
            time.sleep(random.uniform(0.0, 0.05 * 2**attempt))
        raise AssertionError("unreachable")
