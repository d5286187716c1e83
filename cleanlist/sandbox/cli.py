"""The `sandbox` subcommand: serve a local Cleanlist API in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, get_args

from pydantic import ValidationError

from cleanlist.sandbox.config import (
    API_KEY_PREFIX,
    DEFAULT_SANDBOX_KEY,
    ENDPOINTS,
    BulkTaskIds,
    DeliveriesFields,
    DeliveriesList,
    DeliveriesOrder,
    Endpoint,
    ErrorEnvelope,
    FaultSpec,
    RateScope,
    ResultsOrder,
    SandboxConfig,
)

FAULT_HELP = (
    "inject failures into ENDPOINT (one of: " + ", ".join(ENDPOINTS) + "). SPEC is one of: "
    "'rate:FRACTION[:STATUS]' answers that share of requests (seeded) with STATUS (default 503); "
    "'seq:STATUS,STATUS,...' answers the next requests with these statuses in order; "
    "'retry-after:SECONDS' sets the Retry-After of injected 429s (default 1). "
    "Statuses: 429, 500, 502, 503, 504. Repeat the option to combine, e.g. "
    "--fault enrich-bulk=seq:503,503,500,429 --fault enrich-bulk=rate:0.1:503"
)


def _rate_limit(text: str) -> tuple[int, float] | None:
    if text.lower() in ("off", "none"):
        return None
    requests, sep, seconds = text.partition("/")
    try:
        limit = (int(requests), float(seconds))
    except ValueError:
        limit = (0, 0.0)
    if not sep or limit[0] < 1 or limit[1] <= 0:
        raise argparse.ArgumentTypeError(f"expected N/SECONDS like 60/60 or 20/2 (or 'off'), got {text!r}")
    return limit


def _latency(text: str) -> float | tuple[float, float]:
    low, sep, high = text.partition("-")
    try:
        value: float | tuple[float, float] = (float(low), float(high)) if sep else float(low)
        return SandboxConfig(latency=value).latency
    except (ValueError, ValidationError):
        raise argparse.ArgumentTypeError(f"expected SECONDS or MIN-MAX like 0.5-1.5, got {text!r}") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a factor >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _results_limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 250:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 250, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return value


def _credits(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a balance >= 0, got {text!r}")
    return value


def _word(text: str) -> str:
    if not text or text != text.strip():
        raise argparse.ArgumentTypeError(f"expected a status word like failed or finished, got {text!r}")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _substring(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected a non-empty substring")
    return text


def _api_key(text: str) -> str:
    if not text.startswith(API_KEY_PREFIX) or len(text) == len(API_KEY_PREFIX):
        raise argparse.ArgumentTypeError(f"an API key starts with {API_KEY_PREFIX!r}")
    return text


def _fault(text: str) -> tuple[Endpoint, dict[str, Any]]:
    """Parse ENDPOINT=SPEC into the endpoint and the FaultSpec fields it sets."""
    endpoint, sep, spec = text.partition("=")
    if not sep or endpoint not in get_args(Endpoint):
        raise argparse.ArgumentTypeError(
            f"expected ENDPOINT=SPEC with ENDPOINT one of {', '.join(ENDPOINTS)}"
        )
    kind, _, rest = spec.partition(":")
    fields: dict[str, Any]
    try:
        if kind == "rate":
            share, _, status = rest.partition(":")
            fields = {"rate": float(share), **({"status": int(status)} if status else {})}
        elif kind == "seq":
            fields = {"sequence": tuple(int(status) for status in rest.split(","))}
        elif kind == "retry-after":
            fields = {"retry_after": int(rest)}
        else:
            raise ValueError(kind)
        FaultSpec(**fields)
    except (ValueError, ValidationError):
        raise argparse.ArgumentTypeError(
            f"bad fault spec {spec!r}: use rate:FRACTION[:STATUS], seq:STATUS,... or retry-after:SECONDS"
        ) from None
    return endpoint, fields  # type: ignore[return-value]  # narrowed by the membership test above


def add_sandbox_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `sandbox` on the main CLI's subparsers."""
    parser = subparsers.add_parser(
        "sandbox",
        help="serve a local imitation of the Cleanlist Public API",
        description="Serve a local, deterministic imitation of the Cleanlist Public API (v1) until Ctrl-C. "
        "Admin controls live under /_sandbox "
        "(credits, keys, faults, refused contacts, counters, request log, forget). "
        "The 'unpublished behaviour' options play the readings of the API the docs leave open; "
        "each defaults to the documented one.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8787, help="port to listen on (default: 8787)")
    parser.add_argument(
        "--api-key",
        type=_api_key,
        metavar="KEY",
        default=os.environ.get("CLEANLIST_SANDBOX_API_KEY") or DEFAULT_SANDBOX_KEY,
        help="the key to accept (default: $CLEANLIST_SANDBOX_API_KEY, which keeps it out of `ps`, else the "
        "documented sandbox key)",
    )
    parser.add_argument(
        "--credits", type=_credits, metavar="N", default=10_000.0, help="starting balance (default: 10000)"
    )
    parser.add_argument(
        "--rate-limit",
        type=_rate_limit,
        default=(60, 60.0),
        metavar="N/SECONDS",
        help="requests per fixed window, per organization and endpoint (see --rate-scope) "
        "(default: 60/60; 'off' disables)",
    )
    parser.add_argument(
        "--latency",
        type=_latency,
        default=1.0,
        metavar="SECONDS|MIN-MAX",
        help="time from acceptance to completion, fixed or drawn per workflow (default: 1)",
    )
    parser.add_argument(
        "--find-rate", type=_fraction, metavar="F", default=0.8, help="share of emails found (default: 0.8)"
    )
    parser.add_argument(
        "--phone-rate", type=_fraction, metavar="F", default=0.3, help="share of phones found (default: 0.3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for latency draws and random faults")
    parser.add_argument(
        "--no-api-access-key",
        type=_api_key,
        action="append",
        default=[],
        metavar="KEY",
        help="a key whose plan lacks API access (answered with 403); repeatable",
    )
    parser.add_argument(
        "--revoke-after-batches",
        type=_positive_int,
        default=None,
        metavar="N",
        help="revoke a key after it has had N bulk batches accepted",
    )
    parser.add_argument(
        "--refuse-contacts-containing",
        type=_substring,
        action="append",
        default=[],
        metavar="S",
        help="test facility: answer 422 (the documented field-rule item) for every contact with a value "
        "containing S, like stricter server-side validation; repeatable",
    )
    parser.add_argument(
        "--webhook-backoff-scale",
        type=_scale,
        default=1.0,
        metavar="F",
        help="multiply the 1, 2, 4, 8 s webhook retry waits by F (default: 1)",
    )
    parser.add_argument(
        "--webhook-ca-file",
        metavar="PEM",
        help="test facility: also trust these certificates for https deliveries, e.g. a receiver's "
        "self-signed one (default: publicly trusted certificates only)",
    )
    parser.add_argument(
        "--webhook-drop-rate",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="test facility: never send this share of webhooks (seeded per workflow; default: 0)",
    )
    parser.add_argument(
        "--webhook-results-limit",
        type=_results_limit,
        default=250,
        metavar="N",
        help="test facility: carry at most N results per webhook, the rest truncated (default: 250)",
    )
    parser.add_argument(
        "--webhook-fail-rate",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="test facility: answer 502 for this share of delivery attempts, as a proxy in front of the "
        "receiver would (seeded; default: 0)",
    )
    parser.add_argument(
        "--webhook-down-seconds",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="test facility: refuse every delivery attempt for S seconds after the first accepted bulk "
        "request, as a receiver that is down (default: 0)",
    )
    parser.add_argument(
        "--webhook-delay",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="test facility: wait S seconds after completion before the first webhook attempt (default: 0)",
    )
    parser.add_argument(
        "--bulk-answer-delay",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="test facility: hold each bulk answer back S seconds after the request was judged (default: 0)",
    )
    parser.add_argument(
        "--fault", type=_fault, action="append", default=[], metavar="ENDPOINT=SPEC", help=FAULT_HELP
    )
    _add_variation_options(
        parser.add_argument_group("unpublished behaviour (defaults: the documented reading)")
    )
    parser.set_defaults(func=run_sandbox_command, sandbox_parser=parser)


def _add_variation_options(group: argparse._ArgumentGroup) -> None:
    """One flag per SandboxConfig variation field (cleanlist/sandbox/state.py says what each plays)."""
    group.add_argument(
        "--deliveries-list",
        choices=get_args(DeliveriesList),
        default="deliveries",
        help="where the webhook deliveries log keeps its rows (default: deliveries)",
    )
    group.add_argument(
        "--deliveries-fields",
        choices=get_args(DeliveriesFields),
        default="documented",
        help="field names of the deliveries log's rows (default: documented)",
    )
    group.add_argument(
        "--deliveries-order",
        choices=get_args(DeliveriesOrder),
        default="oldest_first",
        help="row order of the deliveries log (default: oldest_first)",
    )
    group.add_argument(
        "--results-order",
        choices=get_args(ResultsOrder),
        default="input",
        help="order of workflow-mode results: contact order, or shuffled (seeded) (default: input)",
    )
    group.add_argument(
        "--omit-task-rate",
        type=_fraction,
        metavar="F",
        default=0.0,
        help="share of tasks left out of workflow-mode results (still in the summary, charged, and "
        "answered by task_id) (default: 0)",
    )
    group.add_argument(
        "--unknown-task-rate",
        type=_fraction,
        metavar="F",
        default=0.0,
        help="share of tasks unknown for good: never listed, 404 by task_id, not charged (default: 0)",
    )
    group.add_argument(
        "--bulk-task-ids",
        choices=get_args(BulkTaskIds),
        default="listed",
        help="the bulk answer's task_ids: one per contact, no key at all, or one fewer (default: listed)",
    )
    group.add_argument(
        "--final-word",
        type=_word,
        metavar="WORD",
        default="completed",
        help="status a --final-word-rate share of workflows ends with; failed/cancelled ones list no "
        "results and cost nothing (default: completed)",
    )
    group.add_argument(
        "--final-word-rate",
        type=_fraction,
        metavar="F",
        default=0.0,
        help="share of workflows (seeded) ending with --final-word (default: 0)",
    )
    group.add_argument(
        "--error-envelope",
        choices=get_args(ErrorEnvelope),
        default="detail",
        help="error bodies as {'detail': ...} (documented) or {'error': {'code', 'message'}} with "
        "insufficient credits as 400 (default: detail)",
    )
    group.add_argument(
        "--retry-after-ms",
        action="store_true",
        help="429s also carry a retry-after-ms header (milliseconds)",
    )
    group.add_argument(
        "--rate-scope",
        choices=get_args(RateScope),
        default="endpoint",
        help="one rate window per organization per endpoint, or one per organization for all "
        "endpoints (default: endpoint)",
    )
    group.add_argument(
        "--workflow-visible-after",
        type=_seconds,
        metavar="SECONDS",
        default=0.0,
        help="workflow-mode status answers 404 for this long after acceptance; task mode answers "
        "(default: 0)",
    )


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    """Build the sandbox config from parsed options; raises ValidationError on impossible combinations."""
    faults: dict[Endpoint, dict[str, Any]] = {}
    for endpoint, fields in args.fault:
        faults.setdefault(endpoint, {}).update(fields)
    return SandboxConfig(
        api_key=args.api_key,
        credits=args.credits,
        rate_limit=args.rate_limit,
        latency=args.latency,
        find_rate=args.find_rate,
        phone_rate=args.phone_rate,
        seed=args.seed,
        no_api_access_keys=tuple(args.no_api_access_key),
        faults={endpoint: FaultSpec(**fields) for endpoint, fields in faults.items()},
        revoke_after_batches=args.revoke_after_batches,
        refuse_contacts_containing=tuple(args.refuse_contacts_containing),
        webhook_backoff_scale=args.webhook_backoff_scale,
        webhook_ca_file=args.webhook_ca_file,
        webhook_drop_rate=args.webhook_drop_rate,
        webhook_results_limit=args.webhook_results_limit,
        webhook_delay=args.webhook_delay,
        webhook_fail_rate=args.webhook_fail_rate,
        webhook_down_seconds=args.webhook_down_seconds,
        bulk_answer_delay=args.bulk_answer_delay,
        results_order=args.results_order,
        omit_task_rate=args.omit_task_rate,
        unknown_task_rate=args.unknown_task_rate,
        bulk_task_ids=args.bulk_task_ids,
        final_word=args.final_word,
        final_word_rate=args.final_word_rate,
        error_envelope=args.error_envelope,
        retry_after_ms=args.retry_after_ms,
        rate_scope=args.rate_scope,
        workflow_visible_after=args.workflow_visible_after,
        deliveries_list=args.deliveries_list,
        deliveries_fields=args.deliveries_fields,
        deliveries_order=args.deliveries_order,
    )


def _describe(error: Any) -> str:
    field = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{field}: {message}" if field else message


def run_sandbox_command(args: argparse.Namespace) -> int:
    """Serve in the foreground until Ctrl-C; returns the process exit code."""
    # Here, not at the top: every `cleanlist-enrich` start registers this parser, and only this command
    # needs FastAPI and uvicorn.
    from cleanlist.sandbox.server import bind_socket, serve_forever

    parser: argparse.ArgumentParser = args.sandbox_parser
    try:
        config = config_from_args(args)
    except ValidationError as exc:
        parser.error("; ".join(_describe(error) for error in exc.errors()))
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    print(
        f"Cleanlist sandbox serving at http://{shown_host}:{port} (API under /api/v1/public); Ctrl-C to stop",
        flush=True,
    )
    try:
        serve_forever(config, sock)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0
