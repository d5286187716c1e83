"""One enrich run's context: what its flow body, task threads and poller share, handed to each explicitly.

The flow creates a `RunContext` and passes it to every task it starts (tasks run in the flow's own
process, on the task runner's threads); nothing finds a run through a module-level registry. The context
owns the submission gate (closed on 401/403, paused on 402), the credit budget (`--max-credits`), the
counters of the summary, and the callbacks that move results from the poller into the store. A progress
listener, when given, is told each time a chunk settles.

Dead dependencies end the run, bounded (`cleanlist/run/outage.py`): the context's `OutageWatch` hears
every request of a `WatchedClient` and, once the API has answered nothing for `api_outage_seconds`
while the run submits or polls, closes the gate and stops the poller (`APIOutage`). A store failure
in a poller callback, a task or the flow closes the gate and stops the poller once (`lose_store`); the
flow ends the run with one line.

It is a plain class, not a dataclass: Prefect walks dataclass task arguments looking for futures, and
this object is a handle, not data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cleanlist.client import CleanlistClient
from cleanlist.errors import (
    Action,
    APIConnectionError,
    APIError,
    CleanlistError,
    NotFoundError,
    StoppedBeforeSending,
)
from cleanlist.models import IN_PROGRESS_WORDS, TaskResult, WorkflowStatus, credits_for, worst_case_credits
from cleanlist.poller import PollAgain, TrackedWorkflow, WorkflowPoller
from cleanlist.prepare import prepare_row
from cleanlist.retry import RetryPolicy
from cleanlist.run.journal import AcceptanceJournal, Replay
from cleanlist.run.options import EnrichOptions
from cleanlist.run.outage import STORE_ERRORS, APIOutage, OutageWatch, StoreLost, WatchedClient
from cleanlist.run.states import ContactState, RunStatus
from cleanlist.run.stop import StopRequest
from cleanlist.run.workspace import RunWorkspace
from cleanlist.store import ContactResult, EnrichmentStore
from cleanlist.store.records import WORKFLOW_UNRESOLVED
from cleanlist.webhooks.payload import WebhookPayload

logger = logging.getLogger("cleanlist.run")


@dataclass
class RunCounters:
    """What the run did, as counted while it ran (the summary is built from these)."""

    rows_read: int = 0
    duplicates: int = 0
    unique_contacts: int = 0
    fresh_in_store: int = 0
    resumed_in_flight: int = 0
    submitted: int = 0
    quarantined: int = 0
    emails_found: int = 0
    phones_found: int = 0
    credits_spent: float = 0.0
    workflows_accepted: int = 0
    workflows_completed: int = 0
    chunks_total: int = 0
    chunks_failed: int = 0
    chunks_settled: int = 0  # this run's chunks whose outcome is known (results, failure, nothing sent)
    chunk_attempts: int = 0
    rate_limited: int = 0
    pauses: int = 0
    task_lookups: int = 0  # status calls by task id, for tasks a workflow answer left out
    ambiguous_submissions: int = 0  # bulk requests whose answer was lost after the body was sent
    unknown_to_api: int = 0  # contacts left unresolved because the API answered 404 for their workflow
    ambiguous_contacts: int = 0  # the contacts of those requests

    @property
    def retries(self) -> int:
        """Bulk attempts beyond the first of each chunk (Prefect retries and inline Retry-After waits)."""
        return max(self.chunk_attempts - self.workflows_accepted - self.chunks_failed, 0)


@dataclass(frozen=True)
class Progress:
    """A snapshot for a progress display: chunks settled of all chunks, contacts sent so far."""

    chunks_total: int
    chunks_settled: int
    contacts_sent: int


ProgressListener = Callable[[Progress], None]


class SubmissionGate:
    """Whether new bulk requests may be sent: closed for good on 401/403, on an API outage, a lost store
    or a requested stop; paused on 402."""

    def __init__(self, stop: StopRequest | None = None) -> None:
        self._lock = threading.Lock()
        self.fatal: CleanlistError | None = None
        self.credits_exhausted = False
        self.stop = stop or StopRequest()

    @property
    def open(self) -> bool:
        if self.stop.requested:
            return False
        with self._lock:
            return self.fatal is None and not self.credits_exhausted

    def fail(self, error: CleanlistError) -> None:
        """Close for good; the first fatal error is the one the run reports."""
        with self._lock:
            if self.fatal is None:
                self.fatal = error

    def exhaust_credits(self) -> None:
        with self._lock:
            self.credits_exhausted = True

    def credits_returned(self) -> None:
        with self._lock:
            self.credits_exhausted = False


class CreditBudget:
    """`--max-credits`: the worst case of chunks being sent and of workflows in flight, plus what
    finished workflows actually cost, never exceeds the cap."""

    def __init__(self, enrichment_type: str, max_credits: float | None) -> None:
        self.enrichment_type = enrichment_type
        self.max_credits = max_credits
        self._lock = threading.Lock()
        self._reserved: dict[int, float] = {}
        self._in_flight = 0.0
        self.spent = 0.0

    def committed(self) -> float:
        with self._lock:
            return sum(self._reserved.values()) + self._in_flight + self.spent

    def reserve(self, chunk_no: int, contacts: int) -> bool:
        """Reserve a chunk's worst case before submitting it; False if that would break the cap."""
        need = worst_case_credits(self.enrichment_type, contacts)
        with self._lock:
            committed = sum(self._reserved.values()) + self._in_flight + self.spent
            if self.max_credits is not None and committed + need > self.max_credits + 1e-9:
                return False
            self._reserved[chunk_no] = need
        return True

    def unreserve(self, chunk_no: int) -> None:
        """The chunk's task ended: its workflow (if any) now carries the worst case."""
        with self._lock:
            self._reserved.pop(chunk_no, None)

    def workflow_accepted(self, worst_case: float) -> None:
        with self._lock:
            self._in_flight += worst_case

    def workflow_settled(self, worst_case: float, charged: float) -> None:
        with self._lock:
            self._in_flight -= worst_case
            self.spent += charged

    @property
    def unsettled(self) -> bool:
        """Workflows in flight may still cost less than their worst case (so a chunk may fit later)."""
        with self._lock:
            return self._in_flight > 1e-6


@dataclass
class _OpenWorkflow:
    keys: tuple[str, ...]
    task_ids: tuple[str, ...]
    worst_case: float


class RunContext:
    """Client, store, workspace, options, retry policy, gate, budget, counters and poller of one run."""

    def __init__(  # noqa: PLR0913 - keyword-only collaborators
        self,
        run_id: str,
        options: EnrichOptions,
        *,
        client: CleanlistClient,
        store: EnrichmentStore,
        workspace: RunWorkspace,
        retry: RetryPolicy | None = None,
        on_progress: ProgressListener | None = None,
        journal: AcceptanceJournal | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        self.run_id = run_id
        self.options = options
        self.client = client
        self.store = store
        self.workspace = workspace
        self.retry = retry or RetryPolicy()
        self.journal = journal  # bulk requests and acceptances on local disk before the store has them
        # SIGTERM/SIGINT/cancellation: no new request (the client gives up waiting for a slot), the
        # requests on the wire finish; see cleanlist/run/stop.py.
        self.stop = stop or StopRequest()
        client.stop = self.stop.event
        self.gate = SubmissionGate(self.stop)
        self.outage = OutageWatch(client.base_url, options.api_outage_seconds, on_outage=self._api_outage)
        if isinstance(client, WatchedClient):
            client.watch = self.outage
        self.budget = CreditBudget(options.enrichment_type, options.max_credits)
        self.counters = RunCounters()
        self.poller: WorkflowPoller | None = None
        # How the run ended and its summary, for the store's record of the run (failed until told).
        self.outcome: tuple[str, dict[str, Any]] = (RunStatus.FAILED, {})
        self._on_progress = on_progress
        self._lock = threading.Lock()
        self._open: dict[str, _OpenWorkflow] = {}
        # Webhooks (cleanlist/webhooks/): the URL given to the API (with the run's token), whether a
        # receiver writes deliveries to the store for the poller to pick up, and who hears of each.
        self.webhook_url: str | None = options.webhook_url
        self.expect_deliveries = False
        self.on_delivery: Callable[[str, int], None] | None = None

    def __repr__(self) -> str:
        return f"RunContext({self.run_id})"

    # -- polling -----------------------------------------------------------------------------------
    def start_poller(self) -> WorkflowPoller:
        """Start polling; from now on the run needs the API (an outage longer than the bound stops it)."""
        self.poller = WorkflowPoller(
            self.client,
            on_result=self._store_guarded(self._on_result),
            on_gone=self._store_guarded(self._on_gone),
            on_fatal=self.gate.fail,
            initial_estimate=self.options.initial_poll_seconds,
            timeout=self.options.poll_timeout_seconds,
            retry=self.retry,
            inbox=self._delivered if self.expect_deliveries else None,
            on_delivery=self._store_guarded(self._on_delivery),
            delivery_grace=self.options.webhook_grace_seconds,
        )
        self.outage.arm()
        self.poller.start()
        return self.poller

    def stop_poller(self, *, drain: bool) -> None:
        """Stop polling; with `drain`, first wait until every tracked workflow is settled (or the API
        has been silent for the outage bound, or the store was lost)."""
        if self.poller is None:
            return
        if drain:
            while not self.stop.requested and not self.poller.wait_idle(timeout=1.0):
                self.outage.check()
        self.outage.disarm()
        self.poller.stop()

    @property
    def fatal(self) -> CleanlistError | None:
        """The error that stopped the run for good (401/403 on a submit or a poll, an API outage, a lost
        store), if any."""
        return self.gate.fatal or (self.poller.fatal if self.poller is not None else None)

    # -- dead dependencies ---------------------------------------------------------------------------
    def _api_outage(self, outage: APIOutage) -> None:
        """The API has been silent for the bound: no more submissions, no more polls."""
        self.gate.fail(outage)
        if self.poller is not None:
            self.poller.abort(outage)

    @property
    def store_lost(self) -> StoreLost | None:
        """The store failure that stopped the run, if any."""
        fatal = self.gate.fatal
        return fatal if isinstance(fatal, StoreLost) else None

    def lose_store(self, error: BaseException) -> StoreLost:
        """The store failed: close the gate and stop the poller, once; the run's one line about it."""
        lost = StoreLost(self.store.url_display, error)
        self.gate.fail(lost)
        if self.poller is not None:
            self.poller.abort(lost)
        return self.store_lost or lost

    @contextmanager
    def store_guard(self) -> Iterator[None]:
        """Turn a store failure inside the block into `lose_store` (the block is cut short)."""
        try:
            yield
        except STORE_ERRORS as exc:
            self.lose_store(exc)

    def _store_guarded(self, callback: Callable[[TrackedWorkflow, Any], None]) -> Callable[..., None]:
        """A poller callback that stops touching the store once it is lost, and loses it on a failure
        (instead of a traceback and a retry per workflow)."""

        def guarded(workflow: TrackedWorkflow, arg: Any) -> None:
            if self.store_lost is not None:
                return
            with self.store_guard():
                callback(workflow, arg)

        return guarded

    # -- accepted workflows --------------------------------------------------------------------------
    def accepted(self, workflow_id: str, keys: list[str], task_ids: list[str], *, chunk_no: int) -> None:
        """Record a workflow the API just accepted (durably, first), then start polling it."""
        worst = worst_case_credits(self.options.enrichment_type, len(keys))
        self.store.record_accepted(
            self.run_id,
            workflow_id=workflow_id,
            chunk_key=str(chunk_no),
            enrichment_type=self.options.enrichment_type,
            keys=keys,
            task_ids=task_ids,
            worst_case_credits=worst,
            durable=self.journal is None,  # the journal's fsync'd accepted line made it durable already
        )
        self.workspace.set_state(keys, ContactState.ACCEPTED)
        self.budget.workflow_accepted(worst)
        with self._lock:
            self._open[workflow_id] = _OpenWorkflow(tuple(keys), tuple(task_ids), worst)
            self.counters.submitted += len(keys)
            self.counters.workflows_accepted += 1
        self._track(workflow_id, len(keys), tag=chunk_no, poll_now=False, expect=self.expect_deliveries)

    def resume(self, workflow_id: str) -> bool:
        """Poll a workflow an earlier run left in flight; False if the store does not know it."""
        record = self.store.workflow(workflow_id)
        if record is None:
            return False
        owed = self.store.owed(workflow_id)
        with self._lock:
            if workflow_id in self._open:
                return True
            self._open[workflow_id] = _OpenWorkflow(tuple(owed), tuple(owed.values()), 0.0)
        # A receiver may have its delivery already: then the inbox hands it over, no status call.
        delivered = self.expect_deliveries and bool(self.store.delivered([workflow_id]))
        self._track(workflow_id, len(owed), tag="resumed", poll_now=not delivered, expect=delivered)
        return True

    def _track(
        self, workflow_id: str, contacts: int, *, tag: object, poll_now: bool, expect: bool = False
    ) -> None:
        assert self.poller is not None, "start_poller() before submitting"
        workflow = TrackedWorkflow(
            workflow_id, time.monotonic(), contacts, tag=tag, resumed=tag == "resumed", expect_delivery=expect
        )
        self.poller.track(workflow, poll_now=poll_now)

    def _close(self, workflow_id: str, charged: float) -> None:
        with self._lock:
            entry = self._open.pop(workflow_id, None)
        if entry is not None:
            self.budget.workflow_settled(entry.worst_case, charged)

    def _on_result(self, workflow: TrackedWorkflow, status: WorkflowStatus) -> None:
        """A workflow's final answer: join it to the contacts, ask for the tasks it left out, store."""
        entry = self._open.get(workflow.workflow_id)
        if entry is None:
            return
        word = status.status.lower()
        answers = join_results(entry.keys, entry.task_ids, status.results)
        if word in FAILED_WORDS:
            # Nothing more will come: the contacts are freed (failed lookups cost nothing, a rerun may
            # send them again), and their rows say what the API said.
            note = f"the API ended workflow {workflow.workflow_id} as {word!r}"
            self._settle(
                workflow,
                entry,
                answers,
                ledger_state=FAILED_WORDS[word],
                note=note,
                unanswered=ContactState.ERROR,
            )
            return
        missing = {
            key: task for key, task in zip(entry.keys, entry.task_ids, strict=True) if key not in answers
        }
        answers.update(self.ask_tasks(missing))
        note = (
            f"workflow {workflow.workflow_id} ended {word!r} without this contact's answer; "
            "it is paid for and a rerun asks for it by task id"
        )
        self._settle(
            workflow, entry, answers, ledger_state=None, note=note, unanswered=ContactState.UNRESOLVED
        )

    def _delivered(self, workflow_ids: Sequence[str]) -> dict[str, WorkflowStatus]:
        """The poller's inbox: deliveries a receiver wrote to the store for these workflows."""
        if self.store_lost is not None:
            return {}
        with self.store_guard():
            found = self.store.delivered(workflow_ids)
            return {wid: WebhookPayload.model_validate_json(text) for wid, text in found.items()}
        return {}

    def _on_delivery(self, workflow: TrackedWorkflow, delivered: WorkflowStatus) -> None:
        """A workflow's delivery, picked up from the store: completed it for the polled path (`_on_result`).

        The receiver kept only results for tasks this workflow owns. A delivery is trusted to say
        "completed" with results, not to free contacts: any other word, or a workflow whose tasks the bulk
        answer did not name (its results cannot be checked), is asked of the API itself, as is the rest
        of a truncated delivery (`results_endpoint`, a status call through the rate limiter).
        """
        entry = self._open.get(workflow.workflow_id)
        if entry is None:
            return
        status = delivered
        truncated = delivered.results_truncated if isinstance(delivered, WebhookPayload) else 0
        verify = delivered.status.lower() != "completed" or not all(entry.task_ids)
        if verify or truncated:
            endpoint = delivered.results_endpoint if isinstance(delivered, WebhookPayload) else None
            try:
                fetched = self.client.results_from_endpoint(workflow.workflow_id, endpoint)
            except (APIError, StoppedBeforeSending) as exc:
                raise PollAgain(f"its delivery could not be completed ({exc})") from None
            if self.poller is not None:
                self.poller.note_results_fetch()
            status = fetched if verify else _merged(delivered, fetched)
            if not status.is_terminal:
                raise PollAgain(f"delivered, but the API answers {status.status!r}")
        if self.on_delivery is not None:
            self.on_delivery(workflow.workflow_id, len(status.results))
        self._on_result(workflow, status)

    def ask_tasks(self, tasks: Mapping[str, str]) -> dict[str, TaskResult]:
        """Ask the API for single tasks by id (key → task id); returns the final answers by key.

        A task still processing, unknown (404) or unreadable is left out: its contact stays owed.
        """
        found: dict[str, TaskResult] = {}
        for key, task_id in tasks.items():
            if not task_id or self.gate.fatal is not None:
                continue
            answer = self._ask_task(task_id)
            if isinstance(answer, TaskResult) and answer.status.lower() not in IN_PROGRESS_WORDS:
                found[key] = answer
        return found

    def _ask_task(self, task_id: str) -> WorkflowStatus | TaskResult | None:
        """One task's answer by id, retrying transient errors (503, timeouts) with the run's backoff;
        None when it is unknown, the run is stopping, or the retries ran out (the contact stays owed).

        Without the retries, one 503 on the lookup left a paid, found result out of the output of a run
        that still said "completed" (nothing told the user to rerun for it).
        """
        failures = 0
        while True:
            self.count(task_lookups=1)
            try:
                return self.client.enrich_status(task_id=task_id)
            except (NotFoundError, StoppedBeforeSending):
                return None  # unknown, or the run is stopping: the contact stays owed
            except APIError as exc:
                if self.retry.action_for(exc) is Action.FAIL_FAST:
                    self.gate.fail(exc)
                    return None
                failures += 1
                retry = self.retry.is_retryable(exc) and failures <= self.retry.retries
                if not isinstance(exc, APIConnectionError):  # those the outage watch reports
                    logger.warning(
                        "asking for task %s failed: %s%s", task_id, exc, "" if retry else " (giving up)"
                    )
                if not retry or self.stop.event.wait(self.retry.backoff(failures)):
                    return None

    def _settle(
        self,
        workflow: TrackedWorkflow,
        entry: _OpenWorkflow,
        answers: Mapping[str, TaskResult],
        *,
        ledger_state: str | None,
        note: str,
        unanswered: ContactState,
    ) -> None:
        """Store the answers; the contacts without one get `unanswered` with `note` in the workspace."""
        results = [_contact_result(key, answer) for key, answer in answers.items()]
        left = [key for key in entry.keys if key not in answers]
        state = ledger_state or (WORKFLOW_UNRESOLVED if left else "completed")
        charged = credits_for(self.options.enrichment_type, answers.values())
        self.store.record_results(workflow.workflow_id, results, state=state, credits_charged=charged)
        self.workspace.set_state(list(answers), ContactState.RESULTED)
        if left:
            self.workspace.set_state(left, unanswered, note)
            logger.warning(
                "workflow %s: %d contact(s) without an answer: %s", workflow.workflow_id, len(left), note
            )
        emails = sum(1 for r in answers.values() if r.primary_email)
        phones = sum(1 for r in answers.values() if r.phones)
        logger.info(
            "workflow %s (%s) %s: %d emails, %d phones, %.0f credits",
            workflow.workflow_id,
            f"chunk {workflow.tag:05d}" if isinstance(workflow.tag, int) else "resumed",
            state,
            emails,
            phones,
            charged,
        )
        self._close(workflow.workflow_id, charged)
        with self._lock:
            self.counters.credits_spent += charged
            self.counters.emails_found += emails
            self.counters.phones_found += phones
            self.counters.workflows_completed += 1
        self._chunk_settled(workflow)

    def _on_gone(self, workflow: TrackedWorkflow, reason: str) -> None:
        """No final answer (404 on the workflow, or the poll timeout): ask its tasks one by one; what
        stays unanswered is owed, recorded for a later run, never freed here."""
        entry = self._open.get(workflow.workflow_id)
        if entry is None:
            return
        missing = dict(zip(entry.keys, entry.task_ids, strict=True))
        answers = self.ask_tasks(missing) if reason == "not_found" else {}
        if reason == "not_found":
            self.count(unknown_to_api=sum(1 for key in entry.keys if key not in answers))
        said = reason.replace("_", " ")
        note = f"workflow {workflow.workflow_id} {said}; its contacts stay recorded for a later run"
        logger.warning("%s", note)
        if answers:
            self._settle(
                workflow, entry, answers, ledger_state=None, note=note, unanswered=ContactState.UNRESOLVED
            )
            return
        self.store.mark_workflow(
            workflow.workflow_id, "timed_out" if reason == "timed_out" else WORKFLOW_UNRESOLVED
        )
        self.workspace.set_state(list(entry.keys), ContactState.UNRESOLVED, note)
        self._close(workflow.workflow_id, 0.0)
        self._chunk_settled(workflow)

    def replay_journal(self) -> Replay:
        """Record what dead runs of this machine were told; their unanswered requests count as ambiguous."""
        replay = Replay(0, 0, 0)
        if self.journal is None:
            return replay
        with self.store_guard():
            replay = self.journal.replay(self.store)
        self.count(ambiguous_submissions=replay.in_doubt, ambiguous_contacts=replay.in_doubt_contacts)
        return replay

    def settle_unresolved(self, owed: Mapping[str, Mapping[str, str]]) -> tuple[list[str], list[str]]:
        """Before anything is resubmitted: ask the API, by task id, for the contacts that unresolved
        workflows still owe (workflow id → key → task id). Returns (keys answered now, keys the API does
        not know, which are freed so that this run may submit them again)."""
        answered: list[str] = []
        unknown: list[str] = []
        for workflow_id, tasks in owed.items():
            found: dict[str, TaskResult] = {}
            forgotten: list[str] = []
            for key, task_id in tasks.items():
                if not task_id:
                    continue
                self.count(task_lookups=1)
                try:
                    answer = self.client.enrich_status(task_id=task_id)
                except NotFoundError:
                    forgotten.append(key)
                    continue
                if isinstance(answer, TaskResult) and answer.status.lower() not in IN_PROGRESS_WORDS:
                    found[key] = answer
            left = len(tasks) - len(found) - len(forgotten)
            state = WORKFLOW_UNRESOLVED if left else "completed"
            charged = credits_for(self.options.enrichment_type, found.values())
            results = [_contact_result(key, answer) for key, answer in found.items()]
            self.store.record_results(workflow_id, results, state=state, credits_charged=charged)
            if forgotten:
                self.store.forget_tasks(workflow_id, forgotten)
                logger.warning(
                    "workflow %s: the API does not know %d task(s); their contacts are submitted again",
                    workflow_id,
                    len(forgotten),
                )
            with self._lock:
                self.counters.credits_spent += charged
                self.counters.emails_found += sum(1 for r in found.values() if r.primary_email)
                self.counters.phones_found += sum(1 for r in found.values() if r.phones)
            answered += found
            unknown += forgotten
        return answered, unknown

    # -- chunks ------------------------------------------------------------------------------------
    def chunk_failed(self, chunk_no: int, reason: str) -> None:
        """A chunk failed for good: its unsent contacts are marked `error` and their claims released."""
        states = self.workspace.states(self.workspace.chunk_keys(chunk_no))
        keys = [key for key, (state, _) in states.items() if state == ContactState.PLANNED]
        self.workspace.set_state(keys, ContactState.ERROR, reason)
        self.store.release(self.run_id, keys, self.options.enrichment_type)
        self.count(chunks_failed=1, chunks_settled=1)
        self._progress()

    def nothing_to_send(self, chunk_no: int) -> None:
        """A chunk ended without a request: every contact was answered for elsewhere or refused."""
        self.count(chunks_settled=1)
        self._progress()

    def _chunk_settled(self, workflow: TrackedWorkflow) -> None:
        # Workflows resumed from earlier runs are not chunks of this run.
        if isinstance(workflow.tag, int):
            self.count(chunks_settled=1)
            self._progress()

    def count(self, **increments: int) -> None:
        """Add to counters from any thread."""
        with self._lock:
            for name, value in increments.items():
                setattr(self.counters, name, getattr(self.counters, name) + value)

    def _progress(self) -> None:
        if self._on_progress is None:
            return
        c = self.counters
        self._on_progress(Progress(c.chunks_total, c.chunks_settled, c.submitted))


# Final words of a workflow that answer nothing more (the ledger's spelling of each).
FAILED_WORDS = {"failed": "failed", "cancelled": "cancelled", "canceled": "cancelled"}


def _contact_result(key: str, result: TaskResult) -> ContactResult:
    return ContactResult(
        contact_key=key,
        task_id=result.task_id,
        status=result.status,
        primary_email=result.primary_email,
        primary_email_status=result.primary_email_status,
        other_emails=tuple(result.emails),
        phones=tuple(result.phones),
        raw=result.raw(),
    )


def join_results(
    keys: Sequence[str], task_ids: Sequence[str], results: Sequence[TaskResult]
) -> dict[str, TaskResult]:
    """Contact key → its result, whatever the order: by task id; for contacts whose task id is unknown
    (the bulk answer gave none, or another count), by the identity the result's prospect carries."""
    by_task = {result.task_id: result for result in results}
    answers: dict[str, TaskResult] = {}
    for key, task_id in zip(keys, task_ids, strict=True):
        if task_id and task_id in by_task:
            answers[key] = by_task.pop(task_id)
    known = {task for task in task_ids if task}
    strays = [result for result in by_task.values() if result.task_id not in known]
    wanted = {key for key, task in zip(keys, task_ids, strict=True) if key not in answers and not task}
    for result in strays:
        for candidate in identity_keys(result):
            if candidate in wanted:
                answers[candidate] = result
                wanted.discard(candidate)
                break
    return answers


def identity_keys(result: TaskResult) -> list[str]:
    """The contact keys a result's prospect (and company) may stand for, most specific first."""
    prospect = result.prospect or {}
    company = result.company or {}
    first, last = prospect.get("first_name"), prospect.get("last_name")
    linkedin = prospect.get("linkedin_url") or prospect.get("linkedin")
    candidates: list[dict[str, object]] = [
        {"linkedin_url": linkedin},
        {
            "first_name": first,
            "last_name": last,
            "company_domain": company.get("domain") or prospect.get("company_domain"),
        },
        {
            "first_name": first,
            "last_name": last,
            "company_name": company.get("name") or prospect.get("company_name"),
        },
    ]
    keys: list[str] = []
    for values in candidates:
        prepared = prepare_row(values)
        if prepared.key is not None and prepared.key not in keys:
            keys.append(prepared.key)
    return keys


def _merged(delivered: WorkflowStatus, fetched: WorkflowStatus) -> WorkflowStatus:
    """A truncated delivery's results completed by a status answer (each task once, delivered first)."""
    seen = {result.task_id for result in delivered.results}
    rest = [result for result in fetched.results if result.task_id not in seen]
    return delivered.model_copy(update={"results": [*delivered.results, *rest]})
