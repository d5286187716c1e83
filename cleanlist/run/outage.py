"""Dead dependencies: an API that stops answering, a store that goes away. Both end the run, bounded.

- `OutageWatch` is the one place that hears about every request of a run (through `WatchedClient`):
  it logs connection errors (refused, reset, timed out) at most once per endpoint per `log_every`
  seconds, with a count of the ones it did not log, and it trips once the API has answered nothing at
  all for `limit` seconds while the run needs it (`arm`ed: submitting or polling). Any answer, a 429 or
  a 5xx included, resets the clock. Tripping hands an `APIOutage` to the run (which closes the gate and
  stops the poller); it is checked on every failed request and by whoever waits (`check`).
- `StoreLost` is what a store failure (connection lost, database dropped) becomes: one line with the
  store's URL, password hidden, and the driver's own first line.

Nothing here imports Prefect; the run's context wires the watch to its gate and poller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from pydantic import SecretStr
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from cleanlist.client import CleanlistClient
from cleanlist.dburl import hide_passwords
from cleanlist.errors import APIConnectionError, APIStatusError, CleanlistError

logger = logging.getLogger("cleanlist.outage")

LOG_EVERY_SECONDS: Final = 60.0
# What a store failure is: the driver's errors (a lost connection, a dropped database) and the pool
# giving up on a connection. Not the store's own checks (ValueError), which are bugs.
STORE_ERRORS: Final = (DBAPIError, PoolTimeoutError)

Clock = Callable[[], float]


class APIOutage(APIConnectionError):
    """The API answered nothing at all for the run's `api_outage_seconds` while the run needed it."""

    def __init__(self, base_url: str, silent: float, last_error: BaseException | None) -> None:
        last = f" (last error: {last_error})" if last_error is not None else ""
        super().__init__(f"the Cleanlist API at {base_url} has not answered for {silent:.0f} s{last}")
        self.silent = silent


class StoreLost(CleanlistError):
    """The enrichment store failed mid-run; the run stops with this one line."""

    def __init__(self, store: str, error: BaseException) -> None:
        super().__init__(
            f"the enrichment store at {hide_passwords(store)} failed ({describe_store_error(error)}); "
            "what it had not recorded was not written; rerun once it is reachable"
        )


def describe_store_error(error: BaseException) -> str:
    """`Kind: the driver's first line`, passwords hidden (SQLAlchemy's text spans lines and quotes SQL)."""
    cause = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    lines = str(cause).strip().splitlines()
    first = hide_passwords(lines[0]) if lines else ""
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


class OutageWatch:
    """Connection errors of one run, per endpoint: logged sparingly, and the bound on how long the API
    may stay silent (see the module docstring). Safe to call from any thread."""

    def __init__(
        self,
        base_url: str,
        limit: float,
        *,
        on_outage: Callable[[APIOutage], None] | None = None,
        log_every: float = LOG_EVERY_SECONDS,
        clock: Clock = time.monotonic,
    ) -> None:
        self.base_url = base_url
        self.limit = limit
        self.on_outage = on_outage
        self.log_every = log_every
        self._clock = clock
        self._lock = threading.Lock()
        self._armed = False
        self._down_since: float | None = None  # first unanswered request since the last answer
        self._last_answer = clock()
        self._last_error: APIConnectionError | None = None
        self._logged_at: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}
        self.errors = 0  # connection errors seen, logged or not
        self.tripped: APIOutage | None = None

    def __repr__(self) -> str:
        return f"OutageWatch({self.base_url}, limit={self.limit:g}s, down={self.down})"

    @property
    def down(self) -> bool:
        """The last request(s) got no answer, and nothing has answered since."""
        with self._lock:
            return self._down_since is not None

    def arm(self) -> None:
        """The run needs the API from now on (submitting, polling); the clock starts afresh."""
        with self._lock:
            self._armed = True
            self._down_since = None

    def disarm(self) -> None:
        """The run no longer needs the API: a silence is no reason to stop it any more."""
        with self._lock:
            self._armed = False

    def answered(self, endpoint: str) -> None:
        """Any HTTP answer (a 2xx, a 429, a 5xx…): the API is there."""
        now = self._clock()
        with self._lock:
            self._last_answer = now
            silent = now - self._down_since if self._down_since is not None else None
            self._down_since = None
        if silent is not None and silent >= 1.0:
            # At the level of the warning it follows, so that whoever saw that one sees this one.
            logger.warning("the Cleanlist API at %s answers again (after %.0f s)", self.base_url, silent)

    def failed(self, endpoint: str, error: APIConnectionError, sent_at: float | None = None) -> None:
        """A request to `endpoint`, sent at `sent_at` (monotonic), got no answer: log it (sparingly)."""
        now = self._clock()
        sent = now if sent_at is None else sent_at
        with self._lock:
            self.errors += 1
            self._last_error = error
            if self._down_since is None:
                self._down_since = max(sent, self._last_answer)
            last = self._logged_at.get(endpoint)
            log = last is None or now - last >= self.log_every
            if log:
                self._logged_at[endpoint] = now
                unlogged, self._unlogged[endpoint] = self._unlogged.get(endpoint, 0), 0
            else:
                self._unlogged[endpoint] = self._unlogged.get(endpoint, 0) + 1
        if log:
            more = f" ({unlogged} more on this endpoint since the last report)" if unlogged else ""
            logger.warning(
                "%s%s; the run stops if the API answers nothing for %g s",
                error,
                more,
                self.limit,
            )
        self.check()

    def check(self) -> APIOutage | None:
        """Trip (once) if the API has been silent for `limit` seconds while armed; the outage, if any."""
        with self._lock:
            if self.tripped is not None or not self._armed or self._down_since is None:
                return self.tripped
            silent = self._clock() - self._down_since
            if silent < self.limit:
                return None
            self.tripped = APIOutage(self.base_url, silent, self._last_error)
            outage = self.tripped
        if self.on_outage is not None:
            self.on_outage(outage)
        return outage


class WatchedClient(CleanlistClient):
    """The run's client: reports every request's outcome to the run's `OutageWatch` (once one is set).

    An HTTP answer of any status counts as an answer; a request that got none (refused, reset, timed out,
    or a 2xx body that is not JSON) as a connection error.
    """

    def __init__(self, api_key: str | SecretStr | None = None, **kwargs: Any) -> None:
        super().__init__(api_key, **kwargs)
        self.watch: OutageWatch | None = None

    def _request(self, endpoint: str, **kwargs: Any) -> Any:
        watch = self.watch
        if watch is None:
            return super()._request(endpoint, **kwargs)
        sent_at = time.monotonic()
        try:
            payload = super()._request(endpoint, **kwargs)
        except APIStatusError:
            watch.answered(endpoint)
            raise
        except APIConnectionError as exc:
            watch.failed(endpoint, exc, sent_at)
            raise
        watch.answered(endpoint)
        return payload
