"""`cleanlist-enrich worker …`: `prefect worker start …` whose stop stops its flow runs in order first.

Prefect's process worker runs each flow run in a process of its own session. SIGTERM to
`prefect worker start` (Kubernetes, systemd, `docker stop`) ends the worker, and the flow run it was
executing dies without a final state (measured: still RUNNING in the UI 30 s later, its process gone),
so a bulk request on the wire at that moment is in doubt. This wrapper owns the signals instead: the
first SIGTERM/SIGINT goes to each flow-run process the worker started (found by the PREFECT__FLOW_RUN_ID
its worker set), which stops in order (no new request, those on the wire recorded, a final state, exit
130; `cleanlist/run/stop.py`); once they are gone (at most `FLOW_RUN_GRACE_SECONDS`), the worker itself
is stopped. A second signal stops the worker at once.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

import psutil

from cleanlist.run.stop import EXIT_DEADLINE_SECONDS, SAME_STOP_SECONDS

# A flow run stops within its own deadline (25 s); a little more for its process to be reaped.
FLOW_RUN_GRACE_SECONDS = EXIT_DEADLINE_SECONDS + 3.0
WORKER_STOP_SECONDS = 20.0


def flow_runs_of(worker: psutil.Process) -> list[psutil.Process]:
    """The flow-run processes under `worker`: those its worker started with PREFECT__FLOW_RUN_ID."""
    found: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        for child in worker.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "PREFECT__FLOW_RUN_ID" in child.environ():
                    found.append(child)
    return found


def stop_flow_runs(worker: psutil.Process, timeout: float = FLOW_RUN_GRACE_SECONDS) -> int:
    """SIGTERM to each flow run of `worker`; wait until they are gone. Returns how many were asked."""
    runs = flow_runs_of(worker)
    for run in runs:
        with contextlib.suppress(psutil.Error):
            run.send_signal(signal.SIGTERM)
    psutil.wait_procs(runs, timeout=timeout)
    return len(runs)


def run_worker(argv: Sequence[str]) -> int:
    """`prefect worker start ARGV` until it ends, or until a signal stops its flow runs, then it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", *argv], start_new_session=True
    )
    signals: list[float] = []  # when each stop signal came (time.monotonic())
    asked = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        if signals and time.monotonic() - signals[0] < SAME_STOP_SECONDS:
            return  # the first signal again (`timeout` signals the command and its process group)
        signals.append(time.monotonic())
        if len(signals) > 1:  # a second signal: the worker now, its runs as Prefect leaves them
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        asked.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)
    while proc.poll() is None and not asked.wait(0.5):
        pass
    if proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            stopped = stop_flow_runs(psutil.Process(proc.pid))
            print(f"cleanlist-enrich worker: stopped {stopped} flow run(s); stopping the worker", flush=True)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return 130 if signals else int(proc.returncode or 0)
