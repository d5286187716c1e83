"""The settlement of workflows: how an answer of the API becomes stored results, whichever way it arrives.

Four ways bring an answer: a status poll (`on_result`), a webhook delivery (`on_delivery`, completed with
one status call when truncated, then `on_result`), a workflow that is gone or timed out (`on_gone`, its
tasks asked one by one) and, before a later run plans, the tasks an unresolved workflow still owes
(`settle_unresolved`). All four ask for single tasks through `ask_tasks` (one retry loop, the run's
policy) and store through `_record` (results, ledger word, forgotten tasks, counters); the workflows of
this run (or resumed by it) then also close through `_conclude` (workspace states, budget, progress).

Final words of a workflow are spelled once, in `FAILED_WORDS`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from cleanlist.errors import Action, APIConnectionError, APIError, NotFoundError, StoppedBeforeSending
from cleanlist.models import IN_PROGRESS_WORDS, TaskResult, WorkflowStatus, credits_for, worst_case_credits
from cleanlist.poller import PollAgain, TrackedWorkflow, WorkflowPoller
from cleanlist.prepare import prepare_row
from cleanlist.run.services import RunServices
from cleanlist.run.state import RunState
from cleanlist.store import ContactResult
from cleanlist.store.records import WORKFLOW_UNRESOLVED
from cleanlist.vocab import ContactState
from cleanlist.webhooks.payload import WebhookPayload

logger = logging.getLogger("cleanlist.run")

# Final words of a workflow that answer nothing more (the ledger's spelling of each).
FAILED_WORDS = {"failed": "failed", "cancelled": "cancelled", "canceled": "cancelled"}


@dataclass
class _OpenWorkflow:
    keys: tuple[str, ...]
    task_ids: tuple[str, ...]
    worst_case: float


@dataclass(frozen=True)
class TaskAnswers:
    """What single-task lookups found: final answers by key, and the keys whose task the API does not know."""

    found: dict[str, TaskResult]
    unknown: list[str]


class Settlement:
    """The workflows a run waits for, and the one way each answer is joined, stored and counted."""

    def __init__(self, services: RunServices, state: RunState, poller: Callable[[], WorkflowPoller | None]):
        self.services = services
        self.state = state
        self._poller = poller
        self._lock = threading.Lock()
        self._open: dict[str, _OpenWorkflow] = {}

    # -- workflows coming in ---------------------------------------------------------------------------
    def accepted(self, workflow_id: str, keys: list[str], task_ids: list[str], *, chunk_no: int) -> None:
        """Record a workflow the API just accepted (durably, first), then start polling it."""
        services, state = self.services, self.state
        enrichment_type = services.options.enrichment_type
        worst = worst_case_credits(enrichment_type, len(keys))
        services.store.record_accepted(
            services.run_id,
            workflow_id=workflow_id,
            chunk_key=str(chunk_no),
            enrichment_type=enrichment_type,
            keys=keys,
            task_ids=task_ids,
            worst_case_credits=worst,
            durable=services.journal is None,  # the journal's fsync'd accepted line made it durable already
        )
        services.workspace.set_state(keys, ContactState.ACCEPTED)
        state.budget.workflow_accepted(worst)
        with self._lock:
            self._open[workflow_id] = _OpenWorkflow(tuple(keys), tuple(task_ids), worst)
        state.count(submitted=len(keys), workflows_accepted=1)
        expect = services.webhooks.expect_deliveries
        self._track(workflow_id, len(keys), tag=chunk_no, poll_now=False, expect=expect)

    def resume(self, workflow_id: str) -> bool:
        """Poll a workflow an earlier run left in flight; False if the store does not know it."""
        store = self.services.store
        record = store.workflow(workflow_id)
        if record is None:
            return False
        owed = store.owed(workflow_id)
        with self._lock:
            if workflow_id in self._open:
                return True
            self._open[workflow_id] = _OpenWorkflow(tuple(owed), tuple(owed.values()), 0.0)
        # A receiver may have its delivery already: then the inbox hands it over, no status call.
        delivered = self.services.webhooks.expect_deliveries and bool(store.delivered([workflow_id]))
        self._track(workflow_id, len(owed), tag="resumed", poll_now=not delivered, expect=delivered)
        return True

    def _track(
        self, workflow_id: str, contacts: int, *, tag: object, poll_now: bool, expect: bool = False
    ) -> None:
        poller = self._poller()
        assert poller is not None, "start_poller() before submitting"
        workflow = TrackedWorkflow(
            workflow_id, time.monotonic(), contacts, tag=tag, resumed=tag == "resumed", expect_delivery=expect
        )
        poller.track(workflow, poll_now=poll_now)

    # -- answers arriving ------------------------------------------------------------------------------
    def on_result(self, workflow: TrackedWorkflow, status: WorkflowStatus) -> None:
        """A workflow's final answer (polled or delivered): join it to the contacts, ask for the tasks it
        left out, store."""
        entry = self._open.get(workflow.workflow_id)
        if entry is None:
            return
        word = status.status.lower()
        answers = join_results(entry.keys, entry.task_ids, status.results)
        if word in FAILED_WORDS:
            # Nothing more will come: the contacts are freed (failed lookups cost nothing, a rerun may
            # send them again), and their rows say what the API said.
            note = f"the API ended workflow {workflow.workflow_id} as {word!r}"
            self._conclude(workflow, entry, answers, FAILED_WORDS[word], note, ContactState.ERROR)
            return
        missing = {
            key: task for key, task in zip(entry.keys, entry.task_ids, strict=True) if key not in answers
        }
        answers.update(self.ask_tasks(missing).found)
        note = (
            f"workflow {workflow.workflow_id} ended {word!r} without this contact's answer; "
            "it is paid for and a rerun asks for it by task id"
        )
        self._conclude(workflow, entry, answers, None, note, ContactState.UNRESOLVED)

    def delivered(self, workflow_ids: Sequence[str]) -> dict[str, WorkflowStatus]:
        """The poller's inbox: deliveries a receiver wrote to the store for these workflows (the caller
        guards the store)."""
        found = self.services.store.delivered(workflow_ids)
        return {wid: WebhookPayload.model_validate_json(text) for wid, text in found.items()}

    def on_delivery(self, workflow: TrackedWorkflow, delivered: WorkflowStatus) -> None:
        """A workflow's delivery, picked up from the store: completed for the polled path (`on_result`).

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
                fetched = self.services.client.results_from_endpoint(workflow.workflow_id, endpoint)
            except (APIError, StoppedBeforeSending) as exc:
                raise PollAgain(f"its delivery could not be completed ({exc})") from None
            poller = self._poller()
            if poller is not None:
                poller.note_results_fetch()
            status = fetched if verify else _merged(delivered, fetched)
            if not status.is_terminal:
                raise PollAgain(f"delivered, but the API answers {status.status!r}")
        listener = self.services.webhooks.on_delivery
        if listener is not None:
            listener(workflow.workflow_id, len(status.results))
        self.on_result(workflow, status)

    def on_gone(self, workflow: TrackedWorkflow, reason: str) -> None:
        """No final answer (404 on the workflow, or the poll timeout): ask its tasks one by one; what
        stays unanswered is owed, recorded for a later run, never freed here."""
        entry = self._open.get(workflow.workflow_id)
        if entry is None:
            return
        answers: dict[str, TaskResult] = {}
        if reason == "not_found":
            answers = self.ask_tasks(dict(zip(entry.keys, entry.task_ids, strict=True))).found
            self.state.count(unknown_to_api=sum(1 for key in entry.keys if key not in answers))
        said = reason.replace("_", " ")
        note = f"workflow {workflow.workflow_id} {said}; its contacts stay recorded for a later run"
        logger.warning("%s", note)
        # With no answer at all the ledger only notes the word (nothing was charged).
        word = None if answers else ("timed_out" if reason == "timed_out" else WORKFLOW_UNRESOLVED)
        self._conclude(workflow, entry, answers, word, note, ContactState.UNRESOLVED)

    def settle_unresolved(self, owed: Mapping[str, Mapping[str, str]]) -> tuple[list[str], list[str]]:
        """Before anything is resubmitted: ask the API, by task id, for the contacts that unresolved
        workflows still owe (workflow id → key → task id). Returns (keys answered now, keys the API does
        not know, which are freed so that this run may submit them again)."""
        answered: list[str] = []
        unknown: list[str] = []
        for workflow_id, tasks in owed.items():
            lookup = self.ask_tasks(tasks)
            left = len(tasks) - len(lookup.found) - len(lookup.unknown)
            self._record(
                workflow_id,
                lookup.found,
                WORKFLOW_UNRESOLVED if left else "completed",
                forgotten=lookup.unknown,
            )
            answered += lookup.found
            unknown += lookup.unknown
        return answered, unknown

    # -- asking for single tasks -----------------------------------------------------------------------
    def ask_tasks(self, tasks: Mapping[str, str]) -> TaskAnswers:
        """Ask the API for single tasks by id (key → task id): the final answers by key, and the keys whose
        task it does not know (404). A task still processing, unreadable, or not asked (the run is
        stopping, or stopped for good) is in neither: its contact stays owed."""
        found: dict[str, TaskResult] = {}
        unknown: list[str] = []
        for key, task_id in tasks.items():
            if not task_id or self.state.gate.fatal is not None:
                continue
            answer = self._ask_task(task_id)
            if answer is None:
                unknown.append(key)
            elif isinstance(answer, TaskResult) and answer.status.lower() not in IN_PROGRESS_WORDS:
                found[key] = answer
        return TaskAnswers(found, unknown)

    def _ask_task(self, task_id: str) -> WorkflowStatus | TaskResult | bool | None:
        """One task's answer by id, retrying transient errors (503, timeouts) as the run's policy says:
        the one place a task lookup is retried. None when the API does not know the task (404); False
        when the run is stopping or the retries ran out (the contact stays owed).

        Without the retries, one 503 on the lookup left a paid, found result out of the output of a run
        that still said "completed" (nothing told the user to rerun for it).
        """
        retry, gate, stop = self.services.retry, self.state.gate, self.state.stop
        failures = 0
        while True:
            self.state.count(task_lookups=1)
            try:
                return self.services.client.enrich_status(task_id=task_id)
            except NotFoundError:
                return None
            except StoppedBeforeSending:
                return False
            except APIError as exc:
                if retry.action_for(exc) is Action.FAIL_FAST:
                    gate.fail(exc)
                    return False
                failures += 1
                # As for a submit: a 429 with Retry-After may come `rate_limit_retries` times more.
                decision = retry.decision(exc, failures)
                if not isinstance(exc, APIConnectionError):  # those the outage watch reports
                    logger.warning(
                        "asking for task %s failed: %s%s",
                        task_id,
                        exc,
                        "" if decision.retry else " (giving up)",
                    )
                if decision.wait is None or stop.event.wait(decision.wait):
                    return False

    # -- storing ---------------------------------------------------------------------------------------
    def _record(
        self,
        workflow_id: str,
        answers: Mapping[str, TaskResult],
        ledger_state: str,
        *,
        forgotten: Collection[str] = (),
        only_mark: bool = False,
    ) -> float:
        """Store a workflow's answers under `ledger_state`, free the tasks the API forgot, count what was
        found; returns the credits charged. `only_mark`: no answer came, only the ledger word changes."""
        services = self.services
        store = services.store
        if only_mark:
            store.mark_workflow(workflow_id, ledger_state)
            return 0.0
        charged = credits_for(services.options.enrichment_type, answers.values())
        results = [_contact_result(key, answer) for key, answer in answers.items()]
        store.record_results(workflow_id, results, state=ledger_state, credits_charged=charged)
        if forgotten:
            store.forget_tasks(workflow_id, list(forgotten))
            logger.warning(
                "workflow %s: the API does not know %d task(s); their contacts are submitted again",
                workflow_id,
                len(forgotten),
            )
        self.state.count(
            credits_spent=charged,
            emails_found=sum(1 for r in answers.values() if r.primary_email),
            phones_found=sum(1 for r in answers.values() if r.phones),
        )
        return charged

    def _conclude(
        self,
        workflow: TrackedWorkflow,
        entry: _OpenWorkflow,
        answers: Mapping[str, TaskResult],
        ledger_state: str | None,
        note: str,
        unanswered: ContactState,
    ) -> None:
        """A workflow the run waited for is done: store its answers (`_record`), the contacts without one
        get `unanswered` with `note` in the workspace, the budget and the progress hear of it."""
        workspace = self.services.workspace
        left = [key for key in entry.keys if key not in answers]
        only_mark = not answers and ledger_state in ("timed_out", WORKFLOW_UNRESOLVED)
        state = ledger_state or (WORKFLOW_UNRESOLVED if left else "completed")
        charged = self._record(workflow.workflow_id, answers, state, only_mark=only_mark)
        if answers:
            workspace.set_state(list(answers), ContactState.RESULTED)
        if left:
            workspace.set_state(left, unanswered, note)
            if not only_mark:
                logger.warning(
                    "workflow %s: %d contact(s) without an answer: %s", workflow.workflow_id, len(left), note
                )
        if not only_mark:
            logger.info(
                "workflow %s (%s) %s: %d emails, %d phones, %.0f credits",
                workflow.workflow_id,
                f"chunk {workflow.tag:05d}" if isinstance(workflow.tag, int) else "resumed",
                state,
                sum(1 for r in answers.values() if r.primary_email),
                sum(1 for r in answers.values() if r.phones),
                charged,
            )
            self.state.count(workflows_completed=1)
        with self._lock:
            closed = self._open.pop(workflow.workflow_id, None)
        if closed is not None:
            self.state.budget.workflow_settled(closed.worst_case, charged)
        # Workflows resumed from earlier runs are not chunks of this run.
        if isinstance(workflow.tag, int):
            self.state.chunk_settled()


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
