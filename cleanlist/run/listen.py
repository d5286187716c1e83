"""A run's webhooks: its token registered, its receiver (with `webhook_listen`) served for its duration."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cleanlist.run.context import RunContext
from cleanlist.webhooks.delivery import hook_url, register_run
from cleanlist.webhooks.server import ReceiverServer, parse_listen


@contextmanager
def receiving_webhooks(run: RunContext) -> Iterator[ReceiverServer | None]:
    """With `webhook_listen` or `webhook_url`: register a token, give the API `<base>/hooks/<token>` and
    have the poller wait for deliveries; with `webhook_listen`, also serve a receiver until the block ends.
    """
    options = run.options
    if options.dry_run or not (options.webhook_listen or options.webhook_url):
        yield None
        return
    token = register_run(run.store, run.run_id)
    server: ReceiverServer | None = None
    base = options.webhook_url
    if options.webhook_listen:
        host, port = parse_listen(options.webhook_listen)
        server = ReceiverServer(run.store, host, port).start()
        base = base or server.base_url
    assert base is not None
    run.webhook_url = hook_url(base, token)
    run.expect_deliveries = True
    try:
        yield server
    finally:
        if server is not None:
            server.stop()
