"""Typed clients of the Cleanlist Public API (sync and async) over httpx.

The client classifies and parses; it does not loop. Retries are decided by `cleanlist.retry.RetryPolicy`
(asked by the submit task and the poller). Every request first takes a slot from the process-wide
rate limiter of its endpoint; a 429 with Retry-After holds that endpoint for every caller.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import SecretStr, ValidationError

from cleanlist import jsontext
from cleanlist.constants import API_PREFIX, POOL_TIMEOUT, WRITE_TIMEOUT
from cleanlist.errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APITimeoutError,
    MissingAPIKeyError,
    make_status_error,
    parse_retry_after,
)
from cleanlist.models import (
    BulkEnrichRequest,
    BulkEnrichResponse,
    Contact,
    CreditsBalance,
    EnrichmentType,
    KeyValidation,
    TaskResult,
    WebhookDeliveries,
    WorkflowStatus,
)
from cleanlist.ratelimit import EndpointLimiter, RateLimiter
from cleanlist.settings import CleanlistSettings, RateLimit, host_of

logger = logging.getLogger("cleanlist.client")
# How long `close` waits for requests on the wire: the read timeout bounds them anyway; a stop must end.
CLOSE_WAIT_SECONDS = 20.0
_Model = TypeVar("_Model")

ENDPOINTS: dict[str, tuple[str, str]] = {
    "validate-key": ("GET", "/auth/validate-key"),
    "credits-balance": ("GET", "/credits/balance"),
    "enrich-bulk": ("POST", "/enrich/bulk"),
    "enrich-status": ("GET", "/enrich/status"),
    "webhook-deliveries": ("GET", "/webhooks/deliveries"),
}


def secret_spellings(value: str) -> list[str]:
    """Every form `value` takes in text that may be shown, longest first: as it is, without surrounding
    whitespace, and escaped as Python's repr of the str or of its bytes (`b'Bearer clapi_…\\n'`, as
    h11's "Illegal header value" quotes it), JSON and percent-encoding write it."""
    forms: set[str] = set()
    for text in {value, value.strip()}:
        if not text:
            continue
        forms.update(
            {
                text,
                repr(text)[1:-1],
                repr(text.encode("utf-8", "backslashreplace"))[2:-1],
                json.dumps(text)[1:-1],
                json.dumps(text, ensure_ascii=False)[1:-1],
                quote(text, safe=""),
            }
        )
    return sorted(forms, key=len, reverse=True)


def redact(text: str, secret: SecretStr | None) -> str:
    """Remove the key from any text that might be shown (error bodies can echo headers; an exception
    can quote the header escaped), in every spelling `secret_spellings` knows."""
    if secret is None:
        return text
    value = secret.get_secret_value()
    if not value:
        return text
    for form in secret_spellings(value):
        if form in text:
            text = text.replace(form, "[redacted]")
    return text


def redact_json(value: Any, secret: SecretStr | None) -> Any:
    """`redact` every string (keys included) inside a decoded JSON value, however deep."""
    if isinstance(value, str):
        return redact(value, secret)
    if isinstance(value, list):
        return [redact_json(item, secret) for item in value]
    if isinstance(value, dict):
        return {redact(str(k), secret): redact_json(v, secret) for k, v in value.items()}
    return value


def key_fingerprint(key: SecretStr) -> str:
    """A short, one-way name for an API key: how limiters and the store tell organizations apart."""
    return hashlib.sha256(key.get_secret_value().encode()).hexdigest()[:16]


def organization_of(base_url: str, key: SecretStr) -> str:
    """Whose rate budget a request spends: one API host and key."""
    return f"{host_of(base_url)}|{key_fingerprint(key)}"


class _ClientCore:
    """What the sync and async clients share: settings, headers, limiter, parsing, error mapping."""

    def __init__(
        self,
        api_key: str | SecretStr | None = None,
        *,
        base_url: str | None = None,
        rate_limit: RateLimit | str | None = None,
        timeout: httpx.Timeout | float | None = None,
        settings: CleanlistSettings | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        settings = settings or CleanlistSettings()
        key = api_key if api_key is not None else settings.api_key
        if isinstance(key, str):
            key = SecretStr(key)
        if key is None or not key.get_secret_value().strip():
            raise MissingAPIKeyError()
        self._api_key: SecretStr = key
        self.base_url = host_of(base_url or settings.base_url)
        if isinstance(rate_limit, str):
            rate_limit = RateLimit.parse(rate_limit)
        self.rate_limit = rate_limit or settings.rate
        if isinstance(timeout, int | float):
            timeout = httpx.Timeout(timeout)
        self.timeout = timeout or httpx.Timeout(
            connect=settings.connect_timeout,
            read=settings.read_timeout,
            write=WRITE_TIMEOUT,
            pool=POOL_TIMEOUT,
        )
        # A client given no limiter paces itself alone: clients share a rate budget only when they are
        # given one limiter (a run's clients share the store's rate book through theirs).
        self.limiter = limiter or RateLimiter(self.rate_limit)
        # The run's stop request: once set, a request still waiting for its rate slot is not sent.
        self.stop: threading.Event | None = None
        # Requests on the wire, so that `close` lets them finish (their answers get read and recorded).
        self._on_wire = 0
        self._wire = threading.Condition()

    def _sending(self) -> None:
        with self._wire:
            self._on_wire += 1

    def _sent(self) -> None:
        with self._wire:
            self._on_wire -= 1
            self._wire.notify_all()

    def _wait_for_the_wire(self, timeout: float) -> None:
        """Wait (bounded) until no request is on the wire: closing under one would lose its answer."""
        deadline = time.monotonic() + timeout
        with self._wire:
            while self._on_wire > 0 and (left := deadline - time.monotonic()) > 0:
                self._wire.wait(left)
            if self._on_wire > 0:
                logger.warning("closing the API client with %d request(s) still unanswered", self._on_wire)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, rate_limit='{self.rate_limit}')"

    @property
    def _headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self._api_key.get_secret_value()}",
            "Accept": "application/json",
            "User-Agent": "cleanlist-prefect/0.1",
        }

    def _url(self, endpoint: str) -> str:
        return f"{self.base_url}{API_PREFIX}{ENDPOINTS[endpoint][1]}"

    def _error_from(self, endpoint: str, response: httpx.Response) -> APIError:
        method, path = ENDPOINTS[endpoint]
        try:
            body: Any = redact_json(response.json(), self._api_key)
        except (json.JSONDecodeError, UnicodeDecodeError):
            # Redact before cutting: a cut through the key would leave its head unrecognized.
            body = {"detail": redact(response.text, self._api_key)[:300]}
        error = make_status_error(
            status_code=response.status_code,
            method=method,
            path=path,
            body=body,
            headers=response.headers,
        )
        return error

    @staticmethod
    def _release(limiter: EndpointLimiter, response: httpx.Response | None) -> None:
        """Give the request's slot back with its outcome; a 429's Retry-After holds the endpoint (the
        limiter learns from it too), so nobody sends again inside the window the server named."""
        if response is None:
            limiter.release(rate_limited=False, answered=False)
            return
        retry_after = None
        if response.status_code == 429:
            try:
                hint_body: Any = response.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                hint_body = None
            retry_after = parse_retry_after(response.headers, body=hint_body)
        limiter.release(rate_limited=response.status_code == 429, retry_after=retry_after)

    def _key_validation(self, payload: Any) -> KeyValidation:
        """A 200 `{"valid": false}` [doc: troubleshooting] is a rejected key: raise what a 401 raises."""
        validation = self._model("validate-key", KeyValidation.model_validate, payload)
        if validation.valid:
            return validation
        method, path = ENDPOINTS["validate-key"]
        extra = validation.model_extra or {}
        reason = next(
            (extra[k] for k in ("reason", "message", "detail") if isinstance(extra.get(k), str)), ""
        )
        detail = "the API answered 200 with valid=false: the key is not accepted"
        if reason.strip():
            detail += f" ({redact(reason, self._api_key)})"
        # Status 401 is the meaning (the class and policy follow from it); the detail says what was sent.
        raise make_status_error(
            status_code=401, method=method, path=path, body={"detail": detail}, headers={}
        )

    def _transport_error(self, endpoint: str, exc: httpx.TransportError) -> APIError:
        method, path = ENDPOINTS[endpoint]
        kind = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
        reason = redact(str(exc) or type(exc).__name__, self._api_key)
        # Failing to connect (or to get a pooled connection) means nothing was sent.
        sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        return kind(
            f"Cleanlist API {method} {path} failed: {type(exc).__name__}: {reason}", request_sent=sent
        )

    def _parse(self, endpoint: str, response: httpx.Response) -> Any:
        # Any non-2xx, 3xx included: httpx follows no redirects, and a redirect's body is no answer.
        if not response.is_success:
            raise self._error_from(endpoint, response)
        try:
            return jsontext.loads(response.content)
        except (json.JSONDecodeError, UnicodeDecodeError):
            method, path = ENDPOINTS[endpoint]
            raise APIConnectionError(
                f"Cleanlist API {method} {path} answered {response.status_code} with a body that is not JSON"
            ) from None

    def _log(self, endpoint: str, response: httpx.Response) -> None:
        method, path = ENDPOINTS[endpoint]
        logger.debug("%s %s → %s", method, path, response.status_code)

    @staticmethod
    def _bulk_body(
        contacts: Sequence[Contact | Mapping[str, Any]],
        enrichment_type: EnrichmentType | str,
        webhook_url: str | None,
    ) -> bytes:
        # One validation of the whole body (its contacts inside it, in pydantic-core) and one
        # serialization, rather than one of each per contact.
        request = BulkEnrichRequest.model_validate(
            {
                "enrichment_type": enrichment_type,
                "webhook_url": webhook_url,
                "contacts": [c if isinstance(c, Contact | dict) else dict(c) for c in contacts],
            }
        )
        return request.to_json_bytes()

    def _send_kwargs(self, body: Any) -> dict[str, Any]:
        """httpx arguments for a body: bytes already serialized go as they are."""
        if body is None:
            return {"headers": self._headers}
        if isinstance(body, bytes):
            return {"content": body, "headers": {**self._headers, "Content-Type": "application/json"}}
        return {"json": body, "headers": self._headers}

    @staticmethod
    def _status_params(workflow_id: str | None, task_id: str | None) -> dict[str, str]:
        params: dict[str, str] = {}
        if workflow_id is not None:
            params["workflow_id"] = workflow_id
        if task_id is not None:
            params["task_id"] = task_id
        return params

    @staticmethod
    def _model(endpoint: str, parse: Callable[[Any], _Model], payload: Any) -> _Model:
        """Parse a 2xx body; one that does not fit is an APIError whose text never quotes the body."""
        try:
            return parse(payload)
        except ValidationError as exc:
            method, path = ENDPOINTS[endpoint]
            fields = sorted({".".join(str(part) for part in error["loc"]) for error in exc.errors()})
            raise APIResponseValidationError(
                f"Cleanlist API {method} {path} answered with a body that does not fit: "
                f"{', '.join(fields)[:200] or 'the body'}"
            ) from None

    @staticmethod
    def _status_model(payload: Any) -> WorkflowStatus | TaskResult:
        if isinstance(payload, dict) and "task_id" in payload and "results" not in payload:
            return TaskResult.model_validate(payload)
        return WorkflowStatus.parse(payload)


class CleanlistClient(_ClientCore):
    """Blocking client; safe to share between threads."""

    def __init__(self, api_key: str | SecretStr | None = None, **kwargs: Any) -> None:
        transport: httpx.BaseTransport | None = kwargs.pop("transport", None)
        super().__init__(api_key, **kwargs)
        self._http = httpx.Client(
            timeout=self.timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self, *, wait: float = CLOSE_WAIT_SECONDS) -> None:
        """Close the connections, once the requests on the wire have been answered (at most `wait` s)."""
        self._wait_for_the_wire(wait)
        self._http.close()

    def _request(
        self,
        endpoint: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        before_send: Callable[[], None] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One request. `before_send` is called once the rate slot is granted, right before the request
        goes on the wire (the acceptance journal's intent); a stop requested while waiting for the slot
        raises StoppedBeforeSending and nothing is sent. `timeout` (seconds) replaces the client's own
        for this request."""
        # Every endpoint spends its budget: validate-key is free of credits, not of the rate limit.
        limiter = self.limiter.endpoint(endpoint)
        limiter.acquire(self.stop)
        limiter.wait_out_hold(self.stop)
        if before_send is not None:
            try:
                before_send()
            except BaseException:
                limiter.release(rate_limited=False, answered=False)
                raise
        method = ENDPOINTS[endpoint][0]
        response: httpx.Response | None = None
        self._sending()
        try:
            response = self._http.request(
                method,
                self._url(endpoint),
                params=params,
                timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
                **self._send_kwargs(body),
            )
        except httpx.TransportError as exc:
            raise self._transport_error(endpoint, exc) from None
        finally:
            self._sent()
            self._release(limiter, response)
        self._log(endpoint, response)
        return self._parse(endpoint, response)

    def validate_key(self) -> KeyValidation:
        """The key's user and organization; AuthenticationError when refused (401 or valid=false)."""
        return self._key_validation(self._request("validate-key"))

    def credits_balance(self, *, timeout: float | None = None) -> CreditsBalance:
        """The organization's balance; `timeout` (seconds) bounds this one call (default: the client's)."""
        payload = self._request("credits-balance", timeout=timeout)
        return self._model("credits-balance", CreditsBalance.model_validate, payload)

    def enrich_bulk(
        self,
        contacts: Sequence[Contact | Mapping[str, Any]],
        enrichment_type: EnrichmentType | str = "partial",
        webhook_url: str | None = None,
        *,
        before_send: Callable[[], None] | None = None,
    ) -> BulkEnrichResponse:
        """Submit up to 250 contacts; `before_send` runs once the rate slot is granted (see `_request`)."""
        body = self._bulk_body(contacts, enrichment_type, webhook_url)
        payload = self._request("enrich-bulk", body=body, before_send=before_send)
        return self._model("enrich-bulk", BulkEnrichResponse.model_validate, payload)

    def enrich_status(
        self, *, workflow_id: str | None = None, task_id: str | None = None
    ) -> WorkflowStatus | TaskResult:
        payload = self._request("enrich-status", params=self._status_params(workflow_id, task_id))
        return self._model("enrich-status", self._status_model, payload)

    def webhook_deliveries(self, workflow_id: str) -> WebhookDeliveries:
        payload = self._request("webhook-deliveries", params={"workflow_id": workflow_id})
        return self._model("webhook-deliveries", WebhookDeliveries.parse, payload)

    def results_from_endpoint(self, workflow_id: str, endpoint: str | None = None) -> WorkflowStatus:
        """A delivered workflow's full answer from its webhook's `results_endpoint`: a status call.

        The endpoint comes from an unsigned payload, so it is only followed when it is this workflow's
        status endpoint (on this API, or a bare path); anything else is refused, never requested.
        """
        path = API_PREFIX + ENDPOINTS["enrich-status"][1]
        if endpoint is not None:
            url = httpx.URL(endpoint)
            same_host = not url.host or url.host == httpx.URL(self.base_url).host
            if not (same_host and url.path == path and dict(url.params) == {"workflow_id": workflow_id}):
                raise APIResponseValidationError(
                    f"results_endpoint of workflow {workflow_id} is not its status endpoint; not followed"
                )
        status = self.enrich_status(workflow_id=workflow_id)
        if not isinstance(status, WorkflowStatus):
            raise APIResponseValidationError(f"GET {path} answered a task, not workflow {workflow_id}")
        return status


class AsyncCleanlistClient(_ClientCore):
    """Asyncio client; shares the process-wide limiter with blocking clients of the same key."""

    def __init__(self, api_key: str | SecretStr | None = None, **kwargs: Any) -> None:
        transport: httpx.AsyncBaseTransport | None = kwargs.pop("transport", None)
        super().__init__(api_key, **kwargs)
        self._http = httpx.AsyncClient(
            timeout=self.timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self,
        endpoint: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        before_send: Callable[[], None] | None = None,
    ) -> Any:
        limiter = self.limiter.endpoint(endpoint)
        await limiter.acquire_async(self.stop)
        await limiter.wait_out_hold_async(self.stop)
        if before_send is not None:
            try:
                before_send()
            except BaseException:
                limiter.release(rate_limited=False, answered=False)
                raise
        method = ENDPOINTS[endpoint][0]
        response: httpx.Response | None = None
        try:
            response = await self._http.request(
                method, self._url(endpoint), params=params, **self._send_kwargs(body)
            )
        except httpx.TransportError as exc:
            raise self._transport_error(endpoint, exc) from None
        finally:
            self._release(limiter, response)
        self._log(endpoint, response)
        return self._parse(endpoint, response)

    async def validate_key(self) -> KeyValidation:
        """The key's user and organization; AuthenticationError when refused (401 or valid=false)."""
        return self._key_validation(await self._request("validate-key"))

    async def credits_balance(self) -> CreditsBalance:
        payload = await self._request("credits-balance")
        return self._model("credits-balance", CreditsBalance.model_validate, payload)

    async def enrich_bulk(
        self,
        contacts: Sequence[Contact | Mapping[str, Any]],
        enrichment_type: EnrichmentType | str = "partial",
        webhook_url: str | None = None,
        *,
        before_send: Callable[[], None] | None = None,
    ) -> BulkEnrichResponse:
        body = self._bulk_body(contacts, enrichment_type, webhook_url)
        payload = await self._request("enrich-bulk", body=body, before_send=before_send)
        return self._model("enrich-bulk", BulkEnrichResponse.model_validate, payload)

    async def enrich_status(
        self, *, workflow_id: str | None = None, task_id: str | None = None
    ) -> WorkflowStatus | TaskResult:
        payload = await self._request("enrich-status", params=self._status_params(workflow_id, task_id))
        return self._model("enrich-status", self._status_model, payload)

    async def webhook_deliveries(self, workflow_id: str) -> WebhookDeliveries:
        payload = await self._request("webhook-deliveries", params={"workflow_id": workflow_id})
        return self._model("webhook-deliveries", WebhookDeliveries.parse, payload)
