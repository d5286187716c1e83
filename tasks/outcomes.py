"""Bad input ends a task as a Failed state with one line, not an exception with a traceback in the log."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from prefect.client.schemas.objects import State
from prefect.states import Failed

from cleanlist.errors import InputError

P = ParamSpec("P")
R = TypeVar("R")


def input_errors_as_failed_state(fn: Callable[P, R]) -> Callable[P, R | State]:
    """Wrap a task body: an InputError becomes `Failed(message=…)` (Prefect logs no traceback for it)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | State:
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            return Failed(message=str(exc))

    return wrapper


def result_or_input_error(state: State[Any]) -> Any:
    """The task's result; its one-line message re-raised as InputError when it failed on bad input."""
    if state.is_failed():
        try:
            return state.result()
        except Exception as exc:
            if isinstance(exc, InputError):
                raise
            if state.message and not state.message.startswith("Task run encountered an exception"):
                raise InputError(state.message) from None
            raise
    return state.result()
