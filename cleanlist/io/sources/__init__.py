"""Read contact sources (CSV/TSV, Parquet, JSONL, XLSX, SQL) as bounded batches with global row numbers.

Every batch covers a contiguous range of input rows `[first_row, end_row)`: the rows that parsed into
the header's shape are in `frame`, whose index holds their global 0-based row numbers, and the rows
that did not are in `bad_rows`, each with its own row number and a reason. So every input row is in
exactly one of the two, and `len(frame) + len(bad_rows) == end_row - first_row == batch_rows` for every
batch but the last. A source without data rows still yields one (empty) batch, so its columns are known
without a second read. Row numbers count data rows (the header is not a row); blank lines carry no
data and are skipped without a number.

A BadRow's reason starts with its row number. For JSONL and XLSX, where the user looks for the row by
another number, that place follows in parentheses: "row 7 (line 8)" (rows count data rows from 0, lines
count every physical line of the file from 1, blank ones included) and "row 2 (sheet 'Contacts' row 4)"
(Excel's own row number). A JSONL line that is not a JSON object keeps its raw text at the end of the
reason, after a colon (and under "_raw"), so the rejects show what was there.

Text formats (delimited, JSONL, XLSX) give every column the pandas `str` dtype: values are never
type-inferred (leading zeros stay) and an empty value is a missing value (NaN). Parquet and SQL keep
their native dtypes, except a SQL column whose values Arrow cannot hold as one type (ints and 'n/a' from
a SQLite column, a JSON field of numbers and strings, UUIDs): it is read as text (`_storable`). Header
names are made unique the way pandas does ("Email", "Email.1") and an empty one becomes `column_<n>`;
whether two similar columns are ambiguous is for header mapping to decide.
NUL characters are removed from text values of every format at read time (they break CSV tools and
databases; an .xlsx cannot hold them).

Delimited files: the delimiter is `,` `;` tab or `|`, taken from the header line when only one of them
occurs there, else sniffed from the first 64 KiB (`.tsv` is always tab; an Excel `sep=;` line is obeyed).
Lines end with LF, CRLF or a bare CR (old Mac exports), mixed in one file if need be; a quoted cell keeps
the CR or LF inside it as one cell. A row with fewer fields than the header is padded with missing
values (exports drop trailing empty fields); a row with more is a BadRow, unless the extra fields are
all empty (a trailing delimiter).

Encodings of text files (delimited and JSONL; see `_Text`): with `encoding` (any Python codec name:
cp1251, latin-1, utf-16, …) the whole file is decoded with it. Otherwise a UTF-16 byte-order mark (or
the NUL pattern of BOM-less UTF-16) makes the file UTF-16; else every line that is valid UTF-8 is
UTF-8 (a UTF-8 BOM is dropped), and the lines that are not are decoded with one legacy code page,
detected with charset-normalizer from the first 64 KiB of such lines. When several code pages fit the
sample equally well the more common one wins (CP-1252, then CP-1251, CP-1250, …), and one INFO line on
the logger "cleanlist.sources" names the code page used, "detected", and the others that would fit
(choose with `encoding`). A byte the code page leaves undefined is kept as its Latin-1 character. A
file that looks binary is an InputError.

Workbooks (.xlsx): a sheet without any value does not count. A workbook with one sheet is read; one with
several and no `sheet` is refused with one line naming them, since rows on a sheet nobody named would
be in neither the output nor the rejects. `sheet="NAME"` reads that sheet (matched exactly, else
ignoring case and surrounding spaces; an unknown name is refused, listing the sheets). `sheet="*"`
reads every sheet, in workbook order, as one list: each sheet's header row must equal the first sheet's
(a sheet with another header is refused, named), header rows after the first are not rows, and row
numbers continue from sheet to sheet. `sheet` with a source that is not a workbook is refused, as is
`encoding` with one that is not text.

A truncated or corrupt compressed file (.gz .bz2 .xz), workbook or Parquet file is one InputError line.

One module per kind of source (`delimited`, `jsonl`, `parquet`, `xlsx`, `sql`), chosen through
`registry.py`; what they share is in `base.py` and `text.py`.
"""

from cleanlist.io.location import display_source
from cleanlist.io.sources.base import DEFAULT_BATCH_ROWS, BadRow, SourceBatch
from cleanlist.io.sources.registry import SUPPORTED, iter_source, source_columns

__all__ = [
    "DEFAULT_BATCH_ROWS",
    "SUPPORTED",
    "BadRow",
    "SourceBatch",
    "display_source",
    "iter_source",
    "source_columns",
]
