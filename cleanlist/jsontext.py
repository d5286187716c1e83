"""JSON text in and out on a chunk's hot paths: API answers, staged payloads, stored results, journal lines.

orjson (a dependency of Prefect's, stated in ours too) parses and writes these 5-10x faster than the
standard library, which mattered: a 250-contact status answer is decoded once and its results are written
as three JSON values per contact, then read back by the writer. Its output is the standard library's with
`separators=(",", ":")`, `ensure_ascii=False` and `default=str` (datetimes and dataclasses are passed to
`str` as before). What orjson refuses and the standard library takes — lone surrogates, integers beyond
64 bits, non-string keys, NaN, bodies not in UTF-8 — falls back to the standard library, so no value that
was accepted before is refused now.

Bottom module: it imports nothing of `cleanlist`.
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson

_OPTIONS: Final = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_FALLBACK: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def dumps(value: object) -> str:
    """Compact JSON text; values JSON cannot hold (paths, datetimes) are written as `str(value)`."""
    try:
        return orjson.dumps(value, default=str, option=_OPTIONS).decode()
    except (orjson.JSONEncodeError, TypeError):
        return _FALLBACK.encode(value)


def loads(text: str | bytes | bytearray) -> Any:
    """The value of a JSON text; raises `json.JSONDecodeError` (or `UnicodeDecodeError`) if it is none."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
