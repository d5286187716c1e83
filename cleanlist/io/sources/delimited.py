"""Delimited text sources: .csv .tsv .txt (the delimiter sniffed, see the package docstring)."""

from __future__ import annotations

import csv
from collections.abc import Generator
from itertools import chain

from cleanlist.errors import InputError
from cleanlist.io.sources.base import (
    MAX_FIELD_CHARS,
    SNIFF_BYTES,
    Opener,
    SourceBatch,
    SourceFormat,
    _is_blank,
    _unique_names,
)
from cleanlist.io.sources.text import _Batcher, _Text

SNIFF_DELIMITERS = ",;\t|"


def _sniff_delimiter(sample: list[str]) -> str:
    header = sample[0]
    counts = {d: header.count(d) for d in SNIFF_DELIMITERS}
    present = [d for d in SNIFF_DELIMITERS if counts[d]]
    if len(present) == 1:  # the usual case, and the header cannot be misread by data rows
        return present[0]
    try:
        sniffed = csv.Sniffer().sniff("".join(sample), delimiters=SNIFF_DELIMITERS).delimiter
    except csv.Error:
        sniffed = ""
    if sniffed and counts[sniffed]:
        return sniffed
    # A delimiter that never occurs in the header cannot split it; trust the header's own counts.
    best = max(SNIFF_DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


# A row-by-row state machine (sep= line, header, width checks, blank lines, batches): its branches are
# the cases of the format, kept in one reading order.
def _iter_delimited(  # noqa: C901, PLR0912
    open_source: Opener, shown: str, batch_rows: int, tab: bool, encoding: str | None
) -> Generator[SourceBatch, None, None]:
    # Raising the limit is process-wide but only ever loosens csv's default of 128 KiB.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD_CHARS))
    text = _Text(shown, encoding)
    with open_source() as stream:
        lines = text.lines(stream)
        sample: list[str] = []
        size = 0
        for line in lines:
            if not sample and not line.strip():
                continue  # leading blank lines
            sample.append(line)
            size += len(line)
            if size >= SNIFF_BYTES:
                break
        if not sample:
            raise InputError(f"source '{shown}' is empty")
        first = sample[0].strip()
        if len(first) == 5 and first.lower().startswith("sep="):  # Excel's delimiter hint line
            delimiter = first[4]
            sample = sample[1:]
        else:
            delimiter = "\t" if tab else _sniff_delimiter(sample)
        reader = csv.reader(chain(sample, lines), delimiter=delimiter)
        batcher: _Batcher | None = None
        try:
            header = next((fields for fields in reader if not _is_blank(fields)), None)
            if header is None:
                raise InputError(f"source '{shown}' is empty")
            header[0] = header[0].lstrip("\ufeff")
            batcher = _Batcher(_unique_names(header), batch_rows, text)
            width = len(header)
            add = batcher.add
            for fields in reader:
                if len(fields) != width or width == 1:
                    if _is_blank(fields):
                        continue
                    if len(fields) < width:
                        # Exports often drop trailing empty fields; the missing ones are empty.
                        fields.extend([""] * (width - len(fields)))
                    elif any(extra.strip() for extra in fields[width:]):
                        values: dict[str, object] = dict(zip(batcher.columns, fields, strict=False))
                        values["_extra"] = delimiter.join(fields[width:])
                        reason = f"has {len(fields)} fields, the header has {width}"
                        if (batch := batcher.reject(values, reason)) is not None:
                            yield batch
                        continue
                    else:  # trailing delimiters only
                        del fields[width:]
                if (batch := add(fields)) is not None:
                    yield batch
        except csv.Error as exc:
            row = batcher.next_row if batcher else 0
            raise InputError(
                f"source '{shown}' cannot be parsed at row {row} ({exc}); look for an unbalanced quote"
            ) from None
        if (batch := batcher.finish()) is not None:
            yield batch


DELIMITED = SourceFormat(
    name="delimited",
    extensions=(".csv", ".tsv", ".txt"),
    read=lambda r: _iter_delimited(r.open_source, r.shown, r.batch_rows, r.extension == ".tsv", r.encoding),
    text=True,
)
