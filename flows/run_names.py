"""Readable flow run names: `enrich crm.csv 2026-11-30`, `backfill crm.csv 2026-11-30`, shards by shard.

Prefect calls these with no arguments once the run starts (the run's parameters are in
`prefect.runtime`). A name must never fail a run nor show a secret: only the last segment of a path or
URL is used (never its user, password or query; its host only when the path is empty), and anything
unexpected falls back to "source" and the date.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from prefect.runtime import flow_run

MAX_LABEL = 60
# Backfill children are created with their shard's name (flows/backfill_contacts.py); they keep it.
NAMED_BY_CREATOR_TAG = "backfill-shard"


def source_label(source: object) -> str:
    """A short, secret-free name of a source: its file name, database name or block name."""
    text = str(source or "").strip()
    if text.startswith("block:"):
        label = text.rpartition("/")[2]
    elif "://" in text:
        try:
            parts = urlsplit(text)
            label = os.path.basename(parts.path.rstrip("/")) or (parts.hostname or parts.scheme)
        except ValueError:
            label = text.split("://", 1)[0]
    else:
        label = os.path.basename(text.rstrip("/\\")) or text
    label = " ".join(label.split())  # no newlines or tabs in a run name
    return label[:MAX_LABEL] or "source"


def _run_date() -> str:
    when: Any = None
    try:
        when = flow_run.scheduled_start_time
    except Exception:  # not in a run, or Prefect could not say
        when = None
    return (when if isinstance(when, datetime) else datetime.now(UTC)).strftime("%Y-%m-%d")


def _named(verb: str) -> str:
    try:
        label = source_label(flow_run.parameters.get("source"))
    except Exception:  # a name never fails a run
        label = "source"
    return f"{verb} {label} {_run_date()}"


def enrich_run_name() -> str:
    """`enrich <source> <date>`; a backfill shard keeps the name its parent gave it."""
    try:
        if NAMED_BY_CREATOR_TAG in (flow_run.tags or []) and flow_run.name:
            return str(flow_run.name)
    except Exception:
        pass
    return _named("enrich")


def backfill_run_name() -> str:
    """`backfill <source> <date>`; its shards are named `<this name> shard-NNNNN`."""
    return _named("backfill")
