"""`cleanlist-enrich`: the command line. It owns the terminal; everything else logs."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from cleanlist_prefect.deployments.local_run import EXIT_FAILED, EXIT_OK
from cleanlist_prefect.deployments.local_run import error as _error


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


# Options whose command-line form differs from `--field-name` (SOURCE is positional, OUTPUT has -o).
FLAG_NAMES = {"sql_query": ("--sql",), "output": ("--output", "-o"), "mapping": ("--map",)}
NOT_FLAGS = {"source"}


def _run_option_help(name: str) -> str:
    from cleanlist.run.options import EnrichOptions

    field = EnrichOptions.model_fields[name]
    text = field.description or ""
    if field.default not in (None, False) and not field.is_required():
        text += (
            f" (default {field.default:g})"
            if isinstance(field.default, float)
            else f" (default {field.default})"
        )
    return text


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """One flag per EnrichOptions field, generated from the model (names, choices, help, defaults).

    Flags the user does not give are not passed to the flow, so the flow's defaults (the model's,
    proven equal by tests/test_options.py) apply.
    """
    from typing import get_args

    from cleanlist.run.options import EnrichOptions
    from cleanlist.vocab import EnrichmentType

    for name, field in EnrichOptions.model_fields.items():
        if name in NOT_FLAGS:
            continue
        flags = FLAG_NAMES.get(name, (f"--{name.replace('_', '-')}",))
        common: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _run_option_help(name)}
        if name == "output":
            parser.add_argument(*flags, required=True, dest=name, help=field.description)
        elif name == "mapping":
            parser.add_argument(
                *flags,
                action="append",
                metavar='FIELD="Header"',
                dest=name,
                default=argparse.SUPPRESS,
                help="map a source column to a field, e.g. --map first_name=Vorname (repeatable)",
            )
        elif field.annotation is bool:
            parser.add_argument(*flags, action="store_true", **common)
        elif name == "enrichment_type":
            parser.add_argument(*flags, choices=list(EnrichmentType), **common)
        else:
            kinds = [t for t in (get_args(field.annotation) or (field.annotation,)) if t is not type(None)]
            kind = kinds[0] if kinds and kinds[0] in (int, float) else str
            metavar = {"rate_limit": "N/SECONDS", "storage_options": "JSON"}.get(name)
            parser.add_argument(*flags, type=kind, metavar=metavar, **common)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")


def _flow_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The flow's parameters: SOURCE and every option given on the command line."""
    from cleanlist.run.options import EnrichOptions

    given = {name: getattr(args, name) for name in EnrichOptions.model_fields if hasattr(args, name)}
    if "mapping" in given:
        given["mapping"] = _parse_map(given["mapping"])
    if "storage_options" in given:
        given["storage_options"] = _parse_json_object("--storage-options", given["storage_options"])
    return given


def _parse_json_object(flag: str, text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise SystemExit(
            f'cleanlist-enrich: {flag} expects a JSON object, e.g. {{"endpoint_url": "http://…"}}'
        )
    return value


def _collector_off_until_the_run() -> None:
    """The start of a run imports Prefect, pandas, pydantic…: most of the process's heap, none of it
    garbage, which the cyclic collector walked again and again as it grew (~0.5 s of the ~3 s of CPU a
    CLI run spends before its first row). Off until the run freezes that heap out of the collector's
    care and turns it back on (`local_run._run_and_report`); a command that ends before it just exits."""
    gc.disable()


def cmd_run(args: argparse.Namespace) -> int:
    _collector_off_until_the_run()
    from cleanlist_prefect.deployments.local_run import run_enrichment

    kwargs = _flow_kwargs(args)
    _check_before_prefect_starts(kwargs)
    return run_enrichment(kwargs, as_json=args.json)


def _check_before_prefect_starts(kwargs: dict[str, Any]) -> None:
    """What can be judged without Prefect (options, outputs, the source's type and existence) fails in
    one line now, not after the seconds a temporary Prefect server takes to start. The flow checks it
    all again: deployments and the Python API do not come through here."""
    from cleanlist.io.sources import iter_source
    from cleanlist.run.options import EnrichOptions

    options = EnrichOptions.from_parameters(kwargs)
    if any(str(kwargs.get(name, "")).startswith("block:") for name in ("source", "output", "store")):
        return  # a database block is read inside the run, where Prefect is
    options.check_destinations()
    # Calling (not iterating) makes the up-front checks; nothing is read.
    iter_source(
        options.source, sql_query=options.sql_query, sheet=options.sheet, encoding=options.encoding
    ).close()


def cmd_demo(args: argparse.Namespace) -> int:
    _collector_off_until_the_run()
    from cleanlist_prefect.deployments.demo import run_demo

    return run_demo(output_dir=args.output_dir, as_json=args.json)


def cmd_set_key(args: argparse.Namespace) -> int:
    from cleanlist_prefect.flows.secrets import SECRET_BLOCK, save_api_key, save_credentials

    if args.credentials is None and (args.base_url or args.rate_limit):
        _error(
            "--base-url and --rate-limit are saved in a CleanlistCredentials block: add --credentials NAME"
        )
        return EXIT_FAILED
    value = _read_key()
    if not value:
        _error(
            'no key on standard input (usage: echo "$KEY" | cleanlist-enrich set-key [--credentials NAME])'
        )
        return EXIT_FAILED
    if args.credentials is None:
        save_api_key(value)
        print(f"saved the API key in the Prefect Secret block {SECRET_BLOCK!r}")
        return EXIT_OK
    block = save_credentials(args.credentials, value, base_url=args.base_url, rate_limit=args.rate_limit)
    where = f"base URL {block.base_url or 'from CLEANLIST_BASE_URL'}, "
    where += f"rate limit {block.rate_limit or 'from CLEANLIST_RATE_LIMIT'}"
    print(f"saved the CleanlistCredentials block {args.credentials!r} ({where})")
    return EXIT_OK


def _read_key() -> str:
    """The key from a hidden prompt on a terminal, else the first line of standard input; never argv."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("Cleanlist API key: ").strip()
    return sys.stdin.readline().strip()


def _block_name(value: str) -> str:
    from cleanlist.run.options import check_block_name

    try:
        return check_block_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from cleanlist_prefect.deployments.serve import serve_all

    serve_all(limit=args.limit)
    return EXIT_OK


def cmd_automation(args: argparse.Namespace) -> int:
    from cleanlist_prefect.deployments.automations import create_credits_automation

    print(create_credits_automation(block_name=args.block))
    return EXIT_OK


def cmd_limits(args: argparse.Namespace) -> int:
    """List the rate limits learned from the API's 429s and kept in the store (or clear them)."""
    import time as _time

    from cleanlist.constants import LEARNED_RATE_TTL
    from cleanlist.ratelimit import limit_text
    from cleanlist.settings import CleanlistSettings
    from cleanlist.store import EnrichmentStore

    store = EnrichmentStore(args.store or CleanlistSettings().store_url)
    try:
        if args.clear:
            print(f"cleared {store.forget_rate_limits()} learned rate limit(s) in {store.url_display}")
            return EXIT_OK
        rows = store.learned_rate_limits()
    finally:
        store.close()
    if not rows:
        print("no learned rate limits")
        return EXIT_OK
    now = _time.time()
    for organization, scope, limit, learned_at in rows:
        age = now - learned_at
        state = "expired" if age > LEARNED_RATE_TTL else "a starting point for the next run"
        shown = "organization" if scope == "*" else scope
        print(f"{organization}  {shown} {limit_text(limit)} (learned {age / 60:.0f} min ago; {state})")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """The economics across runs, from the store: per run or per day, with totals and a trend."""
    from cleanlist.run.economics import economics_text, parse_since
    from cleanlist.settings import CleanlistSettings
    from cleanlist.store import EnrichmentStore

    since = None if args.since == "all" else parse_since(args.since)
    store = EnrichmentStore(args.store or CleanlistSettings().store_url)
    try:
        runs = store.run_economics(since, args.source)
        due = store.refresh_due(args.refresh_days)
    finally:
        store.close()
    print(economics_text(runs, by=args.by, since=since, source=args.source, due=due))
    return EXIT_OK
def cmd_worker(args: argparse.Namespace) -> int:
    from cleanlist_prefect.deployments.worker import run_worker

    return run_worker(args.worker_args)


# Listed in `cleanlist-enrich --help` when another command runs (see `build_parser`).
SANDBOX_HELP = "serve a local imitation of the Cleanlist Public API"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; given the `command` about to run, the options of `run` and `sandbox` are
    built only for themselves: they come from pydantic models (EnrichOptions, SandboxConfig) whose
    import costs more than `cleanlist-enrich report`'s own work. Every command is listed either way."""
    from cleanlist_prefect.deployments.receiver import add_receiver_parser

    parser = argparse.ArgumentParser(prog="cleanlist-enrich", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="enrich a contact source into an output file or table")
    if command in (None, "run"):
        run.add_argument("source", help=_run_option_help("source"))
        _add_run_options(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="enrich the shipped sample CRM export against a local sandbox")
    demo.add_argument("--output-dir", default="output")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=cmd_demo)

    key = sub.add_parser(
        "set-key",
        help="store the API key (from stdin, or a hidden prompt) in a CleanlistCredentials block "
        "(--credentials NAME) or the Secret block cleanlist-api-key",
    )
    key.add_argument(
        "--credentials",
        "--name",
        metavar="NAME",
        type=_block_name,
        help="create or update the CleanlistCredentials block NAME (runs pick it with --credentials NAME)",
    )
    key.add_argument("--base-url", help="with --credentials: the organization's API host")
    key.add_argument("--rate-limit", metavar="N/SECONDS", help="with --credentials: its limit per endpoint")
    key.set_defaults(func=cmd_set_key)

    serve = sub.add_parser("serve", help="serve the enrich-contacts and backfill-contacts deployments")
    serve.add_argument("--limit", type=int, help="most runs at once (backfills need max_parallel_shards + 1)")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser(
        "worker",
        help="`prefect worker start ARGS`; SIGTERM stops its flow runs in order first, then the worker",
    )
    worker.add_argument("worker_args", nargs=argparse.REMAINDER, help="arguments of `prefect worker start`")
    worker.set_defaults(func=cmd_worker)

    automation = sub.add_parser("create-automation", help="notify when a run runs out of credits")
    automation.add_argument("--block", help="name of a notification block to send through")
    automation.set_defaults(func=cmd_automation)

    limits = sub.add_parser(
        "limits", help="list the rate limits learned from the API's 429s (or --clear them)"
    )
    limits.add_argument("--store", metavar="URL", help="the enrichment store (default CLEANLIST_STORE_URL)")
    limits.add_argument("--clear", action="store_true", help="forget every learned limit in the store")
    limits.set_defaults(func=cmd_limits)

    report = sub.add_parser(
        "report", help="what runs cost and found, per run or per day, from the store (with totals)"
    )
    report.add_argument("--store", metavar="URL", help="the enrichment store (default CLEANLIST_STORE_URL)")
    report.add_argument(
        "--since", default="30d", help="runs started in this span (30d, 12h, 2w), since a date, or 'all'"
    )
    report.add_argument(
        "--source", metavar="NAME", help="only runs of this source (as shown, or its file name)"
    )
    report.add_argument("--by", choices=("run", "day"), default="run", help="one line per run or per day")
    report.add_argument(
        "--refresh-days",
        type=float,
        default=30.0,
        help="the refresh age runs use, to count contacts coming due (default 30)",
    )
    report.set_defaults(func=cmd_report)

    if command in (None, "sandbox"):
        from cleanlist.sandbox.cli import add_sandbox_parser

        add_sandbox_parser(sub)
    else:
        sub.add_parser("sandbox", help=SANDBOX_HELP)
    add_receiver_parser(sub)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand in `argv` (its first word that is not an option), or None (`--help`, nothing)."""
    return next((word for word in argv if not word.startswith("-")), None)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "cleanlist")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(words))
    args, unknown = parser.parse_known_args(words)
    if args.command == "worker":  # everything after `worker` is `prefect worker start`'s
        args.worker_args = [*unknown, *args.worker_args]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # Outside a run, SIGTERM (a scheduler stopping the job, `kill`) ends the command like Ctrl-C. While a
    # run goes on, `run_enrichment` owns both signals: the first stops the run in order (no new request,
    # those on the wire recorded; exit 130), a second exits at once (cleanlist/run/stop.py).
    signal.signal(signal.SIGTERM, _interrupt)
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
