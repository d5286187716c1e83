"""What the enrichment store hands out: frozen records of runs, workflows, results and claims."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from cleanlist.vocab import EnrichmentType, WorkflowState

# The ledger's words are in `cleanlist/vocab.py` (`LedgerState`, `WorkflowState`, `RunRecordState`).
# Kept for `cleanlist/run/context.py` until its settlement code names `WorkflowState.UNRESOLVED` itself.
WORKFLOW_UNRESOLVED: Final = WorkflowState.UNRESOLVED


@dataclass(frozen=True, slots=True)
class ContactResult:
    """One task's outcome as polled from a workflow, ready to be stored."""

    contact_key: str
    task_id: str
    status: str
    primary_email: str | None = None
    primary_email_status: str | None = None
    other_emails: Sequence[str] = ()
    phones: Sequence[str] = ()
    raw: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredResult:
    """A contact's stored result, with where and when it was obtained."""

    contact_key: str
    enrichment_type: EnrichmentType
    workflow_id: str
    task_id: str
    status: str
    primary_email: str | None
    primary_email_status: str | None
    other_emails: tuple[str, ...]
    phones: tuple[str, ...]
    raw: Mapping[str, Any]
    enriched_at: datetime


@dataclass(frozen=True, slots=True)
class ClaimOutcome:
    """How a batch of contact keys splits: submit, reuse, poll, or leave to another live run."""

    claimed: list[str] = field(default_factory=list)
    """Held by the calling run now (peek: claimable); these, and only these, may be submitted."""
    fresh: dict[str, StoredResult] = field(default_factory=dict)
    """Stored results at least as recent as `fresh_after`."""
    in_flight: dict[str, tuple[str, str]] = field(default_factory=dict)
    """key → (workflow_id, task_id) accepted by some run and not resulted: poll it, never resubmit."""
    held: list[str] = field(default_factory=list)
    """Claimed, not yet submitted, by another run that is alive."""


@dataclass(frozen=True, slots=True)
class WorkflowRecord:
    """One accepted bulk submission in the ledger."""

    workflow_id: str
    run_id: str
    chunk_key: str
    enrichment_type: EnrichmentType
    state: str
    contact_count: int
    contact_keys: tuple[str, ...]
    task_ids: tuple[str, ...]
    worst_case_credits: float
    credits_charged: float | None
    submitted_at: datetime
    completed_at: datetime | None


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One flow run as the store knows it: who runs it, where, and whether it is still alive."""

    run_id: str
    flow_run_id: str | None
    host: str
    pid: int
    status: str
    params: Mapping[str, Any]
    counts: Mapping[str, Any] | None
    started_at: datetime
    heartbeat_at: datetime
    finished_at: datetime | None
