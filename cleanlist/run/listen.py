"""A run's webhooks: its token registered, its receiver (with `webhook_listen`) served for its duration."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from cleanlist.client import CleanlistClient
from cleanlist.run.options import EnrichOptions
from cleanlist.run.services import DeliveryListener, WebhookSettings
from cleanlist.store import EnrichmentStore
from cleanlist.webhooks.delivery import hook_url, register_run
from cleanlist.webhooks.failures import DeliveryLog

if TYPE_CHECKING:
    from cleanlist.webhooks.server import ReceiverServer


@contextmanager
def receiving_webhooks(
    store: EnrichmentStore,
    run_id: str,
    options: EnrichOptions,
    client: CleanlistClient,
    on_delivery: DeliveryListener | None = None,
) -> Iterator[WebhookSettings]:
    """The run's webhook settings, given to its context when it is built. With `webhook_listen` or
    `webhook_url`: register a token, give the API `<base>/hooks/<token>` and have the poller wait for
    deliveries; with `webhook_listen`, also serve a receiver until the block ends."""
    if options.dry_run or not (options.webhook_listen or options.webhook_url):
        yield WebhookSettings(url=options.webhook_url, on_delivery=on_delivery)
        return
    token = register_run(store, run_id)
    server: ReceiverServer | None = None
    base = options.webhook_url
    if options.webhook_listen:
        # Imported here: the receiver's web stack (FastAPI, uvicorn) costs every process that imports
        # the flow ~0.2 s of CPU, and only a run that listens uses it.
        from cleanlist.webhooks.server import ReceiverServer, parse_listen

        host, port = parse_listen(options.webhook_listen)
        cert, key = options.webhook_tls_cert, options.webhook_tls_key
        tls = (cert, key) if cert and key else None
        allow = [options.webhook_allow] if options.webhook_allow else None
        server = ReceiverServer(store, host, port, allow=allow, tls=tls).start()
        base = base or server.base_url
    assert base is not None
    url = hook_url(base, token)
    # Asked before polling an overdue delivery: why deliveries failed, and whether Cleanlist still retries.
    deliveries = DeliveryLog(
        client,
        url,
        retry_scale=options.webhook_retry_scale,
        settle=max(1.0, 4 * options.webhook_grace_seconds),
    )
    try:
        yield WebhookSettings(
            url=url, expect_deliveries=True, on_delivery=on_delivery, deliveries=deliveries
        )
    finally:
        if server is not None:
            server.stop()
