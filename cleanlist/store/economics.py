"""What runs cost and found, read from the store: the runs' economics columns and the contacts' ages.

A run's source and enrichment type are written when it starts, its counts when it finishes
(`economics_of`); `read_economics` reads the finished runs since a time (one query over the runs table,
small) and counts the contacts whose stored result turns stale (one aggregate over the contacts table,
the only part that grows with the store).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, case, func, or_, select

from cleanlist.store.schema import RUN_ECONOMICS_COLUMNS, contacts, runs
from cleanlist.vocab import LedgerState


@dataclass(frozen=True)
class RunEconomics:
    """One finished run: what it sent, found and paid."""

    run_id: str
    started_at: datetime
    finished_at: datetime
    status: str
    source: str
    enrichment_type: str
    submitted: int
    emails_found: int
    phones_found: int
    credits_spent: float

    @property
    def found(self) -> int:
        return self.emails_found + self.phones_found


@dataclass(frozen=True)
class RefreshDue:
    """Contacts whose stored result is older than the refresh age now, and those that get there soon."""

    refresh_days: float
    horizon_days: int
    due_now: int
    due_soon: int


def economics_of(params: Mapping[str, Any] | None, counts: Mapping[str, Any] | None) -> dict[str, Any]:
    """The runs table's economics columns from a run's stored parameters and summary (either may be
    None); a value of the wrong type is left out, never guessed."""
    values: dict[str, Any] = {}
    for name in ("source", "enrichment_type"):
        value = (params or {}).get(name)
        if isinstance(value, str):
            values[name] = value
    for name in ("submitted", "emails_found", "phones_found"):
        value = (counts or {}).get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            values[name] = value
    credits = (counts or {}).get("credits_spent")
    if isinstance(credits, int | float) and not isinstance(credits, bool):
        values["credits_spent"] = float(credits)
    return values


def read_runs(conn: Connection, since: datetime | None, source: str | None) -> list[RunEconomics]:
    """Finished runs that started at or after `since`, oldest first; `source`: only runs whose source is
    it, or whose file name is it."""
    query = select(
        runs.c.run_id, runs.c.started_at, runs.c.finished_at, runs.c.status, *RUN_ECONOMICS_COLUMNS
    ).where(runs.c.finished_at.is_not(None))
    if since is not None:
        query = query.where(runs.c.started_at >= since)
    if source is not None:
        query = query.where(
            or_(runs.c.source == source, runs.c.source.like(f"%/{_escaped(source)}", escape="\\"))
        )
    rows = conn.execute(query.order_by(runs.c.started_at, runs.c.run_id)).all()
    return [
        RunEconomics(
            run_id=row.run_id,
            started_at=row.started_at,
            finished_at=row.finished_at,
            status=row.status,
            source=row.source or "",
            enrichment_type=row.enrichment_type or "",
            submitted=row.submitted or 0,
            emails_found=row.emails_found or 0,
            phones_found=row.phones_found or 0,
            credits_spent=row.credits_spent or 0.0,
        )
        for row in rows
    ]


def _escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def read_refresh_due(conn: Connection, now: datetime, refresh_days: float, horizon_days: int) -> RefreshDue:
    """Stored results older than `refresh_days` now, and those that will be within `horizon_days`."""
    stale_before = now - timedelta(days=refresh_days)
    soon_before = stale_before + timedelta(days=horizon_days)
    enriched = contacts.c.enriched_at
    due_now, due_soon = conn.execute(
        select(
            func.coalesce(func.sum(case((enriched < stale_before, 1), else_=0)), 0),
            func.coalesce(
                func.sum(case((and_(enriched >= stale_before, enriched < soon_before), 1), else_=0)), 0
            ),
        ).where(contacts.c.state == LedgerState.DONE, enriched < soon_before)
    ).one()
    return RefreshDue(refresh_days, horizon_days, int(due_now), int(due_soon))
