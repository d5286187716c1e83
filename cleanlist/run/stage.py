"""Staging: read the source in batches, map headers, prepare every row, keep rows and unique contacts.

Memory is bounded by one read batch: prepared rows go to the run's workspace on disk as they are read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from cleanlist.errors import StopRequested
from cleanlist.io.cursor import CursorFilter
from cleanlist.io.sources import iter_source
from cleanlist.prepare import FIELDS, HeaderMapping, api_payload, prepare_row, resolve_mapping
from cleanlist.run.workspace import KEY, REJECT, REJECT_CODE, ROW, RunWorkspace, StagedContact
from cleanlist.vocab import Reject, Watermark

logger = logging.getLogger("cleanlist.stage")


@dataclass(frozen=True)
class StageReport:
    rows_read: int
    rejected: int
    valid_rows: int
    unique_contacts: int
    mapping: str
    # How text that is not UTF-8 was decoded ("cp1251 (detected)", "cp1251 (--encoding)", "utf-16");
    # None when the source is all UTF-8, or not text.
    encoding: str | None = None
    # Rows left out because their cursor was not past the source's mark (handled by an earlier run).
    skipped_by_cursor: int = 0
    # The largest cursor value read: the source's next mark, once the run completes.
    cursor_seen: Watermark | None = None

    @property
    def duplicates(self) -> int:
        return self.valid_rows - self.unique_contacts


def _prepare_frame(
    frame: pd.DataFrame, mapping: HeaderMapping
) -> tuple[list[str | None], list[Reject | None], list[StagedContact]]:
    fields = [f for f in FIELDS if f in mapping.fields]
    columns = [frame[mapping.fields[f]].tolist() for f in fields]
    keys: list[str | None] = []
    rejects: list[Reject | None] = []
    contacts: list[StagedContact] = []
    for values in zip(*columns, strict=True):
        prepared = prepare_row(dict(zip(fields, values, strict=True)))
        keys.append(prepared.key)
        rejects.append(prepared.reject)
        if prepared.key is not None:
            contacts.append(StagedContact(prepared.key, api_payload(prepared.contact)))
    return keys, rejects, contacts


def stage_source(  # noqa: PLR0913 - keyword-only: the read options iter_source takes
    source: str,
    workspace: RunWorkspace,
    *,
    mapping_overrides: Mapping[str, str] | None = None,
    sql_query: str | None = None,
    batch_rows: int = 50_000,
    sheet: str | None = None,
    encoding: str | None = None,
    cursor: CursorFilter | None = None,
    storage_options: Mapping[str, Any] | None = None,
    stop: threading.Event | None = None,
) -> StageReport:
    """Read, prepare and stage every row of `source`; rejects are staged too, with their reason.

    `sheet` and `encoding` are iter_source's: the sheets of a workbook, the codec of a text file.
    With `cursor`, only rows past its mark are read; it tracks the largest value read. A `stop` set
    (the run was asked to stop) ends the reading between two batches with StopRequested.
    """
    mapping: HeaderMapping | None = None
    rows = rejected = valid = skipped = 0
    decoded_as: str | None = None
    batches = iter_source(
        source,
        batch_rows=batch_rows,
        sql_query=sql_query,
        sheet=sheet,
        encoding=encoding,
        cursor=cursor,
        storage_options=storage_options,
    )
    for batch in batches:
        if stop is not None and stop.is_set():
            batches.close()
            raise StopRequested(f"while reading the source, after {rows} rows")
        decoded_as = batch.encoding or decoded_as
        skipped += batch.skipped
        frame = batch.frame
        if mapping is None:
            mapping = resolve_mapping(list(frame.columns), mapping_overrides)
            logger.info("column mapping: %s", mapping.describe())
        keys, rejects, contacts = _prepare_frame(frame, mapping)
        staged = frame.copy()
        staged[ROW] = list(frame.index)
        staged[KEY] = keys
        staged[REJECT] = [r.detail if r is not None else None for r in rejects]
        staged[REJECT_CODE] = [r.code.value if r is not None else None for r in rejects]
        if batch.bad_rows:
            bad = pd.DataFrame([{**row.values} for row in batch.bad_rows], columns=list(frame.columns))
            bad[ROW] = [row.row_number for row in batch.bad_rows]
            bad[KEY] = None
            bad[REJECT] = [row.reason for row in batch.bad_rows]
            bad[REJECT_CODE] = [row.code.value for row in batch.bad_rows]
            staged = pd.concat([staged, bad], ignore_index=True).sort_values(ROW, kind="stable")
        staged = staged.reset_index(drop=True)
        workspace.add_part(staged, contacts)
        rows += len(staged)
        valid += len(contacts)
        rejected += len(staged) - len(contacts)
    if mapping is None:
        workspace.columns = _header_only_columns(source, sql_query, sheet, encoding)
    return StageReport(
        rows_read=rows,
        rejected=rejected,
        valid_rows=valid,
        unique_contacts=workspace.count(),
        mapping=mapping.describe() if mapping else "(no rows)",
        encoding=decoded_as,
        skipped_by_cursor=skipped,
        cursor_seen=cursor.new_mark if cursor is not None else None,
    )


def _header_only_columns(
    source: str, sql_query: str | None, sheet: str | None, encoding: str | None
) -> list[str]:
    from cleanlist.io.sources import source_columns

    return list(source_columns(source, sql_query=sql_query, sheet=sheet, encoding=encoding))
