"""Planning: which unique contacts are fresh in the store, already in flight, held elsewhere, or to send."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from cleanlist.models import worst_case_credits
from cleanlist.run.workspace import RunWorkspace
from cleanlist.store import EnrichmentStore
from cleanlist.vocab import ContactState, EnrichmentType, WorkflowState


@dataclass(frozen=True)
class Plan:
    """How the run's unique contacts split, and the chunks to submit."""

    fresh: int
    in_flight: int
    held: int
    to_submit: int
    chunks: list[int]
    resume_workflows: list[str]
    worst_case_credits: float
    resolved: int = 0  # owed by unresolved workflows of earlier runs, answered by task id now
    forgotten: int = 0  # owed, but unknown to the API: submitted again in this run


# Asks the API, by task id, for what unresolved workflows owe (workflow → key → task id); returns
# (keys answered, keys the API does not know). `RunContext.settle_unresolved` is one.
Settle = Callable[[Mapping[str, Mapping[str, str]]], tuple[list[str], list[str]]]


def plan_run(
    workspace: RunWorkspace,
    store: EnrichmentStore,
    enrichment_type: EnrichmentType,
    fresh_after: datetime | None,
    chunk_size: int,
    *,
    settle: Settle | None = None,
) -> Plan:
    """Classify every NEW contact against the store (read-only), settle what unresolved workflows owe
    (with `settle`), then chunk what is left to send."""
    fresh = in_flight = held = 0
    owed: dict[str, dict[str, str]] = {}
    for keys in workspace.keys_in_state(ContactState.NEW, block=5000):
        outcome = store.peek(keys, enrichment_type, fresh_after)
        if outcome.fresh:
            workspace.set_state(list(outcome.fresh), ContactState.FRESH)
            fresh += len(outcome.fresh)
        if outcome.in_flight:
            workspace.set_state(list(outcome.in_flight), ContactState.IN_FLIGHT)
            in_flight += len(outcome.in_flight)
            for key, (workflow_id, task_id) in outcome.in_flight.items():
                owed.setdefault(workflow_id, {})[key] = task_id or ""
        if outcome.held:
            workspace.set_state(outcome.held, ContactState.HELD)
            held += len(outcome.held)
    unresolved = {wf: tasks for wf, tasks in owed.items() if _is_unresolved(store, wf)}
    resolved: list[str] = []
    forgotten: list[str] = []
    if settle is not None and unresolved:
        resolved, forgotten = settle(unresolved)
        workspace.set_state(resolved, ContactState.RESULTED)
        workspace.set_state(forgotten, ContactState.NEW)
        settled = set(resolved) | set(forgotten)
        for workflow_id, tasks in unresolved.items():
            still = [key for key in tasks if key not in settled]
            note = f"still owed by workflow {workflow_id}: the API has not answered its task by id"
            workspace.set_state(still, ContactState.UNRESOLVED, note)
        in_flight -= len(settled)
    to_submit = workspace.count(ContactState.NEW)
    chunks = workspace.plan_chunks(chunk_size)
    # Unresolved workflows were just asked task by task; the others are polled.
    resume = [wf for wf in owed if wf not in unresolved or settle is None]
    return Plan(
        fresh=fresh,
        in_flight=in_flight,
        held=held,
        to_submit=to_submit,
        chunks=chunks,
        resume_workflows=resume,
        worst_case_credits=worst_case_credits(enrichment_type, to_submit),
        resolved=len(resolved),
        forgotten=len(forgotten),
    )


def _is_unresolved(store: EnrichmentStore, workflow_id: str) -> bool:
    record = store.workflow(workflow_id)
    return record is not None and record.state == WorkflowState.UNRESOLVED
