"""The Cleanlist client against the sandbox over real HTTP: every row of the policy table, the success
shapes, the async client, and the limiter both clients share. MockTransport and raw sockets only where a
byte-level fault is the point (malformed JSON, a cut body, a peer that never answers)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from cleanlist.client import AsyncCleanlistClient, CleanlistClient
from cleanlist.errors import (
    POLICY,
    Action,
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    InsufficientCreditsError,
    InvalidContact,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    UnprocessableEntityError,
    policy_for,
)
from cleanlist.models import (
    BulkEnrichResponse,
    CreditsBalance,
    KeyValidation,
    TaskResult,
    WebhookDeliveries,
    WorkflowStatus,
)
from cleanlist.ratelimit import RateLimiter
from cleanlist.sandbox import FaultSpec, SandboxServer
from cleanlist.settings import CleanlistSettings, RateLimit
from tests.sandbox_helpers import RawServer, WebhookReceiver, people, refused_url

StartSandbox = Callable[..., SandboxServer]

FIELD_RULE = (
    "Each contact must include linkedin_url OR first_name + last_name + (company_domain or company_name)."
)
WRONG_KEY = "clapi_" + "wrong000" * 8
EXTENSION_KEY = "clext_" + "browser0" * 8
NO_API_KEY = "clapi_" + "noaccess" * 8
ANY_KEY = "clapi_" + "mocked00" * 8
UNKNOWN_TASK = "3f0e5a5e-8f35-4d2b-9a51-3f5c9f1d2a11"


def client_for(sandbox: SandboxServer, key: str | None = None, **options: Any) -> CleanlistClient:
    """A blocking client on the sandbox; its own limit is generous unless a test sets one."""
    options.setdefault("rate_limit", "1000/1")
    return CleanlistClient(key or sandbox.api_key, base_url=sandbox.base_url, **options)


def async_client_for(sandbox: SandboxServer, key: str | None = None, **options: Any) -> AsyncCleanlistClient:
    options.setdefault("rate_limit", "1000/1")
    return AsyncCleanlistClient(key or sandbox.api_key, base_url=sandbox.base_url, **options)


def mocked(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> CleanlistClient:
    """A client whose every request is answered by `handler` (each mock gets its own fake host)."""
    host = f"http://mock-{uuid.uuid4().hex[:8]}.test"
    return CleanlistClient(ANY_KEY, base_url=host, transport=httpx.MockTransport(handler), **options)


def raised(call: Callable[[], object]) -> APIError:
    """The APIError a call raises (fails the test when it raises nothing)."""
    with pytest.raises(APIError) as caught:
        call()
    return caught.value


def action_of(error: BaseException) -> Action:
    policy = policy_for(error)
    assert policy is not None, f"no policy for {type(error).__name__}"
    return policy.action


@pytest.fixture
def start_sandbox(make_sandbox: StartSandbox) -> StartSandbox:
    """Sandboxes that finish at once and do not rate-limit, unless a test says otherwise."""

    def start(**overrides: Any) -> SandboxServer:
        return make_sandbox(**{"latency": 0.0, "rate_limit": None, **overrides})

    return start


@pytest.fixture
def sandbox(start_sandbox: StartSandbox) -> SandboxServer:
    return start_sandbox(extra_keys=(EXTENSION_KEY,), no_api_access_keys=(NO_API_KEY,))


# --- the policy table, row by row, over real HTTP ---------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One way to provoke one policy row from the sandbox."""

    call: Callable[[CleanlistClient], object]
    error: type[APIStatusError]
    status: int
    action: Action
    detail: Any
    sandbox: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    before: Callable[[SandboxServer], None] | None = None


def _fault(endpoint: str, status: int) -> dict[str, Any]:
    return {"faults": {endpoint: FaultSpec(sequence=(status,))}}


ROWS: dict[str, Row] = {
    "400-empty-batch": Row(
        lambda c: c.enrich_bulk([]), BadRequestError, 400, Action.FAIL, "At least one contact is required."
    ),
    "400-251-contacts": Row(
        lambda c: c.enrich_bulk(people(251)),
        BadRequestError,
        400,
        Action.FAIL,
        "Bulk enrichment supports up to 250 contacts per request.",
    ),
    "400-status-both-ids": Row(
        lambda c: c.enrich_status(workflow_id="public_bulk_x", task_id=UNKNOWN_TASK),
        BadRequestError,
        400,
        Action.FAIL,
        "Provide exactly one of workflow_id or task_id.",
    ),
    "400-status-no-id": Row(
        lambda c: c.enrich_status(),
        BadRequestError,
        400,
        Action.FAIL,
        "Provide exactly one of workflow_id or task_id.",
    ),
    "401-wrong-key": Row(
        lambda c: c.validate_key(),
        AuthenticationError,
        401,
        Action.FAIL_FAST,
        "Not authenticated",
        key=WRONG_KEY,
    ),
    "401-revoked-key": Row(
        lambda c: c.credits_balance(),
        AuthenticationError,
        401,
        Action.FAIL_FAST,
        "Not authenticated",
        before=lambda s: s.revoke_key(),
    ),
    "401-clext-key": Row(
        lambda c: c.enrich_bulk(people(1)),
        AuthenticationError,
        401,
        Action.FAIL_FAST,
        "Not authenticated",
        key=EXTENSION_KEY,
    ),
    "402-insufficient-credits": Row(
        lambda c: c.enrich_bulk(people(3), enrichment_type="partial"),
        InsufficientCreditsError,
        402,
        Action.PAUSE,
        "Insufficient credits",
        sandbox={"credits": 2.0},
    ),
    "403-plan-without-api": Row(
        lambda c: c.credits_balance(),
        PermissionDeniedError,
        403,
        Action.FAIL_FAST,
        "Your plan does not include API access",
        key=NO_API_KEY,
    ),
    "404-unknown-workflow": Row(
        lambda c: c.enrich_status(workflow_id="public_bulk_nope"),
        NotFoundError,
        404,
        Action.FAIL,
        "Workflow not found",
    ),
    "404-unknown-task": Row(
        lambda c: c.enrich_status(task_id=UNKNOWN_TASK), NotFoundError, 404, Action.FAIL, "Task not found"
    ),
    "404-deliveries-of-unknown-workflow": Row(
        lambda c: c.webhook_deliveries("public_bulk_nope"),
        NotFoundError,
        404,
        Action.FAIL,
        "Workflow not found",
    ),
    "422-field-rule": Row(
        lambda c: c.enrich_bulk([*people(2), {"first_name": "John"}]),
        UnprocessableEntityError,
        422,
        Action.QUARANTINE,
        [
            {
                "type": "value_error",
                "loc": ["body", "contacts", 2],
                "msg": FIELD_RULE,
                "input": {"first_name": "John"},
            }
        ],
    ),
    "429-window-spent": Row(
        lambda c: [c.credits_balance() for _ in range(2)],
        RateLimitError,
        429,
        Action.RETRY_AFTER,
        "Rate limit exceeded",
        sandbox={"rate_limit": (1, 30.0)},
    ),
    **{
        f"{status}-server-error": Row(
            lambda c: c.enrich_bulk(people(2)),
            ServerError,
            status,
            Action.RETRY,
            detail,
            sandbox=_fault("enrich-bulk", status),
        )
        for status, detail in [
            (500, "Internal server error"),
            (502, "Bad gateway"),
            (503, "Service temporarily unavailable"),
            (504, "Gateway timeout"),
        ]
    },
    "503-on-status-endpoint": Row(
        lambda c: c.enrich_status(workflow_id="public_bulk_x"),
        ServerError,
        503,
        Action.RETRY,
        "Service temporarily unavailable",
        sandbox=_fault("enrich-status", 503),
    ),
}


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_each_policy_row_raises_its_error_with_its_action(start_sandbox: StartSandbox, row: Row) -> None:
    sandbox = start_sandbox(
        **{"extra_keys": (EXTENSION_KEY,), "no_api_access_keys": (NO_API_KEY,), **row.sandbox}
    )
    if row.before is not None:
        row.before(sandbox)
    with client_for(sandbox, row.key) as client:
        error = raised(lambda: row.call(client))
    assert type(error) is row.error
    assert isinstance(error, APIStatusError)
    assert error.status_code == row.status
    assert error.detail == row.detail
    policy = policy_for(error)
    assert policy is not None and policy.action is row.action
    assert policy.retryable == (row.action in (Action.RETRY, Action.RETRY_AFTER))
    assert f"Cleanlist API {row.status} on {error.method} /" in str(error)
    assert "\n" not in str(error)


def test_every_endpoint_refuses_a_wrong_key_with_fail_fast(sandbox: SandboxServer) -> None:
    with client_for(sandbox, WRONG_KEY) as client:
        calls: list[Callable[[], object]] = [
            client.validate_key,
            client.credits_balance,
            lambda: client.enrich_bulk(people(1)),
            lambda: client.enrich_status(workflow_id="public_bulk_x"),
            lambda: client.webhook_deliveries("public_bulk_x"),
        ]
        errors = [raised(call) for call in calls]
    assert {type(error) for error in errors} == {AuthenticationError}
    assert {action_of(error) for error in errors} == {Action.FAIL_FAST}
    assert sandbox.counters()["bulk_accepted"] == 0


def test_422_names_the_refused_contacts_by_index_with_their_messages(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(refuse_contacts_containing=("co3.example",))
    contacts: list[dict[str, Any]] = [
        *people(3, tag="co"),  # the third has company_domain co2.example
        {"first_name": "Ann", "last_name": "Lee", "company_domain": "co3.example"},  # server-side refusal
        {"first_name": "John"},  # breaks the documented field rule
        {"linkedin_url": "https://www.linkedin.com/in/fine"},
    ]
    with client_for(sandbox) as client:
        error = raised(lambda: client.enrich_bulk(contacts))
    assert isinstance(error, UnprocessableEntityError)
    assert error.invalid_contacts == [InvalidContact(3, FIELD_RULE), InvalidContact(4, FIELD_RULE)]
    assert "2 invalid item(s)" in str(error)
    assert action_of(error) is Action.QUARANTINE
    assert sandbox.counters()["bulk_accepted"] == 0


def test_a_real_window_429_carries_its_integer_retry_after(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(rate_limit=(2, 30.0))
    with client_for(sandbox) as client:
        client.credits_balance()
        client.credits_balance()
        error = raised(client.credits_balance)
        assert isinstance(error, RateLimitError)
        assert error.retry_after is not None and error.retry_after == int(error.retry_after)
        assert 1 <= error.retry_after <= 30
        # The hold is the server's hint, for every caller of this endpoint.
        assert client.limiter.endpoint("credits-balance").held_for == pytest.approx(
            error.retry_after, abs=0.5
        )
        # Until 429s have shown a window per endpoint, the window may be the organization's: the
        # Retry-After holds the other endpoints too.
        assert client.limiter.endpoint("enrich-status").held_for == pytest.approx(error.retry_after, abs=0.5)
        assert not client.limiter.per_endpoint


def test_a_429_holds_the_endpoint_for_every_other_caller_until_retry_after(
    start_sandbox: StartSandbox,
) -> None:
    sandbox = start_sandbox(faults={"enrich-status": FaultSpec(sequence=(429,), retry_after=1)})
    shared = RateLimiter(RateLimit.parse("1000/1"))  # every caller of one run shares the run's limiter
    with client_for(sandbox, limiter=shared) as client, client_for(sandbox, limiter=shared) as other:
        workflow_id = client.enrich_bulk(people(1)).workflow_id
        error = raised(lambda: client.enrich_status(workflow_id=workflow_id))
        limited_at = time.monotonic()
        assert isinstance(error, RateLimitError) and error.retry_after == 1.0
        assert action_of(error) is Action.RETRY_AFTER

        answered_at: list[float] = []

        def poll() -> None:
            other.enrich_status(workflow_id=workflow_id)
            answered_at.append(time.monotonic())

        waiter = threading.Thread(target=poll)
        waiter.start()
        other.credits_balance()  # the window may be the organization's: another endpoint waits it out too
        assert time.monotonic() - limited_at >= 0.9
        waiter.join(timeout=5)
    assert answered_at and answered_at[0] - limited_at >= 0.9
    assert sandbox.counters()["requests"]["enrich-status"] == {"429": 1, "200": 1}


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (2, 2.0),
        ("garbage", None),
        ("0", None),
        ("-3", None),
        (None, None),
        ("http-date", 2.0),
    ],
    ids=["seconds", "garbage", "zero", "negative", "absent", "http-date"],
)
def test_retry_after_from_the_wire_is_parsed_or_ignored(
    start_sandbox: StartSandbox, header: int | str | None, expected: float | None
) -> None:
    if header == "http-date":
        header = email.utils.formatdate(time.time() + 2.5, usegmt=True)
    sandbox = start_sandbox(faults={"credits-balance": FaultSpec(sequence=(429,), retry_after=header)})
    with client_for(sandbox) as client:
        error = raised(client.credits_balance)
        held = client.limiter.endpoint("credits-balance").held_for
    assert isinstance(error, RateLimitError) and action_of(error) is Action.RETRY_AFTER
    if expected is None:
        assert error.retry_after is None
        assert held == 0.0  # no hint, no hold: the caller's own backoff decides
    else:
        # An HTTP-date has whole-second resolution.
        assert error.retry_after == pytest.approx(expected, abs=1.0)
        # For a date, each reads the time left at its own moment: the hold from the hint when the limiter
        # took it, the error a moment later (a fresh-clone run saw the hold 0.6 ms longer under load).
        # The hold ends with the window the server named, at most a moment (here 50 ms) after it.
        assert 0 < held <= error.retry_after + 0.05


# --- transport failures -------------------------------------------------------------------------------


def test_a_peer_that_never_answers_is_a_timeout_to_retry() -> None:
    with RawServer(reply=None) as silent:
        client = CleanlistClient(ANY_KEY, base_url=silent.base_url, timeout=0.3)
        started = time.monotonic()
        with client:
            error = raised(lambda: client.enrich_status(workflow_id="w"))
    assert type(error) is APITimeoutError
    assert "ReadTimeout" in str(error)
    assert action_of(error) is Action.RETRY
    assert time.monotonic() - started < 2


def test_connection_refused_is_a_connection_error_to_retry() -> None:
    with CleanlistClient(ANY_KEY, base_url=refused_url(), timeout=2) as client:
        error = raised(client.credits_balance)
    assert type(error) is APIConnectionError
    assert action_of(error) is Action.RETRY


def test_a_body_cut_short_on_the_wire_is_a_connection_error_to_retry() -> None:
    cut = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 120\r\n\r\n"
        b'{"workflow_id": "public_bulk_1", "status": "proc'
    )
    with RawServer(reply=cut) as server, CleanlistClient(ANY_KEY, base_url=server.base_url) as client:
        error = raised(lambda: client.enrich_status(workflow_id="public_bulk_1"))
    assert type(error) is APIConnectionError
    assert action_of(error) is Action.RETRY


@pytest.mark.parametrize(
    ("exception", "kind"),
    [
        (httpx.ConnectTimeout, APITimeoutError),
        (httpx.ReadTimeout, APITimeoutError),
        (httpx.WriteTimeout, APITimeoutError),
        (httpx.PoolTimeout, APITimeoutError),
        (httpx.ConnectError, APIConnectionError),
        (httpx.ReadError, APIConnectionError),
        (httpx.RemoteProtocolError, APIConnectionError),
    ],
)
def test_transport_errors_become_retryable_connection_errors(
    exception: type[httpx.TransportError], kind: type[APIError]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exception("boom", request=request)

    with mocked(handler) as client:
        error = raised(lambda: client.enrich_bulk(people(1)))
    assert type(error) is kind
    assert exception.__name__ in str(error)
    assert action_of(error) is Action.RETRY


def test_malformed_json_in_an_error_keeps_the_status_and_its_retry_after() -> None:
    answers = iter(
        [
            httpx.Response(503, content=b"<html>upstream down</html>"),
            httpx.Response(401, content=b"\xff\xfe not utf-8"),
            httpx.Response(429, content=b"{nope", headers={"Retry-After": "3"}),
        ]
    )
    with mocked(lambda request: next(answers)) as client:
        server_error = raised(client.credits_balance)
        unauthorized = raised(client.credits_balance)
        limited = raised(client.credits_balance)  # last: it holds the endpoint for 3 s
    assert type(server_error) is ServerError and server_error.detail == "<html>upstream down</html>"
    assert action_of(server_error) is Action.RETRY
    assert type(limited) is RateLimitError and limited.retry_after == 3.0
    assert type(unauthorized) is AuthenticationError and action_of(unauthorized) is Action.FAIL_FAST


def _mocked_async(handler: Callable[[httpx.Request], httpx.Response]) -> AsyncCleanlistClient:
    host = f"http://mock-{uuid.uuid4().hex[:8]}.test"
    return AsyncCleanlistClient(ANY_KEY, base_url=host, transport=httpx.MockTransport(handler))


def test_the_newer_error_envelope_on_the_wire_is_read_by_its_code() -> None:
    """`{"error": {"code", "message"}}`: the code picks the class, the message is the detail, a body
    `retry_after_ms` is the hint (and holds the endpoint like a header would), the key stays redacted."""
    answers = iter(
        [
            httpx.Response(
                400,
                json={"error": {"code": "insufficient_credits", "message": "Not enough credits"}},
            ),
            httpx.Response(
                400,
                json={
                    "error": {
                        "code": "validation_error",
                        "message": "Some contacts are invalid",
                        "errors": [{"index": 1, "message": FIELD_RULE}],
                    }
                },
            ),
            httpx.Response(
                401,
                json={"error": {"code": "api_key_revoked", "message": f"key {ANY_KEY} was revoked"}},
            ),
            httpx.Response(
                429,
                json={
                    "error": {"code": "rate_limit_exceeded", "message": "Slow down", "retry_after_ms": 1500}
                },
            ),
        ]
    )
    with mocked(lambda request: next(answers)) as client:
        no_credits = raised(lambda: client.enrich_bulk(people(2)))
        refused = raised(lambda: client.enrich_bulk([*people(1), {"first_name": "John"}]))
        revoked = raised(lambda: client.enrich_bulk(people(1)))
        limited = raised(client.credits_balance)
        held = client.limiter.endpoint("credits-balance").held_for
    assert type(no_credits) is InsufficientCreditsError and action_of(no_credits) is Action.PAUSE
    assert (no_credits.status_code, no_credits.detail, no_credits.code) == (
        400,
        "Not enough credits",
        "insufficient_credits",
    )
    assert POLICY[InsufficientCreditsError].fix in str(no_credits)
    assert type(refused) is UnprocessableEntityError and action_of(refused) is Action.QUARANTINE
    assert refused.invalid_contacts == [InvalidContact(1, FIELD_RULE)]
    assert type(revoked) is AuthenticationError and action_of(revoked) is Action.FAIL_FAST
    assert revoked.detail == "key [redacted] was revoked"
    assert ANY_KEY not in str(revoked) and ANY_KEY not in repr(vars(revoked))
    assert type(limited) is RateLimitError and limited.retry_after == 1.5
    assert 0 < held <= 1.5


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"valid": False}, None),
        ({"valid": False, "reason": f"key {ANY_KEY} expired"}, "(key [redacted] expired)"),
        ({"valid": "false", "user_id": None}, None),
    ],
    ids=["bare", "with-reason", "as-text"],
)
def test_validate_key_answering_valid_false_is_a_rejected_key(
    payload: dict[str, Any], reason: str | None
) -> None:
    def check(error: BaseException) -> None:
        assert type(error) is AuthenticationError and action_of(error) is Action.FAIL_FAST
        assert error.status_code == 401 and error.method == "GET" and error.path == "/auth/validate-key"
        text = str(error)
        assert "valid=false" in text and POLICY[AuthenticationError].fix in text
        assert "\n" not in text and ANY_KEY not in text
        if reason is not None:
            assert reason in text

    with mocked(_answer(payload)) as client:
        check(raised(client.validate_key))

    async def scenario() -> BaseException:
        async with _mocked_async(_answer(payload)) as client:
            with pytest.raises(AuthenticationError) as caught:
                await client.validate_key()
        return caught.value

    check(asyncio.run(scenario()))


@pytest.mark.parametrize(
    ("answer", "task_ids"),
    [
        (
            {"workflow_id": "public_bulk_1", "status": "processing", "message": "Bulk enrichment started"},
            [],
        ),
        ({"workflow_id": "public_bulk_1", "status": "processing", "task_ids": None}, []),
        ({"workflow_id": "public_bulk_1", "task_ids": ["t1"], "total_contacts": 3}, ["t1"]),
        ({"workflow_id": "public_bulk_1", "task_ids": ["t1", "t2", "t3", "t4"]}, ["t1", "t2", "t3", "t4"]),
    ],
    ids=["newer-page-no-task-ids", "null-task-ids", "fewer-task-ids", "more-task-ids"],
)
def test_a_bulk_answer_without_task_ids_or_with_another_count_parses(
    answer: dict[str, Any], task_ids: list[str]
) -> None:
    with mocked(_answer(answer)) as client:
        submitted = client.enrich_bulk(people(3))

    async def scenario() -> BulkEnrichResponse:
        async with _mocked_async(_answer(answer)) as client:
            return await client.enrich_bulk(people(3))

    for parsed in (submitted, asyncio.run(scenario())):
        assert isinstance(parsed, BulkEnrichResponse)
        assert parsed.workflow_id == "public_bulk_1" and parsed.task_ids == task_ids


def test_a_success_whose_body_is_not_json_is_an_api_error() -> None:
    with mocked(lambda request: httpx.Response(200, content=b'{"valid": tru')) as client:
        error = raised(client.validate_key)
    assert isinstance(error, APIConnectionError)
    assert "not JSON" in str(error)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_an_unexpected_answer_not_a_success(status: int) -> None:
    # httpx follows no redirects by default: a 3xx (e.g. http:// sent to https://) must not parse as 2xx.
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"location": "https://elsewhere.test/"}, content=b"")

    with mocked(handler) as client:
        error = raised(client.credits_balance)
    assert type(error) is APIStatusError
    assert error.status_code == status
    assert action_of(error) is Action.FAIL


@pytest.mark.parametrize(("status", "kind"), [(418, APIStatusError), (599, ServerError)])
def test_unknown_statuses_fall_back_to_their_class(status: int, kind: type[APIStatusError]) -> None:
    with mocked(lambda request: httpx.Response(status, json={"detail": "odd"})) as client:
        error = raised(client.credits_balance)
    assert type(error) is kind and error.status_code == status and error.detail == "odd"


# --- success shapes -----------------------------------------------------------------------------------


def test_validate_key_and_balance_parse_into_models(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(credits=1234.5)
    with client_for(sandbox) as client:
        validation = client.validate_key()
        balance = client.credits_balance()
    assert isinstance(validation, KeyValidation) and validation.valid is True
    assert validation.user_id is not None and validation.user_id.startswith("user_")
    assert isinstance(balance, CreditsBalance)
    assert (balance.credits, balance.organization_id) == (1234.5, validation.organization_id)


def test_a_workflow_is_in_flight_then_terminal_with_typed_results(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(latency=0.4, find_rate=0.7, phone_rate=0.5)
    with client_for(sandbox) as client:
        submitted = client.enrich_bulk(people(12), enrichment_type="full")
        assert isinstance(submitted, BulkEnrichResponse)
        assert submitted.workflow_id.startswith("public_bulk_") and submitted.status == "processing"
        assert submitted.total_contacts == 12 and len(set(submitted.task_ids)) == 12
        in_flight = client.enrich_status(workflow_id=submitted.workflow_id)
        assert isinstance(in_flight, WorkflowStatus)
        assert (in_flight.status, in_flight.is_terminal, in_flight.results) == ("processing", False, [])
        pending_task = client.enrich_status(task_id=submitted.task_ids[0])
        assert isinstance(pending_task, TaskResult) and pending_task.status == "processing"
        time.sleep(0.45)
        done = client.enrich_status(workflow_id=submitted.workflow_id)
        task = client.enrich_status(task_id=submitted.task_ids[3])
    assert isinstance(done, WorkflowStatus) and done.is_terminal and done.status == "completed"
    assert done.enrichment_type == "full" and done.completed_at is not None
    assert [result.task_id for result in done.results] == submitted.task_ids
    assert done.summary is not None and done.summary.total == 12
    assert done.summary.emails_found == sum(bool(result.primary_email) for result in done.results)
    assert done.summary.phones_found == sum(bool(result.phones) for result in done.results)
    for result in done.results:
        assert result.status in ("completed", "failed")
        assert isinstance(result.other_emails, list) and isinstance(result.personal_phone_numbers, list)
        assert isinstance(result.prospect, dict) and isinstance(result.company, dict)
    found = next(result for result in done.results if result.primary_email)
    assert found.primary_email_status in ("reliable", "risky", "unknown")
    assert isinstance(task, TaskResult)
    assert task.workflow_id == submitted.workflow_id
    assert task.model_dump(exclude={"workflow_id"}) == done.results[3].model_dump(exclude={"workflow_id"})


def test_webhook_deliveries_list_every_attempt(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(webhook_backoff_scale=0.0)
    with WebhookReceiver([(500, 0.0), (200, 0.0)]).running() as receiver, client_for(sandbox) as client:
        submitted = client.enrich_bulk(people(2), webhook_url=receiver.url)
        deadline = time.monotonic() + 5
        while len(deliveries := client.webhook_deliveries(submitted.workflow_id).deliveries) < 2:
            assert time.monotonic() < deadline, deliveries
            time.sleep(0.02)
        silent = client.enrich_bulk(people(1, tag="q"))
        none = client.webhook_deliveries(silent.workflow_id)
    assert [(d.attempt, d.status, d.response_code) for d in deliveries] == [
        (1, "failed", 500),
        (2, "delivered", 200),
    ]
    assert deliveries[0].attempted_at is not None  # the sandbox's `delivered_at`, one of its spellings
    assert isinstance(none, WebhookDeliveries)
    assert (none.workflow_id, none.deliveries) == (silent.workflow_id, [])


def _answer(body: Any) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(200, json=body)


def test_responses_parse_leniently_keeping_unknown_fields_and_nulls_as_empty_lists() -> None:
    workflow = {
        "workflow_id": "public_bulk_1",
        "status": "completed",
        "results": [
            {
                "task_id": "t1",
                "status": "completed",
                "primary_email": "a@b.example",
                "other_emails": None,
                "personal_phone_numbers": None,
                "confidence": 0.93,
            }
        ],
        "summary": {"total": 1, "credits_used": 1},
        "region": "eu",
    }
    with mocked(_answer(workflow)) as client:
        status = client.enrich_status(workflow_id="public_bulk_1")
    assert isinstance(status, WorkflowStatus)
    assert status.model_extra == {"region": "eu"}
    assert status.summary is not None and status.summary.model_extra == {"credits_used": 1}
    result = status.results[0]
    assert (result.other_emails, result.personal_phone_numbers, result.phones) == ([], [], [])
    assert result.model_extra == {"confidence": 0.93}

    with mocked(_answer({**workflow, "results": None})) as client:
        assert client.enrich_status(workflow_id="public_bulk_1").results == []  # type: ignore[union-attr]
    task = {"task_id": "t1", "status": "failed", "personal_phone_numbers": [{"number": "+15550001"}, "+2"]}
    with mocked(_answer(task)) as client:
        parsed_task = client.enrich_status(task_id="t1")
    assert isinstance(parsed_task, TaskResult) and parsed_task.phones == ["+15550001", "+2"]
    with mocked(_answer({"credits": 7, "plan": "pro"})) as client:
        balance = client.credits_balance()
    assert balance.credits == 7.0 and balance.model_extra == {"plan": "pro"}
    with mocked(_answer({"workflow_id": "w", "queued_behind": 3})) as client:
        submitted = client.enrich_bulk(people(1))
    assert submitted.task_ids == [] and submitted.model_extra == {"queued_behind": 3}
    with mocked(_answer([{"attempt": 1, "status": "delivered", "response_code": 204}])) as client:
        bare_list = client.webhook_deliveries("w")
    assert [d.response_code for d in bare_list.deliveries] == [204]


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        ("completed", True),
        ("failed", True),
        ("cancelled", True),
        ("Completed", True),
        ("processing", False),
        ("queued", False),
        ("running", False),
        ("pending", False),
        ("something_new", False),
    ],
)
def test_only_completed_failed_cancelled_are_terminal(status: str, terminal: bool) -> None:
    with mocked(_answer({"workflow_id": "w", "status": status, "results": []})) as client:
        parsed = client.enrich_status(workflow_id="w")
    assert isinstance(parsed, WorkflowStatus) and parsed.is_terminal is terminal


def test_the_request_the_client_sends_is_the_documented_one() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"workflow_id": "w", "status": "processing", "task_ids": ["t"]})

    with mocked(handler) as client:
        client.enrich_bulk(
            [{"linkedin_url": "https://www.linkedin.com/in/x"}], webhook_url="https://h.example/"
        )
        client.enrich_bulk(people(1), enrichment_type="phone_only")
    first, second = seen
    assert first.method == "POST" and first.url.path == "/api/v1/public/enrich/bulk"
    assert first.headers["authorization"] == f"Bearer {ANY_KEY}"
    assert json.loads(first.content) == {
        "enrichment_type": "partial",
        "contacts": [{"linkedin_url": "https://www.linkedin.com/in/x"}],
        "webhook_url": "https://h.example/",
    }
    assert "webhook_url" not in json.loads(second.content)
    assert json.loads(second.content)["enrichment_type"] == "phone_only"


# --- the async client ---------------------------------------------------------------------------------


def test_async_client_walks_the_same_paths(sandbox: SandboxServer) -> None:
    async def scenario() -> None:
        async with async_client_for(sandbox) as client:
            assert (await client.validate_key()).valid
            assert (await client.credits_balance()).credits > 0
            submitted = await client.enrich_bulk(people(3))
            done = await client.enrich_status(workflow_id=submitted.workflow_id)
            assert isinstance(done, WorkflowStatus) and done.is_terminal and len(done.results) == 3
            task = await client.enrich_status(task_id=submitted.task_ids[1])
            assert isinstance(task, TaskResult) and task.workflow_id == submitted.workflow_id
            assert (await client.webhook_deliveries(submitted.workflow_id)).deliveries == []
            with pytest.raises(UnprocessableEntityError) as refused:
                await client.enrich_bulk([{"first_name": "John"}, *people(1)])
            assert refused.value.invalid_contacts == [InvalidContact(0, FIELD_RULE)]
            with pytest.raises(BadRequestError):
                await client.enrich_bulk([])
            with pytest.raises(NotFoundError):
                await client.enrich_status(workflow_id="public_bulk_nope")
        async with async_client_for(sandbox, WRONG_KEY) as wrong:
            with pytest.raises(AuthenticationError) as unauthorized:
                await wrong.credits_balance()
            assert action_of(unauthorized.value) is Action.FAIL_FAST
        async with async_client_for(sandbox, NO_API_KEY) as no_plan:
            with pytest.raises(PermissionDeniedError):
                await no_plan.validate_key()
        sandbox.set_faults({"enrich-bulk": FaultSpec(sequence=(502,))})
        async with async_client_for(sandbox) as client:
            with pytest.raises(ServerError) as bad_gateway:
                await client.enrich_bulk(people(1))
            assert bad_gateway.value.status_code == 502 and action_of(bad_gateway.value) is Action.RETRY
        async with AsyncCleanlistClient(ANY_KEY, base_url=refused_url()) as nowhere:
            with pytest.raises(APIConnectionError) as refused_connection:
                await nowhere.validate_key()
            assert action_of(refused_connection.value) is Action.RETRY

        def hang(request: httpx.Request) -> httpx.Response:
            raise httpx.ReadTimeout("slow", request=request)

        async with AsyncCleanlistClient(
            ANY_KEY, base_url="http://hang.test", transport=httpx.MockTransport(hang)
        ) as slow:
            with pytest.raises(APITimeoutError):
                await slow.credits_balance()

    asyncio.run(scenario())


def test_async_client_honours_and_sets_the_shared_hold(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(faults={"credits-balance": FaultSpec(sequence=(429,), retry_after=1)})
    shared = RateLimiter(RateLimit.parse("1000/1"))

    async def scenario() -> tuple[float, float]:
        async with async_client_for(sandbox, limiter=shared) as client:
            with pytest.raises(RateLimitError) as limited:
                await client.credits_balance()
            limited_at = time.monotonic()
            assert limited.value.retry_after == 1.0
            # A blocking client given the same limiter waits for the hold the async one set.
            with client_for(sandbox, limiter=shared) as blocking:
                await asyncio.to_thread(blocking.credits_balance)
            return limited_at, time.monotonic()

    limited_at, answered_at = asyncio.run(scenario())
    assert answered_at - limited_at >= 0.9


def test_clients_share_a_limiter_only_when_given_one(sandbox: SandboxServer) -> None:
    # No process-wide registry: a client given no limiter paces itself alone, even for the same key and
    # host (a second run, a user's own client); clients given one limiter share its budget and holds.
    shared = RateLimiter(RateLimit.parse("7/1"))
    blocking = client_for(sandbox, limiter=shared)
    asynchronous = async_client_for(sandbox, limiter=shared)
    same_key = client_for(sandbox, rate_limit="7/1")
    other_key = client_for(sandbox, NO_API_KEY, rate_limit="7/1")
    try:
        assert blocking.limiter is asynchronous.limiter is shared
        assert same_key.limiter is not blocking.limiter
        assert other_key.limiter is not blocking.limiter
        blocking.limiter.endpoint("enrich-bulk").hold(5)
        assert asynchronous.limiter.endpoint("enrich-bulk").held_for > 4
        assert same_key.limiter.endpoint("enrich-bulk").held_for == 0.0
        assert other_key.limiter.endpoint("enrich-bulk").held_for == 0.0
    finally:
        blocking.close()
        asyncio.run(asynchronous.aclose())
        same_key.close()
        other_key.close()


@pytest.mark.parametrize("suffix", ["", "/", "/api/v1/public", "/api/v1/public/"])
def test_base_url_may_be_the_host_or_the_documented_base(
    sandbox: SandboxServer, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with CleanlistClient(sandbox.api_key, base_url=sandbox.base_url + suffix) as client:
        assert client.validate_key().valid
    monkeypatch.setenv("CLEANLIST_BASE_URL", sandbox.base_url + suffix)
    assert CleanlistSettings().base_url == sandbox.base_url


@pytest.mark.parametrize(
    "task",
    [
        {
            "task_id": "t",
            "status": "completed",
            "primary_email": "ann@x.io",
            "primary_email_status": "reliable",
        },
        {"task_id": "t", "status": "completed", "email": "ann@x.io", "email_status": "reliable"},
        {"task_id": "t", "status": "completed", "result": {"email": "ann@x.io", "email_status": "reliable"}},
        {
            "task_id": "t",
            "status": "completed",
            "data": {"primary_email": "ann@x.io", "primary_email_status": "reliable"},
        },
    ],
    ids=["documented", "flat-email", "nested-result", "nested-data"],
)
def test_a_task_result_finds_its_email_under_the_obvious_spellings(task: dict[str, Any]) -> None:
    result = TaskResult.model_validate(task)
    assert (result.primary_email, result.primary_email_status) == ("ann@x.io", "reliable")
    assert (
        TaskResult.model_validate(
            {"task_id": "t", "status": "failed", "result": {"email": None}}
        ).primary_email
        is None
    )
