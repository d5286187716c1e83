"""The servers we start inside a run's process leave that process's logging alone.

uvicorn's default logging config goes through `logging.config.dictConfig`, which flushes and closes every
handler of the process while holding logging's module lock. In a flow run that includes Prefect's API log
handler, whose flush waits for a worker thread that itself needs that lock: a run starting its webhook
receiver hung there until its bound killed it (chaos seed 7524608, `--replay 7524608 --profile ci`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from cleanlist.sandbox import SandboxServer
from cleanlist.store import EnrichmentStore
from cleanlist.webhooks.server import ReceiverServer


class _WatchedHandler(logging.Handler):
    """A handler of the process, as Prefect's are: records whether anyone closed it."""

    def __init__(self) -> None:
        super().__init__()
        self.closed_by: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        pass

    def close(self) -> None:
        self.closed_by.append("close")
        super().close()


@contextmanager
def _watched() -> Iterator[_WatchedHandler]:
    handler = _WatchedHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def test_a_webhook_receiver_leaves_the_process_log_handlers_open(tmp_path: Path) -> None:
    with _watched() as handler, EnrichmentStore(f"sqlite:///{tmp_path / 'store.db'}") as store:
        with ReceiverServer(store, "127.0.0.1", 0) as receiver:
            health = httpx.get(f"{receiver.base_url}/healthz", timeout=10).status_code
        closed = list(handler.closed_by)
        still_attached = handler in logging.getLogger().handlers
    assert health == 200
    assert closed == []
    assert still_attached


def test_an_in_process_sandbox_leaves_the_process_log_handlers_open() -> None:
    with _watched() as handler:
        with SandboxServer() as sandbox:
            status = httpx.get(f"{sandbox.base_url}/api/v1/public/auth/validate-key", timeout=10).status_code
        closed = list(handler.closed_by)
    assert status == 401  # answered (no key given)
    assert closed == []
