"""High-water marks of incremental sources: read before a run, advanced only when a run completed.

A mark is stored with its kind (number, timestamp, text; cleanlist/io/cursor.py). Timestamps are written
in UTC with their offset; marks of earlier versions (no offset, or another offset) are read as they are
and compared as UTC instants (no offset = UTC), so no migration is needed.
"""

from __future__ import annotations

from sqlalchemy import Connection, select

from cleanlist.store.claims import insert_for
from cleanlist.store.codec import utc_now
from cleanlist.store.schema import source_marks
from cleanlist.vocab import CursorKind, Watermark


def read_mark(conn: Connection, source_id: str) -> Watermark | None:
    """The mark of a source, or None before its first completed run."""
    row = conn.execute(
        select(source_marks.c.kind, source_marks.c.mark).where(source_marks.c.source_id == source_id)
    ).first()
    return Watermark(CursorKind(row.kind), row.mark) if row is not None else None


def write_mark(
    conn: Connection, *, source_id: str, source: str, cursor_column: str, mark: Watermark, run_id: str
) -> None:
    """Set the mark of a source (insert or replace)."""
    values = {
        "source_id": source_id,
        "source": source,
        "cursor_column": cursor_column,
        "kind": mark.kind.value,
        "mark": mark.text,
        "run_id": run_id,
        "updated_at": utc_now(),
    }
    stmt = insert_for(conn, source_marks).values(values)
    changed = {name: stmt.excluded[name] for name in values if name != "source_id"}
    conn.execute(stmt.on_conflict_do_update(index_elements=[source_marks.c.source_id], set_=changed))
