"""The acceptance journal: a dead run's accepted workflows reach the store; its unanswered requests are
counted in doubt; a live run's lines are left alone."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from cleanlist.run.journal import AcceptanceJournal
from cleanlist.store import EnrichmentStore


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _as_dead(journal: AcceptanceJournal, pid: int) -> None:
    """Rewrite every line as written by `pid` (a process that no longer exists)."""
    lines = [json.loads(line) for line in journal.path.read_text().splitlines()]
    journal.path.write_text("".join(json.dumps({**entry, "pid": pid}) + "\n" for entry in lines))


def test_a_dead_runs_accepted_workflow_is_recorded_and_its_lost_answer_is_in_doubt(tmp_path: Path) -> None:
    store = EnrichmentStore(f"sqlite:///{tmp_path / 'store.db'}")
    journal = AcceptanceJournal(store_url="sqlite:///x", directory=tmp_path / "journal")
    answered = journal.intent("run-1", "0", ["k1", "k2"])
    journal.accepted(
        answered, run_id="run-1", workflow_id="wf-1", chunk_key="0", enrichment_type="partial",
        keys=["k1", "k2"], task_ids=["t1", "t2"],
    )  # fmt: skip
    journal.intent("run-1", "1", ["k3", "k4", "k5"])  # killed before its answer was read
    _as_dead(journal, _dead_pid())

    replay = journal.replay(store)

    assert (replay.recorded, replay.in_doubt, replay.in_doubt_contacts) == (1, 1, 3)
    record = store.workflow("wf-1")
    assert record is not None and record.contact_keys == ("k1", "k2") and record.task_ids == ("t1", "t2")
    assert store.owed("wf-1") == {"k1": "t1", "k2": "t2"}  # in flight: polled, never resubmitted
    assert journal.path.read_text() == ""  # settled
    assert journal.replay(store) == replay.__class__(0, 0, 0)
    store.close()


def test_a_live_runs_lines_are_kept_and_forget_drops_only_its_own(tmp_path: Path) -> None:
    store = EnrichmentStore(f"sqlite:///{tmp_path / 'store.db'}")
    journal = AcceptanceJournal(store_url="sqlite:///x", directory=tmp_path / "journal")
    store.start_run("mine", {})
    store.start_run("other", {})
    journal.intent("mine", "0", ["a"])
    journal.intent("other", "0", ["b"])
    assert journal.replay(store).in_doubt == 0  # both runs are alive in the store: nothing is in doubt
    journal.forget("mine")
    runs = [json.loads(line)["run"] for line in journal.path.read_text().splitlines()]
    assert runs == ["other"]
    store.close()


def test_the_journal_is_private_and_named_after_the_store(tmp_path: Path) -> None:
    one = AcceptanceJournal(store_url="sqlite:///a.db", directory=tmp_path / "journal")
    two = AcceptanceJournal(store_url="sqlite:///b.db", directory=tmp_path / "journal")
    one.intent("r", "0", ["k"])
    assert one.path != two.path
    assert stat.S_IMODE(os.stat(one.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "journal").st_mode) == 0o700


def test_a_line_cut_by_the_kill_is_skipped(tmp_path: Path) -> None:
    store = EnrichmentStore(f"sqlite:///{tmp_path / 'store.db'}")
    journal = AcceptanceJournal(store_url="sqlite:///x", directory=tmp_path / "journal")
    journal.intent("run-1", "0", ["k1"])
    _as_dead(journal, _dead_pid())
    with journal.path.open("a") as out:
        out.write('{"kind": "accepted", "request": "cut')
    assert journal.replay(store).in_doubt == 1
    store.close()


def test_an_accepted_request_costs_one_fsync_and_its_intent_survives_without_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20: the intent reaches the kernel (a kill cannot undo that), the accepted line is the one
    fsync of the chunk; a refusal read (answered) needs none."""
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    journal = AcceptanceJournal(store_url="sqlite:///x", directory=tmp_path / "journal")
    request = journal.intent("run-1", "0", ["k1"])
    assert synced == []
    # Read back through a new descriptor, as a rerun after a kill -9 would: the line is there.
    assert json.loads(journal.path.read_text().splitlines()[0])["request"] == request
    journal.accepted(
        request, run_id="run-1", workflow_id="wf-1", chunk_key="0", enrichment_type="partial",
        keys=["k1"], task_ids=["t1"],
    )  # fmt: skip
    assert len(synced) == 1
    journal.answered(journal.intent("run-1", "1", ["k2"]), run_id="run-1", status=429)
    assert len(synced) == 1


def test_an_intent_says_when_the_body_was_about_to_leave(tmp_path: Path) -> None:
    """The time lets an observer tell a request killed before its body left from one sent long before."""
    import time

    journal = AcceptanceJournal(store_url="sqlite:///x", directory=tmp_path / "journal")
    before = time.time()
    journal.intent("run-1", "0", ["k1"])
    (entry,) = [json.loads(line) for line in journal.path.read_text().splitlines()]
    assert entry["kind"] == "intent" and before - 0.01 <= entry["at"] <= time.time() + 0.01
