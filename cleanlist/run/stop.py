"""A run's stop request: SIGTERM, SIGINT or a Prefect cancellation asks the run to stop, and it ends.

What a stop means (README, "Stopping a run"):

- The first signal sets the run's `StopRequest`. From then on no request is sent: one still waiting for
  its rate slot or a Retry-After hold is given up (`StoppedBeforeSending`, never in doubt), no new chunk
  starts, the poller stops. Requests already on the wire finish and their answers are recorded (journal,
  store); then the client is closed. The run writes what it has (rows not settled say so) and ends
  `interrupted`, exit code `EXIT_INTERRUPTED` (130).
- A second signal ends the process at once (`os._exit(130)`) after a best-effort cleanup of child
  processes (the temporary Prefect server).
- A flow run started by a worker or `serve` (`stop_when_orphaned`) stops the same way when the process
  that started it ends: Prefect's process worker runs each flow run in a session of its own and, when
  SIGTERM stops the worker, leaves it running without a worker (a flow run stayed RUNNING 30 s after).
- So does the deadline, `EXIT_DEADLINE_SECONDS` after the first signal: a stop always ends, even when
  something (a hung at-exit hook) would keep the process alive.

The signal handlers are installed only from the main thread (Python's rule). Nothing here imports Prefect.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from types import FrameType
from typing import Final

EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT, what shells report for Ctrl-C; used for SIGTERM too
# A stopped run ends within this many seconds of the first signal, whatever hangs (the bound is 30 s).
EXIT_DEADLINE_SECONDS: Final = 25.0
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
# A second signal this soon after the first is the same stop sent twice, not a person insisting: GNU
# `timeout` signals the command and then its whole process group, so the command gets SIGTERM twice
# within microseconds (`timeout 20 cleanlist-enrich run …` exited at once, with no summary).
SAME_STOP_SECONDS: Final = 0.25
# How often a flow run started by a worker checks that the worker still lives.
PARENT_CHECK_SECONDS: Final = 1.0


class StopRequest:
    """Set once (by a signal, a cancellation); read by every thread of the run. `event` is what waits
    (a rate-limit wait, the submit loop) wake on."""

    def __init__(self, *, announce: bool = False, cleanup: Callable[[], None] | None = None) -> None:
        self.event = threading.Event()
        self.reason: str | None = None
        self.requested_at: float | None = None  # time.monotonic() of the first request
        self.announce = announce  # say on stderr what the first signal does (a terminal's user reads it)
        self.cleanup = cleanup  # what a second signal, or the deadline, does before exiting at once

    def __repr__(self) -> str:
        return f"StopRequest({self.reason or 'not requested'})"

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def request(self, reason: str) -> bool:
        """Ask the run to stop; True the first time."""
        if self.event.is_set():
            return False
        self.reason = reason
        self.requested_at = time.monotonic()
        self.event.set()
        return True

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds, or until a stop is requested (then True)."""
        return self.event.wait(timeout)


_CURRENT: ContextVar[StopRequest | None] = ContextVar("cleanlist_stop_request", default=None)


def stop_request() -> StopRequest | None:
    """The stop request set by `stopping_through` around this run, if any (the CLI's)."""
    return _CURRENT.get()


@contextmanager
def stopping_through(stop: StopRequest) -> Iterator[None]:
    """Runs started inside this block stop when `stop` is requested (a caller owns the signals)."""
    token = _CURRENT.set(stop)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def exit_now(cleanup: Callable[[], None] | None = None, code: int = EXIT_INTERRUPTED) -> None:
    """End the process at once, after `cleanup` (best effort) and flushing what was printed."""
    if cleanup is not None:
        with suppress(BaseException):
            cleanup()
    for stream in (sys.stdout, sys.stderr):
        with suppress(BaseException):
            stream.flush()
    os._exit(code)


def arm_deadline(
    seconds: float, cleanup: Callable[[], None] | None = None, code: int = EXIT_INTERRUPTED
) -> None:
    """End the process with `code` if it is still alive `seconds` from now (a daemon timer: it does not
    keep the process alive, and it still runs while at-exit hooks hang)."""
    timer = threading.Timer(seconds, exit_now, args=(cleanup, code))
    timer.daemon = True
    timer.name = "cleanlist-exit-deadline"
    timer.start()


def exit_on_signals_with(code: int) -> None:
    """The run is over and reported: from now on SIGTERM or SIGINT ends the process at once with the
    run's own exit code, which it was about to end with anyway, instead of the signal's default action
    (exit -15 from a run that had printed its result; fault-schedule seed 8766676). Main thread only.

    Once the interpreter exits, the signals are ignored: its at-exit hooks run no Python signal handler
    at their end, and it gives every handler back to the default action as it finalizes, which is what
    killed that run. The exit deadline (`arm_deadline`) bounds what is left."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda _signum, _frame: exit_now(None, code))
    atexit.register(_ignore_stop_signals)


def _ignore_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextmanager
def stop_on_signals(
    stop: StopRequest, *, deadline: float = EXIT_DEADLINE_SECONDS, keep_installed: bool = False
) -> Iterator[None]:
    """While the block runs: the first SIGTERM/SIGINT requests `stop` (and arms the deadline); a second
    one ends the process at once after the stop's `cleanup`. Outside the main thread this does nothing.

    Blocks nest: the flow installs them again inside the CLI's, because Prefect's flow engine replaces
    the SIGTERM handler with its own (`capture_sigterm`, which raises in the main thread) for the run.
    `keep_installed` leaves this block's handlers in place when it ends, for a caller that restores its
    own after (the CLI, through Prefect's engine): a signal while the engine ends the flow run then stops
    the run in order instead of raising Prefect's TerminationSignal past the run's summary."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.request(name):
            if stop.announce:
                # os.write, not print: a signal handler may interrupt a print in progress.
                with suppress(OSError):
                    os.write(
                        2,
                        f"cleanlist-enrich: {name}: stopping — no new requests; those on the wire finish "
                        f"and are recorded (send it again to exit at once)\n".encode(),
                    )
            arm_deadline(deadline, stop.cleanup)
            return
        if stop.requested_at is not None and time.monotonic() - stop.requested_at < SAME_STOP_SECONDS:
            return  # the first signal again (see SAME_STOP_SECONDS)
        exit_now(stop.cleanup)

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        if not keep_installed:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextmanager
def stop_when_orphaned(
    stop: StopRequest, *, every: float = PARENT_CHECK_SECONDS, deadline: float = EXIT_DEADLINE_SECONDS
) -> Iterator[None]:
    """While the block runs: when the process that started this one ends (its parent process id changes:
    the process was handed to init or a subreaper), request `stop` as a SIGTERM would, and arm the
    deadline. For flow runs started by a worker or `serve`: stopping the worker stops its runs in order
    (no new request, those on the wire recorded), so none is left running unsupervised."""
    parent = os.getppid()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(every):
            if os.getppid() != parent:
                if stop.request("its worker stopped"):
                    arm_deadline(deadline, stop.cleanup)
                return

    watcher = threading.Thread(target=watch, name="cleanlist-parent-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
