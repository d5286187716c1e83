"""Where a run's progress goes: a listener the caller sets around the run (the CLI's progress bar).

A context variable, because the caller cannot hand a callable to a flow as a parameter (Prefect sends
parameters to its API). The flow reads it once, when it creates the run's context; the listener is then
an explicit part of that context, called from the threads that settle chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from cleanlist.run.state import ProgressListener

_LISTENER: ContextVar[ProgressListener | None] = ContextVar("cleanlist_progress_listener", default=None)


def progress_listener() -> ProgressListener | None:
    """The listener set by `reporting_progress_to` around this run, if any."""
    return _LISTENER.get()


@contextmanager
def reporting_progress_to(listener: ProgressListener) -> Iterator[None]:
    """Runs started inside this block report their progress to `listener`."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)
