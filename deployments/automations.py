"""The automation that reacts when a run runs out of Cleanlist credits (event `cleanlist.credits.exhausted`).

With a notification block (Slack, Teams, email, a custom webhook, …) it sends a message naming the flow
run, the credits the next chunk needs and the link to resume it. Without one it does nothing but record
each firing: the automation's page and the Event Feed (`prefect.automation.triggered`) show every
exhausted run, and `--block` can be added later. Created idempotently: one automation of this name.
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from prefect.automations import (
    Automation,
    DoNothing,
    EventTrigger,
    Posture,
    SendNotification,
)
from prefect.client.orchestration import get_client

from cleanlist.errors import InputError

AUTOMATION_NAME = "cleanlist-credits-exhausted"
CREDITS_EXHAUSTED_EVENT = "cleanlist.credits.exhausted"
NOTIFY_CAPABILITY = "notify"

SUBJECT = "Cleanlist: out of credits in flow run {{ flow_run.name }}"
# Rendered by the Prefect server: `flow_run` is the run named in the event's resource.
BODY = (
    "Flow run {{ flow_run.name }} ran out of Cleanlist credits and paused its submissions.\n"
    "The next chunk needs {{ event.payload.needed_for_next_chunk }} credits; "
    "{{ event.payload.credits_spent }} were spent so far.\n"
    "Top up: the run resumes by itself once the balance covers the next chunk, "
    "or click Resume on {{ flow_run|ui_url }}"
)


def _notification_block_id(block_name: str) -> UUID:
    """The id of the notification block named `block_name` (`name`, or `block-type-slug/name`)."""
    slug, _, name = block_name.rpartition("/")
    with get_client(sync_client=True) as client:
        if slug:
            try:
                document = client.read_block_document_by_name(name, slug, include_secrets=False)
            except Exception:
                raise InputError(f"no {slug} block named {name!r}") from None
            candidates = [document]
        else:
            candidates = [d for d in client.read_block_documents(include_secrets=False) if d.name == name]
    notifying = [
        d
        for d in candidates
        if d.block_schema is not None and NOTIFY_CAPABILITY in (d.block_schema.capabilities or [])
    ]
    if not notifying:
        raise InputError(
            f"no notification block named {block_name!r} (create one in the UI under Blocks, e.g. "
            "Slack Webhook or Custom Webhook)"
        )
    if len(notifying) > 1:
        kinds = ", ".join(sorted(f"{d.block_type.slug}/{name}" for d in notifying if d.block_type))
        raise InputError(f"several notification blocks are named {name!r}; pick one of: {kinds}")
    return notifying[0].id


def credits_automation(block_document_id: UUID | None = None) -> Automation:
    """The automation object: one firing per exhausted flow run, notifying through the block if given."""
    action: SendNotification | DoNothing
    if block_document_id is None:
        action = DoNothing()
    else:
        action = SendNotification(block_document_id=block_document_id, subject=SUBJECT, body=BODY)
    return Automation(
        name=AUTOMATION_NAME,
        description=(
            "A cleanlist run ran out of credits (402) and paused; "
            + ("notify through the configured block." if block_document_id else "recorded only (no block).")
        ),
        enabled=True,
        trigger=EventTrigger(
            expect={CREDITS_EXHAUSTED_EVENT},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[action],
    )


def create_credits_automation(block_name: str | None = None) -> str:
    """Create or update the `cleanlist-credits-exhausted` automation; a one-line description of it."""
    block_id = _notification_block_id(block_name) if block_name else None
    automation = credits_automation(block_id)
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(AUTOMATION_NAME)
        if existing:
            automation.id = existing[0].id
            automation.update()
            for duplicate in existing[1:]:
                client.delete_automation(duplicate.id)
            verb = "updated"
        else:
            automation.create()
            verb = "created"
    what = f"notifies through block {block_name!r}" if block_name else "records each firing (no block)"
    return f"{verb} automation {AUTOMATION_NAME!r} ({automation.id}): on {CREDITS_EXHAUSTED_EVENT} it {what}"


__all__ = ["AUTOMATION_NAME", "CREDITS_EXHAUSTED_EVENT", "create_credits_automation", "credits_automation"]
