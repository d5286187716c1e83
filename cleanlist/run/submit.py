"""Submitting one chunk to `POST /enrich/bulk`: claim its contacts, send, record the workflow.

What to do about an error is the run's retry policy's decision (`cleanlist.retry`), made and logged once
per failure: transient errors (429, 5xx, network) are raised for the submit-chunk task's retries, the one
place a bulk request is retried (the wait the policy chose is spent at the start of the next attempt,
where a stop request cuts it short); 401/403 close the gate and raise; 402 closes the gate and hands the
chunk back for after the pause; 422 quarantines the named rows and resubmits the rest once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cleanlist.errors import (
    Action,
    APIConnectionError,
    APIError,
    APIStatusError,
    ServerError,
    StoppedBeforeSending,
    UnprocessableEntityError,
)
from cleanlist.models import BulkEnrichResponse
from cleanlist.run.context import RunContext
from cleanlist.run.workspace import StagedContact
from cleanlist.vocab import ChunkStatus, ContactState

logger = logging.getLogger("cleanlist.submit")


@dataclass(frozen=True)
class ChunkOutcome:
    """How a chunk's task ended, and what it sent."""

    chunk_no: int
    status: ChunkStatus
    accepted: int = 0
    quarantined: int = 0
    workflow_id: str | None = None


class _Attempt:
    """One bulk request's journal entry: its intent is written when the client has the rate slot, right
    before the body goes on the wire (`before_send`), never while it waits for the slot."""

    def __init__(self, run: RunContext, chunk_no: int, keys: list[str]) -> None:
        self.run, self.chunk_no, self.keys = run, chunk_no, keys
        self.request: str | None = None

    def before_send(self) -> None:
        run = self.run
        run.count(chunk_attempts=1)
        if run.journal is not None:
            self.request = run.journal.intent(run.run_id, str(self.chunk_no), self.keys)

    def answered(self, error: APIError) -> None:
        """An answer that was read (a 429, a 4xx, a 500/503) or a request that never left settles the
        intent. A lost answer (after sending, a gateway's 502/504) or a 2xx whose body could not be
        used leaves it in doubt."""
        if self.request is None or self.run.journal is None or _maybe_accepted(error):
            return
        if isinstance(error, APIStatusError):
            self.run.journal.answered(self.request, run_id=self.run.run_id, status=error.status_code)
        elif isinstance(error, APIConnectionError) and not error.request_sent:
            self.run.journal.answered(self.request, run_id=self.run.run_id, status=None)


def _send(run: RunContext, chunk_no: int, attempt: int, contacts: list[StagedContact]) -> BulkEnrichResponse:
    """One bulk call. A failure is decided by the run's retry policy (logged once) and raised; a retry
    the policy allows leaves its wait for the next attempt of the chunk's task (`RunState.retry_waits`).

    Each request is written to the run's acceptance journal once its rate slot is granted, right before
    it is sent; its acceptance right after the answer is read, before anything else; any other answer
    that was read settles it too (see cleanlist/run/journal.py). A stop requested while the request
    waits for its slot raises StoppedBeforeSending: nothing was sent, nothing is in doubt.
    """
    keys = [c.key for c in contacts]
    payloads = [c.payload for c in contacts]
    options = run.options
    attempt_entry = _Attempt(run, chunk_no, keys)
    try:
        response = run.client.enrich_bulk(
            payloads, options.enrichment_type, run.webhook_url, before_send=attempt_entry.before_send
        )
    except APIError as exc:
        attempt_entry.answered(exc)
        if _maybe_accepted(exc):
            run.count(ambiguous_submissions=1, ambiguous_contacts=len(contacts))
            logger.warning(
                "chunk %05d: the answer to a bulk request was lost after it was sent (%s): the API may "
                "have accepted and charged it; without an idempotency key a retry cannot tell",
                chunk_no,
                exc,
            )
        decision = run.retry.for_submit(exc, what=f"chunk {chunk_no:05d}", attempt=attempt)
        if decision.action is Action.RETRY_AFTER:
            run.count(rate_limited=1)
        if decision.wait is not None:
            # A Retry-After is exact (the limiter holds the endpoint as long); a backoff is spread.
            wait = run.retry.jittered(decision.wait) if decision.spread else decision.wait
            run.state.retry_after(chunk_no, wait)
        raise
    if run.journal is not None and attempt_entry.request is not None:
        run.journal.accepted(
            attempt_entry.request,
            run_id=run.run_id,
            workflow_id=response.workflow_id,
            chunk_key=str(chunk_no),
            enrichment_type=options.enrichment_type,
            keys=keys,
            task_ids=response.task_ids,
        )
    return response


def _maybe_accepted(error: APIError) -> bool:
    """A bulk request whose answer was lost after its body was sent (a timeout or reset while waiting,
    a gateway's 502/504) may have been accepted."""
    if isinstance(error, ServerError):
        return error.status_code in (502, 504)
    return isinstance(error, APIConnectionError) and error.request_sent


def _claim(run: RunContext, staged: list[StagedContact]) -> list[StagedContact]:
    """Claim the chunk's contacts in the store; the ones another run answers for are marked so."""
    options = run.options
    claim = run.store.claim(run.run_id, [c.key for c in staged], options.enrichment_type, options.fresh_after)
    if claim.fresh:
        run.workspace.set_state(list(claim.fresh), ContactState.FRESH)
    if claim.in_flight:
        run.workspace.set_state(list(claim.in_flight), ContactState.IN_FLIGHT)
        for workflow_id in {wf for wf, _ in claim.in_flight.values()}:
            run.resume(workflow_id)
    if claim.held:
        run.workspace.set_state(claim.held, ContactState.HELD)
    claimed = set(claim.claimed)
    return [c for c in staged if c.key in claimed]


def _quarantine(
    run: RunContext, chunk_no: int, to_send: list[StagedContact], exc: UnprocessableEntityError
) -> set[int]:
    """Reject the contacts a 422 names; returns their indexes in `to_send` (empty if it names none)."""
    bad = {item.index: item.message for item in exc.invalid_contacts if item.index < len(to_send)}
    if not bad:
        return set()
    notes = {to_send[i].key: f"refused by the API: {message}" for i, message in bad.items()}
    run.workspace.set_notes(notes, ContactState.QUARANTINED)
    run.store.release(run.run_id, list(notes), run.options.enrichment_type)
    run.count(quarantined=len(notes))
    logger.warning("chunk %05d: the API refused %d contact(s); resubmitting the rest", chunk_no, len(notes))
    return set(bad)


def _hand_back(
    run: RunContext, chunk_no: int, to_send: list[StagedContact], quarantined: int
) -> ChunkOutcome:
    """The chunk goes back unsent (its claims released): after a pause, or never, if the run stops."""
    run.store.release(run.run_id, [c.key for c in to_send], run.options.enrichment_type)
    return ChunkOutcome(chunk_no, ChunkStatus.DEFERRED, quarantined=quarantined)


def _hands_back(run: RunContext, error: APIError) -> bool:
    """After `error`: close the gate as the policy says; True if the chunk goes back rather than raising
    (a 402 pauses the run; after a stop request nothing is retried — its answer was read, or it is
    counted in doubt)."""
    action = run.retry.action_for(error)
    if action is Action.PAUSE:
        run.gate.exhaust_credits()
        return True
    if action is Action.FAIL_FAST:
        run.gate.fail(error)
    return run.stop.requested and run.retry.is_retryable(error)


def submit_chunk(run: RunContext, chunk_no: int, *, attempt: int = 1) -> ChunkOutcome:
    """Claim the chunk's contacts in the store, submit the ones we hold, record the workflow.

    `attempt` is the task's run count (1 for its first run), for the retry policy. A retried attempt
    first waits what the policy chose after the last failure (a stop request ends the wait).
    """
    wait = run.state.take_retry_wait(chunk_no)
    if wait > 0:
        run.stop.event.wait(wait)
    if not run.gate.open:
        return ChunkOutcome(chunk_no, ChunkStatus.DEFERRED)
    staged = run.workspace.chunk(chunk_no)
    to_send = _claim(run, staged) if staged else []
    enrichment_type = run.options.enrichment_type
    quarantined = 0
    resubmitted = False
    while to_send:
        if not run.gate.open:
            return _hand_back(run, chunk_no, to_send, quarantined)
        try:
            response = _send(run, chunk_no, attempt, to_send)
        except StoppedBeforeSending:
            # The run is stopping and this request never left: the chunk is handed back, unsent.
            return _hand_back(run, chunk_no, to_send, quarantined)
        except UnprocessableEntityError as exc:
            bad = set() if resubmitted else _quarantine(run, chunk_no, to_send, exc)
            if not bad:
                run.store.release(run.run_id, [c.key for c in to_send], enrichment_type)
                raise
            quarantined += len(bad)
            to_send = [c for i, c in enumerate(to_send) if i not in bad]
            resubmitted = True
            continue
        except APIError as exc:
            if _hands_back(run, exc):
                return _hand_back(run, chunk_no, to_send, quarantined)
            if not run.retry.is_retryable(exc):
                run.store.release(run.run_id, [c.key for c in to_send], enrichment_type)
            raise
        task_ids = list(response.task_ids)
        if len(task_ids) != len(to_send):
            # Accepted and paid for: never raise now. Results are joined by the identity they carry.
            logger.warning(
                "chunk %05d: the API answered %d task ids for %d contacts; joining its results by the "
                "contacts' identity instead",
                chunk_no,
                len(task_ids),
                len(to_send),
            )
            task_ids = [""] * len(to_send)
        run.accepted(response.workflow_id, [c.key for c in to_send], task_ids, chunk_no=chunk_no)
        logger.info(
            "chunk %05d: %d contacts accepted as workflow %s", chunk_no, len(to_send), response.workflow_id
        )
        return ChunkOutcome(chunk_no, ChunkStatus.ACCEPTED, len(to_send), quarantined, response.workflow_id)
    run.nothing_to_send(chunk_no)
    return ChunkOutcome(chunk_no, ChunkStatus.NOTHING_TO_SEND, quarantined=quarantined)
