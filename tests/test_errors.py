"""The error hierarchy and its one policy table: Retry-After parsing, status → class, class → action."""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
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
    ("ms-zero", {"retry-after-ms": "0"}, None),
    ("ms-unusable-falls-back", {"retry-after-ms": "-100", "Retry-After": "4"}, 4.0),
    ("seconds-unusable-ms-absent", {"Retry-After": "0", "retry-after-ms": "garbage"}, None),
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


# --- both error envelopes -------------------------------------------------------------------------------


def _envelope(code: str | None, message: str = "Something happened", **extra: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"message": message, **extra}
    if code is not None:
        error["code"] = code
    return {"error": error}


LOC_ITEMS = [
    {"type": "value_error", "loc": ["body", "contacts", 4], "msg": "needs a name"},
    {"type": "value_error", "loc": ["body", "contacts", 1], "msg": "needs a company"},
]
INDEX_ITEMS = [{"index": 3, "message": "needs a name"}, {"index": 0, "message": "needs a company"}]


@dataclass(frozen=True)
class Answer:
    """One error answer and what the client must make of it."""

    status: int
    body: Any
    error: type[APIStatusError]
    action: Action
    detail: Any
    code: str | None = None


ENVELOPE_TABLE: dict[str, Answer] = {
    # {"detail": …}, the documented envelope of this API: the status decides.
    "detail-400": Answer(
        400,
        {"detail": "At least one contact is required."},
        BadRequestError,
        Action.FAIL,
        "At least one contact is required.",
    ),
    "detail-401": Answer(
        401, {"detail": "Not authenticated"}, AuthenticationError, Action.FAIL_FAST, "Not authenticated"
    ),
    "detail-402": Answer(
        402,
        {"detail": "Insufficient credits"},
        InsufficientCreditsError,
        Action.PAUSE,
        "Insufficient credits",
    ),
    "detail-403": Answer(
        403,
        {"detail": "Your plan does not include API access"},
        PermissionDeniedError,
        Action.FAIL_FAST,
        "Your plan does not include API access",
    ),
    "detail-404": Answer(
        404, {"detail": "Workflow not found"}, NotFoundError, Action.FAIL, "Workflow not found"
    ),
    "detail-422": Answer(422, {"detail": LOC_ITEMS}, UnprocessableEntityError, Action.QUARANTINE, LOC_ITEMS),
    "detail-429": Answer(
        429, {"detail": "Rate limit exceeded"}, RateLimitError, Action.RETRY_AFTER, "Rate limit exceeded"
    ),
    "detail-503": Answer(
        503,
        {"detail": "Service temporarily unavailable"},
        ServerError,
        Action.RETRY,
        "Service temporarily unavailable",
    ),
    # {"error": {"code", "message"}}, the newer surface: a known code decides, whatever the status.
    **{
        f"code-{code}-{status}": Answer(status, _envelope(code), cls, action, "Something happened", code)
        for code, status, cls, action in [
            ("insufficient_credits", 400, InsufficientCreditsError, Action.PAUSE),
            ("insufficient_credits", 402, InsufficientCreditsError, Action.PAUSE),
            ("payment_required", 402, InsufficientCreditsError, Action.PAUSE),
            ("rate_limit_exceeded", 429, RateLimitError, Action.RETRY_AFTER),
            ("rate_limited", 429, RateLimitError, Action.RETRY_AFTER),
            ("too_many_requests", 400, RateLimitError, Action.RETRY_AFTER),
            ("unauthorized", 401, AuthenticationError, Action.FAIL_FAST),
            ("unauthenticated", 401, AuthenticationError, Action.FAIL_FAST),
            ("invalid_api_key", 400, AuthenticationError, Action.FAIL_FAST),
            ("api_key_expired", 403, AuthenticationError, Action.FAIL_FAST),
            ("api_key_revoked", 401, AuthenticationError, Action.FAIL_FAST),
            ("forbidden", 403, PermissionDeniedError, Action.FAIL_FAST),
            ("no_api_access", 401, PermissionDeniedError, Action.FAIL_FAST),
            ("not_found", 400, NotFoundError, Action.FAIL),
            ("not_found", 404, NotFoundError, Action.FAIL),
            # Unknown codes leave it to the status.
            ("something_new", 400, BadRequestError, Action.FAIL),
            ("something_new", 402, InsufficientCreditsError, Action.PAUSE),
            ("upstream_timeout", 503, ServerError, Action.RETRY),
            ("something_new", 418, APIStatusError, Action.FAIL),
            # Validation codes without items that name contacts: the status decides too.
            ("validation_error", 400, BadRequestError, Action.FAIL),
            ("validation_error", 422, UnprocessableEntityError, Action.QUARANTINE),
        ]
    },
    "code-in-capitals": Answer(
        400,
        _envelope("INSUFFICIENT_CREDITS"),
        InsufficientCreditsError,
        Action.PAUSE,
        "Something happened",
        "insufficient_credits",
    ),
    "validation-400-items-under-details": Answer(
        400,
        _envelope("validation_error", details=LOC_ITEMS),
        UnprocessableEntityError,
        Action.QUARANTINE,
        "Something happened",
        "validation_error",
    ),
    "validation-400-items-under-errors-by-index": Answer(
        400,
        _envelope("invalid_request", errors=INDEX_ITEMS),
        UnprocessableEntityError,
        Action.QUARANTINE,
        "Something happened",
        "invalid_request",
    ),
    "validation-400-items-naming-no-contact": Answer(
        400,
        _envelope("validation_error", details=[{"loc": ["body", "enrichment_type"], "msg": "bad type"}]),
        BadRequestError,
        Action.FAIL,
        "Something happened",
        "validation_error",
    ),
    "error-without-code": Answer(500, _envelope(None), ServerError, Action.RETRY, "Something happened"),
    "error-as-plain-text": Answer(400, {"error": "Bad input"}, BadRequestError, Action.FAIL, "Bad input"),
    "error-without-message": Answer(
        402,
        {"error": {"code": "insufficient_credits"}},
        InsufficientCreditsError,
        Action.PAUSE,
        None,
        "insufficient_credits",
    ),
}


@pytest.mark.parametrize("answer", ENVELOPE_TABLE.values(), ids=ENVELOPE_TABLE.keys())
def test_both_envelopes_map_by_meaning_to_one_class_and_action(answer: Answer) -> None:
    error = make_status_error(
        status_code=answer.status, method="POST", path="/enrich/bulk", body=answer.body, headers={}
    )
    assert type(error) is answer.error
    assert error.status_code == answer.status
    assert (error.detail, error.code) == (answer.detail, answer.code)
    policy = policy_for(error)
    assert policy is not None and policy.action is answer.action
    text = str(error)
    assert text.startswith(f"Cleanlist API {answer.status} on POST /enrich/bulk: ")
    assert text.endswith(f"({policy.fix})")
    assert "\n" not in text and len(text) < 500
    if isinstance(answer.detail, str):
        assert answer.detail in text
    if answer.code is not None:
        assert f"[{answer.code}]" in text


def test_the_newer_envelopes_400_insufficient_credits_pauses_and_says_how_to_fix() -> None:
    body = _envelope("insufficient_credits", "Not enough credits for this request", retry_after_ms=1500)
    error = make_status_error(status_code=400, method="POST", path="/enrich/bulk", body=body, headers={})
    assert isinstance(error, InsufficientCreditsError)
    assert str(error) == (
        "Cleanlist API 400 on POST /enrich/bulk: Not enough credits for this request [insufficient_credits] "
        "(top up credits under Settings → Billing)"
    )
    assert error.retry_after == 1.5
    assert error.body == body


@pytest.mark.parametrize(
    "body",
    [
        {"detail": [*LOC_ITEMS, {"loc": ["body", "contacts", 7], "msg": "third"}]},
        _envelope("validation_error", details=[*LOC_ITEMS, {"loc": ["contacts", 7], "message": "third"}]),
        _envelope("validation_error", errors=[*LOC_ITEMS, {"index": 7, "msg": "third"}]),
        _envelope(
            "validation_error",
            errors=[
                {"index": 4, "message": "needs a name"},
                {"index": 1, "message": "needs a company"},
                {"index": 7, "message": "third"},
                {"index": 1, "message": "the first message for a contact wins"},
                {"index": -1, "message": "not an index"},
                {"index": True, "message": "not an index either"},
                {"index": "2", "message": "text is not an index"},
            ],
        ),
    ],
    ids=["detail-loc", "error-details-loc-without-body", "error-errors-mixed", "error-errors-index"],
)
def test_invalid_contacts_are_found_in_either_envelope(body: dict[str, Any]) -> None:
    error = make_status_error(status_code=422, method="POST", path="/enrich/bulk", body=body, headers={})
    assert isinstance(error, UnprocessableEntityError)
    assert error.invalid_contacts == [
        InvalidContact(1, "needs a company"),
        InvalidContact(4, "needs a name"),
        InvalidContact(7, "third"),
    ]
    assert "invalid item(s)" in str(error)


# headers, body, expected seconds (None: no hint). Headers first; the body only when they give no usable hint.
BODY_RETRY_TABLE: list[tuple[str, dict[str, str], Any, float | None]] = [
    ("detail-envelope-ms", {}, {"detail": "Rate limit exceeded", "retry_after_ms": 1500}, 1.5),
    ("detail-envelope-seconds", {}, {"detail": "Rate limit exceeded", "retry_after": 3}, 3.0),
    ("detail-object", {}, {"detail": {"message": "slow down", "retry_after": 2}}, 2.0),
    ("error-envelope-ms", {}, _envelope("rate_limited", retry_after_ms=2500), 2.5),
    ("error-envelope-seconds", {}, _envelope("rate_limited", retry_after=4), 4.0),
    ("error-envelope-ms-as-text", {}, _envelope("rate_limited", retry_after_ms="750"), 0.75),
    ("error-details-object", {}, _envelope("rate_limited", details={"retry_after_ms": 800}), 0.8),
    ("envelope-top-level", {}, {**_envelope("rate_limited"), "retry_after_ms": 1200}, 1.2),
    ("body-date", {}, {"detail": "x", "retry_after": http_date(20)}, 20.0),
    ("ms-before-seconds", {}, _envelope("rate_limited", retry_after_ms=500, retry_after=9), 0.5),
    ("ms-unusable-seconds-used", {}, _envelope("rate_limited", retry_after_ms=-1, retry_after=2), 2.0),
    ("header-seconds-wins", {"Retry-After": "5"}, _envelope("rate_limited", retry_after_ms=1500), 5.0),
    ("header-ms-wins", {"retry-after-ms": "300"}, {"detail": "x", "retry_after": 8}, 0.3),
    ("header-zero-body-used", {"Retry-After": "0"}, _envelope("rate_limited", retry_after_ms=2000), 2.0),
    ("header-garbage-body-used", {"Retry-After": "soon"}, {"detail": "x", "retry_after": 6}, 6.0),
    ("body-zero", {}, _envelope("rate_limited", retry_after_ms=0), None),
    ("body-negative", {}, _envelope("rate_limited", retry_after=-5), None),
    ("body-nan", {}, _envelope("rate_limited", retry_after_ms=float("nan")), None),
    ("body-inf", {}, {"detail": "x", "retry_after": float("inf")}, None),
    ("body-above-cap", {}, _envelope("rate_limited", retry_after_ms=(RETRY_AFTER_CAP + 1) * 1000), None),
    ("body-at-cap", {}, _envelope("rate_limited", retry_after=RETRY_AFTER_CAP), RETRY_AFTER_CAP),
    ("body-overflow", {}, {"detail": "x", "retry_after_ms": 10**400}, None),
    ("body-boolean", {}, _envelope("rate_limited", retry_after=True), None),
    ("body-garbage", {}, _envelope("rate_limited", retry_after_ms="soon"), None),
    ("body-null", {}, _envelope("rate_limited", retry_after_ms=None), None),
    ("body-list", {}, {"detail": "x", "retry_after": [3]}, None),
    ("items-are-not-hints", {}, {"detail": [{"retry_after": 3}]}, None),
    ("body-not-an-object", {}, "retry_after_ms: 1500", None),
    ("no-hint-anywhere", {}, _envelope("rate_limited"), None),
]


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [(headers, body, expected) for _, headers, body, expected in BODY_RETRY_TABLE],
    ids=[name for name, _, _, _ in BODY_RETRY_TABLE],
)
def test_retry_hints_come_from_headers_then_either_envelopes_body_with_the_same_guards(
    headers: dict[str, str], body: Any, expected: float | None
) -> None:
    value = parse_retry_after(headers, body=body, now=NOW)
    error = make_status_error(
        status_code=429, method="GET", path="/credits/balance", body=body, headers=headers, now=NOW
    )
    assert isinstance(error, RateLimitError)
    if expected is None:
        assert value is None and error.retry_after is None
    else:
        assert value == pytest.approx(expected, abs=1e-6)
        assert error.retry_after == pytest.approx(expected, abs=1e-6)
        assert 0 < value <= RETRY_AFTER_CAP
