"""The `backfill-contacts` flow: split a large source into shards, run each shard as a child run of
`enrich-contacts/adhoc` (any worker of the pool may take it), wait, and add up what the shards did.

Shards are Parquet files under `<output>/_shards/` (or `shard_dir`), named `shard-00000.parquet`, … in
source order, so a rerun over the same source makes the same shards and overwrites the same outputs; the
enrichment store (PostgreSQL when workers sit on several machines) makes the rerun free for contacts it
already holds. Each shard's rows end in `<output>/shard-NNNNN.<fmt>` or its `shard-NNNNN.rejects.csv`
(rows the parser could not read in `shard-NNNNN.unparsed.csv`), or in a database table with `table`.

Rate budget: the organization's limit (`org_rate_limit`, else CLEANLIST_RATE_LIMIT, else 60/60) is
split evenly: each child gets `rate_limit = org / max_parallel_shards`, and at most
`max_parallel_shards` children run at once, so together they stay under the API's limit on every
endpoint. A static split needs no coordination between machines; a Prefect global concurrency limit
would adapt when fewer shards run, but its acquisition is poll-based and too slow for a per-request
limiter (see DESIGN.md).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Failed, State

from cleanlist.errors import CleanlistError, InputError
from cleanlist.settings import CleanlistSettings, RateLimit
from tasks.sources import SourceBatch, display_source, iter_source

logger = logging.getLogger("cleanlist.backfill")

SHARD_DIR_NAME = "_shards"
SHARD_PATTERN = re.compile(r"^shard-(\d{5,})(\..+)?$")
RUN_SUMMARY_KEY = "cleanlist-run-summary"
BACKFILL_SUMMARY_KEY = "cleanlist-backfill-summary"
SHARD_METRICS = ("rows_read", "rejected", "submitted", "emails_found", "phones_found", "credits_spent")
OutputFormat = Literal["csv", "parquet", "jsonl"]
DATABASE_SCHEMES = ("postgresql", "postgres", "sqlite", "mysql")


@dataclass(frozen=True)
class Shard:
    """One slice of the source, staged as Parquet where every worker can read it."""

    number: int
    path: str
    rows: int
    unparsed: int
    origin: str

    @property
    def name(self) -> str:
        return shard_name(self.number)


@dataclass
class ShardRun:
    """What became of one shard's child flow run."""

    shard: Shard
    flow_run_id: str
    flow_run_name: str
    state: str = "SCHEDULED"
    message: str | None = None
    summary: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED"


def shard_name(number: int) -> str:
    return f"shard-{number:05d}"


def shard_rate_limit(org_limit: str, parallel_shards: int) -> str:
    """Each concurrent shard's share of the organization's `N/SECONDS` limit, itself `N/SECONDS`.

    Requests are split, the window kept (30/60 for 60/60 over 2 shards): stretching the window instead
    (60/120) would let every shard spend a whole window's requests in one burst. With fewer requests than
    shards, each shard gets one request per proportionally longer window.
    """
    limit = RateLimit.parse(org_limit)
    parallel = max(1, parallel_shards)
    if limit.requests >= parallel:
        return str(RateLimit(limit.requests // parallel, limit.seconds))
    return str(RateLimit(1, limit.seconds * math.ceil(parallel / limit.requests)))


def _parse_moment(text: str, name: str) -> dt.date | dt.datetime:
    value = str(text).strip()
    try:
        if len(value) == 10:
            return dt.date.fromisoformat(value)
        return dt.datetime.fromisoformat(value)
    except ValueError:
        raise InputError(f"{name} {text!r} is not an ISO date or datetime (e.g. 2024-01-31)") from None


def sql_windows(
    window_start: str | None, window_end: str | None, window_days: float | None
) -> list[tuple[dt.date | dt.datetime, dt.date | dt.datetime]] | None:
    """Half-open sub-windows [start, end) covering [window_start, window_end), `window_days` long each."""
    if window_start is None and window_end is None:
        if window_days is not None:
            raise InputError("window_days needs window_start and window_end")
        return None
    if window_start is None or window_end is None:
        raise InputError("give both window_start and window_end (the query binds :window_start/:window_end)")
    start = _parse_moment(window_start, "window_start")
    end = _parse_moment(window_end, "window_end")
    whole_days = window_days is None or float(window_days).is_integer()
    if isinstance(start, dt.datetime) != isinstance(end, dt.datetime) or not whole_days:
        start, end = _as_datetime(start), _as_datetime(end)
    if not end > start:
        raise InputError(f"window_end {window_end} must be after window_start {window_start}")
    if window_days is None:
        return [(start, end)]
    if not window_days > 0:
        raise InputError(f"window_days must be > 0, got {window_days}")
    step = dt.timedelta(days=float(window_days))
    windows = []
    low = start
    while low < end:
        high = min(low + step, end)
        windows.append((low, high))
        low = high
    return windows


def _as_datetime(value: dt.date | dt.datetime) -> dt.datetime:
    return value if isinstance(value, dt.datetime) else dt.datetime.combine(value, dt.time())


def _absolute(location: str) -> str:
    """Local paths made absolute (children run in another working directory); URLs as given."""
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"


def _write_atomically(path: str, write: Any) -> None:
    fs, fs_path = fsspec.core.url_to_fs(path)
    parent = fs_path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    staging = f"{fs_path}.partial"
    with fs.open(staging, "wb") as handle:
        write(handle)
    fs.mv(staging, fs_path)


def _frame_to_parquet(frame: pd.DataFrame, path: str) -> None:
    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        # A database column mixing types: keep every value, as text.
        table = pa.Table.from_pandas(frame.astype("string"), preserve_index=False)
    _write_atomically(path, lambda handle: pq.write_table(table, handle, compression="zstd"))


def _unparsed_to_csv(batch: SourceBatch, path: str) -> None:
    rows = [
        {**row.values, "source_row": row.row_number, "reject_reason": row.reason} for row in batch.bad_rows
    ]
    frame = pd.DataFrame(rows, columns=[*batch.frame.columns, "source_row", "reject_reason"])
    _write_atomically(path, lambda handle: handle.write(frame.to_csv(index=False).encode("utf-8")))


def _source_files(source: str) -> list[str]:
    """The files a glob matches, in name order; a plain path or URL is itself."""
    if not any(ch in source for ch in "*?["):
        return [source]
    fs, pattern = fsspec.core.url_to_fs(source)
    matches = sorted(path for path in fs.glob(pattern) if not fs.isdir(path))
    if not matches:
        raise InputError(f"no file matches {display_source(source)!r}")
    return matches if "://" not in source else [fs.unstrip_protocol(path) for path in matches]


def _sql_frames(url: str, query: str, params: dict[str, Any], batch_rows: int) -> Iterator[pd.DataFrame]:
    """Rows of `query` with bound parameters, `batch_rows` at a time (server-side cursor)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    shown = parsed.render_as_string(hide_password=True)
    engine = create_engine(parsed)
    try:
        with engine.connect() as conn:
            result = conn.execution_options(stream_results=True, max_row_buffer=batch_rows).execute(
                text(query), params
            )
            columns = list(result.keys())
            for part in result.partitions(batch_rows):
                yield pd.DataFrame(part, columns=columns)
    except SQLAlchemyError as exc:
        message = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        if parsed.password:
            message = message.replace(str(parsed.password), "***")
        raise InputError(f"SQL query failed on {shown}: {message}") from None
    finally:
        engine.dispose()


def split_source(
    source: str,
    shard_dir: str,
    unparsed_dir: str,
    *,
    shard_rows: int,
    sql_query: str | None = None,
    windows: list[tuple[Any, Any]] | None = None,
) -> list[Shard]:
    """Stage `source` as Parquet shards of at most `shard_rows` input rows, numbered in source order.

    A file or each file of a glob is cut every `shard_rows` rows (a shard never spans two files, whose
    columns may differ); a SQL query runs once per window and each window is cut the same way. Rows the
    parser could not read go to `<unparsed_dir>/shard-NNNNN.unparsed.csv`, counted in the shard's rows.
    Stale shard files of an earlier, longer split are removed.
    """
    if shard_rows < 1:
        raise InputError(f"shard_rows must be at least 1, got {shard_rows}")
    shards: list[Shard] = []

    def add(frame: pd.DataFrame, batch: SourceBatch | None, origin: str) -> None:
        number = len(shards)
        path = _join(shard_dir, f"{shard_name(number)}.parquet")
        _frame_to_parquet(frame, path)
        unparsed = len(batch.bad_rows) if batch is not None else 0
        unparsed_path = _join(unparsed_dir, f"{shard_name(number)}.unparsed.csv")
        if batch is not None and batch.bad_rows:
            _unparsed_to_csv(batch, unparsed_path)
        else:
            _remove(unparsed_path)  # an earlier run's file for this shard number would double rows
        rows = batch.end_row - batch.first_row if batch is not None else len(frame)
        shards.append(Shard(number, path, rows, unparsed, origin))

    if sql_query is not None:
        if windows is not None and not (":window_start" in sql_query and ":window_end" in sql_query):
            raise InputError("with a window the query must use :window_start and :window_end")
        for low, high in windows or [(None, None)]:
            params = {} if low is None else {"window_start": low, "window_end": high}
            origin = "query" if low is None else f"window {low} .. {high}"
            for frame in _sql_frames(source, sql_query, params, shard_rows):
                if len(frame):
                    add(frame, None, origin)
    else:
        for path in _source_files(source):
            for batch in iter_source(path, batch_rows=shard_rows):
                if batch.end_row > batch.first_row:
                    add(
                        batch.frame,
                        batch,
                        f"{display_source(path)} rows {batch.first_row}..{batch.end_row - 1}",
                    )
    _remove_stale(shard_dir, len(shards), suffixes=(".parquet",))
    _remove_stale(unparsed_dir, len(shards), suffixes=(".unparsed.csv",))
    return shards


def _remove(path: str) -> None:
    fs, fs_path = fsspec.core.url_to_fs(path)
    if fs.exists(fs_path):
        fs.rm(fs_path)


def _remove_stale(directory: str, keep: int, *, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Delete `shard-NNNNN*` files numbered `keep` or above (left by an earlier, longer split)."""
    fs, root = fsspec.core.url_to_fs(directory)
    if not fs.exists(root):
        return []
    removed = []
    for path in fs.ls(root, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        match = SHARD_PATTERN.match(name)
        if match is None or int(match.group(1)) < keep:
            continue
        if suffixes is not None and not name.endswith(suffixes):
            continue
        fs.rm(path)
        removed.append(name)
    return removed


@task(name="split-source", cache_policy=NO_CACHE, persist_result=False)
def split_source_task(
    source: str,
    shard_dir: str,
    unparsed_dir: str,
    shard_rows: int,
    sql_query: str | None,
    windows: list[tuple[Any, Any]] | None,
) -> list[Shard]:
    return split_source(
        source, shard_dir, unparsed_dir, shard_rows=shard_rows, sql_query=sql_query, windows=windows
    )


def _parse_summary(data: Any) -> dict[str, Any]:
    """The child's `cleanlist-run-summary` table artifact ([{metric, value}] as JSON) as a dict."""
    rows = json.loads(data) if isinstance(data, str) else data
    summary: dict[str, Any] = {}
    for row in rows or []:
        if not isinstance(row, dict) or "metric" not in row:
            continue
        summary[str(row["metric"])] = _number_or_text(row.get("value"))
    return summary


def _number_or_text(value: Any) -> Any:
    try:
        return float(value) if "." in str(value) else int(value)
    except (TypeError, ValueError):
        return value


def _child_summaries(flow_run_ids: list[str]) -> dict[str, dict[str, Any]]:
    if not flow_run_ids:
        return {}
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[RUN_SUMMARY_KEY]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(i) for i in flow_run_ids]),
            )
        )
    return {str(a.flow_run_id): _parse_summary(a.data) for a in artifacts if a.flow_run_id}


def _run_shards(
    shards: list[Shard],
    parameters_for: Any,
    *,
    deployment_name: str,
    max_parallel: int,
    poll_seconds: float,
    progress_id: uuid.UUID | None,
) -> list[ShardRun]:
    """Start a child run per shard, at most `max_parallel` at a time; return when all are final."""
    log = get_run_logger()
    parent_id = current_flow_run.id or uuid.uuid4().hex
    attempt = current_flow_run.run_count or 1
    parent_name = current_flow_run.name or "backfill"
    pending: deque[Shard] = deque(shards)
    running: dict[str, ShardRun] = {}
    finished: list[ShardRun] = []
    with get_client(sync_client=True) as client:
        while pending or running:
            while pending and len(running) < max_parallel:
                shard = pending.popleft()
                child = run_deployment(
                    deployment_name,
                    parameters=parameters_for(shard),
                    timeout=0,
                    flow_run_name=f"{parent_name}-{shard.name}",
                    tags=["cleanlist", "backfill-shard"],
                    idempotency_key=f"backfill:{parent_id}:{attempt}:{shard.name}",
                    as_subflow=True,
                )
                running[str(child.id)] = ShardRun(shard, str(child.id), child.name)
                log.info("%s (%d rows, %s) → flow run %s", shard.name, shard.rows, shard.origin, child.name)
            time.sleep(poll_seconds)
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(i) for i in running]))
            )
            for run in runs:
                state = run.state
                if state is None or not state.is_final():
                    continue
                record = running.pop(str(run.id))
                record.state, record.message = state.type.value, state.message
                finished.append(record)
                log.log(
                    logging.INFO if record.ok else logging.ERROR,
                    "%s finished %s%s",
                    record.shard.name,
                    state.name,
                    f": {state.message}" if state.message and not record.ok else "",
                )
                if progress_id is not None:
                    update_progress_artifact(progress_id, progress=100.0 * len(finished) / len(shards))
    summaries = _child_summaries([r.flow_run_id for r in finished])
    for record in finished:
        record.summary = summaries.get(record.flow_run_id)
    return sorted(finished, key=lambda r: r.shard.number)


def _report(runs: list[ShardRun], totals: dict[str, Any]) -> None:
    table: list[dict[str, Any]] = []
    for run in runs:
        summary = run.summary or {}
        table.append(
            {
                "shard": run.shard.name,
                "flow_run": run.flow_run_name,
                "rows": run.shard.rows,
                **{metric: summary.get(metric, "") for metric in SHARD_METRICS},
                "state": run.state.lower(),
                "status": summary.get("status", ""),
            }
        )
    table.append(
        {
            "shard": "total",
            "flow_run": f"{len(runs)} runs",
            "rows": totals["rows"],
            **{metric: totals.get(metric, "") for metric in SHARD_METRICS},
            "state": totals["status"],
            "status": f"{len(totals['failed_shards'])} failed",
        }
    )
    create_table_artifact(
        table, key=BACKFILL_SUMMARY_KEY, description=f"backfill-contacts: {totals['status']}, per shard"
    )


@flow(name="backfill-contacts", log_prints=True, persist_result=False)
def backfill_contacts(
    source: str,
    output: str,
    shard_rows: int = 50_000,
    sql_query: str | None = None,
    window_start: str | None = None,
    window_end: str | None = None,
    window_days: float | None = None,
    store: str | None = None,
    enrichment_type: Literal["none", "partial", "phone_only", "full", "prospecting_only"] = "partial",
    max_parallel_shards: int = 2,
    deployment_name: str = "enrich-contacts/adhoc",
    org_rate_limit: str | None = None,
    output_format: OutputFormat = "csv",
    table: str | None = None,
    shard_dir: str | None = None,
    mapping: dict[str, str] | None = None,
    refresh_days: float = 30.0,
    max_credits_per_shard: float | None = None,
    child_parameters: dict[str, Any] | None = None,
    poll_seconds: float = 5.0,
) -> dict[str, Any] | State:
    """Enrich a large source as shards of `shard_rows` rows, each a child run of `deployment_name`.

    `source`: one file, a glob of files (fsspec), or with `sql_query` a database URL; with
    `window_start`/`window_end` the query runs per sub-window of `window_days` (binds :window_start and
    :window_end). `output`: a directory receiving `shard-NNNNN.<output_format>` + rejects per shard, or
    with `table` a database URL every shard upserts into. Use a `store` every worker reaches (PostgreSQL
    across machines). At most `max_parallel_shards` children run at once, each limited to that share of
    `org_rate_limit` (default CLEANLIST_RATE_LIMIT, else 60/60). `child_parameters` go to every child
    as-is. The run fails, after all shards finished, when any shard failed; a rerun redoes only what the
    store does not already hold.
    """
    log = get_run_logger()
    try:
        windows = sql_windows(window_start, window_end, window_days)
        if windows is not None and sql_query is None:
            raise InputError("a window needs sql_query (and a database URL as source)")
        if max_parallel_shards < 1:
            raise InputError(f"max_parallel_shards must be at least 1, got {max_parallel_shards}")
        to_table = table is not None
        if not to_table and output.split("://", 1)[0].split("+", 1)[0] in DATABASE_SCHEMES:
            raise InputError("output is a database URL: name the table to upsert into with `table`")
        out_dir = None if to_table else _absolute(output)
        if shard_dir is None and out_dir is None:
            shard_dir = os.path.expanduser(f"~/.cleanlist/backfill-shards/{table}")
            log.warning(
                "staging shards in %s: only workers on this machine can read them; pass shard_dir on "
                "storage every worker shares",
                shard_dir,
            )
        staging = _absolute(shard_dir) if shard_dir else _join(out_dir or "", SHARD_DIR_NAME)
        org_limit = org_rate_limit or CleanlistSettings().rate_limit
        per_shard = shard_rate_limit(org_limit, max_parallel_shards)
    except CleanlistError as exc:
        log.error("%s", exc)
        return Failed(message=str(exc), data={"status": "failed", "error": str(exc)})

    try:
        shards = split_source_task(source, staging, out_dir or staging, shard_rows, sql_query, windows)
    except CleanlistError as exc:
        log.error("%s", exc)
        return Failed(message=str(exc), data={"status": "failed", "error": str(exc)})
    if out_dir is not None:
        stale = _remove_stale(out_dir, len(shards))
        if stale:
            log.info("removed %d output files of shards this split no longer has", len(stale))
    log.info(
        "%d shards of ≤ %d rows staged in %s; up to %d at a time, each at %s (organization: %s)",
        len(shards),
        shard_rows,
        staging,
        max_parallel_shards,
        per_shard,
        org_limit,
    )

    def parameters_for(shard: Shard) -> dict[str, Any]:
        params: dict[str, Any] = {
            "source": shard.path,
            "output": output if to_table else _join(out_dir or "", f"{shard.name}.{output_format}"),
            "table": table,
            "enrichment_type": enrichment_type,
            "mapping": mapping,
            "store": store,
            "refresh_days": refresh_days,
            "max_credits": max_credits_per_shard,
            "rate_limit": per_shard,
            **(child_parameters or {}),
        }
        return {key: value for key, value in params.items() if value is not None}

    progress_id = create_progress_artifact(0.0, key="cleanlist-backfill-progress", description="Shards done")
    runs = _run_shards(
        shards,
        parameters_for,
        deployment_name=deployment_name,
        max_parallel=max_parallel_shards,
        poll_seconds=poll_seconds,
        progress_id=progress_id,
    )
    failed = [r for r in runs if not r.ok]
    totals: dict[str, Any] = {
        "status": "failed" if failed else "completed",
        "shards": len(shards),
        "rows": sum(s.rows for s in shards),
        "unparsed": sum(s.unparsed for s in shards),
        **{
            metric: round(sum(float((r.summary or {}).get(metric) or 0) for r in runs), 6)
            for metric in SHARD_METRICS
        },
        "failed_shards": [r.shard.name for r in failed],
        "rate_limit_per_shard": per_shard,
        "output": f"{output}#{table}" if to_table else out_dir,
        "shard_runs": [
            {"shard": r.shard.name, "flow_run": r.flow_run_name, "state": r.state, **asdict(r.shard)}
            for r in runs
        ],
    }
    for metric in ("rows_read", "rejected", "submitted", "emails_found", "phones_found"):
        totals[metric] = int(totals[metric])
    _report(runs, totals)
    if failed:
        listed = ", ".join(f"{r.shard.name} ({r.flow_run_name}: {r.state.lower()})" for r in failed)
        message = f"{len(failed)} of {len(runs)} shards failed: {listed}; rerun the backfill to retry them"
        log.error("%s", message)
        return Failed(message=message, data=totals)
    if not shard_dir:
        fs, root = fsspec.core.url_to_fs(staging)
        if fs.exists(root):
            fs.rm(root, recursive=True)
    log.info(
        "backfill done: %d shards, %d rows, %d submitted, %d emails, %.2f credits",
        totals["shards"],
        totals["rows"],
        totals["submitted"],
        totals["emails_found"],
        totals["credits_spent"],
    )
    return totals


__all__ = ["Shard", "backfill_contacts", "shard_rate_limit", "split_source", "sql_windows"]
