"""Pydantic models of every request and response of the Cleanlist Public API (v1), plus its pricing.

Responses are parsed leniently: unknown fields are kept (`extra="allow"`), missing optional fields get
defaults, and a `null` where a list is documented becomes an empty list.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

EnrichmentType = Literal["none", "partial", "phone_only", "full", "prospecting_only"]
ENRICHMENT_TYPES: tuple[EnrichmentType, ...] = get_args(EnrichmentType)

TERMINAL_WORKFLOW_STATUSES = frozenset({"completed", "failed", "cancelled", "canceled"})
# Words of a workflow or task still at work [assumed]. A word in neither set is final when the answer
# lists results, and otherwise polled a bounded number of times (see cleanlist/poller.py).
IN_PROGRESS_WORDS = frozenset({"pending", "queued", "processing", "running", "in_progress", "started"})
CONTACT_FIELDS: tuple[str, ...] = (
    "linkedin_url",
    "first_name",
    "last_name",
    "company_domain",
    "company_name",
)


@dataclass(frozen=True)
class Pricing:
    """Credits charged per found item for one enrichment type (failed lookups cost 0)."""

    per_email: float = 0.0
    per_phone: float = 0.0
    per_prospect: float = 0.0

    @property
    def worst_case_per_contact(self) -> float:
        return self.per_email + self.per_phone + self.per_prospect


# Documented pricing. "Per phone found" is read as per contact whose phone lookup found something.
PRICING: dict[str, Pricing] = {
    "none": Pricing(),
    "partial": Pricing(per_email=1.0),
    "phone_only": Pricing(per_phone=10.0),
    "full": Pricing(per_email=1.0, per_phone=10.0),
    "prospecting_only": Pricing(per_prospect=1.0),
}


def worst_case_credits(enrichment_type: str, contacts: int) -> float:
    """The most a request of `contacts` contacts can cost."""
    return PRICING[enrichment_type].worst_case_per_contact * contacts


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Contact(BaseModel):
    """One contact as the bulk endpoint takes it."""

    model_config = ConfigDict(extra="forbid")

    linkedin_url: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    company_domain: str | None = None
    company_name: str | None = None


class BulkEnrichRequest(BaseModel):
    enrichment_type: EnrichmentType = "partial"
    webhook_url: str | None = None
    contacts: list[Contact]

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = self.model_dump(exclude_none=True, exclude=self._left_out())
        return body

    def to_json_bytes(self) -> bytes:
        """The request's body as sent: one serialization in pydantic-core, not one per contact."""
        return self.model_dump_json(exclude_none=True, exclude=self._left_out()).encode()

    def _left_out(self) -> set[str] | None:
        return None if self.webhook_url else {"webhook_url"}


def _none_to_list(value: Any) -> Any:
    return [] if value is None else value


class BulkEnrichResponse(_Lenient):
    """Only `workflow_id` is promised by the newer page: `task_ids` may be absent, null, or of another
    length than the contacts sent; the caller maps tasks to contacts, not this model."""

    workflow_id: str
    status: str = "processing"
    message: str | None = None
    task_ids: list[str] = Field(default_factory=list)
    total_contacts: int | None = None

    _lists = field_validator("task_ids", mode="before")(_none_to_list)


class TaskResult(_Lenient):
    """One contact's result inside a workflow (or alone, in task mode)."""

    task_id: str
    status: str = "processing"
    primary_email: str | None = None
    primary_email_status: str | None = None
    other_emails: list[Any] = Field(default_factory=list)
    personal_phone_numbers: list[Any] = Field(default_factory=list)
    prospect: dict[str, Any] | None = None
    company: dict[str, Any] | None = None
    workflow_id: str | None = None
    # The task's object exactly as the API sent it, when the parser had it (see `WorkflowStatus.parse`).
    _sent: dict[str, Any] | None = PrivateAttr(default=None)

    _lists = field_validator("other_emails", "personal_phone_numbers", mode="before")(_none_to_list)

    def raw(self) -> dict[str, Any]:
        """The result as JSON-ready data, to keep: the API's own object when the parser kept it (no
        second serialization per task), else this model dumped."""
        return self._sent if self._sent is not None else self.model_dump(mode="json")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        """The per-task field names are documented only by the webhook example; take the obvious
        other spellings (`email`, `email_status`, `phone(s)`, also nested under `result` or `data`)
        rather than report every contact of such an answer as not found."""
        if not isinstance(data, dict) or data.get("primary_email") is not None:
            return data
        nested = [data[k] for k in ("result", "data", "enrichment") if isinstance(data.get(k), dict)]
        sources = [data, *nested]
        data = dict(data)
        email = next(
            ((s, k) for s in sources for k in ("primary_email", "email") if s.get(k) is not None), None
        )
        if email is not None:
            source, key = email
            data["primary_email"] = source[key]
            if data.get("primary_email_status") is None:
                data["primary_email_status"] = source.get(f"{key}_status")
        if not data.get("personal_phone_numbers"):
            names = ("personal_phone_numbers", "phones", "phone")
            phones = next((s[k] for s in sources for k in names if s.get(k)), None)
            if phones:
                data["personal_phone_numbers"] = phones if isinstance(phones, list) else [phones]
        return data

    @property
    def phones(self) -> list[str]:
        """Phone numbers as strings, whether the API sent strings or objects with a number field."""
        found: list[str] = []
        for item in self.personal_phone_numbers:
            if isinstance(item, dict):
                value = item.get("number") or item.get("phone") or item.get("value")
                if value:
                    found.append(str(value))
            elif item:
                found.append(str(item))
        return found

    @property
    def emails(self) -> list[str]:
        found: list[str] = []
        for item in self.other_emails:
            value = item.get("email") if isinstance(item, dict) else item
            if value:
                found.append(str(value))
        return found


class WorkflowSummary(_Lenient):
    total: int | None = None
    successful: int | None = None
    failed: int | None = None
    emails_found: int | None = None
    phones_found: int | None = None


class WorkflowStatus(_Lenient):
    """A workflow's state and, once terminal, its per-task results."""

    workflow_id: str
    status: str
    enrichment_type: str | None = None
    total_contacts: int | None = None
    summary: WorkflowSummary | None = None
    results: list[TaskResult] = Field(default_factory=list)
    completed_at: str | None = None

    _lists = field_validator("results", mode="before")(_none_to_list)

    @classmethod
    def parse(cls, payload: Any) -> WorkflowStatus:
        """Validate a decoded status answer once, and keep each task's decoded object beside its model
        (`TaskResult.raw`), so that storing a result serializes nothing twice."""
        status = cls.model_validate(payload)
        sent = payload.get("results") if isinstance(payload, dict) else None
        if isinstance(sent, list) and len(sent) == len(status.results):
            for result, item in zip(status.results, sent, strict=True):
                if isinstance(item, dict):
                    result._sent = item
        return status

    @property
    def is_terminal(self) -> bool:
        word = self.status.lower()
        return word in TERMINAL_WORKFLOW_STATUSES or (word not in IN_PROGRESS_WORDS and bool(self.results))

    @property
    def word_is_known(self) -> bool:
        return self.status.lower() in TERMINAL_WORKFLOW_STATUSES | IN_PROGRESS_WORDS


class CreditsBalance(_Lenient):
    organization_id: str | None = None
    credits: float


class KeyValidation(_Lenient):
    valid: bool
    user_id: str | None = None
    organization_id: str | None = None


class WebhookDelivery(_Lenient):
    attempt: int | None = None
    status: str | None = None
    response_code: int | None = None
    error: str | None = None


class WebhookDeliveries(_Lenient):
    workflow_id: str | None = None
    deliveries: list[WebhookDelivery] = Field(default_factory=list)

    @classmethod
    def parse(cls, payload: Any) -> WebhookDeliveries:
        """The field names are not published: accept a bare list as well as an object."""
        if isinstance(payload, list):
            return cls(deliveries=[WebhookDelivery.model_validate(item) for item in payload])
        return cls.model_validate(payload)


def credits_for(enrichment_type: str, results: Iterable[TaskResult]) -> float:
    """What the documented pricing charges for these results (failed lookups cost nothing)."""
    price = PRICING[enrichment_type]
    total = 0.0
    for result in results:
        if result.primary_email:
            total += price.per_email
        if result.phones:
            total += price.per_phone
        if price.per_prospect and result.status.lower() == "completed" and result.prospect:
            total += price.per_prospect
    return total
