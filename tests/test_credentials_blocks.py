"""CleanlistCredentials blocks: organizations side by side, chosen by name, the key never in a parameter,
`set-key` creating and updating them, and the older key sources still working."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from cleanlist_prefect.flows.credentials import CleanlistCredentials
from tests.flow_helpers import messy_export, read_csv, run_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")

KEY_A = "clapi_" + "OrgAkey1" * 8
KEY_B = "clapi_" + "OrgBkey2" * 8


@pytest.fixture
def no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """No key, host or limit from the environment: only a block can supply them."""
    for name in ("CLEANLIST_API_KEY", "CLEANLIST_BASE_URL", "CLEANLIST_RATE_LIMIT"):
        monkeypatch.delenv(name, raising=False)


def _texts_on_the_server(flow_run_ids: list[object]) -> list[str]:
    """Every flow run's record (parameters included) and every log line the Prefect server holds."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        runs = {run.id: run for run in client.read_flow_runs(limit=200)}
        assert set(flow_run_ids) <= set(runs)
        texts = [run.model_dump_json() for run in runs.values()]
        texts += [log.message for log in client.read_logs()]
    return texts


def test_two_blocks_drive_two_runs_against_two_organizations(
    tmp_path: Path, make_sandbox, no_env_key: None
) -> None:
    org_a = make_sandbox(api_key=KEY_A, rate_limit=None, latency=0.0)
    org_b = make_sandbox(api_key=KEY_B, rate_limit=None, latency=0.0)
    CleanlistCredentials(api_key=KEY_A, base_url=org_a.base_url, rate_limit="600/60").save(
        "org-a", overwrite=True, _sync=True
    )
    CleanlistCredentials(api_key=KEY_B, base_url=org_b.base_url, rate_limit="300/60").save(
        "org-b", overwrite=True, _sync=True
    )

    runs = []
    for name, unique in (("org-a", 30), ("org-b", 20)):
        source = messy_export(tmp_path / f"{name}.csv", unique=unique, tag=name[-1])
        state, summary = run_flow(
            source=str(source),
            output=str(tmp_path / f"{name}-out.csv"),
            store=f"sqlite:///{tmp_path / 'store.db'}",
            credentials=name,
        )
        assert state.is_completed(), state.message
        assert summary["submitted"] == unique
        runs.append((state, summary))

    # Each organization was billed for its own contacts only, at the limit its block names.
    assert org_a.counters()["contacts_accepted"] == 30 and org_b.counters()["contacts_accepted"] == 20
    assert [summary["rate_limit"] for _, summary in runs] == ["600/60", "300/60"]
    assert len(read_csv(tmp_path / "org-a-out.csv")) == 30 and len(read_csv(tmp_path / "org-b-out.csv")) == 20

    texts = _texts_on_the_server([state.state_details.flow_run_id for state, _ in runs])
    parameters = [t for t in texts if '"credentials":"org-a"' in t or '"credentials":"org-b"' in t]
    assert len(parameters) >= 2  # the runs name their block …
    for text in texts:  # … and no key is anywhere on the server
        for key in (KEY_A, KEY_B):
            assert key not in text and key[6:30] not in text


def test_a_missing_block_fails_the_run_in_one_line(tmp_path: Path, make_sandbox, api_env) -> None:
    api_env(make_sandbox(rate_limit=None, latency=0.0))  # an environment key that must not be used instead
    source = messy_export(tmp_path / "crm.csv", unique=3)
    state, _ = run_flow(source=str(source), output=str(tmp_path / "out.csv"), credentials="no-such-org")
    assert state.is_failed()
    assert "no CleanlistCredentials block named 'no-such-org'" in state.message
    assert "\n" not in state.message and "Traceback" not in state.message
    assert not (tmp_path / "out.csv").exists()


def test_a_malformed_block_is_one_line_without_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import SecretStr

    from cleanlist.errors import InputError
    from cleanlist_prefect.flows.secrets import load_credentials

    # Saved around the block's own validation, as an edited document in the UI could be.
    broken = CleanlistCredentials.model_construct(api_key=SecretStr(KEY_A), base_url=None, rate_limit="fast")
    broken.save("org-broken", overwrite=True, _sync=True)
    with pytest.raises(InputError) as raised:
        load_credentials("org-broken")
    assert "block 'org-broken' is not valid" in str(raised.value)
    assert KEY_A not in str(raised.value) and "\n" not in str(raised.value)


def test_a_key_given_as_the_block_name_is_refused_without_echoing_it(tmp_path: Path, capsys) -> None:
    from cleanlist_prefect.deployments.cli import main

    code = main(["run", str(tmp_path / "in.csv"), "-o", str(tmp_path / "out.csv"), "--credentials", KEY_A])
    captured = capsys.readouterr()
    assert code != 0
    assert "CleanlistCredentials block" in captured.err
    assert KEY_A not in captured.out + captured.err and KEY_A[6:30] not in captured.out + captured.err


def test_the_runs_own_options_override_the_block_and_the_block_overrides_the_environment(
    make_sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cleanlist_prefect.flows.secrets import run_credentials

    org_a = make_sandbox(api_key=KEY_A, rate_limit=None, latency=0.0)
    monkeypatch.setenv("CLEANLIST_API_KEY", KEY_B)
    monkeypatch.setenv("CLEANLIST_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("CLEANLIST_RATE_LIMIT", "5/1")
    CleanlistCredentials(api_key=KEY_A, base_url=org_a.base_url).save(
        "org-a-partial", overwrite=True, _sync=True
    )

    settings, key = run_credentials("org-a-partial")
    assert key.get_secret_value() == KEY_A
    assert (settings.base_url, settings.rate_limit) == (org_a.base_url, "5/1")  # no limit in the block: env

    settings, key = run_credentials("org-a-partial", base_url="http://127.0.0.1:8", rate_limit="7/1")
    assert (settings.base_url, settings.rate_limit) == ("http://127.0.0.1:8", "7/1")

    _, key = run_credentials(None)  # no block named: the Secret block if saved, else the environment
    assert key.get_secret_value() in {KEY_B, _saved_secret()}

    block = CleanlistCredentials.load("org-a-partial", _sync=True)
    with block.get_client() as client:
        assert client.validate_key().valid
        assert client.base_url == org_a.base_url


def _saved_secret() -> str | None:
    from prefect.blocks.system import Secret

    try:
        value = Secret.load("cleanlist-api-key", _sync=True).get()
    except ValueError:
        return None
    return str(value)


def test_set_key_creates_and_updates_a_block_from_stdin(
    make_sandbox, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from cleanlist_prefect.deployments.cli import main

    org_a = make_sandbox(api_key=KEY_A, rate_limit=None, latency=0.0)
    monkeypatch.setattr("sys.stdin", io.StringIO(KEY_B + "\n"))
    assert (
        main(
            ["set-key", "--credentials", "org-roundtrip", "--base-url", org_a.base_url, "--rate-limit", "9/1"]
        )
        == 0
    )
    saved = CleanlistCredentials.load("org-roundtrip", _sync=True)
    assert saved.api_key.get_secret_value() == KEY_B
    assert (saved.base_url, saved.rate_limit) == (org_a.base_url, "9/1")

    # A new key replaces the old one; the host and limit stay as they were.
    monkeypatch.setattr("sys.stdin", io.StringIO(f"  {KEY_A}  \n"))
    assert main(["set-key", "--name", "org-roundtrip"]) == 0
    saved = CleanlistCredentials.load("org-roundtrip", _sync=True)
    assert saved.api_key.get_secret_value() == KEY_A
    assert (saved.base_url, saved.rate_limit) == (org_a.base_url, "9/1")
    with saved.get_client() as client:
        assert client.validate_key().valid

    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["set-key", "--credentials", "org-roundtrip"]) != 0  # no key: nothing saved
    assert CleanlistCredentials.load("org-roundtrip", _sync=True).api_key.get_secret_value() == KEY_A

    captured = capsys.readouterr()
    assert "saved the CleanlistCredentials block 'org-roundtrip'" in captured.out
    for key in (KEY_A, KEY_B):
        assert key not in captured.out + captured.err


def test_a_block_with_a_bad_rate_limit_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="rate limit"):
        CleanlistCredentials(api_key=KEY_A, rate_limit="fast")
    assert KEY_A not in repr(CleanlistCredentials(api_key=KEY_A))


def test_the_installed_package_registers_the_block_type_with_prefect() -> None:
    from prefect.blocks.core import Block
    from prefect.plugins import load_prefect_collections

    assert load_prefect_collections()["cleanlist"].CleanlistCredentials is CleanlistCredentials
    assert Block.get_block_class_from_key("cleanlist-credentials") is CleanlistCredentials
