"""One run's incremental read of its source: the mark it reads past, what it saw, the mark it leaves.

The mark is read from the store when the run opens (ignored with `full_refresh`) and advanced to the
largest cursor value read only once the run has completed — every row it read settled; a failed,
paused-out, budget-capped, partly failed or `incomplete` run (rows still pending: held by another live
run, or accepted with no answer yet) leaves it where it was, so the next run reads those rows again.
"""

from __future__ import annotations

from dataclasses import dataclass

from cleanlist.io.cursor import CursorFilter, Watermark, source_identity
from cleanlist.run.options import EnrichOptions
from cleanlist.store import EnrichmentStore


@dataclass
class IncrementalRead:
    source_id: str
    source: str  # as shown: no password
    column: str
    stored: Watermark | None  # the mark in the store when the run opened
    used: Watermark | None  # the mark this run reads past (None with full_refresh or before any)
    seen: Watermark | None = None
    skipped: int = 0

    @classmethod
    def open(cls, store: EnrichmentStore, options: EnrichOptions) -> IncrementalRead | None:
        """The run's incremental read, or None when the run has no cursor."""
        if options.cursor is None:
            return None
        source_id, shown = source_identity(options.source, options.sql_query, options.cursor)
        stored = store.source_mark(source_id)
        return cls(source_id, shown, options.cursor, stored, None if options.full_refresh else stored)

    def cursor_filter(self) -> CursorFilter:
        return CursorFilter(self.column, after=self.used)

    def read(self, seen: Watermark | None, skipped: int) -> None:
        """What staging reported: the largest value read and the rows left out."""
        self.seen, self.skipped = seen, skipped

    def next_mark(self, *, completed: bool) -> Watermark | None:
        """The mark after this run: the largest value read if it completed (and read any), else as it was.

        `completed` means status `completed`: no row left pending (`RunStatus.INCOMPLETE` is not)."""
        return self.seen if completed and self.seen is not None else self.stored

    def summary_fields(self, *, completed: bool) -> dict[str, object]:
        """The RunSummary's incremental fields."""
        after = self.next_mark(completed=completed)
        return {
            "cursor_mark_used": self.used.text if self.used is not None else None,
            "cursor_mark_new": after.text if after is not None else None,
            "skipped_by_cursor": self.skipped,
        }

    def advance(self, store: EnrichmentStore, run_id: str) -> None:
        """Store the mark a completed run reached (nothing when it read no cursor value)."""
        if self.seen is not None:
            store.advance_source_mark(
                self.source_id, source=self.source, cursor_column=self.column, mark=self.seen, run_id=run_id
            )
