"""The `backfill-contacts` flow: split a large source into shards, run each shard as a child run of
`enrich-contacts/adhoc` (any worker of the pool may take it), wait, and add up what the shards did.

Shards are Parquet files under `<output>/_shards/` (or `shard_dir`), named `shard-00000.parquet`, … in
source order, so a rerun over the same source makes the same shards and overwrites the same outputs; the
enrichment store (PostgreSQL when workers sit on several machines) makes the rerun free for contacts it
already holds. Each shard's rows end in `<output>/shard-NNNNN.<fmt>` or its `shard-NNNNN.rejects.csv`
(rows the parser could not read in `shard-NNNNN.unparsed.csv`), or in a database table with `table`.

Rate budget: every child gets the organization's whole limit (`org_rate_limit`, else
CLEANLIST_RATE_LIMIT, else 60/60) and takes each request's slot from the rate book in the shared store
(cleanlist/store/ratebook.py), so the shards together — and any other run of the organization on that
store — never exceed it, and a lone last shard gets all of it (README, "Shared rate budget").
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import asdict
from typing import Any

import fsspec
from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import State
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Cancelled, Cancelling, Failed

from cleanlist.dburl import is_database_url
from cleanlist.errors import CleanlistError, InputError
from cleanlist.io.shards import (
    SHARD_DIR_NAME,
    SHARD_METRICS,
    OutputFormat,
    Shard,
    ShardRun,
    absolute_location,
    join_location,
    remove_stale,
    split_source,
    sql_windows,
)
from cleanlist.models import EnrichmentType
from cleanlist.run.options import EnrichOptions
from cleanlist.run.summary import RunSummary
from cleanlist.settings import CleanlistSettings, RateLimit
from cleanlist_prefect.flows.enrich_contacts import SUMMARY_KEY
from cleanlist_prefect.flows.run_names import backfill_run_name
from cleanlist_prefect.tasks.prefect_types import sync_result
from cleanlist_prefect.tasks.shards import split_source_task

BACKFILL_SUMMARY_KEY = "cleanlist-backfill-summary"


def _child_summaries(flow_run_ids: list[str]) -> dict[str, RunSummary]:
    """Each finished child's summary, read back from its `cleanlist-run-summary` table artifact."""
    if not flow_run_ids:
        return {}
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[SUMMARY_KEY]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(i) for i in flow_run_ids]),
            )
        )
    return {str(a.flow_run_id): RunSummary.from_table(a.data) for a in artifacts if a.flow_run_id}


def _run_shards(
    shards: list[Shard],
    parameters_for: Any,
    *,
    deployment_name: str,
    max_parallel: int,
    poll_seconds: float,
    progress_id: uuid.UUID | None,
) -> list[ShardRun]:
    """Start a child run per shard, at most `max_parallel` at a time; return when all are final.

    A shard whose run cannot even be created (no such deployment, a parameter the schema refuses) counts
    as failed. If this run stops while children run (cancelled, crashed), they are cancelled too.
    """
    log = get_run_logger()
    parent_id = current_flow_run.id or uuid.uuid4().hex
    attempt = current_flow_run.run_count or 1
    parent_name = current_flow_run.name or "backfill"
    pending: deque[Shard] = deque(shards)
    running: dict[str, ShardRun] = {}
    finished: list[ShardRun] = []

    def settled(record: ShardRun) -> None:
        finished.append(record)
        if progress_id is not None:
            update_progress_artifact(progress_id, progress=100.0 * len(finished) / len(shards))

    with get_client(sync_client=True) as client:
        try:
            while pending or running:
                while pending and len(running) < max_parallel:
                    shard = pending.popleft()
                    name = f"{parent_name} {shard.name}"  # `backfill crm.csv 2026-11-30 shard-00003`
                    try:
                        child = sync_result(
                            run_deployment(
                                deployment_name,
                                parameters=parameters_for(shard),
                                timeout=0,
                                flow_run_name=name,
                                tags=["cleanlist", "backfill-shard"],
                                idempotency_key=f"backfill:{parent_id}:{attempt}:{shard.name}",
                                as_subflow=True,
                            )
                        )
                    except Exception as exc:
                        log.error("%s: could not start a run of %s: %s", shard.name, deployment_name, exc)
                        settled(ShardRun(shard, "", name, "NOT_STARTED", f"{type(exc).__name__}: {exc}"))
                        continue
                    running[str(child.id)] = ShardRun(shard, str(child.id), child.name)
                    log.info(
                        "%s (%d rows, %s) → flow run %s", shard.name, shard.rows, shard.origin, child.name
                    )
                if not running:
                    continue
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
                    settled(record)
                    log.log(
                        logging.INFO if record.ok else logging.ERROR,
                        "%s finished %s%s",
                        record.shard.name,
                        state.name,
                        f": {state.message}" if state.message and not record.ok else "",
                    )
        except BaseException:
            _cancel_children(client, list(running))
            raise
    summaries = _child_summaries([r.flow_run_id for r in finished if r.flow_run_id])
    for record in finished:
        record.summary = summaries.get(record.flow_run_id)
    return sorted(finished, key=lambda r: r.shard.number)


def _cancel_children(client: Any, flow_run_ids: list[str]) -> None:
    """Best effort: runs not started yet are cancelled at once, running ones asked to stop."""
    if not flow_run_ids:
        return
    with contextlib.suppress(Exception):
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(i) for i in flow_run_ids]))
        )
        for run in runs:
            if run.state is None or run.state.is_final():
                continue
            waiting = run.state.is_scheduled() or run.state.is_pending()
            state = Cancelled if waiting else Cancelling
            with contextlib.suppress(Exception):
                client.set_flow_run_state(run.id, state(message="the backfill stopped"), force=True)


def _report(runs: list[ShardRun], totals: dict[str, Any]) -> None:
    table: list[dict[str, Any]] = []
    for run in runs:
        summary = run.summary.as_dict() if run.summary is not None else {}
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


@flow(name="backfill-contacts", flow_run_name=backfill_run_name, log_prints=True, persist_result=False)
# The parameters are the deployment's form in the Prefect UI; validation comes first, then the story.
def backfill_contacts(  # noqa: C901, PLR0913, PLR0917
    source: str,
    output: str,
    shard_rows: int = 50_000,
    sql_query: str | None = None,
    window_start: str | None = None,
    window_end: str | None = None,
    window_days: float | None = None,
    store: str | None = None,
    enrichment_type: EnrichmentType = "partial",
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
    across machines): it also holds the rate budget the children share. At most `max_parallel_shards`
    children run at once; together they stay within `org_rate_limit` (default CLEANLIST_RATE_LIMIT,
    else 60/60), which a lone shard gets all of. `child_parameters` go to every child
    as-is. The run fails, after all shards finished, when any shard failed; a rerun redoes only what the
    store does not already hold.
    """
    log = get_run_logger()
    own_staging = shard_dir is None  # ours to delete once every shard succeeded
    try:
        windows = sql_windows(window_start, window_end, window_days)
        if windows is not None and sql_query is None:
            raise InputError("a window needs sql_query (and a database URL as source)")
        if max_parallel_shards < 1:
            raise InputError(f"max_parallel_shards must be at least 1, got {max_parallel_shards}")
        to_table = table is not None
        if is_database_url(output, what="output") and not to_table:
            raise InputError("output is a database URL: name the table to upsert into with `table`")
        out_dir = None if to_table else absolute_location(output)
        if shard_dir is None and out_dir is None:
            shard_dir = os.path.expanduser(f"~/.cleanlist/backfill-shards/{table}")
            log.warning(
                "staging shards in %s: only workers on this machine can read them; pass shard_dir on "
                "storage every worker shares",
                shard_dir,
            )
        staging = absolute_location(shard_dir) if shard_dir else join_location(out_dir or "", SHARD_DIR_NAME)
        unknown = sorted(set(child_parameters or {}) - set(EnrichOptions.model_fields))
        if unknown:
            raise InputError(f"child_parameters: {', '.join(unknown)} not an enrich-contacts parameter")
        org_limit = str(RateLimit.parse(org_rate_limit or CleanlistSettings().rate_limit))
    except CleanlistError as exc:
        log.error("%s", exc)
        return Failed(message=str(exc), data={"status": "failed", "error": str(exc)})

    try:
        shards = split_source_task(source, staging, out_dir or staging, shard_rows, sql_query, windows)
    except CleanlistError as exc:
        log.error("%s", exc)
        return Failed(message=str(exc), data={"status": "failed", "error": str(exc)})
    if out_dir is not None:
        stale = remove_stale(out_dir, len(shards))
        if stale:
            log.info("removed %d output files of shards this split no longer has", len(stale))
    log.info(
        "%d shards of ≤ %d rows staged in %s; up to %d at a time, sharing %s through the store",
        len(shards),
        shard_rows,
        staging,
        max_parallel_shards,
        org_limit,
    )

    def parameters_for(shard: Shard) -> dict[str, Any]:
        """The child run's parameters, validated as EnrichOptions (only those that differ from defaults)."""
        params: dict[str, Any] = {
            "source": shard.path,
            "output": output if to_table else join_location(out_dir or "", f"{shard.name}.{output_format}"),
            "table": table,
            "enrichment_type": enrichment_type,
            "mapping": mapping,
            "store": store,
            "refresh_days": refresh_days,
            "max_credits": max_credits_per_shard,
            "rate_limit": org_limit,
        }
        given = {key: value for key, value in params.items() if value is not None}
        return EnrichOptions.from_parameters({**given, **(child_parameters or {})}).as_parameters()

    progress_id = sync_result(
        create_progress_artifact(0.0, key="cleanlist-backfill-progress", description="Shards done")
    )
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
            metric: round(sum(float(getattr(r.summary, metric)) for r in runs if r.summary is not None), 6)
            for metric in SHARD_METRICS
        },
        "failed_shards": [r.shard.name for r in failed],
        "rate_limit": org_limit,
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
    if own_staging:
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


__all__ = ["Shard", "backfill_contacts", "split_source", "sql_windows"]
