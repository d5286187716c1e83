"""What a run reports: the summary of an enrich run, the report of a dry run, as typed data.

The flow returns them, writes them as its table artifact and logs them; the CLI prints them (a run's as
the report of cleanlist/run/report.py, a dry run's as a table, either as one JSON line with `--json`); the
backfill reads its children's back from their artifacts with `from_table`.
"""

from __future__ import annotations

import json
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, field_validator

from cleanlist.vocab import EnrichmentType, RunStatus


class _Report(BaseModel):
    model_config = ConfigDict(extra="ignore")

    def as_dict(self) -> dict[str, Any]:
        """JSON-compatible, in field order (what `--json` prints)."""
        return self.model_dump(mode="json")

    def table_rows(self) -> list[dict[str, Any]]:
        """`[{metric, value}]` for a Prefect table artifact; nested values as compact JSON text."""
        return [
            {"metric": name, "value": json.dumps(value) if isinstance(value, dict | list) else value}
            for name, value in self.as_dict().items()
        ]

    @classmethod
    def from_table(cls, rows: Any) -> Self:
        """Back from `table_rows()` (as the artifact's data: a list, or its JSON text)."""
        data = json.loads(rows) if isinstance(rows, str) else rows
        return cls.model_validate(
            {str(row["metric"]): row.get("value") for row in data or [] if "metric" in row}
        )


def _json_text(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


class RunSummary(_Report):
    """The counts of one enrich-contacts run, built from its counters at the end."""

    status: RunStatus
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
    chunks: int = 0
    chunks_failed: int = 0
    workflows: int = 0
    status_calls: int = 0
    retries: int = 0
    rate_limited: int = 0
    rate_limit: str = ""
    rate_limits_learned: dict[str, str] = {}  # what the limiter went by at the end, where it differs
    # The learned limits that made requests wait, one line: "enrich-bulk 4/3s (learned)" ("" if none).
    learned_limits: str = ""
    pauses: int = 0
    unresolved: int = 0  # contacts paid for whose answer has not come: a rerun asks for them by task id
    task_lookups: int = 0  # status calls by task id, for tasks a workflow answer left out
    ambiguous_submissions: int = 0  # bulk requests whose answer was lost after sending: maybe paid twice
    ambiguous_contacts: int = 0  # the contacts of those requests (at most this many paid twice)
    # Rows still pending at the end (status `incomplete`): of their contacts, those another live run
    # held (claimed, not yet submitted by it), and those accepted whose answer has not come.
    unsettled_rows: int = 0
    held_by_other_runs: int = 0
    awaiting_answers: int = 0
    row_statuses: dict[str, int] = {}
    rejects_by_reason: dict[str, int] = {}
    output: str = ""
    rejects: str = ""
    seconds: float = 0.0
    # Incremental sources (`cursor`): the mark this run read past (None: every row was read), the mark
    # after it (advanced only when the run completed), and the rows left out because a previous
    # completed run already handled them (they are in neither this run's output nor its rejects).
    cursor_mark_used: str | None = None
    cursor_mark_new: str | None = None
    skipped_by_cursor: int = 0
    webhook_deliveries: int = 0  # workflows settled from a webhook delivery
    status_calls_saved: int = 0  # status calls those deliveries made unnecessary
    webhook_fallbacks: int = 0  # workflows whose delivery was overdue, polled instead
    # The deliveries log, asked once per overdue workflow (cleanlist/webhooks/failures.py): how many
    # times, workflows whose deliveries failed per kind ("502 from https://h"), those failed for good,
    # and the report's lines ("12 deliveries failed: 502 from https://h — your proxy …").
    deliveries_log_calls: int = 0
    webhook_failures: dict[str, int] = {}
    webhook_failed_for_good: int = 0
    webhook_failure_report: list[str] = []

    # What the report needs beyond the counts: the enrichment type (the worst case of a request in doubt),
    # the run's credit cap and the balance left when the run learned it (None: not known).
    enrichment_type: str = ""
    credit_cap: float | None = None
    balance_left: float | None = None

    _parse_nested = field_validator(
        "row_statuses",
        "rejects_by_reason",
        "rate_limits_learned",
        "webhook_failures",
        "webhook_failure_report",
        mode="before",
    )(_json_text)


class DryRunReport(_Report):
    """What a dry run would submit and cost; nothing was sent."""

    status: RunStatus = RunStatus.DRY_RUN
    rows_read: int
    rejected: int
    duplicates: int
    fresh_in_store: int
    in_flight: int
    to_submit: int
    chunks: int
    worst_case_credits: float
    expected_credits: float
    balance: float
    key_valid: bool
    output: str
    rejects: str


# A planning guess of the share of the worst case actually charged (failed lookups are free).
EXPECTED_FIND_SHARE: dict[str, float] = {
    EnrichmentType.NONE: 0.0,
    EnrichmentType.PARTIAL: 0.8,
    EnrichmentType.PHONE_ONLY: 0.3,
    EnrichmentType.FULL: 0.35,
    EnrichmentType.PROSPECTING_ONLY: 0.8,
}
