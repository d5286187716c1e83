"""The one retry policy: after a failed request, what to do, how long to wait, how many more tries.

The error table (`cleanlist.errors.POLICY`) says what an error *is* (transient, fatal, a pause, a
quarantine); this policy turns that into a decision for a given attempt, and logs it once, with the
reason and the wait. Every place that retries asks the run's own policy (built from `--retries` and
`--retry-delay-seconds`); each kind of retry is executed in one place (docs/ARCHITECTURE.md, "Where
each retry happens"):

| error            | submit-chunk (Prefect task retries)           | status poll                  |
|------------------|-----------------------------------------------|------------------------------|
| 429 + Retry-After| task retry after Retry-After, up to `retries` | poll again after it          |
|                  | + `rate_limit_retries` attempts               |                              |
| 429, 5xx, network| task retry after `backoff(attempt)` ± jitter, | poll again after the same    |
|                  | `retries` times; then the chunk fails         | backoff (poll timeout bounds)|
| 401, 403         | stop every submission, fail the run           | stop polling, fail the run   |
| 402              | pause the run until credits return            | –                            |
| 422              | quarantine the named contacts, resend once    | –                            |
| 400, 404, other  | fail the chunk, no retry                      | 404: the workflow is gone    |

A submit attempt is one run of the submit-chunk task: Prefect's run count is the one attempt count, the
task's retry condition is `allows_submit_retry`, and the wait before the next attempt (`for_submit`'s
`wait`, jittered by `jittered`) is spent at the start of that attempt, where a stop request ends it.

The client does not loop: it classifies the answer, parses Retry-After and, on a 429, holds the
endpoint in the limiter so that no other thread walks into the same wall while it runs.

Connection errors (refused, reset, timed out) come one per request while the API is down; a run's
`OutageWatch` (cleanlist/run/outage.py) logs those once per endpoint per minute and bounds the outage,
so a policy built with `quiet_connection_errors` decides about them without logging each decision.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from cleanlist.constants import (
    INITIAL_RETRY_DELAY,
    MAX_RETRY_DELAY,
    RATE_LIMIT_RETRIES,
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
    inline: bool  # retried by the caller's own loop (polls) rather than through a task retry
    reason: str
    spread: bool = False  # a backoff: the caller spreads the wait with `jittered` (a Retry-After is exact)

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
    rate_limit_retries: int = RATE_LIMIT_RETRIES  # attempts beyond `retries` for a 429 with Retry-After
    quiet_connection_errors: bool = False  # an OutageWatch logs them (once per endpoint per minute)

    def backoff(self, failures: int) -> float:
        """The delay after the `failures`-th consecutive failure (1-based), before jitter."""
        return float(min(self.initial_delay * 2.0 ** max(failures - 1, 0), self.max_delay))

    def delays(self) -> list[float]:
        """The backoff before each retry of a transient error, before jitter."""
        return [self.backoff(n) for n in range(1, self.retries + 1)]

    @property
    def submit_attempts(self) -> int:
        """The most runs a submit-chunk task may have (Prefect's `retries` is this minus one)."""
        return 1 + self.retries + self.rate_limit_retries

    def jittered(self, wait: float) -> float:
        """A backoff spread by ±`jitter_factor`, so that chunks failing together do not return together."""
        return max(0.0, wait * random.uniform(1.0 - self.jitter_factor, 1.0 + self.jitter_factor))

    def action_for(self, error: BaseException) -> Action:
        """The error table's action for `error` (FAIL for anything that is not an API error)."""
        policy = policy_for(error)
        return policy.action if policy is not None else Action.FAIL

    def is_retryable(self, error: BaseException) -> bool:
        """Whether `error` is transient at all (worth another try, attempts permitting)."""
        policy = policy_for(error)
        return policy is not None and policy.retryable

    def for_submit(self, error: BaseException, *, what: str, attempt: int) -> RetryDecision:
        """Decide after a bulk request failed on the `attempt`-th run of its task (1 for the first), and
        log the decision once."""
        decision = self.decision(error, attempt)
        self._log(what, error, decision)
        return decision

    def allows_submit_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether the submit-chunk task that failed with `error` on its `attempt`-th run runs again
        (Prefect's retry condition: the same decision as `for_submit`, not logged twice)."""
        return self.decision(error, attempt).retry

    def decision(self, error: BaseException, attempt: int) -> RetryDecision:
        """The decision after the `attempt`-th failure (1-based) of a request retried as a whole, a submit
        or a task lookup, not logged: a 429 with Retry-After may come `rate_limit_retries` times more than
        other transient errors, and waits its hint; those back off (`spread`: the caller jitters)."""
        policy = policy_for(error)
        action = policy.action if policy is not None else Action.FAIL
        retry_after = error.retry_after if isinstance(error, APIStatusError) else None
        if action is Action.RETRY_AFTER and retry_after is not None:
            most = self.retries + self.rate_limit_retries
            if attempt > most:
                return RetryDecision(Action.FAIL, None, False, f"giving up after {attempt} attempts")
            return RetryDecision(
                action,
                retry_after,
                False,
                f"rate limited: task retry {attempt} of {most} after Retry-After {retry_after:g}s",
            )
        if action in (Action.RETRY, Action.RETRY_AFTER):
            if attempt > self.retries:
                return RetryDecision(Action.FAIL, None, False, f"giving up after {attempt} attempts")
            wait = self.backoff(attempt)
            return RetryDecision(
                action,
                wait,
                False,
                f"transient: task retry {attempt} of {self.retries} in ~{wait:g}s "
                f"(±{self.jitter_factor:.0%} jitter)",
                spread=True,
            )
        return RetryDecision(action, None, False, policy.fix if policy is not None else "not an API error")

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
