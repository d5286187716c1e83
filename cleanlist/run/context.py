"""One enrich run: its services, its state and its settlement, handed to each task that needs them all.

A run is three parts, each in its own module:

- `RunServices` (`cleanlist/run/services.py`): what the run *uses* — id, options, client, store,
  workspace, journal, retry policy, webhook settings — built once by `open_run`, read-only;
- `RunState` (`cleanlist/run/state.py`): what the run *changes* — the submission gate (closed on
  401/403, paused on 402), the credit budget, the counters of the summary, the outage watch, the stop;
- `Settlement` (`cleanlist/run/settlement.py`): the workflows it waits for and the one way an answer
  (poll, webhook, task lookup, resume) becomes stored results.

`RunContext` ties them to the poller and guards the store: a store failure in a poller callback, a task
or the flow closes the gate and stops the poller once (`lose_store`); the flow ends the run with one line.
Dead dependencies end the run, bounded (`cleanlist/run/outage.py`): the state's `OutageWatch` hears every
request of a `WatchedClient` and, once the API has answered nothing for `api_outage_seconds` while the
run submits or polls, closes the gate and stops the poller (`APIOutage`).

The flow creates one per run and passes it to the tasks that submit (tasks run in the flow's own
process, on the task runner's threads); a task that needs less takes less (`tasks/stage.py`,
`tasks/write.py`). It is a plain class, not a dataclass: Prefect walks dataclass task arguments looking
for futures, and this object is a handle, not data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from cleanlist.client import CleanlistClient
from cleanlist.constants import BALANCE_READ_TIMEOUT
from cleanlist.errors import CleanlistError
from cleanlist.models import WorkflowStatus
from cleanlist.poller import TrackedWorkflow, WorkflowPoller
from cleanlist.retry import RetryPolicy
from cleanlist.run.journal import AcceptanceJournal, Replay
from cleanlist.run.options import EnrichOptions
from cleanlist.run.outage import STORE_ERRORS, APIOutage, OutageWatch, StoreLost, WatchedClient
from cleanlist.run.services import RunServices, WebhookSettings
from cleanlist.run.settlement import FAILED_WORDS, Settlement, identity_keys, join_results
from cleanlist.run.state import (
    CreditBudget,
    Progress,
    ProgressListener,
    RunCounters,
    RunState,
    SubmissionGate,
)
from cleanlist.run.stop import StopRequest
from cleanlist.run.workspace import RunWorkspace
from cleanlist.store import EnrichmentStore
from cleanlist.vocab import ContactState

__all__ = [
    "FAILED_WORDS",
    "CreditBudget",
    "Progress",
    "ProgressListener",
    "RunContext",
    "RunCounters",
    "RunServices",
    "RunState",
    "SubmissionGate",
    "WebhookSettings",
    "identity_keys",
    "join_results",
]

logger = logging.getLogger("cleanlist.run")


class RunContext:
    """Services, state, settlement and poller of one run (see the module docstring)."""

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
        webhooks: WebhookSettings | None = None,
    ) -> None:
        self.services = RunServices(
            run_id,
            options,
            client,
            store,
            workspace,
            retry or RetryPolicy(),
            journal,
            webhooks or WebhookSettings(url=options.webhook_url),
        )
        self.state = RunState(
            enrichment_type=options.enrichment_type,
            max_credits=options.max_credits,
            base_url=client.base_url,
            outage_seconds=options.api_outage_seconds,
            on_outage=self._api_outage,
            stop=stop,
            on_progress=on_progress,
        )
        client.stop = self.state.stop.event
        if isinstance(client, WatchedClient):
            client.watch = self.state.outage
        self.poller: WorkflowPoller | None = None
        self.settlement = Settlement(self.services, self.state, lambda: self.poller)
        # The deliveries log (with webhooks): asked before polling an overdue delivery, read for the report.
        deliveries = self.services.webhooks.deliveries
        self.delivery_log = deliveries.consult if deliveries else None
        self.on_fallback = deliveries.polled if deliveries else None
        self.delivery_failures = deliveries

    def __repr__(self) -> str:
        return f"RunContext({self.run_id})"

    # -- what the run uses (read-only) ---------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.services.run_id

    @property
    def options(self) -> EnrichOptions:
        return self.services.options

    @property
    def client(self) -> CleanlistClient:
        return self.services.client

    @property
    def store(self) -> EnrichmentStore:
        return self.services.store

    @property
    def workspace(self) -> RunWorkspace:
        return self.services.workspace

    @property
    def journal(self) -> AcceptanceJournal | None:
        return self.services.journal

    @property
    def retry(self) -> RetryPolicy:
        return self.services.retry

    @property
    def webhook_url(self) -> str | None:
        return self.services.webhooks.url

    # -- what the run changes ------------------------------------------------------------------------
    @property
    def stop(self) -> StopRequest:
        return self.state.stop

    @property
    def gate(self) -> SubmissionGate:
        return self.state.gate

    @property
    def budget(self) -> CreditBudget:
        return self.state.budget

    @property
    def counters(self) -> RunCounters:
        return self.state.counters

    @property
    def outage(self) -> OutageWatch:
        return self.state.outage

    @property
    def outcome(self) -> tuple[str, dict[str, Any]]:
        return self.state.outcome

    @outcome.setter
    def outcome(self, value: tuple[str, dict[str, Any]]) -> None:
        self.state.outcome = value

    def count(self, **increments: float) -> None:
        """Add to counters from any thread."""
        self.state.count(**increments)

    # -- polling -----------------------------------------------------------------------------------
    def start_poller(self) -> WorkflowPoller:
        """Start polling; from now on the run needs the API (an outage longer than the bound stops it)."""
        settlement = self.settlement
        self.poller = WorkflowPoller(
            self.client,
            on_result=self._store_guarded(settlement.on_result),
            on_gone=self._store_guarded(settlement.on_gone),
            on_fatal=self.gate.fail,
            initial_estimate=self.options.initial_poll_seconds,
            not_found_grace=self.options.not_found_grace_seconds,
            timeout=self.options.poll_timeout_seconds,
            retry=self.retry,
            inbox=self._delivered if self.services.webhooks.expect_deliveries else None,
            on_delivery=self._store_guarded(settlement.on_delivery),
            delivery_grace=self.options.webhook_grace_seconds,
            ask_log=self._ask_log if self.delivery_log else None,
            on_fallback=self._fell_back if self.on_fallback else None,
        )
        self.outage.arm()
        self.poller.start()
        return self.poller

    def _fell_back(self, workflow: TrackedWorkflow) -> None:
        if self.on_fallback is not None:
            self.on_fallback(workflow.workflow_id)

    def _ask_log(self, workflow: TrackedWorkflow) -> float | None:
        assert self.delivery_log is not None
        return self.delivery_log(workflow.workflow_id, time.monotonic() - workflow.submitted_at)

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

    def balance_left(self) -> float | None:
        """The organization's credit balance as the run ends, for the report; None when not known.

        One `GET /credits/balance`, and only when it is cheap: not after a stop request or an error that
        ended the run (a revoked key, a silent API, a lost store), not while its rate budget is spent or
        held by a 429 (a status call would wait for the slot it takes), and bounded by
        BALANCE_READ_TIMEOUT. It costs no credits; a failure leaves it unknown and never fails the run.
        """
        if self.stop.requested or self.fatal is not None:
            return None
        try:
            if self.client.limiter.endpoint("credits-balance").usage() >= 1.0:
                logger.info("balance left not read: the rate budget is spent")
                return None
            return self.client.credits_balance(timeout=BALANCE_READ_TIMEOUT).credits
        except (CleanlistError, *STORE_ERRORS) as exc:
            logger.info("balance left not read: %s", exc)
            return None

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

    def _delivered(self, workflow_ids: Sequence[str]) -> dict[str, WorkflowStatus]:
        """The poller's inbox: deliveries a receiver wrote to the store for these workflows."""
        if self.store_lost is not None:
            return {}
        with self.store_guard():
            return self.settlement.delivered(workflow_ids)
        return {}

    # -- workflows (the settlement's) ----------------------------------------------------------------
    def accepted(self, workflow_id: str, keys: list[str], task_ids: list[str], *, chunk_no: int) -> None:
        """Record a workflow the API just accepted (durably, first), then start polling it."""
        self.settlement.accepted(workflow_id, keys, task_ids, chunk_no=chunk_no)

    def resume(self, workflow_id: str) -> bool:
        """Poll a workflow an earlier run left in flight; False if the store does not know it."""
        return self.settlement.resume(workflow_id)

    def settle_unresolved(self, owed: Mapping[str, Mapping[str, str]]) -> tuple[list[str], list[str]]:
        """Before anything is resubmitted: what unresolved workflows owe, asked by task id
        (`Settlement.settle_unresolved`)."""
        return self.settlement.settle_unresolved(owed)

    def replay_journal(self) -> Replay:
        """Record what dead runs of this machine were told; their unanswered requests count as ambiguous."""
        replay = Replay(0, 0, 0)
        if self.journal is None:
            return replay
        with self.store_guard():
            replay = self.journal.replay(self.store)
        self.count(ambiguous_submissions=replay.in_doubt, ambiguous_contacts=replay.in_doubt_contacts)
        return replay

    # -- chunks ------------------------------------------------------------------------------------
    def chunk_failed(self, chunk_no: int, reason: str) -> None:
        """A chunk failed for good: its unsent contacts are marked `error` and their claims released."""
        states = self.workspace.states(self.workspace.chunk_keys(chunk_no))
        keys = [key for key, (state, _) in states.items() if state == ContactState.PLANNED]
        self.workspace.set_state(keys, ContactState.ERROR, reason)
        self.store.release(self.run_id, keys, self.options.enrichment_type)
        self.count(chunks_failed=1)
        self.state.chunk_settled()

    def nothing_to_send(self, chunk_no: int) -> None:
        """A chunk ended without a request: every contact was answered for elsewhere or refused."""
        self.state.chunk_settled()
