"""Per-task results and their price: which findings an enrichment type reveals, and what they cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cleanlist.sandbox.config import EnrichmentType
from cleanlist.sandbox.contacts import (
    ContactRecord,
    Lookup,
    company_dict,
    emails_for,
    person_for,
    prospect_dict,
)

# Published pricing: 1 credit per email found, 10 per phone found, 1 per discovered prospect.
EMAIL_PRICE = 1.0
PHONE_PRICE = 10.0
PROSPECT_PRICE = 1.0

# Worst case per contact, for the (assumed) 402 rule: refuse when balance < contacts x this.
MAX_COST_PER_CONTACT: dict[EnrichmentType, float] = {
    EnrichmentType.NONE: 0.0,
    EnrichmentType.PARTIAL: EMAIL_PRICE,
    EnrichmentType.PHONE_ONLY: PHONE_PRICE,
    EnrichmentType.FULL: EMAIL_PRICE + PHONE_PRICE,
    EnrichmentType.PROSPECTING_ONLY: PROSPECT_PRICE,
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one contact's task delivered for the requested enrichment type."""

    email: bool
    phone: bool
    prospect: bool

    @property
    def cost(self) -> float:
        """Credits for what was found; failed lookups are free."""
        return EMAIL_PRICE * self.email + PHONE_PRICE * self.phone + PROSPECT_PRICE * self.prospect

    def status(self, enrichment_type: EnrichmentType) -> str:
        """'completed' when something was found (or nothing was asked for), else 'failed'."""
        if enrichment_type == "none" or self.email or self.phone or self.prospect:
            return "completed"
        return "failed"


def outcome_of(found: Lookup, enrichment_type: EnrichmentType) -> Outcome:
    """Reveal only the findings the enrichment type looks up."""
    wants_email = enrichment_type in ("partial", "full")
    wants_phone = enrichment_type in ("phone_only", "full")
    # Prospecting discovers the person with the same odds (and the same draw) as finding their email.
    return Outcome(
        email=wants_email and found.email_found,
        phone=wants_phone and found.phone_found,
        prospect=enrichment_type == "prospecting_only" and found.email_found,
    )


def task_result(
    task_id: str, record: ContactRecord, found: Lookup, enrichment_type: EnrichmentType
) -> dict[str, Any]:
    """The per-task result object of the status endpoint and the webhook.

    `prospect` always carries the names and linkedin_url as sent (stripped), even when something was
    found, so a client that lost the task ids can still join results to its contacts.
    """
    outcome = outcome_of(found, enrichment_type)
    found_something = outcome.email or outcome.phone or outcome.prospect
    person = person_for(record, found.digest) if found_something else None
    primary_email: str | None = None
    other_emails: list[str] = []
    if outcome.email and person is not None:
        primary_email, other_emails = emails_for(person, found.has_other_email)
    return {
        "task_id": task_id,
        "status": outcome.status(enrichment_type),
        "primary_email": primary_email,
        "primary_email_status": found.email_status if outcome.email else None,
        "other_emails": other_emails,
        "personal_phone_numbers": [found.phone_number] if outcome.phone else [],
        "prospect": prospect_dict(record, person),
        "company": company_dict(record, person),
    }


def pending_result(task_id: str, record: ContactRecord) -> dict[str, Any]:
    """A task still in flight: nothing revealed yet, the input echoed back."""
    return unfound_result(task_id, record, "processing")


def unfound_result(task_id: str, record: ContactRecord, status: str) -> dict[str, Any]:
    """A task that reveals nothing (in flight, or of a failed or cancelled workflow): the input echoed."""
    return {
        "task_id": task_id,
        "status": status,
        "primary_email": None,
        "primary_email_status": None,
        "other_emails": [],
        "personal_phone_numbers": [],
        "prospect": prospect_dict(record, None),
        "company": company_dict(record, None),
    }
