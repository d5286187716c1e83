"""The registry of sinks: which kind of sink writes an output, by its scheme or its extension.

To add a kind of sink, write one module with its class (`RowSink`) and its `SinkKind`, and add that
`SinkKind` to `SINKS` below. The registry is a tuple: fixed at import, never changed at run time.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from cleanlist.errors import InputError
from cleanlist.io.dbsink import DATABASE_SINK
from cleanlist.io.filesink import CSV_SINK, JSONL_SINK, PARQUET_SINK
from cleanlist.io.sink import RowSink, SinkKind, SinkOptions

SINKS: Final[tuple[SinkKind, ...]] = (CSV_SINK, PARQUET_SINK, JSONL_SINK, DATABASE_SINK)


def _scheme(destination: str) -> str | None:
    head, sep, _ = destination.partition("://")
    return head.split("+", 1)[0].lower() if sep else None


def _extension(destination: str) -> str:
    return Path(destination.split("?", 1)[0]).suffix.lower()


def file_extensions() -> list[str]:
    return [ext for kind in SINKS for ext in kind.extensions]


def sink_kind(output: str, table: str | None = None) -> SinkKind:
    """The kind of sink `output` names: with `table`, a database by the URL's scheme; else a file by
    its extension."""
    if table is not None:
        scheme = _scheme(output)
        for kind in SINKS:
            if scheme is not None and scheme in kind.schemes:
                return kind
        raise InputError(
            f"--table needs a database URL as output (sqlite:///… or postgresql://…), not {output!r}"
        )
    extension = _extension(output)
    for kind in SINKS:
        if extension in kind.extensions:
            return kind
    shown = ", ".join(file_extensions()[:-1]) + " or " + file_extensions()[-1]
    raise InputError(f"output {output!r} must end in {shown} (or be a database URL)")


def output_format(output: str) -> str:
    """The name of the file format `output` is written in (`csv`, `parquet`, `jsonl`)."""
    return sink_kind(output).name


def open_sinks(
    output: str,
    rejects: str,
    table: str | None,
    *,
    raw_csv: bool = False,
    scratch_dir: Path | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[RowSink, RowSink]:
    """Sinks for the output and the rejects: files by extension, or with `table` two database tables.

    `raw_csv` turns off the spreadsheet-safe prefix of CSV files; `scratch_dir` holds their temporary
    files (default: the system's temp directory); `storage_options` go to fsspec for remote URLs. None
    of them applies to database tables.
    """
    options = SinkOptions(
        table=table, raw_csv=raw_csv, scratch_dir=scratch_dir, storage_options=dict(storage_options or {})
    )
    return sink_kind(output, table).open_pair(output, rejects, options)
