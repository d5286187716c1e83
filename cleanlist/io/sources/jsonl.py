"""JSON Lines sources: .jsonl .ndjson, one JSON object per line."""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator
from typing import Any

from cleanlist.errors import InputError
from cleanlist.io.sources.base import Opener, SourceBatch, SourceFormat, _first_line, _unique_names
from cleanlist.io.sources.text import _Batcher, _Text


def _json_objects(open_source: Opener, text: _Text) -> Iterator[tuple[int, str, dict[str, Any] | str]]:
    """(line number, line, object) per non-blank line; the object is an error message when the line is
    not a JSON object. Line numbers count every line of the file from 1, blank ones included."""
    with open_source() as stream:
        for number, line in enumerate(text.lines(stream), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:  # its own "line 1 column 5" would contradict ours
                yield number, line, f"is not valid JSON ({exc.msg} at column {exc.colno})"
                continue
            except (ValueError, RecursionError) as exc:  # a number too long, nesting too deep
                yield number, line, f"is not valid JSON ({_first_line(exc)})"
                continue
            if isinstance(value, dict):
                yield number, line, value
            else:
                yield number, line, f"is a JSON {type(value).__name__}, not an object"


def _json_text(value: object) -> object:
    """A JSON value as text, like every value of a text format: numbers and nested values as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _iter_jsonl(
    open_source: Opener, shown: str, batch_rows: int, encoding: str | None
) -> Generator[SourceBatch, None, None]:
    # Keys may first appear on any line (writers omit null keys), so one pass collects them all:
    # columns stay the same in every batch and no value is left out.
    keys: dict[str, None] = {}
    lines = 0
    for _, _, value in _json_objects(open_source, _Text(shown, encoding)):
        lines += 1
        if isinstance(value, dict):
            keys.update(dict.fromkeys(value))
    if not lines:
        raise InputError(f"source '{shown}' is empty")
    key_list = list(keys)
    text = _Text(shown, encoding, announce=False)  # the first pass said how it decodes
    batcher = _Batcher(_unique_names(key_list), batch_rows, text)
    for number, line, value in _json_objects(open_source, text):
        if isinstance(value, str):
            raw = line.rstrip("\r\n")
            if (batch := batcher.reject({"_raw": raw}, f"{value}: {raw}", f"line {number}")) is not None:
                yield batch
        else:
            get = value.get
            row = [v if (v := get(key)) is None or v.__class__ is str else _json_text(v) for key in key_list]
            if "\\u0000" in line:  # an escaped NUL in a string (raw NULs are gone already)
                row = [v.replace("\x00", "") if isinstance(v, str) else v for v in row]
            if (batch := batcher.add(row)) is not None:
                yield batch
    if (batch := batcher.finish()) is not None:
        yield batch


JSONL = SourceFormat(
    name="jsonl",
    extensions=(".jsonl", ".ndjson"),
    read=lambda r: _iter_jsonl(r.open_source, r.shown, r.batch_rows, r.encoding),
    text=True,
)
