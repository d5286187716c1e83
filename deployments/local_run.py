"""Running enrich-contacts in this process for a person at a terminal: progress bar, summary, exit code.

Database passwords are kept out of the flow run's parameters (which Prefect stores and shows): when the
PostgreSQL URLs given (source, output, rejects, store) carry one password, every one of them carries it
and PGPASSWORD is not set to another, the URLs are passed without it and libpq finds it in PGPASSWORD,
set for the run only. Otherwise they are passed as given, with a one-line note: a password-less URL
with PGPASSWORD or ~/.pgpass keeps them out.

Stopping (cleanlist/run/stop.py): this process owns SIGTERM and SIGINT while the run goes on; the first
asks the run to stop (exit 130, summary status `interrupted`), a second one exits at once. When no
Prefect server is configured, this process starts the temporary one itself
(`flows/temporary_server.py`): the server is told to end when this process dies, even by SIGKILL, and is
stopped only after Prefect's log
and event workers were drained into it — never before, which left them waiting for good at exit.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from cleanlist_prefect.flows.temporary_server import OwnedTemporaryServer

if TYPE_CHECKING:  # the run's modules (store, SQLAlchemy) load for a run only, not for `sandbox`
    from cleanlist.run.context import Progress

EXIT_OK, EXIT_FAILED, EXIT_AUTH = 0, 1, 2
# Once the run ended and was reported, the process ends within this many seconds even if an at-exit hook
# (Prefect's drains of its workers) hangs.
EXIT_AFTER_RUN_SECONDS = 15.0
DRAIN_SECONDS = 5.0  # each of Prefect's log and event workers, before the temporary server stops
GC_YOUNG_THRESHOLD = 7_000  # allocations between young collections in the CLI (Python: 700)


def error(message: str) -> None:
    print(f"cleanlist-enrich: error: {message}", file=sys.stderr)


class _LatestProgress:
    """The newest progress snapshot of the run (a progress listener; written by the run's threads)."""

    def __init__(self) -> None:
        self.value: Progress | None = None

    def __call__(self, progress: Progress) -> None:
        self.value = progress


def _progress(stop: threading.Event, latest: _LatestProgress) -> None:
    """A progress bar on a terminal, fed by the run's progress listener."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task("enriching", total=None)
        while not stop.wait(0.5):
            progress = latest.value
            if progress is None or not progress.chunks_total:
                continue
            bar.update(
                task,
                total=progress.chunks_total,
                completed=progress.chunks_settled,
                description=f"chunks done ({progress.contacts_sent} contacts sent)",
            )


# The parameters that may be database URLs.
URL_PARAMETERS = ("source", "output", "rejects", "store")


def password_to_environment(kwargs: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(the parameters with the database password taken out of their URLs, that password), when it can
    move to PGPASSWORD; else (the parameters unchanged, None). See the module docstring."""
    from cleanlist.dburl import is_database_url, url_password, without_password

    def postgres(value: object) -> bool:
        return isinstance(value, str) and is_database_url(value) and not value.lower().startswith("sqlite")

    urls = {name: kwargs[name] for name in URL_PARAMETERS if postgres(kwargs.get(name))}
    passwords = {name: url_password(url) for name, url in urls.items()}
    given = set(passwords.values()) - {None}
    if not given:
        return kwargs, None
    store_env = os.environ.get("CLEANLIST_STORE_URL")
    also = [store_env] if "store" not in kwargs and store_env and postgres(store_env) else []
    password = next(iter(given)) if len(given) == 1 else None
    if (
        password is None
        or None in passwords.values()
        or any(url_password(url) != password for url in also)
        or os.environ.get("PGPASSWORD", password) != password
    ):
        print(
            "cleanlist-enrich: note: the database passwords cannot all move to PGPASSWORD (they differ, "
            "a URL has none, or PGPASSWORD is set to another), so they stay in the flow run's parameters; "
            "give password-less URLs with PGPASSWORD or ~/.pgpass to keep them out",
            file=sys.stderr,
        )
        return kwargs, None
    return {**kwargs, **{name: without_password(url) for name, url in urls.items()}}, password


@contextmanager
def pgpassword(password: str | None) -> Iterator[None]:
    """PGPASSWORD set to `password` (when given) while the block runs, as it was afterwards."""
    if password is None:
        yield
        return
    before = os.environ.get("PGPASSWORD")
    os.environ["PGPASSWORD"] = password
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PGPASSWORD", None)
        else:
            os.environ["PGPASSWORD"] = before


def run_enrichment(kwargs: dict[str, Any], *, as_json: bool) -> int:
    """Run the flow in this process and report; the exit code follows the README."""
    from cleanlist.run.stop import StopRequest, arm_deadline, exit_on_signals_with, stop_on_signals

    server: OwnedTemporaryServer | None = None
    stop = StopRequest(announce=True, cleanup=lambda: server.kill() if server is not None else None)
    with stop_on_signals(stop):
        try:
            server = OwnedTemporaryServer.start_if_needed()
            exit_code = _run_and_report(kwargs, stop, as_json=as_json)
        finally:
            drain_prefect_workers()
            if server is not None:
                server.stop()
    # Nothing is left to do: an at-exit hook that hangs must not keep the process alive, and a signal
    # now ends it with the code it was about to end with.
    exit_on_signals_with(exit_code)
    arm_deadline(EXIT_AFTER_RUN_SECONDS, code=exit_code)
    return exit_code


def _run_and_report(kwargs: dict[str, Any], stop_request: Any, *, as_json: bool) -> int:
    from prefect.exceptions import TerminationSignal

    from cleanlist.errors import CleanlistError
    from cleanlist.run.progress import reporting_progress_to
    from cleanlist.run.stop import EXIT_INTERRUPTED, stopping_through
    from cleanlist_prefect.flows.enrich_contacts import enrich_contacts, outcome_of

    # This process is the CLI's own: what is alive now (the modules of Prefect, pandas, pydantic… most
    # of the heap, and none of it garbage) leaves the cyclic collector's care, and the collector runs
    # a tenth as often. Each full collection walked the whole heap: 13 of them were 16 % of a
    # 40,000-contact run's CPU. (Not done by the flow: in a user's process, the collector is theirs.)
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    gc.enable()  # the CLI's commands turn it off while they import (cli.py::_collector_off_until_the_run)
    stop = threading.Event()
    bar = None
    latest = _LatestProgress()
    if sys.stdout.isatty() and not as_json:
        bar = threading.Thread(target=_progress, args=(stop, latest), daemon=True)
        bar.start()
    try:
        parameters, password = password_to_environment(kwargs)
        with stopping_through(stop_request), reporting_progress_to(latest), pgpassword(password):
            state = enrich_contacts(**parameters, return_state=True)
    except CleanlistError as exc:
        error(str(exc))
        return EXIT_FAILED
    except TerminationSignal:
        # SIGTERM while Prefect's engine held the signal, before the flow body took it over: the run had
        # not started (nothing was sent); the CLI's handler has already announced the stop.
        error("stopped (SIGTERM) before the run started: nothing was submitted")
        return EXIT_INTERRUPTED
    finally:
        stop.set()
        if bar is not None:
            bar.join(timeout=2)
    summary, message, exit_code = outcome_of(state)
    if summary:
        _print_summary(summary, as_json=as_json)
    if message:
        error(message)
    return exit_code


def drain_prefect_workers(timeout: float = DRAIN_SECONDS) -> None:
    """Send what Prefect's log and event workers hold while their server is still there (bounded).

    Prefect drains them at exit otherwise (`_QueueServiceBase._at_exit`), without a timeout: after the
    temporary server stopped, that waited for good.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception as exc:  # best effort: the run is over and reported
            print(f"cleanlist-enrich: note: draining {worker.__name__} failed: {exc}", file=sys.stderr)


def _print_summary(summary: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, default=str))
        return
    if set(summary) <= {"status"}:
        return  # a run that failed before counting anything: its one error line says it all
    from cleanlist.vocab import RunStatus

    if summary.get("status") == RunStatus.DRY_RUN.value:
        _print_table(summary)  # a plan, not a run: what it would submit and cost, line by line
        return
    from cleanlist.run.report import report_text
    from cleanlist.run.summary import RunSummary

    print(report_text(RunSummary.model_validate(summary)))


def _print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cleanlist-enrich: {summary.get('status')}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    Console().print(table)
    for line in summary.get("webhook_failure_report") or []:  # why deliveries failed, one line per kind
        print(f"webhooks: {line}")
