"""What one run *uses*: built once by whoever opens the run, read-only afterwards.

`RunServices` holds the run's id and options, its API client, store, workspace, acceptance journal, retry
policy and webhook settings. Nothing in it changes while the run runs (the objects it names keep their own
state: the store its connections, the workspace its files). What the run changes is in
`cleanlist/run/state.py`.

A frozen dataclass, never a task argument on its own (Prefect walks dataclass arguments looking for
futures): tasks take the few services they use (`tasks/stage.py`: options, workspace) or the whole run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cleanlist.client import CleanlistClient
from cleanlist.retry import RetryPolicy
from cleanlist.run.journal import AcceptanceJournal
from cleanlist.run.options import EnrichOptions
from cleanlist.run.workspace import RunWorkspace
from cleanlist.store import EnrichmentStore
from cleanlist.webhooks.failures import DeliveryLog

# Told of each webhook delivery the run picked up: (workflow id, results delivered).
DeliveryListener = Callable[[str, int], None]


@dataclass(frozen=True)
class WebhookSettings:
    """A run's webhooks, fixed before it starts: the URL given to the API with each bulk request (with
    the run's token), whether a receiver writes deliveries to the store for the poller to pick up, and
    who hears of each delivery."""

    url: str | None = None
    expect_deliveries: bool = False
    on_delivery: DeliveryListener | None = None
    # Asked before polling an overdue delivery (cleanlist/webhooks/failures.py); read for the report.
    deliveries: DeliveryLog | None = None


@dataclass(frozen=True, repr=False)
class RunServices:
    """Client, store, workspace, journal, options and retry policy of one run (see the module docstring)."""

    run_id: str
    options: EnrichOptions
    client: CleanlistClient
    store: EnrichmentStore
    workspace: RunWorkspace
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    journal: AcceptanceJournal | None = None  # bulk requests and acceptances on disk before the store
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)

    def __repr__(self) -> str:
        return f"RunServices({self.run_id})"
