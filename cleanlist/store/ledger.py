"""The ledger of accepted workflows, inside one transaction: record, result, close, and account for them."""

# An accepted workflow is spent money. Its contacts stay in flight (a rerun polls, never resubmits) until
# its results arrive or it closes without them (not_found, failed, …), which frees them for a later run.

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    Connection,
    Row,
    Table,
    and_,
    bindparam,
    case,
    func,
    literal_column,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import ClauseElement

from cleanlist.store.bulk import db_time, execute_one, execute_rows
from cleanlist.store.claims import insert_for, release_workflow
from cleanlist.store.codec import dump_json
from cleanlist.store.records import ContactResult
from cleanlist.store.schema import contacts, workflows
from cleanlist.vocab import (
    CLOSED_WORKFLOW_STATES,
    OPEN_WORKFLOW_STATES,
    EnrichmentType,
    LedgerState,
    WorkflowState,
)

# Closed without a charge: these reserve nothing against a budget. A completed workflow whose charge
# was never reported keeps its worst case reserved, to err on the side of the budget.
_UNCHARGED_STATES: Final = CLOSED_WORKFLOW_STATES - {WorkflowState.COMPLETED}


# The per-contact statements, built once. Parameters are named p_* because SQLAlchemy reserves column
# names for its own SET/VALUES parameters; fixed states are inlined, as they never vary.


def _upsert_in_flight(insert: Callable[[Table], postgresql.Insert | sqlite.Insert]) -> ClauseElement:
    stmt = insert(contacts).values(
        contact_key=bindparam("p_key"),
        enrichment_type=bindparam("p_type"),
        state=literal_column(f"'{LedgerState.ACCEPTED}'"),
        run_id=bindparam("p_run"),
        workflow_id=bindparam("p_workflow"),
        task_id=bindparam("p_task"),
        claimed_at=bindparam("p_at"),
        accepted_at=bindparam("p_at"),
    )
    excluded = stmt.excluded
    # Upsert, not update: the money is spent, so the contact is in flight even if its claim was
    # released or taken over meanwhile. A replay after the results arrived must not undo them.
    return stmt.on_conflict_do_update(
        index_elements=[contacts.c.contact_key, contacts.c.enrichment_type],
        set_={name: excluded[name] for name in ("state", "run_id", "workflow_id", "task_id", "accepted_at")},
        where=or_(
            contacts.c.state != literal_column(f"'{LedgerState.DONE}'"),
            contacts.c.result_workflow_id.is_distinct_from(excluded.workflow_id),
        ),
    )


_UPSERT_IN_FLIGHT: Final = {
    "postgresql": _upsert_in_flight(postgresql.insert),
    "sqlite": _upsert_in_flight(sqlite.insert),
}

_STORE_RESULT: Final = (
    update(contacts)
    .where(
        contacts.c.contact_key == bindparam("p_key"),
        contacts.c.enrichment_type == bindparam("p_type"),
        # Only contacts still waiting for this very workflow: a replay, or a contact resubmitted in
        # another workflow since, must not overwrite newer state.
        contacts.c.workflow_id == bindparam("p_workflow"),
        contacts.c.state == literal_column(f"'{LedgerState.ACCEPTED}'"),
    )
    .values(
        state=literal_column(f"'{LedgerState.DONE}'"),
        workflow_id=null(),
        task_id=null(),
        result_workflow_id=bindparam("p_workflow"),
        result_task_id=bindparam("p_task"),
        result_status=bindparam("p_status"),
        primary_email=bindparam("p_email"),
        primary_email_status=bindparam("p_email_status"),
        other_emails=bindparam("p_other_emails"),
        phones=bindparam("p_phones"),
        raw=bindparam("p_raw"),
        enriched_at=bindparam("p_at"),
    )
)


# A workflow's settling statements, built once: run per chunk at driver speed (`execute_one`).
_LEDGER_ROW: Final = (
    select(
        workflows.c.enrichment_type,
        workflows.c.state,
        workflows.c.completed_at,
        workflows.c.credits_charged,
    )
    .where(workflows.c.workflow_id == bindparam("p_workflow"))
    .with_for_update()
)
_SET_STATE: Final = {
    (charged, closed): update(workflows)
    .where(workflows.c.workflow_id == bindparam("p_workflow"))
    .values(
        state=bindparam("p_state"),
        **({"credits_charged": bindparam("p_charged")} if charged else {}),
        **({"completed_at": bindparam("p_completed_at")} if closed else {}),
    )
    for charged in (False, True)
    for closed in (False, True)
}


def check_state(state: str) -> None:
    """Refuse a workflow state the ledger does not know."""
    if state not in frozenset(WorkflowState):
        known = sorted(WorkflowState)
        raise ValueError(f"unknown workflow state {state!r}; expected one of {known}")


def write_accepted(  # noqa: PLR0913 - keyword-only: the fields of one ledger row
    conn: Connection,
    *,
    run_id: str,
    workflow_id: str,
    chunk_key: str,
    enrichment_type: EnrichmentType,
    keys: Sequence[str],
    task_ids: Sequence[str],
    worst_case_credits: float,
    at: datetime,
) -> None:
    """Add the workflow to the ledger and put its contacts in flight; replaying it changes nothing."""
    conn.execute(
        insert_for(conn, workflows)
        .values(
            workflow_id=workflow_id,
            run_id=run_id,
            chunk_key=chunk_key,
            enrichment_type=enrichment_type,
            state=WorkflowState.ACCEPTED,
            contact_count=len(keys),
            contact_keys=dump_json(list(keys)),
            task_ids=dump_json(list(task_ids)),
            worst_case_credits=worst_case_credits,
            submitted_at=at,
        )
        .on_conflict_do_nothing(index_elements=[workflows.c.workflow_id])
    )
    at_db = db_time(conn, at)
    execute_rows(
        conn,
        _UPSERT_IN_FLIGHT[conn.dialect.name],
        [
            {
                "p_key": key,
                "p_type": enrichment_type,
                "p_run": run_id,
                "p_workflow": workflow_id,
                "p_task": task_id,
                "p_at": at_db,
            }
            # Key order, as claims lock rows, so the two cannot deadlock on PostgreSQL.
            for key, task_id in sorted(zip(keys, task_ids, strict=True))
        ],
    )


def set_state(
    conn: Connection, workflow_id: str, state: str, at: datetime, credits_charged: float | None = None
) -> EnrichmentType:
    """Move the (locked) workflow to `state`; returns its enrichment type. Closed workflows stay closed."""
    ledger = execute_one(conn, _LEDGER_ROW, {"p_workflow": workflow_id}).one_or_none()
    if ledger is None:
        raise ValueError(f"workflow {workflow_id} is not in the ledger; record_accepted comes first")
    if ledger.state in CLOSED_WORKFLOW_STATES and state in OPEN_WORKFLOW_STATES:
        # Its contacts were freed when it closed; reopening it would have later runs poll for nothing.
        raise ValueError(f"workflow {workflow_id} is {ledger.state}; a closed workflow stays closed")
    changes: dict[str, object] = {"p_workflow": workflow_id, "p_state": str(state)}
    if credits_charged is not None:
        # Answers of an unresolved workflow come in parts: each part adds what it cost.
        earlier = ledger.credits_charged
        partial = ledger.state == WorkflowState.UNRESOLVED and earlier is not None
        changes["p_charged"] = credits_charged + (float(earlier) if partial else 0.0)
    closed = state in CLOSED_WORKFLOW_STATES
    if closed:
        # Kept as the driver stored it (not read back through the column type), or this moment's.
        changes["p_completed_at"] = ledger.completed_at or db_time(conn, at)
    execute_one(conn, _SET_STATE[credits_charged is not None, closed], changes)
    return EnrichmentType(ledger.enrichment_type)


def write_results(
    conn: Connection,
    workflow_id: str,
    enrichment_type: EnrichmentType,
    results: Sequence[ContactResult],
    at: datetime,
) -> None:
    """Store results on the contacts still waiting for this very workflow."""
    latest = {result.contact_key: result for result in results}
    at_db = db_time(conn, at)
    execute_rows(
        conn,
        _STORE_RESULT,
        [
            {
                "p_key": key,
                "p_type": enrichment_type,
                "p_workflow": workflow_id,
                "p_task": result.task_id,
                "p_status": result.status,
                "p_email": result.primary_email,
                "p_email_status": result.primary_email_status,
                "p_other_emails": dump_json(list(result.other_emails)),
                "p_phones": dump_json(list(result.phones)),
                "p_raw": dump_json(dict(result.raw)),
                "p_at": at_db,
            }
            # Key order, as claims lock rows, so the two cannot deadlock on PostgreSQL.
            for key, result in sorted(latest.items())
        ],
    )


def close_if_closed(conn: Connection, workflow_id: str, state: str) -> None:
    """Free what a workflow left unresulted once its state says no more results will come."""
    if state in CLOSED_WORKFLOW_STATES:
        release_workflow(conn, workflow_id)


def open_workflow_rows(conn: Connection, enrichment_type: EnrichmentType | None) -> list[Row[Any]]:
    """Ledger rows of every run still owing results, oldest first."""
    stmt = select(workflows).where(workflows.c.state.in_(sorted(OPEN_WORKFLOW_STATES)))
    if enrichment_type is not None:
        stmt = stmt.where(workflows.c.enrichment_type == enrichment_type)
    return list(conn.execute(stmt.order_by(workflows.c.submitted_at, workflows.c.workflow_id)))


def credits_of_run(conn: Connection, run_id: str) -> tuple[float, float]:
    """(worst case reserved by the run's workflows whose charge is unknown, credits charged so far)."""
    reserved = case(
        (
            and_(workflows.c.credits_charged.is_(None), workflows.c.state.not_in(sorted(_UNCHARGED_STATES))),
            workflows.c.worst_case_credits,
        ),
        else_=0.0,
    )
    worst_case, charged = conn.execute(
        select(
            func.coalesce(func.sum(reserved), 0.0), func.coalesce(func.sum(workflows.c.credits_charged), 0.0)
        ).where(workflows.c.run_id == run_id)
    ).one()
    return float(worst_case), float(charged)
