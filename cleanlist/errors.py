"""Every error this project raises, and the one policy table that says what to do about each.

    CleanlistError                    one-line message, fit for a user
    ├── InputError                    the user's source, mapping, output or options can't be used
    │   └── MissingAPIKeyError
    └── APIError                      anything that went wrong talking to the API
        ├── APIConnectionError        connection refused/reset, DNS          → retry
        │   └── APITimeoutError       connect/read/write timeout             → retry
        ├── APIResponseValidationError  a 2xx whose body does not fit the model → fail
        └── APIStatusError            a non-2xx answer (status_code, detail, code)
            ├── BadRequestError         400  a bug on our side               → fail
            ├── AuthenticationError     401  key missing/expired/revoked     → fail fast
            │                                (also validate-key's 200 `{"valid": false}`)
            ├── InsufficientCreditsError 402 out of credits                  → pause
            ├── PermissionDeniedError   403  plan lacks API access           → fail fast
            ├── NotFoundError           404  unknown workflow/task id        → fail (no loop)
            ├── UnprocessableEntityError 422 contacts broke the field rule   → quarantine rows
            ├── RateLimitError          429  rate limited                    → retry after Retry-After
            └── ServerError             5xx  (500, 502, 503, 504)            → retry with backoff

`make_status_error` is the only place that maps an answer to a class; `policy_for` is the only place
that says what to do. Callers branch on `policy_for(err).action`, never on numbers. Two envelopes are
read: `{"detail": …}` (this API, documented) and `{"error": {"code", "message", …}}` (the newer surface),
whose code decides the class where it is clearer than the status (`insufficient_credits` comes as a 400
there); an unknown code leaves it to the status.
"""

from __future__ import annotations

import email.utils
import enum
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
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


class StopRequested(CleanlistError):
    """A stop was requested (SIGTERM, SIGINT, Prefect cancellation): the work was left undone on purpose.

    Not an API error: nothing was asked of the API, so no policy applies and nothing is retried."""


class StoppedBeforeSending(StopRequested):
    """A request was not sent because its run is stopping (it was waiting for a rate slot or a hold).

    Nothing reached the API: such a request is never in doubt."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(f"a request to {endpoint} was not sent: the run is stopping")
        self.endpoint = endpoint


class APIConnectionError(APIError):
    """The request never got an HTTP answer.

    `request_sent`: whether the request may have reached the server (the connection was open when it
    failed). For a bulk POST that means it may have been accepted, and charged.
    """

    def __init__(self, message: str, *, request_sent: bool = True) -> None:
        super().__init__(message)
        self.request_sent = request_sent


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
        body: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.method = method
        self.path = path
        self.body = body  # decoded and already redacted by the client
        envelope = _read_envelope(body)
        # The message text (or the documented 422 list); `code` is the newer envelope's error code;
        # `items` the per-item validation entries, wherever the envelope put them.
        self.detail: Any = envelope.detail
        self.code: str | None = envelope.code
        self.items: list[Any] = envelope.items
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
        """The contacts the items name (`loc: ["body", "contacts", i]` or `index: i`), with messages."""
        return _invalid_contacts(self.items)


def _contact_index(item: Mapping[str, Any]) -> int | None:
    """The contact an item names: FastAPI's `loc` (with or without the leading "body"), or an index field."""
    for name in ("index", "contact_index"):
        index = item.get(name)
        if isinstance(index, int) and not isinstance(index, bool):
            return index if index >= 0 else None
    loc = item.get("loc")
    if not isinstance(loc, list | tuple):
        return None
    parts = list(loc[1:]) if loc[:1] in (["body"], ("body",)) else list(loc)
    if len(parts) >= 2 and parts[0] == "contacts":
        index = parts[1]
        if isinstance(index, int) and not isinstance(index, bool) and index >= 0:
            return index
    return None


def _invalid_contacts(items: Sequence[Any]) -> list[InvalidContact]:
    found: dict[int, str] = {}
    for item in items:
        if not isinstance(item, Mapping):
            continue
        index = _contact_index(item)
        if index is not None:
            found.setdefault(index, str(item.get("msg") or item.get("message") or "rejected by the API"))
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


def _status_class(status_code: int) -> type[APIStatusError]:
    if status_code in _STATUS_CLASSES:
        return _STATUS_CLASSES[status_code]
    if status_code >= 500:
        return ServerError
    return APIStatusError


# The newer envelope's codes, where they say more than the status (insufficient credits is a 400 there).
_CODE_CLASSES: dict[str, type[APIStatusError]] = {
    "insufficient_credits": InsufficientCreditsError,
    "payment_required": InsufficientCreditsError,
    "rate_limit_exceeded": RateLimitError,
    "rate_limited": RateLimitError,
    "too_many_requests": RateLimitError,
    "unauthorized": AuthenticationError,
    "unauthenticated": AuthenticationError,
    "invalid_api_key": AuthenticationError,
    "api_key_expired": AuthenticationError,
    "api_key_revoked": AuthenticationError,
    "forbidden": PermissionDeniedError,
    "no_api_access": PermissionDeniedError,
    "not_found": NotFoundError,
}
# A validation code means "quarantine these rows" only when its items name contacts; without any (an
# empty batch, a bad enrichment_type) the status decides, or a bug of ours would loop as a data problem.
_VALIDATION_CODES = frozenset(
    {"validation_error", "validation_failed", "unprocessable_entity", "invalid_contacts", "invalid_request"}
)


def _error_class(
    status_code: int, code: str | None = None, *, names_contacts: bool = False
) -> type[APIStatusError]:
    """The class of an error answer: a known envelope code first, else the status."""
    if code in _CODE_CLASSES:
        return _CODE_CLASSES[code]
    if code in _VALIDATION_CODES and names_contacts:
        return UnprocessableEntityError
    return _status_class(status_code)


@dataclass(frozen=True)
class _Envelope:
    """What an error body says, whichever envelope it came in."""

    detail: Any = None
    code: str | None = None
    items: list[Any] = field(default_factory=list)


def _read_envelope(body: Any) -> _Envelope:
    if not isinstance(body, Mapping):
        return _Envelope(detail=body)
    error = body.get("error")
    if not isinstance(error, Mapping):
        detail = body.get("detail")
        if detail is None and isinstance(error, str) and error.strip():
            detail = error  # {"error": "text"}: a third spelling, read as the text it is
        return _Envelope(detail=detail, items=list(detail) if isinstance(detail, list) else [])
    code = error.get("code")
    code = code.strip().lower() if isinstance(code, str) and code.strip() else None
    message = error.get("message")
    items = next((v for v in (error.get("details"), error.get("errors")) if isinstance(v, list)), [])
    return _Envelope(detail=message if isinstance(message, str) else None, code=code, items=list(items))


def make_status_error(
    *,
    status_code: int,
    method: str,
    path: str,
    body: Any,
    headers: Mapping[str, str],
    now: float | None = None,
) -> APIStatusError:
    """The one function that turns an HTTP error answer (status, headers, decoded body) into its error."""
    envelope = _read_envelope(body)
    cls = _error_class(status_code, envelope.code, names_contacts=bool(_invalid_contacts(envelope.items)))
    retry_after = parse_retry_after(headers, body=body, now=now)
    fix = POLICY[cls].fix if cls in POLICY else POLICY[APIStatusError].fix
    message = f"Cleanlist API {status_code} on {method} {path}: {_summarize(envelope)} ({fix})"
    return cls(
        message,
        status_code=status_code,
        method=method,
        path=path,
        body=body,
        retry_after=retry_after,
    )


def _summarize(envelope: _Envelope) -> str:
    detail = envelope.detail
    if isinstance(detail, str) and detail.strip():
        summary = " ".join(detail.split())[:300]
    elif isinstance(detail, list):
        summary = f"{len(detail)} invalid item(s)"
    else:
        summary = "no detail"
    if envelope.items and not isinstance(detail, list):
        summary += f"; {len(envelope.items)} invalid item(s)"
    if envelope.code:
        summary += f" [{envelope.code[:60]}]"
    return summary


def parse_retry_after(
    headers: Mapping[str, str], *, body: Any = None, now: float | None = None
) -> float | None:
    """Seconds to wait, or None. The first usable hint wins, in this order: the `retry-after-ms` header,
    the `Retry-After` header (seconds or an HTTP-date), then `retry_after_ms` and `retry_after` (seconds)
    in the body: at its top level, in the `error` object and its `details`, or in a `detail` object.

    A hint is unusable when absent, 0, negative, non-finite, unparsable, or above RETRY_AFTER_CAP. The
    `0 <` guard is what keeps `Retry-After: 0` from turning into a hot loop.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    return next((value for value in _retry_hints(lowered, body, now) if _usable(value)), None)


def _retry_hints(headers: Mapping[str, str], body: Any, now: float | None) -> Iterator[float | None]:
    yield _number(headers.get("retry-after-ms"), scale=0.001)
    yield _seconds_or_date(headers.get("retry-after"), now)
    for source in _hint_sources(body):
        yield _number(source.get("retry_after_ms"), scale=0.001)
        yield _seconds_or_date(source.get("retry_after"), now)


def _hint_sources(body: Any) -> Iterator[Mapping[str, Any]]:
    if not isinstance(body, Mapping):
        return
    yield body
    error = body.get("error")
    if isinstance(error, Mapping):
        yield error
        if isinstance(error.get("details"), Mapping):
            yield error["details"]
    if isinstance(body.get("detail"), Mapping):
        yield body["detail"]


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and 0 < value <= RETRY_AFTER_CAP


def _number(raw: Any, *, scale: float = 1.0) -> float | None:
    """A number sent as a JSON number or as text; None for anything else (booleans included)."""
    if isinstance(raw, bool) or raw is None:
        return None
    try:
        if isinstance(raw, int | float):
            return float(raw) * scale
        if isinstance(raw, str):
            return float(raw.strip()) * scale
    except (ValueError, OverflowError):
        return None
    return None


def _seconds_or_date(raw: Any, now: float | None) -> float | None:
    seconds = _number(raw)
    if seconds is not None or not isinstance(raw, str):
        return seconds
    try:
        parsed = email.utils.parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:  # "-0000" means "zone unknown": no way to tell when that is
        return None
    return parsed.timestamp() - (time.time() if now is None else now)
