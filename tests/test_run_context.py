"""One enrich run's shared context without Prefect: the submission gate, the credit budget, and a RunContext
driving real chunks through a real sandbox over HTTP into a real SQLite store."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cleanlist.client import CleanlistClient
from cleanlist.errors import APIStatusError, AuthenticationError, make_status_error
from cleanlist.models import worst_case_credits
from cleanlist.prepare import contact_key
from cleanlist.retry import RetryPolicy
from cleanlist.run.context import CreditBudget, Progress, RunContext, SubmissionGate
from cleanlist.run.options import EnrichOptions
from cleanlist.run.plan import Plan, plan_run
from cleanlist.run.submit import submit_chunk
from cleanlist.run.workspace import KEY, REJECT, REJECT_CODE, ROW, RunWorkspace, StagedContact
from cleanlist.sandbox import SandboxServer
from cleanlist.store import EnrichmentStore
from cleanlist.vocab import ChunkStatus, ContactState
from tests.sandbox_helpers import people

StartSandbox = Callable[..., SandboxServer]


def status_error(status: int) -> Any:
    return make_status_error(
        status_code=status,
        method="POST",
        path="/enrich/bulk",
        body={"detail": f"status {status}"},
        headers={},
    )


# -- the submission gate ---------------------------------------------------------------------------------


def test_gate_is_open_until_a_fatal_error_and_keeps_the_first_one() -> None:
    gate = SubmissionGate()
    assert gate.open and gate.fatal is None
    first, second = status_error(401), status_error(403)
    gate.fail(first)
    gate.fail(second)
    assert not gate.open
    assert gate.fatal is first
    gate.credits_returned()  # credits coming back never reopens a gate closed for good
    assert not gate.open


def test_gate_pauses_on_exhausted_credits_and_reopens_when_they_return() -> None:
    gate = SubmissionGate()
    gate.exhaust_credits()
    assert not gate.open and gate.credits_exhausted and gate.fatal is None
    gate.credits_returned()
    assert gate.open
    gate.exhaust_credits()
    gate.fail(status_error(401))
    gate.credits_returned()
    assert not gate.open


def test_gate_keeps_exactly_one_of_many_racing_errors() -> None:
    gate = SubmissionGate()
    errors = [status_error(401) for _ in range(16)]
    start = threading.Barrier(len(errors))

    def fail(error: APIStatusError) -> None:
        start.wait()
        gate.fail(error)

    threads = [threading.Thread(target=fail, args=(e,)) for e in errors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    assert any(gate.fatal is error for error in errors)
    assert not gate.open


# -- the credit budget -----------------------------------------------------------------------------------


def test_budget_reserves_the_worst_case_of_chunks_up_to_the_cap() -> None:
    budget = CreditBudget("partial", max_credits=10)
    assert budget.reserve(0, 4)
    assert budget.reserve(1, 4)
    assert not budget.reserve(2, 3)  # 8 + 3 > 10
    assert budget.committed() == 8
    assert budget.reserve(2, 2)  # exactly at the cap is allowed
    assert budget.committed() == 10
    assert not budget.reserve(3, 1)


def test_budget_counts_reserved_in_flight_and_spent_credits() -> None:
    budget = CreditBudget("full", max_credits=100)
    assert budget.reserve(0, 5)  # 55
    assert not budget.reserve(1, 5)  # 110
    # Chunk 0 was accepted: its workflow carries the worst case from now on, the reservation goes.
    budget.workflow_accepted(worst_case_credits("full", 5))
    budget.unreserve(0)
    assert budget.committed() == 55
    assert budget.unsettled
    assert not budget.reserve(1, 5)
    # The workflow settled for much less than its worst case: the charge replaces the worst case.
    budget.workflow_settled(55, charged=12)
    assert budget.spent == 12
    assert not budget.unsettled
    assert budget.committed() == 12
    assert budget.reserve(1, 5)  # 12 + 55 <= 100
    assert budget.committed() == 67
    budget.unreserve(1)
    budget.unreserve(1)  # a chunk whose task ended twice (retries) is no error
    assert budget.committed() == 12


def test_budget_without_a_cap_reserves_anything() -> None:
    budget = CreditBudget("full", max_credits=None)
    assert all(budget.reserve(n, 250) for n in range(1000))
    assert budget.committed() == 1000 * worst_case_credits("full", 250)


def test_budget_of_a_free_enrichment_type_never_refuses() -> None:
    budget = CreditBudget("none", max_credits=1)
    assert budget.reserve(0, 250) and budget.reserve(1, 250)
    assert budget.committed() == 0


# -- a run against the sandbox ---------------------------------------------------------------------------


@contextmanager
def open_run(
    sandbox: SandboxServer,
    tmp_path: Path,
    contacts: int,
    *,
    chunk_size: int = 250,
    on_progress: Callable[[Progress], None] | None = None,
    left_in_flight: int = 0,
    **options: Any,
) -> Iterator[tuple[RunContext, Plan]]:
    """A run with `contacts` staged and planned (what the flow does before submitting), closed after.

    The first `left_in_flight` contacts were accepted by the sandbox for an earlier run that died
    before their results came back."""
    client = CleanlistClient(sandbox.api_key, base_url=sandbox.base_url, rate_limit="1000/1")
    store = EnrichmentStore(f"sqlite:///{tmp_path}/store.db")
    workspace = RunWorkspace(tmp_path)
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    run = RunContext(
        run_id,
        EnrichOptions(source="x.csv", output="y.csv", **{"initial_poll_seconds": 0.1, **options}),
        client=client,
        store=store,
        workspace=workspace,
        retry=RetryPolicy(initial_delay=0.01),
        on_progress=on_progress,
    )
    try:
        store.start_run(run_id, {})
        payloads = people(contacts, tag="rc")
        keys = [contact_key(p) for p in payloads]
        frame = pd.DataFrame({"n": range(contacts), ROW: range(contacts), KEY: keys, REJECT: None})
        frame[REJECT_CODE] = None
        workspace.add_part(frame, [StagedContact(k, p) for k, p in zip(keys, payloads, strict=True)])
        if left_in_flight:
            accepted = client.enrich_bulk(payloads[:left_in_flight])
            store.start_run("earlier", {})
            store.record_accepted(
                "earlier",
                workflow_id=accepted.workflow_id,
                chunk_key="0",
                enrichment_type="partial",
                keys=keys[:left_in_flight],
                task_ids=accepted.task_ids,
                worst_case_credits=worst_case_credits("partial", left_in_flight),
            )
            store.finish_run("earlier", "failed", {})
        plan = plan_run(workspace, store, run.options.enrichment_type, run.options.fresh_after, chunk_size)
        run.counters.chunks_total = len(plan.chunks)
        yield run, plan
    finally:
        run.stop_poller(drain=False)
        workspace.cleanup()
        client.close()
        store.close()


def test_a_chunk_is_submitted_polled_and_stored(make_sandbox: StartSandbox, tmp_path: Path) -> None:
    sandbox = make_sandbox(rate_limit=None, find_rate=0.5)
    with open_run(sandbox, tmp_path, 12) as (run, plan):
        assert plan.chunks == [0]
        keys = run.workspace.chunk_keys(0)
        run.start_poller()
        outcome = submit_chunk(run, 0)
        run.stop_poller(drain=True)

        assert outcome.status is ChunkStatus.ACCEPTED
        assert (outcome.accepted, outcome.quarantined) == (12, 0)
        charged = sandbox.counters()
        counters = run.counters
        assert (counters.submitted, counters.workflows_accepted, counters.workflows_completed) == (12, 1, 1)
        assert (counters.chunk_attempts, counters.retries, counters.chunks_failed) == (1, 0, 0)
        assert charged["bulk_accepted"] == 1 and charged["contacts_accepted"] == 12
        assert counters.credits_spent == pytest.approx(charged["credits_charged"])
        # partial: one credit per email found, nothing else is charged.
        assert 0 < counters.emails_found == charged["credits_charged"] < 12
        assert counters.phones_found == 0
        assert run.budget.spent == pytest.approx(counters.credits_spent)
        assert run.budget.committed() == pytest.approx(counters.credits_spent)
        assert run.fatal is None and run.gate.open

        stored = run.store.results(keys, "partial")
        assert set(stored) == set(keys)
        assert {r.workflow_id for r in stored.values()} == {outcome.workflow_id}
        assert sum(1 for r in stored.values() if r.primary_email) == counters.emails_found
        assert {r.status for r in stored.values()} <= {"completed", "failed"}
        workflow = run.store.workflow(outcome.workflow_id or "")
        assert workflow is not None
        assert workflow.state == "completed"
        assert workflow.contact_keys == tuple(keys)
        assert workflow.credits_charged == pytest.approx(counters.credits_spent)
        assert run.store.open_workflows() == []
        assert run.workspace.counts() == {ContactState.RESULTED: 12}  # answered in this run
        # Submitting the chunk again sends nothing: its contacts are no longer planned.
        assert submit_chunk(run, 0).status is ChunkStatus.NOTHING_TO_SEND
        assert sandbox.counters()["requests"]["enrich-bulk"] == {"200": 1}


def test_progress_is_reported_as_chunks_settle(make_sandbox: StartSandbox, tmp_path: Path) -> None:
    sandbox = make_sandbox(rate_limit=None)
    snapshots: list[Progress] = []
    with open_run(sandbox, tmp_path, 7, chunk_size=3, on_progress=snapshots.append) as (run, plan):
        assert plan.chunks == [0, 1, 2]
        run.start_poller()
        outcomes = [submit_chunk(run, n) for n in plan.chunks]
        run.stop_poller(drain=True)

    assert [o.accepted for o in outcomes] == [3, 3, 1]
    assert len({o.workflow_id for o in outcomes}) == 3
    assert len(snapshots) == 3
    assert all(s.chunks_total == 3 for s in snapshots)
    assert [s.chunks_settled for s in snapshots] == [1, 2, 3]
    assert snapshots[-1] == Progress(chunks_total=3, chunks_settled=3, contacts_sent=7)
    assert run.counters.workflows_completed == 3
    assert run.counters.credits_spent == pytest.approx(sandbox.counters()["credits_charged"])


def test_a_failed_chunk_counts_as_settled_and_marks_its_contacts(
    make_sandbox: StartSandbox, tmp_path: Path
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    snapshots: list[Progress] = []
    with open_run(sandbox, tmp_path, 4, chunk_size=2, on_progress=snapshots.append) as (run, _):
        run.chunk_failed(1, "chunk 00001 failed: 400")
        keys = run.workspace.chunk_keys(1)
        assert run.workspace.states(keys) == {
            k: (ContactState.ERROR, "chunk 00001 failed: 400") for k in keys
        }
        assert run.counters.chunks_failed == 1
        assert snapshots == [Progress(chunks_total=2, chunks_settled=1, contacts_sent=0)]
        # Their claims are gone: another run may take them at once.
        run.store.start_run("other", {})
        assert run.store.claim("other", keys, "partial", None).claimed == keys


def test_a_revoked_key_closes_the_gate_with_the_401(make_sandbox: StartSandbox, tmp_path: Path) -> None:
    sandbox = make_sandbox(rate_limit=None)
    with open_run(sandbox, tmp_path, 4, chunk_size=2) as (run, _):
        sandbox.revoke_key()
        run.start_poller()
        with pytest.raises(AuthenticationError) as raised:
            submit_chunk(run, 0)

        assert raised.value.status_code == 401
        assert not run.gate.open
        assert run.gate.fatal is raised.value
        assert run.fatal is raised.value
        # Nothing more is sent: the next chunk is deferred without a request.
        assert submit_chunk(run, 1).status is ChunkStatus.DEFERRED
        assert sandbox.counters()["requests"]["enrich-bulk"] == {"401": 1}
        assert run.counters.submitted == 0
        assert run.workspace.counts() == {ContactState.PLANNED: 4}
        # The claims of the refused chunk were released for a later run.
        run.store.start_run("later", {})
        keys = run.workspace.chunk_keys(0)
        assert run.store.claim("later", keys, "partial", None).claimed == keys
        run.stop_poller(drain=True)


def test_a_key_revoked_mid_run_leaves_the_accepted_workflow_for_a_rerun(
    make_sandbox: StartSandbox, tmp_path: Path
) -> None:
    sandbox = make_sandbox(rate_limit=None, revoke_after_batches=1, latency=0.3)
    # The first status poll goes out 0.3 s after acceptance, well after the second chunk is sent.
    with open_run(sandbox, tmp_path, 4, chunk_size=2, initial_poll_seconds=1.2) as (run, _):
        run.start_poller()
        first = submit_chunk(run, 0)  # accepted, then the key is revoked
        assert first.status is ChunkStatus.ACCEPTED
        with pytest.raises(AuthenticationError) as raised:
            submit_chunk(run, 1)
        run.stop_poller(drain=True)  # returns although the workflow never settled: its poll got a 401

        assert run.fatal is raised.value
        assert run.poller is not None and isinstance(run.poller.fatal, AuthenticationError)
        assert sandbox.counters()["requests"]["enrich-status"] == {"401": 1}
        assert (run.counters.submitted, run.counters.workflows_completed) == (2, 0)
        assert run.counters.credits_spent == 0
        # The money of the accepted chunk is spent: the store keeps its workflow open for a rerun.
        assert [w.workflow_id for w in run.store.open_workflows()] == [first.workflow_id]
        assert run.workspace.count(ContactState.ACCEPTED) == 2
        assert run.workspace.count(ContactState.PLANNED) == 2
        assert run.budget.unsettled


def test_a_refused_contact_is_quarantined_and_the_rest_resubmitted(
    make_sandbox: StartSandbox, tmp_path: Path
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    with open_run(sandbox, tmp_path, 5) as (run, _):
        refused = run.workspace.chunk(0)[2]
        sandbox.refuse_contacts_containing(refused.payload["first_name"])
        run.start_poller()
        outcome = submit_chunk(run, 0)
        run.stop_poller(drain=True)

        assert (outcome.status, outcome.accepted, outcome.quarantined) == (ChunkStatus.ACCEPTED, 4, 1)
        state, note = run.workspace.states([refused.key])[refused.key]
        assert state is ContactState.QUARANTINED
        assert note is not None and note.startswith("refused by the API: ")
        assert run.counters.quarantined == 1
        assert run.counters.chunk_attempts == 2
        assert sandbox.counters()["requests"]["enrich-bulk"] == {"422": 1, "200": 1}
        assert refused.key not in run.store.results([refused.key], "partial")
        assert run.counters.workflows_completed == 1


def test_out_of_credits_pauses_the_gate_and_defers_the_chunk(
    make_sandbox: StartSandbox, tmp_path: Path
) -> None:
    sandbox = make_sandbox(rate_limit=None, credits=2.0)
    with open_run(sandbox, tmp_path, 3) as (run, _):
        run.start_poller()
        outcome = submit_chunk(run, 0)

        assert outcome.status is ChunkStatus.DEFERRED
        assert run.gate.credits_exhausted and not run.gate.open and run.fatal is None
        assert run.workspace.counts() == {ContactState.PLANNED: 3}  # waits for the pause to end
        sandbox.add_credits(10)
        run.gate.credits_returned()
        assert submit_chunk(run, 0).status is ChunkStatus.ACCEPTED
        run.stop_poller(drain=True)
        assert run.counters.workflows_completed == 1
        assert sandbox.counters()["requests"]["enrich-bulk"] == {"402": 1, "200": 1}


def test_a_workflow_an_earlier_run_left_in_flight_is_polled_not_resubmitted(
    make_sandbox: StartSandbox, tmp_path: Path
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    with open_run(sandbox, tmp_path, 5, left_in_flight=2) as (run, plan):
        assert (plan.in_flight, plan.to_submit, len(plan.resume_workflows)) == (2, 3, 1)
        run.start_poller()
        assert run.resume(plan.resume_workflows[0])
        assert not run.resume("public_bulk_unknown")
        outcome = submit_chunk(run, 0)
        run.stop_poller(drain=True)

        assert outcome.accepted == 3
        counters = sandbox.counters()
        assert (counters["bulk_accepted"], counters["contacts_accepted"]) == (2, 5)
        assert counters["contacts_accepted_more_than_once"] == 0
        assert run.counters.workflows_completed == 2
        assert run.counters.submitted == 3
        # Everything the sandbox charged, for both workflows, came back into this run's results.
        assert run.counters.credits_spent == pytest.approx(counters["credits_charged"])
        # The earlier run's contacts were answered in this run.
        keys = [key for keys in run.workspace.keys_in_state(ContactState.RESULTED) for key in keys]
        assert len(keys) == 5
        assert set(run.store.results(keys, "partial")) == set(keys)
        assert run.store.open_workflows() == []


def test_what_an_unresolved_workflow_owes_is_asked_through_the_one_lookup_that_retries(
    make_sandbox: StartSandbox, tmp_path: Path
) -> None:
    from cleanlist.sandbox import FaultSpec

    # The first task lookup is answered 503. Settling before a rerun plans goes through the same lookup
    # as a polled or delivered answer: retried by the run's policy, not a failed run (before issue 20 this
    # copy of the lookup let the 503 out of the planning step).
    sandbox = make_sandbox(rate_limit=None, latency=0.0, faults={"enrich-status": FaultSpec(sequence=(503,))})
    with open_run(sandbox, tmp_path, 3, left_in_flight=3) as (run, plan):
        [workflow_id] = plan.resume_workflows
        run.store.mark_workflow(workflow_id, "unresolved")
        owed = run.store.owed(workflow_id)
        assert len(owed) == 3

        answered, unknown = run.settle_unresolved({workflow_id: owed})

        assert (sorted(answered), unknown) == (sorted(owed), [])
        assert run.counters.task_lookups == 4  # three tasks, one of them asked twice
        assert sandbox.counters()["requests"]["enrich-status"] == {"503": 1, "200": 3}
        assert set(run.store.results(list(owed), "partial")) == set(owed)
        assert run.counters.credits_spent == pytest.approx(sandbox.counters()["credits_charged"])


def test_a_task_lookup_waits_out_429s_as_a_submit_does_and_gets_the_paid_answer(
    make_sandbox: StartSandbox, tmp_path: Path
) -> None:
    from cleanlist.sandbox import FaultSpec

    # Seven 429s with Retry-After in a row, more than `retries` (5): a 429 is "not now", allowed
    # `rate_limit_retries` (3) more times, as for a submit. Before, the lookup gave up after the sixth and
    # the paid answer stayed unread in a run that said "completed" (fault-schedule seed 9742251: a
    # client limit above the server's, lookups of tasks left out of a completed workflow).
    refusals = FaultSpec(sequence=(429,) * 7, retry_after="0.05")
    sandbox = make_sandbox(rate_limit=None, latency=0.0, faults={"enrich-status": refusals})
    with open_run(sandbox, tmp_path, 1, left_in_flight=1) as (run, plan):
        [workflow_id] = plan.resume_workflows
        owed = run.store.owed(workflow_id)

        answered, unknown = run.settle_unresolved({workflow_id: owed})

        assert (answered, unknown) == (list(owed), [])
        assert sandbox.counters()["requests"]["enrich-status"] == {"429": 7, "200": 1}


def test_progress_counts_only_the_chunks_of_this_run(make_sandbox: StartSandbox, tmp_path: Path) -> None:
    sandbox = make_sandbox(rate_limit=None, latency=0.2)
    snapshots: list[Progress] = []
    with open_run(sandbox, tmp_path, 4, left_in_flight=2, on_progress=snapshots.append) as (run, plan):
        run.start_poller()
        run.resume(plan.resume_workflows[0])
        submit_chunk(run, 0)
        run.stop_poller(drain=True)

    assert run.counters.chunks_total == 1
    assert all(s.chunks_settled <= s.chunks_total for s in snapshots), snapshots
    assert snapshots[-1].chunks_settled == 1


def test_progress_reaches_the_end_when_workflows_time_out(make_sandbox: StartSandbox, tmp_path: Path) -> None:
    sandbox = make_sandbox(rate_limit=None, latency=1.0)
    snapshots: list[Progress] = []
    options: dict[str, Any] = {"poll_timeout_seconds": 0.2}
    with open_run(sandbox, tmp_path, 4, chunk_size=2, on_progress=snapshots.append, **options) as (run, _):
        run.start_poller()
        submit_chunk(run, 0)
        submit_chunk(run, 1)
        run.stop_poller(drain=True)
        assert [w.state for w in run.store.open_workflows()] == ["timed_out", "timed_out"]

    assert snapshots and snapshots[-1].chunks_settled == snapshots[-1].chunks_total == 2
