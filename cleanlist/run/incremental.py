"""One run's incremental read of its source: the mark it reads past, what it saw, the mark it leaves.

The mark is read from the store when the run opens (ignored with `full_refresh`) and advanced to the
largest cursor value read only once the run has completed — every row it read settled; a failed,
paused-out, budget-capped, partly failed or `incomplete` run (rows still pending: held by another live
run, or accepted with no answer yet) leaves it where it was, so the next run reads those rows again.

The cursor's kind (number, timestamp, text: cleanlist/io/cursor.py) is the stored mark's; `cursor_type`
may name it, and must then agree with the mark (else one line: `--full-refresh` replaces the mark). A
text mark is used only with `cursor_type="text"`: earlier versions fell back to text when one value was
not a number (`n/a`), and such a mark hides every later number, so "auto" refuses it with one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from cleanlist.errors import InputError
from cleanlist.io.cursor import CursorFilter, source_identity
from cleanlist.run.options import EnrichOptions
from cleanlist.store import EnrichmentStore
from cleanlist.vocab import CursorKind, Watermark


@dataclass
class IncrementalRead:
    source_id: str
    source: str  # as shown: no password
    column: str
    stored: Watermark | None  # the mark in the store when the run opened
    used: Watermark | None  # the mark this run reads past (None with full_refresh or before any)
    kind: CursorKind | None = None  # chosen with cursor_type; None = the mark's, else inferred
    seen: Watermark | None = None
    skipped: int = 0

    @classmethod
    def open(cls, store: EnrichmentStore, options: EnrichOptions) -> IncrementalRead | None:
        """The run's incremental read, or None when the run has no cursor."""
        if options.cursor is None:
            return None
        source_id, shown = source_identity(options.source, options.sql_query, options.cursor)
        stored = store.source_mark(source_id)
        kind = None if options.cursor_type == "auto" else CursorKind(options.cursor_type)
        used = None if options.full_refresh else stored
        if used is not None:
            _check_mark_kind(options.cursor, used, kind)
        return cls(source_id, shown, options.cursor, stored, used, kind)

    def cursor_filter(self) -> CursorFilter:
        return CursorFilter(self.column, after=self.used, kind=self.kind)

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


def _check_mark_kind(column: str, mark: Watermark, kind: CursorKind | None) -> None:
    """One line, before anything is read, when the stored mark cannot be used as `kind` asks."""
    if kind is None and mark.kind is CursorKind.TEXT:
        raise InputError(
            f"cursor {column!r}: the stored mark {mark.text!r} compares as text (an earlier version fell "
            "back to text when a value was not a number or timestamp, hiding later rows); run once with "
            "--full-refresh to read every row and store a typed mark, or pass --cursor-type text"
        )
    if kind is not None and kind is not mark.kind:
        raise InputError(
            f"cursor {column!r}: the stored mark {mark.text!r} is a {mark.kind.value}, not a {kind.value}; "
            f"run once with --full-refresh --cursor-type {kind.value} to replace it"
        )
