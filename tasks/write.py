"""The write-output task: a thin shell over `cleanlist.io.writer.write_rows`."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from cleanlist.io.writer import WriteReport, open_sinks, write_rows
from cleanlist.run.context import RunContext
from cleanlist_prefect.tasks.outcomes import input_errors_as_failed_state


@task(name="write-output", cache_policy=NO_CACHE, persist_result=False)
@input_errors_as_failed_state
def write_output_task(run: RunContext, output: str, rejects: str, table: str | None = None) -> WriteReport:
    """Join every staged row of the run with its outcome; write the output and the rejects.

    CSV files are spreadsheet-safe unless the run's `raw_csv`; their temporary files live in the run's
    workspace, so a killed run's are removed with it.
    """
    out_sink, rej_sink = open_sinks(
        output,
        rejects,
        table,
        raw_csv=run.options.raw_csv,
        scratch_dir=run.workspace.root,
        storage_options=run.options.storage_options,
    )
    return write_rows(run.workspace, run.store, run.options.enrichment_type, out_sink, rej_sink)
