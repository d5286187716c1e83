"""A run's scratch space on local disk: staged input rows (Parquet parts) and its unique contacts (SQLite).

Memory stays flat however large the source: rows live in Parquet parts of one read batch each, unique
contacts and their per-run state in a SQLite table. The workspace is deleted when the run ends; what must
survive a crash (accepted workflows, results) lives in the enrichment store, not here.

It holds personal data: the directory is created owner-only (mkdtemp: 0700). A run killed with -9 cannot
delete its workspace, so every new workspace first removes the `cleanlist-run-*` directories beside it
whose owner is gone. The owner is proved alive by an exclusive `flock` on the directory's `owner.lock`,
held for the workspace's life and released by the kernel when the process dies: a process id proves
nothing across PID namespaces (two containers sharing /tmp, a restarted container where the dead run's pid
is alive again), a lock does. Directories without a lock file (written by earlier versions) are judged by
their `pid` file as before (same user, same host, process no longer alive); one without either (being
created) is removed only once it is older than a day; a live run's never.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cleanlist import jsontext
from cleanlist.store.liveness import pid_is_alive
from cleanlist.vocab import ContactState

ROW = "__cleanlist_row"
KEY = "__cleanlist_key"
REJECT = "__cleanlist_reject"
REJECT_CODE = "__cleanlist_reject_code"
META_COLUMNS = (ROW, KEY, REJECT, REJECT_CODE)

WORKSPACE_PREFIX = "cleanlist-run-"
PID_FILE = "pid"
LOCK_FILE = "owner.lock"
# A workspace directory without a pid file is left alone this long (it may be being created).
UNOWNED_GRACE_SECONDS = 24 * 3600.0


def remove_stale_workspaces(directory: Path) -> list[Path]:
    """Delete the workspaces in `directory` left behind by runs that are gone; returns them."""
    removed: list[Path] = []
    try:
        candidates = list(directory.glob(f"{WORKSPACE_PREFIX}*"))
    except OSError:
        return removed
    for path in candidates:
        try:
            info = path.lstat()  # a symlink is not a workspace: never followed
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        if _owner_is_gone(path, info.st_mtime):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _owner_is_gone(path: Path, modified: float) -> bool:
    try:
        descriptor = os.open(path / LOCK_FILE, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return _pid_owner_is_gone(path, modified)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # the owner holds it: alive, whatever its pid says here
    except OSError:
        return False
    finally:
        os.close(descriptor)  # closing releases the lock if this process took it
    return True


def _pid_owner_is_gone(path: Path, modified: float) -> bool:
    """Workspaces of earlier versions, which wrote a pid file and no lock."""
    try:
        text = (path / PID_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError):
        return False
    pid_text, _, host = text.strip().partition(" ")
    if not pid_text.isdigit():  # no pid (yet): only an old directory is taken for abandoned
        return time.time() - modified > UNOWNED_GRACE_SECONDS
    if host != socket.gethostname():  # a temp directory shared between hosts: their pids mean nothing here
        return False
    return not pid_is_alive(int(pid_text))


@dataclass(frozen=True)
class StagedContact:
    key: str
    payload: dict[str, str]


_STATE_OF: Final = {state.value: state for state in ContactState}


class RunWorkspace:
    """Staged rows and unique contacts of one run."""

    def __init__(self, root: Path | None = None) -> None:
        remove_stale_workspaces(Path(root) if root is not None else Path(tempfile.gettempdir()))
        self.root = Path(tempfile.mkdtemp(prefix=WORKSPACE_PREFIX, dir=root))  # 0700
        # Locked under a temporary name and renamed: no sweeper ever sees the lock file unlocked.
        self._owner = os.open(self.root / f"{LOCK_FILE}.new", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._owner, fcntl.LOCK_EX)
        os.replace(self.root / f"{LOCK_FILE}.new", self.root / LOCK_FILE)
        (self.root / PID_FILE).write_text(f"{os.getpid()} {socket.gethostname()}\n", encoding="utf-8")
        self._db = sqlite3.connect(self.root / "contacts.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("PRAGMA temp_store=MEMORY")
        self._db.execute(
            "CREATE TABLE contacts (key TEXT PRIMARY KEY, seq INTEGER NOT NULL, payload TEXT NOT NULL,"
            f" state TEXT NOT NULL DEFAULT '{ContactState.NEW}', chunk_no INTEGER, note TEXT)"
        )
        self._db.execute("CREATE INDEX contacts_chunk ON contacts(chunk_no)")
        self._lock = threading.Lock()
        self._parts: list[Path] = []
        self._seq = 0
        self.columns: list[str] = []

    def __repr__(self) -> str:
        return f"RunWorkspace({self.root})"

    def cleanup(self) -> None:
        with self._lock:
            self._db.close()
        shutil.rmtree(self.root, ignore_errors=True)
        if self._owner >= 0:
            os.close(self._owner)
            self._owner = -1

    # -- staging -----------------------------------------------------------------------------------
    def add_part(self, frame: pd.DataFrame, contacts: Sequence[StagedContact]) -> None:
        """Store one batch of rows (input columns plus META_COLUMNS) and its contacts, first seen wins."""
        if not self.columns:
            self.columns = [c for c in frame.columns if c not in META_COLUMNS]
        path = self.root / f"part-{len(self._parts):06d}.parquet"
        table = pa.Table.from_pandas(frame, preserve_index=False)
        pq.write_table(table, path, compression="zstd")
        self._parts.append(path)
        rows = []
        for contact in contacts:
            rows.append((contact.key, self._seq, jsontext.dumps(contact.payload)))
            self._seq += 1
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO contacts(key, seq, payload) VALUES (?, ?, ?)", rows)
            self._db.execute("COMMIT")

    def parts(self) -> Iterator[pd.DataFrame]:
        for path in self._parts:
            yield pq.read_table(path).to_pandas()

    # -- contacts ----------------------------------------------------------------------------------
    def count(self, state: ContactState | None = None) -> int:
        with self._lock:
            if state is None:
                return int(self._db.execute("SELECT COUNT(*) FROM contacts").fetchone()[0])
            sql = "SELECT COUNT(*) FROM contacts WHERE state = ?"
            return int(self._db.execute(sql, (state,)).fetchone()[0])

    def counts(self) -> dict[ContactState, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM contacts GROUP BY state").fetchall()
        return {ContactState(state): int(n) for state, n in rows}

    def keys_in_state(self, state: ContactState, block: int = 5000) -> Iterator[list[str]]:
        """Keys in `state` in input order, `block` at a time (a snapshot taken up front)."""
        last = -1
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT seq, key FROM contacts WHERE state = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (state, last, block),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [key for _, key in rows]

    def set_state(self, keys: Sequence[str], state: ContactState, note: str | None = None) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE contacts SET state = ?, note = ? WHERE key = ?", [(state, note, k) for k in keys]
            )
            self._db.execute("COMMIT")

    def set_notes(self, notes: dict[str, str], state: ContactState) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE contacts SET state = ?, note = ? WHERE key = ?",
                [(state, note, k) for k, note in notes.items()],
            )
            self._db.execute("COMMIT")

    def plan_chunks(self, chunk_size: int) -> list[int]:
        """Group every NEW contact, in input order, into chunks; returns the chunk numbers."""
        assigned = 0
        for keys in self.keys_in_state(ContactState.NEW, block=chunk_size * 20):
            batch = [((assigned + i) // chunk_size, key) for i, key in enumerate(keys)]
            assigned += len(keys)
            self._assign(batch)
        return list(range((assigned + chunk_size - 1) // chunk_size))

    def _assign(self, batch: list[tuple[int, str]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                f"UPDATE contacts SET state = '{ContactState.PLANNED}', chunk_no = ? WHERE key = ?", batch
            )
            self._db.execute("COMMIT")

    def chunk(self, chunk_no: int) -> list[StagedContact]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, payload FROM contacts WHERE chunk_no = ? AND state = ? ORDER BY seq",
                (chunk_no, ContactState.PLANNED),
            ).fetchall()
        return [StagedContact(key, jsontext.loads(payload)) for key, payload in rows]

    def chunk_keys(self, chunk_no: int) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key FROM contacts WHERE chunk_no = ? ORDER BY seq", (chunk_no,)
            ).fetchall()
        return [key for (key,) in rows]

    def states(self, keys: Sequence[str]) -> dict[str, tuple[ContactState, str | None]]:
        """Each known key's state and note (the note: why it was quarantined or failed)."""
        found: dict[str, tuple[ContactState, str | None]] = {}
        unique = list(dict.fromkeys(keys))
        state_of = _STATE_OF  # a dict lookup: calling the enum per row was 2.5 % of a run's CPU
        with self._lock:
            for start in range(0, len(unique), 500):
                block = unique[start : start + 500]
                marks = ",".join("?" * len(block))
                for key, state, note in self._db.execute(
                    f"SELECT key, state, note FROM contacts WHERE key IN ({marks})", block
                ):
                    found[key] = (state_of.get(state) or ContactState(state), note)
        return found
