"""Excel workbooks: .xlsx, one sheet, a named sheet or every sheet (see the package docstring)."""

from __future__ import annotations

import datetime as dt
import zipfile
import zlib
from collections.abc import Generator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from cleanlist.errors import InputError
from cleanlist.io.sources.base import Opener, SourceBatch, SourceFormat, _first_line, _unique_names
from cleanlist.io.sources.text import _Batcher

ALL_SHEETS = "*"


def _excel_text(value: object) -> object:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, dt.datetime):
        return value.date().isoformat() if value.time() == dt.time() else value.isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # phone numbers and ids typed as numbers
    return str(value)


def _sheet_rows(sheet: Any) -> Generator[tuple[int, list[object]], None, None]:
    """(Excel row number, values as text) of each row of a worksheet that holds a value."""
    sheet.reset_dimensions()  # read-only mode trusts the file's <dimension>; a wrong one cuts rows off
    for number, cells in enumerate(sheet.iter_rows(values_only=True), start=1):
        values = [_excel_text(cell) for cell in cells]
        if any(value is not None and value != "" for value in values):
            yield number, values


def _sheet_header(values: list[object]) -> list[str]:
    values = list(values)
    while values and values[-1] is None:  # formatting widens the sheet, not the header
        values.pop()
    return _unique_names(values)


def _sheet_list(titles: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(f"'{title}'" for title in titles[:limit])
    return f"{shown}, … ({len(titles)} sheets)" if len(titles) > limit else shown


def _header_difference(first: list[str], other: list[str]) -> str:
    for column, (want, got) in enumerate(zip(first, other, strict=False), start=1):
        if want != got:
            return f"column {column} is '{got}', not '{want}'"
    return f"{len(other)} columns, not {len(first)}"


@dataclass
class _Sheet:
    title: str
    worksheet: Any
    header_row: int  # Excel's number of the header row
    header: list[str]


def _chosen_sheets(workbook: Any, shown: str, sheet: str | None) -> list[_Sheet]:
    """The sheets to read, by the rule of the module docstring; their headers are checked up front."""
    worksheets = list(workbook.worksheets)
    if not worksheets:
        raise InputError(f"source '{shown}' has no worksheet")
    candidates = worksheets
    if sheet is not None and sheet != ALL_SHEETS:
        wanted = sheet.strip().casefold()
        candidates = [ws for ws in worksheets if ws.title == sheet] or [
            ws for ws in worksheets if ws.title.strip().casefold() == wanted
        ]
        if len(candidates) != 1:
            titles = [ws.title for ws in worksheets]
            raise InputError(f"workbook '{shown}' has no sheet '{sheet}'; its sheets: {_sheet_list(titles)}")
    chosen: list[_Sheet] = []
    for worksheet in candidates:
        with closing(_sheet_rows(worksheet)) as rows:
            first = next(rows, None)
        if first is not None:
            chosen.append(_Sheet(worksheet.title, worksheet, first[0], _sheet_header(first[1])))
    if not chosen:
        if len(candidates) == 1 and len(worksheets) > 1:
            raise InputError(f"sheet '{candidates[0].title}' of workbook '{shown}' is empty")
        raise InputError(f"source '{shown}' is empty")
    if sheet is None and len(chosen) > 1:
        raise InputError(
            f"workbook '{shown}' has sheets {_sheet_list([s.title for s in chosen])}: name one with --sheet, "
            f"or --sheet '{ALL_SHEETS}' to read every sheet (same header)"
        )
    first_sheet = chosen[0]
    for other in chosen[1:]:
        if other.header != first_sheet.header:
            raise InputError(
                f"sheet '{other.title}' of workbook '{shown}' has another header than sheet "
                f"'{first_sheet.title}' ({_header_difference(first_sheet.header, other.header)}): "
                f"read it on its own with --sheet '{other.title}'"
            )
    return chosen


def _iter_xlsx(
    open_source: Opener, shown: str, batch_rows: int, sheet: str | None
) -> Generator[SourceBatch, None, None]:
    import openpyxl  # type: ignore[import-untyped]
    from openpyxl.utils.exceptions import InvalidFileException  # type: ignore[import-untyped]

    with open_source() as stream:
        if not stream.read(1):
            raise InputError(f"source '{shown}' is empty")
        stream.seek(0)
        try:
            workbook = openpyxl.load_workbook(stream, read_only=True, data_only=True)
        except (zipfile.BadZipFile, InvalidFileException, KeyError, OSError, zlib.error, SyntaxError) as exc:
            raise InputError(f"source '{shown}' is not a readable .xlsx file ({_first_line(exc)})") from None
        try:
            yield from _xlsx_batches(_chosen_sheets(workbook, shown, sheet), batch_rows)
        except (zipfile.BadZipFile, KeyError, EOFError, zlib.error, SyntaxError) as exc:
            # Sheets are read as they stream: a damaged part of the archive shows up here.
            raise InputError(f"source '{shown}' is truncated or corrupt (xlsx): {_first_line(exc)}") from None
        finally:
            workbook.close()


# The same state machine as _iter_delimited, over worksheet rows.
def _xlsx_batches(sheets: list[_Sheet], batch_rows: int) -> Generator[SourceBatch, None, None]:
    batcher = _Batcher(sheets[0].header, batch_rows)
    width = len(batcher.columns)
    for sheet in sheets:
        for number, values in _sheet_rows(sheet.worksheet):
            if number <= sheet.header_row:
                continue  # the header (no row above it holds a value)
            if len(values) > width:
                extra = values[width:]
                if any(value not in (None, "") for value in extra):
                    row: dict[str, object] = dict(zip(batcher.columns, values, strict=False))
                    row["_extra"] = "\t".join("" if value is None else str(value) for value in extra)
                    reason = f"has {width + len(extra)} cells, the header has {width}"
                    where = f"sheet '{sheet.title}' row {number}"
                    if (batch := batcher.reject(row, reason, where)) is not None:
                        yield batch
                    continue
                del values[width:]
            elif len(values) < width:
                values.extend([None] * (width - len(values)))
            if (batch := batcher.add(values)) is not None:
                yield batch
    if (batch := batcher.finish()) is not None:
        yield batch


XLSX = SourceFormat(
    name="xlsx",
    extensions=(".xlsx",),
    read=lambda r: _iter_xlsx(r.open_source, r.shown, r.batch_rows, r.sheet),
    sheets=True,
)
