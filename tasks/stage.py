"""The stage-source task: a thin shell over `cleanlist.run.stage.stage_source`."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from cleanlist.io.cursor import CursorFilter
from cleanlist.run.context import RunContext
from cleanlist.run.stage import StageReport, stage_source
from cleanlist_prefect.tasks.outcomes import input_errors_as_failed_state


@task(name="stage-source", cache_policy=NO_CACHE, persist_result=False)
@input_errors_as_failed_state
def stage_source_task(run: RunContext, cursor: CursorFilter | None = None) -> StageReport:
    """Read, prepare and stage every row of the run's source (past the cursor's mark) into its workspace."""
    options = run.options
    return stage_source(
        options.source,
        run.workspace,
        mapping_overrides=options.mapping,
        sql_query=options.sql_query,
        batch_rows=options.batch_rows,
        sheet=options.sheet,
        encoding=options.encoding,
        cursor=cursor,
        storage_options=options.storage_options,
        stop=run.stop.event,
    )
