"""One poller for every workflow in flight, spending about one status call per workflow.

Each workflow is polled when it is likely done: at its submit time plus an estimate of the 95th
percentile of workflow durations. Polls only tell "done by now" or "not yet", so the estimate is tracked
by stochastic approximation on those answers: it shrinks by a small factor on every "done" and grows by a
19-times larger one on every "not yet", which settles where about 5 % of first polls come too early.
A workflow that is not done is polled again after a quarter of the estimate.
Polls go through the client, so they spend the status endpoint's own rate budget, and a
429 holds the endpoint for everybody. Results are handed to a callback; the poller keeps no results.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cleanlist.client import CleanlistClient
from cleanlist.errors import Action, APIError, NotFoundError, policy_for
from cleanlist.models import WorkflowStatus

logger = logging.getLogger("cleanlist.poller")

# Equilibrium share of early first polls is SHRINK / (SHRINK + GROW) ≈ 5 %.
SHRINK = 0.03
GROW = 0.57


@dataclass
class TrackedWorkflow:
    """A workflow the API accepted and whose results are still to be fetched."""

    workflow_id: str
    submitted_at: float  # time.monotonic() when accepted (or when a resumed run picked it up)
    contacts: int
    polls: int = 0
    tag: object = None  # whatever the caller wants back with the result (e.g. a chunk number)


@dataclass
class PollerStats:
    status_calls: int = 0
    completed: int = 0
    not_found: int = 0
    timed_out: int = 0
    errors: int = 0
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=50))

    @property
    def calls_per_workflow(self) -> float:
        done = self.completed + self.not_found + self.timed_out
        return self.status_calls / done if done else 0.0


OnResult = Callable[[TrackedWorkflow, WorkflowStatus], None]
OnGone = Callable[[TrackedWorkflow, str], None]
OnFatal = Callable[[APIError], None]


class WorkflowPoller:
    """Polls `GET /enrich/status` for tracked workflows from one background thread."""

    def __init__(
        self,
        client: CleanlistClient,
        *,
        on_result: OnResult,
        on_gone: OnGone,
        on_fatal: OnFatal | None = None,
        initial_estimate: float = 5.0,
        timeout: float = 3600.0,
        min_interval: float = 0.05,
        max_interval: float = 60.0,
    ) -> None:
        self._client = client
        self._on_result = on_result
        self._on_gone = on_gone
        self._on_fatal = on_fatal
        self.estimate = initial_estimate
        self.timeout = timeout
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.stats = PollerStats()
        self._heap: list[tuple[float, int, TrackedWorkflow]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stopping = False
        self._fatal: APIError | None = None
        self._busy = 0
        self._thread: threading.Thread | None = None

    # -- public ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cleanlist-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def track(self, workflow: TrackedWorkflow, *, poll_now: bool = False) -> None:
        due = time.monotonic() if poll_now else workflow.submitted_at + self.estimate
        with self._cv:
            heapq.heappush(self._heap, (due, next(self._seq), workflow))
            self._cv.notify_all()

    @property
    def outstanding(self) -> int:
        with self._cv:
            return len(self._heap) + self._busy

    @property
    def fatal(self) -> APIError | None:
        return self._fatal

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no workflow is outstanding (or the poller stopped); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while (self._heap or self._busy) and not self._stopping and self._fatal is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cv.wait(timeout=remaining if remaining is not None else 1.0)
        return True

    # -- the loop --------------------------------------------------------------------------------
    def _next_due(self) -> TrackedWorkflow | None:
        with self._cv:
            while not self._stopping:
                if self._fatal is not None:
                    return None
                if self._heap:
                    due = self._heap[0][0]
                    now = time.monotonic()
                    if due <= now:
                        _, _, workflow = heapq.heappop(self._heap)
                        self._busy += 1
                        return workflow
                    self._cv.wait(timeout=due - now)
                else:
                    self._cv.wait(timeout=1.0)
            return None

    def _done(self) -> None:
        with self._cv:
            self._busy -= 1
            self._cv.notify_all()

    def _run(self) -> None:
        while (workflow := self._next_due()) is not None:
            try:
                self._poll(workflow)
            except Exception:  # a callback bug must not kill the poller and strand every workflow
                logger.exception("polling workflow %s failed", workflow.workflow_id)
                self.stats.errors += 1
                self._reschedule(workflow, self.estimate)
            finally:
                self._done()

    def _poll(self, workflow: TrackedWorkflow) -> None:
        now = time.monotonic()
        if now - workflow.submitted_at > self.timeout:
            self.stats.timed_out += 1
            self._on_gone(workflow, "timed_out")
            return
        workflow.polls += 1
        self.stats.status_calls += 1
        try:
            status = self._client.enrich_status(workflow_id=workflow.workflow_id)
        except NotFoundError:
            self.stats.not_found += 1
            self._on_gone(workflow, "not_found")
            return
        except APIError as exc:
            policy = policy_for(exc)
            if policy is not None and policy.action is Action.FAIL_FAST:
                self._fatal = exc
                if self._on_fatal is not None:
                    self._on_fatal(exc)
                with self._cv:
                    self._cv.notify_all()
                self._reschedule(workflow, 0.0)
                return
            self.stats.errors += 1
            retry_after = getattr(exc, "retry_after", None)
            self._reschedule(workflow, retry_after or min(self.estimate, self.max_interval))
            return
        elapsed = time.monotonic() - workflow.submitted_at
        if not isinstance(status, WorkflowStatus) or not status.is_terminal:
            if workflow.polls == 1:
                self.estimate = min(max(self.estimate * (1 + GROW), elapsed * 1.05), self.max_interval)
            self._reschedule(workflow, max(self.estimate * 0.25, self.min_interval))
            return
        if workflow.polls == 1:
            self.estimate = max(self.estimate * (1 - SHRINK), self.min_interval)
        self.stats.durations.append(elapsed)
        self.stats.completed += 1
        self._on_result(workflow, status)

    def _reschedule(self, workflow: TrackedWorkflow, delay: float) -> None:
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), workflow))
            self._cv.notify_all()
