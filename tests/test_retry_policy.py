"""The retry policy as a table: backoff, the decision after each kind of failed submit or poll, and the one
log line each decision leaves on `cleanlist.retry`."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from cleanlist.errors import (
    POLICY,
    Action,
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    InsufficientCreditsError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    UnprocessableEntityError,
    make_status_error,
)
from cleanlist.retry import RetryDecision, RetryPolicy

# Small numbers so that every branch of the table shows up within a few attempts.
POLICY_UNDER_TEST = RetryPolicy(
    retries=3, initial_delay=2.0, max_delay=10.0, jitter_factor=0.5, rate_limit_retries=2
)
LOGGER = "cleanlist.retry"


def status_error(status: int, retry_after: str | None = None, method: str = "POST") -> APIStatusError:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    path = "/enrich/bulk" if method == "POST" else "/enrich/status"
    body: object = {"detail": f"status {status}"}
    if status == 422:
        body = {"detail": [{"loc": ["body", "contacts", 0], "msg": "bad contact"}]}
    return make_status_error(status_code=status, method=method, path=path, body=body, headers=headers)


Records = Callable[[], list[logging.LogRecord]]


@pytest.fixture
def retry_records(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Records:
    """What the test logged on `cleanlist.retry` (propagation forced on, so that the records reach caplog
    whatever logging setup ran earlier in the session)."""
    for name in ("cleanlist", LOGGER):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    caplog.set_level(logging.INFO, logger=LOGGER)
    return lambda: [record for record in caplog.records if record.name == LOGGER]


# -- backoff ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "delay"), [(0, 2.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (5, 10.0), (30, 10.0)]
)
def test_backoff_doubles_from_the_initial_delay_up_to_the_cap(failures: int, delay: float) -> None:
    assert POLICY_UNDER_TEST.backoff(failures) == delay


@pytest.mark.parametrize("retries", [0, 1, 3, 5, 8])
def test_one_delay_per_task_retry(retries: int) -> None:
    policy = RetryPolicy(retries=retries, initial_delay=0.5, max_delay=3.0)
    delays = policy.delays()
    assert len(delays) == retries
    assert delays == [policy.backoff(n) for n in range(1, retries + 1)]
    assert all(b >= a for a, b in itertools.pairwise(delays))
    assert all(d <= 3.0 for d in delays)


def test_default_policy_is_the_documented_one() -> None:
    policy = RetryPolicy()
    assert policy.delays() == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert policy.backoff(7) == 60.0
    assert policy.rate_limit_retries == 3
    assert policy.submit_attempts == 9


# -- submit ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitRow:
    error: BaseException
    attempt: int
    action: Action
    wait: float | None
    spread: bool  # a backoff the caller jitters (a Retry-After is exact)
    reason: str  # a part of the decision's reason


SUBMIT_TABLE: dict[str, SubmitRow] = {
    "429-retry-after-first-attempt": SubmitRow(
        status_error(429, "3"), 1, Action.RETRY_AFTER, 3.0, False, "task retry 1 of 5 after Retry-After 3s"
    ),
    "429-retry-after-beyond-the-transient-retries": SubmitRow(
        status_error(429, "3"), 4, Action.RETRY_AFTER, 3.0, False, "task retry 4 of 5"
    ),
    "429-retry-after-last-attempt": SubmitRow(
        status_error(429, "7"), 5, Action.RETRY_AFTER, 7.0, False, "task retry 5 of 5"
    ),
    "429-retry-after-out-of-attempts": SubmitRow(
        status_error(429, "3"), 6, Action.FAIL, None, False, "giving up after 6 attempts"
    ),
    "429-without-retry-after": SubmitRow(
        status_error(429), 1, Action.RETRY_AFTER, 2.0, True, "task retry 1 of 3"
    ),
    "429-unparsable-retry-after": SubmitRow(
        status_error(429, "soon"), 2, Action.RETRY_AFTER, 4.0, True, "task retry 2 of 3"
    ),
    "429-without-retry-after-out-of-retries": SubmitRow(
        status_error(429), 4, Action.FAIL, None, False, "giving up after 4 attempts"
    ),
    "500-first-attempt": SubmitRow(status_error(500), 1, Action.RETRY, 2.0, True, "task retry 1 of 3"),
    "503-second-attempt": SubmitRow(status_error(503), 2, Action.RETRY, 4.0, True, "(±50% jitter)"),
    "502-last-retry": SubmitRow(status_error(502), 3, Action.RETRY, 8.0, True, "in ~8s"),
    "504-out-of-retries": SubmitRow(
        status_error(504), 4, Action.FAIL, None, False, "giving up after 4 attempts"
    ),
    "network-error": SubmitRow(
        APIConnectionError("connection refused"), 2, Action.RETRY, 4.0, True, "task retry 2 of 3"
    ),
    "401": SubmitRow(
        status_error(401, "3"), 1, Action.FAIL_FAST, None, False, POLICY[AuthenticationError].fix
    ),
    "403": SubmitRow(status_error(403), 1, Action.FAIL_FAST, None, False, POLICY[PermissionDeniedError].fix),
    "402": SubmitRow(status_error(402), 1, Action.PAUSE, None, False, POLICY[InsufficientCreditsError].fix),
    "422": SubmitRow(
        status_error(422), 1, Action.QUARANTINE, None, False, POLICY[UnprocessableEntityError].fix
    ),
    "400": SubmitRow(status_error(400), 1, Action.FAIL, None, False, POLICY[BadRequestError].fix),
    "404": SubmitRow(status_error(404), 1, Action.FAIL, None, False, "unknown to the API"),
    "unknown-status": SubmitRow(status_error(418), 1, Action.FAIL, None, False, "unexpected answer"),
    "unknown-shape": SubmitRow(
        APIResponseValidationError("no workflow_id"), 1, Action.FAIL, None, False, "shape"
    ),
    "not-an-api-error": SubmitRow(ValueError("boom"), 1, Action.FAIL, None, False, "not an API error"),
}


@pytest.mark.parametrize("name", list(SUBMIT_TABLE))
def test_submit_decision(name: str, retry_records: Records) -> None:
    row = SUBMIT_TABLE[name]
    decision = POLICY_UNDER_TEST.for_submit(row.error, what="chunk 00007", attempt=row.attempt)

    assert (decision.action, decision.wait, decision.spread) == (row.action, row.wait, row.spread)
    assert not decision.inline  # a submit is retried by its task, never by a loop of its own
    assert decision.retry is (row.wait is not None)
    # Prefect's retry condition asks the same question of the same policy, without a second log line.
    assert POLICY_UNDER_TEST.allows_submit_retry(row.error, row.attempt) is decision.retry
    assert row.reason in decision.reason
    # Logged once, naming the chunk, the error, the action and the reason.
    [record] = retry_records()
    message = record.getMessage()
    assert message.startswith("chunk 00007: ")
    assert str(row.error) in message
    assert f"→ {decision.action.value}: {decision.reason}" in message
    expected_level = logging.WARNING if decision.retry or decision.action is Action.PAUSE else logging.ERROR
    assert record.levelno == expected_level


@pytest.mark.parametrize("wait", [0.0, 1.0, 8.0])
def test_a_backoff_is_spread_within_the_jitter_factor(wait: float) -> None:
    spread = [POLICY_UNDER_TEST.jittered(wait) for _ in range(200)]
    assert all(wait * 0.5 <= s <= wait * 1.5 for s in spread)
    assert wait == 0.0 or len(set(spread)) > 1


def test_error_classes_are_what_the_table_assumes() -> None:
    assert isinstance(status_error(429, "3"), RateLimitError)
    assert status_error(429, "3").retry_after == 3.0
    assert status_error(429, "soon").retry_after is None
    assert isinstance(status_error(503), ServerError)
    assert isinstance(status_error(401), AuthenticationError)
    assert isinstance(status_error(402), InsufficientCreditsError)
    assert isinstance(status_error(422), UnprocessableEntityError)
    assert isinstance(status_error(400), BadRequestError)


def test_server_errors_wait_the_backoff_of_their_attempt_until_retries_run_out(
    retry_records: Records,
) -> None:
    error = status_error(500)
    decisions = [POLICY_UNDER_TEST.for_submit(error, what="chunk 00001", attempt=a) for a in range(1, 6)]
    assert [d.wait for d in decisions] == [2.0, 4.0, 8.0, None, None]
    assert [d.action for d in decisions] == [Action.RETRY] * 3 + [Action.FAIL] * 2
    assert [d.wait for d in decisions[:3]] == POLICY_UNDER_TEST.delays()
    assert len(retry_records()) == 5


def test_one_attempt_count_serves_429s_and_other_transient_errors(retry_records: Records) -> None:
    # What Prefect's run count sees: 429s with Retry-After may use the extra attempts, a 5xx may not.
    limited, broken = status_error(429, "1.5"), status_error(503)
    taken: list[RetryDecision] = [
        POLICY_UNDER_TEST.for_submit(error, what="chunk 00002", attempt=attempt)
        for attempt, error in enumerate([limited, limited, broken, limited, limited, limited], start=1)
    ]
    assert [d.wait for d in taken] == [1.5, 1.5, 8.0, 1.5, 1.5, None]
    assert POLICY_UNDER_TEST.submit_attempts == 6
    assert not POLICY_UNDER_TEST.allows_submit_retry(broken, 4)
    assert len(retry_records()) == len(taken)


# -- poll ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PollRow:
    error: BaseException
    failures: int
    ceiling: float
    action: Action
    wait: float | None
    reason: str


POLL_TABLE: dict[str, PollRow] = {
    "429-retry-after": PollRow(
        status_error(429, "3", "GET"), 1, 30.0, Action.RETRY_AFTER, 3.0, "Retry-After"
    ),
    "429-retry-after-above-ceiling": PollRow(
        status_error(429, "45", "GET"), 1, 30.0, Action.RETRY_AFTER, 30.0, "Retry-After"
    ),
    "429-without-retry-after": PollRow(
        status_error(429, None, "GET"), 2, 30.0, Action.RETRY_AFTER, 4.0, "backoff after 2 failure(s)"
    ),
    "500-first": PollRow(status_error(500, None, "GET"), 1, 30.0, Action.RETRY, 2.0, "backoff after 1"),
    "503-third": PollRow(status_error(503, None, "GET"), 3, 30.0, Action.RETRY, 8.0, "polling again in 8s"),
    "502-backoff-capped-by-max-delay": PollRow(
        status_error(502, None, "GET"), 9, 30.0, Action.RETRY, 10.0, "backoff after 9"
    ),
    "504-backoff-capped-by-ceiling": PollRow(
        status_error(504, None, "GET"), 3, 5.0, Action.RETRY, 5.0, "polling again in 5s"
    ),
    "network-error-never-runs-out": PollRow(
        APIConnectionError("reset"), 50, 30.0, Action.RETRY, 10.0, "backoff after 50"
    ),
    "401": PollRow(
        status_error(401, None, "GET"), 1, 30.0, Action.FAIL_FAST, None, POLICY[AuthenticationError].fix
    ),
    "403": PollRow(
        status_error(403, None, "GET"), 4, 30.0, Action.FAIL_FAST, None, POLICY[PermissionDeniedError].fix
    ),
}


@pytest.mark.parametrize("name", list(POLL_TABLE))
def test_poll_decision(name: str, retry_records: Records) -> None:
    row = POLL_TABLE[name]
    decision = POLICY_UNDER_TEST.for_poll(
        row.error, what="status of wf-1", failures=row.failures, ceiling=row.ceiling
    )

    assert (decision.action, decision.wait) == (row.action, row.wait)
    assert row.reason in decision.reason
    # A poll is retried right there by the poller (never through a task retry).
    assert decision.inline is (row.wait is not None)
    [record] = retry_records()
    assert record.getMessage().startswith("status of wf-1: ")
    assert f"→ {row.action.value}: " in record.getMessage()
    assert record.levelno == (logging.WARNING if row.wait is not None else logging.ERROR)


def test_is_retryable_and_action_for_read_the_error_table() -> None:
    policy = POLICY_UNDER_TEST
    assert policy.is_retryable(status_error(429))
    assert policy.is_retryable(status_error(503))
    assert policy.is_retryable(APIConnectionError("reset"))
    for status in (400, 401, 402, 403, 404, 422):
        assert not policy.is_retryable(status_error(status)), status
    assert not policy.is_retryable(ValueError("boom"))
    assert policy.action_for(status_error(402)) is Action.PAUSE
    assert policy.action_for(status_error(403)) is Action.FAIL_FAST
    assert policy.action_for(RuntimeError("boom")) is Action.FAIL
