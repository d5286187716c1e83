"""The store's tables (SQLAlchemy Core) and the schema version this code reads and writes."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator, TypeEngine

# 2: company domains keyed by their registrable part (migrations.rekey_registrable_domains).
# 3: keys folded (NFKC, no zero-width or bidi characters) (migrations.rekey_folded_spellings).
# 4: runs carry their process's boot id and start time (migrations.add_run_process_identity).
# 5: runs name the liveness lock they hold (migrations.add_run_liveness_lock).
# 6: rate slots name the run that took them (migrations.add_rate_slot_owner).
# 7: runs keep their economics as columns (migrations.add_run_economics).
SCHEMA_VERSION: Final = 7
SCHEMA_COMPONENT: Final = "enrichment_store"


@functools.lru_cache(maxsize=4096)
def _utc_from_text(text: str) -> datetime:
    """A stored SQLite time as an aware UTC datetime: a workflow's results share one time, so reading a
    run's results back parses each only once."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on backends with and without time zones."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        # SQLite has no time type: keep UTC as fixed-width ISO text, which sorts in time order and
        # skips a second conversion layer on the million-row paths.
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(26))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given to the store; pass an aware one")
        utc = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return utc.replace(tzinfo=None).isoformat(" ", "microseconds")
        return utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            return _utc_from_text(value)
        parsed: datetime = value
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


metadata = MetaData()

schema_info = Table(
    "cleanlist_schema_info",
    metadata,
    Column("component", String, primary_key=True),
    Column("version", Integer, nullable=False),
)

runs = Table(
    "cleanlist_runs",
    metadata,
    Column("run_id", String, primary_key=True),
    Column("flow_run_id", String),
    Column("host", String, nullable=False),
    Column("pid", Integer, nullable=False),
    # Which process runs it, beyond its pid (cleanlist/store/liveness.py): the kernel's boot id and the
    # process's start time. Null in rows written before schema version 3.
    Column("boot_id", String),
    Column("proc_start", BigInteger),
    # The lock the run holds while open, released by the OS or the server when its process dies
    # (liveness.LOCK_FLOCK, liveness.LOCK_ADVISORY). Null in rows written before schema version 5.
    Column("liveness_lock", String),
    Column("status", String, nullable=False),
    Column("params", Text, nullable=False),
    Column("counts", Text),
    Column("started_at", UtcDateTime, nullable=False),
    Column("heartbeat_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime),
    # The run's economics, for `cleanlist-enrich report` (cleanlist/store/economics.py): its source as
    # shown and its enrichment type from the start, its counts from the end. Null in rows written
    # before schema version 7 that the migration could not fill (a run that never finished).
    Column("source", Text),
    Column("enrichment_type", String),
    Column("submitted", Integer),
    Column("emails_found", Integer),
    Column("phones_found", Integer),
    Column("credits_spent", Float),
)
# What a run sent, found and paid (schema 7): filled at start and finish, read by `cleanlist-enrich report`.
RUN_ECONOMICS_COLUMNS = (
    runs.c.source,
    runs.c.enrichment_type,
    runs.c.submitted,
    runs.c.emails_found,
    runs.c.phones_found,
    runs.c.credits_spent,
)


contacts = Table(
    "cleanlist_contacts",
    metadata,
    Column("contact_key", String, primary_key=True),
    Column("enrichment_type", String, primary_key=True),
    Column("state", String, nullable=False),
    Column("run_id", String),
    # The submission in flight: set only while state is 'accepted'.
    Column("workflow_id", String),
    Column("task_id", String),
    Column("claimed_at", UtcDateTime),
    Column("accepted_at", UtcDateTime),
    # The stored result, kept while a refresh is claimed or in flight.
    Column("result_workflow_id", String),
    Column("result_task_id", String),
    Column("result_status", String),
    Column("primary_email", String),
    Column("primary_email_status", String),
    Column("other_emails", Text),
    Column("phones", Text),
    Column("raw", Text),
    Column("enriched_at", UtcDateTime),
    Index("cleanlist_contacts_workflow_idx", "workflow_id"),
)

workflows = Table(
    "cleanlist_workflows",
    metadata,
    Column("workflow_id", String, primary_key=True),
    Column("run_id", String, nullable=False),
    Column("chunk_key", String, nullable=False),
    Column("enrichment_type", String, nullable=False),
    Column("state", String, nullable=False),
    Column("contact_count", Integer, nullable=False),
    Column("contact_keys", Text, nullable=False),
    Column("task_ids", Text, nullable=False),
    Column("worst_case_credits", Float, nullable=False),
    Column("credits_charged", Float),
    Column("submitted_at", UtcDateTime, nullable=False),
    Column("completed_at", UtcDateTime),
    Index("cleanlist_workflows_state_idx", "state"),
    Index("cleanlist_workflows_run_idx", "run_id"),
)

# The rate limiter's shared book (cleanlist/store/ratebook.py): one row per organization and scope (an
# endpoint, or "*" for an organization-wide window) with its Retry-After hold and what its 429s taught,
# and one row per request slot. Times are epoch seconds on the book's clock.
rate_scopes = Table(
    "cleanlist_rate_scopes",
    metadata,
    Column("organization", String, primary_key=True),
    Column("scope", String, primary_key=True),
    Column("held_until", Float, nullable=False),
    Column("learned_requests", Integer),
    Column("learned_seconds", Float),
    Column("learned_at", Float),
)

rate_slots = Table(
    "cleanlist_rate_slots",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("organization", String, nullable=False),
    Column("scope", String, nullable=False),
    Column("endpoint", String, nullable=False),
    Column("taken", Float, nullable=False),
    Column("stamp", Float, nullable=False),
    Column("in_flight", Boolean, nullable=False),
    Column("ok", Boolean, nullable=False),
    # The run that took the slot (None: an older version, or a book without a run): an in-flight slot of
    # a run proved dead stops being in flight at once, instead of blocking its scope for STALE_IN_FLIGHT.
    Column("run_id", String),
    Index("cleanlist_rate_slots_scope_idx", "organization", "scope", "stamp"),
)

# Incremental sources (cleanlist/store/marks.py): the cursor's high-water mark of each source, as of the
# last completed run that read it. Added without a version bump: create_all adds it to older stores.
source_marks = Table(
    "cleanlist_source_marks",
    metadata,
    Column("source_id", String(64), primary_key=True),  # sha256 of (source, query, cursor column)
    Column("source", Text, nullable=False),  # as shown: no password, no URL query
    Column("cursor_column", String, nullable=False),
    Column("kind", String, nullable=False),
    Column("mark", Text, nullable=False),
    Column("run_id", String, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

# Webhooks (cleanlist/store/webhooks.py): the tokens runs register for their receiver URL, and the
# deliveries a receiver accepted, one per workflow, for the run (or a rerun) to pick up.
webhook_tokens = Table(
    "cleanlist_webhook_tokens",
    metadata,
    Column("token_digest", String, primary_key=True),
    Column("run_id", String, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

webhook_deliveries = Table(
    "cleanlist_webhook_deliveries",
    metadata,
    Column("workflow_id", String, primary_key=True),
    Column("run_id", String, nullable=False),
    Column("status", String, nullable=False),
    Column("results_truncated", Integer, nullable=False),
    Column("payload", Text, nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
)
