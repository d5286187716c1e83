"""JSON text on the hot paths: orjson writes what the standard library wrote; what it refuses falls back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cleanlist import jsontext

STANDARD = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


@dataclass
class Point:
    x: int


@pytest.mark.parametrize(
    "value",
    [
        {"email": "ana@example.com", "phones": ["+1 555"], "nested": {"n": 1, "f": 0.1, "t": True}},
        ["é", "日本", None, 1.5, -3],
        {"at": datetime(2026, 12, 7, 5, 0, tzinfo=UTC), "path": Path("/tmp/x"), "p": Point(1)},
        {"big": 2**70},  # beyond 64 bits: orjson refuses, the standard library writes it
        {"lone": "\ud800"},  # a lone surrogate (hostile input): the same
        {1: "non-string key"},
    ],
)
def test_dumps_writes_what_the_standard_library_wrote(value: object) -> None:
    assert jsontext.dumps(value) == STANDARD.encode(value)


@pytest.mark.parametrize(
    "text",
    [
        '{"a":[1,2.5,"x",null,true]}',
        b'{"name":"\xc3\xa9"}',
        '"\\ud800"',  # a lone surrogate escape: orjson refuses it
        "[NaN, Infinity]",  # not JSON, but the standard library reads it
        '{"a":1}'.encode("utf-16"),  # not UTF-8
    ],
)
def test_loads_reads_what_the_standard_library_read(text: str | bytes) -> None:
    expected = json.loads(text)
    got = jsontext.loads(text)
    assert json.dumps(got) == json.dumps(expected)


def test_loads_raises_the_standard_error_for_text_that_is_no_json() -> None:
    with pytest.raises(json.JSONDecodeError):
        jsontext.loads(b"<html>gateway</html>")
