"""The one retry policy: after a failed request, what to do, how long to wait, how many more tries.

The error table (`cleanlist.errors.POLICY`) says what an error *is* (transient, fatal, a pause, a
quarantine); this policy turns that into a decision for a given attempt, and logs it once, with the
reason and the wait. The submit task and the poller both ask it; nobody else retries:

| error            | submit-chunk                                  | status poll                  |
|------------------|-----------------------------------------------|------------------------------|
| 429 + Retry-After| wait it out inline, `inline_rate_limit_waits` | poll again after it          |
|                  | times; then as below                          |                              |
| 429, 5xx, network| task retry after `backoff(attempt)` ± jitter, | poll again after the same    |
|                  | `retries` times; then the chunk fails         | backoff (poll timeout bounds)|
| 401, 403         | stop every submission, fail the run           | stop polling, fail the run   |
| 402              | pause the run until credits return            | –                            |
| 422              | quarantine the named contacts, resend once    | –                            |
| 400, 404, other  | fail the chunk, no retry                      | 404: the workflow is gone    |

The client does not loop: it classifies the answer, parses Retry-After and, on a 429, holds the
endpoint in the limiter so that no other thread walks into the same wall while it runs.

Connection errors (refused, reset, timed out) come one per request while the API is down; a run's
`OutageWatch` (cleanlist/run/outage.py) logs those once per endpoint per minute and bounds the outage,
so a policy built with `quiet_connection_errors` decides about them without logging each decision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cleanlist.constants import (
    INITIAL_RETRY_DELAY,
    INLINE_RATE_LIMIT_WAITS,
    MAX_RETRY_DELAY,
    RETRIES,
    RETRY_JITTER_FACTOR,
)
from cleanlist.errors import Action, APIConnectionError, APIStatusError, policy_for

logger = logging.getLogger("cleanlist.retry")


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What to do after one failed request."""

    action: Action
    wait: float | None  # seconds before the next try; None when there is no next try
    inline: bool  # retry here and now (after `wait`) rather than through a task retry
    reason: str

    @property
    def retry(self) -> bool:
        return self.wait is not None


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry transient errors (see the module docstring for the table)."""

    retries: int = RETRIES
    initial_delay: float = INITIAL_RETRY_DELAY
    max_delay: float = MAX_RETRY_DELAY
    jitter_factor: float = RETRY_JITTER_FACTOR
    inline_rate_limit_waits: int = INLINE_RATE_LIMIT_WAITS
    quiet_connection_errors: bool = False  # an OutageWatch logs them (once per endpoint per minute)

    def backoff(self, failures: int) -> float:
        """The delay after the `failures`-th consecutive failure (1-based), before jitter."""
        return float(min(self.initial_delay * 2.0 ** max(failures - 1, 0), self.max_delay))

    def delays(self) -> list[float]:
        """The delay before each task retry, for Prefect's `retry_delay_seconds`."""
        return [self.backoff(n) for n in range(1, self.retries + 1)]

    def action_for(self, error: BaseException) -> Action:
        """The error table's action for `error` (FAIL for anything that is not an API error)."""
        policy = policy_for(error)
        return policy.action if policy is not None else Action.FAIL

    def is_retryable(self, error: BaseException) -> bool:
        """Whether a task that failed with `error` may be retried at all (Prefect's retry condition)."""
        policy = policy_for(error)
        return policy is not None and policy.retryable

    def for_submit(
        self, error: BaseException, *, what: str, attempt: int, inline_waits: int
    ) -> RetryDecision:
        """Decide after a bulk request failed.

        `attempt` is the task's run count (1 for the first run), `inline_waits` the Retry-After waits
        this run already made.
        """
        policy = policy_for(error)
        action = policy.action if policy is not None else Action.FAIL
        retry_after = error.retry_after if isinstance(error, APIStatusError) else None
        if (
            action is Action.RETRY_AFTER
            and retry_after is not None
            and inline_waits < self.inline_rate_limit_waits
        ):
            decision = RetryDecision(
                action,
                retry_after,
                True,
                f"rate limited: waiting Retry-After {retry_after:g}s "
                f"(inline wait {inline_waits + 1} of {self.inline_rate_limit_waits})",
            )
        elif action in (Action.RETRY, Action.RETRY_AFTER):
            if attempt > self.retries:
                decision = RetryDecision(Action.FAIL, None, False, f"giving up after {attempt} attempts")
            else:
                wait = self.backoff(attempt)
                decision = RetryDecision(
                    action,
                    wait,
                    False,
                    f"transient: task retry {attempt} of {self.retries} in ~{wait:g}s "
                    f"(±{self.jitter_factor:.0%} jitter)",
                )
        else:
            decision = RetryDecision(
                action, None, False, policy.fix if policy is not None else "not an API error"
            )
        self._log(what, error, decision)
        return decision

    def for_poll(self, error: BaseException, *, what: str, failures: int, ceiling: float) -> RetryDecision:
        """Decide after a status call failed for the `failures`-th time in a row (polls never run out of
        tries: the poll timeout bounds them); waits are capped at `ceiling`."""
        policy = policy_for(error)
        action = policy.action if policy is not None else Action.FAIL
        if action is Action.FAIL_FAST:
            decision = RetryDecision(action, None, False, policy.fix if policy is not None else "")
        else:
            # Whatever else went wrong, the workflow stays accepted (and paid): poll it again.
            retry_after = error.retry_after if isinstance(error, APIStatusError) else None
            wait = min(retry_after or self.backoff(failures), ceiling)
            hint = "Retry-After" if retry_after else f"backoff after {failures} failure(s)"
            kind = ""
            if action not in (Action.RETRY, Action.RETRY_AFTER):
                kind, action = ", until the poll timeout", Action.RETRY
            decision = RetryDecision(action, wait, True, f"polling again in {wait:g}s ({hint}{kind})")
        self._log(what, error, decision)
        return decision

    def _log(self, what: str, error: BaseException, decision: RetryDecision) -> None:
        if self.quiet_connection_errors and isinstance(error, APIConnectionError):
            return
        level = logging.WARNING if decision.retry or decision.action is Action.PAUSE else logging.ERROR
        logger.log(level, "%s: %s → %s: %s", what, error, decision.action.value, decision.reason)
