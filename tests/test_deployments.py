"""Deployments on a real `prefect server start` with real process workers, as an operator runs them.

The integration tests start the server (temporary PREFECT_HOME, SQLite, then PostgreSQL as its
database), create the `cleanlist` pool, `prefect --no-prompt deploy --all` from prefect.yaml, start two
workers and drive everything through the `prefect` and `cleanlist-enrich` commands against a sandbox of
the API. Every process they start is killed with its process group, also when a test fails. The fast
tests at the top check the backfill's plain functions without any server.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import psutil
import pytest
import sqlalchemy as sa

from benchmarks.procs import seed_prefect_home
from cleanlist.errors import InputError
from cleanlist.io.shards import split_source, sql_windows
from cleanlist.run.economics import ECONOMICS_KEY
from cleanlist.run.report import NEEDS_YOU_TITLE, headline, report_markdown
from cleanlist.run.report import needs_you as run_needs_you
from cleanlist.run.summary import RunSummary
from cleanlist.sandbox import SandboxConfig, SandboxServer
from cleanlist.vocab import RunStatus
from tests.conftest import postgres_database
from tests.sandbox_helpers import WebhookReceiver

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
BIN = Path(sys.executable).parent
ID_COLUMN = "Contact Id"
SERVER_START_TIMEOUT = 180.0
RUN_TIMEOUT = 240.0


def _executable(name: str) -> str:
    found = BIN / name
    return str(found) if found.exists() else (shutil.which(name) or name)


PREFECT = _executable("prefect")
CLEANLIST_ENRICH = _executable("cleanlist-enrich")


# --------------------------------------------------------------------------------------------- inputs


def write_contacts(path: Path, count: int, *, tag: str, invalid: int = 0) -> list[str]:
    """A CSV of `count` distinct contacts (+ `invalid` rows lacking a last name and company); all ids."""
    ids: list[str] = []
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow([ID_COLUMN, "First Name", "Last Name", "Company Website"])
        for i in range(count):
            ids.append(f"{tag}-{i:05d}")
            writer.writerow([ids[-1], f"Ann{tag}{i}", f"Lee{tag}{i}", f"{tag}{i % 89}.example.com"])
        for i in range(invalid):
            ids.append(f"{tag}-bad-{i:03d}")
            writer.writerow([ids[-1], f"Nolast{tag}{i}", "", ""])
    return ids


def ids_in(paths: Iterable[Path]) -> Counter[str]:
    """How often each contact id occurs across the given CSV files."""
    seen: Counter[str] = Counter()
    for path in paths:
        seen.update(pd.read_csv(path, dtype=str)[ID_COLUMN].dropna().tolist())
    return seen


# ------------------------------------------------------------------------------ fast: no server at all


def test_a_date_window_is_cut_into_half_open_sub_windows() -> None:
    windows = sql_windows("2024-01-01", "2024-01-10", 4)
    assert [(str(a), str(b)) for a, b in windows or []] == [
        ("2024-01-01", "2024-01-05"),
        ("2024-01-05", "2024-01-09"),
        ("2024-01-09", "2024-01-10"),
    ]
    assert sql_windows(None, None, None) is None
    with pytest.raises(InputError):
        sql_windows("2024-01-10", "2024-01-01", None)
    with pytest.raises(InputError):
        sql_windows("2024-01-01", None, 1)


def test_a_file_is_split_into_numbered_shards_holding_every_row_once(tmp_path: Path) -> None:
    source = tmp_path / "big.csv"
    ids = write_contacts(source, 2_500, tag="split")
    with source.open("a", encoding="utf-8") as out:
        out.write("split-extra,too,many,fields,here\n")  # one row the parser cannot read
    ids.append("split-extra")
    shards = split_source(str(source), str(tmp_path / "_shards"), str(tmp_path), shard_rows=1_000)

    assert [s.name for s in shards] == ["shard-00000", "shard-00001", "shard-00002"]
    assert [s.rows for s in shards] == [1_000, 1_000, 501]
    staged: Counter[str] = Counter()
    for shard in shards:
        staged.update(pd.read_parquet(shard.path)[ID_COLUMN].tolist())
    unparsed = pd.read_csv(tmp_path / "shard-00002.unparsed.csv", dtype=str)
    staged.update(unparsed[ID_COLUMN].tolist())
    assert staged == Counter(ids)
    assert unparsed["reject_reason"].notna().all()

    # A rerun with bigger shards makes fewer of them and leaves no stale shard behind.
    again = split_source(str(source), str(tmp_path / "_shards"), str(tmp_path), shard_rows=2_000)
    assert [s.name for s in again] == ["shard-00000", "shard-00001"]
    assert sorted(p.name for p in (tmp_path / "_shards").iterdir()) == [
        "shard-00000.parquet",
        "shard-00001.parquet",
    ]
    assert sorted(p.name for p in tmp_path.glob("*.unparsed.csv")) == ["shard-00001.unparsed.csv"]


def test_a_glob_never_mixes_two_files_in_one_shard(tmp_path: Path) -> None:
    first = write_contacts(tmp_path / "part-a.csv", 150, tag="ga")
    second = write_contacts(tmp_path / "part-b.csv", 50, tag="gb")
    shards = split_source(
        str(tmp_path / "part-*.csv"), str(tmp_path / "_shards"), str(tmp_path), shard_rows=100
    )
    assert [s.rows for s in shards] == [100, 50, 50]
    assert pd.read_parquet(shards[1].path)[ID_COLUMN].tolist() == first[100:]
    assert pd.read_parquet(shards[2].path)[ID_COLUMN].tolist() == second


def test_a_sql_window_makes_one_or_more_shards_per_sub_window(tmp_path: Path) -> None:
    database = tmp_path / "crm.db"
    with sqlite3.connect(database) as conn:
        conn.execute(
            'CREATE TABLE contacts (id TEXT, "First Name" TEXT, "Last Name" TEXT, domain TEXT, day TEXT)'
        )
        rows = [(f"q-{i}", f"A{i}", f"B{i}", f"d{i}.example", f"2024-01-{1 + i % 6:02d}") for i in range(60)]
        conn.executemany("INSERT INTO contacts VALUES (?, ?, ?, ?, ?)", rows)
    query = "SELECT * FROM contacts WHERE day >= :window_start AND day < :window_end ORDER BY id"
    windows = sql_windows("2024-01-01", "2024-01-07", 3)
    shards = split_source(
        f"sqlite:///{database}",
        str(tmp_path / "_shards"),
        str(tmp_path),
        shard_rows=25,
        sql_query=query,
        windows=windows,
    )
    # 30 rows per 3-day window, cut at 25: two shards per window.
    assert [s.rows for s in shards] == [25, 5, 25, 5]
    assert shards[0].origin.startswith("window 2024-01-01")
    staged = [i for s in shards for i in pd.read_parquet(s.path)["id"].tolist()]
    assert sorted(staged) == sorted(r[0] for r in rows)
    with pytest.raises(InputError, match=":window_start"):
        split_source(
            f"sqlite:///{database}",
            str(tmp_path / "_shards"),
            str(tmp_path),
            shard_rows=25,
            sql_query="SELECT * FROM contacts",
            windows=windows,
        )


# ------------------------------------------------------------------------------ processes and servers


class ProcessGroup:
    """Subprocesses started in their own sessions; `stop` ends each whole process group."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path = REPO) -> Path:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            self.started[name] = subprocess.Popen(
                args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return log

    def alive(self, name: str) -> bool:
        return self.started[name].poll() is None

    def stop(self, name: str) -> None:
        proc = self.started.pop(name, None)
        if proc is None:
            return
        # Flow runs of a worker or of `serve` run in sessions of their own: find them while their
        # parent still lives, then end the group and them.
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for child in descendants:
            with contextlib.suppress(psutil.Error):
                child.kill()

    def stop_all(self) -> None:
        """Stop every process at once (one after the other, a server or worker slow to leave made a
        teardown wait 15 s for each: 30 s a stack)."""
        with ThreadPoolExecutor(max_workers=max(len(self.started), 1)) as pool:
            list(pool.map(self.stop, list(self.started)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class PrefectStack:
    """A Prefect server with the cleanlist pool deployed and its workers, plus the sandbox they call."""

    api_url: str
    env: dict[str, str]
    root: Path
    procs: ProcessGroup
    sandbox: SandboxServer
    database_url: str | None = None
    workers: list[str] = field(default_factory=list)

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def diagnostics(self) -> str:
        return "\n".join(f"--- {log.name}\n{tail(log)}" for log in sorted(self.procs.logs.glob("*.log")))

    def run(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            list(args), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def prefect(
        self, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run(PREFECT, *args, timeout=timeout, check=check)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        response = httpx.request(method, f"{self.api_url}{path}", json=body, timeout=30.0)
        response.raise_for_status()
        return response.json()

    def deployment_run(
        self, name: str, params: dict[str, Any], *, watch: bool = True, timeout: float = RUN_TIMEOUT
    ) -> tuple[str, subprocess.CompletedProcess[str]]:
        """`prefect deployment run NAME --param k=v … [--watch]`: (flow run id, the finished command)."""
        args = ["deployment", "run", name]
        for key, value in params.items():
            shown = value if isinstance(value, str) else json.dumps(value)
            args += ["--param", f"{key}={shown}"]
        if watch:
            args.append("--watch")
        done = self.prefect(*args, timeout=timeout, check=False)
        match = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout)
        assert match, f"no flow run was created:\n{done.stdout}\n{done.stderr}"
        return match.group(1), done

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self.api("GET", f"/flow_runs/{flow_run_id}")
        return run

    def wait_for_state(self, flow_run_id: str, *types: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(flow_run_id)
            if run["state"]["type"] in types:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"flow run {run['name']} is {run['state']['type']}\n{self.diagnostics()}"
                )
            time.sleep(0.5)

    def artifact(self, flow_run_id: str, key: str) -> dict[str, Any]:
        found = self.api(
            "POST",
            "/artifacts/filter",
            {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": [key]}}},
        )
        assert found, f"flow run {flow_run_id} has no artifact {key!r}"
        artifact: dict[str, Any] = found[0]
        return artifact

    def summary(self, flow_run_id: str) -> RunSummary:
        return RunSummary.from_table(self.artifact(flow_run_id, "cleanlist-run-summary")["data"])

    def ran_on(self, flow_run_id: str) -> list[str]:
        """The workers whose logs say they took this flow run (by id: a run is renamed once it starts)."""
        line = f"submitting flow run '{flow_run_id}'"
        return [w for w in self.workers if line in (self.procs.logs / f"{w}.log").read_text(errors="replace")]


def base_env(home: Path, api_url: str) -> dict[str, str]:
    """The environment of every command: a clean PREFECT_HOME, this server, no developer settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CLEANLIST_"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_CLI_PROMPT="false",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def start_stack(
    root: Path, sandbox: SandboxServer, *, workers: int, database_url: str | None = None
) -> PrefectStack:
    """Server, pool, Variables for nightly, `prefect deploy --all`, then `workers` workers (all verified)."""
    root.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = base_env(root / "prefect-home", api_url)
    # SQLite: start from a migrated copy, which holds the block types (a first start migrates for ~17 s
    # of CPU); PostgreSQL: Prefect migrates and registers.
    seeded = seed_prefect_home(root / "prefect-home") if database_url is None else {}
    procs = ProcessGroup(logs)
    stack = PrefectStack(api_url, env, root, procs, sandbox, database_url)
    try:
        server_env = {**env, **seeded}
        if database_url:
            server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
        procs.start(
            "server",
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            server_env,
            cwd=root,
        )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            assert procs.alive("server"), f"prefect server start exited:\n{stack.diagnostics()}"
            try:
                if httpx.get(f"{api_url}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the server did not answer:\n{stack.diagnostics()}"
            time.sleep(0.5)

        stack.prefect("work-pool", "create", "cleanlist", "--type", "process")
        nightly = {
            "cleanlist_nightly_source": str(root / "nightly" / "contacts.csv"),
            "cleanlist_nightly_output": str(root / "nightly" / "enriched.csv"),
            "cleanlist_nightly_store": f"sqlite:///{root / 'nightly' / 'store.db'}",
        }
        for name, value in nightly.items():  # through the API: a `prefect variable set` costs ~2 s of CPU
            stack.api("POST", "/variables/", {"name": name, "value": value})
        stack.prefect("--no-prompt", "deploy", "--all", timeout=180.0)

        stack.env = {
            **env,
            "CLEANLIST_API_KEY": sandbox.api_key,
            "CLEANLIST_BASE_URL": sandbox.base_url,
            "CLEANLIST_STORE_URL": f"sqlite:///{root / 'store.db'}",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        }
        for i in range(1, workers + 1):
            name = f"worker-{i}"
            # --limit 2: a backfill (1 run) with 2 parallel shards cannot fit on one worker.
            procs.start(
                name,
                [PREFECT, "worker", "start", "--pool", "cleanlist", "--name", name, "--limit", "2"],
                stack.env,
                cwd=root,  # not the checkout: the deployments' pull step must find the code
            )
            stack.workers.append(name)
        deadline = time.monotonic() + 90.0
        while True:
            online = {w["name"] for w in stack.api("POST", "/work_pools/cleanlist/workers/filter", {})}
            if set(stack.workers) <= online:
                break
            assert all(procs.alive(w) for w in stack.workers), f"a worker exited:\n{stack.diagnostics()}"
            assert time.monotonic() < deadline, f"workers did not come online:\n{stack.diagnostics()}"
            time.sleep(0.5)
        return stack
    except BaseException:
        procs.stop_all()
        raise


# Under xdist (.ci/run) the two stacks are two groups, each on one worker and built once: the SQLite one
# (six tests, ~5 minutes) goes out before anything else, the PostgreSQL one (two tests) runs beside it.
# Each worker starts its own sandbox (in-process, a moment).
SQLITE_STACK = pytest.mark.first_out
POSTGRES_STACK = pytest.mark.xdist_group("tests.test_deployments.postgres")


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig(credits=1_000_000.0, latency=(0.2, 0.5))) as server:
        yield server


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, sandbox: SandboxServer) -> Iterator[PrefectStack]:
    """One SQLite-backed server with two workers for the module's tests."""
    started = start_stack(tmp_path_factory.mktemp("prefect-sqlite"), sandbox, workers=2)
    try:
        yield started
    finally:
        started.procs.stop_all()


@dataclass(frozen=True)
class AdhocRun:
    flow_run_id: str
    ids: list[str]
    output: Path
    command: subprocess.CompletedProcess[str]


def adhoc_run(stack: PrefectStack, tag: str) -> AdhocRun:
    source = stack.root / f"{tag}.csv"
    ids = write_contacts(source, 400, tag=tag, invalid=7)
    output = stack.root / "out" / f"{tag}-enriched.csv"
    flow_run_id, done = stack.deployment_run(
        "enrich-contacts/adhoc",
        {"source": str(source), "output": str(output), "initial_poll_seconds": 1},
    )
    return AdhocRun(flow_run_id, ids, output, done)


@pytest.fixture(scope="module")
def adhoc(stack: PrefectStack) -> AdhocRun:
    return adhoc_run(stack, "adhoc")


# ---------------------------------------------------------------------------------- SQLite server


@pytest.mark.integration
@SQLITE_STACK
def test_prefect_yaml_deploys_nightly_adhoc_and_backfill_non_interactively(stack: PrefectStack) -> None:
    assert (stack.root / "prefect-home" / "prefect.db").exists(), "the server's SQLite database is elsewhere"
    deployments = {
        f"{d['name']}": d
        for d in stack.api("POST", "/deployments/filter", {})
        if d["work_pool_name"] == "cleanlist"
    }
    assert set(deployments) == {"nightly", "adhoc", "backfill"}

    nightly = deployments["nightly"]
    [schedule] = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert schedule["active"] is True
    assert nightly["parameters"] == {
        "source": str(stack.root / "nightly" / "contacts.csv"),
        "output": str(stack.root / "nightly" / "enriched.csv"),
        "store": f"sqlite:///{stack.root / 'nightly' / 'store.db'}",
        "credentials": "",  # cleanlist_nightly_credentials is not set: the key comes from the Secret or env
    }
    assert deployments["adhoc"]["schedules"] == [] and deployments["adhoc"]["parameters"] == {}
    assert deployments["backfill"]["schedules"] == []
    for deployment in deployments.values():
        assert deployment["job_variables"]["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "cleanlist"
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ]


@pytest.mark.integration
@SQLITE_STACK
def test_adhoc_run_on_a_worker_completes_with_every_row_in_the_output(
    stack: PrefectStack, adhoc: AdhocRun
) -> None:
    assert adhoc.command.returncode == 0, f"{adhoc.command.stdout}\n{stack.diagnostics()}"
    run = stack.flow_run(adhoc.flow_run_id)
    assert run["state"]["type"] == "COMPLETED"
    assert any(stack.ran_on(run["id"])), "no worker log shows the run"
    assert run["name"] == f"enrich adhoc.csv {run['expected_start_time'][:10]}"
    rejects = adhoc.output.with_name(adhoc.output.name.replace(".csv", ".rejects.csv"))
    assert ids_in([adhoc.output, rejects]) == Counter(adhoc.ids)
    enriched = pd.read_csv(adhoc.output, dtype=str)
    assert len(enriched) == 400 and set(enriched["cleanlist_status"]) <= {"enriched", "not_found"}
    assert len(pd.read_csv(rejects, dtype=str)) == 7
    summary = stack.summary(adhoc.flow_run_id)
    assert summary.status == "completed" and summary.rows_read == 407


@pytest.mark.integration
@SQLITE_STACK
def test_backfill_runs_three_shards_over_two_workers_and_a_rerun_pays_nothing(
    stack: PrefectStack, sandbox: SandboxServer
) -> None:
    # Three shards of 400 (two chunks each): the shards and workers 3,000 contacts gave, in less time.
    source = stack.root / "crm-1200.csv"
    ids = write_contacts(source, 1_200, tag="bf")
    output = stack.root / "out" / "backfill"
    sandbox.reset()
    with postgres_database() as store:
        params = {
            "source": str(source),
            "output": str(output),
            "shard_rows": 400,
            "store": store,
            "poll_seconds": 1,
            "child_parameters": {"initial_poll_seconds": 1},
        }
        started = time.monotonic()
        parent_id, done = stack.deployment_run("backfill-contacts/backfill", params)
        first_seconds = time.monotonic() - started
        assert done.returncode == 0, f"{done.stdout}\n{stack.diagnostics()}"

        shard_files = sorted(output.glob("shard-*.csv"))
        assert [p.name for p in shard_files if ".rejects." not in p.name] == [
            "shard-00000.csv",
            "shard-00001.csv",
            "shard-00002.csv",
        ]
        assert ids_in(shard_files) == Counter(ids)  # every input row exactly once
        assert not (output / "_shards").exists()

        children = stack.api(
            "POST", "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}}
        )
        assert len(children) == 3
        assert {c["state"]["type"] for c in children} == {"COMPLETED"}
        # Every shard gets the organization's whole limit: the store's rate book shares it between them.
        assert {c["parameters"]["rate_limit"] for c in children} == {"60/60"}
        assert {c["parameters"]["store"] for c in children} == {store}
        parent = stack.flow_run(parent_id)
        run_date = parent["expected_start_time"][:10]
        assert parent["name"] == f"backfill crm-1200.csv {run_date}"  # readable names in the runs list
        assert sorted(c["name"] for c in children) == [f"{parent['name']} shard-0000{i}" for i in range(3)]
        workers = {w for run in [parent, *children] for w in stack.ran_on(run["id"])}
        assert workers == {"worker-1", "worker-2"}, "the shards did not spread over both workers"

        counters = sandbox.counters()
        assert counters["contacts_accepted"] == 1_200
        assert "429" not in counters["requests"]["enrich-bulk"], counters  # together under the limit
        table = json.loads(stack.artifact(parent_id, "cleanlist-backfill-summary")["data"])
        assert [row["shard"] for row in table] == ["shard-00000", "shard-00001", "shard-00002", "total"]
        assert table[-1]["submitted"] == 1_200 and table[-1]["rows"] == 1_200

        # Rerun: same shard names, same files, and the shared store answers for every contact.
        rerun_id, again = stack.deployment_run("backfill-contacts/backfill", params)
        assert again.returncode == 0, f"{again.stdout}\n{stack.diagnostics()}"
        assert ids_in(sorted(output.glob("shard-*.csv"))) == Counter(ids)
        after = sandbox.counters()
        assert after["contacts_accepted"] == 1_200 and after["contacts_accepted_more_than_once"] == 0
        assert after["credits_charged"] == counters["credits_charged"]
        rerun_total = json.loads(stack.artifact(rerun_id, "cleanlist-backfill-summary")["data"])[-1]
        assert rerun_total["submitted"] == 0 and rerun_total["credits_spent"] == 0
    print(f"backfill of 1,200 contacts in 3 shards over 2 workers: {first_seconds:.1f}s")


@pytest.mark.integration
@SQLITE_STACK
def test_a_failed_shard_fails_the_backfill_after_every_shard_finished(stack: PrefectStack) -> None:
    inputs = stack.root / "glob"
    inputs.mkdir()
    good = write_contacts(inputs / "part-a.csv", 300, tag="gl")
    (inputs / "part-b.csv").write_text("foo,bar\n1,2\n3,4\n", encoding="utf-8")  # nothing to build contacts
    output = stack.root / "out" / "glob"
    parent_id, done = stack.deployment_run(
        "backfill-contacts/backfill",
        {
            "source": str(inputs / "part-*.csv"),
            "output": str(output),
            "shard_rows": 1000,
            "poll_seconds": 1,
            "child_parameters": {"initial_poll_seconds": 1},
        },
    )
    assert done.returncode != 0
    parent = stack.flow_run(parent_id)
    assert parent["state"]["type"] == "FAILED"
    assert "1 of 2 shards failed: shard-00001" in parent["state"]["message"]
    children = stack.api(
        "POST", "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}}
    )
    assert sorted(c["state"]["type"] for c in children) == ["COMPLETED", "FAILED"]
    assert ids_in([output / "shard-00000.csv", output / "shard-00000.rejects.csv"]) == Counter(good)
    assert (output / "_shards").exists(), "staged shards are kept for a rerun after a failure"
    # The aggregate comes from the children's typed summaries: the passing shard's counts, none invented
    # for the failed one.
    table = json.loads(stack.artifact(parent_id, "cleanlist-backfill-summary")["data"])
    rows = {row["shard"]: row for row in table}
    assert rows["shard-00000"]["status"] == "completed" and rows["shard-00000"]["rows_read"] == 300
    assert rows["shard-00001"]["state"] == "failed" and rows["shard-00001"]["submitted"] == ""
    for metric in ("rows_read", "rejected", "submitted", "emails_found", "credits_spent"):
        assert rows["total"][metric] == rows["shard-00000"][metric], metric
    assert rows["total"]["submitted"] > 0


@pytest.mark.integration
@SQLITE_STACK
def test_running_out_of_credits_notifies_through_the_automation_and_resumes_after_a_top_up(
    stack: PrefectStack,
) -> None:
    with (
        SandboxServer(SandboxConfig(credits=0.0, latency=0.2)) as poor,
        WebhookReceiver([]).running() as hook,
    ):
        block = (
            "import sys\n"
            "from prefect.blocks.notifications import CustomWebhookNotificationBlock\n"
            "CustomWebhookNotificationBlock(name='ops', url=sys.argv[1], "
            "json_data={'subject': '{{subject}}', 'body': '{{body}}'}).save('cleanlist-ops', overwrite=True)"
        )
        stack.run(sys.executable, "-c", block, hook.url)
        assert "records each firing" in stack.run(CLEANLIST_ENRICH, "create-automation").stdout
        described = stack.run(CLEANLIST_ENRICH, "create-automation", "--block", "cleanlist-ops").stdout
        assert described.startswith("updated automation 'cleanlist-credits-exhausted'"), described
        automations = stack.api("POST", "/automations/filter", {})
        assert [a["name"] for a in automations].count("cleanlist-credits-exhausted") == 1

        source = stack.root / "poor.csv"
        ids = write_contacts(source, 60, tag="poor")
        output = stack.root / "out" / "poor.csv"
        flow_run_id, _ = stack.deployment_run(
            "enrich-contacts/adhoc",
            {
                "source": str(source),
                "output": str(output),
                "base_url": poor.base_url,
                "store": f"sqlite:///{stack.root / 'poor-store.db'}",
                "credit_recheck_seconds": 1,
                "pause_timeout_seconds": 180,
                "initial_poll_seconds": 1,
            },
            watch=False,
        )
        name = stack.wait_for_state(flow_run_id, "PAUSED")["name"]
        deadline = time.monotonic() + 60
        while not hook.bodies and time.monotonic() < deadline:
            time.sleep(0.5)
        assert hook.bodies, f"the automation sent nothing\n{stack.diagnostics()}"
        message = hook.bodies[0]
        assert name in message["subject"] and "needs 60" in message["body"]  # worst case of 60 contacts
        assert f"/runs/flow-run/{flow_run_id}" in message["body"]

        poor.add_credits(10_000)
        assert (
            stack.wait_for_state(flow_run_id, "COMPLETED", "FAILED", "CRASHED")["state"]["type"]
            == "COMPLETED"
        )
        assert ids_in([output]) == Counter(ids)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browse(url: str, profile: Path, *, screenshot: Path | None = None) -> str:
    """The DOM of `url` after its scripts ran (virtual time), and a screenshot of it if asked (one browser
    for both: each start of Chromium on the Prefect UI costs ~10 s of CPU)."""
    browser = chromium()
    assert browser is not None
    args = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-quic",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
        "--virtual-time-budget=20000",
    ]
    target = ["--dump-dom", *([f"--screenshot={screenshot}"] if screenshot else [])]
    # Its own session, so a hung browser goes with all its helper processes.
    proc = subprocess.Popen(
        [*args, *target, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, err[-2000:]
    return out


@pytest.mark.integration
@SQLITE_STACK
def test_the_ui_shows_the_flow_run_and_its_summary_artifact(
    stack: PrefectStack, adhoc: AdhocRun, tmp_path: Path
) -> None:
    if chromium() is None:
        if os.environ.get("CLEANLIST_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is required here (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    run = stack.flow_run(adhoc.flow_run_id)
    artifact = stack.artifact(adhoc.flow_run_id, "cleanlist-run-summary")
    report = stack.artifact(adhoc.flow_run_id, "cleanlist-run-report")
    economics = stack.artifact(adhoc.flow_run_id, ECONOMICS_KEY)
    summary = stack.summary(adhoc.flow_run_id)
    # A run with something to act on, as the flow would report it, beside the clean run it belongs to.
    troubled = summary.model_copy(
        update={
            "status": RunStatus.COMPLETED_WITH_ERRORS,
            "unresolved": 7,
            "ambiguous_submissions": 1,
            "ambiguous_contacts": 250,
            "learned_limits": "enrich-bulk 4/3s (learned)",
        }
    )
    needs_you = stack.api(
        "POST",
        "/artifacts/",
        {
            "key": "cleanlist-run-report-needs-you",
            "type": "markdown",
            "data": report_markdown(troubled),
            "flow_run_id": adhoc.flow_run_id,
        },
    )
    pages = {
        "ui-flow-run": (f"{stack.ui_url}/runs/flow-run/{adhoc.flow_run_id}", [run["name"], "Completed"]),
        "ui-run-summary-artifact": (
            f"{stack.ui_url}/artifacts/artifact/{artifact['id']}",
            [run["name"], "cleanlist-run-summary", "emails_found", "credits_spent"],
        ),
        # The report a person reads: its headline, and no "what needs you" for this clean run.
        "ui-run-report-artifact": (
            f"{stack.ui_url}/artifacts/artifact/{report['id']}",
            [headline(summary), "rows read", "Cost:", "Pace:"],
        ),
        "ui-run-report-needs-you": (
            f"{stack.ui_url}/artifacts/artifact/{needs_you['id']}",
            [headline(troubled), NEEDS_YOU_TITLE, *(item.remedy for item in run_needs_you(troubled))],
        ),
        "ui-economics-artifact": (
            f"{stack.ui_url}/artifacts/artifact/{economics['id']}",
            [ECONOMICS_KEY, "hit rate", "per found", "due for refresh"],
        ),
    }
    assert NEEDS_YOU_TITLE not in report["data"]
    for name, (url, expected) in pages.items():
        # Twice at most: on a loaded machine a page's data request can still be out when the browser's
        # virtual time runs out (a fresh-clone run once saw the economics page without its table).
        shot = ARTIFACTS / f"{name}.png"
        for attempt in range(2):
            shot.unlink(missing_ok=True)
            dom = browse(url, tmp_path / f"profile-{name}-{attempt}", screenshot=shot)
            missing = [text for text in expected if text not in dom]
            if not missing:
                break
        assert not missing, f"{url} does not show {missing}"
        assert shot.stat().st_size > 20_000, f"{shot} looks blank"


# ------------------------------------------------------------------------------ PostgreSQL server


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory: pytest.TempPathFactory, sandbox: SandboxServer) -> Iterator[PrefectStack]:
    """A second server whose own database is a fresh PostgreSQL database."""
    with postgres_database() as url:
        database_url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
        started = start_stack(
            tmp_path_factory.mktemp("prefect-postgres"), sandbox, workers=1, database_url=database_url
        )
        try:
            yield started
        finally:
            started.procs.stop_all()


@pytest.mark.integration
@pytest.mark.postgres
@POSTGRES_STACK
def test_adhoc_run_completes_with_postgresql_as_the_prefect_database(pg_stack: PrefectStack) -> None:
    run = adhoc_run(pg_stack, "pgserver")
    assert run.command.returncode == 0, f"{run.command.stdout}\n{pg_stack.diagnostics()}"
    assert pg_stack.flow_run(run.flow_run_id)["state"]["type"] == "COMPLETED"
    rejects = run.output.with_name(run.output.name.replace(".csv", ".rejects.csv"))
    assert ids_in([run.output, rejects]) == Counter(run.ids)
    assert pg_stack.summary(run.flow_run_id).status == "completed"
    assert not (pg_stack.root / "prefect-home" / "prefect.db").exists()
    assert pg_stack.database_url is not None
    engine = sa.create_engine(pg_stack.database_url.replace("+asyncpg", "+psycopg", 1))
    with engine.connect() as conn:  # the run lives in PostgreSQL, not in a SQLite file
        stored = conn.execute(
            sa.text("SELECT count(*) FROM flow_run WHERE id = :id"), {"id": run.flow_run_id}
        )
        assert stored.scalar_one() == 1
    engine.dispose()


@pytest.mark.integration
@pytest.mark.postgres
@POSTGRES_STACK
def test_cleanlist_enrich_serve_runs_the_deployments_from_one_process(pg_stack: PrefectStack) -> None:
    for worker in pg_stack.workers:  # only the serving process may take runs now
        pg_stack.procs.stop(worker)
    # Serving replaces the pool's deployments of the same names; remove them first (README, "One machine
    # without workers").
    for name in ("enrich-contacts/nightly", "enrich-contacts/adhoc", "backfill-contacts/backfill"):
        pg_stack.prefect("deployment", "delete", name)
    log = pg_stack.procs.start("serve", [CLEANLIST_ENRICH, "serve"], pg_stack.env)
    deadline = time.monotonic() + 90
    while "Your deployments are being served" not in log.read_text(errors="replace"):
        assert pg_stack.procs.alive("serve"), tail(log)
        assert time.monotonic() < deadline, tail(log)
        time.sleep(0.5)
    served = {d["name"]: d for d in pg_stack.api("POST", "/deployments/filter", {})}
    assert {"nightly", "adhoc", "backfill"} <= set(served)
    nightly = served["nightly"]
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert nightly["parameters"]["source"] == str(pg_stack.root / "nightly" / "contacts.csv")

    source = pg_stack.root / "served.csv"
    ids = write_contacts(source, 1_200, tag="served")
    output = pg_stack.root / "out" / "served"
    _parent_id, done = pg_stack.deployment_run(
        "backfill-contacts/backfill",
        {
            "source": str(source),
            "output": str(output),
            "shard_rows": 500,
            "poll_seconds": 1,
            "child_parameters": {"initial_poll_seconds": 1},
        },
    )
    assert done.returncode == 0, f"{done.stdout}\n{tail(log)}"
    assert ids_in(output.glob("shard-*.csv")) == Counter(ids)
    assert len(list(output.glob("shard-0000?.csv"))) == 3
    pg_stack.procs.stop("serve")
