"""Settings of one sandbox world: its keys, credits, rate limit, latency, hit rates, injected faults, and
which reading it plays of each point the contract leaves unpublished (every default is the documented one).
"""

from __future__ import annotations

import ssl
from typing import Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The five types are documented; the sandbox charges them by its own table (cleanlist/sandbox/results.py).
# From vocab, not models: `cleanlist-enrich` reads this module for the sandbox's options on every start.
from cleanlist.vocab import EnrichmentType as EnrichmentType

ENRICHMENT_TYPES: tuple[EnrichmentType, ...] = tuple(EnrichmentType)

Endpoint = Literal["validate-key", "credits-balance", "enrich-bulk", "enrich-status", "webhook-deliveries"]
ENDPOINTS: tuple[Endpoint, ...] = get_args(Endpoint)


API_KEY_PREFIX = "clapi_"
# 64 url-safe characters after the prefix, the documented shape of a real key.
DEFAULT_SANDBOX_KEY = API_KEY_PREFIX + "sandbox0" * 8

# Statuses a fault may answer with; each has a fixed body in app.py.
# Results a webhook carries at most [doc]; more are counted in results_truncated.
WEBHOOK_RESULTS_LIMIT = 250
FAULT_STATUSES = frozenset({429, 500, 502, 503, 504})

ResultsOrder = Literal["input", "shuffled"]
BulkTaskIds = Literal["listed", "absent", "short"]
ErrorEnvelope = Literal["detail", "error"]
RateScope = Literal["endpoint", "organization"]
# The deliveries log's unpublished shape [assumed]: where its rows are, and what their fields are called.
DeliveriesList = Literal["deliveries", "data", "bare"]
DeliveriesFields = Literal["documented", "renamed", "flag"]
DeliveriesOrder = Literal["oldest_first", "newest_first"]
# Final words that mean the work was not done: such a workflow lists no results and costs nothing.
FAILED_FINAL_WORDS = frozenset({"failed", "cancelled", "canceled"})


class FaultSpec(BaseModel):
    """Injected failures for one endpoint: a scripted sequence first, then a random share."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of requests (0..1, drawn from the seeded RNG) answered with `status`."""
    status: int = 503
    """Status answered by the random share."""
    sequence: tuple[int, ...] = ()
    """Statuses answered, in order, by the next requests to the endpoint; consumed before `rate` applies."""
    retry_after: int | str | None = 1
    """Retry-After sent with an injected 429: seconds, any raw string (an HTTP-date, garbage), or None
    to omit the header — so clients can be tested against every shape the contract says to tolerate."""

    @field_validator("status")
    @classmethod
    def _known_status(cls, status: int) -> int:
        if status not in FAULT_STATUSES:
            raise ValueError(f"fault status must be one of {sorted(FAULT_STATUSES)}, got {status}")
        return status

    @field_validator("sequence")
    @classmethod
    def _known_statuses(cls, sequence: tuple[int, ...]) -> tuple[int, ...]:
        for status in sequence:
            cls._known_status(status)
        return sequence


class SandboxConfig(BaseModel):
    """Everything that shapes a sandbox; immutable once the sandbox is built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key: str = DEFAULT_SANDBOX_KEY
    """The main key; its organization owns the credits."""
    credits: float = Field(default=10_000.0, ge=0.0)
    """Starting balance of the main organization."""
    rate_limit: tuple[int, float] | None = (60, 60.0)
    """(requests, window seconds) per organization and endpoint; None disables limiting."""
    latency: float | tuple[float, float] = 1.0
    """Seconds from acceptance to completion: fixed, or (min, max) drawn per workflow."""
    find_rate: float = Field(default=0.8, ge=0.0, le=1.0)
    """Probability that a contact's email (or, for prospecting, the prospect) is found."""
    phone_rate: float = Field(default=0.3, ge=0.0, le=1.0)
    """Probability that a contact's personal phone is found."""
    seed: int = 0
    """Seeds latency draws and random faults; results never depend on it."""
    extra_keys: tuple[str, ...] = ()
    """More keys of the main organization (other users): same credits, same rate windows."""
    no_api_access_keys: tuple[str, ...] = ()
    """Keys of an organization whose plan lacks API access: they authenticate, then get 403."""
    faults: dict[Endpoint, FaultSpec] = Field(default_factory=dict)
    """Injected failures per endpoint."""
    revoke_after_batches: int | None = Field(default=None, ge=1)
    """Revoke a key right after it has had this many bulk batches accepted (restoring it disarms this,
    unless the restore asks to rearm)."""
    refuse_contacts_containing: tuple[str, ...] = ()
    """Test facility, not API behaviour: a contact any of whose string values (as sent) contains one of
    these substrings is refused by the bulk endpoint with the documented field-rule 422, as if the server
    validated more strictly than the client. Replaceable at runtime via `/_sandbox/refuse-contacts`."""
    webhook_backoff_scale: float = Field(default=1.0, ge=0.0)
    """Multiplies the documented 1, 2, 4, 8 s webhook retry backoff (tests compress it)."""
    webhook_timeout: float = Field(default=10.0, gt=0.0)
    """Seconds a webhook receiver has to answer."""
    webhook_ca_file: str | None = None
    """Test facility: a PEM file of certificates to trust, besides the system's, for https deliveries (a
    receiver's self-signed certificate in tests). Default none: only publicly trusted certificates, as
    Cleanlist's receivers must be."""
    webhook_drop_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of workflows (seeded, stable per workflow) whose webhook is never sent: no attempt at all,
    as if lost on the way. Default 0: every workflow with a webhook_url is delivered."""
    webhook_results_limit: int = Field(default=WEBHOOK_RESULTS_LIMIT, ge=0, le=WEBHOOK_RESULTS_LIMIT)
    """Results carried by a webhook (the rest counted in `results_truncated`); the documented 250."""
    webhook_fail_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Test facility: share of delivery attempts (seeded per workflow and attempt) answered 502 as by a
    proxy in front of the receiver, without reaching it. Default 0."""
    webhook_down_seconds: float = Field(default=0.0, ge=0.0)
    """Test facility: for this many seconds after the first accepted bulk request, delivery attempts fail
    as if the receiver were down (connection refused), without reaching it. Default 0."""
    webhook_delay: float = Field(default=0.0, ge=0.0)
    """Seconds between a workflow's completion and its first webhook attempt."""
    bulk_answer_delay: float = Field(default=0.0, ge=0.0)
    """Test facility: seconds a bulk request's answer is held back *after* the request was judged (and,
    if accepted, charged) — a slow answer on the wire, for stopping a run with requests in flight."""
    request_log_limit: int = Field(default=200_000, ge=1)
    """Most recent public-API requests kept for `/_sandbox/requests`."""

    # --- unpublished behaviour: which reading to play (CONTRACT.md, "Unpublished"); state.py tells how ---
    results_order: ResultsOrder = "input"
    """Workflow-mode `results` in contact order, or "shuffled" (seeded, the same on every poll)."""
    omit_task_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of tasks (seeded, stable per task) left out of workflow-mode `results` and the webhook,
    though counted in the summary, answered by task_id and charged as usual."""
    unknown_task_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of tasks (seeded, disjoint from the omitted ones) unknown for good: never listed, 404 by
    task_id, and not charged."""
    bulk_task_ids: BulkTaskIds = "listed"
    """The bulk answer's `task_ids`: one per contact in order, "absent" (no key), or "short" (one fewer)."""
    final_word: str = Field(default="completed", min_length=1)
    """The status a `final_word_rate` share of workflows ends with instead of "completed"."""
    final_word_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of workflows (seeded) ending with `final_word`; failed/cancelled ones list no results and
    cost nothing."""
    error_envelope: ErrorEnvelope = "detail"
    """Error bodies as documented (`{"detail": …}`), or the newer surface's `{"error": {"code", "message"}}`
    (where insufficient credits is a 400)."""
    retry_after_ms: bool = False
    """429s also carry a `retry-after-ms` header (milliseconds)."""
    rate_scope: RateScope = "endpoint"
    """One rate window per organization per endpoint, or one per organization for all endpoints."""
    workflow_visible_after: float = Field(default=0.0, ge=0.0)
    """Seconds after acceptance during which workflow-mode status answers 404 (task mode answers)."""
    deliveries_list: DeliveriesList = "deliveries"
    """Where the deliveries log keeps its rows: under `deliveries`, under `data`, or a bare list."""
    deliveries_fields: DeliveriesFields = "documented"
    """Row field names: `attempt`/`status`/`response_code`/`error`/`delivered_at`; "renamed"
    (`attempt_number`/`state` success|failure/`status_code`/`error_message`/`attempted_at`); or "flag"
    (`delivered: bool`, `http_status`, `message`, `timestamp`, no status word)."""
    deliveries_order: DeliveriesOrder = "oldest_first"
    """Row order of the deliveries log."""

    @field_validator("api_key")
    @classmethod
    def _api_key_shape(cls, api_key: str) -> str:
        # Extra keys may be anything (a clext_ key, to prove it is refused); the main one must work.
        if not api_key.startswith(API_KEY_PREFIX):
            raise ValueError(f"api_key must start with {API_KEY_PREFIX!r}")
        return api_key

    @field_validator("webhook_ca_file")
    @classmethod
    def _loadable_ca_file(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ssl.create_default_context().load_verify_locations(cafile=value)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot trust certificates from {value!r}: {exc.strerror or exc}") from None
        return value

    @field_validator("refuse_contacts_containing")
    @classmethod
    def _non_empty_substrings(cls, substrings: tuple[str, ...]) -> tuple[str, ...]:
        # An empty substring is contained in everything: it would refuse every contact.
        if any(not substring for substring in substrings):
            raise ValueError("refuse_contacts_containing needs non-empty substrings")
        return substrings

    @field_validator("rate_limit")
    @classmethod
    def _positive_limit(cls, rate_limit: tuple[int, float] | None) -> tuple[int, float] | None:
        if rate_limit is not None and (rate_limit[0] < 1 or rate_limit[1] <= 0):
            raise ValueError("rate_limit needs at least 1 request per window of more than 0 seconds")
        return rate_limit

    @field_validator("latency")
    @classmethod
    def _sane_latency(cls, latency: float | tuple[float, float]) -> float | tuple[float, float]:
        low, high = (latency, latency) if isinstance(latency, float | int) else latency
        if low < 0 or high < low:
            raise ValueError("latency must be >= 0 seconds, and a range must read min-max with min <= max")
        return latency

    @field_validator("final_word")
    @classmethod
    def _one_word(cls, word: str) -> str:
        if word != word.strip() or not word.strip():
            raise ValueError("final_word must be a non-blank word without surrounding spaces")
        return word

    @model_validator(mode="after")
    def _disjoint_task_shares(self) -> Self:
        # Omitted and unknown tasks are drawn from one number per task, so their shares must fit in 1.
        if self.omit_task_rate + self.unknown_task_rate > 1.0:
            raise ValueError("omit_task_rate + unknown_task_rate must not exceed 1")
        return self

    @model_validator(mode="after")
    def _distinct_keys(self) -> Self:
        keys = [self.api_key, *self.extra_keys, *self.no_api_access_keys]
        if len(set(keys)) != len(keys):
            raise ValueError("api_key, extra_keys and no_api_access_keys must all differ")
        return self

    @property
    def latency_range(self) -> tuple[float, float]:
        """Latency as (min, max), equal for a fixed latency."""
        if isinstance(self.latency, tuple):
            return self.latency
        return (float(self.latency), float(self.latency))
