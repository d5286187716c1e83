"""Incremental reads: a source's cursor column, its high-water mark, and which rows are past it.

A mark is the largest cursor value a completed run read from a source. The next run reads only rows
whose cursor is strictly greater (a `WHERE` with a bound parameter for a PostgreSQL column of a matching
type, a row filter otherwise); rows whose cursor is empty are always read (a row is never dropped for
having no date), and their contacts come from the store without cost if nothing changed.

A cursor has a kind, kept with the mark:
- **number**: integers or decimals (text that parses as one, or a numeric column); `inf` and `nan` are
  not numbers here.
- **timestamp**: ISO 8601 text, or a date/time column. Every value is normalized to UTC, so offsets mixed
  in one column (an export spanning a DST change) compare by the instant they name. A value without an
  offset (and a database `timestamp without time zone`) is taken as UTC; marks stored by earlier versions
  without an offset are read the same way.
- **text**: compared as strings, only when chosen explicitly (`cursor_type="text"`): a numeric or date
  column read as text compares "9" above "10" and "n/a" above every number, so one odd value would hide
  every later row.

The kind is the stored mark's, or the one chosen explicitly; without either ("auto") it is inferred from
the first values read: a date/time or numeric column keeps its type; text values are numbers when at
least as many parse as numbers as parse as timestamps, else timestamps. Inference never falls back to
text: a column where no value parses as either stops the run with one line.

A non-empty value that does not fit the kind (`n/a` in a numeric cursor) is a *misfit*: its row goes to
the rejects with the reason (code `bad_cursor_value`), it is never compared and never becomes a mark.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import numpy as np
import pandas as pd

from cleanlist.errors import InputError
from cleanlist.vocab import CursorKind, Watermark

# Misfit values quoted in a reason are cut to this length (a reason is one line).
_SHOWN_VALUE_CHARS = 60


def _utc(moment: pd.Timestamp) -> pd.Timestamp:
    return moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")


@dataclass(frozen=True)
class _Typed:
    """A column's values under a kind: `fit` holds the comparable values of the rows that have one (its
    index is theirs), `misfit` the rows whose value is present but does not fit; other rows are empty."""

    fit: pd.Series
    misfit: pd.Index


def _present(values: pd.Series) -> pd.Series:
    """True where a value is given: not missing, and not blank text."""
    present = values.notna()
    if values.dtype == object or pd.api.types.is_string_dtype(values.dtype):
        blank = values.map(lambda v: isinstance(v, str) and not v.strip())
        present &= ~blank.astype(bool)
    return present


def _is_native_number(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype)


def _numbers(values: pd.Series, column: str) -> _Typed:
    present = values[_present(values)]
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        raise InputError(
            f"cursor {column!r} is a date/time column, not numbers: use --cursor-type timestamp "
            "(with --full-refresh once, to replace a numeric mark)"
        )
    if _is_native_number(values):
        parsed = present
    else:
        text = present.map(lambda v: v.strip() if isinstance(v, str) else v)
        # Booleans and dates are not numbers, whatever pandas would make of them.
        text = text.map(lambda v: None if isinstance(v, bool | np.bool_ | date) else v)
        parsed = pd.to_numeric(text, errors="coerce")
    finite = parsed.notna() & np.isfinite(parsed.astype("float64"))
    fit = parsed[finite]
    if not _is_native_number(values) and len(fit):
        # Parsed again on its own: one misfit made the whole column float (ids past 2**53 lose digits).
        fit = pd.to_numeric(present[finite].map(lambda v: v.strip() if isinstance(v, str) else v))
    return _Typed(fit, present.index[~finite.to_numpy()])


def _timestamps(values: pd.Series, column: str) -> _Typed:
    present = values[_present(values)]
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        stamps = present.dt.tz_localize("UTC") if present.dt.tz is None else present.dt.tz_convert("UTC")
        return _Typed(stamps, pd.Index([]))
    if _is_native_number(values):
        raise InputError(
            f"cursor {column!r} is a numeric column, not timestamps: use --cursor-type number "
            "(with --full-refresh once, to replace a timestamp mark)"
        )
    # Only text and date/time objects can be timestamps (pandas would read a number as nanoseconds).
    candidates = present.map(
        lambda v: v.strip() if isinstance(v, str) else v if isinstance(v, datetime | date) else None
    )
    parsed = pd.Series(pd.NaT, index=present.index, dtype="datetime64[us, UTC]")
    texts = candidates.map(lambda v: isinstance(v, str)).astype(bool)
    objects = candidates.map(lambda v: isinstance(v, datetime | date)).astype(bool)
    if texts.any():
        parsed[texts] = pd.to_datetime(candidates[texts], utc=True, format="ISO8601", errors="coerce")
    if objects.any():
        parsed[objects] = pd.to_datetime(candidates[objects], utc=True, errors="coerce")
    fits = parsed.notna()
    return _Typed(parsed[fits], present.index[~fits.to_numpy()])


def _texts(values: pd.Series) -> _Typed:
    present = values[_present(values)]
    return _Typed(present.astype(str), pd.Index([]))


def _typed(values: pd.Series, kind: CursorKind, column: str) -> _Typed:
    if kind is CursorKind.NUMBER:
        return _numbers(values, column)
    if kind is CursorKind.TIMESTAMP:
        return _timestamps(values, column)
    return _texts(values)


def infer_kind(values: pd.Series, column: str) -> CursorKind | None:
    """The kind of a cursor column from its first values (module docstring); None while none is given.

    Never text: a column where no value is a number or a timestamp is one InputError line.
    """
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        return CursorKind.TIMESTAMP
    if _is_native_number(values):
        return CursorKind.NUMBER
    present = values[_present(values)]
    if not len(present):
        return None
    numbers = _numbers(present, column)
    stamps = _timestamps(present.drop(numbers.fit.index), column)
    if len(numbers.fit) == 0 and len(stamps.fit) == 0:
        examples = ", ".join(_shown(v) for v in present.drop_duplicates().head(3))
        raise InputError(
            f"cursor {column!r} holds neither numbers nor ISO 8601 timestamps (e.g. {examples}): "
            "choose --cursor-type text to compare it as text, or another column"
        )
    return CursorKind.NUMBER if len(numbers.fit) >= len(stamps.fit) else CursorKind.TIMESTAMP


def _shown(value: object) -> str:
    text = str(value)
    return repr(text if len(text) <= _SHOWN_VALUE_CHARS else text[:_SHOWN_VALUE_CHARS] + "…")


@dataclass(frozen=True)
class CursorSplit:
    """One batch through the cursor: the rows to read, and the rows whose value does not fit the kind
    (each with its reason; they belong in the rejects). Rows not past the mark are in neither."""

    kept: pd.DataFrame
    misfits: pd.DataFrame
    reasons: list[str] = field(default_factory=list)


@dataclass
class CursorFilter:
    """Keeps the rows of each batch whose `column` is past `after`, and tracks the largest value seen.

    `kind`: the cursor's kind (module docstring); None = inferred from the first values read. With a
    mark, the mark's kind (the caller checks that an explicit choice agrees).
    """

    column: str
    after: Watermark | None = None
    kind: CursorKind | None = None
    seen: Any = None
    skipped: int = 0
    # Set by the SQL reader when the database applies the mark to a `timestamp without time zone` column.
    naive_sql: bool = False

    def __post_init__(self) -> None:
        if self.after is not None:
            self.kind = self.after.kind

    def apply(self, frame: pd.DataFrame, *, filtered_already: bool = False) -> CursorSplit:
        """The rows of `frame` to read and its misfits; rows not past the mark are counted in `skipped`.

        `filtered_already`: the database applied the mark (SQL); only misfits and the largest value count.
        """
        if self.column not in frame.columns:
            raise InputError(
                f"the cursor column {self.column!r} is not in the source (columns: "
                f"{', '.join(map(str, frame.columns[:12]))})"
            )
        values = frame[self.column]
        if isinstance(values, pd.DataFrame):  # repeated names are made unique by the readers; be safe
            values = values.iloc[:, 0]
        if self.kind is None:
            self.kind = infer_kind(values, self.column)
            if self.kind is None:
                return CursorSplit(frame, frame.iloc[0:0])
        typed = _typed(values, self.kind, self.column)
        fit = typed.fit
        dropped = frame.index.isin(typed.misfit)
        if self.after is not None and not filtered_already:
            mark = self.after.value()
            try:
                not_past = fit[~(fit > mark)].index
            except TypeError:
                raise InputError(
                    f"cursor {self.column!r}: the values no longer compare with the mark {self.after.text} "
                    "(a type change?); run once with --full-refresh"
                ) from None
            self.skipped += len(not_past)
            dropped |= frame.index.isin(not_past)
            fit = fit.drop(not_past)
        if len(fit):
            top = fit.max()
            if self.seen is None or top > self.seen:
                self.seen = top
        misfits = frame.loc[frame.index.isin(typed.misfit)]
        reasons = [
            f"cursor {self.column!r}: {_shown(value)} is not {self.kind.noun} (the cursor's values are "
            f"{self.kind.value}s)"
            for value in values.loc[misfits.index]
        ]
        return CursorSplit(frame.loc[~dropped], misfits, reasons)

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


def sql_column_type(query: str, column: str, quote: Callable[[str], str]) -> str:
    """A query that returns no row and whose one column is `column` of `query` (its type, to probe)."""
    inner = query.strip().rstrip(";").strip()
    return f"SELECT {quote(column)} FROM ({inner}) AS cleanlist_source WHERE 1 = 0"


def source_identity(source: str, sql_query: str | None, cursor: str) -> tuple[str, str]:
    """(stable id, shown form) of a source for its mark: path or URL without password or query,
    plus the SQL query and the cursor column. Local paths are made absolute."""
    from cleanlist.dburl import hide_passwords
    from cleanlist.io.location import display_source

    where = source if "://" in source else os.path.abspath(os.path.expanduser(source))
    shown = display_source(hide_passwords(where))
    parts = json.dumps([shown, (sql_query or "").strip(), cursor], ensure_ascii=False)
    return hashlib.sha256(parts.encode()).hexdigest(), shown
