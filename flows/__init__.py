"""Prefect flows: orchestration only (enrich-contacts, its submit loop and credit pause, backfills)."""
