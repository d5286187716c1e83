"""Incremental reads: a source's cursor column, its high-water mark, and which rows are past it.

A mark is the largest cursor value a completed run read from a source. The next run reads only rows
whose cursor is strictly greater (a `WHERE` with a bound parameter for SQL, a row filter for files);
rows whose cursor is empty or cannot be compared are always read (a row is never dropped for having no
date), and their contacts come from the store without cost if nothing changed.

Values compare as one of three kinds, fixed by the first values seen and kept in the mark:
numbers, timestamps (ISO 8601 text, or a database/Parquet date or time column) and text. A text
column is a number column when every value parses as one, else a timestamp column when every value
parses as ISO 8601, else text (compared as strings).
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from cleanlist.errors import InputError


class CursorKind(enum.StrEnum):
    NUMBER = "number"
    TIMESTAMP = "timestamp"
    TEXT = "text"


@dataclass(frozen=True)
class Watermark:
    """A cursor value as the store keeps it: its kind and its canonical text."""

    kind: CursorKind
    text: str

    def value(self) -> int | float | datetime | str:
        """The mark as a Python value (what is bound to the SQL parameter)."""
        if self.kind is CursorKind.NUMBER:
            return int(self.text) if re.fullmatch(r"-?\d+", self.text) else float(self.text)
        if self.kind is CursorKind.TIMESTAMP:
            return datetime.fromisoformat(self.text)
        return self.text

    @classmethod
    def of(cls, kind: CursorKind, value: Any) -> Watermark:
        if kind is CursorKind.NUMBER:
            if isinstance(value, int | np.integer):
                return cls(kind, str(int(value)))
            number = float(value)
            return cls(kind, str(int(number)) if number.is_integer() else repr(number))
        if kind is CursorKind.TIMESTAMP:
            return cls(kind, pd.Timestamp(value).isoformat())
        return cls(kind, str(value))


def _typed(values: pd.Series, kind: CursorKind | None) -> tuple[CursorKind, pd.Series]:
    """The non-empty values as comparable numbers, timestamps or text (NaN/NaT where one does not parse).

    With `kind` None the kind is chosen from the values (see the module docstring).
    """
    if kind is None:
        if pd.api.types.is_datetime64_any_dtype(values.dtype):
            kind = CursorKind.TIMESTAMP
        elif pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
            kind = CursorKind.NUMBER
        else:
            present = values.dropna()
            if len(present) and pd.to_numeric(present, errors="coerce").notna().all():
                kind = CursorKind.NUMBER
            elif len(present) and _timestamps(present).notna().all():
                kind = CursorKind.TIMESTAMP
            else:
                kind = CursorKind.TEXT
    if kind is CursorKind.NUMBER:
        return kind, pd.to_numeric(values, errors="coerce")
    if kind is CursorKind.TIMESTAMP:
        return kind, _timestamps(values)
    return kind, values.where(values.isna(), values.astype(str))


def _timestamps(values: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        return values
    try:
        return pd.to_datetime(values, errors="coerce", format="ISO8601")
    except (TypeError, ValueError):  # naive and aware values mixed in one column
        return pd.Series(pd.NaT, index=values.index)


@dataclass
class CursorFilter:
    """Keeps the rows of each batch whose `column` is past `after`, and tracks the largest value seen."""

    column: str
    after: Watermark | None = None
    kind: CursorKind | None = None
    seen: Any = None
    skipped: int = 0

    def __post_init__(self) -> None:
        if self.after is not None:
            self.kind = self.after.kind

    def apply(self, frame: pd.DataFrame, *, filtered_already: bool = False) -> pd.DataFrame:
        """The rows of `frame` to read; the others are counted in `skipped`.

        `filtered_already`: the database applied the mark (SQL); only the largest value is tracked.
        """
        if self.column not in frame.columns:
            raise InputError(
                f"the cursor column {self.column!r} is not in the source (columns: "
                f"{', '.join(map(str, frame.columns[:12]))})"
            )
        self.kind, values = _typed(frame[self.column], self.kind)
        if self.after is not None and not filtered_already:
            try:
                past = ~(values <= self.after.value())  # empty or unparsable values are read
            except TypeError:
                raise InputError(
                    f"cursor {self.column!r}: the values no longer compare with the mark {self.after.text} "
                    "(a time zone or type change?); run once with --full-refresh"
                ) from None
            self.skipped += int((~past).sum())
            frame, values = frame.loc[past], values.loc[past]
        top = values.max() if values.notna().any() else None
        if top is not None and (self.seen is None or top > self.seen):
            self.seen = top
        return frame

    @property
    def new_mark(self) -> Watermark | None:
        """The largest value read, as a mark (None when no row had a value)."""
        if self.seen is None or self.kind is None:
            return None
        return Watermark.of(self.kind, self.seen)


def sql_past_mark(query: str, column: str, quote: Callable[[str], str]) -> tuple[str, str]:
    """(rows past the mark, count of rows not past it) of `query`, the mark the parameter `:cleanlist_mark`.

    The user's query is wrapped as a derived table; its colons are escaped so SQLAlchemy's text() binds
    only our parameter. `quote` is the dialect's identifier quoting (the column is a name, not a value).
    Rows whose cursor is NULL are read, as in files.
    """
    inner = query.strip().rstrip(";").strip().replace(":", "\\:")
    name = quote(column)
    source = f"FROM ({inner}) AS cleanlist_source"
    return (
        f"SELECT * {source} WHERE {name} > :cleanlist_mark OR {name} IS NULL",
        f"SELECT COUNT(*) {source} WHERE {name} <= :cleanlist_mark",
    )


def source_identity(source: str, sql_query: str | None, cursor: str) -> tuple[str, str]:
    """(stable id, shown form) of a source for its mark: path or URL without password or query,
    plus the SQL query and the cursor column. Local paths are made absolute."""
    from cleanlist.dburl import hide_passwords
    from cleanlist.io.sources import display_source

    where = source if "://" in source else os.path.abspath(os.path.expanduser(source))
    shown = display_source(hide_passwords(where))
    parts = json.dumps([shown, (sql_query or "").strip(), cursor], ensure_ascii=False)
    return hashlib.sha256(parts.encode()).hexdigest(), shown
