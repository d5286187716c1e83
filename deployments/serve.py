"""`cleanlist-enrich serve`: the nightly, adhoc and backfill deployments served from this one process.

For one machine next to `prefect server start`: no work pool and no worker; this process polls for the
deployments' runs and starts each in a subprocess. The nightly deployment (cron 02:00 UTC) reads its
source, output and store when serving starts, from the Prefect Variables `cleanlist_nightly_source`,
`cleanlist_nightly_output`, `cleanlist_nightly_store`, else from CLEANLIST_NIGHTLY_SOURCE/_OUTPUT/_STORE;
without a source and an output its schedule is served paused. Restart serving after changing them.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.logging import get_logger
from prefect.schedules import Cron

NIGHTLY_CRON = "0 2 * * *"
NIGHTLY_TIMEZONE = "UTC"
# parameter → (Prefect Variable, environment variable)
NIGHTLY_SETTINGS = {
    "source": ("cleanlist_nightly_source", "CLEANLIST_NIGHTLY_SOURCE"),
    "output": ("cleanlist_nightly_output", "CLEANLIST_NIGHTLY_OUTPUT"),
    "store": ("cleanlist_nightly_store", "CLEANLIST_NIGHTLY_STORE"),
    "credentials": ("cleanlist_nightly_credentials", "CLEANLIST_NIGHTLY_CREDENTIALS"),
}
JOB_ENV = {"PREFECT_LOGGING_EXTRA_LOGGERS": "cleanlist"}

# Under `prefect.`: a `cleanlist` logger would try to ship this to the API outside any flow run.
logger = get_logger("cleanlist.serve")


def nightly_parameters() -> dict[str, Any]:
    """The nightly run's source/output/store: Prefect Variables first, then the environment."""
    from prefect.variables import Variable

    parameters: dict[str, Any] = {}
    for parameter, (variable, env) in NIGHTLY_SETTINGS.items():
        value = Variable.get(variable, default=None, _sync=True)  # type: ignore[call-overload]
        if value in (None, ""):
            value = os.environ.get(env) or None
        if value is not None:
            parameters[parameter] = str(value)
    return parameters


def build_deployments() -> list[RunnerDeployment]:
    """The three deployments, named as in prefect.yaml."""
    from cleanlist_prefect.flows.backfill_contacts import backfill_contacts
    from cleanlist_prefect.flows.enrich_contacts import enrich_contacts
    from cleanlist_prefect.tasks.prefect_types import sync_result

    nightly = nightly_parameters()
    ready = "source" in nightly and "output" in nightly
    if not ready:
        logger.warning(
            "nightly: no source/output in the Variables cleanlist_nightly_source/_output or "
            "CLEANLIST_NIGHTLY_SOURCE/_OUTPUT; serving its schedule paused"
        )
    return [
        sync_result(
            enrich_contacts.to_deployment(
                name="nightly",
                schedules=[Cron(NIGHTLY_CRON, timezone=NIGHTLY_TIMEZONE, active=ready)],
                parameters=nightly,
                tags=["cleanlist", "nightly"],
                description="Nightly enrichment of new and stale contacts (02:00 UTC).",
            )
        ),
        sync_result(
            enrich_contacts.to_deployment(
                name="adhoc",
                tags=["cleanlist", "adhoc"],
                description="One enrichment run with every parameter given per run.",
            )
        ),
        sync_result(
            backfill_contacts.to_deployment(
                name="backfill",
                tags=["cleanlist", "backfill"],
                description="A large source split into shards, each an enrich-contacts/adhoc run.",
            )
        ),
    ]


def serve_all(limit: int | None = None) -> None:
    """Serve the deployments until interrupted.

    `limit` caps concurrent runs of this process; a backfill needs `max_parallel_shards + 1` slots (its
    own run plus its shards), so keep it above that or leave it unset.
    """
    # Served runs are subprocesses of this process (job variables need a work pool): they inherit this.
    os.environ.update({k: v for k, v in JOB_ENV.items() if k not in os.environ})
    serve(*build_deployments(), limit=limit)


__all__ = ["build_deployments", "nightly_parameters", "serve_all"]
