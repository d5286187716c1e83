"""The submit loop of an enrich run: chunk tasks kept in flight, one credit pause from the flow body.

Orchestration only: it starts submit-chunk tasks (at most `max_concurrent_chunks` at a time, a finished
one's place refilled at once), stops when the gate closes, and pauses the flow run once per 402 until
credits return (a background watcher resumes it when the balance covers the next chunk).

A stop request (SIGTERM, SIGINT, a cancellation in Prefect, see cleanlist/run/stop.py) ends the loop: no
chunk starts, running chunks give up a request still waiting for its rate slot and finish the one on the
wire, and the chunks left are reported as not submitted.

While the API answers nothing (the run's `OutageWatch` is down) no new chunk is started: a chunk whose
retries ran out on connection errors waits for the API with the others, probed with the free
validate-key call, until it answers or the outage bound stops the run. A store failure stops the run too.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import update_progress_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.futures import PrefectFuture, PrefectWrappedFuture
from prefect.input import RunInput

from cleanlist.errors import APIConnectionError, APIError, StopRequested, policy_for
from cleanlist.models import worst_case_credits
from cleanlist.run.context import RunContext
from cleanlist.run.outage import STORE_ERRORS
from cleanlist.run.submit import ChunkOutcome
from cleanlist.vocab import ChunkStatus, StopReason
from cleanlist_prefect.flows.credits import CreditWatcher, leave_expired_pause
from cleanlist_prefect.tasks.submit import submit_chunk_with_retries

HEARTBEAT_SECONDS = 30.0  # claims of a run whose heartbeat is older than the store's lease may be taken
PROGRESS_SECONDS = 1.0
SETTLE_WAIT_SECONDS = 0.5
PROBE_SECONDS = 10.0  # while the API is down and no chunk is running, validate-key this often (at most)
CANCEL_CHECK_SECONDS = 5.0  # how often a run asks Prefect whether its flow run was cancelled
GATHER_SECONDS = 1.0  # at most this long the first request waits for the first burst's others


class CreditsToppedUp(RunInput):
    """Shown in the Prefect UI while the run waits for credits; submit it after topping up."""

    note: str = "Credits were topped up"


@dataclass
class Submission:
    """What the submit loop left: chunks never submitted, and why (None: every chunk was settled)."""

    leftover: list[int]
    stop: StopReason | None


def flow_run_cancelled(flow_run_id: uuid.UUID) -> bool:
    """Whether the flow run is being cancelled in Prefect (False when Prefect cannot be asked)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    except Exception:  # Prefect's API unreachable a moment: asked again in a few seconds
        return False
    return state is not None and (state.is_cancelling() or state.is_cancelled())


def _finished(future: PrefectFuture[Any]) -> bool:
    if isinstance(future, PrefectWrappedFuture):
        return bool(future.wrapped_future.done())
    return future.state.is_final()


class SubmitLoop:
    """Keeps up to `max_concurrent_chunks` submit-chunk tasks running until every chunk is settled."""

    def __init__(
        self,
        run: RunContext,
        chunks: list[int],
        *,
        flow_run_id: uuid.UUID | None,
        progress_id: uuid.UUID | None,
        emit: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self.run = run
        self.pending: deque[int] = deque(chunks)
        self.running: dict[PrefectFuture[ChunkOutcome], int] = {}
        self.total = max(len(chunks), 1)
        self.flow_run_id = flow_run_id
        self.progress_id = progress_id
        self.emit = emit
        self.task = submit_chunk_with_retries(run.retry)
        # Set by each chunk task as it finishes, so its place is refilled at once. (prefect.futures.wait
        # with a timeout returns only when *every* future is done, and times out with SIGALRM.)
        self.settled = threading.Event()
        self.pauses = 0
        self._last_progress = self._last_heartbeat = time.monotonic()
        self._last_probe = 0.0
        self._last_cancel_check = time.monotonic()

    def run_to_end(self) -> Submission:
        """Submit until every chunk is settled, or the run stops. After a stop request no chunk starts;
        the running ones end at once (a request waiting for its slot is given up) or when their request
        on the wire is answered and recorded, and the rest is left over."""
        self._gather_first_burst()
        while True:
            self.run.outage.check()
            self._heartbeat()
            self._check_cancelled()
            self._fill()
            if not self.running:
                done, stop = self._idle()
                if done:
                    return Submission(list(self.pending), stop)
                continue
            self.settled.wait(SETTLE_WAIT_SECONDS)
            self.settled.clear()
            self._collect()
            self._report_progress()

    def _gather_first_burst(self) -> None:
        """The first chunks' requests leave together (see `EndpointLimiter.gather`): as many as start at
        once and the bulk limit allows in one window, waiting at most a moment for the slowest."""
        limiter = self.run.client.limiter.endpoint("enrich-bulk")
        burst = min(len(self.pending), self.run.options.max_concurrent_chunks, limiter.allowance)
        limiter.gather(burst, timeout=GATHER_SECONDS)

    def _check_cancelled(self) -> None:
        """A cancellation in Prefect (the UI, `prefect flow-run cancel`) is a stop request too. A worker
        or `serve` also sends SIGTERM; a run in a terminal process only learns it by asking."""
        if self.run.stop.requested or self.flow_run_id is None:
            return
        if time.monotonic() - self._last_cancel_check < CANCEL_CHECK_SECONDS:
            return
        self._last_cancel_check = time.monotonic()
        if flow_run_cancelled(self.flow_run_id):
            get_run_logger().warning("the flow run was cancelled in Prefect: stopping")
            self.run.stop.request("cancelled")

    def _heartbeat(self) -> None:
        if time.monotonic() - self._last_heartbeat > HEARTBEAT_SECONDS and self.run.store_lost is None:
            with self.run.store_guard():
                self.run.store.heartbeat(self.run.run_id)
            self._last_heartbeat = time.monotonic()

    def _fill(self) -> None:
        run = self.run
        limit = run.options.max_concurrent_chunks
        while self.pending and len(self.running) < limit and run.gate.open and not run.outage.down:
            chunk_no = self.pending[0]
            if not run.budget.reserve(chunk_no, len(run.workspace.chunk_keys(chunk_no))):
                return
            self.pending.popleft()
            future = self.task.submit(run, chunk_no)
            future.add_done_callback(lambda _future: self.settled.set())
            self.running[future] = chunk_no

    def _idle(self) -> tuple[bool, StopReason | None]:
        """Nothing running: (True, why the loop ends, None if every chunk went) or (False, None): go on."""
        run = self.run
        if not self.pending:
            return True, None
        if run.stop.requested or run.gate.fatal is not None:
            return True, StopReason.STOPPED if run.stop.requested else StopReason.FAILED
        if run.gate.credits_exhausted:
            self.pauses += 1
            return (False, None) if self._pause_for_credits() else (True, StopReason.CREDITS_TIMEOUT)
        if run.outage.down:
            self._probe()
            return False, None
        if run.budget.unsettled:
            time.sleep(0.2)  # in-flight workflows may cost less than their worst case
            return False, None
        return True, StopReason.BUDGET_REACHED

    def _collect(self) -> None:
        log = get_run_logger()
        run = self.run
        for future in [f for f in self.running if _finished(f)]:
            chunk_no = self.running.pop(future)
            run.budget.unreserve(chunk_no)
            try:
                outcome = future.result()
            except APIError as exc:
                if run.gate.fatal is not None and policy_for(exc) == policy_for(run.gate.fatal):
                    self.pending.appendleft(chunk_no)
                    continue
                if isinstance(exc, APIConnectionError) and (run.outage.down or not run.gate.open):
                    self.pending.appendleft(chunk_no)  # it waits for the API (bounded by the outage)
                    continue
                with run.store_guard():
                    run.chunk_failed(chunk_no, str(exc))
                log.error("chunk %05d failed: %s", chunk_no, exc)
            except STORE_ERRORS as exc:
                run.lose_store(exc)
                self.pending.appendleft(chunk_no)
            except StopRequested:
                self.pending.appendleft(chunk_no)  # not sent: the run is stopping
            except Exception as exc:
                with run.store_guard():
                    run.chunk_failed(chunk_no, f"{type(exc).__name__}: {exc}")
                log.error("chunk %05d failed: %s: %s", chunk_no, type(exc).__name__, exc)
            else:
                if outcome.status is ChunkStatus.DEFERRED:
                    self.pending.appendleft(chunk_no)

    def _probe(self) -> None:
        """Ask the API whether it is back (validate-key is free); the outage watch hears the outcome."""
        time.sleep(SETTLE_WAIT_SECONDS)
        interval = min(PROBE_SECONDS, self.run.options.api_outage_seconds / 5)
        if time.monotonic() - self._last_probe < interval:
            return
        self._last_probe = time.monotonic()
        # The watch logs connection errors; anything else shows when the chunk is sent again.
        with contextlib.suppress(APIError, StopRequested):
            self.run.client.validate_key()

    def _report_progress(self) -> None:
        if self.progress_id is None or time.monotonic() - self._last_progress <= PROGRESS_SECONDS:
            return
        self._last_progress = time.monotonic()
        done = self.total - len(self.pending) - len(self.running)
        update_progress_artifact(self.progress_id, progress=100.0 * done / self.total)

    def _pause_for_credits(self) -> bool:
        """Pause the flow run (once, from the flow body) until credits return; False on timeout."""
        log = get_run_logger()
        run = self.run
        options = run.options
        needed = worst_case_credits(options.enrichment_type, len(run.workspace.chunk_keys(self.pending[0])))
        self.emit(
            "cleanlist.credits.exhausted",
            {"needed_for_next_chunk": needed, "credits_spent": run.counters.credits_spent},
        )
        log.warning(
            "Out of credits (402): submissions paused. Top up; the run resumes by itself when the balance "
            "covers %.0f credits (re-checked every %gs), or click Resume in the Prefect UI.",
            needed,
            options.credit_recheck_seconds,
        )
        if self.flow_run_id is None:
            return False
        run.count(pauses=1)
        watcher = CreditWatcher(
            run.client, self.flow_run_id, needed, options.credit_recheck_seconds, stop=run.stop
        )
        watcher.start()
        try:
            pause_flow_run(
                wait_for_input=CreditsToppedUp,
                timeout=options.pause_timeout_seconds,
                poll_interval=max(1, min(10, int(options.credit_recheck_seconds))),
                key=f"credits-{self.pauses}",
            )
        except FlowPauseTimeout:
            log.error(
                "still out of credits after %ss; giving up on the remaining chunks",
                options.pause_timeout_seconds,
            )
            leave_expired_pause(self.flow_run_id)
            return False
        finally:
            watcher.stop()
        if run.stop.requested:
            return True  # the loop sees the stop request and ends in order
        log.info("resumed after the credit pause; submitting the remaining chunks")
        run.gate.credits_returned()
        return True
