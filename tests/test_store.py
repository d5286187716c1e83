"""The enrichment store on SQLite and PostgreSQL: claims, the ledger, results, runs and races."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from cleanlist.errors import InputError
from cleanlist.store import ClaimOutcome, ContactResult, EnrichmentStore, StoredResult, WorkflowRecord
from cleanlist.store.liveness import ZOMBIE_LEASES
from cleanlist.store.schema import SCHEMA_VERSION

FULL = "full"
LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)

# A worker in its own process: claims keys, reports how many, then lives until its stdin closes.
CLAIMING_WORKER = """
import sys
from cleanlist.store import EnrichmentStore
url, run_id, keys = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
store = EnrichmentStore(url)
store.start_run(run_id, {})
print(len(store.claim(run_id, keys, "full", None).claimed), flush=True)
sys.stdin.read()
"""

# A backfill shard in its own process: waits for "go", claims 1,000 keys in its own chunking, prints them.
RACING_WORKER = """
import json, random, sys
from cleanlist.store import EnrichmentStore
url, run_id, seed, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
keys = [f"li:person-{i:04d}" for i in range(1000)]
random.Random(seed).shuffle(keys)
store = EnrichmentStore(url)
store.start_run(run_id, {})
print("ready", flush=True)
sys.stdin.readline()
claimed = []
for start in range(0, len(keys), size):
    claimed += store.claim(run_id, keys[start:start + size], "full", None).claimed
print(json.dumps(claimed), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def store(store_url: str) -> Iterator[EnrichmentStore]:
    with EnrichmentStore(store_url) as opened:
        yield opened


def raw_engine(url: str) -> sa.Engine:
    """An engine beside the store's, to inspect or tamper with what it wrote."""
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def keys(count: int, prefix: str = "li:person") -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(count)]


def accept(
    store: EnrichmentStore,
    run_id: str,
    workflow_id: str,
    contact_keys: list[str],
    *,
    enrichment_type: str = FULL,
    worst_case_credits: float | None = None,
    submitted_at: datetime | None = None,
) -> list[str]:
    """Record `contact_keys` as accepted in one workflow; returns its task ids."""
    task_ids = [f"task-{workflow_id}-{key}" for key in contact_keys]
    store.record_accepted(
        run_id,
        workflow_id=workflow_id,
        chunk_key=f"chunk-{workflow_id}",
        enrichment_type=enrichment_type,
        keys=contact_keys,
        task_ids=task_ids,
        worst_case_credits=2.0 * len(contact_keys) if worst_case_credits is None else worst_case_credits,
        submitted_at=submitted_at,
    )
    return task_ids


def found(
    workflow_id: str, contact_keys: list[str], email_domain: str = "acme.example"
) -> list[ContactResult]:
    return [
        ContactResult(
            contact_key=key,
            task_id=f"task-{workflow_id}-{key}",
            status="completed",
            primary_email=f"{key.rsplit(':', 1)[-1]}@{email_domain}",
            primary_email_status="reliable",
            other_emails=["other@" + email_domain],
            phones=("+15550100000",),
            raw={"status": "completed", "workflow": workflow_id},
        )
        for key in contact_keys
    ]


def enrich(
    store: EnrichmentStore,
    run_id: str,
    workflow_id: str,
    contact_keys: list[str],
    *,
    completed_at: datetime | None = None,
) -> None:
    """Claim, accept and complete `contact_keys` in one workflow."""
    assert store.claim(run_id, contact_keys, FULL, None).claimed == contact_keys
    accept(store, run_id, workflow_id, contact_keys)
    store.record_results(
        workflow_id,
        found(workflow_id, contact_keys),
        state="completed",
        credits_charged=float(len(contact_keys)),
        completed_at=completed_at,
    )


# Schema and opening


def test_first_open_creates_the_tables_and_records_the_schema_version(store_url: str) -> None:
    EnrichmentStore(store_url).close()
    engine = raw_engine(store_url)
    tables = set(sa.inspect(engine).get_table_names())
    with engine.connect() as conn:
        version = conn.execute(sa.text("SELECT version FROM cleanlist_schema_info")).scalar_one()
    engine.dispose()
    assert {"cleanlist_runs", "cleanlist_contacts", "cleanlist_workflows", "cleanlist_schema_info"} <= tables
    assert version == SCHEMA_VERSION
    # Reopening an existing store neither fails nor duplicates the version row.
    with EnrichmentStore(store_url) as again:
        again.start_run("r1", {})


def test_store_written_by_a_newer_schema_is_refused_in_one_line(store_url: str) -> None:
    EnrichmentStore(store_url).close()
    engine = raw_engine(store_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE cleanlist_schema_info SET version = {SCHEMA_VERSION + 1}"))
    engine.dispose()
    with pytest.raises(InputError, match=f"schema version {SCHEMA_VERSION + 1}") as caught:
        EnrichmentStore(store_url)
    assert "\n" not in str(caught.value)


def test_default_store_is_a_sqlite_file_in_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with EnrichmentStore() as store:
        assert store.url_display == f"sqlite:///{tmp_path}/.cleanlist/store.db"
    assert (tmp_path / ".cleanlist" / "store.db").is_file()


# The lifecycle of a contact


def test_claimed_contact_is_accepted_then_resulted_then_fresh(store: EnrichmentStore) -> None:
    store.start_run("r1", {"source": "crm.csv"}, flow_run_id="flow-1")
    batch = keys(3)
    assert store.claim("r1", batch, FULL, None) == ClaimOutcome(claimed=batch)

    tasks = accept(store, "r1", "wf-1", batch, worst_case_credits=6.0)
    ledger = store.workflow("wf-1")
    assert ledger is not None
    assert (ledger.state, ledger.run_id, ledger.contact_keys, ledger.task_ids) == (
        "accepted",
        "r1",
        tuple(batch),
        tuple(tasks),
    )
    assert store.claim("r1", batch, FULL, None).in_flight == {
        key: ("wf-1", task) for key, task in zip(batch, tasks, strict=True)
    }

    store.record_results("wf-1", found("wf-1", batch), state="completed", credits_charged=2.0)
    stored = store.results(batch, FULL)
    assert list(stored) == batch
    first = stored[batch[0]]
    assert (first.workflow_id, first.task_id, first.status, first.primary_email) == (
        "wf-1",
        tasks[0],
        "completed",
        "person-0000@acme.example",
    )
    assert (first.other_emails, first.phones, first.raw) == (
        ("other@acme.example",),
        ("+15550100000",),
        {"status": "completed", "workflow": "wf-1"},
    )
    # The writer's read leaves out the API's objects only.
    slim = store.results(batch, FULL, raw=False)
    assert slim == {key: dataclasses.replace(value, raw={}) for key, value in stored.items()}
    outcome = store.claim("r1", batch, FULL, fresh_after=datetime.now(UTC) - timedelta(days=30))
    assert outcome == ClaimOutcome(fresh=stored)
    completed = store.workflow("wf-1")
    assert completed is not None
    assert (completed.state, completed.credits_charged) == ("completed", 2.0)
    assert completed.completed_at is not None


def test_fresh_after_decides_between_reusing_and_refreshing(store: EnrichmentStore) -> None:
    store.start_run("r1", {})
    ten_days_ago = datetime.now(UTC) - timedelta(days=10)
    enrich(store, "r1", "wf-1", keys(2), completed_at=ten_days_ago)
    store.start_run("nightly", {})
    week = datetime.now(UTC) - timedelta(days=7)
    month = datetime.now(UTC) - timedelta(days=30)

    assert store.peek(keys(2), FULL, month).fresh.keys() == set(keys(2))
    assert store.claim("nightly", keys(3), FULL, month).claimed == [keys(3)[2]]
    assert store.claim("nightly", keys(2), FULL, week).claimed == keys(2)


def test_forced_refresh_keeps_the_old_result_until_the_new_one_arrives(store: EnrichmentStore) -> None:
    store.start_run("r1", {})
    batch = keys(2)
    enrich(store, "r1", "wf-old", batch)
    store.start_run("refresh", {})

    assert store.claim("refresh", batch, FULL, fresh_after=None).claimed == batch
    assert store.results(batch, FULL)[batch[0]].workflow_id == "wf-old"
    accept(store, "refresh", "wf-new", batch)
    assert store.results(batch, FULL)[batch[0]].primary_email == "person-0000@acme.example"
    # Another run happy with the old result may use it; one that is not must poll the new workflow.
    assert store.peek(batch, FULL, LONG_AGO).fresh.keys() == set(batch)
    assert store.peek(batch, FULL, None).in_flight[batch[0]][0] == "wf-new"

    store.record_results(
        "wf-new", found("wf-new", batch, "globex.example"), state="completed", credits_charged=2
    )
    renewed = store.results(batch, FULL)[batch[0]]
    assert (renewed.workflow_id, renewed.primary_email) == ("wf-new", "person-0000@globex.example")


def test_enrichment_types_are_claimed_separately(store: EnrichmentStore) -> None:
    store.start_run("r1", {})
    assert store.claim("r1", ["li:jane"], "full", None).claimed == ["li:jane"]
    store.start_run("r2", {})
    assert store.claim("r2", ["li:jane"], "phone_only", None).claimed == ["li:jane"]
    assert store.claim("r2", ["li:jane"], "full", None).held == ["li:jane"]


# Accepted contacts are never submitted twice


def test_accepted_contact_is_never_claimed_again_even_after_its_run_died(store: EnrichmentStore) -> None:
    store.start_run("crashed", {})
    batch = keys(2)
    store.claim("crashed", batch, FULL, None)
    tasks = accept(store, "crashed", "wf-1", batch)
    store.finish_run("crashed", "failed", {"accepted": 2})
    store.start_run("rerun", {})

    outcome = store.claim("rerun", [*batch, "li:new"], FULL, fresh_after=None)
    assert outcome.claimed == ["li:new"]
    assert outcome.in_flight == {key: ("wf-1", task) for key, task in zip(batch, tasks, strict=True)}
    assert store.peek(batch, FULL, None).in_flight.keys() == set(batch)
    assert store.claim("crashed", batch, FULL, None).in_flight.keys() == set(batch)


def test_replayed_acceptance_does_not_undo_results(store: EnrichmentStore) -> None:
    store.start_run("r1", {})
    batch = keys(2)
    enrich(store, "r1", "wf-1", batch)
    accept(store, "r1", "wf-1", batch)
    assert store.peek(batch, FULL, LONG_AGO).fresh.keys() == set(batch)
    workflow = store.workflow("wf-1")
    assert workflow is not None
    assert workflow.state == "completed"


def test_acceptance_is_recorded_even_when_the_claim_was_lost(store: EnrichmentStore) -> None:
    store.start_run("slow", {})
    store.start_run("other", {})
    store.claim("slow", ["li:a"], FULL, None)
    store.release("slow", ["li:a"], FULL)
    store.claim("other", ["li:a"], FULL, None)
    accept(store, "slow", "wf-1", ["li:a", "li:b"])
    assert store.peek(["li:a", "li:b"], FULL, None).in_flight.keys() == {"li:a", "li:b"}


def test_ledger_refuses_what_it_cannot_record_faithfully(store: EnrichmentStore) -> None:
    store.start_run("r1", {})
    with pytest.raises(ValueError, match="2 contact keys but 1 task ids"):
        store.record_accepted(
            "r1",
            workflow_id="wf-1",
            chunk_key="c",
            enrichment_type=FULL,
            keys=["li:a", "li:b"],
            task_ids=["t-a"],
            worst_case_credits=2.0,
        )
    with pytest.raises(ValueError, match="not in the ledger"):
        store.record_results("wf-unknown", [], state="completed", credits_charged=None)
    with pytest.raises(ValueError, match="unknown workflow state"):
        store.mark_workflow("wf-unknown", "finished")
    assert store.workflow("wf-1") is None


# Who may take a claim


def test_contacts_claimed_by_a_live_run_are_held(store: EnrichmentStore) -> None:
    store.start_run("shard-1", {})
    store.start_run("shard-2", {})
    assert store.claim("shard-1", keys(3), FULL, None).claimed == keys(3)
    outcome = store.claim("shard-2", keys(4), FULL, None)
    assert (outcome.claimed, outcome.held) == (keys(4)[3:], keys(3))
    assert store.peek(keys(4), FULL, None).held == keys(4)
    # A run asking again for its own claims gets them back.
    assert store.claim("shard-1", keys(3), FULL, None).claimed == keys(3)


def test_claims_of_a_finished_run_are_taken_over(store: EnrichmentStore) -> None:
    store.start_run("paused", {})
    store.claim("paused", keys(3), FULL, None)
    store.finish_run("paused", "budget_reached", {"claimed": 3})
    store.start_run("next", {})
    assert store.claim("next", keys(3), FULL, None).claimed == keys(3)
    assert store.claim("paused", keys(3), FULL, None).held == keys(3)


def test_claims_of_a_silent_run_are_taken_over_after_the_lease(
    store_url: str, store: EnrichmentStore
) -> None:
    # "stuck" still holds its liveness lock (this process lives): silent far past the lease, it is stuck.
    store.start_run("stuck", {})
    store.claim("stuck", keys(2), FULL, None)
    with EnrichmentStore(store_url, lease_seconds=0.2) as impatient:
        impatient.start_run("next", {})
        assert impatient.claim("next", keys(2), FULL, None).held == keys(2)
        time.sleep(0.2 * ZOMBIE_LEASES + 0.1)
        assert impatient.claim("next", keys(2), FULL, None).claimed == keys(2)
        # A run that keeps beating keeps its claims past the first lease.
        impatient.start_run("lively", {})
        impatient.claim("lively", ["li:x"], FULL, None)
        time.sleep(0.5)
        impatient.heartbeat("lively")
        time.sleep(0.5)
        assert impatient.claim("next", ["li:x"], FULL, None).held == ["li:x"]


def test_claims_of_a_killed_process_are_taken_over_at_once(store_url: str, store: EnrichmentStore) -> None:
    worker = subprocess.Popen(
        [sys.executable, "-c", CLAIMING_WORKER, store_url, "victim", ",".join(keys(3))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "3"
        store.start_run("rerun", {})
        assert store.claim("rerun", keys(3), FULL, None).held == keys(3)
        worker.kill()
        worker.wait(timeout=10)
    finally:
        worker.kill()
        worker.wait(timeout=10)
    victim = store.get_run("victim")
    assert victim is not None
    assert (victim.status, victim.pid) == ("running", worker.pid)
    assert store.claim("rerun", keys(3), FULL, None).claimed == keys(3)


def test_claiming_for_a_run_that_was_never_started_is_refused(store: EnrichmentStore) -> None:
    with pytest.raises(ValueError, match="start_run"):
        store.claim("ghost", keys(1), FULL, None)


# Giving contacts back


def test_release_gives_back_unsubmitted_claims_only(store: EnrichmentStore) -> None:
    store.start_run("r1", {})
    enrich(store, "r1", "wf-old", ["li:known"])
    store.claim("r1", ["li:known", "li:new", "li:sent"], FULL, None)
    accept(store, "r1", "wf-1", ["li:sent"])
    store.start_run("r2", {})
    store.release("r2", ["li:new"], FULL)
    assert store.peek(["li:new"], FULL, None).held == ["li:new"]

    store.release("r1", ["li:known", "li:new", "li:sent"], FULL)
    outcome = store.claim("r2", ["li:known", "li:new", "li:sent"], FULL, LONG_AGO)
    assert outcome.claimed == ["li:new"]
    assert outcome.fresh.keys() == {"li:known"}
    assert outcome.in_flight.keys() == {"li:sent"}


def test_workflow_not_found_frees_its_contacts_for_a_later_run(store: EnrichmentStore) -> None:
    store.start_run("r1", {})
    enrich(store, "r1", "wf-old", ["li:known"])
    store.claim("r1", ["li:known", "li:new"], FULL, None)
    accept(store, "r1", "wf-lost", ["li:known", "li:new"])
    store.mark_workflow("wf-lost", "not_found")

    lost = store.workflow("wf-lost")
    assert lost is not None
    assert (lost.state, lost.completed_at is not None) == ("not_found", True)
    assert store.open_workflows() == []
    assert store.results(["li:known", "li:new"], FULL).keys() == {"li:known"}
    store.start_run("r2", {})
    assert store.claim("r2", ["li:known", "li:new"], FULL, None).claimed == ["li:known", "li:new"]
    with pytest.raises(ValueError, match="stays closed"):
        store.mark_workflow("wf-lost", "accepted")


def test_timed_out_workflow_stays_in_flight_until_a_later_run_polls_it(store: EnrichmentStore) -> None:
    store.start_run("r1", {})
    batch = keys(2)
    store.claim("r1", batch, FULL, None)
    accept(store, "r1", "wf-slow", batch)
    store.mark_workflow("wf-slow", "timed_out")
    store.finish_run("r1", "failed", {})

    store.start_run("r2", {})
    assert store.claim("r2", batch, FULL, None).in_flight.keys() == set(batch)
    assert [workflow.workflow_id for workflow in store.open_workflows()] == ["wf-slow"]
    store.record_results("wf-slow", found("wf-slow", batch), state="completed", credits_charged=2)
    assert store.results(batch, FULL).keys() == set(batch)
    assert store.open_workflows() == []


def test_partial_results_leave_the_rest_in_flight_and_closing_frees_what_never_came(
    store: EnrichmentStore,
) -> None:
    store.start_run("r1", {})
    batch = keys(3)
    store.claim("r1", batch, FULL, None)
    accept(store, "r1", "wf-1", batch)
    store.record_results("wf-1", found("wf-1", batch[:1]), state="accepted", credits_charged=None)
    assert store.peek(batch, FULL, None).in_flight.keys() == set(batch[1:])
    assert [workflow.workflow_id for workflow in store.open_workflows()] == ["wf-1"]

    store.record_results("wf-1", found("wf-1", batch[1:2]), state="failed", credits_charged=1.0)
    outcome = store.peek(batch, FULL, LONG_AGO)
    assert (set(outcome.fresh), outcome.claimed) == (set(batch[:2]), [batch[2]])


# Resume and budget


def test_open_workflows_lists_every_runs_unfinished_workflows_oldest_first(store: EnrichmentStore) -> None:
    store.start_run("r1", {})
    store.start_run("r2", {})
    start = datetime.now(UTC) - timedelta(hours=1)
    store.claim("r1", ["li:a", "li:b", "li:c"], FULL, None)
    store.claim("r2", ["li:d"], "phone_only", None)
    accept(store, "r1", "wf-2", ["li:b"], submitted_at=start + timedelta(minutes=2))
    accept(store, "r1", "wf-1", ["li:a"], submitted_at=start + timedelta(minutes=1))
    accept(store, "r1", "wf-3", ["li:c"], submitted_at=start + timedelta(minutes=3))
    accept(store, "r2", "wf-4", ["li:d"], enrichment_type="phone_only", submitted_at=start)
    store.record_results("wf-3", found("wf-3", ["li:c"]), state="completed", credits_charged=1)

    every = store.open_workflows()
    assert [workflow.workflow_id for workflow in every] == ["wf-4", "wf-1", "wf-2"]
    assert [workflow.workflow_id for workflow in store.open_workflows(FULL)] == ["wf-1", "wf-2"]
    assert every[0] == WorkflowRecord(
        workflow_id="wf-4",
        run_id="r2",
        chunk_key="chunk-wf-4",
        enrichment_type="phone_only",
        state="accepted",
        contact_count=1,
        contact_keys=("li:d",),
        task_ids=("task-wf-4-li:d",),
        worst_case_credits=2.0,
        credits_charged=None,
        submitted_at=start,
        completed_at=None,
    )


def test_run_credits_reserve_the_worst_case_until_the_charge_is_known(store: EnrichmentStore) -> None:
    store.start_run("r1", {})
    store.start_run("r2", {})
    assert store.run_credits("r1") == (0.0, 0.0)
    store.claim("r1", keys(10), FULL, None)
    accept(store, "r1", "wf-open", keys(10)[0:2], worst_case_credits=10.0)
    accept(store, "r1", "wf-charged", keys(10)[2:4], worst_case_credits=8.0)
    accept(store, "r1", "wf-failed", keys(10)[4:6], worst_case_credits=5.0)
    accept(store, "r1", "wf-uncounted", keys(10)[6:8], worst_case_credits=4.0)
    store.claim("r2", ["li:other"], FULL, None)
    accept(store, "r2", "wf-other", ["li:other"], worst_case_credits=100.0)
    store.record_results("wf-charged", [], state="completed", credits_charged=3.0)
    store.mark_workflow("wf-failed", "failed")
    store.mark_workflow("wf-uncounted", "completed")
    assert store.run_credits("r1") == (14.0, 3.0)


# Runs


def test_runs_record_host_pid_status_and_counts(store: EnrichmentStore) -> None:
    store.start_run("r1", {"source": Path("crm.csv"), "limit": 5}, flow_run_id="flow-1")
    started = store.get_run("r1")
    assert started is not None
    assert (started.status, started.flow_run_id, started.params) == (
        "running",
        "flow-1",
        {"source": "crm.csv", "limit": 5},
    )
    assert started.finished_at is None and started.counts is None
    store.heartbeat("r1")
    store.finish_run("r1", "completed", {"enriched": 5})
    finished = store.get_run("r1")
    assert finished is not None
    assert (finished.status, finished.counts) == ("completed", {"enriched": 5})
    assert finished.finished_at is not None and finished.heartbeat_at > started.heartbeat_at
    assert store.get_run("nobody") is None
    with pytest.raises(ValueError, match="never started"):
        store.heartbeat("nobody")


def test_times_come_back_aware_in_utc(store: EnrichmentStore) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    submitted = datetime(2024, 3, 1, 9, 30, 15, 123456, tzinfo=india)
    store.start_run("r1", {})
    store.claim("r1", ["li:a"], FULL, None)
    accept(store, "r1", "wf-1", ["li:a"], submitted_at=submitted)
    store.record_results(
        "wf-1", found("wf-1", ["li:a"]), state="completed", credits_charged=1, completed_at=submitted
    )

    workflow = store.workflow("wf-1")
    result = store.results(["li:a"], FULL)["li:a"]
    run = store.get_run("r1")
    assert workflow is not None and run is not None
    for moment in (workflow.submitted_at, workflow.completed_at, result.enriched_at, run.started_at):
        assert moment is not None
        assert moment.utcoffset() == timedelta(0)
    assert workflow.submitted_at == submitted
    assert workflow.submitted_at.hour == 4
    assert result.enriched_at == submitted
    with pytest.raises(ValueError, match="timezone-aware"):
        store.claim("r1", ["li:a"], FULL, fresh_after=datetime(2024, 1, 1))


def test_batches_of_thousands_of_keys_are_handled_in_one_call(store: EnrichmentStore) -> None:
    store.start_run("r1", {})
    batch = keys(2600)
    assert store.claim("r1", batch, FULL, None).claimed == batch
    for start in range(0, len(batch), 250):
        accept(store, "r1", f"wf-{start}", batch[start : start + 250])
    assert len(store.peek(batch, FULL, None).in_flight) == len(batch)
    for start in range(0, len(batch), 250):
        store.record_results(
            f"wf-{start}",
            found(f"wf-{start}", batch[start : start + 250]),
            state="completed",
            credits_charged=1,
        )
    stored = store.results(batch, FULL)
    assert list(stored) == batch
    assert all(isinstance(result, StoredResult) for result in stored.values())


# Races


def stale_half(store: EnrichmentStore) -> None:
    """Enrich every other one of the 1,000 racing keys, so takeovers race as well as first claims."""
    store.start_run("last-month", {})
    stale = keys(1000)[::2]
    for start in range(0, len(stale), 250):
        enrich(store, "last-month", f"wf-old-{start}", stale[start : start + 250])
    store.finish_run("last-month", "completed", {})


def test_two_threads_never_claim_the_same_contact(store: EnrichmentStore) -> None:
    batch = keys(1000)
    stale_half(store)
    store.start_run("shard-1", {})
    store.start_run("shard-2", {})
    claimed: dict[str, list[str]] = {"shard-1": [], "shard-2": []}
    start_line = threading.Barrier(2)
    errors: list[BaseException] = []

    def shard(run_id: str, ordered: list[str], size: int) -> None:
        try:
            start_line.wait()
            for start in range(0, len(ordered), size):
                claimed[run_id] += store.claim(run_id, ordered[start : start + size], FULL, None).claimed
        except BaseException as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [
        threading.Thread(target=shard, args=("shard-1", batch, 50)),
        threading.Thread(target=shard, args=("shard-2", batch[::-1], 37)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert not set(claimed["shard-1"]) & set(claimed["shard-2"])
    assert sorted(claimed["shard-1"] + claimed["shard-2"]) == batch


def test_two_processes_never_claim_the_same_contact(store_url: str) -> None:
    with EnrichmentStore(store_url) as store:
        stale_half(store)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", RACING_WORKER, store_url, f"shard-{seed}", str(seed), str(size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed, size in ((1, 50), (2, 37))
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        # Both stay alive until both have answered, so neither may take the other's claims over.
        claimed = [json.loads(worker.stdout.readline()) for worker in workers if worker.stdout is not None]
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(timeout=10)
    assert not set(claimed[0]) & set(claimed[1])
    assert sorted(claimed[0] + claimed[1]) == keys(1000)


# Secrets


@pytest.mark.parametrize("store_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_password_never_shows_in_url_display_repr_or_errors(store_url: str) -> None:
    secret = "s3cr3t-Pa55"
    url = make_url(store_url).set(password=secret)
    # Trust authentication ignores the password, so the store opens.
    with EnrichmentStore(url.render_as_string(hide_password=False)) as store:
        assert secret not in store.url_display and "***" in store.url_display
        assert secret not in repr(store)
    unreachable = url.set(port=1).render_as_string(hide_password=False)
    with pytest.raises(InputError) as caught:
        EnrichmentStore(unreachable)
    assert secret not in str(caught.value) and "***" in str(caught.value)
    assert "\n" not in str(caught.value)
    for bad in (f"mysql://root:{secret}@db/x", f"not a url {secret}"):
        with pytest.raises(InputError) as caught:
            EnrichmentStore(bad)
        assert secret not in str(caught.value)
