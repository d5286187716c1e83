"""Shared fixtures: one Prefect test harness per session, sandboxes on free ports, store URLs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "cleanlist")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

from benchmarks.procs import SEEDED_SERVER_ENV, TEMPLATE_DIR_ENV, migrated_prefect_db, quiet_prefect_services
from cleanlist.run.workspace import RunWorkspace
from cleanlist.sandbox import SandboxConfig, SandboxServer
from cleanlist.store import EnrichmentStore

# The session servers, and the temporary servers and fault schedules the tests start, inherit this: the
# services that look after deployments and workers are off. The deployment tests' own stacks start from
# an environment without PREFECT_* (tests/test_deployments.py::base_env) and keep every service.
quiet_prefect_services(os.environ)

POSTGRES_URL = os.environ.get("CLEANLIST_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _isolate_xdist_worker() -> None:
    """Under pytest-xdist (CLEANLIST_TEST_WORKERS=2 in .ci/run) each worker gets a HOME and a TMPDIR of
    its own, inherited by the CLIs and servers it starts: the journal and default store under
    ~/.cleanlist, the run workspaces and `cleanlist-frame-*` directories in the temp dir are never seen
    by the other worker. Each worker also has its own session Prefect server (`prefect_harness`),
    sandboxes on free ports and uniquely named PostgreSQL databases."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    private = Path(tempfile.mkdtemp(prefix=f"cleanlist-tests-{worker}-"))
    for name in ("home", "tmp"):
        (private / name).mkdir()
    os.environ["HOME"] = str(private / "home")
    os.environ["TMPDIR"] = str(private / "tmp")
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    atexit.register(shutil.rmtree, private, ignore_errors=True)


def _share_one_migrated_prefect_database() -> None:
    """Every Prefect database the session's servers start from (the session harnesses, the temporary
    servers and stacks the tests start on a seeded PREFECT_HOME, the fault schedules) is a copy of one,
    migrated once: each migration costs ~16 s of CPU, and the workers, their harnesses and the fault
    schedules' batch each ran their own. Set in the controller, before the workers inherit it."""
    if os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get(TEMPLATE_DIR_ENV):
        return
    shared = Path(tempfile.mkdtemp(prefix="cleanlist-tests-prefect-template-"))
    os.environ[TEMPLATE_DIR_ENV] = str(shared)
    atexit.register(shutil.rmtree, shared, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    _share_one_migrated_prefect_database()
    _isolate_xdist_worker()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One real (temporary) Prefect server for every flow test of the session, on a copy of the
    session's migrated database (the harness would migrate an empty one: ~16 s of CPU a worker)."""
    import prefect.testing.utilities as harness

    real_mkdtemp = harness.mkdtemp

    def seeded_mkdtemp() -> str:
        # The harness's database is `prefect-test.db` in the directory it makes: made here, from the copy.
        directory = real_mkdtemp()
        shutil.copy2(migrated_prefect_db(), Path(directory) / "prefect-test.db")
        return directory

    # Only the harness's server skips the block types the copy holds (SEEDED_SERVER_ENV): the temporary
    # servers some tests start on an empty PREFECT_HOME still register them.
    with mock.patch.object(harness, "mkdtemp", seeded_mkdtemp), ExitStack() as stack:
        with mock.patch.dict(os.environ, SEEDED_SERVER_ENV):
            stack.enter_context(harness.prefect_test_harness(server_startup_timeout=180))
        yield


@pytest.fixture
def make_sandbox() -> Iterator[Callable[..., SandboxServer]]:
    """Start sandboxes with any SandboxConfig fields; all are stopped after the test."""
    started: list[SandboxServer] = []

    def start(**config: Any) -> SandboxServer:
        config.setdefault("latency", 0.05)
        server = SandboxServer(SandboxConfig(**config)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def api_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[SandboxServer], None]:
    """Point CLEANLIST_* at a sandbox for code that reads the environment (flows, the CLI)."""

    def point(sandbox: SandboxServer, rate_limit: str | None = None) -> None:
        monkeypatch.setenv("CLEANLIST_API_KEY", sandbox.api_key)
        monkeypatch.setenv("CLEANLIST_BASE_URL", sandbox.base_url)
        if rate_limit:
            monkeypatch.setenv("CLEANLIST_RATE_LIMIT", rate_limit)

    return point


def postgres_available() -> bool:
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://"))
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database; dropped afterwards."""
    import sqlalchemy as sa

    if not postgres_available():
        if os.environ.get("CLEANLIST_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here but not reachable at {POSTGRES_URL}")
        pytest.skip("PostgreSQL is not reachable")
    name = f"cl_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(
        POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    base = POSTGRES_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty enrichment-store URL on SQLite and on a real PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        with postgres_database() as url:
            yield url


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EnrichmentStore]:
    """A SQLite enrichment store of its own (tests/test_store.py overrides it with both backends)."""
    with EnrichmentStore(f"sqlite:///{tmp_path}/store.db") as opened:
        yield opened


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[RunWorkspace]:
    """A run workspace under the test's tmp_path, removed afterwards."""
    opened = RunWorkspace(tmp_path)
    yield opened
    opened.cleanup()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With `--dist loadgroup` (.ci/run) tests spread over the workers one by one, except the tests of a
    module that share a module-scoped fixture (a Prefect stack with workers, a migrated Prefect home, an
    S3 server): those stay on one worker, so the fixture is still built once. A test may name its own
    group (`xdist_group`) to split a module whose fixtures are independent.

    The longest work goes out first (xdist hands work out in collection order, .ci/run keeps it): tests
    marked `first_out` (a group of several minutes, the Prefect stack with workers), tests with a longer
    timeout than the default (the fault-schedule gate, kill -9 and worker scenarios, minutes each), then
    the groups, then the rest in file order. Started last, the 5-minute gate alone would be the suite's
    tail. (A worker whose first unit holds one or two tests is given a second at once, so the longest
    group goes out before the gate: behind the gate, on the same worker, it would wait five minutes.)"""
    # The workers collect, and xdist sets their `dist` to "no" (keeping `loadgroup`): asking only for
    # `dist` made this hook a no-op under xdist, so each worker that drew a test of a module built that
    # module's fixtures again (three Prefect stacks with workers for test_deployments, not one).
    if not (config.getoption("dist", "no") == "loadgroup" or getattr(config.option, "loadgroup", False)):
        return
    default_timeout = float(config.getini("timeout") or 0)
    grouped: set[str] = set()
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        if item.get_closest_marker("xdist_group") is not None:
            grouped.add(item.nodeid)
        elif any(defs[-1].scope == "module" for defs in info.name2fixturedefs.values() if defs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__ if item.module else item.nodeid))
            grouped.add(item.nodeid)

    def longest_first(item: pytest.Item) -> tuple[int, float]:
        if item.get_closest_marker("first_out") is not None:
            return (0, 0.0)
        marker = item.get_closest_marker("timeout")
        timeout = float(marker.args[0]) if marker is not None and marker.args else default_timeout
        if timeout > default_timeout:
            return (1, -timeout)
        return (2, 0.0) if item.nodeid in grouped else (3, 0.0)

    items.sort(key=longest_first)
