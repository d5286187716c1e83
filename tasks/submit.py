"""The submit-chunk task: a thin shell over `cleanlist.run.submit.submit_chunk`.

Its retries are the one place a bulk request is retried, and they are the run's: `submit_chunk_with_retries`
binds the task to the run's retry policy — Prefect may run it `RetryPolicy.submit_attempts` times, and
asks the same policy (`allows_submit_retry`, with Prefect's run count as the one attempt count) whether a
failed run goes again. Retries show in the Prefect UI as the task's "Retrying" runs; the wait the policy
chose is spent at the start of the next run (`submit_chunk`), where a stop request cuts it short, so
Prefect itself adds no delay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.runtime import task_run as current_task_run

from cleanlist.retry import RetryPolicy
from cleanlist.run.context import RunContext
from cleanlist.run.submit import ChunkOutcome, submit_chunk

RetryCondition = Callable[[Task[Any, Any], TaskRun, State[Any]], bool]


@task(name="submit-chunk", task_run_name="chunk-{chunk_no:05d}", cache_policy=NO_CACHE, persist_result=False)
def submit_chunk_task(run: RunContext, chunk_no: int) -> ChunkOutcome:
    """Submit chunk `chunk_no` of the run (its contacts are in the run's workspace)."""
    return submit_chunk(run, chunk_no, attempt=int(current_task_run.run_count or 1))


def retry_condition(policy: RetryPolicy) -> RetryCondition:
    """Prefect asks this after a failed run of the task: the run's own policy decides."""

    def condition(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
        try:
            state.result()
        except Exception as exc:
            return policy.allows_submit_retry(exc, int(task_run.run_count or 1))
        return False

    return condition


def submit_chunk_with_retries(policy: RetryPolicy) -> Task[[RunContext, int], ChunkOutcome]:
    """The task with the run's policy: its attempts and its retry condition (no delay of Prefect's own)."""
    return submit_chunk_task.with_options(
        retries=policy.submit_attempts - 1,
        retry_delay_seconds=0,
        retry_condition_fn=retry_condition(policy),
    )
