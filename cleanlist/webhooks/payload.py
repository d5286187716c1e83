"""The `enrichment.completed` body [doc]: a workflow's final status, ≤ 250 results, and where the rest is."""

from __future__ import annotations

from pydantic import Field

from cleanlist.models import WorkflowStatus

COMPLETED_EVENT = "enrichment.completed"


class WebhookPayload(WorkflowStatus):
    """What the API POSTs when a workflow completes; unknown fields are kept, as in status answers."""

    event: str = COMPLETED_EVENT
    lead_list_id: str | None = None
    results_limit: int | None = None
    results_truncated: int = Field(default=0, ge=0)
    """How many results did not fit: fetch them from `results_endpoint` (a status call)."""
    results_endpoint: str | None = None
