"""The `enrich-dataframe` flow: the Python API for a frame already in memory (pandas or Arrow).

It runs the very steps of the file flow (`flows/enrich_contacts.py`: same store, retry policy, credit
pause, budget, artifacts) on a private temporary workspace: the frame is written there as Parquet (0600
in a 0700 directory), enriched, and the output and rejects are read back; the folder is removed at the
end, whatever happens. The rows come back as the caller gave them (their own values, dtypes and index),
with the `cleanlist_*` columns added to the output and `reject_code`/`reject_reason` to the rejects:
every row is in one of the two. Those columns always hold this run's results: a frame that has them
already (an earlier output enriched again) has them replaced, and the run says so in one warning.

The frame never reaches the Prefect database: Prefect stores a flow run's parameters, and would have
stored every contact of a DataFrame, so this flow's parameters are stored with the frame replaced by
its shape; and no database password reaches it either: a URL given as a parameter (`store`) is stored with
its password hidden (the run itself gets the URL as given; this flow takes a frame in memory, so it is
never started from its stored parameters).

Called outside a flow (a user's script) with no Prefect server configured, it starts Prefect's temporary
server tied to the calling process (`flows/temporary_server.py`): a script ended by SIGTERM or SIGKILL
leaves no server behind.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import Flow, get_run_logger
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext
from prefect.states import Failed

from cleanlist.dburl import hide_passwords
from cleanlist.errors import InputError
from cleanlist.run.options import TASK_RUNNER_WORKERS, EnrichOptions
from cleanlist.run.summary import RunSummary
from cleanlist.run.write import REJECT_CODE_COLUMN, REJECT_REASON
from cleanlist.vocab import EnrichmentType
from cleanlist_prefect.flows.blocks import resolve_blocks
from cleanlist_prefect.flows.enrich_contacts import (
    RunFailed,
    check_key,
    failures_as_states,
    open_run,
    plan_submissions,
    read,
    submit,
    wait_for_results,
    write_and_report,
)
from cleanlist_prefect.flows.temporary_server import OwnedTemporaryServer
from cleanlist_prefect.tasks.prefect_types import thread_pool

P = ParamSpec("P")
R = TypeVar("R")
# The row's position in the caller's frame, carried through the run to put each row back in its place.
ROW_POSITION = "__cleanlist_row_position__"
# Columns a run writes: a frame that has them (an earlier run's output or rejects) gets this run's.
RESULT_PREFIX = "cleanlist_"
RUN_COLUMNS = frozenset({REJECT_CODE_COLUMN, REJECT_REASON})


@dataclass(frozen=True)
class EnrichedFrame:
    """What `enrich_dataframe` returns: the caller's rows split in two, and the run's summary.

    `output` holds the valid rows (duplicates included) with the `cleanlist_*` columns; `rejects` the
    rows that could not be sent, with `reject_code` and `reject_reason`. Both keep the caller's index;
    `len(output) + len(rejects)` is the number of rows given.
    """

    output: pd.DataFrame
    rejects: pd.DataFrame
    summary: RunSummary


def _frame_shown(value: Any) -> Any:
    if isinstance(value, pd.DataFrame | pa.Table):
        return f"<{type(value).__name__}: {value.shape[0]} rows x {value.shape[1]} columns>"
    return value


def _stored(value: Any) -> Any:
    """A parameter as the Prefect server may store it: a frame as its shape, URL passwords hidden."""
    return hide_passwords(value) if isinstance(value, str) else _frame_shown(value)


class _FrameFlow(Flow[P, EnrichedFrame]):
    """A flow whose parameters are stored by the Prefect server without the frame's contents or any
    database password, and which ties Prefect's temporary server to a script that calls it."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return super().serialize_parameters({key: _stored(v) for key, v in parameters.items()})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Only from the main thread: the server ends with the thread that started it (PR_SET_PDEATHSIG);
        # inside a flow run the server (if temporary) was started already, by whoever started that run.
        if FlowRunContext.get() is None and threading.current_thread() is threading.main_thread():
            OwnedTemporaryServer.start_if_needed()
        return super().__call__(*args, **kwargs)


@contextmanager
def private_folder() -> Iterator[Path]:
    """A temporary folder only its owner can enter (mkdtemp makes it 0700); removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix="cleanlist-frame-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def earlier_results(frame: pd.DataFrame | pa.Table) -> list[str]:
    """The frame's columns that a run writes (`cleanlist_*`, `reject_code`, `reject_reason`)."""
    names = frame.column_names if isinstance(frame, pa.Table) else [str(c) for c in frame.columns]
    return [name for name in names if name.startswith(RESULT_PREFIX) or name in RUN_COLUMNS]


def without_earlier_results(frame: pd.DataFrame | pa.Table, names: list[str]) -> pd.DataFrame | pa.Table:
    """`frame` without the columns `names`: this run's results take their place."""
    if not names:
        return frame
    if isinstance(frame, pa.Table):
        return frame.drop_columns(names)
    return frame.drop(columns=[c for c in frame.columns if str(c) in names])


def _check_shape(frame: pd.DataFrame | pa.Table) -> None:
    names = [str(c) for c in (frame.column_names if isinstance(frame, pa.Table) else frame.columns)]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"the frame has repeated column names: {', '.join(repeated)}; rename them")
    if not names:
        raise InputError("the frame has no columns: nothing to enrich")
    if ROW_POSITION in names:
        raise InputError(f"the frame already has a column named {ROW_POSITION}; rename it")


def as_arrow(frame: pd.DataFrame | pa.Table) -> pa.Table:
    """The frame as an Arrow table with the row-position column; one InputError line if it cannot be."""
    if not isinstance(frame, pd.DataFrame | pa.Table):
        raise InputError(f"enrich_dataframe takes a pandas DataFrame or a pyarrow Table, not {type(frame)}")
    _check_shape(frame)
    if isinstance(frame, pa.Table):
        table = frame
    else:
        try:
            table = pa.Table.from_pandas(frame, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            # A column mixing kinds (numbers and text): send it as text, as a CSV would have it.
            mixed = {c: "string" for c in frame.columns if frame[c].dtype == object}
            table = pa.Table.from_pandas(frame.astype(mixed), preserve_index=False)
    return table.append_column(ROW_POSITION, pa.array(range(table.num_rows), type=pa.int64()))


def write_private_parquet(table: pa.Table, path: Path) -> Path:
    """`table` as Parquet at `path`, created 0600 (it holds contacts' personal data)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        pq.write_table(table, fh)
    return path


def rows_back(original: pd.DataFrame, written: Path) -> pd.DataFrame:
    """The caller's own rows named by the written file's positions, with the columns the run added.

    Only the positions and the added columns are read back (the rejects file is CSV, written raw): the
    caller's own columns come from the caller's frame, values and dtypes untouched.
    """
    if written.suffix == ".parquet":
        names = pq.read_schema(written).names
        added = names[names.index(ROW_POSITION) + 1 :]
        result = pq.read_table(written, columns=[ROW_POSITION, *added]).to_pandas()
    else:
        names = list(pd.read_csv(written, nrows=0).columns)
        added = names[names.index(ROW_POSITION) + 1 :]
        result = pd.read_csv(
            written, usecols=[ROW_POSITION, *added], dtype=dict.fromkeys(added, str), keep_default_na=False
        )
    positions = pd.to_numeric(result[ROW_POSITION]).astype("int64").to_numpy()
    rows: pd.DataFrame = original.iloc[positions].copy()
    for name in added:
        rows[name] = result[name].to_numpy()
    return rows


def run_frame(frame: pd.DataFrame | pa.Table, parameters: dict[str, Any]) -> EnrichedFrame:
    """Enrich `frame` with the file flow's steps in a private folder; raise RunFailed if it cannot."""
    shown = _frame_shown(frame)
    if isinstance(frame, pd.DataFrame | pa.Table):
        _check_shape(frame)  # before dropping columns: a repeated name is the caller's to fix
        replaced = earlier_results(frame)
        if replaced:
            get_run_logger().warning(
                "the frame already has result columns (%s): replaced by this run's results",
                ", ".join(replaced),
            )
            frame = without_earlier_results(frame, replaced)
    table = as_arrow(frame)
    started = time.monotonic()
    with private_folder() as folder:
        output, rejects = folder / "output.parquet", folder / "rejects.csv"  # rejects are always CSV
        source = write_private_parquet(table, folder / "input.parquet")
        del table
        options = EnrichOptions.from_parameters(
            {
                **parameters,
                "source": str(source),
                "output": str(output),
                "rejects": str(rejects),
                "raw_csv": True,  # read back by this module, not opened in a spreadsheet
            }
        )
        options = resolve_blocks(options)  # a store given as block:sqlalchemy-connector/NAME
        options.check_destinations()
        with open_run(options) as run:
            check_key(run)
            read(run)
            plan = plan_submissions(run)
            submission = submit(run, plan)
            wait_for_results(run)
            summary = write_and_report(run, submission, started)
        original: pd.DataFrame = frame if isinstance(frame, pd.DataFrame) else frame.to_pandas()
        return EnrichedFrame(
            output=rows_back(original, output),
            rejects=rows_back(original, rejects),
            summary=summary.model_copy(update={"output": shown, "rejects": shown}),
        )


def _failures_as_exceptions(body: Callable[P, R]) -> Callable[P, R | State]:
    """`failures_as_states`, with the failure's exception as the Failed state's data.

    Calling a flow returns its result or raises the Failed state's exception; the file flow's Failed
    state carries its summary as a dict (read by the CLI), which Prefect would raise as "TypeError:
    Unexpected result for failed state: {...}". Here the caller gets the run's one line as a
    `RunFailed`; the state keeps the line as its message.
    """
    wrapped = failures_as_states(body)

    @functools.wraps(body)
    def run(*args: P.args, **kwargs: P.kwargs) -> R | State:
        outcome = wrapped(*args, **kwargs)
        if isinstance(outcome, State) and outcome.is_failed() and isinstance(outcome.data, dict):
            message = outcome.message or "the run failed"
            exit_code = int(outcome.data.get("exit_code", 1))
            summary = _summary_of(outcome.data)
            return Failed(message=message, data=RunFailed(message, exit_code=exit_code, summary=summary))
        return outcome

    return run


def _summary_of(data: dict[str, Any]) -> RunSummary | None:
    """The summary of a run that ended failed or incomplete (what it wrote, what is in doubt), when it
    counted anything; None for a run that failed before counting (its one line says it all)."""
    counts = {key: value for key, value in data.items() if key not in ("exit_code", "error")}
    if set(counts) <= {"status"}:
        return None
    try:
        return RunSummary.model_validate(counts)
    except ValueError:  # pydantic's ValidationError: a partial dict is no summary
        return None


@_failures_as_exceptions
# Every option of EnrichOptions that is not about files or tables, with the same literal default
# (tests/test_enrich_frame.py checks that they agree).
def _enrich_dataframe(  # noqa: PLR0913
    frame: pd.DataFrame | pa.Table,
    *,
    enrichment_type: EnrichmentType = EnrichmentType.PARTIAL,
    mapping: dict[str, str] | None = None,
    store: str | None = None,
    refresh_days: float = 30.0,
    max_credits: float | None = None,
    webhook_url: str | None = None,
    credit_recheck_seconds: float = 60.0,
    pause_timeout_seconds: int = 7 * 24 * 3600,
    poll_timeout_seconds: float = 6 * 3600.0,
    initial_poll_seconds: float = 5.0,
    not_found_grace_seconds: float = 30.0,
    max_concurrent_chunks: int = 8,
    retries: int = 5,
    retry_delay_seconds: float = 2.0,
    batch_rows: int = 50_000,
    base_url: str | None = None,
    rate_limit: str | None = None,
    api_outage_seconds: float = 300.0,
    credentials: str | None = None,
    webhook_listen: str | None = None,
    webhook_grace_seconds: float = 0.5,
    webhook_allow: str | None = None,
    webhook_tls_cert: str | None = None,
    webhook_tls_key: str | None = None,
    webhook_retry_scale: float = 1.0,
) -> EnrichedFrame:
    """Enrich every contact of a pandas DataFrame (or pyarrow Table) through Cleanlist.

    Returns an `EnrichedFrame`: `output` (valid rows + `cleanlist_*` columns), `rejects` (rows that
    could not be sent + `reject_reason`) and `summary` (the `RunSummary`). Contacts already enriched
    within `refresh_days` come from the store and cost nothing. A run that cannot finish ends Failed
    with one line (calling the flow raises it). Options are described in `EnrichOptions`.
    """
    parameters = dict(locals())
    del parameters["frame"]
    return run_frame(frame, parameters)


enrich_dataframe: Flow[..., EnrichedFrame] = _FrameFlow(
    _enrich_dataframe,  # type: ignore[arg-type]  # a Failed state is returned only to fail the run
    name="enrich-dataframe",
    task_runner=thread_pool(TASK_RUNNER_WORKERS),
    log_prints=True,
    persist_result=False,
    # The frame is checked by as_arrow and the options by EnrichOptions: each an InputError line.
    # Prefect's own validation would log the parameters (the frame) when a type does not match.
    validate_parameters=False,
)

__all__ = ["EnrichedFrame", "enrich_dataframe"]
