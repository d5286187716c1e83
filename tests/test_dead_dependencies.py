"""Dead dependencies fail loud and bounded, and database passwords show nowhere.

Over real HTTP against the sandbox, on a real (temporary) Prefect server and, where a store or an output
is a database, a real PostgreSQL: the API stopped mid-run, workflows the API forgot, the store's database
dropped mid-run, a password in every URL.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cleanlist.sandbox import SandboxServer
from cleanlist.store import EnrichmentStore
from tests.conftest import POSTGRES_URL, postgres_database
from tests.flow_helpers import messy_export, read_csv, run_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")

PASSWORD = "Pw-s3cr3t-4711"


def _when(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the run to get there")
        time.sleep(0.05)


def _accepted(sandbox: SandboxServer) -> int:
    return int(sandbox.counters()["contacts_accepted"])


@contextmanager
def _meanwhile(action: Callable[[], None]) -> Iterator[threading.Thread]:
    """Run `action` in a thread while the block runs the flow; re-raise its failure afterwards."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as exc:  # surfaced in the test's thread
            failures.append(exc)

    helper = threading.Thread(target=run, daemon=True)
    helper.start()
    yield helper
    helper.join(timeout=120)
    if failures:
        raise failures[0]


def _same_api_again(sandbox: SandboxServer, port: int = 0) -> SandboxServer:
    """The stopped sandbox's world (its workflows, results, credits) served again (on a new port)."""
    from cleanlist.sandbox.app import create_app

    again = SandboxServer(sandbox.config, port=port)
    again.state = sandbox.state
    again.app = create_app(state=sandbox.state)
    return again.start()


def _exit_code(state: Any) -> int:
    from cleanlist_prefect.flows.enrich_contacts import outcome_of

    return outcome_of(state)[2]


class _Recorder:
    """The run's log lines as the console and the Prefect API get them (tracebacks included): Prefect's
    and ours from INFO, anybody's from WARNING.

    Prefect configures logging afresh at the first flow run of a process, removing every handler there
    was, so records are taken where every logger hands them to its handlers.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._format = logging.Formatter("%(levelname)s %(name)s: %(message)s").format
        self._lock = threading.Lock()

    def take(self, record: logging.LogRecord) -> None:
        ours = record.name.startswith(("prefect.flow_runs", "prefect.task_runs", "cleanlist"))
        if record.levelno >= logging.WARNING or (ours and record.levelno >= logging.INFO):
            with self._lock:
                self.lines.extend(self._format(record).splitlines())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@contextmanager
def _recording() -> Iterator[_Recorder]:
    recorder = _Recorder()
    call_handlers = logging.Logger.callHandlers

    def record_then_call(logger: logging.Logger, record: logging.LogRecord) -> None:
        recorder.take(record)  # called once per record, by the logger it was logged on
        call_handlers(logger, record)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logging.Logger, "callHandlers", record_then_call)
        yield recorder


# -- the outage watch, on a clock of its own ----------------------------------------------------------


def test_the_watch_logs_once_per_endpoint_per_minute_and_trips_only_when_armed(caplog) -> None:
    from cleanlist.errors import APIConnectionError
    from cleanlist.run.outage import APIOutage, OutageWatch

    now = [100.0]
    tripped: list[APIOutage] = []
    watch = OutageWatch("http://api", 30.0, on_outage=tripped.append, clock=lambda: now[0])
    refused = APIConnectionError("Cleanlist API GET /enrich/status failed: ConnectError: refused")
    reset = APIConnectionError("Cleanlist API POST /enrich/bulk failed: ReadError: reset")
    caplog.set_level(logging.WARNING, logger="cleanlist.outage")

    for _ in range(40):  # a silence while nothing needs the API: logged, never fatal
        now[0] += 1
        watch.failed("enrich-status", refused)
    assert not tripped and watch.down
    watch.answered("validate-key")  # any answer, on any endpoint, resets the clock
    assert not watch.down
    watch.arm()
    for _ in range(29):
        now[0] += 1
        watch.failed("enrich-status", refused, sent_at=now[0])
        watch.failed("enrich-bulk", reset, sent_at=now[0])
    assert watch.check() is None and not tripped  # 28 s since the first unanswered request
    now[0] += 2
    outage = watch.check()
    assert outage is not None and tripped == [outage]
    assert str(outage).startswith("the Cleanlist API at http://api has not answered for 30 s (last error: ")
    assert watch.check() is outage and tripped == [outage]  # once

    lines = [r.getMessage() for r in caplog.records if r.name == "cleanlist.outage"]
    status = [line for line in lines if "/enrich/status" in line]
    # 69 status errors over 69 s: logged at the first and 60 s later (with the 59 not logged between);
    # the minute counts per endpoint, whatever answered in between.
    assert len(status) == 2 and "(59 more on this endpoint since the last report)" in status[1]
    assert len([line for line in lines if "bulk" in line]) == 1  # 29 on the bulk endpoint: one line
    assert any("answers again" in line for line in lines)


# -- the API dies mid-run ----------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["polling", "submitting"])
def test_a_dead_api_stops_the_run_within_the_bound_with_one_line_and_a_rerun_finishes(
    tmp_path: Path, make_sandbox, api_env, when: str
) -> None:
    if when == "polling":  # every chunk accepted, the workflows still running when the API dies
        sandbox, unique, rate_limit, after = make_sandbox(rate_limit=None, latency=8.0), 1000, None, 1000
    else:  # chunks go out two a second: most are still to be sent
        sandbox, unique, rate_limit, after = make_sandbox(rate_limit=None, latency=0.3), 3000, "2/1", 500
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=unique)
    store = f"sqlite:///{tmp_path / 's.db'}"
    stopped: list[float] = []

    def kill_the_api() -> None:
        _when(lambda: _accepted(sandbox) >= after)
        time.sleep(0.3)  # a few status polls answered "not yet"
        sandbox.stop()
        stopped.append(time.monotonic())

    with _recording() as logged, _meanwhile(kill_the_api):
        state, summary = run_flow(
            source=str(source),
            output=str(tmp_path / "out.csv"),
            store=store,
            api_outage_seconds=3,
            rate_limit=rate_limit,
            max_concurrent_chunks=2,
        )
    ended = time.monotonic()

    assert state.is_failed()
    assert ended - stopped[0] < 3 + 12  # the bound, plus the wind-down: write, report
    message = state.message
    assert "\n" not in message
    assert message.startswith(f"the Cleanlist API at {sandbox.base_url} has not answered for ")
    assert "(last error: Cleanlist API " in message
    assert message.endswith("; results received so far were written; rerun to finish")
    assert _exit_code(state) == 1 and summary["status"] == "failed"
    out = read_csv(tmp_path / "out.csv")
    assert len(out) == unique  # written, nothing lost
    assert set(out["cleanlist_status"]) <= {"pending", "enriched", "not_found", "not_submitted"}

    assert "Traceback" not in logged.text
    # Once per endpoint per minute, not once per request (every workflow was polled again and again).
    connection_lines = [line for line in logged.lines if "cleanlist.outage" in line]
    assert 1 <= len(connection_lines) <= 3, logged.text[-6000:]
    for path in ("/enrich/status", "/enrich/bulk", "/auth/validate-key"):
        assert len([line for line in connection_lines if f" {path} failed: " in line]) <= 1
    if when == "polling":
        with EnrichmentStore(store) as kept:
            assert len(kept.open_workflows()) == 4  # accepted, paid: a rerun polls them

    again = _same_api_again(sandbox)
    try:
        state, rerun = run_flow(
            source=str(source),
            output=str(tmp_path / "out.csv"),
            store=store,
            base_url=again.base_url,
            rate_limit="1000/1",
        )
        assert state.is_completed(), state.message
        # Every contact once: read from the store (answered before the API died), polled again (accepted,
        # its answer not read yet) or sent now. How many answers the first run read before the API died
        # depends on timing (CI's full suite read one workflow's).
        assert rerun["fresh_in_store"] + rerun["resumed_in_flight"] + rerun["submitted"] == unique, rerun
        counters = again.counters()  # the same world: the first run's requests are counted too
        assert counters["contacts_accepted"] == unique
        assert counters["contacts_accepted_more_than_once"] <= summary["ambiguous_contacts"]
        statuses = read_csv(tmp_path / "out.csv")["cleanlist_status"]
        # A contact whose answer the first run read shows as "cached": the store answered for it.
        assert set(statuses) <= {"enriched", "not_found", "cached"}
        assert (statuses == "cached").sum() == rerun["fresh_in_store"]
    finally:
        again.stop()


def test_an_outage_shorter_than_the_bound_is_ridden_out(tmp_path: Path, make_sandbox, api_env) -> None:
    sandbox = make_sandbox(rate_limit=None, latency=3.0)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=1000)
    back: list[SandboxServer] = []

    def blink() -> None:
        _when(lambda: _accepted(sandbox) == 1000)
        sandbox.stop()
        time.sleep(1.5)
        back.append(_same_api_again(sandbox, port=sandbox.port))  # the same address, the same world

    try:
        with _recording() as logged, _meanwhile(blink):
            state, summary = run_flow(
                source=str(source),
                output=str(tmp_path / "out.csv"),
                store=f"sqlite:///{tmp_path / 's.db'}",
                api_outage_seconds=6,
            )
    finally:
        for server in back:
            server.stop()
    assert state.is_completed(), state.message
    assert summary["status"] == "completed" and summary["submitted"] == 1000
    assert set(read_csv(tmp_path / "out.csv")["cleanlist_status"]) <= {"enriched", "not_found"}
    outage = [line for line in logged.lines if "cleanlist.outage" in line]
    assert len(outage) == 2, logged.text[-4000:]
    # Refused, or (a poll on a kept-alive connection when the server went) closed without an answer.
    assert re.search(r"failed: (ConnectError|RemoteProtocolError|ReadError)", outage[0]), outage[0]
    assert "answers again" in outage[1]


# -- workflows the API no longer knows -----------------------------------------------------------------


def test_workflows_the_api_forgot_end_the_run_non_zero_and_a_rerun_resubmits_them(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    sandbox = make_sandbox(rate_limit=None, latency=120.0)  # never done before it forgets them
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=300)  # 2 workflows
    store = f"sqlite:///{tmp_path / 's.db'}"

    def forget() -> None:
        _when(lambda: _accepted(sandbox) == 300)
        assert sandbox.forget() == 2

    with _meanwhile(forget):
        state, summary = run_flow(
            source=str(source),
            output=str(tmp_path / "out.csv"),
            store=store,
            rate_limit="1000/1",
            not_found_grace_seconds=3.0,  # past its accept, a 404 no longer means "not visible yet"
        )

    assert state.is_failed()
    assert state.message == (
        "300 contacts of workflows the API no longer knows are unresolved; a rerun asks for them by task id"
    )
    assert _exit_code(state) == 1
    assert summary["status"] == "completed_with_errors" and summary["unresolved"] == 300
    assert set(read_csv(tmp_path / "out.csv")["cleanlist_status"]) == {"unresolved"}

    back = make_sandbox(rate_limit=None)  # the API is back, with no memory of those workflows
    state, rerun = run_flow(
        source=str(source),
        output=str(tmp_path / "out.csv"),
        store=store,
        base_url=back.base_url,
        rate_limit="1000/1",  # 300 tasks asked for by id first
    )
    assert state.is_completed(), state.message
    assert rerun["status"] == "completed" and rerun["submitted"] == 300
    assert back.counters()["contacts_accepted"] == 300
    assert set(read_csv(tmp_path / "out.csv")["cleanlist_status"]) <= {"enriched", "not_found"}


# -- the store goes away ---------------------------------------------------------------------------------


def _drop(database_url: str) -> None:
    name = database_url.rsplit("/", 1)[1]
    admin = sa.create_engine(
        POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("when", ["polling", "submitting"])
def test_a_store_dropped_mid_run_ends_it_with_one_line(
    tmp_path: Path, make_sandbox, api_env, when: str
) -> None:
    if when == "polling":  # every chunk accepted, every workflow still running
        sandbox, unique, rate_limit, after = make_sandbox(rate_limit=None, latency=4.0), 1000, None, 1000
    else:  # chunks go out two a second: most are still to be claimed and recorded
        sandbox, unique, rate_limit, after = make_sandbox(rate_limit=None, latency=0.3), 3000, "2/1", 500
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=unique)
    with postgres_database() as store:

        def drop_the_store() -> None:
            _when(lambda: _accepted(sandbox) >= after)
            _drop(store)

        started = time.monotonic()
        with _recording() as logged, _meanwhile(drop_the_store):
            state, _summary = run_flow(
                source=str(source),
                output=str(tmp_path / "out.csv"),
                store=store,
                rate_limit=rate_limit,
                max_concurrent_chunks=2,
            )

    assert state.is_failed() and time.monotonic() - started < 60
    assert _exit_code(state) == 1
    message = state.message
    assert "\n" not in message
    shown = store.replace("postgresql://", "postgresql+psycopg://")
    assert message.startswith(f"run stopped: the enrichment store at {shown} failed (")
    assert message.endswith("rerun once it is reachable")
    assert logged.text.count("Traceback") <= 1, logged.text[-6000:]
    store_lines = [line for line in logged.lines if "enrichment store" in line]
    assert 1 <= len(store_lines) <= 2, logged.text[-6000:]  # the run's line (and Prefect's final state)
    assert len(logged.lines) < 60, logged.text[-6000:]  # no line per workflow or per chunk


@pytest.mark.postgres
def test_a_store_that_refuses_the_run_as_it_starts_ends_it_with_one_line(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    """Chaos seed 6280223: the store refused connections while the run opened it (a traceback)."""
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=300)
    with postgres_database() as store:
        EnrichmentStore(store).close()  # its tables exist: opening it works, recording the run does not
        engine = sa.create_engine(store.replace("postgresql://", "postgresql+psycopg://"))
        with engine.begin() as conn:  # the server answers as one that stops taking connections would
            conn.execute(sa.text(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION "
                "'the database system is shutting down' USING ERRCODE = '57P03'; END $$ LANGUAGE plpgsql"
            ))  # fmt: skip
            conn.execute(sa.text(
                "CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON cleanlist_runs "
                "FOR EACH ROW EXECUTE FUNCTION refuse()"
            ))  # fmt: skip
        engine.dispose()
        with _recording() as logged:
            state, _summary = run_flow(source=str(source), output=str(tmp_path / "out.csv"), store=store)

    assert state.is_failed() and _exit_code(state) == 1
    message = state.message
    assert "\n" not in message
    assert message.startswith("run stopped before submitting anything: the enrichment store at "), message
    assert "is unreachable (CannotConnectNow: the database system is shutting down)" in message, message
    assert message.endswith("nothing was sent; rerun once it is reachable")
    assert "Traceback" not in logged.text, logged.text[-6000:]
    assert not [e for e in sandbox.requests_log() if e["endpoint"] == "enrich-bulk"]


# -- passwords ------------------------------------------------------------------------------------------


def _with_password(url: str) -> str:
    return url.replace("://postgres@", f"://postgres:{PASSWORD}@")


@pytest.mark.postgres
def test_no_database_password_in_the_summary_artifacts_events_logs_or_the_store(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.logging.handlers import APILogHandler

    api_env(make_sandbox(rate_limit=None, revoke_after_batches=1))  # a failed run logs more
    export = read_csv(messy_export(tmp_path / "crm.csv", unique=400, invalid=3))
    with postgres_database() as database:
        engine = sa.create_engine(database.replace("postgresql://", "postgresql+psycopg://"))
        export.to_sql("crm", engine, index=False)
        url = _with_password(database)  # the source, the output and the store
        with _recording() as logged:
            state, summary = run_flow(
                source=url, sql_query="SELECT * FROM crm", output=url, table="enriched", store=url
            )
        assert state.is_failed() and "401" in state.message
        assert summary["output"] == url.replace(PASSWORD, "***") + "#enriched"

        with engine.connect() as conn:
            params = [row[0] for row in conn.execute(sa.text("SELECT params FROM cleanlist_runs"))]
            written = conn.execute(sa.text("SELECT count(*) FROM enriched")).scalar_one()
        engine.dispose()
    assert written == 400 and len(params) == 1
    assert str(params[0]).count(url.replace(PASSWORD, "***")) == 2  # source and output, shown masked

    APILogHandler().flush()
    run_id = state.state_details.flow_run_id

    def ours() -> EventFilter:  # its time window ends when it is made
        return EventFilter(
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
            event=EventNameFilter(prefix=["cleanlist."]),
        )

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        _when(lambda: bool(client.read_events(filter=ours(), limit=50).events), timeout=20)
        events = client.read_events(filter=ours(), limit=50).events
    assert len(artifacts) >= 2 and len(logs) > 3
    assert [event.event for event in events] == ["cleanlist.run.failed"]
    texts = {
        "summary": json.dumps(summary),
        "message": state.message,
        "store params": " ".join(str(p) for p in params),
        "artifacts": " ".join(a.model_dump_json() for a in artifacts),
        "events": " ".join(event.model_dump_json() for event in events),
        "flow-run logs": " ".join(log.message for log in logs),
        "log records": logged.text,
    }
    for where, text in texts.items():
        assert PASSWORD not in text, where


def _cli(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    from prefect.settings import PREFECT_API_URL

    full_env = {**os.environ, **env, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    full_env.pop("PGPASSWORD", None)
    return subprocess.run(
        [sys.executable, "-m", "cleanlist_prefect.deployments.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=Path(__file__).parent.parent,
    )


@pytest.mark.postgres
def test_the_cli_keeps_one_password_out_of_the_flow_run_parameters(tmp_path: Path, make_sandbox) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    sandbox = make_sandbox(rate_limit=None)
    source = messy_export(tmp_path / "crm.csv", unique=300)
    with postgres_database() as database:
        url = _with_password(database)
        result = _cli(
            ["run", str(source), "-o", url, "--table", "enriched", "--store", url, "--json"],
            {"CLEANLIST_API_KEY": sandbox.api_key, "CLEANLIST_BASE_URL": sandbox.base_url},
        )
    assert result.returncode == 0, result.stderr[-2000:]
    assert PASSWORD not in result.stdout + result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["status"] == "completed"
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=50)
    (flow_run,) = [r for r in runs if r.parameters.get("source") == str(source)]
    assert PASSWORD not in flow_run.model_dump_json()
    assert flow_run.parameters["store"] == database  # the URL as given, without its password


def test_the_password_moves_to_pgpassword_only_when_there_is_exactly_one(monkeypatch, capsys) -> None:
    from cleanlist_prefect.deployments.local_run import password_to_environment, pgpassword

    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.delenv("CLEANLIST_STORE_URL", raising=False)
    one = "postgresql://u:p%40ss@db.example/crm"
    kwargs = {"source": one, "output": "out.csv", "store": "postgresql+psycopg://v:p%40ss@db.example/st"}
    moved, password = password_to_environment(kwargs)
    assert password == "p@ss"
    assert moved == {
        "source": "postgresql://u@db.example/crm",
        "output": "out.csv",
        "store": "postgresql+psycopg://v@db.example/st",
    }
    with pgpassword(password):
        assert os.environ["PGPASSWORD"] == "p@ss"
    assert "PGPASSWORD" not in os.environ

    for other in (
        {**kwargs, "store": "postgresql://v:other@db.example/st"},  # two passwords
        {**kwargs, "store": "postgresql://v@db.example/st"},  # one URL relies on ~/.pgpass
    ):
        assert password_to_environment(other) == (other, None)
        assert "stay in the flow run's parameters" in capsys.readouterr().err
    monkeypatch.setenv("PGPASSWORD", "another")
    assert password_to_environment(kwargs) == (kwargs, None)
    assert password_to_environment({"source": "in.csv", "output": "out.csv"})[1] is None
