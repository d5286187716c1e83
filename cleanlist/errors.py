"""Every error this project raises, and the one policy table that says what to do about each.

    CleanlistError                    one-line message, fit for a user
    ├── InputError                    the user's source, mapping, output or options can't be used
    │   └── MissingAPIKeyError
    └── APIError                      anything that went wrong talking to the API
        ├── APIConnectionError        connection refused/reset, DNS          → retry
        │   └── APITimeoutError       connect/read/write timeout             → retry
        ├── APIResponseValidationError  a 2xx whose body does not fit the model → fail
        └── APIStatusError            a non-2xx answer (status_code, detail)
            ├── BadRequestError         400  a bug on our side               → fail
            ├── AuthenticationError     401  key missing/expired/revoked     → fail fast
            ├── InsufficientCreditsError 402 out of credits                  → pause
            ├── PermissionDeniedError   403  plan lacks API access           → fail fast
            ├── NotFoundError           404  unknown workflow/task id        → fail (no loop)
            ├── UnprocessableEntityError 422 contacts broke the field rule   → quarantine rows
            ├── RateLimitError          429  rate limited                    → retry after Retry-After
            └── ServerError             5xx  (500, 502, 503, 504)            → retry with backoff

`make_status_error` is the only place that maps a status code to a class; `policy_for` is the only
place that says what to do. Callers branch on `policy_for(err).action`, never on numbers.
"""

from __future__ import annotations

import email.utils
import enum
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cleanlist.constants import RETRY_AFTER_CAP


class CleanlistError(Exception):
    """Base of every error raised by this project. Its message is one line, fit for a user."""


class InputError(CleanlistError):
    """The user's input (source, mapping, output, options) cannot be used as given."""


class MissingAPIKeyError(InputError):
    def __init__(self) -> None:
        super().__init__(
            "no Cleanlist API key: set CLEANLIST_API_KEY (or store one with `cleanlist-enrich set-key`)"
        )


class APIError(CleanlistError):
    """Talking to the Cleanlist API failed."""


class APIConnectionError(APIError):
    """The request never got an HTTP answer."""


class APITimeoutError(APIConnectionError):
    """The request timed out."""


@dataclass(frozen=True)
class InvalidContact:
    """One contact the API refused (422), by its index in the request."""

    index: int
    message: str


class APIResponseValidationError(APIError):
    """The API answered 2xx with a body this client cannot read (a contract change or a bug)."""


class APIStatusError(APIError):
    """The API answered with a non-2xx status."""

    status_code: int = 0

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        method: str,
        path: str,
        detail: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.method = method
        self.path = path
        self.detail = detail
        self.retry_after = retry_after


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class InsufficientCreditsError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class UnprocessableEntityError(APIStatusError):
    @property
    def invalid_contacts(self) -> list[InvalidContact]:
        """The contacts named by `detail[].loc == ["body", "contacts", i]`, with their messages."""
        found: dict[int, str] = {}
        items = self.detail if isinstance(self.detail, list) else []
        for item in items:
            if not isinstance(item, Mapping):
                continue
            loc = item.get("loc")
            if (
                isinstance(loc, list | tuple)
                and len(loc) >= 3
                and loc[0] == "body"
                and loc[1] == "contacts"
                and isinstance(loc[2], int)
            ):
                found.setdefault(loc[2], str(item.get("msg") or "rejected by the API"))
        return [InvalidContact(index, message) for index, message in sorted(found.items())]


class RateLimitError(APIStatusError):
    pass


class ServerError(APIStatusError):
    pass


class Action(enum.StrEnum):
    """What a caller does about an error."""

    RETRY_AFTER = "retry_after"  # wait Retry-After (when given), then back off with jitter
    RETRY = "retry"  # back off with jitter
    FAIL_FAST = "fail_fast"  # stop every submission, keep what arrived, fail the run
    PAUSE = "pause"  # stop submitting, pause the flow until credits return
    QUARANTINE = "quarantine"  # reject the rows the error names, resubmit the rest once
    FAIL = "fail"  # fail this unit of work loudly, no retry


@dataclass(frozen=True)
class ErrorPolicy:
    action: Action
    fix: str

    @property
    def retryable(self) -> bool:
        return self.action in (Action.RETRY, Action.RETRY_AFTER)


POLICY: dict[type[APIError], ErrorPolicy] = {
    BadRequestError: ErrorPolicy(Action.FAIL, "the request was malformed: this is a bug, please report it"),
    AuthenticationError: ErrorPolicy(
        Action.FAIL_FAST, "the API key is missing, expired or revoked: set a valid CLEANLIST_API_KEY"
    ),
    InsufficientCreditsError: ErrorPolicy(Action.PAUSE, "top up credits under Settings → Billing"),
    PermissionDeniedError: ErrorPolicy(
        Action.FAIL_FAST, "the organization's plan does not include API access: upgrade the plan"
    ),
    NotFoundError: ErrorPolicy(Action.FAIL, "the workflow or task id is unknown to the API"),
    UnprocessableEntityError: ErrorPolicy(
        Action.QUARANTINE, "the named contacts break the field rule; they go to rejects"
    ),
    RateLimitError: ErrorPolicy(Action.RETRY_AFTER, "rate limited: waiting for Retry-After"),
    ServerError: ErrorPolicy(Action.RETRY, "transient server error: retrying with backoff"),
    APIConnectionError: ErrorPolicy(Action.RETRY, "network problem: retrying with backoff"),
    # Not retried: for a bulk POST the batch may have been accepted (and charged) already.
    APIResponseValidationError: ErrorPolicy(
        Action.FAIL, "the API answered in a shape this client does not know: please report it"
    ),
    APIStatusError: ErrorPolicy(Action.FAIL, "unexpected answer from the API"),
}

_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: InsufficientCreditsError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def policy_for(error: BaseException) -> ErrorPolicy | None:
    """The policy row for an error (the most specific class wins); None for non-API errors."""
    for cls in type(error).__mro__:
        if cls in POLICY:
            return POLICY[cls]
    return None


def status_error_class(status_code: int) -> type[APIStatusError]:
    if status_code in _STATUS_CLASSES:
        return _STATUS_CLASSES[status_code]
    if status_code >= 500:
        return ServerError
    return APIStatusError


def make_status_error(
    *,
    status_code: int,
    method: str,
    path: str,
    body: Any,
    headers: Mapping[str, str],
    now: float | None = None,
) -> APIStatusError:
    """The one function that turns an HTTP error answer into its error class."""
    cls = status_error_class(status_code)
    detail = body.get("detail") if isinstance(body, Mapping) else body
    retry_after = parse_retry_after(headers, now=now)
    summary = _summarize_detail(detail)
    fix = POLICY[cls].fix if cls in POLICY else POLICY[APIStatusError].fix
    message = f"Cleanlist API {status_code} on {method} {path}: {summary} ({fix})"
    return cls(
        message,
        status_code=status_code,
        method=method,
        path=path,
        detail=detail,
        retry_after=retry_after,
    )


def _summarize_detail(detail: Any) -> str:
    if isinstance(detail, str) and detail.strip():
        return " ".join(detail.split())[:300]
    if isinstance(detail, list):
        return f"{len(detail)} invalid item(s)"
    return "no detail"


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`/`Retry-After` (seconds or an HTTP-date), or None.

    None means "no hint": absent, 0, negative, non-finite, unparsable, or above RETRY_AFTER_CAP.
    The `0 <` guard is what keeps `Retry-After: 0` from turning into a hot loop.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    value: float | None = None
    if "retry-after-ms" in lowered:
        try:
            value = float(lowered["retry-after-ms"]) / 1000.0
        except ValueError:
            value = None
    if value is None and "retry-after" in lowered:
        raw = lowered["retry-after"].strip()
        try:
            value = float(raw)
        except ValueError:
            try:
                parsed = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError, IndexError, OverflowError):
                parsed = None
            if parsed is not None and parsed.tzinfo is not None:
                value = parsed.timestamp() - (time.time() if now is None else now)
    if value is None or not math.isfinite(value) or not 0 < value <= RETRY_AFTER_CAP:
        return None
    return value
