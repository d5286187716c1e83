"""The Python API: `enrich_dataframe` over the sandbox, the README's example run as written."""

from __future__ import annotations

import inspect
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from prefect.client.orchestration import get_client

from benchmarks.procs import seed_prefect_home
from cleanlist.run.options import EnrichOptions
from cleanlist.store import EnrichmentStore
from cleanlist_prefect import EnrichedFrame, enrich_dataframe
from cleanlist_prefect.flows.enrich_contacts import RunFailed
from cleanlist_prefect.flows.enrich_frame import _enrich_dataframe
from tests.conftest import postgres_database
from tests.flow_helpers import FAST

pytestmark = pytest.mark.usefixtures("prefect_harness")

README = Path(__file__).resolve().parent.parent / "README.md"
# Options that name files or tables: the frame flow owns its source and destinations (a dry run would
# return no frames; a frame has no identity to keep a cursor mark under).
NOT_FOR_FRAMES = {
    *("source", "output", "rejects", "table", "sql_query", "sheet", "encoding", "raw_csv"),
    *("dry_run", "cursor", "full_refresh", "cursor_type", "storage_options", "storage_credentials"),
}


def readme_example() -> str:
    """The first python block of the README's "Use it from your own flow" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Use it from your own flow", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert block is not None, "the README section lost its example"
    return block.group(1)


def leftover_frame_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("cleanlist-frame-*")}


def test_readme_example_returns_every_row(
    tmp_path: Path, make_sandbox: Any, api_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("CLEANLIST_STORE_URL", store_url)
    # A contact sent with its subdomain would be refused (quarantined into the rejects).
    sandbox.refuse_contacts_containing("blog.acme")
    before = leftover_frame_folders()

    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    leads: pd.DataFrame = namespace["load_leads"]()
    enriched = namespace["enrich_leads"]()

    assert isinstance(enriched, EnrichedFrame)
    assert len(enriched.output) + len(enriched.rejects) == len(leads)
    assert sorted([*enriched.output.index, *enriched.rejects.index]) == list(leads.index)
    assert list(enriched.rejects["crm_id"]) == [104]  # "Solo": no last name, no company
    jane = enriched.output.loc[enriched.output["crm_id"] == 101].iloc[0]
    assert jane["Website"] == "https://blog.acme.co.uk/about"  # the user's column as given
    assert jane["cleanlist_status"] in {"enriched", "not_found"}  # answered, not refused
    assert enriched.output["crm_id"].dtype == leads["crm_id"].dtype
    assert enriched.summary.status == "completed"
    assert enriched.summary.rows_read == len(leads)
    with EnrichmentStore(store_url) as store:
        keys = ["nm:jane|doe|acme.co.uk", "nm:li|wei|initech.com"]
        assert set(store.results(keys, "partial")) == set(keys)
    assert leftover_frame_folders() <= before


async def _stored_parameters(flow_name: str) -> list[dict[str, Any]]:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async with get_client() as client:
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
    return [run.parameters for run in runs]


def test_an_arrow_table_on_its_own_keeps_its_contacts_out_of_the_prefect_database(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    rows = 300  # two chunks
    table = pa.table(
        {
            "first_name": [f"Secretname{i}" for i in range(rows)],
            "last_name": [f"Lee{i}" for i in range(rows)],
            "company_domain": [f"www.co{i}.example" if i % 7 else "not a domain" for i in range(rows)],
        }
    )
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    enriched = enrich_dataframe(table, store=store_url, **FAST)

    assert len(enriched.output) + len(enriched.rejects) == rows
    assert len(enriched.rejects) == len(range(0, rows, 7))
    assert set(enriched.rejects["reject_code"]) == {"missing_fields"}
    assert enriched.summary.submitted == rows - len(enriched.rejects)
    assert enriched.summary.output == "<Table: 300 rows x 3 columns>"

    import asyncio

    stored = asyncio.run(_stored_parameters("enrich-dataframe"))
    assert "<Table: 300 rows x 3 columns>" in [parameters.get("frame") for parameters in stored]
    assert all(str(parameters["frame"]).startswith("<") for parameters in stored)  # every run's: a shape
    assert "Secretname" not in repr(stored)

    # A second run pays for nothing: every contact comes from the store.
    again = enrich_dataframe(table, store=store_url, **FAST)
    assert again.summary.submitted == 0
    assert again.summary.fresh_in_store == rows - len(enriched.rejects)


@pytest.mark.postgres
def test_a_store_password_never_reaches_the_prefect_database(make_sandbox: Any, api_env: Any) -> None:
    # A user's script passes its store URL with the password in it: the run uses it, Prefect stores the
    # flow run's parameters with it hidden (the CLI moves it to PGPASSWORD; a library call cannot).
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    password = "pwFrameStore91"
    frame = pd.DataFrame({"first_name": ["Ann", "Bo"], "last_name": ["Lee", "Ng"],
                          "company_domain": ["acme.example", "initech.example"]})  # fmt: skip
    with postgres_database() as database:
        url = database.replace("://postgres@", f"://postgres:{password}@")
        enriched = enrich_dataframe(frame, store=url, **FAST)
        again = enrich_dataframe(frame, store=url, **FAST)  # from the store the URL names

    assert enriched.summary.submitted == 2
    assert again.summary.fresh_in_store == 2
    import asyncio

    stored = asyncio.run(_stored_parameters("enrich-dataframe"))
    assert password not in repr(stored)
    assert database.replace("://postgres@", "://postgres:***@") in [p.get("store") for p in stored]


KILLED_SCRIPT = """
import os, sys, time
import pandas as pd
from prefect.server.api.server import SubprocessASGIServer
from cleanlist_prefect import enrich_dataframe

frame = pd.DataFrame({"first_name": ["Ann"], "last_name": ["Lee"], "company_domain": ["acme.example"]})
enrich_dataframe(frame, store=sys.argv[1], initial_poll_seconds=0.1)
print(SubprocessASGIServer._instances[None].server_process.pid, flush=True)
time.sleep(600)  # killed here, as a user's script may be at any moment
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (ended, not yet reaped by init) is gone too.
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def test_a_killed_script_leaves_no_temporary_prefect_server(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_EPHEMERAL_ENABLED="true",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
    )  # a loaded machine starts it slowly
    env.update(seed_prefect_home(tmp_path / "prefect"))
    script = subprocess.Popen(
        [sys.executable, "-c", KILLED_SCRIPT, f"sqlite:///{tmp_path / 'store.db'}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert script.stdout is not None
        line = script.stdout.readline()
        assert line.strip().isdigit(), script.communicate(timeout=30)[1][-3000:]
        server = int(line)
        assert _alive(server)
    finally:
        script.kill()
        script.wait(timeout=30)
    deadline = time.monotonic() + 20
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)  # waits for the kernel's signal to take effect, no retry delay
    alive = _alive(server)
    if alive:
        os.kill(server, signal.SIGKILL)
    assert not alive, "the temporary Prefect server outlived the script that started it"


def test_a_revoked_key_fails_the_flow_with_one_line_and_leaves_no_file(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    sandbox.revoke_key()
    before = leftover_frame_folders()
    frame = pd.DataFrame({"First Name": ["Jane"], "Last Name": ["Doe"], "Website": ["acme.com"]})

    state = enrich_dataframe(frame, store=f"sqlite:///{tmp_path / 'store.db'}", return_state=True, **FAST)

    assert state.is_failed()
    assert state.message is not None and "run stopped before submitting anything" in state.message
    assert "\n" not in state.message
    with pytest.raises(Exception, match="run stopped before submitting anything"):
        enrich_dataframe(frame, store=f"sqlite:///{tmp_path / 'store.db'}", **FAST)
    assert leftover_frame_folders() <= before


def test_a_run_that_fails_after_sending_raises_with_its_summary(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    """A user's program learns what the failed run did (what was sent, what is in doubt) from the error,
    as the CLI prints it: without it a DataFrame run's reported doubt reached no one (chaos seed 2432806)."""
    sandbox = make_sandbox(rate_limit=None, revoke_after_batches=1)
    api_env(sandbox)
    frame = pd.DataFrame(
        {
            "First Name": [f"Ann{i}" for i in range(300)],
            "Last Name": ["Lee"] * 300,
            "Website": [f"c{i}.example" for i in range(300)],
        }
    )

    with pytest.raises(RunFailed) as raised:
        enrich_dataframe(frame, store=f"sqlite:///{tmp_path / 'store.db'}", max_concurrent_chunks=1, **FAST)

    summary = raised.value.summary
    assert summary is not None, "the error carries the run's summary"
    assert summary.status != "completed"
    assert summary.submitted == 250, "the one chunk the API accepted before the key was revoked"
    assert "\n" not in str(raised.value)


def test_the_frame_on_disk_is_private(tmp_path: Path) -> None:
    from cleanlist_prefect.flows.enrich_frame import as_arrow, private_folder, write_private_parquet

    with private_folder() as folder:
        written = write_private_parquet(as_arrow(pd.DataFrame({"a": [1, "x"]})), folder / "in.parquet")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert not folder.exists()


def test_parameters_match_the_options_model() -> None:
    parameters = inspect.signature(_enrich_dataframe).parameters
    fields = EnrichOptions.model_fields
    assert set(parameters) - {"frame"} == set(fields) - NOT_FOR_FRAMES
    for name, parameter in parameters.items():
        if name != "frame":
            assert parameter.default == fields[name].default, name


def test_a_frame_enriched_again_shows_this_runs_results(
    tmp_path: Path, make_sandbox: Any, api_env: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    # An earlier run's output, saved and enriched again (refresh_days=0: every contact is sent again).
    earlier = pd.DataFrame(
        {
            "First Name": ["Jane", "Li"],
            "Last Name": ["Doe", "Wei"],
            "Website": ["acme.com", "initech.com"],
            "cleanlist_status": ["stale-status", "stale-status"],
            "cleanlist_email": ["old@nowhere.invalid", "old@nowhere.invalid"],
            "cleanlist_legacy": ["x", "y"],
            "reject_reason": ["old reason", None],
        },
        index=[7, 9],
    )

    with caplog.at_level("WARNING"):
        enriched = enrich_dataframe(
            earlier, store=f"sqlite:///{tmp_path / 'store.db'}", refresh_days=0, **FAST
        )

    assert sandbox.counters()["contacts_accepted"] == 2  # sent and paid for: the answers must show
    assert list(enriched.output.index) == [7, 9]
    assert set(enriched.output["cleanlist_status"]) <= {"enriched", "not_found"}
    assert "old@nowhere.invalid" not in set(enriched.output["cleanlist_email"])
    assert "cleanlist_legacy" not in enriched.output.columns
    assert "reject_reason" not in enriched.output.columns
    assert list(enriched.output["First Name"]) == ["Jane", "Li"]
    warned = [r.getMessage() for r in caplog.records if "replaced by this run's results" in r.getMessage()]
    assert len(warned) == 1
    assert "cleanlist_status" in warned[0] and "reject_reason" in warned[0]


@pytest.mark.parametrize(
    ("frame", "line"),
    [
        (
            pd.DataFrame([["Jane", "Doe", "acme.com"]], columns=["First Name", "First Name", "Website"]),
            "the frame has repeated column names: First Name; rename them",
        ),
        (pd.DataFrame(), "the frame has no columns: nothing to enrich"),
        (
            pa.table({"a": [1], "a ": [2]}).rename_columns(["a", "a"]),
            "the frame has repeated column names: a",
        ),
    ],
)
def test_a_frame_that_cannot_be_read_fails_with_one_line(
    tmp_path: Path, make_sandbox: Any, api_env: Any, frame: Any, line: str
) -> None:
    api_env(make_sandbox(rate_limit=None))
    with pytest.raises(RunFailed) as raised:
        enrich_dataframe(frame, store=f"sqlite:///{tmp_path / 'store.db'}", **FAST)
    assert line in str(raised.value)
    assert "\n" not in str(raised.value)
    assert "Unexpected result" not in str(raised.value)


def test_an_empty_frame_with_columns_fails_with_one_line_or_returns_nothing(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    empty = pd.DataFrame({"First Name": [], "Last Name": [], "Website": []}, dtype="string")
    state = enrich_dataframe(empty, store=f"sqlite:///{tmp_path / 'store.db'}", return_state=True, **FAST)
    if state.is_failed():
        assert state.message is not None and "\n" not in state.message
        with pytest.raises(RunFailed):
            state.result()
    else:
        enriched = state.result()
        assert len(enriched.output) == len(enriched.rejects) == 0
    assert sandbox.counters()["contacts_accepted"] == 0


def test_the_jose_garcia_spellings_are_sent_and_charged_once(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    from tests.test_prepare import JOSE_SPELLINGS

    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    frame = pd.DataFrame(
        {
            "First Name": [v["first_name"] for v in JOSE_SPELLINGS],
            "Last Name": [v["last_name"] for v in JOSE_SPELLINGS],
            "Company": [v["company_name"] for v in JOSE_SPELLINGS],
        }
    )
    enriched = enrich_dataframe(frame, store=f"sqlite:///{tmp_path / 'store.db'}", **FAST)
    assert len(enriched.output) == len(JOSE_SPELLINGS)
    assert sandbox.counters()["contacts_accepted"] == 1
    assert enriched.summary.submitted == 1
    assert enriched.output["cleanlist_status"].nunique() == 1
