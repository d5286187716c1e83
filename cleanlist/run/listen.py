"""A run's webhooks: its token registered, its receiver (with `webhook_listen`) served for its duration."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cleanlist.run.context import RunContext
from cleanlist.webhooks.delivery import hook_url, register_run
from cleanlist.webhooks.failures import DeliveryLog
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
        cert, key = options.webhook_tls_cert, options.webhook_tls_key
        tls = (cert, key) if cert and key else None
        allow = [options.webhook_allow] if options.webhook_allow else None
        server = ReceiverServer(run.store, host, port, allow=allow, tls=tls).start()
        base = base or server.base_url
    assert base is not None
    run.webhook_url = hook_url(base, token)
    run.expect_deliveries = True
    log = DeliveryLog(
        run.client,
        run.webhook_url,
        retry_scale=options.webhook_retry_scale,
        settle=max(1.0, 4 * options.webhook_grace_seconds),
    )
    run.delivery_log = log.consult
    run.on_fallback = log.polled
    run.delivery_failures = log
    try:
        yield server
    finally:
        if server is not None:
            server.stop()
