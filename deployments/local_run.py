"""Running enrich-contacts in this process for a person at a terminal: progress bar, summary, exit code."""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

from cleanlist.run.context import Progress

EXIT_OK, EXIT_FAILED, EXIT_AUTH = 0, 1, 2


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


def run_enrichment(kwargs: dict[str, Any], *, as_json: bool) -> int:
    """Run the flow in this process and report; the exit code follows the README."""
    from cleanlist.errors import CleanlistError
    from cleanlist.run.progress import reporting_progress_to
    from flows.enrich_contacts import enrich_contacts, outcome_of

    stop = threading.Event()
    bar = None
    latest = _LatestProgress()
    if sys.stdout.isatty() and not as_json:
        bar = threading.Thread(target=_progress, args=(stop, latest), daemon=True)
        bar.start()
    try:
        with reporting_progress_to(latest):
            state = enrich_contacts(**kwargs, return_state=True)
    except CleanlistError as exc:
        error(str(exc))
        return EXIT_FAILED
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


def _print_summary(summary: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cleanlist-enrich: {summary.get('status')}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    Console().print(table)
