"""Outputs that lose nothing and leak nothing (issue 12): destinations refused before anything is spent,
CSV that reads back the same and is safe to open in a spreadsheet, owner-only files, no stale workspaces.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest

from cleanlist.errors import InputError
from cleanlist.io.filesink import FileSink
from cleanlist.io.outputs import open_sinks
from cleanlist.run.options import EnrichOptions
from cleanlist.run.workspace import KEY, PID_FILE, REJECT, REJECT_CODE, ROW, RunWorkspace, StagedContact
from cleanlist.store import EnrichmentStore, database
from cleanlist.store.database import resolve_url
from cleanlist_prefect.tasks.write import write_output_task

SOURCE_TEXT = "First Name,Last Name,Company Domain\r\nAnn,Lee,acme.example\n=cmd,Bob,b.example\n"
FORMULAS = ["=1+1", "+33 1 23", "-5", "@SUM(A1)", "\tindent", "\rreturn"]
HARMLESS = ["plain", "a=b", "", " =spaced", "'quoted"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "contacts.csv"
    path.write_bytes(SOURCE_TEXT.encode())
    return path


def refused(**options: object) -> str:
    with pytest.raises(InputError) as caught:
        EnrichOptions.model_validate(options).check_destinations()
    message = str(caught.value)
    assert "\n" not in message
    return message


# -- refuse before spending ---------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["same", "relative", "file-url", "symlink", "hard-link"])
def test_output_resolving_to_the_source_is_refused_and_the_source_kept(
    tmp_path: Path, source: Path, spelling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    output = {
        "same": str(source),
        "relative": "./sub/../contacts.csv",
        "file-url": f"file://{source}",
        "symlink": str(tmp_path / "link.csv"),
        "hard-link": str(tmp_path / "hard.csv"),
    }[spelling]
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.csv").symlink_to(source)
    os.link(source, tmp_path / "hard.csv")
    before = sorted(p.name for p in tmp_path.iterdir())

    message = refused(source=str(source), output=output)

    assert message.startswith(f"--output {output} is the source file")
    assert source.read_bytes() == SOURCE_TEXT.encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even rejects


def test_rejects_resolving_to_the_source_is_refused(tmp_path: Path, source: Path) -> None:
    message = refused(source=str(source), output=str(tmp_path / "out.csv"), rejects=str(source))
    assert message.startswith(f"--rejects {source} is the source file")
    # The default rejects file beside the output: `contacts.rejects.csv` next to `contacts.csv`.
    beside = tmp_path / "contacts.rejects.csv"
    beside.write_text("x\n")
    message = refused(source=str(beside), output=str(source))
    assert message.startswith(f"the rejects file {beside} is the source file")
    assert source.read_bytes() == SOURCE_TEXT.encode()
    assert not (tmp_path / "out.csv").exists()


def test_output_and_rejects_being_one_file_is_refused(tmp_path: Path, source: Path) -> None:
    output = tmp_path / "out" / "enriched.csv"
    assert refused(source=str(source), output=str(output), rejects=str(output)).startswith(
        "--output and --rejects are the same file"
    )
    (tmp_path / "alias.csv").symlink_to(output)  # dangling: the output does not exist yet
    message = refused(source=str(source), output=str(output), rejects=str(tmp_path / "alias.csv"))
    assert message == f"--output {output} and --rejects {tmp_path / 'alias.csv'} are the same file"
    assert not output.parent.exists()  # refused before any directory was made


def test_remote_urls_are_compared_as_given_and_database_outputs_skip_file_checks(source: Path) -> None:
    assert refused(source="s3://bucket/contacts.csv", output="s3://bucket/contacts.csv").startswith(
        "--output s3://bucket/contacts.csv is the source file"
    )
    EnrichOptions(source="s3://bucket/contacts.csv", output="s3://bucket/enriched.csv").check_destinations()
    # A table beside a file source: no file checks (the rejects "target" is a table name).
    EnrichOptions(
        source=str(source), output="sqlite:///out.db", table="contacts", rejects=str(source)
    ).check_destinations()


def test_an_uncreatable_output_directory_is_refused_up_front(tmp_path: Path, source: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be\n")
    output = blocker / "sub" / "enriched.csv"

    expected = f"cannot create the directory {output.parent} of --output: {blocker} is not a directory"
    assert refused(source=str(source), output=str(output)) == expected
    assert refused(source=str(source), output=str(output), dry_run=True) == expected
    good = tmp_path / "out" / "enriched.csv"
    message = refused(source=str(source), output=str(good), rejects=str(blocker / "rejects.csv"))
    assert message.startswith(f"cannot create the directory {blocker} of --rejects")
    (tmp_path / "dir.csv").mkdir()
    assert refused(source=str(source), output=str(tmp_path / "dir.csv")) == (
        f"--output {tmp_path / 'dir.csv'} is a directory; give a file path"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a 0500 directory anyway")
def test_a_read_only_output_directory_is_refused_up_front(tmp_path: Path, source: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        message = refused(source=str(source), output=str(locked / "enriched.csv"))
        assert message == f"the directory {locked} of --output is not writable"
    finally:
        locked.chmod(0o700)


def test_missing_directories_are_created_owner_only_before_the_run(tmp_path: Path, source: Path) -> None:
    output = tmp_path / "a" / "b" / "enriched.csv"
    EnrichOptions(source=str(source), output=str(output), dry_run=True).check_destinations()
    assert not (tmp_path / "a").exists()  # a dry run only checks

    EnrichOptions(source=str(source), output=str(output)).check_destinations()
    assert mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == 0o700
    assert list((tmp_path / "a" / "b").iterdir()) == []


# -- CSV that reads back the same ---------------------------------------------------------------------


def test_cells_with_line_breaks_read_back_as_written(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {"id": ["1", "2", "3", "4"], "note": ["a\rb", "a\nb", "a\r\nb", "nul\0byte"], "n": [1, 2, 3, 4]}
    )
    destination = tmp_path / "out.csv"
    sink = FileSink(str(destination), "csv")
    sink.write(frame.iloc[:2])
    sink.write(frame.iloc[2:])
    sink.commit(list(frame.columns))

    back = pd.read_csv(destination, dtype=str, keep_default_na=False)
    assert len(back) == 4
    assert back["id"].tolist() == ["1", "2", "3", "4"]
    assert back["note"].tolist() == ["a\rb", "a\nb", "a\r\nb", "nulbyte"]  # NUL dropped
    assert back["n"].tolist() == ["1", "2", "3", "4"]
    assert b"\0" not in destination.read_bytes()


# -- spreadsheet-safe CSV -----------------------------------------------------------------------------


def staged_workspace(tmp_path: Path) -> RunWorkspace:
    """Formula-looking cells in valid rows (output) and in a rejected row (rejects)."""
    cells = [*FORMULAS, *HARMLESS]
    workspace = RunWorkspace(tmp_path)
    keys: list[str | None] = [f"li:{i}" for i in range(len(cells))]
    keys[0] = None  # the first row is rejected
    frame = pd.DataFrame(
        {
            "Name": cells,
            "Score": [-5] * len(cells),  # a number column: never touched
            ROW: list(range(len(cells))),
            KEY: keys,
            REJECT: ["=HYPERLINK(bad)", *[None] * (len(cells) - 1)],
            REJECT_CODE: ["unparsable", *[None] * (len(cells) - 1)],
        }
    )
    contacts = [StagedContact(key, {"linkedin_url": key}) for key in keys if key is not None]
    workspace.add_part(frame, contacts)
    return workspace


@pytest.mark.parametrize("raw_csv", [False, True])
def test_formula_cells_are_neutralized_unless_raw_csv(tmp_path: Path, raw_csv: bool) -> None:
    workspace = staged_workspace(tmp_path)
    scratch = workspace.root
    output, rejects = tmp_path / "out" / "enriched.csv", tmp_path / "out" / "enriched.rejects.csv"
    run = SimpleNamespace(
        options=EnrichOptions(source="x.csv", output=str(output), raw_csv=raw_csv),
        workspace=workspace,
        store=EnrichmentStore(f"sqlite:///{tmp_path}/store.db"),
    )
    scratch_dirs: list[object] = []
    mkstemp = tempfile.mkstemp

    def recording_mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        scratch_dirs.append(kwargs.get("dir"))
        return mkstemp(*args, **kwargs)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tempfile, "mkstemp", recording_mkstemp)
            report = write_output_task.fn(run.options, run.workspace, run.store, str(output), str(rejects))
    finally:
        run.store.close()
        workspace.cleanup()
    assert report.output_rows == len(FORMULAS) + len(HARMLESS) - 1
    assert scratch_dirs == [scratch, scratch]  # temporary files live in the run's workspace

    written = pd.read_csv(output, dtype=str, keep_default_na=False)
    refused_rows = pd.read_csv(rejects, dtype=str, keep_default_na=False)
    names = [*refused_rows["Name"], *written["Name"]]
    prefix = "" if raw_csv else "'"
    assert names == [*(prefix + cell for cell in FORMULAS), *HARMLESS]
    assert set(written["Score"]) == set(refused_rows["Score"]) == {"-5"}  # numbers stay numbers
    assert refused_rows["reject_reason"].tolist() == [prefix + "=HYPERLINK(bad)"]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_parquet_and_jsonl_keep_cells_as_they_are(tmp_path: Path, suffix: str) -> None:
    destination = tmp_path / f"out{suffix}"
    sink = FileSink(str(destination), suffix[1:])
    sink.write(pd.DataFrame({"cell": FORMULAS}))
    sink.commit(["cell"])
    if suffix == ".parquet":
        back = pd.read_parquet(destination)
    else:
        back = pd.read_json(destination, lines=True, dtype=False)
    assert back["cell"].tolist() == FORMULAS
    # …and a CSV sink given the same frame does neutralize (the test is not vacuous).
    csv_out, rejects = open_sinks(str(tmp_path / "o.csv"), str(tmp_path / "r.csv"), None)
    csv_out.write(pd.DataFrame({"cell": FORMULAS}))
    csv_out.commit(["cell"])
    rejects.abort()
    assert pd.read_csv(tmp_path / "o.csv", dtype=str)["cell"].tolist() == ["'" + f for f in FORMULAS]


# -- personal data private ----------------------------------------------------------------------------


def test_outputs_and_rejects_are_owner_only(tmp_path: Path) -> None:
    existing = tmp_path / "enriched.csv"
    existing.write_text("old\n")
    existing.chmod(0o644)  # an earlier, world-readable output is replaced by a private one
    targets = [existing, tmp_path / "new" / "deeper" / "enriched.rejects.csv", tmp_path / "x.parquet"]
    for target in targets:
        sink = FileSink(str(target), "parquet" if target.suffix == ".parquet" else "csv")
        sink.write(pd.DataFrame({"a": ["1"]}))
        sink.commit(["a"])
        assert mode(target) == 0o600, target
    assert mode(tmp_path / "new") == mode(tmp_path / "new" / "deeper") == 0o700
    assert existing.read_text().splitlines() == ["a", "1"]


def test_the_default_store_and_its_directory_are_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    monkeypatch.setattr(database, "DEFAULT_STORE_PATH", home / ".cleanlist" / "store.db")

    with EnrichmentStore() as store:
        store.start_run("r1", {})
        # Checked while open: the -wal and -shm files hold the data too until the store is closed.
        modes = {f.name: mode(f) for f in (home / ".cleanlist").iterdir()}
        lock_modes = {f.name: mode(f) for f in (home / ".cleanlist" / "store.db.runs").iterdir()}
    assert mode(home / ".cleanlist") == 0o700
    # store.db.runs: the open runs' liveness lock files (cleanlist/store/liveness.py).
    assert modes == {
        **{name: 0o600 for name in ("store.db", "store.db-wal", "store.db-shm")},
        "store.db.runs": 0o700,
    }
    assert lock_modes == {"r1.lock": 0o600}
    assert mode(home) == 0o755  # not ours: untouched

    # An existing default store made world-readable by an older cleanlist is tightened on open.
    (home / ".cleanlist" / "store.db").chmod(0o644)
    resolve_url(None)
    assert mode(home / ".cleanlist" / "store.db") == 0o600


def test_a_named_sqlite_store_is_created_owner_only_and_an_existing_one_kept(tmp_path: Path) -> None:
    created = tmp_path / "stores" / "new.db"
    with EnrichmentStore(f"sqlite:///{created}") as store:
        store.start_run("r1", {})
    assert mode(created) == 0o600
    assert mode(created.parent) == 0o700

    shared = tmp_path / "shared.db"
    with EnrichmentStore(f"sqlite:///{shared}"):
        pass
    shared.chmod(0o640)  # the user's own choice for their own file
    with EnrichmentStore(f"sqlite:///{shared}"):
        pass
    assert mode(shared) == 0o640


def test_the_workspace_is_owner_only_and_names_its_process(tmp_path: Path) -> None:
    workspace = RunWorkspace(tmp_path)
    try:
        assert mode(workspace.root) == 0o700
        assert (workspace.root / PID_FILE).read_text().split() == [str(os.getpid()), socket.gethostname()]
    finally:
        workspace.cleanup()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_workspaces_of_dead_runs_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    host = socket.gethostname()

    def leftover(name: str, owner: str | None, age_days: float = 0.0) -> Path:
        path = tmp_path / name
        path.mkdir(mode=0o700)
        (path / "contacts.db").write_text("personal data")
        if owner is not None:
            (path / PID_FILE).write_text(owner)
        if age_days:
            then = time.time() - age_days * 86400
            os.utime(path, (then, then))
        return path

    dead = leftover("cleanlist-run-dead", f"{dead_pid()} {host}\n", age_days=0.01)
    live = leftover("cleanlist-run-live", f"{os.getpid()} {host}\n", age_days=3)
    elsewhere = leftover("cleanlist-run-other-host", f"{dead_pid()} another-host\n")
    young = leftover("cleanlist-run-young", None)
    old = leftover("cleanlist-run-old", None, age_days=2)
    unrelated = leftover("someone-else-dead", f"{dead_pid()} {host}\n")
    (tmp_path / "cleanlist-run-link").symlink_to(live)

    workspace = RunWorkspace(tmp_path)
    try:
        assert not dead.exists()
        assert not old.exists()
        for kept in (live, elsewhere, young, unrelated):
            assert (kept / "contacts.db").exists(), kept
        assert (tmp_path / "cleanlist-run-link").is_symlink()
        assert workspace.root.exists()
    finally:
        workspace.cleanup()


def test_a_live_workspace_is_kept_whatever_its_pid_says_and_a_killed_ones_removed(tmp_path: Path) -> None:
    # Another PID namespace (a container sharing /tmp) sees a pid that means another process, or none:
    # the owner's lock decides, not the pid.
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from cleanlist.run.workspace import RunWorkspace, PID_FILE\n"
        "w = RunWorkspace(Path(sys.argv[1]))\n"
        "(w.root / PID_FILE).write_text(sys.argv[2])\n"
        "print(w.root, flush=True)\n"
        "time.sleep(120)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path), f"{dead_pid()} {socket.gethostname()}\n"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        live = Path(owner.stdout.readline().strip())
        RunWorkspace(tmp_path).cleanup()
        assert live.exists(), "a live run's workspace was removed because its pid looked dead"
        owner.kill()
        owner.wait()
        RunWorkspace(tmp_path).cleanup()
        assert not live.exists(), "a killed run's workspace was left behind"
    finally:
        owner.kill()
        owner.wait()


@pytest.mark.parametrize("dtype", ["string[pyarrow]", "string[python]", "object"])
@pytest.mark.parametrize("raw", [False, True])
def test_csv_cells_follow_one_rule_whichever_way_the_column_is_checked(dtype: str, raw: bool) -> None:
    """String columns are first tested whole (vectorized); only one that needs it goes cell by cell.
    Either way every cell is what the per-cell rule makes of it."""
    from cleanlist.io.filesink import FORMULA_TRIGGERS, _csv_cell, csv_safe

    risky = ["plain", *(trigger + "1" for trigger in FORMULA_TRIGGERS), "nul\0here", None, "x-y"]
    harmless = ["plain", "x-y", None, "ann@example.com"]
    harmless = [*harmless, *harmless, None, "z"]  # as long as `risky`
    frame = pd.DataFrame({"risky": pd.array(risky, dtype=dtype), "harmless": pd.array(harmless, dtype=dtype)})
    safe = csv_safe(frame, raw=raw)
    for name in ("risky", "harmless"):
        expected = [_csv_cell(value, raw=raw) for value in frame[name].to_numpy(dtype=object)]
        got = safe[name].to_numpy(dtype=object).tolist()
        assert [None if pd.isna(v) else v for v in got] == [None if pd.isna(v) else v for v in expected]
    assert "nul\0here" not in safe["risky"].tolist()
