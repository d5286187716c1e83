"""The acceptance journal: what the API accepted is on disk the moment its answer is read.

The store records an accepted workflow in a transaction that may wait for other writers (SQLite's single
writer, PostgreSQL across the network); a process killed in that wait loses a workflow the API already
charged, and the rerun pays for its contacts again. So before the store, every bulk request is written
to a small local append-only file: an *intent* line once the request's rate slot is granted, right
before its body goes on the wire (a request still waiting for its slot or a Retry-After hold was never
sent, so it has no line), an *accepted* line (workflow id, contact keys, task ids) right after a 2xx
answer is read, and an *answered* line after any other answer that was read (a 429, a 4xx, a 5xx) or
when the request provably never left (the connection could not be made) — one `os.write` on an
`O_APPEND` descriptor, no lock and no queue in between.

What must be durable, and when (one fsync per accepted chunk, issue 20):
- *Before the body is on the wire*, the intent must be out of this process: `os.write` returns once the
  kernel has the line, and a kill -9 (or any death of the process) cannot take it back — the kernel
  writes its page cache whatever becomes of the process. That is all a kill needs. The intent never
  prevents a payment (its only use is to report a request *in doubt*), so it is not fsync'd: only a
  machine crash in the moment between the write and the next fsync of this file could lose it, and then
  a rerun understates doubt about one request — it still never resubmits an *accepted* contact.
- *After a 2xx answer is read*, its acceptance is money: the accepted line is written and fsync'd (one
  fsync, which also makes every earlier line of the file durable, this request's intent included) before
  the store hears of it. The store's ledger commit that follows therefore needs no fsync of its own
  (`record_accepted(durable=False)`: SQLite WAL `synchronous=NORMAL`, which survives a killed process;
  after a power cut the journal replays what the store lost). The run's last store commit
  (`finish_run`) is durable, and only after it does `forget` drop the run's lines.
- *Answered* lines (a refusal read) only settle an intent; one lost to a machine crash overstates doubt,
  never understates it, so they are not fsync'd either.

The next run on this machine replays it before planning (`replay`): accepted lines the store does not
have are recorded (their contacts are then polled, never resubmitted), and intents of a dead run (judged
as claims are, `cleanlist/store/liveness.py`) with neither an accepted nor an answered line are *in
doubt* — the body may have reached the API and no answer was read; nobody can tell — and are counted as
ambiguous submissions in that run's summary. Journals written before *answered* lines existed replay as
before (their intents were written before the rate-limit wait, so they may overstate the doubt; they
never understate it). A run forgets its own lines when it ends.
The journal is per machine and per store (`~/.cleanlist/journal/<hash of the store URL>.jsonl`, 0600):
a rerun on another machine does not see it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cleanlist import jsontext
from cleanlist.models import worst_case_credits
from cleanlist.store import EnrichmentStore
from cleanlist.store.database import make_private_dirs
from cleanlist.store.migrations import upgraded_key

JOURNAL_DIR = Path("~/.cleanlist/journal")
# Lines that settle an intent: the API accepted it, or its answer (or its never leaving) was read.
SETTLING_KINDS = frozenset({"accepted", "answered"})


@dataclass(frozen=True)
class Replay:
    """What a replay found: workflows recorded now, and requests in doubt (with their contacts)."""

    recorded: int
    in_doubt: int
    in_doubt_contacts: int


class AcceptanceJournal:
    """Append-only lines of bulk requests and their (fsync'd) acceptances, for one store on this machine."""

    def __init__(self, store_url: str, directory: Path | None = None) -> None:
        root = (directory or JOURNAL_DIR).expanduser()
        make_private_dirs(root)
        digest = hashlib.sha256(store_url.encode()).hexdigest()[:16]
        self.path = root / f"{digest}.jsonl"
        self.lock_path = root / f"{digest}.lock"
        self._host = socket.gethostname()

    def __repr__(self) -> str:
        return f"AcceptanceJournal({self.path})"

    @contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        # Appends share the lock (O_APPEND writes of one line do not interleave); a rewrite replaces the
        # file and takes it alone, so no append can land in the file it is about to drop.
        fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _append(self, entry: dict[str, Any], *, sync: bool = False) -> None:
        """One line, in the kernel when this returns (survives a kill); on disk too if `sync`."""
        line = jsontext.dumps(entry).encode() + b"\n"
        with self._locked(fcntl.LOCK_SH):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def intent(self, run_id: str, chunk_key: str, keys: Sequence[str]) -> str:
        """Before a bulk request: returns the request's id for `accepted`."""
        request = uuid.uuid4().hex
        self._append(
            {
                "kind": "intent",
                "request": request,
                "run": run_id,
                "pid": os.getpid(),
                "host": self._host,
                "chunk": chunk_key,
                "keys": list(keys),
                # When the body was about to go on the wire: a process killed within moments of it may
                # have died before the bytes left (the doubt it leaves is then the kill's, not a bug's).
                "at": round(time.time(), 3),
            }
        )
        return request

    def answered(self, request: str, *, run_id: str, status: int | None) -> None:
        """An answer other than an acceptance was read (`status`), or None: the request never left (the
        connection could not be made). Either way the API did not accept it: the request is settled."""
        self._append(
            {
                "kind": "answered",
                "request": request,
                "run": run_id,
                "pid": os.getpid(),
                "host": self._host,
                "status": status,
            }
        )

    def accepted(
        self,
        request: str,
        *,
        run_id: str,
        workflow_id: str,
        chunk_key: str,
        enrichment_type: str,
        keys: Sequence[str],
        task_ids: Sequence[str],
    ) -> None:
        """Right after the API's answer was read."""
        self._append(
            {
                "kind": "accepted",
                "request": request,
                "run": run_id,
                "pid": os.getpid(),
                "host": self._host,
                "workflow": workflow_id,
                "chunk": chunk_key,
                "type": enrichment_type,
                "keys": list(keys),
                "task_ids": list(task_ids),
            },
            sync=True,  # the one fsync of an accepted chunk (see the module's docstring)
        )

    def _entries(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(line, entry) one at a time: a big run's journal holds every key it sent, so it is streamed."""
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as lines:
            for line in lines:
                try:
                    yield line, jsontext.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the kill itself: its request is in doubt, its intent says so

    def _keep_only(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrite the journal with the lines whose entry `keep` says to keep (streamed)."""
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for line, entry in self._entries():
                if keep(entry):
                    out.write(line if line.endswith("\n") else line + "\n")
        os.replace(tmp, self.path)

    def _dead_runs(self, store: EnrichmentStore) -> Callable[[dict[str, Any]], bool]:
        """Whether an entry's run is dead, judged as claims are (`EnrichmentStore.alive_runs`: its
        heartbeat, and on this machine its exact process, pid and start time), never by a pid alone."""
        runs = {str(entry.get("run")) for _, entry in self._entries()}
        alive = store.alive_runs(runs) if runs else set()
        return lambda entry: str(entry.get("run")) not in alive

    def replay(self, store: EnrichmentStore) -> Replay:
        """Record what dead runs' answers said; count their unanswered requests as in doubt."""
        with self._locked(fcntl.LOCK_EX):
            dead = self._dead_runs(store)
            answered = {e["request"] for _, e in self._entries() if e["kind"] in SETTLING_KINDS and dead(e)}
            recorded = in_doubt = in_doubt_contacts = 0
            for _, entry in self._entries():
                if not dead(entry):
                    continue
                if entry["kind"] == "intent" and entry["request"] not in answered:
                    in_doubt += 1
                    in_doubt_contacts += len(entry["keys"])
                if entry["kind"] != "accepted" or store.workflow(entry["workflow"]) is not None:
                    continue
                keys, task_ids = _current_keys(entry)
                store.record_accepted(
                    entry["run"],
                    workflow_id=entry["workflow"],
                    chunk_key=entry["chunk"],
                    enrichment_type=entry["type"],
                    keys=keys,
                    task_ids=task_ids,
                    worst_case_credits=worst_case_credits(entry["type"], len(entry["keys"])),
                )
                recorded += 1
            if answered or in_doubt:
                self._keep_only(lambda entry: not dead(entry))
        return Replay(recorded, in_doubt, in_doubt_contacts)

    def forget(self, run_id: str) -> None:
        """A run ended (whatever way, but alive): its lines are settled in the store."""
        with self._locked(fcntl.LOCK_EX):
            if any(entry.get("run") == run_id for _, entry in self._entries()):
                self._keep_only(lambda entry: entry.get("run") != run_id)


def _current_keys(entry: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The entry's keys as this version builds them (a journal written before the store's key migration
    holds full-host keys), each with its task id; keys that became one keep the first's task id."""
    merged: dict[str, str] = {}
    for key, task_id in zip(entry["keys"], _task_ids(entry), strict=True):
        merged.setdefault(upgraded_key(key), task_id)
    return list(merged), list(merged.values())


def _task_ids(entry: dict[str, Any]) -> list[str]:
    ids = list(entry["task_ids"])
    return ids if len(ids) == len(entry["keys"]) else [""] * len(entry["keys"])
