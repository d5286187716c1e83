"""What one run *changes* while it runs: the submission gate, the credit budget, the counters of the
summary, the outage watch and the run's stop request, in one `RunState`.

Every piece is safe to use from the flow body, the task threads and the poller's threads at once. What a
run *uses* (client, store, workspace, journal, options, retry policy) is in `cleanlist/run/services.py`;
how a workflow's answer becomes stored results is in `cleanlist/run/settlement.py`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cleanlist.errors import CleanlistError
from cleanlist.models import worst_case_credits
from cleanlist.run.outage import APIOutage, OutageWatch
from cleanlist.run.stop import StopRequest
from cleanlist.vocab import RunStatus


@dataclass
class RunCounters:
    """What the run did, as counted while it ran (the summary is built from these)."""

    rows_read: int = 0
    duplicates: int = 0
    unique_contacts: int = 0
    fresh_in_store: int = 0
    resumed_in_flight: int = 0
    submitted: int = 0
    quarantined: int = 0
    emails_found: int = 0
    phones_found: int = 0
    credits_spent: float = 0.0
    workflows_accepted: int = 0
    workflows_completed: int = 0
    chunks_total: int = 0
    chunks_failed: int = 0
    chunks_settled: int = 0  # this run's chunks whose outcome is known (results, failure, nothing sent)
    chunk_attempts: int = 0
    rate_limited: int = 0
    pauses: int = 0
    task_lookups: int = 0  # status calls by task id, for tasks a workflow answer left out
    ambiguous_submissions: int = 0  # bulk requests whose answer was lost after the body was sent
    unknown_to_api: int = 0  # contacts left unresolved because the API answered 404 for their workflow
    ambiguous_contacts: int = 0  # the contacts of those requests

    @property
    def retries(self) -> int:
        """Bulk attempts beyond the first of each chunk (Prefect retries and inline Retry-After waits)."""
        return max(self.chunk_attempts - self.workflows_accepted - self.chunks_failed, 0)


@dataclass(frozen=True)
class Progress:
    """A snapshot for a progress display: chunks settled of all chunks, contacts sent so far."""

    chunks_total: int
    chunks_settled: int
    contacts_sent: int


ProgressListener = Callable[[Progress], None]


class SubmissionGate:
    """Whether new bulk requests may be sent: closed for good on 401/403, on an API outage, a lost store
    or a requested stop; paused on 402."""

    def __init__(self, stop: StopRequest | None = None) -> None:
        self._lock = threading.Lock()
        self.fatal: CleanlistError | None = None
        self.credits_exhausted = False
        self.stop = stop or StopRequest()

    @property
    def open(self) -> bool:
        if self.stop.requested:
            return False
        with self._lock:
            return self.fatal is None and not self.credits_exhausted

    def fail(self, error: CleanlistError) -> None:
        """Close for good; the first fatal error is the one the run reports."""
        with self._lock:
            if self.fatal is None:
                self.fatal = error

    def exhaust_credits(self) -> None:
        with self._lock:
            self.credits_exhausted = True

    def credits_returned(self) -> None:
        with self._lock:
            self.credits_exhausted = False


class CreditBudget:
    """`--max-credits`: the worst case of chunks being sent and of workflows in flight, plus what
    finished workflows actually cost, never exceeds the cap."""

    def __init__(self, enrichment_type: str, max_credits: float | None) -> None:
        self.enrichment_type = enrichment_type
        self.max_credits = max_credits
        self._lock = threading.Lock()
        self._reserved: dict[int, float] = {}
        self._in_flight = 0.0
        self.spent = 0.0

    def committed(self) -> float:
        with self._lock:
            return sum(self._reserved.values()) + self._in_flight + self.spent

    def reserve(self, chunk_no: int, contacts: int) -> bool:
        """Reserve a chunk's worst case before submitting it; False if that would break the cap."""
        need = worst_case_credits(self.enrichment_type, contacts)
        with self._lock:
            committed = sum(self._reserved.values()) + self._in_flight + self.spent
            if self.max_credits is not None and committed + need > self.max_credits + 1e-9:
                return False
            self._reserved[chunk_no] = need
        return True

    def unreserve(self, chunk_no: int) -> None:
        """The chunk's task ended: its workflow (if any) now carries the worst case."""
        with self._lock:
            self._reserved.pop(chunk_no, None)

    def workflow_accepted(self, worst_case: float) -> None:
        with self._lock:
            self._in_flight += worst_case

    def workflow_settled(self, worst_case: float, charged: float) -> None:
        with self._lock:
            self._in_flight -= worst_case
            self.spent += charged

    @property
    def unsettled(self) -> bool:
        """Workflows in flight may still cost less than their worst case (so a chunk may fit later)."""
        with self._lock:
            return self._in_flight > 1e-6


class RunState:
    """The gate, budget, counters, outage watch and stop request of one run; `count` from any thread."""

    def __init__(
        self,
        *,
        enrichment_type: str,
        max_credits: float | None,
        base_url: str,
        outage_seconds: float,
        on_outage: Callable[[APIOutage], None],
        stop: StopRequest | None = None,
        on_progress: ProgressListener | None = None,
    ) -> None:
        # SIGTERM/SIGINT/cancellation: no new request (the client gives up waiting for a slot), the
        # requests on the wire finish; see cleanlist/run/stop.py.
        self.stop = stop or StopRequest()
        self.gate = SubmissionGate(self.stop)
        self.outage = OutageWatch(base_url, outage_seconds, on_outage=on_outage)
        self.budget = CreditBudget(enrichment_type, max_credits)
        self.counters = RunCounters()
        # How the run ended and its summary, for the store's record of the run (failed until told).
        self.outcome: tuple[str, dict[str, Any]] = (RunStatus.FAILED, {})
        self._on_progress = on_progress
        self._lock = threading.Lock()
        # chunk → seconds its next submit attempt waits first, as the retry policy decided after its
        # last failure (spent by that attempt, where a stop request cuts it short).
        self._retry_waits: dict[int, float] = {}

    def count(self, **increments: float) -> None:
        """Add to counters from any thread."""
        with self._lock:
            for name, value in increments.items():
                setattr(self.counters, name, getattr(self.counters, name) + value)

    def retry_after(self, chunk_no: int, seconds: float) -> None:
        """The chunk's next attempt waits `seconds` first."""
        with self._lock:
            self._retry_waits[chunk_no] = seconds

    def take_retry_wait(self, chunk_no: int) -> float:
        """What this attempt of the chunk waits first (0 for a first attempt)."""
        with self._lock:
            return self._retry_waits.pop(chunk_no, 0.0)

    def chunk_settled(self) -> None:
        """One of this run's chunks has its outcome (results, a failure, nothing sent): tell the listener."""
        self.count(chunks_settled=1)
        self.progress()

    def progress(self) -> None:
        if self._on_progress is None:
            return
        c = self.counters
        self._on_progress(Progress(c.chunks_total, c.chunks_settled, c.submitted))
