"""Webhook tokens and deliveries in the store: which run a receiver URL belongs to, what was delivered.

A run registers the digest of its token (never the token itself: the URL is the only credential a
delivery carries, and the store may be shared). A receiver writes each accepted delivery once per
workflow (a retried or duplicated POST changes nothing); the run, or a rerun, picks it up from here and
stores its results through the same path as a polled answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Connection, select

from cleanlist.store.claims import insert_for
from cleanlist.store.codec import batches
from cleanlist.store.schema import webhook_deliveries, webhook_tokens


def token_digest(token: str) -> str:
    """What the store keeps of a receiver token."""
    return hashlib.sha256(token.encode()).hexdigest()


def insert_token(conn: Connection, digest: str, run_id: str, at: datetime) -> None:
    conn.execute(
        insert_for(conn, webhook_tokens)
        .values(token_digest=digest, run_id=run_id, created_at=at)
        .on_conflict_do_nothing(index_elements=[webhook_tokens.c.token_digest])
    )


def run_of_token(conn: Connection, digest: str) -> str | None:
    run_id: str | None = conn.execute(
        select(webhook_tokens.c.run_id).where(webhook_tokens.c.token_digest == digest)
    ).scalar_one_or_none()
    return run_id


def insert_delivery(
    conn: Connection,
    *,
    workflow_id: str,
    run_id: str,
    status: str,
    results_truncated: int,
    payload: str,
    at: datetime,
) -> bool:
    """Keep the first delivery of a workflow; True if this one is new."""
    done = conn.execute(
        insert_for(conn, webhook_deliveries)
        .values(
            workflow_id=workflow_id,
            run_id=run_id,
            status=status,
            results_truncated=results_truncated,
            payload=payload,
            received_at=at,
        )
        .on_conflict_do_nothing(index_elements=[webhook_deliveries.c.workflow_id])
    )
    return bool(done.rowcount)


def delivered_payloads(conn: Connection, workflow_ids: Sequence[str]) -> dict[str, str]:
    """Workflow id → the JSON payload delivered for it, for those of `workflow_ids` delivered so far."""
    found: dict[str, str] = {}
    for part in batches(list(workflow_ids)):
        rows = conn.execute(
            select(webhook_deliveries.c.workflow_id, webhook_deliveries.c.payload).where(
                webhook_deliveries.c.workflow_id.in_(part)
            )
        )
        found.update({row.workflow_id: row.payload for row in rows})
    return found
