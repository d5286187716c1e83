"""The variation matrix as numbers: the real CLI against the sandbox playing each unpublished reading.

    .venv/bin/python -m benchmarks.variations                      # this checkout, ~2 min
    .venv/bin/python -m benchmarks.variations --checkout /tmp/old  # the CLI of another checkout (before/after)

For each variation (CONTRACT.md, "Unpublished: the variations a client must survive") the sandbox runs in
its own process with that option (always from this checkout: it is the yardstick), the CLI enriches a
messy export into a fresh store, then runs again over the same store. From the sandbox's own counters
and the files: rows written (output + rejects) against rows read, rows marked `missing`, emails written
against credits charged (partial: one credit per email found), contacts charged but not written, bulk
contacts the rerun sent, and contacts the API accepted twice.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.procs import ROOT, PrefectServer, SandboxProcess

RESULTS = ROOT / "benchmarks" / "results"

VARIATIONS: dict[str, list[str]] = {
    "documented": [],
    "results shuffled": ["--results-order", "shuffled"],
    "10% tasks left out + shuffled": ["--omit-task-rate", "0.1", "--results-order", "shuffled"],
    "5% tasks unknown for good": ["--unknown-task-rate", "0.05"],
    "bulk answer without task_ids": ["--bulk-task-ids", "absent", "--results-order", "shuffled"],
    "task_ids count differs": ["--bulk-task-ids", "short"],
    "half the workflows 'failed'": ["--final-word", "failed", "--final-word-rate", "0.5"],
    "half the workflows 'cancelled'": ["--final-word", "cancelled", "--final-word-rate", "0.5"],
    "unknown final word 'finished'": ["--final-word", "finished", "--final-word-rate", "1"],
    "newer error envelope (4/1 s)": ["--error-envelope", "error"],
    "retry-after-ms (4/1 s)": ["--retry-after-ms"],
    "one window per org (6/1 s)": ["--rate-scope", "organization"],
    "workflows visible after 1 s": ["--workflow-visible-after", "1"],
}
# Variations whose point is the 429 path: the sandbox's limit is below the client's.
TIGHT = {"newer error envelope (4/1 s)": ("4/1", "8/1"), "retry-after-ms (4/1 s)": ("4/1", "8/1"),
         "one window per org (6/1 s)": ("6/1", "6/1")}  # fmt: skip


@dataclass
class Row:
    variation: str
    exit_code: int
    rows_in: int
    rows_out: int
    missing_rows: int
    unresolved_rows: int
    emails_written: int
    credits_charged: float
    rerun_exit_code: int
    rerun_bulk_contacts: int
    rerun_emails_written: int
    credits_charged_total: float
    accepted_twice: int

    @property
    def paid_not_written(self) -> float:
        return self.credits_charged_total - self.rerun_emails_written


def write_export(path: Path, unique: int) -> int:
    """A messy CRM export: `unique` contacts, 5 % duplicate rows, 1 % rows without the required fields."""
    rows: list[dict[str, str]] = []
    for i in range(unique):
        linkedin = f"https://www.linkedin.com/in/person-{i}/" if i % 10 == 0 else ""
        rows.append({"First Name": f"Ann{i}", "Surname": f"Lee{i}", "Account Name": f"Company {i}",
                     "Company Website": f"https://www.co{i}.example/", "LinkedIn URL": linkedin})  # fmt: skip
        if i % 20 == 0:
            rows.append({**rows[-1], "First Name": f"  ANN{i} "})
        if i % 100 == 0:
            rows.append({"First Name": f"Solo{i}", "Surname": "", "Account Name": "", "Company Website": "",
                         "LinkedIn URL": ""})  # fmt: skip
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=["Record ID", *rows[0]])
        writer.writeheader()
        for n, row in enumerate(rows):
            writer.writerow({"Record ID": f"r{n:06d}", **row})
    return len(rows)


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def emails_written(rows: list[dict[str, str]]) -> int:
    return len(
        {r["cleanlist_task_id"] for r in rows if r.get("cleanlist_email") and r.get("cleanlist_task_id")}
    )


TIMEOUT = 120.0  # seconds a run may take here; one that takes longer is stopped and shown as "hung"
HUNG = -9


def run_cli(checkout: Path, source: Path, output: Path, store: str, env: dict[str, str]) -> int:
    cmd = [sys.executable, "-m", "cleanlist_prefect.deployments.cli", "run", str(source), "--output", str(output),
           "--store", store, "--initial-poll-seconds", "1", "--json"]  # fmt: skip
    try:
        done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return HUNG
    return done.returncode


def measure(
    name: str, flags: list[str], checkout: Path, unique: int, work: Path, prefect: PrefectServer
) -> Row:
    server_limit, client_limit = TIGHT.get(name, ("100000/1", "100000/1"))
    sandbox = SandboxProcess(rate_limit=server_limit, latency="0.2-0.6", extra=flags, log_dir=work)
    try:
        source = work / "crm.csv"
        rows_in = write_export(source, unique)
        env = {**prefect.env, "PREFECT_API_URL": prefect.api_url, "CLEANLIST_API_KEY": sandbox.api_key, "CLEANLIST_BASE_URL": sandbox.base_url,
               "CLEANLIST_RATE_LIMIT": client_limit, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
        store = f"sqlite:///{work / 'store.db'}"
        code = run_cli(checkout, source, work / "first.csv", store, env)
        first = read_rows(work / "first.csv")
        rejects = read_rows(work / "first.rejects.csv")
        charged = float(sandbox.counters()["credits_charged"])
        accepted = int(sandbox.counters()["contacts_accepted"])
        rerun_code = run_cli(checkout, source, work / "rerun.csv", store, env)
        rerun = read_rows(work / "rerun.csv")
        after = sandbox.counters()
        return Row(
            variation=name,
            exit_code=code,
            rows_in=rows_in,
            rows_out=len(first) + len(rejects),
            missing_rows=sum(1 for r in first if r["cleanlist_status"] == "missing"),
            unresolved_rows=sum(1 for r in first if r["cleanlist_status"] in ("unresolved", "pending")),
            emails_written=emails_written(first),
            credits_charged=charged,
            rerun_exit_code=rerun_code,
            rerun_bulk_contacts=int(after["contacts_accepted"]) - accepted,
            rerun_emails_written=emails_written(rerun),
            credits_charged_total=float(after["credits_charged"]),
            accepted_twice=int(after["contacts_accepted_more_than_once"]),
        )
    finally:
        sandbox.stop()


def _code(code: int) -> str:
    return f"hung > {TIMEOUT:g} s" if code == HUNG else str(code)


def _progress(row: Row) -> None:
    print(f"  {row.variation}: exit {row.exit_code}/{row.rerun_exit_code}, rows {row.rows_out}/{row.rows_in}, "
          f"missing {row.missing_rows}, emails {row.emails_written} of {row.credits_charged:g} charged, "
          f"rerun sent {row.rerun_bulk_contacts}", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkout", type=Path, default=ROOT, help="run the CLI of this checkout")
    parser.add_argument("--contacts", type=int, default=1_000)
    parser.add_argument("--only", nargs="*", help="variation names to run (default: all)")
    parser.add_argument("--output", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="cleanlist-variations-") as home:
        prefect = PrefectServer(Path(home) / "prefect")
        try:
            for name, flags in VARIATIONS.items():
                if args.only and name not in args.only:
                    continue
                work = Path(home) / f"v{len(rows):02d}"
                work.mkdir()
                rows.append(measure(name, flags, args.checkout.resolve(), args.contacts, work, prefect))
                _progress(rows[-1])
        finally:
            prefect.stop()
    print(f"\nVariation matrix, CLI of {args.checkout.resolve()}, {args.contacts:,} contacts\n")
    print(
        "| variation | exit (run/rerun) | rows out/in | `missing` rows | unresolved rows | emails written / credits charged | rerun: contacts sent | paid, not in rerun output | accepted twice |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.variation} | {_code(r.exit_code)}/{_code(r.rerun_exit_code)} | {r.rows_out}/{r.rows_in} | {r.missing_rows} | "
              f"{r.unresolved_rows} | {r.emails_written} / {r.credits_charged:g} | {r.rerun_bulk_contacts} | "
              f"{r.paid_not_written:g} | {r.accepted_twice} |")  # fmt: skip
    target = args.output or RESULTS / "variations.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    print(f"\nresults: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
