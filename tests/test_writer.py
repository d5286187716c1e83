"""write_rows over a real workspace and a real SQLite store: every staged row lands in the output or the
rejects exactly once, with the status its contact's state and stored result call for; files appear
atomically or not at all."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cleanlist.errors import InputError
from cleanlist.io.filesink import FileSink
from cleanlist.io.outputs import open_sinks
from cleanlist.models import worst_case_credits
from cleanlist.run.stage import stage_source
from cleanlist.run.workspace import KEY, REJECT, REJECT_CODE, ROW, RunWorkspace, StagedContact
from cleanlist.run.write import RESULT_COLUMNS, WriteReport, write_rows
from cleanlist.store import ContactResult, EnrichmentStore
from cleanlist.vocab import ContactState, RejectCode

PARTIAL = "partial"
HEADER = "Record ID,First Name,Last Name,Company Domain,Owner"
INPUT_COLUMNS = ["Record ID", "First Name", "Last Name", "Company Domain", "Owner"]

# One row per outcome; the comment says what the test does to its contact.
SOURCE_ROWS = [
    "r00,Ann,Lee,acme.example,ann",  # fresh in the store → cached
    "r01,Zed,Zee,z.example,bob,extra,fields",  # more fields than the header → unparsable
    "r02,Solo,,,cy",  # no last name, no company → missing_fields
    "r03,Bob,Quarantine,acme.example,dee",  # refused by the API (422) → rejects
    "r04,Cy,Error,acme.example,ann",  # its chunk failed for good → error
    "r05,Dee,Budget,acme.example,bob",  # --max-credits reached → skipped_budget
    "r06,Eve,Done,acme.example,cy",  # accepted, completed result → enriched
    "r07, ANN , lee ,https://www.acme.example/,dee",  # duplicate of r00 → cached too
    "r08,Fay,Failed,acme.example,ann",  # accepted, failed lookup → not_found
    "r09,Gus,Pending,acme.example,bob",  # accepted, no result yet → pending
    "r10,Hal,Left,acme.example,cy",  # the run stopped before its chunk → not_submitted
]
EXPECTED_STATUS = {
    "r00": "cached",
    "r04": "error",
    "r05": "skipped_budget",
    "r06": "enriched",
    "r07": "cached",
    "r08": "not_found",
    "r09": "pending",
    "r10": "not_submitted",
}
EXPECTED_REJECTS = {
    "r01": RejectCode.UNPARSABLE,
    "r02": RejectCode.MISSING_FIELDS,
    "r03": RejectCode.REFUSED_BY_API,
}


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where FileSink keeps its temporary files in this test (so leftovers can be seen)."""
    directory = tmp_path / "scratch"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def write_source(path: Path, rows: Sequence[str]) -> Path:
    path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    return path


def keys_by_record(workspace: RunWorkspace) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for part in workspace.parts():
        for record, key in zip(part["Record ID"], part[KEY], strict=True):
            found[record] = key if isinstance(key, str) else None
    return found


def store_results(
    store: EnrichmentStore, run_id: str, workflow_id: str, outcomes: dict[str, str | None]
) -> None:
    """Record `outcomes` (key → found email, None: nothing found) as one completed workflow."""
    keys = list(outcomes)
    task_ids = [f"{workflow_id}-{i}" for i in range(len(keys))]
    store.record_accepted(
        run_id,
        workflow_id=workflow_id,
        chunk_key="0",
        enrichment_type=PARTIAL,
        keys=keys,
        task_ids=task_ids,
        worst_case_credits=worst_case_credits(PARTIAL, len(keys)),
    )
    results = [
        ContactResult(key, task_id, "completed" if email else "failed", email, "valid" if email else None)
        for key, task_id, email in zip(keys, task_ids, outcomes.values(), strict=True)
    ]
    store.record_results(
        workflow_id,
        results,
        state="completed",
        credits_charged=sum(1.0 for email in outcomes.values() if email),
    )


def run_outcomes(workspace: RunWorkspace, store: EnrichmentStore) -> dict[str, str | None]:
    """Give each staged contact the state and stored result its row's comment in SOURCE_ROWS says."""
    keys = keys_by_record(workspace)
    store.start_run("earlier", {})
    store_results(store, "earlier", "wf-earlier", {keys["r00"] or "": "ann@acme.example"})
    store.start_run("this", {})
    accepted = {keys["r06"] or "": "eve@acme.example", keys["r08"] or "": None}
    store_results(store, "this", "wf-this", accepted)
    workspace.set_state([keys["r00"] or ""], ContactState.FRESH)
    workspace.set_notes({keys["r03"] or "": "refused by the API: not a person"}, ContactState.QUARANTINED)
    workspace.set_state([keys["r04"] or ""], ContactState.ERROR, "chunk 00000 failed: 400")
    workspace.set_state([keys["r05"] or ""], ContactState.SKIPPED_BUDGET)
    # Answered in this run (RunContext marks them RESULTED); r09 was accepted and is still owed.
    workspace.set_state([keys[r] or "" for r in ("r06", "r08")], ContactState.RESULTED)
    workspace.set_state([keys["r09"] or ""], ContactState.ACCEPTED)
    workspace.set_state([keys["r10"] or ""], ContactState.NOT_SUBMITTED)
    return keys


def read_back(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_json(path, lines=True, dtype=False)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_every_row_lands_in_output_or_rejects_exactly_once(
    tmp_path: Path, workspace: RunWorkspace, store: EnrichmentStore, scratch: Path, suffix: str
) -> None:
    source = write_source(tmp_path / "contacts.csv", SOURCE_ROWS)
    # Three rows a batch: several parts, the bad row among them.
    stage = stage_source(str(source), workspace, batch_rows=3)
    assert (stage.rows_read, stage.rejected, stage.unique_contacts) == (11, 2, 8)
    run_outcomes(workspace, store)
    output, rejects = tmp_path / "out" / f"enriched{suffix}", tmp_path / "out" / "enriched.rejects.csv"

    report = write_rows(workspace, store, PARTIAL, *open_sinks(str(output), str(rejects), None))

    written, refused = read_back(output), read_back(rejects)
    records = [row.split(",", 1)[0] for row in SOURCE_ROWS]
    assert sorted([*written["Record ID"], *refused["Record ID"]]) == records
    # Input order is kept on both sides.
    assert list(written["Record ID"]) == [r for r in records if r not in EXPECTED_REJECTS]
    assert list(refused["Record ID"]) == list(EXPECTED_REJECTS)
    assert list(written.columns) == [*INPUT_COLUMNS, *RESULT_COLUMNS]
    assert (report.output_rows, report.rejected_rows) == (8, 3)
    assert list(scratch.iterdir()) == []  # the temporary files are gone
    assert sorted(p.name for p in output.parent.iterdir()) == sorted([output.name, rejects.name])


def test_rejects_carry_a_code_and_a_reason(
    tmp_path: Path, workspace: RunWorkspace, store: EnrichmentStore
) -> None:
    stage_source(str(write_source(tmp_path / "contacts.csv", SOURCE_ROWS)), workspace)
    run_outcomes(workspace, store)
    output, rejects = tmp_path / "enriched.csv", tmp_path / "rejects.csv"

    report = write_rows(workspace, store, PARTIAL, *open_sinks(str(output), str(rejects), None))

    refused = read_back(rejects).set_index("Record ID")
    assert list(refused.columns) == [*INPUT_COLUMNS[1:], "reject_code", "reject_reason"]
    assert refused["reject_code"].to_dict() == {r: code.value for r, code in EXPECTED_REJECTS.items()}
    assert set(refused["reject_code"]) <= {code.value for code in RejectCode}
    reasons = refused["reject_reason"].to_dict()
    assert reasons["r01"] == "row 1 has 7 fields, the header has 5"
    assert reasons["r02"].startswith("missing fields: needs linkedin_url")
    assert reasons["r03"] == "refused by the API: not a person"
    # Rejected rows keep their input values.
    assert refused.loc["r03", "Last Name"] == "Quarantine"
    assert report.reject_reasons == {"unparsable": 1, "missing_fields": 1, "refused_by_api": 1}


def test_cleanlist_status_follows_the_contact_state_and_stored_result(
    tmp_path: Path, workspace: RunWorkspace, store: EnrichmentStore
) -> None:
    stage_source(str(write_source(tmp_path / "contacts.csv", SOURCE_ROWS)), workspace)
    keys = run_outcomes(workspace, store)
    output, rejects = tmp_path / "enriched.csv", tmp_path / "rejects.csv"

    report = write_rows(workspace, store, PARTIAL, *open_sinks(str(output), str(rejects), None))

    written = read_back(output).set_index("Record ID")
    assert written["cleanlist_status"].to_dict() == EXPECTED_STATUS
    assert written.loc["r00", "cleanlist_email"] == "ann@acme.example"
    assert written.loc["r00", "cleanlist_workflow_id"] == "wf-earlier"
    assert written.loc["r07", "cleanlist_email"] == "ann@acme.example"  # the duplicate joins the same
    assert written.loc["r06", "cleanlist_email"] == "eve@acme.example"
    assert written.loc["r06", "cleanlist_email_status"] == "valid"
    assert written.loc["r06", "cleanlist_task_id"] == "wf-this-0"
    assert written.loc["r06", "cleanlist_enriched_at"] != ""
    for unanswered in ("r04", "r05", "r09", "r10"):
        assert written.loc[unanswered, "cleanlist_email"] == ""
        assert written.loc[unanswered, "cleanlist_workflow_id"] == ""
    assert report.statuses == {
        "cached": 2,
        "error": 1,
        "skipped_budget": 1,
        "enriched": 1,
        "not_found": 1,
        "pending": 1,
        "not_submitted": 1,
    }
    assert keys["r00"] == keys["r07"]


def test_an_old_result_is_not_shown_for_a_contact_this_run_did_not_answer(
    tmp_path: Path, workspace: RunWorkspace, store: EnrichmentStore
) -> None:
    stage_source(str(write_source(tmp_path / "contacts.csv", SOURCE_ROWS[:1])), workspace)
    key = keys_by_record(workspace)["r00"] or ""
    store.start_run("earlier", {})
    store_results(store, "earlier", "wf-old", {key: "old@acme.example"})
    # Being refreshed, but its chunk failed: the row says error, not the old answer.
    workspace.set_state([key], ContactState.ERROR, "chunk failed")
    output, rejects = tmp_path / "enriched.csv", tmp_path / "rejects.csv"

    report = write_rows(workspace, store, PARTIAL, *open_sinks(str(output), str(rejects), None))

    written = read_back(output)
    assert list(written["cleanlist_status"]) == ["error"]
    assert list(written["cleanlist_email"]) == [""]
    assert report.statuses == {"error": 1}


def test_a_row_staged_without_key_or_code_is_unparsable(
    tmp_path: Path, workspace: RunWorkspace, store: EnrichmentStore
) -> None:
    # What stage_source stages for a line the parser could not read, and a row with nothing known.
    frame = pd.DataFrame(
        {
            "Name": ["ok", "broken", "worse"],
            ROW: [0, 1, 2],
            KEY: ["li:ok", None, None],
            REJECT: [None, "row 1 is not JSON", None],
            REJECT_CODE: [None, RejectCode.UNPARSABLE.value, None],
        }
    )
    workspace.add_part(frame, [StagedContact("li:ok", {"linkedin_url": "li:ok"})])
    output, rejects = tmp_path / "enriched.csv", tmp_path / "rejects.csv"

    report = write_rows(workspace, store, PARTIAL, *open_sinks(str(output), str(rejects), None))

    refused = read_back(rejects)
    assert list(refused["Name"]) == ["broken", "worse"]
    assert list(refused["reject_code"]) == ["unparsable", "unparsable"]
    assert list(refused["reject_reason"]) == ["row 1 is not JSON", "invalid row"]
    assert report == WriteReport(1, 2, {"not_submitted": 1}, {"unparsable": 2})


def test_a_source_without_rows_still_writes_both_files_with_headers(
    tmp_path: Path, workspace: RunWorkspace, store: EnrichmentStore
) -> None:
    stage_source(str(write_source(tmp_path / "contacts.csv", [])), workspace)
    output, rejects = tmp_path / "enriched.csv", tmp_path / "rejects.csv"

    report = write_rows(workspace, store, PARTIAL, *open_sinks(str(output), str(rejects), None))

    assert report == WriteReport(0, 0, {}, {})
    assert output.read_text().strip() == ",".join([*INPUT_COLUMNS, *RESULT_COLUMNS])
    assert rejects.read_text().strip() == ",".join([*INPUT_COLUMNS, "reject_code", "reject_reason"])


def test_a_failure_mid_write_leaves_no_file_behind(
    tmp_path: Path, workspace: RunWorkspace, store: EnrichmentStore, scratch: Path
) -> None:
    stage_source(str(write_source(tmp_path / "contacts.csv", SOURCE_ROWS)), workspace, batch_rows=3)
    run_outcomes(workspace, store)
    # The third part is lost from disk: writing fails after two parts already went to both sinks.
    (workspace.root / "part-000002.parquet").unlink()
    out = tmp_path / "out"
    output, rejects = out / "enriched.csv", out / "enriched.rejects.csv"
    sinks = open_sinks(str(output), str(rejects), None)
    assert all(isinstance(sink, FileSink) for sink in sinks)

    with pytest.raises(FileNotFoundError):
        write_rows(workspace, store, PARTIAL, *sinks)

    assert not output.exists()
    assert not rejects.exists()
    assert not out.exists() or list(out.iterdir()) == []  # no staged .partial file either
    assert list(scratch.iterdir()) == []  # the temporary files were removed too


def test_file_sink_only_shows_the_file_once_committed(tmp_path: Path, scratch: Path) -> None:
    destination = tmp_path / "nested" / "out.csv"
    sink = FileSink(str(destination), "csv")
    sink.write(pd.DataFrame({"a": ["1", "2"]}))
    sink.write(pd.DataFrame({"a": ["3"]}))
    assert not destination.exists()
    assert len(list(scratch.iterdir())) == 1

    sink.commit(["a"])
    assert read_back(destination)["a"].tolist() == ["1", "2", "3"]
    assert list(scratch.iterdir()) == []
    assert [p.name for p in destination.parent.iterdir()] == ["out.csv"]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB file system (tmpfs) to fill; skipped where mounting is not permitted."""
    mount_point = tmp_path / "tiny-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_a_full_disk_fails_with_one_line_naming_the_path_and_leaves_no_partial_file(
    tmp_path: Path, scratch: Path, tiny_disk: Path
) -> None:
    destination = tiny_disk / "out.csv"
    sink = FileSink(str(destination), "csv")
    sink.write(pd.DataFrame({"a": [f"row {i} " + "x" * 100 for i in range(2000)]}))  # ~220 KB

    with pytest.raises(InputError) as raised:
        sink.commit(["a"])

    assert str(raised.value) == f"no space left on device writing {destination}"
    sink.abort()
    assert list(tiny_disk.iterdir()) == []  # neither the output nor the hidden .out.csv.partial
    assert list(scratch.iterdir()) == []
    # The disk has its room back: the next, smaller output of that name is written.
    small = FileSink(str(destination), "csv")
    small.write(pd.DataFrame({"a": ["1"]}))
    small.commit(["a"])
    assert read_back(destination)["a"].tolist() == ["1"]


@pytest.mark.usefixtures("prefect_harness")
def test_the_cli_on_a_full_disk_exits_1_with_one_line_and_the_next_run_succeeds(
    tmp_path: Path, make_sandbox: Any, tiny_disk: Path
) -> None:
    from tests.flow_helpers import messy_export
    from tests.test_cli import _cli, _no_traceback

    sandbox = make_sandbox(rate_limit=None)
    source = messy_export(tmp_path / "crm.csv", unique=1200)
    env = {"CLEANLIST_API_KEY": sandbox.api_key, "CLEANLIST_BASE_URL": sandbox.base_url}
    args = ["run", str(source), "--store", f"sqlite:///{tmp_path / 's.db'}", "--rate-limit", "100/1"]
    output = tiny_disk / "out.csv"

    full = _cli([*args, "--output", str(output), "--rejects", str(tmp_path / "rejects.csv")], env)

    assert full.returncode == 1, full.stderr[-2000:]
    assert f"no space left on device writing {output}" in full.stdout + full.stderr
    _no_traceback(full)
    assert list(tiny_disk.iterdir()) == []  # no .out.csv.partial left to fill the disk
    # The same run to a disk with room pays for nothing again and writes every row.
    again = _cli([*args, "--output", str(tmp_path / "out.csv")], env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sandbox.counters()["contacts_accepted"] == 1200


def test_every_sink_is_chosen_through_the_registry(tmp_path: Path) -> None:
    from cleanlist.io.dbsink import DATABASE_SINK
    from cleanlist.io.outputs import SINKS, output_format, sink_kind

    formats = [output_format(f"out{ext}") for ext in (".csv", ".parquet", ".jsonl")]
    assert formats == ["csv", "parquet", "jsonl"]
    assert sink_kind(f"sqlite:///{tmp_path}/out.db", table="contacts") is DATABASE_SINK
    assert sink_kind("postgresql+psycopg://u@h/db", table="contacts") is DATABASE_SINK
    assert {kind.name for kind in SINKS} == {"csv", "parquet", "jsonl", "database"}
    with pytest.raises(InputError, match=r"must end in \.csv, \.parquet or \.jsonl \(or be a database URL\)"):
        output_format("out.xlsx")
