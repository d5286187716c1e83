"""While a run is paused for credits: re-check the balance, resume the run when it covers the next chunk.

A stop request (SIGTERM, SIGINT) while paused resumes the run too, at once: `pause_flow_run` blocks the
flow body, and only a resume lets the run write what it has and end in order (the flow body sees the
stop request and submits nothing more).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from uuid import UUID

from cleanlist.client import CleanlistClient
from cleanlist.errors import APIError, StopRequested
from cleanlist.run.stop import StopRequest

logger = logging.getLogger("cleanlist.credits")


class CreditWatcher:
    """A background thread that resumes a paused flow run once the balance reaches `needed`."""

    def __init__(
        self,
        client: CleanlistClient,
        flow_run_id: UUID,
        needed: float,
        every: float,
        stop: StopRequest | None = None,
    ) -> None:
        self.client = client
        self.stop_request = stop
        self.flow_run_id = flow_run_id
        self.needed = needed
        self.every = every
        self._stop = threading.Event()
        context = contextvars.copy_context()  # keeps the flow run's logger context in the thread
        self._thread = threading.Thread(
            target=context.run, args=(self._run,), name="cleanlist-credit-watcher", daemon=True
        )
        self.resumed_by_watcher = False
        self.last_balance: float | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _paused(self) -> bool:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as prefect:
            state = prefect.read_flow_run(self.flow_run_id).state
        return bool(state and state.is_paused())

    def _wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True when the watcher should end (stopped, or the run asked to stop)."""
        deadline = time.monotonic() + seconds
        while not self._stop.wait(min(0.2, max(0.0, deadline - time.monotonic()))):
            if self.stop_request is not None and self.stop_request.requested:
                return True
            if time.monotonic() >= deadline:
                return False
        return True

    def _run(self) -> None:
        while not self._wait(self.every):
            try:
                balance = self.client.credits_balance().credits
            except (APIError, StopRequested) as exc:
                logger.warning("credit re-check failed: %s", exc)
                continue
            self.last_balance = balance
            if balance < self.needed:
                logger.info(
                    "balance %.2f is below the %.2f the next chunk may cost; still paused",
                    balance,
                    self.needed,
                )
                continue
            self._resume(f"balance {balance:g} covers the next chunk")
            self.resumed_by_watcher = True
            logger.info("credits are back (%.2f): resumed the run", balance)
            return
        if self.stop_request is not None and self.stop_request.requested and not self._stop.is_set():
            self._resume("the run was asked to stop")
            logger.info("stop requested while paused for credits: resumed the run so that it ends in order")

    def _resume(self, note: str) -> None:
        """Resume the paused flow run (proposed by the flow body: wait until the server has the pause)."""
        from prefect.exceptions import FlowPauseTimeout
        from prefect.flow_runs import resume_flow_run

        while not self._stop.is_set():
            try:
                if self._paused():
                    resume_flow_run(self.flow_run_id, run_input={"note": note})
                    return
            except FlowPauseTimeout:
                return
            except Exception as exc:  # resumed by a person in between, or not paused yet
                logger.debug("resume attempt: %s", exc)
            self._stop.wait(0.5)


def leave_expired_pause(flow_run_id: UUID) -> None:
    """After the pause timed out: put the flow run back to Running, so that the run ends in its own state.

    Prefect leaves a flow run whose pause timed out in Paused, and its server then turns every later
    transition into Failed("The flow was failed and never resumed.") with no data: the run's summary (what
    it wrote, the requests in doubt) would be lost to the CLI and to `enrich_dataframe`. The server's
    orchestration rule allows no transition out of an expired pause, hence `force`.
    """
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    with get_client(sync_client=True) as prefect:
        prefect.set_flow_run_state(
            flow_run_id, Running(message="the credit pause timed out; ending the run"), force=True
        )
