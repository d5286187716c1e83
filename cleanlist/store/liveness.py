"""When a run still owns its claims and its journal: only while it is provably alive.

A run is registered in the store with the process that runs it (`ProcessIdentity`: host name, kernel boot
id, pid, and the process's start time from /proc/<pid>/stat) and renews `heartbeat_at` every
`HEARTBEAT_SECONDS` from a daemon thread (`RunHeartbeat`). Another run judges it (`run_is_alive`):

- not `running` (it finished, whatever way): dead;
- heartbeat older than the lease (`LEASE_SECONDS`, a few heartbeats): dead, wherever it ran;
- same host and same boot (the same kernel): its (pid, start time) must match a live process here, else
  it is dead at once. A pid reused by another process (a restarted container's PID 1, a recycled pid)
  has another start time; a process in another PID namespace of this kernel is not in our /proc, or is
  another process there. So a restarted container, or a rerun right after kill -9, takes over at once.

A process id alone proves nothing: in a restarted container the dead run's pid is alive again (PID 1).
Caveat: runs that share a host name and a kernel but not a PID namespace (`hostNetwork` pods, containers
with `--uts=host`) cannot see each other's processes and would judge each other dead; give them
distinct host names (the default for containers) or one PID namespace.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Final

from cleanlist.store.records import RUN_RUNNING

# A live run renews its heartbeat this often; a run silent for LEASE_SECONDS has lost its claims.
# The lease is six beats: a beat may wait behind this process's own writers (SQLite has one writer at a
# time), and a run judged dead while alive could pay twice, while one judged alive too long only delays
# another host's takeover (on the same host the process check decides at once).
HEARTBEAT_SECONDS: Final = 5.0
LEASE_SECONDS: Final = 30.0

_BOOT_ID: Final = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class ProcessIdentity:
    """Who runs a run: enough to tell, on the same machine, whether that exact process still lives."""

    host: str
    boot_id: str | None  # None where the kernel does not say (not Linux)
    pid: int
    started: int | None  # the process's start time in clock ticks after boot (/proc/<pid>/stat field 22)

    @classmethod
    def current(cls) -> ProcessIdentity:
        pid = os.getpid()
        return cls(socket.gethostname(), boot_id(), pid, process_start(pid))


@cache
def boot_id() -> str | None:
    """This kernel's boot id: the same in every container and PID namespace of one boot."""
    try:
        return _BOOT_ID.read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When process `pid` (as this PID namespace numbers it) started, in ticks after boot; None if none."""
    if pid <= 0:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall: 20th after the name
    except (IndexError, ValueError):
        return None


def run_is_alive(  # noqa: PLR0911 - one answer per rule, in the docstring's order
    *,
    status: str,
    heartbeat_at: datetime,
    owner: ProcessIdentity,
    now: datetime,
    lease: timedelta,
    judge: ProcessIdentity,
) -> bool:
    """Whether a run still owns its claims, as `judge` (the asking process) can tell."""
    if status != RUN_RUNNING:
        return False
    if now - heartbeat_at > lease:
        return False
    if owner.host != judge.host:
        return True  # another machine: only its heartbeat speaks for it
    if owner.boot_id is None or judge.boot_id is None:
        # Recorded before boot ids were (or where /proc is missing): the pid is all we have.
        return pid_is_alive(owner.pid)
    if owner.boot_id != judge.boot_id:
        return False  # this machine rebooted since: every process of that boot is gone
    if owner.started is None:
        return pid_is_alive(owner.pid)
    return process_start(owner.pid) == owner.started


def pid_is_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (unknown counts as alive)."""
    # os.kill(0 or -1, …) signals whole process groups, and on Windows os.kill terminates the process.
    if pid <= 0 or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunHeartbeat:
    """A daemon thread renewing one run's heartbeat every `interval` seconds until stopped.

    A failed beat is retried at the next one: the store guard of the run decides when a lost store ends
    the run, and a run that cannot beat for a lease loses its claims (as it should: it may be cut off).
    """

    def __init__(self, beat: Callable[[], None], interval: float = HEARTBEAT_SECONDS) -> None:
        self._beat = beat
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cleanlist-heartbeat", daemon=True)

    def start(self) -> RunHeartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._interval + 5.0)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                self._beat()
            except Exception:  # a missed beat is tried again at the next
                continue
