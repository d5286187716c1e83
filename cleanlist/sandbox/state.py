"""The sandbox's in-memory world: organizations, keys, credits, workflows, rate windows, faults, counters.

Behaviour the contract leaves open ([assumed]) and how this world settles it:

- Keys. `api_key` and every `extra_keys` entry are users of one organization ("org_…" derived from
  the main key): one balance, one set of rate windows. `no_api_access_keys` belong to a second
  organization whose plan lacks API access: they authenticate, then every endpoint (validate-key
  included) answers 403 `{"detail": "Your plan does not include API access"}`. Only keys starting
  with `clapi_` are API keys; a configured `clext_` key is still refused with 401. The scheme word
  "Bearer" is matched case-insensitively, as FastAPI's HTTPBearer does.
- Order of checks: auth → rate limit → injected fault → 400 (empty or > 250 contacts, judged on the
  raw list) → 422 → 402. The 422 is FastAPI's own format for bodies that are not JSON or have wrong
  types (a `contacts` that is not a list cannot be sized, so it gets this 422 rather than a 400), and
  the documented one-item-per-contact format for contacts that break the field rule.
- Rate limit: fixed windows aligned to multiples of the window length on `time.monotonic()`, one per
  organization per endpoint. Nothing is exempt: validate-key spends its own window like every other
  endpoint (the contract exempts nothing). Retry-After is the whole seconds left in the window, rounded
  up, at least 1. Requests refused with 429 are not counted; requests that pass and then fail (fault,
  400, 422, 402) are.
- Billing: charged at acceptance. Results are a pure function of each contact, so the actual cost is
  known when the batch is accepted and debited at once; results become visible after the latency.
  402 when balance < contacts × the type's per-contact maximum (none 0, partial 1, phone_only 10,
  full 11, prospecting_only 1). Two variations below charge less at acceptance: tasks unknown for good,
  and workflows that will end failed or cancelled; the 402 rule is unchanged by either.
- Results: `completed` when anything was found (or for `none`), `failed` when nothing was; a prospecting
  contact is discovered with probability `find_rate`, from the same draw as its email. While a workflow
  is processing, workflow mode shows `results: []` and a summary of zeros except `total`; task mode
  shows `status: "processing"` with the input echoed in `prospect`/`company`.
- Timestamps are ISO 8601 in UTC with an offset (`…+00:00`); `completed_at` is acceptance time plus the
  workflow's latency. `lead_list_id` in the webhook is `ll_` + the workflow's uuid.
- Workflows and tasks are visible only to keys of the organization that submitted them (others: 404).
- `revoke_after_batches` revokes a key right after its Nth accepted batch (the Nth gets its 200).
  Restoring the key disarms this for that key (so a revoke → restore → rerun scenario can finish);
  a restore with `rearm=True` instead starts its count again.
- Test facility, not API behaviour: `refuse_contacts_containing` makes the bulk endpoint refuse, with
  the documented field-rule 422 item (`loc: ["body", "contacts", i]`, the documented msg, `input`), every
  contact any of whose string values as sent contains one of the substrings (case-sensitive). It stands
  in for server-side validation stricter than the client's; such items sit in index order among the
  field-rule items, one per contact.
- Webhooks: 5 attempts; the waits between them are 1, 2, 4, 8 s × `webhook_backoff_scale` (the
  documented 16 s step would only precede a sixth attempt). Any 2xx is delivered; a non-2xx, timeout
  or connection error is a failed attempt. Test facilities (defaults: the documented behaviour):
  `webhook_drop_rate` never sends that share of webhooks (seeded per workflow, no attempt recorded),
  `webhook_results_limit` carries fewer than 250 results (the rest in `results_truncated`),
  `webhook_delay` waits that long after completion before the first attempt. Receiver failures, without
  reaching it: `webhook_fail_rate` answers 502 for that share of attempts (seeded per workflow and
  attempt), `webhook_down_seconds` refuses every attempt for that long after the first accepted bulk.
  https deliveries trust publicly trusted certificates only (an untrusted one is a failed attempt with
  the TLS error); `webhook_ca_file` also trusts the certificates in that PEM file (a test receiver's).
- Error bodies the docs do not give: injected 500 `Internal server error`, 502 `Bad gateway`,
  503 `Service temporarily unavailable`, 504 `Gateway timeout` (all as `{"detail": …}`); only 429s
  carry Retry-After. A deliveries call without workflow_id gets FastAPI's missing-query 422.
- `webhook_url` is any string; one that cannot be reached (or parsed) just yields failed attempts.
- IDs: `org_`/`user_` + 16 hex digits derived from the key, stable across runs.
- `/_sandbox/reset` clears the request counters, the request log and the acceptance counters
  (contacts, duplicates, batches, credits charged); balance, keys, workflows and rate windows remain.

Variations. Each reading the contract lists under "Unpublished" can be played; every option defaults to
the reading above. They are SandboxConfig fields (so `make_sandbox(**config)` takes them) and flags of
`cleanlist-enrich sandbox`. Draws are seeded by `seed` and the workflow's serial (its place in the order
of acceptance), so a rerun of the same submissions plays the same variations:

- `results_order="shuffled"` (`--results-order shuffled`): workflow-mode `results` (and the webhook's)
  come in a shuffled order, the same on every poll of that workflow. Default "input": contact order.
- `omit_task_rate=F` (`--omit-task-rate F`): that share of each workflow's tasks (one draw per task,
  stable) is left out of workflow-mode `results` and of the webhook, while `summary`, `total_contacts`
  and the charge still cover every task, and `?task_id=` answers them normally.
- `unknown_task_rate=F` (`--unknown-task-rate F`): that share of tasks is unknown for good: never
  listed, 404 `Task not found` by task_id (from acceptance on), and charged nothing: the charge at
  acceptance leaves them out, so does the summary's successful/emails_found/phones_found, and
  `failed = total - successful` counts them as failed (`total` stays the number of contacts). Their
  ids are still handed out by the bulk answer. The two shares come from one draw per task (unknown
  below `unknown_task_rate`, omitted in the next `omit_task_rate`), so they never overlap and must add
  up to at most 1.
- `bulk_task_ids` (`--bulk-task-ids`): "listed" (one per contact, in order), "absent" (the bulk answer
  has no `task_ids` key), "short" (the last one is missing). The workflow keeps all its tasks: status
  answers list every task id, and each result's `prospect` echoes the names and linkedin_url as sent
  (stripped), so a client can join by them.
- `final_word=W` with `final_word_rate=F` (`--final-word W --final-word-rate F`): that share of
  workflows (one draw per workflow) ends with status W instead of "completed". For "failed",
  "cancelled" (or "canceled") the workflow is never charged (the charge at acceptance is 0, so there is
  nothing to refund), lists `results: []`, its summary counts every task as failed with nothing found,
  and each task answers status "failed" with nothing found; `completed_at` still names when it ended,
  and its webhook carries the word and no results. For any other word the results and the charge are
  as for "completed".
- `error_envelope="error"` (`--error-envelope error`): every public-API error body is
  `{"error": {"code": "<snake_case>", "message": "<the documented detail text>"}}`. Codes: 400
  `bad_request`; insufficient credits becomes a **400** `insufficient_credits`; 401 `unauthorized` when
  no Bearer credentials were sent (no header, another scheme) and `invalid_api_key` for a Bearer token
  that is not a live API key (unknown, revoked, clext_, malformed); 403 `forbidden`; 404 `not_found`;
  422 `validation_error`; 429 `rate_limit_exceeded`; 500 `internal_error`, 502 `bad_gateway`, 503
  `service_unavailable`, 504 `gateway_timeout`. A 429 whose wait is known (the rate limit, or an
  injected 429 with integer seconds) carries `"retry_after_ms": <int>` inside the `error` object. A 422
  keeps the documented items, unchanged, as a list under `error.details`:
  `{"error": {"code": "validation_error", "message": "Request validation failed", "details": [{"type",
  "loc": ["body", "contacts", <index>], "msg", "input"}, …]}}`. Admin routes keep `{"detail": …}`;
  the request log and counters record the status answered (so 400, not 402).
- `retry_after_ms=True` (`--retry-after-ms`): a 429 also carries `retry-after-ms`: the milliseconds
  left in the window (rounded up, at least 1) for the rate limit, Retry-After × 1000 for an injected
  429 with integer seconds, and nothing for an injected 429 whose Retry-After is a string or absent.
- `rate_scope="organization"` (`--rate-scope organization`): one window per organization shared by all
  five endpoints (the older docs' reading) instead of one per endpoint.
- `workflow_visible_after=S` (`--workflow-visible-after S`): for S seconds after acceptance,
  `?workflow_id=` answers 404 `Workflow not found` (not yet visible) while `?task_id=` already answers;
  the deliveries endpoint is not delayed.
- The deliveries log (`GET /webhooks/deliveries`, field names unpublished): `deliveries_list`
  (`--deliveries-list data|bare`) keeps the rows under `data` or answers a bare list instead of under
  `deliveries`; `deliveries_fields="renamed"` names them `attempt_number`, `state` (`success`/`failure`),
  `status_code`, `error_message`, `attempted_at`; `"flag"` gives `delivered: bool`, `http_status`,
  `message`, `timestamp` and no status word; `deliveries_order="newest_first"` lists the last attempt first.
- Forgetting (the API restarted without memory): `POST /_sandbox/forget` (`SandboxServer.forget()`)
  drops every workflow: workflow, task and deliveries lookups of earlier workflows answer 404 and their
  pending webhook attempts stop. Balance, charges, keys and counters stay. An event, not a setting, so
  it has no config field or flag.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cleanlist.sandbox.config import (
    API_KEY_PREFIX,
    ENDPOINTS,
    FAILED_FINAL_WORDS,
    Endpoint,
    EnrichmentType,
    FaultSpec,
    SandboxConfig,
)
from cleanlist.sandbox.contacts import ContactRecord, Lookup, lookup
from cleanlist.sandbox.faults import FaultInjector
from cleanlist.sandbox.ratelimit import FixedWindowLimiter
from cleanlist.sandbox.results import (
    MAX_COST_PER_CONTACT,
    outcome_of,
    pending_result,
    task_result,
    unfound_result,
)

NOT_AUTHENTICATED = "Not authenticated"
NO_API_ACCESS = "Your plan does not include API access"
RATE_LIMITED = "Rate limit exceeded"
INSUFFICIENT_CREDITS = "Insufficient credits"
WORKFLOW_NOT_FOUND = "Workflow not found"
TASK_NOT_FOUND = "Task not found"
FAULT_DETAILS: dict[int, str] = {
    429: RATE_LIMITED,
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service temporarily unavailable",
    504: "Gateway timeout",
}
RESULTS_ENDPOINT = "/api/v1/public/enrich/status?workflow_id="
# A task id's index inside its workflow fits in 8 bits: batches hold at most 250 contacts.
_INDEX_BITS = 8
_NO_TASKS: frozenset[int] = frozenset()
# The rate scope of `rate_scope="organization"`: one window shared by every endpoint.
_ALL_ENDPOINTS = "*"
# 401 codes of the "error" envelope: no Bearer credentials at all, or a token that is no live API key.
UNAUTHORIZED = "unauthorized"
INVALID_API_KEY = "invalid_api_key"


class ApiRefusal(Exception):
    """The API answers with an error instead of doing the work."""

    def __init__(
        self,
        status: int,
        detail: str,
        retry_after: int | str | None = None,
        *,
        retry_after_ms: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(f"{status} {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
        self.retry_after_ms = retry_after_ms
        """The wait in milliseconds, when known (for `retry-after-ms` and the "error" envelope)."""
        self.code = code
        """The "error" envelope's code, when the status alone does not tell it (401)."""


@dataclass(slots=True)
class Organization:
    """Who pays, and whether their plan includes the API."""

    organization_id: str
    credits: float
    api_access: bool


@dataclass(slots=True)
class ApiKey:
    """One key of one user; revocable."""

    key: str
    user_id: str
    organization: Organization
    revoked: bool = False
    batches_accepted: int = 0
    revoke_armed: bool = True
    """Whether `revoke_after_batches` still applies to this key (a plain restore disarms it)."""


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One POST of a webhook, as `/webhooks/deliveries` reports it."""

    attempt: int
    status: str
    response_code: int | None
    error: str | None
    delivered_at: str


@dataclass(slots=True)
class Workflow:
    """An accepted batch, stored compactly: results are regenerated from `contacts` on demand."""

    serial: int
    workflow_id: str
    organization_id: str
    enrichment_type: EnrichmentType
    accepted_at: float
    """Monotonic clock at acceptance."""
    ready_at: float
    """Monotonic clock at completion: accepted_at + the workflow's latency."""
    completed_at: str
    webhook_url: str | None
    task_ids: bytes
    """16 bytes per contact, in order."""
    contacts: list[str]
    """`ContactRecord.pack()` per contact, in order."""
    successful: int
    emails_found: int
    phones_found: int
    cost: float
    deliveries: list[DeliveryAttempt] = field(default_factory=list)
    final_status: str = "completed"
    """The status it shows once complete (`final_word` for a `final_word_rate` share)."""
    omitted: frozenset[int] = _NO_TASKS
    """Indexes left out of workflow-mode results (`omit_task_rate`)."""
    unknown: frozenset[int] = _NO_TASKS
    """Indexes unknown for good (`unknown_task_rate`): never listed, 404 by task_id, not charged."""
    asked: bool = False
    """Whether a client ever asked about it (status by workflow or task id, deliveries) or a webhook
    delivered it: a charged workflow never asked about is a payment whose answer was lost."""

    @property
    def ends_unfound(self) -> bool:
        """Whether it ends failed or cancelled: no results, nothing found, nothing charged."""
        return self.final_status in FAILED_FINAL_WORDS

    @property
    def total(self) -> int:
        """Contacts in the batch."""
        return len(self.contacts)

    def task_id(self, index: int) -> str:
        """The uuid string of the index-th task."""
        return str(uuid.UUID(bytes=self.task_ids[index * 16 : index * 16 + 16]))


def _digest_id(prefix: str, secret: str) -> str:
    return prefix + hashlib.sha256(secret.encode()).hexdigest()[:16]


def _uuid4_block(count: int) -> bytes:
    """`count` random version-4 uuids as one bytes object (one urandom call instead of `count`)."""
    block = bytearray(os.urandom(16 * count))
    for offset in range(0, len(block), 16):
        block[offset + 6] = (block[offset + 6] & 0x0F) | 0x40
        block[offset + 8] = (block[offset + 8] & 0x3F) | 0x80
    return bytes(block)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def _unit_draw(text: str) -> float:
    """A number in [0, 1) fixed by `text`: a per-task draw without a RNG object per task."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8]) / float(1 << 64)


class SandboxState:
    """Everything the sandbox remembers; every public method is thread-safe."""

    def __init__(self, config: SandboxConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.started_at = clock()
        self._first_accepted_at: float | None = None  # clock at the first accepted bulk request
        self._lock = threading.RLock()
        self._latency_rng = random.Random(config.seed)
        self._limiter = FixedWindowLimiter(*config.rate_limit) if config.rate_limit else None
        self._faults = FaultInjector(config.faults, config.seed)
        self._refused_substrings: tuple[str, ...] = config.refuse_contacts_containing
        self._latency_range: tuple[float, float] = config.latency_range

        self.organization = Organization(_digest_id("org_", config.api_key), config.credits, True)
        no_access = Organization(_digest_id("org_", "no-api:" + config.api_key), 0.0, False)
        self._keys: dict[str, ApiKey] = {}
        for key in (config.api_key, *config.extra_keys):
            self._keys[key] = ApiKey(key, _digest_id("user_", key), self.organization)
        for key in config.no_api_access_keys:
            self._keys[key] = ApiKey(key, _digest_id("user_", key), no_access)

        # serial -> workflow; serials keep counting after `forget`, so draws never repeat.
        self._workflows: dict[int, Workflow] = {}
        self._next_serial = 0
        self._workflows_by_id: dict[str, Workflow] = {}
        # uuid int -> serial << 8 | index: a task lookup without a dict per task.
        self._tasks: dict[int, int] = {}
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._requests: dict[str, dict[str, int]] = {endpoint: {} for endpoint in ENDPOINTS}
        self._log: deque[tuple[float, str, int, int | None, int | None]] = deque(
            maxlen=self.config.request_log_limit
        )
        self._contacts_accepted = 0
        self._bulk_accepted = 0
        self._credits_charged = 0.0
        # identity digest -> serial of the last batch that carried it; -1 once counted as a repeat.
        self._seen: dict[int, int] = {}
        self._repeated = 0
        self._webhooks_delivered = 0
        self._last_webhook_t: float | None = None  # request-log time of the last delivered webhook

    # --- the request path -------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> ApiKey:
        """Resolve `Authorization: Bearer clapi_…` to a live key, or refuse with 401/403."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiRefusal(401, NOT_AUTHENTICATED, code=UNAUTHORIZED)
        if not token.startswith(API_KEY_PREFIX):
            raise ApiRefusal(401, NOT_AUTHENTICATED, code=INVALID_API_KEY)
        with self._lock:
            key = self._keys.get(token)
            if key is None or key.revoked:
                raise ApiRefusal(401, NOT_AUTHENTICATED, code=INVALID_API_KEY)
            if not key.organization.api_access:
                raise ApiRefusal(403, NO_API_ACCESS)
            return key

    def admit(self, key: ApiKey, endpoint: Endpoint) -> None:
        """Apply the rate limit (every endpoint, validate-key included), then any injected fault."""
        with self._lock:
            if self._limiter is not None:
                scope = endpoint if self.config.rate_scope == "endpoint" else _ALL_ENDPOINTS
                wait = self._limiter.admit(key.organization.organization_id, scope, self.clock())
                if wait is not None:
                    # Rounded up, so a client that waits exactly this long lands in the next window.
                    seconds, millis = max(1, math.ceil(wait)), max(1, math.ceil(wait * 1000))
                    raise ApiRefusal(429, RATE_LIMITED, seconds, retry_after_ms=millis)
            fault = self._faults.draw(endpoint)
        if fault is not None:
            hint = fault.retry_after if fault.status == 429 else None
            # Only a hint in whole seconds has a millisecond form; a string or no hint has none.
            hint_ms = hint * 1000 if isinstance(hint, int) else None
            raise ApiRefusal(fault.status, FAULT_DETAILS[fault.status], hint, retry_after_ms=hint_ms)

    def accept_bulk(
        self,
        key: ApiKey,
        enrichment_type: EnrichmentType,
        webhook_url: str | None,
        records: Sequence[ContactRecord],
    ) -> Workflow:
        """Accept a validated batch: check the worst case against the balance, then charge what is found.

        Tasks unknown for good, and every task of a workflow that will end failed or cancelled, are not
        charged (see the variations in the module docstring).
        """
        findings = [lookup(record, self.config.find_rate, self.config.phone_rate) for record in records]
        outcomes = [outcome_of(found, enrichment_type) for found in findings]
        worst_case = len(records) * MAX_COST_PER_CONTACT[enrichment_type]
        with self._lock:
            organization = key.organization
            if organization.credits < worst_case:
                raise ApiRefusal(402, INSUFFICIENT_CREDITS)
            serial = self._next_serial
            self._next_serial += 1
            final_status = self._final_status(serial)
            omitted, unknown = self._task_fates(serial, len(records))
            if final_status in FAILED_FINAL_WORDS:
                outcomes = []
            elif unknown:
                outcomes = [outcome for index, outcome in enumerate(outcomes) if index not in unknown]
            cost = sum(outcome.cost for outcome in outcomes)
            organization.credits -= cost
            workflow_uuid = uuid.uuid4()
            low, high = self._latency_range
            latency = self._latency_rng.uniform(low, high) if high > low else low
            accepted_at = self.clock()
            workflow = Workflow(
                serial=serial,
                workflow_id=f"public_bulk_{workflow_uuid}",
                organization_id=organization.organization_id,
                enrichment_type=enrichment_type,
                accepted_at=accepted_at,
                ready_at=accepted_at + latency,
                completed_at=_iso(datetime.now(UTC) + timedelta(seconds=latency)),
                webhook_url=webhook_url,
                task_ids=_uuid4_block(len(records)),
                contacts=[record.pack() for record in records],
                successful=sum(outcome.status(enrichment_type) == "completed" for outcome in outcomes),
                emails_found=sum(outcome.email for outcome in outcomes),
                phones_found=sum(outcome.phone for outcome in outcomes),
                cost=cost,
                final_status=final_status,
                omitted=omitted,
                unknown=unknown,
            )
            if self._first_accepted_at is None:
                self._first_accepted_at = self.clock()
            self._workflows[serial] = workflow
            self._workflows_by_id[workflow.workflow_id] = workflow
            base = serial << _INDEX_BITS
            for index in range(len(records)):
                if index in unknown:
                    continue
                task_bytes = workflow.task_ids[index * 16 : index * 16 + 16]
                self._tasks[int.from_bytes(task_bytes)] = base | index
            # A workflow that ends failed or cancelled serves and charges none of its contacts: like
            # tasks unknown for good, sending them again is the only way to an answer, not a repeat.
            unserved = frozenset(range(len(records))) if final_status in FAILED_FINAL_WORDS else unknown
            self._count_acceptance(serial, findings, cost, unserved)
            key.batches_accepted += 1
            limit = self.config.revoke_after_batches
            if limit is not None and key.revoke_armed and key.batches_accepted >= limit:
                key.revoked = True
            return workflow

    def _final_status(self, serial: int) -> str:
        """The status the serial-th workflow ends with: `final_word` for a seeded share, else completed."""
        rate = self.config.final_word_rate
        if rate > 0 and random.Random(f"{self.config.seed}:final-word:{serial}").random() < rate:
            return self.config.final_word
        return "completed"

    def _task_fates(self, serial: int, count: int) -> tuple[frozenset[int], frozenset[int]]:
        """Indexes of the serial-th workflow's tasks to omit and to lose; one draw per task, disjoint."""
        omit_rate, unknown_rate = self.config.omit_task_rate, self.config.unknown_task_rate
        if omit_rate == 0 and unknown_rate == 0:
            return _NO_TASKS, _NO_TASKS
        omitted: set[int] = set()
        unknown: set[int] = set()
        for index in range(count):
            draw = _unit_draw(f"{self.config.seed}:task:{serial}:{index}")
            if draw < unknown_rate:
                unknown.add(index)
            elif draw < unknown_rate + omit_rate:
                omitted.add(index)
        return frozenset(omitted), frozenset(unknown)

    def _count_acceptance(
        self, serial: int, findings: Sequence[Lookup], cost: float, unknown: frozenset[int] = _NO_TASKS
    ) -> None:
        self._bulk_accepted += 1
        self._contacts_accepted += len(findings)
        self._credits_charged += cost
        seen = self._seen
        for index, found in enumerate(findings):
            # A task unknown for good (or of a failed or cancelled workflow) was neither served nor
            # charged: the contact sent again (the only way to its answer) is not a second payment, so
            # neither acceptance counts as a repeat.
            if index in unknown:
                continue
            last = seen.get(found.identity_key)
            if last is None:
                seen[found.identity_key] = serial
            elif last not in (serial, -1):
                seen[found.identity_key] = -1
                self._repeated += 1

    def find_workflow(self, key: ApiKey, workflow_id: str, *, status_mode: bool = False) -> Workflow:
        """The caller's organization's workflow, or 404.

        `status_mode` (the status endpoint's workflow mode) also answers 404 while the workflow is not
        yet visible (`workflow_visible_after`).
        """
        with self._lock:
            workflow = self._workflows_by_id.get(workflow_id)
        if workflow is None or workflow.organization_id != key.organization.organization_id:
            raise ApiRefusal(404, WORKFLOW_NOT_FOUND)
        if status_mode and self.clock() < workflow.accepted_at + self.config.workflow_visible_after:
            raise ApiRefusal(404, WORKFLOW_NOT_FOUND)
        workflow.asked = True
        return workflow

    def remembers(self, workflow: Workflow) -> bool:
        """Whether the workflow is still known (not dropped by `forget`)."""
        with self._lock:
            return self._workflows_by_id.get(workflow.workflow_id) is workflow

    def find_task(self, key: ApiKey, task_id: str) -> tuple[Workflow, int]:
        """The workflow holding a task of the caller's organization, and the task's index; or 404."""
        try:
            task_int = uuid.UUID(task_id).int
        except ValueError:
            raise ApiRefusal(404, TASK_NOT_FOUND) from None
        with self._lock:
            packed = self._tasks.get(task_int)
            if packed is None:
                raise ApiRefusal(404, TASK_NOT_FOUND)
            workflow = self._workflows[packed >> _INDEX_BITS]
        if workflow.organization_id != key.organization.organization_id:
            raise ApiRefusal(404, TASK_NOT_FOUND)
        workflow.asked = True
        return workflow, packed & ((1 << _INDEX_BITS) - 1)

    def balance(self, key: ApiKey | None = None) -> float:
        """Credits of the key's organization (the main one by default)."""
        with self._lock:
            return (key.organization if key else self.organization).credits

    # --- views ------------------------------------------------------------------------------------

    def is_complete(self, workflow: Workflow) -> bool:
        """Completion is computed lazily: nothing runs in the background to finish a workflow."""
        return self.clock() >= workflow.ready_at

    def _result(self, workflow: Workflow, index: int, complete: bool) -> dict[str, Any]:
        record = ContactRecord.unpack(workflow.contacts[index])
        task_id = workflow.task_id(index)
        if not complete:
            return pending_result(task_id, record)
        if workflow.ends_unfound:
            return unfound_result(task_id, record, "failed")
        found = lookup(record, self.config.find_rate, self.config.phone_rate)
        return task_result(task_id, record, found, workflow.enrichment_type)

    def _summary(self, workflow: Workflow, complete: bool) -> dict[str, int]:
        if not complete:
            return {
                "total": workflow.total,
                "successful": 0,
                "failed": 0,
                "emails_found": 0,
                "phones_found": 0,
            }
        return {
            "total": workflow.total,
            "successful": workflow.successful,
            "failed": workflow.total - workflow.successful,
            "emails_found": workflow.emails_found,
            "phones_found": workflow.phones_found,
        }

    def _listed(self, workflow: Workflow) -> list[int]:
        """Indexes of the tasks a complete workflow lists, in the order it lists them."""
        if workflow.ends_unfound:
            return []
        order = list(range(workflow.total))
        if self.config.results_order == "shuffled":
            random.Random(f"{self.config.seed}:order:{workflow.serial}").shuffle(order)
        hidden = workflow.omitted | workflow.unknown
        return [index for index in order if index not in hidden] if hidden else order

    def workflow_view(self, workflow: Workflow, results_limit: int | None = None) -> dict[str, Any]:
        """The status endpoint's workflow-mode body (and the webhook's core)."""
        complete = self.is_complete(workflow)
        listed = self._listed(workflow) if complete else []
        if results_limit is not None:
            listed = listed[:results_limit]
        return {
            "workflow_id": workflow.workflow_id,
            "status": workflow.final_status if complete else "processing",
            "enrichment_type": workflow.enrichment_type,
            "total_contacts": workflow.total,
            "summary": self._summary(workflow, complete),
            "results": [self._result(workflow, index, True) for index in listed],
            "completed_at": workflow.completed_at if complete else None,
        }

    def task_view(self, workflow: Workflow, index: int) -> dict[str, Any]:
        """The status endpoint's task-mode body."""
        return {
            **self._result(workflow, index, self.is_complete(workflow)),
            "workflow_id": workflow.workflow_id,
        }

    def webhook_dropped(self, workflow: Workflow) -> bool:
        """Whether this workflow's webhook is never sent (`webhook_drop_rate`, seeded per workflow)."""
        rate = self.config.webhook_drop_rate
        return rate > 0 and random.Random(f"{self.config.seed}:drop:{workflow.serial}").random() < rate

    def webhook_fault(self, workflow: Workflow, attempt: int) -> tuple[int | None, str] | None:
        """An injected receiver failure for this attempt (`webhook_down_seconds`, `webhook_fail_rate`):
        (response code or None, error message), or None to send it."""
        config = self.config
        first = self._first_accepted_at
        if first is not None and self.clock() - first < config.webhook_down_seconds:
            return None, "ConnectError: [Errno 111] Connection refused (receiver down: test facility)"
        draw = _unit_draw(f"{config.seed}:webhook-fail:{workflow.serial}:{attempt}")
        if config.webhook_fail_rate and draw < config.webhook_fail_rate:
            return 502, "Receiver answered HTTP 502"
        return None

    def webhook_payload(self, workflow: Workflow) -> dict[str, Any]:
        """The `enrichment.completed` body: at most `webhook_results_limit` (250) results, the rest left
        to the status endpoint."""
        limit = self.config.webhook_results_limit
        view = self.workflow_view(workflow, limit)
        return {
            "event": "enrichment.completed",
            "workflow_id": workflow.workflow_id,
            "lead_list_id": "ll_" + workflow.workflow_id.removeprefix("public_bulk_"),
            "enrichment_type": workflow.enrichment_type,
            "status": view["status"],
            "summary": view["summary"],
            "results": view["results"],
            "results_limit": limit,
            "results_truncated": max(0, workflow.total - limit),
            "results_endpoint": RESULTS_ENDPOINT + workflow.workflow_id,
            "completed_at": view["completed_at"],
        }

    def record_delivery(self, workflow: Workflow, attempt: DeliveryAttempt) -> None:
        """Remember one webhook attempt."""
        with self._lock:
            workflow.deliveries.append(attempt)
            if attempt.status == "delivered":
                workflow.asked = True
                self._webhooks_delivered += 1
                self._last_webhook_t = self.clock() - self.started_at

    def deliveries_view(self, workflow: Workflow) -> dict[str, Any] | list[dict[str, Any]]:
        """The webhook-deliveries body, in the shape `deliveries_list`/`deliveries_fields` say."""
        with self._lock:
            attempts = list(workflow.deliveries)
        if self.config.deliveries_order == "newest_first":
            attempts.reverse()
        rows = [_delivery_row(attempt, self.config.deliveries_fields) for attempt in attempts]
        if self.config.deliveries_list == "bare":
            return rows
        return {"workflow_id": workflow.workflow_id, self.config.deliveries_list: rows}

    # --- bookkeeping ------------------------------------------------------------------------------

    def record_request(
        self, endpoint: Endpoint, status: int, contacts: int | None, retry_after: int | str | None
    ) -> None:
        """Count one public-API answer and append it to the request log."""
        logged_retry_after = retry_after if isinstance(retry_after, int) else None
        with self._lock:
            by_status = self._requests[endpoint]
            code = str(status)
            by_status[code] = by_status.get(code, 0) + 1
            self._log.append((self.clock() - self.started_at, endpoint, status, contacts, logged_retry_after))

    def counters(self) -> dict[str, Any]:
        """What `/_sandbox/counters` reports."""
        with self._lock:
            return {
                "requests": {endpoint: dict(by_status) for endpoint, by_status in self._requests.items()},
                "contacts_accepted": self._contacts_accepted,
                "contacts_accepted_more_than_once": self._repeated,
                "bulk_accepted": self._bulk_accepted,
                "credits_charged": self._credits_charged,
                # Charged for workflows nobody ever asked about: answers lost (a kill on the wire).
                "credits_of_workflows_never_asked": sum(
                    w.cost for w in self._workflows.values() if not w.asked
                ),
                "balance": self.organization.credits,
                "webhooks_delivered": self._webhooks_delivered,
                "last_webhook_delivered_t": self._last_webhook_t,
            }

    def request_log(self) -> list[dict[str, Any]]:
        """What `/_sandbox/requests` reports, oldest first."""
        with self._lock:
            entries = list(self._log)
        return [
            {"t": t, "endpoint": endpoint, "status": status, "contacts": contacts, "retry_after": retry_after}
            for t, endpoint, status, contacts, retry_after in entries
        ]

    def reset(self) -> None:
        """Forget counters and the request log; the world itself stays."""
        with self._lock:
            self._reset_counters()

    def forget(self) -> int:
        """Drop every workflow, as an API restarted without memory would; returns how many were dropped."""
        with self._lock:
            dropped = len(self._workflows)
            self._workflows.clear()
            self._workflows_by_id.clear()
            self._tasks.clear()
            return dropped

    # --- admin ------------------------------------------------------------------------------------

    def add_credits(self, amount: float) -> float:
        """Top up the main organization; returns the new balance."""
        with self._lock:
            self.organization.credits += amount
            return self.organization.credits

    def set_credits(self, amount: float) -> float:
        """Set the main organization's balance; returns it."""
        with self._lock:
            self.organization.credits = amount
            return self.organization.credits

    def set_latency(self, seconds: float) -> int:
        """Test facility: workflows accepted from now on take `seconds`, and every workflow still running
        completes at the latest `seconds` from now (as if it had been that fast); returns how many were
        brought forward. Unless called, the configured latency holds."""
        with self._lock:
            self._latency_range = (seconds, seconds)
            now = self.clock()
            wall = datetime.now(UTC)
            moved = 0
            for workflow in self._workflows.values():
                if workflow.ready_at > now + seconds:
                    workflow.ready_at = now + seconds
                    workflow.completed_at = _iso(wall + timedelta(seconds=seconds))
                    moved += 1
            return moved

    def set_rate_limit(self, rate_limit: tuple[int, float] | None) -> None:
        """Test facility: replace the rate limit, (requests, window seconds) or None for none, with
        fresh windows. Unless called, the configured limit holds."""
        with self._lock:
            self._limiter = FixedWindowLimiter(*rate_limit) if rate_limit else None

    def set_revoked(self, api_key: str, revoked: bool, *, rearm: bool = False) -> bool:
        """Revoke or restore a configured key; False when the key is unknown.

        Restoring disarms `revoke_after_batches` for the key; with `rearm` it is armed again instead,
        counting from zero.
        """
        with self._lock:
            key = self._keys.get(api_key)
            if key is None:
                return False
            key.revoked = revoked
            if not revoked:
                key.batches_accepted = 0
                key.revoke_armed = rearm
            return True

    def is_revoked(self, api_key: str) -> bool:
        """Whether a configured key is revoked (unknown keys count as revoked)."""
        with self._lock:
            key = self._keys.get(api_key)
            return key is None or key.revoked

    def refuses(self, contact: Any) -> bool:
        """Whether the `refuse_contacts_containing` test facility refuses this contact (as sent)."""
        substrings = self._refused_substrings  # replaced whole, never mutated: no lock needed to read
        if not substrings or not isinstance(contact, Mapping):
            return False
        values = [value for value in contact.values() if isinstance(value, str)]
        return any(substring in value for value in values for substring in substrings)

    def set_refused_substrings(self, substrings: Sequence[str]) -> None:
        """Replace the substrings of `refuse_contacts_containing` (empty: refuse nothing)."""
        if any(not substring for substring in substrings):
            raise ValueError("refuse_contacts_containing needs non-empty substrings")
        with self._lock:
            self._refused_substrings = tuple(substrings)

    def refused_substrings(self) -> tuple[str, ...]:
        """The substrings of `refuse_contacts_containing` in force."""
        with self._lock:
            return self._refused_substrings

    def set_faults(self, faults: Mapping[Endpoint, FaultSpec]) -> None:
        """Replace the injected faults."""
        with self._lock:
            self._faults.replace(faults)

    def faults(self) -> dict[Endpoint, FaultSpec]:
        """The injected faults in force."""
        with self._lock:
            return self._faults.specs()


def _delivery_row(attempt: DeliveryAttempt, fields: str) -> dict[str, Any]:
    """One attempt as the deliveries log shows it under the `deliveries_fields` reading."""
    if fields == "renamed":
        return {
            "attempt_number": attempt.attempt,
            "state": "success" if attempt.status == "delivered" else "failure",
            "status_code": attempt.response_code,
            "error_message": attempt.error,
            "attempted_at": attempt.delivered_at,
        }
    if fields == "flag":
        return {
            "attempt": attempt.attempt,
            "delivered": attempt.status == "delivered",
            "http_status": attempt.response_code,
            "message": attempt.error,
            "timestamp": attempt.delivered_at,
        }
    return {
        "attempt": attempt.attempt,
        "status": attempt.status,
        "response_code": attempt.response_code,
        "error": attempt.error,
        "delivered_at": attempt.delivered_at,
    }
