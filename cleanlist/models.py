"""Pydantic models of every request and response of the Cleanlist Public API (v1), plus its pricing.

Responses are parsed leniently: unknown fields are kept (`extra="allow"`), missing optional fields get
defaults, and a `null` where a list is documented becomes an empty list.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from cleanlist.constants import PRICING as PRICING
from cleanlist.constants import Pricing as Pricing
from cleanlist.vocab import EnrichmentType as EnrichmentType
from cleanlist.vocab import FinalWord

ENRICHMENT_TYPES: tuple[EnrichmentType, ...] = tuple(EnrichmentType)

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
    enrichment_type: EnrichmentType = EnrichmentType.PARTIAL
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

    def raw(self) -> dict[str, Any]:
        """The result as JSON-ready data, to keep: the API's own object when the parser kept it (no
        second serialization per task), else this model dumped."""
        # Read from pydantic's private dict directly: `self._sent` goes through `__getattr__`, a cost
        # once per contact.
        private = self.__pydantic_private__
        sent = private.get("_sent") if private is not None else None
        return sent if sent is not None else self.model_dump(mode="json")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        """The per-task field names are documented only by the webhook example; take the obvious
        other spellings (`email`, `email_status`, `phone(s)`, also nested under `result` or `data`)
        rather than report every contact of such an answer as not found. A `null` list is an empty one
        (here, not in a validator per field: one Python call per result, not three)."""
        if not isinstance(data, dict):
            return data
        if data.get("other_emails", ()) is None or data.get("personal_phone_numbers", ()) is None:
            data = {
                **data,
                "other_emails": data.get("other_emails") or [],
                "personal_phone_numbers": data.get("personal_phone_numbers") or [],
            }
        if data.get("primary_email") is not None:
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
    enrichment_type: EnrichmentType | None = None
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
        return FinalWord.of(word) is not None or (word not in IN_PROGRESS_WORDS and bool(self.results))

    @property
    def word_is_known(self) -> bool:
        word = self.status.lower()
        return FinalWord.of(word) is not None or word in IN_PROGRESS_WORDS


class CreditsBalance(_Lenient):
    organization_id: str | None = None
    credits: float


class KeyValidation(_Lenient):
    valid: bool
    user_id: str | None = None
    organization_id: str | None = None


# The deliveries log's field names are not published [assumed]: each field is read from the first of
# its spellings present; the documented words lead. A bool `delivered`/`success` stands for a status.
_DELIVERY_ALIASES: dict[str, tuple[str, ...]] = {
    "attempt": ("attempt", "attempt_number", "attempt_no", "attempts", "try"),
    "status": ("status", "state", "outcome", "result", "delivery_status"),
    "response_code": ("response_code", "status_code", "http_status", "response_status", "code"),
    "error": ("error", "error_message", "message", "response_error", "failure_reason", "reason"),
    "attempted_at": ("attempted_at", "delivered_at", "created_at", "sent_at", "timestamp", "at"),
}
_DELIVERED_WORDS = frozenset({"delivered", "success", "succeeded", "successful", "ok", "sent", "true"})
_FAILED_WORDS = frozenset({"failed", "failure", "error", "errored", "timeout", "timed_out", "false"})
# Where a deliveries answer may keep its rows, in order of preference.
_DELIVERY_LIST_KEYS = ("deliveries", "data", "items", "attempts", "results", "rows")


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


class WebhookDelivery(_Lenient):
    """One delivery attempt: `status` is normalized to `delivered`/`failed` when its word is known."""

    attempt: int | None = None
    status: str | None = None
    response_code: int | None = None
    error: str | None = None
    attempted_at: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _spellings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, spellings in _DELIVERY_ALIASES.items():
            present = next((key for key in spellings if key in data), None)
            if present is not None:
                value = out.pop(present)
                out[name] = value
        for flag in ("delivered", "success", "succeeded", "ok"):
            if "status" not in out and isinstance(out.get(flag), bool):
                out["status"] = "delivered" if out.pop(flag) else "failed"
        if isinstance(out.get("error"), dict):  # {"error": {"code", "message"}}
            inner = out["error"]
            out["error"] = str(inner.get("message") or inner.get("detail") or inner)
        elif out.get("error") is not None and not isinstance(out["error"], str):
            out["error"] = str(out["error"])
        out["attempt"] = _int_or_none(out.get("attempt"))
        out["response_code"] = _int_or_none(out.get("response_code"))
        status = out.get("status")
        if isinstance(status, bool):
            status = "true" if status else "false"
        if status is not None:
            word = str(status).strip().lower()
            status = "delivered" if word in _DELIVERED_WORDS else "failed" if word in _FAILED_WORDS else word
        elif out.get("response_code") is not None:  # no word at all: a 2xx is the documented success
            status = "delivered" if 200 <= out["response_code"] < 300 else "failed"
        out["status"] = status
        if out.get("attempted_at") is not None:
            out["attempted_at"] = str(out["attempted_at"])
        return out

    @property
    def delivered(self) -> bool:
        return self.status == "delivered"

    @property
    def failed(self) -> bool:
        return self.status == "failed"


class WebhookDeliveries(_Lenient):
    workflow_id: str | None = None
    deliveries: list[WebhookDelivery] = Field(default_factory=list)

    @classmethod
    def parse(cls, payload: Any) -> WebhookDeliveries:
        """The field names are not published: rows under `deliveries`, `data` (or another list key), or
        a bare list; rows in any order (sorted by attempt number when every row has one)."""
        if isinstance(payload, list):
            payload = {"deliveries": payload}
        if isinstance(payload, dict) and "deliveries" not in payload:
            key = next((k for k in _DELIVERY_LIST_KEYS if isinstance(payload.get(k), list)), None)
            if key is not None:
                payload = {**payload, "deliveries": payload[key]}
                payload.pop(key)
        if isinstance(payload, dict) and payload.get("deliveries") is None:
            payload = {**payload, "deliveries": []}
        parsed = cls.model_validate(payload)
        if all(d.attempt is not None for d in parsed.deliveries):
            parsed.deliveries.sort(key=lambda d: d.attempt or 0)
        return parsed

    @property
    def last(self) -> WebhookDelivery | None:
        return self.deliveries[-1] if self.deliveries else None

    @property
    def delivered(self) -> bool:
        return any(d.delivered for d in self.deliveries)

    @property
    def failed_attempts(self) -> int:
        return sum(d.failed for d in self.deliveries)


def credits_for(enrichment_type: str, results: Iterable[TaskResult]) -> float:
    """What the documented pricing charges for these results (failed lookups cost nothing)."""
    price = PRICING[enrichment_type]
    total = 0.0
    for result in results:
        if result.primary_email:
            total += price.per_email
        if result.phones:
            total += price.per_phone
        if price.per_prospect and FinalWord.of(result.status) is FinalWord.COMPLETED and result.prospect:
            total += price.per_prospect
    return total
