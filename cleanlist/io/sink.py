"""What a sink is: where a run's rows go (output or rejects), behind one protocol.

A sink takes frames (`write`), then either `commit` (the rows appear, all at once) or `abort` (nothing
appears). A kind of sink is one module that defines its class and one `SinkKind`, registered in
`cleanlist/io/outputs.py`. The join of results to rows (`cleanlist/run/write.py`) knows only `RowSink`.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import fsspec
import pandas as pd

from cleanlist.errors import InputError


class RowSink(Protocol):
    """Where rows go. `wants_keys`: give each output row its contact key (`cleanlist_contact_key`)."""

    @property
    def wants_keys(self) -> bool: ...
    def write(self, frame: pd.DataFrame) -> None: ...
    def commit(self, columns: Sequence[str]) -> None: ...
    def abort(self) -> None: ...


@dataclass(frozen=True)
class SinkOptions:
    """How a run's sinks are opened: `table` for a database output; `raw_csv` turns off the
    spreadsheet-safe prefix of CSV files; `scratch_dir` holds temporary files; `storage_options` go to
    fsspec for remote URLs."""

    table: str | None = None
    raw_csv: bool = False
    scratch_dir: Path | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SinkKind:
    """One kind of sink, found by the output's scheme (`schemes`: database backends, any `+driver`)
    or its extension (`extensions`, lower case, with the dot). `open_pair` opens the output and its
    rejects together (a database writes both in one transaction)."""

    name: str
    open_pair: Callable[[str, str, SinkOptions], tuple[RowSink, RowSink]]
    schemes: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()


# A full disk or quota: the user's fix is room on that disk, not a bug report.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def write_failed(exc: OSError, path: str | Path, *, what: str = "writing") -> InputError:
    """One line for an OSError while writing `path` ("no space left on device writing /x/out.csv")."""
    if exc.errno in _NO_ROOM:
        reason = "no space left on device" if exc.errno != errno.EDQUOT else "disk quota exceeded"
        if exc.errno == errno.EFBIG:
            reason = "file too large for its file system"
    else:
        reason = (exc.strerror or type(exc).__name__).lower()
    return InputError(f"{reason} {what} {path}")


def local_path(destination: str) -> Path | None:
    """The absolute local path `destination` is written to, or None for a remote (fsspec) URL."""
    if "::" in destination:  # a chained fsspec URL (simplecache::s3://…)
        return None
    if "://" in destination:
        scheme = destination.split("://", 1)[0].lower()
        if scheme not in ("file", "local"):
            return None
    _fs, path = fsspec.core.url_to_fs(destination)  # expands ~, makes a relative path absolute
    return Path(path)
