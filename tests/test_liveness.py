"""Claims belong to a run that is provably alive, not to a process id: a pid alive again (a restarted
container's PID 1, a recycled pid) does not keep a dead run's claims, another host's run keeps them only
while its heartbeat is within the lease, and the acceptance journal of a dead run is replayed."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from cleanlist.run.journal import AcceptanceJournal
from cleanlist.store import EnrichmentStore
from cleanlist.store.liveness import (
    LEASE_SECONDS,
    ProcessIdentity,
    RunHeartbeat,
    boot_id,
    process_start,
    run_is_alive,
)
from cleanlist.store.schema import runs

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=LEASE_SECONDS)
ME = ProcessIdentity.current()
FULL = "full"


def alive(owner: ProcessIdentity, *, beat_age: float = 0.0, status: str = "running") -> bool:
    return run_is_alive(
        status=status,
        heartbeat_at=NOW - timedelta(seconds=beat_age),
        owner=owner,
        now=NOW,
        lease=LEASE,
        judge=ME,
    )


def test_this_machine_reads_its_boot_id_and_process_start_times() -> None:
    assert boot_id() is not None and ME.started is not None
    assert process_start(os.getpid()) == ME.started
    assert process_start(2**22 + 12345) is None  # above pid_max: no such process


def test_a_live_process_with_its_own_start_time_and_a_fresh_heartbeat_is_alive() -> None:
    assert alive(ME)
    assert alive(ME, beat_age=LEASE_SECONDS - 1)


def test_a_reused_pid_with_another_start_time_is_dead_at_once() -> None:
    assert ME.started is not None
    reused = ProcessIdentity(ME.host, ME.boot_id, ME.pid, ME.started - 1)
    assert not alive(reused, beat_age=0.0)


def test_a_pid_one_of_another_namespace_is_not_our_pid_one() -> None:
    # A run that was PID 1 in a container that restarted: our PID 1 (or none) started at another time.
    earlier_pid_one = ProcessIdentity(ME.host, ME.boot_id, 1, 12345678)
    assert not alive(earlier_pid_one)


def test_a_run_of_an_earlier_boot_of_this_machine_is_dead() -> None:
    assert not alive(ProcessIdentity(ME.host, "another-boot", ME.pid, ME.started))


def test_another_hosts_run_is_alive_while_its_heartbeat_is_within_the_lease() -> None:
    elsewhere = ProcessIdentity("another-host", "its-boot", 1, 42)
    assert alive(elsewhere, beat_age=1.0)
    assert not alive(elsewhere, beat_age=LEASE_SECONDS + 1)


def test_a_finished_run_is_dead_whatever_its_process() -> None:
    assert not alive(ME, status="completed")
    assert not alive(ME, status="failed")


def test_a_run_recorded_before_process_start_times_is_judged_by_its_pid() -> None:
    assert alive(ProcessIdentity(ME.host, None, ME.pid, None))
    assert not alive(ProcessIdentity(ME.host, None, 2**22 + 12345, None))


def test_the_heartbeat_thread_beats_until_stopped() -> None:
    beats: list[float] = []
    heartbeat = RunHeartbeat(lambda: beats.append(time.monotonic()), interval=0.05).start()
    deadline = time.monotonic() + 10
    while len(beats) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    heartbeat.stop()
    stopped_at = len(beats)
    time.sleep(0.15)
    assert stopped_at >= 3 and len(beats) == stopped_at


# Through the store (SQLite and PostgreSQL): the runs row says which process runs a run.


@pytest.fixture
def store(store_url: str) -> Iterator[EnrichmentStore]:
    with EnrichmentStore(store_url) as opened:
        yield opened


def keys(n: int) -> list[str]:
    return [f"li:person-{i}" for i in range(n)]


def rewrite_run(store_url: str, run_id: str, **values: object) -> None:
    """Make a run's row say what a dead (or remote) run's row says."""
    engine = sa.create_engine(store_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        conn.execute(sa.update(runs).where(runs.c.run_id == run_id).values(**values))
    engine.dispose()


def test_claims_of_a_dead_run_whose_pid_is_alive_again_are_taken_over_at_once(
    store_url: str, store: EnrichmentStore
) -> None:
    store.start_run("crashed", {})
    store.claim("crashed", keys(3), FULL, None)
    # The crashed run had this very pid (a restarted container is PID 1 again), but started earlier.
    assert ME.started is not None
    rewrite_run(store_url, "crashed", proc_start=ME.started - 100)
    store.start_run("rerun", {})
    outcome = store.claim("rerun", keys(3), FULL, None)
    assert (outcome.claimed, outcome.held) == (keys(3), [])


def test_claims_of_a_run_on_another_host_are_held_while_it_beats_and_taken_after_its_lease(
    store_url: str, store: EnrichmentStore
) -> None:
    store.start_run("remote", {})
    store.claim("remote", keys(2), FULL, None)
    rewrite_run(store_url, "remote", host="another-host", boot_id="its-boot", pid=1, proc_start=42)
    store.start_run("local", {})
    assert store.claim("local", keys(2), FULL, None).held == keys(2)
    assert store.alive_runs(["remote", "local", "never-seen"]) == {"remote", "local"}
    rewrite_run(store_url, "remote", heartbeat_at=datetime.now(UTC) - timedelta(seconds=LEASE_SECONDS + 1))
    assert store.claim("local", keys(2), FULL, None).claimed == keys(2)
    assert store.alive_runs(["remote", "local"]) == {"local"}


def test_a_run_keeping_alive_keeps_its_claims_past_the_lease(store_url: str) -> None:
    with EnrichmentStore(store_url, lease_seconds=0.5) as store:
        store.start_run("lively", {})
        store.claim("lively", keys(1), FULL, None)
        heartbeat = store.keep_alive("lively", interval=0.05)
        try:
            time.sleep(0.8)
            store.start_run("next", {})
            assert store.claim("next", keys(1), FULL, None).held == keys(1)
        finally:
            heartbeat.stop()
        time.sleep(0.8)
        assert store.claim("next", keys(1), FULL, None).claimed == keys(1)


def test_the_journal_of_a_dead_run_whose_pid_is_alive_again_is_replayed(
    tmp_path: Path, store_url: str, store: EnrichmentStore
) -> None:
    store.start_run("crashed", {})
    assert ME.started is not None
    rewrite_run(store_url, "crashed", proc_start=ME.started - 100)
    journal = AcceptanceJournal(store_url=store_url, directory=tmp_path / "journal")
    lines = [
        {"kind": "intent", "request": "q1", "run": "crashed", "pid": ME.pid, "host": socket.gethostname(),
         "chunk": "0", "keys": ["li:a", "li:b"]},
        {"kind": "accepted", "request": "q1", "run": "crashed", "pid": ME.pid, "host": socket.gethostname(),
         "workflow": "wf-1", "chunk": "0", "type": FULL, "keys": ["li:a", "li:b"],
         "task_ids": ["t-a", "t-b"]},
        {"kind": "intent", "request": "q2", "run": "crashed", "pid": ME.pid, "host": socket.gethostname(),
         "chunk": "1", "keys": ["li:c"]},
    ]  # fmt: skip
    journal.path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    # A live run's lines (this process, its own start time) are left alone.
    store.start_run("live", {})
    journal.path.open("a").write(
        json.dumps({"kind": "intent", "request": "q3", "run": "live", "pid": ME.pid,
                    "host": socket.gethostname(), "chunk": "0", "keys": ["li:d"]}) + "\n"
    )  # fmt: skip

    replay = journal.replay(store)

    assert (replay.recorded, replay.in_doubt, replay.in_doubt_contacts) == (1, 1, 1)
    assert store.peek(["li:a", "li:b"], FULL, None).in_flight == {
        "li:a": ("wf-1", "t-a"),
        "li:b": ("wf-1", "t-b"),
    }
    assert [json.loads(line)["run"] for line in journal.path.read_text().splitlines()] == ["live"]
