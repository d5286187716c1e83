"""The status poller alone, in real time, against an in-process stand-in (no HTTP, no Prefect).

Chunks are "submitted" through a real `EndpointLimiter` at the bulk limit, each workflow finishes after
a uniform random latency, and the real `WorkflowPoller` polls through another limiter at the status
limit. It isolates the poller's share of the throughput (status calls per workflow, time from the
last submit to the last result) from everything else, for initial estimates that are too low, right
or too high:

    .venv/bin/python -m benchmarks.poller_sim --workflows 160 --initial 0.17 1.5 5
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from cleanlist.models import WorkflowStatus
from cleanlist.poller import TrackedWorkflow, WorkflowPoller
from cleanlist.ratelimit import RateLimiter
from cleanlist.settings import RateLimit


class _StandInClient:
    """Answers `enrich_status` from a table of ready times, spending a real limiter slot per call."""

    def __init__(self, limit: RateLimit) -> None:
        self.limiter = RateLimiter(limit)
        self._status = self.limiter.endpoint("enrich-status")
        self.ready_at: dict[str, float] = {}
        self.calls = 0

    def enrich_status(self, *, workflow_id: str) -> WorkflowStatus:
        self._status.acquire()
        self.calls += 1
        done = time.monotonic() >= self.ready_at[workflow_id]
        self._status.release(rate_limited=False)
        return WorkflowStatus(workflow_id=workflow_id, status="completed" if done else "processing")


@dataclass
class SimResult:
    initial: float
    workflows: int
    status_calls: int
    calls_per_workflow: float
    early_first_polls: int
    last_submit: float
    last_result: float
    final_estimate: float

    @property
    def ideal_end(self) -> float:
        return self.last_submit


def simulate(
    initial: float,
    *,
    workflows: int = 160,
    limit: str = "20/2",
    latency: tuple[float, float] = (0.5, 1.5),
    seed: int = 0,
) -> SimResult:
    rate = RateLimit.parse(limit)
    client = _StandInClient(rate)
    rng = random.Random(seed)
    finished: list[float] = []
    lock = threading.Lock()

    def on_result(workflow: TrackedWorkflow, status: WorkflowStatus) -> None:
        with lock:
            finished.append(time.monotonic())

    poller = WorkflowPoller(
        client,  # type: ignore[arg-type]
        on_result=on_result,
        on_gone=lambda w, reason: None,
        initial_estimate=initial,
    )
    poller.start()
    bulk = client.limiter.endpoint("enrich-bulk")
    start = time.monotonic()
    last_submit = start
    for n in range(workflows):
        bulk.acquire()
        bulk.release(rate_limited=False)
        now = time.monotonic()
        workflow_id = f"wf-{n}"
        client.ready_at[workflow_id] = now + rng.uniform(*latency)
        poller.track(TrackedWorkflow(workflow_id, now, 250))
        last_submit = now
    poller.wait_idle()
    poller.stop()
    return SimResult(
        initial=initial,
        workflows=workflows,
        status_calls=poller.stats.status_calls,
        calls_per_workflow=round(poller.stats.calls_per_workflow, 3),
        early_first_polls=poller.stats.early_first_polls,
        last_submit=round(last_submit - start, 3),
        last_result=round(max(finished) - start, 3),
        final_estimate=round(poller.estimate, 3),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workflows", type=int, default=160)
    parser.add_argument("--limit", default="20/2")
    parser.add_argument("--latency", default="0.5-1.5")
    parser.add_argument("--initial", type=float, nargs="+", default=[0.17, 1.5, 5.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    low, _, high = args.latency.partition("-")
    rows: list[dict[str, Any]] = []
    for initial in args.initial:
        result = simulate(
            initial,
            workflows=args.workflows,
            limit=args.limit,
            latency=(float(low), float(high or low)),
            seed=args.seed,
        )
        row = {**result.__dict__, "tail": round(result.last_result - result.last_submit, 3)}
        rows.append(row)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
