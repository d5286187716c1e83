"""Decoding text sources (delimited and JSONL): encodings, byte-order marks, legacy code pages (see the
package docstring), and cutting parsed rows into batches (`_Batcher`)."""

from __future__ import annotations

import codecs
import io
import logging
import re
from collections.abc import Iterator, Sequence
from typing import IO, Any, AnyStr

import pandas as pd

from cleanlist.errors import InputError
from cleanlist.io.sources.base import READ_BLOCK_BYTES, SNIFF_BYTES, BadRow, SourceBatch, _string_frame

logger = logging.getLogger("cleanlist.sources")


# Legacy code pages the detector chooses from, most common first: the order breaks ties between code
# pages that fit a sample equally well (short samples often fit several).
LEGACY_CODE_PAGES = (
    "cp1252",
    "cp1251",
    "cp1250",
    "cp1253",
    "cp1254",
    "cp1257",
    "cp932",
    "gb18030",
    "cp949",
    "big5",
    "koi8_r",
    "cp1255",
    "cp1256",
    "cp1258",
    "cp874",
    "cp866",
    "koi8_u",
    "mac_roman",
    "cp850",
    "cp437",
    "euc_jp",
)


# Bytes CP-1252 leaves undefined: kept out of the detector's sample, so that a stray one does not turn a
# Western file into Arabic or Cyrillic.
_CP1252_UNDEFINED = re.compile(rb"[\x81\x8d\x8f\x90\x9d]")


# Control bytes that text does not contain (NUL, tab, LF, VT, FF, CR and ESC excepted).
_BINARY_BYTES = bytes([*range(1, 9), *range(14, 27), *range(28, 32), 127])


class _LenientDecoder:
    """An incremental decoder that never fails: a byte the codec cannot decode becomes its Latin-1
    character, and decoding goes on after it. (No codec error handler is registered: that registry is
    the whole process's.)"""

    def __init__(self, codec: str) -> None:
        self._decoder = codecs.getincrementaldecoder(codec)()

    def decode(self, data: bytes, final: bool = False) -> str:
        parts: list[str] = []
        while True:
            held, flag = self._decoder.getstate()
            try:
                parts.append(self._decoder.decode(data, final))
                return "".join(parts)
            except UnicodeDecodeError as exc:
                seen = held + data  # what the codec was decoding (its held-back bytes first)
                self._decoder.setstate((b"", flag))
                parts.append(self._decoder.decode(seen[: exc.start], False))
                parts.append(seen[exc.start : exc.end].decode("latin-1"))
                data = seen[exc.end :]


def _line_cut(data: AnyStr, final: bool) -> int:
    """Length of the complete lines at the start of `data` (LF, CRLF or bare CR); all of it if final.

    A CR at the very end is held back: its LF may be the first byte of the next block.
    """
    if final:
        return len(data)
    cr, lf = ("\r", "\n") if isinstance(data, str) else (b"\r", b"\n")
    end = len(data) - 1 if data.endswith(cr) else len(data)
    return max(data.rfind(lf, 0, end), data.rfind(cr, 0, end)) + 1


def _text_lines(text: str) -> Iterator[str]:
    """Lines of `text` with their endings, split at LF, CRLF and bare CR only; NULs removed."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    return iter(io.StringIO(text, newline=""))


def _resolve_codec(encoding: str) -> str:
    """The codec name Python knows `encoding` by; an unknown or non-text codec is one InputError line."""
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        info = None
    if info is None or not getattr(info, "_is_text_encoding", True):
        raise InputError(
            f"unknown encoding {encoding!r}: --encoding takes a Python codec name "
            "(utf-8, cp1251, cp1252, latin-1, utf-16, shift_jis, …)"
        )
    return "utf-8-sig" if info.name == "utf-8" else info.name  # a forced UTF-8 still drops a BOM


def _bomless_utf16(block: bytes) -> str | None:
    """'utf-16-le'/'utf-16-be' when the block has UTF-16's NUL pattern (Latin text without a BOM)."""
    sample = block[: SNIFF_BYTES - SNIFF_BYTES % 2]
    if len(sample) < 4:
        return None
    even, odd = sample[0::2], sample[1::2]
    for zeros, others, name in ((odd, even, "utf-16-le"), (even, odd, "utf-16-be")):
        if zeros.count(0) >= 0.4 * len(zeros) and others.count(0) <= 0.02 * len(others):
            return name
    return None


def _looks_binary(block: bytes) -> bool:
    sample = block[:SNIFF_BYTES]
    control = len(sample) - len(sample.translate(None, _BINARY_BYTES))
    return control > 0.05 * len(sample) or sample.count(0) > 0.3 * len(sample)


def _detect_code_page(sample: bytes) -> tuple[str, list[str]]:
    """(code page, others that fit as well) for `sample`, lines that are not UTF-8.

    charset-normalizer scores each candidate (chaos: how much the decoded text looks like noise;
    coherence: how much like a language). Candidates within 0.1 of the least chaos and of the most
    coherence tie, and the tie goes to the more common code page; with nothing fitting, CP-1252.
    """
    from charset_normalizer import from_bytes

    sample = _CP1252_UNDEFINED.sub(b"", sample)

    def rank(match: Any) -> int:
        names = [match.encoding, *match.could_be_from_charset]
        return min((LEGACY_CODE_PAGES.index(n) for n in names if n in LEGACY_CODE_PAGES), default=-1)

    # A sample left with ASCII only (its odd bytes were CP-1252's undefined ones) matches "ascii".
    matches = [m for m in from_bytes(sample, cp_isolation=list(LEGACY_CODE_PAGES)) if rank(m) >= 0]
    if not matches:
        return "cp1252", []
    least_chaos = min(match.chaos for match in matches)
    fitting = [match for match in matches if match.chaos <= least_chaos + 0.1]
    most_coherent = max(match.coherence for match in fitting)
    fitting = sorted((m for m in fitting if m.coherence >= most_coherent - 0.1), key=rank)
    names = [LEGACY_CODE_PAGES[rank(match)] for match in fitting]
    return names[0], list(dict.fromkeys(names[1:]))


class _Text:
    """The lines of a text source as str, with their endings (see "Encodings" in the module docstring).

    Deciding per line whether it is UTF-8 needs no pre-pass (one read, also for remote files), lets a
    bad byte at row 900,000 cost nothing, and decodes files glued together from UTF-8 and Windows exports
    correctly row by row; a legacy line that happens to be valid UTF-8 needs byte pairs like "Ã©", which
    real text lacks. The legacy code page is detected once, from the first block that needs it.
    `encoding_used` says how text that is not UTF-8 was decoded (None while all of it was UTF-8).
    """

    def __init__(self, shown: str, encoding: str | None, *, announce: bool = True) -> None:
        self.shown = shown
        self.forced = encoding
        self.announce = announce
        self.encoding_used: str | None = None
        self._legacy: str | None = None

    def _use(self, encoding: str, how: str, note: str = "", *, legacy: bool = False) -> None:
        self.encoding_used = f"{encoding} ({how})"
        if self.announce:
            what = ": text that is not UTF-8" if legacy else ""
            logger.info("source '%s'%s is decoded as %s (%s%s)", self.shown, what, encoding, how, note)

    def lines(self, stream: IO[bytes]) -> Iterator[str]:
        block = stream.read(READ_BLOCK_BYTES)
        if self.forced is not None:
            self._use(self.forced, "--encoding")
            yield from self._decoded(self.forced, block, stream)
            return
        if block.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Excel "Unicode text"
            self.encoding_used = "utf-16"
            yield from self._decoded("utf-16", block, stream)
            return
        if (utf16 := _bomless_utf16(block)) is not None:
            self._use(utf16, "detected", ": UTF-16 without a byte-order mark")
            yield from self._decoded(utf16, block, stream)
            return
        if _looks_binary(block):
            raise InputError(
                f"source '{self.shown}' is not text (it holds binary data); "
                "if it is UTF-16 or UTF-32 without a byte-order mark, name it with --encoding"
            )
        if block.startswith(codecs.BOM_UTF8):
            block = block[len(codecs.BOM_UTF8) :]
        pending = b""
        while True:
            final = not block
            data = pending + block if pending else block
            cut = _line_cut(data, final)
            pending, data = data[cut:], data[:cut]
            if data:
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    yield from self._mixed_lines(data)
                else:
                    yield from _text_lines(text)
            if final:
                return
            block = stream.read(READ_BLOCK_BYTES)

    def _decoded(self, codec: str, block: bytes, stream: IO[bytes]) -> Iterator[str]:
        """The whole stream decoded with one codec (incrementally: UTF-16 cannot be cut at b"\\n")."""
        decoder = _LenientDecoder(codec)
        pending = ""
        while True:
            final = not block
            text = pending + decoder.decode(block, final=final)
            cut = _line_cut(text, final)
            pending = text[cut:]
            yield from _text_lines(text[:cut])
            if final:
                return
            block = stream.read(READ_BLOCK_BYTES)

    def _mixed_lines(self, data: bytes) -> Iterator[str]:
        """Complete lines of a block that is not all UTF-8: each line UTF-8 if it is, else legacy."""
        raw_lines = data.splitlines(keepends=True)  # LF, CRLF and bare CR only
        if self._legacy is None:
            sample = bytearray()
            for raw in raw_lines:
                if len(sample) >= SNIFF_BYTES:
                    break
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    sample += raw
            self._legacy, others = _detect_code_page(bytes(sample))
            note = f"; {', '.join(others[:3])} would fit too: choose with --encoding" if others else ""
            self._use(self._legacy, "detected", note, legacy=True)
        legacy = self._legacy
        for raw in raw_lines:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = _LenientDecoder(legacy).decode(raw, final=True)
            yield line.replace("\x00", "") if "\x00" in line else line


class _Batcher:
    """Collects parsed rows and bad rows and cuts them into batches of `batch_rows` input rows."""

    def __init__(self, columns: Sequence[str], batch_rows: int, text: _Text | None = None) -> None:
        self.columns = list(columns)
        self.batch_rows = batch_rows
        self.text = text
        self.next_row = 0
        self.first_row = 0
        self.rows: list[Sequence[object]] = []
        self.bad: list[BadRow] = []
        self.batches = 0

    def add(self, row: Sequence[object]) -> SourceBatch | None:
        self.rows.append(row)
        self.next_row += 1
        return self._cut() if self.next_row - self.first_row >= self.batch_rows else None

    def reject(self, values: dict[str, object], reason: str, where: str | None = None) -> SourceBatch | None:
        """A bad row; `where` is its place under another number (a file line, a sheet row)."""
        number = f"row {self.next_row} ({where})" if where else f"row {self.next_row}"
        self.bad.append(BadRow(self.next_row, values, f"{number} {reason}"))
        self.next_row += 1
        return self._cut() if self.next_row - self.first_row >= self.batch_rows else None

    def finish(self) -> SourceBatch | None:
        return self._cut() if self.next_row > self.first_row or self.batches == 0 else None

    def _cut(self) -> SourceBatch:
        batch = SourceBatch(
            frame=_string_frame(self.rows, self.columns, self._index()),
            first_row=self.first_row,
            end_row=self.next_row,
            bad_rows=self.bad,
            encoding=self.text.encoding_used if self.text is not None else None,
        )
        self.first_row, self.rows, self.bad = self.next_row, [], []
        self.batches += 1
        return batch

    def _index(self) -> pd.Index:
        if not self.bad:
            return pd.RangeIndex(self.first_row, self.first_row + len(self.rows))
        bad = {row.row_number for row in self.bad}
        return pd.Index([n for n in range(self.first_row, self.next_row) if n not in bad], dtype="int64")
