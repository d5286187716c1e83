"""The `enrich-contacts` flow: source → stage → plan → submit chunks → poll → write. Orchestration only."""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, ParamSpec

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.events import emit_event
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.futures import PrefectFuture, PrefectWrappedFuture
from prefect.input import RunInput
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from cleanlist.client import CleanlistClient
from cleanlist.errors import Action, APIError, CleanlistError, InputError, NotFoundError, policy_for
from cleanlist.models import EnrichmentType, worst_case_credits
from cleanlist.settings import CleanlistSettings
from cleanlist.store import EnrichmentStore
from tasks.credits import CreditWatcher
from tasks.dbsink import is_database_url
from tasks.engine import RunEngine, RunOptions, register, unregister
from tasks.outcomes import result_or_input_error
from tasks.plan import plan_run
from tasks.secrets import resolve_api_key
from tasks.stage import stage_source_task
from tasks.submit import DEFERRED, ChunkOutcome, submit_chunk_task
from tasks.workspace import ERROR, NOT_SUBMITTED, PLANNED, SKIPPED_BUDGET, RunWorkspace
from tasks.write import default_rejects_path, output_format, write_output_task

P = ParamSpec("P")


class RunFailed(CleanlistError):
    """The run could not finish; what arrived was written. `exit_code` 2 = auth/permission, 1 = other."""

    def __init__(self, message: str, *, exit_code: int = 1, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.summary = summary or {}


class CreditsToppedUp(RunInput):
    """Shown in the Prefect UI while the run waits for credits; submit it after topping up."""

    note: str = "Credits were topped up"


def _flow_run_id() -> uuid.UUID | None:
    value = current_flow_run.id
    return uuid.UUID(str(value)) if value else None


def _emit(event: str, payload: dict[str, Any]) -> None:
    run = _flow_run_id()
    resource = {"prefect.resource.id": f"prefect.flow-run.{run}" if run else "cleanlist.run"}
    emit_event(event=event, resource=resource, payload=payload)


def _submit_all(
    engine: RunEngine,
    chunks: list[int],
    *,
    max_concurrent: int,
    retries: int,
    retry_delay_seconds: float,
    credit_recheck_seconds: float,
    pause_timeout_seconds: int,
    progress_id: uuid.UUID | None,
) -> tuple[deque[int], str | None]:
    """Submit chunks through task runs, keeping `max_concurrent` in flight; pause once on 402.

    Returns the chunks never submitted and why ("failed", "budget_reached", "credits_timeout" or None).
    """
    logger = get_run_logger()
    task = submit_chunk_task.with_options(
        retries=retries,
        retry_delay_seconds=exponential_backoff(retry_delay_seconds)(retries) if retries else 0,
    )
    pending: deque[int] = deque(chunks)
    running: dict[PrefectFuture[ChunkOutcome], int] = {}
    # Set by each chunk task as it finishes, so its place is refilled at once. (prefect.futures.wait
    # with a timeout returns only when *every* future is done, and times out with SIGALRM.)
    settled = threading.Event()
    total = max(len(chunks), 1)
    pauses = 0
    last_progress = last_heartbeat = time.monotonic()
    while True:
        if time.monotonic() - last_heartbeat > 30:
            # Claims of a run whose heartbeat is older than the store's lease may be taken over.
            engine.store.heartbeat(engine.run_id)
            last_heartbeat = time.monotonic()
        while pending and len(running) < max_concurrent and engine.gate.open:
            chunk_no = pending[0]
            if not engine.reserve(chunk_no, len(engine.workspace.chunk_keys(chunk_no))):
                break
            pending.popleft()
            future = task.submit(engine.run_id, chunk_no)
            future.add_done_callback(lambda _future: settled.set())
            running[future] = chunk_no
        if not running:
            if not pending:
                return pending, None
            if engine.gate.fatal is not None:
                return pending, "failed"
            if engine.gate.credits_exhausted:
                pauses += 1
                if not _pause_for_credits(
                    engine, pending[0], pauses, credit_recheck_seconds, pause_timeout_seconds
                ):
                    return pending, "credits_timeout"
                continue
            if engine.committed_credits() > engine.counters.credits_spent + 1e-6:
                time.sleep(0.2)  # in-flight workflows may cost less than their worst case
                continue
            return pending, "budget_reached"
        settled.wait(0.5)
        settled.clear()
        for future in [f for f in running if _finished(f)]:
            chunk_no = running.pop(future)
            engine.unreserve(chunk_no)
            try:
                outcome: ChunkOutcome = future.result()
            except APIError as exc:
                if engine.gate.fatal is not None and policy_for(exc) == policy_for(engine.gate.fatal):
                    pending.appendleft(chunk_no)
                    continue
                _chunk_failed(engine, chunk_no, str(exc))
                logger.error("chunk %05d failed: %s", chunk_no, exc)
            except Exception as exc:
                _chunk_failed(engine, chunk_no, f"{type(exc).__name__}: {exc}")
                logger.error("chunk %05d failed: %s: %s", chunk_no, type(exc).__name__, exc)
            else:
                if outcome.status == DEFERRED:
                    pending.appendleft(chunk_no)
        if progress_id is not None and time.monotonic() - last_progress > 1.0:
            last_progress = time.monotonic()
            done_count = total - len(pending) - len(running)
            update_progress_artifact(progress_id, progress=100.0 * done_count / total)


def _finished(future: PrefectFuture[Any]) -> bool:
    if isinstance(future, PrefectWrappedFuture):
        return bool(future.wrapped_future.done())
    return future.state.is_final()


def _chunk_failed(engine: RunEngine, chunk_no: int, reason: str) -> None:
    keys = [
        k
        for k, (state, _) in engine.workspace.states(engine.workspace.chunk_keys(chunk_no)).items()
        if state == PLANNED
    ]
    engine.workspace.set_state(keys, ERROR, reason)
    engine.store.release(engine.run_id, keys, engine.options.enrichment_type)
    engine.counters.chunks_failed += 1


def _pause_for_credits(
    engine: RunEngine, next_chunk: int, pause_no: int, recheck_seconds: float, timeout: int
) -> bool:
    """Pause the flow run (once, from the flow body) until credits return; False on timeout."""
    logger = get_run_logger()
    needed = worst_case_credits(engine.options.enrichment_type, len(engine.workspace.chunk_keys(next_chunk)))
    run_id = _flow_run_id()
    _emit(
        "cleanlist.credits.exhausted",
        {"needed_for_next_chunk": needed, "credits_spent": engine.counters.credits_spent},
    )
    logger.warning(
        "Out of credits (402): submissions paused. Top up; the run resumes by itself when the balance "
        "covers %.0f credits (re-checked every %gs), or click Resume in the Prefect UI.",
        needed,
        recheck_seconds,
    )
    if run_id is None:
        return False
    engine.count(pauses=1)
    watcher = CreditWatcher(engine.client, run_id, needed, recheck_seconds)
    watcher.start()
    try:
        pause_flow_run(
            wait_for_input=CreditsToppedUp,
            timeout=timeout,
            poll_interval=max(1, min(10, int(recheck_seconds))),
            key=f"credits-{pause_no}",
        )
    except FlowPauseTimeout:
        logger.error("still out of credits after %ss; giving up on the remaining chunks", timeout)
        return False
    finally:
        watcher.stop()
    logger.info("resumed after the credit pause; submitting the remaining chunks")
    engine.gate.credits_returned()
    return True


def _failures_as_states(body: Callable[P, dict[str, Any]]) -> Callable[P, dict[str, Any] | State]:
    """A run that cannot finish returns a Failed state with one line and its summary as data.

    Returning the state, rather than raising, is what keeps Prefect from logging a traceback for a
    revoked key or an unreadable source.
    """

    @functools.wraps(body)
    def run(*args: P.args, **kwargs: P.kwargs) -> dict[str, Any] | State:
        try:
            return body(*args, **kwargs)
        except RunFailed as exc:
            get_run_logger().error("%s", exc)
            data = {**exc.summary, "status": exc.summary.get("status", "failed")}
            return Failed(message=str(exc), data={**data, "exit_code": exc.exit_code, "error": str(exc)})
        except CleanlistError as exc:
            get_run_logger().error("%s", exc)
            return Failed(message=str(exc), data={"status": "failed", "exit_code": 1, "error": str(exc)})

    return run


@flow(
    name="enrich-contacts",
    # At least max_concurrent_chunks: submit tasks wait in the rate limiter, and a window's worth of
    # them waiting there is what lets a window's requests go out together.
    task_runner=ThreadPoolTaskRunner(max_workers=32),
    log_prints=True,
    persist_result=False,
)
@_failures_as_states
def enrich_contacts(
    source: str,
    output: str,
    enrichment_type: EnrichmentType = "partial",
    mapping: dict[str, str] | None = None,
    rejects: str | None = None,
    table: str | None = None,
    sql_query: str | None = None,
    store: str | None = None,
    refresh_days: float = 30.0,
    max_credits: float | None = None,
    dry_run: bool = False,
    webhook_url: str | None = None,
    credit_recheck_seconds: float = 60.0,
    pause_timeout_seconds: int = 7 * 24 * 3600,
    poll_timeout_seconds: float = 6 * 3600.0,
    initial_poll_seconds: float = 5.0,
    max_concurrent_chunks: int = 8,
    retries: int = 5,
    retry_delay_seconds: float = 2.0,
    batch_rows: int = 50_000,
    base_url: str | None = None,
    rate_limit: str | None = None,
) -> dict[str, Any]:
    """Enrich every contact of `source` through Cleanlist and write `output` (+ rejects).

    Contacts already enriched within `refresh_days` come from the store; workflows an earlier run left
    in flight are polled, never resubmitted. `max_credits` caps the worst-case spend; `dry_run` only plans.
    A run that cannot finish ends Failed with a one-line message (no traceback) and its summary as data.
    """
    logger = get_run_logger()
    started = time.monotonic()
    if table is None:
        output_format(output)
    elif not is_database_url(output):
        raise InputError(
            f"--table needs a database URL as --output (sqlite:///… or postgresql://…), not {output!r}"
        )
    # A database sink puts rejects in the table NAME_rejects beside it; files go beside the output.
    rejects = rejects or (f"{table}_rejects" if table else default_rejects_path(output))
    settings = CleanlistSettings()
    if base_url:
        settings.base_url = base_url
    if rate_limit:
        settings.rate_limit = rate_limit
    api_key = resolve_api_key(settings)
    flow_run_id = _flow_run_id()
    run_id = str(flow_run_id or uuid.uuid4())
    options = RunOptions(
        enrichment_type=enrichment_type,
        webhook_url=webhook_url,
        refresh_days=refresh_days,
        max_credits=max_credits,
    )
    enrichment_store = EnrichmentStore(store or settings.store_url)
    client = CleanlistClient(api_key, settings=settings)
    workspace = RunWorkspace()
    engine = RunEngine(run_id, client, enrichment_store, workspace, options)
    register(engine)
    params = {
        "source": source,
        "output": output,
        "enrichment_type": enrichment_type,
        "refresh_days": refresh_days,
        "max_credits": max_credits,
        "dry_run": dry_run,
    }
    enrichment_store.start_run(run_id, params, flow_run_id=str(flow_run_id) if flow_run_id else None)
    status = "failed"
    summary: dict[str, Any] = {}
    try:
        _check_key(engine)
        stage = result_or_input_error(
            stage_source_task(run_id, source, mapping, sql_query, batch_rows, return_state=True)
        )
        counters = engine.counters
        counters.rows_read, counters.duplicates = stage.rows_read, stage.duplicates
        counters.unique_contacts = stage.unique_contacts
        logger.info(
            "read %d rows: %d invalid, %d duplicates, %d unique contacts (mapping: %s)",
            stage.rows_read,
            stage.rejected,
            stage.duplicates,
            stage.unique_contacts,
            stage.mapping,
        )
        plan = plan_run(workspace, enrichment_store, enrichment_type, options.fresh_after, options.chunk_size)
        counters.fresh_in_store, counters.resumed_in_flight = plan.fresh, plan.in_flight
        counters.chunks_total = len(plan.chunks)
        logger.info(
            "plan: %d fresh in store, %d in flight from earlier runs, %d to submit in %d chunks",
            plan.fresh,
            plan.in_flight,
            plan.to_submit,
            len(plan.chunks),
        )
        if dry_run:
            summary = _dry_run_report(
                engine, stage.rows_read, stage.rejected, stage.duplicates, plan, output, rejects
            )
            status = "dry_run"
            return summary

        engine.start_poller(initial_estimate=initial_poll_seconds, timeout=poll_timeout_seconds)
        for workflow_id in plan.resume_workflows:
            engine.resume(workflow_id)
        progress_id = create_progress_artifact(0.0, key="cleanlist-progress", description="Chunks settled")
        leftover, stop_reason = _submit_all(
            engine,
            plan.chunks,
            max_concurrent=max_concurrent_chunks,
            retries=retries,
            retry_delay_seconds=retry_delay_seconds,
            credit_recheck_seconds=credit_recheck_seconds,
            pause_timeout_seconds=pause_timeout_seconds,
            progress_id=progress_id,
        )
        assert engine.poller is not None
        if engine.gate.fatal is None:
            engine.poller.wait_idle()
        engine.poller.stop()
        leftover_state = SKIPPED_BUDGET if stop_reason == "budget_reached" else NOT_SUBMITTED
        for chunk_no in leftover:
            engine.workspace.set_state(engine.workspace.chunk_keys(chunk_no), leftover_state)
        update_progress_artifact(progress_id, progress=100.0)

        report = result_or_input_error(write_output_task(run_id, output, rejects, table, return_state=True))
        fatal = engine.gate.fatal or engine.poller.fatal
        if fatal is not None:
            status = "failed"
        elif stop_reason == "credits_timeout":
            status = "credits_exhausted"
        elif stop_reason == "budget_reached":
            status = "budget_reached"
        elif counters.chunks_failed:
            status = "completed_with_errors"
        else:
            status = "completed"
        summary = {
            "status": status,
            "rows_read": counters.rows_read,
            "rejected": report.rejected_rows,
            "duplicates": counters.duplicates,
            "unique_contacts": counters.unique_contacts,
            "fresh_in_store": counters.fresh_in_store,
            "resumed_in_flight": counters.resumed_in_flight,
            "submitted": counters.submitted,
            "quarantined": counters.quarantined,
            "emails_found": counters.emails_found,
            "phones_found": counters.phones_found,
            "credits_spent": counters.credits_spent,
            "chunks": counters.chunks_total,
            "chunks_failed": counters.chunks_failed,
            "workflows": counters.workflows_accepted,
            "status_calls": engine.poller.stats.status_calls,
            "retries": counters.retries,
            "rate_limited": counters.rate_limited,
            "rate_limit": settings.rate_limit,
            "pauses": counters.pauses,
            "row_statuses": report.statuses,
            "rejects_by_reason": report.reject_reasons,
            "output": output if table is None else f"{output}#{table}",
            "rejects": rejects,
            "seconds": round(time.monotonic() - started, 3),
        }
        if counters.rate_limited == 0 and client.limiter.endpoint("enrich-bulk").paced:
            logger.info(
                "the client-side limit %s paced the submissions and the API never answered 429: if the "
                "organization's limit is higher, set CLEANLIST_RATE_LIMIT (or --rate-limit) to it",
                settings.rate_limit,
            )
        create_table_artifact(
            [{"metric": k, "value": str(v)} for k, v in summary.items()],
            key="cleanlist-run-summary",
            description=f"enrich-contacts: {status}",
        )
        create_markdown_artifact(
            _markdown_report(summary), key="cleanlist-run-report", description="Run report"
        )
        if fatal is not None:
            policy = policy_for(fatal)
            exit_code = 2 if policy is not None and policy.action is Action.FAIL_FAST else 1
            _emit("cleanlist.run.failed", summary)
            raise RunFailed(
                f"run stopped: {fatal}; results received so far were written",
                exit_code=exit_code,
                summary=summary,
            )
        if status == "credits_exhausted":
            _emit("cleanlist.run.failed", summary)
            raise RunFailed(
                "run stopped: credits were not topped up before the pause timed out", summary=summary
            )
        _emit("cleanlist.run.completed", summary)
        if status == "completed_with_errors":
            raise RunFailed(
                f"{counters.chunks_failed} chunk(s) failed for good; their rows are marked 'error' "
                "and a rerun retries them",
                summary=summary,
            )
        logger.info("done: %s", summary)
        return summary
    finally:
        if engine.poller is not None:
            engine.poller.stop()
        enrichment_store.finish_run(run_id, status, summary or {})
        unregister(run_id)
        workspace.cleanup()
        client.close()
        enrichment_store.close()


def outcome_of(state: State) -> tuple[dict[str, Any], str | None, int]:
    """(summary, error message, exit code) of a finished enrich-contacts run."""
    data = state.result(raise_on_failure=False)
    summary = dict(data) if isinstance(data, dict) else {}
    if state.is_completed():
        return summary, None, 0
    exit_code = int(summary.pop("exit_code", 1))
    message = summary.pop("error", None) or state.message or "the run failed"
    if isinstance(data, BaseException):
        message = f"{type(data).__name__}: {data}"
    return summary, message, exit_code


def _check_key(engine: RunEngine) -> None:
    """Fail fast on a rejected key or plan before reading a million rows (validate-key is free)."""
    try:
        engine.client.validate_key()
    except APIError as exc:
        policy = policy_for(exc)
        if policy is not None and policy.action is Action.FAIL_FAST:
            raise RunFailed(f"run stopped before submitting anything: {exc}", exit_code=2) from None
        if isinstance(exc, NotFoundError):
            # validate-key always exists: a 404 means the base URL points somewhere else.
            raise RunFailed(
                f"run stopped before submitting anything: {engine.client.base_url} does not serve the "
                f"Cleanlist API (404 on GET /auth/validate-key); check CLEANLIST_BASE_URL"
            ) from None
        get_run_logger().warning("could not validate the API key (%s); going on", exc)


def _markdown_report(summary: dict[str, Any]) -> str:
    """The human-readable end-of-run report shown in the Prefect UI."""
    lines = [
        f"# enrich-contacts: {summary['status']}",
        "",
        "| | |",
        "|---|---|",
        f"| rows read | {summary['rows_read']:,} |",
        f"| rejected | {summary['rejected']:,} |",
        f"| duplicates | {summary['duplicates']:,} |",
        f"| fresh in store (not sent) | {summary['fresh_in_store']:,} |",
        f"| resumed from earlier runs | {summary['resumed_in_flight']:,} |",
        f"| submitted | {summary['submitted']:,} in {summary['workflows']:,} workflows |",
        f"| emails found | {summary['emails_found']:,} |",
        f"| phones found | {summary['phones_found']:,} |",
        f"| credits spent | {summary['credits_spent']:,.2f} |",
        f"| pauses for credits | {summary['pauses']} |",
        f"| retries (429: {summary['rate_limited']}) | {summary['retries']} |",
        f"| duration | {summary['seconds']:,.1f} s |",
        "",
        "## Rejects by reason",
        "",
    ]
    reasons = summary.get("rejects_by_reason") or {}
    lines += [f"- {count:,} × {reason}" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])]
    if not reasons:
        lines.append("none")
    lines += ["", f"Output: `{summary['output']}` — rejects: `{summary['rejects']}`"]
    return "\n".join(lines)


def _dry_run_report(
    engine: RunEngine, rows: int, rejected: int, duplicates: int, plan: Any, output: str, rejects: str
) -> dict[str, Any]:
    key = engine.client.validate_key()
    balance = engine.client.credits_balance().credits
    etype = engine.options.enrichment_type
    report = {
        "status": "dry_run",
        "rows_read": rows,
        "rejected": rejected,
        "duplicates": duplicates,
        "fresh_in_store": plan.fresh,
        "in_flight": plan.in_flight,
        "to_submit": plan.to_submit,
        "chunks": len(plan.chunks),
        "worst_case_credits": plan.worst_case_credits,
        "expected_credits": round(plan.worst_case_credits * _expected_find_share(etype), 2),
        "balance": balance,
        "key_valid": key.valid,
        "output": output,
        "rejects": rejects,
    }
    create_table_artifact(
        [{"metric": k, "value": str(v)} for k, v in report.items()],
        key="cleanlist-dry-run",
        description="enrich-contacts dry run: nothing was submitted",
    )
    return report


def _expected_find_share(enrichment_type: str) -> float:
    """A planning guess of the share of worst case actually charged (failed lookups are free)."""
    return {"none": 0.0, "partial": 0.8, "phone_only": 0.3, "full": 0.35, "prospecting_only": 0.8}.get(
        enrichment_type, 1.0
    )


__all__ = ["CreditsToppedUp", "InputError", "RunFailed", "enrich_contacts"]
