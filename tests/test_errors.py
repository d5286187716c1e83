"""The error hierarchy and its one policy table: Retry-After parsing, status → class, class → action."""

from __future__ import annotations

import email.utils
from typing import Any

import pytest

from cleanlist import errors
from cleanlist.constants import RETRY_AFTER_CAP
from cleanlist.errors import (
    POLICY,
    Action,
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    CleanlistError,
    InputError,
    InsufficientCreditsError,
    InvalidContact,
    MissingAPIKeyError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    UnprocessableEntityError,
    make_status_error,
    parse_retry_after,
    policy_for,
)

NOW = 1_750_000_000.0  # a fixed "now" for HTTP-dates


def http_date(offset: float) -> str:
    return email.utils.formatdate(NOW + offset, usegmt=True)


# header name → value, expected seconds (None: "no hint")
RETRY_AFTER_TABLE: list[tuple[str, dict[str, str], float | None]] = [
    ("seconds", {"Retry-After": "5"}, 5.0),
    ("fractional-seconds", {"Retry-After": "1.5"}, 1.5),
    ("padded", {"Retry-After": "  7 "}, 7.0),
    ("lower-case-name", {"retry-after": "2"}, 2.0),
    ("upper-case-name", {"RETRY-AFTER": "2"}, 2.0),
    ("at-the-cap", {"Retry-After": f"{RETRY_AFTER_CAP:g}"}, RETRY_AFTER_CAP),
    ("http-date-future", {"Retry-After": http_date(30)}, 30.0),
    ("http-date-past", {"Retry-After": http_date(-30)}, None),
    ("http-date-now", {"Retry-After": http_date(0)}, None),
    ("http-date-beyond-cap", {"Retry-After": http_date(RETRY_AFTER_CAP + 60)}, None),
    ("http-date-without-zone", {"Retry-After": "Sun, 15 Jun 2025 15:07:00 -0000"}, None),
    ("zero", {"Retry-After": "0"}, None),
    ("negative", {"Retry-After": "-3"}, None),
    ("nan", {"Retry-After": "nan"}, None),
    ("inf", {"Retry-After": "inf"}, None),
    ("minus-inf", {"Retry-After": "-inf"}, None),
    ("garbage", {"Retry-After": "garbage"}, None),
    ("empty", {"Retry-After": ""}, None),
    ("huge", {"Retry-After": "999999999"}, None),
    ("just-above-cap", {"Retry-After": f"{RETRY_AFTER_CAP + 0.5:g}"}, None),
    ("absent", {}, None),
    ("ms", {"retry-after-ms": "1500"}, 1.5),
    ("ms-wins-over-seconds", {"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
    ("ms-garbage-falls-back", {"retry-after-ms": "soon", "Retry-After": "4"}, 4.0),
    ("ms-negative", {"retry-after-ms": "-100"}, None),
    ("ms-nan", {"retry-after-ms": "nan"}, None),
    ("ms-huge", {"retry-after-ms": "999999999"}, None),
]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [(headers, expected) for _, headers, expected in RETRY_AFTER_TABLE],
    ids=[name for name, _, _ in RETRY_AFTER_TABLE],
)
def test_retry_after_is_seconds_or_a_date_and_anything_odd_is_no_hint(
    headers: dict[str, str], expected: float | None
) -> None:
    value = parse_retry_after(headers, now=NOW)
    if expected is None:
        assert value is None
    else:
        assert value == pytest.approx(expected, abs=1e-6)
        assert 0 < value <= RETRY_AFTER_CAP


STATUS_TABLE: list[tuple[int, type[APIStatusError]]] = [
    (400, BadRequestError),
    (401, AuthenticationError),
    (402, InsufficientCreditsError),
    (403, PermissionDeniedError),
    (404, NotFoundError),
    (422, UnprocessableEntityError),
    (429, RateLimitError),
    (500, ServerError),
    (501, ServerError),
    (502, ServerError),
    (503, ServerError),
    (504, ServerError),
    (599, ServerError),
    (405, APIStatusError),
    (409, APIStatusError),
    (418, APIStatusError),
    (301, APIStatusError),
]


@pytest.mark.parametrize(("status", "cls"), STATUS_TABLE, ids=[str(status) for status, _ in STATUS_TABLE])
def test_make_status_error_maps_each_status_to_one_class(status: int, cls: type[APIStatusError]) -> None:
    error = make_status_error(
        status_code=status,
        method="POST",
        path="/enrich/bulk",
        body={"detail": "  something\n  happened "},
        headers={"Retry-After": "2"},
    )
    assert type(error) is cls
    assert (error.status_code, error.method, error.path) == (status, "POST", "/enrich/bulk")
    assert error.detail == "  something\n  happened "
    assert error.retry_after == 2.0
    policy = policy_for(error)
    assert policy is not None
    assert str(error) == f"Cleanlist API {status} on POST /enrich/bulk: something happened ({policy.fix})"


def test_unknown_statuses_get_the_fallback_row() -> None:
    teapot = make_status_error(status_code=418, method="GET", path="/x", body={}, headers={})
    assert policy_for(teapot) == POLICY[APIStatusError]
    assert policy_for(teapot).action is Action.FAIL  # type: ignore[union-attr]
    assert (
        policy_for(make_status_error(status_code=599, method="GET", path="/x", body=None, headers={}))
        == (POLICY[ServerError])
    )


@pytest.mark.parametrize(
    ("body", "detail", "summary"),
    [
        ({"detail": "Insufficient credits"}, "Insufficient credits", "Insufficient credits"),
        (
            {"detail": [{"loc": ["body"]}, {"loc": ["body"]}]},
            [{"loc": ["body"]}, {"loc": ["body"]}],
            "2 invalid",
        ),
        ({"message": "no detail key"}, None, "no detail"),
        ({"detail": ""}, "", "no detail"),
        ({"detail": {"code": 7}}, {"code": 7}, "no detail"),
        ("plain text body", "plain text body", "plain text body"),
        (None, None, "no detail"),
        ({"detail": "x" * 1000}, "x" * 1000, "x" * 300 + " ("),
    ],
)
def test_error_messages_are_one_short_line(body: Any, detail: Any, summary: str) -> None:
    error = make_status_error(status_code=402, method="POST", path="/enrich/bulk", body=body, headers={})
    assert error.detail == detail
    assert summary in str(error)
    assert "\n" not in str(error) and len(str(error)) < 500


def _all_subclasses(cls: type) -> set[type]:
    found: set[type] = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _all_subclasses(sub)
    return found


EXPECTED_ACTIONS: dict[type[APIError], Action] = {
    BadRequestError: Action.FAIL,
    AuthenticationError: Action.FAIL_FAST,
    InsufficientCreditsError: Action.PAUSE,
    PermissionDeniedError: Action.FAIL_FAST,
    NotFoundError: Action.FAIL,
    UnprocessableEntityError: Action.QUARANTINE,
    RateLimitError: Action.RETRY_AFTER,
    ServerError: Action.RETRY,
    APIConnectionError: Action.RETRY,
    APITimeoutError: Action.RETRY,
    APIStatusError: Action.FAIL,
    APIResponseValidationError: Action.FAIL,
}


def test_the_policy_table_is_the_documented_one() -> None:
    for cls, action in EXPECTED_ACTIONS.items():
        error = (
            cls("x") if not issubclass(cls, APIStatusError) else cls("x", status_code=0, method="", path="")
        )
        policy = policy_for(error)
        assert policy is not None and policy.action is action, cls.__name__
        assert policy.fix and "\n" not in policy.fix


def test_every_api_error_class_maps_to_exactly_one_action() -> None:
    api_errors = {cls for cls in _all_subclasses(APIError) if cls.__module__ == errors.__name__}
    assert api_errors == set(EXPECTED_ACTIONS), "a new error class needs a row (and a line in this test)"
    assert set(POLICY) <= api_errors
    for cls in api_errors:
        # The most specific row wins, so each class resolves to exactly one policy.
        rows = [POLICY[base] for base in cls.__mro__ if base in POLICY]
        assert rows, cls.__name__
        assert isinstance(rows[0].action, Action)


def test_only_retry_actions_are_retryable() -> None:
    for policy in POLICY.values():
        assert policy.retryable is (policy.action in (Action.RETRY, Action.RETRY_AFTER))
    assert {action for action in Action} == {policy.action for policy in POLICY.values()}


def test_errors_outside_the_api_have_no_policy() -> None:
    assert policy_for(ValueError("x")) is None
    assert policy_for(InputError("bad mapping")) is None
    assert policy_for(MissingAPIKeyError()) is None
    assert issubclass(APIError, CleanlistError) and issubclass(InputError, CleanlistError)
    assert "CLEANLIST_API_KEY" in str(MissingAPIKeyError())


def _unprocessable(detail: Any) -> UnprocessableEntityError:
    error = make_status_error(
        status_code=422, method="POST", path="/enrich/bulk", body={"detail": detail}, headers={}
    )
    assert isinstance(error, UnprocessableEntityError)
    return error


def test_invalid_contacts_come_from_detail_loc_only() -> None:
    detail = [
        {"loc": ["body", "contacts", 7], "msg": "Each contact must include linkedin_url OR …"},
        {"loc": ["body", "contacts", 2], "msg": "second"},
        {"loc": ["body", "contacts", 2], "msg": "a second item for the same contact"},
        {"loc": ["body", "contacts", 3, "first_name"], "msg": "Input should be a valid string"},
        {"loc": ["body", "contacts", 4]},
        {"loc": ["body", "enrichment_type"], "msg": "not a contact"},
        {"loc": ["body", "contacts", "5"], "msg": "index as text is not an index"},
        {"loc": ["query", "contacts", 6], "msg": "not the body"},
        {"msg": "no loc"},
        "not an object",
    ]
    assert _unprocessable(detail).invalid_contacts == [
        InvalidContact(2, "second"),
        InvalidContact(3, "Input should be a valid string"),
        InvalidContact(4, "rejected by the API"),
        InvalidContact(7, "Each contact must include linkedin_url OR …"),
    ]
    assert _unprocessable("a string detail").invalid_contacts == []
    assert _unprocessable(None).invalid_contacts == []
