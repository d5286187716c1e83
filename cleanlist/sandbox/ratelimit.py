"""The API's fixed-window rate limit, per organization and scope (an endpoint, or all of them), on a
monotonic clock."""

from __future__ import annotations

import math


class FixedWindowLimiter:
    """At most `limit` requests per window; windows are aligned to multiples of `window` seconds.

    Alignment (window k covers [k*window, (k+1)*window)) is what a fixed window means; it also lets a
    test predict exactly when the next window opens. Rejected requests are not counted, so a client
    that waits Retry-After always gets through. The scope is the caller's choice: an endpoint name for
    per-endpoint windows, one shared name for a single window per organization.
    """

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        # (organization, scope) -> (window index, requests counted in it); one entry per pair.
        self._counts: dict[tuple[str, str], tuple[int, int]] = {}

    def admit(self, organization_id: str, scope: str, now: float) -> float | None:
        """Count the request and return None, or return the seconds (> 0) until a refused one's window
        resets; the caller rounds them into Retry-After (whole seconds) or retry-after-ms."""
        index = math.floor(now / self.window)
        key = (organization_id, scope)
        counted_index, count = self._counts.get(key, (index, 0))
        if counted_index != index:
            count = 0
        if count >= self.limit:
            return max((index + 1) * self.window - now, 1e-9)
        self._counts[key] = (index, count + 1)
        return None
