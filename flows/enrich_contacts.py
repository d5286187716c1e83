"""The `enrich-contacts` flow: read → plan → submit → wait → write → report. Orchestration only."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from typing import Any, Final, ParamSpec, TypeVar

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.schemas.objects import State
from prefect.events import emit_event
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Failed

from cleanlist.client import organization_of
from cleanlist.dburl import hide_passwords
from cleanlist.errors import (
    Action,
    APIConnectionError,
    APIError,
    CleanlistError,
    InputError,
    NotFoundError,
    StopRequested,
    policy_for,
)
from cleanlist.ratelimit import RateLimiter
from cleanlist.retry import RetryPolicy
from cleanlist.run.context import RunContext
from cleanlist.run.economics import ECONOMICS_KEY, economics_markdown
from cleanlist.run.incremental import IncrementalRead
from cleanlist.run.journal import AcceptanceJournal
from cleanlist.run.listen import receiving_webhooks
from cleanlist.run.options import TASK_RUNNER_WORKERS, CursorType, EnrichOptions
from cleanlist.run.outage import STORE_ERRORS, APIOutage, StoreLost, WatchedClient, describe_store_error
from cleanlist.run.plan import Plan, plan_run
from cleanlist.run.progress import progress_listener
from cleanlist.run.report import report_markdown
from cleanlist.run.stage import StageReport
from cleanlist.run.stop import (
    EXIT_INTERRUPTED,
    StopRequest,
    stop_on_signals,
    stop_request,
    stop_when_orphaned,
)
from cleanlist.run.summary import EXPECTED_FIND_SHARE, DryRunReport, RunSummary
from cleanlist.run.workspace import RunWorkspace
from cleanlist.store import EnrichmentStore
from cleanlist.vocab import ContactState, EnrichmentType, RunStatus, StopReason
from cleanlist.webhooks.failures import DeliveryLog, likely_cause
from cleanlist_prefect.flows.blocks import resolve_blocks
from cleanlist_prefect.flows.run_names import enrich_run_name
from cleanlist_prefect.flows.secrets import naming_key_source, run_credentials
from cleanlist_prefect.flows.submission import CreditsToppedUp, Submission, SubmitLoop
from cleanlist_prefect.tasks.outcomes import result_or_input_error
from cleanlist_prefect.tasks.prefect_types import sync_result, thread_pool
from cleanlist_prefect.tasks.stage import stage_source_task
from cleanlist_prefect.tasks.write import write_output_task

P = ParamSpec("P")
R = TypeVar("R")
SUMMARY_KEY = "cleanlist-run-summary"
ECONOMICS_DAYS = 30
# Rows with these cleanlist_status values are not settled: a run that leaves any is `incomplete`.
UNSETTLED_ROW_STATUSES = ("pending", "not_submitted")
# The exit code of an `incomplete` run (README, "Exit codes").
INCOMPLETE_EXIT_CODE = 3


class RunFailed(CleanlistError):
    """The run could not finish; what arrived was written. `exit_code` 2 = auth/permission, 1 = other."""

    def __init__(self, message: str, *, exit_code: int = 1, summary: RunSummary | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.summary = summary


def _flow_run_id() -> uuid.UUID | None:
    value = current_flow_run.id
    return uuid.UUID(str(value)) if value else None


def _emit(event: str, payload: dict[str, Any]) -> None:
    run = _flow_run_id()
    resource = {"prefect.resource.id": f"prefect.flow-run.{run}" if run else "cleanlist.run"}
    emit_event(event=event, resource=resource, payload=payload)


def failures_as_states(body: Callable[P, R]) -> Callable[P, R | State]:
    """A run that cannot finish returns a Failed state with one line and its summary as data.

    Returning the state, rather than raising, is what keeps Prefect from logging a traceback for a
    revoked key or an unreadable source.
    """

    @functools.wraps(body)
    def run(*args: P.args, **kwargs: P.kwargs) -> R | State:
        try:
            return body(*args, **kwargs)
        except StopRequested as exc:  # stopped before anything was submitted (reading, planning)
            message = f"stopped before submitting anything ({exc}); nothing was sent; rerun to do it"
            get_run_logger().warning("%s", message)
            data = {"status": RunStatus.INTERRUPTED.value, "exit_code": EXIT_INTERRUPTED, "error": message}
            return Failed(message=message, data=data)
        except RunFailed as exc:
            get_run_logger().error("%s", exc)
            data = exc.summary.as_dict() if exc.summary is not None else {"status": RunStatus.FAILED.value}
            return Failed(message=str(exc), data={**data, "exit_code": exc.exit_code, "error": str(exc)})
        except CleanlistError as exc:
            get_run_logger().error("%s", exc)
            return Failed(message=str(exc), data={"status": "failed", "exit_code": 1, "error": str(exc)})

    return run


@contextmanager
def _store_unreachable_as_one_line(store: EnrichmentStore) -> Iterator[None]:
    """While the run records itself in its store (opening it already says what failed in one line, and
    the rate book falls back to memory): a store that fails stops the run with one line before anything
    is sent, not a traceback (chaos seed 6280223: an outage as the run began)."""
    try:
        yield
    except STORE_ERRORS as exc:
        with contextlib.suppress(Exception):
            store.close()
        raise RunFailed(
            f"run stopped before submitting anything: the enrichment store at {store.url_display} is "
            f"unreachable ({describe_store_error(exc)}); nothing was sent; rerun once it is reachable"
        ) from None


@contextmanager
def open_run(options: EnrichOptions) -> Iterator[RunContext]:
    """The run's context: settings, client, store, workspace; recorded in the store, closed at the end."""
    settings, api_key = run_credentials(
        options.credentials, base_url=options.base_url, rate_limit=options.rate_limit
    )
    flow_run_id = _flow_run_id()
    run_id = str(flow_run_id or uuid.uuid4())
    # SIGTERM/SIGINT stop the run in order (cleanlist/run/stop.py), for the CLI (which hands its stop
    # request over) and any other process (a worker, `serve`, a script). Installed here, in the flow,
    # because Prefect's engine installs its own SIGTERM handler (which raises) when the flow run starts.
    handed_over = stop_request()  # the CLI's: it owns the signals before and after the flow run
    stop = handed_over or StopRequest()
    signals = stop_on_signals(stop, keep_installed=handed_over is not None)
    # A flow run a worker or `serve` started (they set PREFECT__FLOW_RUN_ID for its process) also stops
    # when that process ends: Prefect's process worker does not stop its flow runs when SIGTERM stops it.
    orphaned = stop_when_orphaned(stop) if os.environ.get("PREFECT__FLOW_RUN_ID") else nullcontext()
    store = EnrichmentStore(options.store or settings.store_url)
    journal = AcceptanceJournal(store.url_display)
    # The rate budget is the organization's, shared through the store with every run that uses it.
    # Its slots name the run: a rerun after a kill -9 closes the slots this run left in flight.
    book = store.rate_book(organization_of(settings.base_url, api_key), run_id)
    limiter = RateLimiter(settings.rate, book=book)
    client = WatchedClient(api_key, settings=settings, limiter=limiter)  # its outage watch is the run's
    workspace = RunWorkspace()
    retry = RetryPolicy(
        retries=options.retries, initial_delay=options.retry_delay_seconds, quiet_connection_errors=True
    )
    params = {
        key: _shown(getattr(options, key))
        for key in ("source", "output", "enrichment_type", "refresh_days", "max_credits", "dry_run")
    }
    with _store_unreachable_as_one_line(store):
        store.start_run(run_id, params, flow_run_id=str(flow_run_id) if flow_run_id else None)
        heartbeat = store.keep_alive(run_id)  # the run owns its claims while this beats (store/liveness.py)
    quiet = _ReportedByTheRun(str(flow_run_id) if flow_run_id else None)
    _TASK_RUN_LOGGER.addFilter(quiet)
    run: RunContext | None = None
    try:
        with (
            signals,
            orphaned,
            receiving_webhooks(store, run_id, options, client, _delivery_event) as webhooks,
        ):
            run = RunContext(
                run_id,
                options,
                client=client,
                store=store,
                workspace=workspace,
                retry=retry,
                on_progress=progress_listener(),
                journal=journal,
                stop=stop,
                webhooks=webhooks,
            )
            yield run
    except RunFailed as exc:
        if exc.exit_code != 2:  # 2: the API refused the key or its plan; say which configured key
            raise
        raise RunFailed(naming_key_source(str(exc), api_key), exit_code=2, summary=exc.summary) from None
    except STORE_ERRORS as exc:  # the store failed in the flow body: one line, not a traceback
        if run is None:
            raise RunFailed(f"run stopped: {StoreLost(store.url_display, exc)}") from None
        raise RunFailed(f"run stopped: {run.lose_store(exc)}") from None
    finally:
        heartbeat.stop()
        if run is not None:
            run.stop_poller(drain=False)
        # Only once the requests on the wire were answered (bounded): closing under one loses its answer.
        client.close()
        lost = run.store_lost if run is not None else None
        if lost is None:
            status, summary = run.outcome if run is not None else (RunStatus.FAILED, {})
            if stop.requested and status == RunStatus.FAILED and not summary:
                status, summary = RunStatus.INTERRUPTED, {"status": RunStatus.INTERRUPTED.value}
            with run.store_guard() if run is not None else contextlib.suppress(*STORE_ERRORS):
                store.finish_run(run_id, status, summary)
            if run is not None and run.store_lost is None:
                publish_economics(store, options.refresh_days)
        _TASK_RUN_LOGGER.removeFilter(quiet)
        if (run.store_lost if run is not None else lost) is None:
            journal.forget(run_id)  # its acceptances are in the store; a lost store keeps them for a rerun
        workspace.cleanup()
        store.close()


def publish_economics(store: EnrichmentStore, refresh_days: float) -> None:
    """The keyed `cleanlist-economics` artifact, after each run: the last 30 days by day, so its history
    in the UI is the trend. Best effort: the run is over and recorded; a failure here is one warning."""
    try:
        since = datetime.now(UTC) - timedelta(days=ECONOMICS_DAYS)
        text = economics_markdown(
            store.run_economics(since),
            by="day",
            since=since,
            source=None,
            due=store.refresh_due(refresh_days),
        )
        create_markdown_artifact(text, key=ECONOMICS_KEY, description="Economics across runs (30 days)")
    except Exception as exc:  # the run is recorded; its economics artifact is only a view
        logging.getLogger("cleanlist.run").warning("could not update the economics artifact: %s", exc)


def _delivery_event(workflow_id: str, results: int) -> None:
    """One event per webhook delivery the run picked up, for automations."""
    _emit("cleanlist.webhook.received", {"workflow_id": workflow_id, "results": results})


def _shown(value: Any) -> Any:
    """A parameter or summary value as it may be shown or stored: URL passwords hidden."""
    return hide_passwords(value) if isinstance(value, str) else value


# Prefect logs each failed attempt of a task (a traceback when it gives up) on this logger.
_TASK_RUN_LOGGER = logging.getLogger("prefect.task_runs")


# The tasks whose records `_ReportedByTheRun` may touch: this package's, never a user's own.
OUR_TASKS: Final = frozenset({"stage-source", "submit-chunk", "write-output", "split-source"})


class _ReportedByTheRun(logging.Filter):
    """Keeps Prefect from reporting, per task attempt, what the run reports itself in one line.

    Scoped to the run: it touches only the records of this package's tasks (`OUR_TASKS`) in this run's
    flow run (`flow_run_id`, Prefect's `extra` on each task-run record); every other record (a user's
    own tasks in the flow that calls `enrich_dataframe`, another run's) passes as it came.

    API connection errors are logged by the run's outage watch (once per endpoint per minute) and store
    failures end the run with one line, so Prefect's records of a task attempt failing with one of them
    (its retry line, its traceback, its "Finished in state Failed(…)" line, which quotes the SQL) are
    dropped; any other error of ours keeps its line but loses the traceback (its message is one line).
    """

    def __init__(self, flow_run_id: str | None) -> None:
        super().__init__()
        self.flow_run_id = flow_run_id

    def _ours(self, record: logging.LogRecord) -> bool:
        if getattr(record, "task_name", None) not in OUR_TASKS:
            return False
        return self.flow_run_id is None or getattr(record, "flow_run_id", None) == self.flow_run_id

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._ours(record):
            return True
        if record.exc_info == (None, None, None):
            # Prefect logs a task that *returned* a Failed state with exc_info set outside any exception,
            # which prints a stray "NoneType: None" line under the one-line message.
            record.exc_info, record.exc_text = None, None
        error = _error_of(record)
        if isinstance(error, (APIConnectionError, *STORE_ERRORS)):
            return False
        if isinstance(error, CleanlistError):
            record.exc_info, record.exc_text = None, None
        failed_by = _FAILED_BY.match(record.msg) if isinstance(record.msg, str) else None
        return failed_by is None or failed_by.group(1) not in _REPORTED_BY_THE_RUN


# Prefect's last line of a task run that raised names the exception's class.
_FAILED_BY = re.compile(r"Finished in state Failed\(.Task run encountered an exception (\w+):")


def _class_names(*classes: type[BaseException]) -> frozenset[str]:
    names: set[str] = set()
    for cls in classes:
        names |= {cls.__name__} | _class_names(*cls.__subclasses__())
    return frozenset(names)


_REPORTED_BY_THE_RUN = _class_names(APIConnectionError, *STORE_ERRORS) - {"TimeoutError"}


def _error_of(record: logging.LogRecord) -> BaseException | None:
    if record.exc_info and record.exc_info[1] is not None:
        return record.exc_info[1]
    args = record.args if isinstance(record.args, tuple) else ()
    return next((arg for arg in args if isinstance(arg, BaseException)), None)


@flow(
    name="enrich-contacts",
    flow_run_name=enrich_run_name,  # `enrich crm.csv 2026-11-30`
    # At least max_concurrent_chunks: submit tasks wait in the rate limiter, and a window's worth of
    # them waiting there is what lets a window's requests go out together.
    task_runner=thread_pool(TASK_RUNNER_WORKERS),
    log_prints=True,
    persist_result=False,
)
@failures_as_states
# The parameters are the deployment's form in the Prefect UI and `--param` names: one per EnrichOptions field.
def enrich_contacts(  # noqa: PLR0913, PLR0917
    source: str,
    output: str,
    enrichment_type: EnrichmentType = EnrichmentType.PARTIAL,
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
    not_found_grace_seconds: float = 30.0,
    max_concurrent_chunks: int = 8,
    retries: int = 5,
    retry_delay_seconds: float = 2.0,
    batch_rows: int = 50_000,
    base_url: str | None = None,
    rate_limit: str | None = None,
    sheet: str | None = None,
    encoding: str | None = None,
    raw_csv: bool = False,
    api_outage_seconds: float = 300.0,
    cursor: str | None = None,
    full_refresh: bool = False,
    cursor_type: CursorType = "auto",
    credentials: str | None = None,
    storage_options: dict[str, Any] | None = None,
    storage_credentials: str | None = None,
    webhook_listen: str | None = None,
    webhook_grace_seconds: float = 0.5,
    webhook_allow: str | None = None,
    webhook_tls_cert: str | None = None,
    webhook_tls_key: str | None = None,
    webhook_retry_scale: float = 1.0,
) -> RunSummary | DryRunReport:
    """Enrich every contact of `source` through Cleanlist and write `output` (+ rejects).

    Contacts already enriched within `refresh_days` come from the store; workflows an earlier run left
    in flight are polled, never resubmitted. `max_credits` caps the worst-case spend; `dry_run` only plans.
    A run that cannot finish ends Failed with a one-line message (no traceback) and its summary as data.
    Every parameter is described in `cleanlist.run.options.EnrichOptions`.
    """
    options = EnrichOptions.from_parameters(dict(locals()))
    options = resolve_blocks(options)  # database URLs and storage credentials from blocks, in memory only
    options.check_destinations()
    started = time.monotonic()
    with open_run(options) as run:
        check_key(run)
        incremental = IncrementalRead.open(run.store, options)
        stage = read(run, incremental)
        _stop_if_requested(run, "while reading the source")
        plan = plan_submissions(run)
        _stop_if_requested(run, "while planning")
        if options.dry_run:
            return report_dry_run(run, stage, plan)
        submission = submit(run, plan)
        wait_for_results(run)
        return write_and_report(run, submission, started, incremental)


def _stop_if_requested(run: RunContext, when: str) -> None:
    """Before anything is submitted a stop ends the run here: nothing was sent, nothing to write."""
    if run.stop.requested:
        raise StopRequested(f"{run.stop.reason} {when}")


def check_key(run: RunContext) -> None:
    """Fail fast on a rejected key or plan before reading a million rows (validate-key is free)."""
    try:
        run.client.validate_key()
    except APIError as exc:
        policy = policy_for(exc)
        if policy is not None and policy.action is Action.FAIL_FAST:
            raise RunFailed(f"run stopped before submitting anything: {exc}", exit_code=2) from None
        if isinstance(exc, NotFoundError):
            # validate-key always exists: a 404 means the base URL points somewhere else.
            raise RunFailed(
                f"run stopped before submitting anything: {run.client.base_url} does not serve the "
                f"Cleanlist API (404 on GET /auth/validate-key); check CLEANLIST_BASE_URL"
            ) from None
        get_run_logger().warning("could not validate the API key (%s); going on", exc)


def read(run: RunContext, incremental: IncrementalRead | None = None) -> StageReport:
    """Read, prepare and stage the source (the stage-source task); with a cursor, only rows past its mark."""
    cursor = incremental.cursor_filter() if incremental is not None else None
    stage: StageReport = result_or_input_error(
        stage_source_task(run.options, run.workspace, cursor, run.stop.event, return_state=True)
    )
    if incremental is not None:
        incremental.read(stage.cursor_seen, stage.skipped_by_cursor)
        get_run_logger().info(
            "cursor %s: read rows past %s; %d rows left out (handled by earlier runs)",
            incremental.column,
            incremental.used.text if incremental.used is not None else "(no mark: every row)",
            stage.skipped_by_cursor,
        )
    counters = run.counters
    counters.rows_read, counters.duplicates = stage.rows_read, stage.duplicates
    counters.unique_contacts = stage.unique_contacts
    get_run_logger().info(
        "read %d rows: %d invalid, %d duplicates, %d unique contacts (mapping: %s)",
        stage.rows_read,
        stage.rejected,
        stage.duplicates,
        stage.unique_contacts,
        stage.mapping,
    )
    return stage


def plan_submissions(run: RunContext) -> Plan:
    """Record what dead runs were told (the acceptance journal), classify every contact against the
    store, and chunk what is left to send."""
    options = run.options
    replay = run.replay_journal()
    if replay.recorded or replay.in_doubt:
        get_run_logger().warning(
            "an earlier run on this machine was killed while submitting: %d accepted workflow(s) it had not "
            "recorded are recorded now; %d request(s) (%d contacts) may have been accepted and cannot be "
            "checked (no idempotency key): counted as ambiguous submissions",
            replay.recorded,
            replay.in_doubt,
            replay.in_doubt_contacts,
        )
    plan = plan_run(
        run.workspace,
        run.store,
        options.enrichment_type,
        options.fresh_after,
        options.chunk_size,
        settle=run.settle_unresolved,
    )
    run.counters.fresh_in_store, run.counters.resumed_in_flight = plan.fresh, plan.in_flight
    run.counters.chunks_total = len(plan.chunks)
    get_run_logger().info(
        "plan: %d fresh in store, %d in flight from earlier runs, %d to submit in %d chunks",
        plan.fresh,
        plan.in_flight,
        plan.to_submit,
        len(plan.chunks),
    )
    if plan.resolved or plan.forgotten:
        get_run_logger().info(
            "owed by earlier runs: %d answered by task id now, %d unknown to the API (submitted again)",
            plan.resolved,
            plan.forgotten,
        )
    return plan


def submit(run: RunContext, plan: Plan) -> Submission:
    """Poll what earlier runs left in flight, submit every chunk; leftover chunks get their row state."""
    run.start_poller()
    for workflow_id in plan.resume_workflows:
        run.resume(workflow_id)
    progress_id = sync_result(
        create_progress_artifact(0.0, key="cleanlist-progress", description="Chunks settled")
    )
    loop = SubmitLoop(run, plan.chunks, flow_run_id=_flow_run_id(), progress_id=progress_id, emit=_emit)
    submission = loop.run_to_end()
    state = (
        ContactState.SKIPPED_BUDGET
        if submission.stop is StopReason.BUDGET_REACHED
        else ContactState.NOT_SUBMITTED
    )
    for chunk_no in submission.leftover:
        run.workspace.set_state(run.workspace.chunk_keys(chunk_no), state)
    update_progress_artifact(progress_id, progress=100.0)
    return submission


def wait_for_results(run: RunContext) -> None:
    """Wait until every accepted workflow is settled, or the API has been silent for the outage bound
    (not after a 401/403 or a lost store: nothing more will come; not after a stop request: the
    workflows are recorded, and the next run polls them)."""
    run.stop_poller(drain=run.gate.fatal is None and not run.stop.requested)


def write_and_report(
    run: RunContext, submission: Submission, started: float, incremental: IncrementalRead | None = None
) -> RunSummary:
    """Write output and rejects, build the summary, report it; raise RunFailed for a failed run.

    Without its store (lost mid-run) the run can write nothing: it stops with that one line. The
    source's cursor mark advances only here, after a run that completed.
    """
    options = run.options
    if run.store_lost is not None:
        _emit("cleanlist.run.failed", {"status": RunStatus.FAILED.value, "error": str(run.store_lost)})
        raise RunFailed(f"run stopped: {run.store_lost}")
    report = result_or_input_error(
        write_output_task(
            options,
            run.workspace,
            run.store,
            options.output,
            options.rejects_target,
            options.table,
            return_state=True,
        )
    )
    fatal = run.fatal
    counters = run.counters
    # Rows nobody settled in this run: held by another live run, or accepted with no answer yet.
    unsettled_rows = sum(report.statuses.get(word, 0) for word in UNSETTLED_ROW_STATUSES)
    # A stop after the last chunk went out still leaves workflows unanswered, or task lookups cut short
    # (contacts paid for and unresolved, which waiting out a Retry-After would have fetched): the run did
    # not complete, and a scheduler must see 130, not 0 (chaos seed 1266472: "completed", no rerun, the
    # answers of 26 paid contacts never read).
    unresolved = run.workspace.count(ContactState.UNRESOLVED)
    outstanding = run.poller is not None and run.poller.outstanding > 0
    stopped = run.stop.requested and (bool(submission.leftover) or outstanding or unresolved > 0)
    status = RunStatus.after_submitting(
        fatal=fatal is not None,
        stop=StopReason.STOPPED if stopped else submission.stop,
        chunks_failed=counters.chunks_failed,
        unknown_to_api=counters.unknown_to_api,
        unsettled_rows=unsettled_rows,
    )
    summary = RunSummary(
        status=status,
        rows_read=counters.rows_read,
        rejected=report.rejected_rows,
        duplicates=counters.duplicates,
        unique_contacts=counters.unique_contacts,
        fresh_in_store=counters.fresh_in_store,
        resumed_in_flight=counters.resumed_in_flight,
        submitted=counters.submitted,
        quarantined=counters.quarantined,
        emails_found=counters.emails_found,
        phones_found=counters.phones_found,
        credits_spent=counters.credits_spent,
        chunks=counters.chunks_total,
        chunks_failed=counters.chunks_failed,
        workflows=counters.workflows_accepted,
        status_calls=run.poller.stats.status_calls if run.poller is not None else 0,
        retries=counters.retries,
        rate_limited=counters.rate_limited,
        rate_limit=str(run.client.rate_limit),
        rate_limits_learned=run.client.limiter.learned_limits(),
        learned_limits=run.client.limiter.pacing_note(),
        pauses=counters.pauses,
        unresolved=unresolved,
        task_lookups=counters.task_lookups,
        ambiguous_submissions=counters.ambiguous_submissions,
        ambiguous_contacts=counters.ambiguous_contacts,
        unsettled_rows=unsettled_rows,
        held_by_other_runs=run.workspace.count(ContactState.HELD),
        awaiting_answers=sum(
            run.workspace.count(state) for state in (ContactState.ACCEPTED, ContactState.IN_FLIGHT)
        ),
        row_statuses=report.statuses,
        rejects_by_reason=report.reject_reasons,
        output=_shown(options.output if options.table is None else f"{options.output}#{options.table}"),
        rejects=_shown(options.rejects_target),
        seconds=round(time.monotonic() - started, 3),
        **(incremental.summary_fields(completed=status is RunStatus.COMPLETED) if incremental else {}),
        **_webhook_counts(run),
        enrichment_type=options.enrichment_type,
        credit_cap=options.max_credits,
        balance_left=run.balance_left(),
    )
    run.outcome = (status, summary.as_dict())
    _hint_if_paced(run)
    _report_delivery_failures(run)
    create_table_artifact(summary.table_rows(), key=SUMMARY_KEY, description=f"enrich-contacts: {status}")
    create_markdown_artifact(report_markdown(summary), key="cleanlist-run-report", description="Run report")
    _raise_unless_completed(summary, fatal, unknown_to_api=counters.unknown_to_api, reason=run.stop.reason)
    if incremental is not None and status is RunStatus.COMPLETED:
        incremental.advance(run.store, run.run_id)
    get_run_logger().info("done: %s", summary.as_dict())
    return summary


def _webhook_counts(run: RunContext) -> dict[str, Any]:
    stats = run.poller.stats if run.poller is not None else None
    if stats is None:
        return {}
    counts: dict[str, Any] = {
        "webhook_deliveries": stats.deliveries,
        "status_calls_saved": stats.status_calls_saved,
        "webhook_fallbacks": stats.fallbacks,
    }
    log: DeliveryLog | None = run.delivery_failures
    if log is not None:
        counts |= {
            "deliveries_log_calls": log.calls,
            "webhook_failures": log.counts(),
            "webhook_failed_for_good": log.failed_for_good,
            "webhook_failure_report": log.lines(),
        }
    return counts


def _report_delivery_failures(run: RunContext) -> None:
    """Say why deliveries failed, once per kind: a log line and a `cleanlist.webhook.failed` event."""
    log: DeliveryLog | None = run.delivery_failures
    if log is None:
        return
    counts = log.counts()
    for line, (kind, count) in zip(log.lines(), counts.items(), strict=False):
        get_run_logger().warning("webhooks: %s", line)
        _emit(
            "cleanlist.webhook.failed",
            {"run_id": run.run_id, "kind": kind, "count": count, "cause": likely_cause(kind), "line": line},
        )


def _hint_if_paced(run: RunContext) -> None:
    if run.counters.rate_limited == 0 and run.client.limiter.endpoint("enrich-bulk").paced:
        get_run_logger().info(
            "the client-side limit %s paced the submissions and the API never answered 429: if the "
            "organization's limit is higher, set CLEANLIST_RATE_LIMIT (or --rate-limit) to it",
            str(run.client.rate_limit),
        )


def _interrupted_message(summary: RunSummary, reason: str | None) -> str:
    statuses = summary.row_statuses
    pending, unsent = statuses.get("pending", 0), statuses.get("not_submitted", 0)
    return (
        f"stopped ({reason or 'on request'}): the requests on the wire were answered and recorded; "
        f"results received so far were written; {pending} row(s) accepted and not yet answered (pending), "
        f"{unsent} not submitted; rerun to finish ({summary.ambiguous_submissions} request(s) in doubt)"
    )


def _raise_unless_completed(
    summary: RunSummary, fatal: CleanlistError | None, *, unknown_to_api: int, reason: str | None = None
) -> None:
    """Emit the run's event; raise RunFailed (one line, the summary as data) unless it completed."""
    payload = summary.as_dict()
    if summary.status is RunStatus.INTERRUPTED:
        _emit("cleanlist.run.failed", payload)
        raise RunFailed(_interrupted_message(summary, reason), exit_code=EXIT_INTERRUPTED, summary=summary)
    if isinstance(fatal, APIOutage):
        _emit("cleanlist.run.failed", payload)
        raise RunFailed(f"{fatal}; results received so far were written; rerun to finish", summary=summary)
    if fatal is not None:
        policy = policy_for(fatal)
        exit_code = 2 if policy is not None and policy.action is Action.FAIL_FAST else 1
        _emit("cleanlist.run.failed", payload)
        raise RunFailed(
            f"run stopped: {fatal}; results received so far were written",
            exit_code=exit_code,
            summary=summary,
        )
    if summary.status is RunStatus.CREDITS_EXHAUSTED:
        _emit("cleanlist.run.failed", payload)
        raise RunFailed("run stopped: credits were not topped up before the pause timed out", summary=summary)
    if summary.status is RunStatus.INCOMPLETE:
        _emit("cleanlist.run.failed", payload)
        raise RunFailed(_incomplete_line(summary), exit_code=INCOMPLETE_EXIT_CODE, summary=summary)
    _emit("cleanlist.run.completed", payload)
    if summary.status is RunStatus.COMPLETED_WITH_ERRORS:
        problems = []
        if summary.chunks_failed:
            problems.append(
                f"{summary.chunks_failed} chunk(s) failed for good; their rows are marked 'error' "
                "and a rerun retries them"
            )
        if unknown_to_api:
            problems.append(
                f"{unknown_to_api} contacts of workflows the API no longer knows are unresolved; "
                "a rerun asks for them by task id"
            )
        raise RunFailed("; ".join(problems), summary=summary)


def _incomplete_line(summary: RunSummary) -> str:
    """Why an incomplete run is not completed, in one line: how many rows, and what holds them."""
    return (
        f"run incomplete: {summary.unsettled_rows} row(s) are still pending "
        f"({summary.held_by_other_runs} contact(s) held by another live run that has not submitted them, "
        f"{summary.awaiting_answers} accepted by the API with no answer yet); results received so far "
        "were written and the cursor mark was not moved; rerun to finish them"
    )


def report_dry_run(run: RunContext, stage: StageReport, plan: Plan) -> DryRunReport:
    """What the run would submit and cost, with the balance to pay for it; nothing is sent."""
    options = run.options
    key = run.client.validate_key()
    report = DryRunReport(
        rows_read=stage.rows_read,
        rejected=stage.rejected,
        duplicates=stage.duplicates,
        fresh_in_store=plan.fresh,
        in_flight=plan.in_flight,
        to_submit=plan.to_submit,
        chunks=len(plan.chunks),
        worst_case_credits=plan.worst_case_credits,
        expected_credits=round(
            plan.worst_case_credits * EXPECTED_FIND_SHARE.get(options.enrichment_type, 1.0), 2
        ),
        balance=run.client.credits_balance().credits,
        key_valid=key.valid,
        output=_shown(options.output),
        rejects=_shown(options.rejects_target),
    )
    run.outcome = (RunStatus.DRY_RUN, report.as_dict())
    create_table_artifact(
        report.table_rows(),
        key="cleanlist-dry-run",
        description="enrich-contacts dry run: nothing was submitted",
    )
    return report


def outcome_of(state: State) -> tuple[dict[str, Any], str | None, int]:
    """(summary as JSON-compatible data, error message, exit code) of a finished enrich-contacts run."""
    data = state.result(raise_on_failure=False)
    if isinstance(data, RunSummary | DryRunReport):
        return data.as_dict(), None, 0
    summary = dict(data) if isinstance(data, dict) else {}
    if state.is_completed():
        return summary, None, 0
    exit_code = int(summary.pop("exit_code", 1))
    message = summary.pop("error", None) or state.message or "the run failed"
    if isinstance(data, BaseException):
        message = f"{type(data).__name__}: {data}"
    return summary, message, exit_code


__all__ = ["CreditsToppedUp", "InputError", "RunFailed", "enrich_contacts", "outcome_of"]
