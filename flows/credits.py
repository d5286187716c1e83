"""While a run is paused for credits: re-check the balance, resume the run when it covers the next chunk."""

from __future__ import annotations

import contextvars
import logging
import threading
from uuid import UUID

from cleanlist.client import CleanlistClient
from cleanlist.errors import APIError

logger = logging.getLogger("cleanlist.credits")


class CreditWatcher:
    """A background thread that resumes a paused flow run once the balance reaches `needed`."""

    def __init__(self, client: CleanlistClient, flow_run_id: UUID, needed: float, every: float) -> None:
        self.client = client
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

    def _run(self) -> None:
        from prefect.exceptions import FlowPauseTimeout
        from prefect.flow_runs import resume_flow_run

        while not self._stop.wait(self.every):
            try:
                balance = self.client.credits_balance().credits
            except APIError as exc:
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
            # The pause is proposed by the flow body; wait until the server has it before resuming.
            while not self._stop.is_set():
                try:
                    if self._paused():
                        resume_flow_run(
                            self.flow_run_id, run_input={"note": f"balance {balance:g} covers the next chunk"}
                        )
                        self.resumed_by_watcher = True
                        logger.info("credits are back (%.2f): resumed the run", balance)
                        return
                except FlowPauseTimeout:
                    return
                except Exception as exc:  # resumed by a person in between, or not paused yet
                    logger.debug("resume attempt: %s", exc)
                self._stop.wait(0.5)
            return
