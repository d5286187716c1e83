"""The submit-chunk task: a thin shell over `cleanlist.run.submit.submit_chunk`.

Its retries come from the run's retry policy: the flow sets `retries`, `retry_delay_seconds` and the
jitter with `with_options` from `RetryPolicy`, and Prefect asks the same policy whether an error is worth
another try. Retries show in the Prefect UI as the task's runs.
"""

from __future__ import annotations

from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.runtime import task_run as current_task_run

from cleanlist.retry import RetryPolicy
from cleanlist.run.context import RunContext
from cleanlist.run.submit import ChunkOutcome, submit_chunk


def _retry_condition(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect asks this after a failed attempt: retry only what the retry policy calls transient."""
    try:
        state.result()
    except Exception as exc:
        return RetryPolicy().is_retryable(exc)
    return False


@task(
    name="submit-chunk",
    task_run_name="chunk-{chunk_no:05d}",
    retry_condition_fn=_retry_condition,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def submit_chunk_task(run: RunContext, chunk_no: int) -> ChunkOutcome:
    """Submit chunk `chunk_no` of the run (its contacts are in the run's workspace)."""
    return submit_chunk(run, chunk_no, attempt=int(current_task_run.run_count or 1))


def submit_chunk_with_retries(policy: RetryPolicy) -> Task[[RunContext, int], ChunkOutcome]:
    """The task with the policy's retries, delays and jitter."""
    return submit_chunk_task.with_options(
        retries=policy.retries,
        retry_delay_seconds=policy.delays() or 0,
        retry_jitter_factor=policy.jitter_factor,
    )
