"""Every configured API key is stripped and checked for header safety where it is loaded, every key error
names the key's source, and after each failure the Prefect server holds the key nowhere."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from cleanlist.client import redact, redact_json
from cleanlist.errors import InputError
from cleanlist.sandbox import SandboxServer
from cleanlist.settings import APIKey, CleanlistSettings, checked_api_key
from cleanlist_prefect.flows.credentials import CleanlistCredentials
from cleanlist_prefect.flows.secrets import SECRET_BLOCK, run_credentials
from tests.flow_helpers import messy_export, run_flow
from tests.test_secrets_redaction import assert_clean

GOOD = "clapi_" + "G00dKey" * 8 + "z"


def _key(tag: str) -> str:
    """A fresh key per case, so a leak found on the shared server is this case's."""
    return f"clapi_{tag}" + uuid.uuid4().hex + uuid.uuid4().hex


# --- loading: stripped, checked, named -----------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["{k}\n", "{k}\r\n", "  {k} ", "\t{k}\n\n"])
def test_surrounding_whitespace_is_stripped_from_every_source(
    spelling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEANLIST_API_KEY", spelling.format(k=GOOD))
    assert CleanlistSettings().api_key is not None
    assert CleanlistSettings().api_key.get_secret_value() == GOOD  # type: ignore[union-attr]
    assert checked_api_key(spelling.format(k=GOOD), "anywhere").get_secret_value() == GOOD
    block = CleanlistCredentials(api_key=SecretStr(spelling.format(k=GOOD)))
    assert block.checked_key().get_secret_value() == GOOD


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        (GOOD[:20] + "\n" + GOOD[20:], "contains a control character (U+000A) at position 21"),
        (GOOD[:20] + "\x01" + GOOD[20:], "contains a control character (U+0001) at position 21"),
        (GOOD + "\x7f", "contains a control character (U+007F) at position"),
        (GOOD[:20] + " " + GOOD[20:], "contains a space (U+0020) at position 21"),
        (GOOD[:20] + "\u200b" + GOOD[20:], "contains a control character (U+200B) at position 21"),
        (GOOD[:20] + "é" + GOOD[20:], "contains a non-ASCII character at position 21"),
        ("   \n", "is empty"),
    ],
)
def test_a_key_no_header_can_carry_is_one_line_naming_its_source(
    key: str, problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEANLIST_API_KEY", key)
    with pytest.raises(InputError) as from_env:
        CleanlistSettings()
    assert str(from_env.value).startswith(f"the API key from CLEANLIST_API_KEY {problem}")
    monkeypatch.delenv("CLEANLIST_API_KEY")
    block = CleanlistCredentials.model_construct(api_key=SecretStr(key))
    block._block_document_name = "acme"
    with pytest.raises(InputError) as from_block:
        block.checked_key()
    assert str(from_block.value).startswith(
        f"the API key from the CleanlistCredentials block 'acme' {problem}"
    )
    for error in (from_env.value, from_block.value):
        assert "\n" not in str(error)
        if key.strip():
            assert_clean(str(error) + repr(error), key.strip())


def test_a_key_keeps_its_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEANLIST_API_KEY", GOOD)
    key = CleanlistSettings().api_key
    assert isinstance(key, APIKey) and key.source == "CLEANLIST_API_KEY"
    assert_clean(repr(key) + str(key), GOOD)


# --- redaction: every spelling of the key ----------------------------------------------------------------


@pytest.mark.parametrize(
    "shown",
    [
        "Illegal header value b'Bearer {k}\\n'",  # h11, quoting the header's bytes
        "{r}",  # repr of the str
        "{b}",  # repr of the bytes
        '{{"authorization": "Bearer {j}"}}',  # JSON-escaped
        "Bearer%20{q}",  # percent-encoded
        "key={k}",  # the stripped key inside any text
    ],
)
def test_redaction_covers_escaped_and_repr_forms(shown: str) -> None:
    import json
    from urllib.parse import quote

    raw = GOOD[:30] + "\\" + GOOD[30:] + "\n"  # a backslash inside, a newline after: both escape
    text = shown.format(
        k=raw.strip(), r=repr(raw), b=repr(raw.encode()), j=json.dumps(raw)[1:-1], q=quote(raw, safe="")
    )
    assert_clean(redact(text, SecretStr(raw)), raw.strip())
    assert_clean(str(redact_json({"a": [text]}, SecretStr(raw))), raw.strip())


# --- runs: each failure case, then a scan of everything the Prefect server holds --------------------------


def _server_texts(flow_run_id: Any) -> dict[str, list[str]]:
    """Logs, flow runs, task runs, events and artifacts the Prefect server holds (after the run's logs
    and its final state's event reached it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.events.filters import EventAnyResourceFilter, EventFilter
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()

    def events_of_the_run() -> EventFilter:  # its time window ends when it is made
        return EventFilter(any_resource=EventAnyResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]))

    final = ("prefect.flow-run.Completed", "prefect.flow-run.Failed")
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 20
        while True:  # the server writes events a moment after it gets them
            page = client.read_events(filter=events_of_the_run(), limit=50)
            events = list(page.events)
            while page.next_page is not None:
                page = client.read_events_page(page.next_page)
                events += page.events
            if any(event.event in final for event in events) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        return {
            "logs": [log.model_dump_json() for log in client.read_logs()],
            "flow runs": [run.model_dump_json() for run in client.read_flow_runs(limit=200)],
            "task runs": [run.model_dump_json() for run in client.read_task_runs(flow_run_filter=run_filter)],
            "events": [event.model_dump_json() for event in events],
            "artifacts": [artifact.model_dump_json() for artifact in client.read_artifacts()],
        }


def _requests_seen(sandbox: SandboxServer) -> int:
    return sum(sum(by_status.values()) for by_status in sandbox.counters()["requests"].values())


def _assert_server_never_shows(keys: list[str], flow_run_id: Any) -> None:
    texts = _server_texts(flow_run_id)
    assert texts["logs"] and texts["events"] and texts["flow runs"], "the scan saw nothing: it is blind"
    for where, found in texts.items():
        for text in found:
            for key in keys:
                try:
                    assert_clean(text, key.strip())
                except AssertionError:
                    pytest.fail(f"the key shows in the Prefect server's {where}")


@pytest.fixture
def secret_block() -> Iterator[Any]:
    """Save the Secret block for one test; it is deleted after (every other test reads the env key)."""
    from prefect.blocks.system import Secret

    saved: list[str] = []

    def save(value: str) -> None:
        Secret(value=SecretStr(value)).save(SECRET_BLOCK, overwrite=True, _sync=True)  # type: ignore[call-arg]
        saved.append(value)

    yield save
    if saved:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            block = Secret.load(SECRET_BLOCK, _sync=True)  # type: ignore[call-arg]
            client.delete_block_document(block._block_document_id)


def _run(tmp_path: Path, sandbox: SandboxServer, **params: Any) -> tuple[Any, str | None, float]:
    from cleanlist_prefect.flows.enrich_contacts import outcome_of

    source = messy_export(tmp_path / "crm.csv", unique=20)
    started = time.monotonic()
    state, _ = run_flow(
        source=str(source),
        output=str(tmp_path / "out.csv"),
        store=f"sqlite:///{tmp_path / 'store.db'}",
        base_url=sandbox.base_url,
        **params,
    )
    _, message, _ = outcome_of(state)
    return state, message, time.monotonic() - started


@pytest.mark.usefixtures("prefect_harness")
def test_a_key_with_a_trailing_newline_works_and_never_shows(
    tmp_path: Path, make_sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _key("nl")
    sandbox = make_sandbox(api_key=key, rate_limit=None, latency=0.0)
    monkeypatch.setenv("CLEANLIST_API_KEY", key + "\n")  # a Kubernetes Secret made from a file

    state, message, _ = _run(tmp_path, sandbox)

    assert state.is_completed(), message
    assert sandbox.counters()["contacts_accepted"] == 20
    _assert_server_never_shows([key], state.state_details.flow_run_id)


@pytest.mark.usefixtures("prefect_harness")
def test_a_key_with_a_newline_inside_stops_before_any_request_and_never_shows(
    tmp_path: Path, make_sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _key("in")
    sandbox = make_sandbox(api_key=key, rate_limit=None, latency=0.0)
    bad = key[:24] + "\n" + key[24:]
    monkeypatch.setenv("CLEANLIST_API_KEY", bad)

    state, message, elapsed = _run(tmp_path, sandbox, api_outage_seconds=300.0)

    assert state.is_failed()
    assert message is not None and "\n" not in message
    assert (
        "the API key from CLEANLIST_API_KEY contains a control character (U+000A) at position 25" in message
    )
    assert elapsed < 60  # no outage wait: nothing was sent
    assert _requests_seen(sandbox) == 0
    _assert_server_never_shows([bad, key[:24], key[24:]], state.state_details.flow_run_id)


@pytest.mark.usefixtures("prefect_harness")
def test_a_revoked_key_names_its_source_and_never_shows(
    tmp_path: Path, make_sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _key("rv")
    sandbox = make_sandbox(api_key=key, rate_limit=None, latency=0.0)
    sandbox.revoke_key()
    monkeypatch.setenv("CLEANLIST_API_KEY", key)

    state, message, _ = _run(tmp_path, sandbox)

    assert state.is_failed()
    assert message is not None
    assert (
        "the API key from CLEANLIST_API_KEY is missing, expired or revoked: set a valid CLEANLIST_API_KEY"
        in (message)
    )
    _assert_server_never_shows([key], state.state_details.flow_run_id)


@pytest.mark.usefixtures("prefect_harness")
def test_a_wrong_secret_block_with_a_right_env_key_names_the_block_and_never_shows(
    tmp_path: Path, make_sandbox: Any, monkeypatch: pytest.MonkeyPatch, secret_block: Any
) -> None:
    right, wrong = _key("ok"), _key("wr")
    sandbox = make_sandbox(api_key=right, rate_limit=None, latency=0.0)
    monkeypatch.setenv("CLEANLIST_API_KEY", right)
    secret_block(wrong)
    _, key = run_credentials(None)
    assert key.get_secret_value() == wrong  # the block wins, as documented, and now says so

    state, message, _ = _run(tmp_path, sandbox)

    assert state.is_failed()
    assert message is not None
    assert "the API key from the Secret block 'cleanlist-api-key'" in message
    assert "used instead of CLEANLIST_API_KEY" in message
    assert "cleanlist-enrich set-key" in message
    assert "set a valid CLEANLIST_API_KEY" not in message  # the wrong fix: the env key is right
    _assert_server_never_shows([right, wrong], state.state_details.flow_run_id)


@pytest.mark.usefixtures("prefect_harness")
def test_a_credentials_block_with_a_control_character_is_one_line_naming_the_block(
    tmp_path: Path, make_sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _key("cb")
    sandbox = make_sandbox(api_key=key, rate_limit=None, latency=0.0)
    monkeypatch.delenv("CLEANLIST_API_KEY", raising=False)
    bad = key[:30] + "\x1b" + key[30:]
    CleanlistCredentials(api_key=SecretStr(bad), base_url=sandbox.base_url).save(
        "bad-char", overwrite=True, _sync=True
    )

    state, message, _ = _run(tmp_path, sandbox, credentials="bad-char")

    assert state.is_failed()
    assert message is not None and "\n" not in message
    assert (
        "the API key from the CleanlistCredentials block 'bad-char' contains a control character" in message
    )
    assert _requests_seen(sandbox) == 0
    _assert_server_never_shows([bad, key[:30], key[30:]], state.state_details.flow_run_id)


@pytest.mark.parametrize(
    ("source", "fix"),
    [
        ("CLEANLIST_API_KEY", "set a valid CLEANLIST_API_KEY"),
        ("the Secret block 'cleanlist-api-key'", "save a valid one with `cleanlist-enrich set-key`"),
        ("the CleanlistCredentials block 'acme'", "`cleanlist-enrich set-key --credentials acme`"),
    ],
)
def test_a_refused_key_names_its_source_and_the_fix_for_that_source(source: str, fix: str) -> None:
    from cleanlist.errors import make_status_error
    from cleanlist_prefect.flows.secrets import naming_key_source

    refused = make_status_error(
        status_code=401, method="GET", path="/auth/validate-key", body={"detail": "nope"}, headers={}
    )
    forbidden = make_status_error(
        status_code=403, method="GET", path="/auth/validate-key", body={"detail": "no"}, headers={}
    )
    key = APIKey(GOOD, source)

    line = naming_key_source(f"run stopped: {refused}", key)
    assert f"the API key from {source} is missing, expired or revoked" in line
    assert fix in line
    if source != "CLEANLIST_API_KEY":
        assert "set a valid CLEANLIST_API_KEY" not in line
    assert naming_key_source(str(forbidden), key).endswith(f"(the API key came from {source})")
