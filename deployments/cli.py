"""`cleanlist-enrich`: the command line. It owns the terminal; everything else logs."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_AUTH = 0, 1, 2


def _parse_map(values: Sequence[str] | None) -> dict[str, str] | None:
    if not values:
        return None
    mapping: dict[str, str] = {}
    for item in values:
        field, sep, header = item.partition("=")
        if not sep or not field.strip() or not header.strip():
            raise SystemExit(f"cleanlist-enrich: --map expects field=Header, got {item!r}")
        mapping[field.strip()] = header.strip().strip('"')
    return mapping


def _error(message: str) -> None:
    print(f"cleanlist-enrich: error: {message}", file=sys.stderr)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--enrichment-type",
        default="partial",
        choices=["none", "partial", "phone_only", "full", "prospecting_only"],
    )
    parser.add_argument(
        "--map",
        action="append",
        metavar='FIELD="Header"',
        help="map a source column to a field, e.g. --map first_name=Vorname (repeatable)",
    )
    parser.add_argument("--rejects", help="where invalid rows go (default: <output>.rejects.csv)")
    parser.add_argument("--table", help="with a database URL as --output: the table to upsert into")
    parser.add_argument("--sql", dest="sql_query", help="with a SQLAlchemy URL as SOURCE: the query to read")
    parser.add_argument(
        "--store", help="SQLAlchemy URL of the enrichment store (default ~/.cleanlist/store.db)"
    )
    parser.add_argument(
        "--refresh-days",
        type=float,
        default=30.0,
        help="re-enrich contacts whose stored result is older than this (0 = always)",
    )
    parser.add_argument("--max-credits", type=float, help="never let the run's worst-case spend exceed this")
    parser.add_argument("--dry-run", action="store_true", help="read, prepare and plan; submit nothing")
    parser.add_argument(
        "--webhook-url", help="ask the API to POST results here too (polling stays the truth)"
    )
    parser.add_argument(
        "--credit-recheck-seconds",
        type=float,
        default=60.0,
        help="while paused on 402, how often to re-check the balance",
    )
    parser.add_argument("--pause-timeout-seconds", type=int, default=7 * 24 * 3600)
    parser.add_argument(
        "--rate-limit",
        metavar="N/SECONDS",
        help="the organization's limit per endpoint (default CLEANLIST_RATE_LIMIT, else 60/60)",
    )
    parser.add_argument("--max-concurrent-chunks", type=int, default=8)
    parser.add_argument(
        "--initial-poll-seconds",
        type=float,
        default=5.0,
        help="a generous guess at how long a workflow takes: the first status probe goes out at a quarter "
        "of it, and the poller learns the real figure from there",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")


def _flow_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "source": args.source,
        "output": args.output,
        "enrichment_type": args.enrichment_type,
        "mapping": _parse_map(args.map),
        "rejects": args.rejects,
        "table": args.table,
        "sql_query": args.sql_query,
        "store": args.store,
        "refresh_days": args.refresh_days,
        "max_credits": args.max_credits,
        "dry_run": args.dry_run,
        "webhook_url": args.webhook_url,
        "credit_recheck_seconds": args.credit_recheck_seconds,
        "pause_timeout_seconds": args.pause_timeout_seconds,
        "max_concurrent_chunks": args.max_concurrent_chunks,
        "initial_poll_seconds": args.initial_poll_seconds,
        "rate_limit": args.rate_limit,
    }


def _progress(stop: threading.Event) -> None:
    """A progress bar on a terminal, fed by the in-process run's counters."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tasks.engine import current_engine

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task("enriching", total=None)
        while not stop.wait(0.5):
            engine = current_engine()
            if engine is None or not engine.counters.chunks_total:
                continue
            c = engine.counters
            bar.update(
                task,
                total=c.chunks_total,
                completed=c.workflows_completed + c.chunks_failed,
                description=f"chunks done ({c.submitted} contacts sent)",
            )


def run_enrichment(kwargs: dict[str, Any], *, as_json: bool) -> int:
    """Run the flow in this process and report; the exit code follows the README."""
    from cleanlist.errors import CleanlistError
    from flows.enrich_contacts import enrich_contacts, outcome_of

    stop = threading.Event()
    bar = None
    if sys.stdout.isatty() and not as_json:
        bar = threading.Thread(target=_progress, args=(stop,), daemon=True)
        bar.start()
    try:
        state = enrich_contacts(**kwargs, return_state=True)
    except CleanlistError as exc:
        _error(str(exc))
        return EXIT_FAILED
    finally:
        stop.set()
        if bar is not None:
            bar.join(timeout=2)
    summary, message, exit_code = outcome_of(state)
    if summary:
        _print_summary(summary, as_json=as_json)
    if message:
        _error(message)
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


def cmd_run(args: argparse.Namespace) -> int:
    return run_enrichment(_flow_kwargs(args), as_json=args.json)


def cmd_demo(args: argparse.Namespace) -> int:
    from deployments.demo import run_demo

    return run_demo(output_dir=args.output_dir, as_json=args.json)


def cmd_set_key(args: argparse.Namespace) -> int:
    from tasks.secrets import SECRET_BLOCK, save_api_key

    value = sys.stdin.readline().strip()
    if not value:
        _error('no key on standard input (usage: echo "$KEY" | cleanlist-enrich set-key)')
        return EXIT_FAILED
    save_api_key(value)
    print(f"saved the API key in the Prefect Secret block {SECRET_BLOCK!r}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from deployments.serve import serve_all

    serve_all(limit=args.limit)
    return EXIT_OK


def cmd_automation(args: argparse.Namespace) -> int:
    from deployments.automations import create_credits_automation

    print(create_credits_automation(block_name=args.block))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from cleanlist.sandbox.cli import add_sandbox_parser

    parser = argparse.ArgumentParser(prog="cleanlist-enrich", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="enrich a contact source into an output file or table")
    run.add_argument(
        "source", help="path or fsspec URL (.csv .tsv .parquet .jsonl .xlsx), or a SQLAlchemy URL"
    )
    run.add_argument(
        "--output", "-o", required=True, help="path/URL ending .csv .parquet .jsonl, or a database URL"
    )
    _add_run_options(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="enrich the shipped sample CRM export against a local sandbox")
    demo.add_argument("--output-dir", default="output")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=cmd_demo)

    key = sub.add_parser("set-key", help="store the API key (read from stdin) in the Prefect Secret block")
    key.set_defaults(func=cmd_set_key)

    serve = sub.add_parser("serve", help="serve the enrich-contacts and backfill-contacts deployments")
    serve.add_argument("--limit", type=int, help="most runs at once (backfills need max_parallel_shards + 1)")
    serve.set_defaults(func=cmd_serve)

    automation = sub.add_parser("create-automation", help="notify when a run runs out of credits")
    automation.add_argument("--block", help="name of a notification block to send through")
    automation.set_defaults(func=cmd_automation)

    add_sandbox_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "cleanlist")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:  # the user gets one line, never a traceback
        from cleanlist.errors import CleanlistError

        if isinstance(exc, CleanlistError):
            _error(str(exc))
        else:
            _error(f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
