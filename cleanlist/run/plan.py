"""Planning: which unique contacts are fresh in the store, already in flight, held elsewhere, or to send."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cleanlist.models import worst_case_credits
from cleanlist.run.states import ContactState
from cleanlist.run.workspace import RunWorkspace
from cleanlist.store import EnrichmentStore


@dataclass(frozen=True)
class Plan:
    fresh: int
    in_flight: int
    held: int
    to_submit: int
    chunks: list[int]
    resume_workflows: list[str]
    worst_case_credits: float


def plan_run(
    workspace: RunWorkspace,
    store: EnrichmentStore,
    enrichment_type: str,
    fresh_after: datetime | None,
    chunk_size: int,
) -> Plan:
    """Classify every NEW contact against the store (read-only), then chunk what is left to send."""
    fresh = in_flight = held = 0
    workflows: dict[str, None] = {}
    for keys in workspace.keys_in_state(ContactState.NEW, block=5000):
        outcome = store.peek(keys, enrichment_type, fresh_after)
        if outcome.fresh:
            workspace.set_state(list(outcome.fresh), ContactState.FRESH)
            fresh += len(outcome.fresh)
        if outcome.in_flight:
            workspace.set_state(list(outcome.in_flight), ContactState.IN_FLIGHT)
            in_flight += len(outcome.in_flight)
            workflows.update(dict.fromkeys(wf for wf, _ in outcome.in_flight.values()))
        if outcome.held:
            workspace.set_state(outcome.held, ContactState.HELD)
            held += len(outcome.held)
    to_submit = workspace.count(ContactState.NEW)
    chunks = workspace.plan_chunks(chunk_size)
    return Plan(
        fresh=fresh,
        in_flight=in_flight,
        held=held,
        to_submit=to_submit,
        chunks=chunks,
        resume_workflows=list(workflows),
        worst_case_credits=worst_case_credits(enrichment_type, to_submit),
    )
