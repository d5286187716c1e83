"""One delivery, judged and recorded: the receiver's logic without the web framework.

Payloads are not signed [doc], so every check is against what the store already knows: the URL's token
must be one a run registered, the workflow must be in that run's ledger, and only results for tasks that
workflow owns are kept. The first delivery of a workflow is recorded; a retry or a duplicate answers 200
and changes nothing. No network here: the receiver must answer within the 10 s the API waits, so a
truncated delivery's rest is fetched by the run that picks it up, through its rate-limited client.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from pydantic import ValidationError

from cleanlist.store import EnrichmentStore
from cleanlist.store.webhooks import token_digest
from cleanlist.webhooks.payload import COMPLETED_EVENT, WebhookPayload

# URL-safe base64 of 32 random bytes is 43 characters; anything much longer is not one of ours.
_MAX_TOKEN_CHARS = 128


@dataclass(frozen=True)
class DeliveryOutcome:
    """The receiver's answer: an HTTP status and one line saying why."""

    status_code: int
    detail: str
    results_kept: int = 0
    results_ignored: int = 0


def new_token() -> str:
    """An unguessable receiver token (256 bits)."""
    return secrets.token_urlsafe(32)


def hook_url(base: str, token: str) -> str:
    """The URL the API is given: `<base>/hooks/<token>`."""
    return f"{base.rstrip('/')}/hooks/{token}"


def register_run(store: EnrichmentStore, run_id: str) -> str:
    """A new token whose deliveries belong to `run_id`; the store keeps only its digest."""
    token = new_token()
    store.register_webhook_token(run_id, token_digest(token))
    return token


def known_token(store: EnrichmentStore, token: str) -> bool:
    """Whether `token` is one a run registered (checked before a body is read)."""
    return len(token) <= _MAX_TOKEN_CHARS and store.webhook_token_run(token_digest(token)) is not None


def apply_delivery(store: EnrichmentStore, token: str, body: bytes) -> DeliveryOutcome:
    """Judge a delivery to `/hooks/<token>` and record it once; nothing is written unless it is accepted."""
    run_id = store.webhook_token_run(token_digest(token)) if len(token) <= _MAX_TOKEN_CHARS else None
    if run_id is None:
        return DeliveryOutcome(404, "unknown receiver URL")
    try:
        payload = WebhookPayload.model_validate_json(body)
    except ValidationError:
        return DeliveryOutcome(422, "not an enrichment.completed payload")
    if payload.event != COMPLETED_EVENT:
        return DeliveryOutcome(422, f"event {payload.event[:40]!r} is not {COMPLETED_EVENT!r}")
    record = store.workflow(payload.workflow_id)
    if record is None or record.run_id != run_id:
        return DeliveryOutcome(404, "unknown workflow")
    owned = {task for task in record.task_ids if task}
    kept = [result for result in payload.results if result.task_id in owned]
    ignored = len(payload.results) - len(kept)
    accepted = payload.model_copy(update={"results": kept})
    new = store.record_delivery(
        record.workflow_id,
        run_id,
        payload.status,
        payload.results_truncated,
        accepted.model_dump_json(),
    )
    detail = "recorded" if new else "already recorded"
    return DeliveryOutcome(200, detail, results_kept=len(kept) if new else 0, results_ignored=ignored)
