"""Reading contact sources in bounded batches: formats, encodings, ragged rows, row numbers, errors."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from cleanlist.errors import InputError
from cleanlist.io.sources import SourceBatch, display_source, iter_source, source_columns


def read(source: str | Path, **options: object) -> list[SourceBatch]:
    return list(iter_source(source, **options))  # type: ignore[arg-type]


def rows_of(batches: list[SourceBatch]) -> list[dict[str, object]]:
    """Parsed rows as dicts, missing values as None, in row-number order."""
    out = []
    for batch in batches:
        frame = batch.frame.astype(object).where(batch.frame.notna(), None)
        out.extend(frame.to_dict("records"))
    return out


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def assert_row_numbers_cover(batches: list[SourceBatch], total: int) -> None:
    """Every input row is in exactly one frame index or bad row, batches are contiguous."""
    seen: list[int] = []
    expected_first = 0
    for batch in batches:
        assert batch.first_row == expected_first
        numbers = [int(n) for n in batch.frame.index] + [bad.row_number for bad in batch.bad_rows]
        assert sorted(numbers) == list(range(batch.first_row, batch.end_row))
        seen.extend(numbers)
        expected_first = batch.end_row
    assert sorted(seen) == list(range(total))


# ------------------------------------------------------------------------------------------ delimited


def test_csv_reads_every_column_as_string(tmp_path: Path) -> None:
    source = write(tmp_path / "c.csv", b"First Name,Last Name,Zip,Score\nJane,Doe,01234,007\nJohn,,,\n")
    batches = read(source)
    assert len(batches) == 1
    frame = batches[0].frame
    assert list(frame.columns) == ["First Name", "Last Name", "Zip", "Score"]
    assert all(dtype == "str" for dtype in frame.dtypes)
    assert rows_of(batches) == [
        {"First Name": "Jane", "Last Name": "Doe", "Zip": "01234", "Score": "007"},
        {"First Name": "John", "Last Name": None, "Zip": None, "Score": None},
    ]


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("semi.csv", b"Name;Company;City\nJane;Acme, Inc.;Paris\n"),
        ("tab.txt", b"Name\tCompany\tCity\nJane\tAcme, Inc.\tParis\n"),
        ("pipe.csv", b"Name|Company|City\nJane|Acme, Inc.|Paris\n"),
        ("comma.csv", b'Name,Company,City\nJane,"Acme, Inc.",Paris\n'),
        ("tsv.tsv", b"Name\tCompany\tCity\nJane\tAcme, Inc.\tParis\n"),
        ("quoted.csv", b'"Name, full";"Company";"City"\nJane;"Acme, Inc.";Paris\n'),
        ("excel.csv", b"sep=;\nName;Company;City\nJane;Acme, Inc.;Paris\n"),
    ],
)
def test_delimiter_is_sniffed(tmp_path: Path, name: str, data: bytes) -> None:
    rows = rows_of(read(write(tmp_path / name, data)))
    assert len(rows) == 1
    assert list(rows[0].values()) == ["Jane", "Acme, Inc.", "Paris"]


@pytest.mark.parametrize(
    ("data", "encoding_name"),
    [
        ("Name,City\nRené Müller,Köln €\n".encode(), "utf-8"),
        (b"\xef\xbb\xbf" + "Name,City\nRené Müller,Köln €\n".encode(), "utf-8 with BOM"),
        ("Name,City\nRené Müller,Köln €\n".encode("cp1252"), "cp1252"),
        ("Name\tCity\nRené Müller\tKöln €\n".encode("utf-16"), "utf-16 with BOM"),
    ],
)
def test_encodings(tmp_path: Path, data: bytes, encoding_name: str) -> None:
    batches = read(write(tmp_path / "e.csv", data))
    assert list(batches[0].frame.columns) == ["Name", "City"], encoding_name
    assert rows_of(batches) == [{"Name": "René Müller", "City": "Köln €"}]


def test_latin1_bytes_undefined_in_cp1252_do_not_fail(tmp_path: Path) -> None:
    source = write(tmp_path / "l.csv", b"Name,Note\nRen\xe9,x\x81y\n")
    assert rows_of(read(source)) == [{"Name": "René", "Note": "x\x81y"}]


def test_non_utf8_byte_late_in_a_big_file(tmp_path: Path) -> None:
    lines = [b"First Name,Last Name,Company"]
    lines += [f"Zoë{i},Müller,Acme".encode() for i in range(100_000)]  # ~2.3 MB, several read blocks
    lines[90_001] = b"Ren\xe9,M\xfcller,Caf\xe9 \x80"  # one Windows row glued into a UTF-8 export
    source = write(tmp_path / "big.csv", b"\n".join(lines) + b"\n")
    batches = read(source, batch_rows=30_000)
    assert [len(b.frame) for b in batches] == [30_000, 30_000, 30_000, 10_000]
    assert_row_numbers_cover(batches, 100_000)
    last = batches[-1].frame
    assert last.loc[90_000].tolist() == ["René", "Müller", "Café €"]
    assert last.loc[89_999 + 2].tolist() == ["Zoë90001", "Müller", "Acme"]
    assert batches[0].frame.loc[5, "First Name"] == "Zoë5"


def test_quoted_newlines_and_delimiters(tmp_path: Path) -> None:
    data = b'Name,Note,City\r\n"Doe, Jane","line one\r\nline two",Paris\r\n"He said ""hi""",,Rome\r\n'
    rows = rows_of(read(write(tmp_path / "q.csv", data)))
    assert rows == [
        {"Name": "Doe, Jane", "Note": "line one\r\nline two", "City": "Paris"},
        {"Name": 'He said "hi"', "Note": None, "City": "Rome"},
    ]


def test_one_megabyte_field(tmp_path: Path) -> None:
    big = "x" * (1024 * 1024)
    source = write(tmp_path / "m.csv", f'Name,Blob\nJane,"{big}"\nJohn,y\n'.encode())
    rows = rows_of(read(source))
    assert rows[0]["Blob"] == big
    assert rows[1] == {"Name": "John", "Blob": "y"}


def test_unbalanced_quote_is_one_clear_error(tmp_path: Path) -> None:
    # The stray quote swallows the rest of the file into one field until the 16 MiB field cap.
    data = b'Name,City\n"Jane,Paris\n' + b"John,Rome\n" * 1_800_000
    with pytest.raises(InputError, match=r"cannot be parsed at row 0.*unbalanced quote") as error:
        read(write(tmp_path / "u.csv", data))
    assert "\n" not in str(error.value)


def test_ragged_rows(tmp_path: Path) -> None:
    data = b"A,B,C\n1,2,3\n4,5,6,7,8\n9,10\n11,12,13,,\n14,15,16\n"
    batches = read(write(tmp_path / "r.csv", data))
    assert rows_of(batches) == [
        {"A": "1", "B": "2", "C": "3"},
        {"A": "9", "B": "10", "C": None},  # too few fields: padded
        {"A": "11", "B": "12", "C": "13"},  # trailing delimiters: trimmed
        {"A": "14", "B": "15", "C": "16"},
    ]
    [bad] = batches[0].bad_rows
    assert bad.row_number == 1
    assert bad.reason == "row 1 has 5 fields, the header has 3"
    assert bad.values == {"A": "4", "B": "5", "C": "6", "_extra": "7,8"}
    assert list(batches[0].frame.index) == [0, 2, 3, 4]
    assert_row_numbers_cover(batches, 5)


def test_duplicate_and_empty_headers(tmp_path: Path) -> None:
    data = b"Email,,Email,Email.1, \na@x.io,b,c,d,e\n"
    batches = read(write(tmp_path / "d.csv", data))
    assert list(batches[0].frame.columns) == ["Email", "column_2", "Email.1", "Email.1.1", "column_5"]
    assert rows_of(batches)[0]["Email.1"] == "c"


@pytest.mark.parametrize("data", [b"", b"   \n\n \t\r\n"])
def test_empty_file_is_an_input_error(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(InputError, match=r"^source '.*e\.csv' is empty$"):
        read(write(tmp_path / "e.csv", data))


def test_header_only_yields_one_empty_batch_with_columns(tmp_path: Path) -> None:
    batches = read(write(tmp_path / "h.csv", b"First Name,Last Name\n"))
    assert len(batches) == 1
    assert list(batches[0].frame.columns) == ["First Name", "Last Name"]
    assert len(batches[0].frame) == 0
    assert (batches[0].first_row, batches[0].end_row) == (0, 0)


def test_blank_lines_are_not_rows(tmp_path: Path) -> None:
    batches = read(write(tmp_path / "b.csv", b"\n\nA,B\n1,2\n\n3,4\n\n"))
    assert rows_of(batches) == [{"A": "1", "B": "2"}, {"A": "3", "B": "4"}]
    assert list(batches[0].frame.index) == [0, 1]


def test_batches_respect_size_and_number_rows_globally(tmp_path: Path) -> None:
    lines = ["A,B"] + [f"{i},x" if i % 7 else f"{i},x,extra" for i in range(1, 101)]
    batches = read(write(tmp_path / "n.csv", ("\n".join(lines) + "\n").encode()), batch_rows=8)
    assert [b.end_row - b.first_row for b in batches] == [8] * 12 + [4]
    assert_row_numbers_cover(batches, 100)
    for batch in batches:
        for number, value in zip(batch.frame.index, batch.frame["A"], strict=True):
            assert int(value) == number + 1  # row n holds the value n + 1
        for bad in batch.bad_rows:
            assert int(str(bad.values["A"])) % 7 == 0
            assert bad.values["A"] == str(bad.row_number + 1)


def test_gzip_csv(tmp_path: Path) -> None:
    source = tmp_path / "c.csv.gz"
    source.write_bytes(gzip.compress(b"A;B\n1;2\n"))
    assert rows_of(read(source)) == [{"A": "1", "B": "2"}]


def test_memory_url_through_fsspec() -> None:
    url = f"memory://cleanlist-test/{uuid.uuid4().hex}.CSV"
    with fsspec.open(url, "wb") as handle:
        handle.write(b"A,B\n1,2\n")
    try:
        assert rows_of(read(url)) == [{"A": "1", "B": "2"}]
        assert source_columns(url) == ["A", "B"]
    finally:
        fsspec.filesystem("memory").rm(url)


def test_missing_memory_url_is_not_found() -> None:
    with pytest.raises(InputError, match=r"^source 'memory://nowhere/x\.csv' not found$"):
        read("memory://nowhere/x.csv")


# ------------------------------------------------------------------------------------------- errors


def test_unknown_extension_lists_supported(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"unsupported type \(\.xls\); supported: \.csv .*\.xlsx"):
        iter_source(write(tmp_path / "old.xls", b"x"))


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^source '.*nope\.csv' not found$"):
        iter_source(tmp_path / "nope.csv")


def test_directory_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "export.csv").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        iter_source(tmp_path / "export.csv")


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("s3://key:secret@bucket/x.csv", "s3://key:***@bucket/x.csv"),
        ("https://host/x.csv?X-Amz-Signature=abc", "https://host/x.csv?…"),
        ("/data/x.csv", "/data/x.csv"),
    ],
)
def test_display_source_hides_secrets(source: str, shown: str) -> None:
    assert display_source(source) == shown


def test_password_in_url_is_hidden_in_errors() -> None:
    with pytest.raises(InputError) as error:
        read("memory://user:hunter2@host/missing.csv")
    assert "hunter2" not in str(error.value)


# ------------------------------------------------------------------------------------------ parquet


def test_parquet_keeps_native_types_and_batches(tmp_path: Path) -> None:
    frame = pd.DataFrame({"first_name": [f"n{i}" for i in range(25)], "employees": range(25)})
    frame.index = frame.index * 10  # a stored pandas index is not a column of the source
    frame.to_parquet(tmp_path / "p.parquet", row_group_size=10)
    batches = read(tmp_path / "p.parquet", batch_rows=7)
    assert [len(b.frame) for b in batches] == [7, 7, 7, 4]
    assert list(batches[0].frame.columns) == ["first_name", "employees"]
    assert_row_numbers_cover(batches, 25)
    assert str(batches[0].frame["employees"].dtype) == "int64"
    combined = pd.concat([b.frame for b in batches])
    assert combined["employees"].tolist() == list(range(25))
    assert list(combined.index) == list(range(25))


def test_empty_parquet_yields_columns(tmp_path: Path) -> None:
    pd.DataFrame({"a": pd.Series([], dtype="str")}).to_parquet(tmp_path / "e.pq")
    [batch] = read(tmp_path / "e.pq")
    assert list(batch.frame.columns) == ["a"]
    assert len(batch.frame) == 0


def test_broken_parquet_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a readable Parquet file"):
        read(write(tmp_path / "b.parquet", b"not parquet at all"))
    with pytest.raises(InputError, match="is empty"):
        read(write(tmp_path / "z.parquet", b""))


# -------------------------------------------------------------------------------------------- JSONL


def test_jsonl_rows_bad_lines_and_late_keys(tmp_path: Path) -> None:
    lines = [
        json.dumps({"first_name": "Jane", "zip": "01234", "employees": 12, "vip": True}),
        "{not json",
        "",
        json.dumps(["a", "list"]),
        json.dumps({"first_name": "Zoë", "tags": {"a": 1}, "score": 1.50, "email": None}),
        json.dumps({"first_name": "", "late_key": "here"}),
    ]
    batches = read(write(tmp_path / "c.jsonl", ("\n".join(lines) + "\n").encode()))
    [batch] = batches
    assert list(batch.frame.columns) == [
        "first_name",
        "zip",
        "employees",
        "vip",
        "tags",
        "score",
        "email",
        "late_key",
    ]
    assert rows_of(batches) == [
        {
            "first_name": "Jane",
            "zip": "01234",
            "employees": "12",
            "vip": "true",
            "tags": None,
            "score": None,
            "email": None,
            "late_key": None,
        },
        {
            "first_name": "Zoë",
            "zip": None,
            "employees": None,
            "vip": None,
            "tags": '{"a":1}',
            "score": "1.5",
            "email": None,
            "late_key": None,
        },
        {
            "first_name": None,
            "zip": None,
            "employees": None,
            "vip": None,
            "tags": None,
            "score": None,
            "email": None,
            "late_key": "here",
        },
    ]
    assert [(bad.row_number, bad.values) for bad in batch.bad_rows] == [
        (1, {"_raw": "{not json"}),
        (2, {"_raw": '["a", "list"]'}),
    ]
    # Row numbers count data rows from 0, lines every line from 1; the raw line ends the reason.
    assert batch.bad_rows[0].reason.startswith("row 1 (line 2) is not valid JSON")
    assert batch.bad_rows[0].reason.endswith("): {not json")
    assert batch.bad_rows[1].reason == 'row 2 (line 4) is a JSON list, not an object: ["a", "list"]'
    assert list(batch.frame.index) == [0, 3, 4]


def test_empty_jsonl_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is empty"):
        read(write(tmp_path / "e.ndjson", b"\n\n"))


# --------------------------------------------------------------------------------------------- XLSX


def make_xlsx(path: Path, rows: list[list[object]]) -> Path:
    openpyxl = pytest.importorskip("openpyxl")
    workbook = openpyxl.Workbook(write_only=True)
    sheet = workbook.create_sheet("Contacts")
    for row in rows:
        sheet.append(row)
    workbook.create_sheet("Ignored").append(["other"])
    workbook.save(path)
    return path


def test_xlsx_named_sheet_values_as_text(tmp_path: Path) -> None:
    source = make_xlsx(
        tmp_path / "c.xlsx",
        [
            ["First Name", "Joined", "Phone", "Score", "VIP", None],
            ["Jane", dt.datetime(2024, 5, 1), 4915112345678, 2.5, True],
            ["John", dt.datetime(2024, 5, 1, 13, 30), None, 3.0, False, None],
            [None, None, None, None, None],
            ["Ann", dt.date(2023, 1, 2), "0049 30", None, None, "stray"],
        ],
    )
    [batch] = read(source, sheet="Contacts")
    assert list(batch.frame.columns) == ["First Name", "Joined", "Phone", "Score", "VIP"]
    assert rows_of([batch]) == [
        {
            "First Name": "Jane",
            "Joined": "2024-05-01",
            "Phone": "4915112345678",
            "Score": "2.5",
            "VIP": "TRUE",
        },
        {"First Name": "John", "Joined": "2024-05-01T13:30:00", "Phone": None, "Score": "3", "VIP": "FALSE"},
    ]
    [bad] = batch.bad_rows
    assert (bad.row_number, bad.reason) == (2, "row 2 (sheet 'Contacts' row 5) has 6 cells, the header has 5")
    assert bad.values["_extra"] == "stray"


def test_xlsx_is_batched(tmp_path: Path) -> None:
    source = make_xlsx(tmp_path / "b.xlsx", [["Name"]] + [[f"n{i}"] for i in range(10)])
    batches = read(source, batch_rows=4, sheet="Contacts")
    assert [len(b.frame) for b in batches] == [4, 4, 2]
    assert_row_numbers_cover(batches, 10)


def test_broken_xlsx_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"not a readable \.xlsx file"):
        read(write(tmp_path / "b.xlsx", b"PK not really"))
    with pytest.raises(InputError, match="is empty"):
        read(write(tmp_path / "e.xlsx", b""))


# ---------------------------------------------------------------------------------------------- SQL


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    path = tmp_path / "crm.db"
    with sqlite3.connect(path) as db:
        db.execute("create table contacts (id integer, first_name text, email text, website text)")
        db.executemany(
            "insert into contacts values (?, ?, ?, ?)",
            [(i, f"n{i}", f"p{i}@acme.com", "http://acme.com:8080/x") for i in range(23)],
        )
    db.close()
    return f"sqlite:///{path}"


def test_sqlite_query_is_streamed_in_batches(sqlite_db: str) -> None:
    query = "select id, first_name, email, email from contacts where website like '%:8080%' order by id"
    batches = read(sqlite_db, sql_query=query, batch_rows=10)
    assert [len(b.frame) for b in batches] == [10, 10, 3]
    assert list(batches[0].frame.columns) == ["id", "first_name", "email", "email.1"]
    assert_row_numbers_cover(batches, 23)
    assert batches[2].frame["first_name"].tolist() == ["n20", "n21", "n22"]


def test_sqlite_empty_result_yields_columns(sqlite_db: str) -> None:
    [batch] = read(sqlite_db, sql_query="select first_name from contacts where 0")
    assert list(batch.frame.columns) == ["first_name"]
    assert source_columns(sqlite_db, "select id, email from contacts") == ["id", "email"]


def test_bad_sql_is_one_line_input_error(sqlite_db: str) -> None:
    with pytest.raises(InputError, match=r"SQL query failed on sqlite:///.*no such table: nope") as error:
        read(sqlite_db, sql_query="select * from nope")
    assert "\n" not in str(error.value)


def test_missing_sqlite_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read(f"sqlite:///{tmp_path / 'none.db'}", sql_query="select 1")
    assert not (tmp_path / "none.db").exists()


def test_not_a_database_url(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a database URL"):
        read("contacts.csv", sql_query="select 1")


POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def postgres_table() -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg")
    try:
        connection = psycopg.connect(POSTGRES_URL, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    table = f"contacts_{uuid.uuid4().hex[:12]}"
    with connection:
        connection.execute(f"create table {table} (id int, first_name text, zip text)")
        with connection.cursor().copy(f"copy {table} (id, first_name, zip) from stdin") as copy:
            for i in range(2_500):
                copy.write_row((i, f"n{i}", f"{i:05d}"))
        try:
            yield table
        finally:
            connection.execute(f"drop table if exists {table}")


@pytest.mark.postgres
def test_postgresql_source_streams_with_psycopg3(postgres_table: str) -> None:
    # ":" and "%" reach PostgreSQL as written (no bind-parameter parsing).
    query = (
        f"select id, first_name, zip, zip::text as z from {postgres_table} where zip like '0%' order by id"
    )
    batches = read(POSTGRES_URL, sql_query=query, batch_rows=1_000)
    assert [len(b.frame) for b in batches] == [1_000, 1_000, 500]
    assert_row_numbers_cover(batches, 2_500)
    assert batches[0].frame["zip"].iloc[7] == "00007"


@pytest.mark.postgres
def test_postgresql_errors_hide_the_password(postgres_table: str) -> None:
    url = "postgresql://postgres:s3cret-pw@127.0.0.1:5432/no_such_database_here"
    with pytest.raises(
        InputError, match="cannot connect to postgresql\\+psycopg://postgres:\\*\\*\\*@"
    ) as error:
        read(url, sql_query="select 1")
    assert "s3cret-pw" not in str(error.value)
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="SQL query failed") as error:
        read(POSTGRES_URL.replace("postgres@", "postgres:s3cret-pw@"), sql_query="selec 1")
    assert "s3cret-pw" not in str(error.value)


def test_every_reader_is_chosen_through_the_registry() -> None:
    from cleanlist.io.sources.registry import (
        FILE_FORMATS,
        QUERY_SOURCES,
        SUPPORTED,
        file_format,
        query_source,
    )

    assert SUPPORTED == (
        ".csv .tsv .txt .parquet .pq .jsonl .ndjson .xlsx (.csv/.tsv/.txt/.jsonl/.ndjson also .gz .bz2 .xz)"
    )
    for fmt in FILE_FORMATS:
        for extension in fmt.extensions:
            assert file_format(f"s3://bucket/contacts{extension}?sig=1")[0] is fmt
    assert file_format("contacts.csv.gz")[2] == "gzip"
    with pytest.raises(InputError, match=r"unsupported type \(\.parquet\)"):
        file_format("contacts.parquet.gz")  # only text formats are read through a decompressor
    assert query_source("postgresql+psycopg://u@h/db") is QUERY_SOURCES[0]
