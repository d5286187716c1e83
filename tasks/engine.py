"""The in-process state one enrich run shares between its flow body, its task threads and its poller.

Task runs receive only a run key and a chunk number (small values); they find the engine here. The
engine owns the gate that stops submissions (fail fast, credits exhausted), the credit budget, the
counters of the summary, and the callbacks that move results from the poller into the store.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cleanlist.client import CleanlistClient
from cleanlist.errors import APIError
from cleanlist.models import WorkflowStatus, credits_for, worst_case_credits
from cleanlist.poller import TrackedWorkflow, WorkflowPoller
from cleanlist.store import ContactResult, EnrichmentStore
from tasks.workspace import ACCEPTED, RunWorkspace

logger = logging.getLogger("cleanlist.run")


@dataclass
class RunOptions:
    """Per-run options the tasks need (a subset of the flow's parameters)."""

    enrichment_type: str = "partial"
    webhook_url: str | None = None
    refresh_days: float = 30.0
    max_credits: float | None = None
    chunk_size: int = 250
    inline_rate_limit_retries: int = 3

    @property
    def fresh_after(self) -> datetime | None:
        if self.refresh_days <= 0:
            return None
        return datetime.now(UTC) - timedelta(days=self.refresh_days)


@dataclass
class RunCounters:
    rows_read: int = 0
    rejected: int = 0
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
    chunk_attempts: int = 0
    rate_limited: int = 0
    pauses: int = 0

    @property
    def retries(self) -> int:
        """Bulk attempts beyond the first of each chunk (Prefect retries and inline Retry-After waits)."""
        return max(self.chunk_attempts - self.workflows_accepted - self.chunks_failed, 0)


class SubmissionGate:
    """Whether new bulk requests may be sent: closed for good on 401/403, paused on 402."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fatal: APIError | None = None
        self.credits_exhausted = False

    @property
    def open(self) -> bool:
        with self._lock:
            return self.fatal is None and not self.credits_exhausted

    def fail(self, error: APIError) -> None:
        with self._lock:
            if self.fatal is None:
                self.fatal = error

    def exhaust_credits(self) -> None:
        with self._lock:
            self.credits_exhausted = True

    def credits_returned(self) -> None:
        with self._lock:
            self.credits_exhausted = False


@dataclass
class _Accepted:
    keys: tuple[str, ...]
    task_ids: tuple[str, ...]
    worst_case: float


@dataclass
class RunEngine:
    run_id: str
    client: CleanlistClient
    store: EnrichmentStore
    workspace: RunWorkspace
    options: RunOptions
    gate: SubmissionGate = field(default_factory=SubmissionGate)
    counters: RunCounters = field(default_factory=RunCounters)
    poller: WorkflowPoller | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _open: dict[str, _Accepted] = field(default_factory=dict)
    _committed_worst_case: float = 0.0
    _reserved: dict[int, float] = field(default_factory=dict)

    def start_poller(self, *, initial_estimate: float, timeout: float) -> WorkflowPoller:
        self.poller = WorkflowPoller(
            self.client,
            on_result=self._on_result,
            on_gone=self._on_gone,
            on_fatal=self.gate.fail,
            initial_estimate=initial_estimate,
            timeout=timeout,
        )
        self.poller.start()
        return self.poller

    # -- budget ------------------------------------------------------------------------------------
    def committed_credits(self) -> float:
        """Worst case of chunks being submitted and workflows in flight, plus what completed ones cost."""
        with self._lock:
            return sum(self._reserved.values()) + self._committed_worst_case + self.counters.credits_spent

    def reserve(self, chunk_no: int, contacts: int) -> bool:
        """Reserve a chunk's worst case before submitting it; False if that would break --max-credits."""
        need = worst_case_credits(self.options.enrichment_type, contacts)
        if (
            self.options.max_credits is not None
            and self.committed_credits() + need > self.options.max_credits + 1e-9
        ):
            return False
        with self._lock:
            self._reserved[chunk_no] = need
        return True

    def unreserve(self, chunk_no: int) -> None:
        """The chunk's task ended: its workflow (if any) now carries the worst case."""
        with self._lock:
            self._reserved.pop(chunk_no, None)

    # -- accepted workflows --------------------------------------------------------------------------
    def accepted(self, workflow_id: str, keys: list[str], task_ids: list[str], *, tag: object) -> None:
        """Record a workflow the API just accepted, then start polling it."""
        worst = worst_case_credits(self.options.enrichment_type, len(keys))
        self.store.record_accepted(
            self.run_id,
            workflow_id=workflow_id,
            chunk_key=str(tag),
            enrichment_type=self.options.enrichment_type,
            keys=keys,
            task_ids=task_ids,
            worst_case_credits=worst,
        )
        self.workspace.set_state(keys, ACCEPTED)
        with self._lock:
            self._open[workflow_id] = _Accepted(tuple(keys), tuple(task_ids), worst)
            self._committed_worst_case += worst
            self.counters.submitted += len(keys)
            self.counters.workflows_accepted += 1
        self._track(workflow_id, len(keys), tag=tag, poll_now=False)

    def resume(self, workflow_id: str) -> bool:
        """Poll a workflow an earlier run left in flight; False if the store does not know it."""
        record = self.store.workflow(workflow_id)
        if record is None:
            return False
        with self._lock:
            if workflow_id in self._open:
                return True
            self._open[workflow_id] = _Accepted(record.contact_keys, record.task_ids, 0.0)
        self._track(workflow_id, len(record.contact_keys), tag="resumed", poll_now=True)
        return True

    def _track(self, workflow_id: str, contacts: int, *, tag: object, poll_now: bool) -> None:
        assert self.poller is not None
        workflow = TrackedWorkflow(workflow_id, time.monotonic(), contacts, tag=tag)
        self.poller.track(workflow, poll_now=poll_now)

    def _close(self, workflow_id: str) -> _Accepted | None:
        with self._lock:
            entry = self._open.pop(workflow_id, None)
            if entry is not None:
                self._committed_worst_case -= entry.worst_case
            return entry

    def _on_result(self, workflow: TrackedWorkflow, status: WorkflowStatus) -> None:
        entry = self._open.get(workflow.workflow_id)
        if entry is None:
            return
        by_task = {result.task_id: result for result in status.results}
        results: list[ContactResult] = []
        for key, task_id in zip(entry.keys, entry.task_ids, strict=True):
            result = by_task.get(task_id)
            if result is None:
                results.append(ContactResult(key, task_id, "missing", None, None, (), (), {}))
                continue
            results.append(
                ContactResult(
                    contact_key=key,
                    task_id=task_id,
                    status=result.status,
                    primary_email=result.primary_email,
                    primary_email_status=result.primary_email_status,
                    other_emails=tuple(result.emails),
                    phones=tuple(result.phones),
                    raw=result.model_dump(mode="json"),
                )
            )
        charged = credits_for(self.options.enrichment_type, status.results)
        self.store.record_results(
            workflow.workflow_id, results, state=status.status.lower(), credits_charged=charged
        )
        logger.info(
            "workflow %s (%s) %s: %d emails, %d phones, %.0f credits",
            workflow.workflow_id,
            f"chunk {workflow.tag:05d}" if isinstance(workflow.tag, int) else "resumed",
            status.status.lower(),
            sum(1 for r in status.results if r.primary_email),
            sum(1 for r in status.results if r.phones),
            charged,
        )
        self._close(workflow.workflow_id)
        with self._lock:
            self.counters.credits_spent += charged
            self.counters.emails_found += sum(1 for r in status.results if r.primary_email)
            self.counters.phones_found += sum(1 for r in status.results if r.phones)
            self.counters.workflows_completed += 1

    def count(self, **increments: int) -> None:
        """Add to counters from any thread."""
        with self._lock:
            for name, value in increments.items():
                setattr(self.counters, name, getattr(self.counters, name) + value)

    def _on_gone(self, workflow: TrackedWorkflow, reason: str) -> None:
        logger.warning(
            "workflow %s %s; its contacts stay recorded for a later run", workflow.workflow_id, reason
        )
        self.store.mark_workflow(workflow.workflow_id, reason)
        self._close(workflow.workflow_id)


_ENGINES: dict[str, RunEngine] = {}
_ENGINES_LOCK = threading.Lock()


def register(engine: RunEngine) -> None:
    with _ENGINES_LOCK:
        _ENGINES[engine.run_id] = engine


def unregister(run_id: str) -> None:
    with _ENGINES_LOCK:
        _ENGINES.pop(run_id, None)


def engine_for(run_id: str) -> RunEngine:
    with _ENGINES_LOCK:
        return _ENGINES[run_id]


def current_engine() -> RunEngine | None:
    """The most recently started run of this process (for a progress display)."""
    with _ENGINES_LOCK:
        return next(reversed(_ENGINES.values()), None)
