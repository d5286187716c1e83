"""A schedule's source: a small messy export in one of the formats the CLI reads.

Rows carry a `Record ID` (the harness's row identity, kept by the CLI in output and rejects), duplicates
(the same contact differently written), invalid rows (no name or no company), invisible characters
(zero-width space, BOM, full-width letters, a right-to-left override: the same person in a form a user
cannot see), and, with a cursor, an `updated` column whose odd values (`n/a`, an empty cell, timestamps
across a DST change with mixed offsets) are what broke cursors before.
"""

from __future__ import annotations

import csv
import json
import random
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pandas as pd

from benchmarks.chaos.invariants import ROW_ID
from benchmarks.chaos.schedule import Schedule

COLUMNS = [ROW_ID, "First Name", "Last Name", "Company", "Website", "LinkedIn URL"]
INVISIBLE = ["\u200b", "\ufeff", "\u200d", "\u202e", "\u00a0"]
ODD_INT_VALUES = ["n/a", ""]


@dataclass(frozen=True)
class Source:
    """Where the CLI reads from (a path, or a SQLAlchemy URL and its query) and what it holds."""

    argument: str
    sql: str | None
    rows: dict[str, str | None]  # row id → cursor value as written (None without a cursor)


def _fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def _cursor_values(schedule: Schedule, count: int, rng: random.Random) -> list[str]:
    if schedule.cursor == "timestamp":
        start = datetime(2026, 3, 29, 0, 0, tzinfo=UTC)
        values = []
        for i in range(count):
            moment = start + timedelta(minutes=7 * i)
            # Around the DST change, an exporter writes local time with the offset of the day.
            offset = timezone(timedelta(hours=1 if i % 2 else 2))
            values.append(moment.astimezone(offset).isoformat())
        return values
    values = [str(i + 1) for i in range(count)]
    for _ in range(schedule.odd_cursor_values):
        values[rng.randrange(count)] = rng.choice(ODD_INT_VALUES)
    return values


def build_rows(schedule: Schedule) -> list[dict[str, str]]:
    rng = random.Random(f"{schedule.seed}:source")
    rows: list[dict[str, str]] = []
    unique = 0
    while len(rows) < schedule.rows:
        i = unique
        unique += 1
        linkedin = f"https://www.linkedin.com/in/p{schedule.seed}-{i}/" if i % 9 == 0 else ""
        row = {"First Name": f"Ann{i}", "Last Name": f"Lee{schedule.seed % 997}x{i}", "Company": f"Co {i}",
               "Website": f"https://co{i}.example/", "LinkedIn URL": linkedin}  # fmt: skip
        draw = rng.random()
        if draw < schedule.invalid_share:
            row = {**row, "Last Name": "", "Company": "", "Website": "", "LinkedIn URL": ""}
        rows.append(row)
        if rng.random() < schedule.duplicate_share:
            rows.append({**row, "First Name": f"  ANN{i} "})
        if rng.random() < schedule.invisible_share:
            mark = rng.choice(INVISIBLE)
            name = _fullwidth(row["First Name"]) if rng.random() < 0.3 else row["First Name"] + mark
            rows.append({**row, "First Name": name})
    rows = rows[: schedule.rows]
    cursors = _cursor_values(schedule, len(rows), rng) if schedule.cursor else [None] * len(rows)
    out: list[dict[str, str]] = []
    for n, (row, cursor) in enumerate(zip(rows, cursors, strict=True)):
        full = {ROW_ID: f"r{schedule.seed}-{n:05d}", **row}
        if cursor is not None:
            full["updated"] = cursor
        out.append(full)
    return out


def write_source(schedule: Schedule, rows: list[dict[str, str]], directory: Path) -> Source:
    """Write `rows` in the schedule's format; numeric cursors are numbers where the format has types."""
    ids = {row[ROW_ID]: row.get("updated") for row in rows}
    frame = pd.DataFrame(rows)
    if schedule.cursor == "int" and not schedule.odd_cursor_values:
        frame["updated"] = frame["updated"].astype("int64")
    fmt = schedule.source_format
    if fmt == "csv":
        path = directory / "source.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return Source(str(path), None, ids)
    if fmt in ("parquet", "dataframe"):  # a frame is read from Parquet by the driver (its dtypes kept)
        path = directory / "source.parquet"
        frame.to_parquet(path, index=False)
        return Source(str(path), None, ids)
    if fmt == "jsonl":
        path = directory / "source.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for record in frame.to_dict(orient="records"):
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        return Source(str(path), None, ids)
    path = directory / "source.db"
    with sqlite3.connect(path) as connection:
        frame.to_sql("contacts", connection, index=False)
    return Source(f"sqlite:///{path}", 'SELECT * FROM contacts ORDER BY "Record ID"', ids)
