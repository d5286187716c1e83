"""The API key never shows: not in reprs, settings dumps, exception text or bodies, nor in DEBUG logs."""

from __future__ import annotations

import asyncio
import logging
import traceback
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from cleanlist.client import AsyncCleanlistClient, CleanlistClient
from cleanlist.errors import APIError, UnprocessableEntityError
from cleanlist.sandbox import FaultSpec, SandboxServer
from cleanlist.settings import CleanlistSettings
from tests.sandbox_helpers import people, refused_url
from tests.test_client import EXTENSION_KEY, NO_API_KEY, ROWS, Row, client_for

SECRET = "clapi_" + "s3cr3tK3y" * 7 + "x"
StartSandbox = Callable[..., SandboxServer]


def everything_about(error: BaseException) -> str:
    """Every text a user, a log or a UI could get from an exception, joined."""
    parts = [
        str(error),
        repr(error),
        repr(error.args),
        repr(vars(error)),
        "".join(traceback.format_exception(error)),
    ]
    if isinstance(error, UnprocessableEntityError):
        parts.append(repr(error.invalid_contacts))
    return "\n".join(parts)


def assert_clean(text: str, secret: str = SECRET) -> None:
    assert secret not in text
    # A cut-off key is still a leak: no 12-character piece of its random part may show either.
    body = secret.removeprefix("clapi_")
    assert not any(body[i : i + 12] in text for i in range(len(body) - 11)), text


# --- reprs and settings -------------------------------------------------------------------------------


def test_settings_never_show_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEANLIST_API_KEY", SECRET)
    monkeypatch.setenv("CLEANLIST_BASE_URL", "http://127.0.0.1:9")
    settings = CleanlistSettings()
    assert settings.api_key is not None and settings.api_key.get_secret_value() == SECRET
    for text in (
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        str(settings.model_dump()),
        repr(settings.api_key),
        str(settings.api_key),
    ):
        assert_clean(text)


def test_clients_never_show_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEANLIST_API_KEY", SECRET)
    from_env = CleanlistClient(base_url="http://127.0.0.1:9")
    explicit = CleanlistClient(SECRET, base_url="http://127.0.0.1:9")
    asynchronous = AsyncCleanlistClient(SECRET, base_url="http://127.0.0.1:9")
    try:
        for client in (from_env, explicit, asynchronous):
            for text in (repr(client), str(client), repr(client.limiter), repr(vars(client))):
                assert_clean(text)
    finally:
        from_env.close()
        explicit.close()
        asyncio.run(asynchronous.aclose())


# --- exceptions from the sandbox, on every error path ---------------------------------------------------


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_no_error_from_the_sandbox_shows_the_key(make_sandbox: StartSandbox, row: Row) -> None:
    key = row.key or SECRET
    sandbox = make_sandbox(
        **{
            "latency": 0.0,
            "rate_limit": None,
            "api_key": SECRET,
            "extra_keys": (EXTENSION_KEY,),
            "no_api_access_keys": (NO_API_KEY,),
            **row.sandbox,
        }
    )
    if row.before is not None:
        row.before(sandbox)
    with client_for(sandbox, key) as client, pytest.raises(APIError) as caught:
        row.call(client)
    assert_clean(everything_about(caught.value), key)


def test_transport_errors_do_not_show_the_key() -> None:
    with (
        CleanlistClient(SECRET, base_url=refused_url(), timeout=2) as client,
        pytest.raises(APIError) as caught,
    ):
        client.credits_balance()
    assert_clean(everything_about(caught.value))


# --- a server that echoes the Authorization header back -------------------------------------------------


def _echoing(shape: str) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        header = request.headers["authorization"]
        if shape == "detail-string":
            return httpx.Response(401, json={"detail": f"bad credentials: {header}"})
        if shape == "detail-items":
            item = {"loc": ["body", "contacts", 0], "msg": f"refused for {header}", "input": {"auth": header}}
            return httpx.Response(422, json={"detail": [item]})
        if shape == "detail-object":
            return httpx.Response(500, json={"detail": {"request": {"headers": {"authorization": header}}}})
        if shape == "bare-string":
            return httpx.Response(503, json=f"upstream said: {header}")
        if shape == "bare-list":
            return httpx.Response(400, json=[header, {"nested": [header]}])
        if shape == "other-key":
            return httpx.Response(403, json={"error": header, "detail": "Forbidden"})
        if shape == "text":
            return httpx.Response(502, text=f"<html>{header}</html>")
        if shape == "text-cut-at-300":
            # The key straddles the 300-character cut the client applies to non-JSON bodies.
            return httpx.Response(502, text="x" * 250 + header + " trailing")
        if shape == "retry-after":
            return httpx.Response(429, json={"detail": header}, headers={"Retry-After": header})
        raise AssertionError(shape)

    return handler


ECHO_SHAPES = [
    "detail-string",
    "detail-items",
    "detail-object",
    "bare-string",
    "bare-list",
    "other-key",
    "text",
    "text-cut-at-300",
    "retry-after",
]


@pytest.mark.parametrize("shape", ECHO_SHAPES)
def test_an_error_body_that_echoes_the_key_is_scrubbed(shape: str) -> None:
    host = f"http://echo-{uuid.uuid4().hex[:8]}.test"
    transport = httpx.MockTransport(_echoing(shape))
    with (
        CleanlistClient(SECRET, base_url=host, transport=transport) as client,
        pytest.raises(APIError) as caught,
    ):
        client.enrich_bulk(people(1))
    assert_clean(everything_about(caught.value))


@pytest.mark.parametrize("shape", ["detail-string", "detail-items", "bare-string", "text-cut-at-300"])
def test_the_async_client_scrubs_echoed_keys_too(shape: str) -> None:
    async def call() -> BaseException:
        host = f"http://echo-{uuid.uuid4().hex[:8]}.test"
        transport = httpx.MockTransport(_echoing(shape))
        async with AsyncCleanlistClient(SECRET, base_url=host, transport=transport) as client:
            try:
                await client.enrich_bulk(people(1))
            except APIError as exc:
                return exc
        raise AssertionError("no error raised")

    assert_clean(everything_about(asyncio.run(call())))


def test_a_transport_error_that_quotes_the_key_is_scrubbed() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"proxy refused {request.headers['authorization']}", request=request)

    transport = httpx.MockTransport(handler)
    with (
        CleanlistClient(SECRET, base_url="http://proxy.test", transport=transport) as client,
        pytest.raises(APIError) as caught,
    ):
        client.validate_key()
    assert_clean(everything_about(caught.value))


# --- logs ---------------------------------------------------------------------------------------------


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record of the client's and httpx's loggers at DEBUG, wherever propagation is configured."""
    names = ("cleanlist", "httpx", "httpcore")
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.DEBUG)
    try:
        yield caplog
    finally:
        for logger, level in zip(loggers, saved, strict=True):
            logger.removeHandler(caplog.handler)
            logger.setLevel(level)


def test_debug_logs_of_a_run_never_show_the_key(
    make_sandbox: StartSandbox, debug_logs: pytest.LogCaptureFixture
) -> None:
    sandbox = make_sandbox(
        api_key=SECRET,
        latency=0.0,
        rate_limit=(3, 30.0),
        faults={"enrich-status": FaultSpec(sequence=(503,))},
    )
    with client_for(sandbox) as client:
        client.validate_key()
        client.credits_balance()
        submitted = client.enrich_bulk(people(3))
        for call in (
            lambda: client.enrich_status(workflow_id=submitted.workflow_id),  # injected 503
            lambda: client.enrich_bulk([{"first_name": "John"}]),  # 422
            lambda: client.enrich_bulk([]),  # 400
            lambda: client.enrich_bulk(people(1)),  # 429: the window of 3 is spent
        ):
            with pytest.raises(APIError):
                call()
        client.enrich_status(task_id=submitted.task_ids[0])
        client.webhook_deliveries(submitted.workflow_id)
    with client_for(sandbox, "clapi_" + "z" * 64) as wrong, pytest.raises(APIError):
        wrong.validate_key()

    records = debug_logs.records
    assert any(record.name.startswith("httpx") for record in records), "httpx logged nothing: test is blind"
    assert any(record.name.startswith("cleanlist") for record in records)
    for record in records:
        assert_clean(record.getMessage())
        assert_clean(repr(record.args))
        assert_clean(record.exc_text or "")
    assert_clean(debug_logs.text)
