"""Synthetic CRM exports for the benchmarks: unique contacts, written as CSV or Parquet in blocks.

Rows look like a CRM export (first/last name, company, website, LinkedIn URL, email, owner, stage).
Every valid row is a distinct contact (its key is unique); `invalid_every` > 0 mixes in rows that break
the field rule (they must end in the rejects file) and `duplicate_every` > 0 repeats an earlier contact
(a duplicate row is written to the output but not sent twice). Generation is vectorised and streamed in
blocks, so a million rows take a few seconds and little memory.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

COLUMNS = (
    "First Name",
    "Last Name",
    "Company",
    "Company Website",
    "LinkedIn URL",
    "Email",
    "Owner",
    "Lifecycle Stage",
)
_FIRST = np.array(
    [
        "ada",
        "alan",
        "anna",
        "ben",
        "carla",
        "chen",
        "dara",
        "eli",
        "fatima",
        "gita",
        "hana",
        "ivan",
        "jade",
        "kofi",
        "lena",
        "mara",
        "nils",
        "omar",
        "pia",
        "quinn",
        "rosa",
        "sam",
        "tara",
        "uma",
        "vera",
        "wen",
        "xavi",
        "yara",
        "zoe",
    ]
)
_LAST = np.array(
    [
        "adams",
        "berg",
        "costa",
        "diaz",
        "eriksen",
        "fischer",
        "garcia",
        "hoffmann",
        "ito",
        "jensen",
        "kowalski",
        "lopez",
        "meyer",
        "novak",
        "okafor",
        "patel",
        "quist",
        "rossi",
        "schmidt",
        "tanaka",
        "ulrich",
        "vogel",
        "weber",
        "xu",
        "young",
        "zhang",
    ]
)
_OWNERS = np.array(["alice", "bob", "carol", "dave"])
_STAGES = np.array(["lead", "mql", "sql", "customer"])


@dataclass(frozen=True)
class DatasetSpec:
    rows: int
    invalid_every: int = 0  # every n-th row misses the required fields (0 = none)
    duplicate_every: int = 0  # every n-th row repeats the row before it (0 = none)

    @property
    def invalid_rows(self) -> int:
        return self.rows // self.invalid_every if self.invalid_every else 0


def _block(start: int, count: int, spec: DatasetSpec) -> pa.Table:
    n = np.arange(start, start + count)
    ident = n.copy()
    if spec.duplicate_every:
        dup = (n % spec.duplicate_every) == spec.duplicate_every - 1
        ident[dup] = n[dup] - 1
    first = _FIRST[ident % len(_FIRST)]
    last = _LAST[(ident // len(_FIRST)) % len(_LAST)]
    company_no = ident // 7
    ids = ident.astype(str)
    company = np.char.add("Company ", company_no.astype(str))
    website = np.char.add(np.char.add("https://www.c", company_no.astype(str)), ".example.com/")
    # Two in five rows carry a LinkedIn URL (its key wins); the others are keyed by name + company.
    has_li = (ident % 5) < 2
    slug = np.char.add(np.char.add(np.char.add(first, "-"), np.char.add(last, "-")), ids)
    linkedin = np.where(has_li, np.char.add("linkedin.com/in/", slug), "")
    # Names carry the row identity too, so name-keyed contacts are unique as well.
    last_unique = np.char.add(np.char.add(last, "-"), ids)
    email = np.where(
        (ident % 3) == 0, np.char.add(np.char.add(first, "@"), np.char.add("c", company_no.astype(str))), ""
    )
    email = np.where(email != "", np.char.add(email, ".example.com"), "")
    owner = _OWNERS[n % len(_OWNERS)]
    stage = _STAGES[(n // 3) % len(_STAGES)]
    first_col, last_col, company_col, site_col = (
        first.astype(object),
        last_unique.astype(object),
        company,
        website,
    )
    if spec.invalid_every:
        bad = (n % spec.invalid_every) == spec.invalid_every - 1
        # Only a first name: neither a LinkedIn URL nor last name + company.
        last_col = np.where(bad, "", last_col)
        company_col = np.where(bad, "", company_col)
        site_col = np.where(bad, "", site_col)
        linkedin = np.where(bad, "", linkedin)
        email = np.where(bad, "", email)
    arrays = [first_col, last_col, company_col, site_col, linkedin, email, owner, stage]
    return pa.table(
        {
            name: pa.array([v if v != "" else None for v in np.asarray(col).tolist()], pa.string())
            for name, col in zip(COLUMNS, arrays, strict=True)
        }
    )


def write_dataset(path: Path, spec: DatasetSpec, *, block_rows: int = 100_000) -> Path:
    """Write `spec.rows` rows to `path` (.csv or .parquet), streaming in blocks; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    writer: pacsv.CSVWriter | pq.ParquetWriter | None = None
    try:
        for start in range(0, spec.rows, block_rows):
            table = _block(start, min(block_rows, spec.rows - start), spec)
            if writer is None:
                if path.suffix == ".csv":
                    writer = pacsv.CSVWriter(
                        str(tmp), table.schema, write_options=pacsv.WriteOptions(quoting_style="needed")
                    )
                else:
                    writer = pq.ParquetWriter(str(tmp), table.schema, compression="zstd")
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    tmp.replace(path)
    return path


def cached_dataset(directory: Path, spec: DatasetSpec, fmt: str) -> Path:
    """The dataset for `spec` in `directory`, generated once and reused by later runs."""
    name = f"contacts-{spec.rows}-i{spec.invalid_every}-d{spec.duplicate_every}.{fmt}"
    path = directory / name
    if not path.exists():
        write_dataset(path, spec)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--invalid-every", type=int, default=0)
    parser.add_argument("--duplicate-every", type=int, default=0)
    args = parser.parse_args()
    write_dataset(args.path, DatasetSpec(args.rows, args.invalid_every, args.duplicate_every))


if __name__ == "__main__":
    main()
