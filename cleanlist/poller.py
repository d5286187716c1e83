"""One poller for every workflow in flight, spending about one status call per workflow.

A workflow is polled when it is likely done: at its submit time plus an estimate of the 95th percentile
of workflow durations. Polls only say "done by now" or "not yet", so the estimate is learned from the
first poll of each workflow (`CompletionEstimate`): a search while only one kind of answer has been seen,
then stochastic approximation around the 95th percentile. Due times are computed from the *current*
estimate whenever the poller picks the next workflow, so a corrected estimate applies at once to every
workflow in flight, not only to those submitted afterwards.

Polls go through the client, so they spend the status endpoint's own rate budget, and a 429 holds the
endpoint for everybody. A few worker threads make the calls, so a burst of workflows that are due
together is fetched together; results are handed to callbacks on one separate thread, so result
handling (store writes) does not delay the next poll, up to a few results waiting: beyond that the
workers wait for the callbacks, so memory stays bounded when the store is slower than the API.

With webhooks (an `inbox`: the deliveries a receiver wrote to the store), a workflow whose delivery is
expected is not polled at all until a grace period past its expected completion (the slowest recent
delivery, else the poll estimate); an inbox thread looks for its delivery meanwhile, a cheap local
read, and hands it over like a polled answer. An overdue workflow falls back to polling as above.

A run that is asked to stop stops its poller (`stop`): the polls on the wire finish and their answers
are handed over; a poll still waiting for its rate slot is given up by the client (`StoppedBeforeSending`)
without a call, and its workflow stays recorded for the next run to poll.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cleanlist.client import CleanlistClient
from cleanlist.constants import (
    POLL_BUSY_USAGE,
    POLL_FIRST_PROBE_FRACTION,
    POLL_GROW,
    POLL_LATE_TOLERANCE,
    POLL_NOT_FOUND_GRACE,
    POLL_PENDING_RESULTS,
    POLL_RETRY_GROWTH,
    POLL_SEARCH_FACTOR,
    POLL_SEARCH_STEP_NEAR,
    POLL_SHRINK,
    POLL_UNKNOWN_WORD_POLLS,
    POLL_WORKERS,
)
from cleanlist.errors import Action, APIError, CleanlistError, NotFoundError, StoppedBeforeSending
from cleanlist.models import TaskResult, WorkflowStatus
from cleanlist.retry import RetryPolicy

logger = logging.getLogger("cleanlist.poller")


@dataclass(eq=False)
class TrackedWorkflow:
    """A workflow the API accepted and whose results are still to be fetched."""

    workflow_id: str
    submitted_at: float  # time.monotonic() when accepted (or when a resumed run picked it up)
    contacts: int
    polls: int = 0
    failures: int = 0  # status calls in a row that failed (reset by any answer)
    unknown_words: int = 0  # answers with a status word neither final nor known to be in progress
    resumed: bool = False  # picked up from an earlier run (no grace for a 404)
    tag: object = None  # whatever the caller wants back with the result (e.g. a chunk number)
    # Poller bookkeeping.
    answered: bool = field(default=False, repr=False)  # a status answer (done or not) has come back
    urgent: bool = field(default=False, repr=False)  # poll as soon as the budget allows (resumed)
    running_at: float = field(default=0.0, repr=False)  # elapsed seconds of the last "not yet"
    not_before: float = field(default=0.0, repr=False)  # monotonic time before which not to poll
    expect_delivery: bool = False  # a webhook should bring its results: poll only once it is overdue
    log_asks: int = field(default=0, repr=False)  # times the deliveries log was consulted (at most 2)
    awaiting_retry: bool = field(default=False, repr=False)  # the log says a delivery is still due


@dataclass
class PollerStats:
    status_calls: int = 0
    completed: int = 0
    not_found: int = 0
    timed_out: int = 0
    errors: int = 0
    early_first_polls: int = 0  # first polls answered "not yet"
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    deliveries: int = 0  # workflows settled from a webhook delivery
    status_calls_saved: int = 0  # of those, never polled (less the calls fetching truncated results)
    fallbacks: int = 0  # workflows whose delivery was expected but which had to be polled (overdue)

    @property
    def calls_per_workflow(self) -> float:
        done = self.completed + self.not_found + self.timed_out
        return self.status_calls / done if done else 0.0


class CompletionEstimate:
    """When a workflow is likely done (seconds after submit), learned from status answers.

    A poll is a probe at its elapsed time `e`: "done" says that workflow took at most `e`, "not yet"
    that it takes longer. Until both answers have been seen the estimate is *searched*: every answer
    counts, a "not yet" raises the probe level (by a quarter below the initial guess, doubling above it)
    and a "done" halves it, so a bad first guess costs a few polls early in the run, not the whole run;
    the search ends at the lowest level seen "done" (or one step above the highest seen "not yet", if
    higher). Then the estimate is *tracked* from first polls only, by
    stochastic approximation: a "done" shrinks it by SHRINK, a "not yet" lifts it to `e × (1 + GROW)`,
    which settles where about SHRINK / (SHRINK + GROW) of first polls come too early. Lifts are taken
    relative to the probe, not compounded, so a burst of workflows submitted and polled together moves
    the estimate once, not once per workflow. It is never lowered by a poll that came late (the status
    budget was busy, so the answer says nothing about the estimate) nor while the status budget is
    nearly spent (then every early poll takes a call that a finished workflow needs).
    """

    def __init__(self, initial: float, *, floor: float, ceiling: float) -> None:
        self.floor = floor
        self.ceiling = ceiling
        # Too high an estimate leaves the status budget idle (throughput lost for good); too low costs
        # a few "not yet" calls while the search climbs. So the first probe goes out early.
        self.initial = initial
        self.value = self._clamp(initial * POLL_FIRST_PROBE_FRACTION)
        self.lowest_done = float("inf")
        self.highest_running = 0.0

    def __repr__(self) -> str:
        return f"CompletionEstimate({self.value:.3f}s, calibrated={self.calibrated})"

    @property
    def calibrated(self) -> bool:
        return self.lowest_done < float("inf") and self.highest_running > 0.0

    def _clamp(self, value: float) -> float:
        return min(max(value, self.floor), self.ceiling)

    def _search_step(self, running: float) -> float:
        # Every status call of the run comes after the first burst of polls, so an overshoot here
        # delays them all; an extra "not yet" costs one call. Fine steps up to the guess, wide beyond.
        return POLL_SEARCH_STEP_NEAR if running < self.initial else POLL_SEARCH_FACTOR

    def observe(self, elapsed: float, done: bool, *, first: bool = True, budget_busy: bool = False) -> None:
        """Learn from a status answer received `elapsed` seconds after the workflow's submit.

        `first` says it answered the workflow's first poll; `budget_busy` that the status endpoint's
        budget is nearly spent.
        """
        if not self.calibrated:
            if done:
                self.lowest_done = min(self.lowest_done, elapsed)
            else:
                self.highest_running = max(self.highest_running, elapsed)
            raised = self.highest_running * self._search_step(self.highest_running)
            if self.calibrated:
                self.value = max(self.lowest_done, raised)
            elif not done:
                self.value = max(self.value, raised)
            elif not budget_busy:
                self.value = min(self.value, self.lowest_done / POLL_SEARCH_FACTOR)
        elif not first:
            return
        elif done:
            if elapsed <= self.value * (1 + POLL_LATE_TOLERANCE) and not budget_busy:
                self.value *= 1 - POLL_SHRINK
        else:
            self.value = max(self.value, elapsed * (1 + POLL_GROW))
        self.value = self._clamp(self.value)


class PollAgain(Exception):
    """Raised by a result callback: this answer settles nothing; poll the workflow as usual (no traceback)."""


OnResult = Callable[[TrackedWorkflow, WorkflowStatus], None]
OnGone = Callable[[TrackedWorkflow, str], None]
OnFatal = Callable[[APIError], None]
# An overdue workflow → seconds to leave it to the inbox (the deliveries log says one is due), or None.
AskLog = Callable[[TrackedWorkflow], float | None]
# Workflow ids → the delivered final status of those a receiver has delivered (a local store read).
Inbox = Callable[[Sequence[str]], Mapping[str, WorkflowStatus]]


class WorkflowPoller:
    """Polls `GET /enrich/status` for tracked workflows: one scheduler thread, a few poll workers.

    The scheduler picks the workflow that is due first and hands it to a free worker; the workers make
    the calls (waiting on the rate limiter) so that a burst of workflows due together is fetched in a
    burst, not one full response after another. While the estimate is still being searched, only one
    poll is out at a time: one answer moves the estimate for all the others.
    """

    def __init__(  # noqa: PLR0913 - keyword-only callbacks and tunables
        self,
        client: CleanlistClient,
        *,
        on_result: OnResult,
        on_gone: OnGone,
        on_fatal: OnFatal | None = None,
        initial_estimate: float = 5.0,
        not_found_grace: float = POLL_NOT_FOUND_GRACE,
        timeout: float = 3600.0,
        min_interval: float = 0.05,
        max_interval: float = 60.0,
        workers: int = POLL_WORKERS,
        retry: RetryPolicy | None = None,
        inbox: Inbox | None = None,
        on_delivery: OnResult | None = None,
        delivery_grace: float = 0.5,
        inbox_interval: float = 0.1,
        ask_log: AskLog | None = None,
        on_fallback: Callable[[TrackedWorkflow], None] | None = None,
    ) -> None:
        self._client = client
        self._retry = retry or RetryPolicy()
        self._on_result = on_result
        self._on_gone = on_gone
        self._on_fatal = on_fatal
        self._not_found_grace = not_found_grace
        self._estimate = CompletionEstimate(initial_estimate, floor=min_interval, ceiling=max_interval)
        self.timeout = timeout
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.workers = max(1, workers)
        self.stats = PollerStats()
        self._waiting: list[TrackedWorkflow] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._fatal: CleanlistError | None = None
        self._busy = 0  # workflows being polled or whose callback has not finished yet
        self._polling = 0  # polls handed to a worker and not answered yet
        self._thread: threading.Thread | None = None
        self._work: queue.SimpleQueue[TrackedWorkflow | None] = queue.SimpleQueue()
        self._worker_threads: list[threading.Thread] = []
        # Bounded: when results come faster than the callbacks can store them, the poll workers wait
        # here instead of piling fetched results up in memory (250 parsed results per workflow).
        self._deliveries: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=POLL_PENDING_RESULTS)
        self._delivery_thread: threading.Thread | None = None
        # Deliveries picked up while that queue is full: already in memory (one per workflow in flight),
        # and the inbox must not stall behind the store, or waiting deliveries turn overdue and get polled.
        self._overflow: deque[Callable[[], None]] = deque()
        self._inbox = inbox
        self._on_delivery = on_delivery or on_result
        self.delivery_grace = delivery_grace
        self.inbox_interval = inbox_interval
        self._delivery_lags: deque[float] = deque(maxlen=50)
        self._inbox_thread: threading.Thread | None = None
        self._inbox_stop = threading.Event()
        self._ask_log = ask_log
        self._on_fallback = on_fallback

    # -- public ----------------------------------------------------------------------------------
    @property
    def estimate(self) -> float:
        """Seconds after submit at which a workflow is first polled, as currently learned."""
        return self._estimate.value

    def start(self) -> None:
        # Threads run in copies of the caller's context, so their log records keep its run context.
        self._delivery_thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._deliver_forever,),
            name="cleanlist-poller-results",
            daemon=True,
        )
        self._delivery_thread.start()
        for n in range(self.workers):
            worker = threading.Thread(
                target=contextvars.copy_context().run,
                args=(self._work_forever,),
                name=f"cleanlist-poller-{n}",
                daemon=True,
            )
            worker.start()
            self._worker_threads.append(worker)
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._run,), name="cleanlist-poller", daemon=True
        )
        self._thread.start()
        if self._inbox is not None:
            self._inbox_thread = threading.Thread(
                target=contextvars.copy_context().run,
                args=(self._watch_inbox,),
                name="cleanlist-poller-inbox",
                daemon=True,
            )
            self._inbox_thread.start()

    def stop(self) -> None:
        """Stop polling; answers already received are still handed over before this returns."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._inbox_stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._inbox_thread is not None:
            self._inbox_thread.join(timeout=30)
        for worker in self._worker_threads:
            if worker.is_alive():
                self._work.put(None)
        for worker in self._worker_threads:
            worker.join(timeout=30)
        if self._delivery_thread is not None and self._delivery_thread.is_alive():
            self._deliveries.put(None)
            self._delivery_thread.join(timeout=30)

    def track(self, workflow: TrackedWorkflow, *, poll_now: bool = False) -> None:
        workflow.urgent = poll_now
        workflow.resumed = workflow.resumed or poll_now
        workflow.not_before = time.monotonic() if poll_now else 0.0
        with self._cv:
            self._waiting.append(workflow)
            self._cv.notify_all()

    @property
    def outstanding(self) -> int:
        with self._cv:
            return len(self._waiting) + self._busy

    @property
    def fatal(self) -> CleanlistError | None:
        """What stopped polling for good: a 401/403, or what the caller `abort`ed with."""
        return self._fatal

    def abort(self, error: CleanlistError) -> None:
        """Poll nothing more (the API is gone, the results cannot be stored): `wait_idle` returns, and
        `stop` still hands over the answers already received. Safe from any thread, callbacks included."""
        with self._cv:
            if self._fatal is None:
                self._fatal = error
            self._cv.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no workflow is outstanding (or the poller stopped); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while (self._waiting or self._busy) and not self._stopping and self._fatal is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cv.wait(timeout=remaining if remaining is not None else 1.0)
        return True

    # -- scheduling ------------------------------------------------------------------------------
    def _due(self, workflow: TrackedWorkflow) -> float:
        if workflow.urgent:
            return workflow.not_before
        if workflow.expect_delivery and not workflow.answered:
            expected = max(self._delivery_lags) if self._delivery_lags else self._estimate.value
            return max(workflow.submitted_at + expected + self.delivery_grace, workflow.not_before)
        after = max(self._estimate.value, workflow.running_at * (1 + POLL_RETRY_GROWTH))
        if workflow.answered:
            # A workflow still running past the estimate is polled at growing intervals, capped.
            after = min(after, workflow.running_at + self.max_interval)
        return max(workflow.submitted_at + after, workflow.not_before)

    def _worker_free(self) -> bool:
        # With deliveries expected, polls go only to overdue workflows (most likely done): nothing to
        # search for, and holding them to one at a time would stretch the end of the run.
        limit = self.workers if self._estimate.calibrated or self._inbox is not None else 1
        return self._polling < limit

    def _next_due(self) -> TrackedWorkflow | None:
        with self._cv:
            while not self._stopping:
                if self._fatal is not None:
                    return None
                if self._waiting and self._worker_free():
                    # In-flight workflows number about (submit rate × duration); a scan is cheap and
                    # lets every due time follow the current estimate.
                    index, due = min(
                        ((i, self._due(w)) for i, w in enumerate(self._waiting)), key=lambda item: item[1]
                    )
                    now = time.monotonic()
                    if due <= now:
                        workflow = self._waiting.pop(index)
                        self._busy += 1
                        self._polling += 1
                        return workflow
                    self._cv.wait(timeout=due - now)
                else:
                    self._cv.wait(timeout=1.0)
            return None

    def _requeue(self, workflow: TrackedWorkflow, delay: float) -> None:
        workflow.not_before = time.monotonic() + delay
        with self._cv:
            self._waiting.append(workflow)
            self._busy -= 1
            self._cv.notify_all()

    def _finished(self) -> None:
        with self._cv:
            self._busy -= 1
            self._cv.notify_all()

    # -- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        while (workflow := self._next_due()) is not None:
            self._work.put(workflow)

    def _work_forever(self) -> None:
        while (workflow := self._work.get()) is not None:
            try:
                self._poll(workflow)
            except Exception:  # a bug must not kill the poller and strand every workflow
                logger.exception("polling workflow %s failed", workflow.workflow_id)
                self._count("errors")
                self._requeue(workflow, self.estimate)
            finally:
                with self._cv:
                    self._polling -= 1
                    self._cv.notify_all()

    def _count(self, name: str) -> None:
        with self._cv:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def _poll(self, workflow: TrackedWorkflow) -> None:
        now = time.monotonic()
        if now - workflow.submitted_at > self.timeout:
            self._count("timed_out")
            self._deliver(workflow, lambda: self._on_gone(workflow, "timed_out"))
            return
        if self._leave_to_inbox(workflow):
            return
        if workflow.expect_delivery and workflow.polls == 0:
            self._count("fallbacks")
            if workflow.log_asks and self._on_fallback is not None:
                self._on_fallback(workflow)
        workflow.polls += 1
        self._count("status_calls")
        try:
            status = self._client.enrich_status(workflow_id=workflow.workflow_id)
        except StoppedBeforeSending:
            # The run is stopping (the client's stop request): no call was made; the workflow stays
            # recorded and owed, for the next run to poll.
            with self._cv:
                self.stats.status_calls -= 1
            self._requeue(workflow, self.max_interval)
            return
        except NotFoundError:
            self._not_found(workflow, now)
            return
        except APIError as exc:
            self._failed(workflow, exc)
            return
        workflow.failures = 0
        elapsed = time.monotonic() - workflow.submitted_at
        done = isinstance(status, WorkflowStatus) and status.is_terminal
        busy = self._status_budget_busy()
        with self._cv:
            if not workflow.urgent:
                first = not workflow.answered
                self._estimate.observe(elapsed, done, first=first, budget_busy=busy)
                if first and not done:
                    self.stats.early_first_polls += 1
            if done:
                self.stats.durations.append(elapsed)
                self.stats.completed += 1
        workflow.answered = True
        if not done:
            self._not_done(workflow, status, elapsed)
            return
        assert isinstance(status, WorkflowStatus)
        self._deliver(workflow, lambda: self._on_result(workflow, status))

    def _leave_to_inbox(self, workflow: TrackedWorkflow) -> bool:
        """Consult the deliveries log before the first poll of an overdue delivery (twice at most: the
        consultant decides whether that costs a call); True (requeued) when it says a delivery is still
        due (cleanlist/webhooks/failures.py)."""
        if self._ask_log is None or not workflow.expect_delivery or workflow.polls or workflow.log_asks >= 2:
            return False
        workflow.log_asks += 1
        try:
            wait = self._ask_log(workflow)
        except StoppedBeforeSending:
            workflow.log_asks -= 1
            self._requeue(workflow, self.max_interval)
            return True
        except Exception:  # a bug must not strand the workflow: it is polled
            logger.exception("reading the deliveries log of %s failed", workflow.workflow_id)
            return False
        if wait is None or wait <= 0:
            return False
        workflow.awaiting_retry = True
        self._requeue(workflow, wait)
        return True

    def _not_found(self, workflow: TrackedWorkflow, now: float) -> None:
        if not workflow.resumed and now - workflow.submitted_at < self._not_found_grace:
            self._requeue(workflow, min(self.estimate, 1.0))  # just accepted: possibly not visible yet
            return
        self._count("not_found")
        self._deliver(workflow, lambda: self._on_gone(workflow, "not_found"))

    def _failed(self, workflow: TrackedWorkflow, exc: APIError) -> None:
        workflow.failures += 1
        decision = self._retry.for_poll(
            exc,
            what=f"status of {workflow.workflow_id}",
            failures=workflow.failures,
            ceiling=self.max_interval,
        )
        if decision.action is Action.FAIL_FAST:
            with self._cv:
                self._fatal = self._fatal or exc
            if self._on_fatal is not None:
                self._on_fatal(exc)
            self._requeue(workflow, 0.0)
            return
        self._count("errors")
        self._requeue(workflow, decision.wait or self.min_interval)

    def _not_done(
        self, workflow: TrackedWorkflow, status: WorkflowStatus | TaskResult, elapsed: float
    ) -> None:
        workflow.urgent = False
        workflow.running_at = elapsed
        if isinstance(status, WorkflowStatus) and not status.word_is_known:
            workflow.unknown_words += 1
            if workflow.unknown_words == 1:
                logger.warning(
                    "workflow %s answers the status %r, unknown to this client",
                    workflow.workflow_id,
                    status.status,
                )
            if workflow.unknown_words >= POLL_UNKNOWN_WORD_POLLS:
                reason = f"kept answering {status.status!r}"
                self._deliver(workflow, lambda: self._on_gone(workflow, reason))
                return
        self._requeue(workflow, self.min_interval)

    def _status_budget_busy(self) -> bool:
        """Whether the status budget is, or is about to be, all spent.

        It is about to be when submissions run at the bulk endpoint's limit: every accepted workflow
        needs at least one status call, and the status endpoint has the same limit as the bulk one.
        """
        limiter = getattr(self._client, "limiter", None)
        if limiter is None:
            return False
        return any(
            limiter.endpoint(name).usage() >= POLL_BUSY_USAGE for name in ("enrich-status", "enrich-bulk")
        )

    # -- callbacks -------------------------------------------------------------------------------
    def _deliver(self, workflow: TrackedWorkflow, callback: Callable[[], None], *, wait: bool = True) -> None:
        """Run `callback` on the results thread; the workflow stays outstanding until it has run."""

        def run() -> None:
            try:
                callback()
            except PollAgain as again:
                logger.warning("workflow %s: %s; polling it", workflow.workflow_id, again)
                workflow.expect_delivery = False
                self._requeue(workflow, 0.0)
                return
            except Exception:  # a callback bug must not lose the workflow: poll it again later
                logger.exception("handling the result of workflow %s failed", workflow.workflow_id)
                self._count("errors")
                self._requeue(workflow, self.estimate)
                return
            self._finished()

        if wait:
            self._deliveries.put(run)
            return
        try:
            self._deliveries.put_nowait(run)
        except queue.Full:
            with self._cv:
                self._overflow.append(run)

    def _deliver_forever(self) -> None:
        while (job := self._deliveries.get()) is not None:
            job()
            while True:  # the overflow only fills while the queue is full, so a queued job comes first
                with self._cv:
                    if not self._overflow:
                        break
                    extra = self._overflow.popleft()
                extra()

    # -- webhook deliveries ----------------------------------------------------------------------
    def note_results_fetch(self) -> None:
        """A status call made for a delivery (the rest of truncated results): it saved nothing."""
        with self._cv:
            self.stats.status_calls += 1
            self.stats.status_calls_saved -= 1

    def _watch_inbox(self) -> None:
        assert self._inbox is not None
        while not self._inbox_stop.wait(self.inbox_interval):
            now = time.monotonic()
            with self._cv:
                if self._fatal is not None:
                    return
                # Not those waiting out a failed attempt (not_before in the future): they are polled.
                ids = [
                    w.workflow_id
                    for w in self._waiting
                    if w.expect_delivery and (w.not_before <= now or w.awaiting_retry)
                ]
            if not ids:
                continue
            try:
                found = self._inbox(ids)
            except Exception:  # a bug must not stop the inbox: overdue workflows are polled anyway
                logger.exception("reading webhook deliveries failed")
                continue
            for workflow_id, status in found.items():
                self._take_delivery(workflow_id, status)

    def _take_delivery(self, workflow_id: str, status: WorkflowStatus) -> None:
        with self._cv:
            index = next((i for i, w in enumerate(self._waiting) if w.workflow_id == workflow_id), None)
            if index is None:  # being polled right now, or settled: the poll's answer is the one used
                return
            workflow = self._waiting.pop(index)
            self._busy += 1
            self.stats.deliveries += 1
            if workflow.polls == 0:
                self.stats.status_calls_saved += 1
                if not workflow.resumed:
                    self._delivery_lags.append(time.monotonic() - workflow.submitted_at)
        self._deliver(workflow, lambda: self._on_delivery(workflow, status), wait=False)
