"""Typing bridges for Prefect 3.9 APIs whose annotations do not say what they return in sync code."""

from __future__ import annotations

import inspect
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

T = TypeVar("T")


def sync_result(value: T | Coroutine[Any, Any, T]) -> T:
    """The value of a Prefect call made from sync code.

    Prefect's dual sync/async functions (create_progress_artifact, run_deployment, to_deployment, …) are
    typed as returning the value or a coroutine; called outside an event loop they return the value.
    """
    assert not inspect.iscoroutine(value), "a Prefect dual-mode function was called from async code"
    return cast(T, value)


def thread_pool(max_workers: int) -> TaskRunner[PrefectFuture[Any]]:
    """A ThreadPoolTaskRunner typed as the flow decorator wants it (TaskRunner is invariant in its future
    type, so Prefect's own subclass does not type-check where a TaskRunner is expected)."""
    return cast(TaskRunner[PrefectFuture[Any]], ThreadPoolTaskRunner(max_workers=max_workers))
