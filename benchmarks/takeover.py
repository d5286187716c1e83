"""How soon a killed run's claims are taken over (kill -9 sent → another run's claim gets them).

For each store (SQLite file, PostgreSQL database on CLEANLIST_TEST_POSTGRES_URL or 127.0.0.1) and each
place the killed run ran: this PID namespace, a new one (`unshare --pid --fork --mount-proc`, as a
restarted container), another host (its runs row rewritten to another host name and boot id). Each run
holds its liveness lock (cleanlist/store/liveness.py); the heartbeat is fresh throughout, so any time
well below the 30 s lease comes from the released lock.

    python -m benchmarks.takeover [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from cleanlist.store import EnrichmentStore
from cleanlist.store.schema import runs
from cleanlist.vocab import EnrichmentType

POSTGRES_URL = os.environ.get("CLEANLIST_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
NEW_PID_NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]
PLACES = ("same-namespace", "new-namespace", "other-host")
CONTACTS = 250

HOLDER = """
import sys
from cleanlist.store import EnrichmentStore
url, run_id, keys = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
store = EnrichmentStore(url)
store.start_run(run_id, {})
print(len(store.claim(run_id, keys, "full", None).claimed), flush=True)
sys.stdin.read()
"""


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(
        url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )


@contextmanager
def postgres_database() -> Iterator[str]:
    name = f"cl_bench_{uuid.uuid4().hex[:12]}"
    admin = _engine(POSTGRES_URL)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{POSTGRES_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def takeover_seconds(url: str, place: str, attempt: int) -> float:
    victim, rerun = f"victim-{place}-{attempt}", f"rerun-{place}-{attempt}"
    keys = [f"li:person-{i}-{place}-{attempt}" for i in range(CONTACTS)]
    prefix = NEW_PID_NAMESPACE if place == "new-namespace" else []
    holder = subprocess.Popen(
        [*prefix, sys.executable, "-c", HOLDER, url, victim, ",".join(keys)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == str(CONTACTS)
        if place == "other-host":
            engine = _engine(url)
            with engine.begin() as conn:
                values = {"host": "another-host", "boot_id": "its-boot", "pid": 1}
                conn.execute(sa.update(runs).where(runs.c.run_id == victim).values(**values))
            engine.dispose()
        with EnrichmentStore(url) as store:
            store.start_run(rerun, {})
            assert store.claim(rerun, keys, EnrichmentType.FULL, None).held == keys, (
                "a live run's claims were taken"
            )
            os.killpg(holder.pid, signal.SIGKILL)
            killed = time.monotonic()
            while store.claim(rerun, keys, EnrichmentType.FULL, None).claimed != keys:
                if time.monotonic() - killed > 120:
                    raise AssertionError("not taken over within 120 s")
                time.sleep(0.005)
            return time.monotonic() - killed
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    for backend in ("sqlite", "postgres"):
        with (
            tempfile.TemporaryDirectory() as tmp,
            postgres_database() if backend == "postgres" else _sqlite(tmp) as url,
        ):
            for place in PLACES:
                times = [takeover_seconds(url, place, n) for n in range(repeat)]
                print(
                    f"{backend:8} {place:15} median {statistics.median(times) * 1000:7.1f} ms"
                    f"  max {max(times) * 1000:7.1f} ms  (n={repeat})",
                    flush=True,
                )


@contextmanager
def _sqlite(directory: str) -> Iterator[str]:
    yield f"sqlite:///{directory}/store.db"


if __name__ == "__main__":
    main()
