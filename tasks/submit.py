"""Submitting one chunk to `POST /enrich/bulk`: the plain function and its Prefect task.

The policy table decides everything: 429 waits out Retry-After inline a few times (the limiter holds
the endpoint for every thread meanwhile), then the task fails into Prefect's exponential backoff with
jitter; 5xx, timeouts and connection errors go straight to that backoff; 401/403 close the gate and fail
without retry; 402 closes the gate and hands the chunk back for after the pause; 422 quarantines the
named rows and resubmits the rest once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from cleanlist.errors import (
    Action,
    APIError,
    RateLimitError,
    UnprocessableEntityError,
    policy_for,
)
from cleanlist.models import BulkEnrichResponse
from tasks.engine import RunEngine, engine_for
from tasks.workspace import FRESH, HELD, IN_FLIGHT, QUARANTINED

logger = logging.getLogger("cleanlist.submit")

ACCEPTED = "accepted"
DEFERRED = "deferred"  # not sent: the gate is closed; the chunk waits for the pause to end
NOTHING_TO_SEND = "nothing_to_send"  # every contact was fresh, in flight or held elsewhere


@dataclass(frozen=True)
class ChunkOutcome:
    chunk_no: int
    status: str
    accepted: int = 0
    quarantined: int = 0
    workflow_id: str | None = None


def _send(engine: RunEngine, payloads: list[dict[str, str]]) -> BulkEnrichResponse:
    """One bulk call, waiting out Retry-After inline up to `inline_rate_limit_retries` times."""
    attempts = engine.options.inline_rate_limit_retries
    while True:
        engine.count(chunk_attempts=1)
        try:
            return engine.client.enrich_bulk(
                payloads, engine.options.enrichment_type, engine.options.webhook_url
            )
        except RateLimitError as exc:
            engine.count(rate_limited=1)
            # The client already made the limiter hold this endpoint for Retry-After, so the
            # next attempt waits exactly as long; without a hint, Prefect's backoff decides.
            if exc.retry_after is None or attempts <= 0 or not engine.gate.open:
                raise
            attempts -= 1


def submit_chunk(run_id: str, chunk_no: int) -> ChunkOutcome:
    """Claim the chunk's contacts in the store, submit the ones we hold, record the workflow."""
    engine = engine_for(run_id)
    if not engine.gate.open:
        return ChunkOutcome(chunk_no, DEFERRED)
    staged = engine.workspace.chunk(chunk_no)
    if not staged:
        return ChunkOutcome(chunk_no, NOTHING_TO_SEND)
    options = engine.options
    claim = engine.store.claim(run_id, [c.key for c in staged], options.enrichment_type, options.fresh_after)
    if claim.fresh:
        engine.workspace.set_state(list(claim.fresh), FRESH)
    if claim.in_flight:
        engine.workspace.set_state(list(claim.in_flight), IN_FLIGHT)
        for workflow_id in {wf for wf, _ in claim.in_flight.values()}:
            engine.resume(workflow_id)
    if claim.held:
        engine.workspace.set_state(claim.held, HELD)
    claimed = set(claim.claimed)
    to_send = [c for c in staged if c.key in claimed]
    quarantined = 0
    resubmitted = False
    while to_send:
        if not engine.gate.open:
            engine.store.release(run_id, [c.key for c in to_send], options.enrichment_type)
            return ChunkOutcome(chunk_no, DEFERRED, quarantined=quarantined)
        try:
            response = _send(engine, [c.payload for c in to_send])
        except UnprocessableEntityError as exc:
            bad = {item.index: item.message for item in exc.invalid_contacts if item.index < len(to_send)}
            if not bad or resubmitted:
                engine.store.release(run_id, [c.key for c in to_send], options.enrichment_type)
                raise
            notes = {to_send[i].key: f"refused by the API: {message}" for i, message in bad.items()}
            engine.workspace.set_notes(notes, QUARANTINED)
            engine.store.release(run_id, list(notes), options.enrichment_type)
            quarantined += len(notes)
            engine.count(quarantined=len(notes))
            logger.warning(
                "chunk %d: the API refused %d contact(s); resubmitting the rest", chunk_no, len(notes)
            )
            to_send = [c for i, c in enumerate(to_send) if i not in bad]
            resubmitted = True
            continue
        except APIError as exc:
            policy = policy_for(exc)
            action = policy.action if policy else Action.FAIL
            if action is Action.PAUSE:
                engine.gate.exhaust_credits()
                engine.store.release(run_id, [c.key for c in to_send], options.enrichment_type)
                return ChunkOutcome(chunk_no, DEFERRED, quarantined=quarantined)
            if action is Action.FAIL_FAST:
                engine.gate.fail(exc)
            if action is not Action.RETRY and action is not Action.RETRY_AFTER:
                engine.store.release(run_id, [c.key for c in to_send], options.enrichment_type)
            raise
        task_ids = list(response.task_ids)
        if len(task_ids) != len(to_send):
            raise RuntimeError(
                f"chunk {chunk_no}: the API returned {len(task_ids)} task ids for {len(to_send)} contacts"
            )
        engine.accepted(response.workflow_id, [c.key for c in to_send], task_ids, tag=chunk_no)
        logger.info(
            "chunk %05d: %d contacts accepted as workflow %s", chunk_no, len(to_send), response.workflow_id
        )
        return ChunkOutcome(chunk_no, ACCEPTED, len(to_send), quarantined, response.workflow_id)
    return ChunkOutcome(chunk_no, NOTHING_TO_SEND, quarantined=quarantined)


def _retry_on_transient_errors(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect asks this after a failed attempt: retry only what the policy table calls transient."""
    try:
        state.result()
    except Exception as exc:
        policy = policy_for(exc)
        return policy is not None and policy.retryable
    return False


@task(
    name="submit-chunk",
    task_run_name="chunk-{chunk_no:05d}",
    retries=5,
    retry_delay_seconds=[2, 4, 8, 16, 32],
    retry_jitter_factor=0.5,
    retry_condition_fn=_retry_on_transient_errors,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def submit_chunk_task(run_id: str, chunk_no: int) -> ChunkOutcome:
    return submit_chunk(run_id, chunk_no)
