"""Durable enrichment state: claims, the ledger of accepted workflows, results and runs."""

from cleanlist.store.enrichment_store import EnrichmentStore
from cleanlist.store.records import ClaimOutcome, ContactResult, RunRecord, StoredResult, WorkflowRecord

__all__ = ["ClaimOutcome", "ContactResult", "EnrichmentStore", "RunRecord", "StoredResult", "WorkflowRecord"]
