"""Hostile but fair sources (issue 12): every sheet, every line ending, every code page, damaged files.

Each case failed before: a second sheet silently ignored, bare-CR files refused, CP-1251 read as CP-1252,
tracebacks for truncated archives, a broken JSONL line's text lost, NULs copied through.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import sqlite3
import zipfile
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pandas as pd
import pytest

from cleanlist.errors import InputError
from cleanlist.io.sources import SourceBatch, iter_source, source_columns
from cleanlist.run.stage import stage_source
from cleanlist.run.workspace import REJECT, ROW, RunWorkspace

openpyxl = pytest.importorskip("openpyxl")


def read(source: str | Path, **options: object) -> list[SourceBatch]:
    return list(iter_source(source, **options))  # type: ignore[arg-type]


def rows_of(batches: list[SourceBatch]) -> list[dict[str, object]]:
    out = []
    for batch in batches:
        frame = batch.frame.astype(object).where(batch.frame.notna(), None)
        out.extend(frame.to_dict("records"))
    return out


def one_line_error(call: Callable[[], object], match: str) -> str:
    with pytest.raises(InputError, match=match) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    return message


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------- sheets

HEADER = ["First Name", "Last Name", "Email"]
EAST = [HEADER, ["Ann", "Lee", "ann@acme.com"], ["Bob", "Roe", "bob@acme.com", "stray"]]
WEST = [
    HEADER,
    ["Cy", "Poe", "cy@acme.com"],
    [None, None, None],
    ["Di", "Fox", "di@acme.com"],
    ["Ed", "Kim", "ed@acme.com"],
]


def workbook(path: Path, sheets: dict[str, list[list[object]]]) -> Path:
    book = openpyxl.Workbook()
    book.remove(book.active)
    for title, rows in sheets.items():
        sheet = book.create_sheet(title)
        for row in rows:
            sheet.append(row)
    book.save(path)
    return path


def test_a_workbook_with_two_sheets_is_refused_without_a_sheet(tmp_path: Path) -> None:
    source = workbook(tmp_path / "crm.xlsx", {"East": EAST, "West": WEST, "Notes": []})
    message = one_line_error(lambda: read(source), "has sheets")
    assert message == (
        f"workbook '{source}' has sheets 'East', 'West': name one with --sheet, "
        "or --sheet '*' to read every sheet (same header)"
    )


def test_every_sheet_is_read_with_a_star_and_every_row_is_accounted_for(tmp_path: Path) -> None:
    source = workbook(tmp_path / "crm.xlsx", {"East": EAST, "West": WEST})
    batches = read(source, sheet="*", batch_rows=2)
    # Data rows: 2 on East, 3 on West (the blank row is no row); the second header is not a row.
    assert batches[-1].end_row == (len(EAST) - 1) + (len(WEST) - 2)
    numbers = sorted(
        [int(n) for b in batches for n in b.frame.index] + [r.row_number for b in batches for r in b.bad_rows]
    )
    assert numbers == list(range(5))
    assert [row["First Name"] for row in rows_of(batches)] == ["Ann", "Cy", "Di", "Ed"]
    [bad] = [row for batch in batches for row in batch.bad_rows]
    assert bad.reason == "row 1 (sheet 'East' row 3) has 4 cells, the header has 3"
    assert source_columns(source, sheet="*") == HEADER


def test_a_named_sheet_is_read_alone(tmp_path: Path) -> None:
    source = workbook(tmp_path / "crm.xlsx", {"East": EAST, "West": WEST})
    batches = read(source, sheet="West")
    assert [row["First Name"] for row in rows_of(batches)] == ["Cy", "Di", "Ed"]
    assert list(batches[0].frame.index) == [0, 1, 2]


def test_staging_every_sheet_counts_every_row(tmp_path: Path, workspace: RunWorkspace) -> None:
    source = workbook(tmp_path / "crm.xlsx", {"East": EAST, "West": WEST})
    report = stage_source(str(source), workspace, sheet="*", batch_rows=2)
    assert report.rows_read == 5
    staged = pd.concat(list(workspace.parts()))
    assert sorted(staged[ROW]) == [0, 1, 2, 3, 4]


def test_an_unknown_sheet_lists_the_sheets(tmp_path: Path) -> None:
    source = workbook(tmp_path / "crm.xlsx", {"East": EAST, "West": WEST})
    message = one_line_error(lambda: read(source, sheet="North"), "has no sheet 'North'")
    assert message.endswith("its sheets: 'East', 'West'")


def test_a_sheet_with_another_header_is_named(tmp_path: Path) -> None:
    other = [["First Name", "Last Name", "E-mail"], ["Fay", "Orr", "fay@acme.com"]]
    source = workbook(tmp_path / "crm.xlsx", {"East": EAST, "West": WEST, "South": other})
    one_line_error(
        lambda: read(source, sheet="*"),
        r"^sheet 'South' of workbook '.*' has another header than sheet 'East' "
        r"\(column 3 is 'E-mail', not 'Email'\): read it on its own with --sheet 'South'$",
    )


def test_sheet_and_encoding_are_refused_where_they_do_not_apply(tmp_path: Path) -> None:
    csv_source = write(tmp_path / "c.csv", b"A\n1\n")
    one_line_error(
        lambda: iter_source(csv_source, sheet="East"), r"^--sheet applies to \.xlsx workbooks only"
    )
    book = workbook(tmp_path / "crm.xlsx", {"East": EAST})
    one_line_error(lambda: iter_source(book, encoding="cp1251"), r"^--encoding applies to text files")
    one_line_error(lambda: iter_source(csv_source, encoding="klingon"), r"^unknown encoding 'klingon'")


def test_a_wrong_dimension_record_does_not_cut_rows_off(tmp_path: Path) -> None:
    # Some writers record <dimension ref="A1"/> whatever the sheet holds; read-only openpyxl trusts it.
    book = workbook(tmp_path / "b.xlsx", {"Contacts": [["Name"], ["a"], ["b"], ["c"]]})
    lying = tmp_path / "lying.xlsx"
    with zipfile.ZipFile(book) as zin, zipfile.ZipFile(lying, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.startswith("xl/worksheets/sheet"):
                data = data.replace(b'<dimension ref="A1:A4"', b'<dimension ref="A1"')
            zout.writestr(item, data)
    assert [row["Name"] for row in rows_of(read(lying))] == ["a", "b", "c"]


# --------------------------------------------------------------------------------------- line endings


def test_bare_cr_line_endings(tmp_path: Path) -> None:
    source = write(tmp_path / "mac.csv", b"First Name,Last Name\rJane,Doe\rJohn,Roe\r")
    assert rows_of(read(source)) == [
        {"First Name": "Jane", "Last Name": "Doe"},
        {"First Name": "John", "Last Name": "Roe"},
    ]


def test_mixed_line_endings(tmp_path: Path) -> None:
    source = write(tmp_path / "mixed.csv", b"A,B\r\n1,2\n3,4\r5,6\r\n\r7,8")
    assert [row["A"] for row in rows_of(read(source))] == ["1", "3", "5", "7"]


def test_quoted_cells_keep_a_bare_cr_or_lf_as_one_cell(tmp_path: Path) -> None:
    data = b'Name,Note,City\r"Jane","line one\rline two",Paris\r"John","a\nb",Rome\rAnn,,Oslo\r'
    batches = read(write(tmp_path / "q.csv", data))
    assert batches[-1].end_row == 3
    assert rows_of(batches) == [
        {"Name": "Jane", "Note": "line one\rline two", "City": "Paris"},
        {"Name": "John", "Note": "a\nb", "City": "Rome"},
        {"Name": "Ann", "Note": None, "City": "Oslo"},
    ]


def test_bare_cr_lines_across_read_blocks(tmp_path: Path) -> None:
    # ~2.4 MB: lines and a CRLF pair are cut by the 1 MiB read blocks.
    lines = [b"A,B"] + [f"{i},{'x' * 20}".encode() for i in range(100_000)]
    source = write(
        tmp_path / "big.csv", b"\r".join(lines[:50_000]) + b"\r\n" + b"\r".join(lines[50_000:]) + b"\r"
    )
    batches = read(source, batch_rows=30_000)
    assert batches[-1].end_row == 100_000
    assert sum(len(b.frame) for b in batches) == 100_000
    assert [int(v) for v in batches[-1].frame["A"].tail(2)] == [99_998, 99_999]


# ------------------------------------------------------------------------------------------ encodings


def test_cp1251_names_arrive_intact_and_the_encoding_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = "Имя,Фамилия,Компания\nИван,Петров,ООО Ромашка\nМария,Смирнова,Газпром\n"
    source = write(tmp_path / "ru.csv", text.encode("cp1251"))
    with caplog.at_level(logging.INFO, logger="cleanlist.sources"):
        batches = read(source)
    assert rows_of(batches)[0] == {"Имя": "Иван", "Фамилия": "Петров", "Компания": "ООО Ромашка"}
    assert batches[0].encoding == "cp1251 (detected)"
    [record] = [r for r in caplog.records if r.name == "cleanlist.sources"]
    assert record.levelno == logging.INFO
    assert "cp1251" in record.getMessage() and "detected" in record.getMessage()


def test_cp1252_still_works_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = write(tmp_path / "de.csv", "Vorname,Nachname\nJürgen,Müller\nZoë,Straße €\n".encode("cp1252"))
    with caplog.at_level(logging.INFO, logger="cleanlist.sources"):
        rows = rows_of(read(source))
    assert rows == [{"Vorname": "Jürgen", "Nachname": "Müller"}, {"Vorname": "Zoë", "Nachname": "Straße €"}]
    assert any("cp1252 (detected" in r.getMessage() for r in caplog.records if r.name == "cleanlist.sources")


def test_utf8_lines_stay_utf8_in_a_cp1251_file(tmp_path: Path) -> None:
    data = "Name,City\nZoë,Köln\n".encode() + "Иван,Москва\nМария,Казань\n".encode("cp1251")
    assert rows_of(read(write(tmp_path / "glued.csv", data))) == [
        {"Name": "Zoë", "City": "Köln"},
        {"Name": "Иван", "City": "Москва"},
        {"Name": "Мария", "City": "Казань"},
    ]


def test_a_forced_encoding_wins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Two Greek words fit CP-1251 as well as CP-1253; --encoding settles it.
    source = write(tmp_path / "gr.csv", "Όνομα\nΓιώργος\n".encode("cp1253"))
    with caplog.at_level(logging.INFO, logger="cleanlist.sources"):
        batches = read(source, encoding="cp1253")
    assert rows_of(batches) == [{"Όνομα": "Γιώργος"}]
    assert batches[0].encoding == "cp1253 (--encoding)"
    assert any("(--encoding)" in r.getMessage() for r in caplog.records)


def test_utf16_without_a_bom(tmp_path: Path) -> None:
    source = write(tmp_path / "u.csv", "Name\tCity\r\nZoë\tKöln\r\n".encode("utf-16-le"))
    assert rows_of(read(source)) == [{"Name": "Zoë", "City": "Köln"}]


def test_a_binary_file_is_one_line(tmp_path: Path) -> None:
    source = write(tmp_path / "photo.csv", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    one_line_error(lambda: read(source), r"^source '.*photo\.csv' is not text")


# ------------------------------------------------------------------------------------- damaged files

ROWS = b"A,B\n" + b"".join(f"{i},x{i}\n".encode() for i in range(50_000))


@pytest.mark.parametrize(
    ("name", "compress", "label"),
    [
        ("c.csv.gz", gzip.compress, "gzip"),
        ("c.csv.bz2", bz2.compress, "bz2"),
        ("c.jsonl.xz", lzma.compress, "xz"),
    ],
)
def test_a_truncated_archive_is_one_line(
    tmp_path: Path, name: str, compress: Callable[[bytes], bytes], label: str
) -> None:
    data = ROWS if name.endswith(".csv") else b"".join(b'{"a": %d}\n' % i for i in range(50_000))
    packed = compress(data)
    source = write(tmp_path / name, packed[: len(packed) // 2])
    one_line_error(lambda: read(source), rf"^source '.*{name}' is truncated or corrupt \({label}\): ")


def test_a_file_that_is_not_gzip_is_one_line(tmp_path: Path) -> None:
    source = write(tmp_path / "c.csv.gz", ROWS)
    one_line_error(lambda: read(source), r"is truncated or corrupt \(gzip\): Not a gzipped file")


def test_a_damaged_parquet_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    frame = pd.DataFrame({"a": [f"value {i}" for i in range(40_000)], "b": range(40_000)})
    frame.to_parquet(path, row_group_size=10_000)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)  # pages zeroed, the footer intact
    path.write_bytes(bytes(data))
    one_line_error(lambda: read(path), r"^source '.*p\.parquet' is truncated or corrupt \(parquet\): ")


# --------------------------------------------------------------------------------------- JSONL, NULs


def test_a_broken_jsonl_line_keeps_its_raw_text(tmp_path: Path, workspace: RunWorkspace) -> None:
    lines = [
        json.dumps({"first_name": "Jane", "last_name": "Doe", "company_name": "Acme"}),
        "",
        '{"first_name": "Joe", "last_name": "Broken"',
        json.dumps({"first_name": "Ann", "last_name": "Lee", "company_name": "Initech"}),
    ]
    source = write(tmp_path / "c.jsonl", ("\n".join(lines) + "\n").encode())
    [bad] = read(source)[0].bad_rows
    assert bad.reason.startswith("row 1 (line 3) is not valid JSON (")
    # What reaches the rejects: the reason, which ends with the line as it was.
    report = stage_source(str(source), workspace)
    assert report.rows_read == 3
    staged = pd.concat(list(workspace.parts())).set_index(ROW)
    assert staged.loc[1, REJECT].endswith(': {"first_name": "Joe", "last_name": "Broken"')


def test_nul_bytes_are_removed_at_read_time(tmp_path: Path) -> None:
    csv_source = write(tmp_path / "n.csv", b"Name,City\x00\nJa\x00ne,Paris\n")
    assert rows_of(read(csv_source)) == [{"Name": "Jane", "City": "Paris"}]
    jsonl_source = write(tmp_path / "n.jsonl", b'{"name": "Jo\\u0000e", "tags": ["a\\u0000"]}\n')
    assert rows_of(read(jsonl_source)) == [{"name": "Joe", "tags": '["a\\u0000"]'}]
    pd.DataFrame({"name": ["Ann\x00", None], "n": [1, 2]}).to_parquet(tmp_path / "n.parquet")
    assert read(tmp_path / "n.parquet")[0].frame["name"].tolist()[0] == "Ann"
    with closing(sqlite3.connect(tmp_path / "n.db")) as db:
        db.execute("create table t (name text, n integer)")
        db.execute("insert into t values (?, ?)", ("Ma\x00ry", 1))
        db.commit()
    [batch] = read(f"sqlite:///{tmp_path / 'n.db'}", sql_query="select * from t")
    assert batch.frame.to_dict("records") == [{"name": "Mary", "n": 1}]
