"""Unpublished rate limits, measured: the real CLI against the sandbox playing five limits it was not told.

    .venv/bin/python -m benchmarks.ratelimits                       # this checkout, ~3 min
    .venv/bin/python -m benchmarks.ratelimits --checkout /tmp/old   # the CLI of another checkout (before)

The clock is compressed: a window of 2 s stands for the API's minute, workflows take 0.5–1.5 s.

| case | sandbox | client |
|---|---|---|
| real limit 5x lower | 4 per 2 s per endpoint | `CLEANLIST_RATE_LIMIT=20/2`, 40 chunks |
| one window per organization | 20 per 2 s for all endpoints together | `20/2`, 40 chunks |
| two runs, one PostgreSQL store | 20 per 2 s per endpoint | `20/2` each, 40 + 40 chunks at once |
| auto | 20 per 2 s per endpoint | `auto/2` (a checkout without auto: `2/2`, the documented 60/min), 160 chunks |
| short window | 4 per 3 s per endpoint | `60/60` (the default), 16 chunks |

From the sandbox's request log: the share of requests answered 429; the ratio ideal time ÷ time the API
was busy (first bulk request to the last status answer that completed a workflow), where the ideal
is what the real limit allows for the requests a run cannot do without — one bulk request per chunk,
plus one status call per workflow when the window is the organization's; and requests sent inside a
Retry-After window already answered (0.1 s after the 429, for requests already on the wire).
The sandbox always runs from this checkout (it is the yardstick); the store is fresh for every case.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

from benchmarks.data import DatasetSpec, cached_dataset
from benchmarks.procs import ROOT, PrefectServer, SandboxProcess
from benchmarks.run import CHUNK

RESULTS = ROOT / "benchmarks" / "results"
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TIMEOUT = 900
WORKFLOW_SECONDS = 1.0  # the sandbox's mean workflow duration (--latency 0.5-1.5)


@dataclass(frozen=True)
class Case:
    name: str
    sandbox: list[str]
    client_limit: str
    chunks: int
    runs: int = 1
    organization_window: bool = False
    real_per_second: float = 10.0


CASES = [
    Case("real limit 4/2, 20/2 configured", ["--rate-limit", "4/2"], "20/2", 40, real_per_second=2.0),
    Case(
        "org-wide window 20/2, 20/2 configured",
        ["--rate-limit", "20/2", "--rate-scope", "organization"],
        "20/2",
        40,
        organization_window=True,
    ),
    # 40 chunks each: with 20 each, the second CLI process starts ~2.5 s after the first on a 2-CPU
    # machine (imports, Prefect) and the runs would barely overlap.
    Case("two runs, one PostgreSQL store, 20/2", ["--rate-limit", "20/2"], "20/2", 80, runs=2),
    Case("auto/2 against 20/2", ["--rate-limit", "20/2"], "auto/2", 160),
    # Issue 19 item 8: a short window behind the default 60/60 (a limit learned per minute crawls).
    Case("real window 4/3, 60/60 configured", ["--rate-limit", "4/3"], "60/60", 16, real_per_second=4 / 3),
]


@dataclass
class Row:
    case: str
    client_limit: str
    chunks: int
    requests: int
    answered_429: int
    share_429: float
    api_seconds: float
    ideal_seconds: float
    ratio: float
    inside_retry_after: int
    rows_in: int
    rows_out: int
    accepted_twice: int


def _supports_auto(checkout: Path) -> bool:
    probe = "from cleanlist.settings import RateLimit; RateLimit.parse('auto/2')"
    return subprocess.run([sys.executable, "-c", probe], cwd=checkout, capture_output=True).returncode == 0


def _inside_retry_after(log: list[dict[str, Any]], organization_window: bool) -> int:
    early = 0
    for i, entry in enumerate(log):
        if entry["status"] != 429 or not entry.get("retry_after"):
            continue
        start, end = entry["t"] + 0.1, entry["t"] + float(entry["retry_after"]) - 0.05
        for later in log[i + 1 :]:
            same = organization_window or later["endpoint"] == entry["endpoint"]
            if same and later["endpoint"] != "validate-key" and start < later["t"] < end:
                early += 1
                if TIMELINE:
                    print(
                        f"  inside Retry-After: {later['endpoint']} {later['t'] - entry['t']:.3f} s after "
                        f"a 429 of {entry['endpoint']} (Retry-After {entry['retry_after']})",
                        file=sys.stderr,
                    )
    return early


def _postgres_store() -> tuple[str, str]:
    name = f"cleanlist_bench_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return name, POSTGRES.rsplit("/", 1)[0] + f"/{name}"


def _drop_postgres(name: str) -> None:
    engine = sa.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def _sources(work: Path, chunks: int, runs: int) -> list[Path]:
    whole = cached_dataset(RESULTS / "data", DatasetSpec(chunks * CHUNK), "csv")
    if runs == 1:
        return [whole]
    frame = pd.read_csv(whole, dtype=str, keep_default_na=False)
    parts = []
    for i in range(runs):
        part = work / f"part-{i}.csv"
        frame.iloc[i::runs].to_csv(part, index=False)
        parts.append(part)
    return parts


def measure(case: Case, checkout: Path, prefect: PrefectServer, work: Path) -> Row:
    limit = case.client_limit
    if limit.startswith("auto") and not _supports_auto(checkout):
        limit = "2/2"  # what a client without `auto` can do: the documented 60 per minute
    sandbox = SandboxProcess(
        rate_limit=case.sandbox[1], latency="0.5-1.5", extra=case.sandbox[2:], log_dir=work
    )
    pg_name = None
    try:
        if case.runs > 1:
            pg_name, store = _postgres_store()
        else:
            store = f"sqlite:///{work / f'store-{uuid.uuid4().hex[:6]}.db'}"
        env = {
            **prefect.env,
            "PREFECT_API_URL": prefect.api_url,
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "CLEANLIST_API_KEY": sandbox.api_key,
            "CLEANLIST_BASE_URL": sandbox.base_url,
            "CLEANLIST_RATE_LIMIT": limit,
        }
        sources = _sources(work, case.chunks, case.runs)
        sandbox.reset()
        procs = []
        for i, source in enumerate(sources):
            output = work / f"out-{uuid.uuid4().hex[:6]}-{i}.csv"
            cmd = [
                sys.executable, "-m", "cleanlist_prefect.deployments.cli", "run", str(source),
                "--output", str(output), "--store", store, "--json",
            ]  # fmt: skip
            procs.append((subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True), output))  # fmt: skip
        rows_out = 0
        for proc, output in procs:
            _, err = proc.communicate(timeout=TIMEOUT)
            if proc.returncode != 0:
                raise RuntimeError(f"{case.name}: the CLI exited with {proc.returncode}:\n{err[-2000:]}")
            rows_out += len(pd.read_csv(output, dtype=str)) if output.exists() else 0
            rejects = output.with_name(output.stem + ".rejects.csv")
            rows_out += len(pd.read_csv(rejects, dtype=str)) if rejects.exists() else 0
        log = [e for e in sandbox.requests_log() if e["endpoint"] != "validate-key"]
        if TIMELINE:
            _print_timeline(case.name, log)
        counters = sandbox.counters()
    finally:
        sandbox.stop()
        if pg_name:
            _drop_postgres(pg_name)
    limited = [e for e in log if e["endpoint"] in ("enrich-bulk", "enrich-status")]
    too_many = sum(1 for e in limited if e["status"] == 429)
    bulk = [e for e in log if e["endpoint"] == "enrich-bulk"]
    status_ok = [e for e in log if e["endpoint"] == "enrich-status" and e["status"] == 200]
    busy = status_ok[-1]["t"] - bulk[0]["t"]
    workflows = int(counters["bulk_accepted"])
    needed = workflows + (workflows if case.organization_window else 0)
    ideal = needed / case.real_per_second + WORKFLOW_SECONDS  # the last workflow still has to run
    return Row(
        case=case.name,
        client_limit=limit,
        chunks=workflows,
        requests=len(limited),
        answered_429=too_many,
        share_429=round(too_many / len(limited), 4),
        api_seconds=round(busy, 2),
        ideal_seconds=round(ideal, 2),
        ratio=round(ideal / busy, 3),
        inside_retry_after=_inside_retry_after(log, case.organization_window),
        rows_in=case.chunks * CHUNK,
        rows_out=rows_out,
        accepted_twice=int(counters.get("contacts_accepted_more_than_once", 0)),
    )


TIMELINE = False


def _print_timeline(name: str, log: list[dict[str, Any]]) -> None:
    """Per 2 s window of the sandbox: bulk and status answers, 200 / 429."""
    start = min(e["t"] for e in log)
    windows: dict[int, dict[str, int]] = {}
    for e in log:
        slot = windows.setdefault(int((e["t"] - start) // 2), {})
        key = f"{e['endpoint'].split('-')[1]}{e['status']}"
        slot[key] = slot.get(key, 0) + 1
    print(name, file=sys.stderr)
    for index in sorted(windows):
        print(f"  {index * 2:>4}s {windows[index]}", file=sys.stderr)


def table(rows: list[Row]) -> str:
    head = f"{'case':<42}{'client':>8}{'requests':>9}{'429s':>6}{'share':>7}{'busy s':>8}{'ideal s':>8}"
    head += f"{'ratio':>7}{'in RA':>6}{'rows':>13}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.case:<42}{r.client_limit:>8}{r.requests:>9}{r.answered_429:>6}{r.share_429:>7.1%}"
            f"{r.api_seconds:>8.1f}{r.ideal_seconds:>8.1f}{r.ratio:>7.2f}{r.inside_retry_after:>6}"
            f"{f'{r.rows_out}/{r.rows_in}':>13}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkout", type=Path, default=ROOT, help="run the CLI of this checkout")
    parser.add_argument("--case", action="append", help="only the cases whose name contains this")
    parser.add_argument("--timeline", action="store_true", help="print answers per window of each case")
    args = parser.parse_args(argv)
    global TIMELINE
    TIMELINE = args.timeline
    checkout = args.checkout.resolve()
    cases = [c for c in CASES if not args.case or any(k in c.name for k in args.case)]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="cleanlist-ratelimits-") as tmp:
        work = Path(tmp)
        prefect = PrefectServer(work / "prefect")
        try:
            for case in cases:
                rows.append(measure(case, checkout, prefect, work))
                print(f"  {case.name}: done", file=sys.stderr)
        finally:
            prefect.stop()
    print(f"\nRate limits the client was not told, CLI of {checkout}\n")
    print(table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = RESULTS / f"{stamp}-ratelimits.json"
    out.write_text(json.dumps({"checkout": str(checkout), "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"\n{out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
