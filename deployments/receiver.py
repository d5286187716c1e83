"""`cleanlist-enrich receiver`: a long-lived webhook receiver beside the workers.

Runs started with `--webhook-url <its public URL>` register a token in the shared store (PostgreSQL for
teams) and the API POSTs their deliveries here; the receiver writes them to that store and the runs (or
their reruns) pick them up there. Each pick-up emits `cleanlist.webhook.received` from the run's flow.
"""

from __future__ import annotations

import argparse
from typing import Any

from cleanlist_prefect.deployments.local_run import EXIT_OK


def add_receiver_parser(sub: Any) -> None:
    """Register the `receiver` subcommand on `cleanlist-enrich`'s subparsers."""
    parser = sub.add_parser("receiver", help="receive webhook deliveries for every run of a shared store")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8088, help="port to listen on (default: 8088; 0 = free)")
    parser.add_argument(
        "--store", help="SQLAlchemy URL of the enrichment store the runs use (default CLEANLIST_STORE_URL)"
    )
    parser.set_defaults(func=cmd_receiver)


def cmd_receiver(args: argparse.Namespace) -> int:
    from cleanlist.settings import CleanlistSettings
    from cleanlist.store import EnrichmentStore
    from cleanlist.webhooks.server import listen, serve_forever

    with EnrichmentStore(args.store or CleanlistSettings().store_url) as store:
        sock = listen(args.host, args.port)
        host, port = sock.getsockname()[:2]
        print(
            f"receiving webhooks on http://{host}:{port}/hooks/<token> for the runs of {store.url_display}",
            flush=True,
        )
        serve_forever(store, sock)
    return EXIT_OK
