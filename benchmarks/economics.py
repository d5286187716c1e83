"""`cleanlist-enrich report` over a big store: 1,000,000 stored contacts and a year of nightly runs.

Builds the store once per backend (SQLite file; PostgreSQL database on CLEANLIST_TEST_POSTGRES_URL's
server, dropped afterwards), then runs the real command in a subprocess `--repeat` times and prints its
wall and CPU time (the subprocess's, by `wait4`), the interpreter's start included. No target is asserted
here; the issue's is < 2 s.

    python -m benchmarks.economics [--contacts 1000000] [--runs 365] [--repeat 3] [--backend sqlite|postgres|both]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from cleanlist.store import EnrichmentStore
from cleanlist.store.schema import contacts, runs

POSTGRES_URL = os.environ.get("CLEANLIST_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REPO = Path(__file__).parent.parent
BATCH = 20_000


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def build_store(url: str, n_contacts: int, n_runs: int) -> float:
    """The store's tables (via the store), then the rows straight in; seconds it took."""
    started = time.monotonic()
    EnrichmentStore(url).close()
    now = datetime.now(UTC)
    engine = _engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(runs),
            [
                {
                    "run_id": f"bench-{day:04d}-{uuid.uuid4().hex[:8]}",
                    "host": "bench",
                    "pid": 1,
                    "status": "completed",
                    "params": "{}",
                    "counts": "{}",
                    "started_at": now - timedelta(days=n_runs - day),
                    "heartbeat_at": now - timedelta(days=n_runs - day),
                    "finished_at": now - timedelta(days=n_runs - day) + timedelta(minutes=20),
                    "source": "/exports/crm.csv" if day % 3 else "/exports/events.xlsx",
                    "enrichment_type": "partial",
                    "submitted": 3000,
                    "emails_found": 2000 + day % 500,
                    "phones_found": 0,
                    "credits_spent": float(2000 + day % 500),
                }
                for day in range(n_runs)
            ],
        )
    for start in range(0, n_contacts, BATCH):
        with engine.begin() as conn:
            conn.execute(
                sa.insert(contacts),
                [
                    {
                        "contact_key": f"li:bench-{i}",
                        "enrichment_type": "partial",
                        "state": "done",
                        "enriched_at": now - timedelta(minutes=(i * 53) % (60 * 24 * 60)),
                    }
                    for i in range(start, min(start + BATCH, n_contacts))
                ],
            )
    engine.dispose()
    return time.monotonic() - started


def measure(url: str) -> tuple[float, float, str]:
    """(wall s, CPU s of the process, its stdout) of one `cleanlist-enrich report`."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cleanlist_prefect.deployments.cli",
            "report",
            "--store",
            url,
            "--since",
            "30d",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"report failed: {err[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime, out


def measure_in_process(url: str) -> tuple[float, float]:
    """(wall s, CPU s) of the report's own work in this process: open the store, read, render."""
    from cleanlist.run.economics import economics_text, parse_since

    wall, cpu = time.monotonic(), time.process_time()
    since = parse_since("30d")
    with EnrichmentStore(url) as store:
        text = economics_text(
            store.run_economics(since), by="run", since=since, source=None, due=store.refresh_due(30)
        )
    assert text
    return time.monotonic() - wall, time.process_time() - cpu


@contextmanager
def backend_url(backend: str, directory: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'economics-store.db'}"
        return
    name = f"cl_bench_report_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(
        POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{POSTGRES_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=365)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    args = parser.parse_args(argv)
    backends = ("sqlite", "postgres") if args.backend == "both" else (args.backend,)
    with tempfile.TemporaryDirectory(prefix="cleanlist-economics-") as tmp:
        for backend in backends:
            with backend_url(backend, Path(tmp)) as url:
                built = build_store(url, args.contacts, args.runs)
                samples = [measure(url) for _ in range(args.repeat)]
                walls = [wall for wall, _, _ in samples]
                cpus = [cpu for _, cpu, _ in samples]
                lines = samples[-1][2].splitlines()
                inner = [measure_in_process(url) for _ in range(args.repeat)]
                print(
                    f"{backend}: {args.contacts:,} contacts, {args.runs} runs (built in {built:.0f} s): "
                    f"report median {statistics.median(walls):.2f} s wall, "
                    f"{statistics.median(cpus):.2f} s CPU (of {args.repeat}; max {max(walls):.2f} s wall); "
                    f"in process (store open, queries, text) median "
                    f"{statistics.median(w for w, _ in inner):.2f} s wall, "
                    f"{statistics.median(c for _, c in inner):.2f} s CPU; "
                    f"load {os.getloadavg()[0]:.1f}; {len(lines)} lines, last: {lines[-1]}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
