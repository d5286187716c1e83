"""When a run's claims may be taken over: it finished, fell silent past its lease, or its process is gone."""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from cleanlist.store.records import RUN_RUNNING


def run_is_alive(
    *,
    status: str,
    heartbeat_at: datetime,
    host: str,
    pid: int,
    now: datetime,
    lease: timedelta,
    this_host: str,
) -> bool:
    """Whether a run still owns its claims."""
    if status != RUN_RUNNING:
        return False
    if now - heartbeat_at > lease:
        return False
    # A rerun right after kill -9 must not wait out the lease. Only the same host can see the pid.
    return not (host == this_host and not pid_is_alive(pid))


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
