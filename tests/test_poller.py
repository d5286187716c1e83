"""The status poller: how it learns when workflows are done, and what it spends doing so."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from cleanlist.client import CleanlistClient
from cleanlist.constants import POLL_FIRST_PROBE_FRACTION, POLL_SEARCH_FACTOR, POLL_SEARCH_STEP_NEAR
from cleanlist.models import WorkflowStatus
from cleanlist.poller import CompletionEstimate, TrackedWorkflow, WorkflowPoller
from cleanlist.sandbox import SandboxServer
from tests.sandbox_helpers import people


def estimate(initial: float) -> CompletionEstimate:
    return CompletionEstimate(initial, floor=0.05, ceiling=60.0)


def test_first_probe_goes_out_early() -> None:
    assert estimate(8.0).value == pytest.approx(8.0 * POLL_FIRST_PROBE_FRACTION)
    assert not estimate(8.0).calibrated


def test_search_climbs_in_small_steps_below_the_guess_and_doubles_beyond_it() -> None:
    est = estimate(8.0)  # first probe at 2.0
    est.observe(2.0, done=False)
    assert est.value == pytest.approx(2.0 * POLL_SEARCH_STEP_NEAR)
    est.observe(est.value, done=False)
    assert est.value == pytest.approx(2.0 * POLL_SEARCH_STEP_NEAR**2)
    est.observe(9.0, done=False)  # beyond the guess: the guess was wrong, search wide
    assert est.value == pytest.approx(9.0 * POLL_SEARCH_FACTOR)
    assert not est.calibrated


def test_search_ends_just_above_the_truth_when_the_guess_is_about_right() -> None:
    # Workflows take 1.4 s; the guess (5 s) puts the first probe at 1.25 s, too early.
    est = estimate(5.0)
    while not est.calibrated:
        probe = est.value
        est.observe(probe, done=probe >= 1.4)
    # The search overshoots the truth by less than one small step (doubling would have said 2.5 s).
    assert 1.4 <= est.value <= 1.4 * POLL_SEARCH_STEP_NEAR


def test_a_guess_far_too_high_is_halved_until_a_workflow_is_still_running() -> None:
    est = estimate(40.0)  # first probe at 10 s; workflows take 1 s
    probes = []
    while not est.calibrated:
        probes.append(est.value)
        est.observe(est.value, done=est.value >= 1.0)
    assert probes[:3] == pytest.approx([10.0, 5.0, 2.5])
    assert 1.0 <= est.value <= 2.0 * 1.0 + 1e-9


def test_a_burst_of_not_yet_moves_the_tracked_estimate_once() -> None:
    est = estimate(4.0)
    est.observe(1.0, done=False)
    est.observe(1.25, done=True)
    assert est.calibrated
    before = est.value
    for _ in range(20):  # 20 workflows submitted together, all polled at the same elapsed time
        est.observe(before, done=False)
    assert est.value == pytest.approx(before * 1.57)


def test_estimate_is_not_lowered_while_the_status_budget_is_busy_or_by_late_polls() -> None:
    est = estimate(4.0)
    est.observe(1.0, done=False)
    est.observe(2.0, done=True)
    value = est.value
    est.observe(value, done=True, budget_busy=True)
    assert est.value == value
    est.observe(value * 2, done=True)  # a late poll says nothing about the estimate
    assert est.value == value
    est.observe(value, done=True)
    assert est.value < value


# -- the poller against a sandbox over HTTP ------------------------------------------------------


def _run_poller(
    sandbox: SandboxServer, workflows: int, initial: float, rate_limit: str
) -> tuple[WorkflowPoller, dict[str, WorkflowStatus], list[str]]:
    client = CleanlistClient(sandbox.api_key, base_url=sandbox.base_url, rate_limit=rate_limit)
    results: dict[str, WorkflowStatus] = {}
    gone: list[str] = []
    lock = threading.Lock()

    def on_result(workflow: TrackedWorkflow, status: WorkflowStatus) -> None:
        with lock:
            assert workflow.workflow_id not in results, "a workflow's result was handed over twice"
            results[workflow.workflow_id] = status

    def on_gone(workflow: TrackedWorkflow, why: str) -> None:
        gone.append(f"{workflow.workflow_id}: {why}")

    poller = WorkflowPoller(client, on_result=on_result, on_gone=on_gone, initial_estimate=initial)
    poller.start()
    try:
        for n in range(workflows):
            accepted = client.enrich_bulk(people(5, tag=f"w{n}-"))
            poller.track(TrackedWorkflow(accepted.workflow_id, time.monotonic(), contacts=5, tag=n))
        assert poller.wait_idle(timeout=60)
    finally:
        poller.stop()
        client.close()
    return poller, results, gone


@pytest.mark.parametrize(
    ("initial", "extra_calls"),
    # The search climbs from a quarter of the guess in steps of a quarter: a guess 3× too low costs
    # about ten "not yet"s (a handful on a real run of thousands of workflows); a fair one, one or two.
    [(0.2, 10), (2.0, 3), (12.0, 3)],
    ids=["guess-too-low", "guess-about-right", "guess-too-high"],
)
def test_poller_fetches_every_workflow_once_with_few_early_calls(
    make_sandbox: Callable[..., SandboxServer], initial: float, extra_calls: int
) -> None:
    sandbox = make_sandbox(rate_limit=(20, 1.0), latency=(0.2, 0.6))
    poller, results, gone = _run_poller(sandbox, workflows=24, initial=initial, rate_limit="20/1")

    assert gone == []
    assert len(results) == 24 and all(s.is_terminal for s in results.values())
    assert all(len(s.results) == 5 for s in results.values())
    counters: dict[str, Any] = sandbox.counters()
    status_calls = sum(counters["requests"]["enrich-status"].values())
    assert status_calls == poller.stats.status_calls
    assert 24 <= status_calls <= 24 + extra_calls, poller.stats
    assert counters["requests"]["enrich-status"].get("429", 0) == 0
