"""plan_run against a real SQLite enrichment store: fresh results are reused, open workflows are resumed,
contacts another live run holds are left alone, the rest is chunked; planning never claims anything."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from cleanlist.models import worst_case_credits
from cleanlist.run.plan import plan_run
from cleanlist.run.workspace import KEY, REJECT, REJECT_CODE, ROW, RunWorkspace, StagedContact
from cleanlist.store import ContactResult, EnrichmentStore
from cleanlist.vocab import ContactState

PARTIAL = "partial"
LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)


def fresh_after() -> datetime:
    return datetime.now(UTC) - timedelta(days=30)


def stage(workspace: RunWorkspace, keys: Sequence[str]) -> None:
    frame = pd.DataFrame(
        {"Name": list(keys), ROW: range(len(keys)), KEY: list(keys), REJECT: None, REJECT_CODE: None}
    )
    workspace.add_part(frame, [StagedContact(key, {"linkedin_url": key}) for key in keys])


def accept(
    store: EnrichmentStore, run_id: str, workflow_id: str, keys: Sequence[str], enrichment_type: str = PARTIAL
) -> list[str]:
    task_ids = [f"{workflow_id}-t{i}" for i in range(len(keys))]
    store.record_accepted(
        run_id,
        workflow_id=workflow_id,
        chunk_key="0",
        enrichment_type=enrichment_type,
        keys=keys,
        task_ids=task_ids,
        worst_case_credits=worst_case_credits(enrichment_type, len(keys)),
    )
    return task_ids


def enrich(
    store: EnrichmentStore,
    run_id: str,
    workflow_id: str,
    keys: Sequence[str],
    *,
    completed_at: datetime | None = None,
    enrichment_type: str = PARTIAL,
) -> None:
    """An earlier run submitted `keys` and got their results."""
    task_ids = accept(store, run_id, workflow_id, keys, enrichment_type)
    results = [
        ContactResult(key, task_id, "completed", f"{key}@example.com", "valid")
        for key, task_id in zip(keys, task_ids, strict=True)
    ]
    store.record_results(
        workflow_id, results, state="completed", credits_charged=len(keys), completed_at=completed_at
    )


def test_fresh_results_are_reused_open_workflows_resumed_and_the_rest_chunked(
    store: EnrichmentStore, workspace: RunWorkspace
) -> None:
    keys = [f"li:person-{i:03d}" for i in range(12)]
    stage(workspace, keys)
    store.start_run("earlier", {})
    enrich(store, "earlier", "wf-done", keys[0:3])
    accept(store, "earlier", "wf-open-1", keys[3:5])
    accept(store, "earlier", "wf-open-2", keys[5:6])
    enrich(store, "earlier", "wf-stale", keys[6:7], completed_at=LONG_AGO)  # too old: refreshed
    store.finish_run("earlier", "completed", {})

    plan = plan_run(workspace, store, PARTIAL, fresh_after(), chunk_size=2)

    assert (plan.fresh, plan.in_flight, plan.held, plan.to_submit) == (3, 3, 0, 6)
    assert plan.resume_workflows == ["wf-open-1", "wf-open-2"]
    assert plan.chunks == [0, 1, 2]
    assert plan.worst_case_credits == worst_case_credits(PARTIAL, 6) == 6.0
    states = workspace.states(keys)
    assert {k for k, (s, _) in states.items() if s is ContactState.FRESH} == set(keys[0:3])
    assert {k for k, (s, _) in states.items() if s is ContactState.IN_FLIGHT} == set(keys[3:6])
    to_send = [keys[6], *keys[7:]]
    assert [key for n in plan.chunks for key in workspace.chunk_keys(n)] == to_send
    assert [c.key for c in workspace.chunk(0)] == to_send[:2]
    assert workspace.counts() == {
        ContactState.FRESH: 3,
        ContactState.IN_FLIGHT: 3,
        ContactState.PLANNED: 6,
    }


def test_planning_claims_nothing(store: EnrichmentStore, workspace: RunWorkspace) -> None:
    keys = [f"li:person-{i}" for i in range(4)]
    stage(workspace, keys)
    plan_run(workspace, store, PARTIAL, fresh_after(), chunk_size=250)
    # Another run may still claim every key the plan means to send: peek is read-only.
    store.start_run("other", {})
    assert store.claim("other", keys, PARTIAL, fresh_after()).claimed == keys


def test_contacts_another_live_run_holds_are_left_to_it(
    store: EnrichmentStore, workspace: RunWorkspace
) -> None:
    keys = [f"li:person-{i}" for i in range(5)]
    stage(workspace, keys)
    store.start_run("alive", {})
    assert store.claim("alive", keys[1:3], PARTIAL, fresh_after()).claimed == keys[1:3]

    plan = plan_run(workspace, store, PARTIAL, fresh_after(), chunk_size=250)

    assert (plan.held, plan.to_submit, plan.chunks) == (2, 3, [0])
    assert workspace.chunk_keys(0) == [keys[0], keys[3], keys[4]]
    assert workspace.count(ContactState.HELD) == 2
    assert plan.worst_case_credits == worst_case_credits(PARTIAL, 3)


def test_without_fresh_after_every_stored_result_is_refreshed(
    store: EnrichmentStore, workspace: RunWorkspace
) -> None:
    keys = ["li:a", "li:b", "li:c"]
    stage(workspace, keys)
    store.start_run("earlier", {})
    enrich(store, "earlier", "wf-done", keys[:2])

    plan = plan_run(workspace, store, PARTIAL, None, chunk_size=250)

    assert (plan.fresh, plan.to_submit, plan.chunks) == (0, 3, [0])
    assert workspace.chunk_keys(0) == keys


def test_results_of_another_enrichment_type_do_not_count(
    store: EnrichmentStore, workspace: RunWorkspace
) -> None:
    keys = ["li:a", "li:b"]
    stage(workspace, keys)
    store.start_run("earlier", {})
    enrich(store, "earlier", "wf-full", keys, enrichment_type="full")

    plan = plan_run(workspace, store, PARTIAL, fresh_after(), chunk_size=250)
    assert (plan.fresh, plan.in_flight, plan.to_submit) == (0, 0, 2)

    full = plan_run(workspace, store, "full", fresh_after(), chunk_size=250)
    # Everything was already planned for partial: nothing NEW is left to classify.
    assert (full.fresh, full.to_submit, full.chunks) == (0, 0, [])


@pytest.mark.parametrize("enrichment_type", ["none", "partial", "phone_only", "full", "prospecting_only"])
def test_worst_case_credits_is_the_pricing_of_what_is_sent(
    store: EnrichmentStore, workspace: RunWorkspace, enrichment_type: str
) -> None:
    keys = [f"li:person-{i}" for i in range(7)]
    stage(workspace, keys)
    store.start_run("earlier", {})
    enrich(store, "earlier", "wf-done", keys[:2], enrichment_type=enrichment_type)

    plan = plan_run(workspace, store, enrichment_type, fresh_after(), chunk_size=3)

    assert plan.to_submit == 5
    assert plan.chunks == [0, 1]
    assert plan.worst_case_credits == worst_case_credits(enrichment_type, 5)


def test_a_large_input_is_classified_block_by_block(store: EnrichmentStore, workspace: RunWorkspace) -> None:
    # plan_run asks the store 5,000 keys at a time; the split must not depend on the block boundary.
    keys = [f"li:person-{i:05d}" for i in range(5003)]
    stage(workspace, keys)
    store.start_run("earlier", {})
    enrich(store, "earlier", "wf-edge", [keys[4999], keys[5000]])
    accept(store, "earlier", "wf-tail", [keys[5002]])

    plan = plan_run(workspace, store, PARTIAL, fresh_after(), chunk_size=250)

    assert (plan.fresh, plan.in_flight, plan.to_submit) == (2, 1, 5000)
    assert plan.resume_workflows == ["wf-tail"]
    assert len(plan.chunks) == 20
    assert workspace.count(ContactState.PLANNED) == 5000
